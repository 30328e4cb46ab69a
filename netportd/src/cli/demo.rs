//! `netportd demo`: the whole system on loopback, with a throwaway PKI.
//!
//! This process is the server; `relayd` and two `portal`s run as child processes (the
//! binaries next to this one), and a small web service stands behind the serving portal.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use netport_proto::identity::Role;
use netportd::pki::{Ca, IssueRequest};
use netportd::server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::{EXIT_FAIL, EXIT_OK};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The policy to run (its relay must be on 127.0.0.1).
    #[arg(long, default_value = "examples/policies/quickstart")]
    pub policy: PathBuf,
    /// The server's control address.
    #[arg(long, default_value = "127.0.0.1:17443")]
    pub listen: SocketAddr,
    /// The server's admin endpoint (/metrics, /healthz, /readyz, /status).
    #[arg(long, default_value = "127.0.0.1:17480")]
    pub admin: SocketAddr,
    /// Prove one round trip through the tunnel, then exit (0 on success).
    #[arg(long)]
    pub once: bool,
}

/// The client portal, serving portal, service and listen address the demo exercises.
const CLIENT: &str = "laptop";
const SERVER: &str = "office";
const BODY: &str = "hello through the Netport tunnel\n";

/// The relay and portals: name, log file, process.
struct Children(Vec<(String, PathBuf, Child)>);

/// How long the relay and portals get to stop by themselves before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

impl Children {
    /// Stops every child as a service manager would: SIGTERM, so each says goodbye to the
    /// server (a TLS close_notify on its control connection) and exits 0, then SIGKILL for
    /// any still running after `grace`. Returns, for each child that did not stop cleanly,
    /// what happened and the end of its log (the logs go with the demo's directory).
    async fn stop(&mut self, grace: Duration) -> Vec<String> {
        for (_, _, c) in &self.0 {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + grace;
        let mut unclean = Vec::new();
        for (name, log, c) in &mut self.0 {
            let status = loop {
                match c.try_wait() {
                    Ok(Some(status)) => break Some(status),
                    Ok(None) if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Ok(None) | Err(_) => break None,
                }
            };
            let what = match status {
                Some(s) if s.success() => continue,
                Some(s) => format!("{name} {s}"),
                None => {
                    let _ = c.kill();
                    let _ = c.wait();
                    format!(
                        "{name} was still running {} s after SIGTERM",
                        grace.as_secs()
                    )
                }
            };
            let tail = netport_common::log_tail(log, 5).replace('\n', "\n  ");
            unclean.push(format!("{what}; the end of its log:\n  {tail}"));
        }
        self.0.clear();
        unclean
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, _, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating netportd")?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} not found next to netportd: build it with `cargo build --release -p {name}`",
            path.display()
        );
    }
    Ok(path)
}

pub fn run(args: Args) -> u8 {
    netport_common::init_logs(netport_common::LogFormat::Text);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return EXIT_FAIL;
        }
    };
    match rt.block_on(demo(args)) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("error: {e:#}");
            EXIT_FAIL
        }
    }
}

