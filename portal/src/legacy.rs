//! Links with legacy (V0.1) portals: the Rust portal speaks the legacy link protocol when
//! netportd says the peer is one.
//!
//! After the relay (64-byte hello, echo, `Ready !\n`) and TLS (TLS 1.2/1.3, no ALPN, the
//! peer named `ID|IDV|USER|USERV`) the TLS server sends `tokenP[0..4]` and the client answers
//! `tokenP[4..8]`. Then frames `len:u16le | dstChannel:u16le | payload` carry channel data,
//! channel 0 the control messages (`n` open, `c` half-close, `d` abort, their answers and
//! `.` keepalives). The legacy protocol has no flow control: what arrives for a channel is
//! queued for its socket. It also opens channels by `addr:port`, never by service, and the
//! server cannot see them: on a link this portal serves, it opens only the targets the
//! server granted for this link, like on a native link.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use netport_proto::control::{LegacyLink, LinkGrant, RelayEndpoint};
use netport_proto::legacy::{self, LegacyName, LinkControl, Token8};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_util::sync::CancellationToken;

use crate::link::{OpenStreams, Served, SharedGrants};
use crate::{Portal, lock};

/// The most data one frame carries: a frame then fits one TLS record, which the legacy
/// portal's fixed-size reads rely on.
const DATA_CHUNK: usize = 16 * 1024 - 16;

/// A keepalive goes out this often.
const KEEPALIVE: Duration = Duration::from_secs(10);

/// A link silent this long is gone: the peer sends keepalives about every 10 s.
const SILENCE: Duration = Duration::from_secs(45);

/// Frames queued per direction before a sender waits: bounds the memory a link holds.
const QUEUE: usize = 64;

/// How long the peer's data may wait for a slow local socket before its channel is aborted
/// (the protocol has no flow control; the legacy portal gives a socket 1 s).
const STALL: Duration = Duration::from_secs(5);

struct Chan {
    /// Data for the local socket; dropped when the peer half-closes.
    data: Option<mpsc::Sender<Vec<u8>>>,
    /// The peer's channel number (0 until the peer answered the open).
    peer: u16,
    abort: CancellationToken,
}

#[derive(Default)]
struct State {
    next_ch: u16,
    next_req: u32,
    channels: HashMap<u16, Chan>,
    /// Our `n` requests waiting for `N`, by our channel.
    pending: HashMap<u16, oneshot::Sender<u16>>,
}

/// One running legacy link.
struct Shared {
    /// Answers and requests of the link itself; they go out before queued data.
    ctl: mpsc::UnboundedSender<Vec<u8>>,
    /// Channel data, and each channel's own half-close or abort after its data, in order.
    data: mpsc::Sender<Vec<u8>>,
    state: Mutex<State>,
    cancel: CancellationToken,
}

fn frame(ch: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(4 + payload.len());
    // Payloads here are at most DATA_CHUNK or a control message: always a valid frame.
    let _ = legacy::encode_link_frame(ch, payload, &mut frame);
    frame
}

impl Shared {
    /// A control message that does not follow any channel's data.
    fn control(&self, m: &LinkControl) {
        let _ = self.ctl.send(frame(0, &legacy::encode_link_control(m)));
    }

    /// Channel data, waiting while the queue is full; `false` when the link is gone.
    async fn send_data(&self, ch: u16, payload: &[u8]) -> bool {
        self.data.send(frame(ch, payload)).await.is_ok()
    }

    /// A channel's half-close or abort, after the data it queued.
    async fn send_after_data(&self, m: &LinkControl) {
        let _ = self
            .data
            .send(frame(0, &legacy::encode_link_control(m)))
            .await;
    }

    fn req(&self) -> u32 {
        let mut s = lock(&self.state);
        s.next_req = s.next_req.wrapping_add(1);
        s.next_req
    }

