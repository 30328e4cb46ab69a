//! The control session with netportd.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use netport_proto::control::{Decoder, Message, PeerRole, VERSION, encode_message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::pairing::{Allocations, Closed};

/// How a session ended without an error on our side.
pub enum End {
    Shutdown,
    Lost(String),
}

pub async fn session(
    config: &Config,
    addr: &str,
    name: &str,
    allocations: &Allocations,
    closed_rx: &mut mpsc::UnboundedReceiver<Closed>,
    shutdown: &mut watch::Receiver<bool>,
    registered: &std::sync::atomic::AtomicBool,
) -> Result<End> {
    let stream = netport_common::connect_control(&config.credentials, addr, name).await?;
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
                            registered.store(true, std::sync::atomic::Ordering::Relaxed);
                            heartbeat = Duration::from_secs(u64::from(heartbeat_secs.max(1)));
                            tick = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
                            tracing::info!(server = %addr, %identity, "registered with netportd");
                        }
                        Message::Refused { reason, message } => {
                            bail!("netportd refused this relay ({reason}): {message}");
                        }
                        Message::Heartbeat { .. } => {}
                        Message::Allocate { alloc_id, token_a, token_b, ttl_ms, transport } => {
                            let reply = allocations
                                .allocate(alloc_id, &token_a, &token_b, Duration::from_millis(ttl_ms), transport)
                                .await;
                            wr.write_all(&encode_message(&reply)).await?;
                        }
                        Message::AllocateLegacy { alloc_id, token, ttl_ms } => {
                            let reply = allocations
                                .allocate_legacy(alloc_id, &token, Duration::from_millis(ttl_ms))
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
