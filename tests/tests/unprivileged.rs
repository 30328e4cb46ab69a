//! Netport without root: every daemon runs as `nobody` with no capabilities (see
//! `netport_e2e::unprivileged`), so relayd's XDP program cannot load. It says so in one log
//! line, forwards in userspace, and the tunnels work as they do as root: TCP over a TCP link,
//! and UDP over a QUIC link through the relay's userspace UDP pair.
//!
//! Switching user needs root (this test is root in CI); elsewhere it skips loudly.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use netport_e2e::{System, echo_service, udp_echo, unprivileged, wait_listening, wait_log};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const T: Duration = Duration::from_secs(30);

fn skip(test: &str) -> bool {
    if unprivileged::possible() {
        unprivileged::enable();
        return false;
    }
    println!("SKIPPED {test}: needs root and setpriv to run the daemons as another user");
    true
}

fn policy(tcp_target: SocketAddr, udp_target: SocketAddr, tcp: u16, udp: u16) -> String {
    format!(
        r#"
[[portal]]
name = "alice"
[[portal]]
name = "nas"
[[service]]
name = "echo"
portal = "nas"
target = "{tcp_target}"
[[service]]
name = "udp-echo"
portal = "nas"
target = "{udp_target}"
protocol = "udp"
[[access]]
name = "alice-echo"
from = ["alice"]
listen = "127.0.0.1:{tcp}"
service = "echo"
[[access]]
name = "alice-udp"
from = ["alice"]
listen = "127.0.0.1:{udp}"
service = "udp-echo"
"#
    )
}

/// The effective uid of a process, from /proc.
fn uid_of(pid: u32) -> Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .context("no Uid line")?;
    line.split_whitespace()
        .nth(2)
        .context("no effective uid")?
        .parse()
        .context("uid")
}

/// The setpriv wrapper execs the daemon, so the pid is the daemon's once it runs.
async fn wait_uid(sys: &System, name: &str) -> Result<()> {
    let pid = sys.pid(name)?;
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let uid = uid_of(pid)?;
        if uid == unprivileged::UID {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{name} runs as uid {uid}, not {}",
            unprivileged::UID
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn start(quic: bool) -> Result<(System, String, String)> {
    let (tcp_target, udp_target) = (echo_service().await?, udp_echo().await?);
    let (port, _) = netport_e2e::free_port_range(2)?;
    let p = policy(tcp_target, udp_target, port, port + 1);
    let sys = if quic {
        System::start_quic(&p, &["alice", "nas"])?
    } else {
        System::start(&p, &["alice", "nas"])?
    };
    for name in ["netportd", "relayd", "portal-alice", "portal-nas"] {
        wait_uid(&sys, name).await?;
    }
    sys.wait_ready().await?;
    let (tcp, udp) = (
        format!("127.0.0.1:{port}"),
        format!("127.0.0.1:{}", port + 1),
    );
    wait_listening(&tcp, T).await.with_context(|| sys.logs())?;
    Ok((sys, tcp, udp))
}

/// `len` bytes each way on one connection, every byte compared.
async fn round_trip(addr: &str, seed: u8, len: usize) -> Result<()> {
    let mut c = TcpStream::connect(addr).await?;
    let out: Vec<u8> = (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[1] ^ seed)
        .collect();
    let (mut r, mut w) = c.split();
    let write = async {
        w.write_all(&out).await?;
        w.shutdown().await?;
        anyhow::Ok(())
    };
    let read = async {
        let mut back = Vec::with_capacity(len);
        tokio::time::timeout(T, r.read_to_end(&mut back))
            .await
            .context("the echo stalled")??;
        anyhow::Ok(back)
    };
    let ((), back) = tokio::try_join!(write, read)?;
    ensure!(back == out, "bytes changed on the way");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_root_the_relay_forwards_in_userspace_and_tcp_tunnels_work() -> Result<()> {
    if skip("without_root_the_relay_forwards_in_userspace_and_tcp_tunnels_work") {
        return Ok(());
    }
    let (sys, tcp, _) = start(false).await?;
    wait_log(&sys, "relayd", "needs CAP_BPF and CAP_NET_ADMIN", T).await?;
    // 16 MiB each way on one connection, and 50 at once, every byte compared.
    round_trip(&tcp, 1, 16 << 20)
        .await
        .with_context(|| sys.logs())?;
    let mut all = Vec::new();
    for i in 0..50u8 {
        let tcp = tcp.clone();
        all.push(tokio::spawn(
            async move { round_trip(&tcp, i, 64 << 10).await },
        ));
    }
    for t in all {
        t.await?.with_context(|| sys.logs())?;
    }
    let m = sys.metrics("relayd").await?;
    ensure!(
        m.get(
            "netport_allocations_opened_total",
            &[("path", "tcp-userspace")]
        ) >= 1.0,
        "no allocation on the userspace TCP path: {m:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_root_udp_flows_cross_a_quic_link_through_the_userspace_relay() -> Result<()> {
    if skip("without_root_udp_flows_cross_a_quic_link_through_the_userspace_relay") {
        return Ok(());
    }
    let (sys, _, udp) = start(true).await?;
    wait_log(&sys, "relayd", "needs CAP_BPF and CAP_NET_ADMIN", T).await?;
    let sock = UdpSocket::bind("127.0.0.1:0").await?;
    let mut buf = vec![0u8; 65_536];
    for i in 0..200u32 {
        let len = [1usize, 100, 1200, 5000][(i % 4) as usize];
        let out: Vec<u8> = (0..len).map(|j| (j as u32 ^ i) as u8).collect();
        sock.send_to(&out, &udp).await?;
        let (n, _) = tokio::time::timeout(Duration::from_secs(10), sock.recv_from(&mut buf))
            .await
            .with_context(|| format!("datagram {i} got no echo:\n{}", sys.logs()))??;
        ensure!(buf[..n] == out[..], "datagram {i} changed on the way");
    }
    wait_log(&sys, "portal-alice", "link_transport=quic", T).await?;
    let m = sys.metrics("relayd").await?;
    ensure!(
        m.get(
            "netport_allocations_opened_total",
            &[("path", "udp-userspace")]
        ) >= 1.0,
        "no allocation on the userspace UDP path: {m:?}"
    );
    Ok(())
}
