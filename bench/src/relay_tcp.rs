//! `netport-bench relay-tcp`: the relay's TCP forwarding paths, copy against splice(2)
//! against sockmap (`tcp_fast_path`).
//!
//! The topology of the namespace tests: peer X and peer Y in their own network namespaces,
//! each joined by veth to the relay's namespace, where the real (release) relayd runs with a
//! TCP allocation paired between them (nftables drops forwarded traffic, so every byte goes
//! through relayd's sockets). Per round and path (paths interleaved within each round, so
//! drift of the shared machine hits all of them alike), on one allocation:
//!
//! - round trips: X sends a 64-byte message, Y echoes it, X waits for it; p50 and p99;
//! - bulk: X sends `--mib` MiB and closes, Y reads to the end; Gbit/s of payload from X's
//!   first byte to Y's end of stream, TCP segments/s received in the relay's namespace, and
//!   CPU per GB: relayd's own (utime+stime from /proc/PID/stat); relayd's plus the kernel's
//!   worker and softirq threads' (`kworker/*`, `ksoftirqd/*`: the sockmap sends redirected
//!   segments from a work queue, so relayd's own time misses its cost); and the whole
//!   machine's (busy jiffies of /proc/stat), which includes X, Y and anything else running:
//!   on a machine whose cores are all busy it only restates the transfer's duration.
//!
//! Medians over rounds. Needs root (network namespaces, the sockmap program).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netport_e2e::netns::{Relay, Topology, start_relay};
use netport_proto::control::{Message, Transport};
use netport_proto::relay::{READY, Token, encode_hello, token_to_hex};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Rounds; every path is measured once per round.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// MiB sent through each bulk transfer.
    #[arg(long, default_value_t = 1024)]
    mib: usize,
    /// Round trips per latency measurement.
    #[arg(long, default_value_t = 5000)]
    round_trips: usize,
    /// Paths to measure, comma-separated: copy, splice, sockmap.
    #[arg(long, value_delimiter = ',', default_value = "copy,splice,sockmap")]
    paths: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    gbits: f64,
    segs_per_sec: f64,
    relayd_cpu_s_per_gb: f64,
    relay_side_cpu_s_per_gb: f64,
    machine_cpu_s_per_gb: f64,
    rtt_p50_us: f64,
    rtt_p99_us: f64,
}

