//! Control messages (version 1): portal ↔ netportd and relayd ↔ netportd.
//!
//! Each frame body (see [`crate::encode`]) is one JSON object: `{"v": 1, "type": "...", ...}`.
//! JSON keeps the control plane debuggable; its rate is a handful of messages per link, so
//! its cost does not matter. Decoding never panics: anything malformed, of another version
//! or of an unknown type is a [`DecodeError`].

use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks.
pub const VERSION: u16 = 1;

/// A word in a portal's `Hello.software` saying it runs links over QUIC: netportd offers a
/// relay UDP pair (`quic` in `LinkOffer` / `LinkIncoming`) only when both portals of a link
/// say so. It rides the free-text field because a new field would be refused by servers
/// that predate it, and a server that predates it never sends `quic` to anyone.
pub const QUIC_CAPABILITY: &str = "+quic";

/// A second word, beside [`QUIC_CAPABILITY`], from a portal that runs over QUIC only the
/// links it opens for UDP services (`quic = "udp"`, the default): netportd gives the links
/// it opens for TCP services no UDP pair, which the portal would never use. A server that
/// predates it offers the pair anyway, and the portal leaves it to expire.
pub const QUIC_UDP_ONLY: &str = "+quic-udp-only";

/// Whether a `Hello.software` string announces [`QUIC_CAPABILITY`].
pub fn announces_quic(software: &str) -> bool {
    software.split_whitespace().any(|w| w == QUIC_CAPABILITY)
}

/// Which of its links a portal runs over QUIC, from its `Hello.software`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuicLinks {
    /// None: TCP links only.
    None,
    /// Those it opens for UDP services; it serves over QUIC whatever its peers open.
    ForUdp,
    /// Every link.
    All,
}

impl QuicLinks {
    /// What `software` announces.
    pub fn announced(software: &str) -> QuicLinks {
        if !announces_quic(software) {
            QuicLinks::None
        } else if software.split_whitespace().any(|w| w == QUIC_UDP_ONLY) {
            QuicLinks::ForUdp
        } else {
            QuicLinks::All
        }
    }

    /// Whether a link this portal opens (as the client) for a service of `transport` may
    /// run over QUIC.
    pub fn opens(self, transport: Transport) -> bool {
        match self {
            QuicLinks::None => false,
            QuicLinks::ForUdp => transport == Transport::Udp,
            QuicLinks::All => true,
        }
    }

    /// Whether this portal serves links over QUIC.
    pub fn serves(self) -> bool {
        self != QuicLinks::None
    }

    /// The words that announce this in a `Hello.software` (each after a space; empty for
    /// none), as [`QuicLinks::announced`] reads them.
    pub fn words(self) -> &'static str {
        match self {
            QuicLinks::None => "",
            QuicLinks::ForUdp => " +quic +quic-udp-only",
            QuicLinks::All => " +quic",
        }
    }
}

/// Which side a peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerRole {
    /// A portal agent.
    Portal,
    /// A relay daemon.
    Relay,
}

/// Transport of a service, as carried on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// Byte streams.
    Tcp,
    /// Datagrams.
    Udp,
}

impl Transport {
    /// `Tcp`, the default where a message leaves the transport out.
    pub fn tcp() -> Transport {
        Transport::Tcp
    }

    /// Whether this is `Tcp` (such fields are left out of messages).
    pub fn is_tcp(&self) -> bool {
        *self == Transport::Tcp
    }
}

/// A listener the server wants a portal to hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerSpec {
    /// The access rule that grants it.
    pub access: String,
    /// Where to listen, `ip:port`.
    pub listen: String,
    /// The service reached through it.
    pub service: String,
    /// The portal serving that service.
    pub serving_portal: String,
    /// Transport.
    pub transport: Transport,
}

/// A target the serving portal may open on a link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkGrant {
    /// Service name, as the client portal asks for it.
    pub service: String,
    /// What to dial, `host:port`.
    pub target: String,
    /// Transport.
    pub transport: Transport,
}

/// A link whose other end is a legacy (V0.1) portal: the legacy link protocol replaces TLS
/// identity URIs, the relay hello and the stream multiplexer (see `crate::legacy`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyLink {
    /// The peer's certificate name, `ID|IDV|USER|USERV`: the TLS peer must carry exactly it.
    pub peer_name: String,
    /// `tokenP`, hex (8 bytes), exchanged inside the link's TLS.
    pub token_p: String,
    /// For the client portal: the targets its services reach on the legacy peer (the
    /// legacy protocol opens channels by `addr:port`, not by service name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<LinkGrant>,
}

