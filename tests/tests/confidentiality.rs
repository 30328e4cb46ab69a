//! What the relay carries is the portals' TLS; and a client portal that asks for a target
//! it was not granted is refused by the serving portal.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use netport_e2e::{Pki, System, echo_service, portal_session, wait_listening, wait_log};
use netport_proto::control::Message;
use netport_proto::identity::{Identity, Role};
use netport_proto::relay::{READY, encode_hello, token_from_hex};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const T: Duration = Duration::from_secs(20);

type Seen = Arc<Mutex<Vec<u8>>>;

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
[[service]]
name = "secret"
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

async fn pump<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(mut from: R, mut to: W, seen: Seen) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        seen.lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(&buf[..n]);
    }
    let _ = to.shutdown().await;
}

/// Listens on 127.0.0.2 at every relay port and forwards to the relay on 127.0.0.1,
/// recording every byte that goes either way.
async fn tap(first: u16, last: u16) -> Result<Seen> {
    let seen: Seen = Arc::default();
    for port in first..=last {
        let l = TcpListener::bind(("127.0.0.2", port)).await?;
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = l.accept().await {
                let Ok(relay) = TcpStream::connect(("127.0.0.1", port)).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (rr, rw) = relay.into_split();
                tokio::spawn(pump(cr, rw, seen.clone()));
                tokio::spawn(pump(rr, cw, seen.clone()));
            }
        });
    }
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_sees_only_ciphertext() -> Result<()> {
    let echo = echo_service().await?;
    let (port, _) = netport_e2e::free_port_range(1)?;
    let sys = System::start_in(
        Pki::new()?,
        &policy(&echo.to_string(), port),
        &["alice", "nas"],
        1,
        "127.0.0.2",
    )?;
    let (first, last) = sys.relay_ports[0];
    let seen = tap(first, last).await?;
    let listen = format!("127.0.0.1:{port}");
    wait_listening(&listen, T).await?;
    sys.wait_ready().await?;

    let marker = b"NETPORT-PLAINTEXT-MARKER-7f3a9c";
    let mut s = TcpStream::connect(&listen).await?;
    let mut payload = Vec::new();
    for _ in 0..1000 {
        payload.extend_from_slice(marker);
    }
    s.write_all(&payload).await?;
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(T, s.read_exact(&mut back))
        .await
        .context("echo")??;
    assert_eq!(back, payload, "the echo came back changed");
    drop(s);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert!(
        seen.len() > 2 * payload.len(),
        "the tap saw only {} bytes: did the link go through it?\n{}",
        seen.len(),
        sys.logs()
    );
    assert!(
        !seen.windows(marker.len()).any(|w| w == marker),
        "the plaintext marker crossed the relay"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serving_portal_refuses_a_target_not_granted_to_the_link() -> Result<()> {
    let echo = echo_service().await?;
    let (port, _) = netport_e2e::free_port_range(1)?;
    let pki = Pki::new()?;
    let alice = pki.issue(Role::Portal, "alice")?;
    let creds = pki.credentials(&alice)?;
    // Only `nas` runs the real portal; `alice` is this test, speaking the protocol itself.
    let sys = System::start_in(
        pki,
        &policy(&echo.to_string(), port),
        &["nas"],
        1,
        "127.0.0.1",
    )?;
    sys.wait_ready().await?;
    wait_log(&sys, "netportd", "relay connected", T).await?;

    let mut c = portal_session(&creds, sys.server_addr).await?;
    let mut offer = None;
    c.send(&Message::OpenLink {
        request_id: 1,
        access: "alice-echo".into(),
    })
    .await?;
    for _ in 0..5 {
        if let m @ Message::LinkOffer { .. } = c.recv(T).await? {
            offer = Some(m);
            break;
        }
    }
    let Some(Message::LinkOffer {
        peer, relay, token, ..
    }) = offer
    else {
        bail!("no link offer:\n{}", sys.logs());
    };
    let mut tcp = TcpStream::connect((relay.address.as_str(), relay.port)).await?;
    tcp.write_all(&encode_hello(&token_from_hex(&token).context("token")?))
        .await?;
    let mut ready = [0u8; 4];
    tokio::time::timeout(T, tcp.read_exact(&mut ready)).await??;
    assert_eq!(&ready, READY);
    let link = tokio_rustls::TlsConnector::from(Arc::new(
        creds.link_client(Identity::new(Role::Portal, peer)?)?,
    ));
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("link.netport.invalid")?;
    let tls = link.connect(name, tcp).await?;
    let opener = portal::mux::client(tls, 1024, |_| {});

    // Granted: opens.
    let mut ok = opener.open().await?;
    ok.write_all(&[0, 4]).await?;
    ok.write_all(b"echo").await?;
    let mut code = [0u8; 1];
    tokio::time::timeout(T, ok.read_exact(&mut code)).await??;
    assert_eq!(code[0], 0, "the granted service was refused");

    // Not granted on this link (alice has no access rule for it): refused, nothing dialled.
    let mut bad = opener.open().await?;
    bad.write_all(&[0, 6]).await?;
    bad.write_all(b"secret").await?;
    tokio::time::timeout(T, bad.read_exact(&mut code)).await??;
    assert_eq!(code[0], 1, "a service not granted to the link was opened");
    wait_log(
        &sys,
        "portal-nas",
        "asked for `secret`, which this link does not grant",
        T,
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portal_without_access_is_denied_with_the_reason_and_rule() -> Result<()> {
    let echo = echo_service().await?;
    let (port, _) = netport_e2e::free_port_range(1)?;
    let pki = Pki::new()?;
    let mallory = pki.issue(Role::Portal, "mallory")?;
    let creds = pki.credentials(&mallory)?;
    let text = format!(
        "{}\n[[portal]]\nname = \"mallory\"\n",
        policy(&echo.to_string(), port)
    );
    let sys = System::start_in(pki, &text, &["nas"], 1, "127.0.0.1")?;
    sys.wait_ready().await?;

    // mallory holds no listener, but asks for alice's rule anyway.
    let mut c = portal_session(&creds, sys.server_addr).await?;
    match c.recv(T).await? {
        Message::Welcome { .. } => {}
        other => bail!("expected welcome, got {other:?}"),
    }
    match c.recv(T).await? {
        Message::DesiredState { listeners, .. } => assert!(listeners.is_empty(), "{listeners:?}"),
        other => bail!("expected desired_state, got {other:?}"),
    }
    c.send(&Message::OpenLink {
        request_id: 9,
        access: "alice-echo".into(),
    })
    .await?;
    match c.recv(T).await? {
        Message::LinkDenied {
            request_id,
            reason,
            rule,
            message,
        } => {
            assert_eq!(request_id, 9);
            assert_eq!(reason, "no-access-rule");
            assert_eq!(rule.as_deref(), Some("alice-echo"));
            assert!(message.contains("mallory"), "{message}");
        }
        other => bail!("expected link_denied, got {other:?}"),
    }
    wait_log(&sys, "netportd", "link denied", T).await?;
    Ok(())
}
