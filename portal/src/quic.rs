//! Links over QUIC (quinn) through a relay UDP pair.
//!
//! Each portal sends the relay hello (`NPR1` + its token) as datagrams from one UDP socket
//! to its relay port until the relay answers `NPRY` (both sides are in); then the same socket
//! becomes a quinn endpoint: a QUIC client on the client portal, a server accepting exactly
//! one connection on the serving portal. The handshake is TLS 1.3 with the link's own rustls
//! configurations (same certificates, same exact-peer-identity check on both sides), ALPN
//! `netport-quic/1`. Each TCP channel or UDP flow is one bidirectional QUIC stream carrying
//! the same open header and answer as a `mux` stream on a TCP link.
//!
//! A UDP flow's datagrams travel as QUIC datagrams: the flow's stream index (u32, big
//! endian) and the payload. A datagram too large for one QUIC packet on the path goes on
//! the flow's stream instead, framed as on a TCP link, so no size is refused that a TCP link
//! carries; the receiving side takes both.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use anyhow::{Context, Result, anyhow, bail};
use netport_proto::control::{QuicPath, RelayEndpoint};
use netport_proto::identity::Identity;
use netport_proto::relay::{self, BAD_TOKEN, READY};
use netport_proto::tls::QUIC_LINK_ALPN;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::CertificateDer;
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::mux::{LinkStream, SERVER_LIMIT};
use crate::{Portal, lock};

/// How often a portal repeats its hello while the relay has not answered (UDP may lose it).
const HELLO_EVERY: Duration = Duration::from_millis(200);

/// A link carries QUIC keep-alives this often, so the relay's UDP pair (closed after
/// `udp_idle_secs` of silence) and NAT bindings stay open while the link is idle.
const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// A QUIC link with no packet from the peer for this long is dead (three keep-alives
/// lost): a TCP link learns of a dead relay from the kernel, a QUIC link only this way.
const IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// The name the client dials; the exact-peer verifier ignores it (links go through relays).
const SERVER_NAME: &str = "link.netport.invalid";

fn transport() -> Result<Arc<quinn::TransportConfig>> {
    let mut t = quinn::TransportConfig::default();
    // Room for every stream any client portal may open (the client's own
    // `max_streams_per_link` is enforced before it opens one), and a few closing ones.
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(SERVER_LIMIT as u32));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(IDLE_TIMEOUT).map_err(|e| anyhow!("{e}"))?,
    ));
    // One datagram per packet: a relay's XDP program rewrites each packet on its own and
    // never sees a GSO super-packet it would have to split.
    t.enable_segmentation_offload(false);
    Ok(Arc::new(t))
}

/// The relay's UDP address for `path`.
async fn relay_addr(relay: &RelayEndpoint, path: &QuicPath) -> Result<SocketAddr> {
    tokio::net::lookup_host((relay.address.as_str(), path.port))
        .await
        .with_context(|| format!("resolving relay {} ({})", relay.relay, relay.address))?
        .next()
        .ok_or_else(|| anyhow!("relay {} ({}) has no address", relay.relay, relay.address))
}

/// Sends the hello to the relay's UDP port until the relay says both sides are in; returns
/// the socket (for the QUIC endpoint) and the relay's address.
async fn meet(
    relay: &RelayEndpoint,
    path: &QuicPath,
    within: Duration,
) -> Result<(std::net::UdpSocket, SocketAddr)> {
    let token = relay::token_from_hex(&path.token).context("malformed token from netportd")?;
    let addr = relay_addr(relay, path).await?;
    let any: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(any).await.context("binding a UDP socket")?;
    let hello = relay::encode_hello(&token);
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 64];
    loop {
        // A send error (no route, a firewall's reject) is like a lost datagram: retry.
        let _ = sock.send_to(&hello, addr).await;
        let step = Instant::now() + HELLO_EVERY;
        while let Ok(r) =
            tokio::time::timeout_at(step.min(deadline), sock.recv_from(&mut buf)).await
        {
            let Ok((n, from)) = r else {
                // An error report about an earlier datagram: wait out the step, then resend.
                tokio::time::sleep_until(step.min(deadline)).await;
                break;
            };
            if from != addr {
                continue;
            }
            if &buf[..n] == READY {
                return Ok((sock.into_std()?, addr));
            }
            if &buf[..n] == BAD_TOKEN {
                bail!("relay {} refused the UDP token", relay.relay);
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "no answer from relay {} on UDP port {} within {} ms (UDP blocked?)",
                relay.relay,
                path.port,
                within.as_millis()
            );
        }
    }
}

