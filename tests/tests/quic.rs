//! Links over QUIC on loopback: the relay gives a UDP pair beside the TCP pair, the portals
//! run the link over QUIC through it (`quic = "auto"`), TCP channels are QUIC streams and UDP
//! flows ride the same link; logs and metrics say `quic`. With the default (`quic = "udp"`),
//! UDP services get a QUIC link and TCP services a TCP link.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use netport_e2e::{System, echo_service, udp_echo, wait_listening, wait_log};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const T: Duration = Duration::from_secs(30);

fn policy(tcp_target: SocketAddr, udp_target: SocketAddr, port: u16) -> String {
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
listen = "127.0.0.1:{port}"
service = "echo"

[[access]]
name = "alice-udp"
from = ["alice"]
listen = "127.0.0.1:{}"
service = "udp-echo"
"#,
        port + 1
    )
}

fn pattern(len: usize, salt: u32) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32 ^ salt).wrapping_mul(2_654_435_761).to_be_bytes()[1])
        .collect()
}

/// Sends `data` to `to` and waits up to 2 s for its echo in `buf`; returns its length.
/// `first`: the listener may still be coming up, so resend until an echo comes.
async fn echo_datagram(
    client: &UdpSocket,
    to: &str,
    data: &[u8],
    buf: &mut [u8],
    first: bool,
    sys: &System,
) -> Result<usize> {
    loop {
        client.send_to(data, to).await?;
        match tokio::time::timeout(Duration::from_secs(2), client.recv_from(buf)).await {
            Ok(r) => return Ok(r?.0),
            Err(_) if first => continue,
            Err(_) => anyhow::bail!("no echo of {} bytes:\n{}", data.len(), sys.logs()),
        }
    }
}

