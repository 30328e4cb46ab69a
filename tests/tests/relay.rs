//! relayd, the real binary, driven by a scripted netportd: allocation, pairing with
//! single-use tokens, forwarding, and refusals.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use netport_e2e::{ControlConn, ControlPeer, Daemon, Pki, free_port_range};
use netport_proto::control::{Message, PeerRole, Transport};
use netport_proto::identity::Role;
use netport_proto::relay::{BAD_TOKEN, READY, Token, encode_hello, token_to_hex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);

struct Setup {
    _pki: Pki,
    relay: Daemon,
    conn: ControlConn,
    log: std::path::PathBuf,
}

async fn start_relay(hello_timeout: u64) -> Result<Setup> {
    start_relay_with(hello_timeout, "", &[]).await
}

/// A relay whose relayd.toml has `extra` lines (top-level keys) besides the usual ones, run
/// through `wrapper` (a command and its arguments, like `setpriv` dropping capabilities).
async fn start_relay_with(hello_timeout: u64, extra: &str, wrapper: &[&str]) -> Result<Setup> {
    let pki = Pki::new()?;
    let server = pki.issue(Role::Server, "netportd")?;
    let relay = pki.issue(Role::Relay, "relay-1")?;
    let peer = ControlPeer::bind(&pki.credentials(&server)?).await?;
    let (first, last) = free_port_range(8)?;
    let config = pki.dir.path().join("relayd.toml");
    std::fs::write(
        &config,
        format!(
            "servers = [\"{}\"]\npublic_address = \"127.0.0.1\"\nbind = \"127.0.0.1\"\n\
             ports = \"{first}-{last}\"\nhello_timeout_secs = {hello_timeout}\n{extra}\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            peer.addr()?,
            pki.ca_path().display(),
            relay.cert.display(),
            relay.key.display()
        ),
    )?;
    let log = pki.dir.path().join("relayd.log");
    let relayd = netport_e2e::binary("relayd");
    let mut command: Vec<&str> = wrapper.to_vec();
    command.extend([
        relayd.to_str().context("path")?,
        "--config",
        config.to_str().context("path")?,
    ]);
    let daemon = Daemon::start(command[0], &command[1..], &log)?;
    let mut conn = peer.accept().await?;
    match conn.recv(T).await? {
        Message::Hello {
            role: PeerRole::Relay,
            ..
        } => {}
        other => bail!("expected hello, got {other:?}"),
    }
    match conn.recv(T).await? {
        Message::RelayRegister {
            address,
            port_first,
            port_last,
            ..
        } => {
            assert_eq!(address, "127.0.0.1");
            assert_eq!((port_first, port_last), (first, last));
        }
        other => bail!("expected relay_register, got {other:?}"),
    }
    conn.send(&Message::Welcome {
        version: 1,
        identity: "netport://relay/relay-1".into(),
        policy: "test".into(),
        heartbeat_secs: 5,
    })
    .await?;
    Ok(Setup {
        _pki: pki,
        relay: daemon,
        conn,
        log,
    })
}

async fn allocate(
    conn: &mut ControlConn,
    id: u64,
    ta: &Token,
    tb: &Token,
    ttl_ms: u64,
) -> Result<(u16, u16)> {
    conn.send(&Message::Allocate {
        alloc_id: id,
        token_a: token_to_hex(ta),
        token_b: token_to_hex(tb),
        ttl_ms,
        transport: Transport::Tcp,
    })
    .await?;
    match conn.recv(T).await? {
        Message::Allocated {
            alloc_id,
            port_a,
            port_b,
        } if alloc_id == id => Ok((port_a, port_b)),
        other => bail!("expected allocated, got {other:?}"),
    }
}

async fn join(port: u16, token: &Token) -> Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(&encode_hello(token)).await?;
    Ok(s)
}

async fn answer(s: &mut TcpStream) -> Result<[u8; 4]> {
    let mut a = [0u8; 4];
    tokio::time::timeout(T, s.read_exact(&mut a)).await??;
    Ok(a)
}

