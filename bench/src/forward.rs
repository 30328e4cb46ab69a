//! The hidden `forward` command: one hop of the chains `netport-bench tunnel` measures
//! Netport's path against, run three times in a row.
//!
//! `--hop plain` (the default) is the `plain chain` path. It is the cheapest program of
//! Netport's shape (client → portal → relay → portal → service: three processes in between)
//! that this benchmark can think of: no encryption, no multiplexing, no event loop. Each
//! accepted connection gets a connection to the next hop and two threads, one per direction,
//! each blocked in `read` until bytes come and then writing them on, so a segment wakes
//! exactly the thread that moves it. What it measures is the shape's floor on this machine:
//! the cost of three more processes on the path, with every wake-up that costs, and nothing
//! else. Netport cannot be faster than it on latency.
//!
//! The other hops put back, at the two portal positions, what Netport adds to that floor,
//! one layer at a time, so that a run can say what each layer costs (`--peers tls-chain,
//! mux-chain`; the middle hop stays plain, as relayd's copy is):
//! - `tls-out` / `tls-in`: a tokio event loop on one thread (a portal's default) and
//!   Netport's own link TLS (mutual TLS 1.3, `Credentials::link_client` / `link_server`),
//!   a TLS connection per client connection, no multiplexer;
//! - `mux-out` / `mux-in`: the same with every connection a yamux stream of one TLS link, as
//!   a portal carries them, without anything else a portal does (policy, tokens, stats).

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;

use anyhow::{Context, Result, anyhow, bail};
use netport_proto::identity::{Identity, Role};
use netport_proto::tls::Credentials;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

/// What one hop of a chain does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Hop {
    /// Plain TCP to plain TCP, a thread per direction.
    Plain,
    /// Accepts plain TCP, dials the next hop with TLS: a connection per connection.
    TlsOut,
    /// Accepts TLS, dials the next hop in plain TCP.
    TlsIn,
    /// Accepts plain TCP; each connection is a yamux stream of one TLS link to the next hop.
    MuxOut,
    /// Accepts TLS links and their yamux streams; each stream dials the next hop.
    MuxIn,
}

/// The credentials of a TLS hop.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct HopTls {
    /// This hop's certificate chain (PEM), for the TLS hops.
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Its key (PEM).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// The CA that issued both ends' certificates (PEM).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// For `tls-out` and `mux-out`: the portal name the next hop's certificate must carry.
    #[arg(long)]
    pub peer: Option<String>,
}

impl HopTls {
    /// The hop's credentials, loaded and checked as a portal loads its own (`[tls]`).
    fn credentials(&self) -> Result<Credentials> {
        let (Some(ca), Some(cert), Some(key)) = (&self.ca, &self.cert, &self.key) else {
            bail!("a TLS hop needs --cert, --key and --ca");
        };
        let tls = netport_common::TlsToml {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        };
        tls.load(Path::new(""), Role::Portal)
    }
}

/// Each thread's stack: the pump needs little, and 1,000 idle connections make 2,000 threads.
const STACK: usize = 64 * 1024;

/// Accepts on `listen` and forwards every connection to `to` as `hop` says, until killed. A
/// connection that fails is logged and dropped; only a listener that cannot bind (or a TLS
/// hop without usable credentials) ends the command.
pub fn forward(listen: SocketAddr, to: SocketAddr, hop: Hop, tls: &HopTls) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    if hop == Hop::Plain {
        serve(&listener, to);
        return Ok(());
    }
    serve_tls(listener, to, hop, tls)
}

/// The TLS and multiplexing hops: a tokio runtime on this one thread, as a portal's.
fn serve_tls(listener: TcpListener, to: SocketAddr, hop: Hop, tls: &HopTls) -> Result<()> {
    let creds = tls.credentials()?;
    let peer = || -> Result<Identity> {
        let name = tls
            .peer
            .as_deref()
            .ok_or_else(|| anyhow!("an outgoing TLS hop needs --peer"))?;
        Ok(Identity::new(Role::Portal, name)?)
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    listener.set_nonblocking(true)?;
    let mux = matches!(hop, Hop::MuxOut | Hop::MuxIn);
    let outgoing = matches!(hop, Hop::TlsOut | Hop::MuxOut);
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        if outgoing {
            let cfg = Arc::new(creds.link_client(peer()?)?);
            serve_out(listener, to, cfg, mux).await
        } else {
            serve_in(listener, to, Arc::new(creds.link_server()?), mux).await
        }
    })
}

