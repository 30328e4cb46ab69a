//! The link multiplexer (`portal::mux`) between two real TLS endpoints on loopback, with
//! certificates from a throwaway CA: half-close, abort, flow control, the stream limit, the
//! link's end, and a hostile peer's broken frames.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use netport_e2e::Pki;
use netport_proto::identity::{Identity, Role};
use netport_proto::mux::{INITIAL_WINDOW, Kind, MAX_PAYLOAD, header};
use portal::mux::{self, MuxStream, Opener};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::rustls::pki_types::ServerName;

const T: Duration = Duration::from_secs(10);

/// Both ends of a link: the client's opener, the serving side's streams as they arrive,
/// and why each side's link ended, once it has.
struct Pair {
    opener: Opener,
    inbound: mpsc::UnboundedReceiver<MuxStream>,
    client_end: oneshot::Receiver<String>,
    server_end: oneshot::Receiver<String>,
    _pki: Pki,
}

/// A TLS connection to a listener on loopback, as the link's client and server portals set
/// it up (`nas` serves, `alice` is the client).
async fn tls_pair(
    pki: &Pki,
) -> Result<(
    tokio_rustls::client::TlsStream<TcpStream>,
    tokio_rustls::server::TlsStream<TcpStream>,
)> {
    let alice = pki.credentials(&pki.issue(Role::Portal, "alice")?)?;
    let nas = pki.credentials(&pki.issue(Role::Portal, "nas")?)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(nas.link_server()?));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        anyhow::Ok(acceptor.accept(tcp).await?)
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(
        alice.link_client(Identity::new(Role::Portal, "nas")?)?,
    ));
    let name = ServerName::try_from("link.netport.invalid")?;
    let client = connector
        .connect(name, TcpStream::connect(addr).await?)
        .await?;
    Ok((client, server.await??))
}

/// A link whose client carries at most `max` streams.
async fn pair(max: usize) -> Result<Pair> {
    let pki = Pki::new()?;
    let (client, server) = tls_pair(&pki).await?;
    let (tx, inbound) = mpsc::unbounded_channel();
    let (server_tx, server_end) = oneshot::channel();
    tokio::spawn(async move {
        let why = mux::server(server, move |s| {
            let _ = tx.send(s);
        })
        .await;
        let _ = server_tx.send(why);
    });
    let (client_tx, client_end) = oneshot::channel();
    let opener = mux::client(client, max, move |why| {
        let _ = client_tx.send(why);
    });
    Ok(Pair {
        opener,
        inbound,
        client_end,
        server_end,
        _pki: pki,
    })
}

impl Pair {
    async fn accept(&mut self) -> Result<MuxStream> {
        tokio::time::timeout(T, self.inbound.recv())
            .await?
            .context("the link ended")
    }
}

async fn read_to_end(s: &mut MuxStream) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut v)).await??;
    Ok(v)
}

#[tokio::test]
async fn half_close_keeps_the_reply_and_a_drop_resets_the_peer() -> Result<()> {
    let mut p = pair(16).await?;

    // Half-close: the client's FIN ends the server's reading, not the server's writing.
    let mut c = p.opener.open().await?;
    c.write_all(b"request").await?;
    c.shutdown().await?;
    let mut s = p.accept().await?;
    assert_eq!(read_to_end(&mut s).await?, b"request");
    s.write_all(b"the whole reply").await?;
    s.shutdown().await?;
    assert_eq!(read_to_end(&mut c).await?, b"the whole reply");
    assert!(
        c.write_all(b"more").await.is_err(),
        "a write after shutdown went through"
    );

    // Abort: the client drops its stream; the server's read fails instead of ending.
    let mut c = p.opener.open().await?;
    c.write_all(b"partial").await?;
    let mut s = p.accept().await?;
    let mut buf = [0u8; 7];
    tokio::time::timeout(T, s.read_exact(&mut buf)).await??;
    drop(c);
    let mut rest = Vec::new();
    let r = tokio::time::timeout(T, s.read_to_end(&mut rest)).await?;
    let e = r.err().context("a reset stream ended as if closed")?;
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");

    // A stream read before it is written opens on the peer too (a server-speaks-first
    // protocol).
    let mut c = p.opener.open().await?;
    let reader = tokio::spawn(async move {
        let mut b = [0u8; 6];
        c.read_exact(&mut b).await.map(|_| b)
    });
    let mut s = p.accept().await?;
    s.write_all(b"banner").await?;
    assert_eq!(&tokio::time::timeout(T, reader).await???, b"banner");
    Ok(())
}

/// Writes `data` to `w` until it is all written, counting what each write took.
async fn write_counting<W: AsyncWrite + Unpin>(
    mut w: W,
    data: Vec<u8>,
    taken: Arc<Mutex<usize>>,
) -> std::io::Result<W> {
    let mut at = 0;
    while at < data.len() {
        let n = w.write(&data[at..]).await?;
        at += n;
        *taken.lock().unwrap_or_else(|p| p.into_inner()) = at;
    }
    Ok(w)
}

