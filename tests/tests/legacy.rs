//! Legacy (V0.1) compatibility: a test-only legacy portal, written from the protocol
//! document, drives the real netportd and relayd; mixed links join it with the Rust portal.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use netport_e2e::legacy_portal::{
    DATA_CHUNK, LegacyPortal, LegacySystem, LinkIo, relay_hello, send_frame, serve_channels,
};
use netport_e2e::{Pki, echo_service, wait_listening};
use netport_proto::identity::Role;
use netport_proto::legacy::{self, Auth, Command, LegacyName, LinkControl};
use netportd::pki::IssueRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(30);

const CAM: &str = "0A0B0C0D|00000001|11223344|00000002";
const NAS: &str = "01020304|00000003|11223344|00000004";
const STRANGER: &str = "05060708|00000001|11223344|00000001";
const ALICE: &str = "0A0A0A0A|00000007|11223344|00000008";

fn name(s: &str) -> Result<LegacyName> {
    LegacyName::parse(s).context("test name")
}

/// cam may reach nas's echo; alice (a Rust portal with a legacy name) may reach it too and
/// serves its own echo to nas; stranger is known but granted nothing.
fn policy(echo: &str, listen: u16) -> String {
    format!(
        r#"
[[portal]]
name = "cam"
legacy_id = "0A0B0C0D"
legacy_user = "11223344"

[[portal]]
name = "nas"
legacy_id = "01020304"
legacy_user = "11223344"

[[portal]]
name = "stranger"
legacy_id = "05060708"

[[portal]]
name = "alice"
legacy_id = "0A0A0A0A"
legacy_user = "11223344"

[[service]]
name = "nas-echo"
portal = "nas"
target = "{echo}"

[[access]]
name = "to-nas"
from = ["cam", "alice"]
listen = "127.0.0.1:{listen}"
service = "nas-echo"

[[service]]
name = "alice-echo"
portal = "alice"
target = "{echo}"

[[access]]
name = "nas-to-alice"
from = ["nas"]
listen = "127.0.0.1:{}"
service = "alice-echo"
"#,
        listen + 1
    )
}

