//! Allocations: a port pair, two single-use tokens, one connection per side, then forwarding
//! (`tcp.rs` for TCP, `udp.rs` for UDP).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netport_proto::control::{Message, Transport};
use netport_proto::relay::{self, BAD_TOKEN, HELLO_LEN, Token};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

use crate::config::Config;
use crate::firewall::{Firewall, Opened};
use crate::guard::{Guard, MAX_PENDING_HELLOS};
use crate::tcp::TcpPath;
use crate::xdp::FastPath;

mod legacy;

/// An allocation that ended, for the server.
#[derive(Debug)]
pub struct Closed {
    pub alloc_id: u64,
    pub a_to_b: u64,
    pub b_to_a: u64,
    pub reason: String,
}

struct Entry {
    ports: (u16, u16),
    task: AbortHandle,
    /// The forwarding path, for metrics: `tcp-userspace`, `tcp-splice`, `tcp-sockmap`,
    /// `udp-userspace`, `udp-xdp`, `legacy-userspace`.
    path: &'static str,
}

/// Bad hellos a UDP or legacy allocation tolerates before it is torn down (TCP allocations
/// rate-limit guessing addresses instead, see `guard.rs`): tokens are random, so anything
/// beyond a few mistakes is guessing.
pub const MAX_BAD_HELLOS: u32 = 8;

/// The live allocations.
#[derive(Clone)]
pub struct Allocations {
    config: Arc<Config>,
    live: Arc<Mutex<HashMap<u64, Entry>>>,
    closed: mpsc::UnboundedSender<Closed>,
    cursor: Arc<Mutex<u16>>,
    stats: Arc<crate::observe::Stats>,
    /// The XDP fast path for UDP pairs, when it loaded.
    fast: Option<Arc<FastPath>>,
    /// relayd's nftables table, when in use.
    fw: Option<Arc<Firewall>>,
    guard: Arc<Guard>,
    /// How paired TCP allocations are forwarded.
    tcp: TcpPath,
}

impl std::fmt::Debug for Allocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Allocations")
            .field("live", &self.live())
            .finish_non_exhaustive()
    }
}

