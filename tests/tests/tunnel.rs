//! The whole system on loopback: netportd, relayd and two portals, real certificates,
//! bytes through the tunnel.

use std::time::Duration;

use anyhow::{Context, Result};
use netport_e2e::{System, echo_service, wait_listening, wait_log};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(30);

fn policy(target: &str, listen_port: u16) -> String {
    format!(
        r#"
[[portal]]
name = "alice"
tags = ["dev"]

[[portal]]
name = "nas"

[[portal]]
name = "mallory"

[[service]]
name = "echo"
portal = "nas"
target = "{target}"

[[access]]
name = "devs-echo"
from = ["tag:dev"]
listen = "127.0.0.1:{listen_port}"
service = "echo"

[[portal]]
name = "ghost-nas"

[[service]]
name = "ghost-echo"
portal = "ghost-nas"
target = "{target}"

[[access]]
name = "mallory-ghost"
from = ["mallory"]
listen = "127.0.0.1:{}"
service = "ghost-echo"
"#,
        listen_port + 1
    )
}

/// Sends `len` bytes and reads them back through an echo, comparing all of them.
async fn echo_round(addr: &str, len: usize) -> Result<()> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (mut r, mut w) = s.into_split();
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0])
        .collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await?;
        // Half-close: the echo still sends everything back.
        w.shutdown().await?;
        Ok::<_, std::io::Error>(())
    });
    let mut back = Vec::with_capacity(len);
    tokio::time::timeout(T, r.read_to_end(&mut back))
        .await
        .context("echo timed out")??;
    writer.await??;
    anyhow::ensure!(back.len() == len, "got {} of {len} bytes back", back.len());
    anyhow::ensure!(back == data, "bytes changed in the tunnel");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_cross_the_tunnel_and_a_refused_link_is_explained() -> Result<()> {
    let echo = echo_service().await?;
    let (port, _) = netport_e2e::free_port_range(2)?;
    let sys = System::start(
        &policy(&echo.to_string(), port),
        &["alice", "nas", "mallory"],
    )?;
    let listen = format!("127.0.0.1:{port}");
    wait_listening(&listen, T)
        .await
        .with_context(|| sys.logs())?;
    wait_log(&sys, "netportd", "relay connected", T).await?;
    sys.wait_ready().await?;

    echo_round(&listen, 1000)
        .await
        .with_context(|| format!("1000-byte echo\n{}", sys.logs()))?;

    let round = echo_round(&listen, 4 << 20).await;
    round.with_context(|| sys.logs())?;

    // Many connections share the one link.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let l = listen.clone();
        tasks.push(tokio::spawn(async move { echo_round(&l, 64 << 10).await }));
    }
    for t in tasks {
        t.await?.with_context(|| sys.logs())?;
    }
    // One link carried all of them.
    let links = sys.log("netportd").matches("link allocated").count();
    assert!(
        links <= 2,
        "expected one link (two if the readiness probe raced), saw {links}"
    );

    // A link the server cannot set up: the connection is closed and the portal's log says
    // why, with the rule.
    let ghost = format!("127.0.0.1:{}", port + 1);
    wait_listening(&ghost, T).await?;
    let mut s = TcpStream::connect(&ghost).await?;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut buf))
        .await
        .context("not closed")?;
    assert!(buf.is_empty());
    wait_log(
        &sys,
        "portal-mallory",
        "denied by netportd (peer-offline, rule `mallory-ghost`)",
        T,
    )
    .await?;
    Ok(())
}

fn two_portal_policy(target: &str, listen_port: u16) -> String {
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

[[access]]
name = "alice-echo"
from = ["alice"]
listen = "127.0.0.1:{listen_port}"
service = "echo"
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_and_two_hundred_concurrent_connections() -> Result<()> {
    let sys = big_and_many("").await?;
    // The default: single-threaded portals.
    assert!(
        sys.log("portal-alice")
            .contains("threads=1 flavor=CurrentThread")
    );
    Ok(())
}

/// The same with portals on a thread per CPU (`threads = 0`) instead of the default single
/// thread: the two runtimes carry the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_with_portals_on_a_thread_per_cpu() -> Result<()> {
    let sys = big_and_many("threads = 0\n").await?;
    for portal in ["alice", "nas"] {
        let log = sys.log(&format!("portal-{portal}"));
        assert!(
            log.contains("flavor=MultiThread"),
            "portal {portal} should run on a thread per CPU:\n{log}"
        );
    }
    Ok(())
}