/// The next connection `listener` accepts, without Nagle's delay; a failed accept is logged
/// and the next one awaited.
async fn accept(listener: &tokio::net::TcpListener) -> tokio::net::TcpStream {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                let _ = tcp.set_nodelay(true);
                return tcp;
            }
            Err(e) => eprintln!("forward: accept: {e}"),
        }
    }
}

/// Dials `to` in plain TCP, without Nagle's delay.
async fn dial(to: SocketAddr) -> io::Result<tokio::net::TcpStream> {
    let s = tokio::net::TcpStream::connect(to).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// `tls-in` and `mux-in`: TLS connections in, plain connections to `to` out.
async fn serve_in(
    listener: tokio::net::TcpListener,
    to: SocketAddr,
    cfg: Arc<tokio_rustls::rustls::ServerConfig>,
    mux: bool,
) -> Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    loop {
        let tcp = accept(&listener).await;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let r = async {
                let mut tls = acceptor.accept(tcp).await?;
                if !mux {
                    let mut next = dial(to).await?;
                    tokio::io::copy_bidirectional(&mut tls, &mut next).await?;
                    return Ok(());
                }
                let mut conn = yamux::Connection::new(
                    tls.compat(),
                    yamux::Config::default(),
                    yamux::Mode::Server,
                );
                while let Some(s) = std::future::poll_fn(|cx| conn.poll_next_inbound(cx)).await {
                    let s = s.map_err(io::Error::other)?;
                    tokio::spawn(async move {
                        let r = async {
                            let mut next = dial(to).await?;
                            tokio::io::copy_bidirectional(&mut s.compat(), &mut next).await
                        };
                        if let Err(e) = r.await {
                            eprintln!("forward: a stream to {to}: {e}");
                        }
                    });
                }
                Ok::<_, io::Error>(())
            };
            if let Err(e) = r.await {
                eprintln!("forward: a connection to {to}: {e}");
            }
        });
    }
}

/// The name a link's TLS client presents: Netport's, as the certificate is checked by
/// identity, not by name.
fn link_name() -> Result<ServerName<'static>> {
    ServerName::try_from("link.netport.invalid").map_err(|e| anyhow!("{e}"))
}

/// Asks a link's driver for a new stream.
type StreamRequest = oneshot::Sender<yamux::Stream>;

/// `tls-out` and `mux-out`: plain connections in. Without `mux`, a TLS connection to `to`
/// for each; with it, each is a yamux stream of one TLS link to `to`, set up with the first
/// connection and again whenever it has ended.
async fn serve_out(
    listener: tokio::net::TcpListener,
    to: SocketAddr,
    cfg: Arc<tokio_rustls::rustls::ClientConfig>,
    mux: bool,
) -> Result<()> {
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let name = link_name()?;
    let mut link: Option<mpsc::UnboundedSender<StreamRequest>> = None;
    loop {
        let mut tcp = accept(&listener).await;
        if !mux {
            let (connector, name) = (connector.clone(), name.clone());
            tokio::spawn(async move {
                let r = async {
                    let mut tls = connector.connect(name, dial(to).await?).await?;
                    tokio::io::copy_bidirectional(&mut tcp, &mut tls).await
                };
                if let Err(e) = r.await {
                    eprintln!("forward: a connection to {to}: {e}");
                }
            });
            continue;
        }
        let requests = match link.as_ref().filter(|l| !l.is_closed()) {
            Some(l) => l.clone(),
            None => match open_link(&connector, name.clone(), to).await {
                Ok(l) => link.insert(l).clone(),
                Err(e) => {
                    eprintln!("forward: a link to {to}: {e}");
                    continue;
                }
            },
        };
        let (tx, rx) = oneshot::channel();
        if requests.send(tx).is_err() {
            continue;
        }
        tokio::spawn(async move {
            let Ok(s) = rx.await else {
                eprintln!("forward: the link to {to} ended");
                return;
            };
            if let Err(e) = tokio::io::copy_bidirectional(&mut tcp, &mut s.compat()).await {
                eprintln!("forward: a stream to {to}: {e}");
            }
        });
    }
}

