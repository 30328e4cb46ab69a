//! Links over QUIC between portals in separate network namespaces, through relayd in a
//! third one (netportd runs there too): a UDP tunnel over a QUIC link through the XDP fast
//! path, and the fallback to the TCP link when a peer's namespace blocks UDP. Real
//! binaries, real certificates. Needs root (skips loudly otherwise; CI runs as root).
//!
//! Each peer resolves the relay's name through its own namespace's hosts file (split DNS):
//! X reaches the relay at 10.0.1.1, Y at 10.0.2.1, as the XDP program expects.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use netport_e2e::netns::Netns;
use netport_e2e::netns::{Topology, skip_unless_root};
use netport_e2e::{Daemon, Daemons, Metrics, Pki, log_field, wait_log};
use netport_proto::identity::Role;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;

const T: Duration = Duration::from_secs(30);
const CONTROL_PORT: u16 = 7443;
const UDP_LISTEN: &str = "127.0.0.1:6001";
const TCP_LISTEN: &str = "127.0.0.1:6002";
const RELAY_NAME: &str = "relay.netport.test";
/// The portals' admin endpoints, each on its namespace's loopback.
const ADMIN: &str = "127.0.0.1:9100";

/// The system across the namespaces; daemons stop before the namespaces go.
struct Deployment {
    daemons: Vec<(String, Daemon)>,
    _pki: Pki,
    topo: Topology,
}

impl Daemons for Deployment {
    fn daemons(&self) -> &[(String, Daemon)] {
        &self.daemons
    }
}

impl Deployment {
    fn log(&self, name: &str) -> String {
        netport_e2e::log_of(&self.daemons, name)
    }

    fn logs(&self) -> String {
        netport_e2e::logs_of(&self.daemons)
    }

    fn daemon(&mut self, name: &str) -> Result<&mut Daemon> {
        self.daemons
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d)
            .with_context(|| format!("no daemon {name}"))
    }
}

fn policy() -> String {
    format!(
        r#"
[[portal]]
name = "alice"

[[portal]]
name = "nas"

[[relay]]
name = "relay-1"
address = "{RELAY_NAME}"
ports = "40000-40019"

[[service]]
name = "udp-echo"
portal = "nas"
target = "127.0.0.1:7001"
protocol = "udp"

[[service]]
name = "echo"
portal = "nas"
target = "127.0.0.1:7002"

[[access]]
name = "alice-udp"
from = ["alice"]
listen = "{UDP_LISTEN}"
service = "udp-echo"

[[access]]
name = "alice-echo"
from = ["alice"]
listen = "{TCP_LISTEN}"
service = "echo"
"#
    )
}

