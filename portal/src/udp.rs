//! UDP services: datagrams carried over a link, one stream per flow.
//!
//! The client portal's UDP listener keys flows by the client's source address. Each flow is
//! one stream of the link to the serving portal, opened with the same header as a TCP channel;
//! on it every datagram travels as a big-endian u16 length and the payload, so datagram
//! boundaries survive end to end. The serving portal gives each flow its own UDP socket
//! connected to the target, so a reply goes back on the flow (and to the client) it belongs
//! to. A flow with no datagram either way for `udp_idle_secs` is closed on both sides. A
//! datagram larger than `udp_max_datagram` is dropped, counted and logged; none is ever
//! truncated (every receive buffer holds the largest UDP payload there is).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use netport_proto::control::ListenerSpec;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::UdpConfig;
use crate::link::{OPEN_DIAL_FAILED, OPEN_OK, OpenStreams, refuse};
use crate::mux::LinkStream;
use crate::quic::FlowDatagrams;
use crate::{Portal, lock};

/// Receive buffer: one more byte than any UDP payload, so no datagram is ever cut.
const RECV_BUF: usize = 65_536;

/// Datagrams queued for one flow while its stream opens or the link is busy; beyond this
/// the newest are dropped, as a congested UDP path would.
const FLOW_QUEUE: usize = 256;

/// Flows one listener holds at once (each is a stream of the link).
const MAX_FLOWS: usize = 512;

/// Datagrams dropped for being larger than `udp_max_datagram`, by this process.
static OVERSIZE_DROPPED: AtomicU64 = AtomicU64::new(0);

/// Counts and logs a datagram too large to carry. Logged at the 1st, 2nd, 4th, 8th, ...
/// drop, so a flood of them cannot flood the log; the count says how many there were.
fn oversize(len: usize, max: usize, where_: &str, peer: &str) {
    let total = OVERSIZE_DROPPED.fetch_add(1, Ordering::Relaxed) + 1;
    if total.is_power_of_two() {
        tracing::warn!(
            len,
            max,
            dropped_total = total,
            %peer,
            "UDP datagram of {len} bytes {where_} is larger than udp_max_datagram ({max}): dropped"
        );
    }
}

/// When a flow last carried a datagram, either way.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Writes one datagram as a frame.
async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8]) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(2 + data.len());
    // Every datagram that reaches here is at most udp_max_datagram <= 65507 bytes.
    frame.extend_from_slice(&(data.len() as u16).to_be_bytes());
    frame.extend_from_slice(data);
    w.write_all(&frame).await
}

/// Reads one datagram frame into `buf`; `None` at the end of the stream.
async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> std::io::Result<Option<usize>> {
    let mut len = [0u8; 2];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = usize::from(u16::from_be_bytes(len));
    r.read_exact(&mut buf[..len]).await?;
    Ok(Some(len))
}

/// Runs a flow's two directions until one ends, `cancel` fires, or nothing crossed for
/// `idle`; returns why it ended.
async fn run_flow(
    to_link: impl Future<Output = Result<()>>,
    from_link: impl Future<Output = Result<()>>,
    activity: &Activity,
    idle: Duration,
    cancel: &CancellationToken,
) -> String {
    tokio::pin!(to_link, from_link);
    loop {
        tokio::select! {
            r = &mut to_link => return end_reason("local side", r),
            r = &mut from_link => return end_reason("link", r),
            _ = cancel.cancelled() => return "closed by the portal".into(),
            _ = tokio::time::sleep_until(activity.last() + idle) => {
                if activity.last() + idle <= Instant::now() {
                    return format!("idle for {} s", idle.as_secs());
                }
            }
        }
    }
}

fn end_reason(side: &str, r: Result<()>) -> String {
    match r {
        Ok(()) => format!("{side} closed"),
        Err(e) => format!("{side} failed: {e:#}"),
    }
}

/// Whether a UDP socket error is only an ICMP report about an earlier datagram (the target
/// or client port was closed): the flow carries on, as UDP does.
fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionReset | HostUnreachable | NetworkUnreachable
    )
}

