//! What changes between two policies: grants gained and lost, relays, revocations.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::compiled::{Policy, Protocol, Relay};

/// One effective grant: this portal listens here for that service, which dials this target.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Grant {
    /// The client portal.
    pub portal: String,
    /// Where it listens.
    pub listen: String,
    /// The service.
    pub service: String,
    /// What the serving portal dials.
    pub target: String,
    /// Transport.
    pub protocol: Protocol,
    /// The access rule that grants it (informational: renaming a rule changes no grant).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub rule: String,
}

impl Grant {
    fn key(&self) -> (&str, &str, &str, &str, Protocol) {
        (
            &self.portal,
            &self.listen,
            &self.service,
            &self.target,
            self.protocol,
        )
    }
}

/// A relay whose definition changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RelayChange {
    /// Before.
    pub old: Relay,
    /// After.
    pub new: Relay,
}

/// The difference between two policies.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PolicyDiff {
    /// Old policy hash.
    pub old_hash: String,
    /// New policy hash.
    pub new_hash: String,
    /// Grants only the new policy has.
    pub grants_added: Vec<Grant>,
    /// Grants only the old policy has.
    pub grants_removed: Vec<Grant>,
    /// Relays only the new policy has.
    pub relays_added: Vec<Relay>,
    /// Relays only the old policy has.
    pub relays_removed: Vec<Relay>,
    /// Relays in both, defined differently.
    pub relays_changed: Vec<RelayChange>,
    /// Keys revoked by the new policy.
    pub revoked_added: Vec<String>,
    /// Keys no longer revoked.
    pub revoked_removed: Vec<String>,
}

impl PolicyDiff {
    /// Whether the two policies grant and revoke the same.
    pub fn is_empty(&self) -> bool {
        self.grants_added.is_empty()
            && self.grants_removed.is_empty()
            && self.relays_added.is_empty()
            && self.relays_removed.is_empty()
            && self.relays_changed.is_empty()
            && self.revoked_added.is_empty()
            && self.revoked_removed.is_empty()
    }
}

impl Policy {
    /// Every effective grant: what `decide` would permit, as (portal, listen, service, target)
    /// tuples, sorted. Revoked portals and services of revoked portals grant nothing.
    pub fn grants(&self) -> Vec<Grant> {
        let mut out = Vec::new();
        for (r, rule) in self.access.iter().enumerate() {
            let Some(service) = self.services.get(rule.service_idx as usize) else {
                continue;
            };
            if self
                .portals
                .get(service.portal_idx as usize)
                .is_none_or(|p| p.revoked)
            {
                continue;
            }
            for &p in &rule.portal_idx {
                let portal = &self.portals[p as usize];
                if portal.revoked {
                    continue;
                }
                out.push(Grant {
                    portal: portal.name.clone(),
                    listen: rule.listen.clone(),
                    service: service.name.clone(),
                    target: service.target.clone(),
                    protocol: service.protocol,
                    rule: self.access[r].name.clone(),
                });
            }
        }
        out.sort();
        out
    }
}

/// Compares two policies.
pub fn diff(old: &Policy, new: &Policy) -> PolicyDiff {
    if old.hash == new.hash {
        // The hash covers every grant, relay and revocation.
        return PolicyDiff {
            old_hash: old.hash.clone(),
            new_hash: new.hash.clone(),
            ..PolicyDiff::default()
        };
    }
    let old_grants = old.grants();
    let new_grants = new.grants();
    let old_keys: BTreeSet<_> = old_grants.iter().map(Grant::key).collect();
    let new_keys: BTreeSet<_> = new_grants.iter().map(Grant::key).collect();
    let grants_added = new_grants
        .iter()
        .filter(|g| !old_keys.contains(&g.key()))
        .cloned()
        .collect();
    let grants_removed = old_grants
        .iter()
        .filter(|g| !new_keys.contains(&g.key()))
        .cloned()
        .collect();

    let old_relays: BTreeMap<&str, &Relay> =
        old.relays.iter().map(|r| (r.name.as_str(), r)).collect();
    let new_relays: BTreeMap<&str, &Relay> =
        new.relays.iter().map(|r| (r.name.as_str(), r)).collect();
    let same = |a: &Relay, b: &Relay| {
        a.address == b.address
            && a.port_first == b.port_first
            && a.port_last == b.port_last
            && a.tags == b.tags
    };
    let relays_added = new_relays
        .iter()
        .filter(|(n, _)| !old_relays.contains_key(*n))
        .map(|(_, r)| (*r).clone())
        .collect();
    let relays_removed = old_relays
        .iter()
        .filter(|(n, _)| !new_relays.contains_key(*n))
        .map(|(_, r)| (*r).clone())
        .collect();
    let relays_changed = old_relays
        .iter()
        .filter_map(|(n, o)| {
            let nr = new_relays.get(n)?;
            (!same(o, nr)).then(|| RelayChange {
                old: (*o).clone(),
                new: (*nr).clone(),
            })
        })
        .collect();

    let old_rev: BTreeSet<&str> = old.revoked.iter().map(|r| r.spki_sha256.as_str()).collect();
    let new_rev: BTreeSet<&str> = new.revoked.iter().map(|r| r.spki_sha256.as_str()).collect();
    PolicyDiff {
        old_hash: old.hash.clone(),
        new_hash: new.hash.clone(),
        grants_added,
        grants_removed,
        relays_added,
        relays_removed,
        relays_changed,
        revoked_added: new_rev
            .difference(&old_rev)
            .map(|s| s.to_string())
            .collect(),
        revoked_removed: old_rev
            .difference(&new_rev)
            .map(|s| s.to_string())
            .collect(),
    }
}
