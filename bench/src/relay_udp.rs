//! `netport-bench relay-udp`: the relay's UDP forwarding rate, XDP against userspace.
//!
//! The topology of the namespace tests: peer X and peer Y in their own network namespaces,
//! each joined by veth to the relay's namespace, where the real (release) relayd runs with a
//! UDP allocation paired between them. X sends datagrams of one size as fast as one thread
//! can for `--seconds`; Y counts what arrives. Per path and size it prints what X offered,
//! what Y received (packets/s, Gbit/s of payload, loss), and the relay's CPU per forwarded
//! packet: for userspace, relayd's user+system time; for XDP, the program's own run time
//! (`kernel.bpf_stats_enabled`), relayd itself being idle. Both are lower bounds of what the
//! kernel spends around them (softirq, veth transmit), and everything shares the machine's
//! cores, so compare the two paths of one run, not figures across machines. Needs root.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netport_e2e::netns::{Relay, Topology, join, start_relay};
use netport_proto::control::{Message, Transport};
use netport_proto::relay::token_to_hex;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds of sending per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Payload sizes in bytes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "64,1400")]
    sizes: Vec<usize>,
    /// Paths to measure, comma-separated: xdp, userspace.
    #[arg(long, value_delimiter = ',', default_value = "userspace,xdp")]
    paths: Vec<String>,
}

struct Row {
    path: String,
    size: usize,
    offered_pps: f64,
    delivered_pps: f64,
    gbits: f64,
    loss: f64,
    cpu_ns_per_packet: f64,
    relayd_cpu_ns_per_packet: f64,
}

pub fn run(args: Args) -> Result<()> {
    if !netport_e2e::netns::is_root() {
        bail!("relay-udp needs root (network namespaces, XDP)");
    }
    let relayd = netport_e2e::binary("relayd");
    if !relayd.exists() {
        bail!(
            "{} is missing: cargo build --release -p relayd -p netport-bench",
            relayd.display()
        );
    }
    let stats_before = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .unwrap_or_else(|_| "0".into());
    netport_e2e::netns::run("sysctl", &["-q", "-w", "kernel.bpf_stats_enabled=1"])?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let mut rows = Vec::new();
        for path in &args.paths {
            let fast = match path.as_str() {
                "xdp" => "xdp",
                "userspace" => "userspace",
                other => bail!("unknown path {other}: xdp or userspace"),
            };
            rows.extend(measure_path(fast, &args).await?);
        }
        Ok(rows)
    });
    let _ = netport_e2e::netns::run(
        "sysctl",
        &[
            "-q",
            "-w",
            &format!("kernel.bpf_stats_enabled={}", stats_before.trim()),
        ],
    );
    let rows = result?;
    println!(
        "\n{:<10} {:>6} {:>12} {:>12} {:>8} {:>7} {:>13} {:>13}",
        "path",
        "bytes",
        "offered p/s",
        "relayed p/s",
        "Gbit/s",
        "loss",
        "CPU ns/pkt",
        "relayd ns/pkt"
    );
    for r in &rows {
        println!(
            "{:<10} {:>6} {:>12.0} {:>12.0} {:>8.2} {:>6.1}% {:>13.0} {:>13.0}",
            r.path,
            r.size,
            r.offered_pps,
            r.delivered_pps,
            r.gbits,
            r.loss * 100.0,
            r.cpu_ns_per_packet,
            r.relayd_cpu_ns_per_packet
        );
    }
    for size in &args.sizes {
        let get = |p: &str| rows.iter().find(|r| r.path == p && r.size == *size);
        if let (Some(x), Some(u)) = (get("xdp"), get("userspace")) {
            println!(
                "{size} bytes: XDP relayed {:.2}x the packets/s of userspace, at {:.2}x its CPU per packet",
                x.delivered_pps / u.delivered_pps.max(1.0),
                x.cpu_ns_per_packet / u.cpu_ns_per_packet.max(1.0)
            );
        }
    }
    Ok(())
}

/// relayd's user + system CPU time so far, in nanoseconds.
fn process_cpu_ns(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?;
    // USER_HZ is 100 on Linux.
    Ok(ticks * 10_000_000)
}