/// Where to meet the peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayEndpoint {
    /// The relay's name (for logs).
    pub relay: String,
    /// Host or IP to dial.
    pub address: String,
    /// Port to dial.
    pub port: u16,
}

/// A relay UDP port where a link may run over QUIC instead of the TCP pair: the relay's
/// address is the [`RelayEndpoint`]'s, the hello is the same (`NPR1` + token) sent as a
/// datagram. The client portal decides: it tries QUIC first and falls back to the TCP port;
/// the serving portal waits on both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuicPath {
    /// The UDP port to send the hello to.
    pub port: u16,
    /// Single-use token of the UDP allocation, hex.
    pub token: String,
}

/// Every control message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    // ---- either side ----
    /// First message of a peer: who it is and which versions it speaks.
    Hello {
        /// Portal or relay.
        role: PeerRole,
        /// Protocol versions the peer speaks.
        versions: Vec<u16>,
        /// Software name and version, for logs.
        software: String,
    },
    /// Liveness, both ways.
    Heartbeat {
        /// Increments per heartbeat.
        seq: u64,
    },
    /// The server refuses the session (sent just before closing).
    Refused {
        /// Stable reason code (`unknown-portal`, `revoked`, `expired`, `version`, ...).
        reason: String,
        /// A sentence for the log.
        message: String,
    },

    // ---- server → portal ----
    /// The server accepts the session.
    Welcome {
        /// The version chosen.
        version: u16,
        /// The peer's identity as the server sees it.
        identity: String,
        /// Loaded policy hash.
        policy: String,
        /// Seconds between heartbeats; a peer silent for three intervals is gone.
        heartbeat_secs: u32,
    },
    /// The portal's complete desired state: hold exactly these listeners.
    DesiredState {
        /// Policy hash this state comes from.
        policy: String,
        /// The listeners.
        listeners: Vec<ListenerSpec>,
    },
    /// To the client portal: a link is allocated; connect and present the token.
    LinkOffer {
        /// The request this answers.
        request_id: u64,
        /// Link id (unique per server run).
        link_id: u64,
        /// The serving portal: the TLS peer must be exactly this identity.
        peer: String,
        /// Where to connect.
        relay: RelayEndpoint,
        /// Single-use token, hex.
        token: String,
        /// The token expires this many milliseconds after the offer is sent.
        expires_in_ms: u64,
        /// Set when the peer is a legacy portal (absent on native links).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        legacy: Option<LegacyLink>,
        /// A UDP port of the same relay for a link over QUIC (absent when the relay gave
        /// none: the TCP port is the only way).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quic: Option<QuicPath>,
    },
    /// To the serving portal: a client portal will meet it at the relay.
    LinkIncoming {
        /// Link id.
        link_id: u64,
        /// The client portal: the TLS peer must be exactly this identity.
        peer: String,
        /// Where to connect.
        relay: RelayEndpoint,
        /// Single-use token, hex.
        token: String,
        /// Expiry of the token.
        expires_in_ms: u64,
        /// What this link may open: anything else is refused.
        grants: Vec<LinkGrant>,
        /// Set when the peer is a legacy portal (absent on native links).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        legacy: Option<LegacyLink>,
        /// A UDP port of the same relay for a link over QUIC (see `LinkOffer`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quic: Option<QuicPath>,
    },
    /// To the client portal: the link request is refused.
    LinkDenied {
        /// The request this answers.
        request_id: u64,
        /// Deny reason code (`no-access-rule`, `revoked`, `no-relay`, `peer-offline`, ...).
        reason: String,
        /// The rule that decided or the closest one.
        rule: Option<String>,
        /// A sentence for the user.
        message: String,
    },
    /// To the serving portal: the grants of a link changed (policy reload).
    LinkGrants {
        /// Link id.
        link_id: u64,
        /// The new grants.
        grants: Vec<LinkGrant>,
    },
    /// Either portal: close this link now.
    CloseLink {
        /// Link id.
        link_id: u64,
        /// Why.
        reason: String,
    },

    // ---- portal → server ----
    /// The client portal asks for a link to serve an access rule.
    OpenLink {
        /// Echoed in the answer.
        request_id: u64,
        /// The access rule of the listener a connection arrived on.
        access: String,
    },
    /// A portal reports a link gone.
    LinkClosed {
        /// Link id.
        link_id: u64,
        /// Why.
        reason: String,
    },
    /// The client portal reports a stream (one client connection) closed, for the audit log.
    StreamClosed {
        /// The link it rode.
        link_id: u64,
        /// The access rule of the listener it arrived on.
        access: String,
        /// The service.
        service: String,
        /// The client's address as the listener saw it.
        source: String,
        /// Bytes from the client toward the service.
        bytes_to_service: u64,
        /// Bytes from the service back to the client.
        bytes_from_service: u64,
        /// How long it was open, milliseconds.
        duration_ms: u64,
    },

    // ---- relay ↔ server ----
    /// The relay's offer, after `Hello`.
    RelayRegister {
        /// Host or IP portals dial.
        address: String,
        /// First port of the allocation range.
        port_first: u16,
        /// Last port of the allocation range.
        port_last: u16,
        /// How many allocations it will hold at once.
        capacity: u32,
    },
    /// Server → relay: open a port pair for two tokens.
    Allocate {
        /// Allocation id.
        alloc_id: u64,
        /// Token for side A (the client portal), hex.
        token_a: String,
        /// Token for side B (the serving portal), hex.
        token_b: String,
        /// Tokens expire this many milliseconds from now.
        ttl_ms: u64,
        /// The pair's transport: `tcp` (the default, and what a relay that predates this
        /// field assumes) or `udp` (a link over QUIC). Left out of the message when `tcp`,
        /// so older relays keep accepting it.
        #[serde(default = "Transport::tcp", skip_serializing_if = "Transport::is_tcp")]
        transport: Transport,
    },
    /// Server → relay: open one port where two legacy portals meet with the same 8-byte
    /// `tokenR` (answered with `Allocated`, both ports equal).
    AllocateLegacy {
        /// Allocation id.
        alloc_id: u64,
        /// `tokenR`, hex (8 bytes).
        token: String,
        /// The token expires this many milliseconds from now.
        ttl_ms: u64,
    },
    /// Relay → server: the pair is open.
    Allocated {
        /// Allocation id.
        alloc_id: u64,
        /// Port for side A.
        port_a: u16,
        /// Port for side B.
        port_b: u16,
    },
    /// Relay → server: allocation failed.
    AllocateFailed {
        /// Allocation id.
        alloc_id: u64,
        /// Why.
        reason: String,
    },
    /// Server → relay: drop an allocation and its connections.
    Release {
        /// Allocation id.
        alloc_id: u64,
    },
    /// Relay → server: an allocation ended.
    AllocationClosed {
        /// Allocation id.
        alloc_id: u64,
        /// Bytes from A to B.
        bytes_a_to_b: u64,
        /// Bytes from B to A.
        bytes_b_to_a: u64,
        /// Why (`closed`, `expired`, `released`, ...).
        reason: String,
    },
}

