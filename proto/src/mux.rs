//! The frames of a link between Rust portals (ALPN [`crate::tls::LINK_ALPN`]): many streams
//! over one TLS connection, each with its own flow control, half-close and abort.
//!
//! Every frame is a 9-byte header, then for [`Kind::Open`] and [`Kind::Data`] `len` bytes of
//! the stream's data:
//!
//! ```text
//! kind: u8 | stream: u32 big-endian (never 0) | len: u32 big-endian
//! ```
//!
//! - `Open` (1): the client portal opens `stream`; `len` bytes of its first data follow (may
//!   be 0). Ids grow: each open names an id above every earlier one.
//! - `Data` (2): `len` bytes of `stream`'s data, at most [`MAX_PAYLOAD`], never more than the
//!   receiver has granted.
//! - `Fin` (3): the sender will send no more on `stream` (half-close); `len` is 0.
//! - `Reset` (4): the sender dropped `stream` (abort); `len` is 0.
//! - `Credit` (5): the sender may send `len` more bytes on `stream` (1..=[`MAX_WINDOW`]); no
//!   body. A stream starts with [`INITIAL_WINDOW`] of credit each way.
//!
//! [`Decoder`] takes bytes in pieces of any size and reports the frames as [`Event`]s; data
//! is reported as it arrives, without waiting for a whole frame. It never panics and refuses
//! what breaks the rules above with a [`MuxError`]; after one, it refuses everything.

/// The size of a frame's header.
pub const HEADER: usize = 9;
/// The most data one frame carries.
pub const MAX_PAYLOAD: u32 = 64 * 1024;
/// Credit each side has on a new stream.
pub const INITIAL_WINDOW: u32 = 256 * 1024;
/// The most credit a stream may hold, and the most one `Credit` frame grants.
pub const MAX_WINDOW: u32 = 16 * 1024 * 1024;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Open = 1,
    Data = 2,
    Fin = 3,
    Reset = 4,
    Credit = 5,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Open,
            2 => Kind::Data,
            3 => Kind::Fin,
            4 => Kind::Reset,
            5 => Kind::Credit,
            _ => return None,
        })
    }
}

/// A frame's header.
pub fn header(kind: Kind, stream: u32, len: u32) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0] = kind as u8;
    h[1..5].copy_from_slice(&stream.to_be_bytes());
    h[5..9].copy_from_slice(&len.to_be_bytes());
    h
}

/// What the decoder saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    /// The peer opened `stream`; its first data follows as [`Event::Data`].
    Open(u32),
    /// Bytes of a stream's data (a frame's body may come as several pieces).
    Data(u32, &'a [u8]),
    Fin(u32),
    Reset(u32),
    Credit(u32, u32),
}

/// A frame that breaks the rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MuxError {
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame for stream 0")]
    ZeroStream,
    #[error("a {kind:?} frame of {len} bytes (at most {MAX_PAYLOAD})")]
    TooLong { kind: Kind, len: u32 },
    #[error("a {kind:?} frame with a length ({len}); it has none")]
    UnexpectedLength { kind: Kind, len: u32 },
    #[error("a credit of {0} (1 to {MAX_WINDOW})")]
    BadCredit(u32),
    #[error("the link broke its framing earlier")]
    Failed,
}

