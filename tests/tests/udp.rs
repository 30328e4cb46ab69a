//! UDP services end to end on loopback, over the TCP link: datagrams keep their boundaries,
//! each client gets only its own replies, idle flows expire, oversized datagrams are dropped
//! and counted, never truncated.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use netport_e2e::{Daemon, System, udp_echo, wait_log};
use netport_proto::identity::Role;
use tokio::net::UdpSocket;

const T: Duration = Duration::from_secs(30);

fn policy(target: SocketAddr, listen_port: u16) -> String {
    format!(
        r#"
[[portal]]
name = "alice"

[[portal]]
name = "nas"

[[service]]
name = "dns-ish"
portal = "nas"
target = "{target}"
protocol = "udp"

[[access]]
name = "alice-dns"
from = ["alice"]
listen = "127.0.0.1:{listen_port}"
service = "dns-ish"
"#
    )
}

/// A payload of `len` bytes that names its sender and sequence number.
fn payload(tag: u8, seq: u32, len: usize) -> Vec<u8> {
    let mut p: Vec<u8> = (0..len)
        .map(|i| (i as u32 ^ seq).wrapping_mul(2_654_435_761).to_be_bytes()[1])
        .collect();
    let head = [&[tag][..], &seq.to_be_bytes()[..]].concat();
    let n = head.len().min(len);
    p[..n].copy_from_slice(&head[..n]);
    p
}

/// Sends a datagram and waits for the echo, which must be exactly it (length included).
async fn ping(sock: &UdpSocket, to: &str, data: &[u8]) -> Result<()> {
    sock.send_to(data, to).await?;
    let mut buf = vec![0u8; 65_536];
    let (n, _) = tokio::time::timeout(T, sock.recv_from(&mut buf))
        .await
        .context("no echo within 30 s")??;
    ensure!(
        n == data.len(),
        "sent a datagram of {} bytes, got {n} back",
        data.len()
    );
    ensure!(buf[..n] == *data, "datagram changed in the tunnel");
    Ok(())
}

/// Mixed sizes, from empty to near the largest IPv4 UDP payload.
fn size(i: u32) -> usize {
    match i % 7 {
        0 => 0,
        1 => 1,
        2 => 512,
        3 => 1400,
        4 => 9000,
        5 => 33_333,
        _ => 65_000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_keep_their_boundaries_and_each_client_gets_only_its_own_replies() -> Result<()> {
    let echo = udp_echo().await?;
    let (port, _) = netport_e2e::free_port_range(1)?;
    let sys = System::start(&policy(echo, port), &["alice", "nas"])?;
    sys.wait_ready().await?;
    wait_log(&sys, "portal-alice", "listening (udp)", T).await?;
    let listen = format!("127.0.0.1:{port}");

    let c1 = UdpSocket::bind("127.0.0.1:0").await?;
    let c2 = UdpSocket::bind("127.0.0.1:0").await?;
    // Interleaved, in lockstep: each echo must come back to its own client, whole.
    for i in 0..200u32 {
        ping(&c1, &listen, &payload(1, i, size(i)))
            .await
            .with_context(|| format!("client 1, datagram {i}\n{}", sys.logs()))?;
        ping(&c2, &listen, &payload(2, i, size(i + 3)))
            .await
            .with_context(|| format!("client 2, datagram {i}\n{}", sys.logs()))?;
    }

    // Both clients at once, each with a burst in flight: nothing crosses between them.
    let burst = |sock: UdpSocket, tag: u8| {
        let listen = listen.clone();
        async move {
            let mut got = 0u32;
            let mut buf = vec![0u8; 65_536];
            for round in 0..20u32 {
                for j in 0..8u32 {
                    let seq = round * 8 + j;
                    sock.send_to(&payload(tag, seq, 100 + seq as usize), &listen)
                        .await?;
                }
                for _ in 0..8 {
                    let (n, _) = tokio::time::timeout(T, sock.recv_from(&mut buf))
                        .await
                        .context("burst echo missing")??;
                    ensure!(n >= 5 && buf[0] == tag, "client {tag} got another's reply");
                    let seq = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
                    ensure!(
                        buf[..n] == payload(tag, seq, 100 + seq as usize)[..],
                        "client {tag}: datagram {seq} changed"
                    );
                    got += 1;
                }
            }
            Ok::<_, anyhow::Error>(got)
        }
    };
    let (a, b) = tokio::join!(burst(c1, 1), burst(c2, 2));
    ensure!(a.with_context(|| sys.logs())? == 160);
    ensure!(b.with_context(|| sys.logs())? == 160);

    // Two flows, one link.
    let links = sys.log("netportd").matches("link allocated").count();
    ensure!(links == 1, "expected one link, saw {links}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_flows_expire_and_oversized_datagrams_are_dropped_and_counted() -> Result<()> {
    let echo = udp_echo().await?;
    let (port, _) = netport_e2e::free_port_range(1)?;
    let mut sys = System::start(&policy(echo, port), &["nas"])?;
    // alice with a one-second idle timeout and a 1000-byte limit.
    let cert = sys.pki.issue(Role::Portal, "alice")?;
    let dir = sys.pki.dir.path().to_path_buf();
    let cfg = dir.join("portal-alice.toml");
    std::fs::write(
        &cfg,
        format!(
            "servers = [\"{}\"]\nudp_idle_secs = 1\nudp_max_datagram = 1000\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            sys.server_addr,
            sys.pki.ca_path().display(),
            cert.cert.display(),
            cert.key.display()
        ),
    )?;
    let cfg = cfg.to_str().context("path")?.to_string();
    sys.daemons.push((
        "portal-alice".into(),
        Daemon::start("portal", &["--config", &cfg], &dir.join("portal-alice.log"))?,
    ));
    sys.wait_ready().await?;
    wait_log(&sys, "portal-alice", "listening (udp)", T).await?;
    let listen = format!("127.0.0.1:{port}");
    let c = UdpSocket::bind("127.0.0.1:0").await?;

    // Too large: dropped whole, with a log line that counts it; no reply, nothing truncated.
    c.send_to(&payload(1, 0, 1001), &listen).await?;
    wait_log(&sys, "portal-alice", "dropped_total=1", T).await?;
    ping(&c, &listen, &payload(1, 1, 1000))
        .await
        .with_context(|| sys.logs())?;
    let mut buf = [0u8; 2048];
    let stray = tokio::time::timeout(Duration::from_millis(300), c.recv_from(&mut buf)).await;
    ensure!(stray.is_err(), "a reply arrived for the oversized datagram");

    // Silent for over a second: the flow closes; the next datagram opens a new one.
    wait_log(&sys, "portal-alice", "udp flow ended: idle for 1 s", T).await?;
    ping(&c, &listen, &payload(1, 2, 700))
        .await
        .with_context(|| sys.logs())?;
    let opened = sys.log("portal-alice").matches("udp flow open").count();
    ensure!(opened == 2, "expected two flows, saw {opened}");
    Ok(())
}