#[derive(Serialize)]
struct EnvelopeRef<'a> {
    v: u16,
    #[serde(flatten)]
    msg: &'a Message,
}

/// Why a frame body is not a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not a JSON object with a version.
    #[error("malformed control message: {0}")]
    Malformed(String),
    /// Another protocol version.
    #[error("control message of version {0}; this side speaks version {VERSION}")]
    Version(u64),
    /// A message this side does not know (or with fields it does not know).
    #[error("unknown or invalid control message: {0}")]
    Unknown(String),
}

impl Message {
    /// The frame body of this message.
    pub fn to_body(&self) -> Vec<u8> {
        // Serializing these types cannot fail: no maps with non-string keys, no floats.
        serde_json::to_vec(&EnvelopeRef {
            v: VERSION,
            msg: self,
        })
        .unwrap_or_default()
    }

    /// Parses a frame body.
    pub fn from_body(body: &[u8]) -> Result<Message, DecodeError> {
        let mut value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        let Some(obj) = value.as_object_mut() else {
            return Err(DecodeError::Malformed("not a JSON object".into()));
        };
        match obj.remove("v").map(|v| v.as_u64()) {
            Some(Some(v)) if v == u64::from(VERSION) => {}
            Some(Some(v)) => return Err(DecodeError::Version(v)),
            Some(None) => return Err(DecodeError::Malformed("`v` is not a version number".into())),
            None => return Err(DecodeError::Malformed("no version field `v`".into())),
        }
        serde_json::from_value(value).map_err(|e| DecodeError::Unknown(e.to_string()))
    }

