//! The legacy portal protocol "V0.1" (the original Python portal), byte for byte.
//!
//! Three formats, each with one decoder entry point that never panics, whatever the input:
//! - control frames between a legacy portal and netportd: [`decode_control_frame`] splits a
//!   `len:u16le | ".." | payload` frame off a buffer, [`decode_auth`] reads the login and
//!   [`decode_control`] the `ref | cmd | data` messages after it;
//! - link frames between two portals (inside their TLS): [`decode_link_frame`] splits a
//!   `len:u16le | dstChannel:u16le | payload` frame off a buffer, [`decode_link_control`]
//!   reads a channel-0 control message;
//! - the relay hello: [`decode_relay_hello`] reads `tokenR[8]` and 56 ASCII `'0'`.
//!
//! [`LegacyName`] is the `ID|IDV|USER|USERV` DNS name a legacy portal's certificate carries.
//! What this module does not do: no sockets, no clock, no policy.

use std::fmt;

/// The protocol tag at the start of the login and of its answer.
pub const VERSION_TAG: &[u8; 4] = b"V0.1";
/// The whole successful login answer (a control frame payload).
pub const AUTH_OK: &[u8; 12] = b"V0.1REPL.OK.";
/// The `ref` of messages that answer nothing.
pub const NO_REF: [u8; 4] = *b"....";
/// The name the legacy listener's certificate carries.
pub const SERVER_NAME: &str = "server";

/// Length of the relay hello.
pub const RELAY_HELLO_LEN: usize = 64;
/// The relay's answer once both portals are in.
pub const RELAY_READY: &[u8; 8] = b"Ready !\n";
/// The relay's answer to an unknown or reused token.
pub const RELAY_BAD_TOKEN: &[u8; 8] = b"Bad T !\n";

/// Control frame header: `len:u16le` and two ignored bytes.
pub const CONTROL_HEADER: usize = 4;
/// Link frame header: `len:u16le | dstChannel:u16le`.
pub const LINK_HEADER: usize = 4;
/// The largest payload a frame can carry (the length is a u16).
pub const MAX_PAYLOAD: usize = u16::MAX as usize;

/// A 4-byte legacy identifier or value (`PortalID`, `UserID`, `IDV`, `UserV`).
pub type Id4 = [u8; 4];
/// `tokenP` (between the portals) or `tokenR` (at the relay).
pub type Token8 = [u8; 8];

/// Why bytes are not what the legacy protocol says they should be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LegacyError {
    /// More bytes are needed (not an error on a stream, just "wait").
    #[error("incomplete legacy frame: need {needed} more bytes")]
    Incomplete {
        /// How many more bytes complete the frame (or its header).
        needed: usize,
    },
    /// A payload too long for a u16 length.
    #[error("payload of {0} bytes does not fit a legacy frame (at most 65535)")]
    TooLarge(usize),
    /// The login frame is not `V0.1 AUTH portalID userID`.
    #[error("not a V0.1 login: {0}")]
    BadAuth(&'static str),
    /// A message too short for its command.
    #[error("legacy `{cmd}` message too short: {len} bytes")]
    Short {
        /// The command, as text.
        cmd: String,
        /// Bytes present.
        len: usize,
    },
    /// A command this implementation does not know.
    #[error("unknown legacy command {0:?}")]
    UnknownCommand(String),
    /// The relay hello is not `tokenR` followed by 56 `'0'`.
    #[error("not a legacy relay hello")]
    BadHello,
    /// An address that is not UTF-8.
    #[error("address is not UTF-8")]
    BadAddress,
}

fn short(cmd: &[u8], len: usize) -> LegacyError {
    LegacyError::Short {
        cmd: String::from_utf8_lossy(cmd).into_owned(),
        len,
    }
}

fn id4(b: &[u8]) -> Id4 {
    let mut o = [0u8; 4];
    o.copy_from_slice(&b[..4]);
    o
}

fn tok8(b: &[u8]) -> Token8 {
    let mut o = [0u8; 8];
    o.copy_from_slice(&b[..8]);
    o
}