/// A UDP listener of the client portal: flows keyed by client address, each a link stream.
pub async fn listen(portal: Arc<Portal>, spec: ListenerSpec) {
    let sock = match UdpSocket::bind(&spec.listen).await {
        Ok(s) => Arc::new(s),
        Err(e) => {
            tracing::error!(access = %spec.access, listen = %spec.listen, "cannot listen (udp): {e}");
            return;
        }
    };
    tracing::info!(access = %spec.access, listen = %spec.listen, service = %spec.service, "listening (udp)");
    let config = portal.config.udp;
    let mut flows: HashMap<SocketAddr, (u64, mpsc::Sender<Vec<u8>>)> = HashMap::new();
    // Flows live in this task's set: closing the listener (aborting this task) ends them.
    let mut tasks: JoinSet<(SocketAddr, u64)> = JoinSet::new();
    let mut next_id = 0u64;
    let mut buf = vec![0u8; RECV_BUF];
    loop {
        tokio::select! {
            r = sock.recv_from(&mut buf) => {
                let (n, from) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        if !is_transient(&e) {
                            tracing::warn!(listen = %spec.listen, "udp receive failed: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        continue;
                    }
                };
                if n > config.max_datagram {
                    oversize(n, config.max_datagram, "from a client", &from.to_string());
                    continue;
                }
                let mut datagram = Some(buf[..n].to_vec());
                if let Some((_, tx)) = flows.get(&from) {
                    match tx.try_send(datagram.take().unwrap_or_default()) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            tracing::debug!(%from, "udp flow queue full: datagram dropped");
                        }
                        // The flow just ended (idle or link gone): start a new one.
                        Err(mpsc::error::TrySendError::Closed(d)) => {
                            flows.remove(&from);
                            datagram = Some(d);
                        }
                    }
                }
                let Some(first) = datagram else { continue };
                if flows.len() >= MAX_FLOWS {
                    tracing::warn!(listen = %spec.listen, %from, "udp listener holds {MAX_FLOWS} flows: datagram from a new client dropped");
                    continue;
                }
                let (tx, rx) = mpsc::channel(FLOW_QUEUE);
                let _ = tx.try_send(first);
                next_id += 1;
                let id = next_id;
                flows.insert(from, (id, tx));
                let (portal, spec, sock) = (portal.clone(), spec.clone(), sock.clone());
                tasks.spawn(async move {
                    match client_flow(&portal, &spec, sock, from, rx).await {
                        Ok(why) => tracing::info!(access = %spec.access, %from, "udp flow ended: {why}"),
                        Err(e) => tracing::warn!(access = %spec.access, %from, service = %spec.service, "udp flow refused: {e:#}"),
                    }
                    (from, id)
                });
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Ok((addr, id)) = done
                    && flows.get(&addr).is_some_and(|(fid, _)| *fid == id)
                {
                    flows.remove(&addr);
                }
            }
        }
    }
}

/// A flow's way over the link: its stream, and on a QUIC link its datagrams.
pub(crate) struct Flow<'a> {
    pub(crate) stream: LinkStream,
    pub(crate) datagrams: Option<FlowDatagrams>,
    pub(crate) stats: &'a crate::observe::Stats,
}

/// Where a flow's datagrams toward the link come from.
enum Input<'a> {
    /// The client portal: the listener's queue for this client.
    Queue(&'a mut mpsc::Receiver<Vec<u8>>),
    /// The serving portal: the socket connected to the target.
    Service {
        sock: &'a UdpSocket,
        target: &'a str,
        max: usize,
    },
}

impl Input<'_> {
    /// The next datagram to carry over the link; `None` when the local end is done.
    async fn recv(&mut self, buf: &mut [u8]) -> Result<Option<Vec<u8>>> {
        match self {
            Input::Queue(rx) => Ok(rx.recv().await),
            Input::Service { sock, target, max } => loop {
                let n = match sock.recv(buf).await {
                    Ok(n) => n,
                    Err(e) if is_transient(&e) => continue,
                    Err(e) => return Err(e).context("receiving from the service"),
                };
                if n > *max {
                    oversize(n, *max, "from the service", target);
                    continue;
                }
                return Ok(Some(buf[..n].to_vec()));
            },
        }
    }
}

/// Where datagrams that came over the link go.
#[derive(Clone, Copy)]
enum Output<'a> {
    Client(&'a UdpSocket, SocketAddr),
    Service(&'a UdpSocket),
}

impl Output<'_> {
    async fn send(self, d: &[u8]) -> Result<()> {
        let r = match self {
            Output::Client(sock, client) => sock.send_to(d, client).await,
            Output::Service(sock) => sock.send(d).await,
        };
        match r {
            Err(e) if !is_transient(&e) => Err(e).context(match self {
                Output::Client(..) => "sending to the client",
                Output::Service(_) => "sending to the service",
            }),
            _ => Ok(()),
        }
    }
}

/// Delivers a datagram that came over the link, unless it is over the size limit.
async fn deliver(
    out: Output<'_>,
    d: &[u8],
    activity: &Activity,
    config: UdpConfig,
    peer: &str,
) -> Result<()> {
    activity.touch();
    if d.len() > config.max_datagram {
        oversize(d.len(), config.max_datagram, "from the link", peer);
        return Ok(());
    }
    out.send(d).await
}

