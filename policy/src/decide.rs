//! Decisions: typed, default deny.

use std::fmt;

use serde::Serialize;

use crate::compiled::{AccessRule, Policy, Relay, Service};

/// A request to reach a service from a portal.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The requesting portal's name (from its certificate).
    pub portal: &'a str,
    /// The service it asks for.
    pub service: &'a str,
    /// SHA-256 of the key the portal presented, when known: checked against revocations and pins.
    pub spki_sha256: Option<&'a [u8; 32]>,
}

impl<'a> Request<'a> {
    /// A request without key information.
    pub fn new(portal: &'a str, service: &'a str) -> Self {
        Self {
            portal,
            service,
            spki_sha256: None,
        }
    }

    /// The same request, with the key the portal presented.
    pub fn with_key(mut self, spki_sha256: &'a [u8; 32]) -> Self {
        self.spki_sha256 = Some(spki_sha256);
        self
    }
}

/// A permitted request: the rule that matched, the service, and the relays that may carry it.
#[derive(Debug, Clone, Copy)]
pub struct Permit<'p> {
    /// The access rule that permits the request.
    pub rule: &'p AccessRule,
    /// The service reached.
    pub service: &'p Service,
    policy: &'p Policy,
    rule_idx: u32,
}

impl<'p> Permit<'p> {
    /// The relays that may carry this link (may be empty when the policy defines none).
    pub fn relays(&self) -> impl Iterator<Item = &'p Relay> + 'p {
        let policy = self.policy;
        policy.index.relays_by_rule[self.rule_idx as usize]
            .iter()
            .map(move |&r| &policy.relays[r as usize])
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DenyReason {
    /// The portal is not in the policy.
    UnknownPortal,
    /// The service is not in the policy.
    UnknownService,
    /// The portal's key is revoked.
    Revoked,
    /// The portal presented a key other than the one pinned for it.
    KeyMismatch,
    /// The portal serving the service is revoked.
    ServicePortalRevoked,
    /// No access rule grants this portal this service (the default).
    NoAccessRule,
}

impl DenyReason {
    /// The stable reason code: `no-access-rule`, `revoked`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::UnknownPortal => "unknown-portal",
            DenyReason::UnknownService => "unknown-service",
            DenyReason::Revoked => "revoked",
            DenyReason::KeyMismatch => "key-mismatch",
            DenyReason::ServicePortalRevoked => "service-portal-revoked",
            DenyReason::NoAccessRule => "no-access-rule",
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// Why.
    pub reason: DenyReason,
    /// The rule closest to granting it, when one exists: the rule that would have permitted
    /// it (revoked keys), or a rule for the same service that does not include this portal.
    pub closest: Option<String>,
}

impl Policy {
    /// Decides a request. Default deny.
    pub fn decide(&self, req: &Request<'_>) -> Result<Permit<'_>, Denied> {
        let deny = |reason, closest: Option<&AccessRule>| Denied {
            reason,
            closest: closest.map(|r| r.name.clone()),
        };
        let Some(&s) = self.index.service.get(req.service) else {
            return Err(deny(DenyReason::UnknownService, None));
        };
        let Some(&p) = self.index.portal.get(req.portal) else {
            return Err(deny(DenyReason::UnknownPortal, None));
        };
        let rules = &self.index.rules_by_service[s as usize];
        // The portal's grants are sorted by (service, rule name): the first entry for this
        // service is the deciding rule.
        let grants = self.index.grants.of(p);
        let first = grants.partition_point(|&(svc, _)| svc < s);
        let matched = grants
            .get(first)
            .filter(|&&(svc, _)| svc == s)
            .map(|&(_, r)| r);
        let portal = &self.portals[p as usize];
        let service = &self.services[s as usize];
        let would = matched.map(|r| &self.access[r as usize]);
        if portal.revoked || req.spki_sha256.is_some_and(|k| self.is_revoked(k)) {
            return Err(deny(DenyReason::Revoked, would));
        }
        if let (Some(pin), Some(key)) = (&portal.pin, req.spki_sha256)
            && pin != key
        {
            return Err(deny(DenyReason::KeyMismatch, would));
        }
        if self.portals[service.portal_idx as usize].revoked {
            return Err(deny(DenyReason::ServicePortalRevoked, would));
        }
        match matched {
            Some(r) => Ok(Permit {
                rule: &self.access[r as usize],
                service,
                policy: self,
                rule_idx: r,
            }),
            None => Err(deny(
                DenyReason::NoAccessRule,
                rules.first().map(|&r| &self.access[r as usize]),
            )),
        }
    }

    /// Explains the decision for `portal` asking for `service`: the verdict, the deciding
    /// rule and where it is written.
    pub fn explain(&self, portal: &str, service: &str) -> Explanation {
        let loc = |rule: &str| self.access_rule(rule).map(|r| r.origin.to_string());
        match self.decide(&Request::new(portal, service)) {
            Ok(permit) => {
                let relays: Vec<String> = permit.relays().map(|r| r.name.clone()).collect();
                let via = if relays.is_empty() {
                    " (but no relay is defined to carry it)".to_string()
                } else {
                    format!(" via {}", relays.join(", "))
                };
                Explanation {
                    verdict: Verdict::Allow,
                    rule: Some(permit.rule.name.clone()),
                    location: Some(permit.rule.origin.to_string()),
                    reason: None,
                    closest: None,
                    closest_location: None,
                    listen: Some(permit.rule.listen.clone()),
                    target: Some(permit.service.target.clone()),
                    relays,
                    message: format!(
                        "allow: access rule `{}` ({}) lets `{portal}` reach `{service}` ({}/{}) on {}{via}",
                        permit.rule.name,
                        permit.rule.origin,
                        permit.service.target,
                        permit.service.protocol,
                        permit.rule.listen,
                    ),
                }
            }
            Err(denied) => {
                let closest_location = denied.closest.as_deref().and_then(loc);
                let why = match denied.reason {
                    DenyReason::UnknownPortal => format!("there is no portal named `{portal}`"),
                    DenyReason::UnknownService => format!("there is no service named `{service}`"),
                    DenyReason::Revoked => format!("the key of portal `{portal}` is revoked"),
                    DenyReason::KeyMismatch => {
                        format!("portal `{portal}` presented a key other than its pinned one")
                    }
                    DenyReason::ServicePortalRevoked => {
                        format!("the portal serving `{service}` is revoked")
                    }
                    DenyReason::NoAccessRule => {
                        format!("no access rule grants `{portal}` the service `{service}`")
                    }
                };
                let closest = match (&denied.closest, &closest_location) {
                    (Some(c), Some(l)) if denied.reason == DenyReason::NoAccessRule => {
                        format!("; closest rule: `{c}` ({l}), which does not include `{portal}`")
                    }
                    (Some(c), Some(l)) => format!("; rule `{c}` ({l}) would otherwise allow it"),
                    _ => String::new(),
                };
                Explanation {
                    verdict: Verdict::Deny,
                    rule: None,
                    location: None,
                    reason: Some(denied.reason),
                    closest: denied.closest,
                    closest_location,
                    listen: None,
                    target: None,
                    relays: Vec::new(),
                    message: format!("deny ({}): {why}{closest}", denied.reason),
                }
            }
        }
    }
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Permitted.
    Allow,
    /// Refused.
    Deny,
}

/// What `netportd explain` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// `allow` or `deny`.
    pub verdict: Verdict,
    /// The rule that decided an allow.
    pub rule: Option<String>,
    /// Where that rule is written, `file:line`.
    pub location: Option<String>,
    /// For a deny: the reason code.
    pub reason: Option<DenyReason>,
    /// For a deny: the closest rule, if any.
    pub closest: Option<String>,
    /// Where the closest rule is written.
    pub closest_location: Option<String>,
    /// For an allow: where the client portal listens.
    pub listen: Option<String>,
    /// For an allow: what the serving portal dials.
    pub target: Option<String>,
    /// For an allow: the relays that may carry it.
    pub relays: Vec<String>,
    /// One readable sentence.
    pub message: String,
}