fn u16le(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

fn u32le(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

// ---------------------------------------------------------------- control frames

/// Splits the first control frame off `buf`: `(payload, rest)`.
pub fn decode_control_frame(buf: &[u8]) -> Result<(&[u8], &[u8]), LegacyError> {
    let Some(h) = buf.get(..CONTROL_HEADER) else {
        return Err(LegacyError::Incomplete {
            needed: CONTROL_HEADER - buf.len(),
        });
    };
    let len = usize::from(u16le(h));
    let have = buf.len() - CONTROL_HEADER;
    if have < len {
        return Err(LegacyError::Incomplete { needed: len - have });
    }
    let (frame, rest) = buf.split_at(CONTROL_HEADER + len);
    Ok((&frame[CONTROL_HEADER..], rest))
}

/// One control frame holding `payload`, ready for a single write.
pub fn encode_control_frame(payload: &[u8]) -> Result<Vec<u8>, LegacyError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(LegacyError::TooLarge(payload.len()));
    }
    let mut out = Vec::with_capacity(CONTROL_HEADER + payload.len());
    out.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    out.extend_from_slice(b"..");
    out.extend_from_slice(payload);
    Ok(out)
}

/// The login: `"V0.1" "AUTH" portalID[4] userID[4]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Auth {
    /// `PortalID`.
    pub portal_id: Id4,
    /// `UserID`.
    pub user_id: Id4,
}

/// Reads a login payload (exactly 16 bytes).
pub fn decode_auth(payload: &[u8]) -> Result<Auth, LegacyError> {
    if payload.len() != 16 {
        return Err(LegacyError::BadAuth("the login is not 16 bytes"));
    }
    if &payload[..4] != VERSION_TAG {
        return Err(LegacyError::BadAuth("the version is not V0.1"));
    }
    if &payload[4..8] != b"AUTH" {
        return Err(LegacyError::BadAuth("the command is not AUTH"));
    }
    Ok(Auth {
        portal_id: id4(&payload[8..]),
        user_id: id4(&payload[12..]),
    })
}

/// The login payload for `auth`.
pub fn encode_auth(auth: &Auth) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    out.extend_from_slice(VERSION_TAG);
    out.extend_from_slice(b"AUTH");
    out.extend_from_slice(&auth.portal_id);
    out.extend_from_slice(&auth.user_id);
    out
}

/// Where two portals meet and how they recognise each other, as announced in `REPL` (about
/// the peer) and `CLKR` (about the requester).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meeting {
    /// The other portal's name values (`ID|IDV|USER|USERV`).
    pub peer: LegacyName,
    /// Exchanged inside the portals' TLS.
    pub token_p: Token8,
    /// Presented to the relay.
    pub token_r: Token8,
    /// Relay port.
    pub relay_port: u16,
    /// Relay address (at least one byte).
    pub relay_addr: String,
}

/// A control message after login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `.KA.`: keepalive, both ways.
    KeepAlive,
    /// `RQRL`: ask for a link to `other_id`.
    RequestLink {
        /// The peer's `PortalID`.
        other_id: Id4,
        /// Opaque; may be ignored.
        seed: [u8; 8],
    },
    /// `REPL .OK.`: the link is set up; `peer.id` is not on the wire (the requester knows it).
    Granted(Meeting),
    /// `DENY`: the policy refuses.
    Deny,
    /// `NFND`: the peer is not connected.
    NotFound,
    /// `NORL`: no relay.
    NoRelay,
    /// `CLKR`: connect a link to the requester `peer`.
    ConnectLink(Meeting),
}

/// A control message with its `ref`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlMsg {
    /// Request id (echoed in replies) or `"...."`.
    pub reference: [u8; 4],
    /// What it says.
    pub command: Command,
}

