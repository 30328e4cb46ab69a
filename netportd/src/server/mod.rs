//! `netportd run`: the control plane.
//!
//! Portals and relays connect over mutual TLS (ALPN `netport/1`); the certificate's SAN URI is
//! the identity. Portals get their desired listeners on connect; a link request is decided by
//! the policy, a relay is picked and asked to allocate a port pair, and both portals are told
//! where to meet, with single-use tokens and the exact peer identity to expect.

pub mod config;
mod session;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use netport_policy::Policy;
use netport_proto::control::Message;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

pub use config::Config;

/// A connected portal.
struct PortalHandle {
    conn: u64,
    tx: mpsc::UnboundedSender<Message>,
}

/// Where an allocation request's answer goes: the port pair, or why it failed.
type AllocWaiter = oneshot::Sender<std::result::Result<(u16, u16), String>>;

/// A connected relay.
struct RelayHandle {
    conn: u64,
    tx: mpsc::UnboundedSender<Message>,
    live: usize,
    capacity: u32,
    pending: HashMap<u64, AllocWaiter>,
}

/// Shared server state.
pub struct Server {
    policy: RwLock<Arc<Policy>>,
    portals: Mutex<HashMap<String, PortalHandle>>,
    relays: Mutex<HashMap<String, RelayHandle>>,
    next_id: AtomicU64,
    heartbeat: Duration,
    token_ttl: Duration,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Server {
    fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Binds every control address of `config` (call after validation, before [`run`]).
pub async fn bind(config: &Config) -> Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    for addr in &config.listen {
        out.push(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (`listen` in netportd.toml)"))?,
        );
    }
    Ok(out)
}

/// Serves the control plane on `listeners` until `shutdown` turns true.
pub async fn run(
    listeners: Vec<TcpListener>,
    config: Config,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let server = Arc::new(Server {
        policy: RwLock::new(Arc::new(config.policy.clone())),
        portals: Mutex::default(),
        relays: Mutex::default(),
        next_id: AtomicU64::new(1),
        heartbeat: config.heartbeat,
        token_ttl: config.token_ttl,
        tls: Arc::new(config.credentials.control_server()?),
    });
    tracing::info!(
        policy = %server.policy().short_hash(),
        listen = ?listeners.iter().filter_map(|l| l.local_addr().ok()).collect::<Vec<SocketAddr>>(),
        "netportd serving"
    );
    let mut tasks = tokio::task::JoinSet::new();
    for listener in listeners {
        let server = server.clone();
        tasks.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((tcp, peer)) => {
                        let server = server.clone();
                        tokio::spawn(async move {
                            if let Err(e) = session::handle(server, tcp, peer).await {
                                tracing::info!(%peer, "control connection ended: {e:#}");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            break;
        }
    }
    tasks.abort_all();
    tracing::info!("netportd stopped");
    Ok(())
}
