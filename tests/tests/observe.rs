//! Operability: metrics that move, the audit log's fields, `/readyz`, `/status`,
//! `netportd status`, and a graceful shutdown that lets a transfer finish.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use netport_e2e::{
    Daemon, Metrics, Pki, System, echo_service, free_port_range, wait_listening, wait_log,
};
use netport_proto::identity::Role;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(30);

fn policy(target: &str, port: u16, extra: &str) -> String {
    format!(
        r#"
[[portal]]
name = "alice"

[[portal]]
name = "nas"

[[portal]]
name = "mallory"

[[portal]]
name = "ghost"

[[service]]
name = "echo"
portal = "nas"
target = "{target}"

[[service]]
name = "ghost-echo"
portal = "ghost"
target = "{target}"

[[access]]
name = "alice-echo"
from = ["alice"]
listen = "127.0.0.1:{port}"
service = "echo"

[[access]]
name = "mallory-ghost"
from = ["mallory"]
listen = "127.0.0.1:{}"
service = "ghost-echo"
{extra}
"#,
        port + 1
    )
}

/// Sends `len` bytes through `addr` to the echo and checks they all come back.
async fn echo(addr: &str, len: usize) -> Result<()> {
    let s = TcpStream::connect(addr).await?;
    let (mut r, mut w) = s.into_split();
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await?;
        w.shutdown().await
    });
    let mut back = Vec::new();
    tokio::time::timeout(T, r.read_to_end(&mut back))
        .await
        .context("echo timed out")??;
    writer.await??;
    ensure!(back == data, "got {} of {len} bytes back", back.len());
    Ok(())
}

