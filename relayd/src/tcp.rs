//! Forwarding a paired TCP allocation, by one of three paths (`tcp_fast_path`):
//!
//! - `copy`: a thread per direction, blocked in `read(2)` until bytes come and then writing
//!   them on, each byte copied through relayd's memory. Not tokio's `copy_bidirectional`:
//!   a segment then wakes exactly the thread that moves it, with no `epoll_wait` and no
//!   task scheduling in between, which took 2–6 % off the tunnel's round trip and a quarter
//!   off its p99 (bench/README.md, "The relay's copy on threads"). A thread blocked in
//!   `read` does not notice that the future was dropped: [`ShutOnDrop`] ends it;
//! - `splice`: splice(2) from one socket into a pipe and from the pipe into the other
//!   socket, per direction, driven by tokio readiness: the bytes never enter userspace;
//! - `sockmap`: both sockets join the SOCKHASH of `relayd-ebpf/tcp_splice.c`, whose stream
//!   verdict program hands each segment to the other socket inside the kernel. relayd still
//!   watches each socket for end of stream, because the kernel does not propagate a FIN, and
//!   forwards bytes that arrived before the sockets joined the map (the kernel would leave
//!   them queued until the next segment came).
//!
//! The sockmap path has no backpressure: the kernel takes segments off the receiving socket
//! as they arrive and queues them for the other socket's sender without limit (about 200 MB
//! for one allocation was seen in the 256 MiB test). Bounding it means detaching a socket
//! whose peer lags and re-joining it later with the same ordering care as the first join;
//! not done yet, so the mode is for trusted portals only (README).
//!
//! Every path sends the relay's READY to both sides first, from userspace, so READY always
//! precedes what the peer sent.

use std::io;
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use netport_proto::relay::READY;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;

use crate::config::TcpFastPath;

/// A socket of a sockmap pair, off tokio's reactor (non-blocking).
type StdStream = std::net::TcpStream;

/// The path chosen at start-up: the configured one, or `Copy` when the sockmap program could
/// not load.
#[derive(Debug, Clone)]
pub enum TcpPath {
    Copy,
    Splice,
    Sockmap(Arc<Sockmap>),
}

impl TcpPath {
    /// Chooses the path for `wanted`; one log line either way.
    pub fn start(wanted: TcpFastPath) -> TcpPath {
        match wanted {
            TcpFastPath::Copy => {
                tracing::info!(
                    path = "tcp-userspace",
                    "TCP allocations forwarded by a copy loop (tcp_fast_path = \"copy\")"
                );
                TcpPath::Copy
            }
            TcpFastPath::Splice => {
                tracing::info!(
                    path = "tcp-splice",
                    "TCP allocations forwarded with splice(2) (tcp_fast_path = \"splice\")"
                );
                TcpPath::Splice
            }
            TcpFastPath::Sockmap => match Sockmap::load() {
                Ok(s) => {
                    tracing::info!(
                        path = "tcp-sockmap",
                        "TCP fast path loaded: the kernel's sockmap forwards paired TCP allocations"
                    );
                    TcpPath::Sockmap(Arc::new(s))
                }
                Err(why) => {
                    tracing::warn!(
                        path = "tcp-userspace",
                        "TCP sockmap fast path unavailable, forwarding TCP allocations by a copy loop: {why}"
                    );
                    TcpPath::Copy
                }
            },
        }
    }

    /// The metrics and log label of allocations forwarded this way.
    pub fn label(&self) -> &'static str {
        match self {
            TcpPath::Copy => "tcp-userspace",
            TcpPath::Splice => "tcp-splice",
            TcpPath::Sockmap(_) => "tcp-sockmap",
        }
    }
}

/// What one paired allocation carried, each way, and why it ended.
#[derive(Debug)]
pub struct Outcome {
    pub a_to_b: u64,
    pub b_to_a: u64,
    pub reason: String,
}

