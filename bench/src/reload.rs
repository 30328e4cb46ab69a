//! `netport-bench reload`: how fast the GitOps loop turns a sync tool's change into running
//! state, on loopback with the release binaries.
//!
//! The policy directory is published the way git-sync does it: every revision is a new
//! directory `rev-N`, and `policy -> rev-N` is swapped by renaming a new symlink over the old
//! one. Two figures, each over many changes:
//!
//! - **activation**: from the rename to netportd's `/status` showing the new policy hash;
//! - **revocation**: from the rename that adds a `[[revoked]]` key to the end of a connection
//!   held open through the revoked portal's link.
//!
//! Both include netportd's debounce (`--debounce-ms`, the daemon's `reload_debounce_ms`),
//! which is most of the activation time by design: a burst of writes becomes one reload.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use netport_proto::identity::Role;
use tokio::io::AsyncReadExt;

use crate::tunnel::{
    Certs, Proc, echo_once, free_ports, local, netport_bin_dir, path_str, start_service, wait_echo,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Policy changes to time (activation).
    #[arg(long, default_value_t = 50)]
    pub changes: usize,
    /// Revocations to time (each is undone and the portal restarted between rounds).
    #[arg(long, default_value_t = 10)]
    pub revocations: usize,
    /// netportd's `reload_debounce_ms` for the run.
    #[arg(long, default_value_t = 300)]
    pub debounce_ms: u64,
    /// Directory with the release netportd, relayd and portal (default: next to this binary).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let bins = netport_bin_dir(args.bin_dir.as_deref())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(bench(&args, &bins))
}

/// The git-sync style policy root: `rev-N` directories and the `policy` link.
struct Publisher {
    root: PathBuf,
    rev: usize,
}

impl Publisher {
    fn link(&self) -> PathBuf {
        self.root.join("policy")
    }