fn decode_meeting(cmd: &[u8], d: &[u8], with_id: bool) -> Result<Meeting, LegacyError> {
    // REPL: ".OK." IDV UserID UserV tokenP tokenR port addr (>= 35 bytes);
    // CLKR: ID IDV UserID UserV tokenP tokenR port addr (>= 35 bytes).
    if d.len() < 35 {
        return Err(short(cmd, d.len()));
    }
    let (id, v) = if with_id {
        (id4(d), &d[4..])
    } else {
        ([0u8; 4], &d[4..])
    };
    let addr = std::str::from_utf8(&v[30..]).map_err(|_| LegacyError::BadAddress)?;
    Ok(Meeting {
        peer: LegacyName {
            id,
            idv: id4(v),
            user: id4(&v[4..]),
            userv: id4(&v[8..]),
        },
        token_p: tok8(&v[12..]),
        token_r: tok8(&v[20..]),
        relay_port: u16le(&v[28..]),
        relay_addr: addr.to_owned(),
    })
}

fn encode_meeting(out: &mut Vec<u8>, m: &Meeting, with_id: bool) {
    if with_id {
        out.extend_from_slice(&m.peer.id);
    } else {
        out.extend_from_slice(b".OK.");
    }
    out.extend_from_slice(&m.peer.idv);
    out.extend_from_slice(&m.peer.user);
    out.extend_from_slice(&m.peer.userv);
    out.extend_from_slice(&m.token_p);
    out.extend_from_slice(&m.token_r);
    out.extend_from_slice(&m.relay_port.to_le_bytes());
    out.extend_from_slice(m.relay_addr.as_bytes());
}

/// Reads a control payload after login: `ref[4] cmd[4] data`.
pub fn decode_control(payload: &[u8]) -> Result<ControlMsg, LegacyError> {
    if payload.len() < 8 {
        return Err(short(b"?", payload.len()));
    }
    let reference = id4(payload);
    let cmd = &payload[4..8];
    let data = &payload[8..];
    let command = match cmd {
        b".KA." => Command::KeepAlive,
        b"RQRL" => {
            if data.len() < 12 {
                return Err(short(cmd, data.len()));
            }
            Command::RequestLink {
                other_id: id4(data),
                seed: tok8(&data[4..]),
            }
        }
        b"REPL" => match data.get(..4) {
            Some(b".OK.") => Command::Granted(decode_meeting(cmd, data, false)?),
            Some(b"DENY") => Command::Deny,
            Some(b"NFND") => Command::NotFound,
            Some(b"NORL") => Command::NoRelay,
            _ => return Err(short(cmd, data.len())),
        },
        b"CLKR" => Command::ConnectLink(decode_meeting(cmd, data, true)?),
        other => {
            return Err(LegacyError::UnknownCommand(
                String::from_utf8_lossy(other).into_owned(),
            ));
        }
    };
    Ok(ControlMsg { reference, command })
}

/// The payload of a control message (wrap it with [`encode_control_frame`]).
pub fn encode_control(msg: &ControlMsg) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&msg.reference);
    match &msg.command {
        Command::KeepAlive => out.extend_from_slice(b".KA."),
        Command::RequestLink { other_id, seed } => {
            out.extend_from_slice(b"RQRL");
            out.extend_from_slice(other_id);
            out.extend_from_slice(seed);
        }
        Command::Granted(m) => {
            out.extend_from_slice(b"REPL");
            encode_meeting(&mut out, m, false);
        }
        Command::Deny => out.extend_from_slice(b"REPLDENY"),
        Command::NotFound => out.extend_from_slice(b"REPLNFND"),
        Command::NoRelay => out.extend_from_slice(b"REPLNORL"),
        Command::ConnectLink(m) => {
            out.extend_from_slice(b"CLKR");
            encode_meeting(&mut out, m, true);
        }
    }
    out
}

/// A whole control frame for `msg`, ready for a single write.
pub fn control_frame(msg: &ControlMsg) -> Vec<u8> {
    let payload = encode_control(msg);
    // A meeting's address is the only variable part; the server's own addresses are short.
    encode_control_frame(&payload).unwrap_or_default()
}

// ---------------------------------------------------------------- link frames