/// Echo services in Y's namespace: UDP on 127.0.0.1:7001, TCP on 127.0.0.1:7002.
fn echo_services(topo: &Topology) -> Result<()> {
    let udp = topo.y.udp("127.0.0.1:7001")?;
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            let _ = udp.send_to(&buf[..n], from).await;
        }
    });
    let tcp = topo.y.tcp_listener("127.0.0.1:7002")?;
    tokio::spawn(async move {
        while let Ok((s, _)) = tcp.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(())
}

/// netportd and relayd (fast path `fast_path`) in the relay namespace, portal `alice` in X,
/// portal `nas` in Y; returns once both portals hold their listeners or sessions.
async fn deploy(topo: Topology, fast_path: &str, quic_timeout_ms: u64) -> Result<Deployment> {
    topo.x.set_hosts(&format!(
        "127.0.0.1 localhost\n{} {RELAY_NAME}\n",
        Topology::RELAY_X
    ))?;
    topo.y.set_hosts(&format!(
        "127.0.0.1 localhost\n{} {RELAY_NAME}\n",
        Topology::RELAY_Y
    ))?;
    echo_services(&topo)?;
    let pki = Pki::new()?;
    let dir = pki.dir.path().to_path_buf();
    std::fs::create_dir_all(dir.join("policy"))?;
    std::fs::write(dir.join("policy/policy.toml"), policy())?;
    let tls = |role: Role, name: &str| -> Result<String> {
        let f = pki.issue(role, name)?;
        Ok(format!(
            "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            pki.ca_path().display(),
            f.cert.display(),
            f.key.display()
        ))
    };
    let path =
        |name: &str| -> Result<String> { Ok(dir.join(name).to_str().context("path")?.to_string()) };
    let mut daemons = Vec::new();

    std::fs::write(
        dir.join("netportd.toml"),
        format!(
            "listen = [\"0.0.0.0:{CONTROL_PORT}\"]\npolicy = \"{}\"\nheartbeat_secs = 2\n{}",
            path("policy")?,
            tls(Role::Server, "netportd")?
        ),
    )?;
    let d = topo.relay.daemon(
        "netportd",
        &["run", "--config", &path("netportd.toml")?],
        &dir.join("netportd.log"),
    )?;
    daemons.push(("netportd".to_string(), d));

    std::fs::write(
        dir.join("relayd.toml"),
        format!(
            "servers = [\"127.0.0.1:{CONTROL_PORT}\"]\nserver_name = \"localhost\"\n\
             public_address = \"{RELAY_NAME}\"\nbind = \"0.0.0.0\"\nports = \"40000-40019\"\n\
             udp_idle_secs = 8\nudp_fast_path = \"{fast_path}\"\n{}",
            tls(Role::Relay, "relay-1")?
        ),
    )?;
    let d = topo.relay.daemon(
        "relayd",
        &["--config", &path("relayd.toml")?],
        &dir.join("relayd.log"),
    )?;
    daemons.push(("relayd".to_string(), d));

    for (name, ns, server) in [
        ("alice", &topo.x, Topology::RELAY_X),
        ("nas", &topo.y, Topology::RELAY_Y),
    ] {
        let file = format!("portal-{name}.toml");
        std::fs::write(
            dir.join(&file),
            format!(
                "servers = [\"{server}:{CONTROL_PORT}\"]\nserver_name = \"localhost\"\n\
                 quic = \"auto\"\nadmin_listen = \"{ADMIN}\"\nlink_idle_secs = 2\nudp_idle_secs = 2\n\
                 quic_timeout_ms = {quic_timeout_ms}\n{}",
                tls(Role::Portal, name)?
            ),
        )?;
        let d = ns.daemon(
            "portal",
            &["--config", &path(&file)?],
            &dir.join(format!("portal-{name}.log")),
        )?;
        daemons.push((format!("portal-{name}"), d));
    }
    let dep = Deployment {
        daemons,
        _pki: pki,
        topo,
    };
    wait_log(&dep, "relayd", "registered", T).await?;
    wait_log(&dep, "portal-alice", "listening (udp)", T).await?;
    wait_log(&dep, "portal-nas", "desired state applied", T).await?;
    Ok(dep)
}

/// Datagram `seq` of a mixed-size series: mostly 4 to 1400 bytes, every 97th one 8000
/// (larger than any QUIC packet: it rides the flow's stream).
fn payload(seq: u32) -> Vec<u8> {
    let len = if seq % 97 == 0 {
        8000
    } else {
        4 + (seq as usize * 7919) % 1397
    };
    (0..len)
        .map(|i| match i {
            0..=3 => seq.to_be_bytes()[i],
            _ => (i as u32 ^ seq).wrapping_mul(2_654_435_761).to_be_bytes()[2],
        })
        .collect()
}

/// Sends `count` datagrams through the UDP tunnel from X, `window` at a time, and checks
/// every echo: whole, unchanged, each exactly once. Returns the payload bytes sent.
async fn udp_series(dep: &Deployment, count: u32, window: u32) -> Result<u64> {
    let mut bytes = 0u64;
    let sock: UdpSocket = dep.topo.x.udp("127.0.0.1:0")?;
    let mut buf = vec![0u8; 65_536];
    // The first datagram opens the flow (and the link): retry until an echo comes back.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        sock.send_to(b"hello", UDP_LISTEN).await?;
        if let Ok(r) = tokio::time::timeout(Duration::from_secs(1), sock.recv_from(&mut buf)).await
        {
            let (n, _) = r?;
            ensure!(&buf[..n] == b"hello", "first echo changed");
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("no echo through the tunnel:\n{}", dep.logs());
        }
    }
    // Echoes of the first datagram retried may still come: drain them.
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf)).await
    {}
    for start in (0..count).step_by(window as usize) {
        let seqs = start..(start + window).min(count);
        for seq in seqs.clone() {
            let p = payload(seq);
            bytes += p.len() as u64;
            sock.send_to(&p, UDP_LISTEN).await?;
        }
        let mut got = BTreeMap::new();
        while got.len() < seqs.len() {
            let (n, _) = tokio::time::timeout(Duration::from_secs(10), sock.recv_from(&mut buf))
                .await
                .with_context(|| {
                    format!(
                        "datagrams {seqs:?}: {} of {} came back",
                        got.len(),
                        seqs.len()
                    )
                })??;
            ensure!(n >= 4, "a datagram of {n} bytes came back");
            let seq = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            ensure!(seqs.contains(&seq), "datagram {seq} out of its window");
            ensure!(
                buf[..n] == payload(seq)[..],
                "datagram {seq} changed ({n} bytes back, {} sent)",
                payload(seq).len()
            );
            ensure!(
                got.insert(seq, n).is_none(),
                "datagram {seq} came back twice"
            );
        }
    }
    Ok(bytes)
}