fn runtime() -> Result<Arc<dyn quinn::Runtime>> {
    quinn::default_runtime().ok_or_else(|| anyhow!("no async runtime for QUIC"))
}

/// The client portal's side: meets the serving portal at the relay's UDP port and connects;
/// the handshake accepts only `expected` as the peer.
pub(crate) async fn connect(
    portal: &Portal,
    relay: &RelayEndpoint,
    path: &QuicPath,
    expected: Identity,
    within: Duration,
) -> Result<quinn::Connection> {
    let deadline = Instant::now() + within;
    let (sock, addr) = meet(relay, path, within).await?;
    let mut tls = portal.config.credentials.link_client(expected)?;
    tls.alpn_protocols = vec![QUIC_LINK_ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| anyhow!("QUIC TLS: {e}"))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport()?);
    let endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, sock, runtime()?)
        .context("QUIC endpoint")?;
    let connecting = endpoint
        .connect_with(config, addr, SERVER_NAME)
        .context("starting the QUIC handshake")?;
    let conn = tokio::time::timeout_at(deadline, connecting)
        .await
        .context("QUIC handshake timed out")?
        .context("QUIC handshake (is the peer exactly who netportd announced?)")?;
    Ok(conn)
}

/// The serving portal's side: meets the client portal at the relay's UDP port and accepts
/// one connection, whose client certificate must name exactly `expected`.
pub(crate) async fn accept(
    portal: &Portal,
    relay: &RelayEndpoint,
    path: &QuicPath,
    expected: &Identity,
    within: Duration,
) -> Result<quinn::Connection> {
    let deadline = Instant::now() + within;
    let (sock, _) = meet(relay, path, within).await?;
    let mut tls = portal.config.credentials.link_server()?;
    tls.alpn_protocols = vec![QUIC_LINK_ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| anyhow!("QUIC TLS: {e}"))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport()?);
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        sock,
        runtime()?,
    )
    .context("QUIC endpoint")?;
    let conn = tokio::time::timeout_at(deadline, async {
        loop {
            let incoming = endpoint
                .accept()
                .await
                .ok_or_else(|| anyhow!("QUIC endpoint closed"))?;
            match incoming.accept() {
                Ok(connecting) => match connecting.await {
                    Ok(c) => return anyhow::Ok(c),
                    Err(e) => tracing::debug!("QUIC handshake failed: {e}"),
                },
                Err(e) => tracing::debug!("QUIC connection refused: {e}"),
            }
        }
    })
    .await
    .context("no QUIC connection from the peer in time")??;
    // One connection per link: nothing else is accepted on this endpoint.
    endpoint.set_server_config(None);
    let certs = conn
        .peer_identity()
        .and_then(|a| a.downcast::<Vec<CertificateDer<'static>>>().ok());
    let info = netport_proto::tls::peer_info(certs.as_deref().map(Vec::as_slice))?;
    if info.identity()? != expected {
        conn.close(quinn::VarInt::from_u32(1), b"unexpected peer");
        let e = format!(
            "link peer is {}, but netportd announced {expected}: closing",
            info.identity()?
        );
        tracing::warn!(link_transport = %"quic", "{e}");
        bail!(e);
    }
    Ok(conn)
}

/// Closes a QUIC connection when dropped (other handles, like the datagram router's, would
/// keep it open).
#[derive(Debug)]
pub(crate) struct CloseOnDrop(pub(crate) quinn::Connection);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close(quinn::VarInt::from_u32(0), b"link closed");
    }
}

/// Length of the flow id in front of a datagram.
const FLOW_ID: usize = 4;

/// Datagrams queued for one flow before the newest are dropped (as a congested path would).
const FLOW_QUEUE: usize = 256;

type Flows = Arc<Mutex<HashMap<u32, mpsc::Sender<Bytes>>>>;

