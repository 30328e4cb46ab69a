//! What netportd shows operators: Prometheus metrics, the `/status` document, readiness, and
//! the audit log (JSON lines: one per decision, closed stream, reload and teardown).

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use anyhow::{Context, Result};
use netport_common::admin::{self, AdminState, Metrics};
use netport_proto::tls::Credentials;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde_json::{Value, json};

use super::{Server, lock};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HashLabel {
    hash: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct DirectionLabel {
    pub direction: String,
}

/// The outcome of the latest reload attempts, for `/status`.
#[derive(Debug, Default, Clone)]
pub(super) struct ReloadStatus {
    /// Unix seconds the running policy was loaded.
    pub loaded_at: i64,
    /// Unix seconds of the latest attempt (accepted, rejected or unchanged).
    pub last_attempt: Option<i64>,
    /// The latest rejection's message, cleared by the next accepted reload.
    pub last_error: Option<String>,
    /// When that rejection happened.
    pub last_error_at: Option<i64>,
    /// The content key of the files last rejected: the same files are not checked again.
    pub rejected_content: Option<String>,
}

/// netportd's observability state, created before the policy is loaded so `/readyz` can say
/// "not yet".
pub struct Observe {
    metrics: Metrics,
    portals: Gauge,
    relays: Gauge,
    links: Gauge,
    pub(super) links_opened: Counter,
    denies: Family<ReasonLabel, Counter>,
    pub(super) reloads: Family<ResultLabel, Counter>,
    pub(super) reload_failures: Counter,
    pub(super) streams_closed: Counter,
    pub(super) stream_bytes: Family<DirectionLabel, Counter>,
    policy_info: Family<HashLabel, Gauge>,
    policy_loaded: Gauge,
    pub(super) reload: Mutex<ReloadStatus>,
    /// Why the server is not serving yet (waiting for a valid policy), if it is not.
    pub(super) waiting: Mutex<Option<String>>,
    ready: AtomicBool,
    server: OnceLock<Weak<Server>>,
    audit: Option<Mutex<Box<dyn Write + Send>>>,
}

impl std::fmt::Debug for Observe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observe")
            .field("audit", &self.audit.is_some())
            .finish_non_exhaustive()
    }
}

impl Observe {
    /// Metrics for `creds`, and the audit log: `None` for none, `-` for stdout, else a file
    /// appended to (created with mode 0640).
    pub fn new(creds: &Credentials, audit: Option<&Path>) -> Result<Self> {
        let mut metrics = Metrics::new(creds);
        let r = &mut metrics.registry;
        let portals = Gauge::default();
        r.register(
            "portals_connected",
            "Portals with a live control session",
            portals.clone(),
        );
        let relays = Gauge::default();
        r.register(
            "relays_connected",
            "Relays with a live control session",
            relays.clone(),
        );
        let links = Gauge::default();
        r.register(
            "links",
            "Links set up through a relay and not yet closed",
            links.clone(),
        );
        let links_opened = Counter::default();
        r.register(
            "links_opened",
            "Link requests allowed and allocated",
            links_opened.clone(),
        );
        let denies = Family::<ReasonLabel, Counter>::default();
        r.register(
            "denies",
            "Link requests denied, by reason code",
            denies.clone(),
        );
        let reloads = Family::<ResultLabel, Counter>::default();
        r.register(
            "reloads",
            "Policy reload attempts by result (accepted, rejected, unchanged)",
            reloads.clone(),
        );
        let reload_failures = Counter::default();
        r.register(
            "reload_failures",
            "Policy reloads rejected (the last good policy stayed in force)",
            reload_failures.clone(),
        );
        let streams_closed = Counter::default();
        r.register(
            "streams_closed",
            "Streams the client portals reported closed",
            streams_closed.clone(),
        );
        let stream_bytes = Family::<DirectionLabel, Counter>::default();
        r.register(
            "stream_bytes",
            "Bytes of closed streams as the client portals reported them (to_service, from_service)",
            stream_bytes.clone(),
        );
        let policy_info = Family::<HashLabel, Gauge>::default();
        r.register(
            "policy_info",
            "The loaded policy: its hash is the label, the value is 1",
            policy_info.clone(),
        );
        let policy_loaded = Gauge::default();
        r.register(
            "policy_loaded_timestamp_seconds",
            "Unix time the running policy was loaded",
            policy_loaded.clone(),
        );
        let audit: Option<Mutex<Box<dyn Write + Send>>> = match audit {
            None => None,
            Some(p) if p == Path::new("-") => Some(Mutex::new(Box::new(std::io::stdout()))),
            Some(p) => {
                use std::os::unix::fs::OpenOptionsExt;
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o640)
                    .open(p)
                    .with_context(|| {
                        format!("`audit_log`: cannot open {} for appending", p.display())
                    })?;
                Some(Mutex::new(Box::new(f)))
            }
        };
        Ok(Self {
            metrics,
            portals,
            relays,
            links,
            links_opened,
            denies,
            reloads,
            reload_failures,
            streams_closed,
            stream_bytes,
            policy_info,
            policy_loaded,
            reload: Mutex::default(),
            waiting: Mutex::default(),
            ready: AtomicBool::new(false),
            server: OnceLock::new(),
            audit,
        })
    }

    /// The server is up: `/readyz` turns ready, `/status` shows its state.
    pub(super) fn serving(&self, server: &Arc<Server>) {
        let _ = self.server.set(Arc::downgrade(server));
        *lock(&self.waiting) = None;
        self.ready.store(true, Ordering::Release);
    }

    /// Records the policy now in force.
    pub(super) fn policy_loaded(&self, hash: &str) {
        let now = admin::unix_now();
        self.policy_info.clear();
        self.policy_info
            .get_or_create(&HashLabel {
                hash: hash.to_string(),
            })
            .set(1);
        self.policy_loaded.set(now);
        let mut r = lock(&self.reload);
        r.loaded_at = now;
        r.last_error = None;
        r.last_error_at = None;
        r.rejected_content = None;
    }

    /// Counts a reload attempt; a rejection keeps its message (and the content key of the
    /// rejected files) for `/status`.
    pub(super) fn reload_attempt(&self, result: &str, error: Option<(&str, &str)>) {
        self.reloads
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
        let now = admin::unix_now();
        let mut r = lock(&self.reload);
        r.last_attempt = Some(now);
        match error {
            Some((content, e)) => {
                self.reload_failures.inc();
                r.last_error = Some(e.to_string());
                r.last_error_at = Some(now);
                r.rejected_content = Some(content.to_string());
            }
            None => {
                // The files in force are the good ones again (a revert, or a new policy).
                r.rejected_content = None;
                r.last_error = None;
                r.last_error_at = None;
            }
        }
    }

    /// A refused link request: counted by reason and written as a `decision` audit event
    /// (`fields` adds what the caller knows: portal, key, rule, ...).
    pub(super) fn denied(&self, reason: &str, mut fields: Value) {
        self.denies
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
        if let Value::Object(map) = &mut fields {
            map.insert("verdict".into(), Value::String("deny".into()));
            map.insert("reason".into(), Value::String(reason.into()));
        }
        self.audit("decision", fields);
    }

    /// Writes one audit event: `event` names it, `ts` is added.
    pub(super) fn audit(&self, event: &str, mut fields: Value) {
        let Some(out) = &self.audit else { return };
        if let Value::Object(map) = &mut fields {
            map.insert("event".into(), Value::String(event.into()));
            map.insert("ts".into(), Value::String(rfc3339_now()));
        }
        let mut line = fields.to_string();
        line.push('\n');
        let mut out = lock(out);
        if let Err(e) = out.write_all(line.as_bytes()).and_then(|()| out.flush()) {
            tracing::error!("cannot write the audit log: {e}");
        }
    }

    fn server(&self) -> Option<Arc<Server>> {
        self.server.get().and_then(Weak::upgrade)
    }
}

