//! `netport-bench sessions`: many portals on one netportd.
//!
//! Starts the release netportd with a policy of N portals (each holding one listener), then
//! connects N simulated portals from this one process: real mutual TLS with a certificate
//! each, hello, then they read what the server pushes. Reports netportd's memory per idle
//! session, then rewrites the policy so every portal's listener changes and times how long
//! until every session has received its new desired state (goal: under 2 s).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netport_proto::control::{Decoder, Message, PeerRole, VERSION, encode_message};
use netport_proto::identity::Role;
use netport_proto::tls::Credentials;
use netportd::pki::{Ca, IssueRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Simulated portals.
    #[arg(long, default_value_t = 10_000)]
    portals: usize,
    /// Handshakes in flight at once while connecting.
    #[arg(long, default_value_t = 64)]
    parallel: usize,
    /// The directory holding the release netportd (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<std::path::PathBuf>,
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn policy(n: usize, listen_port: u16) -> String {
    let mut s = String::with_capacity(n * 48);
    for i in 0..n {
        s.push_str(&format!(
            "[[portal]]\nname = \"p{i}\"\ntags = [\"fleet\"]\n"
        ));
    }
    s.push_str(&format!(
        "[[portal]]\nname = \"svc\"\n[[relay]]\nname = \"relay-1\"\naddress = \"127.0.0.1\"\n\
         [[service]]\nname = \"web\"\nportal = \"svc\"\ntarget = \"127.0.0.1:9\"\n\
         [[access]]\nname = \"fleet-web\"\nfrom = [\"tag:fleet\"]\nlisten = \"127.0.0.1:{listen_port}\"\nservice = \"web\"\n"
    ));
    s
}

fn write_policy(dir: &Path, text: &str) -> Result<()> {
    let tmp = dir.join(".policy.toml.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join("policy.toml"))?;
    Ok(())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// One simulated portal: connects, says hello, then counts the desired states it receives
/// for the policy `want` (set once the reload is written).
async fn session(
    creds: Credentials,
    server: std::net::SocketAddr,
    connected: Arc<AtomicUsize>,
    reconciled: Arc<AtomicUsize>,
    want: Arc<std::sync::Mutex<String>>,
    welcomed_tx: tokio::sync::oneshot::Sender<()>,
) -> Result<()> {
    let mut welcomed_tx = Some(welcomed_tx);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(creds.control_client()?));
    let tcp = tokio::net::TcpStream::connect(server).await?;
    let name = tokio_rustls::rustls::pki_types::ServerName::from(server.ip());
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(&encode_message(&Message::Hello {
        role: PeerRole::Portal,
        versions: vec![VERSION],
        software: "netport-bench".into(),
    }))
    .await?;
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let n = tls.read(&mut buf).await?;
        if n == 0 {
            bail!("netportd closed a session");
        }
        decoder.push(&buf[..n]);
        while let Some(m) = decoder.next_message()? {
            match m {
                Message::Welcome { .. } => {
                    if let Some(tx) = welcomed_tx.take() {
                        connected.fetch_add(1, Ordering::Relaxed);
                        let _ = tx.send(());
                    }
                }
                Message::DesiredState { policy, .. } => {
                    let want = want.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    if policy == want {
                        reconciled.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Message::Refused { reason, message } => bail!("refused ({reason}): {message}"),
                _ => {}
            }
        }
        // Buffers of an idle session stay small.
        if buf.capacity() > 4096 {
            buf.shrink_to(4096);
        }
    }
}

async fn wait_until(what: &str, within: Duration, cond: impl Fn() -> bool) -> Result<Duration> {
    let started = Instant::now();
    while !cond() {
        if started.elapsed() > within {
            bail!("{what}: not done within {} s", within.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(started.elapsed())
}

pub fn run(args: Args) -> Result<()> {
    // One descriptor per simulated portal here, as many in netportd (which raises its own).
    netport_common::raise_open_files_limit();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(args))
}

async fn bench(args: Args) -> Result<()> {
    let n = args.portals;
    let bin_dir = match args.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .context("this binary's directory")?
            .to_path_buf(),
    };
    let netportd = bin_dir.join("netportd");
    if !netportd.is_file() {
        bail!(
            "{} not found: cargo build --release -p netportd -p netport-bench",
            netportd.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let ca = Ca::generate(2)?;
    let ca_pem = ca.cert_pem();
    let mut req = IssueRequest::new(Role::Server, "netportd", 2);
    req.ips = vec!["127.0.0.1".parse()?];
    let server = ca.issue(&req)?;
    for (name, text) in [
        ("ca.crt", ca_pem),
        ("server.crt", server.chain_pem.as_str()),
        ("server.key", server.key_pem.as_str()),
    ] {
        std::fs::write(dir.path().join(name), text)?;
    }
    let started = Instant::now();
    let mut creds = Vec::with_capacity(n);
    for i in 0..n {
        let issued = ca.issue(&IssueRequest::new(Role::Portal, format!("p{i}"), 2))?;
        creds.push(Credentials::from_pem(
            issued.chain_pem.as_bytes(),
            issued.key_pem.as_bytes(),
            ca_pem.as_bytes(),
        )?);
    }
    println!(
        "issued {n} portal certificates in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let policy_dir = dir.path().join("policy");
    std::fs::create_dir_all(&policy_dir)?;
    write_policy(&policy_dir, &policy(n, 20001))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let config = dir.path().join("netportd.toml");
    std::fs::write(
        &config,
        format!(
            "listen = [\"{addr}\"]\npolicy = \"policy\"\nheartbeat_secs = 30\nreload_debounce_ms = 50\n\
             [tls]\nca = \"ca.crt\"\ncert = \"server.crt\"\nkey = \"server.key\"\n"
        ),
    )?;
    let log = dir.path().join("netportd.log");
    let child = Killed(
        Command::new(&netportd)
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting netportd")?,
    );
    let pid = child.0.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!(
                "netportd did not start:\n{}",
                std::fs::read_to_string(&log)?
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = rss_kib(pid);

    let connected = Arc::new(AtomicUsize::new(0));
    let reconciled = Arc::new(AtomicUsize::new(0));
    let want = Arc::new(std::sync::Mutex::new(String::new()));
    let gate = Arc::new(tokio::sync::Semaphore::new(args.parallel));
    let failed = Arc::new(AtomicUsize::new(0));
    // Set when the measurement is over: sessions ending with netportd are not failures.
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    for c in creds {
        let permit = gate.clone().acquire_owned().await?;
        let (connected, reconciled, want, failed, finished) = (
            connected.clone(),
            reconciled.clone(),
            want.clone(),
            failed.clone(),
            finished.clone(),
        );
        let (welcomed_tx, welcomed) = tokio::sync::oneshot::channel();
        // The permit is held until this session is welcomed (or fails).
        tokio::spawn(async move {
            let _ = welcomed.await;
            drop(permit);
        });
        tokio::spawn(async move {
            if let Err(e) = session(c, addr, connected, reconciled, want, welcomed_tx).await
                && !finished.load(Ordering::Relaxed)
                && failed.fetch_add(1, Ordering::Relaxed) < 3
            {
                eprintln!("a session failed: {e:#}");
            }
        });
    }
    let took = wait_until("connecting every portal", Duration::from_secs(300), || {
        connected.load(Ordering::Relaxed) >= n
    })
    .await
    .with_context(|| format!("{} connected", connected.load(Ordering::Relaxed)))?;
    let took = started.elapsed().max(took);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_kib(pid);
    let per = (rss_after.saturating_sub(rss_before)) as f64 / n as f64;
    println!(
        "{n} portals connected in {:.1} s; netportd RSS {} -> {} KiB: {per:.1} KiB per idle session (goal < 30 KiB)",
        took.as_secs_f64(),
        rss_before,
        rss_after
    );

    // A reload that moves every portal's listener.
    let new = policy(n, 20002);
    let report = netport_policy::check(vec![netport_policy::SourceFile::new(
        policy_dir.join("policy.toml").display().to_string(),
        new.clone(),
    )]);
    let hash = report
        .policy
        .context("the reload policy does not pass check")?
        .hash;
    *want.lock().unwrap_or_else(|p| p.into_inner()) = hash;
    write_policy(&policy_dir, &new)?;
    let took = wait_until(
        "every portal reconciled after the reload",
        Duration::from_secs(60),
        || reconciled.load(Ordering::Relaxed) >= n,
    )
    .await?;
    println!(
        "reload changing all {n} portals' listeners: every session had its new desired state {:.0} ms after the file was written (goal < 2,000 ms; includes the {} ms debounce)",
        took.as_secs_f64() * 1000.0,
        50
    );
    println!(
        "netportd RSS after the reload: {} KiB; sessions failed: {}",
        rss_kib(pid),
        failed.load(Ordering::Relaxed)
    );
    finished.store(true, Ordering::Relaxed);
    drop(child);
    Ok(())
}
