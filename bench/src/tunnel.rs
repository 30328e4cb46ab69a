//! `netport-bench tunnel`: Netport's data path against direct TCP, `ssh -L`, a stunnel chain
//! and rathole 0.5, on 127.0.0.1, in one run.
//!
//! Every path carries connections from this process to a small service in this process:
//!
//! ```text
//! direct    client ─────────────────────────────────────────────────────────▶ service
//! plain     client ─▶ forward ─────────▶ forward ─────────▶ forward ───────────▶ service
//! netport   client ─▶ portal ══ TLS ══▶ relayd ══ TLS ══▶ portal ─────────────▶ service
//! ssh -L    client ─▶ ssh ══ SSH ══▶ sshd ─────────────────────────────────────▶ service
//! stunnel   client ─▶ stunnel ══ mTLS 1.3 ══▶ stunnel relay ══ mTLS 1.3 ══▶ stunnel ─▶ service
//! rathole   client ─▶ rathole server ══ TLS or plain TCP ══▶ rathole client ─▶ service
//! ```
//!
//! The service reads one mode byte per connection: `S` is a sink (it counts the bytes to EOF,
//! then answers the count as 8 bytes, little-endian), anything else is an echo (the mode byte
//! included). Metrics per path, measured in interleaved rounds: bulk throughput, round-trip
//! latency of 64-byte messages on one connection, sequential new connections per second, and
//! the RSS of the path's processes with N idle connections held open through it.
//!
//! The `plain chain` is three processes of this binary (`forward`, see forward.rs) that copy
//! bytes and nothing else: the floor of Netport's shape on the machine, so the report can
//! say how much of Netport's latency is the three processes on its path and how much is
//! Netport.
//!
//! Every loop is bounded in count and time; every child process (and its descendants, for
//! sshd) is killed when its guard drops, on success, error or Ctrl-C.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::ValueEnum as _;
use netport_proto::identity::Role;
use netportd::pki::{Ca, IssueRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::forward::Hop;

/// What the issue's goals compare Netport with (figures of the reference machine, for
/// context when a peer is skipped).
const REF_RATHOLE_PLAIN_CPS: f64 = 7_300.0;

/// The binaries `netport-bench tunnel` needs next to itself.
const NETPORT_BINARIES: [&str; 3] = ["netportd", "relayd", "portal"];
const BUILD_HINT: &str = "cargo build --release -p netportd -p relayd -p portal -p netport-bench";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Interleaved rounds; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// MiB sent through each path per bulk measurement.
    #[arg(long, default_value_t = 512)]
    bulk_mib: u64,
    /// 64-byte round trips per latency measurement (after 100 unmeasured ones).
    #[arg(long, default_value_t = 5_000)]
    round_trips: usize,
    /// At most this many sequential new connections per measurement...
    #[arg(long, default_value_t = 2_000)]
    conns: usize,
    /// ... and for at most this many seconds.
    #[arg(long, default_value_t = 3.0)]
    conn_secs: f64,
    /// Clients opening connections at once for the second new-connections figure (the
    /// path's capacity rather than one connection's set-up time; same limits; 0 skips it).
    #[arg(long, default_value_t = 8)]
    conn_clients: usize,
    /// Idle connections held open for the memory measurement.
    #[arg(long, default_value_t = 1_000)]
    idle: usize,
    /// Paths to measure, comma-separated (default: all but the two diagnostic chains,
    /// `tls-chain` and `mux-chain`, which run only when named; missing peers are skipped).
    #[arg(long, value_delimiter = ',', value_enum)]
    peers: Option<Vec<PeerKind>>,
    /// Where netportd, relayd and portal are (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Keep the temporary directory (configurations, certificates, logs) and print its path.
    #[arg(long)]
    keep: bool,
    /// The relay's `tcp_fast_path` for Netport (relayd.toml): `copy` (the default), `splice`,
    /// or `sockmap` (in the kernel; needs root, and has no backpressure: trusted portals only).
    #[arg(long, default_value = "copy", value_parser = ["copy", "splice", "sockmap"])]
    relay_tcp_path: String,
    /// The portals' `threads` (portal.toml) for Netport: 1 (the portal's default) runs each
    /// portal on a single thread, 0 on a thread per CPU.
    #[arg(long)]
    portal_threads: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PeerKind {
    Direct,
    /// Three plain forwarders in a row: the shape's floor (forward.rs).
    PlainChain,
    /// The plain chain with Netport's link TLS and a tokio event loop at the two portal
    /// positions, a TLS connection per connection (forward.rs; only when named).
    TlsChain,
    /// The TLS chain with yamux streams on one link, as a portal carries them (forward.rs;
    /// only when named).
    MuxChain,
    Netport,
    Ssh,
    Stunnel,
    Rathole,
}

pub fn run(args: Args) -> Result<()> {
    let bin_dir = netport_bin_dir(args.bin_dir.as_deref())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    // The measuring client runs as a task on a worker, as a tokio client does. On
    // `block_on`'s thread every reply would reach it through a worker: one more wake-up per
    // round trip that belongs to no path, which made the number of wake-ups per round trip
    // odd, so that every process changed CPU at each round trip (bench/README.md).
    let mut task = rt.spawn(async move { bench(&args, &bin_dir).await });
    rt.block_on(async {
        tokio::select! {
            r = &mut task => r.map_err(|e| anyhow!("the benchmark task failed: {e}"))?,
            _ = tokio::signal::ctrl_c() => {
                task.abort();
                Err(anyhow!("interrupted; child processes stopped"))
            }
        }
    })
}

/// The directory holding the release netportd, relayd and portal.
pub(crate) fn netport_bin_dir(given: Option<&Path>) -> Result<PathBuf> {
    let dir = match given {
        Some(d) => d.to_path_buf(),
        None => {
            let exe = std::env::current_exe().context("locating this binary")?;
            exe.parent()
                .context("locating this binary's directory")?
                .to_path_buf()
        }
    };
    let missing: Vec<String> = NETPORT_BINARIES
        .iter()
        .map(|b| dir.join(format!("{b}{}", std::env::consts::EXE_SUFFIX)))
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    if !missing.is_empty() {
        bail!(
            "not found: {}\nThe tunnel benchmark runs the release binaries next to it. Build them \
             first:\n  {BUILD_HINT}\n(or pass --bin-dir DIR)",
            missing.join(", ")
        );
    }
    if !dir.ends_with("release") {
        eprintln!(
            "warning: {} is not a release directory; figures of a debug build mean little",
            dir.display()
        );
    }
    Ok(dir)
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A child process, killed (with its descendants) when dropped. Its stdout and stderr go to
/// a log file.
pub(crate) struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub(crate) fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Proc> {
        let err = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let out = err.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails, with the end of its log, if the process has exited.
    pub(crate) fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); end of {}:\n{}",
                self.name,
                self.log.display(),
                netport_common::log_tail(&self.log, 15)
            );
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Descendants first collected (sshd forks per connection), then the process, then
        // them: once the parent is gone they would be reparented and lost.
        let kids = descendants(self.pid());
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !kids.is_empty() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .args(kids.iter().map(u32::to_string))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Parent pid of every process, from /proc/PID/stat.
fn parent_map() -> HashMap<u32, Vec<u32>> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return children;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        if let Some(ppid) = rest
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u32>().ok())
        {
            children.entry(ppid).or_default().push(pid);
        }
    }
    children
}

fn descendants(pid: u32) -> Vec<u32> {
    let children = parent_map();
    let mut out = Vec::new();
    let mut queue = VecDeque::from([pid]);
    let mut seen = HashSet::from([pid]);
    while let Some(p) = queue.pop_front() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or_default() {
            if seen.insert(c) {
                out.push(c);
                queue.push_back(c);
            }
        }
    }
    out
}

