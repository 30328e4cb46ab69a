//! relayd's UDP allocations, the real binary in a network namespace between two peers in
//! their own namespaces, driven by a scripted netportd: pairing by token, then 10,000
//! datagrams each way, through the XDP fast path and through the userspace forwarder.
//! Needs root (skips loudly otherwise; CI runs as root).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use netport_e2e::log_field;
use netport_e2e::netns::{
    Relay, Topology, join, register, skip_unless_root, start_relay, start_relay_wrapped,
};
use netport_proto::control::{Message, Transport};
use netport_proto::relay::token_to_hex;
use tokio::net::UdpSocket;

const T: Duration = Duration::from_secs(20);

/// Payload `seq` of a mixed-size series (1 to 1472 bytes: no IP fragments at MTU 1500).
fn payload(tag: u8, seq: u32) -> Vec<u8> {
    let len = 1 + (seq as usize * 7919) % 1472;
    (0..len)
        .map(|i| match i {
            0 => tag,
            1..=4 => seq.to_be_bytes()[i - 1],
            _ => (i as u32 ^ seq).wrapping_mul(2_654_435_761).to_be_bytes()[2],
        })
        .collect()
}

async fn recv_from(sock: &UdpSocket, buf: &mut [u8]) -> Result<(usize, SocketAddr)> {
    tokio::time::timeout(Duration::from_secs(5), sock.recv_from(buf))
        .await
        .context("a datagram did not arrive within 5 s")?
        .map_err(Into::into)
}

/// Prints the relay's path lines (visible with `--nocapture`).
fn report(log: &str) {
    for l in log
        .lines()
        .filter(|l| l.contains("path=") || l.contains("udp allocation closed"))
    {
        println!("{l}");
    }
}

const DATAGRAMS: u32 = 10_000;
const WINDOW: u32 = 50;

