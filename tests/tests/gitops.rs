//! The GitOps loop seen from the outside: commits land in a checkout the way sync tools
//! land them, and netportd's status endpoint says what is in force.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use netport_e2e::{Layout, Pki, System, echo_service, free_port_range, wait_listening};
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
[[service]]
name = "echo"
portal = "nas"
target = "{target}"
[[access]]
name = "alice-echo"
from = ["alice"]
listen = "127.0.0.1:{port}"
service = "echo"
[[test]]
from = "alice"
service = "echo"
expect = "allow"
{extra}
"#
    )
}

async fn status(sys: &System) -> Result<Value> {
    let (code, body) = sys.admin_get("netportd", "/status").await?;
    ensure!(code == 200, "/status answered {code}");
    Ok(serde_json::from_str(&body)?)
}

/// Polls `/status` until `ok` holds.
async fn status_until(sys: &System, what: &str, ok: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let st = status(sys).await?;
        if ok(&st) {
            return Ok(st);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{what} never held; last status: {st}\n{}", sys.logs());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The hash `netportd check` gives the checkout as it is now.
fn checkout_hash(sys: &System) -> Result<String> {
    let report = netport_policy::load(&sys.policy_dir())?;
    Ok(report
        .policy
        .context("the checkout is not valid")?
        .hash
        .clone())
}

async fn round(addr: &str) -> Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"ping").await?;
    let mut b = [0u8; 4];
    tokio::time::timeout(T, s.read_exact(&mut b)).await??;
    ensure!(&b == b"ping");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_commits_are_rejected_visibly_and_a_fix_applies() -> Result<()> {
    let target = echo_service().await?.to_string();
    let (port, _) = free_port_range(2)?;
    let sys = System::start_layout(
        Pki::new()?,
        &policy(&target, port, ""),
        &["alice", "nas"],
        1,
        "127.0.0.1",
        Layout::Git,
    )?;
    let listen = format!("127.0.0.1:{port}");
    wait_listening(&listen, T).await?;
    sys.wait_ready().await?;
    let good = status(&sys).await?["policy"]["hash"].clone();
    // An in-flight connection through the grant.
    let mut long = TcpStream::connect(&listen).await?;
    let mut b = [0u8; 4];
    long.write_all(b"0000").await?;
    tokio::time::timeout(T, long.read_exact(&mut b)).await??;

    // A commit with a syntax error.
    sys.set_policy("[[portal]\nname = \"broken\"\n")?;
    let st = status_until(&sys, "the syntax error is reported", |s| {
        s["reload"]["failures"] == 1
    })
    .await?;
    ensure!(st["policy"]["hash"] == good, "{st}");
    ensure!(
        st["reload"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("error")),
        "{st}"
    );
    round(&listen).await.context("the old listener must stay")?;

    // A commit whose embedded test fails.
    let failing = "[[test]]\nfrom = \"alice\"\nservice = \"echo\"\nexpect = \"deny\"\n";
    sys.set_policy(&policy(&target, port, failing))?;
    let st = status_until(&sys, "the failing test is reported", |s| {
        s["reload"]["last_error"]
            .as_str()
            .is_some_and(|e| !e.contains("E0001"))
    })
    .await?;
    ensure!(
        st["reload"]["failures"] == 2,
        "each broken commit is one rejection: {st}"
    );
    ensure!(st["policy"]["hash"] == good, "{st}");
    let err = st["reload"]["last_error"].as_str().unwrap_or_default();
    ensure!(
        err.contains("test"),
        "the error does not name the test: {err}"
    );
    round(&listen).await.context("the old listener must stay")?;
    long.write_all(b"1111").await?;
    tokio::time::timeout(T, long.read_exact(&mut b)).await??;
    ensure!(&b == b"1111");

    // The fixing commit: applied, the error clears, its new listener opens.
    let second = format!("127.0.0.1:{}", port + 1);
    let fix = format!(
        "[[access]]\nname = \"alice-echo-2\"\nfrom = [\"alice\"]\nlisten = \"{second}\"\nservice = \"echo\"\n"
    );
    sys.set_policy(&policy(&target, port, &fix))?;
    let want = checkout_hash(&sys)?;
    let st = status_until(&sys, "the fix is applied", |s| {
        s["policy"]["hash"] == want.as_str()
    })
    .await?;
    ensure!(st["reload"]["last_error"].is_null(), "{st}");
    wait_listening(&second, T).await?;
    round(&second).await?;
    long.write_all(b"2222").await?;
    tokio::time::timeout(T, long.read_exact(&mut b)).await??;
    ensure!(
        &b == b"2222",
        "the in-flight connection must survive all of it"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_quick_commits_end_on_the_last() -> Result<()> {
    let target = echo_service().await?.to_string();
    let (port, _) = free_port_range(1)?;
    let sys = System::start_layout(
        Pki::new()?,
        &policy(&target, port, ""),
        &["alice", "nas"],
        1,
        "127.0.0.1",
        Layout::Git,
    )?;
    sys.wait_ready().await?;
    let mut extra = String::new();
    for i in 0..100 {
        extra.push_str(&format!("[[portal]]\nname = \"device-{i}\"\n"));
        sys.set_policy(&policy(&target, port, &extra))?;
    }
    let want = checkout_hash(&sys)?;
    let st = status_until(&sys, "the last commit is in force", |s| {
        s["policy"]["hash"] == want.as_str()
    })
    .await?;
    ensure!(st["policy"]["portals"] == 102, "{st}");
    ensure!(
        st["reload"]["failures"] == 0,
        "a half-written state was seen: {st}"
    );
    let log = sys.log("netportd");
    ensure!(!log.contains("policy rejected"), "{log}");
    println!(
        "100 commits became {} reloads",
        log.matches("policy reloaded").count()
    );
    Ok(())
}

/// The byte at `offset` of the test stream.
fn pattern(offset: u64) -> u8 {
    (offset.wrapping_mul(2_654_435_761) >> 13) as u8
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_transfer_survives_20_reloads() -> Result<()> {
    const TOTAL: u64 = 256 << 20;
    const RELOADS: u64 = 20;
    let target = echo_service().await?.to_string();
    let (port, _) = free_port_range(1)?;
    let sys = System::start(&policy(&target, port, ""), &["alice", "nas"])?;
    let listen = format!("127.0.0.1:{port}");
    wait_listening(&listen, T).await?;
    sys.wait_ready().await?;

    let s = TcpStream::connect(&listen).await?;
    let (mut r, mut w) = s.into_split();
    // The writer sends one of 21 segments after each reload is in force, so every reload
    // happens while the transfer runs.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let written = Arc::new(AtomicU64::new(0));
    let read = Arc::new(AtomicU64::new(0));
    let (w_count, r_count) = (written.clone(), read.clone());
    let writer = tokio::spawn(async move {
        let segment = TOTAL / (RELOADS + 1);
        let mut off = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        for seg in 0..=RELOADS {
            if seg > 0 && rx.recv().await.is_none() {
                break;
            }
            let end = if seg == RELOADS { TOTAL } else { off + segment };
            while off < end {
                let n = ((end - off) as usize).min(buf.len());
                for (i, b) in buf[..n].iter_mut().enumerate() {
                    *b = pattern(off + i as u64);
                }
                w.write_all(&buf[..n]).await?;
                off += n as u64;
                w_count.store(off, Ordering::Relaxed);
            }
        }
        w.shutdown().await?;
        Ok::<u64, std::io::Error>(off)
    });
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut off = 0u64;
        loop {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, anyhow::Error>(off);
            }
            for (i, b) in buf[..n].iter().enumerate() {
                ensure!(
                    *b == pattern(off + i as u64),
                    "byte {} changed",
                    off + i as u64
                );
            }
            off += n as u64;
            r_count.store(off, Ordering::Relaxed);
        }
    });
    let mut extra = String::new();
    for i in 0..RELOADS {
        extra.push_str(&format!("[[portal]]\nname = \"extra-{i}\"\n"));
        sys.set_policy(&policy(&target, port, &extra))?;
        let want = checkout_hash(&sys)?;
        status_until(&sys, "the reload", |s| s["policy"]["hash"] == want.as_str()).await?;
        ensure!(
            !reader.is_finished(),
            "the transfer ended early, at reload {i}"
        );
        let _ = tx.send(());
    }
    // Both at once: a reader that stops on a wrong byte (or early) would otherwise leave the
    // writer blocked, and the test would report only a timeout.
    let both = async {
        tokio::try_join!(async { Ok::<_, anyhow::Error>(writer.await??) }, async {
            let got = reader.await??;
            ensure!(got == TOTAL, "the reader got {got} of {TOTAL} bytes");
            Ok(got)
        })
    };
    let (sent, got) = tokio::time::timeout(Duration::from_secs(300), both)
        .await
        .with_context(|| {
            format!(
                "the transfer stalled: {} bytes written, {} read back of {TOTAL}\n{}",
                written.load(Ordering::Relaxed),
                read.load(Ordering::Relaxed),
                sys.logs()
            )
        })??;
    ensure!(
        sent == TOTAL && got == TOTAL,
        "sent {sent}, got back {got} of {TOTAL}"
    );
    let st = status(&sys).await?;
    ensure!(st["reload"]["failures"] == 0, "{st}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_written_next_to_the_policy_do_not_hold_off_a_reload() -> Result<()> {
    let target = echo_service().await?.to_string();
    let (port, _) = free_port_range(1)?;
    let sys = System::start(&policy(&target, port, ""), &["alice", "nas"])?;
    sys.wait_ready().await?;
    // A log written next to the policy directory every 20 ms: quieter than the debounce
    // never, so if it counted as a policy change no reload would ever settle.
    let noise = sys.policy_dir().with_file_name("noise.log");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let writer = tokio::spawn(async move {
        let mut n = 0u64;
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            n += 1;
            std::fs::write(&noise, format!("line {n}\n"))?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok::<_, std::io::Error>(())
    });
    sys.set_policy(&policy(&target, port, "[[portal]]\nname = \"carol\"\n"))?;
    let want = checkout_hash(&sys)?;
    let got = status_until(&sys, "the reload despite the noise", |s| {
        s["policy"]["hash"] == want.as_str()
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await??;
    got.map(|_| ())
}
