//! UDP allocations: a UDP port pair for a link over QUIC.
//!
//! Each portal sends the relay hello (`NPR1` + its token) as a datagram to its port,
//! repeating it until the relay answers; the relay learns the portal's address from it. Once
//! both sides are known, the relay answers `NPRY` to both (and again to any repeated hello,
//! since UDP may lose the answer) and forwards: a datagram from X to port A leaves port B
//! toward Y, and back. Datagrams from any other address are dropped. When the XDP fast path
//! is loaded, relayd puts the pair in its flow map and the kernel carries the datagrams
//! without waking relayd; what still arrives here (hellos, packets the program passed up) is
//! forwarded by the same loop. The allocation ends on release, or when nothing crossed for
//! `udp_idle_secs`.

use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use netport_proto::relay::{self, BAD_TOKEN, HELLO_LEN, READY, Token};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::firewall::Opened;
use crate::pairing::{Closed, MAX_BAD_HELLOS};
use crate::xdp::{self, FastPath};

/// What one allocation needs to run.
pub struct Pair {
    pub alloc_id: u64,
    pub a: UdpSocket,
    pub b: UdpSocket,
    pub token_a: Token,
    pub token_b: Token,
    pub ttl: Duration,
    pub idle: Duration,
    pub fast: Option<Arc<FastPath>>,
    /// The pair's ports in relayd's nftables table (closed when dropped).
    pub opened: Option<Opened>,
}

/// Counters of one direction.
#[derive(Default, Clone, Copy)]
struct Dir {
    packets: u64,
    bytes: u64,
}

/// The flow map entries of a paired allocation, removed when it ends.
struct Installed {
    fast: Arc<FastPath>,
    keys: [[u8; 12]; 2],
}

impl Installed {
    /// Packets and bytes the kernel carried, per direction (A→B, B→A).
    fn counters(&self) -> [Dir; 2] {
        self.keys.map(|k| {
            let (packets, bytes) = self
                .fast
                .get(&k)
                .map(|v| xdp::counters(&v))
                .unwrap_or((0, 0));
            Dir { packets, bytes }
        })
    }
}

impl Drop for Installed {
    /// The entries leave the map however the allocation ends (release aborts the task).
    fn drop(&mut self) {
        let mut packets = 0;
        for k in &self.keys {
            packets += self
                .fast
                .remove(k)
                .map(|v| xdp::counters(&v).0)
                .unwrap_or(0);
        }
        tracing::debug!(xdp_packets = packets, "udp fast path entries removed");
    }
}

/// The address of this host that `peer` reaches it on: the bound address, or, for a
/// wildcard bind, the source address the kernel's routes pick toward `peer`.
fn local_toward(sock: &UdpSocket, peer: SocketAddr) -> Option<SocketAddr> {
    let bound = sock.local_addr().ok()?;
    if !bound.ip().is_unspecified() {
        return Some(bound);
    }
    let probe = std::net::UdpSocket::bind(SocketAddr::new(bound.ip(), 0)).ok()?;
    probe.connect(peer).ok()?;
    Some(SocketAddr::new(probe.local_addr().ok()?.ip(), bound.port()))
}

fn v4(a: SocketAddr) -> Option<SocketAddrV4> {
    match a {
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(a) => a
            .ip()
            .to_ipv4_mapped()
            .map(|ip| SocketAddrV4::new(ip, a.port())),
    }
}

/// Puts both directions of the pair in the XDP flow map.
fn install(
    fast: &Arc<FastPath>,
    a: &UdpSocket,
    b: &UdpSocket,
    x: SocketAddr,
    y: SocketAddr,
) -> Result<Installed, String> {
    let (Some(ra), Some(rb)) = (local_toward(a, x), local_toward(b, y)) else {
        return Err("cannot tell which local address the peers reach".into());
    };
    let (Some(x), Some(y), Some(ra), Some(rb)) = (v4(x), v4(y), v4(ra), v4(rb)) else {
        return Err("the fast path carries IPv4 only".into());
    };
    if matches!(IpAddr::V4(*ra.ip()), ip if ip.is_loopback()) {
        return Err("peers on loopback never reach an XDP program".into());
    }
    let keys = [xdp::key(x, ra), xdp::key(y, rb)];
    let installed = Installed {
        fast: fast.clone(),
        keys,
    };
    fast.insert(keys[0], xdp::value(rb, y))
        .and_then(|()| fast.insert(keys[1], xdp::value(ra, x)))
        // On failure `installed` is dropped, which removes whatever was inserted.
        .map_err(|e| format!("{e:#}"))?;
    Ok(installed)
}

