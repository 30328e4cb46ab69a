//! `netportd run`: the control plane.
//!
//! Portals and relays connect over mutual TLS (ALPN `netport/1`); the certificate's SAN URI is
//! the identity. Portals get their desired listeners on connect; a link request is decided by
//! the policy, a relay is picked and asked to allocate a port pair, and both portals are told
//! where to meet, with single-use tokens and the exact peer identity to expect.

pub mod config;
pub mod legacy;
pub mod observe;
mod reload;
mod session;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use netport_policy::Policy;
use netport_proto::control::Message;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use observe::Observe;

/// A connected portal.
#[derive(Clone)]
struct PortalHandle {
    conn: u64,
    tx: mpsc::UnboundedSender<Message>,
    /// SHA-256 of the key it presented.
    spki: [u8; 32],
    /// Cancelled to cut the session off (revocation, removal from the policy).
    cancel: CancellationToken,
    /// Where the control connection comes from.
    peer: SocketAddr,
    /// Unix seconds.
    connected_at: i64,
    /// The `ID|IDV|USER|USERV` name its certificate carries, if any (legacy peers need it).
    legacy: Option<netport_proto::legacy::LegacyName>,
    /// The session speaks the legacy (V0.1) control protocol.
    speaks_legacy: bool,
    /// Which links the portal runs over QUIC (it said so in its hello).
    quic: netport_proto::control::QuicLinks,
}

/// A link the server set up, kept so reloads can update or close it.
#[derive(Clone, Debug)]
struct LinkInfo {
    client: String,
    serving: String,
    relay: String,
    client_key: [u8; 32],
    grants: Vec<netport_proto::control::LinkGrant>,
    /// The UDP pair beside the TCP one, for a link over QUIC.
    quic_alloc: Option<u64>,
    /// Relay allocations of the link still open: the link is gone when none is (the pair
    /// the portals did not use expires on its own).
    allocs: u8,
}

/// A relay allocation ended: its link is forgotten once all its allocations have. Returns
/// the link's id and whether it is gone, `None` for an allocation of no known link.
fn allocation_closed(server: &Server, alloc_id: u64) -> Option<(u64, bool)> {
    let mut links = lock(&server.links);
    let id = if links.contains_key(&alloc_id) {
        Some(alloc_id)
    } else {
        links
            .iter()
            .find(|(_, l)| l.quic_alloc == Some(alloc_id))
            .map(|(id, _)| *id)
    };
    let id = id?;
    let l = links.get_mut(&id)?;
    l.allocs = l.allocs.saturating_sub(1);
    let gone = l.allocs == 0;
    if gone {
        links.remove(&id);
    }
    Some((id, gone))
}

/// Where an allocation request's answer goes: the port pair, or why it failed.
type AllocWaiter = oneshot::Sender<std::result::Result<(u16, u16), String>>;

/// A connected relay.
struct RelayHandle {
    conn: u64,
    tx: mpsc::UnboundedSender<Message>,
    cancel: CancellationToken,
    live: usize,
    capacity: u32,
    pending: HashMap<u64, AllocWaiter>,
    peer: SocketAddr,
    connected_at: i64,
}