    /// Writes revision N+1 and returns (its expected hash, a function that flips to it).
    fn prepare(&mut self, text: &str) -> Result<(String, PathBuf)> {
        self.rev += 1;
        let name = format!("rev-{}", self.rev);
        let dir = self.root.join(&name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("policy.toml"), text)?;
        let report = netport_policy::load(&dir)?;
        let Some(p) = report.policy else {
            bail!("benchmark policy invalid:\n{}", report.render_plain());
        };
        let tmp = self.root.join("policy.tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&name, &tmp)?;
        Ok((p.hash.clone(), tmp))
    }

    /// The atomic swap a sync tool does.
    fn flip(&self, tmp: &Path) -> Result<()> {
        std::fs::rename(tmp, self.link())?;
        Ok(())
    }
}

fn policy(relay: (u16, u16), service: std::net::SocketAddr, listen: u16, extra: &str) -> String {
    format!(
        r#"[[portal]]
name = "bench-client"

[[portal]]
name = "bench-server"

[[relay]]
name = "relay-1"
address = "127.0.0.1"
ports = "{}-{}"

[[service]]
name = "bench"
portal = "bench-server"
target = "{service}"

[[access]]
name = "bench"
from = ["bench-client"]
listen = "127.0.0.1:{listen}"
service = "bench"
{extra}
"#,
        relay.0, relay.1
    )
}

async fn status_hash(admin: &str) -> Result<String> {
    let (code, body) = netport_common::admin::get(admin, "/status").await?;
    ensure!(code == 200, "/status answered {code}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    Ok(v["policy"]["hash"].as_str().unwrap_or_default().to_string())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

async fn bench(args: &Args, bins: &Path) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().to_path_buf();
    let certs = Certs::new(&root.join("pki"))?;
    let service = start_service().await?;
    let first = free_ports(40)?;
    let relay = (first, first + 39);
    let control = local(free_ports(1)?);
    let admin = local(free_ports(1)?).to_string();
    let listen = free_ports(1)?;
    let mut publisher = Publisher {
        root: root.clone(),
        rev: 0,
    };
    let (_, tmp_link) = publisher.prepare(&policy(relay, service, listen, ""))?;
    publisher.flip(&tmp_link)?;

    let tls = |role: Role, name: &str| -> Result<(String, PathBuf)> {
        let (chain, leaf, key) = certs.issue(role, name)?;
        Ok((
            format!(
                "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                certs.ca_path.display(),
                chain.display(),
                key.display()
            ),
            leaf,
        ))
    };
    let start = |name: &str, bin: &str, args: &[&str], config: &str| -> Result<Proc> {
        let cfg = root.join(format!("{name}.toml"));
        std::fs::write(&cfg, config)?;
        let mut cmd = Command::new(bins.join(bin));
        cmd.args(args)
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "info");
        Proc::spawn(name, cmd, &root.join(format!("{name}.log")))
    };
    let mut procs = vec![start(
        "netportd",
        "netportd",
        &["run"],
        &format!(
            "listen = [\"{control}\"]\npolicy = \"{}\"\nadmin_listen = \"{admin}\"\nreload_debounce_ms = {}\nheartbeat_secs = 5\n{}",
            path_str(&publisher.link())?,
            args.debounce_ms,
            tls(Role::Server, "netportd")?.0
        ),
    )?];
    procs.push(start(
        "relayd",
        "relayd",
        &[],
        &format!(
            "servers = [\"{control}\"]\npublic_address = \"127.0.0.1\"\nbind = \"127.0.0.1\"\nports = \"{}-{}\"\n{}",
            relay.0,
            relay.1,
            tls(Role::Relay, "relay-1")?.0
        ),
    )?);
    let (server_tls, _) = tls(Role::Portal, "bench-server")?;
    procs.push(start(
        "portal-bench-server",
        "portal",
        &[],
        &format!("servers = [\"{control}\"]\n{server_tls}"),
    )?);
    let (client_tls, client_leaf) = tls(Role::Portal, "bench-client")?;
    let client_cfg = format!("servers = [\"{control}\"]\n{client_tls}");
    procs.push(start("portal-bench-client", "portal", &[], &client_cfg)?);
    let entry = local(listen);
    wait_echo(entry, Duration::from_secs(30), &mut procs).await?;
    let der = netportd::pki::first_certificate(&std::fs::read(&client_leaf)?)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let spki = hex::encode(netport_proto::identity::inspect(&der)?.spki_sha256);

    // Activation: 50 changes, each adding a portal.
    let mut extra = String::new();
    let mut activation = Vec::new();
    for i in 0..args.changes {
        extra.push_str(&format!("[[portal]]\nname = \"extra-{i}\"\n"));
        let (hash, link) = publisher.prepare(&policy(relay, service, listen, &extra))?;
        let t0 = Instant::now();
        publisher.flip(&link)?;
        loop {
            if status_hash(&admin).await? == hash {
                break;
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(30),
                "change {i} not active after 30 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        activation.push(t0.elapsed());
        for p in procs.iter_mut() {
            p.check_alive()?;
        }
    }

    // Revocation: a connection held through the client's link ends.
    let revoked = format!("[[revoked]]\nspki_sha256 = \"{spki}\"\nreason = \"benchmark\"\n");
    let mut revocation = Vec::new();
    for i in 0..args.revocations {
        let mut held = echo_once(entry, Duration::from_secs(10)).await?;
        let (_, link) = publisher.prepare(&policy(
            relay,
            service,
            listen,
            &format!("{extra}{revoked}"),
        ))?;
        let t0 = Instant::now();
        publisher.flip(&link)?;
        let mut b = [0u8; 64];
        let ended = tokio::time::timeout(Duration::from_secs(30), held.read(&mut b)).await;
        ensure!(
            ended.is_ok(),
            "revocation {i}: the held connection did not end"
        );
        revocation.push(t0.elapsed());
        // Undo, and restart the client portal so it reconnects at once (a refused portal
        // backs off).
        let (hash, link) = publisher.prepare(&policy(relay, service, listen, &extra))?;
        publisher.flip(&link)?;
        while status_hash(&admin).await? != hash {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        procs.pop();
        procs.push(start("portal-bench-client", "portal", &[], &client_cfg)?);
        wait_echo(entry, Duration::from_secs(30), &mut procs).await?;
    }

    activation.sort();
    revocation.sort();
    println!(
        "GitOps loop, git-sync style symlink flips, reload_debounce_ms = {}:",
        args.debounce_ms
    );
    println!("| measurement | changes | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    println!(
        "| rename -> new policy active (/status) | {} | {} | {} | {} |",
        activation.len(),
        ms(percentile(&activation, 0.5)),
        ms(percentile(&activation, 0.99)),
        ms(activation.last().copied().unwrap_or_default())
    );
    println!(
        "| rename adding [[revoked]] -> held connection cut | {} | {} | {} | {} |",
        revocation.len(),
        ms(percentile(&revocation, 0.5)),
        ms(percentile(&revocation, 0.99)),
        ms(revocation.last().copied().unwrap_or_default())
    );
    Ok(())
}