/// Pairs the two sides, then forwards until release (abort) or idleness.
pub async fn run(p: Pair) -> Closed {
    let Pair {
        alloc_id,
        a,
        b,
        token_a,
        token_b,
        ttl,
        idle,
        fast,
        opened,
    } = p;
    let closed = |reason: &str, ab: Dir, ba: Dir| Closed {
        alloc_id,
        a_to_b: ab.bytes,
        b_to_a: ba.bytes,
        reason: reason.to_string(),
    };
    let deadline = Instant::now() + ttl;
    let (mut x, mut y): (Option<SocketAddr>, Option<SocketAddr>) = (None, None);
    let mut bad = 0u32;
    let mut buf_a = vec![0u8; 65_536];
    let mut buf_b = vec![0u8; 65_536];
    // Pairing: hellos only; anything else before both sides are in is dropped.
    while x.is_none() || y.is_none() {
        let (side, n, from) = tokio::select! {
            r = a.recv_from(&mut buf_a) => match r { Ok((n, f)) => ('A', n, f), Err(_) => continue },
            r = b.recv_from(&mut buf_b) => match r { Ok((n, f)) => ('B', n, f), Err(_) => continue },
            _ = tokio::time::sleep_until(deadline) => {
                tracing::info!(alloc_id, "udp allocation expired before both sides joined");
                return closed("expired", Dir::default(), Dir::default());
            }
        };
        let (sock, buf, want, slot) = match side {
            'A' => (&a, &buf_a, &token_a, &mut x),
            _ => (&b, &buf_b, &token_b, &mut y),
        };
        let token = (n == HELLO_LEN)
            .then(|| relay::parse_hello(&buf[..n]).ok())
            .flatten();
        match token {
            Some(t) if relay::tokens_equal(&t, want) && slot.is_none_or(|s| s == from) => {
                if slot.is_none() {
                    tracing::debug!(alloc_id, side = %side, %from, "udp side joined");
                }
                *slot = Some(from);
            }
            Some(_) => {
                bad += 1;
                tracing::warn!(alloc_id, side = %side, %from, bad, "refused a udp hello: wrong or reused token");
                let _ = sock.send_to(BAD_TOKEN, from).await;
                if bad >= MAX_BAD_HELLOS {
                    tracing::warn!(
                        alloc_id,
                        "too many bad hellos: closing the allocation (token guessing?)"
                    );
                    return closed("token-guessing", Dir::default(), Dir::default());
                }
            }
            None => {}
        }
    }
    let (Some(x), Some(y)) = (x, y) else {
        return closed("internal", Dir::default(), Dir::default());
    };
    if let Some(o) = &opened {
        o.pin_udp([x, y]);
    }
    let hello_a = relay::encode_hello(&token_a);
    let hello_b = relay::encode_hello(&token_b);
    let installed = match &fast {
        Some(f) => install(f, &a, &b, x, y).map_err(Some),
        None => Err(None),
    };
    let installed = match installed {
        Ok(i) => {
            tracing::info!(alloc_id, %x, %y, path = "xdp", "udp pair joined; forwarding");
            Some(i)
        }
        Err(why) => {
            let why = why.unwrap_or_else(|| "no fast path loaded".into());
            tracing::info!(alloc_id, %x, %y, path = "userspace", "udp pair joined; forwarding in userspace: {why}");
            None
        }
    };
    // READY goes out after the map is filled, so the first datagram already takes the path.
    let _ = a.send_to(READY, x).await;
    let _ = b.send_to(READY, y).await;

    let mut user = [Dir::default(); 2];
    let mut stray = 0u64;
    let mut last_total = 0u64;
    let mut last_change = Instant::now();
    let step = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut tick = tokio::time::interval(step);
    let reason = loop {
        tokio::select! {
            r = a.recv_from(&mut buf_a) => {
                let Ok((n, from)) = r else { continue };
                if from != x {
                    stray += 1;
                } else if buf_a[..n] == hello_a {
                    let _ = a.send_to(READY, x).await;
                } else if b.send_to(&buf_a[..n], y).await.is_ok() {
                    user[0].packets += 1;
                    user[0].bytes += n as u64;
                }
            }
            r = b.recv_from(&mut buf_b) => {
                let Ok((n, from)) = r else { continue };
                if from != y {
                    stray += 1;
                } else if buf_b[..n] == hello_b {
                    let _ = b.send_to(READY, y).await;
                } else if a.send_to(&buf_b[..n], x).await.is_ok() {
                    user[1].packets += 1;
                    user[1].bytes += n as u64;
                }
            }
            _ = tick.tick() => {
                let kernel = installed.as_ref().map(Installed::counters).unwrap_or_default();
                let total: u64 = user.iter().chain(kernel.iter()).map(|d| d.packets).sum();
                if total != last_total {
                    last_total = total;
                    last_change = Instant::now();
                } else if last_change.elapsed() >= idle {
                    break format!("idle for {} s", idle.as_secs());
                }
            }
        }
    };
    let kernel = installed
        .as_ref()
        .map(Installed::counters)
        .unwrap_or_default();
    drop(installed);
    let ab = Dir {
        packets: user[0].packets + kernel[0].packets,
        bytes: user[0].bytes + kernel[0].bytes,
    };
    let ba = Dir {
        packets: user[1].packets + kernel[1].packets,
        bytes: user[1].bytes + kernel[1].bytes,
    };
    // The program's own counters over all pairs, for the log and its readers.
    let stats = fast.as_ref().map(|f| f.stats()).unwrap_or_default();
    tracing::info!(
        alloc_id,
        a_to_b = ab.bytes,
        b_to_a = ba.bytes,
        xdp_packets = kernel[0].packets + kernel[1].packets,
        userspace_packets = user[0].packets + user[1].packets,
        stray,
        xdp_forwarded_total = stats.forwarded,
        xdp_passed_no_route_total = stats.pass_fib,
        %reason,
        "udp allocation closed"
    );
    closed(&reason, ab, ba)
}
