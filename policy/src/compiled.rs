//! The compiled policy: a deterministic, indexed table that the hot path reads.
//!
//! Everything is sorted by name, so two directories that say the same thing compile to the
//! same table and the same hash, whatever the file split or order.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;

use serde::Serialize;

/// Transport of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// A byte stream (default).
    Tcp,
    /// Datagrams.
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// Where a definition was written: `file:line`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    /// The file, as shown in diagnostics.
    pub file: String,
    /// 1-based line.
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// A portal: an identity.
#[derive(Debug, Clone, Serialize)]
pub struct Portal {
    /// Name (SAN URI netport://portal/<name>).
    pub name: String,
    /// Sorted, deduplicated tags.
    pub tags: Vec<String>,
    /// Pinned key, lower-case hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spki_sha256: Option<String>,
    /// Legacy PortalID, upper-case hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub legacy_id: Option<String>,
    /// Legacy UserID, upper-case hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub legacy_user: Option<String>,
    /// Whether the pinned key is revoked.
    pub revoked: bool,
    #[serde(skip)]
    pub(crate) pin: Option<[u8; 32]>,
    /// Where it was defined.
    #[serde(skip)]
    pub origin: Origin,
}

/// A relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Relay {
    /// Name (SAN URI netport://relay/<name>).
    pub name: String,
    /// Host or IP that portals dial.
    pub address: String,
    /// First port of the allocation range.
    pub port_first: u16,
    /// Last port of the allocation range.
    pub port_last: u16,
    /// Sorted, deduplicated tags.
    pub tags: Vec<String>,
    /// Where it was defined.
    #[serde(skip)]
    pub origin: Origin,
}

/// A service: a serving portal and the target it dials.
#[derive(Debug, Clone, Serialize)]
pub struct Service {
    /// Name.
    pub name: String,
    /// The serving portal.
    pub portal: String,
    /// Target as written, `host:port`.
    pub target: String,
    /// Transport.
    pub protocol: Protocol,
    #[serde(skip)]
    pub(crate) portal_idx: u32,
    /// Where it was defined.
    #[serde(skip)]
    pub origin: Origin,
}

/// An access rule, with its selectors expanded.
#[derive(Debug, Clone, Serialize)]
pub struct AccessRule {
    /// Name.
    pub name: String,
    /// Selectors as written (sorted).
    pub from: Vec<String>,
    /// The portals the selectors match (sorted names).
    pub portals: Vec<String>,
    /// Listen address as written.
    pub listen: String,
    /// The service granted.
    pub service: String,
    /// Relay selectors as written; empty means any relay.
    pub relay_selectors: Vec<String>,
    /// The relays that may carry the links (sorted names).
    pub relays: Vec<String>,
    #[serde(skip)]
    pub(crate) listen_addr: Option<SocketAddr>,
    #[serde(skip)]
    pub(crate) portal_idx: Vec<u32>,
    #[serde(skip)]
    pub(crate) service_idx: u32,
    /// Where it was defined.
    #[serde(skip)]
    pub origin: Origin,
}

impl AccessRule {
    /// The parsed listen address.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen_addr
    }
}

/// A revoked key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Revocation {
    /// Lower-case hex SHA-256 of the SubjectPublicKeyInfo.
    pub spki_sha256: String,
    /// Why.
    pub reason: String,
    /// Where it was defined.
    #[serde(skip)]
    pub origin: Origin,
}

/// What an embedded test expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    /// The request must be permitted.
    Allow,
    /// The request must be denied.
    Deny,
}

/// An embedded `[[test]]`.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyTest {
    /// Requesting portal.
    pub from: String,
    /// Requested service.
    pub service: String,
    /// Expected verdict.
    pub expect: Expect,
    /// Where it was defined.
    #[serde(skip)]
    pub origin: Origin,
    #[serde(skip)]
    pub(crate) label: (usize, std::ops::Range<usize>),
}

