//! Links between portals: through a relay, TLS end to end, many streams multiplexed: QUIC
//! through the relay's UDP pair when netportd offers one and it gets through (see `quic`),
//! else `mux` streams over TLS over its TCP pair. The client portal chooses; the serving
//! portal waits on both.
//!
//! Stream header (client → serving portal, first bytes of each stream): a u16 big-endian
//! length and the service name. Answer: one byte, [`OPEN_OK`] or a refusal code, then (for a
//! refusal) a u16 length and a message.
//!
//! A new connection crosses the relay once each way before its first reply: the client
//! portal sends the header with whatever the client has already sent, without waiting for
//! the answer, and the serving portal sends [`OPEN_OK`] with the service's first bytes (or
//! alone, after [`ANSWER_WAIT`], if the service says nothing).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use netport_proto::control::{
    LinkGrant, ListenerSpec, Message, QuicPath, RelayEndpoint, Transport,
};
use netport_proto::identity::{Identity, Role};
use netport_proto::relay::{self, READY};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;

use crate::config::QuicMode;
use crate::mux::{self, LinkStream, Opener};
use crate::observe::Side;
use crate::quic::{FlowDatagrams, QuicLink};
use crate::{Portal, lock};
use tokio_util::sync::CancellationToken;

pub(crate) const OPEN_OK: u8 = 0;
/// How long the serving portal holds [`OPEN_OK`] back for the service's first bytes. The
/// client portal needs it only before those bytes, so it is not held for long.
const ANSWER_WAIT: Duration = Duration::from_millis(5);
const OPEN_NOT_GRANTED: u8 = 1;
pub(crate) const OPEN_DIAL_FAILED: u8 = 2;

/// How a client link opens streams: `mux` streams over TLS over TCP or QUIC streams to a Rust
/// portal, V0.1 channels to a legacy one.
#[derive(Clone, Debug)]
enum LinkOpener {
    Native(Opener),
    Quic(crate::quic::QuicLink),
    Legacy(crate::legacy::Opener),
}

impl LinkOpener {
    fn close(&self) {
        match self {
            LinkOpener::Native(o) => o.close(),
            LinkOpener::Quic(q) => q.conn.close(quinn::VarInt::from_u32(0), b"closed"),
            LinkOpener::Legacy(o) => o.close(),
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            LinkOpener::Native(o) => o.is_closed(),
            LinkOpener::Quic(q) => q.conn.close_reason().is_some(),
            LinkOpener::Legacy(o) => o.is_closed(),
        }
    }

    /// A new stream on a native (TCP or QUIC) link; for a UDP flow (`flow`) on a QUIC
    /// link, its datagrams too.
    async fn open(&self, flow: bool) -> Result<(LinkStream, Option<FlowDatagrams>)> {
        match self {
            LinkOpener::Native(o) => Ok((Box::new(o.open().await?), None)),
            LinkOpener::Quic(q) => q.open(flow).await,
            LinkOpener::Legacy(_) => bail!("internal: a native stream on a legacy link"),
        }
    }
}

/// A client link: a handle that opens streams, and whether it still runs.
#[derive(Clone)]
pub(crate) struct ClientLink {
    link_id: u64,
    opener: LinkOpener,
    dead: Arc<AtomicBool>,
    /// Streams open on the link; the idle watcher closes a link that has none for a while.
    active: Arc<std::sync::atomic::AtomicUsize>,
}

/// Counts a stream as open until dropped.
pub(crate) struct Active(Arc<std::sync::atomic::AtomicUsize>);