    /// A free channel number (never 0) with its entry.
    fn new_channel(&self, peer: u16) -> Option<(u16, mpsc::Receiver<Vec<u8>>, CancellationToken)> {
        let mut s = lock(&self.state);
        for _ in 0..u16::MAX {
            s.next_ch = s.next_ch.wrapping_add(1).max(1);
            let ch = s.next_ch;
            if !s.channels.contains_key(&ch) && !s.pending.contains_key(&ch) {
                let (tx, rx) = mpsc::channel(QUEUE);
                let abort = self.cancel.child_token();
                s.channels.insert(
                    ch,
                    Chan {
                        data: Some(tx),
                        peer,
                        abort: abort.clone(),
                    },
                );
                return Some((ch, rx, abort));
            }
        }
        None
    }
}

/// Opens channels on a client link to a legacy portal.
#[derive(Clone)]
pub struct Opener {
    shared: Arc<Shared>,
    targets: Arc<Vec<LinkGrant>>,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("legacy::Opener").finish_non_exhaustive()
    }
}

impl Opener {
    /// Ends the link.
    pub fn close(&self) {
        self.shared.cancel.cancel();
    }

    /// Whether the link has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.cancel.is_cancelled()
    }

    /// Carries `tcp` to `service`'s target on the legacy peer until both sides are done.
    pub async fn carry(&self, service: &str, tcp: TcpStream) -> Result<()> {
        let target = self
            .targets
            .iter()
            .find(|g| g.service == service)
            .map(|g| g.target.clone())
            .ok_or_else(|| anyhow!("netportd gave no target for `{service}` on this link"))?;
        let (addr, port) =
            split_target(&target).with_context(|| format!("target {target} is not host:port"))?;
        let shared = &self.shared;
        let (mine, rx, abort) = shared
            .new_channel(0)
            .ok_or_else(|| anyhow!("no free channel on the link"))?;
        let (tx, answer) = oneshot::channel();
        lock(&shared.state).pending.insert(mine, tx);
        shared.control(&LinkControl::Open {
            req: shared.req(),
            src: mine,
            port,
            addr: addr.to_string(),
        });
        let peer = tokio::select! {
            a = tokio::time::timeout(Duration::from_secs(10), answer) => a.ok().and_then(|r| r.ok()),
            _ = shared.cancel.cancelled() => None,
        };
        lock(&shared.state).pending.remove(&mine);
        let peer = match peer {
            Some(ch) if ch != 0 => {
                if let Some(c) = lock(&shared.state).channels.get_mut(&mine) {
                    c.peer = ch;
                }
                ch
            }
            Some(_) => {
                lock(&shared.state).channels.remove(&mine);
                bail!("the legacy peer refused to open {target}");
            }
            None => {
                lock(&shared.state).channels.remove(&mine);
                bail!("the legacy peer did not answer the channel open");
            }
        };
        run_channel(shared.clone(), mine, peer, tcp, rx, abort).await;
        Ok(())
    }
}

/// `host:port` → (`host` without IPv6 brackets, port).
fn split_target(target: &str) -> Option<(&str, u16)> {
    let (host, port) = target.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host, port.parse().ok()?))
}

/// Whether a granted `host:port` is `addr:port`.
fn grant_matches(target: &str, addr: &str, port: u16) -> bool {
    split_target(target).is_some_and(|(h, p)| p == port && h.eq_ignore_ascii_case(addr))
}

/// Carries bytes between a local socket and a channel until both directions are closed,
/// either side aborts, or the link ends.
async fn run_channel(
    shared: Arc<Shared>,
    mine: u16,
    peer: u16,
    tcp: TcpStream,
    mut data: mpsc::Receiver<Vec<u8>>,
    abort: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    let (mut r, mut w) = tcp.into_split();
    let up = async {
        let mut buf = vec![0u8; DATA_CHUNK];
        loop {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                shared
                    .send_after_data(&LinkControl::HalfClose {
                        req: shared.req(),
                        dst: peer,
                        src: mine,
                    })
                    .await;
                return Ok::<_, std::io::Error>(());
            }
            if !shared.send_data(peer, &buf[..n]).await {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
        }
    };
    let down = async {
        while let Some(d) = data.recv().await {
            w.write_all(&d).await?;
        }
        w.shutdown().await
    };
    tokio::select! {
        r = async { tokio::try_join!(up, down) } => {
            if r.is_err() {
                shared.send_after_data(&LinkControl::Abort { req: shared.req(), dst: peer, src: mine }).await;
            }
        }
        _ = abort.cancelled() => {}
    }
    lock(&shared.state).channels.remove(&mine);
}

