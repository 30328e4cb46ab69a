//! Helpers for whole-system tests: a throwaway PKI written to disk, free loopback ports,
//! starting the real binaries, and a scripted control peer for testing one daemon at a time.

// Test scaffolding: none of these types is printed.
#![allow(missing_debug_implementations)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use netport_proto::control::{Decoder, Message, encode_message};
use netport_proto::identity::Role;
use netport_proto::tls::Credentials;
use netportd::pki::{Ca, IssueRequest, Issued};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub mod legacy_portal;

/// A CA and the files of the certificates issued from it, in a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
}

/// Paths of one issued certificate.
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub issued: Issued,
}

impl Pki {
    pub fn new() -> Result<Pki> {
        let dir = tempfile::tempdir()?;
        // A year: longer than the 30-day expiry warning window, so certificates under test
        // do not warn because of the CA in their chain.
        let ca = Ca::generate(365)?;
        std::fs::write(dir.path().join("ca.crt"), ca.cert_pem())?;
        Ok(Pki { dir, ca })
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// Issues a certificate (servers get 127.0.0.1 and localhost) and writes it out.
    pub fn issue(&self, role: Role, name: &str) -> Result<CertFiles> {
        let mut req = IssueRequest::new(role, name, 30);
        if role == Role::Server {
            req.dns = vec!["localhost".into()];
            req.ips = vec!["127.0.0.1".parse()?];
        }
        self.write(self.ca.issue(&req)?)
    }

    pub fn write(&self, issued: Issued) -> Result<CertFiles> {
        let stem = issued.file_stem();
        let cert = self.dir.path().join(format!("{stem}.crt"));
        let key = self.dir.path().join(format!("{stem}.key"));
        std::fs::write(&cert, &issued.chain_pem)?;
        std::fs::write(&key, &issued.key_pem)?;
        Ok(CertFiles { cert, key, issued })
    }

    pub fn credentials(&self, files: &CertFiles) -> Result<Credentials> {
        Ok(Credentials::from_pem(
            files.issued.chain_pem.as_bytes(),
            files.issued.key_pem.as_bytes(),
            self.ca.cert_pem().as_bytes(),
        )?)
    }
}

/// `n` contiguous loopback ports that were free a moment ago. They are taken below the
/// kernel's ephemeral range (32768 and up), where outgoing connections of parallel tests
/// and other programs cannot be holding them.
pub fn free_port_range(n: u16) -> Result<(u16, u16)> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id()
        .wrapping_mul(2_654_435_761)
        .wrapping_add(NEXT.fetch_add(7919, Ordering::Relaxed));
    'search: for attempt in 0..500u32 {
        let start = 20_000 + ((seed.wrapping_add(attempt.wrapping_mul(104_729))) % 12_000) as u16;
        let mut held = Vec::new();
        for p in start..start + n {
            match TcpListener::bind(("127.0.0.1", p)) {
                Ok(l) => held.push(l),
                Err(_) => continue 'search,
            }
        }
        return Ok((start, start + n - 1));
    }
    bail!("no free port range of {n} found")
}

pub mod netns;
pub mod unprivileged;

/// A path to one of the workspace's binaries, built by cargo for this test run (an absolute
/// path is taken as it is).
pub fn binary(name: &str) -> PathBuf {
    if name.starts_with('/') {
        return PathBuf::from(name);
    }
    let mut dir = std::env::current_exe().unwrap_or_default();
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// A child process killed when dropped, with its stderr kept in a file for diagnosis.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
    bin: String,
    args: Vec<String>,
}