/// A QUIC link: the connection and the UDP flows its datagrams are routed to.
#[derive(Clone, Debug)]
pub(crate) struct QuicLink {
    pub(crate) conn: quinn::Connection,
    flows: Flows,
}

impl QuicLink {
    /// Starts routing the connection's datagrams to the flows that register.
    pub(crate) fn new(conn: quinn::Connection) -> QuicLink {
        let flows: Flows = Arc::default();
        let (c, f) = (conn.clone(), flows.clone());
        tokio::spawn(async move {
            // Ends with the connection.
            while let Ok(d) = c.read_datagram().await {
                let Some(id) = d.get(..FLOW_ID) else { continue };
                let id = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
                let tx = lock(&f).get(&id).cloned();
                // A datagram of a flow that is gone, or of a full queue, is dropped.
                if let Some(tx) = tx {
                    let _ = tx.try_send(d.slice(FLOW_ID..));
                }
            }
        });
        QuicLink { conn, flows }
    }

    /// Opens a stream; `flow` also registers it for datagrams (a UDP flow).
    pub(crate) async fn open(&self, flow: bool) -> Result<(LinkStream, Option<FlowDatagrams>)> {
        let (send, recv) = self.conn.open_bi().await.context("link closed")?;
        let datagrams = if flow { self.flow(send.id()) } else { None };
        Ok((Box::new(tokio::io::join(recv, send)), datagrams))
    }

    /// The datagrams of the flow on stream `id`, from now until the result is dropped.
    fn flow(&self, id: quinn::StreamId) -> Option<FlowDatagrams> {
        let id = u32::try_from(id.index()).ok()?;
        let (tx, rx) = mpsc::channel(FLOW_QUEUE);
        lock(&self.flows).insert(id, tx);
        Some(FlowDatagrams {
            tx: FlowSender {
                id,
                conn: self.conn.clone(),
            },
            rx: FlowReceiver {
                id,
                rx,
                flows: self.flows.clone(),
            },
        })
    }

    /// Serves the link: each stream the client opens goes to `serve` with its datagrams (a
    /// stream that turns out to be a TCP channel drops them); returns why the link ended.
    pub(crate) async fn serve(
        &self,
        mut serve: impl FnMut(LinkStream, Option<FlowDatagrams>),
    ) -> String {
        loop {
            match self.conn.accept_bi().await {
                Ok((send, recv)) => {
                    let datagrams = self.flow(send.id());
                    serve(Box::new(tokio::io::join(recv, send)), datagrams)
                }
                Err(e) => return e.to_string(),
            }
        }
    }
}

/// A UDP flow's datagrams on a QUIC link.
#[derive(Debug)]
pub(crate) struct FlowDatagrams {
    pub(crate) tx: FlowSender,
    pub(crate) rx: FlowReceiver,
}

/// Sends a flow's datagrams.
#[derive(Debug)]
pub(crate) struct FlowSender {
    id: u32,
    conn: quinn::Connection,
}

impl FlowSender {
    /// Sends `data` as one QUIC datagram; `false` when it does not fit one (the caller puts
    /// it on the flow's stream).
    pub(crate) fn send(&self, data: &[u8]) -> bool {
        match self.conn.max_datagram_size() {
            Some(max) if FLOW_ID + data.len() <= max => {}
            _ => return false,
        }
        let mut d = Vec::with_capacity(FLOW_ID + data.len());
        d.extend_from_slice(&self.id.to_be_bytes());
        d.extend_from_slice(data);
        !matches!(
            self.conn.send_datagram(Bytes::from(d)),
            Err(quinn::SendDatagramError::TooLarge
                | quinn::SendDatagramError::Disabled
                | quinn::SendDatagramError::UnsupportedByPeer)
        )
    }
}

/// Receives a flow's datagrams; unregisters the flow when dropped.
#[derive(Debug)]
pub(crate) struct FlowReceiver {
    id: u32,
    rx: mpsc::Receiver<Bytes>,
    flows: Flows,
}

impl FlowReceiver {
    /// The next datagram; `None` once the link is gone.
    pub(crate) async fn recv(&mut self) -> Option<Bytes> {
        self.rx.recv().await
    }
}

impl Drop for FlowReceiver {
    fn drop(&mut self) {
        lock(&self.flows).remove(&self.id);
    }
}
