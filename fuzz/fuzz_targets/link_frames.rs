//! Link frames between Rust portals (`netport_proto::mux`): bytes from a link's TLS stream,
//! fed to the decoder the portals use, in pieces of varying size as they arrive from a socket.
//!
//! Properties: decoding never panics; how the bytes are cut into pieces changes nothing (the
//! same events, a stream's data joined, and the same error at the same point); a data frame
//! never reports more than `MAX_PAYLOAD` bytes; a credit is within 1..=`MAX_WINDOW`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use netport_proto::mux::{Decoder, Event, MAX_PAYLOAD, MAX_WINDOW, MuxError};

/// One event, owned; adjacent data of a stream is joined.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Open(u32),
    Data(u32, Vec<u8>),
    Fin(u32),
    Reset(u32),
    Credit(u32, u32),
}

fn decode<'a>(pieces: impl Iterator<Item = &'a [u8]>) -> (Vec<Seen>, Option<MuxError>) {
    let mut d = Decoder::new();
    let mut seen = Vec::new();
    for piece in pieces {
        let r = d.feed(piece, |e| match e {
            Event::Data(s, b) => {
                assert!(b.len() <= MAX_PAYLOAD as usize);
                match seen.last_mut() {
                    Some(Seen::Data(last, acc)) if *last == s => acc.extend_from_slice(b),
                    _ => seen.push(Seen::Data(s, b.to_vec())),
                }
            }
            Event::Open(s) => seen.push(Seen::Open(s)),
            Event::Fin(s) => seen.push(Seen::Fin(s)),
            Event::Reset(s) => seen.push(Seen::Reset(s)),
            Event::Credit(s, n) => {
                assert!(n >= 1 && n <= MAX_WINDOW);
                seen.push(Seen::Credit(s, n));
            }
        });
        if let Err(e) = r {
            // Once broken, always broken.
            assert_eq!(
                d.feed(b"\x02\0\0\0\x01\0\0\0\0", |_| {}),
                Err(MuxError::Failed)
            );
            return (seen, Some(e));
        }
    }
    (seen, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, bytes)) = data.split_first() else {
        return;
    };
    let whole = decode(std::iter::once(bytes));
    let cut = decode(bytes.chunks(usize::from(chunk).max(1)));
    assert_eq!(whole, cut);
});