/// Splits the first link frame off `buf`: `(dstChannel, payload, rest)`.
pub fn decode_link_frame(buf: &[u8]) -> Result<(u16, &[u8], &[u8]), LegacyError> {
    let Some(h) = buf.get(..LINK_HEADER) else {
        return Err(LegacyError::Incomplete {
            needed: LINK_HEADER - buf.len(),
        });
    };
    let len = usize::from(u16le(h));
    let channel = u16le(&h[2..]);
    let have = buf.len() - LINK_HEADER;
    if have < len {
        return Err(LegacyError::Incomplete { needed: len - have });
    }
    let (frame, rest) = buf.split_at(LINK_HEADER + len);
    Ok((channel, &frame[LINK_HEADER..], rest))
}

/// Appends one link frame to `out`.
pub fn encode_link_frame(
    channel: u16,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), LegacyError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(LegacyError::TooLarge(payload.len()));
    }
    out.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    out.extend_from_slice(&channel.to_le_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// A channel-0 control message on a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkControl {
    /// `.`: keepalive.
    KeepAlive,
    /// `n`: open a channel to `addr:port` on the receiver's side.
    Open {
        /// Request id.
        req: u32,
        /// The opener's channel.
        src: u16,
        /// Target port.
        port: u16,
        /// Target address.
        addr: String,
    },
    /// `N`: answer to `n`; `new == 0` is a failure.
    Opened {
        /// The request answered.
        req: u32,
        /// The opener's channel (echoed).
        src: u16,
        /// The answering side's channel.
        new: u16,
    },
    /// `c`: the sender's local socket reached EOF.
    HalfClose {
        /// Request id.
        req: u32,
        /// The receiver's channel.
        dst: u16,
        /// The sender's channel.
        src: u16,
    },
    /// `C`: answer to `c`.
    HalfClosed {
        /// The request answered.
        req: u32,
        /// The channel of the `c` sender (echoed).
        src: u16,
        /// Whether it was accepted.
        ok: bool,
    },
    /// `d`: abort the channel.
    Abort {
        /// Request id.
        req: u32,
        /// The receiver's channel.
        dst: u16,
        /// The sender's channel.
        src: u16,
    },
    /// `D`: answer to `d`.
    Aborted {
        /// The request answered.
        req: u32,
        /// The channel of the `d` sender (echoed).
        src: u16,
        /// Whether it was accepted.
        ok: bool,
    },
}

/// Reads a channel-0 payload.
pub fn decode_link_control(p: &[u8]) -> Result<LinkControl, LegacyError> {
    let Some(&action) = p.first() else {
        return Err(short(b"link control", 0));
    };
    if action == b'.' {
        return Ok(LinkControl::KeepAlive);
    }
    let need = match action {
        b'n' => 12,
        b'N' | b'c' | b'C' | b'd' | b'D' => 12,
        _ => {
            return Err(LegacyError::UnknownCommand(
                String::from_utf8_lossy(&[action]).into_owned(),
            ));
        }
    };
    if p.len() < need {
        return Err(short(&[action], p.len()));
    }
    let req = u32le(&p[4..]);
    let a = u16le(&p[8..]);
    let b = u16le(&p[10..]);
    Ok(match action {
        b'n' => LinkControl::Open {
            req,
            src: a,
            port: b,
            addr: std::str::from_utf8(&p[12..])
                .map_err(|_| LegacyError::BadAddress)?
                .to_owned(),
        },
        b'N' => LinkControl::Opened {
            req,
            src: a,
            new: b,
        },
        b'c' => LinkControl::HalfClose {
            req,
            dst: a,
            src: b,
        },
        b'C' => LinkControl::HalfClosed {
            req,
            src: a,
            ok: p[10] == 1,
        },
        b'd' => LinkControl::Abort {
            req,
            dst: a,
            src: b,
        },
        _ => LinkControl::Aborted {
            req,
            src: a,
            ok: p[10] == 1,
        },
    })
}

