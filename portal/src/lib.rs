//! `portal`: the Netport agent on each device.
//!
//! It keeps one mutual-TLS control session to netportd (several addresses tried in turn,
//! exponential backoff with jitter, heartbeats), holds exactly the listeners the server
//! pushes, and carries each accepted connection as a stream of a link to the serving portal:
//! through a relay, over TLS end to end, with the peer checked against the identity the server
//! announced. The serving side opens only the targets the server granted for that link.

pub mod config;
mod control;
mod copy;
mod legacy;
pub mod legacy_tls;
mod link;
mod listeners;
pub mod mux;
mod observe;
mod quic;
mod udp;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use netport_proto::control::Message;
use tokio::sync::{mpsc, oneshot, watch};

pub use config::Config;

/// Shared state of a running portal.
pub struct Portal {
    config: Config,
    control: Mutex<Option<mpsc::UnboundedSender<Message>>>,
    next_request: AtomicU64,
    waiting: Mutex<HashMap<u64, oneshot::Sender<Message>>>,
    links: link::Links,
    listeners: listeners::Listeners,
    stats: observe::Stats,
}

impl std::fmt::Debug for Portal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Portal")
            .field("identity", &self.config.credentials.identity().to_string())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Portal {
    /// Sends a request to the server and waits for the answer with the same request id.
    async fn request(
        &self,
        make: impl FnOnce(u64) -> Message,
        within: std::time::Duration,
    ) -> Result<Message> {
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.waiting).insert(id, tx);
        let sent = lock(&self.control)
            .as_ref()
            .is_some_and(|c| c.send(make(id)).is_ok());
        if !sent {
            lock(&self.waiting).remove(&id);
            anyhow::bail!("not connected to netportd");
        }
        match tokio::time::timeout(within, rx).await {
            Ok(Ok(m)) => Ok(m),
            _ => {
                lock(&self.waiting).remove(&id);
                anyhow::bail!("netportd did not answer in time")
            }
        }
    }

    /// Sends `msg` to netportd if a session is up (reports that may be lost).
    fn tell_server(&self, msg: Message) {
        if let Some(c) = lock(&self.control).as_ref() {
            let _ = c.send(msg);
        }
    }

    fn answer(&self, request_id: u64, msg: Message) {
        if let Some(w) = lock(&self.waiting).remove(&request_id) {
            let _ = w.send(msg);
        }
    }
}

/// Runs the portal until `shutdown` turns true.
pub async fn run(config: Config, shutdown: watch::Receiver<bool>) -> Result<()> {
    netport_common::expiry::watch_own_certificate(
        &config.credentials,
        netport_common::expiry::DEFAULT_WARN_DAYS,
    );
    let stats = observe::Stats::new(&config.credentials);
    let admin = match config.admin_listen {
        Some(a) => Some(netport_common::admin::bind(a).await?),
        None => None,
    };
    let portal = Arc::new(Portal {
        config,
        control: Mutex::new(None),
        next_request: AtomicU64::new(1),
        waiting: Mutex::default(),
        links: link::Links::default(),
        listeners: listeners::Listeners::default(),
        stats,
    });
    if let Some(listener) = admin {
        tokio::spawn(netport_common::admin::serve(
            listener,
            Arc::new(observe::Admin(portal.clone())),
            shutdown.clone(),
        ));
    }
    let result = control::run(portal.clone(), shutdown).await;
    // Graceful shutdown: no new connections; open ones get the grace period (their links
    // do not need the control session).
    portal.listeners.drain(portal.config.shutdown_grace).await;
    result
}