/// The compiled policy.
#[derive(Debug, Clone, Serialize)]
pub struct Policy {
    /// Content hash (SHA-256 hex of the canonical table): the policy version.
    pub hash: String,
    /// Portals, sorted by name.
    pub portals: Vec<Portal>,
    /// Relays, sorted by name.
    pub relays: Vec<Relay>,
    /// Services, sorted by name.
    pub services: Vec<Service>,
    /// Access rules, sorted by name.
    pub access: Vec<AccessRule>,
    /// Revoked keys, sorted.
    pub revoked: Vec<Revocation>,
    /// Embedded tests, in file order (not part of the hash).
    #[serde(skip)]
    pub tests: Vec<PolicyTest>,
    #[serde(skip)]
    pub(crate) index: Index,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Index {
    pub portal: HashMap<String, u32>,
    pub service: HashMap<String, u32>,
    pub relay: HashMap<String, u32>,
    pub access: HashMap<String, u32>,
    /// Access rules per service, in name order.
    pub rules_by_service: Vec<Vec<u32>>,
    /// Access rules per portal, in name order.
    pub rules_by_portal: Vec<Vec<u32>>,
    /// Relay indexes each access rule may use.
    pub relays_by_rule: Vec<Vec<u32>>,
    pub revoked: HashSet<[u8; 32]>,
}

/// The part of the policy that the hash covers.
#[derive(Serialize)]
struct Hashed<'a> {
    format: u32,
    portals: &'a [Portal],
    relays: &'a [Relay],
    services: &'a [Service],
    access: &'a [AccessRule],
    revoked: &'a [Revocation],
}

impl Policy {
    pub(crate) fn seal(mut self) -> Self {
        use sha2::{Digest, Sha256};
        let hashed = Hashed {
            format: 1,
            portals: &self.portals,
            relays: &self.relays,
            services: &self.services,
            access: &self.access,
            revoked: &self.revoked,
        };
        let bytes = serde_json::to_vec(&hashed).unwrap_or_default();
        self.hash = hex::encode(Sha256::digest(&bytes));
        self
    }

    /// The first 12 hex digits of the hash, for logs and humans.
    pub fn short_hash(&self) -> &str {
        &self.hash[..self.hash.len().min(12)]
    }

    /// A portal by name.
    pub fn portal(&self, name: &str) -> Option<&Portal> {
        self.index
            .portal
            .get(name)
            .map(|&i| &self.portals[i as usize])
    }

    /// A service by name.
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.index
            .service
            .get(name)
            .map(|&i| &self.services[i as usize])
    }

    /// A relay by name.
    pub fn relay(&self, name: &str) -> Option<&Relay> {
        self.index
            .relay
            .get(name)
            .map(|&i| &self.relays[i as usize])
    }

    /// An access rule by name.
    pub fn access_rule(&self, name: &str) -> Option<&AccessRule> {
        self.index
            .access
            .get(name)
            .map(|&i| &self.access[i as usize])
    }

    /// The access rules that give `portal` a listener (its desired state), in name order.
    /// A revoked portal gets none, and no listener is held for a service whose portal is
    /// revoked: the same requests `decide` would refuse.
    pub fn listeners_for(&self, portal: &str) -> impl Iterator<Item = &AccessRule> {
        let rules = self
            .index
            .portal
            .get(portal)
            .filter(|&&p| !self.portals[p as usize].revoked)
            .and_then(|&p| self.index.rules_by_portal.get(p as usize));
        rules
            .into_iter()
            .flatten()
            .map(|&r| &self.access[r as usize])
            .filter(|rule| {
                self.services
                    .get(rule.service_idx as usize)
                    .and_then(|s| self.portals.get(s.portal_idx as usize))
                    .is_some_and(|p| !p.revoked)
            })
    }

    /// Whether a key (raw SHA-256 of an SPKI) is revoked.
    pub fn is_revoked(&self, spki_sha256: &[u8; 32]) -> bool {
        self.index.revoked.contains(spki_sha256)
    }

    /// The portal with this legacy PortalID (8 hex digits, any case).
    pub fn portal_by_legacy_id(&self, legacy_id: &str) -> Option<&Portal> {
        self.portals.iter().find(|p| {
            p.legacy_id
                .as_deref()
                .is_some_and(|id| id.eq_ignore_ascii_case(legacy_id))
        })
    }
}