/// 1 MiB through the TCP tunnel from X and back, every byte compared.
async fn tcp_round(dep: &Deployment) -> Result<()> {
    let addr: std::net::SocketAddr = TCP_LISTEN.parse()?;
    let s = dep.topo.x.enter(move || {
        let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_nonblocking(true)?;
        Ok::<_, std::io::Error>(s)
    })??;
    let (mut r, mut w) = tokio::net::TcpStream::from_std(s)?.into_split();
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| i.wrapping_mul(2_654_435_761).to_be_bytes()[0])
        .collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await?;
        w.shutdown().await?;
        Ok::<_, std::io::Error>(())
    });
    let mut back = Vec::new();
    tokio::time::timeout(T, r.read_to_end(&mut back))
        .await
        .context("TCP echo timed out")??;
    writer.await??;
    ensure!(
        back == data,
        "{} of {} bytes back, or changed",
        back.len(),
        data.len()
    );
    Ok(())
}

/// A portal's metrics, from its admin endpoint on the loopback of `ns`.
fn metrics_in(ns: &Netns) -> Result<Metrics> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = ADMIN.parse()?;
    let text = ns.enter(move || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: portal\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })??;
    let (_, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("not an HTTP answer: {text}"))?;
    Metrics::parse(body)
}

const DATAGRAMS: u32 = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_tunnel_over_a_quic_link_through_the_xdp_relay() -> Result<()> {
    if skip_unless_root("udp_tunnel_over_a_quic_link_through_the_xdp_relay") {
        return Ok(());
    }
    // A generous QUIC budget: a busy machine must not turn this test into a fallback.
    let mut dep = deploy(Topology::new()?, "xdp", 10_000).await?;
    let bytes = udp_series(&dep, DATAGRAMS, 50)
        .await
        .with_context(|| dep.logs())?;
    let alice = dep.log("portal-alice");
    ensure!(
        alice.contains("link_transport=quic") && !alice.contains("falling back to TCP"),
        "the link did not run over QUIC:\n{alice}"
    );
    for (who, ns) in [("X", &dep.topo.x), ("Y", &dep.topo.y)] {
        let errors = ns.snmp("Udp", "InCsumErrors")?;
        ensure!(errors == 0, "{who} counted {errors} UDP checksum errors");
        // The flow's datagrams rode the link as QUIC datagrams (the few larger than a QUIC
        // packet on the flow's stream).
        let m = metrics_in(ns)?;
        let carried = |c: &str| m.get("netport_udp_link_datagrams_total", &[("carrier", c)]);
        let (datagrams, framed) = (carried("quic_datagram"), carried("stream"));
        println!("{who}: {datagrams} as QUIC datagrams, {framed} on the stream");
        ensure!(
            datagrams >= 0.5 * f64::from(DATAGRAMS) && framed >= f64::from(DATAGRAMS / 97),
            "{who} sent {datagrams} datagrams as QUIC datagrams and {framed} on the stream"
        );
    }
    // Kill the portals (a clean exit would have netportd release the pair): the relay's UDP
    // pair goes idle, closes and reports what the XDP program carried.
    dep.daemon("portal-alice")?.kill();
    dep.daemon("portal-nas")?.kill();
    wait_log(&dep, "relayd", "udp allocation closed", T).await?;
    let log = dep.log("relayd");
    ensure!(
        log.contains("UDP fast path loaded"),
        "the XDP program did not load:\n{log}"
    );
    ensure!(
        log.lines()
            .any(|l| l.contains("udp pair joined") && l.contains("path=\"xdp\"")),
        "the QUIC link's pair did not take the fast path:\n{log}"
    );
    let line = "udp allocation closed";
    let xdp = log_field(&log, line, "xdp_packets").context("xdp_packets")?;
    let user = log_field(&log, line, "userspace_packets").context("userspace_packets")?;
    let a_to_b = log_field(&log, line, "a_to_b").context("a_to_b")?;
    let b_to_a = log_field(&log, line, "b_to_a").context("b_to_a")?;
    for l in log.lines().filter(|l| l.contains(line)) {
        println!("{l}");
    }
    // The pair carried at least the payloads each way (QUIC adds its headers), and the
    // program carried the packets: relayd itself forwarded next to none.
    ensure!(
        a_to_b >= bytes && b_to_a >= bytes,
        "the pair carried {a_to_b} / {b_to_a} bytes for {bytes} bytes of datagrams each way"
    );
    ensure!(
        xdp >= u64::from(DATAGRAMS),
        "XDP carried {xdp} packets for {DATAGRAMS} datagrams each way:\n{log}"
    );
    ensure!(
        user * 100 <= xdp,
        "userspace carried {user} packets, XDP {xdp}:\n{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_blocked_in_a_peer_namespace_falls_back_to_the_tcp_link() -> Result<()> {
    if skip_unless_root("udp_blocked_in_a_peer_namespace_falls_back_to_the_tcp_link") {
        return Ok(());
    }
    let topo = Topology::new()?;
    // X may not send UDP to the relay: the QUIC attempt cannot get through.
    topo.x.exec(
        "nft",
        &[&format!(
            "add table inet npblock; \
             add chain inet npblock out {{ type filter hook output priority 0; policy accept; }}; \
             add rule inet npblock out ip daddr {} meta l4proto udp drop",
            Topology::RELAY_X
        )],
    )?;
    let dep = deploy(topo, "xdp", 2_000).await?;
    tcp_round(&dep).await.with_context(|| dep.logs())?;
    udp_series(&dep, 500, 50)
        .await
        .with_context(|| dep.logs())?;
    wait_log(&dep, "portal-alice", "falling back to TCP", T).await?;
    let alice = dep.log("portal-alice");
    ensure!(
        alice
            .lines()
            .any(|l| l.contains("link up") && l.contains("link_transport=tcp")),
        "no TCP link on the client:\n{alice}"
    );
    ensure!(
        !alice.contains("link_transport=quic"),
        "a QUIC link came up through the block:\n{alice}"
    );
    let nas = dep.log("portal-nas");
    ensure!(
        nas.lines()
            .any(|l| l.contains("serving link up") && l.contains("link_transport=tcp")),
        "the serving portal did not serve over TCP:\n{nas}"
    );
    let dropped = dep
        .topo
        .x
        .exec("nft", &["list", "table", "inet", "npblock"])?;
    println!("{dropped}");

    // Once that link idles out, the next one goes to TCP at once: the client remembers that
    // QUIC failed on this route.
    wait_log(&dep, "portal-alice", "closing the link: idle", T).await?;
    tcp_round(&dep).await.with_context(|| dep.logs())?;
    wait_log(
        &dep,
        "portal-alice",
        "QUIC failed on this route lately: using TCP",
        T,
    )
    .await?;
    let fallbacks = dep
        .log("portal-alice")
        .matches("falling back to TCP")
        .count();
    ensure!(
        fallbacks == 1,
        "{fallbacks} QUIC attempts timed out, expected 1"
    );
    Ok(())
}
