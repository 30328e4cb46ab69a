//! Netport's wire protocol (sans-I/O).
//!
//! What it does: turns bytes into frames and frames into bytes, with a hard size limit, so
//! the daemons can feed it whatever arrived on a socket; [`control`] defines the versioned
//! control messages carried in those frames. What it does not do: no sockets, no clock, no
//! tokio.
//!
//! [`legacy`] holds the byte-exact codecs of the original Python portal's protocol ("V0.1"):
//! its control frames, link frames and relay hello, each with one decoder entry point that
//! never panics ([`legacy::decode_control_frame`], [`legacy::decode_auth`],
//! [`legacy::decode_control`], [`legacy::decode_link_frame`], [`legacy::decode_link_control`],
//! [`legacy::decode_relay_hello`], [`legacy::LegacyName::parse`]).
//!
//! [`identity`] reads who a certificate names (`netport://<role>/<name>`) and its key's
//! SHA-256, from DER bytes the daemons hand it; it verifies no chains and reads no clock.

pub mod control;
pub mod identity;
pub mod legacy;
pub mod mux;
pub mod relay;
pub mod tls;

/// The TLS ALPN protocol id of the native control protocol, version 1.
pub const ALPN: &[u8] = b"netport/1";

/// The largest frame body accepted, in bytes. Larger length prefixes are refused before any
/// memory is reserved for them.
pub const MAX_FRAME: usize = 1 << 20;

/// Length prefix size: a big-endian u32.
const HEADER: usize = 4;

/// Why a buffer does not hold a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// More bytes are needed; not an error on a stream, just "wait".
    #[error("incomplete frame: need {needed} more bytes")]
    Incomplete {
        /// How many more bytes would complete the frame (or its header).
        needed: usize,
    },
    /// The length prefix exceeds [`MAX_FRAME`]: the peer is broken or hostile.
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME} bytes")]
    TooLarge {
        /// The announced length.
        len: usize,
    },
}

/// Checks whether `buf` starts with a whole frame; returns the body's length.
pub fn check(buf: &[u8]) -> Result<usize, FrameError> {
    let Some(header) = buf.get(..HEADER) else {
        return Err(FrameError::Incomplete {
            needed: HEADER - buf.len(),
        });
    };
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge { len });
    }
    let have = buf.len() - HEADER;
    if have < len {
        return Err(FrameError::Incomplete { needed: len - have });
    }
    Ok(len)
}

/// Splits the first frame off `buf`: returns `(body, rest)`.
pub fn parse(buf: &[u8]) -> Result<(&[u8], &[u8]), FrameError> {
    let len = check(buf)?;
    let (frame, rest) = buf.split_at(HEADER + len);
    Ok((&frame[HEADER..], rest))
}

/// Appends `body` as one frame to `out`.
pub fn encode(body: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge { len: body.len() });
    }
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_partial_input() {
        let mut buf = Vec::new();
        encode(b"hello", &mut buf).expect("small frame");
        encode(b"", &mut buf).expect("empty frame");
        for cut in 0..HEADER + 5 {
            assert!(matches!(
                parse(&buf[..cut]),
                Err(FrameError::Incomplete { .. })
            ));
        }
        let (a, rest) = parse(&buf).expect("first");
        assert_eq!(a, b"hello");
        let (b, rest) = parse(rest).expect("second");
        assert_eq!((b, rest), (&b""[..], &b""[..]));
    }

    #[test]
    fn oversized_prefix_is_refused_before_the_body_arrives() {
        let buf = (MAX_FRAME as u32 + 1).to_be_bytes();
        assert_eq!(
            check(&buf),
            Err(FrameError::TooLarge { len: MAX_FRAME + 1 })
        );
        assert!(encode(&vec![0; MAX_FRAME + 1], &mut Vec::new()).is_err());
    }
}
