//! Stream multiplexing on a TCP link: many streams over one TLS connection, framed as
//! `netport_proto::mux` describes (per-stream credit flow control, half-close, abort).
//!
//! Why not a multiplexer crate: `netport-bench tunnel --peers tls-chain,mux-chain,netport`
//! measured yamux as the largest of the layers Netport adds to a plain chain of forwarders,
//! +16 µs of a round trip's p50 (bench/README.md, "The layers over the floor"). yamux runs
//! all of a link's I/O in one driver task: every write crosses a channel to that task, and
//! every read waits for it to be scheduled. Here nothing crosses a task on the way:
//!
//! - **Writing:** a stream's `poll_write` encrypts its frame into the link's TLS session and
//!   writes it to the socket itself, under the link's lock. Only when the socket is full does
//!   the rest wait, in TLS's buffer, for the link's writer task, which sends it when the
//!   socket has room; a stream that writes while more than [`QUEUE_LIMIT`] waits is held
//!   back until the queue is gone.
//! - **Reading:** the link's reader task decrypts what arrives and hands each stream its
//!   bytes, waking that stream's task.
//!
//! A stream is `AsyncRead + AsyncWrite`: `shutdown` sends FIN and leaves the read side open
//! (half-close), dropping it before both sides have finished sends RST (abort). A stream's
//! first write opens it on the peer and carries its first bytes (one frame, one TLS record).
//! Each stream may have [`INITIAL_WINDOW`] unread bytes in flight; a stream whose reader
//! keeps up gets more, doubling up to [`MAX_WINDOW`], within the link's [`GROWTH_BUDGET`].

use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use netport_proto::mux::{
    Decoder, Event, HEADER, INITIAL_WINDOW, Kind, MAX_PAYLOAD, MAX_WINDOW, header,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::config::MAX_STREAMS_PER_LINK;

/// What a link stream is, over either transport: bytes both ways.
pub trait LinkIo: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> LinkIo for T {}

/// One stream of a link: a [`MuxStream`] on a TCP link, a QUIC stream on a QUIC link.
pub type LinkStream = Box<dyn LinkIo>;

/// The serving side's limit on streams at once: the largest `max_streams_per_link` a client
/// portal may use, with room for streams the client has dropped whose reset is on its way.
pub(crate) const SERVER_LIMIT: usize = MAX_STREAMS_PER_LINK + MAX_STREAMS_PER_LINK / 4;

/// Bytes of frames waiting for the socket beyond which writing streams wait too.
pub const QUEUE_LIMIT: usize = 1024 * 1024;

/// How much the streams of one link may grow their windows beyond [`INITIAL_WINDOW`], in all.
pub const GROWTH_BUDGET: u64 = 64 * 1024 * 1024;

/// A window grows when its stream's reader took half of it this quickly: it keeps up, and a
/// larger window lets the sender keep the path full.
const GROW_WITHIN: Duration = Duration::from_millis(20);

/// How long a closing link waits for the peer's answer to its close.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// How many socket reads the reader makes before it lets other tasks run.
const READS_PER_TURN: usize = 4;

/// A link already carries as many streams as it may: this open fails, the link goes on.
#[derive(Debug, thiserror::Error)]
#[error("the link already carries {0} streams (`max_streams_per_link`)")]
pub struct LinkFull(pub usize);

/// A link's TLS connection, after its handshake: the socket and the TLS session, which the
/// multiplexer drives itself.
#[derive(Debug)]
pub struct LinkTls {
    tcp: TcpStream,
    tls: rustls::Connection,
}

impl<C: Into<rustls::Connection>> From<(TcpStream, C)> for LinkTls {
    fn from((tcp, tls): (TcpStream, C)) -> LinkTls {
        LinkTls {
            tcp,
            tls: tls.into(),
        }
    }
}

impl From<tokio_rustls::client::TlsStream<TcpStream>> for LinkTls {
    fn from(s: tokio_rustls::client::TlsStream<TcpStream>) -> LinkTls {
        s.into_inner().into()
    }
}

impl From<tokio_rustls::server::TlsStream<TcpStream>> for LinkTls {
    fn from(s: tokio_rustls::server::TlsStream<TcpStream>) -> LinkTls {
        s.into_inner().into()
    }
}

/// One link: its socket, and everything else under one lock.
#[derive(Debug)]
struct Link {
    tcp: TcpStream,
    state: Mutex<State>,
    /// Wakes the writer task: frames wait in TLS's buffer for the socket.
    flush: Notify,
    /// Wakes the reader task: the link ended or is closing.
    stop: Notify,
}

#[derive(Debug)]
struct State {
    tls: rustls::Connection,
    streams: HashMap<u32, Slot>,
    client: bool,
    /// The client's next stream id.
    ids: u32,
    /// At most this many streams at once.
    limit: usize,
    /// Why the link ended, once it has.
    ended: Option<String>,
    /// This side closed the link (close_notify sent).
    closing: bool,
    /// Bytes of frames given to TLS since its buffer was last empty.
    queued: usize,
    /// Streams waiting for the queue to go.
    blocked: Vec<Waker>,
    /// What is left of [`GROWTH_BUDGET`].
    budget: u64,
    decoder: Decoder,
}

/// A stream's state on this side.
#[derive(Debug)]
struct Slot {
    /// Received and not yet read.
    recv: std::collections::VecDeque<u8>,
    /// The peer sent FIN.
    recv_fin: bool,
    /// The peer reset the stream.
    reset: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
    /// How much this side may still send.
    credit: u32,
    /// How much unread data this side accepts.
    window: u32,
    /// How much the peer may still send, as this side granted it.
    granted: u32,
    /// Read since the last credit this side sent.
    consumed: u32,
    last_credit: Instant,
    /// The peer knows the stream (this side's first frame went, or the peer opened it).
    opened: bool,
    fin_sent: bool,
}

impl Slot {
    fn new(opened: bool) -> Slot {
        Slot {
            recv: Default::default(),
            recv_fin: false,
            reset: false,
            reader: None,
            writer: None,
            credit: INITIAL_WINDOW,
            window: INITIAL_WINDOW,
            granted: INITIAL_WINDOW,
            consumed: 0,
            last_credit: Instant::now(),
            opened,
            fin_sent: false,
        }
    }
}

/// Writes to the socket without waiting (the link's lock is held).
struct Sock<'a>(&'a TcpStream);

