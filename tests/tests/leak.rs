//! Leak test: many connections opened and closed through a tunnel, then every process's file
//! descriptors back at their baseline and its resident memory within 10 % of it.
//!
//! CI runs 2,000 cycles; `NETPORT_LEAK_CYCLES=100000` runs the full benchmark (bench/README.md).

use std::time::Duration;

use anyhow::{Context, Result};
use netport_e2e::{System, echo_service, wait_listening};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(30);
const PROCESSES: [&str; 4] = ["netportd", "relayd", "portal-alice", "portal-nas"];

fn policy(target: &str, listen_port: u16) -> String {
    format!(
        r#"
[[portal]]
name = "alice"
[[portal]]
name = "nas"
[[service]]
name = "echo"
portal = "nas"
target = "{target}"
[[access]]
name = "alice-echo"
from = ["alice"]
listen = "127.0.0.1:{listen_port}"
service = "echo"
"#
    )
}

/// `n` open/echo/close cycles, `workers` at a time.
async fn cycles(listen: &str, n: usize, workers: usize) -> Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let listen = listen.to_string();
        let share = n / workers + usize::from(w < n % workers);
        tasks.spawn(async move {
            let out = [0x42u8; 512];
            let mut back = [0u8; 512];
            for _ in 0..share {
                let mut c = TcpStream::connect(&listen).await?;
                c.write_all(&out).await?;
                tokio::time::timeout(T, c.read_exact(&mut back))
                    .await
                    .context("echo stalled")??;
                anyhow::ensure!(back == out, "bytes changed on the way");
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_close_cycles_leave_descriptors_and_memory_at_their_baseline() -> Result<()> {
    let n: usize = std::env::var("NETPORT_LEAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let echo = echo_service().await?;
    let (port, _) = netport_e2e::free_port_range(1)?;
    let mut sys = System::start(&policy(&echo.to_string(), port), &["alice", "nas"])?;
    let listen = format!("127.0.0.1:{port}");
    wait_listening(&listen, T).await?;
    sys.wait_ready().await?;

    // Warm up (the link, buffers, allocator pools), then take the baseline with the link up.
    cycles(&listen, 300, 8).await.with_context(|| sys.logs())?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut base = Vec::new();
    for p in PROCESSES {
        let d = sys.daemon(p)?;
        base.push((d.fd_count()?, d.rss_kib()?));
    }

    let started = std::time::Instant::now();
    cycles(&listen, n, 8).await.with_context(|| sys.logs())?;
    let took = started.elapsed();

    // Everything closes within a few seconds; the link may stay up (or close when idle).
    let deadline = tokio::time::Instant::now() + T;
    let report = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut ok = true;
        let mut report = format!("{n} cycles in {:.1} s", took.as_secs_f64());
        for (p, (fds0, rss0)) in PROCESSES.iter().zip(&base) {
            let d = sys.daemon(p)?;
            let (fds, rss) = (d.fd_count()?, d.rss_kib()?);
            report.push_str(&format!(
                "; {p}: fds {fds0} -> {fds}, RSS {rss0} -> {rss} KiB"
            ));
            ok &= fds <= *fds0 && (rss as f64) <= (*rss0 as f64) * 1.10;
        }
        if ok {
            break report;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "descriptors or memory did not return to the baseline: {report}"
        );
    };
    println!("{report}");
    Ok(())
}
