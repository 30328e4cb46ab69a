//! Legacy (V0.1) links and relay hellos: `len | channel` frames and channel-0 control
//! messages from a legacy peer, the 64-byte relay hello, and the `ID|IDV|USER|USERV` names
//! read from certificates.
//!
//! Property: decoding never panics, whatever the bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use netport_proto::legacy;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    for _ in 0..64 {
        let Ok((channel, payload, tail)) = legacy::decode_link_frame(rest) else {
            break;
        };
        if channel == 0 {
            let _ = legacy::decode_link_control(payload);
        }
        if tail.len() >= rest.len() {
            break;
        }
        rest = tail;
    }
    let _ = legacy::decode_link_control(data);
    let _ = legacy::decode_relay_hello(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = legacy::LegacyName::parse(text);
        let _ = legacy::parse_id(text);
    }
});