async fn demo(args: Args) -> Result<()> {
    let report = netport_policy::load(&args.policy)
        .with_context(|| format!("reading the policy {}", args.policy.display()))?;
    let Some(policy) = report.policy.clone() else {
        bail!(
            "the policy in {} is not valid:\n{}",
            args.policy.display(),
            report.render_plain()
        );
    };
    let rule = policy
        .listeners_for(CLIENT)
        .next()
        .with_context(|| format!("the demo policy must give portal `{CLIENT}` a listener"))?
        .clone();
    let service = policy.service(&rule.service).context("service")?.clone();
    let relay = policy
        .relays
        .first()
        .context("the demo policy needs a [[relay]]")?
        .clone();

    let dir = tempfile::tempdir()?;
    let d = dir.path();
    // Throwaway, but valid past the daemons' 30-day expiry warning, so the demo stays quiet.
    let demo_days = 2 * netport_common::expiry::DEFAULT_WARN_DAYS;
    let ca = Ca::generate(demo_days)?;
    std::fs::write(d.join("ca.crt"), ca.cert_pem())?;
    let issue = |role: Role, name: &str| -> Result<(PathBuf, PathBuf)> {
        let mut req = IssueRequest::new(role, name, demo_days);
        if role == Role::Server {
            req.ips = vec![args.listen.ip()];
        }
        let issued = ca.issue(&req)?;
        let (c, k) = (d.join(format!("{name}.crt")), d.join(format!("{name}.key")));
        std::fs::write(&c, &issued.chain_pem)?;
        std::fs::write(&k, &issued.key_pem)?;
        Ok((c, k))
    };
    let tls = |(c, k): &(PathBuf, PathBuf)| {
        format!(
            "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            d.join("ca.crt").display(),
            c.display(),
            k.display()
        )
    };
    let server_files = issue(Role::Server, "netportd")?;
    std::fs::write(
        d.join("netportd.toml"),
        format!(
            "listen = [\"{}\"]\npolicy = \"{}\"\nheartbeat_secs = 5\nadmin_listen = \"{}\"\naudit_log = \"audit.jsonl\"\n{}",
            args.listen,
            std::fs::canonicalize(&args.policy)?.display(),
            args.admin,
            tls(&server_files)
        ),
    )?;
    let config = server::Config::load(&d.join("netportd.toml"))?;
    let obs = server::observe(&config)?;
    let bound = server::bind(&config).await?;

    // The service behind the office portal.
    let target: SocketAddr = service
        .target
        .parse()
        .context("the demo service target must be ip:port")?;
    let web = tokio::net::TcpListener::bind(target)
        .await
        .with_context(|| format!("cannot start the demo web service on {target}"))?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = web.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let reply = format!(
                    "HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{BODY}",
                    BODY.len()
                );
                let _ = s.write_all(reply.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let server_task = tokio::spawn(server::run(bound, config, obs, stop_rx));

    let mut children = Children(Vec::new());
    let relay_files = issue(Role::Relay, &relay.name)?;
    std::fs::write(
        d.join("relayd.toml"),
        format!(
            "servers = [\"{}\"]\npublic_address = \"{}\"\nbind = \"127.0.0.1\"\nports = \"{}-{}\"\n{}",
            args.listen,
            relay.address,
            relay.port_first,
            relay.port_last,
            tls(&relay_files)
        ),
    )?;
    children.0.push((
        "relayd".into(),
        d.join("relayd.log"),
        spawn(
            &sibling("relayd")?,
            &d.join("relayd.toml"),
            &d.join("relayd.log"),
        )?,
    ));
    for name in [SERVER, CLIENT] {
        let files = issue(Role::Portal, name)?;
        let cfg = d.join(format!("portal-{name}.toml"));
        std::fs::write(
            &cfg,
            format!("servers = [\"{}\"]\n{}", args.listen, tls(&files)),
        )?;
        let log = d.join(format!("portal-{name}.log"));
        children.0.push((
            format!("portal {name}"),
            log.clone(),
            spawn(&sibling("portal")?, &cfg, &log)?,
        ));
    }

    // Prove a round trip through the tunnel.
    let listen = rule.listen.clone();
    let got = round_trip(&listen).await.with_context(|| {
        format!(
            "the demo round trip through {listen} failed; logs are in {}",
            d.display()
        )
    })?;
    if !got.ends_with(BODY) {
        bail!("unexpected answer through the tunnel: {got:?}");
    }
    println!(
        "\nNetport demo is up, on loopback, with policy {} ({}):",
        policy.short_hash(),
        args.policy.display()
    );
    println!("  server   netportd on {}", args.listen);
    println!(
        "  relay    {} on {} ports {}-{}",
        relay.name, relay.address, relay.port_first, relay.port_last
    );
    println!(
        "  portals  {CLIENT} (listens on {listen}) and {SERVER} (serves {} -> {})",
        service.name, service.target
    );
    println!(
        "\nProved one round trip: {CLIENT} -> {} -> {SERVER} -> {} answered {:?}",
        relay.name,
        service.target,
        BODY.trim()
    );
    println!(
        "\nTry it:  curl http://{listen}/   (goes through the tunnel, TLS end to end through the relay)"
    );
    println!(
        "Watch it: curl http://{}/status   (also /metrics); the audit log is {}",
        args.admin,
        d.join("audit.jsonl").display()
    );
    if args.once {
        println!("--once: done.");
    } else {
        println!(
            "Logs of the relay and portals: {}\nPress Ctrl-C to stop.",
            d.display()
        );
        netport_common::wait_for_signal().await;
    }
    // The relay and portals first, while the server still listens: each ends its control
    // connection cleanly, so the server's log shows departures, not broken connections.
    let unclean = children.stop(STOP_GRACE).await;
    for what in unclean {
        eprintln!("warning: {what}");
    }
    let _ = stop_tx.send(true);
    let _ = server_task.await;
    Ok(())
}

fn spawn(bin: &Path, config: &Path, log: &Path) -> Result<Child> {
    Command::new(bin)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

/// An HTTP request through the client portal's listener, retried while the system comes up.
async fn round_trip(listen: &str) -> Result<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        match try_once(listen).await {
            Ok(body) if !body.is_empty() => return Ok(body),
            Ok(_) => last = "empty answer".into(),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("no answer within 20 s (last: {last})")
}

async fn try_once(listen: &str) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(listen).await?;
    s.write_all(b"GET / HTTP/1.0\r\nhost: demo\r\n\r\n").await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}