    /// The message's type name, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Heartbeat { .. } => "heartbeat",
            Message::Refused { .. } => "refused",
            Message::Welcome { .. } => "welcome",
            Message::DesiredState { .. } => "desired_state",
            Message::LinkOffer { .. } => "link_offer",
            Message::LinkIncoming { .. } => "link_incoming",
            Message::LinkDenied { .. } => "link_denied",
            Message::LinkGrants { .. } => "link_grants",
            Message::CloseLink { .. } => "close_link",
            Message::OpenLink { .. } => "open_link",
            Message::LinkClosed { .. } => "link_closed",
            Message::StreamClosed { .. } => "stream_closed",
            Message::RelayRegister { .. } => "relay_register",
            Message::Allocate { .. } => "allocate",
            Message::AllocateLegacy { .. } => "allocate_legacy",
            Message::Allocated { .. } => "allocated",
            Message::AllocateFailed { .. } => "allocate_failed",
            Message::Release { .. } => "release",
            Message::AllocationClosed { .. } => "allocation_closed",
        }
    }
}

/// A frame decoder for a byte stream: push bytes in, take messages out.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// A decoder with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes that arrived.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, `Ok(None)` when more bytes are needed. After an error the
    /// stream is unusable: close the connection.
    pub fn next_message(&mut self) -> Result<Option<Message>, StreamError> {
        match crate::check(&self.buf) {
            Ok(len) => {
                let msg = Message::from_body(&self.buf[4..4 + len]);
                self.buf.drain(..4 + len);
                msg.map(Some).map_err(StreamError::Decode)
            }
            Err(crate::FrameError::Incomplete { .. }) => Ok(None),
            Err(e) => Err(StreamError::Frame(e)),
        }
    }
}

