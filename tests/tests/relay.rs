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
}

async fn start_relay(hello_timeout: u64) -> Result<Setup> {
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
             ports = \"{first}-{last}\"\nhello_timeout_secs = {hello_timeout}\n\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            peer.addr()?,
            pki.ca_path().display(),
            relay.cert.display(),
            relay.key.display()
        ),
    )?;
    let log = pki.dir.path().join("relayd.log");
    let daemon = Daemon::start(
        "relayd",
        &["--config", config.to_str().context("path")?],
        &log,
    )?;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairs_two_sides_and_forwards_both_ways() -> Result<()> {
    let mut s = start_relay(5).await?;
    let (ta, tb) = ([1u8; 32], [2u8; 32]);
    let (pa, pb) = allocate(&mut s.conn, 1, &ta, &tb, 10_000).await?;
    let mut a = join(pa, &ta).await?;
    let mut b = join(pb, &tb).await?;
    assert_eq!(&answer(&mut a).await?, READY);
    assert_eq!(&answer(&mut b).await?, READY);

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

    s.conn.send(&Message::Release { alloc_id: 4 }).await?;
    match s.conn.recv(T).await? {
        Message::AllocationClosed {
            alloc_id: 4,
            reason,
            ..
        } => assert_eq!(reason, "released"),
        other => bail!("expected the release of allocation 4, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(TcpStream::connect(("127.0.0.1", pa)).await.is_err());
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

    a.write_all(b"ping").await?;
    let mut got = [0u8; 4];
    tokio::time::timeout(T, b.read_exact(&mut got)).await??;
    assert_eq!(&got, b"ping");
    b.write_all(b"pong").await?;
    tokio::time::timeout(T, a.read_exact(&mut got)).await??;
    assert_eq!(&got, b"pong");
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
        let mut got = Vec::new();
        let _ = tokio::time::timeout(T, c.read_to_end(&mut got))
            .await
            .context("a connection beyond the limit was kept open")?;
        assert!(got.is_empty(), "a dropped connection got {got:?}");
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
