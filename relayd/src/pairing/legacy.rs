//! Legacy (V0.1) allocations: one port where two legacy-protocol portals meet.
//!
//! Both portals dial the same port and send the same 64-byte hello (`tokenR[8]` and 56 ASCII
//! `'0'`). Each valid hello is echoed in one write; once both are in, each gets
//! `"Ready !\n"` in one write and nothing else before it; then bytes are forwarded until
//! either side closes, which closes both. A hello with another token, a third hello with the
//! right one (a reused token) or anything that is not a hello gets `"Bad T !\n"` and a close,
//! also while the pair is forwarding.

use netport_proto::control::Transport;
use std::net::SocketAddr;
use std::time::Duration;

use netport_proto::control::Message;
use netport_proto::legacy::{self, RELAY_BAD_TOKEN, RELAY_HELLO_LEN, RELAY_READY, Token8};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{Allocations, Closed, Entry, MAX_BAD_HELLOS};

impl Allocations {
    /// Opens one port for a legacy pair; answers `Allocated` (both ports equal) or
    /// `AllocateFailed`.
    pub async fn allocate_legacy(&self, alloc_id: u64, token: &str, ttl: Duration) -> Message {
        let failed = |reason: &str| Message::AllocateFailed {
            alloc_id,
            reason: reason.to_string(),
        };
        let mut t: Token8 = [0; 8];
        if hex::decode_to_slice(token, &mut t).is_err() {
            return failed("malformed legacy token");
        }
        if self.lock().len() >= self.config.capacity as usize {
            return failed("relay at capacity");
        }
        if self.lock().contains_key(&alloc_id) {
            return failed("allocation id in use");
        }
        let Some(l) = self
            .bind_ports(1, super::bind_tcp)
            .and_then(|mut v| v.pop())
        else {
            return failed("no free port");
        };
        let port = super::port(l.local_addr());
        let this = self.clone();
        let hello_timeout = self.config.hello_timeout;
        let opened = self.open(Transport::Tcp, (port, port));
        let task = tokio::spawn(async move {
            let _opened = opened;
            let outcome = pair_and_forward(alloc_id, l, t, ttl, hello_timeout).await;
            this.finish(outcome);
        });
        self.lock().insert(
            alloc_id,
            Entry {
                ports: (port, port),
                task: task.abort_handle(),
                path: "legacy-userspace",
            },
        );
        self.stats.opened("legacy-userspace");
        tracing::info!(alloc_id, port, "legacy allocation opened");
        Message::Allocated {
            alloc_id,
            port_a: port,
            port_b: port,
        }
    }
}

/// Reads exactly one hello (the legacy portal writes it in one piece).
async fn read_hello(mut s: TcpStream, timeout: Duration) -> (TcpStream, Option<Token8>) {
    let mut hello = [0u8; RELAY_HELLO_LEN];
    let token = match tokio::time::timeout(timeout, s.read_exact(&mut hello)).await {
        Ok(Ok(_)) => legacy::decode_relay_hello(&hello).ok(),
        _ => None,
    };
    (s, token)
}

type Hello = (SocketAddr, TcpStream, Option<Token8>);

async fn refuse(mut s: TcpStream) {
    let _ = s.write_all(RELAY_BAD_TOKEN).await;
    let _ = s.shutdown().await;
}

async fn pair_and_forward(
    alloc_id: u64,
    listener: TcpListener,
    token: Token8,
    ttl: Duration,
    hello_timeout: Duration,
) -> Closed {
    let deadline = Instant::now() + ttl;
    let mut pending: JoinSet<Hello> = JoinSet::new();
    let mut joined: Vec<TcpStream> = Vec::with_capacity(2);
    let mut bad = 0u32;
    let closed = |reason: &str| Closed {
        alloc_id,
        a_to_b: 0,
        b_to_a: 0,
        reason: reason.to_string(),
    };
    while joined.len() < 2 {
        tokio::select! {
            r = listener.accept() => {
                if let Ok((s, peer)) = r {
                    pending.spawn(async move { let (s, t) = read_hello(s, hello_timeout).await; (peer, s, t) });
                }
            }
            Some(Ok((peer, mut s, got))) = pending.join_next(), if !pending.is_empty() => {
                // Same-length comparison of secrets: fold, no early exit.
                let matches = got.is_some_and(|g| g.iter().zip(&token).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0);
                if matches {
                    // The echo, in one write: the legacy portal reads it with one recv(64).
                    if s.write_all(&legacy::encode_relay_hello(&token)).await.is_ok() {
                        tracing::debug!(alloc_id, %peer, side = joined.len() + 1, "legacy side joined");
                        joined.push(s);
                    }
                } else {
                    bad += 1;
                    let why = if got.is_none() { "no valid legacy hello" } else { "wrong legacy token" };
                    tracing::warn!(alloc_id, %peer, bad, "refused a connection: {why}");
                    refuse(s).await;
                    if bad >= MAX_BAD_HELLOS {
                        tracing::warn!(alloc_id, "too many bad hellos: closing the allocation (token guessing?)");
                        return closed("token-guessing");
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                tracing::info!(alloc_id, "legacy allocation expired before both sides joined");
                return closed("expired");
            }
        }
    }
    pending.abort_all();
    let (Some(mut b), Some(mut a)) = (joined.pop(), joined.pop()) else {
        return closed("internal");
    };
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    if a.write_all(RELAY_READY).await.is_err() || b.write_all(RELAY_READY).await.is_err() {
        return closed("peer left before ready");
    }
    tracing::info!(alloc_id, "legacy pair ready; forwarding");
    // The token is spent: whoever else arrives with it (or any other) is told so, until the
    // pair ends and the port closes.
    let refuser = tokio::spawn(async move {
        let mut answering = JoinSet::new();
        while let Ok((s, peer)) = listener.accept().await {
            tracing::warn!(alloc_id, %peer, "refused a connection: legacy token already used");
            answering.spawn(async move {
                let (s, _) = read_hello(s, hello_timeout).await;
                refuse(s).await;
            });
            while answering.try_join_next().is_some() {}
        }
    });
    let (a_to_b, b_to_a, reason) = forward(&mut a, &mut b).await;
    refuser.abort();
    tracing::info!(alloc_id, a_to_b, b_to_a, %reason, "legacy allocation closed");
    Closed {
        alloc_id,
        a_to_b,
        b_to_a,
        reason,
    }
}

/// Copies both ways until either side closes; then both are closed. The directions run
/// independently, so a full buffer one way never stalls the other.
async fn forward(a: &mut TcpStream, b: &mut TcpStream) -> (u64, u64, String) {
    let (mut ar, mut aw) = a.split();
    let (mut br, mut bw) = b.split();
    let mut ab = 0u64;
    let mut ba = 0u64;
    let reason = {
        let one = pump(&mut ar, &mut bw, &mut ab);
        let two = pump(&mut br, &mut aw, &mut ba);
        tokio::select! { r = one => r, r = two => r }
    };
    let _ = aw.shutdown().await;
    let _ = bw.shutdown().await;
    (ab, ba, reason)
}

async fn pump<R, W>(r: &mut R, w: &mut W, count: &mut u64) -> String
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) => return "closed".to_string(),
            Ok(n) => {
                if let Err(e) = w.write_all(&buf[..n]).await {
                    return format!("error: {e}");
                }
                *count += n as u64;
            }
            Err(e) => return format!("error: {e}"),
        }
    }
}
