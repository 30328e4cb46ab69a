//! The control session with netportd.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use netport_proto::control::{Decoder, Message, PeerRole, VERSION, encode_message};
use rustls_pki::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsConnector;

use crate::config::Config;
use crate::pairing::{Allocations, Closed};

use tokio_rustls::rustls::pki_types as rustls_pki;

/// How a session ended without an error on our side.
pub enum End {
    Shutdown,
    Lost(String),
}

/// `base` scaled by a random-ish factor in [0.5, 1.5): spreads reconnects of many relays.
pub fn jitter(base: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    base.mul_f64(0.5 + f64::from(nanos % 1000) / 1000.0)
}

pub async fn session(
    config: &Config,
    addr: &str,
    name: &str,
    allocations: &Allocations,
    closed_rx: &mut mpsc::UnboundedReceiver<Closed>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<End> {
    let tls = config.credentials.control_client()?;
    let connector = TlsConnector::from(std::sync::Arc::new(tls));
    let server_name = ServerName::try_from(name.to_string())
        .map_err(|_| anyhow!("`{name}` is not a valid server name"))?;
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .context("connect timed out")?
        .with_context(|| format!("connect to {addr}"))?;
    tcp.set_nodelay(true)?;
    let stream = tokio::time::timeout(Duration::from_secs(10), connector.connect(server_name, tcp))
        .await
        .context("TLS handshake timed out")?
        .context("TLS handshake")?;
    let (mut rd, mut wr) = tokio::io::split(stream);

    wr.write_all(&encode_message(&Message::Hello {
        role: PeerRole::Relay,
        versions: vec![VERSION],
        software: concat!("relayd/", env!("CARGO_PKG_VERSION")).into(),
    }))
    .await?;
    wr.write_all(&encode_message(&Message::RelayRegister {
        address: config.public_address.clone(),
        port_first: config.port_first,
        port_last: config.port_last,
        capacity: config.capacity,
    }))
    .await?;

    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut heartbeat = Duration::from_secs(10);
    let mut welcomed = false;
    let mut seq = 0u64;
    let mut last_heard = tokio::time::Instant::now();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    loop {
        tokio::select! {
            n = rd.read(&mut buf) => {
                let n = n.context("reading from netportd")?;
                if n == 0 {
                    return Ok(End::Lost("netportd closed the connection".into()));
                }
                last_heard = tokio::time::Instant::now();
                decoder.push(&buf[..n]);
                while let Some(msg) = decoder.next_message().context("bad control frame from netportd")? {
                    match msg {
                        Message::Welcome { identity, heartbeat_secs, .. } => {
                            welcomed = true;
                            heartbeat = Duration::from_secs(u64::from(heartbeat_secs.max(1)));
                            tick = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
                            tracing::info!(server = %addr, %identity, "registered with netportd");
                        }
                        Message::Refused { reason, message } => {
                            bail!("netportd refused this relay ({reason}): {message}");
                        }
                        Message::Heartbeat { .. } => {}
                        Message::Allocate { alloc_id, token_a, token_b, ttl_ms } => {
                            let reply = allocations
                                .allocate(alloc_id, &token_a, &token_b, Duration::from_millis(ttl_ms))
                                .await;
                            wr.write_all(&encode_message(&reply)).await?;
                        }
                        Message::Release { alloc_id } => allocations.release(alloc_id),
                        other => tracing::debug!(kind = other.kind(), "ignoring unexpected message from netportd"),
                    }
                }
            }
            Some(c) = closed_rx.recv() => {
                wr.write_all(&encode_message(&Message::AllocationClosed {
                    alloc_id: c.alloc_id,
                    bytes_a_to_b: c.a_to_b,
                    bytes_b_to_a: c.b_to_a,
                    reason: c.reason,
                })).await?;
            }
            _ = tick.tick() => {
                if welcomed && last_heard.elapsed() > heartbeat * 3 {
                    return Ok(End::Lost("no heartbeat from netportd".into()));
                }
                seq += 1;
                wr.write_all(&encode_message(&Message::Heartbeat { seq })).await?;
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    let _ = wr.shutdown().await;
                    return Ok(End::Shutdown);
                }
            }
        }
    }
}