impl Active {
    fn new(n: &Arc<std::sync::atomic::AtomicUsize>) -> Active {
        n.fetch_add(1, Ordering::Relaxed);
        Active(n.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The grants of a served link (replaced when the policy changes).
pub(crate) type SharedGrants = Arc<RwLock<Vec<LinkGrant>>>;

/// Open streams of a served link, by service, so a narrowed grant can close them.
pub(crate) type OpenStreams = Arc<Mutex<Vec<(String, CancellationToken)>>>;

/// A link this portal serves.
pub(crate) struct Served {
    pub(crate) grants: SharedGrants,
    pub(crate) streams: OpenStreams,
    pub(crate) task: tokio::task::AbortHandle,
}

/// Link state of a portal.
#[derive(Default)]
pub struct Links {
    /// One setup lock per serving portal, so concurrent first connections share one link.
    client: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<ClientLink>>>>>,
    /// The links this portal serves, by link id.
    pub(crate) served: Mutex<HashMap<u64, Served>>,
    /// When a QUIC attempt through a relay to a peer last failed (`relay/peer`): the next
    /// links there go straight to TCP for [`QUIC_RETRY_AFTER`] rather than wait for the
    /// attempt to time out again.
    quic_failed: Mutex<HashMap<String, std::time::Instant>>,
}

/// How long a failed QUIC attempt sends the links through that relay to that peer over TCP.
const QUIC_RETRY_AFTER: Duration = Duration::from_secs(300);

impl Links {
    /// New grants for a served link: streams to services no longer granted are closed.
    pub fn set_grants(&self, link_id: u64, grants: Vec<LinkGrant>) {
        let served = lock(&self.served);
        let Some(link) = served.get(&link_id) else {
            return;
        };
        let mut streams = lock(&link.streams);
        streams.retain(|(service, cancel)| {
            let keep = grants.iter().any(|g| &g.service == service);
            if !keep {
                cancel.cancel();
                tracing::info!(link_id, %service, "stream closed: no longer granted");
            }
            keep
        });
        *link.grants.write().unwrap_or_else(|p| p.into_inner()) = grants;
    }

    /// Closes a link, served or used, at the server's request.
    pub fn close(&self, link_id: u64, reason: &str) {
        if let Some(link) = lock(&self.served).remove(&link_id) {
            link.task.abort();
            for (_, c) in lock(&link.streams).drain(..) {
                c.cancel();
            }
            tracing::info!(link_id, %reason, "served link closed by netportd");
        }
        for slot in lock(&self.client).values() {
            if let Ok(guard) = slot.try_lock()
                && let Some(link) = guard.as_ref()
                && link.link_id == link_id
            {
                link.dead.store(true, Ordering::Relaxed);
                link.opener.close();
                tracing::info!(link_id, %reason, "link closed by netportd");
            }
        }
    }
}

/// Connects to the relay port of `relay`.
pub(crate) async fn dial_relay(relay: &RelayEndpoint) -> Result<TcpStream> {
    let addr = format!("{}:{}", relay.address, relay.port);
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&addr))
        .await
        .with_context(|| format!("connecting to relay {} at {addr} timed out", relay.relay))?
        .with_context(|| format!("connecting to relay {} at {addr}", relay.relay))?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// Connects to a relay port, presents the token and waits until the peer is there too.
async fn meet(relay: &RelayEndpoint, token: &str, within: Duration) -> Result<TcpStream> {
    let token = relay::token_from_hex(token).context("malformed token from netportd")?;
    let mut tcp = dial_relay(relay).await?;
    tcp.write_all(&relay::encode_hello(&token)).await?;
    let mut answer = [0u8; 4];
    tokio::time::timeout(within, tcp.read_exact(&mut answer))
        .await
        .context("the peer portal did not reach the relay in time")?
        .context("relay closed the connection")?;
    if &answer != READY {
        bail!("relay {} refused the token", relay.relay);
    }
    Ok(tcp)
}

/// Carries one accepted client connection to its service.
pub async fn carry(
    portal: Arc<Portal>,
    spec: &ListenerSpec,
    mut tcp: TcpStream,
    from: std::net::SocketAddr,
) -> Result<()> {
    // Linux gives an accepted socket its listener's TCP_NODELAY (set in `listeners`).
    #[cfg(not(target_os = "linux"))]
    let _ = tcp.set_nodelay(true);
    let started = std::time::Instant::now();
    // The stream's header goes out with the client's first bytes, without waiting for the
    // serving portal's answer: a new connection costs one round trip through the link, not
    // two. The serving portal reads nothing past the header before it has checked the grant
    // and dialed the service, and its answer comes first on the way back.
    let (mut stream, guard, link_id, early) =
        match open_channel_with(&portal, spec, Some(&tcp)).await? {
            Channel::Stream {
                stream,
                guard,
                link_id,
                early,
                ..
            } => (stream, guard, link_id, early),
            Channel::Legacy { link, guard } => {
                let LinkOpener::Legacy(o) = &link.opener else {
                    bail!("internal: a legacy channel on a native link");
                };
                // Boxed: a legacy link's state must not make every native stream's future as large.
                let carried = Box::pin(o.carry(&spec.service, tcp)).await;
                drop(guard);
                return carried;
            }
        };
    let counted = portal.stats.stream(Side::Client);
    let mut refused = None;
    let copied = {
        let (from_client, to_client) = tokio::io::split(&mut tcp);
        let (mut from_link, to_link) = tokio::io::split(&mut stream);
        let back = async {
            if let Err(e) = read_answer(&mut from_link).await {
                refused = Some(format!("{e:#}"));
                return Err(std::io::Error::other("refused"));
            }
            crate::copy::one_way(from_link, to_client).await
        };
        tokio::try_join!(crate::copy::one_way(from_client, to_link), back)
    };
    // The stream counted as active until here.
    drop(guard);
    drop(counted);
    if let Some(why) = refused {
        bail!("{why} (`{}`)", spec.service);
    }
    let (up, down) = copied.unwrap_or((0, 0));
    let up = up + early;
    portal.stats.stream_bytes(Side::Client, up, down);
    portal.tell_server(Message::StreamClosed {
        link_id,
        access: spec.access.clone(),
        service: spec.service.clone(),
        source: from.to_string(),
        bytes_to_service: up,
        bytes_from_service: down,
        duration_ms: started.elapsed().as_millis() as u64,
    });
    Ok(())
}

/// A channel to a service, as [`open_channel`] gives it.
pub(crate) enum Channel {
    /// A stream on a native link, accepted by the serving portal.
    Stream {
        stream: LinkStream,
        /// A UDP flow's datagrams, on a QUIC link.
        datagrams: Option<FlowDatagrams>,
        /// Counts the stream as active on the link until dropped.
        guard: Active,
        link_id: u64,
        /// The client's bytes sent with the stream's header.
        early: u64,
    },
    /// The peer is a legacy (V0.1) portal: the caller carries the connection with the
    /// legacy link framing.
    Legacy { link: ClientLink, guard: Active },
}

/// Opens a stream to `spec`'s service on the link to its serving portal (set up on first
/// use) and waits for the serving portal to accept it. The stream counts as active on the
/// link until the returned guard is dropped.
pub(crate) async fn open_channel(portal: &Arc<Portal>, spec: &ListenerSpec) -> Result<Channel> {
    open_channel_with(portal, spec, None).await
}

/// [`open_channel`]; given the `client` connection, the stream's header carries what the
/// client has already sent (counted in `early`), and the stream is returned once the header
/// is written: the caller reads the answer ([`read_answer`]) before anything else.
async fn open_channel_with(
    portal: &Arc<Portal>,
    spec: &ListenerSpec,
    client: Option<&TcpStream>,
) -> Result<Channel> {
    let mut stream = None;
    let mut datagrams = None;
    let mut guard = None;
    let mut link_id = 0;
    for _ in 0..2 {
        // Boxed: setting a link up (TLS or QUIC handshakes) takes a large future, and an
        // inline one would make every connection's task that large for its whole life.
        let link = Box::pin(client_link(portal, spec)).await?;
        let active = Active::new(&link.active);
        let max = portal.config.max_streams_per_link;
        if link.active.load(Ordering::Relaxed) > max {
            drop(active);
            let e = mux::LinkFull(max);
            tracing::warn!(peer = %spec.serving_portal, service = %spec.service, "refusing a connection: {e}");
            bail!("{e}");
        }
        if let LinkOpener::Legacy(_) = &link.opener {
            return Ok(Channel::Legacy {
                link: link.clone(),
                guard: active,
            });
        }
        match link.opener.open(spec.transport == Transport::Udp).await {
            Ok((s, d)) => {
                stream = Some(s);
                datagrams = d;
                guard = Some(active);
                link_id = link.link_id;
                break;
            }
            Err(e) if e.is::<mux::LinkFull>() => {
                tracing::warn!(peer = %spec.serving_portal, service = %spec.service, "refusing a connection: {e}");
                bail!("{e}");
            }
            Err(_) => {
                // The link died under us: forget it and set up a new one.
                link.dead.store(true, Ordering::Relaxed);
            }
        }
    }
    let (Some(mut stream), Some(guard)) = (stream, guard) else {
        bail!("could not open a stream on a fresh link");
    };
    let name = spec.service.as_bytes();
    let room = if client.is_some() {
        crate::copy::START_BUF
    } else {
        0
    };
    let mut header = Vec::with_capacity(2 + name.len() + room);
    header.extend_from_slice(&(name.len() as u16).to_be_bytes());
    header.extend_from_slice(name);
    // What the client has sent already goes in the stream's first frame, with the header:
    // one record and one write through the relay instead of two.
    let mut early = 0;
    if let Some(tcp) = client {
        let at = header.len();
        header.resize(at + room, 0);
        // A short read leaves the socket marked drained: the copy's first read then waits
        // for the client's next bytes instead of finding nothing.
        early = match mux::read_some(tcp, &mut header[at..]) {
            Ok((n, _)) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e.into()),
        };
        header.truncate(at + early);
    }
    stream.write_all(&header).await?;
    if client.is_none() {
        read_answer(&mut stream)
            .await
            .with_context(|| format!("opening `{}`", spec.service))?;
    }
    Ok(Channel::Stream {
        stream,
        datagrams,
        guard,
        link_id,
        early: early as u64,
    })
}

/// Reads the serving portal's answer to a stream's header: `OPEN_OK`, or a refusal with its
/// message.
async fn read_answer<S: AsyncRead + Unpin>(stream: &mut S) -> Result<()> {
    let mut code = [0u8; 1];
    stream
        .read_exact(&mut code)
        .await
        .context("the serving portal closed the stream")?;
    if code[0] != OPEN_OK {
        let msg = read_msg(stream).await.unwrap_or_default();
        bail!("the serving portal refused the stream: {msg}");
    }
    Ok(())
}

async fn read_msg<S: AsyncRead + Unpin>(s: &mut S) -> Result<String> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await?;
    let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut msg).await?;
    Ok(String::from_utf8_lossy(&msg).into_owned())
}