/// VmRSS of one process, KiB (0 if it is gone).
fn rss_kib(pid: u32) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU time of one process, µs: user and system time of all its threads, and of the
/// children it has reaped (0 if it is gone). The kernel counts in USER_HZ ticks, 100 a
/// second on Linux, so a figure is good to 10 ms.
fn cpu_us(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(0, |s| stat_cpu_us(&s))
}

/// [`cpu_us`] from the text of `/proc/PID/stat`.
fn stat_cpu_us(stat: &str) -> u64 {
    // Fields after the command name (which may hold spaces and parentheses): state is
    // field 3, utime, stime, cutime and cstime are fields 14 to 17.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    ticks * 10_000
}

/// A program on PATH (or in /usr/sbin and /sbin, where Debian puts sshd).
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The first line of `bin arg`'s output that mentions `needle` (case-insensitive).
fn version_of(bin: &Path, arg: &str, needle: &str) -> String {
    Command::new(bin)
        .arg(arg)
        .stdin(Stdio::null())
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines()
                .find(|l| l.to_lowercase().contains(&needle.to_lowercase()))
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Ports (below 32768: the kernel's ephemeral range starts there, so outgoing connections of
// this benchmark and of other programs cannot be holding them)

static NEXT_PORT: Mutex<u16> = Mutex::new(0);

/// `n` contiguous loopback ports that were free a moment ago; never the same twice in a run.
pub(crate) fn free_ports(n: u16) -> Result<u16> {
    const LOW: u16 = 20_000;
    const HIGH: u16 = 32_000;
    let mut next = NEXT_PORT.lock().unwrap_or_else(|p| p.into_inner());
    if *next == 0 {
        let seed = std::process::id() ^ Instant::now().elapsed().subsec_nanos();
        *next = LOW + (seed.wrapping_mul(2_654_435_761) % 6_000) as u16;
    }
    let mut start = *next;
    for _ in 0..2_000 {
        if start + n > HIGH {
            start = LOW;
        }
        let ok = (start..start + n).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok());
        if ok {
            *next = start + n;
            return Ok(start);
        }
        start += n;
    }
    bail!("no {n} free contiguous loopback ports in {LOW}-{HIGH}")
}

pub(crate) fn local(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

// ---------------------------------------------------------------------------------------------
// The service

/// Starts the echo/sink service on a free port.
pub(crate) async fn start_service() -> Result<SocketAddr> {
    let port = free_ports(1)?;
    let l = tokio::net::TcpListener::bind(local(port)).await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = serve(s).await;
            });
        }
    });
    Ok(addr)
}

pub(crate) async fn serve(mut s: TcpStream) -> std::io::Result<()> {
    let _ = s.set_nodelay(true);
    let mut mode = [0u8; 1];
    if s.read(&mut mode).await? == 0 {
        return Ok(());
    }
    if mode[0] == b'S' {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        s.write_all(&total.to_le_bytes()).await?;
        s.shutdown().await
    } else {
        s.write_all(&mode).await?;
        let (mut r, mut w) = s.into_split();
        tokio::io::copy(&mut r, &mut w).await?;
        w.shutdown().await
    }
}

/// One echoed byte through `addr`, within `within`.
pub(crate) async fn echo_once(addr: SocketAddr, within: Duration) -> Result<TcpStream> {
    tokio::time::timeout(within, async {
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        s.write_all(b"e").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        anyhow::ensure!(b == *b"e", "wrong echo");
        Ok(s)
    })
    .await
    .map_err(|_| anyhow!("no echo within {} ms", within.as_millis()))?
}

/// Waits until a round trip through `addr` works, failing early if a process exits.
pub(crate) async fn wait_echo(
    addr: SocketAddr,
    within: Duration,
    procs: &mut [Proc],
) -> Result<()> {
    let deadline = Instant::now() + within;
    let mut last = anyhow!("never tried");
    while Instant::now() < deadline {
        for p in procs.iter_mut() {
            p.check_alive()?;
        }
        match echo_once(addr, Duration::from_secs(3)).await {
            Ok(_) => return Ok(()),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let logs: String = procs
        .iter()
        .map(|p| {
            format!(
                "---- {} ({})\n{}\n",
                p.name,
                p.log.display(),
                netport_common::log_tail(&p.log, 10)
            )
        })
        .collect();
    bail!(
        "no round trip through {addr} within {} s (last error: {last:#})\n{logs}",
        within.as_secs()
    )
}

async fn wait_listening(addr: SocketAddr, within: Duration, proc: &mut Proc) -> Result<()> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        proc.check_alive()?;
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "{} does not listen on {addr} after {} s; end of its log:\n{}",
        proc.name,
        within.as_secs(),
        netport_common::log_tail(&proc.log, 10)
    )
}

// ---------------------------------------------------------------------------------------------
// Paths

/// A path under test: where the client connects, and the processes in between.
pub(crate) struct Peer {
    name: &'static str,
    pub(crate) entry: SocketAddr,
    pub(crate) procs: Vec<Proc>,
    /// What the memory figure covers.
    mem_note: String,
}

impl Peer {
    /// Every pid of the path: its processes and their descendants.
    fn pids(&self) -> Vec<(String, Vec<u32>)> {
        self.procs
            .iter()
            .map(|p| {
                let mut pids = vec![p.pid()];
                pids.extend(descendants(p.pid()));
                (p.name.clone(), pids)
            })
            .collect()
    }

    /// CPU time (µs) of each of the path's processes, descendants included.
    fn cpu(&self) -> Vec<(String, u64)> {
        self.pids()
            .into_iter()
            .map(|(n, pids)| (n, pids.into_iter().map(cpu_us).sum()))
            .collect()
    }

    pub(crate) fn rss(&self) -> (u64, Vec<(String, u64)>) {
        let per: Vec<(String, u64)> = self
            .pids()
            .into_iter()
            .map(|(n, pids)| (n, pids.into_iter().map(rss_kib).sum()))
            .collect();
        (per.iter().map(|(_, k)| k).sum(), per)
    }
}

/// A path that is measured, or why not.
enum Setup {
    Ready(Peer),
    Skipped { name: &'static str, reason: String },
}

const NETPORT: &str = "netport";
const DIRECT: &str = "direct";
const PLAIN_CHAIN: &str = "plain chain";
const TLS_CHAIN: &str = "TLS chain";
const MUX_CHAIN: &str = "yamux chain";
const SSH: &str = "ssh -L";
const STUNNEL: &str = "stunnel chain";
const RATHOLE_TLS: &str = "rathole (TLS)";
const RATHOLE_TCP: &str = "rathole (no encryption)";

/// A throwaway CA, with certificates written into `dir`.
pub(crate) struct Certs {
    ca: Ca,
    pub(crate) ca_path: PathBuf,
    dir: PathBuf,
}

impl Certs {
    pub(crate) fn new(dir: &Path) -> Result<Certs> {
        std::fs::create_dir_all(dir)?;
        let ca = Ca::generate(2)?;
        let ca_path = dir.join("ca.crt");
        std::fs::write(&ca_path, ca.cert_pem())?;
        Ok(Certs {
            ca,
            ca_path,
            dir: dir.to_path_buf(),
        })
    }

    /// Issues `name`; servers get 127.0.0.1 and localhost. Returns (chain, leaf, key) paths.
    pub(crate) fn issue(&self, role: Role, name: &str) -> Result<(PathBuf, PathBuf, PathBuf)> {
        let mut req = IssueRequest::new(role, name, 2);
        if role == Role::Server {
            req.ips = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
            req.dns = vec!["localhost".into()];
        }
        let issued = self.ca.issue(&req)?;
        let chain = self.dir.join(format!("{name}.crt"));
        let leaf = self.dir.join(format!("{name}.leaf.crt"));
        let key = self.dir.join(format!("{name}.key"));
        std::fs::write(&chain, &issued.chain_pem)?;
        std::fs::write(&leaf, &issued.cert_pem)?;
        std::fs::write(&key, &issued.key_pem)?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
        Ok((chain, leaf, key))
    }
}

pub(crate) fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 temporary path")
}

