//! A compact, content-addressed form of a compiled policy, so a command that only reads the
//! policy (`netportd explain`) can skip parsing and checking when the files have not changed.
//!
//! The key covers the engine version, the schema and every file's path and bytes: the same
//! key means the same inputs, so the thawed policy is exactly what `check` would compile.
//! Thawing never panics; anything unexpected is a miss.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::compiled::{
    AccessRule, Index, Names, Origin, Policy, Portal, Protocol, Relay, Revocation, Service,
    name_index,
};
use crate::source::SourceFile;

/// Bump when the frozen layout changes.
const FORMAT: u32 = 1;

/// The key of a set of policy files for this engine.
pub fn input_key(sources: &[SourceFile]) -> String {
    let mut h = Sha256::new();
    h.update(b"netport-policy\0");
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(FORMAT.to_le_bytes());
    h.update(crate::SCHEMA.as_bytes());
    for s in sources {
        h.update((s.path.len() as u64).to_le_bytes());
        h.update(s.path.as_bytes());
        h.update((s.content.len() as u64).to_le_bytes());
        h.update(s.content.as_bytes());
    }
    hex::encode(h.finalize())
}

#[derive(Serialize, Deserialize)]
struct Frozen {
    format: u32,
    key: String,
    hash: String,
    files: Vec<String>,
    portals: Vec<FPortal>,
    relays: Vec<FRelay>,
    services: Vec<FService>,
    access: Vec<FAccess>,
    revoked: Vec<FRevocation>,
    relays_by_rule: Vec<Vec<u32>>,
}

#[derive(Serialize, Deserialize)]
struct FOrigin(u32, u32);

#[derive(Serialize, Deserialize)]
struct FPortal {
    name: String,
    tags: Vec<String>,
    spki_sha256: Option<String>,
    legacy_id: Option<String>,
    legacy_user: Option<String>,
    revoked: bool,
    pin: Option<[u8; 32]>,
    origin: FOrigin,
}

#[derive(Serialize, Deserialize)]
struct FRelay {
    name: String,
    address: String,
    port_first: u16,
    port_last: u16,
    tags: Vec<String>,
    origin: FOrigin,
}

#[derive(Serialize, Deserialize)]
struct FService {
    name: String,
    portal: String,
    target: String,
    udp: bool,
    portal_idx: u32,
    origin: FOrigin,
}

#[derive(Serialize, Deserialize)]
struct FAccess {
    name: String,
    from: Vec<String>,
    listen: String,
    service: String,
    relay_selectors: Vec<String>,
    relays: Vec<String>,
    listen_addr: Option<SocketAddr>,
    portal_idx: Vec<u32>,
    service_idx: u32,
    origin: FOrigin,
}

#[derive(Serialize, Deserialize)]
struct FRevocation {
    spki_sha256: String,
    reason: String,
    origin: FOrigin,
}

impl Policy {
    /// The policy in frozen form, tagged with the input `key` it was compiled from
    /// ([`input_key`]). Embedded tests are not kept: they ran when the policy was checked.
    pub fn freeze(&self, key: &str) -> Vec<u8> {
        let mut files: Vec<Arc<str>> = Vec::new();
        let mut origin = |o: &Origin| {
            let i = match files
                .iter()
                .position(|f| Arc::ptr_eq(f, &o.file) || *f == o.file)
            {
                Some(i) => i,
                None => {
                    files.push(o.file.clone());
                    files.len() - 1
                }
            };
            FOrigin(i as u32, o.line as u32)
        };
        let frozen = Frozen {
            format: FORMAT,
            key: key.to_string(),
            hash: self.hash.clone(),
            portals: self
                .portals
                .iter()
                .map(|p| FPortal {
                    name: p.name.clone(),
                    tags: p.tags.clone(),
                    spki_sha256: p.spki_sha256.clone(),
                    legacy_id: p.legacy_id.clone(),
                    legacy_user: p.legacy_user.clone(),
                    revoked: p.revoked,
                    pin: p.pin,
                    origin: origin(&p.origin),
                })
                .collect(),
            relays: self
                .relays
                .iter()
                .map(|r| FRelay {
                    name: r.name.clone(),
                    address: r.address.clone(),
                    port_first: r.port_first,
                    port_last: r.port_last,
                    tags: r.tags.clone(),
                    origin: origin(&r.origin),
                })
                .collect(),
            services: self
                .services
                .iter()
                .map(|s| FService {
                    name: s.name.clone(),
                    portal: s.portal.clone(),
                    target: s.target.clone(),
                    udp: s.protocol == Protocol::Udp,
                    portal_idx: s.portal_idx,
                    origin: origin(&s.origin),
                })
                .collect(),
            access: self
                .access
                .iter()
                .map(|a| FAccess {
                    name: a.name.clone(),
                    from: a.from.clone(),
                    listen: a.listen.clone(),
                    service: a.service.clone(),
                    relay_selectors: a.relay_selectors.clone(),
                    relays: a.relays.clone(),
                    listen_addr: a.listen_addr,
                    portal_idx: a.portal_idx.clone(),
                    service_idx: a.service_idx,
                    origin: origin(&a.origin),
                })
                .collect(),
            revoked: self
                .revoked
                .iter()
                .map(|r| FRevocation {
                    spki_sha256: r.spki_sha256.clone(),
                    reason: r.reason.clone(),
                    origin: origin(&r.origin),
                })
                .collect(),
            relays_by_rule: self.index.relays_by_rule.clone(),
            files: Vec::new(),
        };
        let frozen = Frozen {
            files: files.iter().map(|f| f.to_string()).collect(),
            ..frozen
        };
        postcard::to_stdvec(&frozen).unwrap_or_default()
    }