pub(crate) async fn refuse<S: AsyncWrite + Unpin>(s: &mut S, code: u8, msg: &str) {
    let m = msg.as_bytes();
    let mut out = vec![code];
    out.extend_from_slice(&(m.len().min(u16::MAX as usize) as u16).to_be_bytes());
    out.extend_from_slice(&m[..m.len().min(u16::MAX as usize)]);
    let _ = s.write_all(&out).await;
    let _ = s.shutdown().await;
}

/// The link to the portal serving `spec`, set up on first use.
async fn client_link(portal: &Arc<Portal>, spec: &ListenerSpec) -> Result<ClientLink> {
    // With `quic = "udp"`, UDP services get a link of their own (over QUIC) and TCP
    // services theirs (over TCP), so neither rides the other's transport.
    let key = if portal.config.quic == QuicMode::Udp && spec.transport == Transport::Udp {
        format!("{} udp", spec.serving_portal)
    } else {
        spec.serving_portal.clone()
    };
    let slot = lock(&portal.links.client).entry(key).or_default().clone();
    let mut guard = slot.lock().await;
    if let Some(link) = guard.as_ref()
        && !link.dead.load(Ordering::Relaxed)
        && !link.opener.is_closed()
    {
        return Ok(link.clone());
    }
    let access = spec.access.clone();
    let answer = portal
        .request(
            |request_id| Message::OpenLink { request_id, access },
            Duration::from_secs(15),
        )
        .await?;
    let (link_id, peer, relay, token, expires_in_ms, legacy, quic) = match answer {
        Message::LinkOffer {
            link_id,
            peer,
            relay,
            token,
            expires_in_ms,
            legacy,
            quic,
            ..
        } => (link_id, peer, relay, token, expires_in_ms, legacy, quic),
        Message::LinkDenied {
            reason,
            rule,
            message,
            ..
        } => {
            portal.stats.denied(&reason);
            let rule = rule.map(|r| format!(", rule `{r}`")).unwrap_or_default();
            tracing::warn!(access = %spec.access, service = %spec.service, %reason, "denied by netportd ({reason}{rule}): {message}");
            bail!("denied ({reason}{rule}): {message}");
        }
        other => bail!("unexpected answer {}", other.kind()),
    };
    if peer != spec.serving_portal {
        bail!(
            "netportd offered a link to `{peer}`, expected `{}`",
            spec.serving_portal
        );
    }
    let within = Duration::from_millis(expires_in_ms.max(1000));
    if let Some(l) = legacy {
        let dead = Arc::new(AtomicBool::new(false));
        let flag = dead.clone();
        let opener =
            crate::legacy::connect(portal, link_id, &relay, &token, l, within, move |why| {
                flag.store(true, Ordering::Relaxed);
                tracing::info!(link_id, "legacy link ended: {why}");
            })
            .await?;
        let link = ClientLink {
            link_id,
            opener: LinkOpener::Legacy(opener),
            dead,
            active: Arc::default(),
        };
        watch_idle(
            link_id,
            link.opener.clone(),
            link.active.clone(),
            link.dead.clone(),
            portal.config.link_idle,
        );
        *guard = Some(link.clone());
        return Ok(link);
    }
    let expected = Identity::new(Role::Portal, peer.clone())?;
    let quic = quic.filter(|_| portal.config.quic.links().opens(spec.transport));
    let route = format!("{}/{peer}", relay.relay);
    let failed = lock(&portal.links.quic_failed)
        .get(&route)
        .is_some_and(|t| t.elapsed() < QUIC_RETRY_AFTER);
    match quic {
        Some(_) if failed => {
            tracing::info!(link_id, %peer, relay = %relay.relay, "QUIC failed on this route lately: using TCP");
        }
        Some(path) => {
            let budget = portal.config.quic_timeout;
            match crate::quic::connect(portal, &relay, &path, expected.clone(), budget).await {
                Ok(conn) => {
                    lock(&portal.links.quic_failed).remove(&route);
                    let link = quic_client_link(portal, link_id, peer, &relay, conn);
                    *guard = Some(link.clone());
                    return Ok(link);
                }
                Err(e) => {
                    lock(&portal.links.quic_failed).insert(route, std::time::Instant::now());
                    tracing::info!(link_id, %peer, relay = %relay.relay, "QUIC link failed, falling back to TCP: {e:#}");
                }
            }
        }
        None => {}
    }
    let tcp = meet(&relay, &token, within).await?;
    let tls = portal.config.credentials.link_client(expected)?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let name = ServerName::try_from("link.netport.invalid").map_err(|e| anyhow!("{e}"))?;
    let tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .context("link TLS handshake timed out")?
        .with_context(|| {
            format!(
                "link TLS handshake with `{peer}` (is the peer exactly who netportd announced?)"
            )
        })?;
    let dead = Arc::new(AtomicBool::new(false));
    let flag = dead.clone();
    let up = portal.stats.link(Side::Client, "tcp");
    let opener = mux::client(tls, portal.config.max_streams_per_link, move |why| {
        drop(up);
        flag.store(true, Ordering::Relaxed);
        tracing::info!(link_id, %peer, link_transport = %"tcp", "link ended: {why}");
    });
    tracing::info!(link_id, peer = %spec.serving_portal, relay = %relay.relay, link_transport = %"tcp", "link up");
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    watch_idle(
        link_id,
        LinkOpener::Native(opener.clone()),
        active.clone(),
        dead.clone(),
        portal.config.link_idle,
    );
    let link = ClientLink {
        link_id,
        opener: LinkOpener::Native(opener),
        dead,
        active,
    };
    *guard = Some(link.clone());
    Ok(link)
}