/// netportd + relayd + two portals, as in `System::start` of the end-to-end tests.
pub(crate) async fn start_netport(
    root: &Path,
    bins: &Path,
    service: SocketAddr,
    portal_extra: &str,
    relay_tcp_path: &str,
) -> Result<Peer> {
    let dir = root.join("netport");
    let certs = Certs::new(&dir)?;
    let relay_first = free_ports(40)?;
    let relay_last = relay_first + 39;
    let control = local(free_ports(1)?);
    let listen = local(free_ports(1)?);
    let policy_dir = dir.join("policy");
    std::fs::create_dir_all(&policy_dir)?;
    std::fs::write(
        policy_dir.join("bench.toml"),
        format!(
            r#"[[portal]]
name = "bench-client"

[[portal]]
name = "bench-server"

[[relay]]
name = "relay-1"
address = "127.0.0.1"
ports = "{relay_first}-{relay_last}"

[[service]]
name = "bench"
portal = "bench-server"
target = "{service}"

[[access]]
name = "bench"
from = ["bench-client"]
listen = "{listen}"
service = "bench"
"#
        ),
    )?;
    let tls = |role: Role, name: &str| -> Result<String> {
        let (chain, _, key) = certs.issue(role, name)?;
        Ok(format!(
            "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            certs.ca_path.display(),
            chain.display(),
            key.display()
        ))
    };
    let mut procs = Vec::new();
    let mut daemon = |name: &str, bin: &str, args: &[&str], config: String| -> Result<()> {
        let cfg = dir.join(format!("{name}.toml"));
        std::fs::write(&cfg, config)?;
        let mut cmd = Command::new(bins.join(bin));
        cmd.args(args)
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "info");
        procs.push(Proc::spawn(name, cmd, &dir.join(format!("{name}.log")))?);
        Ok(())
    };
    daemon(
        "netportd",
        "netportd",
        &["run"],
        format!(
            "listen = [\"{control}\"]\npolicy = \"{}\"\n{}",
            path_str(&policy_dir)?,
            tls(Role::Server, "netportd")?
        ),
    )?;
    daemon(
        "relayd",
        "relayd",
        &[],
        format!(
            "servers = [\"{control}\"]\npublic_address = \"127.0.0.1\"\nbind = \"127.0.0.1\"\n\
             ports = \"{relay_first}-{relay_last}\"\ntcp_fast_path = \"{relay_tcp_path}\"\n{}",
            tls(Role::Relay, "relay-1")?
        ),
    )?;
    for name in ["bench-client", "bench-server"] {
        daemon(
            &format!("portal-{name}"),
            "portal",
            &[],
            // A link idle timeout longer than the run: the benchmark measures streams on a
            // link, the way a busy portal sees them.
            format!(
                "servers = [\"{control}\"]\nlink_idle_secs = 3600\n{portal_extra}\n{}",
                tls(Role::Portal, name)?
            ),
        )?;
    }
    wait_echo(listen, Duration::from_secs(30), &mut procs).await?;
    Ok(Peer {
        name: NETPORT,
        entry: listen,
        procs,
        mem_note: format!("netportd + relayd ({relay_tcp_path}) + 2 portals"),
    })
}

/// The chains of `forward` processes, Netport's shape with less in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chain {
    /// client → forward → forward → forward → service, with nothing but copies in it.
    Plain,
    /// Netport's link TLS, a tokio event loop at the two portal positions.
    Tls,
    /// The same with yamux streams on one link.
    Mux,
}

impl Chain {
    fn name(self) -> &'static str {
        match self {
            Chain::Plain => PLAIN_CHAIN,
            Chain::Tls => TLS_CHAIN,
            Chain::Mux => MUX_CHAIN,
        }
    }

    /// Its directory, and the prefix of its processes' names.
    fn dir(self) -> &'static str {
        match self {
            Chain::Plain => "plain-chain",
            Chain::Tls => "tls-chain",
            Chain::Mux => "mux-chain",
        }
    }

    /// The `--hop` of the first and the last process (the portal positions).
    fn hops(self) -> Option<(Hop, Hop)> {
        match self {
            Chain::Plain => None,
            Chain::Tls => Some((Hop::TlsOut, Hop::TlsIn)),
            Chain::Mux => Some((Hop::MuxOut, Hop::MuxIn)),
        }
    }

    fn note(self) -> &'static str {
        match self {
            Chain::Plain => "3 forwarding processes, plain TCP, a thread per direction",
            Chain::Tls => {
                "3 forwarding processes: tokio and Netport's link TLS at the portal \
                 positions, a TLS connection per connection; a plain forwarder in the middle"
            }
            Chain::Mux => {
                "3 forwarding processes: tokio and Netport's link TLS at the portal \
                 positions, yamux streams on one TLS link; a plain forwarder in the middle"
            }
        }
    }
}

/// Three `forward` processes of this binary in a row. In the plain chain each copies and
/// nothing else; in the others the first and last (the portal positions) add a layer of
/// Netport's, and the middle one stays plain, where relayd copies: what each layer adds.
async fn start_chain(root: &Path, service: SocketAddr, chain: Chain) -> Result<Peer> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let dir = root.join(chain.dir());
    let certs = match chain.hops() {
        Some(_) => Some(Certs::new(&dir)?),
        None => {
            std::fs::create_dir_all(&dir)?;
            None
        }
    };
    let base = free_ports(3)?;
    let entries = [local(base), local(base + 1), local(base + 2)];
    let mut procs = Vec::new();
    for (i, listen) in entries.iter().enumerate() {
        let to = entries.get(i + 1).copied().unwrap_or(service);
        let name = match chain {
            Chain::Plain => format!("forward-{}", i + 1),
            _ => format!("{}-{}", chain.dir(), i + 1),
        };
        let mut cmd = Command::new(&exe);
        cmd.arg("forward")
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--to")
            .arg(to.to_string());
        let hop = match (i, chain.hops()) {
            (0, Some((out, _))) => Some((out, "hop-out")),
            (2, Some((_, inn))) => Some((inn, "hop-in")),
            _ => None,
        };
        if let (Some((hop, cert_name)), Some(certs)) = (hop, &certs) {
            let (cert, _, key) = certs.issue(Role::Portal, cert_name)?;
            let hop = hop
                .to_possible_value()
                .context("internal: a hop without a name")?;
            cmd.arg("--hop")
                .arg(hop.get_name())
                .arg("--cert")
                .arg(&cert)
                .arg("--key")
                .arg(&key)
                .arg("--ca")
                .arg(&certs.ca_path)
                .arg("--peer")
                .arg("hop-in");
        }
        procs.push(Proc::spawn(&name, cmd, &dir.join(format!("{name}.log")))?);
    }
    wait_echo(entries[0], Duration::from_secs(10), &mut procs).await?;
    Ok(Peer {
        name: chain.name(),
        entry: entries[0],
        procs,
        mem_note: chain.note().into(),
    })
}