/// Run time and run count of every loaded `np_udp_relay` program (bench runs alone).
fn xdp_run_stats() -> (u64, u64) {
    let Ok(out) = netport_e2e::netns::run("bpftool", &["-j", "prog", "show"]) else {
        return (0, 0);
    };
    let Ok(progs) = serde_json::from_str::<serde_json::Value>(&out) else {
        return (0, 0);
    };
    let mut time = 0;
    let mut count = 0;
    for p in progs.as_array().into_iter().flatten() {
        if p["name"] == "np_udp_relay" {
            time += p["run_time_ns"].as_u64().unwrap_or(0);
            count += p["run_cnt"].as_u64().unwrap_or(0);
        }
    }
    (time, count)
}

async fn measure_path(fast: &str, args: &Args) -> Result<Vec<Row>> {
    let topo = Topology::new()?;
    let mut relay = start_relay(&topo, &format!("udp_fast_path = \"{fast}\"")).await?;
    let (ta, tb) = ([0x11u8; 32], [0x22u8; 32]);
    relay
        .conn
        .send(&Message::Allocate {
            alloc_id: 1,
            token_a: token_to_hex(&ta),
            token_b: token_to_hex(&tb),
            ttl_ms: 20_000,
            transport: Transport::Udp,
        })
        .await?;
    let (pa, pb) = match relay.conn.recv(Duration::from_secs(20)).await? {
        Message::Allocated { port_a, port_b, .. } => (port_a, port_b),
        other => bail!("expected allocated, got {other:?}"),
    };
    let ra: SocketAddr = format!("{}:{pa}", Topology::RELAY_X).parse()?;
    let rb: SocketAddr = format!("{}:{pb}", Topology::RELAY_Y).parse()?;
    let x = topo.x.udp("0.0.0.0:0")?;
    let y = topo.y.udp("0.0.0.0:0")?;
    let (jx, jy) = tokio::join!(join(&x, ra, &ta), join(&y, rb, &tb));
    jx?;
    jy?;
    // Y answers once so the relay's neighbour entries exist both ways.
    y.send_to(b"hi", rb).await?;
    let x = x.into_std()?;
    let y = y.into_std()?;
    x.set_nonblocking(false)?;
    y.set_nonblocking(false)?;
    y.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut rows = Vec::new();
    for &size in &args.sizes {
        rows.push(measure(&mut relay, fast, &x, &y, ra, size, args.seconds)?);
        let r = rows.last().context("row")?;
        eprintln!(
            "{fast:<10} {size:>5} B: offered {:.0} p/s, relayed {:.0} p/s",
            r.offered_pps, r.delivered_pps
        );
    }
    Ok(rows)
}

fn measure(
    relay: &mut Relay,
    path: &str,
    x: &std::net::UdpSocket,
    y: &std::net::UdpSocket,
    to: SocketAddr,
    size: usize,
    seconds: u64,
) -> Result<Row> {
    let pid = relay.daemon.child.id();
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let y = y.try_clone()?;
    let receiver = {
        let (stop, received) = (stop.clone(), received.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            // Drain leftovers of the previous size first.
            while y.recv(&mut buf).is_ok() {}
            received.store(0, Ordering::Relaxed);
            while !stop.load(Ordering::Relaxed) {
                if y.recv(&mut buf).is_ok() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let payload = vec![0x5au8; size];
    let cpu0 = process_cpu_ns(pid)?;
    let (xt0, xc0) = xdp_run_stats();
    let r0 = received.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        for _ in 0..64 {
            if x.send_to(&payload, to).is_ok() {
                sent += 1;
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Let the queues drain before counting.
    std::thread::sleep(Duration::from_millis(300));
    let got = received.load(Ordering::Relaxed) - r0;
    let cpu = process_cpu_ns(pid)? - cpu0;
    let (xt1, xc1) = xdp_run_stats();
    stop.store(true, Ordering::Relaxed);
    let _ = receiver.join();
    let relayd_per_packet = cpu as f64 / got.max(1) as f64;
    let xdp_per_packet = if xc1 > xc0 {
        (xt1 - xt0) as f64 / (xc1 - xc0) as f64
    } else {
        0.0
    };
    Ok(Row {
        path: path.to_string(),
        size,
        offered_pps: sent as f64 / elapsed,
        delivered_pps: got as f64 / elapsed,
        gbits: got as f64 * size as f64 * 8.0 / elapsed / 1e9,
        loss: 1.0 - got as f64 / sent.max(1) as f64,
        cpu_ns_per_packet: relayd_per_packet + xdp_per_packet,
        relayd_cpu_ns_per_packet: relayd_per_packet,
    })
}
