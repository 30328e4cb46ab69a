//! What a portal says to a relay port before the relay splices it to its peer.
//!
//! The portal connects to the port the server gave it and sends a 36-byte hello: the magic
//! `NPR1` and its 32-byte single-use token. The relay answers 4 bytes: [`READY`] once both
//! sides are in (TLS between the portals starts after it), or [`BAD_TOKEN`] before closing.
//! Nothing after the hello is ever read by the relay as anything but opaque bytes.

/// Magic at the start of a relay hello.
pub const MAGIC: &[u8; 4] = b"NPR1";
/// Length of a relay hello.
pub const HELLO_LEN: usize = 4 + TOKEN_LEN;
/// Length of a token.
pub const TOKEN_LEN: usize = 32;
/// The relay's answer when both sides are paired.
pub const READY: &[u8; 4] = b"NPRY";
/// The relay's answer to an unknown, reused or expired token.
pub const BAD_TOKEN: &[u8; 4] = b"NPBT";

/// A single-use token.
pub type Token = [u8; TOKEN_LEN];

/// Why bytes are not a relay hello.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// Fewer than [`HELLO_LEN`] bytes.
    #[error("relay hello too short: {0} of {HELLO_LEN} bytes")]
    Short(usize),
    /// Not a Netport relay hello.
    #[error("not a netport relay hello (bad magic)")]
    Magic,
}

/// The hello for `token`.
pub fn encode_hello(token: &Token) -> [u8; HELLO_LEN] {
    let mut out = [0u8; HELLO_LEN];
    out[..4].copy_from_slice(MAGIC);
    out[4..].copy_from_slice(token);
    out
}

/// The token in a hello (exactly [`HELLO_LEN`] bytes are read; more is the peer's data).
pub fn parse_hello(bytes: &[u8]) -> Result<Token, HelloError> {
    let hello = bytes
        .get(..HELLO_LEN)
        .ok_or(HelloError::Short(bytes.len()))?;
    if &hello[..4] != MAGIC {
        return Err(HelloError::Magic);
    }
    let mut token = [0u8; TOKEN_LEN];
    token.copy_from_slice(&hello[4..]);
    Ok(token)
}

/// Compares tokens in time independent of where they differ.
pub fn tokens_equal(a: &Token, b: &Token) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Tokens travel hex-encoded in control messages.
pub fn token_to_hex(token: &Token) -> String {
    hex::encode(token)
}

/// Parses a hex token from a control message.
pub fn token_from_hex(s: &str) -> Option<Token> {
    let mut t = [0u8; TOKEN_LEN];
    hex::decode_to_slice(s, &mut t).ok()?;
    Some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trip_and_refusals() {
        let token = [7u8; TOKEN_LEN];
        let hello = encode_hello(&token);
        assert_eq!(parse_hello(&hello), Ok(token));
        assert_eq!(parse_hello(&hello[..10]), Err(HelloError::Short(10)));
        let mut bad = hello;
        bad[0] = b'X';
        assert_eq!(parse_hello(&bad), Err(HelloError::Magic));
        assert!(tokens_equal(&token, &token));
        let mut other = token;
        other[31] ^= 1;
        assert!(!tokens_equal(&token, &other));
        assert_eq!(token_from_hex(&token_to_hex(&token)), Some(token));
        assert_eq!(token_from_hex("zz"), None);
    }
}