/// A private sshd on a high port and `ssh -N -L` to it.
async fn start_ssh(root: &Path, service: SocketAddr) -> Result<Setup> {
    let skip = |reason: String| Ok(Setup::Skipped { name: SSH, reason });
    let Some(sshd) = which("sshd") else {
        return skip("sshd not found: install it with `apt-get install -y openssh-server`".into());
    };
    let (Some(ssh), Some(keygen)) = (which("ssh"), which("ssh-keygen")) else {
        return skip(
            "ssh or ssh-keygen not found: install them with `apt-get install -y openssh-client`"
                .into(),
        );
    };
    let dir = root.join("ssh");
    std::fs::create_dir_all(&dir)?;
    for key in ["host_key", "client_key"] {
        let out = Command::new(&keygen)
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(dir.join(key))
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "ssh-keygen failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))?;
    // sshd insists on its privilege separation directory (systemd creates it on Debian).
    let privsep = Path::new("/run/sshd");
    if !privsep.exists() {
        std::fs::create_dir_all(privsep)
            .context("creating /run/sshd, sshd's privilege separation directory")?;
        std::fs::set_permissions(privsep, std::fs::Permissions::from_mode(0o755))?;
    }
    let port = free_ports(1)?;
    let cfg = dir.join("sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile none\nUsePAM no\n\
             PermitRootLogin prohibit-password\nPubkeyAuthentication yes\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             AuthorizedKeysFile {}\nStrictModes no\nAllowTcpForwarding yes\n\
             X11Forwarding no\nPrintMotd no\nUseDNS no\n",
            dir.join("host_key").display(),
            dir.join("authorized_keys").display()
        ),
    )?;
    let mut cmd = Command::new(&sshd);
    cmd.args(["-D", "-e", "-f"]).arg(&cfg);
    let mut sshd_proc = Proc::spawn("sshd", cmd, &dir.join("sshd.log"))?;
    wait_listening(local(port), Duration::from_secs(10), &mut sshd_proc).await?;
    let user = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "root".into());
    let listen = local(free_ports(1)?);
    let mut cmd = Command::new(&ssh);
    cmd.args(["-F", "/dev/null", "-N", "-L"])
        .arg(format!("{listen}:{service}"))
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "LogLevel=ERROR",
            "-i",
        ])
        .arg(dir.join("client_key"))
        .arg("-p")
        .arg(port.to_string())
        .arg(format!("{user}@127.0.0.1"));
    let ssh_proc = Proc::spawn("ssh", cmd, &dir.join("ssh.log"))?;
    let mut procs = vec![sshd_proc, ssh_proc];
    wait_echo(listen, Duration::from_secs(20), &mut procs).await?;
    Ok(Setup::Ready(Peer {
        name: SSH,
        entry: listen,
        procs,
        mem_note: "ssh + sshd (listener and per-connection processes)".into(),
    }))
}

/// client → stunnel (client) → stunnel relay (server, then client) → stunnel (server) →
/// service, with mutual TLS 1.3 on both hops.
async fn start_stunnel(root: &Path, service: SocketAddr) -> Result<Setup> {
    let Some(stunnel) = which("stunnel4").or_else(|| which("stunnel")) else {
        return Ok(Setup::Skipped {
            name: STUNNEL,
            reason: "stunnel not found: install it with `apt-get install -y stunnel4`".into(),
        });
    };
    let dir = root.join("stunnel");
    let certs = Certs::new(&dir)?;
    let ca = certs.ca_path.display().to_string();
    let (client_crt, _, client_key) = certs.issue(Role::Portal, "stunnel-client")?;
    // The relay's certificate serves both hops (it has the serverAuth and clientAuth EKUs).
    let (relay_crt, _, relay_key) = certs.issue(Role::Server, "stunnel-relay")?;
    let (server_crt, _, server_key) = certs.issue(Role::Server, "stunnel-server")?;
    let entry = local(free_ports(1)?);
    let relay_in = local(free_ports(1)?);
    let relay_mid = local(free_ports(1)?);
    let server_in = local(free_ports(1)?);
    // Foreground, logs to stderr (default level), no pid file, Nagle off on both sides.
    let global = "foreground = yes\npid =\nsyslog = no\n";
    let common = "socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n\
                  sslVersionMin = TLSv1.3\nsslVersionMax = TLSv1.3\nverifyChain = yes\n";
    let tls_client = |crt: &Path, key: &Path| {
        format!(
            "client = yes\ncert = {}\nkey = {}\nCAfile = {ca}\ncheckIP = 127.0.0.1\n{common}",
            crt.display(),
            key.display()
        )
    };
    let tls_server = |crt: &Path, key: &Path| {
        format!(
            "cert = {}\nkey = {}\nCAfile = {ca}\n{common}",
            crt.display(),
            key.display()
        )
    };
    let configs = [
        (
            "stunnel-client",
            format!(
                "{global}[client]\naccept = {entry}\nconnect = {relay_in}\n{}",
                tls_client(&client_crt, &client_key)
            ),
        ),
        (
            "stunnel-relay",
            format!(
                "{global}[relay-in]\naccept = {relay_in}\nconnect = {relay_mid}\n{}\n\
                 [relay-out]\naccept = {relay_mid}\nconnect = {server_in}\n{}",
                tls_server(&relay_crt, &relay_key),
                tls_client(&relay_crt, &relay_key)
            ),
        ),
        (
            "stunnel-server",
            format!(
                "{global}[server]\naccept = {server_in}\nconnect = {service}\n{}",
                tls_server(&server_crt, &server_key)
            ),
        ),
    ];
    let mut procs = Vec::new();
    for (name, config) in configs {
        let cfg = dir.join(format!("{name}.conf"));
        std::fs::write(&cfg, config)?;
        let mut cmd = Command::new(&stunnel);
        cmd.arg(&cfg);
        procs.push(Proc::spawn(name, cmd, &dir.join(format!("{name}.log")))?);
    }
    wait_echo(entry, Duration::from_secs(20), &mut procs).await?;
    Ok(Setup::Ready(Peer {
        name: STUNNEL,
        entry,
        procs,
        mem_note: "3 stunnel processes".into(),
    }))
}

/// rathole 0.5: server (where clients connect) and client (next to the service), over TLS or
/// plain TCP.
async fn start_rathole(root: &Path, service: SocketAddr, tls: bool) -> Result<Setup> {
    let name = if tls { RATHOLE_TLS } else { RATHOLE_TCP };
    let skip = |reason: String| Ok(Setup::Skipped { name, reason });
    let Some(rathole) = which("rathole") else {
        return skip(
            "rathole not on PATH: install it with `cargo install rathole --version 0.5.0` \
             (several minutes; without --locked)"
                .into(),
        );
    };
    let dir = root.join(if tls { "rathole-tls" } else { "rathole-tcp" });
    std::fs::create_dir_all(&dir)?;
    let control = local(free_ports(1)?);
    let entry = local(free_ports(1)?);
    let (server_transport, client_transport) = if tls {
        let Some(openssl) = which("openssl") else {
            return skip(
                "openssl not found (rathole's TLS needs a PKCS#12 file): \
                 `apt-get install -y openssl`"
                    .into(),
            );
        };
        let certs = Certs::new(&dir)?;
        let (_, leaf, key) = certs.issue(Role::Server, "rathole-server")?;
        let pfx = dir.join("identity.pfx");
        let out = Command::new(openssl)
            .args([
                "pkcs12",
                "-export",
                "-passout",
                "pass:netport-bench",
                "-out",
            ])
            .arg(&pfx)
            .arg("-inkey")
            .arg(&key)
            .arg("-in")
            .arg(&leaf)
            .arg("-certfile")
            .arg(&certs.ca_path)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return skip(format!(
                "openssl pkcs12 -export failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        (
            format!(
                "[server.transport]\ntype = \"tls\"\n[server.transport.tls]\npkcs12 = \"{}\"\n\
                 pkcs12_password = \"netport-bench\"\n",
                pfx.display()
            ),
            format!(
                "[client.transport]\ntype = \"tls\"\n[client.transport.tls]\n\
                 trusted_root = \"{}\"\nhostname = \"localhost\"\n",
                certs.ca_path.display()
            ),
        )
    } else {
        (
            "[server.transport]\ntype = \"tcp\"\n".to_string(),
            "[client.transport]\ntype = \"tcp\"\n".to_string(),
        )
    };
    let server_cfg = dir.join("server.toml");
    std::fs::write(
        &server_cfg,
        format!(
            "[server]\nbind_addr = \"{control}\"\n{server_transport}\n[server.services.bench]\n\
             token = \"netport-bench\"\nbind_addr = \"{entry}\"\n"
        ),
    )?;
    let client_cfg = dir.join("client.toml");
    std::fs::write(
        &client_cfg,
        format!(
            "[client]\nremote_addr = \"{control}\"\n{client_transport}\n[client.services.bench]\n\
             token = \"netport-bench\"\nlocal_addr = \"{service}\"\n"
        ),
    )?;
    let mut procs = Vec::new();
    for (role, cfg) in [("server", &server_cfg), ("client", &client_cfg)] {
        let mut cmd = Command::new(&rathole);
        cmd.arg(format!("--{role}"))
            .arg(cfg)
            .env("RUST_LOG", "info");
        procs.push(Proc::spawn(
            &format!("rathole-{role}"),
            cmd,
            &dir.join(format!("{role}.log")),
        )?);
    }
    wait_echo(entry, Duration::from_secs(30), &mut procs).await?;
    Ok(Setup::Ready(Peer {
        name,
        entry,
        procs,
        mem_note: "rathole server + client".into(),
    }))
}

// ---------------------------------------------------------------------------------------------
// Measurements

/// Gbit/s of `bytes` sent to the sink, from the first byte to the sink's count.
async fn bulk(addr: SocketAddr, bytes: u64) -> Result<f64> {
    let run = async {
        let s = TcpStream::connect(addr).await?;
        let (mut r, mut w) = s.into_split();
        let started = Instant::now();
        let write = async {
            w.write_all(b"S").await?;
            let buf = vec![0x5au8; 256 * 1024];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                w.write_all(&buf[..n]).await?;
                left -= n as u64;
            }
            w.shutdown().await
        };
        let read = async {
            let mut count = [0u8; 8];
            r.read_exact(&mut count).await?;
            Ok::<_, std::io::Error>(u64::from_le_bytes(count))
        };
        let ((), got) = tokio::try_join!(write, read)?;
        let secs = started.elapsed().as_secs_f64();
        anyhow::ensure!(got == bytes, "the sink got {got} bytes of {bytes}");
        Ok::<_, anyhow::Error>(bytes as f64 * 8.0 / secs / 1e9)
    };
    tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .map_err(|_| anyhow!("bulk transfer did not finish within 180 s"))?
}