/// Shared server state.
pub struct Server {
    policy: RwLock<Arc<Policy>>,
    portals: Mutex<HashMap<String, PortalHandle>>,
    relays: Mutex<HashMap<String, RelayHandle>>,
    links: Mutex<HashMap<u64, LinkInfo>>,
    /// Metrics, status and audit.
    obs: Arc<Observe>,
    next_id: AtomicU64,
    heartbeat: Duration,
    handshake_timeout: Duration,
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

/// The first id this run hands out (sessions, links, allocations share one sequence).
///
/// Links and allocations outlive netportd: relays and portals keep carrying them across a
/// restart, keyed by the id they were given. Counting from 1 again would give a new link the
/// id of one still running (the relay refuses the allocation as "in use", a portal mixes up
/// its served links). So each run starts at its start time in milliseconds times 2^11: a run
/// would have to hand out over 2,048 ids per millisecond of its life to reach the next run's
/// range, and ids stay below 2^53 (exact in any JSON reader) until the year 2109.
fn first_id() -> u64 {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let millis = u64::try_from(millis).unwrap_or(0).min((1 << 42) - 1);
    (millis << 11) + 1
}

impl Server {
    /// Loads the policy directory with the same loader as `netportd check`; swaps it in only
    /// when everything passes, then reconciles sessions and links to it. A failure keeps
    /// the last good policy.
    pub fn reload(&self, dir: &std::path::Path) {
        let old = self.policy();
        let sources = match netport_policy::load_dir(dir) {
            Ok(s) => s,
            Err(e) => {
                self.failed(&old, "-", &format!("cannot read the policy directory: {e}"));
                return;
            }
        };
        let content = netport_policy::input_key(&sources);
        let content = &content[..12];
        if lock(&self.obs.reload).rejected_content.as_deref() == Some(content) {
            tracing::debug!(new_content = %content, "the files are still the ones already rejected");
            return;
        }
        let report = netport_policy::check(sources);
        let Some(new) = report.policy.clone() else {
            let errors = report.errors().count();
            self.failed(
                &old,
                content,
                &format!("{errors} errors:\n{}", report.render_plain()),
            );
            return;
        };
        if new.hash == old.hash {
            tracing::debug!(policy = %old.short_hash(), "policy files changed, policy did not");
            self.obs.reload_attempt("unchanged", None);
            return;
        }
        let d = netport_policy::diff(&old, &new);
        let new = Arc::new(new);
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = new.clone();
        self.obs.reload_attempt("accepted", None);
        self.obs.policy_loaded(&new.hash);
        const MAX_LISTED: usize = 200;
        let list = |g: &[netport_policy::Grant]| {
            serde_json::to_value(&g[..g.len().min(MAX_LISTED)]).unwrap_or_default()
        };
        self.obs.audit(
            "reload",
            json!({
                "result": "accepted",
                "old_policy": old.hash,
                "new_policy": new.hash,
                "grants_added": list(&d.grants_added),
                "grants_removed": list(&d.grants_removed),
                "grants_added_count": d.grants_added.len(),
                "grants_removed_count": d.grants_removed.len(),
                "relays_added": d.relays_added.iter().map(|r| &r.name).collect::<Vec<_>>(),
                "relays_removed": d.relays_removed.iter().map(|r| &r.name).collect::<Vec<_>>(),
                "revoked_added": d.revoked_added,
                "revoked_removed": d.revoked_removed,
            }),
        );
        tracing::info!(
            old = %old.short_hash(),
            new = %new.short_hash(),
            grants_added = d.grants_added.len(),
            grants_removed = d.grants_removed.len(),
            relays_added = d.relays_added.len(),
            relays_removed = d.relays_removed.len(),
            relays_changed = d.relays_changed.len(),
            revoked_added = d.revoked_added.len(),
            revoked_removed = d.revoked_removed.len(),
            "policy reloaded"
        );
        self.reconcile(&new);
    }

    fn failed(&self, old: &Policy, content: &str, why: &str) {
        self.obs.reload_attempt("rejected", Some((content, why)));
        let failures = self.obs.reload_failures.get();
        self.obs.audit(
            "reload",
            json!({
                "result": "rejected",
                "old_policy": old.hash,
                "new_content": content,
                "error": why,
            }),
        );
        tracing::error!(
            old = %old.short_hash(),
            new_content = %content,
            failures,
            "policy rejected, keeping policy {}: {why}",
            old.short_hash()
        );
    }

