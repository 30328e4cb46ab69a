//! `netport-bench udp-tunnel`: UDP throughput through a whole tunnel (client → portal →
//! relay → portal → UDP service) against the same client sending to the service directly.
//!
//! On 127.0.0.1 with the release binaries next to this one (netportd, relayd, portal), the
//! layout of the end-to-end tests' `System`. Per round, size and path (interleaved), one
//! thread sends datagrams as fast as it can for `--seconds` while the service counts what
//! arrives whole; the tunnel carries UDP flows over the portals' TLS link through the relay's
//! TCP pair (links over QUIC are not wired into the portals yet). Medians over rounds.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netport_e2e::{System, wait_log};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Rounds; every size and path is measured once per round.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds of sending per measurement.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Payload sizes in bytes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "64,1400")]
    sizes: Vec<usize>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    offered_pps: f64,
    delivered_pps: f64,
    gbits: f64,
    loss: f64,
}

/// A UDP service that counts the datagrams of one expected size.
struct Sink {
    addr: SocketAddr,
    size: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Sink {
    fn start() -> Result<Sink> {
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let sink = Sink {
            addr: sock.local_addr()?,
            size: Arc::default(),
            received: Arc::default(),
            stop: Arc::default(),
        };
        let (size, received, stop) = (sink.size.clone(), sink.received.clone(), sink.stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf)
                    && n as u64 == size.load(Ordering::Relaxed)
                {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Ok(sink)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn policy(target: SocketAddr, listen_port: u16) -> String {
    format!(
        r#"
[[portal]]
name = "alice"

[[portal]]
name = "nas"

[[service]]
name = "sink"
portal = "nas"
target = "{target}"
protocol = "udp"

[[access]]
name = "alice-sink"
from = ["alice"]
listen = "127.0.0.1:{listen_port}"
service = "sink"
"#
    )
}

pub fn run(args: Args) -> Result<()> {
    for bin in ["netportd", "relayd", "portal"] {
        let path = netport_e2e::binary(bin);
        if !path.exists() {
            bail!(
                "{} is missing: cargo build --release -p netportd -p relayd -p portal -p netport-bench",
                path.display()
            );
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let sink = Sink::start()?;
    let (port, _) = netport_e2e::free_port_range(1)?;
    // The portals as shipped: `quic = "udp"`, so this UDP service gets a link over QUIC.
    let sys = System::start_quic_mode(&policy(sink.addr, port), &["alice", "nas"], None)?;
    rt.block_on(async {
        sys.wait_ready().await?;
        wait_log(
            &sys,
            "portal-alice",
            "listening (udp)",
            Duration::from_secs(30),
        )
        .await
    })?;
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let client = UdpSocket::bind("127.0.0.1:0")?;
    // The first datagram opens the flow and the link: wait until one arrives.
    sink.size.store(8, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while sink.received.load(Ordering::Relaxed) == 0 {
        if Instant::now() > deadline {
            bail!("no datagram crossed the tunnel:\n{}", sys.logs());
        }
        client.send_to(b"warm-up!", listen)?;
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut samples: Vec<(&str, usize, Sample)> = Vec::new();
    for round in 0..args.rounds {
        for &size in &args.sizes {
            for (path, to) in [("direct", sink.addr), ("netport", listen)] {
                let s = measure(&sink, &client, to, size, args.seconds)?;
                eprintln!(
                    "round {} {path:<8} {size:>5} B: offered {:>8.0} p/s, delivered {:>8.0} p/s, {:.3} Gbit/s, loss {:.1}%",
                    round + 1,
                    s.offered_pps,
                    s.delivered_pps,
                    s.gbits,
                    100.0 * s.loss
                );
                samples.push((path, size, s));
            }
        }
    }
    println!(
        "\nmedians of {} rounds of {} s; load average at the end: {}",
        args.rounds,
        args.seconds,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "{:<8} {:>6} {:>12} {:>13} {:>8} {:>7}",
        "path", "bytes", "offered p/s", "delivered p/s", "Gbit/s", "loss"
    );
    for &size in &args.sizes {
        let mut delivered = Vec::new();
        for path in ["direct", "netport"] {
            let of = |f: fn(&Sample) -> f64| {
                let mut v: Vec<f64> = samples
                    .iter()
                    .filter(|(p, z, _)| *p == path && *z == size)
                    .map(|(_, _, s)| f(s))
                    .collect();
                v.sort_by(|a, b| a.total_cmp(b));
                v.get(v.len() / 2).copied().unwrap_or(0.0)
            };
            let (offered, got, gbits, loss) = (
                of(|s| s.offered_pps),
                of(|s| s.delivered_pps),
                of(|s| s.gbits),
                of(|s| s.loss),
            );
            println!(
                "{path:<8} {size:>6} {offered:>12.0} {got:>13.0} {gbits:>8.3} {:>6.1}%",
                100.0 * loss
            );
            delivered.push(got);
        }
        println!(
            "{size} bytes: the tunnel delivered {:.2}x the datagrams/s of direct UDP",
            delivered[1] / delivered[0].max(1.0)
        );
    }
    Ok(())
}

fn measure(
    sink: &Sink,
    client: &UdpSocket,
    to: SocketAddr,
    size: usize,
    seconds: u64,
) -> Result<Sample> {
    sink.size.store(size as u64, Ordering::Relaxed);
    // Leftovers of the previous measurement drain first.
    std::thread::sleep(Duration::from_millis(500));
    let r0 = sink.received.load(Ordering::Relaxed);
    let payload = vec![0x5au8; size];
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        for _ in 0..64 {
            if client.send_to(&payload, to).is_ok() {
                sent += 1;
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // The rate counts what arrived while the client sent; what was still in the tunnel's
    // buffers then arrives within the next second and counts for the loss only.
    let during = sink.received.load(Ordering::Relaxed) - r0;
    std::thread::sleep(Duration::from_millis(1000));
    let got = sink
        .received
        .load(Ordering::Relaxed)
        .checked_sub(r0)
        .context("counter went back")?;
    Ok(Sample {
        offered_pps: sent as f64 / elapsed,
        delivered_pps: during as f64 / elapsed,
        gbits: during as f64 * size as f64 * 8.0 / elapsed / 1e9,
        loss: 1.0 - got as f64 / sent.max(1) as f64,
    })
}
