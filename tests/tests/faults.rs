//! Faults, with the real binaries: netportd killed during a transfer, a portal killed, and
//! a network partition between the portals and the server (nftables inside a network
//! namespace; needs root, skips loudly otherwise). A relay killed during a transfer is in
//! `tunnel.rs` (`a_killed_relay_ends_its_connections_and_the_next_one_uses_another_relay`).

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use netport_e2e::{System, echo_service, log_fields, wait_listening, wait_log};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(30);

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
[[access]]
name = "alice-echo"
from = ["alice"]
listen = "127.0.0.1:{listen_port}"
service = "echo"
"#
    )
}

async fn start() -> Result<(System, String)> {
    let echo = echo_service().await?;
    let (port, _) = netport_e2e::free_port_range(1)?;
    let sys = System::start(&policy(&echo.to_string(), port), &["alice", "nas"])?;
    let listen = format!("127.0.0.1:{port}");
    wait_listening(&listen, T).await?;
    sys.wait_ready().await?;
    Ok((sys, listen))
}

/// One round on a held connection: `len` bytes of a pattern out, the same bytes back.
async fn round(conn: &mut TcpStream, n: u8, len: usize) -> Result<()> {
    let out: Vec<u8> = (0..len).map(|i| (i as u8) ^ n).collect();
    let (mut r, mut w) = conn.split();
    let write = async {
        w.write_all(&out).await?;
        anyhow::Ok(())
    };
    let read = async {
        let mut back = vec![0u8; len];
        tokio::time::timeout(T, r.read_exact(&mut back))
            .await
            .context("the echo stalled")??;
        anyhow::Ok(back)
    };
    let ((), back) = tokio::try_join!(write, read)?;
    anyhow::ensure!(back == out, "bytes changed on the way");
    Ok(())
}

