//! Network namespaces for tests that need real interfaces (XDP, nftables): created with
//! `ip netns add` under unique names, joined by veth pairs, deleted in `Drop` so a failing
//! test still cleans up. Sockets are made inside a namespace by a thread that enters it
//! (`setns`); a socket keeps its namespace for life, so the test's runtime can use it after.
//!
//! These need root. [`skip_unless_root`] prints a visible marker and lets the test return.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use netport_proto::control::{Message, PeerRole};
use netport_proto::identity::Role;
use netport_proto::relay::{READY, Token, encode_hello};
use tokio::net::UdpSocket;

use crate::{Control, ControlConn, Daemon, Pki};

const T: Duration = Duration::from_secs(20);

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// `true` (after printing why, on stdout and stderr) when the test cannot run here.
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() && Path::new(ip()).exists() {
        return false;
    }
    let msg = format!(
        "SKIPPED {test}: needs root and iproute2 (network namespaces, veth, XDP); CI runs it as root"
    );
    println!("{msg}");
    eprintln!("{msg}");
    true
}

fn ip() -> &'static str {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("/usr/sbin/ip")
}

/// Runs a command; its stdout, or an error with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace, deleted when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A new namespace named `np<pid><n><tag>` (unique across parallel tests), loopback up.
    pub fn new(tag: &str) -> Result<Netns> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "np{}{}{tag}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(ip(), &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.exec("ip", &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `program args...` inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        run(ip(), &all)
    }

    /// Starts one of the workspace's binaries inside the namespace.
    pub fn daemon(&self, bin: &str, args: &[&str], log: &Path) -> Result<Daemon> {
        self.daemon_wrapped(&[], bin, args, log)
    }

    /// Like [`Netns::daemon`], run through `wrapper` (say `setpriv` dropping capabilities).
    pub fn daemon_wrapped(
        &self,
        wrapper: &[&str],
        bin: &str,
        args: &[&str],
        log: &Path,
    ) -> Result<Daemon> {
        let path = crate::binary(bin);
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(wrapper);
        all.push(path.to_str().context("path")?);
        all.extend_from_slice(args);
        Daemon::start(ip(), &all, log)
    }

    /// Runs `f` on a thread inside the namespace (sockets it makes belong to it).
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let file = std::fs::File::open(format!("/run/netns/{}", self.name))
            .with_context(|| format!("opening namespace {}", self.name))?;
        std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("setns into the test namespace")?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
    }

    /// A UDP socket bound to `addr` inside the namespace, ready for tokio.
    pub fn udp(&self, addr: &str) -> Result<tokio::net::UdpSocket> {
        let addr = addr.to_string();
        let sock = self.enter(move || {
            let s = std::net::UdpSocket::bind(&addr)?;
            s.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(s)
        })??;
        Ok(tokio::net::UdpSocket::from_std(sock)?)
    }

    /// A TCP listener bound to `addr` inside the namespace, ready for tokio.
    pub fn tcp_listener(&self, addr: &str) -> Result<tokio::net::TcpListener> {
        let addr = addr.to_string();
        let l = self.enter(move || {
            let l = std::net::TcpListener::bind(&addr)?;
            l.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(l)
        })??;
        Ok(tokio::net::TcpListener::from_std(l)?)
    }

    /// Gives processes started in the namespace (`ip netns exec` bind-mounts
    /// `/etc/netns/NAME/hosts` over `/etc/hosts`) their own hosts file: split DNS, so one
    /// name can mean a different relay address in each peer's namespace. Removed in `Drop`.
    pub fn set_hosts(&self, text: &str) -> Result<()> {
        let dir = Path::new("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("hosts"), text)?;
        Ok(())
    }

    /// A counter of `/proc/net/snmp` in this namespace, like ("Udp", "InCsumErrors").
    pub fn snmp(&self, proto: &str, field: &str) -> Result<u64> {
        let text = self.exec("cat", &["/proc/net/snmp"])?;
        let prefix = format!("{proto}:");
        let mut rows = text.lines().filter(|l| l.starts_with(&prefix));
        let (Some(names), Some(values)) = (rows.next(), rows.next()) else {
            bail!("no {proto} rows in /proc/net/snmp");
        };
        let i = names
            .split_whitespace()
            .position(|n| n == field)
            .with_context(|| format!("no {proto} {field} in /proc/net/snmp"))?;
        values
            .split_whitespace()
            .nth(i)
            .context("short snmp row")?
            .parse()
            .context("snmp value")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(ip(), &["netns", "del", &self.name]);
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&self.name));
    }
}

/// Two peers, X and Y, each in its own namespace, joined by veth to a relay namespace:
/// X 10.0.1.2 ↔ 10.0.1.1 relay 10.0.2.1 ↔ 10.0.2.2 Y. The relay forwards IPv4 (its XDP
/// program's route lookups need it) but an nftables `forward` chain drops everything, so
/// nothing crosses except through the relay's own sockets or its XDP program. The peers'
/// veths have tx checksum offload off (a partial checksum would not survive the rewrite) and
/// GRO on (native XDP redirects into a veth need it).
pub struct Topology {
    pub relay: Netns,
    pub x: Netns,
    pub y: Netns,
}

impl Topology {
    pub const RELAY_X: &'static str = "10.0.1.1";
    pub const X: &'static str = "10.0.1.2";
    pub const RELAY_Y: &'static str = "10.0.2.1";
    pub const Y: &'static str = "10.0.2.2";