async fn system(relay: bool, keepalive: u64, idle: u64) -> Result<(LegacySystem, String, u16)> {
    let echo = echo_service().await?.to_string();
    let (listen, _) = netport_e2e::free_port_range(2)?;
    let sys = LegacySystem::start(Pki::new()?, &policy(&echo, listen), keepalive, idle, relay)?;
    wait_listening(&sys.legacy_addr.to_string(), T).await?;
    if relay {
        sys.wait_log("netportd", "relay connected", T).await?;
    }
    Ok((sys, echo, listen))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_is_accepted_for_a_known_id_and_refused_otherwise() -> Result<()> {
    let (sys, _, _) = system(false, 10, 45).await?;
    let cam = LegacyPortal::issue(&sys.pki, "cam", name(CAM)?)?;
    let mut c = cam.login(sys.legacy_addr).await?;
    c.keepalive().await?;
    sys.wait_log("netportd", "portal connected (legacy V0.1) portal=cam", T)
        .await?;

    // A PortalID the policy does not know.
    let unknown = LegacyPortal::issue(
        &sys.pki,
        "cam",
        name("99999999|00000001|11223344|00000001")?,
    )?;
    let (_, reply) = unknown
        .login_as(
            sys.legacy_addr,
            Auth {
                portal_id: [0x99; 4],
                user_id: [0x11, 0x22, 0x33, 0x44],
            },
        )
        .await?;
    ensure!(reply != legacy::AUTH_OK, "an unknown PortalID logged in");

    // The right PortalID with another UserID than the policy's.
    let (_, reply) = cam
        .login_as(
            sys.legacy_addr,
            Auth {
                portal_id: name(CAM)?.id,
                user_id: [1, 2, 3, 4],
            },
        )
        .await?;
    ensure!(reply != legacy::AUTH_OK, "a wrong UserID logged in");

    // A certificate without the legacy name cannot claim the ID.
    let plain = sys.pki.issue(Role::Portal, "cam")?;
    let no_name = LegacyPortal::from_files(&sys.pki, &plain, name(CAM)?)?;
    let (_, reply) = no_name
        .login_as(
            sys.legacy_addr,
            Auth {
                portal_id: name(CAM)?.id,
                user_id: name(CAM)?.user,
            },
        )
        .await?;
    ensure!(
        reply != legacy::AUTH_OK,
        "a certificate without the name logged in"
    );

    // Another portal's certificate claiming cam's IDs.
    let nas = LegacyPortal::issue(&sys.pki, "nas", name(NAS)?)?;
    let (_, reply) = nas
        .login_as(
            sys.legacy_addr,
            Auth {
                portal_id: name(CAM)?.id,
                user_id: name(CAM)?.user,
            },
        )
        .await?;
    ensure!(reply != legacy::AUTH_OK, "nas logged in as cam");
    let log = sys.log("netportd");
    ensure!(log.contains("no portal with legacy_id 99999999"), "{log}");
    ensure!(
        log.contains("legacy_user 11223344, the login says 01020304"),
        "{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_flow_both_ways_and_a_silent_portal_is_dropped() -> Result<()> {
    // The server's keepalive every second, silence limit 3 s.
    let (sys, _, _) = system(false, 1, 3).await?;
    let cam = LegacyPortal::issue(&sys.pki, "cam", name(CAM)?)?;
    let mut c = cam.login(sys.legacy_addr).await?;
    // Unsolicited keepalives arrive although the portal says nothing.
    let mut seen = 0;
    let deadline = tokio::time::Instant::now() + T;
    while seen < 2 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no server keepalives"
        );
        let m = c.recv(T).await?;
        ensure!(m.command == Command::KeepAlive, "unexpected {m:?}");
        seen += 1;
    }
    // A portal that keeps sending keepalives stays connected past the silence limit...
    let mut kept = LegacyPortal::issue(&sys.pki, "nas", name(NAS)?)?
        .login(sys.legacy_addr)
        .await?;
    let stay_until = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < stay_until {
        kept.keepalive().await?;
        // Each keepalive is echoed (or a periodic one is due): something always comes back.
        let m = kept.recv(Duration::from_secs(5)).await?;
        ensure!(m.command == Command::KeepAlive, "unexpected {m:?}");
    }
    // ...while the silent one is dropped: its connection ends.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "a silent portal was never dropped"
        );
        match c.recv(T).await {
            Ok(m) if m.command == Command::KeepAlive => {}
            Ok(m) => bail!("unexpected {m:?}"),
            Err(_) => break,
        }
    }
    sys.wait_log("netportd", "no keepalive for 3 s", T).await?;
    ensure!(
        kept.keepalive().await.is_ok(),
        "the talking portal lost its connection"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_requests_are_allowed_denied_offline_or_without_relay() -> Result<()> {
    let (sys, _, _) = system(true, 10, 45).await?;
    let cam = LegacyPortal::issue(&sys.pki, "cam", name(CAM)?)?;
    let nas = LegacyPortal::issue(&sys.pki, "nas", name(NAS)?)?;
    let stranger = LegacyPortal::issue(&sys.pki, "stranger", name(STRANGER)?)?;
    let mut c = cam.login(sys.legacy_addr).await?;

    // nas is not connected yet.
    ensure!(c.request_link(name(NAS)?.id).await? == Command::NotFound);
    let mut n = nas.login(sys.legacy_addr).await?;
    sys.wait_log("netportd", "portal connected (legacy V0.1) portal=nas", T)
        .await?;
    // Allowed: REPL with nas's values, CLKR to nas with cam's values and the same tokenP.
    let Command::Granted(repl) = c.request_link(name(NAS)?.id).await? else {
        bail!("link refused:\n{}", sys.logs());
    };
    let want = name(NAS)?;
    ensure!((repl.peer.idv, repl.peer.user, repl.peer.userv) == (want.idv, want.user, want.userv));
    ensure!(repl.relay_addr == "127.0.0.1");
    let clkr = n.wait_clkr(T).await?;
    ensure!(clkr.peer == name(CAM)?, "CLKR names {}", clkr.peer);
    ensure!(clkr.token_p == repl.token_p && clkr.token_r == repl.token_r);
    ensure!(clkr.relay_port == repl.relay_port);

    // Denied: stranger is granted nothing on nas; nas is granted nothing on cam.
    let mut s = stranger.login(sys.legacy_addr).await?;
    ensure!(s.request_link(name(NAS)?.id).await? == Command::Deny);
    ensure!(n.request_link(name(CAM)?.id).await? == Command::Deny);
    // An ID the policy does not know.
    ensure!(c.request_link([0x77; 4]).await? == Command::Deny);

    // Without a relay: NORL.
    let (norelay, _, _) = system(false, 10, 45).await?;
    let cam2 = LegacyPortal::issue(&norelay.pki, "cam", name(CAM)?)?;
    let nas2 = LegacyPortal::issue(&norelay.pki, "nas", name(NAS)?)?;
    let mut c2 = cam2.login(norelay.legacy_addr).await?;
    let _n2 = nas2.login(norelay.legacy_addr).await?;
    norelay
        .wait_log("netportd", "portal connected (legacy V0.1) portal=nas", T)
        .await?;
    ensure!(c2.request_link(name(NAS)?.id).await? == Command::NoRelay);
    Ok(())
}

/// Opens a channel to `addr:port` on the far side; returns the far side's channel.
async fn open_channel(link: &mut LinkIo, src: u16, port: u16, addr: &str) -> Result<u16> {
    link.send_control(&LinkControl::Open {
        req: u32::from(src),
        src,
        port,
        addr: addr.into(),
    })
    .await?;
    match link.recv_control(T).await? {
        LinkControl::Opened { src: s, new, .. } if s == src => Ok(new),
        other => bail!("unexpected answer to n: {other:?}"),
    }
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed).to_be_bytes()[0])
        .collect()
}