/// Decodes a link's frames from bytes in pieces of any size.
#[derive(Debug, Default)]
pub struct Decoder {
    head: [u8; HEADER],
    /// How much of `head` is filled.
    have: usize,
    /// The body being read: its stream and the bytes still to come.
    body: Option<(u32, u32)>,
    failed: bool,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Feeds `input`, reporting each event to `emit` in order. On an error, events before it
    /// have been reported and the decoder refuses all further input.
    pub fn feed<'a>(
        &mut self,
        mut input: &'a [u8],
        mut emit: impl FnMut(Event<'a>),
    ) -> Result<(), MuxError> {
        if self.failed {
            return Err(MuxError::Failed);
        }
        while !input.is_empty() {
            if let Some((stream, left)) = self.body {
                let take = input.len().min(left as usize);
                let (piece, rest) = input.split_at(take);
                emit(Event::Data(stream, piece));
                input = rest;
                let left = left - take as u32;
                self.body = (left > 0).then_some((stream, left));
                continue;
            }
            let take = (HEADER - self.have).min(input.len());
            self.head[self.have..self.have + take].copy_from_slice(&input[..take]);
            self.have += take;
            input = &input[take..];
            if self.have < HEADER {
                break;
            }
            self.have = 0;
            match self.frame(&mut emit) {
                Ok(()) => {}
                Err(e) => {
                    self.failed = true;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Acts on the complete header in `head`.
    fn frame<'a>(&mut self, emit: &mut impl FnMut(Event<'a>)) -> Result<(), MuxError> {
        let h = &self.head;
        let kind = Kind::from_u8(h[0]).ok_or(MuxError::UnknownKind(h[0]))?;
        let stream = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
        let len = u32::from_be_bytes([h[5], h[6], h[7], h[8]]);
        if stream == 0 {
            return Err(MuxError::ZeroStream);
        }
        match kind {
            Kind::Open | Kind::Data => {
                if len > MAX_PAYLOAD {
                    return Err(MuxError::TooLong { kind, len });
                }
                if kind == Kind::Open {
                    emit(Event::Open(stream));
                }
                self.body = (len > 0).then_some((stream, len));
            }
            Kind::Fin | Kind::Reset => {
                if len != 0 {
                    return Err(MuxError::UnexpectedLength { kind, len });
                }
                emit(if kind == Kind::Fin {
                    Event::Fin(stream)
                } else {
                    Event::Reset(stream)
                });
            }
            Kind::Credit => {
                if len == 0 || len > MAX_WINDOW {
                    return Err(MuxError::BadCredit(len));
                }
                emit(Event::Credit(stream, len));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events as (kind, stream, bytes), adjacent data pieces of a stream joined.
    type Seen = Vec<(u8, u32, Vec<u8>)>;

    /// Decodes `chunks` in turn.
    fn decode_in(chunks: &[&[u8]]) -> (Seen, Result<(), MuxError>) {
        let mut d = Decoder::new();
        let mut out: Seen = Vec::new();
        for c in chunks {
            let r = d.feed(c, |e| match e {
                Event::Data(s, b) => match out.last_mut() {
                    Some((2, last, acc)) if *last == s => acc.extend_from_slice(b),
                    _ => out.push((2, s, b.to_vec())),
                },
                Event::Open(s) => out.push((1, s, vec![])),
                Event::Fin(s) => out.push((3, s, vec![])),
                Event::Reset(s) => out.push((4, s, vec![])),
                Event::Credit(s, n) => out.push((5, s, n.to_be_bytes().to_vec())),
            });
            if r.is_err() {
                return (out, r);
            }
        }
        (out, Ok(()))
    }

    fn frame(kind: Kind, stream: u32, body: &[u8]) -> Vec<u8> {
        let mut f = header(kind, stream, body.len() as u32).to_vec();
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn frames_decode_the_same_whatever_the_pieces() {
        let mut wire = frame(Kind::Open, 1, b"GET / HTTP/1.1\r\n\r\n");
        wire.extend(frame(Kind::Data, 1, &[7u8; 70_000][..65_536]));
        wire.extend(header(Kind::Credit, 1, 4096));
        wire.extend(frame(Kind::Open, 3, b""));
        wire.extend(header(Kind::Fin, 1, 0));
        wire.extend(header(Kind::Reset, 3, 0));
        let (whole, r) = decode_in(&[&wire]);
        assert_eq!(r, Ok(()));
        assert_eq!(
            whole.iter().map(|e| (e.0, e.1)).collect::<Vec<_>>(),
            vec![(1, 1), (2, 1), (5, 1), (1, 3), (3, 1), (4, 3)]
        );
        assert_eq!(whole[1].2.len(), 18 + 65_536);
        for size in [1, 2, 8, 9, 10, 4096] {
            let pieces: Vec<&[u8]> = wire.chunks(size).collect();
            assert_eq!(
                decode_in(&pieces),
                (whole.clone(), Ok(())),
                "pieces of {size}"
            );
        }
    }

    #[test]
    fn broken_frames_are_refused_and_stay_refused() {
        let cases: Vec<(Vec<u8>, MuxError)> = vec![
            (header(Kind::Data, 0, 1).to_vec(), MuxError::ZeroStream),
            (vec![9, 0, 0, 0, 1, 0, 0, 0, 0], MuxError::UnknownKind(9)),
            (
                header(Kind::Data, 1, MAX_PAYLOAD + 1).to_vec(),
                MuxError::TooLong {
                    kind: Kind::Data,
                    len: MAX_PAYLOAD + 1,
                },
            ),
            (
                header(Kind::Fin, 1, 3).to_vec(),
                MuxError::UnexpectedLength {
                    kind: Kind::Fin,
                    len: 3,
                },
            ),
            (header(Kind::Credit, 1, 0).to_vec(), MuxError::BadCredit(0)),
            (
                header(Kind::Credit, 1, MAX_WINDOW + 1).to_vec(),
                MuxError::BadCredit(MAX_WINDOW + 1),
            ),
        ];
        for (wire, want) in cases {
            let mut d = Decoder::new();
            assert_eq!(d.feed(&wire, |_| {}), Err(want));
            assert_eq!(
                d.feed(&frame(Kind::Open, 1, b""), |_| {}),
                Err(MuxError::Failed)
            );
        }
    }
}
