//! The policy generator: a realistic, valid, deterministic policy of any size.
//!
//! The shape: portals belong to teams (a `team-*` tag of 10 to 100 portals), sites (a
//! `site-*` tag, mapped to a relay region) and roles (`laptop`, `server`, ...). Services are
//! served by server-like portals. Access rules grant a service to one or two team tags, to a
//! team plus a few named portals, or to a handful of named portals. Every rule listens on an
//! address no other rule uses, so no portal can get two listeners on one address (E0012).
//! Every service has a rule when there are at least as many rules as services (no W0004).
//! Revoked keys belong to client portals only (no W0001). Embedded tests are computed from
//! the generator's own model, so they pass by construction.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::rng::Rng;

/// What to generate.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Number of `[[portal]]`.
    pub portals: usize,
    /// Number of `[[service]]`.
    pub services: usize,
    /// Number of `[[access]]`.
    pub access: usize,
    /// Number of `[[test]]`.
    pub tests: usize,
    /// Seed of the generator.
    pub seed: u64,
    /// Definitions per file for the portal and access chunks.
    pub chunk: usize,
}

/// A generated portal.
#[derive(Debug, Clone)]
pub struct PortalDef {
    pub name: String,
    pub tags: Vec<String>,
    pub site: usize,
    pub server: bool,
    pub pin: Option<String>,
    pub legacy: Option<(String, String)>,
    pub revoked: bool,
}

/// A generated service.
#[derive(Debug, Clone)]
pub struct ServiceDef {
    pub name: String,
    pub portal: usize,
    pub target: String,
    pub udp: bool,
}

/// A generated relay.
#[derive(Debug, Clone)]
pub struct RelayDef {
    pub name: String,
    pub address: String,
    pub ports: String,
    pub tags: Vec<String>,
}

/// A generated access rule, with the portals its selectors match.
#[derive(Debug, Clone)]
pub struct RuleDef {
    pub name: String,
    pub from: Vec<String>,
    pub listen: String,
    pub service: usize,
    pub relays: Option<Vec<String>>,
    /// Indexes of the portals the selectors match, sorted.
    pub portals: Vec<usize>,
}

/// A generated embedded test.
#[derive(Debug, Clone)]
pub struct TestDef {
    pub portal: usize,
    pub service: usize,
    pub allow: bool,
}

/// A generated revocation.
#[derive(Debug, Clone)]
pub struct RevokedDef {
    pub spki: String,
    pub reason: String,
}

/// The whole generated policy, and enough of an index to know every expected decision.
#[derive(Debug, Clone)]
pub struct Model {
    pub params: Params,
    pub portals: Vec<PortalDef>,
    pub teams: Vec<String>,
    pub services: Vec<ServiceDef>,
    pub relays: Vec<RelayDef>,
    pub rules: Vec<RuleDef>,
    pub revoked: Vec<RevokedDef>,
    pub tests: Vec<TestDef>,
    /// Rules per service.
    pub rules_by_service: Vec<Vec<usize>>,
}

const REGIONS: [&str; 3] = ["eu", "us", "ap"];
/// (site code, region index)
const SITES: [(&str, usize); 12] = [
    ("ber", 0),
    ("ams", 0),
    ("par", 0),
    ("lon", 0),
    ("nyc", 1),
    ("sfo", 1),
    ("chi", 1),
    ("yyz", 1),
    ("sin", 2),
    ("tyo", 2),
    ("syd", 2),
    ("bom", 2),
];
/// (weight, (role, serves services))
const ROLES: [(usize, (&str, bool)); 8] = [
    (33, ("laptop", false)),
    (14, ("desktop", false)),
    (18, ("phone", false)),
    (5, ("ci-runner", false)),
    (15, ("server", true)),
    (6, ("nas", true)),
    (5, ("router", true)),
    (4, ("kiosk", false)),
];
const TEAMS: [&str; 16] = [
    "platform", "payments", "search", "infra", "data", "mobile", "web", "security", "sre", "ml",
    "billing", "growth", "support", "finance", "ops", "research",
];
/// (weight, (kind, port, udp))
const KINDS: [(usize, (&str, u16, bool)); 12] = [
    (20, ("ssh", 22, false)),
    (12, ("postgres", 5432, false)),
    (8, ("redis", 6379, false)),
    (12, ("http", 80, false)),
    (12, ("https", 443, false)),
    (5, ("rdp", 3389, false)),
    (4, ("vnc", 5900, false)),
    (5, ("grafana", 3000, false)),
    (4, ("mqtt", 1883, false)),
    (6, ("dns", 53, true)),
    (4, ("syslog", 514, true)),
    (8, ("wireguard", 51820, true)),
];
const RELAYS_PER_REGION: usize = 4;