/// Sends `data` on channel `dst` (ours: `src`), half-closes, and collects what comes back on
/// `src` until the far side half-closes too.
async fn echo_through(
    link: LinkIo,
    src: u16,
    dst: u16,
    data: Vec<u8>,
) -> Result<(LinkIo, Vec<u8>)> {
    let LinkIo { mut rd, mut wr } = link;
    let sender = tokio::spawn(async move {
        for chunk in data.chunks(DATA_CHUNK) {
            send_frame(&mut wr, dst, chunk).await?;
        }
        send_frame(
            &mut wr,
            0,
            &legacy::encode_link_control(&LinkControl::HalfClose { req: 99, dst, src }),
        )
        .await?;
        Ok::<_, anyhow::Error>(wr)
    });
    let mut back = Vec::new();
    loop {
        let (ch, p) = netport_e2e::legacy_portal::recv_frame(&mut rd, T).await?;
        if ch == src {
            back.extend_from_slice(&p);
            continue;
        }
        ensure!(ch == 0, "data for an unknown channel {ch}");
        match legacy::decode_link_control(&p)? {
            LinkControl::KeepAlive => {}
            // The answer to our half-close may come before or after the far side's own.
            LinkControl::HalfClosed { ok, .. } => ensure!(ok, "half-close refused"),
            LinkControl::HalfClose { dst: d, .. } if d == src => break,
            other => bail!("unexpected {other:?}"),
        }
    }
    let wr = sender.await??;
    Ok((LinkIo { rd, wr }, back))
}

