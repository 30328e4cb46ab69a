//! What the three Netport daemons share at run time: reading certificate files into
//! credentials, log set-up, waiting for a shutdown signal, and opening a control connection
//! to netportd. Wire formats and decisions are not here (they live in `netport-proto` and
//! `netport-policy`); nor is anything one daemon alone needs.

pub mod admin;
pub mod expiry;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use netport_proto::identity::Role;
use netport_proto::tls::Credentials;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// The `[tls]` table of every daemon's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsToml {
    /// The Netport CA certificate (PEM).
    pub ca: PathBuf,
    /// This daemon's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

impl TlsToml {
    /// Reads the files (relative paths from `base`) and checks that the certificate, key and
    /// CA fit together and that the certificate is for `role`. Errors name the key and the fix.
    pub fn load(&self, base: &Path, role: Role) -> Result<Credentials> {
        let read = |key: &str, p: &Path| {
            let full = base.join(p);
            std::fs::read(&full).with_context(|| {
                format!(
                    "`tls.{key}`: cannot read {} (`netportd ca init` and `netportd ca issue` write these files)",
                    full.display()
                )
            })
        };
        let creds = Credentials::from_pem(
            &read("cert", &self.cert)?,
            &read("key", &self.key)?,
            &read("ca", &self.ca)?,
        )
        .context(
            "`tls`: the certificate, key and CA do not fit together (is `key` the key of `cert`?)",
        )?;
        expiry::refuse_expired(&creds)?;
        if creds.identity().role != role {
            bail!(
                "`tls.cert` is for {}, but this daemon needs a {} certificate (`netportd ca issue {} NAME`)",
                creds.identity(),
                role.as_str(),
                role.as_str()
            );
        }
        Ok(creds)
    }
}

/// The last `lines` lines of a daemon's log file (empty if it cannot be read), for an error
/// message about a daemon that failed or would not stop.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Control server addresses with the name to check on the server certificate for each.
pub fn servers(list: &[String], server_name: Option<&str>) -> Result<Vec<(String, String)>> {
    if list.is_empty() {
        bail!(
            "`servers` is empty: list at least one netportd address, like [\"netportd.example.net:7443\"]"
        );
    }
    list.iter()
        .map(|s| {
            let host = netport_proto::control::host_of(s).with_context(|| {
                format!("`servers` entry `{s}` is not host:port (for example \"netportd.example.net:7443\")")
            })?;
            Ok((s.clone(), server_name.map_or(host, str::to_string)))
        })
        .collect()
}

/// Log line format, chosen with `--log-format`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Logs to stderr at the level `RUST_LOG` gives (default `info`); colours only on a terminal.
pub fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Raises this process's open-files limit (RLIMIT_NOFILE) from its soft value to the hard
/// one, as Go programs do at start: every tunnelled connection holds two descriptors, and
/// the common soft default of 1,024 would cap a daemon at a few hundred connections.
/// Logs the limit it runs with; a failure only logs.
pub fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "open files limit raised"),
            Err(e) => tracing::warn!(soft, hard, "cannot raise the open files limit: {e}"),
        },
        Ok((soft, _)) if soft < 65_536 => tracing::warn!(
            limit = soft,
            "the open files limit is low: each connection holds two descriptors (raise LimitNOFILE or ulimit -Hn)"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot read the open files limit: {e}"),
    }
}

/// The most freed memory glibc's allocator keeps at the top of a heap before it gives it
/// back to the kernel (its default is 128 KiB).
const KEEP_FREED: usize = 4 << 20;

/// Lets the allocator keep up to [`KEEP_FREED`] of freed memory per heap instead of handing
/// every 128 KiB back to the kernel. A link allocates and frees frames, records and copy
/// buffers of 16 to 64 KiB all the time, so with the default each bulk transfer crossed the
/// line over and over: during a bulk transfer the portals and relayd took about 17,000 page
/// faults a second (memory given back with `madvise`, then faulted in and zeroed again), and
/// none with this. `netport-bench tunnel --peers netport`, 12 interleaved rounds: bulk
/// throughput ×1.07 (the median of the rounds' ratios), memory with 1,000 idle connections
/// unchanged (55.2 and 55.4 MiB).
///
/// Only glibc has the knob; elsewhere this does nothing. It also fixes glibc's threshold for
/// serving allocations with `mmap` at its initial 128 KiB (no buffer a daemon churns is
/// that large).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)] // one call with two integers; glibc documents it as safe at any time
    {
        // SAFETY: mallopt takes plain integers and only adjusts the allocator's parameters,
        // under the allocator's own lock.
        let ok = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, KEEP_FREED as libc::c_int) };
        if ok != 1 {
            tracing::debug!(
                "mallopt(M_TRIM_THRESHOLD) was refused; the allocator keeps its default"
            );
        }
    }
}