impl Daemon {
    pub fn start(bin: &str, args: &[&str], log: &Path) -> Result<Daemon> {
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut cmd = match unprivileged::binary(bin)? {
            Some(copy) => {
                // Keys, configuration and state next to the log become the daemon's.
                unprivileged::hand_over(log.parent().unwrap_or(Path::new(".")))?;
                let mut c = Command::new("setpriv");
                c.args(unprivileged::SETPRIV).arg("--").arg(copy);
                c
            }
            None => Command::new(binary(bin)),
        };
        let child = cmd
            .args(args)
            .env("RUST_LOG", "info,relayd=debug,portal=debug,netportd=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        Ok(Daemon {
            child,
            log: log.to_path_buf(),
            bin: bin.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
        })
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM (a graceful shutdown).
    pub fn terminate(&mut self) -> Result<()> {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .context("running kill")?
            .success();
        anyhow::ensure!(ok, "kill -TERM {} failed", self.child.id());
        Ok(())
    }

    /// The exit status, if the process has ended.
    pub fn exited(&mut self) -> Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Starts the same command again, appending to the same log.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let again = Daemon::start(&self.bin, &args, &self.log)?;
        *self = again;
        Ok(())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Daemon {
    /// The process's resident memory, in KiB (from /proc).
    pub fn rss_kib(&self) -> Result<u64> {
        proc_rss_kib(self.child.id())
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// How many file descriptors the process holds (from /proc).
    pub fn fd_count(&self) -> Result<usize> {
        Ok(std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))?.count())
    }

    /// How many of the process's threads have a name that starts with `prefix` (from
    /// /proc/PID/task/*/comm). A thread that ends between the listing and the read of its
    /// name is not counted.
    pub fn threads_named(&self, prefix: &str) -> Result<usize> {
        let mut n = 0;
        for task in std::fs::read_dir(format!("/proc/{}/task", self.child.id()))? {
            let comm = std::fs::read_to_string(task?.path().join("comm")).unwrap_or_default();
            n += usize::from(comm.starts_with(prefix));
        }
        Ok(n)
    }
}

/// Resident memory of process `pid`, in KiB.
pub fn proc_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scripted control peer: accepts one TLS control connection and exchanges messages.
pub struct ControlPeer {
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

/// One control connection, either side: framed messages over a TLS stream.
pub struct Control<S> {
    stream: S,
    decoder: Decoder,
}

/// A control connection accepted by a [`ControlPeer`] (the test plays netportd).
pub type ControlConn = Control<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>;

/// A control connection made by hand (the test plays a portal).
pub type ControlClient = Control<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl ControlPeer {
    pub async fn bind(creds: &Credentials) -> Result<ControlPeer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(creds.control_server()?));
        Ok(ControlPeer { listener, acceptor })
    }

    pub fn addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    pub async fn accept(&self) -> Result<ControlConn> {
        let (tcp, _) = tokio::time::timeout(Duration::from_secs(20), self.listener.accept())
            .await
            .context("no control connection within 20 s")??;
        let stream = self.acceptor.accept(tcp).await?;
        Ok(Control::new(stream))
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Control<S> {
    pub fn new(stream: S) -> Self {
        Control {
            stream,
            decoder: Decoder::new(),
        }
    }

    pub async fn send(&mut self, msg: &Message) -> Result<()> {
        self.stream.write_all(&encode_message(msg)).await?;
        Ok(())
    }

    /// Writes raw bytes, framed or not (hostile-peer tests).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// The next message that is not a heartbeat, within `within`.
    pub async fn recv(&mut self, within: Duration) -> Result<Message> {
        let deadline = tokio::time::Instant::now() + within;
        let mut buf = [0u8; 8192];
        loop {
            while let Some(m) = self.decoder.next_message()? {
                if !matches!(m, Message::Heartbeat { .. }) {
                    return Ok(m);
                }
            }
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut buf))
                .await
                .context("no control message in time")??;
            if n == 0 {
                bail!("control connection closed");
            }
            self.decoder.push(&buf[..n]);
        }
    }
}

/// A whole Netport on loopback: netportd, one relay, portals, with a throwaway PKI.
pub struct System {
    pub pki: Pki,
    pub server_addr: SocketAddr,
    pub daemons: Vec<(String, Daemon)>,
    /// Each relay's allocation range.
    pub relay_ports: Vec<(u16, u16)>,
    /// The `[[relay]]` part of the policy, kept when the test rewrites the rest.
    relay_toml: String,
    layout: Layout,
    revision: std::sync::atomic::AtomicU32,
    /// Each daemon's admin endpoint (`/metrics`, `/readyz`, `/status`), by daemon name.
    pub admin: std::collections::HashMap<String, SocketAddr>,
}

