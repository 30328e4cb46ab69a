//! Copying a connection both ways, with buffers that grow only for streams that move data.
//!
//! `tokio::io::copy_bidirectional_with_sizes` allocates both of its buffers when the copy
//! starts, so every idle connection a portal holds costs two full buffers. Most connections
//! through a tunnel are small or idle (a held SSH session, a database pool), so here each
//! direction starts with a small buffer and doubles it whenever a read fills it, up to
//! [`MAX_BUF`]: a bulk transfer reaches the large buffer after a few reads, an idle one
//! never leaves the small one.

use std::io;

use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// The buffer each direction starts with.
pub(crate) const START_BUF: usize = 1024;
/// The largest a buffer grows.
const MAX_BUF: usize = 64 * 1024;

/// Copies `a` to `b` and `b` to `a` until both directions end, as
/// `tokio::io::copy_bidirectional` does: the end of one side's data shuts down the other
/// side's write half (half-close) and the other direction goes on; an error in either
/// direction ends both. Returns the bytes copied from `a` to `b` and from `b` to `a`.
///
/// `lead` (which may be empty) goes to `a` ahead of everything from `b`, in the same write
/// as `b`'s first bytes when `b` says something within `wait`, alone when it does not (or
/// when it ends first). The count returned does not include it.
pub async fn bidirectional<A, B>(a: A, b: B, lead: &[u8], wait: Duration) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite,
    B: AsyncRead + AsyncWrite,
{
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    tokio::try_join!(one_way(ar, bw), led(br, aw, lead, wait))
}

/// [`one_way`] with `lead` first, as [`bidirectional`] sends it.
async fn led<R, W>(mut r: R, mut w: W, lead: &[u8], wait: Duration) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if lead.is_empty() {
        return one_way(r, w).await;
    }
    let mut buf = vec![0u8; lead.len() + START_BUF];
    buf[..lead.len()].copy_from_slice(lead);
    // A read that times out has taken nothing (tokio's reads are cancel-safe).
    let first = tokio::time::timeout(wait, r.read(&mut buf[lead.len()..]))
        .await
        .unwrap_or(Ok(0))?;
    w.write_all(&buf[..lead.len() + first]).await?;
    w.flush().await?;
    // From here on, the buffer one direction starts with (it grows as one_way's does).
    buf.truncate(START_BUF);
    Ok(first as u64 + copy_with(r, w, buf).await?)
}

/// Copies `r` to `w` until `r` ends, then shuts `w` down (one direction of
/// [`bidirectional`]); returns the bytes copied.
pub(crate) async fn one_way<R, W>(r: R, w: W) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    copy_with(r, w, vec![0u8; START_BUF]).await
}

/// [`one_way`], with `buf` as its buffer (which grows from its size).
async fn copy_with<R, W>(mut r: R, mut w: W, mut buf: Vec<u8>) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    let mut unflushed = false;
    loop {
        let n = read_or_flush(&mut r, &mut w, &mut buf, &mut unflushed).await?;
        if n == 0 {
            w.shutdown().await?;
            return Ok(total);
        }
        w.write_all(&buf[..n]).await?;
        unflushed = true;
        total += n as u64;
        if n == buf.len() && buf.len() < MAX_BUF {
            buf.resize(buf.len() * 2, 0);
        }
    }
}

