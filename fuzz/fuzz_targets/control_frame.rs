//! Native control frames: bytes from a control connection, fed to the decoder the daemons
//! use, in chunks of varying size as they arrive from a socket.
//!
//! Properties: decoding never panics; a decoded message encodes and decodes back to itself;
//! the stream either yields messages, waits for more bytes, or fails once and for all.

#![no_main]

use libfuzzer_sys::fuzz_target;
use netport_proto::control::{Decoder, Message, encode_message};

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, bytes)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut decoder = Decoder::new();
    'stream: for piece in bytes.chunks(chunk) {
        decoder.push(piece);
        loop {
            match decoder.next_message() {
                Ok(Some(msg)) => round_trip(&msg),
                Ok(None) => break,
                Err(_) => break 'stream,
            }
        }
    }
    // The frame layer on its own, on the whole input.
    let mut rest = bytes;
    while let Ok((body, tail)) = netport_proto::parse(rest) {
        if let Ok(msg) = Message::from_body(body) {
            round_trip(&msg);
        }
        rest = tail;
    }
});

fn round_trip(msg: &Message) {
    let frame = encode_message(msg);
    let (body, rest) = netport_proto::parse(&frame).expect("an encoded message is one frame");
    assert!(rest.is_empty());
    let again = Message::from_body(body).expect("an encoded message decodes");
    assert_eq!(&again, msg);
}