/// Carries a flow's datagrams over the link, both ways, until one way ends, `cancel` fires
/// or nothing crossed for `config.idle`. Each datagram goes as a QUIC datagram when the flow
/// has datagrams and it fits one, else framed on the flow's stream; both are taken in.
async fn carry(
    flow: Flow<'_>,
    mut input: Input<'_>,
    out: Output<'_>,
    config: UdpConfig,
    peer: &str,
    cancel: &CancellationToken,
) -> String {
    let Flow {
        stream,
        datagrams,
        stats,
    } = flow;
    let [as_datagram, as_frame] = stats.udp_carriers();
    let (tx, mut rx) = match datagrams {
        Some(d) => (Some(d.tx), Some(d.rx)),
        None => (None, None),
    };
    let (mut rd, mut wr) = tokio::io::split(stream);
    let activity = Activity::new();
    let to_link = async {
        let mut buf = vec![0u8; RECV_BUF];
        while let Some(d) = input.recv(&mut buf).await? {
            activity.touch();
            if tx.as_ref().is_some_and(|t| t.send(&d)) {
                as_datagram.inc();
            } else {
                write_frame(&mut wr, &d).await?;
                as_frame.inc();
            }
        }
        Ok(())
    };
    let from_stream = async {
        let mut buf = vec![0u8; RECV_BUF];
        while let Some(n) = read_frame(&mut rd, &mut buf).await? {
            deliver(out, &buf[..n], &activity, config, peer).await?;
        }
        Ok(())
    };
    let from_datagrams = async {
        if let Some(rx) = rx.as_mut() {
            while let Some(d) = rx.recv().await {
                deliver(out, &d, &activity, config, peer).await?;
            }
        }
        // No datagrams, or the link is gone (its stream ends too): the stream decides.
        std::future::pending().await
    };
    let from_link = async {
        tokio::select! {
            r = from_stream => r,
            r = from_datagrams => r,
        }
    };
    run_flow(to_link, from_link, &activity, config.idle, cancel).await
}

/// One client flow: a stream to the serving portal, datagrams both ways.
async fn client_flow(
    portal: &Arc<Portal>,
    spec: &ListenerSpec,
    sock: Arc<UdpSocket>,
    client: SocketAddr,
    mut rx: mpsc::Receiver<Vec<u8>>,
) -> Result<String> {
    let (stream, datagrams, _active) = match crate::link::open_channel(portal, spec).await? {
        crate::link::Channel::Stream {
            stream,
            datagrams,
            guard,
            ..
        } => (stream, datagrams, guard),
        crate::link::Channel::Legacy { .. } => {
            anyhow::bail!("UDP services cannot ride a link to a legacy (V0.1) portal")
        }
    };
    tracing::debug!(access = %spec.access, %client, quic_datagrams = datagrams.is_some(), "udp flow open");
    let flow = Flow {
        stream,
        datagrams,
        stats: &portal.stats,
    };
    let peer = client.to_string();
    Ok(carry(
        flow,
        Input::Queue(&mut rx),
        Output::Client(&sock, client),
        portal.config.udp,
        &peer,
        &CancellationToken::new(),
    )
    .await)
}

/// The serving side of a UDP flow: a socket connected to `target`, datagrams both ways,
/// until the stream ends, the flow is idle, or the grant is withdrawn.
pub(crate) async fn serve(
    mut flow: Flow<'_>,
    streams: OpenStreams,
    service: String,
    target: &str,
    config: UdpConfig,
) -> Result<()> {
    let sock = match connect(target).await {
        Ok(s) => s,
        Err(e) => {
            refuse(
                &mut flow.stream,
                OPEN_DIAL_FAILED,
                &format!("cannot reach the service: {e:#}"),
            )
            .await;
            bail!("udp target {target} for `{service}`: {e:#}");
        }
    };
    flow.stream.write_all(&[OPEN_OK]).await?;
    let cancel = CancellationToken::new();
    lock(&streams).push((service.clone(), cancel.clone()));
    let input = Input::Service {
        sock: &sock,
        target,
        max: config.max_datagram,
    };
    let why = carry(flow, input, Output::Service(&sock), config, target, &cancel).await;
    tracing::debug!(%service, %target, "udp flow ended: {why}");
    cancel.cancel();
    lock(&streams).retain(|(_, c)| !c.is_cancelled());
    Ok(())
}

/// A UDP socket connected to `target` (`host:port`), of the target's address family.
async fn connect(target: &str) -> Result<UdpSocket> {
    let addr = tokio::net::lookup_host(target)
        .await
        .with_context(|| format!("resolving {target}"))?
        .next()
        .with_context(|| format!("{target} resolves to no address"))?;
    let local: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(addr).await?;
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_keep_datagram_boundaries_including_empty_and_largest() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let sizes = [0usize, 1, 1400, 65_507, 7];
        for (i, n) in sizes.iter().enumerate() {
            write_frame(&mut a, &vec![i as u8; *n])
                .await
                .expect("write");
        }
        drop(a);
        let mut buf = vec![0u8; RECV_BUF];
        for (i, n) in sizes.iter().enumerate() {
            let got = read_frame(&mut b, &mut buf).await.expect("read");
            assert_eq!(got, Some(*n));
            assert!(buf[..*n].iter().all(|x| *x == i as u8));
        }
        assert_eq!(read_frame(&mut b, &mut buf).await.expect("eof"), None);
    }
}
