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
    /// The file, as shown in diagnostics (shared by every definition in it).
    pub file: std::sync::Arc<str>,
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
    /// The portals this rule's selectors match, in name order.
    pub fn portals<'p>(&'p self, policy: &'p Policy) -> impl Iterator<Item = &'p Portal> + 'p {
        self.portal_idx
            .iter()
            .map(move |&p| &policy.portals[p as usize])
    }

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
    /// Per portal: (service, rule) pairs sorted by service, then rule name, so `decide` finds
    /// the deciding rule with one binary search.
    pub grants: Grants,
    /// Relay indexes each access rule may use.
    pub relays_by_rule: Vec<Vec<u32>>,
    pub revoked: HashSet<[u8; 32]>,
}

/// Name → position maps of the sorted portals, services and relays.
#[derive(Debug, Default)]
pub(crate) struct Names {
    pub portal: HashMap<String, u32>,
    pub service: HashMap<String, u32>,
    pub relay: HashMap<String, u32>,
}

/// Maps each name to its position.
pub(crate) fn name_index<'a>(names: impl Iterator<Item = &'a str>) -> HashMap<String, u32> {
    names
        .enumerate()
        .map(|(i, n)| (n.to_string(), i as u32))
        .collect()
}

impl Index {
    /// Builds the lookup tables from the sorted definitions (shared by compilation and by
    /// [`Policy::thaw`]).
    /// `names` are the portal, service and relay name maps (see [`name_index`]): the checker
    /// has built them already, so they are handed over rather than built twice.
    pub(crate) fn build(
        names: Names,
        portals: &[Portal],
        access: &[AccessRule],
        relays_by_rule: Vec<Vec<u32>>,
        revoked: HashSet<[u8; 32]>,
    ) -> Index {
        let mut rules_by_service = vec![Vec::new(); names.service.len()];
        for (r, rule) in access.iter().enumerate() {
            if let Some(list) = rules_by_service.get_mut(rule.service_idx as usize) {
                list.push(r as u32);
            }
        }
        let grants = Grants::build(portals.len(), access);
        Index {
            portal: names.portal,
            service: names.service,
            relay: names.relay,
            access: name_index(access.iter().map(|a| a.name.as_str())),
            rules_by_service,
            grants,
            relays_by_rule,
            revoked,
        }
    }
}

/// Every portal's (service, rule) pairs, sorted by service and then rule name, in one flat
/// array with offsets: two allocations however many portals there are.
#[derive(Debug, Clone, Default)]
pub(crate) struct Grants {
    start: Vec<u32>,
    pairs: Vec<(u32, u32)>,
}

impl Grants {
    fn build(portals: usize, access: &[AccessRule]) -> Grants {
        let mut start = vec![0u32; portals + 1];
        for rule in access {
            for &p in &rule.portal_idx {
                if let Some(n) = start.get_mut(p as usize + 1) {
                    *n += 1;
                }
            }
        }
        for i in 1..start.len() {
            start[i] += start[i - 1];
        }
        let mut fill = start.clone();
        let mut pairs = vec![(0u32, 0u32); start[portals] as usize];
        for (r, rule) in access.iter().enumerate() {
            for &p in &rule.portal_idx {
                if let Some(at) = fill.get_mut(p as usize) {
                    pairs[*at as usize] = (rule.service_idx, r as u32);
                    *at += 1;
                }
            }
        }
        // Rule indexes follow name order, so (service, rule) order is name order within a
        // service.
        for w in start.windows(2) {
            pairs[w[0] as usize..w[1] as usize].sort_unstable();
        }
        Grants { start, pairs }
    }

    /// The (service, rule) pairs of portal `p`.
    pub(crate) fn of(&self, p: u32) -> &[(u32, u32)] {
        let (Some(&a), Some(&b)) = (self.start.get(p as usize), self.start.get(p as usize + 1))
        else {
            return &[];
        };
        &self.pairs[a as usize..b as usize]
    }

    /// Number of portals covered.
    pub(crate) fn portals(&self) -> usize {
        self.start.len().saturating_sub(1)
    }
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
        /// Feeds serialized JSON straight into the hasher, without building the document.
        struct HashWriter(Sha256);
        impl std::io::Write for HashWriter {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.update(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let hashed = Hashed {
            format: 1,
            portals: &self.portals,
            relays: &self.relays,
            services: &self.services,
            access: &self.access,
            revoked: &self.revoked,
        };
        let mut w = HashWriter(Sha256::new());
        // Writing into a hasher cannot fail, and these types always serialize.
        let _ = serde_json::to_writer(&mut w, &hashed);
        self.hash = hex::encode(w.0.finalize());
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
        let mut rules: Vec<u32> = self
            .index
            .portal
            .get(portal)
            .filter(|&&p| !self.portals[p as usize].revoked)
            .map(|&p| self.index.grants.of(p).iter().map(|&(_, r)| r).collect())
            .unwrap_or_default();
        rules.sort_unstable();
        rules
            .into_iter()
            .map(|r| &self.access[r as usize])
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