/// Allocates `id` and joins both sides with their tokens; both have had READY.
async fn paired(
    conn: &mut ControlConn,
    id: u64,
    ta: &Token,
    tb: &Token,
) -> Result<(TcpStream, TcpStream)> {
    let (pa, pb) = allocate(conn, id, ta, tb, 10_000).await?;
    let mut a = join(pa, ta).await?;
    let mut b = join(pb, tb).await?;
    assert_eq!(&answer(&mut a).await?, READY);
    assert_eq!(&answer(&mut b).await?, READY);
    Ok((a, b))
}

/// Releases `id` and checks that relayd reports it closed as released.
async fn release(conn: &mut ControlConn, id: u64) -> Result<()> {
    conn.send(&Message::Release { alloc_id: id }).await?;
    match conn.recv(T).await? {
        Message::AllocationClosed {
            alloc_id, reason, ..
        } if alloc_id == id => {
            anyhow::ensure!(reason == "released", "allocation {id} closed: {reason}");
            Ok(())
        }
        other => bail!("expected the release of allocation {id}, got {other:?}"),
    }
}

/// `s` ends (an end of stream or a reset) within T, and nothing comes before the end.
async fn ends_without_a_byte(s: &mut TcpStream, what: &str) -> Result<()> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut got))
        .await
        .with_context(|| format!("{what} was kept open"))?;
    anyhow::ensure!(got.is_empty(), "{what} got {got:?} before its end");
    Ok(())
}

