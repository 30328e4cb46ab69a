//! Gathers a link's many small writes into few large ones.
//!
//! yamux writes each frame as two writes, its 12-byte header and then its body, and asks for
//! a flush after every frame. Straight onto TLS that is two TLS records and two `write(2)`
//! calls per frame of at most 16 KiB: a 12-byte record costs as much AEAD set-up and framing
//! as a full one, and the receiving portal decrypts each. [`Coalesce`] sits between yamux
//! and the TLS stream: writes go into one buffer, which is passed to TLS when it is full or
//! once the writer has nothing more to add, so records are full-sized and one system call
//! carries several of them.
//!
//! One kind of frame is not gathered: a small data frame of an open stream (a request, a
//! reply, a keystroke) is written as yamux gives it, header then body. The header's TLS
//! record leaves first and wakes the relay and the peer, which are running by the time the
//! body follows; gathered, every hop would wait for its wake-up in turn. `netport-bench
//! tunnel --peers netport`, 12 interleaved rounds: p50 114 µs so, 132 µs with every frame
//! gathered (119 µs before any gathering; bench/README.md has the whole comparison). Frames
//! that open or close a stream, window updates and bulk data are gathered: fewer writes
//! there make more new connections a second.
//!
//! "Nothing more to add" is learnt without a timer: a flush that follows new writes of bulk
//! size only marks the buffer and wakes the task; the flush after that (the task's next pass,
//! after it has gathered whatever else was ready) sends it. yamux flushes on every pass of
//! its loop, so bulk data waits one scheduling round at most, and less than 4 KiB (a
//! request, a keystroke, a window update) goes at once.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most bytes gathered before they are passed on: four full TLS records.
pub const CAPACITY: usize = 64 * 1024;

/// Less than this is sent at the first flush: a small message is interactive traffic, and
/// waiting for company would only add latency.
const DEFER_FROM: usize = 4 * 1024;

/// A writer that gathers writes; reads pass straight through.
#[derive(Debug)]
pub struct Coalesce<T> {
    inner: T,
    buf: Vec<u8>,
    /// How much of `buf` the inner writer has taken.
    sent: usize,
    /// Bytes were added since the last flush request.
    fresh: bool,
    /// What is left of the frame being passed straight through.
    through: usize,
}

impl<T> Coalesce<T> {
    pub fn new(inner: T) -> Self {
        Coalesce {
            inner,
            buf: Vec::new(),
            sent: 0,
            fresh: false,
            through: 0,
        }
    }

    /// How much of `data` goes straight to the inner writer, ungathered: the rest of a frame
    /// already going that way, or a whole small data frame of an open stream, announced by
    /// its header (yamux: version 0, type 0 = data, no flags, then the length).
    fn pass_through(&mut self, data: &[u8]) -> Option<usize> {
        if self.through > 0 {
            return Some(data.len().min(self.through));
        }
        let h: &[u8; 12] = data.try_into().ok()?;
        let length = u32::from_be_bytes([h[8], h[9], h[10], h[11]]) as usize;
        if h[0] != 0 || h[1] != 0 || h[2..4] != [0, 0] || length == 0 || length >= DEFER_FROM {
            return None;
        }
        self.through = 12 + length;
        Some(12)
    }