    pub fn new() -> Result<Topology> {
        let t = Topology {
            relay: Netns::new("r")?,
            x: Netns::new("x")?,
            y: Netns::new("y")?,
        };
        t.join(&t.x, "x", Self::RELAY_X, Self::X)?;
        t.join(&t.y, "y", Self::RELAY_Y, Self::Y)?;
        t.relay
            .exec("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"])?;
        t.relay.exec(
            "nft",
            &[
                "add table inet nptest; add chain inet nptest forward { type filter hook forward priority 0; policy drop; }",
            ],
        )?;
        Ok(t)
    }

    /// A veth pair between the relay and `peer` (names `r<tag>` and `p<tag>`, local to each
    /// namespace, so parallel tests never clash).
    fn join(&self, peer: &Netns, tag: &str, relay_ip: &str, peer_ip: &str) -> Result<()> {
        let (rn, pn) = (format!("r{tag}"), format!("p{tag}"));
        self.relay.exec(
            "ip",
            &[
                "link", "add", &rn, "type", "veth", "peer", "name", &pn, "netns", &peer.name,
            ],
        )?;
        self.relay.exec(
            "ip",
            &["addr", "add", &format!("{relay_ip}/24"), "dev", &rn],
        )?;
        self.relay.exec("ip", &["link", "set", &rn, "up"])?;
        peer.exec("ip", &["addr", "add", &format!("{peer_ip}/24"), "dev", &pn])?;
        peer.exec("ip", &["link", "set", &pn, "up"])?;
        peer.exec("ip", &["route", "add", "default", "via", relay_ip])?;
        peer.exec("ethtool", &["-K", &pn, "tx", "off", "gro", "on"])?;
        Ok(())
    }
}

/// relayd running in a [`Topology`]'s relay namespace.
pub struct Relay {
    pub pki: Pki,
    pub daemon: Daemon,
    /// The control connection (the caller plays netportd).
    pub conn: ControlConn,
    pub listener: tokio::net::TcpListener,
    pub acceptor: tokio_rustls::TlsAcceptor,
}

/// relayd in the relay namespace of `topo` (ports 40000-40009, `extra` appended to its
/// configuration), registered with the caller playing netportd there.
pub async fn start_relay(topo: &Topology, extra: &str) -> Result<Relay> {
    start_relay_wrapped(topo, extra, &[]).await
}

/// [`start_relay`] through a wrapper command (like `setpriv`).
pub async fn start_relay_wrapped(topo: &Topology, extra: &str, wrapper: &[&str]) -> Result<Relay> {
    let pki = Pki::new()?;
    let server = pki.issue(Role::Server, "netportd")?;
    let relay = pki.issue(Role::Relay, "relay-1")?;
    let listener = topo.relay.tcp_listener("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(
        pki.credentials(&server)?.control_server()?,
    ));
    let config = pki.dir.path().join("relayd.toml");
    std::fs::write(
        &config,
        format!(
            "servers = [\"{addr}\"]\npublic_address = \"{}\"\nbind = \"0.0.0.0\"\n\
             ports = \"40000-40009\"\nudp_idle_secs = 2\n{extra}\n\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            Topology::RELAY_X,
            pki.ca_path().display(),
            relay.cert.display(),
            relay.key.display()
        ),
    )?;
    let log = pki.dir.path().join("relayd.log");
    let daemon = topo.relay.daemon_wrapped(
        wrapper,
        "relayd",
        &["--config", config.to_str().context("path")?],
        &log,
    )?;
    let conn = register(&listener, &acceptor, &daemon).await?;
    Ok(Relay {
        pki,
        daemon,
        conn,
        listener,
        acceptor,
    })
}

/// Accepts relayd's control connection and welcomes it.
pub async fn register(
    listener: &tokio::net::TcpListener,
    acceptor: &tokio_rustls::TlsAcceptor,
    daemon: &Daemon,
) -> Result<ControlConn> {
    let (tcp, _) = tokio::time::timeout(T, listener.accept())
        .await
        .with_context(|| format!("relayd did not connect:\n{}", daemon.log_text()))??;
    let mut conn = Control::new(acceptor.accept(tcp).await?);
    match conn.recv(T).await? {
        Message::Hello {
            role: PeerRole::Relay,
            ..
        } => {}
        other => bail!("expected hello, got {other:?}"),
    }
    match conn.recv(T).await? {
        Message::RelayRegister { .. } => {}
        other => bail!("expected relay_register, got {other:?}"),
    }
    conn.send(&Message::Welcome {
        version: 1,
        identity: "netport://relay/relay-1".into(),
        policy: "test".into(),
        // Long: the caller answers no heartbeats while it measures.
        heartbeat_secs: 60,
    })
    .await?;
    Ok(conn)
}

/// Sends the hello until the relay answers READY.
pub async fn join(sock: &UdpSocket, relay: SocketAddr, token: &Token) -> Result<()> {
    let deadline = tokio::time::Instant::now() + T;
    let mut buf = [0u8; 64];
    while tokio::time::Instant::now() < deadline {
        sock.send_to(&encode_hello(token), relay).await?;
        if let Ok(Ok((n, from))) =
            tokio::time::timeout(Duration::from_millis(200), sock.recv_from(&mut buf)).await
            && from == relay
            && buf[..n] == READY[..]
        {
            return Ok(());
        }
    }
    bail!("the relay never answered READY")
}