/// Round trips made before a latency measurement starts counting.
const WARM_UP_ROUND_TRIPS: usize = 100;

/// p50 and p99 (µs) of `n` 64-byte round trips on one connection, after
/// [`WARM_UP_ROUND_TRIPS`] unmeasured ones.
async fn latency(addr: SocketAddr, n: usize) -> Result<(f64, f64)> {
    let run = async {
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let msg = [b'e'; 64];
        let mut back = [0u8; 64];
        let mut samples = Vec::with_capacity(n);
        for i in 0..n + WARM_UP_ROUND_TRIPS {
            let t = Instant::now();
            s.write_all(&msg).await?;
            s.read_exact(&mut back).await?;
            if i >= WARM_UP_ROUND_TRIPS {
                samples.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        anyhow::ensure!(back == msg, "wrong echo");
        samples.sort_by(f64::total_cmp);
        Ok::<_, anyhow::Error>((percentile(&samples, 0.50), percentile(&samples, 0.99)))
    };
    tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .map_err(|_| anyhow!("{n} round trips did not finish within 120 s"))?
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// New connections per second, each connected, used for 1 byte each way and closed, by
/// `clients` clients each opening its next connection when its last one is closed (one client:
/// one connection's set-up time, sequentially; several: the path's capacity), until `max`
/// are done or `secs` have passed. Returns the rate and the number of connections.
async fn conn_rate(
    addr: SocketAddr,
    clients: usize,
    max: usize,
    secs: f64,
) -> Result<(f64, usize)> {
    let counts = Arc::new(ConnCounts {
        started: Instant::now(),
        limit: Duration::from_secs_f64(secs),
        max,
        claimed: AtomicUsize::new(0),
        finished: AtomicUsize::new(0),
    });
    if clients <= 1 {
        // On the calling task: one client is the measuring task itself.
        rate_client(addr, &counts).await?;
    } else {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..clients {
            let counts = counts.clone();
            tasks.spawn(async move { rate_client(addr, &counts).await });
        }
        while let Some(r) = tasks.join_next().await {
            r.map_err(|e| anyhow!("a client of the rate test failed: {e}"))??;
        }
    }
    let done = counts.finished.load(Ordering::Relaxed);
    Ok((done as f64 / counts.started.elapsed().as_secs_f64(), done))
}

/// What the clients of one [`conn_rate`] measurement share.
struct ConnCounts {
    started: Instant,
    limit: Duration,
    max: usize,
    /// Connections started (a client claims one before it opens it) and finished.
    claimed: AtomicUsize,
    finished: AtomicUsize,
}

/// One client of [`conn_rate`]: connections one after another until the limits.
async fn rate_client(addr: SocketAddr, c: &ConnCounts) -> Result<()> {
    while c.started.elapsed() < c.limit && c.claimed.fetch_add(1, Ordering::Relaxed) < c.max {
        let s = echo_once(addr, Duration::from_secs(5))
            .await
            .with_context(|| {
                format!(
                    "connection {} of the rate test",
                    c.finished.load(Ordering::Relaxed) + 1
                )
            })?;
        drop(s);
        c.finished.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// RSS (KiB) of the path's processes before and while `n` idle connections are open, and
/// the per-process breakdown of the latter.
async fn idle_memory(peer: &Peer, n: usize) -> Result<(u64, u64, Vec<(String, u64)>)> {
    let (before, _) = peer.rss();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        if Instant::now() > deadline {
            bail!("only {i} of {n} idle connections opened within 120 s");
        }
        let s = echo_once(peer.entry, Duration::from_secs(10))
            .await
            .with_context(|| format!("idle connection {} of {n}", i + 1))?;
        held.push(s);
    }
    // Let buffers settle, then read.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let (during, per) = peer.rss();
    // Every one still there: a path that dropped idle connections would look cheap.
    for (i, s) in held.iter_mut().enumerate().take(n) {
        if i % 100 == 0 {
            tokio::time::timeout(Duration::from_secs(5), async {
                s.write_all(b"x").await?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await
            })
            .await
            .map_err(|_| anyhow!("idle connection {i} no longer echoes"))?
            .with_context(|| format!("idle connection {i} was closed"))?;
        }
    }
    drop(held);
    // Give the path a moment to close them before the next measurement.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok((before, during, per))
}

// ---------------------------------------------------------------------------------------------
// The run

/// Per process, the CPU time (µs) between two readings divided by `n`.
fn cpu_per(before: &[(String, u64)], after: &[(String, u64)], n: usize) -> Vec<(String, f64)> {
    let n = n.max(1) as f64;
    before
        .iter()
        .zip(after)
        .map(|((name, b), (_, a))| (name.clone(), a.saturating_sub(*b) as f64 / n))
        .collect()
}

#[derive(Default)]
struct Samples {
    bulk: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    cps: Vec<f64>,
    /// New connections per second with `--conn-clients` clients at once.
    cps_many: Vec<f64>,
    rss_idle: Vec<f64>,
    rss_held: Vec<f64>,
    breakdown: Vec<(String, u64)>,
    /// CPU of the path's processes per round trip and per new connection, µs.
    cpu_rt: Vec<f64>,
    cpu_conn: Vec<f64>,
    /// Per process, last round: (name, µs per round trip, µs per new connection).
    cpu_breakdown: Vec<(String, f64, f64)>,
    errors: Vec<String>,
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

async fn bench(args: &Args, bins: &Path) -> Result<()> {
    let want = |k: PeerKind| match args.peers.as_ref() {
        Some(p) => p.contains(&k),
        // The diagnostic chains only when asked for: they take a run longer and compete
        // with nothing.
        None => !matches!(k, PeerKind::TlsChain | PeerKind::MuxChain),
    };
    if !want(PeerKind::Netport) {
        eprintln!("note: Netport is not among --peers; the goals need it");
    }
    // Dropped last: the processes (which write into it) go first.
    let tmp = tempfile::Builder::new()
        .prefix("netport-bench-tunnel-")
        .tempdir()?;
    let root = tmp.path().to_path_buf();
    let service = start_service().await?;

    println!(
        "netport-bench tunnel: {} CPUs, {} rounds; bulk {} MiB, {} round trips of 64 B, \
         ≤{} new connections or ≤{} s, {} idle connections; service on {service}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.rounds,
        args.bulk_mib,
        args.round_trips,
        args.conns,
        args.conn_secs,
        args.idle
    );
    println!("  Netport binaries: {}", bins.display());

    // Set up every path once; optional peers that are missing or fail are skipped visibly.
    let mut setups: Vec<Setup> = Vec::new();
    if want(PeerKind::Direct) {
        setups.push(Setup::Ready(Peer {
            name: DIRECT,
            entry: service,
            procs: Vec::new(),
            mem_note: "no process in between".into(),
        }));
    }
    let chains = [
        (PeerKind::PlainChain, Chain::Plain),
        (PeerKind::TlsChain, Chain::Tls),
        (PeerKind::MuxChain, Chain::Mux),
    ];
    for (kind, chain) in chains {
        if want(kind) {
            let peer = start_chain(&root, service, chain)
                .await
                .with_context(|| format!("starting the {} (3 forwarders)", chain.name()))?;
            println!(
                "  {}: this binary's `forward` ({})",
                peer.name, peer.mem_note
            );
            setups.push(Setup::Ready(peer));
        }
    }
    if want(PeerKind::Netport) {
        let threads = args
            .portal_threads
            .map(|n| format!("threads = {n}\n"))
            .unwrap_or_default();
        let peer = start_netport(&root, bins, service, &threads, &args.relay_tcp_path)
            .await
            .context("starting Netport (netportd, relayd, 2 portals)")?;
        println!(
            "  netport: {} ({})",
            version_of(&bins.join("portal"), "--version", "portal"),
            peer.mem_note
        );
        setups.push(Setup::Ready(peer));
    }
    let optional: Vec<(PeerKind, &'static str)> = vec![
        (PeerKind::Ssh, SSH),
        (PeerKind::Stunnel, STUNNEL),
        (PeerKind::Rathole, RATHOLE_TLS),
        (PeerKind::Rathole, RATHOLE_TCP),
    ];
    for (kind, name) in optional {
        if !want(kind) {
            continue;
        }
        let started = match name {
            SSH => start_ssh(&root, service).await,
            STUNNEL => start_stunnel(&root, service).await,
            RATHOLE_TLS => start_rathole(&root, service, true).await,
            _ => start_rathole(&root, service, false).await,
        };
        let setup = match started {
            Ok(s) => s,
            Err(e) => Setup::Skipped {
                name,
                reason: format!("failed to start: {e:#}"),
            },
        };
        match &setup {
            Setup::Ready(p) => {
                let version = match name {
                    SSH => which("ssh").map(|b| version_of(&b, "-V", "openssh")),
                    STUNNEL => which("stunnel4")
                        .or_else(|| which("stunnel"))
                        .map(|b| version_of(&b, "-version", "stunnel ")),
                    _ => which("rathole").map(|b| version_of(&b, "--version", "rathole")),
                };
                println!(
                    "  {}: {} ({})",
                    p.name,
                    version.unwrap_or_default(),
                    p.mem_note
                );
            }
            Setup::Skipped { name, reason } => println!("  {name}: SKIPPED: {reason}"),
        }
        setups.push(setup);
    }

    let mut peers: Vec<&mut Peer> = setups
        .iter_mut()
        .filter_map(|s| match s {
            Setup::Ready(p) => Some(p),
            Setup::Skipped { .. } => None,
        })
        .collect();
    let mut samples: HashMap<&'static str, Samples> = HashMap::new();
    let rounds = args.rounds.max(1);
    let bulk_bytes = args.bulk_mib.max(1) * 1024 * 1024;
    for round in 0..rounds {
        println!("\nround {}/{rounds}", round + 1);
        // Interleaved, and rotated so no path always runs first (or right after another).
        let n = peers.len();
        for k in 0..n {
            let peer = &mut *peers[(k + round) % n];
            let s = samples.entry(peer.name).or_default();
            let alive: Result<()> = peer.procs.iter_mut().try_for_each(Proc::check_alive);
            if let Err(e) = alive {
                println!("  {:<24} DEAD: {e:#}", peer.name);
                s.errors.push(format!("round {}: {e:#}", round + 1));
                continue;
            }
            let mut line = format!("  {:<24}", peer.name);
            match bulk(peer.entry, bulk_bytes).await {
                Ok(g) => {
                    s.bulk.push(g);
                    let _ = write!(line, " bulk {g:6.2} Gbit/s");
                }
                Err(e) => s.errors.push(format!("round {} bulk: {e:#}", round + 1)),
            }
            let cpu_before = peer.cpu();
            let mut cpu_rt = None;
            match latency(peer.entry, args.round_trips).await {
                Ok((p50, p99)) => {
                    s.p50.push(p50);
                    s.p99.push(p99);
                    let _ = write!(line, "  p50 {p50:7.1} µs  p99 {p99:7.1} µs");
                    cpu_rt = Some(cpu_per(
                        &cpu_before,
                        &peer.cpu(),
                        args.round_trips + WARM_UP_ROUND_TRIPS,
                    ));
                }
                Err(e) => s.errors.push(format!("round {} latency: {e:#}", round + 1)),
            }
            let cpu_before = peer.cpu();
            let mut cpu_conn = None;
            match conn_rate(peer.entry, 1, args.conns, args.conn_secs).await {
                Ok((c, done)) => {
                    s.cps.push(c);
                    let _ = write!(line, "  {c:8.0} conn/s");
                    cpu_conn = Some(cpu_per(&cpu_before, &peer.cpu(), done));
                }
                Err(e) => s.errors.push(format!("round {} conn/s: {e:#}", round + 1)),
            }
            if args.conn_clients > 1 {
                match conn_rate(peer.entry, args.conn_clients, args.conns, args.conn_secs).await {
                    Ok((c, _)) => {
                        s.cps_many.push(c);
                        let _ = write!(line, " ({c:.0} ×{})", args.conn_clients);
                    }
                    Err(e) => s.errors.push(format!(
                        "round {} conn/s with {} clients: {e:#}",
                        round + 1,
                        args.conn_clients
                    )),
                }
            }
            if !peer.procs.is_empty()
                && let (Some(rt), Some(conn)) = (cpu_rt, cpu_conn)
            {
                s.cpu_rt.push(rt.iter().map(|(_, v)| v).sum());
                s.cpu_conn.push(conn.iter().map(|(_, v)| v).sum());
                s.cpu_breakdown = rt
                    .into_iter()
                    .zip(conn)
                    .map(|((n, r), (_, c))| (n, r, c))
                    .collect();
            }
            if peer.procs.is_empty() {
                let _ = write!(line, "  RSS n/a");
            } else {
                match idle_memory(peer, args.idle).await {
                    Ok((before, during, per)) => {
                        s.rss_idle.push(before as f64 / 1024.0);
                        s.rss_held.push(during as f64 / 1024.0);
                        s.breakdown = per;
                        let _ = write!(
                            line,
                            "  RSS {:6.1} MiB with {} idle ({:.1} MiB before)",
                            during as f64 / 1024.0,
                            args.idle,
                            before as f64 / 1024.0
                        );
                    }
                    Err(e) => s.errors.push(format!("round {} memory: {e:#}", round + 1)),
                }
            }
            println!("{line}");
            for e in s
                .errors
                .iter()
                .filter(|e| e.starts_with(&format!("round {} ", round + 1)))
            {
                println!("    error: {e}");
            }
        }
    }

    report(args, &setups, &samples);
    if args.keep {
        let kept = tmp.keep();
        println!(
            "\nkept configurations, certificates and logs in {}",
            kept.display()
        );
    }
    drop(setups);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Report

fn fmt_opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "-".to_string(), f)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn thousands(x: f64) -> String {
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn report(args: &Args, setups: &[Setup], samples: &HashMap<&'static str, Samples>) {
    let get = |name: &str| samples.get(name);
    let med = |name: &str, f: fn(&Samples) -> &Vec<f64>| get(name).and_then(|s| median(f(s)));
    // The paths that ran, with their samples.
    let measured = || {
        setups.iter().filter_map(|s| match s {
            Setup::Ready(p) => get(p.name).map(|s| (p, s)),
            Setup::Skipped { .. } => None,
        })
    };
    let d_bulk = med(DIRECT, |s| &s.bulk);
    let d_p50 = med(DIRECT, |s| &s.p50);
    let d_cps = med(DIRECT, |s| &s.cps);

    println!(
        "\nMedians of {} rounds (×direct: the path's figure over direct TCP's; for latency, \
         higher is slower)\n",
        args.rounds.max(1)
    );
    println!(
        "{:<24} {:>12} {:>8} {:>9} {:>9} {:>8} {:>10} {:>8} {:>11} {:>14} {:>12}",
        "path",
        "bulk Gbit/s",
        "×direct",
        "p50 µs",
        "p99 µs",
        "×direct",
        "new conn/s",
        "×direct",
        format!("{} at once", args.conn_clients),
        format!("RSS {} idle", args.idle),
        "RSS at rest"
    );
    for setup in setups {
        match setup {
            Setup::Skipped { name, reason } => {
                let short = reason.lines().next().unwrap_or("");
                println!("{name:<24} skipped: {short}");
            }
            Setup::Ready(p) => {
                let n = p.name;
                let bulk = med(n, |s| &s.bulk);
                let p50 = med(n, |s| &s.p50);
                let p99 = med(n, |s| &s.p99);
                let cps = med(n, |s| &s.cps);
                let cps_many = med(n, |s| &s.cps_many);
                let held = med(n, |s| &s.rss_held);
                let idle = med(n, |s| &s.rss_idle);
                let mem = if p.procs.is_empty() {
                    ("n/a".to_string(), "n/a".to_string())
                } else {
                    (
                        fmt_opt(held, |v| format!("{v:.1} MiB")),
                        fmt_opt(idle, |v| format!("{v:.1} MiB")),
                    )
                };
                println!(
                    "{:<24} {:>12} {:>8} {:>9} {:>9} {:>8} {:>10} {:>8} {:>11} {:>14} {:>12}",
                    n,
                    fmt_opt(bulk, |v| format!("{v:.2}")),
                    fmt_opt(ratio(bulk, d_bulk), |v| format!("{v:.2}")),
                    fmt_opt(p50, |v| format!("{v:.1}")),
                    fmt_opt(p99, |v| format!("{v:.1}")),
                    fmt_opt(ratio(p50, d_p50), |v| format!("{v:.2}")),
                    fmt_opt(cps, thousands),
                    fmt_opt(ratio(cps, d_cps), |v| format!("{v:.3}")),
                    fmt_opt(cps_many, thousands),
                    mem.0,
                    mem.1,
                );
            }
        }
    }
    // Spread, so noise is visible.
    println!("\nmin–max over rounds:");
    let range = |v: &Vec<f64>, prec: usize| {
        if v.is_empty() {
            "-".to_string()
        } else {
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            format!("{lo:.prec$}–{hi:.prec$}")
        }
    };
    for (p, s) in measured() {
        println!(
            "  {:<24} bulk {} Gbit/s, p50 {} µs, {} conn/s ({} with {} clients), RSS held {} MiB",
            p.name,
            range(&s.bulk, 2),
            range(&s.p50, 1),
            range(&s.cps, 0),
            range(&s.cps_many, 0),
            args.conn_clients,
            range(&s.rss_held, 1)
        );
    }
    // Where the memory is.
    println!(
        "\nRSS with {} idle connections, last round, per process:",
        args.idle
    );
    for (p, s) in measured().filter(|(_, s)| !s.breakdown.is_empty()) {
        let parts: Vec<String> = s
            .breakdown
            .iter()
            .map(|(n, k)| format!("{n} {:.1} MiB", *k as f64 / 1024.0))
            .collect();
        println!("  {:<24} {}", p.name, parts.join(", "));
    }
    // Where the CPU goes: what the path's own processes spend per round trip and per new
    // connection (the benchmark's client and service are the same for every path).
    println!("\nCPU of the path's processes, user + system (medians; per process: last round):");
    for (p, s) in measured().filter(|(_, s)| !s.cpu_breakdown.is_empty()) {
        let parts: Vec<String> = s
            .cpu_breakdown
            .iter()
            .map(|(n, rt, c)| format!("{n} {rt:.0}/{c:.0}"))
            .collect();
        println!(
            "  {:<24} {} µs per round trip, {} µs per new connection ({})",
            p.name,
            fmt_opt(median(&s.cpu_rt), |v| format!("{v:.1}")),
            fmt_opt(median(&s.cpu_conn), |v| format!("{v:.0}")),
            parts.join(", ")
        );
    }
    let errors: Vec<(&str, &String)> = setups
        .iter()
        .filter_map(|s| match s {
            Setup::Ready(p) => Some(p.name),
            Setup::Skipped { .. } => None,
        })
        .filter_map(|n| get(n).map(|s| (n, s)))
        .flat_map(|(n, s)| s.errors.iter().map(move |e| (n, e)))
        .collect();
    if !errors.is_empty() {
        println!("\nerrors:");
        for (n, e) in errors {
            println!("  {n}: {e}");
        }
    }
    let skipped: Vec<(&str, &String)> = setups
        .iter()
        .filter_map(|s| match s {
            Setup::Skipped { name, reason } => Some((*name, reason)),
            Setup::Ready(_) => None,
        })
        .collect();
    if !skipped.is_empty() {
        println!("\nskipped:");
        for (n, r) in skipped {
            println!("  {n}: {r}");
        }
    }

    // Netport against the peers.
    let np = |f: fn(&Samples) -> &Vec<f64>| med(NETPORT, f);
    let (n_bulk, n_p50, n_cps, n_mem) = (
        np(|s| &s.bulk),
        np(|s| &s.p50),
        np(|s| &s.cps),
        np(|s| &s.rss_held),
    );
    let (n_cpu_rt, n_cpu_conn) = (np(|s| &s.cpu_rt), np(|s| &s.cpu_conn));
    let n_cps_many = np(|s| &s.cps_many);
    if get(NETPORT).is_none() {
        return;
    }
    println!("\nNetport against the peers (Netport's figure over the peer's):");
    for peer in [
        PLAIN_CHAIN,
        TLS_CHAIN,
        MUX_CHAIN,
        SSH,
        STUNNEL,
        RATHOLE_TLS,
        RATHOLE_TCP,
    ] {
        if get(peer).is_none() {
            continue;
        }
        println!(
            "  vs {:<24} bulk ×{}, p50 ×{}, new conn/s ×{} ({} at once ×{}), RSS held ×{}, CPU \
             per round trip ×{}, CPU per new connection ×{}",
            peer,
            fmt_opt(ratio(n_bulk, med(peer, |s| &s.bulk)), |v| format!("{v:.2}")),
            fmt_opt(ratio(n_p50, med(peer, |s| &s.p50)), |v| format!("{v:.2}")),
            fmt_opt(ratio(n_cps, med(peer, |s| &s.cps)), |v| format!("{v:.2}")),
            args.conn_clients,
            fmt_opt(ratio(n_cps_many, med(peer, |s| &s.cps_many)), |v| format!(
                "{v:.2}"
            )),
            fmt_opt(ratio(n_mem, med(peer, |s| &s.rss_held)), |v| format!(
                "{v:.2}"
            )),
            fmt_opt(ratio(n_cpu_rt, med(peer, |s| &s.cpu_rt)), |v| format!(
                "{v:.2}"
            )),
            fmt_opt(ratio(n_cpu_conn, med(peer, |s| &s.cpu_conn)), |v| format!(
                "{v:.2}"
            )),
        );
    }

    println!("\nGoals (issue 3, \"Speed\"):");
    let goal = |what: &str, verdict: Option<bool>, detail: String| {
        let v = match verdict {
            Some(true) => "MET    ",
            Some(false) => "NOT MET",
            None => "n/a    ",
        };
        println!("  [{v}] {what}: {detail}");
    };
    let st_bulk = med(STUNNEL, |s| &s.bulk);
    match ratio(n_bulk, st_bulk) {
        Some(r) => goal(
            "bulk ≥ 1.3× the stunnel chain",
            Some(r >= 1.3),
            format!(
                "{:.2} vs {:.2} Gbit/s = ×{r:.2}",
                n_bulk.unwrap_or_default(),
                st_bulk.unwrap_or_default()
            ),
        ),
        None => goal(
            "bulk ≥ 1.3× the stunnel chain",
            None,
            "stunnel chain not measured".into(),
        ),
    }
    let rt_bulk = med(RATHOLE_TLS, |s| &s.bulk);
    match ratio(n_bulk, rt_bulk) {
        Some(r) => goal(
            "bulk ≥ rathole with TLS",
            Some(r >= 1.0),
            format!(
                "{:.2} vs {:.2} Gbit/s = ×{r:.2}",
                n_bulk.unwrap_or_default(),
                rt_bulk.unwrap_or_default()
            ),
        ),
        None => goal(
            "bulk ≥ rathole with TLS",
            None,
            format!(
                "rathole not measured; Netport {} Gbit/s",
                fmt_opt(n_bulk, |v| format!("{v:.2}"))
            ),
        ),
    }
    let rp_cps = med(RATHOLE_TCP, |s| &s.cps);
    match ratio(n_cps, rp_cps) {
        Some(r) => goal(
            "new conn/s ≥ rathole without encryption",
            Some(r >= 1.0),
            format!(
                "{} vs {} conn/s = ×{r:.2}",
                fmt_opt(n_cps, thousands),
                fmt_opt(rp_cps, thousands)
            ),
        ),
        None => goal(
            "new conn/s ≥ rathole without encryption",
            None,
            format!(
                "rathole not measured; Netport {} conn/s (direct {}; the issue's reference \
                 machine saw ≈{} for rathole without encryption)",
                fmt_opt(n_cps, thousands),
                fmt_opt(d_cps, thousands),
                thousands(REF_RATHOLE_PLAIN_CPS)
            ),
        ),
    }
    if let (Some(n), Some(r)) = (n_cps_many, med(RATHOLE_TCP, |s| &s.cps_many)) {
        println!(
            "            with {} clients at once (capacity, not one connection's set-up time): \
             {} vs {} conn/s = ×{:.2}",
            args.conn_clients,
            thousands(n),
            thousands(r),
            n / r
        );
    }
    if let Some(c) = med(PLAIN_CHAIN, |s| &s.cps) {
        println!(
            "            the plain chain (3 forwarders, a thread per direction): {} conn/s; \
             Netport ×{} of it",
            thousands(c),
            fmt_opt(ratio(n_cps, Some(c)), |v| format!("{v:.2}")),
        );
    }
    let st_p50 = med(STUNNEL, |s| &s.p50);
    match ratio(n_p50, st_p50) {
        Some(r) => goal(
            "p50 ≤ 0.6× the stunnel chain",
            Some(r <= 0.6),
            format!(
                "{:.1} vs {:.1} µs = ×{r:.2}",
                n_p50.unwrap_or_default(),
                st_p50.unwrap_or_default()
            ),
        ),
        None => goal(
            "p50 ≤ 0.6× the stunnel chain",
            None,
            "stunnel chain not measured".into(),
        ),
    }
    // What the shape allows: the same three processes on the path, doing nothing but copy.
    let pc_p50 = med(PLAIN_CHAIN, |s| &s.p50);
    if let Some(floor) = pc_p50 {
        println!(
            "            the shape's floor, the plain chain (3 forwarders, no encryption): p50 \
             {floor:.1} µs = ×{} the stunnel chain; Netport ×{} the plain chain",
            fmt_opt(ratio(pc_p50, st_p50), |v| format!("{v:.2}")),
            fmt_opt(ratio(n_p50, pc_p50), |v| format!("{v:.2}")),
        );
    }
    // The diagnostic chains, when measured: what each layer adds to the floor.
    let layers = [
        (
            TLS_CHAIN,
            "tokio + Netport's link TLS at the portal positions",
        ),
        (MUX_CHAIN, "the same + yamux streams on one link"),
    ];
    for (chain, what) in layers {
        if let Some(p50) = med(chain, |s| &s.p50) {
            println!(
                "            the {chain} ({what}): p50 {p50:.1} µs = {} µs over the plain \
                 chain; Netport {} µs over it",
                fmt_opt(pc_p50.map(|f| p50 - f), |v| format!("{v:+.1}")),
                fmt_opt(n_p50.map(|n| n - p50), |v| format!("{v:+.1}")),
            );
        }
    }
    let rt_mem = med(RATHOLE_TLS, |s| &s.rss_held);
    match ratio(n_mem, rt_mem) {
        Some(r) => goal(
            &format!(
                "Netport RSS with {} idle connections < rathole with TLS",
                args.idle
            ),
            Some(r < 1.0),
            format!(
                "{:.1} vs {:.1} MiB = ×{r:.2}",
                n_mem.unwrap_or_default(),
                rt_mem.unwrap_or_default()
            ),
        ),
        None => goal(
            &format!(
                "Netport RSS with {} idle connections < rathole with TLS",
                args.idle
            ),
            None,
            format!(
                "rathole not measured; Netport {} (all four processes)",
                fmt_opt(n_mem, |v| format!("{v:.1} MiB"))
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::{conn_rate, cpu_us, start_service, stat_cpu_us};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clients_at_once_make_exactly_the_connections_asked_for() -> anyhow::Result<()> {
        let service = start_service().await?;
        for clients in [1, 3, 8] {
            let (rate, done) = conn_rate(service, clients, 50, 60.0).await?;
            assert_eq!(done, 50, "{clients} clients");
            assert!(rate > 0.0, "{clients} clients: rate {rate}");
        }
        // A path that refuses connections is an error, not a rate.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?
        };
        assert!(conn_rate(closed, 4, 50, 60.0).await.is_err());
        Ok(())
    }

    #[test]
    fn cpu_time_is_read_past_a_command_name_with_spaces_and_parentheses() {
        // utime 7, stime 3, cutime 2, cstime 1 ticks of 10 ms.
        let stat = "42 (my (odd) name) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 2 1 20 0 1 0 5 6 7";
        assert_eq!(stat_cpu_us(stat), 130_000);
        assert_eq!(stat_cpu_us("garbage"), 0);
        assert_eq!(cpu_us(u32::MAX), 0, "a process that is gone reads 0");
    }

    #[test]
    fn cpu_time_grows_while_this_process_computes() {
        let me = std::process::id();
        let start = cpu_us(me);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut x = 0u64;
        while cpu_us(me) < start + 30_000 {
            assert!(
                std::time::Instant::now() < deadline,
                "30 ms of CPU were not counted within 20 s"
            );
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }
        assert!(cpu_us(me) >= start + 30_000);
    }
}
