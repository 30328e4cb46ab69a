//! Relay hellos: the first bytes a relay port reads from whoever connects to it.
//!
//! Properties: parsing never panics; a parsed hello is exactly the encoding of its token;
//! tokens in control messages (hex) round-trip.

#![no_main]

use libfuzzer_sys::fuzz_target;
use netport_proto::relay::{self, HELLO_LEN};

fuzz_target!(|data: &[u8]| {
    match relay::parse_hello(data) {
        Ok(token) => {
            assert!(data.len() >= HELLO_LEN);
            assert_eq!(&relay::encode_hello(&token)[..], &data[..HELLO_LEN]);
            assert!(relay::tokens_equal(&token, &token));
        }
        Err(relay::HelloError::Short(n)) => assert!(n < HELLO_LEN && n == data.len()),
        Err(relay::HelloError::Magic) => assert_ne!(&data[..4], relay::MAGIC),
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Some(token) = relay::token_from_hex(text)
    {
        assert_eq!(relay::token_to_hex(&token), text.to_ascii_lowercase());
    }
});