    /// The policy frozen with `key`, or `None` when the bytes are of another key, another
    /// engine, or damaged.
    pub fn thaw(bytes: &[u8], key: &str) -> Option<Policy> {
        let f: Frozen = postcard::from_bytes(bytes).ok()?;
        if f.format != FORMAT || f.key != key {
            return None;
        }
        let files: Vec<Arc<str>> = f.files.iter().map(|s| Arc::from(s.as_str())).collect();
        let origin = |o: &FOrigin| -> Option<Origin> {
            Some(Origin {
                file: files.get(o.0 as usize)?.clone(),
                line: o.1 as usize,
            })
        };
        let (np, ns, nr) = (f.portals.len(), f.services.len(), f.relays.len());
        let portals = f
            .portals
            .into_iter()
            .map(|p| {
                Some(Portal {
                    origin: origin(&p.origin)?,
                    name: p.name,
                    tags: p.tags,
                    spki_sha256: p.spki_sha256,
                    legacy_id: p.legacy_id,
                    legacy_user: p.legacy_user,
                    revoked: p.revoked,
                    pin: p.pin,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let relays = f
            .relays
            .into_iter()
            .map(|r| {
                Some(Relay {
                    origin: origin(&r.origin)?,
                    name: r.name,
                    address: r.address,
                    port_first: r.port_first,
                    port_last: r.port_last,
                    tags: r.tags,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let services = f
            .services
            .into_iter()
            .map(|s| {
                ((s.portal_idx as usize) < np).then_some(())?;
                Some(Service {
                    origin: origin(&s.origin)?,
                    name: s.name,
                    portal: s.portal,
                    target: s.target,
                    protocol: if s.udp { Protocol::Udp } else { Protocol::Tcp },
                    portal_idx: s.portal_idx,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let access = f
            .access
            .into_iter()
            .map(|a| {
                ((a.service_idx as usize) < ns).then_some(())?;
                a.portal_idx
                    .iter()
                    .all(|&p| (p as usize) < np)
                    .then_some(())?;
                Some(AccessRule {
                    origin: origin(&a.origin)?,
                    name: a.name,
                    from: a.from,
                    listen: a.listen,
                    service: a.service,
                    relay_selectors: a.relay_selectors,
                    relays: a.relays,
                    listen_addr: a.listen_addr,
                    portal_idx: a.portal_idx,
                    service_idx: a.service_idx,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let revoked = f
            .revoked
            .into_iter()
            .map(|r| {
                Some(Revocation {
                    origin: origin(&r.origin)?,
                    spki_sha256: r.spki_sha256,
                    reason: r.reason,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let ok_relays = f.relays_by_rule.len() == access.len()
            && f.relays_by_rule
                .iter()
                .flatten()
                .all(|&r| (r as usize) < nr);
        if !ok_relays {
            return None;
        }
        let keys: HashSet<[u8; 32]> = revoked
            .iter()
            .filter_map(|r| {
                let mut k = [0u8; 32];
                hex::decode_to_slice(&r.spki_sha256, &mut k).ok()?;
                Some(k)
            })
            .collect();
        let names = Names {
            portal: name_index(portals.iter().map(|p| p.name.as_str())),
            service: name_index(services.iter().map(|s| s.name.as_str())),
            relay: name_index(relays.iter().map(|r| r.name.as_str())),
        };
        let index = Index::build(names, &portals, &access, f.relays_by_rule, keys);
        Some(Policy {
            hash: f.hash,
            portals,
            relays,
            services,
            access,
            revoked,
            tests: Vec::new(),
            index,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::{SourceFile, check};

    const POLICY: &str = r#"
[[portal]]
name = "alice"
tags = ["dev"]
[[portal]]
name = "nas"
[[relay]]
name = "r1"
address = "relay.example.net"
[[service]]
name = "ssh"
portal = "nas"
target = "10.0.0.2:22"
[[access]]
name = "devs"
from = ["tag:dev"]
listen = "127.0.0.1:2222"
service = "ssh"
[[revoked]]
spki_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
"#;

    #[test]
    fn thawed_policy_decides_and_explains_like_the_original() {
        let sources = vec![SourceFile::new("p.toml", POLICY)];
        let key = super::input_key(&sources);
        let report = check(sources);
        let policy = report.policy.expect("valid policy");
        let bytes = policy.freeze(&key);
        let thawed = crate::Policy::thaw(&bytes, &key).expect("same key thaws");
        assert_eq!(thawed.hash, policy.hash);
        for (p, s) in [
            ("alice", "ssh"),
            ("nas", "ssh"),
            ("bob", "ssh"),
            ("alice", "web"),
        ] {
            assert_eq!(thawed.explain(p, s), policy.explain(p, s), "{p} -> {s}");
        }
        assert_eq!(thawed.grants(), policy.grants());
    }

    #[test]
    fn another_key_or_damaged_bytes_are_a_miss() {
        let sources = vec![SourceFile::new("p.toml", POLICY)];
        let key = super::input_key(&sources);
        let policy = check(sources).policy.expect("valid policy");
        let bytes = policy.freeze(&key);
        assert!(crate::Policy::thaw(&bytes, "other").is_none());
        for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
            assert!(crate::Policy::thaw(&bytes[..cut], &key).is_none());
        }
        let mut flipped = bytes.clone();
        for i in (0..flipped.len()).step_by(7) {
            flipped[i] ^= 0x5a;
            // Whatever comes out must not panic; a success must still be internally valid.
            if let Some(p) = crate::Policy::thaw(&flipped, &key) {
                let _ = p.explain("alice", "ssh");
            }
            flipped[i] ^= 0x5a;
        }
        let changed = vec![SourceFile::new("p.toml", POLICY.replace("2222", "2223"))];
        assert_ne!(super::input_key(&changed), key);
    }
}