/// How the watched policy directory is kept up to date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A plain directory; updates write a temporary file and rename it over the old one.
    Plain,
    /// `policy -> rev-N`, flipped by renaming a new symlink over the old one (git-sync).
    Symlink,
    /// A Kubernetes ConfigMap mount: `..data -> ..rev-N`, files linked through `..data`.
    ConfigMap,
    /// A git checkout updated with `git pull` from a bare repository.
    Git,
}

fn git(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "test")
        .env("GIT_AUTHOR_EMAIL", "test@example.invalid")
        .env("GIT_COMMITTER_NAME", "test")
        .env("GIT_COMMITTER_EMAIL", "test@example.invalid")
        .output()
        .context("running git")?;
    if !out.status.success() {
        bail!(
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl Layout {
    /// Creates `root/policy` holding `text` as `policy.toml`.
    fn create(self, root: &Path, text: &str) -> Result<()> {
        let policy = root.join("policy");
        match self {
            Layout::Plain => {
                std::fs::create_dir_all(&policy)?;
                std::fs::write(policy.join("policy.toml"), text)?;
            }
            Layout::Symlink => {
                std::fs::create_dir_all(root.join("rev-0"))?;
                std::fs::write(root.join("rev-0/policy.toml"), text)?;
                std::os::unix::fs::symlink("rev-0", &policy)?;
            }
            Layout::ConfigMap => {
                std::fs::create_dir_all(policy.join("..rev-0"))?;
                std::fs::write(policy.join("..rev-0/policy.toml"), text)?;
                std::os::unix::fs::symlink("..rev-0", policy.join("..data"))?;
                std::os::unix::fs::symlink("..data/policy.toml", policy.join("policy.toml"))?;
            }
            Layout::Git => {
                let bare = root.join("policy.git");
                let work = root.join("work");
                std::fs::create_dir_all(&bare)?;
                git(&bare, &["init", "-q", "--bare", "-b", "main"])?;
                git(
                    root,
                    &["clone", "-q", bare.to_str().context("path")?, "work"],
                )?;
                std::fs::write(work.join("policy.toml"), text)?;
                git(&work, &["add", "policy.toml"])?;
                git(&work, &["commit", "-q", "-m", "first policy"])?;
                git(&work, &["push", "-q", "origin", "HEAD:main"])?;
                git(
                    root,
                    &[
                        "clone",
                        "-q",
                        "-b",
                        "main",
                        bare.to_str().context("path")?,
                        "policy",
                    ],
                )?;
            }
        }
        Ok(())
    }
}

impl System {
    /// Writes the policy (with the relay `relay-1` on 127.0.0.1 added) and starts netportd,
    /// relay-1 and a portal for each name in `portals`.
    pub fn start(policy: &str, portals: &[&str]) -> Result<System> {
        Self::start_with_relays(policy, portals, 1)
    }

    /// Like [`System::start`], with relays `relay-1` … `relay-N`.
    pub fn start_with_relays(policy: &str, portals: &[&str], relays: usize) -> Result<System> {
        Self::start_in(Pki::new()?, policy, portals, relays, "127.0.0.1")
    }

    /// Like [`System::start_with_relays`], with a PKI the caller prepared (to put keys it
    /// issued into the policy).
    /// `relay_address` is what the policy tells portals to dial (the relays bind 127.0.0.1).
    pub fn start_in(
        pki: Pki,
        policy: &str,
        portals: &[&str],
        relays: usize,
        relay_address: &str,
    ) -> Result<System> {
        Self::start_layout(pki, policy, portals, relays, relay_address, Layout::Plain)
    }

    /// Like [`System::start_in`], with the policy directory laid out the way a sync tool
    /// keeps it.
    pub fn start_layout(
        pki: Pki,
        policy: &str,
        portals: &[&str],
        relays: usize,
        relay_address: &str,
        layout: Layout,
    ) -> Result<System> {
        Self::start_full(
            pki,
            policy,
            portals,
            relays,
            relay_address,
            layout,
            "quic = \"off\"\n",
            "",
        )
    }

    /// Like [`System::start`] (TCP links), with `portal_extra` (TOML lines) added to every
    /// portal.toml.
    pub fn start_portals_with(
        policy: &str,
        portals: &[&str],
        portal_extra: &str,
    ) -> Result<System> {
        Self::start_portal_lines(policy, portals, &format!("quic = \"off\"\n{portal_extra}"))
    }

    /// One relay on 127.0.0.1, a fresh PKI, and `lines` (TOML) in every portal.toml.
    fn start_portal_lines(policy: &str, portals: &[&str], lines: &str) -> Result<System> {
        Self::start_full(
            Pki::new()?,
            policy,
            portals,
            1,
            "127.0.0.1",
            Layout::Plain,
            lines,
            "",
        )
    }

    /// Like [`System::start_in`] with one relay on 127.0.0.1, with `netportd_extra` (TOML
    /// lines) added to netportd.toml.
    pub fn start_tuned(
        pki: Pki,
        policy: &str,
        portals: &[&str],
        netportd_extra: &str,
    ) -> Result<System> {
        Self::start_full(
            pki,
            policy,
            portals,
            1,
            "127.0.0.1",
            Layout::Plain,
            "quic = \"off\"\n",
            netportd_extra,
        )
    }

    /// Like [`System::start`], with every link over QUIC (`quic = "auto"`) where the other
    /// starters set `quic = "off"` (their tests watch the TCP link: relay splices,
    /// descriptors, connection close).
    pub fn start_quic(policy: &str, portals: &[&str]) -> Result<System> {
        Self::start_quic_mode(policy, portals, Some("auto"))
    }

    /// Like [`System::start`], with the portals' `quic` key set to `mode`, or left out
    /// (the product default) with `None`.
    pub fn start_quic_mode(policy: &str, portals: &[&str], mode: Option<&str>) -> Result<System> {
        // A generous QUIC budget: a busy machine must not turn a QUIC test into a fallback.
        let mode = mode
            .map(|m| format!("quic = \"{m}\"\n"))
            .unwrap_or_default();
        Self::start_portal_lines(policy, portals, &format!("{mode}quic_timeout_ms = 10000\n"))
    }

    /// `quic`: the portals' lines for portal.toml (their QUIC setting and any other);
    /// `netportd_extra`: lines for netportd.toml.
    #[allow(clippy::too_many_arguments)]
    fn start_full(
        pki: Pki,
        policy: &str,
        portals: &[&str],
        relays: usize,
        relay_address: &str,
        layout: Layout,
        quic: &str,
        netportd_extra: &str,
    ) -> Result<System> {
        let dir = pki.dir.path().to_path_buf();
        let policy_dir = dir.join("policy");
        let mut ranges = Vec::new();
        let mut relay_toml = String::new();
        for i in 1..=relays {
            let (first, last) = free_port_range(40)?;
            ranges.push((first, last));
            relay_toml.push_str(&format!(
                "\n[[relay]]\nname = \"relay-{i}\"\naddress = \"{relay_address}\"\nports = \"{first}-{last}\"\n"
            ));
        }
        layout.create(&dir, &format!("{policy}\n{relay_toml}"))?;
        let server = pki.issue(Role::Server, "netportd")?;
        let (port, _) = free_port_range(1)?;
        let server_addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let tls = |f: &CertFiles| {
            format!(
                "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                pki.ca_path().display(),
                f.cert.display(),
                f.key.display()
            )
        };
        let mut daemons = Vec::new();
        let mut admin = std::collections::HashMap::new();
        let mut admin_for = |name: &str| -> Result<String> {
            let (port, _) = free_port_range(1)?;
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
            admin.insert(name.to_string(), addr);
            Ok(format!("admin_listen = \"{addr}\"\n"))
        };
        let cfg = dir.join("netportd.toml");
        std::fs::write(
            &cfg,
            format!(
                "listen = [\"{server_addr}\"]\npolicy = \"{}\"\nheartbeat_secs = 2\naudit_log = \"audit.jsonl\"\n{netportd_extra}{}{}",
                policy_dir.display(),
                admin_for("netportd")?,
                tls(&server)
            ),
        )?;
        daemons.push((
            "netportd".to_string(),
            Daemon::start(
                "netportd",
                &["run", "--config", path_str(&cfg)?],
                &dir.join("netportd.log"),
            )?,
        ));
        for (i, (first, last)) in ranges.iter().enumerate() {
            let name = format!("relay-{}", i + 1);
            let relay = pki.issue(Role::Relay, &name)?;
            let cfg = dir.join(format!("{name}.toml"));
            let log_name = if relays == 1 {
                "relayd".to_string()
            } else {
                name.clone()
            };
            std::fs::write(
                &cfg,
                format!(
                    "servers = [\"{server_addr}\"]\npublic_address = \"127.0.0.1\"\nbind = \"127.0.0.1\"\nports = \"{first}-{last}\"\nshutdown_grace_secs = 20\n{}{}{}",
                    unprivileged::relay_settings(),
                    admin_for(&log_name)?,
                    tls(&relay)
                ),
            )?;
            daemons.push((
                log_name.clone(),
                Daemon::start(
                    "relayd",
                    &["--config", path_str(&cfg)?],
                    &dir.join(format!("{log_name}.log")),
                )?,
            ));
        }
        for name in portals {
            let cert = pki.issue(Role::Portal, name)?;
            let cfg = dir.join(format!("portal-{name}.toml"));
            std::fs::write(
                &cfg,
                // Short idle timeout, so tests can watch idle links close.
                format!(
                    "servers = [\"{server_addr}\"]\nlink_idle_secs = 3\nshutdown_grace_secs = 20\n{quic}{}{}",
                    admin_for(&format!("portal-{name}"))?,
                    tls(&cert)
                ),
            )?;
            daemons.push((
                format!("portal-{name}"),
                Daemon::start(
                    "portal",
                    &["--config", path_str(&cfg)?],
                    &dir.join(format!("portal-{name}.log")),
                )?,
            ));
        }
        Ok(System {
            pki,
            server_addr,
            daemons,
            relay_ports: ranges,
            relay_toml,
            layout,
            revision: std::sync::atomic::AtomicU32::new(0),
            admin,
        })
    }

    /// `GET path` on a daemon's admin endpoint: status code and body.
    pub async fn admin_get(&self, name: &str, path: &str) -> Result<(u16, String)> {
        let addr = self
            .admin
            .get(name)
            .with_context(|| format!("no admin endpoint for {name}"))?;
        netport_common::admin::get(&addr.to_string(), path).await
    }

    /// A daemon's metrics, parsed.
    pub async fn metrics(&self, name: &str) -> Result<Metrics> {
        let (code, body) = self.admin_get(name, "/metrics").await?;
        if code != 200 {
            bail!("{name}/metrics answered {code}");
        }
        Metrics::parse(&body)
    }

    /// netportd's audit log.
    pub fn audit_path(&self) -> PathBuf {
        self.pki.dir.path().join("audit.jsonl")
    }

    /// A daemon by name (`netportd`, `relayd` or `relay-N`, `portal-NAME`).
    /// The process id of a daemon.
    pub fn pid(&self, name: &str) -> Result<u32> {
        self.daemons
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.child.id())
            .with_context(|| format!("no daemon {name}"))
    }

    pub fn daemon(&mut self, name: &str) -> Result<&mut Daemon> {
        self.daemons
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d)
            .with_context(|| format!("no daemon {name}"))
    }

    /// The log of a daemon (`netportd`, `relayd`, `portal-NAME`).
    pub fn log(&self, name: &str) -> String {
        log_of(&self.daemons, name)
    }

    /// Every log, for a failing test's message.
    pub fn logs(&self) -> String {
        logs_of(&self.daemons)
    }
}