pub fn run(args: Args) -> Result<()> {
    if !netport_e2e::netns::is_root() {
        bail!("relay-tcp needs root (network namespaces, the sockmap program)");
    }
    let relayd = netport_e2e::binary("relayd");
    if !relayd.exists() {
        bail!(
            "{} is missing: cargo build --release -p relayd -p netport-bench",
            relayd.display()
        );
    }
    for p in &args.paths {
        if !["copy", "splice", "sockmap"].contains(&p.as_str()) {
            bail!("unknown path {p}: copy, splice or sockmap");
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("load average at start: {}", load().trim());
    let topo = Topology::new()?;
    let mut samples: Vec<(String, Sample)> = Vec::new();
    for round in 0..args.rounds {
        for path in &args.paths {
            let s = rt.block_on(measure(&topo, path, &args))?;
            eprintln!(
                "round {} {path:<8} {:>6.2} Gbit/s  {:>8.0} seg/s  relayd {:>5.2} CPU s/GB  +kernel threads {:>5.2}  machine {:>5.2} CPU s/GB  rtt p50 {:>5.0} us p99 {:>5.0} us",
                round + 1,
                s.gbits,
                s.segs_per_sec,
                s.relayd_cpu_s_per_gb,
                s.relay_side_cpu_s_per_gb,
                s.machine_cpu_s_per_gb,
                s.rtt_p50_us,
                s.rtt_p99_us
            );
            samples.push((path.clone(), s));
        }
    }
    println!(
        "\nmedians of {} rounds, {} MiB per bulk transfer, {} round trips of 64 bytes; load average at the end: {}",
        args.rounds,
        args.mib,
        args.round_trips,
        load().trim()
    );
    println!(
        "{:<8} {:>8} {:>10} {:>12} {:>16} {:>13} {:>8} {:>8}",
        "path",
        "Gbit/s",
        "seg/s",
        "relayd s/GB",
        "+kworker s/GB",
        "machine s/GB",
        "p50 us",
        "p99 us"
    );
    let mut medians = Vec::new();
    for path in &args.paths {
        let of = |f: fn(&Sample) -> f64| {
            median(
                samples
                    .iter()
                    .filter(|(p, _)| p == path)
                    .map(|(_, s)| f(s))
                    .collect(),
            )
        };
        let m = Sample {
            gbits: of(|s| s.gbits),
            segs_per_sec: of(|s| s.segs_per_sec),
            relayd_cpu_s_per_gb: of(|s| s.relayd_cpu_s_per_gb),
            relay_side_cpu_s_per_gb: of(|s| s.relay_side_cpu_s_per_gb),
            machine_cpu_s_per_gb: of(|s| s.machine_cpu_s_per_gb),
            rtt_p50_us: of(|s| s.rtt_p50_us),
            rtt_p99_us: of(|s| s.rtt_p99_us),
        };
        println!(
            "{:<8} {:>8.2} {:>10.0} {:>12.2} {:>16.2} {:>13.2} {:>8.0} {:>8.0}",
            path,
            m.gbits,
            m.segs_per_sec,
            m.relayd_cpu_s_per_gb,
            m.relay_side_cpu_s_per_gb,
            m.machine_cpu_s_per_gb,
            m.rtt_p50_us,
            m.rtt_p99_us
        );
        medians.push((path.clone(), m));
    }
    if let Some((_, base)) = medians.iter().find(|(p, _)| p == "copy") {
        for (path, m) in medians.iter().filter(|(p, _)| p != "copy") {
            println!(
                "{path} against copy: {:.2}x the throughput, {:.2}x relayd's CPU per GB, {:.2}x relayd's and the kernel threads', {:.2}x the machine's, {:.2}x the p50 round trip",
                m.gbits / base.gbits.max(1e-9),
                m.relayd_cpu_s_per_gb / base.relayd_cpu_s_per_gb.max(1e-9),
                m.relay_side_cpu_s_per_gb / base.relay_side_cpu_s_per_gb.max(1e-9),
                m.machine_cpu_s_per_gb / base.machine_cpu_s_per_gb.max(1e-9),
                m.rtt_p50_us / base.rtt_p50_us.max(1e-9)
            );
        }
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// relayd's user + system CPU time so far, in seconds.
fn process_cpu_s(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?;
    // USER_HZ is 100 on Linux.
    Ok(ticks as f64 / 100.0)
}

/// CPU time so far of the kernel's worker and softirq threads (`kworker/*`, `ksoftirqd/*`),
/// in seconds: where the sockmap's redirected segments are sent from (a work queue).
fn kernel_threads_cpu_s() -> Result<f64> {
    let mut ticks = 0u64;
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map(|(_, c)| c).unwrap_or("");
        if !(comm.starts_with("kworker") || comm.starts_with("ksoftirqd")) {
            continue;
        }
        let f: Vec<&str> = rest.split_whitespace().collect();
        let get = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        ticks += get(11) + get(12);
    }
    Ok(ticks as f64 / 100.0)
}

/// Busy CPU time of the whole machine so far (all but idle and iowait), in seconds.
fn machine_cpu_s() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let busy: u64 = v
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| x)
        .sum();
    Ok(busy as f64 / 100.0)
}

/// A connection from inside `ns` to the relay, hello sent.
fn dial(ns: &netport_e2e::netns::Netns, to: String, token: Token) -> Result<TcpStream> {
    let s = ns.enter(move || -> Result<TcpStream> {
        let mut s = TcpStream::connect(&to)?;
        s.set_nodelay(true)?;
        s.write_all(&encode_hello(&token))?;
        Ok(s)
    })??;
    Ok(s)
}

fn expect_ready(s: &mut TcpStream) -> Result<()> {
    let mut got = [0u8; 4];
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.read_exact(&mut got)?;
    if got != READY[..] {
        bail!("the relay answered {got:?}, not READY");
    }
    s.set_read_timeout(None)?;
    Ok(())
}

async fn allocate(relay: &mut Relay) -> Result<(u16, u16)> {
    relay
        .conn
        .send(&Message::Allocate {
            alloc_id: 1,
            token_a: token_to_hex(&[0x31; 32]),
            token_b: token_to_hex(&[0x32; 32]),
            ttl_ms: 20_000,
            transport: Transport::Tcp,
        })
        .await?;
    match relay.conn.recv(Duration::from_secs(20)).await? {
        Message::Allocated { port_a, port_b, .. } => Ok((port_a, port_b)),
        other => bail!("expected allocated, got {other:?}"),
    }
}

async fn measure(topo: &Topology, path: &str, args: &Args) -> Result<Sample> {
    let mut relay = start_relay(topo, &format!("tcp_fast_path = \"{path}\"")).await?;
    let (pa, pb) = allocate(&mut relay).await?;
    let mut x = dial(&topo.x, format!("{}:{pa}", Topology::RELAY_X), [0x31; 32])?;
    let mut y = dial(&topo.y, format!("{}:{pb}", Topology::RELAY_Y), [0x32; 32])?;
    expect_ready(&mut x)?;
    expect_ready(&mut y)?;
    let log = relay.daemon.log_text();
    if path == "sockmap" && log.contains("TCP sockmap fast path unavailable") {
        bail!("the sockmap program did not load:\n{log}");
    }
    let pid = relay.daemon.child.id();
    let round_trips = args.round_trips;
    let bytes = args.mib << 20;
    // Y: echo round_trips messages of 64 bytes, then read the bulk to its end.
    let reader = std::thread::spawn(move || -> Result<(usize, Instant)> {
        let mut msg = [0u8; 64];
        for _ in 0..round_trips {
            y.read_exact(&mut msg)?;
            y.write_all(&msg)?;
        }
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        loop {
            let n = y.read(&mut buf)?;
            if n == 0 {
                return Ok((got, Instant::now()));
            }
            got += n;
        }
    });
    let mut msg = [0x5au8; 64];
    let mut rtts = Vec::with_capacity(round_trips);
    for _ in 0..round_trips {
        let t = Instant::now();
        x.write_all(&msg)?;
        x.read_exact(&mut msg)?;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let segs0 = topo.relay.snmp("Tcp", "InSegs")?;
    let (cpu0, kernel0, machine0) = (
        process_cpu_s(pid)?,
        kernel_threads_cpu_s()?,
        machine_cpu_s()?,
    );
    let chunk = vec![0xa5u8; 1 << 20];
    let started = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        let n = chunk.len().min(bytes - sent);
        x.write_all(&chunk[..n])?;
        sent += n;
    }
    x.shutdown(std::net::Shutdown::Write)?;
    let (got, ended) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader thread panicked"))??;
    let (cpu1, kernel1, machine1) = (
        process_cpu_s(pid)?,
        kernel_threads_cpu_s()?,
        machine_cpu_s()?,
    );
    let segs = topo.relay.snmp("Tcp", "InSegs")? - segs0;
    if got != bytes {
        bail!("{got} of {bytes} bytes crossed the relay");
    }
    let secs = ended.duration_since(started).as_secs_f64();
    let gb = bytes as f64 / 1e9;
    let p = |q: f64| {
        let mut v = rtts.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
    };
    drop(x);
    Ok(Sample {
        gbits: bytes as f64 * 8.0 / secs / 1e9,
        segs_per_sec: segs as f64 / secs,
        relayd_cpu_s_per_gb: (cpu1 - cpu0) / gb,
        relay_side_cpu_s_per_gb: (cpu1 - cpu0 + kernel1 - kernel0) / gb,
        machine_cpu_s_per_gb: (machine1 - machine0) / gb,
        rtt_p50_us: p(0.5),
        rtt_p99_us: p(0.99),
    })
}