/// A TLS link to `to` whose yamux connection a task drives; streams are asked of it.
async fn open_link(
    connector: &tokio_rustls::TlsConnector,
    name: ServerName<'static>,
    to: SocketAddr,
) -> io::Result<mpsc::UnboundedSender<StreamRequest>> {
    let tls = connector.connect(name, dial(to).await?).await?;
    let mut conn =
        yamux::Connection::new(tls.compat(), yamux::Config::default(), yamux::Mode::Client);
    let (tx, mut rx) = mpsc::unbounded_channel::<StreamRequest>();
    tokio::spawn(async move {
        let mut waiting = std::collections::VecDeque::new();
        let end = std::future::poll_fn(|cx| {
            while let std::task::Poll::Ready(Some(r)) = rx.poll_recv(cx) {
                waiting.push_back(r);
            }
            while !waiting.is_empty() {
                match conn.poll_new_outbound(cx) {
                    std::task::Poll::Ready(Ok(s)) => {
                        if let Some(r) = waiting.pop_front() {
                            let _ = r.send(s);
                        }
                    }
                    std::task::Poll::Ready(Err(e)) => return std::task::Poll::Ready(e.to_string()),
                    std::task::Poll::Pending => break,
                }
            }
            // Polling for inbound streams drives the connection; none are expected.
            loop {
                match conn.poll_next_inbound(cx) {
                    std::task::Poll::Ready(Some(Ok(_))) => {}
                    std::task::Poll::Ready(Some(Err(e))) => {
                        return std::task::Poll::Ready(e.to_string());
                    }
                    std::task::Poll::Ready(None) => return std::task::Poll::Ready("closed".into()),
                    std::task::Poll::Pending => return std::task::Poll::Pending,
                }
            }
        })
        .await;
        eprintln!("forward: the link to {to} ended: {end}");
    });
    Ok(tx)
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

    /// Sends 200 KB into the chain at `entry`, half-closes, and checks the whole echo comes
    /// back: the service answers only once it has seen the end of what was sent, so the
    /// half-close must cross every hop, and the reply's end must come back through them.
    fn echo_through(entry: SocketAddr) -> Result<()> {
        let mut c = TcpStream::connect(entry)?;
        c.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        c.write_all(&sent)?;
        c.shutdown(Shutdown::Write)?;
        let mut back = Vec::new();
        c.read_to_end(&mut back)?;
        assert_eq!(back.len(), sent.len());
        assert!(back == sent, "the echo differs from what was sent");
        Ok(())
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
        echo_through(next)
    }

    #[test]
    fn tls_and_yamux_chains_carry_bytes_and_a_half_close_both_ways() -> Result<()> {
        for (out, inn) in [(Hop::TlsOut, Hop::TlsIn), (Hop::MuxOut, Hop::MuxIn)] {
            let dir = tempfile::tempdir()?;
            let certs = crate::tunnel::Certs::new(dir.path())?;
            let mut next = echo_once()?;
            // Built from the service back, as each hop needs the next one's address.
            for hop in [inn, Hop::Plain, out] {
                let l = TcpListener::bind("127.0.0.1:0")?;
                let (addr, to) = (l.local_addr()?, next);
                let tls = match hop {
                    Hop::Plain => HopTls::default(),
                    _ => {
                        let name = if hop == inn { "hop-in" } else { "hop-out" };
                        let (chain, _, key) = certs.issue(Role::Portal, name)?;
                        HopTls {
                            cert: Some(chain),
                            key: Some(key),
                            ca: Some(certs.ca_path.clone()),
                            peer: Some("hop-in".into()),
                        }
                    }
                };
                thread::spawn(move || match hop {
                    Hop::Plain => serve(&l, to),
                    _ => {
                        if let Err(e) = serve_tls(l, to, hop, &tls) {
                            eprintln!("{hop:?}: {e:#}");
                        }
                    }
                });
                next = addr;
            }
            echo_through(next).with_context(|| format!("through {out:?} → plain → {inn:?}"))?;
        }
        Ok(())
    }
}