/// Reads from `r` into `buf`. A writer may hold bytes back until flushed (a multiplexed
/// stream, TLS): while there is nothing to read yet, `w` is flushed, so the peer sees every
/// byte before this side waits, and a bulk transfer is not flushed after every buffer.
///
/// Every poll here gets the task's own waker. A multiplexed stream may keep one waker for
/// its read and write halves' turn at the link (yamux, which links used before
/// `portal::mux`, does: window updates go out from `poll_read`), so a read polled with any
/// other waker (a "would it block?" probe) can take the place of the write half's, and the
/// write half, once the link has room, is never woken.
async fn read_or_flush<R, W>(
    r: &mut R,
    w: &mut W,
    buf: &mut [u8],
    unflushed: &mut bool,
) -> io::Result<usize>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    std::future::poll_fn(|cx| {
        let mut rb = ReadBuf::new(buf);
        match Pin::new(&mut *r).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => return Poll::Ready(Ok(rb.filled().len())),
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        if *unflushed {
            match Pin::new(&mut *w).poll_flush(cx) {
                Poll::Ready(Ok(())) => *unflushed = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};
    use std::time::Duration;

    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};

    /// A duplex end that records the size of each write it is given.
    struct Recording {
        inner: DuplexStream,
        writes: Arc<Mutex<Vec<usize>>>,
    }

    impl AsyncRead for Recording {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Recording {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let this = self.get_mut();
            let r = Pin::new(&mut this.inner).poll_write(cx, buf);
            if let Poll::Ready(Ok(n)) = r {
                this.writes.lock().map(|mut w| w.push(n)).ok();
            }
            r
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
        }
    }

    /// A copy between a recorded link end and a service end, with a lead of `b"!"`; returns
    /// the far ends (link side, service side), the recorded writes and the copy.
    #[allow(clippy::type_complexity)]
    fn led_copy(
        wait: Duration,
    ) -> (
        DuplexStream,
        DuplexStream,
        Arc<Mutex<Vec<usize>>>,
        tokio::task::JoinHandle<std::io::Result<(u64, u64)>>,
    ) {
        let (link, a) = tokio::io::duplex(4096);
        let (b, service) = tokio::io::duplex(4096);
        let writes = Arc::new(Mutex::new(Vec::new()));
        let a = Recording {
            inner: a,
            writes: writes.clone(),
        };
        let copy = tokio::spawn(super::bidirectional(a, b, b"!", wait));
        (link, service, writes, copy)
    }

    fn recorded(w: &Arc<Mutex<Vec<usize>>>) -> Vec<usize> {
        w.lock().map(|w| w.clone()).unwrap_or_default()
    }

    #[tokio::test]
    async fn the_lead_goes_with_the_first_reply_in_one_write() -> std::io::Result<()> {
        let (mut link, mut service, writes, copy) = led_copy(Duration::from_secs(30));
        link.write_all(b"ping").await?;
        let mut got = [0u8; 4];
        service.read_exact(&mut got).await?;
        assert_eq!(&got, b"ping");
        service.write_all(b"pong").await?;
        let mut back = [0u8; 5];
        link.read_exact(&mut back).await?;
        assert_eq!(&back, b"!pong");
        assert_eq!(
            recorded(&writes),
            [5],
            "the lead and the reply in one write"
        );
        drop(link);
        drop(service);
        let counted = copy.await.map_err(std::io::Error::other)??;
        assert_eq!(counted, (4, 4), "the lead is not counted");
        Ok(())
    }

    #[tokio::test]
    async fn the_lead_goes_alone_when_the_service_is_silent_or_ends() -> std::io::Result<()> {
        // Silent: the lead arrives after the wait, long before the service says anything.
        let (mut link, _service, writes, _copy) = led_copy(Duration::from_millis(20));
        let mut lead = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(10), link.read_exact(&mut lead))
            .await
            .map_err(std::io::Error::other)??;
        assert_eq!(&lead, b"!");
        assert_eq!(recorded(&writes), [1]);
        // Ends without a word: the lead, then the end.
        let (mut link, service, _, copy) = led_copy(Duration::from_secs(30));
        drop(service);
        let mut all = Vec::new();
        link.read_to_end(&mut all).await?;
        assert_eq!(all, b"!");
        drop(link);
        let counted = copy.await.map_err(std::io::Error::other)??;
        assert_eq!(counted, (0, 0));
        Ok(())
    }

    /// One end of a link stream as a yamux stream behaves towards wakers: reads and writes
    /// wait for the link in one shared slot (a yamux stream's read half sends its window
    /// updates through the same channel as the write half's data), reads are served 8 bytes
    /// at a time.
    #[derive(Default)]
    struct OneSlot {
        inbound: std::collections::VecDeque<u8>,
        written: Vec<u8>,
        /// The link has no room: writes wait, and reads register for the room too.
        link_full: bool,
        /// Who waits for room on the link (one slot, as yamux has).
        slot: Option<std::task::Waker>,
        /// Who waits for data.
        reader: Option<std::task::Waker>,
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<OneSlot>>);

    impl Shared {
        fn with<T>(&self, f: impl FnOnce(&mut OneSlot) -> T) -> T {
            let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut g)
        }
    }

    impl AsyncRead for Shared {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            self.with(|s| {
                if s.link_full {
                    s.slot = Some(cx.waker().clone());
                }
                if s.inbound.is_empty() {
                    s.reader = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                let n = s.inbound.len().min(8).min(buf.remaining());
                for b in s.inbound.drain(..n) {
                    buf.put_slice(&[b]);
                }
                Poll::Ready(Ok(()))
            })
        }
    }

    impl AsyncWrite for Shared {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.with(|s| {
                if s.link_full {
                    s.slot = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                s.written.extend_from_slice(buf);
                Poll::Ready(Ok(buf.len()))
            })
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Waits (polling, at most 10 s) until `done` holds for the link end.
    async fn until(link: &Shared, what: &str, done: impl Fn(&OneSlot) -> bool) {
        for _ in 0..1000 {
            if link.with(|s| done(s)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting until {what}");
    }

    #[tokio::test]
    async fn a_read_never_takes_the_write_halfs_wakeup() {
        // The service's reply waits for room on the link; meanwhile the link's data is read
        // and fills the service's socket. When the link has room again, the reply must go.
        let link = Shared::default();
        link.with(|s| s.link_full = true);
        let (b, mut service) = tokio::io::duplex(16);
        let copy = tokio::spawn(super::bidirectional(link.clone(), b, &[], Duration::ZERO));
        service.write_all(b"reply").await.expect("duplex");
        until(&link, "the reply waits for the link", |s| s.slot.is_some()).await;
        // 24 bytes from the link, read 8 at a time: the service's socket takes 16 of them.
        link.with(|s| {
            s.inbound.extend([7u8; 24]);
            if let Some(w) = s.reader.take() {
                w.wake();
            }
        });
        until(&link, "the link's bytes are read", |s| s.inbound.is_empty()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Room on the link: whoever waits in the slot is woken, as yamux does.
        link.with(|s| {
            s.link_full = false;
            if let Some(w) = s.slot.take() {
                w.wake();
            }
        });
        until(&link, "the reply reaches the link", |s| {
            s.written == b"reply"
        })
        .await;
        copy.abort();
    }

    #[tokio::test]
    async fn copies_both_ways_with_half_close() {
        let (client, a) = tokio::io::duplex(4096);
        let (b, service) = tokio::io::duplex(4096);
        let copy = tokio::spawn(super::bidirectional(a, b, &[], Duration::ZERO));
        let (mut cr, mut cw) = tokio::io::split(client);
        let (mut sr, mut sw) = tokio::io::split(service);
        let up: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = up.clone();
        let writer = tokio::spawn(async move {
            cw.write_all(&sent).await.expect("duplex");
            cw.shutdown().await.expect("duplex");
        });
        let mut got = Vec::new();
        sr.read_to_end(&mut got).await.expect("duplex");
        writer.await.expect("duplex");
        assert_eq!(got, up, "client to service");
        // The client's write side is shut; the other direction still carries.
        sw.write_all(b"reply after the client's FIN")
            .await
            .expect("duplex");
        sw.shutdown().await.expect("duplex");
        let mut back = Vec::new();
        cr.read_to_end(&mut back).await.expect("duplex");
        assert_eq!(back, b"reply after the client's FIN");
        let (to, from) = copy.await.expect("join").expect("copy");
        assert_eq!((to, from), (300_000, 28));
    }
}