impl Write for Sock<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a writer of frames learnt: whether the writer task must take over.
enum Pushed {
    /// Everything went to the socket.
    Drained,
    /// The socket is full: the rest waits in TLS's buffer.
    Waiting,
}

impl Link {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the state under the lock, then wakes the tasks `f` listed (after the
    /// lock is released, so a woken task on another thread does not wait for it).
    fn locked<R>(&self, f: impl FnOnce(&Link, &mut State, &mut Vec<Waker>) -> R) -> R {
        let mut wake = Vec::new();
        let r = f(self, &mut self.lock(), &mut wake);
        wake.into_iter().for_each(Waker::wake);
        r
    }

    /// Sends one frame (header `h` and `body`) through TLS, and as much of TLS's buffer as
    /// the socket takes. Wakers of streams that may write again go to `wake`.
    fn send(&self, st: &mut State, h: [u8; HEADER], body: &[u8], wake: &mut Vec<Waker>) {
        // Nothing follows a close_notify (a stream dropped while its link closes resets
        // nothing: the link's end ends it).
        if st.ended.is_some() || st.closing {
            return;
        }
        let mut bufs = [IoSlice::new(&h), IoSlice::new(body)];
        let mut bufs = &mut bufs[..];
        let mut left = HEADER + body.len();
        // rustls takes it all (its buffer has no limit: QUEUE_LIMIT is the limit).
        while left > 0 {
            match st.tls.writer().write_vectored(bufs) {
                Ok(0) => {
                    self.end(st, "TLS refused data".into(), wake);
                    return;
                }
                Ok(n) => {
                    left -= n;
                    IoSlice::advance_slices(&mut bufs, n);
                }
                Err(e) => {
                    self.end(st, format!("TLS: {e}"), wake);
                    return;
                }
            }
        }
        st.queued += HEADER + body.len();
        if let Pushed::Waiting = self.push(st, wake) {
            self.flush.notify_one();
        }
    }

    /// Writes what TLS holds to the socket until it is empty or the socket is full.
    fn push(&self, st: &mut State, wake: &mut Vec<Waker>) -> Pushed {
        while st.tls.wants_write() {
            match st.tls.write_tls(&mut Sock(&self.tcp)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Pushed::Waiting,
                Err(e) => {
                    self.end(st, format!("writing to the link: {e}"), wake);
                    return Pushed::Drained;
                }
            }
        }
        st.queued = 0;
        wake.append(&mut st.blocked);
        Pushed::Drained
    }

    /// [`Link::end`], taking the lock.
    fn end_now(&self, why: String) {
        self.locked(|link, st, wake| link.end(st, why, wake));
    }

    /// Ends the link: every stream's next read or write fails (after the data already
    /// received), and both of the link's tasks stop.
    fn end(&self, st: &mut State, why: String, wake: &mut Vec<Waker>) {
        if st.ended.is_some() {
            return;
        }
        st.ended = Some(why);
        for slot in st.streams.values_mut() {
            wake.extend(slot.reader.take());
            wake.extend(slot.writer.take());
        }
        wake.append(&mut st.blocked);
        let _ = socket2::SockRef::from(&self.tcp).shutdown(std::net::Shutdown::Both);
        self.flush.notify_one();
        self.stop.notify_one();
    }

    /// Acts on one decoded event; a stream the peer opened goes to `opened`.
    fn on_event(
        self: &Arc<Self>,
        st: &mut State,
        ev: Event<'_>,
        opened: &mut Vec<MuxStream>,
        wake: &mut Vec<Waker>,
    ) -> Result<(), String> {
        let id = match ev {
            Event::Open(id)
            | Event::Data(id, _)
            | Event::Fin(id)
            | Event::Reset(id)
            | Event::Credit(id, _) => id,
        };
        if let Event::Open(id) = ev {
            if st.client {
                return Err(format!("the serving portal opened stream {id}"));
            }
            // Ids are not opened in order: a stream's first frame goes with its first write.
            if st.streams.contains_key(&id) {
                return Err(format!("stream {id} opened while open"));
            }
            if st.streams.len() >= st.limit {
                // Refused alone: the link and its other streams go on.
                tracing::warn!(
                    "refusing a stream: the link already carries {} streams",
                    st.limit
                );
                self.send(st, header(Kind::Reset, id, 0), &[], wake);
                return Ok(());
            }
            st.streams.insert(id, Slot::new(true));
            opened.push(MuxStream {
                link: self.clone(),
                id,
            });
            return Ok(());
        }
        let Some(slot) = st.streams.get_mut(&id) else {
            // A stream this side has dropped (or refused): what was in flight for it goes.
            return Ok(());
        };
        match ev {
            Event::Data(_, bytes) => {
                if slot.recv_fin {
                    return Err(format!("data on stream {id} after its FIN"));
                }
                let n = bytes.len() as u32;
                if n > slot.granted {
                    return Err(format!("stream {id} sent beyond its window"));
                }
                slot.granted -= n;
                if !slot.reset {
                    slot.recv.extend(bytes);
                    wake.extend(slot.reader.take());
                }
            }
            Event::Fin(_) => {
                slot.recv_fin = true;
                wake.extend(slot.reader.take());
            }
            Event::Reset(_) => {
                // What arrived before the reset can still be read.
                slot.reset = true;
                wake.extend(slot.reader.take());
                wake.extend(slot.writer.take());
            }
            Event::Credit(_, n) => {
                slot.credit = match slot.credit.checked_add(n) {
                    Some(c) if c <= MAX_WINDOW => c,
                    _ => return Err(format!("stream {id} was granted over {MAX_WINDOW} bytes")),
                };
                wake.extend(slot.writer.take());
            }
            Event::Open(_) => {}
        }
        Ok(())
    }

    /// The reader: decrypts what arrives and hands it to the streams until the link ends;
    /// returns why it ended. Streams the peer opens go to `serve`.
    async fn read_loop(self: Arc<Self>, mut serve: impl FnMut(MuxStream)) -> String {
        let mut raw = vec![0u8; 64 * 1024];
        let mut plain = vec![0u8; 64 * 1024];
        // What TLS may already hold from the handshake.
        let mut first = true;
        loop {
            let mut opened = Vec::new();
            let mut wake = Vec::new();
            let mut wait = false;
            {
                let mut st = self.lock();
                for _ in 0..READS_PER_TURN {
                    if st.ended.is_some() {
                        break;
                    }
                    let (n, drained) = if first {
                        first = false;
                        (0, false)
                    } else {
                        match read_some(&self.tcp, &mut raw) {
                            Ok((0, _)) => {
                                let why = if st.closing {
                                    "closed by this portal"
                                } else {
                                    "the peer closed the link without a TLS close_notify"
                                };
                                self.end(&mut st, why.into(), &mut wake);
                                break;
                            }
                            Ok(read) => read,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                wait = true;
                                break;
                            }
                            Err(e) => {
                                self.end(&mut st, format!("reading the link: {e}"), &mut wake);
                                break;
                            }
                        }
                    };
                    if let Err(why) =
                        self.take_in(&mut st, &raw[..n], &mut plain, &mut opened, &mut wake)
                    {
                        self.end(&mut st, why, &mut wake);
                    }
                    if drained {
                        wait = true;
                        break;
                    }
                }
            }
            for s in opened {
                serve(s);
            }
            for w in wake {
                w.wake();
            }
            if let Some(why) = self.lock().ended.clone() {
                return why;
            }
            if wait {
                let closing = self.lock().closing;
                tokio::select! {
                    r = self.tcp.readable() => {
                        if let Err(e) = r {
                            self.end_now(format!("reading the link: {e}"));
                        }
                    }
                    _ = self.stop.notified() => {}
                    _ = tokio::time::sleep(CLOSE_WAIT), if closing => {
                        self.end_now("closed by this portal (no answer)".into());
                    }
                }
            } else {
                tokio::task::yield_now().await;
            }
        }
    }