/// Allocates a UDP pair, joins X and Y, moves [`DATAGRAMS`] each way and returns the
/// relay's log once the allocation has closed (idle).
async fn ten_thousand_each_way(topo: &Topology, relay: &mut Relay) -> Result<(String, u64)> {
    let (ta, tb) = ([0xa1u8; 32], [0xb2u8; 32]);
    relay
        .conn
        .send(&Message::Allocate {
            alloc_id: 7,
            token_a: token_to_hex(&ta),
            token_b: token_to_hex(&tb),
            ttl_ms: 20_000,
            transport: Transport::Udp,
        })
        .await?;
    let (pa, pb) = match relay.conn.recv(T).await? {
        Message::Allocated {
            alloc_id: 7,
            port_a,
            port_b,
        } => (port_a, port_b),
        other => bail!("expected allocated, got {other:?}"),
    };
    let ra: SocketAddr = format!("{}:{pa}", Topology::RELAY_X).parse()?;
    let rb: SocketAddr = format!("{}:{pb}", Topology::RELAY_Y).parse()?;
    let x = topo.x.udp("0.0.0.0:0")?;
    let y = topo.y.udp("0.0.0.0:0")?;
    let (jx, jy) = tokio::join!(join(&x, ra, &ta), join(&y, rb, &tb));
    jx.context("X joining")?;
    jy.context("Y joining")?;

    // With the firewall on, each joined port now admits only its peer.
    if let Ok(peers) = topo.relay.exec(
        "nft",
        &["list", "set", "inet", "netport_relayd", "udp_peers"],
    ) {
        for (peer, port) in [(Topology::X, pa), (Topology::Y, pb)] {
            ensure!(
                peers.contains(&format!("{peer} . {port}")),
                "{peer} . {port} not admitted:\n{peers}"
            );
        }
        let open = topo.relay.exec(
            "nft",
            &["list", "set", "inet", "netport_relayd", "udp_open"],
        )?;
        ensure!(
            !open.contains(&pa.to_string()),
            "port {pa} still open to all:\n{open}"
        );
    }
    let mut buf = vec![0u8; 65_536];
    // First packets each way: neighbours get resolved, so the fast path finds its routes.
    for _ in 0..3 {
        x.send_to(b"warm-up", ra).await?;
        let (n, from) = recv_from(&y, &mut buf).await?;
        ensure!(&buf[..n] == b"warm-up" && from == rb, "warm-up X to Y");
        y.send_to(b"warm-up", rb).await?;
        let (n, from) = recv_from(&x, &mut buf).await?;
        ensure!(&buf[..n] == b"warm-up" && from == ra, "warm-up Y to X");
    }

    let mut bytes = 0u64;
    for start in (0..DATAGRAMS).step_by(WINDOW as usize) {
        let seqs = start..(start + WINDOW).min(DATAGRAMS);
        for seq in seqs.clone() {
            let p = payload(b'x', seq);
            bytes += p.len() as u64;
            x.send_to(&p, ra).await?;
        }
        for seq in seqs.clone() {
            let (n, from) = recv_from(&y, &mut buf)
                .await
                .with_context(|| format!("datagram {seq} X to Y"))?;
            ensure!(
                from == rb,
                "Y got a datagram from {from}, not the relay's {rb}"
            );
            ensure!(
                buf[..n] == payload(b'x', seq)[..],
                "datagram {seq} X to Y changed"
            );
            y.send_to(&payload(b'y', seq), rb).await?;
        }
        for seq in seqs {
            let (n, from) = recv_from(&x, &mut buf)
                .await
                .with_context(|| format!("datagram {seq} Y to X"))?;
            ensure!(
                from == ra,
                "X got a datagram from {from}, not the relay's {ra}"
            );
            ensure!(
                buf[..n] == payload(b'y', seq)[..],
                "datagram {seq} Y to X changed"
            );
        }
    }
    for (who, ns) in [("X", &topo.x), ("Y", &topo.y)] {
        let errors = ns.snmp("Udp", "InCsumErrors")?;
        ensure!(errors == 0, "{who} counted {errors} UDP checksum errors");
    }
    // Idle for udp_idle_secs: the allocation closes and reports what it carried.
    match relay.conn.recv(T).await? {
        Message::AllocationClosed {
            alloc_id: 7,
            bytes_a_to_b,
            reason,
            ..
        } => {
            ensure!(reason.starts_with("idle"), "closed for {reason}");
            ensure!(
                bytes_a_to_b >= bytes,
                "the relay counted {bytes_a_to_b} bytes X to Y, {bytes} were sent"
            );
        }
        other => bail!("expected allocation_closed, got {other:?}"),
    }
    Ok((relay.daemon.log_text(), bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_pair_through_the_xdp_fast_path() -> Result<()> {
    if skip_unless_root("udp_pair_through_the_xdp_fast_path") {
        return Ok(());
    }
    let topo = Topology::new()?;
    let mut relay = start_relay(&topo, "udp_fast_path = \"xdp\"").await?;
    let (log, _) = ten_thousand_each_way(&topo, &mut relay)
        .await
        .with_context(|| relay.daemon.log_text())?;
    ensure!(
        log.contains("UDP fast path loaded"),
        "the XDP program did not load:\n{log}"
    );
    ensure!(
        log.contains("path=\"xdp\""),
        "the pair did not take the fast path:\n{log}"
    );
    report(&log);
    let xdp = log_field(&log, "udp allocation closed", "xdp_packets").context("xdp_packets")?;
    let user = log_field(&log, "udp allocation closed", "userspace_packets")
        .context("userspace_packets")?;
    // The program's own per-flow counters carried every datagram of the series; relayd
    // itself saw at most the warm-up.
    ensure!(
        xdp >= 2 * u64::from(DATAGRAMS),
        "XDP carried {xdp} packets, expected at least {}:\n{log}",
        2 * DATAGRAMS
    );
    ensure!(user <= 6, "userspace carried {user} packets:\n{log}");
    // And the program-wide counter agrees.
    let total = log_field(&log, "udp allocation closed", "xdp_forwarded_total")
        .context("xdp_forwarded_total")?;
    ensure!(
        total >= xdp,
        "program counted {total} forwarded, the flows {xdp}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_pair_through_the_userspace_forwarder() -> Result<()> {
    if skip_unless_root("udp_pair_through_the_userspace_forwarder") {
        return Ok(());
    }
    let topo = Topology::new()?;
    let mut relay = start_relay(&topo, "udp_fast_path = \"userspace\"").await?;
    let (log, _) = ten_thousand_each_way(&topo, &mut relay)
        .await
        .with_context(|| relay.daemon.log_text())?;
    report(&log);
    let xdp = log_field(&log, "udp allocation closed", "xdp_packets").context("xdp_packets")?;
    let user = log_field(&log, "udp allocation closed", "userspace_packets")
        .context("userspace_packets")?;
    ensure!(xdp == 0, "XDP carried {xdp} packets with the fast path off");
    ensure!(
        user >= 2 * u64::from(DATAGRAMS) + 6,
        "userspace carried {user} packets"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_capabilities_the_relay_says_why_and_forwards_in_userspace() -> Result<()> {
    let name = "without_capabilities_the_relay_says_why_and_forwards_in_userspace";
    if skip_unless_root(name) {
        return Ok(());
    }
    let topo = Topology::new()?;
    // Root without a single capability: what an unprivileged relayd has.
    let no_caps = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"];
    let mut relay = start_relay_wrapped(&topo, "udp_fast_path = \"xdp\"", &no_caps).await?;
    let (log, _) = ten_thousand_each_way(&topo, &mut relay)
        .await
        .with_context(|| relay.daemon.log_text())?;
    report(&log);
    let why = log
        .lines()
        .find(|l| l.contains("UDP fast path unavailable"))
        .with_context(|| format!("no line saying why the fast path is off:\n{log}"))?;
    ensure!(
        why.contains("CAP_BPF"),
        "the reason does not name the capability: {why}"
    );
    let user = log_field(&log, "udp allocation closed", "userspace_packets")
        .context("userspace_packets")?;
    ensure!(
        user >= 2 * u64::from(DATAGRAMS),
        "userspace carried {user} packets"
    );
    Ok(())
}

/// What a TCP connection attempt from a namespace ran into.
#[derive(Debug, PartialEq, Eq)]
enum Probe {
    Connected,
    /// RST: nothing listens, but the port is reachable.
    Refused,
    /// No answer: a firewall dropped the SYN.
    Dropped,
}

fn probe(ns: &netport_e2e::netns::Netns, addr: &str) -> Result<Probe> {
    let addr: SocketAddr = addr.parse()?;
    ns.enter(move || {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(700)) {
            Ok(_) => Probe::Connected,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Probe::Refused,
            Err(_) => Probe::Dropped,
        }
    })
}

/// Polls `probe` until it gives `want` (rules change a moment after the message).
async fn until_probe(topo: &Topology, addr: &str, want: Probe) -> Result<()> {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let got = probe(&topo.x, addr)?;
        if got == want {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{addr}: expected {want:?}, still {got:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn allocate_tcp(relay: &mut Relay, id: u64) -> Result<(u16, u16)> {
    relay
        .conn
        .send(&Message::Allocate {
            alloc_id: id,
            token_a: token_to_hex(&[1; 32]),
            token_b: token_to_hex(&[2; 32]),
            ttl_ms: 60_000,
            transport: Transport::Tcp,
        })
        .await?;
    match relay.conn.recv(T).await? {
        Message::Allocated {
            alloc_id,
            port_a,
            port_b,
        } if alloc_id == id => Ok((port_a, port_b)),
        other => bail!("expected allocated, got {other:?}"),
    }
}

fn tcp_open_set(topo: &Topology) -> Result<String> {
    topo.relay.exec(
        "nft",
        &["list", "set", "inet", "netport_relayd", "tcp_open"],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nftables_opens_only_allocated_ports_and_a_restart_removes_stale_rules() -> Result<()> {
    let name = "nftables_opens_only_allocated_ports_and_a_restart_removes_stale_rules";
    if skip_unless_root(name) {
        return Ok(());
    }
    let topo = Topology::new()?;
    let mut relay = start_relay(&topo, "udp_fast_path = \"userspace\"").await?;
    let log = relay.daemon.log_text();
    ensure!(log.contains("nftables table in place"), "no table:\n{log}");
    // The first allocation takes the first two ports of the range.
    let first = format!("{}:40000", Topology::RELAY_X);

    // Before allocation: dropped (no RST, as if nothing were there).
    ensure!(
        probe(&topo.x, &first)? == Probe::Dropped,
        "port open before allocation"
    );
    let (pa, _) = allocate_tcp(&mut relay, 1).await?;
    ensure!(pa == 40000, "first allocation got port {pa}");
    until_probe(&topo, &first, Probe::Connected).await?;
    // A port of the range that is not allocated stays closed meanwhile.
    ensure!(
        probe(&topo.x, &format!("{}:40005", Topology::RELAY_X))? == Probe::Dropped,
        "an unallocated port of the range is open"
    );
    // Outside the range nothing changes: a closed port answers RST as usual.
    ensure!(
        probe(&topo.x, &format!("{}:39999", Topology::RELAY_X))? == Probe::Refused,
        "traffic outside the range was touched"
    );
    relay.conn.send(&Message::Release { alloc_id: 1 }).await?;
    match relay.conn.recv(T).await? {
        Message::AllocationClosed { alloc_id: 1, .. } => {}
        other => bail!("expected allocation_closed, got {other:?}"),
    }
    until_probe(&topo, &first, Probe::Dropped)
        .await
        .with_context(|| relay.daemon.log_text())?;

    // Killed with ports open: the rules stay behind, until relayd starts again.
    let (pc, _) = allocate_tcp(&mut relay, 2).await?;
    ensure!(
        tcp_open_set(&topo)?.contains(&pc.to_string()),
        "port {pc} not in the set"
    );
    relay.daemon.kill();
    ensure!(
        tcp_open_set(&topo)?.contains(&pc.to_string()),
        "the killed relay's rule vanished by itself"
    );
    relay.daemon.restart()?;
    relay.conn = register(&relay.listener, &relay.acceptor, &relay.daemon).await?;
    let set = tcp_open_set(&topo)?;
    ensure!(
        !set.contains(&pc.to_string()),
        "stale port {pc} still open:\n{set}"
    );
    ensure!(
        relay
            .daemon
            .log_text()
            .contains("removed the nftables table a previous relayd left behind"),
        "{}",
        relay.daemon.log_text()
    );

    // A clean shutdown takes the table away.
    netport_e2e::netns::run("kill", &["-TERM", &relay.daemon.child.id().to_string()])?;
    let deadline = tokio::time::Instant::now() + T;
    while relay.daemon.child.try_wait()?.is_none() {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "relayd did not stop"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(
        tcp_open_set(&topo).is_err(),
        "the table outlived a clean shutdown:\n{}",
        relay.daemon.log_text()
    );
    Ok(())
}