/// Now as RFC 3339 with milliseconds, UTC.
fn rfc3339_now() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now
        .replace_nanosecond(now.millisecond() as u32 * 1_000_000)
        .unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The admin endpoint's view of netportd.
#[derive(Debug)]
pub struct Admin(pub Arc<Observe>);

impl AdminState for Admin {
    fn metrics(&self) -> String {
        if let Some(s) = self.0.server() {
            self.0.portals.set(lock(&s.portals).len() as i64);
            self.0.relays.set(lock(&s.relays).len() as i64);
            self.0.links.set(lock(&s.links).len() as i64);
        }
        self.0.metrics.render()
    }

    fn ready(&self) -> bool {
        self.0.ready.load(Ordering::Acquire)
    }

    fn status(&self) -> Value {
        let obs = &self.0;
        let r = lock(&obs.reload).clone();
        let reload = json!({
            "loaded_at": r.loaded_at,
            "last_attempt": r.last_attempt,
            "last_error": r.last_error,
            "last_error_at": r.last_error_at,
            "failures": obs.reload_failures.get(),
        });
        let Some(server) = obs.server() else {
            return json!({
                "ready": false,
                "waiting_for": lock(&obs.waiting).clone(),
                "reload": reload,
            });
        };
        let policy = server.policy();
        let mut portals: Vec<Value> = lock(&server.portals)
            .iter()
            .map(|(name, h)| {
                json!({
                    "name": name,
                    "address": h.peer.to_string(),
                    "spki_sha256": hex::encode(h.spki),
                    "connected_at": h.connected_at,
                })
            })
            .collect();
        portals.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        let mut relays: Vec<Value> = lock(&server.relays)
            .iter()
            .map(|(name, h)| {
                json!({
                    "name": name,
                    "address": h.peer.to_string(),
                    "live": h.live,
                    "capacity": h.capacity,
                    "connected_at": h.connected_at,
                })
            })
            .collect();
        relays.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        json!({
            "ready": true,
            "policy": {
                "hash": policy.hash,
                "portals": policy.portals.len(),
                "services": policy.services.len(),
                "access_rules": policy.access.len(),
                "relays": policy.relays.len(),
            },
            "reload": reload,
            "portals": portals,
            "relays": relays,
            "links": lock(&server.links).len(),
        })
    }
}
