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
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// The buffer each direction starts with.
const START_BUF: usize = 1024;
/// The largest a buffer grows.
const MAX_BUF: usize = 64 * 1024;

/// Copies `a` to `b` and `b` to `a` until both directions end, as
/// `tokio::io::copy_bidirectional` does: the end of one side's data shuts down the other
/// side's write half (half-close) and the other direction goes on; an error in either
/// direction ends both. Returns the bytes copied from `a` to `b` and from `b` to `a`.
pub async fn bidirectional<A, B>(a: A, b: B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite,
    B: AsyncRead + AsyncWrite,
{
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    tokio::try_join!(one_way(ar, bw), one_way(br, aw))
}

/// Copies `r` to `w` until `r` ends, then shuts `w` down (one direction of
/// [`bidirectional`]); returns the bytes copied.
pub(crate) async fn one_way<R, W>(mut r: R, mut w: W) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; START_BUF];
    let mut total = 0u64;
    loop {
        // A writer may hold bytes back until flushed (a multiplexed stream, TLS): flush
        // whenever there is nothing more to read yet, so the peer sees every byte before
        // this side waits, and a bulk transfer is not flushed after every buffer.
        let n = match read_now(&mut r, &mut buf) {
            Some(n) => n?,
            None => {
                w.flush().await?;
                r.read(&mut buf).await?
            }
        };
        if n == 0 {
            w.shutdown().await?;
            return Ok(total);
        }
        w.write_all(&buf[..n]).await?;
        total += n as u64;
        if n == buf.len() && buf.len() < MAX_BUF {
            buf.resize(buf.len() * 2, 0);
        }
    }
}

/// A read that is ready now, or `None` when it would have to wait.
fn read_now<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Option<io::Result<usize>> {
    let mut cx = Context::from_waker(Waker::noop());
    let mut rb = ReadBuf::new(buf);
    match Pin::new(r).poll_read(&mut cx, &mut rb) {
        Poll::Ready(Ok(())) => Some(Ok(rb.filled().len())),
        Poll::Ready(Err(e)) => Some(Err(e)),
        Poll::Pending => None,
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_with_half_close() {
        let (client, a) = tokio::io::duplex(4096);
        let (b, service) = tokio::io::duplex(4096);
        let copy = tokio::spawn(super::bidirectional(a, b));
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