/// Polls `name`'s metrics until `ok` holds for them.
async fn metrics_until(
    sys: &System,
    name: &str,
    what: &str,
    ok: impl Fn(&Metrics) -> bool,
) -> Result<Metrics> {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let m = sys.metrics(name).await?;
        if ok(&m) {
            return Ok(m);
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "{name}: {what} never held; last scrape: {m:?}\n{}",
                sys.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn policy_hash(m: &Metrics) -> Option<String> {
    let s = m.samples("netport_policy_info");
    let s = s.iter().find(|s| s.value == 1.0)?;
    s.labels
        .iter()
        .find(|(k, _)| k == "hash")
        .map(|(_, v)| v.clone())
}

async fn status(sys: &System) -> Result<Value> {
    let (code, body) = sys.admin_get("netportd", "/status").await?;
    ensure!(code == 200, "/status answered {code}");
    Ok(serde_json::from_str(&body)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_status_and_audit_follow_traffic_denies_and_reloads() -> Result<()> {
    let target = echo_service().await?.to_string();
    let (port, _) = free_port_range(2)?;
    let sys = System::start(&policy(&target, port, ""), &["alice", "nas", "mallory"])?;
    let listen = format!("127.0.0.1:{port}");
    wait_listening(&listen, T).await?;
    sys.wait_ready().await?;

    let before = metrics_until(&sys, "netportd", "3 portals connected", |m| {
        m.get("netport_portals_connected", &[]) == 3.0
    })
    .await?;
    let first_hash = policy_hash(&before).context("no netport_policy_info")?;
    ensure!(before.get("netport_relays_connected", &[]) == 1.0);
    for role in ["server", "ca"] {
        let left = before.get("netport_certificate_expiry_seconds", &[("role", role)]);
        ensure!(
            left > 86_400.0 * 29.0,
            "{role} certificate expiry {left} s, expected about 30 days"
        );
    }
    let (code, _) = sys.admin_get("netportd", "/readyz").await?;
    ensure!(code == 200, "netportd /readyz answered {code}");
    let (code, _) = sys.admin_get("portal-alice", "/readyz").await?;
    ensure!(code == 200, "portal /readyz answered {code}");

    // Traffic: a link is allowed and a stream carried; both portals and the server count it.
    echo(&listen, 100_000).await?;
    metrics_until(&sys, "netportd", "a stream reported closed", |m| {
        m.get("netport_links_opened_total", &[]) >= 1.0
            && m.get("netport_streams_closed_total", &[]) >= 1.0
            && m.get("netport_stream_bytes_total", &[("direction", "to_service")]) >= 100_000.0
    })
    .await?;
    metrics_until(&sys, "portal-alice", "client bytes counted", |m| {
        m.get(
            "netport_stream_bytes_total",
            &[("side", "client"), ("direction", "from_service")],
        ) >= 100_000.0
            && m.get("netport_links", &[("side", "client")]) == 1.0
    })
    .await?;
    metrics_until(&sys, "portal-nas", "serving bytes counted", |m| {
        m.get("netport_streams_opened_total", &[("side", "serving")]) >= 1.0
    })
    .await?;
    metrics_until(&sys, "relayd", "an allocation", |m| {
        m.get(
            "netport_allocations_opened_total",
            &[("path", "tcp-userspace")],
        ) >= 1.0
    })
    .await?;

    // A deny: the ghost portal is not connected.
    let ghost = format!("127.0.0.1:{}", port + 1);
    wait_listening(&ghost, T).await?;
    let mut s = TcpStream::connect(&ghost).await?;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut buf)).await;
    metrics_until(&sys, "netportd", "a peer-offline deny", |m| {
        m.get("netport_denies_total", &[("reason", "peer-offline")]) >= 1.0
    })
    .await?;
    metrics_until(&sys, "portal-mallory", "the deny seen by the portal", |m| {
        m.get("netport_denies_total", &[("reason", "peer-offline")]) >= 1.0
    })
    .await?;

    // A rejected reload: counted, shown on /status, the policy stays.
    sys.set_policy("[[portal]\nname = \"broken\"\n")?;
    let m = metrics_until(&sys, "netportd", "a reload failure", |m| {
        m.get("netport_reload_failures_total", &[]) >= 1.0
    })
    .await?;
    ensure!(m.get("netport_reloads_total", &[("result", "rejected")]) >= 1.0);
    ensure!(policy_hash(&m).as_deref() == Some(first_hash.as_str()));
    let st = status(&sys).await?;
    let err = st["reload"]["last_error"].as_str().unwrap_or_default();
    ensure!(
        err.contains("E0001") || err.contains("error"),
        "status shows no error: {st}"
    );
    ensure!(st["policy"]["hash"].as_str() == Some(first_hash.as_str()));
    // `netportd status` says so, and exits 1.
    let admin = sys.admin["netportd"].to_string();
    let out = std::process::Command::new(netport_e2e::binary("netportd"))
        .args(["status", "--admin", &admin])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.code() == Some(1),
        "status exit {:?}: {text}",
        out.status
    );
    ensure!(
        text.contains("last error") && text.contains(&first_hash),
        "{text}"
    );

    // A good reload: the hash metric changes, the error clears.
    sys.set_policy(&policy(&target, port, "[[portal]]\nname = \"carol\"\n"))?;
    let m = metrics_until(&sys, "netportd", "a new policy hash", |m| {
        policy_hash(m).is_some_and(|h| h != first_hash)
    })
    .await?;
    ensure!(m.get("netport_reloads_total", &[("result", "accepted")]) >= 1.0);
    ensure!(m.samples("netport_policy_info").len() == 1);
    let st = status(&sys).await?;
    ensure!(st["reload"]["last_error"].is_null(), "{st}");
    ensure!(st["portals"].as_array().map(Vec::len) == Some(3), "{st}");
    let out = std::process::Command::new(netport_e2e::binary("netportd"))
        .args(["status", "--admin", &admin])
        .output()?;
    ensure!(out.status.success(), "{out:?}");

    // The audit log: every line parses, and the documented fields are there.
    let audit = std::fs::read_to_string(sys.audit_path())?;
    let events: Vec<Value> = audit
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("an audit line is not JSON")?;
    let find = |event: &str, key: &str, val: &str| {
        events
            .iter()
            .find(|e| e["event"] == event && e[key] == val)
            .cloned()
            .with_context(|| format!("no {event} with {key}={val} in\n{audit}"))
    };
    let has = |e: &Value, fields: &[&str]| -> Result<()> {
        for f in fields {
            ensure!(!e[*f].is_null(), "`{f}` missing in {e}");
        }
        Ok(())
    };
    let allow = find("decision", "verdict", "allow")?;
    has(
        &allow,
        &[
            "ts",
            "portal",
            "spki_sha256",
            "source",
            "access",
            "listen",
            "service",
            "target",
            "rule",
            "relay",
            "link_id",
            "policy",
        ],
    )?;
    ensure!(allow["portal"] == "alice" && allow["rule"] == "alice-echo");
    ensure!(allow["policy"] == first_hash.as_str());
    // (The readiness probes may have met denies too, before every portal was connected.)
    let deny = find("decision", "rule", "mallory-ghost")?;
    has(
        &deny,
        &[
            "ts",
            "portal",
            "spki_sha256",
            "source",
            "reason",
            "verdict",
            "policy",
        ],
    )?;
    ensure!(
        deny["verdict"] == "deny"
            && deny["reason"] == "peer-offline"
            && deny["portal"] == "mallory"
    );
    let stream = events
        .iter()
        .find(|e| e["event"] == "stream_closed" && e["bytes_to_service"] == 100_000)
        .with_context(|| format!("no stream_closed of the 100,000-byte echo in\n{audit}"))?;
    has(
        stream,
        &[
            "ts",
            "link_id",
            "service",
            "source",
            "bytes_to_service",
            "bytes_from_service",
            "duration_ms",
        ],
    )?;
    ensure!(stream["portal"] == "alice" && stream["bytes_from_service"] == 100_000);
    let rejected = find("reload", "result", "rejected")?;
    has(&rejected, &["ts", "old_policy", "new_content", "error"])?;
    let accepted = find("reload", "result", "accepted")?;
    has(
        &accepted,
        &[
            "ts",
            "old_policy",
            "new_policy",
            "grants_added",
            "grants_removed",
        ],
    )?;
    ensure!(accepted["old_policy"] == first_hash.as_str());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_a_policy_to_appear() -> Result<()> {
    let pki = Pki::new()?;
    let dir = pki.dir.path().to_path_buf();
    let server = pki.issue(Role::Server, "netportd")?;
    let (port, _) = free_port_range(2)?;
    let admin = format!("127.0.0.1:{}", port + 1);
    let cfg = dir.join("netportd.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = [\"127.0.0.1:{port}\"]\npolicy = \"policy\"\nwait_for_policy = true\nadmin_listen = \"{admin}\"\n\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            pki.ca_path().display(),
            server.cert.display(),
            server.key.display()
        ),
    )?;
    let log = dir.join("netportd.log");
    let _d = Daemon::start(
        "netportd",
        &["run", "--config", cfg.to_str().context("path")?],
        &log,
    )?;
    let get = |path: &'static str| {
        let admin = admin.clone();
        async move { netport_common::admin::get(&admin, path).await }
    };
    // Up, healthy, not ready: there is no policy yet.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        if let Ok((code, _)) = get("/healthz").await {
            ensure!(code == 200);
            break;
        }
        ensure!(tokio::time::Instant::now() < deadline, "no admin endpoint");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, _) = get("/readyz").await?;
    ensure!(code == 503, "/readyz answered {code} without a policy");
    let (_, body) = get("/status").await?;
    let st: Value = serde_json::from_str(&body)?;
    ensure!(
        st["ready"] == false && st["waiting_for"].is_string(),
        "{st}"
    );

    // The sync tool's first checkout lands (atomically, by rename).
    std::fs::create_dir_all(dir.join("rev-1"))?;
    std::fs::write(
        dir.join("rev-1/policy.toml"),
        "[[portal]]\nname = \"alice\"\n\n[[relay]]\nname = \"r\"\naddress = \"127.0.0.1\"\n",
    )?;
    std::fs::rename(dir.join("rev-1"), dir.join("policy"))?;
    loop {
        let (code, _) = get("/readyz").await?;
        if code == 200 {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "never ready after the policy appeared:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, body) = get("/status").await?;
    let st: Value = serde_json::from_str(&body)?;
    ensure!(st["ready"] == true && st["policy"]["portals"] == 1, "{st}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_transfer_finish_then_exits_0() -> Result<()> {
    let target = echo_service().await?.to_string();
    let (port, _) = free_port_range(2)?;
    let mut sys = System::start(&policy(&target, port, ""), &["alice", "nas"])?;
    let listen = format!("127.0.0.1:{port}");
    wait_listening(&listen, T).await?;
    sys.wait_ready().await?;
    echo(&listen, 1000).await?;

    // A transfer that takes a few seconds: 4 MiB sent in paced chunks.
    let s = TcpStream::connect(&listen).await?;
    let (mut r, mut w) = s.into_split();
    const CHUNKS: usize = 40;
    const CHUNK: usize = 100 * 1024;
    let writer = tokio::spawn(async move {
        for i in 0..CHUNKS {
            w.write_all(&vec![(i % 251) as u8; CHUNK]).await?;
            tokio::time::sleep(Duration::from_millis(75)).await;
        }
        w.shutdown().await
    });
    let reader = tokio::spawn(async move {
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.map(|_| back)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Both the client portal and the relay are told to stop mid-transfer.
    sys.daemon("portal-alice")?.terminate()?;
    sys.daemon("relayd")?.terminate()?;
    wait_log(&sys, "portal-alice", "draining", T).await?;
    // No new connection is accepted while draining.
    ensure!(
        TcpStream::connect(&listen).await.is_err(),
        "the listener still accepts while draining"
    );

    writer.await??;
    let back = tokio::time::timeout(T, reader)
        .await
        .context("transfer did not finish")???;
    ensure!(
        back.len() == CHUNKS * CHUNK,
        "got {} bytes back",
        back.len()
    );
    ensure!(
        back.chunks(CHUNK)
            .enumerate()
            .all(|(i, c)| c.iter().all(|b| *b == (i % 251) as u8))
    );

    for name in ["portal-alice", "relayd"] {
        let deadline = tokio::time::Instant::now() + T;
        let status = loop {
            if let Some(st) = sys.daemon(name)?.exited()? {
                break st;
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "{name} did not exit after the transfer:\n{}",
                sys.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        ensure!(
            status.success(),
            "{name} exited with {status}:\n{}",
            sys.logs()
        );
    }
    Ok(())
}

/// The client portal sends its stream reports together (up to 200 ms late, so thousands of
/// connections a second cost netportd a few writes, not thousands): every connection is
/// still reported once, with its own source address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_closed_connection_is_audited_once() -> Result<()> {
    const N: usize = 300;
    let target = echo_service().await?.to_string();
    let (port, _) = free_port_range(2)?;
    let sys = System::start(&policy(&target, port, ""), &["alice", "nas"])?;
    let listen = format!("127.0.0.1:{port}");
    wait_listening(&listen, T).await?;
    sys.wait_ready().await?;
    let mut sources = std::collections::BTreeSet::new();
    for i in 0..N {
        let s = TcpStream::connect(&listen).await?;
        sources.insert(s.local_addr()?.to_string());
        let (mut r, mut w) = s.into_split();
        w.write_all(&[i as u8; 10]).await?;
        w.shutdown().await?;
        let mut back = Vec::new();
        tokio::time::timeout(T, r.read_to_end(&mut back))
            .await
            .context("echo timed out")??;
        ensure!(back == [i as u8; 10], "connection {i}: got {back:?}");
    }
    ensure!(sources.len() == N, "the client reused a source address");
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let audit = std::fs::read_to_string(sys.audit_path())?;
        // (The readiness probe's connection is reported too; only ours are counted.)
        let reported: Vec<String> = audit
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["event"] == "stream_closed" && e["service"] == "echo")
            .filter_map(|e| e["source"].as_str().map(str::to_string))
            .filter(|s| sources.contains(s))
            .collect();
        if reported.len() >= N {
            let unique: std::collections::BTreeSet<&String> = reported.iter().collect();
            ensure!(
                reported.len() == N && unique.len() == N,
                "{} reports for {N} connections ({} distinct)",
                reported.len(),
                unique.len()
            );
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("only {} of {N} connections reported", reported.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