/// Something that runs named daemons: [`System`], [`legacy_portal::LegacySystem`].
pub trait Daemons {
    /// The daemons, by name.
    fn daemons(&self) -> &[(String, Daemon)];
}

impl Daemons for System {
    fn daemons(&self) -> &[(String, Daemon)] {
        &self.daemons
    }
}

/// The log of the daemon called `name`.
pub fn log_of(daemons: &[(String, Daemon)], name: &str) -> String {
    daemons
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, d)| d.log_text())
        .unwrap_or_default()
}

/// Every log, for a failing test's message.
pub fn logs_of(daemons: &[(String, Daemon)]) -> String {
    daemons
        .iter()
        .map(|(n, d)| format!("==== {n}\n{}", d.log_text()))
        .collect()
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 temporary path")
}

impl System {
    /// The policy directory netportd watches.
    pub fn policy_dir(&self) -> PathBuf {
        self.pki.dir.path().join("policy")
    }

    /// Replaces the policy (the relays stay) the way this system's [`Layout`] updates:
    /// a rename over the old file, a symlink flip, a ConfigMap `..data` swap, or a git
    /// commit, push and `git pull` in the watched checkout.
    pub fn set_policy(&self, policy: &str) -> Result<()> {
        let text = format!("{policy}\n{}", self.relay_toml);
        let root = self.pki.dir.path();
        let n = self
            .revision
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        match self.layout {
            Layout::Plain => {
                let dir = self.policy_dir();
                let tmp = dir.join(".policy.toml.tmp");
                std::fs::write(&tmp, text)?;
                std::fs::rename(&tmp, dir.join("policy.toml"))?;
            }
            Layout::Symlink => {
                let rev = format!("rev-{n}");
                std::fs::create_dir_all(root.join(&rev))?;
                std::fs::write(root.join(&rev).join("policy.toml"), text)?;
                let tmp = root.join("policy.tmp");
                std::os::unix::fs::symlink(&rev, &tmp)?;
                std::fs::rename(&tmp, root.join("policy"))?;
            }
            Layout::ConfigMap => {
                let dir = self.policy_dir();
                let rev = format!("..rev-{n}");
                std::fs::create_dir_all(dir.join(&rev))?;
                std::fs::write(dir.join(&rev).join("policy.toml"), text)?;
                let tmp = dir.join("..data_tmp");
                std::os::unix::fs::symlink(&rev, &tmp)?;
                std::fs::rename(&tmp, dir.join("..data"))?;
                let _ = std::fs::remove_dir_all(dir.join(format!("..rev-{}", n - 1)));
            }
            Layout::Git => {
                let work = root.join("work");
                std::fs::write(work.join("policy.toml"), text)?;
                git(
                    &work,
                    &["commit", "-q", "-am", &format!("policy revision {n}")],
                )?;
                git(&work, &["push", "-q", "origin", "HEAD:main"])?;
                git(&self.policy_dir(), &["pull", "-q", "--ff-only"])?;
            }
        }
        Ok(())
    }