/// "ping" from `a` reaches `b`, and "pong" from `b` reaches `a`.
async fn ping_pong(a: &mut TcpStream, b: &mut TcpStream) -> Result<()> {
    let mut got = [0u8; 4];
    a.write_all(b"ping").await?;
    tokio::time::timeout(T, b.read_exact(&mut got)).await??;
    anyhow::ensure!(&got == b"ping", "a to b carried {got:?}");
    b.write_all(b"pong").await?;
    tokio::time::timeout(T, a.read_exact(&mut got)).await??;
    anyhow::ensure!(&got == b"pong", "b to a carried {got:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairs_two_sides_and_forwards_both_ways() -> Result<()> {
    let mut s = start_relay(5).await?;
    let (a, b) = paired(&mut s.conn, 1, &[1u8; 32], &[2u8; 32]).await?;

    // 1 MiB each way, all bytes checked.
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 + i / 251) as u8).collect();
    let (mut ar, mut aw) = a.into_split();
    let (mut br, mut bw) = b.into_split();
    let d1 = data.clone();
    let d2 = data.clone();
    let w1 = tokio::spawn(async move { aw.write_all(&d1).await.map(|_| aw) });
    let w2 = tokio::spawn(async move { bw.write_all(&d2).await.map(|_| bw) });
    let mut got_b = vec![0u8; data.len()];
    let mut got_a = vec![0u8; data.len()];
    tokio::time::timeout(T, br.read_exact(&mut got_b)).await??;
    tokio::time::timeout(T, ar.read_exact(&mut got_a)).await??;
    assert!(got_b == data && got_a == data, "bytes changed in the relay");
    let (mut aw, bw) = (w1.await??, w2.await??);

    // Closing one side ends the allocation; the relay reports the bytes it carried.
    aw.shutdown().await?;
    drop((aw, ar, bw, br));
    match s.conn.recv(T).await? {
        Message::AllocationClosed {
            alloc_id: 1,
            bytes_a_to_b,
            bytes_b_to_a,
            ..
        } => {
            assert_eq!(bytes_a_to_b, 1 << 20);
            assert_eq!(bytes_b_to_a, 1 << 20);
        }
        other => bail!("expected allocation_closed, got {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_wrong_reused_and_late_tokens_and_a_third_connection() -> Result<()> {
    let mut s = start_relay(5).await?;
    let (ta, tb) = ([3u8; 32], [4u8; 32]);
    let (pa, pb) = allocate(&mut s.conn, 2, &ta, &tb, 10_000).await?;

    // Wrong token, and side B's token on side A's port.
    let mut wrong = join(pa, &[9u8; 32]).await?;
    assert_eq!(&answer(&mut wrong).await?, BAD_TOKEN);
    let mut crossed = join(pa, &tb).await?;
    assert_eq!(&answer(&mut crossed).await?, BAD_TOKEN);

    // The right token once; reusing it while the first holder waits is refused.
    let mut a = join(pa, &ta).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut reuse = join(pa, &ta).await?;
    assert_eq!(&answer(&mut reuse).await?, BAD_TOKEN);
    let mut b = join(pb, &tb).await?;
    assert_eq!(&answer(&mut a).await?, READY);
    assert_eq!(&answer(&mut b).await?, READY);

    // Paired: the ports are closed, a third connection cannot even connect.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(TcpStream::connect(("127.0.0.1", pa)).await.is_err());
    assert!(TcpStream::connect(("127.0.0.1", pb)).await.is_err());

    // An allocation whose token expires before its peer arrives.
    let (tc, td) = ([5u8; 32], [6u8; 32]);
    let (pc, _pd) = allocate(&mut s.conn, 3, &tc, &td, 300).await?;
    let _lonely = join(pc, &tc).await?;
    match s.conn.recv(T).await? {
        Message::AllocationClosed {
            alloc_id: 3,
            reason,
            ..
        } => assert_eq!(reason, "expired"),
        other => bail!("expected the expiry of allocation 3, got {other:?}"),
    }
    assert!(
        TcpStream::connect(("127.0.0.1", pc)).await.is_err(),
        "expired ports stay open"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_dropped_and_release_frees_the_pair() -> Result<()> {
    let mut s = start_relay(1).await?;
    let (ta, tb) = ([7u8; 32], [8u8; 32]);
    let (pa, _pb) = allocate(&mut s.conn, 4, &ta, &tb, 30_000).await?;
    let mut silent = TcpStream::connect(("127.0.0.1", pa)).await?;
    // Says nothing: after the hello timeout it gets BAD_TOKEN and is closed.
    assert_eq!(&answer(&mut silent).await?, BAD_TOKEN);
    let mut rest = Vec::new();
    tokio::time::timeout(T, silent.read_to_end(&mut rest)).await??;

    release(&mut s.conn, 4).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(TcpStream::connect(("127.0.0.1", pa)).await.is_err());
    Ok(())
}

/// The copy path forwards a pair with a thread per direction; releasing the allocation must
/// end both connections and both threads, not leave them blocked in `read`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releasing_a_paired_allocation_ends_both_connections_and_its_copy_threads() -> Result<()> {
    let mut s = start_relay(5).await?;
    let (mut a, mut b) = paired(&mut s.conn, 10, &[9u8; 32], &[10u8; 32]).await?;
    ping_pong(&mut a, &mut b).await?;
    assert_eq!(
        s.relay.threads_named("relay-copy")?,
        2,
        "a paired allocation on the copy path runs a thread per direction"
    );

    // Both sides stay open and silent: only the release can end the pair.
    release(&mut s.conn, 10).await?;
    // The relay shuts the sockets down: an end of stream (or a reset), within T.
    for side in [&mut a, &mut b] {
        ends_without_a_byte(side, "a side of the released pair").await?;
    }
    let deadline = tokio::time::Instant::now() + T;
    while s.relay.threads_named("relay-copy")? > 0 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the copy threads outlived their released allocation"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A pids cgroup (v1) holding one process, whose limit can be set; on drop the process goes
/// back to the root group and the group is removed.
struct PidsCgroup {
    dir: std::path::PathBuf,
    pid: u32,
}

impl PidsCgroup {
    const ROOT: &str = "/sys/fs/cgroup/pids";

    /// `None` when there is no writable pids hierarchy here (not root, or cgroup v2 only).
    fn hold(pid: u32) -> Option<PidsCgroup> {
        let dir = std::path::Path::new(Self::ROOT).join(format!("netport-test-{pid}"));
        std::fs::create_dir(&dir).ok()?;
        let group = PidsCgroup { dir, pid };
        std::fs::write(group.dir.join("cgroup.procs"), pid.to_string()).ok()?;
        Some(group)
    }

    /// No new thread or process in the group from now on.
    fn freeze_count(&self) -> Result<()> {
        let now = std::fs::read_to_string(self.dir.join("pids.current"))?;
        std::fs::write(self.dir.join("pids.max"), now.trim())?;
        Ok(())
    }
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        let root = std::path::Path::new(Self::ROOT).join("cgroup.procs");
        let _ = std::fs::write(root, self.pid.to_string());
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// When the copy threads cannot start (a task limit), the pair is still forwarded, on
/// relayd's runtime, and the log says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_whose_copy_threads_cannot_start_is_forwarded_on_the_runtime() -> Result<()> {
    let mut s = start_relay(5).await?;
    let Some(group) = PidsCgroup::hold(s.relay.id()) else {
        let msg = "SKIPPED a_pair_whose_copy_threads_cannot_start_is_forwarded_on_the_runtime: \
                   needs root and a pids cgroup (v1) at /sys/fs/cgroup/pids; CI runs it as root";
        println!("{msg}");
        eprintln!("{msg}");
        return Ok(());
    };
    group.freeze_count()?;
    let (mut a, mut b) = paired(&mut s.conn, 30, &[15u8; 32], &[16u8; 32]).await?;
    ping_pong(&mut a, &mut b).await?;
    assert_eq!(s.relay.threads_named("relay-copy")?, 0);
    let log = std::fs::read_to_string(&s.log)?;
    assert!(
        log.contains("no copy threads for this allocation"),
        "relayd does not say why: {log}"
    );
    release(&mut s.conn, 30).await?;
    ends_without_a_byte(&mut a, "a side of the released pair").await?;
    drop(group);
    Ok(())
}

/// A legacy (V0.1) allocation: one port, the 64-byte hello echoed, `Ready !` to both once
/// both are in, `Bad T !` to a wrong or spent token, and both sides closed when one closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_pair_echoes_hellos_then_readies_refuses_spent_tokens_and_closes_both() -> Result<()>
{
    use netport_proto::legacy::{RELAY_BAD_TOKEN, RELAY_READY, encode_relay_hello};
    let mut s = start_relay(5).await?;
    let token = *b"\x01\x02\x03\x04\x05\x06\x07\x08";
    s.conn
        .send(&Message::AllocateLegacy {
            alloc_id: 9,
            token: "0102030405060708".into(),
            ttl_ms: 10_000,
        })
        .await?;
    let port = match s.conn.recv(T).await? {
        Message::Allocated {
            alloc_id: 9,
            port_a,
            port_b,
        } if port_a == port_b => port_a,
        other => bail!("expected one legacy port, got {other:?}"),
    };
    let hello = encode_relay_hello(&token);
    let mut bad = TcpStream::connect(("127.0.0.1", port)).await?;
    bad.write_all(&encode_relay_hello(b"wrongtok")).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(T, bad.read_to_end(&mut answer)).await??;
    assert_eq!(
        answer, RELAY_BAD_TOKEN,
        "a wrong token gets Bad T and a close"
    );

    let mut a = TcpStream::connect(("127.0.0.1", port)).await?;
    a.write_all(&hello).await?;
    let mut echo = [0u8; 64];
    tokio::time::timeout(T, a.read_exact(&mut echo)).await??;
    assert_eq!(echo, hello);
    let mut b = TcpStream::connect(("127.0.0.1", port)).await?;
    b.write_all(&hello).await?;
    tokio::time::timeout(T, b.read_exact(&mut echo)).await??;
    assert_eq!(echo, hello);
    // The next bytes each side sees are exactly `Ready !\n`: nothing came before it.
    for side in [&mut a, &mut b] {
        let mut ready = [0u8; 8];
        tokio::time::timeout(T, side.read_exact(&mut ready)).await??;
        assert_eq!(&ready, RELAY_READY);
    }
    // The token is spent.
    let mut third = TcpStream::connect(("127.0.0.1", port)).await?;
    third.write_all(&hello).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(T, third.read_to_end(&mut answer)).await??;
    assert_eq!(
        answer, RELAY_BAD_TOKEN,
        "a reused token gets Bad T and a close"
    );

    ping_pong(&mut a, &mut b).await?;
    // One side closes: the other is closed too, and netportd hears of it.
    drop(a);
    let mut rest = Vec::new();
    tokio::time::timeout(T, b.read_to_end(&mut rest)).await??;
    assert!(rest.is_empty());
    match s.conn.recv(T).await? {
        Message::AllocationClosed {
            alloc_id: 9,
            bytes_a_to_b: 4,
            bytes_b_to_a: 4,
            ..
        } => {}
        other => bail!("expected allocation_closed, got {other:?}"),
    }
    Ok(())
}

/// A connection to an allocation port from `source` (a loopback address of the test's
/// choosing, so the relay's per-address accounting can tell hostile peers from real ones).
async fn connect_from(source: &str, port: u16) -> Result<TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(format!("{source}:0").parse()?)?;
    Ok(sock.connect(([127, 0, 0, 1], port).into()).await?)
}

/// One allocation holds at most 16 connections waiting to say hello: a 17th and beyond are
/// closed at once, without an answer, and logged; the 16 get BAD_TOKEN at the hello timeout;
/// and the real sides, from another address, still pair and forward.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_sixteen_waiting_for_a_hello_are_closed_and_the_pair_still_forms()
-> Result<()> {
    let mut s = start_relay(2).await?;
    let (ta, tb) = ([9u8; 32], [10u8; 32]);
    let (pa, pb) = allocate(&mut s.conn, 6, &ta, &tb, 30_000).await?;
    let max = relayd::guard::MAX_PENDING_HELLOS;
    let mut silent = Vec::new();
    for _ in 0..max {
        silent.push(connect_from("127.0.0.2", pa).await?);
    }
    let mut extra = Vec::new();
    for _ in 0..4 {
        extra.push(connect_from("127.0.0.2", pa).await?);
    }
    // The extra ones end without a byte: no BAD_TOKEN, the relay never read them.
    for c in &mut extra {
        ends_without_a_byte(c, "a connection beyond the limit").await?;
    }
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let log = s.relay.log_text();
        let n = log
            .matches("too many connections waiting to say hello")
            .count();
        if n == 4 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} drops logged, 4 expected:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The waiting ones get their answer at the hello timeout.
    for c in &mut silent {
        assert_eq!(&answer(c).await?, BAD_TOKEN);
    }
    // The real sides join from 127.0.0.1 and the pair forwards.
    let mut a = join(pa, &ta).await?;
    let mut b = join(pb, &tb).await?;
    assert_eq!(&answer(&mut a).await?, READY);
    assert_eq!(&answer(&mut b).await?, READY);
    a.write_all(b"through").await?;
    let mut got = [0u8; 7];
    tokio::time::timeout(T, b.read_exact(&mut got)).await??;
    assert_eq!(&got, b"through");
    Ok(())
}

/// The test stream: byte `i` is `PATTERN[i % PERIOD]`, a period prime to every buffer size.
const PERIOD: usize = 65_521;

fn pattern() -> Vec<u8> {
    (0..PERIOD as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// Writes `len` bytes of the pattern, then shuts the write side down (a FIN).
async fn send_pattern(mut w: tokio::net::tcp::OwnedWriteHalf, len: usize) -> Result<()> {
    let p = pattern();
    let mut sent = 0;
    while sent < len {
        let at = sent % PERIOD;
        let n = (PERIOD - at).min(len - sent);
        w.write_all(&p[at..at + n]).await?;
        sent += n;
    }
    w.shutdown().await?;
    Ok(())
}

/// Reads until end of stream; fails unless exactly `len` bytes of the pattern came.
async fn expect_pattern(mut r: tokio::net::tcp::OwnedReadHalf, len: usize) -> Result<()> {
    let p = pattern();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0usize;
    loop {
        let n = tokio::time::timeout(T, r.read(&mut buf))
            .await
            .context("no byte and no end of stream for 10 s")??;
        if n == 0 {
            break;
        }
        let mut off = 0;
        while off < n {
            let at = (got + off) % PERIOD;
            let k = (PERIOD - at).min(n - off);
            if buf[off..off + k] != p[at..at + k] {
                bail!("bytes changed in the relay around offset {}", got + off);
            }
            off += k;
        }
        got += n;
    }
    if got != len {
        bail!("{got} bytes before the end of stream, expected {len}");
    }
    Ok(())
}

/// Test 4 of issue 5 for one `tcp_fast_path`: bytes sent together with the hello (before the
/// relay's fast path takes over) arrive first, 256 MiB one way and 32 MiB the other arrive
/// intact, each side's FIN reaches the other side after its last byte, and the relay reports
/// the bytes it carried.
async fn fast_path_carries_and_closes(path: &str, label: &str) -> Result<()> {
    let (admin_port, _) = free_port_range(1)?;
    let admin = format!("127.0.0.1:{admin_port}");
    let mut s = start_relay_with(
        5,
        &format!("tcp_fast_path = \"{path}\"\nadmin_listen = \"{admin}\"\n"),
        &[],
    )
    .await?;
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let log = std::fs::read_to_string(&s.log).unwrap_or_default();
        if log.contains("TCP allocations forwarded") || log.contains("TCP fast path loaded") {
            if log.contains("TCP sockmap fast path unavailable") {
                bail!("relayd fell back instead of using {path}:\n{log}");
            }
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("relayd never said how it forwards TCP:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (ta, tb) = ([11u8; 32], [12u8; 32]);
    let (pa, pb) = allocate(&mut s.conn, 20, &ta, &tb, 10_000).await?;
    // Each side's first bytes go out in the same segment as its hello.
    let (early_a, early_b) = (b"sent with A's hello".as_slice(), b"B's too".as_slice());
    let mut a = TcpStream::connect(("127.0.0.1", pa)).await?;
    a.write_all(&[encode_hello(&ta).as_slice(), early_a].concat())
        .await?;
    let mut b = TcpStream::connect(("127.0.0.1", pb)).await?;
    b.write_all(&[encode_hello(&tb).as_slice(), early_b].concat())
        .await?;
    assert_eq!(&answer(&mut a).await?, READY);
    assert_eq!(&answer(&mut b).await?, READY);
    let mut got = vec![0u8; early_a.len()];
    tokio::time::timeout(T, b.read_exact(&mut got)).await??;
    assert_eq!(
        got, early_a,
        "bytes sent with the hello reach the other side"
    );
    let mut got = vec![0u8; early_b.len()];
    tokio::time::timeout(T, a.read_exact(&mut got)).await??;
    assert_eq!(
        got, early_b,
        "bytes sent with the hello reach the other side"
    );

    // The allocation is counted under its path.
    let (code, metrics) = netport_common::admin::get(&admin, "/metrics").await?;
    assert_eq!(code, 200);
    assert!(
        metrics.contains(&format!("allocations_opened_total{{path=\"{label}\"}} 1")),
        "no allocation counted under {label}:\n{metrics}"
    );

    let (big, small) = (256usize << 20, 32usize << 20);
    let (ar, aw) = a.into_split();
    let (br, bw) = b.into_split();
    let runs = tokio::spawn(async move {
        tokio::try_join!(
            send_pattern(aw, big),
            send_pattern(bw, small),
            expect_pattern(br, big),
            expect_pattern(ar, small),
        )
    });
    tokio::time::timeout(Duration::from_secs(120), runs)
        .await
        .context("256 MiB did not cross the relay within 120 s")??
        .with_context(|| std::fs::read_to_string(&s.log).unwrap_or_default())?;
    match s.conn.recv(T).await? {
        Message::AllocationClosed {
            alloc_id: 20,
            bytes_a_to_b,
            bytes_b_to_a,
            reason,
        } => {
            assert_eq!(reason, "closed");
            assert_eq!(bytes_a_to_b, (big + early_a.len()) as u64);
            assert_eq!(bytes_b_to_a, (small + early_b.len()) as u64);
        }
        other => bail!("expected allocation_closed, got {other:?}"),
    }
    let log = std::fs::read_to_string(&s.log).unwrap_or_default();
    assert!(
        log.contains(&format!("path=\"{label}\"")) || log.contains(&format!("path={label}")),
        "the log names the path {label}:\n{log}"
    );
    if path == "sockmap" {
        // Proof that the kernel, not relayd, carried the bulk: the program's own counters.
        let kernel =
            |key: &str| netport_e2e::log_field(&log, "sockmap pair ended", key).unwrap_or(0);
        // Not all of each direction: what a side sends before the sockets join the map
        // (it starts at once) is forwarded by relayd, and on a loaded machine the join
        // takes a while. The 256 MiB direction is mostly the kernel's all the same; the
        // byte totals checked above are exact either way.
        assert!(
            kernel("kernel_a_to_b") >= big as u64 * 3 / 4 && kernel("kernel_b_to_a") > 0,
            "the sockmap program's counters should cover the bulk:\n{log}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_path_carries_256_mib_early_bytes_and_closes_both_ways() -> Result<()> {
    fast_path_carries_and_closes("splice", "tcp-splice").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockmap_path_carries_256_mib_early_bytes_and_closes_both_ways() -> Result<()> {
    if !netport_e2e::netns::is_root() {
        let msg = "SKIPPED sockmap_path_carries_256_mib_early_bytes_and_closes_both_ways: loading the sockmap program needs root (CAP_BPF and CAP_NET_ADMIN); CI runs it as root";
        println!("{msg}");
        eprintln!("{msg}");
        return Ok(());
    }
    fast_path_carries_and_closes("sockmap", "tcp-sockmap").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_path_carries_256_mib_early_bytes_and_closes_both_ways() -> Result<()> {
    fast_path_carries_and_closes("copy", "tcp-userspace").await
}

/// Without CAP_BPF the sockmap program cannot load: relayd says why in one line and copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockmap_without_capabilities_falls_back_to_copy_and_says_why() -> Result<()> {
    let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let Some(setpriv) = setpriv.filter(|_| netport_e2e::netns::is_root()) else {
        let msg = "SKIPPED sockmap_without_capabilities_falls_back_to_copy_and_says_why: needs root and setpriv (to drop the capabilities a non-root relayd lacks); CI runs it as root";
        println!("{msg}");
        eprintln!("{msg}");
        return Ok(());
    };
    let no_caps = [setpriv, "--bounding-set=-all", "--inh-caps=-all"];
    let mut s = start_relay_with(5, "tcp_fast_path = \"sockmap\"\n", &no_caps).await?;
    let (mut a, mut b) = paired(&mut s.conn, 21, &[13u8; 32], &[14u8; 32]).await?;
    a.write_all(b"through").await?;
    let mut got = [0u8; 7];
    tokio::time::timeout(T, b.read_exact(&mut got)).await??;
    assert_eq!(&got, b"through");

    let (ar, aw) = a.into_split();
    let (br, bw) = b.into_split();
    tokio::time::timeout(Duration::from_secs(60), async {
        tokio::try_join!(
            send_pattern(aw, 1 << 20),
            send_pattern(bw, 1 << 20),
            expect_pattern(br, 1 << 20),
            expect_pattern(ar, 1 << 20),
        )
    })
    .await
    .context("1 MiB each way did not cross within 60 s")??;
    let log = std::fs::read_to_string(&s.log).unwrap_or_default();
    let why: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("TCP sockmap fast path unavailable"))
        .collect();
    assert_eq!(why.len(), 1, "one line says why:\n{log}");
    assert!(
        why[0].contains("CAP_BPF"),
        "the reason names the capability: {}",
        why[0]
    );
    assert!(log.contains("path=\"tcp-userspace\""), "{log}");
    Ok(())
}

/// Test 4 of issue 5 on the namespace topology (peers X and Y each joined by veth to the
/// relay's namespace, forwarded traffic dropped there): 256 MiB X to Y and 32 MiB back
/// through a sockmap allocation, bytes sent with the hello first, both ends closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockmap_across_namespaces_carries_256_mib_and_closes_both_ways() -> Result<()> {
    use netport_e2e::netns::{Netns, Topology, skip_unless_root, start_relay};
    if skip_unless_root("sockmap_across_namespaces_carries_256_mib_and_closes_both_ways") {
        return Ok(());
    }
    let topo = Topology::new()?;
    let mut relay = start_relay(&topo, "tcp_fast_path = \"sockmap\"").await?;
    let (ta, tb) = ([15u8; 32], [16u8; 32]);
    let (pa, pb) = allocate(&mut relay.conn, 30, &ta, &tb, 10_000).await?;
    let dial = |ns: &Netns, to: String, first: Vec<u8>| {
        ns.enter(move || -> Result<std::net::TcpStream> {
            use std::io::Write;
            let mut s = std::net::TcpStream::connect(&to)?;
            s.write_all(&first)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
    };
    let early = b"with the hello".to_vec();
    let a = dial(
        &topo.x,
        format!("{}:{pa}", Topology::RELAY_X),
        [encode_hello(&ta).as_slice(), &early].concat(),
    )??;
    let b = dial(
        &topo.y,
        format!("{}:{pb}", Topology::RELAY_Y),
        [encode_hello(&tb).as_slice(), &early].concat(),
    )??;
    let (mut a, mut b) = (TcpStream::from_std(a)?, TcpStream::from_std(b)?);
    assert_eq!(&answer(&mut a).await?, READY);
    assert_eq!(&answer(&mut b).await?, READY);
    for side in [&mut a, &mut b] {
        let mut got = vec![0u8; early.len()];
        tokio::time::timeout(T, side.read_exact(&mut got)).await??;
        assert_eq!(got, early, "bytes sent with the hello crossed first");
    }
    let (big, small) = (256usize << 20, 32usize << 20);
    let (ar, aw) = a.into_split();
    let (br, bw) = b.into_split();
    tokio::time::timeout(Duration::from_secs(120), async {
        tokio::try_join!(
            send_pattern(aw, big),
            send_pattern(bw, small),
            expect_pattern(br, big),
            expect_pattern(ar, small),
        )
    })
    .await
    .context("256 MiB did not cross within 120 s")?
    .with_context(|| relay.daemon.log_text())?;
    match relay.conn.recv(T).await? {
        Message::AllocationClosed {
            alloc_id: 30,
            bytes_a_to_b,
            bytes_b_to_a,
            reason,
        } => {
            assert_eq!(reason, "closed");
            assert_eq!(bytes_a_to_b, (big + early.len()) as u64);
            assert_eq!(bytes_b_to_a, (small + early.len()) as u64);
        }
        other => bail!("expected allocation_closed, got {other:?}"),
    }
    let log = relay.daemon.log_text();
    assert!(log.contains("path=\"tcp-sockmap\""), "{log}");
    assert!(
        log.contains("kernel_a_to_b=268435"),
        "the kernel carried the bulk:\n{log}"
    );
    Ok(())
}
