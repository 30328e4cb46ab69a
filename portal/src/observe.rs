//! The portal's metrics and admin endpoint.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use netport_common::admin::{AdminState, Metrics};
use netport_proto::tls::Credentials;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde_json::{Value, json};

use crate::Portal;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SideLabel {
    /// `client` (this portal's listener) or `serving` (this portal dials the target).
    side: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabel {
    side: String,
    /// `quic` or `tcp`: what the link runs over.
    transport: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CarrierLabel {
    /// `quic_datagram` or `stream`.
    carrier: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabel {
    side: String,
    /// `to_service` or `from_service`.
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

/// What the portal counts.
#[derive(Debug)]
pub struct Stats {
    metrics: Metrics,
    links: Family<SideLabel, Gauge>,
    link_transports: Family<TransportLabel, Gauge>,
    udp_carried: Family<CarrierLabel, Counter>,
    streams: Family<SideLabel, Gauge>,
    streams_opened: Family<SideLabel, Counter>,
    bytes: Family<BytesLabel, Counter>,
    denies: Family<ReasonLabel, Counter>,
    listeners: Gauge,
    /// A control session is up and the desired state applied.
    pub(crate) connected: AtomicBool,
}

/// Which end of a link a stream is on.
#[derive(Debug, Clone, Copy)]
pub enum Side {
    /// This portal accepted the connection on a listener.
    Client,
    /// This portal dialed the target.
    Serving,
}

impl Side {
    fn label(self) -> SideLabel {
        SideLabel {
            side: match self {
                Side::Client => "client",
                Side::Serving => "serving",
            }
            .into(),
        }
    }
}

/// A stream counted as open until dropped.
#[derive(Debug)]
pub struct StreamGuard {
    gauge: Gauge,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl Stats {
    pub fn new(creds: &Credentials) -> Self {
        let mut metrics = Metrics::new(creds);
        let r = &mut metrics.registry;
        let links = Family::<SideLabel, Gauge>::default();
        r.register("links", "Links up, by side", links.clone());
        let link_transports = Family::<TransportLabel, Gauge>::default();
        r.register(
            "link_transports",
            "Links up, by side and transport (quic or tcp)",
            link_transports.clone(),
        );
        let udp_carried = Family::<CarrierLabel, Counter>::default();
        r.register(
            "udp_link_datagrams",
            "UDP datagrams sent onto links, by carrier: quic_datagram (one QUIC datagram each) or stream (framed on the flow's stream)",
            udp_carried.clone(),
        );
        let streams = Family::<SideLabel, Gauge>::default();
        r.register(
            "streams",
            "Streams (connections) open on links, by side",
            streams.clone(),
        );
        let streams_opened = Family::<SideLabel, Counter>::default();
        r.register(
            "streams_opened",
            "Streams opened on links, by side",
            streams_opened.clone(),
        );
        let bytes = Family::<BytesLabel, Counter>::default();
        r.register(
            "stream_bytes",
            "Bytes carried by closed streams, by side and direction (to_service, from_service)",
            bytes.clone(),
        );
        let denies = Family::<ReasonLabel, Counter>::default();
        r.register(
            "denies",
            "Link requests netportd denied, by reason code",
            denies.clone(),
        );
        let listeners = Gauge::default();
        r.register(
            "listeners",
            "Listeners held as the policy says",
            listeners.clone(),
        );
        Self {
            metrics,
            links,
            link_transports,
            udp_carried,
            streams,
            streams_opened,
            bytes,
            denies,
            listeners,
            connected: AtomicBool::new(false),
        }
    }

    /// Counts a stream open until the guard drops.
    pub(crate) fn stream(&self, side: Side) -> StreamGuard {
        self.streams_opened.get_or_create(&side.label()).inc();
        let gauge = self.streams.get_or_create(&side.label()).clone();
        gauge.inc();
        StreamGuard { gauge }
    }

    pub(crate) fn stream_bytes(&self, side: Side, to_service: u64, from_service: u64) {
        for (direction, n) in [("to_service", to_service), ("from_service", from_service)] {
            self.bytes
                .get_or_create(&BytesLabel {
                    side: side.label().side,
                    direction: direction.into(),
                })
                .inc_by(n);
        }
    }

    /// Counts a link up, by side and by transport (`quic` or `tcp`), until the guards drop.
    pub(crate) fn link(&self, side: Side, transport: &str) -> [StreamGuard; 2] {
        let gauge = self.links.get_or_create(&side.label()).clone();
        gauge.inc();
        let by_transport = self
            .link_transports
            .get_or_create(&TransportLabel {
                side: side.label().side,
                transport: transport.into(),
            })
            .clone();
        by_transport.inc();
        [
            StreamGuard { gauge },
            StreamGuard {
                gauge: by_transport,
            },
        ]
    }

    /// The counters of UDP datagrams sent onto links: as QUIC datagrams, on streams.
    pub(crate) fn udp_carriers(&self) -> [Counter; 2] {
        ["quic_datagram", "stream"].map(|c| {
            self.udp_carried
                .get_or_create(&CarrierLabel { carrier: c.into() })
                .clone()
        })
    }

    pub(crate) fn denied(&self, reason: &str) {
        self.denies
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }
}

/// The admin endpoint's view of the portal.
#[derive(Debug)]
pub struct Admin(pub Arc<Portal>);

impl AdminState for Admin {
    fn metrics(&self) -> String {
        let stats = &self.0.stats;
        stats.listeners.set(self.0.listeners.count() as i64);
        stats.metrics.render()
    }

    fn ready(&self) -> bool {
        self.0.stats.connected.load(Ordering::Relaxed)
    }

    fn status(&self) -> Value {
        json!({
            "identity": self.0.config.credentials.identity().to_string(),
            "connected": self.ready(),
            "listeners": self.0.listeners.describe(),
        })
    }
}