/// Presents `tokenR` and waits for the echo and `Ready !\n`.
async fn meet(relay: &RelayEndpoint, token: &str, within: Duration) -> Result<TcpStream> {
    let token = token8(token).context("malformed legacy relay token from netportd")?;
    let mut tcp = crate::link::dial_relay(relay).await?;
    let hello = legacy::encode_relay_hello(&token);
    tcp.write_all(&hello).await?;
    let mut echo = [0u8; legacy::RELAY_HELLO_LEN];
    tokio::time::timeout(within, tcp.read_exact(&mut echo[..8]))
        .await
        .context("the relay did not answer")??;
    if &echo[..8] == legacy::RELAY_BAD_TOKEN {
        bail!("relay {} refused the legacy token", relay.relay);
    }
    tcp.read_exact(&mut echo[8..]).await?;
    ensure!(
        echo == hello,
        "relay {} did not echo the hello",
        relay.relay
    );
    let mut ready = [0u8; 8];
    tokio::time::timeout(within, tcp.read_exact(&mut ready))
        .await
        .context("the legacy peer did not reach the relay in time")??;
    ensure!(
        &ready == legacy::RELAY_READY,
        "relay {} did not say Ready",
        relay.relay
    );
    Ok(tcp)
}

fn token8(s: &str) -> Option<Token8> {
    let mut t = [0u8; 8];
    hex::decode_to_slice(s, &mut t).ok()?;
    Some(t)
}

/// The client side of a link to a legacy portal (this portal asked for it).
pub async fn connect(
    portal: &Arc<Portal>,
    link_id: u64,
    relay: &RelayEndpoint,
    token: &str,
    l: LegacyLink,
    within: Duration,
    on_end: impl FnOnce(String) + Send + 'static,
) -> Result<Opener> {
    let peer = LegacyName::parse(&l.peer_name).context("malformed legacy peer name")?;
    let token_p = token8(&l.token_p).context("malformed tokenP")?;
    let tcp = meet(relay, token, within).await?;
    let cfg = portal.config.credentials.legacy_link_client(peer)?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name = ServerName::try_from("link.netport.invalid").map_err(|e| anyhow!("{e}"))?;
    let mut tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .context("legacy link TLS handshake timed out")?
        .with_context(|| format!("legacy link TLS handshake with {peer}"))?;
    let mut first = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut first))
        .await
        .context("no tokenP from the legacy peer")??;
    ensure!(first == token_p[..4], "the legacy peer sent a wrong tokenP");
    tls.write_all(&token_p[4..]).await?;
    tls.flush().await?;
    let shared = start(tls, None, link_id, on_end);
    tracing::info!(link_id, %peer, relay = %relay.relay, "legacy link up");
    Ok(Opener {
        shared,
        targets: Arc::new(l.targets),
    })
}