/// cam and nas (both legacy) logged in, and a link from cam to nas up, nas serving channels.
struct CamToNas {
    c: netport_e2e::legacy_portal::LegacyControl,
    n: netport_e2e::legacy_portal::LegacyControl,
    repl: legacy::Meeting,
    client: LinkIo,
    _serving: tokio::task::JoinHandle<()>,
}

async fn cam_to_nas(sys: &LegacySystem) -> Result<CamToNas> {
    let cam = LegacyPortal::issue(&sys.pki, "cam", name(CAM)?)?;
    let nas = LegacyPortal::issue(&sys.pki, "nas", name(NAS)?)?;
    let mut c = cam.login(sys.legacy_addr).await?;
    let mut n = nas.login(sys.legacy_addr).await?;
    sys.wait_log("netportd", "portal connected (legacy V0.1) portal=nas", T)
        .await?;
    let Command::Granted(repl) = c.request_link(name(NAS)?.id).await? else {
        bail!("link refused:\n{}", sys.logs());
    };
    let clkr = n.wait_clkr(T).await?;
    let (client, server) = tokio::join!(
        cam.link_as_requester(name(NAS)?.id, &repl),
        nas.link_as_receiver(&clkr)
    );
    Ok(CamToNas {
        c,
        n,
        repl,
        client: client.context("requester side")?,
        _serving: serve_channels(server.context("receiver side")?),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_link_carries_a_mebibyte_each_way_half_closes_aborts_and_spends_its_token()
-> Result<()> {
    let (sys, echo, _) = system(true, 10, 45).await?;
    let CamToNas {
        repl, mut client, ..
    } = cam_to_nas(&sys).await?;

    // The token is spent: a third hello with it, or another token, gets `Bad T !`.
    for token in [repl.token_r, *b"guessed!"] {
        let err = relay_hello(repl.relay_port, "127.0.0.1", &token)
            .await
            .err()
            .context("the relay accepted a spent or unknown token")?;
        ensure!(err.to_string().contains("Bad T !"), "{err:#}");
    }

    // 1 MiB to the echo and 1 MiB back, then half-close both ways.
    let (eh, ep) = echo.rsplit_once(':').context("echo address")?;
    let dst = open_channel(&mut client, 1, ep.parse()?, eh).await?;
    ensure!(dst != 0, "the channel open failed");
    let data = pattern(1 << 20, 7);
    let (mut client, back) = echo_through(client, 1, dst, data.clone()).await?;
    ensure!(
        back.len() == data.len(),
        "got {} of {} bytes back",
        back.len(),
        data.len()
    );
    ensure!(back == data, "bytes changed on the legacy link");

    // Abort: a service that waits for EOF sees its connection end.
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sink_port = sink.local_addr()?.port();
    let dst = open_channel(&mut client, 2, sink_port, "127.0.0.1").await?;
    ensure!(dst != 0, "the channel open failed");
    let (mut conn, _) = tokio::time::timeout(T, sink.accept()).await??;
    client
        .send_control(&LinkControl::Abort {
            req: 5,
            dst,
            src: 2,
        })
        .await?;
    match client.recv_control(T).await? {
        LinkControl::Aborted { ok: true, .. } => {}
        other => bail!("unexpected answer to d: {other:?}"),
    }
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(T, conn.read(&mut buf))
        .await?
        .unwrap_or(0);
    ensure!(
        n == 0,
        "the aborted channel's service connection stayed open"
    );

    // A channel to a closed port fails with N newCh = 0.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let closed_port = closed.local_addr()?.port();
    drop(closed);
    ensure!(open_channel(&mut client, 3, closed_port, "127.0.0.1").await? == 0);
    Ok(())
}

/// Issues alice's certificate with her legacy name and starts her as a Rust portal.
fn start_alice(sys: &mut LegacySystem) -> Result<()> {
    let files = sys.pki.write(sys.pki.ca.issue(&IssueRequest {
        legacy: Some(name(ALICE)?),
        ..IssueRequest::new(Role::Portal, "alice", 30)
    })?)?;
    sys.start_portal("alice", &files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_portal_reaches_a_legacy_portals_service() -> Result<()> {
    let (mut sys, _, listen) = system(true, 10, 45).await?;
    let nas = LegacyPortal::issue(&sys.pki, "nas", name(NAS)?)?;
    let mut n = nas.login(sys.legacy_addr).await?;
    start_alice(&mut sys)?;
    sys.wait_log("netportd", "portal connected portal=alice", T)
        .await?;
    let addr = format!("127.0.0.1:{listen}");
    wait_listening(&addr, T).await?;
    // The legacy side answers the CLKR and serves channels, as the Python portal would.
    let serving = tokio::spawn(async move {
        let clkr = n.wait_clkr(T).await?;
        ensure!(clkr.peer == name(ALICE)?, "CLKR names {}", clkr.peer);
        let link = nas.link_as_receiver(&clkr).await?;
        Ok::<_, anyhow::Error>((serve_channels(link), n))
    });
    let data = pattern(1 << 20, 3);
    let s = TcpStream::connect(&addr).await?;
    let (mut r, mut w) = s.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await?;
        w.shutdown().await?;
        Ok::<_, std::io::Error>(())
    });
    let mut back = Vec::new();
    tokio::time::timeout(T, r.read_to_end(&mut back))
        .await
        .with_context(|| format!("echo through the legacy peer timed out:\n{}", sys.logs()))??;
    writer.await??;
    ensure!(
        back == data,
        "got {} of {} bytes, or changed bytes:\n{}",
        back.len(),
        data.len(),
        sys.logs()
    );
    let _ = tokio::time::timeout(T, serving).await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_portal_reaches_a_rust_portals_service_and_only_what_is_granted() -> Result<()> {
    let (mut sys, echo, _) = system(true, 10, 45).await?;
    let nas = LegacyPortal::issue(&sys.pki, "nas", name(NAS)?)?;
    let mut n = nas.login(sys.legacy_addr).await?;
    start_alice(&mut sys)?;
    sys.wait_log("netportd", "portal connected portal=alice", T)
        .await?;
    let Command::Granted(repl) = n.request_link(name(ALICE)?.id).await? else {
        bail!("link refused:\n{}", sys.logs());
    };
    ensure!(repl.peer.idv == name(ALICE)?.idv && repl.peer.userv == name(ALICE)?.userv);
    let mut link = nas
        .link_as_requester(name(ALICE)?.id, &repl)
        .await
        .with_context(|| sys.logs())?;
    // A target the policy does not grant is refused by the Rust portal itself.
    let other = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let other_port = other.local_addr()?.port();
    ensure!(
        open_channel(&mut link, 1, other_port, "127.0.0.1").await? == 0,
        "the Rust portal opened a target that is not granted"
    );
    // The granted one works, 1 MiB each way.
    let (eh, ep) = echo.rsplit_once(':').context("echo address")?;
    let dst = open_channel(&mut link, 2, ep.parse()?, eh).await?;
    ensure!(dst != 0, "the granted target was refused:\n{}", sys.logs());
    let data = pattern(1 << 20, 11);
    let (_link, back) = echo_through(link, 2, dst, data.clone()).await?;
    ensure!(
        back == data,
        "got {} of {} bytes, or changed bytes",
        back.len(),
        data.len()
    );
    Ok(())
}

fn run(bin: &str, args: &[&str]) -> Result<(Option<i32>, String, String)> {
    let out = std::process::Command::new(netport_e2e::binary(bin))
        .args(args)
        .output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn legacy_listener_needs_a_certificate_named_server_and_sane_keepalives() -> Result<()> {
    let pki = Pki::new()?;
    let d = pki.dir.path();
    std::fs::create_dir_all(d.join("policy"))?;
    std::fs::write(
        d.join("policy/p.toml"),
        "[[portal]]\nname = \"cam\"\nlegacy_id = \"0A0B0C0D\"\n",
    )?;
    // Issued for localhost only: no `server` name.
    let server = pki.issue(Role::Server, "netportd")?;
    let named = pki.write(pki.ca.issue(&IssueRequest {
        dns: vec!["server".into()],
        ..IssueRequest::new(Role::Server, "legacy", 30)
    })?)?;
    let cfg = |legacy: &str| {
        format!(
            "listen = [\"127.0.0.1:0\"]\npolicy = \"policy\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[legacy]\n{legacy}",
            pki.ca_path().display(),
            server.cert.display(),
            server.key.display()
        )
    };
    let cases = [
        (
            cfg("listen = \"127.0.0.1:0\"\n"),
            "certificate name `server`",
        ),
        (
            cfg(&format!(
                "listen = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\nkeepalive_secs = 30\n",
                named.cert.display(),
                named.key.display()
            )),
            "legacy.keepalive_secs",
        ),
        (cfg("listen = \"127.0.0.1:0\"\ncolour = 1\n"), "colour"),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let path = d.join(format!("netportd-{i}.toml"));
        std::fs::write(&path, text)?;
        let (code, _, err) = run(
            "netportd",
            &["run", "--config", path.to_str().context("utf-8")?],
        )?;
        ensure!(code == Some(2), "case {i} exited {code:?}: {err}");
        ensure!(
            err.contains(needle),
            "case {i}: expected `{needle}` in: {err}"
        );
    }
    Ok(())
}

#[test]
fn ca_issue_adds_the_legacy_name_for_portals_only() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = dir.path().to_str().context("utf-8")?;
    let (code, _, err) = run("netportd", &["ca", "init", "--dir", ca])?;
    ensure!(code == Some(0), "{err}");
    let (code, out, err) = run(
        "netportd",
        &[
            "ca",
            "issue",
            "--dir",
            ca,
            "portal",
            "cam",
            "--legacy-id",
            "0a0b0c0d",
            "--legacy-user",
            "11223344",
            "--legacy-userv",
            "00000002",
        ],
    )?;
    ensure!(code == Some(0), "{err}");
    ensure!(
        out.contains("legacy       0A0B0C0D|00000001|11223344|00000002"),
        "{out}"
    );
    let pem = std::fs::read(dir.path().join("portal-cam.crt"))?;
    let der = netportd::pki::first_certificate(&pem).map_err(anyhow::Error::msg)?;
    let info = netport_proto::identity::inspect(&der)?;
    ensure!(info.dns_names == [CAM], "{:?}", info.dns_names);
    let (code, _, err) = run(
        "netportd",
        &[
            "ca",
            "issue",
            "--dir",
            ca,
            "relay",
            "r",
            "--legacy-id",
            "0A0B0C0D",
            "--legacy-user",
            "11223344",
        ],
    )?;
    ensure!(
        code == Some(2) && err.contains("only for portal certificates"),
        "{err}"
    );
    let (code, _, err) = run(
        "netportd",
        &[
            "ca",
            "issue",
            "--dir",
            ca,
            "portal",
            "x",
            "--legacy-id",
            "0A0B0C0D",
        ],
    )?;
    ensure!(code == Some(2) && err.contains("--legacy-user"), "{err}");
    let (code, _, err) = run(
        "netportd",
        &[
            "ca",
            "issue",
            "--dir",
            ca,
            "portal",
            "y",
            "--legacy-id",
            "0A0B0C",
            "--legacy-user",
            "11223344",
        ],
    )?;
    ensure!(code == Some(2) && err.contains("8 hex digits"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_cuts_a_legacy_link_no_longer_allowed_and_a_removed_legacy_portal() -> Result<()> {
    let (sys, echo, listen) = system(true, 10, 45).await?;
    let CamToNas {
        mut c,
        mut n,
        mut client,
        ..
    } = cam_to_nas(&sys).await?;
    let (eh, ep) = echo.rsplit_once(':').context("echo address")?;
    let dst = open_channel(&mut client, 1, ep.parse()?, eh).await?;
    ensure!(dst != 0, "the channel open failed");

    // cam loses its only grant on nas: the link is cut at the relay.
    let without_grant =
        policy(&echo, listen).replace("from = [\"cam\", \"alice\"]", "from = [\"alice\"]");
    sys.set_policy(&without_grant)?;
    sys.wait_log("netportd", "closing a link the policy no longer allows", T)
        .await?;
    let deadline = tokio::time::Instant::now() + T;
    loop {
        ensure!(tokio::time::Instant::now() < deadline, "the link stayed up");
        match client.recv_frame(T).await {
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    // And new requests are denied.
    ensure!(c.request_link(name(NAS)?.id).await? == Command::Deny);

    // cam leaves the policy: its control connection is closed.
    let without_cam = without_grant.replace(
        "[[portal]]\nname = \"cam\"\nlegacy_id = \"0A0B0C0D\"\nlegacy_user = \"11223344\"\n",
        "",
    );
    ensure!(
        without_cam != without_grant,
        "the test policy did not change"
    );
    sys.set_policy(&without_cam)?;
    let deadline = tokio::time::Instant::now() + T;
    loop {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "cam stayed connected"
        );
        match c.recv(T).await {
            Ok(m) if m.command == Command::KeepAlive => {}
            Ok(m) => bail!("unexpected {m:?}"),
            Err(_) => break,
        }
    }
    sys.wait_log("netportd", "cutting off legacy portal", T)
        .await?;
    // nas is untouched.
    n.keepalive().await?;
    Ok(())
}

/// CPython's own `ssl` module (what the original portal uses) logs in, asks for a link and
/// gets its keepalive echoed, with one fixed-size read per header and per payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpython_ssl_client_logs_in_and_is_answered() -> Result<()> {
    if std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("SKIPPED cpython_ssl_client_logs_in_and_is_answered: python3 not installed");
        return Ok(());
    }
    let (sys, _, _) = system(false, 10, 45).await?;
    let files = sys.pki.write(sys.pki.ca.issue(&IssueRequest {
        legacy: Some(name(CAM)?),
        ..IssueRequest::new(Role::Portal, "cam", 30)
    })?)?;
    let script = r#"
import socket, ssl, struct, sys
ca, cert, key, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ctx = ssl.create_default_context(cafile=ca)
ctx.load_cert_chain(cert, key)
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="server")
def send(p):
    s.sendall(struct.pack("<H", len(p)) + b".." + p)
def recv():
    h = s.recv(4)
    n = struct.unpack("<H", h[:2])[0]
    return s.recv(n) if n else b""
send(b"V0.1AUTH" + bytes.fromhex("0A0B0C0D") + bytes.fromhex("11223344"))
print(recv().hex())
send(b"\x07\x00\x00\x00RQRL" + bytes.fromhex("01020304") + b"seedseed")
print(recv().hex())
send(b"...." + b".KA.")
print(recv().hex())
"#;
    // netportd is another process: blocking this test's thread for the script is harmless.
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(sys.pki.ca_path())
        .arg(&files.cert)
        .arg(&files.key)
        .arg(sys.legacy_addr.port().to_string())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "python failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        sys.logs()
    );
    let lines: Vec<Vec<u8>> = stdout.lines().map(hex::decode).collect::<Result<_, _>>()?;
    ensure!(lines.len() == 3, "{stdout}");
    ensure!(lines[0] == legacy::AUTH_OK, "login: {stdout}");
    // nas is not connected: NFND, with the request's ref echoed.
    ensure!(lines[1] == b"\x07\x00\x00\x00REPLNFND", "RQRL: {stdout}");
    // ref `....`, cmd `.KA.`
    ensure!(
        lines[2] == [&b"...."[..], b".KA."].concat(),
        "keepalive: {stdout}"
    );
    Ok(())
}
