//! Stream multiplexing on a link, with `yamux` (the libp2p implementation).
//!
//! A yamux connection does all its I/O when it is polled, so each link gets a driver task
//! that polls it continuously; the rest of the portal talks to the driver through a channel
//! (open a stream) or receives its inbound streams. Streams are tokio `AsyncRead` +
//! `AsyncWrite`; shutting down the write side sends FIN and leaves the read side open
//! (half-close); dropping a stream resets it (abort).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::task::Poll;

use anyhow::{Result, anyhow};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

use crate::coalesce::Coalesce;
use crate::config::MAX_STREAMS_PER_LINK;

/// One multiplexed stream.
pub type MuxStream = Compat<yamux::Stream>;

/// What a link stream is, over either transport: bytes both ways.
pub trait LinkIo: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> LinkIo for T {}

/// One stream of a link: a yamux stream on a TCP link, a QUIC stream on a QUIC link.
pub type LinkStream = Box<dyn LinkIo>;

type OpenReply = oneshot::Sender<Result<MuxStream>>;

/// What the rest of the portal asks of a client link's driver.
enum Command {
    Open(OpenReply),
    Close,
}

/// yamux's settings for a link that carries at most `streams` streams at once.
fn config(streams: usize) -> yamux::Config {
    let mut c = yamux::Config::default();
    // Room for a bulk stream to keep the pipe full across the relay; yamux auto-tunes each
    // stream's window within this connection-wide budget.
    // yamux requires the budget to give every stream at least 256 KiB.
    // yamux checks the two against each other at each call: lift the budget, set the
    // streams, then the budget that fits them.
    c.set_max_connection_receive_window(None);
    c.set_max_num_streams(streams);
    c.set_max_connection_receive_window(Some(streams * 256 * 1024));
    c
}

/// yamux's own limit for a client link whose portal carries `max` streams: room for streams
/// that are closing but not yet forgotten, since yamux ends the whole connection when an
/// open goes over its limit, so the portal's limit must be reached first.
fn client_limit(max: usize) -> usize {
    max + max / 4
}

/// The serving side's yamux limit: the largest client limit any client portal may use, so a
/// client with a higher `max_streams_per_link` than this portal's never cuts the link.
pub(crate) const SERVER_LIMIT: usize = MAX_STREAMS_PER_LINK + MAX_STREAMS_PER_LINK / 4;

#[cfg(test)]
mod tests {
    #[test]
    fn config_is_accepted_by_yamux() {
        // yamux asserts on inconsistent limits; this must never panic at run time.
        for max in [1, 1024, super::MAX_STREAMS_PER_LINK] {
            let _ = super::config(super::client_limit(max));
        }
        let _ = super::config(super::SERVER_LIMIT);
    }
}

/// A link already carries as many streams as it may: this open fails, the link goes on.
#[derive(Debug, thiserror::Error)]
#[error("the link already carries {0} streams (`max_streams_per_link`)")]
pub struct LinkFull(pub usize);

/// Opens streams on a client link.
#[derive(Clone, Debug)]
pub struct Opener {
    tx: mpsc::UnboundedSender<Command>,
}

impl Opener {
    /// A new outbound stream.
    pub async fn open(&self) -> Result<MuxStream> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Open(tx))
            .map_err(|_| anyhow!("link closed"))?;
        rx.await.map_err(|_| anyhow!("link closed"))?
    }

    /// Closes the link (its open streams end).
    pub fn close(&self) {
        let _ = self.tx.send(Command::Close);
    }

    /// Whether the link's driver has stopped.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Starts the client side of a link over `io`; `on_end` runs when the link ends.
pub fn client<T>(io: T, max: usize, on_end: impl FnOnce(String) + Send + 'static) -> Opener
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::unbounded_channel::<Command>();
    let mut conn = yamux::Connection::new(
        Coalesce::new(io).compat(),
        config(client_limit(max)),
        yamux::Mode::Client,
    );
    tokio::spawn(async move {
        let mut queue: VecDeque<OpenReply> = VecDeque::new();
        let mut closing = false;
        let end = poll_fn(|cx| {
            while let Poll::Ready(Some(cmd)) = rx.poll_recv(cx) {
                match cmd {
                    Command::Open(req) => queue.push_back(req),
                    Command::Close => closing = true,
                }
            }
            if closing {
                return match conn.poll_close(cx) {
                    Poll::Ready(_) => Poll::Ready("closed by this portal".to_string()),
                    Poll::Pending => Poll::Pending,
                };
            }
            while !queue.is_empty() {
                match conn.poll_new_outbound(cx) {
                    Poll::Ready(Ok(s)) => {
                        if let Some(req) = queue.pop_front() {
                            let _ = req.send(Ok(s.compat()));
                        }
                    }
                    // A full link refuses one more stream; the streams it carries go on.
                    Poll::Ready(Err(yamux::ConnectionError::TooManyStreams)) => {
                        if let Some(req) = queue.pop_front() {
                            let _ = req.send(Err(LinkFull(max).into()));
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(format!("opening a stream: {e}")),
                    Poll::Pending => break,
                }
            }
            // Polling for inbound streams drives the connection; a client link refuses them.
            loop {
                match conn.poll_next_inbound(cx) {
                    Poll::Ready(Some(Ok(s))) => drop(s),
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(format!("{e}")),
                    Poll::Ready(None) => return Poll::Ready("closed".to_string()),
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await;
        for req in queue {
            let _ = req.send(Err(anyhow!("link ended: {end}")));
        }
        drop(rx);
        on_end(end);
    });
    Opener { tx }
}

/// Runs the serving side of a link over `io`, handing each inbound stream to `serve`, until
/// the link ends; returns why it ended.
pub async fn server<T, F>(io: T, mut serve: F) -> String
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut(MuxStream),
{
    let mut conn = yamux::Connection::new(
        Coalesce::new(io).compat(),
        config(SERVER_LIMIT),
        yamux::Mode::Server,
    );
    poll_fn(|cx| {
        loop {
            match conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(s))) => serve(s.compat()),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(format!("{e}")),
                Poll::Ready(None) => return Poll::Ready("closed".to_string()),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await
}