/// 64 MiB each way, then 200 concurrent connections, every byte compared, over one link;
/// `portal_extra` goes into both portal.toml files. Returns the system, still running.
async fn big_and_many(portal_extra: &str) -> Result<System> {
    let echo = echo_service().await?;
    let (port, _) = netport_e2e::free_port_range(1)?;
    let sys = System::start_portals_with(
        &two_portal_policy(&echo.to_string(), port),
        &["alice", "nas"],
        portal_extra,
    )?;
    let listen = format!("127.0.0.1:{port}");
    wait_listening(&listen, T)
        .await
        .with_context(|| sys.logs())?;
    sys.wait_ready().await?;
    // echo_round compares every byte (a stronger check than comparing hashes).
    tokio::time::timeout(Duration::from_secs(120), echo_round(&listen, 64 << 20))
        .await
        .context("64 MiB echo took over 2 minutes")?
        .with_context(|| sys.logs())?;

    let mut tasks = Vec::new();
    for i in 0..200usize {
        let l = listen.clone();
        tasks.push(tokio::spawn(
            async move { echo_round(&l, 16 << 10 | i).await },
        ));
    }
    for t in tasks {
        t.await?.with_context(|| sys.logs())?;
    }
    let links = sys.log("netportd").matches("link allocated").count();
    assert!(
        links <= 2,
        "200 connections should share one link, saw {links} links"
    );
    Ok(sys)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portals_reconnect_after_netportd_restarts() -> Result<()> {
    let echo = echo_service().await?;
    let (port, _) = netport_e2e::free_port_range(1)?;
    let mut sys = System::start(
        &two_portal_policy(&echo.to_string(), port),
        &["alice", "nas"],
    )?;
    let listen = format!("127.0.0.1:{port}");
    wait_listening(&listen, T).await?;
    sys.wait_ready().await?;
    echo_round(&listen, 1 << 20)
        .await
        .with_context(|| sys.logs())?;

    sys.daemon("netportd")?.restart()?;
    // Both portals and the relay come back by themselves.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let log = sys.log("netportd");
        if log.matches("portal connected").count() >= 4
            && log.matches("relay connected").count() >= 2
        {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no reconnect:\n{}",
            sys.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    echo_round(&listen, 1 << 20)
        .await
        .with_context(|| sys.logs())?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relay_ends_its_connections_and_the_next_one_uses_another_relay() -> Result<()> {
    let echo = echo_service().await?;
    let (port, _) = netport_e2e::free_port_range(1)?;
    let mut sys = System::start_with_relays(
        &two_portal_policy(&echo.to_string(), port),
        &["alice", "nas"],
        2,
    )?;
    let listen = format!("127.0.0.1:{port}");
    wait_listening(&listen, T).await?;
    sys.wait_ready().await?;
    let deadline = tokio::time::Instant::now() + T;
    while sys.log("netportd").matches("relay connected").count() < 2 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "relays missing:\n{}",
            sys.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A connection held open through the first link.
    let mut held = TcpStream::connect(&listen).await?;
    held.write_all(b"ping").await?;
    let mut pong = [0u8; 4];
    tokio::time::timeout(T, held.read_exact(&mut pong)).await??;
    let log = sys.log("netportd");
    let used = log
        .lines()
        .rfind(|l| l.contains("link allocated"))
        .and_then(|l| l.split("relay=").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .context("which relay carries the link")?
        .to_string();
    sys.daemon(&used)?.kill();

    // The held connection ends instead of hanging.
    let mut rest = Vec::new();
    tokio::time::timeout(T, held.read_to_end(&mut rest))
        .await
        .context("the connection through the killed relay hangs")?
        .ok();
    // The next connection gets a link through the other relay.
    let other = if used == "relay-1" {
        "relay-2"
    } else {
        "relay-1"
    };
    let deadline = tokio::time::Instant::now() + T;
    loop {
        if echo_round(&listen, 64 << 10).await.is_ok() {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no new link:\n{}",
            sys.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = sys.log("netportd");
    assert!(
        log.lines()
            .any(|l| l.contains("link allocated") && l.contains(&format!("relay={other}"))),
        "{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_link_closes_and_the_next_connection_sets_up_a_new_one() -> Result<()> {
    let echo = echo_service().await?;
    let (port, _) = netport_e2e::free_port_range(1)?;
    let sys = System::start(
        &two_portal_policy(&echo.to_string(), port),
        &["alice", "nas"],
    )?;
    let listen = format!("127.0.0.1:{port}");
    wait_listening(&listen, T).await?;
    sys.wait_ready().await?;
    echo_round(&listen, 1000)
        .await
        .with_context(|| sys.logs())?;
    // The portals were told link_idle_secs = 3.
    wait_log(&sys, "portal-alice", "closing the link: idle", T).await?;
    wait_log(&sys, "relayd", "allocation closed", T).await?;
    echo_round(&listen, 1000)
        .await
        .with_context(|| sys.logs())?;
    let links = sys.log("netportd").matches("link allocated").count();
    assert!(
        links >= 2,
        "expected a new link after the idle one closed, saw {links}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_connection_is_aborted_at_the_service_too() -> Result<()> {
    // A service that reports when its side of each connection ends.
    let service = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let target = service.local_addr()?.to_string();
    let (ended_tx, mut ended_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = service.accept().await {
            let ended = ended_tx.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = ended.send(());
            });
        }
    });
    let (port, _) = netport_e2e::free_port_range(1)?;
    let sys = System::start(&two_portal_policy(&target, port), &["alice", "nas"])?;
    let listen = format!("127.0.0.1:{port}");
    wait_listening(&listen, T).await?;
    sys.wait_ready().await?;
    // The readiness probe's connection ended already; forget it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while ended_rx.try_recv().is_ok() {}

    let mut s = TcpStream::connect(&listen).await?;
    s.write_all(b"ping").await?;
    let mut b = [0u8; 4];
    tokio::time::timeout(T, s.read_exact(&mut b)).await??;
    // Abort: close with a reset instead of a FIN.
    s.set_zero_linger()?;
    drop(s);
    tokio::time::timeout(T, ended_rx.recv())
        .await
        .context("the service's connection outlived the aborted client")?;
    Ok(())
}