    /// The wrapped stream.
    #[cfg(test)]
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Passes everything gathered to the inner writer.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        self.fresh = false;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.through > 0 || (this.buf.is_empty() && data.len() < DEFER_FROM) {
            if let Some(n) = this.pass_through(data) {
                return Pin::new(&mut this.inner)
                    .poll_write(cx, &data[..n])
                    .map_ok(|w| {
                        this.through = this.through.saturating_sub(w);
                        w
                    });
            }
        }
        if this.buf.len() + data.len() > CAPACITY {
            ready!(this.poll_drain(cx))?;
        }
        if data.len() >= CAPACITY {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        if this.buf.capacity() == 0 {
            this.buf.reserve_exact(CAPACITY);
        }
        this.buf.extend_from_slice(data);
        this.fresh = true;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.fresh && this.buf.len() - this.sent >= DEFER_FROM {
            // Bulk: more may come in this pass, send on the next one.
            this.fresh = false;
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Counts the writes that reach it.
    #[derive(Default)]
    struct Counting {
        writes: Vec<usize>,
        data: Vec<u8>,
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.writes.push(b.len());
            this.data.extend_from_slice(b);
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn frames_flushed_one_by_one_reach_the_inner_writer_together_and_in_order()
    -> io::Result<()> {
        let mut c = Coalesce::new(Counting::default());
        let mut expected = Vec::new();
        for i in 0..10u8 {
            let header = [i; 12];
            let body = vec![i; 5000];
            c.write_all(&header).await?;
            c.write_all(&body).await?;
            expected.extend_from_slice(&header);
            expected.extend_from_slice(&body);
            // The first flush after new bytes only marks them.
            std::future::poll_fn(|cx| Pin::new(&mut c).poll_flush(cx)).await?;
        }
        assert!(c.get_ref().writes.is_empty(), "{:?}", c.get_ref().writes);
        // The second one, with nothing added in between, sends them in one write.
        c.flush().await?;
        assert_eq!(c.get_ref().writes, vec![expected.len()]);
        assert_eq!(c.get_ref().data, expected);
        Ok(())
    }

    #[tokio::test]
    async fn a_small_message_is_sent_at_the_first_flush() -> io::Result<()> {
        let mut c = Coalesce::new(Counting::default());
        c.write_all(&[1; 12]).await?;
        c.write_all(&[2; 64]).await?;
        c.flush().await?;
        assert_eq!(c.get_ref().writes, vec![76]);
        Ok(())
    }

    /// A yamux header: data frame, `flags`, stream 3, `len` bytes of body.
    fn header(flags: u16, len: u32) -> [u8; 12] {
        let mut h = [0u8; 12];
        h[2..4].copy_from_slice(&flags.to_be_bytes());
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[8..12].copy_from_slice(&len.to_be_bytes());
        h
    }

    #[tokio::test]
    async fn small_data_frames_go_as_given_and_stream_openings_are_gathered() -> io::Result<()> {
        let mut c = Coalesce::new(Counting::default());
        // A reply on an open stream: header and body, each written at once.
        c.write_all(&header(0, 64)).await?;
        c.write_all(&[5; 64]).await?;
        assert_eq!(c.get_ref().writes, vec![12, 64]);
        // A stream's first frame (SYN) and a bulk frame are gathered.
        c.write_all(&header(1, 10)).await?;
        c.write_all(&[6; 10]).await?;
        c.write_all(&header(0, 8000)).await?;
        c.write_all(&[7; 8000]).await?;
        assert_eq!(c.get_ref().writes, vec![12, 64]);
        c.flush().await?;
        c.flush().await?;
        assert_eq!(c.get_ref().writes, vec![12, 64, 12 + 10 + 12 + 8000]);
        Ok(())
    }

    #[tokio::test]
    async fn a_full_buffer_is_passed_on_and_large_writes_go_straight_through() -> io::Result<()> {
        let mut c = Coalesce::new(Counting::default());
        let chunk = vec![7u8; 16 * 1024];
        for _ in 0..4 {
            c.write_all(&chunk).await?;
        }
        // A fifth would overflow: the four go first, in one write.
        c.write_all(&chunk).await?;
        assert_eq!(c.get_ref().writes, vec![4 * chunk.len()]);
        let big = vec![9u8; CAPACITY];
        c.write_all(&big).await?;
        assert_eq!(
            c.get_ref().writes,
            vec![4 * chunk.len(), chunk.len(), CAPACITY]
        );
        c.shutdown().await?;
        assert_eq!(c.get_ref().data.len(), 5 * chunk.len() + CAPACITY);
        Ok(())
    }

    #[tokio::test]
    async fn reads_pass_through() -> io::Result<()> {
        let (a, mut b) = tokio::io::duplex(64);
        let mut c = Coalesce::new(a);
        b.write_all(b"hello").await?;
        let mut got = [0u8; 5];
        c.read_exact(&mut got).await?;
        assert_eq!(&got, b"hello");
        Ok(())
    }
}