/// Sends READY to both sides and forwards until both directions have ended.
pub async fn forward(path: &TcpPath, alloc_id: u64, mut a: TcpStream, mut b: TcpStream) -> Outcome {
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    if a.write_all(READY).await.is_err() || b.write_all(READY).await.is_err() {
        return Outcome {
            a_to_b: 0,
            b_to_a: 0,
            reason: "peer left before ready".into(),
        };
    }
    let result = match path {
        TcpPath::Sockmap(map) => sockmap(map, alloc_id, a, b).await,
        TcpPath::Splice => splice(&a, &b).await,
        TcpPath::Copy => copy(alloc_id, a, b).await,
    };
    match result {
        Ok((a_to_b, b_to_a)) => Outcome {
            a_to_b,
            b_to_a,
            reason: "closed".into(),
        },
        Err(e) => Outcome {
            a_to_b: 0,
            b_to_a: 0,
            reason: format!("error: {e}"),
        },
    }
}

/// Forwards through the sockmap; a pair that cannot join it is copied instead.
async fn sockmap(
    map: &Sockmap,
    alloc_id: u64,
    a: TcpStream,
    b: TcpStream,
) -> io::Result<(u64, u64)> {
    // The hello was read from the first segment, and what else that segment carried is still
    // queued: read it all before joining. A socket joining the map hands its queue to the
    // verdict program whole, the hello already read included (seen on Linux 6.18).
    let (before_ab, before_ba) = tokio::try_join!(drain(&a, &b), drain(&b, &a))
        .map_err(|e| context("forwarding the bytes that came with the hello", e))?;
    let (ab, ba) = match map.join(&a, &b) {
        Ok(joined) => {
            // Off tokio's reactor: every redirected segment still signals the sockets'
            // readers, and tokio's epoll would wake for each one, for nothing.
            let (a, b) = (a.into_std()?, b.into_std()?);
            joined.forward(&a, &b, (before_ab, before_ba)).await?
        }
        Err(e) => {
            tracing::warn!(
                alloc_id,
                "cannot join the sockmap, forwarding this allocation by a copy loop: {e:#}"
            );
            copy(alloc_id, a, b).await?
        }
    };
    Ok((before_ab + ab, before_ba + ba))
}

/// Bytes a copy thread moves per `read`.
const COPY_BUF: usize = 64 * 1024;

/// A copy thread's stack: the loop keeps its buffer on the heap and calls nothing deep.
const COPY_STACK: usize = 128 * 1024;

/// Forwards a pair with a thread per direction, until both directions have ended or one
/// has failed. Dropping the future (the allocation released or relayd shutting down) shuts
/// both sockets down, which ends both threads. When the threads cannot start (a task limit
/// reached), the pair is forwarded on relayd's runtime instead, as before, and a line says
/// why.
async fn copy(alloc_id: u64, mut a: TcpStream, mut b: TcpStream) -> io::Result<(u64, u64)> {
    let threads = match CopyThreads::start() {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(
                alloc_id,
                "no copy threads for this allocation, forwarding it on relayd's runtime instead: {e}"
            );
            return tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, COPY_BUF, COPY_BUF)
                .await;
        }
    };
    // Off tokio's reactor: the threads block in the kernel instead.
    let (a, b) = (a.into_std()?, b.into_std()?);
    a.set_nonblocking(false)?;
    b.set_nonblocking(false)?;
    let pair = ShutOnDrop(Arc::new([a, b]));
    let (ab, ba) = tokio::join!(threads.ab.run(&pair.0), threads.ba.run(&pair.0));
    drop(pair);
    Ok((ab?, ba?))
}

/// A pair's two sockets, shared with its copy threads; shuts both down, both ways, when
/// dropped, so that a thread blocked on either returns.
struct ShutOnDrop(Arc<[StdStream; 2]>);

