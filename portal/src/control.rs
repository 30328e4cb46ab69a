//! The control session with netportd, reconnecting with backoff.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use netport_proto::control::{Decoder, Message, PeerRole, VERSION, encode_message};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use crate::{Portal, lock};

pub async fn run(portal: Arc<Portal>, mut shutdown: watch::Receiver<bool>) -> Result<()> {
    let mut backoff = Duration::from_millis(200);
    loop {
        let servers = portal.config.servers.clone();
        for (addr, name) in &servers {
            if *shutdown.borrow() {
                return Ok(());
            }
            let ended = session(&portal, addr, name, &mut shutdown).await;
            portal
                .stats
                .connected
                .store(false, std::sync::atomic::Ordering::Relaxed);
            match ended {
                Ok(true) => return Ok(()),
                Ok(false) => {
                    backoff = Duration::from_millis(200);
                }
                Err(e) => tracing::warn!(server = %addr, "control session: {e:#}"),
            }
            *lock(&portal.control) = None;
        }
        let wait = netport_common::jitter(backoff);
        tracing::info!("reconnecting to netportd in {} ms", wait.as_millis());
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// One session; `Ok(true)` on shutdown, `Ok(false)` when the server went away.
async fn session(
    portal: &Arc<Portal>,
    addr: &str,
    name: &str,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<bool> {
    let stream = netport_common::connect_control(&portal.config.credentials, addr, name).await?;
    let (mut rd, mut wr) = tokio::io::split(stream);
    // Hello goes first, before anything queued or any heartbeat.
    wr.write_all(&encode_message(&Message::Hello {
        role: PeerRole::Portal,
        versions: vec![VERSION],
        software: format!(
            "portal/{}{}",
            env!("CARGO_PKG_VERSION"),
            portal.config.quic.links().words()
        ),
    }))
    .await?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    *lock(&portal.control) = Some(tx.clone());
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut heartbeat = Duration::from_secs(10);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    let mut last_heard = tokio::time::Instant::now();
    let mut seq = 0u64;
    // Stream reports (one per closed connection) wait up to REPORTS_DELAY and go together:
    // at thousands of connections a second, one write and one wake-up of netportd each
    // would cost both sides more than the connections themselves.
    // Whatever is queued goes by `reports_due` at the latest: one timer, set when a batch
    // starts. (A fresh `sleep_until` in the loop was a timer set for every report, and
    // tokio wakes its I/O driver each time a timer becomes the earliest one.)
    let mut reports: Vec<u8> = Vec::new();
    let reports_due = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(reports_due);
    loop {
        tokio::select! {
            n = rd.read(&mut buf) => {
                let n = n.context("reading from netportd")?;
                if n == 0 {
                    tracing::warn!(server = %addr, "netportd closed the control connection");
                    return Ok(false);
                }
                last_heard = tokio::time::Instant::now();
                decoder.push(&buf[..n]);
                while let Some(msg) = decoder.next_message().context("bad control frame from netportd")? {
                    match msg {
                        Message::Welcome { identity, policy, heartbeat_secs, .. } => {
                            heartbeat = Duration::from_secs(u64::from(heartbeat_secs.max(1)));
                            tick = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
                            tracing::info!(server = %addr, %identity, policy = %&policy[..policy.len().min(12)], "connected to netportd");
                        }
                        Message::Refused { reason, message } => {
                            tracing::error!(server = %addr, %reason, "netportd refused this portal: {message}");
                            // Refused means no rights at all: hold no listener until welcomed again.
                            portal.listeners.clear();
                            bail!("refused ({reason}): {message}");
                        }
                        Message::DesiredState { policy, listeners } => {
                            portal.listeners.reconcile(portal, listeners, &policy);
                            portal.stats.connected.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        Message::LinkOffer { request_id, .. } | Message::LinkDenied { request_id, .. } => {
                            portal.answer(request_id, msg);
                        }
                        Message::LinkIncoming { link_id, peer, relay, token, grants, legacy: Some(l), .. } => {
                            let portal = portal.clone();
                            tokio::spawn(async move {
                                if let Err(e) = crate::legacy::serve_incoming(portal, link_id, relay, token, grants, l).await {
                                    tracing::warn!(link_id, %peer, "incoming legacy link failed: {e:#}");
                                }
                            });
                        }
                        Message::LinkIncoming { link_id, peer, relay, token, grants, quic, .. } => {
                            let portal = portal.clone();
                            tokio::spawn(async move {
                                if let Err(e) = crate::link::serve_incoming(portal, link_id, peer.clone(), relay, token, grants, quic).await {
                                    tracing::warn!(link_id, %peer, "incoming link failed: {e:#}");
                                }
                            });
                        }
                        Message::LinkGrants { link_id, grants } => portal.links.set_grants(link_id, grants),
                        Message::CloseLink { link_id, reason } => portal.links.close(link_id, &reason),
                        Message::Heartbeat { .. } => {}
                        other => tracing::debug!(kind = other.kind(), "ignoring message from netportd"),
                    }
                }
            }
            Some(m) = rx.recv() => {
                if reports.is_empty() {
                    reports_due.as_mut().reset(tokio::time::Instant::now() + REPORTS_DELAY);
                }
                reports.extend_from_slice(&encode_message(&m));
                if !matches!(m, Message::StreamClosed { .. }) || reports.len() >= REPORTS_MAX {
                    // Anything else goes at once, after the reports queued before it.
                    send_queued(&mut wr, &mut reports).await?;
                }
            }
            () = &mut reports_due, if !reports.is_empty() => {
                send_queued(&mut wr, &mut reports).await?;
            }
            _ = tick.tick() => {
                if last_heard.elapsed() > heartbeat * 3 {
                    tracing::warn!(server = %addr, "no heartbeat from netportd; reconnecting");
                    return Ok(false);
                }
                seq += 1;
                reports.extend_from_slice(&encode_message(&Message::Heartbeat { seq }));
                send_queued(&mut wr, &mut reports).await?;
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    let _ = send_queued(&mut wr, &mut reports).await;
                    let _ = wr.shutdown().await;
                    return Ok(true);
                }
            }
        }
    }
}

/// How long a closed stream's report may wait for others to go with it.
const REPORTS_DELAY: Duration = Duration::from_millis(200);

/// Queued reports beyond this go at once.
const REPORTS_MAX: usize = 32 * 1024;

/// Writes the queued messages in one write.
async fn send_queued<W: AsyncWrite + Unpin>(wr: &mut W, queued: &mut Vec<u8>) -> Result<()> {
    if !queued.is_empty() {
        wr.write_all(queued).await.context("writing to netportd")?;
        queued.clear();
        if queued.capacity() > REPORTS_MAX * 2 {
            queued.shrink_to(REPORTS_MAX);
        }
    }
    Ok(())
}