/// The serving side of a link a legacy portal asked for.
pub async fn serve_incoming(
    portal: Arc<Portal>,
    link_id: u64,
    relay: RelayEndpoint,
    token: String,
    grants: Vec<LinkGrant>,
    l: LegacyLink,
) -> Result<()> {
    let peer = LegacyName::parse(&l.peer_name).context("malformed legacy peer name")?;
    let token_p = token8(&l.token_p).context("malformed tokenP")?;
    let tcp = meet(&relay, &token, Duration::from_secs(15)).await?;
    // OpenSSL, not rustls: a Python requester sends our legacy name as SNI (see legacy_tls).
    let acceptor = crate::legacy_tls::acceptor(&portal.config.credentials)?;
    let mut tls = tokio::time::timeout(
        Duration::from_secs(10),
        crate::legacy_tls::accept(&acceptor, tcp),
    )
    .await
    .context("legacy link TLS handshake timed out")?
    .context("legacy link TLS handshake")?;
    let info = crate::legacy_tls::peer_info(&tls)?;
    if !netport_proto::tls::legacy::has_legacy_name(&info, &peer) {
        bail!(
            "legacy link peer names {:?}, but netportd announced {peer}: closing",
            info.dns_names
        );
    }
    tls.write_all(&token_p[..4]).await?;
    tls.flush().await?;
    let mut second = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut second))
        .await
        .context("no tokenP from the legacy peer")??;
    ensure!(
        second == token_p[4..],
        "the legacy peer sent a wrong tokenP"
    );
    let grants: SharedGrants = Arc::new(std::sync::RwLock::new(grants));
    let streams: OpenStreams = Arc::default();
    let shared = start(
        tls,
        Some((grants.clone(), streams.clone())),
        link_id,
        move |why| tracing::info!(link_id, "served legacy link ended: {why}"),
    );
    // Aborted when netportd closes the link; dropping the guard then ends the link.
    let task = tokio::spawn({
        let cancel = shared.cancel.clone();
        async move {
            let _guard = cancel.clone().drop_guard();
            cancel.cancelled().await;
        }
    });
    lock(&portal.links.served).insert(
        link_id,
        Served {
            grants,
            streams,
            task: task.abort_handle(),
        },
    );
    tracing::info!(link_id, %peer, relay = %relay.relay, "serving legacy link up");
    Ok(())
}

type Serving = (SharedGrants, OpenStreams);

/// Starts the link's reader and writer; `serving` holds the grants when this side serves.
fn start<S>(
    io: S,
    serving: Option<Serving>,
    link_id: u64,
    on_end: impl FnOnce(String) + Send + 'static,
) -> Arc<Shared>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let (ctl, mut ctl_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let (data, mut data_rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    let shared = Arc::new(Shared {
        ctl,
        data,
        state: Mutex::default(),
        cancel: CancellationToken::new(),
    });
    let cancel = shared.cancel.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
        let mut keepalive = Vec::new();
        let _ = legacy::encode_link_frame(
            0,
            &legacy::encode_link_control(&LinkControl::KeepAlive),
            &mut keepalive,
        );
        loop {
            let frame = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                f = ctl_rx.recv() => match f { Some(f) => f, None => break },
                f = data_rx.recv() => match f { Some(f) => f, None => break },
                _ = tick.tick() => keepalive.clone(),
            };
            // One write per frame: one TLS record each.
            if wr.write_all(&frame).await.is_err() || wr.flush().await.is_err() {
                break;
            }
        }
        cancel.cancel();
        let _ = wr.shutdown().await;
    });
    let me = shared.clone();
    tokio::spawn(async move {
        let why = tokio::select! {
            r = read_loop(&me, &mut rd, serving.as_ref(), link_id) => match r {
                Ok(()) => "closed by the peer".to_string(),
                Err(e) => format!("{e:#}"),
            },
            _ = me.cancel.cancelled() => "closed".to_string(),
        };
        me.cancel.cancel();
        on_end(why);
    });
    shared
}