#[tokio::test]
async fn a_stream_that_is_not_read_holds_its_writer_at_the_window() -> Result<()> {
    let mut p = pair(16).await?;
    let mut c = p.opener.open().await?;
    c.write_all(b"x").await?;
    let mut s = p.accept().await?;
    let mut one = [0u8; 1];
    s.read_exact(&mut one).await?;

    // The server writes 4 MiB and the client does not read: the server may send exactly
    // the client's window, and no more.
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    let taken = Arc::new(Mutex::new(0usize));
    let writer = tokio::spawn(write_counting(s, data.clone(), taken.clone()));
    let window = INITIAL_WINDOW as usize;
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let n = *taken.lock().unwrap_or_else(|p| p.into_inner());
        assert!(
            n <= window,
            "the writer got {n} bytes past a {window}-byte window"
        );
        if n == window {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the writer got only {n} of its {window}-byte window");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Another stream on the same link is not held up by the stalled one.
    let mut c2 = p.opener.open().await?;
    c2.write_all(b"ping").await?;
    let mut s2 = p.accept().await?;
    let mut four = [0u8; 4];
    tokio::time::timeout(T, s2.read_exact(&mut four)).await??;
    assert_eq!(&four, b"ping");

    // Reading frees the writer; every byte arrives in order.
    let mut got = vec![0u8; data.len()];
    tokio::time::timeout(T, c.read_exact(&mut got)).await??;
    assert!(got == data, "the bytes differ");
    tokio::time::timeout(T, writer).await???;
    Ok(())
}

#[tokio::test]
async fn a_full_link_refuses_one_more_stream_and_keeps_the_others() -> Result<()> {
    let mut p = pair(2).await?;
    let mut a = p.opener.open().await?;
    let b = p.opener.open().await?;
    let e = p
        .opener
        .open()
        .await
        .err()
        .context("a third stream opened")?;
    assert!(e.is::<mux::LinkFull>(), "{e:#}");
    drop(b);
    let mut c = p.opener.open().await?;
    for s in [&mut a, &mut c] {
        s.write_all(b"still").await?;
        s.shutdown().await?;
        let mut got = p.accept().await?;
        assert_eq!(read_to_end(&mut got).await?, b"still");
    }
    Ok(())
}

#[tokio::test]
async fn a_link_that_ends_fails_its_streams_and_says_why() -> Result<()> {
    let mut p = pair(16).await?;
    let mut c = p.opener.open().await?;
    c.write_all(b"x").await?;
    let _s = p.accept().await?;
    p.opener.close();
    let why = tokio::time::timeout(T, &mut p.client_end).await??;
    assert_eq!(why, "closed by this portal");
    let server_why = tokio::time::timeout(T, &mut p.server_end).await??;
    assert_eq!(server_why, "closed by the peer");
    let mut buf = [0u8; 1];
    let e = c
        .read(&mut buf)
        .await
        .err()
        .context("a read on an ended link")?;
    assert!(e.to_string().contains("link ended"), "{e}");
    assert!(p.opener.is_closed());
    assert!(p.opener.open().await.is_err());
    Ok(())
}

/// A hostile client: TLS done right, then `frames` as raw bytes, then a clean close.
/// Returns why the serving side ended the link.
async fn serve_raw(frames: Vec<u8>) -> Result<String> {
    let pki = Pki::new()?;
    let (mut client, server) = tls_pair(&pki).await?;
    // The streams are kept, as a portal's tasks keep them while they serve.
    let mut kept = Vec::new();
    let served = tokio::spawn(mux::server(server, move |s| kept.push(s)));
    client.write_all(&frames).await?;
    client.flush().await?;
    // Fails when the server has already cut the link; the frames before it are what count.
    let _ = client.shutdown().await;
    let why = tokio::time::timeout(T, served).await??;
    Ok(why)
}

fn frame(kind: Kind, id: u32, body: &[u8]) -> Vec<u8> {
    let mut f = header(kind, id, body.len() as u32).to_vec();
    f.extend_from_slice(body);
    f
}

#[tokio::test]
async fn broken_frames_from_a_peer_end_the_link_with_the_reason() -> Result<()> {
    let unknown = vec![9, 0, 0, 0, 1, 0, 0, 0, 0];
    let why = serve_raw(unknown).await?;
    assert!(why.contains("unknown frame kind 9"), "{why}");

    let oversized = header(Kind::Data, 1, MAX_PAYLOAD + 1).to_vec();
    let why = serve_raw(oversized).await?;
    assert!(why.contains("at most 65536"), "{why}");

    // More data than the window: the peer ignored flow control.
    let mut flood = frame(Kind::Open, 1, b"");
    let chunk = vec![0u8; MAX_PAYLOAD as usize];
    for _ in 0..=(INITIAL_WINDOW / MAX_PAYLOAD) {
        flood.extend(frame(Kind::Data, 1, &chunk));
    }
    let why = serve_raw(flood).await?;
    assert!(why.contains("beyond its window"), "{why}");

    // Opening a stream that is open.
    let mut twice = frame(Kind::Open, 5, b"a");
    twice.extend(frame(Kind::Open, 5, b"b"));
    let why = serve_raw(twice).await?;
    assert!(why.contains("opened while open"), "{why}");

    // Frames for streams that were never opened are ignored; the link goes on until its
    // peer closes it cleanly.
    let mut stray = frame(Kind::Data, 7, b"stray");
    stray.extend(header(Kind::Credit, 7, 10));
    stray.extend(header(Kind::Fin, 8, 0));
    let why = serve_raw(stray).await?;
    assert_eq!(why, "closed by the peer");
    Ok(())
}