/// A client link over an established QUIC connection.
fn quic_client_link(
    portal: &Arc<Portal>,
    link_id: u64,
    peer: String,
    relay: &RelayEndpoint,
    conn: quinn::Connection,
) -> ClientLink {
    let dead = Arc::new(AtomicBool::new(false));
    let up = portal.stats.link(Side::Client, "quic");
    tracing::info!(link_id, %peer, relay = %relay.relay, link_transport = %"quic", "link up");
    let (c, flag, p) = (conn.clone(), dead.clone(), portal.clone());
    tokio::spawn(async move {
        let why = c.closed().await;
        drop(up);
        flag.store(true, Ordering::Relaxed);
        tracing::info!(link_id, %peer, link_transport = %"quic", "link ended: {why}");
        // Unlike a TCP pair, the relay's UDP pair cannot see the link end.
        p.tell_server(Message::LinkClosed {
            link_id,
            reason: why.to_string(),
        });
    });
    let link = ClientLink {
        link_id,
        opener: LinkOpener::Quic(QuicLink::new(conn)),
        dead,
        active: Arc::default(),
    };
    watch_idle(
        link_id,
        link.opener.clone(),
        link.active.clone(),
        link.dead.clone(),
        portal.config.link_idle,
    );
    link
}

/// Closes a client link that has carried no stream for `idle`.
fn watch_idle(
    link_id: u64,
    opener: LinkOpener,
    active: Arc<std::sync::atomic::AtomicUsize>,
    dead: Arc<AtomicBool>,
    idle: Duration,
) {
    tokio::spawn(async move {
        let step = (idle / 4).max(Duration::from_millis(100));
        let mut quiet = Duration::ZERO;
        while !dead.load(Ordering::Relaxed) && !opener.is_closed() {
            tokio::time::sleep(step).await;
            if active.load(Ordering::Relaxed) == 0 {
                quiet += step;
            } else {
                quiet = Duration::ZERO;
            }
            if quiet >= idle {
                tracing::info!(link_id, "closing the link: idle for {} s", idle.as_secs());
                dead.store(true, Ordering::Relaxed);
                opener.close();
                return;
            }
        }
    });
}