    /// Waits until netportd has seen every relay and every portal of this system connect.
    pub async fn wait_ready(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log("netportd");
            let relays = self.relay_ports.len();
            let portals: Vec<&str> = self
                .daemons
                .iter()
                .filter_map(|(n, _)| n.strip_prefix("portal-"))
                .collect();
            let ok = log.matches("relay connected").count() >= relays
                && portals
                    .iter()
                    .all(|p| log.contains(&format!("portal connected portal={p} ")));
            if ok {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the system did not come up in 30 s:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Waits until something accepts TCP connections at `addr`.
pub async fn wait_listening(addr: &str, within: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("nothing listens on {addr} after {} s", within.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `needle` appears in the log of the daemon `name`.
pub async fn wait_log<S: Daemons>(
    sys: &S,
    name: &str,
    needle: &str,
    within: Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if log_of(sys.daemons(), name).contains(needle) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "`{needle}` never appeared in the {name} log:\n{}",
        logs_of(sys.daemons())
    )
}

/// An echo service on loopback: every connection gets its bytes back, half-close included.
pub async fn echo_service() -> Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// The numeric `name=value` field of every log line containing `needle`, in order.
pub fn log_fields(log: &str, needle: &str, name: &str) -> Vec<u64> {
    let key = format!(" {name}=");
    log.lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| {
            let at = l.find(&key)? + key.len();
            l[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// The numeric `name=value` field of the first log line containing `needle` (and the field).
pub fn log_field(log: &str, needle: &str, name: &str) -> Option<u64> {
    log_fields(log, needle, name).first().copied()
}

/// The soft limit on open files of this process (the processes it starts inherit it).
pub fn open_file_limit() -> Result<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits")?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no open files line in /proc/self/limits")?;
    let soft = line.split_whitespace().nth(3).context("no soft limit")?;
    Ok(soft.parse().unwrap_or(u64::MAX))
}

/// A UDP echo service on loopback: every datagram goes back to its sender, unchanged.
pub async fn udp_echo() -> Result<SocketAddr> {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let addr = sock.local_addr()?;
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let _ = sock.send_to(&buf[..n], from).await;
        }
    });
    Ok(addr)
}

/// A control connection made by hand with `creds`: TLS, then hello as a portal.
pub async fn portal_session(creds: &Credentials, server: SocketAddr) -> Result<ControlClient> {
    portal_session_as(creds, server, "test").await
}

/// [`portal_session`] with the hello's `software` (say `"test +quic"` to be offered QUIC).
pub async fn portal_session_as(
    creds: &Credentials,
    server: SocketAddr,
    software: &str,
) -> Result<ControlClient> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(creds.control_client()?));
    let tcp = tokio::net::TcpStream::connect(server).await?;
    let name = tokio_rustls::rustls::pki_types::ServerName::from(server.ip());
    let mut c = Control::new(connector.connect(name, tcp).await?);
    c.send(&Message::Hello {
        role: netport_proto::control::PeerRole::Portal,
        versions: vec![netport_proto::control::VERSION],
        software: software.into(),
    })
    .await?;
    Ok(c)
}