/// Listen ports used: 1025..=65535.
const PORTS: usize = 65535 - 1025 + 1;
/// A stride coprime with `PORTS` (64511 = 31 × 2081), so ports look scattered yet never repeat.
const PORT_STRIDE: usize = 7919;

/// The listen address of rule `i`: unique for every `i` below 256 × 64511, so no two rules
/// ever give a portal the same address.
pub fn listen_for(i: usize) -> String {
    let port = 1025 + (i * PORT_STRIDE) % PORTS;
    let block = i / PORTS;
    format!("127.0.{}.{}:{port}", block / 255, block % 255 + 1)
}

impl Model {
    /// Generates a policy model.
    pub fn generate(params: Params) -> Result<Self> {
        if params.portals == 0 || params.services == 0 || params.access == 0 {
            bail!("--portals, --services and --access must all be at least 1");
        }
        if params.access > 255 * 255 * PORTS {
            bail!("--access is too large for unique listen addresses");
        }
        let mut rng = Rng::new(params.seed);

        // Portals, in teams of 10 to 100.
        let mut teams: Vec<String> = Vec::new();
        let mut team_members: Vec<Vec<usize>> = Vec::new();
        let mut portals = Vec::with_capacity(params.portals);
        let mut left_in_team = 0;
        let width = digits(params.portals).max(5);
        for i in 0..params.portals {
            if left_in_team == 0 {
                let t = teams.len();
                teams.push(format!(
                    "team-{}-{}",
                    TEAMS[t % TEAMS.len()],
                    t / TEAMS.len() + 1
                ));
                team_members.push(Vec::new());
                left_in_team = rng.range(10, 100);
            }
            left_in_team -= 1;
            let team = teams.len() - 1;
            team_members[team].push(i);
            // Teams mostly sit on one site, with some people elsewhere.
            let site = if rng.percent(80) {
                team % SITES.len()
            } else {
                rng.below(SITES.len())
            };
            let (role, server) = *rng.weighted(&ROLES);
            let name = format!("{role}-{}-{i:0width$}", SITES[site].0);
            let pin = rng.percent(30).then(|| rng.hex32());
            let legacy = rng.percent(2).then(|| {
                (
                    format!("{:08X}", 0x0A00_0000 + i as u32),
                    format!("{:08X}", 0x1100_0000 + team as u32),
                )
            });
            portals.push(PortalDef {
                name,
                tags: vec![
                    teams[team].clone(),
                    format!("site-{}", SITES[site].0),
                    role.into(),
                ],
                site,
                server,
                pin,
                legacy,
                revoked: false,
            });
        }
        let mut servers: Vec<usize> = (0..portals.len()).filter(|&i| portals[i].server).collect();
        if servers.is_empty() {
            servers = (0..portals.len()).collect();
            for &s in &servers {
                portals[s].server = true;
            }
        }

        // Relays: a few per region, each on its own host.
        let mut relays = Vec::new();
        for (r, region) in REGIONS.iter().enumerate() {
            for n in 1..=RELAYS_PER_REGION {
                let first = 40000 + 1000 * (n - 1);
                relays.push(RelayDef {
                    name: format!("relay-{region}-{n}"),
                    address: format!("relay-{region}-{n}.example.net"),
                    ports: format!("{first}-{}", first + 999),
                    tags: if n == 1 && r == 0 {
                        vec![(*region).into(), "primary".into()]
                    } else {
                        vec![(*region).into()]
                    },
                });
            }
        }

        // Services, served by server-like portals.
        let sw = digits(params.services).max(4);
        let mut services = Vec::with_capacity(params.services);
        for i in 0..params.services {
            let (kind, port, udp) = *rng.weighted(&KINDS);
            let portal = *rng.pick(&servers);
            let target = match rng.below(3) {
                0 => format!("127.0.0.1:{port}"),
                1 => format!(
                    "10.{}.{}.{}:{port}",
                    portals[portal].site,
                    rng.below(256),
                    rng.range(1, 254)
                ),
                _ => format!(
                    "{kind}{}.{}.lan:{port}",
                    i % 10,
                    SITES[portals[portal].site].0
                ),
            };
            services.push(ServiceDef {
                name: format!("{kind}-{i:0sw$}"),
                portal,
                target,
                udp,
            });
        }

        // Access rules. The first ones give every service a rule; the rest pick at random.
        let aw = digits(params.access).max(5);
        let mut rules = Vec::with_capacity(params.access);
        for i in 0..params.access {
            let service = if i < params.services {
                i
            } else {
                rng.below(params.services)
            };
            let mut members: BTreeSet<usize> = BTreeSet::new();
            let mut from = Vec::new();
            let team = rng.below(teams.len());
            let style = rng.below(100);
            let add_team = |t: usize, from: &mut Vec<String>, m: &mut BTreeSet<usize>| {
                from.push(format!("tag:{}", teams[t]));
                m.extend(&team_members[t]);
            };
            if style < 55 {
                add_team(team, &mut from, &mut members);
            } else if style < 70 {
                add_team(team, &mut from, &mut members);
                let other = rng.below(teams.len());
                if other != team {
                    add_team(other, &mut from, &mut members);
                }
            } else if style < 85 {
                add_team(team, &mut from, &mut members);
                for _ in 0..rng.range(1, 3) {
                    let p = rng.below(portals.len());
                    if members.insert(p) {
                        from.push(portals[p].name.clone());
                    }
                }
            } else {
                for _ in 0..rng.range(1, 5) {
                    let p = rng.below(portals.len());
                    if members.insert(p) {
                        from.push(portals[p].name.clone());
                    }
                }
            }
            let region = SITES[portals[services[service].portal].site].1;
            let relays_sel = match rng.below(100) {
                0..=29 => Some(vec![format!("tag:{}", REGIONS[region])]),
                30..=34 => Some(vec![
                    format!("relay-{}-1", REGIONS[region]),
                    format!("relay-{}-2", REGIONS[region]),
                ]),
                35..=37 => Some(vec![
                    "tag:primary".into(),
                    format!("tag:{}", REGIONS[region]),
                ]),
                _ => None,
            };
            let who = if from[0].starts_with("tag:team-") {
                from[0].trim_start_matches("tag:team-").to_string()
            } else {
                "direct".to_string()
            };
            rules.push(RuleDef {
                name: format!("{who}-{}-r{i:0aw$}", services[service].name),
                from,
                listen: listen_for(i),
                service,
                relays: relays_sel,
                portals: members.into_iter().collect(),
            });
        }
        let mut rules_by_service = vec![Vec::new(); services.len()];
        for (r, rule) in rules.iter().enumerate() {
            rules_by_service[rule.service].push(r);
        }

        // Revocations: keys of some pinned client portals (lost laptops), and keys of retired
        // certificates no portal pins any more.
        let mut revoked = Vec::new();
        let lost = (params.portals / 1000).max(1);
        for _ in 0..lost * 4 {
            if revoked.len() >= lost {
                break;
            }
            let p = rng.below(portals.len());
            let portal = &mut portals[p];
            if portal.server || portal.revoked {
                continue;
            }
            if let Some(pin) = &portal.pin {
                portal.revoked = true;
                revoked.push(RevokedDef {
                    spki: pin.clone(),
                    reason: format!("{} reported lost", portal.name),
                });
            }
        }
        for n in 0..(params.portals / 1000).max(2) {
            revoked.push(RevokedDef {
                spki: rng.hex32(),
                reason: format!("retired certificate #{}", n + 1),
            });
        }

        let mut model = Model {
            params,
            portals,
            teams,
            services,
            relays,
            rules,
            revoked,
            tests: Vec::new(),
            rules_by_service,
        };

        // Tests: half allow, half deny, computed from the model.
        let mut tests = Vec::new();
        let mut tries = 0;
        while tests.len() < params.tests && tries < params.tests * 100 {
            tries += 1;
            let t = if tests.len() % 2 == 0 {
                let r = &model.rules[rng.below(model.rules.len())];
                if r.portals.is_empty() {
                    continue;
                }
                let p = *rng.pick(&r.portals);
                TestDef {
                    portal: p,
                    service: r.service,
                    allow: model.allows(p, r.service),
                }
            } else {
                let p = rng.below(model.portals.len());
                let s = rng.below(model.services.len());
                TestDef {
                    portal: p,
                    service: s,
                    allow: model.allows(p, s),
                }
            };
            if t.allow == (tests.len() % 2 == 0) {
                tests.push(t);
            }
        }
        // And one about a lost laptop, if it has any rule.
        if let Some(p) = model.portals.iter().position(|p| p.revoked)
            && let Some(r) = model.rules.iter().find(|r| r.portals.contains(&p))
        {
            tests.push(TestDef {
                portal: p,
                service: r.service,
                allow: false,
            });
        }
        model.tests = tests;
        Ok(model)
    }