/// How long the serving portal waits for the client portal at the relay, per transport.
const SERVE_WAIT: Duration = Duration::from_secs(15);

/// The serving side of a link announced by netportd: it waits for the client portal on the
/// relay's TCP port and, when netportd gave one and `quic` is not off, on its UDP port too,
/// and serves whichever the client portal uses (the client decides; the other times out).
pub async fn serve_incoming(
    portal: Arc<Portal>,
    link_id: u64,
    peer: String,
    relay: RelayEndpoint,
    token: String,
    grants: Vec<LinkGrant>,
    quic: Option<QuicPath>,
) -> Result<()> {
    let expected = Identity::new(Role::Portal, peer.clone())?;
    let quic = quic.filter(|_| portal.config.quic.links().serves());
    let grants = Arc::new(RwLock::new(grants));
    let streams: OpenStreams = Arc::default();
    let (g, st, p) = (grants.clone(), streams.clone(), portal.clone());
    let task = tokio::spawn(async move {
        let spawn_stream = |stream: LinkStream, datagrams: Option<FlowDatagrams>| {
            let (grants, streams, peer, p) = (g.clone(), st.clone(), peer.clone(), p.clone());
            tokio::spawn(async move {
                let open = Open {
                    grants,
                    streams,
                    peer: &peer,
                };
                if let Err(e) = serve_stream(&p, stream, datagrams, open).await {
                    tracing::warn!(%peer, "stream refused: {e:#}");
                }
            });
        };
        let over_tcp = async {
            let tls = accept_tcp(&p, &relay, &token, &expected).await?;
            let _up = p.stats.link(Side::Serving, "tcp");
            tracing::info!(link_id, relay = %relay.relay, link_transport = %"tcp", "serving link up");
            anyhow::Ok(mux::server(tls, |s| spawn_stream(Box::new(s), None)).await)
        };
        let over_quic = async {
            let Some(path) = &quic else {
                return Ok(None);
            };
            let conn = crate::quic::accept(&p, &relay, path, &expected, SERVE_WAIT).await?;
            // However this ends (netportd closing the link aborts the task), the peer hears.
            let _close = crate::quic::CloseOnDrop(conn.clone());
            let _up = p.stats.link(Side::Serving, "quic");
            tracing::info!(link_id, relay = %relay.relay, link_transport = %"quic", "serving link up");
            anyhow::Ok(Some(QuicLink::new(conn).serve(spawn_stream).await))
        };
        let (tcp, quic) = tokio::join!(over_tcp, over_quic);
        match (tcp, quic) {
            (Err(t), Err(q)) => {
                tracing::warn!(link_id, %peer, "incoming link failed: over TCP: {t:#}; over QUIC: {q:#}")
            }
            (Err(t), Ok(None)) => tracing::warn!(link_id, %peer, "incoming link failed: {t:#}"),
            (Ok(why), q) => {
                if let Err(q) = q {
                    tracing::debug!(link_id, "QUIC path unused: {q:#}");
                }
                tracing::info!(link_id, link_transport = %"tcp", "served link ended: {why}");
            }
            (Err(t), Ok(Some(why))) => {
                tracing::debug!(link_id, "TCP path unused: {t:#}");
                tracing::info!(link_id, link_transport = %"quic", "served link ended: {why}");
                p.tell_server(Message::LinkClosed {
                    link_id,
                    reason: why,
                });
            }
        }
        lock(&p.links.served).remove(&link_id);
    });
    lock(&portal.links.served).insert(
        link_id,
        Served {
            grants,
            streams,
            task: task.abort_handle(),
        },
    );
    Ok(())
}

