//! The hidden `forward` command: a plain TCP forwarder, run three times in a row as the
//! `plain chain` path of `netport-bench tunnel`.
//!
//! It is the cheapest program of Netport's shape (client → portal → relay → portal →
//! service: three processes in between) that this benchmark can think of: no encryption, no
//! multiplexing, no event loop. Each accepted connection gets a connection to the next hop
//! and two threads, one per direction, each blocked in `read` until bytes come and then
//! writing them on, so a segment wakes exactly the thread that moves it. What it measures is
//! the shape's floor on this machine: the cost of three more processes on the path, with
//! every wake-up that costs, and nothing else. Netport cannot be faster than it on latency.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;

use anyhow::{Context, Result};

/// Each thread's stack: the pump needs little, and 1,000 idle connections make 2,000 threads.
const STACK: usize = 64 * 1024;

/// Accepts on `listen` and forwards every connection to `to`, until killed. A connection
/// that fails is logged and dropped; only a listener that cannot bind ends the command.
pub fn forward(listen: SocketAddr, to: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    serve(&listener, to);
    Ok(())
}

/// Forwards every connection `listener` accepts to `to`; returns only if accepting ends.
fn serve(listener: &TcpListener, to: SocketAddr) {
    let listen = listener
        .local_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                eprintln!("forward: accept on {listen}: {e}");
                continue;
            }
        };
        let started = thread::Builder::new().stack_size(STACK).spawn(move || {
            if let Err(e) = pair(conn, to) {
                eprintln!("forward: a connection to {to}: {e}");
            }
        });
        if let Err(e) = started {
            eprintln!("forward: no thread for a connection: {e}");
        }
    }
}

/// Connects `client` to `to` and moves bytes both ways until both directions have ended,
/// with relayd's copy loop (`relayd::copy_until_end`), a thread per direction.
fn pair(client: TcpStream, to: SocketAddr) -> io::Result<()> {
    let next = TcpStream::connect(to)?;
    client.set_nodelay(true)?;
    next.set_nodelay(true)?;
    let (client2, next2) = (client.try_clone()?, next.try_clone()?);
    let back = thread::Builder::new()
        .stack_size(STACK)
        .spawn(move || relayd::copy_until_end(&next2, &client2))?;
    let there = relayd::copy_until_end(&client, &next);
    let back = back
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the reverse copy panicked")));
    match there.and(back) {
        // A peer that resets is an end like any other here.
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
        r => r.map(drop),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::Shutdown;

    use super::*;

    /// An echo service that answers one connection, then ends its write side.
    fn echo_once() -> io::Result<SocketAddr> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        thread::spawn(move || -> io::Result<()> {
            let (mut s, _) = l.accept()?;
            let mut got = Vec::new();
            s.read_to_end(&mut got)?;
            s.write_all(&got)?;
            s.shutdown(Shutdown::Write)
        });
        Ok(addr)
    }

    #[test]
    fn three_forwarders_carry_bytes_and_a_half_close_both_ways() -> Result<()> {
        let mut next = echo_once()?;
        for _ in 0..3 {
            let l = TcpListener::bind("127.0.0.1:0")?;
            let (addr, to) = (l.local_addr()?, next);
            thread::spawn(move || serve(&l, to));
            next = addr;
        }
        let mut c = TcpStream::connect(next)?;
        c.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        c.write_all(&sent)?;
        // The service answers only once it has seen the end of what was sent: the half-close
        // must cross all three forwarders, and the reply's end must come back through them.
        c.shutdown(Shutdown::Write)?;
        let mut back = Vec::new();
        c.read_to_end(&mut back)?;
        assert_eq!(back.len(), sent.len());
        assert!(back == sent, "the echo differs from what was sent");
        Ok(())
    }
}