impl Allocations {
    pub fn new(
        config: Arc<Config>,
        stats: Arc<crate::observe::Stats>,
        fast: Option<Arc<FastPath>>,
        fw: Option<Arc<Firewall>>,
        tcp: TcpPath,
    ) -> (Allocations, mpsc::UnboundedReceiver<Closed>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let first = config.port_first;
        (
            Allocations {
                config,
                live: Arc::default(),
                closed: tx,
                cursor: Arc::new(Mutex::new(first)),
                stats,
                fast,
                fw,
                guard: Arc::default(),
                tcp,
            },
            rx,
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a port pair for the tokens; answers `Allocated` or `AllocateFailed`.
    pub async fn allocate(
        &self,
        alloc_id: u64,
        token_a: &str,
        token_b: &str,
        ttl: Duration,
        transport: Transport,
    ) -> Message {
        let failed = |reason: &str| Message::AllocateFailed {
            alloc_id,
            reason: reason.to_string(),
        };
        let (Some(ta), Some(tb)) = (
            relay::token_from_hex(token_a),
            relay::token_from_hex(token_b),
        ) else {
            return failed("malformed token");
        };
        if self.lock().len() >= self.config.capacity as usize {
            return failed("relay at capacity");
        }
        if self.lock().contains_key(&alloc_id) {
            return failed("allocation id in use");
        }
        let this = self.clone();
        let hello_timeout = self.config.hello_timeout;
        let (ports, task) = match transport {
            Transport::Tcp => {
                let Some((la, lb)) = self.bind_pair(bind_tcp) else {
                    return failed("no free port pair");
                };
                let ports = (port(la.local_addr()), port(lb.local_addr()));
                let opened = self.open(Transport::Tcp, ports);
                let guard = self.guard.clone();
                let path = self.tcp.clone();
                let task = tokio::spawn(async move {
                    let _opened = opened;
                    let outcome = pair_and_splice(
                        alloc_id,
                        la,
                        lb,
                        ta,
                        tb,
                        ttl,
                        hello_timeout,
                        &guard,
                        &path,
                    )
                    .await;
                    this.finish(outcome);
                });
                (ports, task)
            }
            Transport::Udp => {
                let Some((a, b)) = self.bind_pair(bind_udp) else {
                    return failed("no free port pair");
                };
                let ports = (port(a.local_addr()), port(b.local_addr()));
                let pair = crate::udp::Pair {
                    alloc_id,
                    a,
                    b,
                    token_a: ta,
                    token_b: tb,
                    ttl,
                    idle: self.config.udp_idle,
                    fast: self.fast.clone(),
                    opened: self.open(Transport::Udp, ports),
                };
                let task = tokio::spawn(async move {
                    let outcome = crate::udp::run(pair).await;
                    this.finish(outcome);
                });
                (ports, task)
            }
        };
        // XDP takes over a UDP pair once both peers are in; until then (and when the program
        // did not load) it is forwarded in userspace.
        let path = match (transport, self.fast.is_some()) {
            (Transport::Tcp, _) => self.tcp.label(),
            (Transport::Udp, true) => "udp-xdp",
            (Transport::Udp, false) => "udp-userspace",
        };
        self.lock().insert(
            alloc_id,
            Entry {
                ports,
                task: task.abort_handle(),
                path,
            },
        );
        self.stats.opened(path);
        tracing::info!(
            alloc_id,
            port_a = ports.0,
            port_b = ports.1,
            ?transport,
            "allocation opened"
        );
        Message::Allocated {
            alloc_id,
            port_a: ports.0,
            port_b: ports.1,
        }
    }

    fn open(&self, transport: Transport, ports: (u16, u16)) -> Option<Opened> {
        Opened::new(self.fw.as_ref()?, transport, [ports.0, ports.1])
    }

    fn finish(&self, outcome: Closed) {
        self.lock().remove(&outcome.alloc_id);
        self.stats.closed(&outcome);
        let _ = self.closed.send(outcome);
    }

    /// Binds two free ports of the range with `bind`, starting after the last one handed
    /// out.
    fn bind_pair<T>(&self, bind: impl Fn(SocketAddr) -> Option<T>) -> Option<(T, T)> {
        let mut got = self.bind_ports(2, bind)?;
        let b = got.pop()?;
        let a = got.pop()?;
        Some((a, b))
    }

    /// Binds `n` free ports of the range with `bind`, starting after the last one handed out.
    fn bind_ports<T>(&self, n: usize, bind: impl Fn(SocketAddr) -> Option<T>) -> Option<Vec<T>> {
        let (first, last) = (self.config.port_first, self.config.port_last);
        let span = u32::from(last - first) + 1;
        let in_use: Vec<u16> = self
            .lock()
            .values()
            .flat_map(|e| [e.ports.0, e.ports.1])
            .collect();
        let mut cursor = self.cursor.lock().unwrap_or_else(|p| p.into_inner());
        let mut got = Vec::with_capacity(n);
        for step in 0..span {
            let port = first + ((u32::from(*cursor - first) + step) % span) as u16;
            if in_use.contains(&port) {
                continue;
            }
            let Some(l) = bind(SocketAddr::new(self.config.bind, port)) else {
                continue;
            };
            got.push(l);
            if got.len() == n {
                *cursor = first + ((u32::from(port - first) + 1) % span) as u16;
                return Some(got);
            }
        }
        None
    }

    /// Drops an allocation and its connections.
    pub fn release(&self, alloc_id: u64) {
        if let Some(e) = self.lock().remove(&alloc_id) {
            e.task.abort();
            tracing::info!(alloc_id, "allocation released by netportd");
            let _ = self.closed.send(Closed {
                alloc_id,
                a_to_b: 0,
                b_to_a: 0,
                reason: "released".into(),
            });
        }
    }

    /// Live allocations.
    pub fn live(&self) -> usize {
        self.lock().len()
    }

    /// Live allocations by forwarding path.
    pub fn live_by_path(&self) -> HashMap<&'static str, usize> {
        let mut out = HashMap::new();
        for e in self.lock().values() {
            *out.entry(e.path).or_default() += 1;
        }
        out
    }

    /// Allocations held at most.
    pub fn capacity(&self) -> u32 {
        self.config.capacity
    }

    /// Graceful shutdown: waits up to `grace` for the live allocations to end by themselves,
    /// then drops what is left.
    pub async fn drain(&self, grace: Duration) {
        let deadline = Instant::now() + grace;
        let live = self.live();
        if live > 0 {
            tracing::info!(
                live,
                "draining: waiting up to {} s for open allocations",
                grace.as_secs()
            );
        }
        while self.live() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let left = self.live();
        if left > 0 {
            tracing::warn!(left, "grace period over: closing the remaining allocations");
        }
        self.close_all();
    }

    /// Drops everything (shutdown), the nftables table included.
    pub fn close_all(&self) {
        for (_, e) in self.lock().drain() {
            e.task.abort();
        }
        if let Some(fw) = &self.fw {
            fw.remove();
        }
    }
}

fn port(addr: std::io::Result<SocketAddr>) -> u16 {
    addr.map(|a| a.port()).unwrap_or(0)
}

// std binds are synchronous and cannot block; then the socket goes to tokio.
fn bind_tcp(addr: SocketAddr) -> Option<TcpListener> {
    let l = std::net::TcpListener::bind(addr).ok()?;
    l.set_nonblocking(true).ok()?;
    TcpListener::from_std(l).ok()
}

fn bind_udp(addr: SocketAddr) -> Option<UdpSocket> {
    let s = std::net::UdpSocket::bind(addr).ok()?;
    s.set_nonblocking(true).ok()?;
    UdpSocket::from_std(s).ok()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    A,
    B,
}

/// Whether a new connection to an allocation port gets to say its hello: not from an address
/// refused for token guessing, and not beyond [`MAX_PENDING_HELLOS`] waiting at once.
fn admit(alloc_id: u64, peer: SocketAddr, guard: &Guard, pending: usize) -> bool {
    if guard.blocked(peer.ip()) {
        tracing::debug!(alloc_id, %peer, "dropped a connection from an address refused for token guessing");
        return false;
    }
    if pending >= MAX_PENDING_HELLOS {
        tracing::warn!(alloc_id, %peer, pending, "dropped a connection: too many connections waiting to say hello");
        return false;
    }
    true
}

async fn read_hello(mut s: TcpStream, timeout: Duration) -> (TcpStream, Option<Token>) {
    let mut hello = [0u8; HELLO_LEN];
    let token = match tokio::time::timeout(timeout, s.read_exact(&mut hello)).await {
        Ok(Ok(_)) => relay::parse_hello(&hello).ok(),
        _ => None,
    };
    (s, token)
}

#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
async fn pair_and_splice(
    alloc_id: u64,
    la: TcpListener,
    lb: TcpListener,
    ta: Token,
    tb: Token,
    ttl: Duration,
    hello_timeout: Duration,
    guard: &Guard,
    path: &TcpPath,
) -> Closed {
    let deadline = Instant::now() + ttl;
    let mut pending: JoinSet<(Side, SocketAddr, TcpStream, Option<Token>)> = JoinSet::new();
    let (mut a, mut b): (Option<TcpStream>, Option<TcpStream>) = (None, None);
    let closed = |reason: &str| Closed {
        alloc_id,
        a_to_b: 0,
        b_to_a: 0,
        reason: reason.to_string(),
    };
    while a.is_none() || b.is_none() {
        tokio::select! {
            // Both ports keep accepting until the pair is complete, so a reused token gets
            // an answer rather than a connection left hanging in the backlog.
            r = la.accept() => {
                if let Ok((s, peer)) = r && admit(alloc_id, peer, guard, pending.len()) {
                    pending.spawn(async move { let (s, t) = read_hello(s, hello_timeout).await; (Side::A, peer, s, t) });
                }
            }
            r = lb.accept() => {
                if let Ok((s, peer)) = r && admit(alloc_id, peer, guard, pending.len()) {
                    pending.spawn(async move { let (s, t) = read_hello(s, hello_timeout).await; (Side::B, peer, s, t) });
                }
            }
            Some(Ok((side, peer, mut s, token))) = pending.join_next(), if !pending.is_empty() => {
                let (want, slot) = match side {
                    Side::A => (&ta, &mut a),
                    Side::B => (&tb, &mut b),
                };
                match token {
                    Some(t) if relay::tokens_equal(&t, want) && slot.is_none() => {
                        tracing::debug!(alloc_id, ?side, %peer, "side joined");
                        *slot = Some(s);
                    }
                    _ => {
                        let why = if token.is_none() { "no valid hello" } else { "wrong or reused token" };
                        tracing::warn!(alloc_id, ?side, %peer, "refused a connection: {why}");
                        guard.bad_hello(peer.ip());
                        // A peer that does not read must not stall the allocation.
                        let _ = tokio::time::timeout(Duration::from_secs(1), s.write_all(BAD_TOKEN)).await;
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                tracing::info!(alloc_id, "allocation expired before both sides joined");
                return closed("expired");
            }
        }
    }
    // Both in: stop listening (a third connection is refused by the kernel), then forward.
    drop((la, lb));
    pending.abort_all();
    let (Some(a), Some(b)) = (a, b) else {
        return closed("internal");
    };
    tracing::info!(alloc_id, path = path.label(), "paired; forwarding");
    let crate::tcp::Outcome {
        a_to_b,
        b_to_a,
        reason,
    } = crate::tcp::forward(path, alloc_id, a, b).await;
    tracing::info!(alloc_id, a_to_b, b_to_a, %reason, "allocation closed");
    Closed {
        alloc_id,
        a_to_b,
        b_to_a,
        reason,
    }
}