/// [`portal_session`], then the first message the server sends, or the error the handshake
/// or read ended with.
pub async fn control_hello(creds: &Credentials, server: SocketAddr) -> Result<Message> {
    portal_session(creds, server)
        .await?
        .recv(Duration::from_secs(10))
        .await
}

/// One sample of a metrics scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// A parsed OpenMetrics / Prometheus text scrape. Strict: a malformed line is an error.
#[derive(Debug, Clone)]
pub struct Metrics(pub Vec<Sample>);

impl Metrics {
    pub fn parse(text: &str) -> Result<Metrics> {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || anyhow::anyhow!("metrics line {}: cannot parse {line:?}", i + 1);
            let (head, value) = line.rsplit_once(' ').ok_or_else(bad)?;
            let value: f64 = value.parse().map_err(|_| bad())?;
            let (name, labels) = match head.split_once('{') {
                None => (head.to_string(), Vec::new()),
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').ok_or_else(bad)?;
                    let mut labels = Vec::new();
                    for pair in body.split("\",").filter(|p| !p.is_empty()) {
                        let (k, v) = pair.split_once("=\"").ok_or_else(bad)?;
                        labels.push((k.to_string(), v.trim_end_matches('"').to_string()));
                    }
                    (name.to_string(), labels)
                }
            };
            if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            {
                return Err(bad());
            }
            out.push(Sample {
                name,
                labels,
                value,
            });
        }
        Ok(Metrics(out))
    }

    /// The value of `name` with every label in `labels` (0 when absent: counters start there).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(a, b)| a == k && b == v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// The samples named `name`.
    pub fn samples(&self, name: &str) -> Vec<&Sample> {
        self.0.iter().filter(|s| s.name == name).collect()
    }
}