/// The channel-0 payload of `msg`.
pub fn encode_link_control(msg: &LinkControl) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    let head = |out: &mut Vec<u8>, action: u8, req: u32| {
        out.push(action);
        out.extend_from_slice(b"...");
        out.extend_from_slice(&req.to_le_bytes());
    };
    let ok = |b: bool| if b { *b"\x01." } else { *b"\x00." };
    match msg {
        LinkControl::KeepAlive => out.push(b'.'),
        LinkControl::Open {
            req,
            src,
            port,
            addr,
        } => {
            head(&mut out, b'n', *req);
            out.extend_from_slice(&src.to_le_bytes());
            out.extend_from_slice(&port.to_le_bytes());
            out.extend_from_slice(addr.as_bytes());
        }
        LinkControl::Opened { req, src, new } => {
            head(&mut out, b'N', *req);
            out.extend_from_slice(&src.to_le_bytes());
            out.extend_from_slice(&new.to_le_bytes());
        }
        LinkControl::HalfClose { req, dst, src } | LinkControl::Abort { req, dst, src } => {
            let action = if matches!(msg, LinkControl::HalfClose { .. }) {
                b'c'
            } else {
                b'd'
            };
            head(&mut out, action, *req);
            out.extend_from_slice(&dst.to_le_bytes());
            out.extend_from_slice(&src.to_le_bytes());
        }
        LinkControl::HalfClosed { req, src, ok: o } | LinkControl::Aborted { req, src, ok: o } => {
            let action = if matches!(msg, LinkControl::HalfClosed { .. }) {
                b'C'
            } else {
                b'D'
            };
            head(&mut out, action, *req);
            out.extend_from_slice(&src.to_le_bytes());
            out.extend_from_slice(&ok(*o));
        }
    }
    out
}

// ---------------------------------------------------------------- relay hello

/// The relay hello for `token`: `tokenR[8]` and 56 ASCII `'0'`.
pub fn encode_relay_hello(token: &Token8) -> [u8; RELAY_HELLO_LEN] {
    let mut out = [b'0'; RELAY_HELLO_LEN];
    out[..8].copy_from_slice(token);
    out
}

/// The token of a relay hello (exactly [`RELAY_HELLO_LEN`] bytes are read).
pub fn decode_relay_hello(bytes: &[u8]) -> Result<Token8, LegacyError> {
    let Some(hello) = bytes.get(..RELAY_HELLO_LEN) else {
        return Err(LegacyError::Incomplete {
            needed: RELAY_HELLO_LEN - bytes.len(),
        });
    };
    if hello[8..].iter().any(|&b| b != b'0') {
        return Err(LegacyError::BadHello);
    }
    Ok(tok8(hello))
}

// ---------------------------------------------------------------- names

/// The four values a legacy portal's certificate name carries: `ID|IDV|USER|USERV`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LegacyName {
    /// `PortalID`.
    pub id: Id4,
    /// `IDV`.
    pub idv: Id4,
    /// `UserID`.
    pub user: Id4,
    /// `UserV`.
    pub userv: Id4,
}

impl LegacyName {
    /// Parses `ID|IDV|USER|USERV`, each part 8 hex digits (upper-case as written by the
    /// legacy portal; lower-case accepted).
    pub fn parse(s: &str) -> Option<LegacyName> {
        let mut parts = s.split('|');
        let mut next = || -> Option<Id4> { parse_id(parts.next()?) };
        let name = LegacyName {
            id: next()?,
            idv: next()?,
            user: next()?,
            userv: next()?,
        };
        parts.next().is_none().then_some(name)
    }
}

impl fmt::Display for LegacyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}|{}|{}|{}",
            id_hex(&self.id),
            id_hex(&self.idv),
            id_hex(&self.user),
            id_hex(&self.userv)
        )
    }
}