async fn read_loop<R: AsyncRead + Unpin>(
    shared: &Arc<Shared>,
    rd: &mut R,
    serving: Option<&Serving>,
    link_id: u64,
) -> Result<()> {
    loop {
        let mut head = [0u8; legacy::LINK_HEADER];
        match tokio::time::timeout(SILENCE, rd.read_exact(&mut head)).await {
            Err(_) => bail!("the legacy peer was silent for {} s", SILENCE.as_secs()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e.into()),
        }
        let mut payload = vec![0u8; usize::from(u16::from_le_bytes([head[0], head[1]]))];
        rd.read_exact(&mut payload).await?;
        let ch = u16::from_le_bytes([head[2], head[3]]);
        if ch != 0 {
            let data = lock(&shared.state)
                .channels
                .get(&ch)
                .and_then(|c| c.data.clone());
            match data {
                Some(tx) => {
                    // No flow control in V0.1: a local socket that cannot keep up loses its
                    // channel rather than stalling the whole link forever.
                    if !matches!(
                        tokio::time::timeout(STALL, tx.send(payload)).await,
                        Ok(Ok(()))
                    ) {
                        let gone = lock(&shared.state).channels.remove(&ch);
                        if let Some(c) = gone {
                            tracing::warn!(
                                link_id,
                                ch,
                                "local socket stalled: aborting the channel"
                            );
                            c.abort.cancel();
                            shared.control(&LinkControl::Abort {
                                req: shared.req(),
                                dst: c.peer,
                                src: ch,
                            });
                        }
                    }
                }
                None => tracing::debug!(link_id, ch, "data for a closed channel dropped"),
            }
            continue;
        }
        let msg = match legacy::decode_link_control(&payload) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(link_id, "ignored a malformed legacy link message: {e}");
                continue;
            }
        };
        match msg {
            LinkControl::KeepAlive => {}
            LinkControl::Open {
                req,
                src,
                port,
                addr,
            } => match serving {
                Some(s) => open_served(shared.clone(), s, req, src, port, addr, link_id),
                None => {
                    tracing::warn!(link_id, %addr, port, "the legacy peer tried to open a channel on a link it serves: refused");
                    shared.control(&LinkControl::Opened { req, src, new: 0 });
                }
            },
            LinkControl::Opened { src, new, .. } => {
                if let Some(tx) = lock(&shared.state).pending.remove(&src) {
                    let _ = tx.send(new);
                }
            }
            LinkControl::HalfClose { req, dst, src } => {
                let ok = lock(&shared.state)
                    .channels
                    .get_mut(&dst)
                    .map(|c| c.data.take())
                    .is_some();
                shared.control(&LinkControl::HalfClosed { req, src, ok });
            }
            LinkControl::Abort { req, dst, src } => {
                let gone = lock(&shared.state).channels.remove(&dst);
                if let Some(c) = &gone {
                    c.abort.cancel();
                }
                shared.control(&LinkControl::Aborted {
                    req,
                    src,
                    ok: gone.is_some(),
                });
            }
            LinkControl::HalfClosed { .. } | LinkControl::Aborted { .. } => {}
        }
    }
}

/// A legacy peer's `n` on a link this portal serves: only granted targets are dialled.
fn open_served(
    shared: Arc<Shared>,
    serving: &Serving,
    req: u32,
    src: u16,
    port: u16,
    addr: String,
    link_id: u64,
) {
    let (grants, streams) = serving;
    let service = grants
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .find(|g| grant_matches(&g.target, &addr, port))
        .map(|g| g.service.clone());
    let Some(service) = service else {
        tracing::warn!(link_id, %addr, port, "legacy peer asked for a target this link does not grant: refused");
        shared.control(&LinkControl::Opened { req, src, new: 0 });
        return;
    };
    let streams = streams.clone();
    tokio::spawn(async move {
        let dialed = tokio::time::timeout(
            Duration::from_secs(10),
            TcpStream::connect((addr.as_str(), port)),
        )
        .await;
        let tcp = match dialed {
            Ok(Ok(t)) => t,
            _ => {
                tracing::warn!(link_id, %addr, port, %service, "cannot connect to the service");
                shared.control(&LinkControl::Opened { req, src, new: 0 });
                return;
            }
        };
        let Some((mine, rx, abort)) = shared.new_channel(src) else {
            shared.control(&LinkControl::Opened { req, src, new: 0 });
            return;
        };
        // The answer is queued before any of the channel's data.
        shared.control(&LinkControl::Opened {
            req,
            src,
            new: mine,
        });
        lock(&streams).push((service, abort.clone()));
        run_channel(shared, mine, src, tcp, rx, abort.clone()).await;
        abort.cancel();
        lock(&streams).retain(|(_, c)| !c.is_cancelled());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_match_host_and_port_exactly() {
        assert!(grant_matches("127.0.0.1:22", "127.0.0.1", 22));
        assert!(grant_matches("NAS.local:22", "nas.local", 22));
        assert!(grant_matches("[::1]:22", "::1", 22));
        assert!(!grant_matches("127.0.0.1:22", "127.0.0.1", 23));
        assert!(!grant_matches("127.0.0.1:22", "127.0.0.2", 22));
        assert!(!grant_matches("garbage", "garbage", 0));
    }
}