    /// Feeds `input` (TLS records from the socket) through TLS and the frame decoder.
    fn take_in(
        self: &Arc<Self>,
        st: &mut State,
        mut input: &[u8],
        plain: &mut [u8],
        opened: &mut Vec<MuxStream>,
        wake: &mut Vec<Waker>,
    ) -> Result<(), String> {
        loop {
            if !input.is_empty() {
                st.tls
                    .read_tls(&mut input)
                    .map_err(|e| format!("reading TLS: {e}"))?;
            }
            st.tls
                .process_new_packets()
                .map_err(|e| format!("TLS: {e}"))?;
            loop {
                match st.tls.reader().read(plain) {
                    Ok(0) => {
                        let why = if st.closing {
                            "closed by this portal"
                        } else {
                            "closed by the peer"
                        };
                        return Err(why.into());
                    }
                    Ok(n) => {
                        let mut decoder = std::mem::take(&mut st.decoder);
                        let mut bad = None;
                        let r = decoder.feed(&plain[..n], |ev| {
                            if bad.is_none() {
                                bad = self.on_event(st, ev, opened, wake).err();
                            }
                        });
                        st.decoder = decoder;
                        if let Some(why) = bad {
                            return Err(why);
                        }
                        r.map_err(|e| format!("a broken frame: {e}"))?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(format!("reading TLS: {e}")),
                }
            }
            if st.tls.wants_write() {
                // TLS has something to say (a key update, an alert).
                if let Pushed::Waiting = self.push(st, wake) {
                    self.flush.notify_one();
                }
            }
            if input.is_empty() {
                return Ok(());
            }
        }
    }

    /// The writer: sends what waits in TLS's buffer whenever a stream left some, until the
    /// link ends.
    async fn write_loop(self: Arc<Self>) {
        loop {
            self.flush.notified().await;
            loop {
                let mut wake = Vec::new();
                let (pushed, ended, closing) = {
                    let mut st = self.lock();
                    if st.ended.is_some() {
                        (Pushed::Drained, true, false)
                    } else {
                        (
                            self.push(&mut st, &mut wake),
                            st.ended.is_some(),
                            st.closing,
                        )
                    }
                };
                wake.into_iter().for_each(Waker::wake);
                if ended {
                    return;
                }
                match pushed {
                    Pushed::Drained => {
                        if closing {
                            // close_notify is out: no more from this side.
                            let _ = socket2::SockRef::from(&self.tcp)
                                .shutdown(std::net::Shutdown::Write);
                        }
                        break;
                    }
                    Pushed::Waiting => {
                        if let Err(e) = self.tcp.writable().await {
                            self.end_now(format!("writing to the link: {e}"));
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Closes the link: TLS close_notify, then the socket's write side once it is out. The
    /// link ends when the peer answers (or after [`CLOSE_WAIT`]).
    fn close(&self) {
        let closed = self.locked(|link, st, wake| {
            if st.ended.is_some() || st.closing {
                return false;
            }
            st.closing = true;
            st.tls.send_close_notify();
            link.push(st, wake);
            true
        });
        if !closed {
            return;
        }
        self.flush.notify_one();
        self.stop.notify_one();
    }
}

/// Sets a link up over `tls`: its state, and its writer task.
fn start(tls: LinkTls, client: bool, limit: usize) -> Arc<Link> {
    let LinkTls { tcp, mut tls } = tls;
    // QUEUE_LIMIT bounds what waits; rustls must take every frame whole.
    tls.set_buffer_limit(None);
    let link = Arc::new(Link {
        tcp,
        state: Mutex::new(State {
            tls,
            streams: HashMap::new(),
            client,
            ids: u32::from(client),
            limit,
            ended: None,
            closing: false,
            queued: 0,
            blocked: Vec::new(),
            budget: GROWTH_BUDGET,
            decoder: Decoder::new(),
        }),
        flush: Notify::new(),
        stop: Notify::new(),
    });
    // Whatever the handshake left in TLS's buffer goes first.
    link.flush.notify_one();
    tokio::spawn(link.clone().write_loop());
    link
}

/// Opens streams on a client link.
#[derive(Clone, Debug)]
pub struct Opener {
    link: Arc<Link>,
}

impl Opener {
    /// A new outbound stream. The peer hears of it with its first write (or its shutdown).
    pub async fn open(&self) -> Result<MuxStream> {
        let mut st = self.link.lock();
        if let Some(why) = &st.ended {
            bail!("link ended: {why}");
        }
        if st.closing {
            bail!("link closed");
        }
        if st.streams.len() >= st.limit {
            return Err(LinkFull(st.limit).into());
        }
        let id = st.ids;
        st.ids = id
            .checked_add(1)
            .ok_or_else(|| anyhow!("the link has used all its stream ids"))?;
        st.streams.insert(id, Slot::new(false));
        Ok(MuxStream {
            link: self.link.clone(),
            id,
        })
    }

    /// Closes the link (its open streams end).
    pub fn close(&self) {
        self.link.close();
    }

    /// Whether the link has ended or is closing.
    pub fn is_closed(&self) -> bool {
        let st = self.link.lock();
        st.ended.is_some() || st.closing
    }
}

/// Starts the client side of a link over `tls`, carrying at most `max` streams at once;
/// `on_end` runs when the link ends, with why.
pub fn client(
    tls: impl Into<LinkTls>,
    max: usize,
    on_end: impl FnOnce(String) + Send + 'static,
) -> Opener {
    let link = start(tls.into(), true, max);
    let reader = link.clone();
    tokio::spawn(async move {
        let why = reader.read_loop(|_| {}).await;
        on_end(why);
    });
    Opener { link }
}

/// Runs the serving side of a link over `tls`, handing each stream the peer opens to
/// `serve`, until the link ends; returns why it ended.
pub async fn server(tls: impl Into<LinkTls>, serve: impl FnMut(MuxStream)) -> String {
    let link = start(tls.into(), false, SERVER_LIMIT);
    // However this ends (the task may be aborted), the socket closes with it.
    let _end = EndOnDrop(link.clone());
    link.read_loop(serve).await
}

/// Reads from `tcp` without waiting; returns the bytes read (0: the peer closed) and whether
/// they drained the socket. TCP hands over everything it holds up to the buffer's
/// size, so a read that does not fill `buf` has drained the socket: the socket's readiness is
/// cleared then, as tokio's own reads do, and the next read waits for the next segment
/// instead of costing a system call that finds nothing (one per wake-up of the link's
/// reader). A segment that arrives after the read marks the socket ready again.
pub(crate) fn read_some(tcp: &TcpStream, buf: &mut [u8]) -> io::Result<(usize, bool)> {
    let mut short = None;
    let r = tcp.try_io(tokio::io::Interest::READABLE, || {
        let n = (&*socket2::SockRef::from(tcp)).read(&mut *buf)?;
        if n > 0 && n < buf.len() {
            short = Some(n);
            // Tells tokio the socket is drained.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (r, short) {
        (_, Some(n)) => Ok((n, true)),
        (r, None) => r.map(|n| (n, false)),
    }
}

/// Ends a link when dropped.
struct EndOnDrop(Arc<Link>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.end_now("the link's task stopped".into());
    }
}

/// One stream of a link.
#[derive(Debug)]
pub struct MuxStream {
    link: Arc<Link>,
    id: u32,
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "the stream was reset")
}

fn link_ended(why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        format!("link ended: {why}"),
    )
}

impl AsyncRead for MuxStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let id = self.id;
        self.link.locked(|link, st, wake| {
            let ended = st.ended.is_some();
            let Some(mut slot) = st.streams.get_mut(&id) else {
                return Poll::Ready(Err(gone()));
            };
            if !slot.opened && !ended {
                // Read before any write: the peer must hear of the stream to answer on it.
                slot.opened = true;
                link.send(st, header(Kind::Open, id, 0), &[], wake);
                let Some(s) = st.streams.get_mut(&id) else {
                    return Poll::Ready(Err(gone()));
                };
                slot = s;
            }
            if !slot.recv.is_empty() {
                let n = slot.recv.len().min(buf.remaining());
                let (a, b) = slot.recv.as_slices();
                let from_a = n.min(a.len());
                buf.put_slice(&a[..from_a]);
                buf.put_slice(&b[..n - from_a]);
                slot.recv.drain(..n);
                slot.consumed += n as u32;
                if slot.recv.is_empty() && slot.recv.capacity() > 64 * 1024 {
                    slot.recv.shrink_to(0);
                }
                if slot.consumed >= slot.window / 2 && !slot.recv_fin && !ended {
                    let mut more = slot.consumed;
                    if slot.last_credit.elapsed() < GROW_WITHIN && slot.window < MAX_WINDOW {
                        let grow = slot.window.min(MAX_WINDOW - slot.window);
                        if u64::from(grow) <= st.budget {
                            st.budget -= u64::from(grow);
                            slot.window += grow;
                            more += grow;
                        }
                    }
                    slot.granted += more;
                    slot.consumed = 0;
                    slot.last_credit = Instant::now();
                    link.send(st, header(Kind::Credit, id, more), &[], wake);
                }
                Poll::Ready(Ok(()))
            } else if slot.reset {
                Poll::Ready(Err(gone()))
            } else if slot.recv_fin {
                Poll::Ready(Ok(()))
            } else if let Some(why) = &st.ended {
                Poll::Ready(Err(link_ended(why)))
            } else {
                slot.reader = Some(cx.waker().clone());
                Poll::Pending
            }
        })
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let id = self.id;
        self.link.locked(|link, st, wake| {
            if let Some(why) = &st.ended {
                return Poll::Ready(Err(link_ended(why)));
            }
            if st.closing {
                return Poll::Ready(Err(link_ended("closed by this portal")));
            }
            let queued = st.queued;
            let Some(slot) = st.streams.get_mut(&id) else {
                return Poll::Ready(Err(gone()));
            };
            if slot.reset {
                return Poll::Ready(Err(gone()));
            }
            if slot.fin_sent {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the stream's write side is shut down",
                )));
            }
            if buf.is_empty() {
                return Poll::Ready(Ok(0));
            }
            let n = buf
                .len()
                .min(slot.credit as usize)
                .min(MAX_PAYLOAD as usize);
            if n == 0 {
                slot.writer = Some(cx.waker().clone());
                Poll::Pending
            } else if queued > QUEUE_LIMIT {
                st.blocked.push(cx.waker().clone());
                Poll::Pending
            } else {
                slot.credit -= n as u32;
                let kind = if slot.opened { Kind::Data } else { Kind::Open };
                slot.opened = true;
                link.send(st, header(kind, id, n as u32), &buf[..n], wake);
                Poll::Ready(Ok(n))
            }
        })
    }

    /// Frames go to the socket as they are written (or to the link's writer task when the
    /// socket is full): there is nothing to flush.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Sends FIN: no more data from this side; the read side stays open.
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let id = self.id;
        self.link.locked(|link, st, wake| {
            if let Some(why) = &st.ended {
                return Poll::Ready(Err(link_ended(why)));
            }
            let Some(slot) = st.streams.get_mut(&id) else {
                return Poll::Ready(Err(gone()));
            };
            if slot.reset {
                return Poll::Ready(Err(gone()));
            }
            if !slot.fin_sent {
                slot.fin_sent = true;
                if !slot.opened {
                    slot.opened = true;
                    link.send(st, header(Kind::Open, id, 0), &[], wake);
                }
                link.send(st, header(Kind::Fin, id, 0), &[], wake);
            }
            Poll::Ready(Ok(()))
        })
    }
}

impl Drop for MuxStream {
    /// Forgets the stream; unless both sides had finished it, the peer gets RST.
    fn drop(&mut self) {
        let id = self.id;
        self.link.locked(|link, st, wake| {
            let Some(slot) = st.streams.remove(&id) else {
                return;
            };
            st.budget += u64::from(slot.window - INITIAL_WINDOW);
            let finished = slot.fin_sent && slot.recv_fin;
            if slot.opened && !finished && !slot.reset {
                link.send(st, header(Kind::Reset, id, 0), &[], wake);
            }
        });
    }
}
