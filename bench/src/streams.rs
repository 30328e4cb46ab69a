//! Many concurrent streams through one relay and one pair of portals: memory per stream.
//!
//! The echo service runs in a child process (this binary, `echo-service`), so the benchmark
//! process holds only the client ends: 10,000 streams need 10,000 descriptors on each side.
//! Every stream is proved alive by an echoed byte when it opens and again after the memory
//! reading (a path that dropped streams would look cheap).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::tunnel::{
    Proc, echo_once, free_ports, local, netport_bin_dir, start_netport, wait_echo,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Concurrent streams to hold open through the one link.
    #[arg(long, default_value_t = 10_000)]
    streams: usize,
    /// Where netportd, relayd and portal are (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Keep the temporary directory (configurations, certificates, logs) and print its path.
    #[arg(long)]
    keep: bool,
}

pub fn run(args: Args) -> Result<()> {
    if args.streams == 0 || args.streams > 16_000 {
        bail!(
            "--streams must be between 1 and 16000 (a portal's max_streams_per_link is at most 16384)"
        );
    }
    let bins = netport_bin_dir(args.bin_dir.as_deref())?;
    let need = args.streams as u64 + 512;
    netport_common::raise_open_files_limit();
    let soft = netport_e2e::open_file_limit()?;
    if soft < need {
        bail!(
            "the open files limit is {soft} (the hard limit), below the {need} this run needs \
             in each process: raise it (ulimit -Hn {need}) or pass a smaller --streams"
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async {
        tokio::select! {
            r = bench(&args, &bins) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted; child processes stopped")),
        }
    })
}

/// The hidden `echo-service` command: the benchmark's echo service on `listen`, until killed.
pub fn echo_service(listen: SocketAddr) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind(listen).await?;
        loop {
            let (s, _) = l.accept().await?;
            tokio::spawn(async move {
                let _ = crate::tunnel::serve(s).await;
            });
        }
    })
}

async fn echo_byte(s: &mut TcpStream, b: u8) -> Result<()> {
    tokio::time::timeout(Duration::from_secs(10), async {
        s.write_all(&[b]).await?;
        let mut got = [0u8; 1];
        s.read_exact(&mut got).await?;
        anyhow::ensure!(got[0] == b, "wrong echo");
        Ok(())
    })
    .await
    .map_err(|_| anyhow!("no echo within 10 s"))?
}

async fn bench(args: &Args, bins: &std::path::Path) -> Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("netport-bench-streams-")
        .tempdir()?;
    let root = tmp.path().to_path_buf();
    let service = local(free_ports(1)?);
    let exe = std::env::current_exe().context("locating this binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("echo-service")
        .arg("--listen")
        .arg(service.to_string());
    let mut echo = Proc::spawn("echo-service", cmd, &root.join("echo-service.log"))?;
    wait_echo(
        service,
        Duration::from_secs(10),
        std::slice::from_mut(&mut echo),
    )
    .await?;

    let n = args.streams;
    // The client portal must carry all of them on one link.
    let peer = start_netport(
        &root,
        bins,
        service,
        &format!("max_streams_per_link = {}", (n + 16).max(1024)),
        "copy",
    )
    .await
    .context("starting Netport (netportd, relayd, 2 portals)")?;
    println!(
        "netport-bench streams: {n} concurrent streams through one relay and one pair of portals \
         (one link); echo service in its own process on {service}"
    );

    // Baseline: the link is up (wait_echo went through it) and one stream is open.
    let first = echo_once(peer.entry, Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (base_total, base) = peer.rss();

    let started = Instant::now();
    let mut held = Vec::with_capacity(n);
    while held.len() < n {
        if started.elapsed() > Duration::from_secs(300) {
            bail!("only {} of {n} streams opened within 300 s", held.len());
        }
        let s = echo_once(peer.entry, Duration::from_secs(10))
            .await
            .with_context(|| format!("stream {} of {n}", held.len() + 1))?;
        held.push(s);
    }
    let open_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let (total, per) = peer.rss();
    // Every stream still carries: one more byte each way on each.
    for (i, s) in held.iter_mut().enumerate() {
        echo_byte(s, (i % 251) as u8)
            .await
            .with_context(|| format!("stream {i} no longer echoes"))?;
    }
    let links = link_lines(&root);

    println!(
        "  opened {n} streams in {open_secs:.1} s ({:.0}/s), every one echoed again after the reading",
        n as f64 / open_secs
    );
    println!("  links set up for them: {links} (one expected)");
    println!("  | process | RSS before (KiB) | RSS with {n} streams (KiB) | KiB per stream |");
    println!("  |---|---:|---:|---:|");
    for ((name, before), (_, during)) in base.iter().zip(per.iter()) {
        println!(
            "  | {name} | {before} | {during} | {:.2} |",
            during.saturating_sub(*before) as f64 / n as f64
        );
    }
    println!(
        "  | all | {base_total} | {total} | {:.2} |",
        total.saturating_sub(base_total) as f64 / n as f64
    );

    drop(held);
    drop(first);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (after, _) = peer.rss();
    println!("  all processes after the streams closed: {after} KiB (before: {base_total} KiB)");
    if args.keep {
        let kept = tmp.keep();
        println!("  kept {}", kept.display());
    }
    drop(peer);
    drop(echo);
    Ok(())
}

/// How many links the client portal set up (its "link up" log lines).
fn link_lines(root: &std::path::Path) -> usize {
    let log = root.join("netport").join("portal-bench-client.log");
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("link up"))
        .count()
}