    /// Whether the policy must permit `portal` to reach `service` (requests without a key).
    pub fn allows(&self, portal: usize, service: usize) -> bool {
        !self.portals[portal].revoked
            && !self.portals[self.services[service].portal].revoked
            && self.rules_by_service[service]
                .iter()
                .any(|&r| self.rules[r].portals.binary_search(&portal).is_ok())
    }

    /// Writes the policy below `out`, split into several files. Returns the files written.
    pub fn write(&self, out: &Path) -> Result<Vec<String>> {
        let mut files: Vec<(String, String)> = Vec::new();
        let header = |what: &str| {
            format!(
                "#:schema https://netport.dev/schema/policy.schema.json\n\
                 # {what}\n\
                 # Generated by `netport-bench gen` (seed {}): {} portals, {} services, {} access rules.\n\n",
                self.params.seed, self.params.portals, self.params.services, self.params.access
            )
        };
        let chunk = self.params.chunk.max(1);

        for (n, part) in self.portals.chunks(chunk).enumerate() {
            let mut s = header("Portals: identities, tagged by team, site and role.");
            for p in part {
                let _ = writeln!(s, "[[portal]]\nname = \"{}\"", p.name);
                let _ = writeln!(s, "tags = [{}]", quoted(&p.tags));
                if let Some(pin) = &p.pin {
                    let _ = writeln!(s, "spki_sha256 = \"{pin}\"");
                }
                if let Some((id, user)) = &p.legacy {
                    let _ = writeln!(s, "legacy_id = \"{id}\"\nlegacy_user = \"{user}\"");
                }
                s.push('\n');
            }
            files.push((format!("portals/portals-{n:03}.toml"), s));
        }

        let mut s = header("Relays: three regions.");
        for r in &self.relays {
            let _ = writeln!(
                s,
                "[[relay]]\nname = \"{}\"\naddress = \"{}\"\nports = \"{}\"\ntags = [{}]\n",
                r.name,
                r.address,
                r.ports,
                quoted(&r.tags)
            );
        }
        files.push(("relays.toml".into(), s));

        let mut s = header("Services: what server-like portals expose.");
        for v in &self.services {
            let _ = writeln!(
                s,
                "[[service]]\nname = \"{}\"\nportal = \"{}\"\ntarget = \"{}\"",
                v.name, self.portals[v.portal].name, v.target
            );
            if v.udp {
                let _ = writeln!(s, "protocol = \"udp\"");
            }
            s.push('\n');
        }
        files.push(("services.toml".into(), s));

        for (n, part) in self.rules.chunks(chunk).enumerate() {
            let mut s = header("Access rules.");
            for r in part {
                let _ = writeln!(
                    s,
                    "[[access]]\nname = \"{}\"\nfrom = [{}]\nlisten = \"{}\"\nservice = \"{}\"",
                    r.name,
                    quoted(&r.from),
                    r.listen,
                    self.services[r.service].name
                );
                if let Some(relays) = &r.relays {
                    let _ = writeln!(s, "relays = [{}]", quoted(relays));
                }
                s.push('\n');
            }
            files.push((format!("access/access-{n:03}.toml"), s));
        }

        let mut s = header("Revoked keys.");
        for r in &self.revoked {
            let _ = writeln!(
                s,
                "[[revoked]]\nspki_sha256 = \"{}\"\nreason = \"{}\"\n",
                r.spki, r.reason
            );
        }
        files.push(("revoked.toml".into(), s));

        let mut s = header("Embedded tests: run by `netportd check` and before every reload.");
        for t in &self.tests {
            let _ = writeln!(
                s,
                "[[test]]\nfrom = \"{}\"\nservice = \"{}\"\nexpect = \"{}\"\n",
                self.portals[t.portal].name,
                self.services[t.service].name,
                if t.allow { "allow" } else { "deny" }
            );
        }
        files.push(("tests.toml".into(), s));

        fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        for sub in ["portals", "access"] {
            let dir = out.join(sub);
            if dir.exists() {
                // Stale chunks from a bigger earlier run would be read too.
                for entry in fs::read_dir(&dir)? {
                    let path = entry?.path();
                    if path.extension().is_some_and(|e| e == "toml") {
                        fs::remove_file(&path)
                            .with_context(|| format!("removing {}", path.display()))?;
                    }
                }
            }
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut names = Vec::with_capacity(files.len());
        for (name, content) in files {
            let path = out.join(&name);
            fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
            names.push(name);
        }
        Ok(names)
    }

    /// Portal-rule pairs: how many listeners the policy opens in total.
    pub fn grants(&self) -> usize {
        self.rules.iter().map(|r| r.portals.len()).sum()
    }
}

fn quoted(items: &[String]) -> String {
    items
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

fn digits(n: usize) -> usize {
    n.max(1).to_string().len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Params {
        Params {
            portals: 500,
            services: 50,
            access: 400,
            tests: 40,
            seed: 1,
            chunk: 100,
        }
    }

    #[test]
    fn listen_addresses_never_repeat() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..200_000 {
            assert!(seen.insert(listen_for(i)), "rule {i}");
        }
    }

    #[test]
    fn generated_policy_is_valid_and_tests_pass() -> Result<()> {
        let model = Model::generate(small())?;
        let dir = tempfile::tempdir()?;
        model.write(dir.path())?;
        let report = netport_policy::load(dir.path())?;
        let rendered = report.render_plain();
        assert!(report.is_ok(true), "{rendered}");
        assert_eq!(report.tests.failed, 0);
        assert!(report.tests.passed >= 40);
        let policy = report.policy.as_ref().expect("valid");
        assert_eq!(policy.portals.len(), 500);
        assert_eq!(policy.access.len(), 400);
        // The model agrees with the engine on a sample of requests.
        for p in (0..500).step_by(7) {
            for s in 0..50 {
                let req =
                    netport_policy::Request::new(&model.portals[p].name, &model.services[s].name);
                assert_eq!(policy.decide(&req).is_ok(), model.allows(p, s), "{p} {s}");
            }
        }
        Ok(())
    }

    #[test]
    fn deterministic() -> Result<()> {
        let (a, b) = (Model::generate(small())?, Model::generate(small())?);
        let (da, db) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let files = a.write(da.path())?;
        b.write(db.path())?;
        for f in files {
            assert_eq!(
                fs::read(da.path().join(&f))?,
                fs::read(db.path().join(&f))?,
                "{f}"
            );
        }
        Ok(())
    }
}