/// `len` bytes through the tunnel and back, all compared, with a half-close at the end.
async fn echo_round(addr: &str, len: usize, salt: u32) -> Result<()> {
    let s = TcpStream::connect(addr).await?;
    let (mut r, mut w) = s.into_split();
    let data = pattern(len, salt);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await?;
        w.shutdown().await?;
        Ok::<_, std::io::Error>(())
    });
    let mut back = Vec::with_capacity(len);
    tokio::time::timeout(T, r.read_to_end(&mut back))
        .await
        .context("echo timed out")??;
    writer.await??;
    ensure!(back.len() == len, "got {} of {len} bytes back", back.len());
    ensure!(back == data, "bytes changed in the tunnel");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_link_carries_tcp_streams_and_udp_flows() -> Result<()> {
    let tcp = echo_service().await?;
    let udp = udp_echo().await?;
    let (port, _) = netport_e2e::free_port_range(2)?;
    let sys = System::start_quic(&policy(tcp, udp, port), &["alice", "nas"])?;
    sys.wait_ready().await?;
    let listen = format!("127.0.0.1:{port}");
    wait_listening(&listen, T).await?;

    // Several streams at once on the one link, 1 MiB each, every byte compared.
    let rounds: Vec<_> = (0..4)
        .map(|i| {
            let listen = listen.clone();
            tokio::spawn(async move { echo_round(&listen, 1 << 20, i).await })
        })
        .collect();
    for r in rounds {
        r.await?.with_context(|| sys.logs())?;
    }
    wait_log(&sys, "portal-alice", "link_transport=quic", T).await?;
    wait_log(&sys, "portal-nas", "serving link up", T).await?;
    let nas = sys.log("portal-nas");
    ensure!(
        nas.lines()
            .any(|l| l.contains("serving link up") && l.contains("link_transport=quic")),
        "the serving portal did not serve over QUIC:\n{nas}"
    );
    let alice = sys.log("portal-alice");
    ensure!(
        !alice.contains("falling back to TCP"),
        "the link fell back to TCP on loopback:\n{alice}"
    );
    let m = sys.metrics("portal-alice").await?;
    let quic = m.get(
        "netport_link_transports",
        &[("side", "client"), ("transport", "quic")],
    );
    let tcp_links = m.get(
        "netport_link_transports",
        &[("side", "client"), ("transport", "tcp")],
    );
    ensure!(quic == 1.0, "client QUIC links: {quic}");
    ensure!(tcp_links == 0.0, "client TCP links: {tcp_links}");
    let m = sys.metrics("portal-nas").await?;
    let served = m.get(
        "netport_link_transports",
        &[("side", "serving"), ("transport", "quic")],
    );
    ensure!(served == 1.0, "serving QUIC links: {served}");

    // The link idles out (link_idle_secs = 3); the portals tell netportd, which releases the
    // relay's UDP pair at once (the relay cannot see a QUIC link end by itself).
    wait_log(&sys, "portal-alice", "closing the link: idle", T).await?;
    wait_log(&sys, "relayd", "allocation released by netportd", T).await?;

    // A UDP flow on the same link: mixed sizes, each datagram back whole.
    let client = UdpSocket::bind("127.0.0.1:0").await?;
    let to = format!("127.0.0.1:{}", port + 1);
    let mut buf = vec![0u8; 65_536];
    for (i, len) in [0usize, 1, 100, 1200, 1400, 4000, 9000, 30_000, 65_507]
        .into_iter()
        .enumerate()
    {
        let data = pattern(len, i as u32);
        let n = echo_datagram(&client, &to, &data, &mut buf, i == 0, &sys).await?;
        ensure!(n == len, "sent {len} bytes, got {n}");
        ensure!(buf[..n] == data[..], "datagram of {len} bytes changed");
    }
    // One link (a new one: the first idled out); the small
    // datagrams went as QUIC datagrams, those larger than a QUIC packet on the flow's stream.
    let m = sys.metrics("portal-alice").await?;
    ensure!(
        m.get("netport_links", &[("side", "client")]) == 1.0,
        "more than one link"
    );
    let carried = |m: &netport_e2e::Metrics, carrier: &str| {
        m.get("netport_udp_link_datagrams_total", &[("carrier", carrier)])
    };
    ensure!(
        carried(&m, "quic_datagram") >= 4.0 && carried(&m, "stream") >= 4.0,
        "client sent {} as QUIC datagrams, {} on the stream",
        carried(&m, "quic_datagram"),
        carried(&m, "stream")
    );
    let m = sys.metrics("portal-nas").await?;
    ensure!(
        carried(&m, "quic_datagram") >= 4.0 && carried(&m, "stream") >= 4.0,
        "serving portal sent {} as QUIC datagrams, {} on the stream",
        carried(&m, "quic_datagram"),
        carried(&m, "stream")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_withdraws_the_access_closes_the_quic_link_and_frees_the_relay() -> Result<()>
{
    let tcp = echo_service().await?;
    let udp = udp_echo().await?;
    let (port, _) = netport_e2e::free_port_range(2)?;
    let sys = System::start_quic(&policy(tcp, udp, port), &["alice", "nas"])?;
    sys.wait_ready().await?;
    let listen = format!("127.0.0.1:{port}");
    wait_listening(&listen, T).await?;
    let mut held = TcpStream::connect(&listen).await?;
    held.write_all(b"ping").await?;
    let mut b = [0u8; 4];
    tokio::time::timeout(T, held.read_exact(&mut b)).await??;
    ensure!(&b == b"ping", "echo changed");
    wait_log(&sys, "portal-nas", "link_transport=quic", T).await?;

    // The same policy without alice's access rules: netportd closes the link.
    let without: String = policy(tcp, udp, port)
        .split("[[access]]")
        .next()
        .context("policy")?
        .to_string();
    sys.set_policy(&without)?;
    wait_log(
        &sys,
        "netportd",
        "closing a link the policy no longer allows",
        T,
    )
    .await?;
    // The held connection ends on both portals, and the relay's UDP pair is released.
    let mut rest = Vec::new();
    tokio::time::timeout(T, held.read_to_end(&mut rest))
        .await
        .context("the held connection outlived its link")?
        .ok();
    // The serving portal ends its side either at netportd's word or, when the client's
    // QUIC close gets there first, because the peer closed: both are the link ending.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let nas = sys.log("portal-nas");
        if nas.contains("served link closed by netportd") || nas.contains("served link ended") {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the serving portal kept the link:\n{}",
            sys.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_log(&sys, "relayd", "allocation released by netportd", T).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_certificate_with_the_wrong_identity_is_refused_on_a_quic_link() -> Result<()> {
    use netport_proto::control::Message;
    use netport_proto::identity::{Identity, Role};
    use netport_proto::relay::{READY, encode_hello, token_from_hex};

    let tcp = echo_service().await?;
    let udp = udp_echo().await?;
    let (port, _) = netport_e2e::free_port_range(2)?;
    // Only the serving portal is real; the test plays `alice` towards netportd and shows
    // `mallory`'s certificate on the QUIC link.
    let sys = System::start_quic(&policy(tcp, udp, port), &["nas"])?;
    sys.wait_ready().await?;
    let alice = sys
        .pki
        .credentials(&sys.pki.issue(Role::Portal, "alice")?)?;
    let mallory = sys
        .pki
        .credentials(&sys.pki.issue(Role::Portal, "mallory")?)?;
    let mut c = netport_e2e::portal_session_as(&alice, sys.server_addr, "test +quic").await?;
    c.send(&Message::OpenLink {
        request_id: 1,
        access: "alice-echo".into(),
    })
    .await?;
    let (relay, quic, peer) = loop {
        if let Message::LinkOffer {
            relay, quic, peer, ..
        } = c.recv(T).await?
        {
            break (relay, quic.context("the offer has no QUIC path")?, peer);
        }
    };
    let relay_addr: SocketAddr = format!("{}:{}", relay.address, quic.port).parse()?;
    let sock = UdpSocket::bind("127.0.0.1:0").await?;
    let hello = encode_hello(&token_from_hex(&quic.token).context("token")?);
    let mut buf = [0u8; 64];
    loop {
        sock.send_to(&hello, relay_addr).await?;
        if let Ok(r) =
            tokio::time::timeout(Duration::from_millis(200), sock.recv_from(&mut buf)).await
            && let (n, from) = r?
            && from == relay_addr
            && buf[..n] == READY[..]
        {
            break;
        }
    }
    let mut tls = mallory.link_client(Identity::new(Role::Portal, peer)?)?;
    tls.alpn_protocols = vec![netport_proto::tls::QUIC_LINK_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        sock.into_std()?,
        quinn::default_runtime().context("runtime")?,
    )?;
    let config = quinn::ClientConfig::new(std::sync::Arc::new(crypto));
    // TLS 1.3: the client finishes first; the serving portal checks the identity after.
    if let Ok(Ok(conn)) = tokio::time::timeout(
        T,
        endpoint.connect_with(config, relay_addr, "link.netport.invalid")?,
    )
    .await
    {
        let answer = async {
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(b"\0\x04echo").await?;
            anyhow::Ok(recv.read_to_end(1 << 16).await?)
        };
        let got = tokio::time::timeout(T, answer)
            .await
            .context("the serving portal kept the link of a wrong identity open")?;
        ensure!(
            got.is_err() || got.as_ref().is_ok_and(Vec::is_empty),
            "the wrong identity got an answer: {got:?}"
        );
    }
    wait_log(
        &sys,
        "portal-nas",
        "link peer is netport://portal/mallory, but netportd announced netport://portal/alice",
        T,
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portal_without_quic_is_offered_no_udp_pair() -> Result<()> {
    use netport_proto::control::Message;
    use netport_proto::identity::Role;

    let tcp = echo_service().await?;
    let udp = udp_echo().await?;
    let (port, _) = netport_e2e::free_port_range(2)?;
    let sys = System::start_quic(&policy(tcp, udp, port), &["nas"])?;
    sys.wait_ready().await?;
    let alice = sys
        .pki
        .credentials(&sys.pki.issue(Role::Portal, "alice")?)?;
    // A portal that does not announce QUIC (quic = "off", or one that predates it).
    let mut c = netport_e2e::portal_session_as(&alice, sys.server_addr, "portal/0.0.9").await?;
    c.send(&Message::OpenLink {
        request_id: 1,
        access: "alice-echo".into(),
    })
    .await?;
    loop {
        match c.recv(T).await? {
            Message::LinkOffer { quic, .. } => {
                ensure!(quic.is_none(), "offered a QUIC path: {quic:?}");
                break;
            }
            Message::LinkDenied { message, .. } => anyhow::bail!("denied: {message}"),
            _ => {}
        }
    }
    wait_log(&sys, "netportd", "quic=false", T).await?;
    let relay = sys.log("relayd");
    ensure!(
        !relay.contains("transport=Udp"),
        "the relay allocated a UDP pair:\n{relay}"
    );
    Ok(())
}

/// The default, `quic = "udp"`: a UDP service's flows get a link over QUIC, a TCP service's
/// connections a link over TCP (faster for byte streams through a userspace relay), side by
/// side to the same serving portal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_udp_services_take_a_quic_link_and_tcp_services_a_tcp_link() -> Result<()> {
    let tcp = echo_service().await?;
    let udp = udp_echo().await?;
    let (port, _) = netport_e2e::free_port_range(2)?;
    let sys = System::start_quic_mode(&policy(tcp, udp, port), &["alice", "nas"], None)?;
    sys.wait_ready().await?;
    let listen = format!("127.0.0.1:{port}");
    wait_listening(&listen, T).await?;
    echo_round(&listen, 256 << 10, 1)
        .await
        .with_context(|| sys.logs())?;
    let client = UdpSocket::bind("127.0.0.1:0").await?;
    let to = format!("127.0.0.1:{}", port + 1);
    let mut buf = vec![0u8; 65_536];
    for i in 0..20u32 {
        let data = pattern(1000, i);
        let n = echo_datagram(&client, &to, &data, &mut buf, i == 0, &sys).await?;
        ensure!(buf[..n] == data[..], "datagram {i} changed");
    }
    // From the log, not the links gauge: the TCP link may idle out (3 s) meanwhile.
    let alice = sys.log("portal-alice");
    let up = |transport: &str| {
        alice
            .lines()
            .filter(|l| {
                l.contains(" link up")
                    && !l.contains("serving link up")
                    && l.contains(&format!("link_transport={transport}"))
            })
            .count()
    };
    ensure!(
        up("tcp") == 1 && up("quic") == 1,
        "client links: {} over TCP, {} over QUIC (one each expected):\n{}",
        up("tcp"),
        up("quic"),
        sys.logs()
    );
    ensure!(
        !alice.contains("falling back to TCP"),
        "the UDP service's link fell back to TCP on loopback:\n{alice}"
    );
    // netportd gave only the UDP service's link a UDP pair: the TCP service's link would
    // never use one, and an unused pair holds relay capacity until its tokens expire.
    let server = sys.log("netportd");
    let allocated = |quic: &str| {
        server
            .lines()
            .filter(|l| l.contains("link allocated") && l.contains(&format!("quic={quic}")))
            .count()
    };
    ensure!(
        allocated("false") == 1 && allocated("true") == 1,
        "links allocated: {} without a UDP pair, {} with one (one each expected):\n{server}",
        allocated("false"),
        allocated("true")
    );
    let udp_pairs = sys
        .log("relayd")
        .lines()
        .filter(|l| l.contains("allocation opened") && l.contains("transport=Udp"))
        .count();
    ensure!(
        udp_pairs == 1,
        "the relay opened {udp_pairs} UDP pairs, expected 1"
    );
    Ok(())
}