/// Waits until `needle` appears at least `n` times in the log of `name`.
async fn wait_count(sys: &System, name: &str, needle: &str, n: usize) -> Result<()> {
    let deadline = tokio::time::Instant::now() + T;
    while sys.log(name).matches(needle).count() < n {
        if tokio::time::Instant::now() > deadline {
            bail!("`{needle}` not seen {n} times in {name}:\n{}", sys.logs());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_survives_netportd_being_killed_and_portals_reconnect() -> Result<()> {
    let (mut sys, listen) = start().await?;
    let mut held = TcpStream::connect(&listen).await?;
    round(&mut held, 0, 256 << 10)
        .await
        .with_context(|| sys.logs())?;

    // Kill the control plane in the middle of a transfer: the data plane goes on.
    let transfer = tokio::spawn(async move {
        for n in 1..=40u8 {
            round(&mut held, n, 256 << 10).await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::Ok(held)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    sys.daemon("netportd")?.kill();
    // Both portals notice and keep trying while the server is down.
    wait_log(&sys, "portal-alice", "reconnecting to netportd", T).await?;
    wait_log(&sys, "portal-nas", "reconnecting to netportd", T).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    sys.daemon("netportd")?.restart()?;
    let mut held = transfer
        .await?
        .with_context(|| format!("the transfer broke when netportd died:\n{}", sys.logs()))?;

    // The portals and the relay are back by themselves, and the old link still carries.
    wait_count(&sys, "netportd", "portal connected portal=alice ", 2).await?;
    wait_count(&sys, "netportd", "portal connected portal=nas ", 2).await?;
    wait_count(&sys, "netportd", "relay connected", 2).await?;
    round(&mut held, 99, 1 << 20)
        .await
        .with_context(|| sys.logs())?;
    // New connections work too.
    let mut fresh = TcpStream::connect(&listen).await?;
    round(&mut fresh, 7, 64 << 10)
        .await
        .with_context(|| sys.logs())?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_portal_frees_its_allocation_and_its_session() -> Result<()> {
    let (mut sys, listen) = start().await?;
    let relay_fds = sys.daemon("relayd")?.fd_count()?;
    let mut held = TcpStream::connect(&listen).await?;
    round(&mut held, 1, 64 << 10)
        .await
        .with_context(|| sys.logs())?;
    wait_log(&sys, "relayd", "paired; forwarding", T).await?;

    sys.daemon("portal-alice")?.kill();
    // Its client connection ends; the relay frees the allocation and tells netportd; netportd
    // forgets the session; the serving portal drops its side of the link.
    let mut rest = Vec::new();
    tokio::time::timeout(T, held.read_to_end(&mut rest))
        .await
        .context("a connection through a dead portal hangs")?
        .ok();
    wait_log(&sys, "relayd", "allocation closed", T).await?;
    wait_log(&sys, "netportd", "link ended", T).await?;
    wait_log(&sys, "netportd", "portal disconnected portal=alice", T).await?;
    wait_log(&sys, "portal-nas", "served link ended", T).await?;
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let fds = sys.daemon("relayd")?.fd_count()?;
        if fds <= relay_fds {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "relayd holds {fds} descriptors, {relay_fds} before the link"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The portal comes back and works again.
    sys.daemon("portal-alice")?.restart()?;
    wait_count(&sys, "netportd", "portal connected portal=alice ", 2).await?;
    wait_listening(&listen, T).await?;
    let mut fresh = TcpStream::connect(&listen).await?;
    round(&mut fresh, 2, 64 << 10)
        .await
        .with_context(|| sys.logs())?;
    Ok(())
}

/// Links outlive netportd, so a restarted netportd must not hand a new link the id of one
/// still running: the relay would refuse the allocation as in use, and a portal would mix
/// up its served links.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_set_up_after_a_netportd_restart_get_ids_unlike_the_running_ones() -> Result<()> {
    let echo = echo_service().await?;
    let (port, _) = netport_e2e::free_port_range(2)?;
    let policy = format!(
        r#"
[[portal]]
name = "alice"
[[portal]]
name = "nas"
[[portal]]
name = "cam"
[[service]]
name = "echo"
portal = "nas"
target = "{echo}"
[[service]]
name = "cam-echo"
portal = "cam"
target = "{echo}"
[[access]]
name = "alice-echo"
from = ["alice"]
listen = "127.0.0.1:{port}"
service = "echo"
[[access]]
name = "alice-cam"
from = ["alice"]
listen = "127.0.0.1:{}"
service = "cam-echo"
"#,
        port + 1
    );
    let mut sys = System::start(&policy, &["alice", "nas", "cam"])?;
    let (to_nas, to_cam) = (
        format!("127.0.0.1:{port}"),
        format!("127.0.0.1:{}", port + 1),
    );
    wait_listening(&to_nas, T).await?;
    // Only the log: a probe connection would set the second link up before the restart.
    wait_log(&sys, "portal-alice", "listening access=alice-cam", T).await?;
    sys.wait_ready().await?;
    let mut held = TcpStream::connect(&to_nas).await?;
    round(&mut held, 1, 64 << 10)
        .await
        .with_context(|| sys.logs())?;
    let before = log_fields(&sys.log("netportd"), "link allocated", "link_id");
    anyhow::ensure!(
        before.len() == 1,
        "one link expected before the restart: {before:?}"
    );

    sys.daemon("netportd")?.restart()?;
    wait_count(&sys, "netportd", "portal connected portal=alice ", 2).await?;
    wait_count(&sys, "netportd", "portal connected portal=cam ", 2).await?;
    wait_count(&sys, "netportd", "relay connected", 2).await?;
    // A new link (to another portal) while the first one still carries.
    let mut fresh = TcpStream::connect(&to_cam).await?;
    round(&mut fresh, 2, 64 << 10)
        .await
        .with_context(|| sys.logs())?;
    round(&mut held, 3, 64 << 10)
        .await
        .with_context(|| sys.logs())?;
    let all = log_fields(&sys.log("netportd"), "link allocated", "link_id");
    anyhow::ensure!(all.len() == 2, "two links expected in all: {all:?}");
    anyhow::ensure!(
        all[1] != all[0],
        "the link set up after the restart reused id {}:\n{}",
        all[0],
        sys.logs()
    );
    Ok(())
}

/// A network namespace of the test's own, removed on drop.
struct Netns(String);

impl Netns {
    fn create(name: &str) -> Result<Netns> {
        run("ip", &["netns", "add", name])?;
        let ns = Netns(name.to_string());
        run("ip", &["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|u| u.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

/// The partition test runs the whole system inside a fresh network namespace (its own
/// loopback), so its nftables rules touch nothing else: this test re-runs the test binary
/// there for [`partition_inside_a_namespace`].
#[test]
fn a_partition_between_portals_and_server_is_detected_by_heartbeat_and_healed() -> Result<()> {
    if !is_root() {
        println!(
            "SKIPPED (needs root): the partition test creates a network namespace and nftables rules"
        );
        return Ok(());
    }
    for tool in ["ip", "nft"] {
        let flag = if tool == "ip" { "-V" } else { "--version" };
        if Command::new(tool).arg(flag).output().is_err() {
            println!(
                "SKIPPED: `{tool}` is not installed (apt-get install iproute2 nftables; scripts/test.sh does)"
            );
            return Ok(());
        }
    }
    let ns = Netns::create(&format!("np-part-{}", std::process::id()))?;
    let exe = std::env::current_exe()?;
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(exe)
        .args([
            "partition_inside_a_namespace",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("NETPORT_TEST_NETNS", &ns.0)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(
        out.status.success() && text.contains("1 passed"),
        "the partition test failed inside the namespace:\n{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_partition_between_portals_and_server_is_detected_by_heartbeat_and_healed inside a namespace"]
async fn partition_inside_a_namespace() -> Result<()> {
    anyhow::ensure!(
        std::env::var("NETPORT_TEST_NETNS").is_ok(),
        "run only inside the test's network namespace"
    );
    let (sys, listen) = start().await?;
    let port = sys.server_addr.port().to_string();
    let mut held = TcpStream::connect(&listen).await?;
    round(&mut held, 1, 64 << 10)
        .await
        .with_context(|| sys.logs())?;

    // Drop every packet to and from netportd's port: control connections go silent (no FIN,
    // no RST), links through the relay are untouched.
    let table = ["inet", "netport_partition"];
    run("nft", &["add", "table", table[0], table[1]])?;
    run(
        "nft",
        &[
            "add",
            "chain",
            table[0],
            table[1],
            "out",
            "{ type filter hook output priority 0; }",
        ],
    )?;
    for dir in ["dport", "sport"] {
        run(
            "nft",
            &[
                "add", "rule", table[0], table[1], "out", "tcp", dir, &port, "drop",
            ],
        )?;
    }
    // Heartbeats stop: both sides notice within three intervals (the system uses 2 s).
    wait_log(
        &sys,
        "portal-alice",
        "no heartbeat from netportd; reconnecting",
        T,
    )
    .await?;
    wait_log(&sys, "netportd", "no heartbeat for", T).await?;
    // The data plane never depended on the control connection.
    round(&mut held, 2, 64 << 10)
        .await
        .with_context(|| sys.logs())?;

    run("nft", &["delete", "table", "inet", "netport_partition"])?;
    wait_count(&sys, "netportd", "portal connected portal=alice ", 2).await?;
    wait_count(&sys, "netportd", "portal connected portal=nas ", 2).await?;
    round(&mut held, 3, 64 << 10)
        .await
        .with_context(|| sys.logs())?;
    let mut fresh = TcpStream::connect(&listen).await?;
    round(&mut fresh, 4, 64 << 10)
        .await
        .with_context(|| sys.logs())?;
    Ok(())
}