/// 8 hex digits to 4 bytes (in the order written).
pub fn parse_id(s: &str) -> Option<Id4> {
    if s.len() != 8 {
        return None;
    }
    let mut out = [0u8; 4];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// 4 bytes as 8 upper-case hex digits.
pub fn id_hex(id: &Id4) -> String {
    hex::encode_upper(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meeting() -> Meeting {
        Meeting {
            peer: LegacyName {
                id: [0x0A, 0x0B, 0x0C, 0x0D],
                idv: [0, 0, 0, 1],
                user: [0x11, 0x22, 0x33, 0x44],
                userv: [0, 0, 0, 2],
            },
            token_p: *b"PPPPpppp",
            token_r: *b"RRRRrrrr",
            relay_port: 40001,
            relay_addr: "127.0.0.1".into(),
        }
    }

    #[test]
    fn login_is_byte_exact() {
        let auth = Auth {
            portal_id: [0x0A, 0x0B, 0x0C, 0x0D],
            user_id: [0x11, 0x22, 0x33, 0x44],
        };
        let frame = encode_control_frame(&encode_auth(&auth)).expect("small");
        assert_eq!(
            frame,
            b"\x10\x00..V0.1AUTH\x0A\x0B\x0C\x0D\x11\x22\x33\x44".to_vec()
        );
        let (payload, rest) = decode_control_frame(&frame).expect("whole");
        assert!(rest.is_empty());
        assert_eq!(decode_auth(payload), Ok(auth));
        assert!(decode_auth(b"V0.2AUTH12345678").is_err());
        assert!(decode_auth(b"V0.1AUTX12345678").is_err());
        assert!(decode_auth(b"V0.1AUTH1234567").is_err());
        assert_eq!(
            encode_control_frame(AUTH_OK).expect("small"),
            b"\x0c\x00..V0.1REPL.OK.".to_vec()
        );
    }

    #[test]
    fn replies_and_link_orders_round_trip() {
        let m = meeting();
        let repl = ControlMsg {
            reference: 7u32.to_le_bytes(),
            command: Command::Granted(m.clone()),
        };
        let bytes = encode_control(&repl);
        assert_eq!(&bytes[4..12], b"REPL.OK.");
        // The legacy portal drops a `.OK.` reply with fewer than 35 data bytes.
        assert_eq!(bytes.len() - 8, 34 + m.relay_addr.len());
        let back = decode_control(&bytes).expect("decodes");
        let mut want = m.clone();
        want.peer.id = [0; 4];
        assert_eq!(back.command, Command::Granted(want));

        let clkr = ControlMsg {
            reference: NO_REF,
            command: Command::ConnectLink(m.clone()),
        };
        let bytes = encode_control(&clkr);
        assert_eq!(&bytes[..8], b"....CLKR");
        assert_eq!(&bytes[8..12], &[0x0A, 0x0B, 0x0C, 0x0D]);
        assert_eq!(decode_control(&bytes), Ok(clkr));

        for (cmd, tag) in [
            (Command::Deny, b"DENY"),
            (Command::NotFound, b"NFND"),
            (Command::NoRelay, b"NORL"),
        ] {
            let msg = ControlMsg {
                reference: *b"abcd",
                command: cmd,
            };
            let bytes = encode_control(&msg);
            assert_eq!(&bytes[8..], tag);
            assert_eq!(decode_control(&bytes), Ok(msg));
        }
        let rq = ControlMsg {
            reference: 9u32.to_le_bytes(),
            command: Command::RequestLink {
                other_id: *b"\x01\x02\x03\x04",
                seed: *b"seedseed",
            },
        };
        assert_eq!(decode_control(&encode_control(&rq)), Ok(rq));
        assert_eq!(
            decode_control(b"....XXXX"),
            Err(LegacyError::UnknownCommand("XXXX".into()))
        );
        assert!(decode_control(b"....RQRL\x01").is_err());
        assert!(decode_control(b"....REPL.OK.short").is_err());
    }

    #[test]
    fn link_frames_and_control_round_trip() {
        let msgs = [
            LinkControl::KeepAlive,
            LinkControl::Open {
                req: 1,
                src: 5,
                port: 22,
                addr: "192.168.1.10".into(),
            },
            LinkControl::Opened {
                req: 1,
                src: 5,
                new: 9,
            },
            LinkControl::HalfClose {
                req: 2,
                dst: 9,
                src: 5,
            },
            LinkControl::HalfClosed {
                req: 2,
                src: 5,
                ok: true,
            },
            LinkControl::Abort {
                req: 3,
                dst: 9,
                src: 5,
            },
            LinkControl::Aborted {
                req: 3,
                src: 5,
                ok: false,
            },
        ];
        let mut wire = Vec::new();
        for m in &msgs {
            encode_link_frame(0, &encode_link_control(m), &mut wire).expect("small");
        }
        encode_link_frame(9, b"data", &mut wire).expect("small");
        let mut rest = &wire[..];
        for m in &msgs {
            let (ch, p, r) = decode_link_frame(rest).expect("frame");
            assert_eq!(ch, 0);
            assert_eq!(&decode_link_control(p).expect("control"), m);
            rest = r;
        }
        let (ch, p, r) = decode_link_frame(rest).expect("data");
        assert_eq!((ch, p, r), (9, &b"data"[..], &b""[..]));
        assert_eq!(
            encode_link_control(&LinkControl::HalfClosed {
                req: 2,
                src: 5,
                ok: true
            }),
            b"C...\x02\x00\x00\x00\x05\x00\x01.".to_vec()
        );
        for cut in 0..wire.len().min(20) {
            let _ = decode_link_frame(&wire[..cut]);
        }
        assert!(matches!(
            decode_link_frame(&[5, 0, 1]),
            Err(LegacyError::Incomplete { needed: 1 })
        ));
        assert!(decode_link_control(b"").is_err());
        assert!(decode_link_control(b"n...").is_err());
        assert!(decode_link_control(b"z").is_err());
        assert!(encode_link_frame(1, &vec![0; MAX_PAYLOAD + 1], &mut Vec::new()).is_err());
    }

    #[test]
    fn relay_hello_is_token_and_zeros() {
        let hello = encode_relay_hello(b"12345678");
        assert_eq!(&hello[..8], b"12345678");
        assert!(hello[8..].iter().all(|&b| b == b'0'));
        assert_eq!(decode_relay_hello(&hello), Ok(*b"12345678"));
        let mut bad = hello;
        bad[63] = b'1';
        assert_eq!(decode_relay_hello(&bad), Err(LegacyError::BadHello));
        assert!(decode_relay_hello(&hello[..63]).is_err());
    }

    #[test]
    fn names_parse_and_print_upper_case() {
        let s = "0A0B0C0D|00000001|11223344|00000002";
        let n = LegacyName::parse(s).expect("valid");
        assert_eq!(n, meeting().peer);
        assert_eq!(n.to_string(), s);
        assert_eq!(
            LegacyName::parse(&s.to_lowercase()).map(|n| n.to_string()),
            Some(s.to_owned())
        );
        for bad in [
            "",
            "server",
            "0A0B0C0D|00000001|11223344",
            "0A0B0C0D|00000001|11223344|00000002|00000003",
            "0A0B0C0G|00000001|11223344|00000002",
            "0A0B0C0|00000001|11223344|00000002",
        ] {
            assert_eq!(LegacyName::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn decoders_never_panic_on_short_or_odd_input() {
        let mut seed = 0x1234_5678u32;
        for len in 0..80 {
            for _ in 0..50 {
                let buf: Vec<u8> = (0..len)
                    .map(|_| {
                        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                        let b = (seed >> 16) as u8;
                        // Bias towards command letters so deeper branches are reached.
                        match b % 7 {
                            0 => b"nNcCdD."[usize::from(b) % 7],
                            _ => b,
                        }
                    })
                    .collect();
                let _ = decode_control_frame(&buf);
                let _ = decode_auth(&buf);
                let _ = decode_control(&buf);
                let _ = decode_link_frame(&buf);
                let _ = decode_link_control(&buf);
                let _ = decode_relay_hello(&buf);
                let _ = LegacyName::parse(&String::from_utf8_lossy(&buf));
            }
        }
        for cmd in [&b"REPL"[..], b"CLKR", b"RQRL", b".KA."] {
            for len in 0..50 {
                let mut p = b"....".to_vec();
                p.extend_from_slice(cmd);
                p.extend(std::iter::repeat_n(b'x', len));
                let _ = decode_control(&p);
            }
        }
    }
}