    /// Brings every session and link in line with `policy`.
    fn reconcile(&self, policy: &Policy) {
        let portals: Vec<(String, PortalHandle)> = lock(&self.portals)
            .iter()
            .map(|(n, h)| (n.clone(), h.clone()))
            .collect();
        let mut cut_portals = Vec::new();
        let mut cut_relays = Vec::new();
        for (name, h) in portals {
            let refusal = match policy.portal(&name) {
                None => Some((
                    "unknown-portal",
                    format!("portal `{name}` was removed from the policy"),
                )),
                Some(p) if p.revoked || policy.is_revoked(&h.spki) => {
                    Some(("revoked", format!("the key of `{name}` is revoked")))
                }
                Some(p)
                    if p.spki_sha256
                        .as_deref()
                        .is_some_and(|pin| pin != hex::encode(h.spki)) =>
                {
                    Some((
                        "key-mismatch",
                        format!("`{name}` is now pinned to another key"),
                    ))
                }
                Some(_) => None,
            };
            match refusal {
                Some((reason, message)) => {
                    tracing::warn!(portal = %name, reason, "cutting off: {message}");
                    self.obs.audit(
                        "teardown",
                        json!({
                            "kind": "portal_session",
                            "portal": name,
                            "spki_sha256": hex::encode(h.spki),
                            "reason": reason,
                            "message": message,
                            "policy": policy.hash,
                        }),
                    );
                    let _ = h.tx.send(Message::Refused {
                        reason: reason.into(),
                        message,
                    });
                    h.cancel.cancel();
                    lock(&self.portals).remove(&name);
                    cut_portals.push(name);
                }
                None => {
                    let _ = h.tx.send(session::desired_state(policy, &name));
                }
            }
        }
        let relays: Vec<(String, CancellationToken, mpsc::UnboundedSender<Message>)> =
            lock(&self.relays)
                .iter()
                .map(|(n, h)| (n.clone(), h.cancel.clone(), h.tx.clone()))
                .collect();
        for (name, cancel, tx) in relays {
            if policy.relay(&name).is_none() {
                tracing::warn!(relay = %name, "cutting off: removed from the policy");
                self.obs.audit(
                    "teardown",
                    json!({
                        "kind": "relay_session",
                        "relay": name,
                        "reason": "unknown-relay",
                        "policy": policy.hash,
                    }),
                );
                let _ = tx.send(Message::Refused {
                    reason: "unknown-relay".into(),
                    message: format!("relay `{name}` was removed from the policy"),
                });
                cancel.cancel();
                lock(&self.relays).remove(&name);
                cut_relays.push(name);
            }
        }
        let links: Vec<(u64, LinkInfo)> = lock(&self.links)
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        for (id, link) in links {
            let gone = cut_portals
                .iter()
                .any(|c| *c == link.client || *c == link.serving)
                || cut_relays.contains(&link.relay);
            let grants = if gone {
                Vec::new()
            } else {
                session::link_grants(policy, &link.client, &link.serving, &link.client_key)
            };
            if grants.is_empty() {
                tracing::info!(link_id = id, client = %link.client, serving = %link.serving, "closing a link the policy no longer allows");
                self.obs.audit(
                    "teardown",
                    json!({
                        "kind": "link",
                        "link_id": id,
                        "client": link.client,
                        "serving": link.serving,
                        "relay": link.relay,
                        "reason": "no longer allowed by the policy",
                        "policy": policy.hash,
                    }),
                );
                self.close_link(id, &link, "no longer allowed by the policy");
            } else if grants != link.grants {
                tracing::info!(link_id = id, serving = %link.serving, "link grants changed");
                let kept: Vec<&str> = grants.iter().map(|g| g.service.as_str()).collect();
                let cut: Vec<&str> = link
                    .grants
                    .iter()
                    .map(|g| g.service.as_str())
                    .filter(|s| !kept.contains(s))
                    .collect();
                if !cut.is_empty() {
                    self.obs.audit(
                        "teardown",
                        json!({
                            "kind": "streams",
                            "link_id": id,
                            "client": link.client,
                            "serving": link.serving,
                            "services": cut,
                            "reason": "no longer granted by the policy",
                            "policy": policy.hash,
                        }),
                    );
                }
                if let Some(h) = lock(&self.portals).get(&link.serving) {
                    let _ = h.tx.send(Message::LinkGrants {
                        link_id: id,
                        grants: grants.clone(),
                    });
                }
                if let Some(l) = lock(&self.links).get_mut(&id) {
                    l.grants = grants;
                }
            }
        }
    }

    /// A portal of link `id` says it ended: its relay allocations are released now (a UDP
    /// pair would otherwise wait for its idle timeout, holding relay capacity). Only a
    /// portal of the link may end it; anyone else is ignored.
    fn release_link(&self, portal: &str, id: u64) {
        let link = lock(&self.links)
            .get(&id)
            .filter(|l| l.client == portal || l.serving == portal)
            .map(|l| (l.relay.clone(), l.quic_alloc));
        let Some((relay, quic)) = link else {
            return;
        };
        if let Some(h) = lock(&self.relays).get(&relay) {
            for alloc_id in std::iter::once(id).chain(quic) {
                let _ = h.tx.send(Message::Release { alloc_id });
            }
        }
    }