impl Drop for ShutOnDrop {
    fn drop(&mut self) {
        for s in self.0.iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// A pair's two copy threads, started before they are given the sockets, so that a pair
/// whose second thread cannot start still has its sockets to forward another way.
struct CopyThreads {
    ab: CopyThread,
    ba: CopyThread,
}

impl CopyThreads {
    fn start() -> io::Result<CopyThreads> {
        // If the second cannot start, dropping the first's sender ends the first.
        let ab = CopyThread::start("relay-copy-ab", 0)?;
        let ba = CopyThread::start("relay-copy-ba", 1)?;
        Ok(CopyThreads { ab, ba })
    }
}

/// A started thread that waits for its pair, then copies one of its sockets to the other.
struct CopyThread {
    give: std::sync::mpsc::SyncSender<Arc<[StdStream; 2]>>,
    result: tokio::sync::oneshot::Receiver<io::Result<u64>>,
}

impl CopyThread {
    /// A thread that will copy socket `from` (0 or 1) of its pair to the other one; it ends
    /// without a result if it is never given the pair.
    fn start(name: &str, from: usize) -> io::Result<CopyThread> {
        let (give, given) = std::sync::mpsc::sync_channel::<Arc<[StdStream; 2]>>(1);
        let (tx, result) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(name.into())
            .stack_size(COPY_STACK)
            .spawn(move || {
                if let Ok(pair) = given.recv() {
                    let _ = tx.send(copy_until_end(&pair[from], &pair[1 - from]));
                }
            })
            .map_err(|e| context("starting a copy thread", e))?;
        Ok(CopyThread { give, result })
    }

    /// Hands the thread its pair and waits for the bytes it copied.
    async fn run(self, pair: &Arc<[StdStream; 2]>) -> io::Result<u64> {
        let lost = || io::Error::other("a copy thread ended without a result");
        self.give.send(pair.clone()).map_err(|_| lost())?;
        self.result.await.map_err(|_| lost())?
    }
}

/// Copies `from` to `to` with blocking I/O until `from` ends, then ends `to`'s write side,
/// so a half-close crosses as one; returns the bytes copied. On an error both sockets are
/// shut down, so that a thread copying the other direction ends too (as when either side of
/// `copy_bidirectional` fails). relayd's copy threads run one per direction, and so does
/// the benchmark's plain forwarder (`netport-bench`'s floor of the tunnel's shape).
pub fn copy_until_end(from: &StdStream, to: &StdStream) -> io::Result<u64> {
    use std::io::{Read, Write};
    let mut buf = vec![0u8; COPY_BUF];
    let mut total = 0u64;
    let result = loop {
        match (&mut &*from).read(&mut buf) {
            Ok(0) => break Ok(total),
            Ok(n) => match (&mut &*to).write_all(&buf[..n]) {
                Ok(()) => total += n as u64,
                Err(e) => break Err(e),
            },
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    match &result {
        Ok(_) => shut_write(to),
        Err(_) => {
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
        }
    }
    result
}

/// Bytes moved by one splice(2) call at most.
const SPLICE_CHUNK: usize = 1 << 20;

async fn splice(a: &TcpStream, b: &TcpStream) -> io::Result<(u64, u64)> {
    tokio::try_join!(splice_one_way(a, b), splice_one_way(b, a))
}

/// Moves everything `from` sends to `to` through a pipe, then shuts `to` down for writing.
async fn splice_one_way(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags};
    let (pipe_out, pipe_in) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    // A bigger pipe means fewer wake-ups per megabyte; the default (64 KiB) still works.
    let _ = nix::fcntl::fcntl(&pipe_in, FcntlArg::F_SETPIPE_SZ(SPLICE_CHUNK as i32));
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    let mut total = 0u64;
    loop {
        from.readable().await?;
        // The pipe is empty here, so EAGAIN can only mean the socket has nothing to read.
        let n = match from.try_io(Interest::READABLE, || {
            nix::fcntl::splice(from, None, &pipe_in, None, SPLICE_CHUNK, flags)
                .map_err(io::Error::from)
        }) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                nix::fcntl::splice(&pipe_out, None, to, None, left, flags).map_err(io::Error::from)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
    }
    shut_write(to);
    Ok(total)
}

/// Writes all of `buf` to a shared stream (tokio's `write_all` needs `&mut`).
async fn write_all(to: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        to.writable().await?;
        match to.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends a FIN. An error means the connection is gone, which the other direction sees.
fn shut_write(s: &impl AsFd) {
    let _ = socket2::SockRef::from(s).shutdown(Shutdown::Write);
}

/// TCP_INFO fields the sockmap path reads: data bytes the peer acknowledged, and the state.
#[derive(Debug, Clone, Copy)]
struct TcpInfo {
    bytes_acked: u64,
    state: u8,
}

const TCP_ESTABLISHED: u8 = 1;
const TCP_CLOSE_WAIT: u8 = 8;

/// getsockopt(TCP_INFO): nix, socket2 and rustix wrap many options but not this one.
#[allow(unsafe_code)] // one getsockopt into a struct of plain integers, length checked
fn tcp_info(s: &impl AsFd) -> io::Result<TcpInfo> {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info holds only integers, for which all-zero bytes are a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the pointer and length describe `info`, which outlives the call; the kernel
    // writes at most `len` bytes and reports how many it wrote.
    let rc = unsafe {
        libc::getsockopt(
            s.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // tcpi_bytes_acked arrived in Linux 4.1: an older kernel returns a shorter struct.
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + 8;
    if (len as usize) < needed {
        return Err(io::Error::other(
            "TCP_INFO has no tcpi_bytes_acked (Linux 4.1 or later needed)",
        ));
    }
    Ok(TcpInfo {
        bytes_acked: info.tcpi_bytes_acked,
        state: info.tcpi_state,
    })
}

/// The socket cookie, the sockmap's key.
#[cfg_attr(not(netport_ebpf), allow(dead_code))] // only the loaded program needs it
fn cookie(s: &impl AsFd) -> io::Result<u64> {
    socket2::SockRef::from(s).cookie()
}

/// A pair of sockets in the sockmap; leaves it when dropped.
struct Joined<'m> {
    map: &'m Sockmap,
    a: u64,
    b: u64,
}

impl Drop for Joined<'_> {
    fn drop(&mut self) {
        self.map.leave(self.a, self.b);
    }
}

impl Joined<'_> {
    /// `before`: the bytes relayd forwarded a to b and b to a before the join.
    async fn forward(
        &self,
        a: &StdStream,
        b: &StdStream,
        before: (u64, u64),
    ) -> io::Result<(u64, u64)> {
        let (early_ab, early_ba) = tokio::try_join!(early(a, b), early(b, a))
            .map_err(|e| context("forwarding bytes queued before the join", e))?;
        let ready = READY.len() as u64;
        let (ab, ba) = tokio::try_join!(
            self.one_way(a, self.a, b, early_ab, ready + before.0),
            self.one_way(b, self.b, a, early_ba, ready + before.1),
        )?;
        let (kernel_ab, kernel_ba) = (self.map.redirected(self.a), self.map.redirected(self.b));
        tracing::info!(
            kernel_a_to_b = kernel_ab,
            kernel_b_to_a = kernel_ba,
            // Everything relayd forwarded itself: before the join too.
            relayd_a_to_b = before.0 + early_ab + ab,
            relayd_b_to_a = before.1 + early_ba + ba,
            "sockmap pair ended: bytes redirected by the kernel and forwarded by relayd"
        );
        Ok((early_ab + ab + kernel_ab, early_ba + ba + kernel_ba))
    }

    /// Waits for the end of `from`'s stream, forwarding what the kernel passes up instead of
    /// redirecting (nothing, normally), then sends `to` a FIN once `to` has sent everything
    /// redirected to it. `early` and `control` are what relayd wrote on `to` before (early
    /// bytes; READY and bytes forwarded before the join). Returns the bytes forwarded here.
    async fn one_way(
        &self,
        from: &StdStream,
        from_cookie: u64,
        to: &StdStream,
        early: u64,
        control: u64,
    ) -> io::Result<u64> {
        // Redirected segments still wake a socket's readers, though there is nothing to
        // read: watching for the end of the stream alone keeps relayd asleep meanwhile.
        self.map
            .watcher
            .end_of_stream(from, from_cookie)
            .await
            .map_err(|e| context("waiting for the end of the stream", e))?;
        // The FIN is seen before the program has had the last segments: wait until the
        // queue is empty. Whatever is still there after [`EOS_WAIT`], the kernel is not
        // going to hand over (nothing else will arrive to make it): forward it from here.
        let passed = if settled(from, EOS_WAIT)
            .await
            .map_err(|e| context("waiting for the last segments", e))?
        {
            0
        } else {
            drain_std(from, to)
                .await
                .map_err(|e| context("forwarding what the kernel left queued", e))?
        };
        // The kernel queues redirected segments on `to` and sends them from a work queue, so
        // a FIN sent now could overtake them (and the kernel then drops them): wait until
        // `to`'s peer has acknowledged every byte the relay put on `to`.
        let expected = control + early + passed + self.map.redirected(from_cookie);
        let mut pause = Duration::from_micros(200);
        loop {
            let info = tcp_info(to).map_err(|e| context("TCP_INFO", e))?;
            if info.bytes_acked >= expected {
                break;
            }
            if info.state != TCP_ESTABLISHED && info.state != TCP_CLOSE_WAIT {
                return Err(io::Error::other(
                    "the other side closed before the relay delivered everything",
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
        shut_write(to);
        Ok(passed)
    }
}

/// `e` with what relayd was doing.
fn context(doing: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{doing}: {e}"))
}

/// Bytes that reached `from` between its hello and its joining the map wait in its receive
/// queue, where the verdict program never sees them until the next segment arrives: the
/// kernel then redirects the whole queue, in order. A sender that keeps sending gets them
/// flushed that way within [`EARLY_WAIT`]; a sender that waits for an answer (a TLS
/// ClientHello) does not, and those bytes are forwarded from here.
async fn early(from: &StdStream, to: &StdStream) -> io::Result<u64> {
    if settled(from, EARLY_WAIT).await? {
        return Ok(0);
    }
    drain_std(from, to).await
}

/// Whether `from`'s receive queue empties within `within` (the kernel handing its segments
/// to the program); `false` if bytes are still queued then.
async fn settled(from: &StdStream, within: Duration) -> io::Result<bool> {
    let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    let waited = tokio::time::Instant::now();
    loop {
        match socket2::SockRef::from(from).peek(&mut probe) {
            Ok(0) => return Ok(true),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        if waited.elapsed() >= within {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// How long bytes queued at the end of a stream may take to reach the program.
const EOS_WAIT: Duration = Duration::from_secs(1);

/// How long queued early bytes may wait for the kernel to flush them.
const EARLY_WAIT: Duration = Duration::from_millis(5);

/// Wakes a task when a socket's stream ends (EPOLLRDHUP), errs or hangs up, and for nothing
/// else: one thread and one epoll set for all sockmap pairs.
struct Watcher {
    epoll: nix::sys::epoll::Epoll,
    waiting: std::sync::Mutex<std::collections::HashMap<u64, tokio::sync::oneshot::Sender<()>>>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher").finish_non_exhaustive()
    }
}

impl Watcher {
    #[cfg_attr(not(netport_ebpf), allow(dead_code))] // only the loaded program needs it
    fn start() -> io::Result<Arc<Watcher>> {
        use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollTimeout};
        let w = Arc::new(Watcher {
            epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?,
            waiting: Default::default(),
        });
        let this = w.clone();
        std::thread::Builder::new()
            .name("sockmap-eos".into())
            .spawn(move || {
                let mut events = [EpollEvent::empty(); 64];
                loop {
                    let n = match this.epoll.wait(&mut events, EpollTimeout::NONE) {
                        Ok(n) => n,
                        Err(nix::errno::Errno::EINTR) => continue,
                        Err(e) => {
                            tracing::error!("the sockmap end-of-stream watch failed: {e}");
                            return;
                        }
                    };
                    let mut waiting = this.waiting.lock().unwrap_or_else(|p| p.into_inner());
                    for ev in &events[..n] {
                        if let Some(tx) = waiting.remove(&ev.data()) {
                            let _ = tx.send(());
                        }
                    }
                }
            })?;
        Ok(w)
    }

    /// Returns once `s` has reached the end of its stream (or failed).
    async fn end_of_stream(&self, s: &StdStream, key: u64) -> io::Result<()> {
        use nix::sys::epoll::{EpollEvent, EpollFlags};
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, tx);
        // One-shot: after its event the socket stays in the set, disabled, until deleted.
        let flags = EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLONESHOT;
        if let Err(e) = self.epoll.add(s, EpollEvent::new(flags, key)) {
            self.forget(s, key);
            return Err(e.into());
        }
        // Deregisters on every way out, cancellation included.
        struct Registered<'w, 's>(&'w Watcher, &'s StdStream, u64);
        impl Drop for Registered<'_, '_> {
            fn drop(&mut self) {
                self.0.forget(self.1, self.2);
            }
        }
        let _registered = Registered(self, s, key);
        let _ = rx.await;
        Ok(())
    }

    fn forget(&self, s: &StdStream, key: u64) {
        let _ = self.epoll.delete(s);
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
    }
}

/// Forwards whatever `from` (a non-blocking socket off tokio's reactor) has queued right now.
async fn drain_std(from: &StdStream, to: &StdStream) -> io::Result<u64> {
    use std::io::Read;
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match (&mut &*from).read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => {
                write_all_std(to, &buf[..n]).await?;
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(total),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes all of `buf` to a non-blocking socket off tokio's reactor. Only the rare bytes
/// the kernel does not redirect take this way, so a full send buffer is waited out by
/// polling.
async fn write_all_std(to: &StdStream, mut buf: &[u8]) -> io::Result<()> {
    use std::io::Write;
    while !buf.is_empty() {
        match (&mut &*to).write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Forwards whatever `from` has queued right now.
async fn drain(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match from.try_read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => {
                write_all(to, &buf[..n]).await?;
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(total),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(netport_ebpf)]
mod imp {
    use std::sync::Mutex;

    use anyhow::{Context, Result};
    use aya::maps::{HashMap, MapData, SockHash};
    use aya::programs::SkSkb;
    use std::os::fd::AsFd;

    struct Loaded {
        // Holds the program and its attachment to the map.
        _ebpf: aya::Ebpf,
        socks: SockHash<MapData, u64>,
        peers: SockHash<MapData, u64>,
        peer: HashMap<MapData, u64, u64>,
        bytes: HashMap<MapData, u64, u64>,
    }

    /// The loaded sockmap program and its maps.
    pub struct Sockmap {
        inner: Mutex<Loaded>,
        pub(super) watcher: std::sync::Arc<super::Watcher>,
    }

    impl std::fmt::Debug for Sockmap {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Sockmap").finish_non_exhaustive()
        }
    }

    static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcp_splice.o"));

    impl Sockmap {
        /// Loads the program and attaches it to its map, or says why it cannot.
        pub fn load() -> Result<Sockmap, String> {
            Self::try_load().map_err(|e| format!("{e:#}"))
        }

        fn try_load() -> Result<Sockmap> {
            let mut ebpf = aya::Ebpf::load(OBJECT).context(
                "loading the sockmap program needs CAP_BPF and CAP_NET_ADMIN (run relayd as root or grant both capabilities)",
            )?;
            let socks: SockHash<MapData, u64> =
                SockHash::try_from(ebpf.take_map("np_socks").context("no map np_socks")?)
                    .context("np_socks")?;
            let peers: SockHash<MapData, u64> =
                SockHash::try_from(ebpf.take_map("np_peers").context("no map np_peers")?)
                    .context("np_peers")?;
            let peer = HashMap::try_from(ebpf.take_map("np_peer").context("no map np_peer")?)
                .context("np_peer")?;
            let bytes = HashMap::try_from(ebpf.take_map("np_bytes").context("no map np_bytes")?)
                .context("np_bytes")?;
            let prog: &mut SkSkb = ebpf
                .program_mut("np_tcp_splice")
                .context("the object has no program np_tcp_splice")?
                .try_into()
                .context("np_tcp_splice is not an sk_skb program")?;
            prog.load().context(
                "the kernel refused the sockmap program (needs CAP_BPF and CAP_NET_ADMIN; the verifier log follows)",
            )?;
            prog.attach(socks.fd())
                .context("attaching the stream verdict program to np_socks")?;
            let watcher = super::Watcher::start().context("starting the end-of-stream watch")?;
            Ok(Sockmap {
                watcher,
                inner: Mutex::new(Loaded {
                    _ebpf: ebpf,
                    socks,
                    peers,
                    peer,
                    bytes,
                }),
            })
        }

        fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
            self.inner.lock().unwrap_or_else(|p| p.into_inner())
        }

        /// Pairs `a` and `b` in the maps, in the order the program's comment explains: each
        /// socket is attached to the program only once its peer is a redirect target.
        pub(super) fn join(&self, a: &impl AsFd, b: &impl AsFd) -> Result<super::Joined<'_>> {
            let ca = super::cookie(a).context("SO_COOKIE")?;
            let cb = super::cookie(b).context("SO_COOKIE")?;
            let joined = super::Joined {
                map: self,
                a: ca,
                b: cb,
            };
            let mut l = self.lock();
            l.bytes.insert(ca, 0, 0).context("adding a byte counter")?;
            l.bytes.insert(cb, 0, 0).context("adding a byte counter")?;
            l.peer.insert(ca, cb, 0).context("adding to np_peer")?;
            l.peer.insert(cb, ca, 0).context("adding to np_peer")?;
            l.peers
                .insert(ca, a.as_fd(), 0)
                .context("adding a socket to np_peers")?;
            l.peers
                .insert(cb, b.as_fd(), 0)
                .context("adding a socket to np_peers")?;
            l.socks
                .insert(ca, a.as_fd(), 0)
                .context("adding a socket to np_socks")?;
            l.socks
                .insert(cb, b.as_fd(), 0)
                .context("adding a socket to np_socks")?;
            drop(l);
            Ok(joined)
        }

        /// Bytes the kernel redirected from the socket with this cookie so far.
        pub(super) fn redirected(&self, cookie: u64) -> u64 {
            self.lock().bytes.get(&cookie, 0).unwrap_or(0)
        }

        pub(super) fn leave(&self, a: u64, b: u64) {
            let mut l = self.lock();
            for c in [a, b] {
                let _ = l.socks.remove(&c);
                let _ = l.peers.remove(&c);
                let _ = l.peer.remove(&c);
                let _ = l.bytes.remove(&c);
            }
        }
    }
}

#[cfg(not(netport_ebpf))]
mod imp {
    use anyhow::Result;
    use std::os::fd::AsFd;

    /// Stands in for the sockmap program in a relayd built without it: never loads.
    #[derive(Debug)]
    pub struct Sockmap {
        pub(super) watcher: std::sync::Arc<super::Watcher>,
    }

    impl Sockmap {
        pub fn load() -> Result<Sockmap, String> {
            Err("this relayd was built without the sockmap program (no clang at build time, or the `xdp` feature off)".into())
        }

        pub(super) fn join(&self, _: &impl AsFd, _: &impl AsFd) -> Result<super::Joined<'_>> {
            anyhow::bail!("no sockmap")
        }

        pub(super) fn redirected(&self, _: u64) -> u64 {
            0
        }

        pub(super) fn leave(&self, _: u64, _: u64) {}
    }
}

pub use imp::Sockmap;