/// A control stream failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// Framing failed (a frame over the size limit).
    #[error(transparent)]
    Frame(#[from] crate::FrameError),
    /// A frame held no valid message.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// The host part of a `host:port` control address (for TLS name checks), or `None` when it
/// is not `host:port` with a port from 1 to 65535.
pub fn host_of(addr: &str) -> Option<String> {
    if let Ok(sa) = addr.parse::<std::net::SocketAddr>() {
        return Some(sa.ip().to_string());
    }
    let (host, port) = addr.rsplit_once(':')?;
    port.parse::<u16>().ok().filter(|p| *p != 0)?;
    (!host.is_empty() && !host.contains(':')).then(|| host.to_string())
}

/// Encodes a message as one frame.
pub fn encode_message(msg: &Message) -> Vec<u8> {
    let body = msg.to_body();
    let mut out = Vec::with_capacity(body.len() + 4);
    // Control messages are far below the frame limit: a few strings and lists.
    let _ = crate::encode(&body, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Message> {
        vec![
            Message::Hello {
                role: PeerRole::Portal,
                versions: vec![1],
                software: "portal/0.1".into(),
            },
            Message::DesiredState {
                policy: "ab".into(),
                listeners: vec![ListenerSpec {
                    access: "a".into(),
                    listen: "127.0.0.1:2222".into(),
                    service: "s".into(),
                    serving_portal: "nas".into(),
                    transport: Transport::Tcp,
                }],
            },
            Message::LinkIncoming {
                link_id: 3,
                peer: "cam".into(),
                relay: RelayEndpoint {
                    relay: "r".into(),
                    address: "127.0.0.1".into(),
                    port: 40000,
                },
                token: "0011223344556677".into(),
                expires_in_ms: 1000,
                grants: vec![],
                legacy: Some(LegacyLink {
                    peer_name: "0A0B0C0D|00000001|11223344|00000002".into(),
                    token_p: "0102030405060708".into(),
                    targets: vec![],
                }),
                quic: None,
            },
            Message::AllocateLegacy {
                alloc_id: 4,
                token: "0011223344556677".into(),
                ttl_ms: 1000,
            },
            Message::LinkDenied {
                request_id: 7,
                reason: "no-access-rule".into(),
                rule: None,
                message: "no".into(),
            },
        ]
    }

    #[test]
    fn round_trip_through_a_split_stream() {
        let msgs = sample();
        let bytes: Vec<u8> = msgs.iter().flat_map(encode_message).collect();
        let mut d = Decoder::new();
        let mut out = Vec::new();
        for chunk in bytes.chunks(3) {
            d.push(chunk);
            while let Some(m) = d.next_message().expect("valid stream") {
                out.push(m);
            }
        }
        assert_eq!(out, msgs);
    }

    #[test]
    fn wrong_version_unknown_type_and_garbage_are_errors() {
        assert_eq!(
            Message::from_body(br#"{"v":2,"type":"heartbeat","seq":1}"#),
            Err(DecodeError::Version(2))
        );
        assert!(matches!(
            Message::from_body(br#"{"v":1,"type":"launch_missiles"}"#),
            Err(DecodeError::Unknown(_))
        ));
        assert!(matches!(
            Message::from_body(br#"{"v":1,"type":"heartbeat","seq":1,"extra":0}"#),
            Err(DecodeError::Unknown(_))
        ));
        assert!(matches!(
            Message::from_body(b"\xff\x00"),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            Message::from_body(b"[]"),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            Message::from_body(br#"{"type":"heartbeat","seq":1}"#),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn the_quic_capability_is_a_whole_word() {
        assert!(announces_quic("portal/0.1.0 +quic"));
        assert!(!announces_quic("portal/0.1.0"));
        assert!(!announces_quic("portal/0.1.0+quicker"));
        assert_eq!(QuicLinks::announced("portal/0.1.0"), QuicLinks::None);
        assert_eq!(QuicLinks::announced("portal/0.1.0 +quic"), QuicLinks::All);
        let udp = QuicLinks::announced("portal/0.1.0 +quic +quic-udp-only");
        assert_eq!(udp, QuicLinks::ForUdp);
        assert!(udp.opens(Transport::Udp) && !udp.opens(Transport::Tcp) && udp.serves());
        for links in [QuicLinks::None, QuicLinks::ForUdp, QuicLinks::All] {
            let software = format!("portal/0.1.0{}", links.words());
            assert_eq!(QuicLinks::announced(&software), links, "{software}");
        }
        // Without `+quic` the second word means nothing.
        assert_eq!(
            QuicLinks::announced("portal/0.1.0 +quic-udp-only"),
            QuicLinks::None
        );
    }

    #[test]
    fn native_link_messages_are_unchanged_on_the_wire() {
        let offer = Message::LinkOffer {
            request_id: 1,
            link_id: 2,
            peer: "nas".into(),
            relay: RelayEndpoint {
                relay: "r".into(),
                address: "127.0.0.1".into(),
                port: 1,
            },
            token: "00".into(),
            expires_in_ms: 1,
            legacy: None,
            quic: None,
        };
        let body = String::from_utf8(offer.to_body()).expect("JSON is UTF-8");
        assert!(!body.contains("legacy"), "{body}");
        assert!(!body.contains("quic"), "{body}");
        assert_eq!(Message::from_body(body.as_bytes()), Ok(offer.clone()));
        let Message::LinkOffer { relay, .. } = offer else {
            unreachable!()
        };
        let with_quic = Message::LinkOffer {
            request_id: 1,
            link_id: 2,
            peer: "nas".into(),
            relay,
            token: "00".into(),
            expires_in_ms: 1,
            legacy: None,
            quic: Some(QuicPath {
                port: 40_001,
                token: "11".into(),
            }),
        };
        let body = with_quic.to_body();
        assert_eq!(Message::from_body(&body), Ok(with_quic));
    }

    #[test]
    fn allocate_without_transport_is_tcp_and_tcp_is_left_out() {
        let old =
            br#"{"v":1,"type":"allocate","alloc_id":1,"token_a":"a","token_b":"b","ttl_ms":5}"#;
        let Ok(Message::Allocate { transport, .. }) = Message::from_body(old) else {
            panic!("an allocate without transport must parse");
        };
        assert_eq!(transport, Transport::Tcp);
        let tcp = Message::Allocate {
            alloc_id: 1,
            token_a: "a".into(),
            token_b: "b".into(),
            ttl_ms: 5,
            transport: Transport::Tcp,
        };
        assert_eq!(tcp.to_body(), old.to_vec());
        let udp = Message::Allocate {
            alloc_id: 1,
            token_a: "a".into(),
            token_b: "b".into(),
            ttl_ms: 5,
            transport: Transport::Udp,
        };
        let body = udp.to_body();
        assert!(String::from_utf8_lossy(&body).contains(r#""transport":"udp""#));
        assert_eq!(Message::from_body(&body), Ok(udp));
    }

    #[test]
    fn oversized_frame_is_refused() {
        let mut d = Decoder::new();
        d.push(&u32::MAX.to_be_bytes());
        assert!(matches!(d.next_message(), Err(StreamError::Frame(_))));
    }
}