    fn close_link(&self, id: u64, link: &LinkInfo, reason: &str) {
        lock(&self.links).remove(&id);
        for p in [&link.client, &link.serving] {
            if let Some(h) = lock(&self.portals).get(p) {
                let _ = h.tx.send(Message::CloseLink {
                    link_id: id,
                    reason: reason.into(),
                });
            }
        }
        if let Some(h) = lock(&self.relays).get(&link.relay) {
            let _ = h.tx.send(Message::Release { alloc_id: id });
            if let Some(q) = link.quic_alloc {
                let _ = h.tx.send(Message::Release { alloc_id: q });
            }
        }
    }
}

/// Connections at once that are in their TLS handshake or have not said hello yet (each is
/// bounded by a 10 s deadline too). Beyond this, new connections are closed at once, so a
/// flood of stalled handshakes costs a bounded amount of memory and file descriptors.
pub const MAX_UNAUTHENTICATED: usize = 4096;

/// The sockets netportd serves on, bound before anything else happens.
#[derive(Debug)]
pub struct Bound {
    /// Control listeners.
    pub control: Vec<TcpListener>,
    /// The admin endpoint, if configured.
    pub admin: Option<TcpListener>,
}

/// Binds every address of `config` (call after validation, before [`run`]).
pub async fn bind(config: &Config) -> Result<Bound> {
    let mut control = Vec::new();
    for addr in &config.listen {
        control.push(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (`listen` in netportd.toml)"))?,
        );
    }
    let admin = match config.admin_listen {
        Some(a) => Some(netport_common::admin::bind(a).await?),
        None => None,
    };
    Ok(Bound { control, admin })
}

/// Metrics, status and the audit log for `config` (opens the audit file).
pub fn observe(config: &Config) -> Result<Arc<Observe>> {
    Ok(Arc::new(Observe::new(
        &config.credentials,
        config.audit_log.as_deref(),
    )?))
}

/// Waits until the policy directory holds a valid policy (`wait_for_policy`), polling it;
/// `None` if `shutdown` comes first.
async fn wait_for_policy(
    dir: &std::path::Path,
    obs: &Observe,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Policy> {
    let mut last = String::new();
    loop {
        match config::load_policy(dir) {
            Ok(p) => return Some(p),
            Err(e) => {
                let why = format!("{e:#}");
                if why != last {
                    tracing::warn!("waiting for a valid policy: {why}");
                    *lock(&obs.waiting) = Some(why.clone());
                    last = why;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.changed() => if *shutdown.borrow() { return None; },
        }
    }
}

/// Serves the control plane on `bound` until `shutdown` turns true.
pub async fn run(
    bound: Bound,
    config: Config,
    obs: Arc<Observe>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    netport_common::expiry::watch_own_certificate(
        &config.credentials,
        netport_common::expiry::DEFAULT_WARN_DAYS,
    );
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(admin) = bound.admin {
        tracing::info!(admin = ?admin.local_addr().ok(), "admin endpoint: /metrics /healthz /readyz /status");
        tasks.spawn(netport_common::admin::serve(
            admin,
            Arc::new(observe::Admin(obs.clone())),
            shutdown.clone(),
        ));
    }
    let policy = match config.policy.clone() {
        Some(p) => p,
        None => match wait_for_policy(&config.policy_dir, &obs, &mut shutdown).await {
            Some(p) => p,
            None => return Ok(()),
        },
    };
    obs.policy_loaded(&policy.hash);
    let server = Arc::new(Server {
        policy: RwLock::new(Arc::new(policy)),
        portals: Mutex::default(),
        relays: Mutex::default(),
        links: Mutex::default(),
        obs: obs.clone(),
        next_id: AtomicU64::new(first_id()),
        heartbeat: config.heartbeat,
        handshake_timeout: config.handshake_timeout,
        token_ttl: config.token_ttl,
        tls: Arc::new(config.credentials.control_server()?),
    });
    let listeners = bound.control;
    tracing::info!(
        policy = %server.policy().short_hash(),
        listen = ?listeners.iter().filter_map(|l| l.local_addr().ok()).collect::<Vec<SocketAddr>>(),
        "netportd serving"
    );
    tasks.spawn(reload::watch(
        server.clone(),
        config.policy_dir.clone(),
        config.debounce,
        shutdown.clone(),
    ));
    if let Some(lc) = config.legacy.clone() {
        let l = TcpListener::bind(lc.listen).await.with_context(|| {
            format!(
                "cannot listen on {} (`legacy.listen` in netportd.toml)",
                lc.listen
            )
        })?;
        tasks.spawn(legacy::serve(server.clone(), l, lc));
    }
    // Shared by every listener: connections that have not yet proved who they are.
    let unauthenticated = Arc::new(tokio::sync::Semaphore::new(MAX_UNAUTHENTICATED));
    for listener in listeners {
        let server = server.clone();
        let unauthenticated = unauthenticated.clone();
        tasks.spawn(async move {
            let mut refused = session::RefusalLog::default();
            loop {
                match listener.accept().await {
                    Ok((tcp, peer)) => {
                        let Ok(permit) = unauthenticated.clone().try_acquire_owned() else {
                            refused.note(peer);
                            continue;
                        };
                        let server = server.clone();
                        tokio::spawn(async move {
                            if let Err(e) = session::handle(server, tcp, peer, permit).await {
                                session::log_end(peer, &e);
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
    obs.serving(&server);
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            break;
        }
    }
    // Links are data plane: they live on in the relays and portals, which reconnect to
    // another server address (or to this one once it is back).
    tasks.abort_all();
    tracing::info!("netportd stopped");
    Ok(())
}