/// Meets the client portal on the relay's TCP port and runs the link's TLS handshake; the
/// peer must be exactly `expected`.
async fn accept_tcp(
    portal: &Portal,
    relay: &RelayEndpoint,
    token: &str,
    expected: &Identity,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>> {
    let tcp = meet(relay, token, SERVE_WAIT).await?;
    let tls = portal.config.credentials.link_server()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let tls = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
        .await
        .context("link TLS handshake timed out")?
        .context("link TLS handshake")?;
    let info = netport_proto::tls::peer_info(tls.get_ref().1.peer_certificates())?;
    if info.identity()? != expected {
        bail!(
            "link peer is {}, but netportd announced {expected}: closing",
            info.identity()?
        );
    }
    Ok(tls)
}

/// What a served stream may open, and where it registers.
struct Open<'a> {
    grants: SharedGrants,
    streams: OpenStreams,
    peer: &'a str,
}

async fn serve_stream(
    portal: &Portal,
    mut stream: LinkStream,
    datagrams: Option<FlowDatagrams>,
    open: Open<'_>,
) -> Result<()> {
    let Open {
        grants,
        streams,
        peer,
    } = open;
    let service = tokio::time::timeout(Duration::from_secs(10), read_msg(&mut stream))
        .await
        .context("no stream header")??;
    let grant = grants
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .find(|g| g.service == service)
        .map(|g| (g.target.clone(), g.transport));
    let Some((target, transport)) = grant else {
        refuse(
            &mut stream,
            OPEN_NOT_GRANTED,
            &format!("`{service}` is not granted to `{peer}` on this link"),
        )
        .await;
        bail!("`{peer}` asked for `{service}`, which this link does not grant");
    };
    if transport == Transport::Udp {
        let flow = crate::udp::Flow {
            stream,
            datagrams,
            stats: &portal.stats,
        };
        // Boxed: the UDP flow's state must not make every TCP stream's future as large.
        return Box::pin(crate::udp::serve(
            flow,
            streams,
            service,
            &target,
            portal.config.udp,
        ))
        .await;
    }
    // A TCP channel takes no datagrams.
    drop(datagrams);
    let mut tcp =
        match tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&target)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                refuse(
                    &mut stream,
                    OPEN_DIAL_FAILED,
                    &format!("cannot connect to the service: {e}"),
                )
                .await;
                bail!("dialing {target} for `{service}`: {e}");
            }
            Err(_) => {
                refuse(
                    &mut stream,
                    OPEN_DIAL_FAILED,
                    "connecting to the service timed out",
                )
                .await;
                bail!("dialing {target} for `{service}` timed out");
            }
        };
    let _ = tcp.set_nodelay(true);
    // Registered by service, so a grant that shrinks can cut this stream.
    let cancel = CancellationToken::new();
    lock(&streams).push((service, cancel.clone()));
    let counted = portal.stats.stream(Side::Serving);
    tokio::select! {
        r = crate::copy::bidirectional(&mut stream, &mut tcp, &[OPEN_OK], ANSWER_WAIT) => {
            if let Ok((to, from)) = r {
                portal.stats.stream_bytes(Side::Serving, to, from);
            }
        }
        _ = cancel.cancelled() => {}
    }
    drop(counted);
    // Done: drop this stream's entry (and any other finished one).
    cancel.cancel();
    lock(&streams).retain(|(_, c)| !c.is_cancelled());
    Ok(())
}
