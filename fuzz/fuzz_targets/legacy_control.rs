//! Legacy (V0.1) control connections: what a legacy portal sends netportd's legacy listener,
//! frame by frame: the length-prefixed frame, the login, then control messages.
//!
//! Property: decoding never panics, whatever the bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use netport_proto::legacy;

fuzz_target!(|data: &[u8]| {
    // As from a socket: frames back to back, each payload read as a login and as a message.
    let mut rest = data;
    for _ in 0..64 {
        let Ok((payload, tail)) = legacy::decode_control_frame(rest) else {
            break;
        };
        let _ = legacy::decode_auth(payload);
        let _ = legacy::decode_control(payload);
        if tail.len() >= rest.len() {
            break;
        }
        rest = tail;
    }
    // And the whole input as one payload.
    let _ = legacy::decode_auth(data);
    let _ = legacy::decode_control(data);
});