/// What every daemon sets up for its process before it reads its configuration: logs, the
/// open-files limit, the allocator's trim threshold.
pub fn prepare_process(log: LogFormat) {
    init_logs(log);
    raise_open_files_limit();
    keep_freed_memory();
}

/// Runs a daemon's main loop as a task on a worker, not on `block_on`'s thread: the main
/// loop is woken often (a portal's control session hears of every closed connection), and
/// on a multi-thread runtime waking a task on a worker is a queue push, where waking
/// `block_on`'s thread is a futex call and a switch. (On a single-threaded runtime the two
/// are the same thread.)
pub async fn on_worker<F>(main: F) -> Result<()>
where
    F: std::future::Future<Output = Result<()>> + Send + 'static,
{
    tokio::spawn(main)
        .await
        .map_err(|e| anyhow!("the main task failed: {e}"))?
}

/// What [`daemon_main`] needs to know of a daemon's validated configuration.
pub trait DaemonConfig {
    /// Threads the runtime runs tasks on: 1 is a single-threaded runtime (no hand-offs
    /// between threads), 0 one worker per CPU.
    fn worker_threads(&self) -> usize;
}

/// A daemon's runtime with `threads` workers, as [`DaemonConfig::worker_threads`] says;
/// logs which it started.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let rt = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if threads > 1 {
            b.worker_threads(threads);
        }
        b.enable_all().build()?
    };
    let (threads, flavor) = (rt.metrics().num_workers(), rt.handle().runtime_flavor());
    tracing::info!(threads, ?flavor, "runtime started");
    Ok(rt)
}

/// A daemon's `main`: logs, a configuration validated before anything else (exit 2 on a bad
/// one), a runtime, and `run` until SIGTERM or Ctrl-C (exit 0) or a failure (exit 1).
pub fn daemon_main<C: DaemonConfig, F, Fut>(
    log: LogFormat,
    load: impl FnOnce() -> Result<C>,
    run: F,
) -> std::process::ExitCode
where
    F: FnOnce(C, tokio::sync::watch::Receiver<bool>) -> Fut,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    use std::process::ExitCode;
    prepare_process(log);
    let config = match load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let rt = match runtime(config.worker_threads()) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down");
            let _ = tx.send(true);
        });
        match on_worker(run(config, rx)).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e:#}");
                ExitCode::from(1)
            }
        }
    })
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// `base` scaled by a factor in [0.5, 1.5): spreads the reconnects of many peers.
pub fn jitter(base: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    base.mul_f64(0.5 + f64::from(nanos % 1000) / 1000.0)
}

/// Opens a control connection: TCP to `addr`, then TLS checking the server certificate
/// against `name`; each step bounded by 10 s.
pub async fn connect_control(
    creds: &Credentials,
    addr: &str,
    name: &str,
) -> Result<TlsStream<TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(creds.control_client()?));
    let server_name = tokio_rustls::rustls::pki_types::ServerName::try_from(name.to_string())
        .map_err(|_| anyhow!("`{name}` is not a valid server name"))?;
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .context("connect timed out")?
        .with_context(|| format!("connect to {addr}"))?;
    tcp.set_nodelay(true)?;
    tokio::time::timeout(Duration::from_secs(10), connector.connect(server_name, tcp))
        .await
        .context("TLS handshake timed out")?
        .context("TLS handshake")
}

#[cfg(test)]
mod tests {
    #[test]
    fn servers_need_host_and_port() {
        assert!(super::servers(&[], None).is_err());
        assert!(super::servers(&["nohost".into()], None).is_err());
        let s = super::servers(
            &["netportd.example.net:7443".into(), "[::1]:7443".into()],
            None,
        );
        assert_eq!(
            s.ok(),
            Some(vec![
                (
                    "netportd.example.net:7443".into(),
                    "netportd.example.net".into()
                ),
                ("[::1]:7443".into(), "::1".into())
            ])
        );
    }
}
