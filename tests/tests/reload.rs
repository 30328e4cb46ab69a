//! netportd follows the policy directory: new listeners open, removed ones close with their
//! connections, revoked keys are cut off at once, a broken policy never replaces the last
//! good one, and a transfer through an unchanged grant continues across reloads.

use std::time::Duration;

use anyhow::{Context, Result};
use netport_e2e::{System, echo_service, wait_listening, wait_log};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(20);

fn policy(target: &str, port: u16, extra: &str) -> String {
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
name = "echo2"
portal = "nas"
target = "{target}"
[[access]]
name = "alice-echo"
from = ["alice"]
listen = "127.0.0.1:{port}"
service = "echo"
{extra}
"#
    )
}

async fn round(addr: &str) -> Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"ping").await?;
    let mut b = [0u8; 4];
    tokio::time::timeout(T, s.read_exact(&mut b)).await??;
    anyhow::ensure!(&b == b"ping");
    Ok(())
}

async fn until_closed(addr: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + T;
    while TcpStream::connect(addr).await.is_ok() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{addr} still listens"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_follow_the_policy_and_a_long_transfer_survives_reloads() -> Result<()> {
    let echo = echo_service().await?;
    let (port, _) = netport_e2e::free_port_range(2)?;
    let target = echo.to_string();
    let sys = System::start(&policy(&target, port, ""), &["alice", "nas"])?;
    let listen = format!("127.0.0.1:{port}");
    let second = format!("127.0.0.1:{}", port + 1);
    wait_listening(&listen, T).await?;
    sys.wait_ready().await?;
    round(&listen).await.with_context(|| sys.logs())?;

    // A long transfer through the unchanged grant, running across every reload below.
    let mut long = TcpStream::connect(&listen).await?;
    long.write_all(b"0123").await?;
    let mut b = [0u8; 4];
    tokio::time::timeout(T, long.read_exact(&mut b)).await??;

    // Add a rule: its listener opens.
    let extra = format!(
        "[[access]]\nname = \"alice-echo2\"\nfrom = [\"alice\"]\nlisten = \"{second}\"\nservice = \"echo2\"\n"
    );
    sys.set_policy(&policy(&target, port, &extra))?;
    wait_listening(&second, T)
        .await
        .with_context(|| sys.logs())?;
    round(&second).await?;
    let mut through_second = TcpStream::connect(&second).await?;
    through_second.write_all(b"abcd").await?;
    tokio::time::timeout(T, through_second.read_exact(&mut b)).await??;

    // A broken policy: rejected, logged, and the last good one stays in force.
    std::fs::write(
        sys.policy_dir().join("broken.toml"),
        "[[portal]\nname = \"x\"\n",
    )?;
    wait_log(&sys, "netportd", "policy rejected", T).await?;
    round(&second)
        .await
        .context("the last good policy must stay in force")?;
    std::fs::remove_file(sys.policy_dir().join("broken.toml"))?;

    // Remove the rule: the listener closes, and so does the connection that came through it.
    sys.set_policy(&policy(&target, port, ""))?;
    until_closed(&second).await.with_context(|| sys.logs())?;
    let mut rest = Vec::new();
    tokio::time::timeout(T, through_second.read_to_end(&mut rest))
        .await
        .context("a connection through a removed listener must close")?
        .ok();

    // The long transfer never noticed.
    for i in 0..10u8 {
        long.write_all(&[i; 4]).await?;
        tokio::time::timeout(T, long.read_exact(&mut b)).await??;
        assert_eq!(b, [i; 4]);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newly_revoked_key_is_cut_off_with_its_links() -> Result<()> {
    let echo = echo_service().await?;
    let (port, _) = netport_e2e::free_port_range(1)?;
    let target = echo.to_string();
    let sys = System::start(&policy(&target, port, ""), &["alice", "nas"])?;
    let listen = format!("127.0.0.1:{port}");
    wait_listening(&listen, T).await?;
    sys.wait_ready().await?;
    let mut held = TcpStream::connect(&listen).await?;
    held.write_all(b"ping").await?;
    let mut b = [0u8; 4];
    tokio::time::timeout(T, held.read_exact(&mut b)).await??;

    let spki = sys
        .log("netportd")
        .lines()
        .find(|l| l.contains("portal connected portal=alice "))
        .and_then(|l| l.split("spki=").nth(1))
        .map(|s| s.trim().to_string())
        .context("alice's key in the log")?;
    let revoked = format!("[[revoked]]\nspki_sha256 = \"{spki}\"\nreason = \"lost\"\n");
    let started = tokio::time::Instant::now();
    sys.set_policy(&policy(&target, port, &revoked))?;
    wait_log(
        &sys,
        "netportd",
        "cutting off: the key of `alice` is revoked",
        T,
    )
    .await?;
    // Its listener goes and its link is closed: the held connection ends.
    until_closed(&listen).await.with_context(|| sys.logs())?;
    let mut rest = Vec::new();
    tokio::time::timeout(T, held.read_to_end(&mut rest))
        .await
        .context("held connection")?
        .ok();
    let took = started.elapsed();
    // The goal is under 2 s from the file change; shared machines are noisy, so this only
    // reports it (timed assertions do not belong in tests).
    println!("revocation took effect in {} ms", took.as_millis());
    wait_log(&sys, "portal-alice", "refused (revoked)", T).await?;
    Ok(())
}

async fn follows_updates(layout: netport_e2e::Layout) -> Result<()> {
    let echo = echo_service().await?;
    let (port, _) = netport_e2e::free_port_range(2)?;
    let target = echo.to_string();
    let sys = System::start_layout(
        netport_e2e::Pki::new()?,
        &policy(&target, port, ""),
        &["alice", "nas"],
        1,
        "127.0.0.1",
        layout,
    )?;
    let listen = format!("127.0.0.1:{port}");
    let second = format!("127.0.0.1:{}", port + 1);
    wait_listening(&listen, T).await?;
    sys.wait_ready().await?;
    let extra = format!(
        "[[access]]\nname = \"alice-echo2\"\nfrom = [\"alice\"]\nlisten = \"{second}\"\nservice = \"echo2\"\n"
    );
    sys.set_policy(&policy(&target, port, &extra))?;
    wait_listening(&second, T)
        .await
        .with_context(|| format!("{layout:?}\n{}", sys.logs()))?;
    round(&second).await?;
    sys.set_policy(&policy(&target, port, ""))?;
    until_closed(&second)
        .await
        .with_context(|| format!("{layout:?}\n{}", sys.logs()))?;
    round(&listen).await?;
    let log = sys.log("netportd");
    assert_eq!(
        log.matches("policy reloaded").count(),
        2,
        "{layout:?}: one reload per update\n{log}"
    );
    assert!(
        !log.contains("policy rejected"),
        "{layout:?}: an update was seen half-written\n{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_git_sync_symlink_flip_is_followed() -> Result<()> {
    follows_updates(netport_e2e::Layout::Symlink).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_data_swap_is_followed() -> Result<()> {
    follows_updates(netport_e2e::Layout::ConfigMap).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_git_pull_into_the_watched_checkout_is_followed() -> Result<()> {
    follows_updates(netport_e2e::Layout::Git).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_writes_is_one_reload() -> Result<()> {
    let echo = echo_service().await?;
    let (port, _) = netport_e2e::free_port_range(1)?;
    let sys = System::start(&policy(&echo.to_string(), port, ""), &["alice", "nas"])?;
    sys.wait_ready().await?;
    // Twenty files in a subdirectory, written back to back.
    let sub = sys.policy_dir().join("team/devices");
    std::fs::create_dir_all(&sub)?;
    for i in 0..20 {
        std::fs::write(
            sub.join(format!("d{i}.toml")),
            format!("[[portal]]\nname = \"device-{i}\"\n"),
        )?;
    }
    wait_log(&sys, "netportd", "policy reloaded", T).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let log = sys.log("netportd");
    assert_eq!(log.matches("policy reloaded").count(), 1, "{log}");
    // A file removed in a subdirectory is seen too.
    std::fs::remove_file(sub.join("d7.toml"))?;
    let deadline = tokio::time::Instant::now() + T;
    while sys.log("netportd").matches("policy reloaded").count() < 2 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "removal not seen:\n{}",
            sys.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
