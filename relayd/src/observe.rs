//! relayd's metrics and admin endpoint.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use netport_common::admin::{AdminState, Metrics};
use netport_proto::tls::Credentials;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde_json::{Value, json};

use crate::pairing::{Allocations, Closed};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabel {
    /// The forwarding path: `tcp-userspace` (a copy loop in this process, a thread per direction), `tcp-splice`
    /// (splice(2) through pipes), `tcp-sockmap` (the kernel's sockmap), `udp-userspace`,
    /// `udp-xdp` (the kernel fast path), `legacy-userspace`.
    path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: String,
}

/// Counters the pairing code feeds.
#[derive(Debug)]
pub struct Stats {
    metrics: Metrics,
    allocations: Family<PathLabel, Gauge>,
    allocations_opened: Family<PathLabel, Counter>,
    bytes: Family<DirectionLabel, Counter>,
    /// Registered with a netportd right now.
    pub(crate) registered: AtomicBool,
}

/// Every forwarding path, so each has a series from the start.
const PATHS: [&str; 6] = [
    "tcp-userspace",
    "tcp-splice",
    "tcp-sockmap",
    "udp-userspace",
    "udp-xdp",
    "legacy-userspace",
];

impl Stats {
    pub fn new(creds: &Credentials) -> Self {
        let mut metrics = Metrics::new(creds);
        let r = &mut metrics.registry;
        let allocations = Family::<PathLabel, Gauge>::default();
        r.register(
            "allocations",
            "Live port-pair allocations, by forwarding path",
            allocations.clone(),
        );
        let allocations_opened = Family::<PathLabel, Counter>::default();
        r.register(
            "allocations_opened",
            "Port-pair allocations opened, by forwarding path",
            allocations_opened.clone(),
        );
        let bytes = Family::<DirectionLabel, Counter>::default();
        r.register(
            "relay_bytes",
            "Bytes forwarded by closed allocations (a_to_b: client portal to serving portal)",
            bytes.clone(),
        );
        Self {
            metrics,
            allocations,
            allocations_opened,
            bytes,
            registered: AtomicBool::new(false),
        }
    }

    pub(crate) fn opened(&self, path: &str) {
        self.allocations_opened
            .get_or_create(&PathLabel { path: path.into() })
            .inc();
    }

    pub(crate) fn closed(&self, c: &Closed) {
        for (direction, n) in [("a_to_b", c.a_to_b), ("b_to_a", c.b_to_a)] {
            self.bytes
                .get_or_create(&DirectionLabel {
                    direction: direction.into(),
                })
                .inc_by(n);
        }
    }
}

/// The admin endpoint's view of relayd.
#[derive(Debug)]
pub struct Admin {
    pub stats: Arc<Stats>,
    pub allocations: Allocations,
}

impl AdminState for Admin {
    fn metrics(&self) -> String {
        let live = self.allocations.live_by_path();
        for path in PATHS {
            let label = PathLabel { path: path.into() };
            let _ = self.stats.allocations_opened.get_or_create(&label);
            self.stats
                .allocations
                .get_or_create(&label)
                .set(live.get(path).copied().unwrap_or(0) as i64);
        }
        self.stats.metrics.render()
    }

    fn ready(&self) -> bool {
        self.stats.registered.load(Ordering::Relaxed)
    }

    fn status(&self) -> Value {
        json!({
            "registered": self.ready(),
            "allocations": self.allocations.live(),
            "capacity": self.allocations.capacity(),
        })
    }
}
