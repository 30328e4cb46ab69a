//! The check pipeline: parse → schema → semantic checks → compile → embedded tests.
//!
//! `netportd check` and the daemon's reload call exactly this.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Range;

use serde::Deserialize;

use crate::addr::{self, AddrError};
use crate::compiled::{
    AccessRule, Expect, Index, Names, Origin, Policy, PolicyTest, Portal, Protocol, Relay,
    Revocation, Service, name_index,
};
use crate::decide::Request;
use crate::diag::{self, Code, Diagnostic, Severity};
use crate::node::{self, Node, Seg};
use crate::schema;
use crate::source::SourceFile;

/// The outcome of checking a policy.
#[derive(Debug, Clone)]
pub struct Report {
    /// The files checked (diagnostics point into them).
    pub sources: Vec<SourceFile>,
    /// Every problem found, errors and warnings, sorted by file and position.
    pub diagnostics: Vec<Diagnostic>,
    /// The compiled policy: present when there are no errors and every test passed.
    pub policy: Option<Policy>,
    /// Embedded test results.
    pub tests: TestSummary,
}

/// Embedded test counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TestSummary {
    /// Tests whose decision matched.
    pub passed: usize,
    /// Tests whose decision did not match.
    pub failed: usize,
    /// Tests not run because the policy has other errors.
    pub skipped: usize,
}

impl Report {
    /// Errors only.
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics
            .iter()
            .filter(|d| d.severity() == Severity::Error)
    }

    /// Warnings only.
    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics
            .iter()
            .filter(|d| d.severity() == Severity::Warning)
    }

    /// Whether the policy may be used (with `deny_warnings`, warnings count as errors).
    pub fn is_ok(&self, deny_warnings: bool) -> bool {
        self.policy.is_some() && !(deny_warnings && self.warnings().next().is_some())
    }

    /// The rustc-style rendering of every diagnostic, without colours.
    pub fn render_plain(&self) -> String {
        diag::render_plain(&self.sources, &self.diagnostics)
    }

    /// The primary location of a diagnostic.
    pub fn location(&self, d: &Diagnostic) -> Option<diag::Location> {
        diag::primary_location(&self.sources, d)
    }
}

/// Reads a policy directory and checks it: the loader shared by `netportd check` and the daemon.
pub fn load(dir: &std::path::Path) -> Result<Report, crate::LoadError> {
    Ok(check(crate::load_dir(dir)?))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Portal,
    Relay,
    Service,
    Access,
    Test,
    Revoked,
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::Portal,
        Kind::Relay,
        Kind::Service,
        Kind::Access,
        Kind::Test,
        Kind::Revoked,
    ];

    fn key(self) -> &'static str {
        match self {
            Kind::Portal => "portal",
            Kind::Relay => "relay",
            Kind::Service => "service",
            Kind::Access => "access",
            Kind::Test => "test",
            Kind::Revoked => "revoked",
        }
    }
}

#[derive(Deserialize)]
struct PortalSrc {
    name: String,
    #[serde(default)]
    tags: Vec<String>,
    spki_sha256: Option<String>,
    legacy_id: Option<String>,
    legacy_user: Option<String>,
}

#[derive(Deserialize)]
struct RelaySrc {
    name: String,
    address: String,
    ports: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum ProtocolSrc {
    Tcp,
    Udp,
}

#[derive(Deserialize)]
struct ServiceSrc {
    name: String,
    portal: String,
    target: String,
    protocol: Option<ProtocolSrc>,
}

#[derive(Deserialize)]
struct AccessSrc {
    name: String,
    from: Vec<String>,
    listen: String,
    service: String,
    relays: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum ExpectSrc {
    Allow,
    Deny,
}

#[derive(Deserialize)]
struct TestSrc {
    from: String,
    service: String,
    expect: ExpectSrc,
}

#[derive(Deserialize)]
struct RevokedSrc {
    spki_sha256: String,
    reason: Option<String>,
}

/// One definition and where it stands.
struct Item<T> {
    file: usize,
    index: usize,
    v: T,
}

/// Default relay port range when `ports` is omitted.
pub const DEFAULT_RELAY_PORTS: (u16, u16) = (40000, 40999);

struct Ctx {
    trees: Vec<Option<Node>>,
    /// Byte offsets of line starts, per file: `origin` is called for every definition.
    lines: Vec<Vec<usize>>,
    /// File paths, shared by every definition's origin.
    paths: Vec<std::sync::Arc<str>>,
    diags: Vec<Diagnostic>,
    /// Kinds with a definition that failed to parse: references to them are not reported as
    /// unknown, since the broken definition may be the one they mean.
    poisoned: HashSet<Kind>,
}

impl Ctx {
    fn span(&self, file: usize, path: &[Seg]) -> Range<usize> {
        match &self.trees[file] {
            Some(t) => t.locate(path).0.span.clone(),
            None => 0..0,
        }
    }

    /// The node of item `index` of `kind` in `file` (no allocation: called per definition).
    fn item_node(&self, kind: Kind, file: usize, index: usize) -> Option<&Node> {
        self.trees[file]
            .as_ref()?
            .get(kind.key())
            .and_then(|e| e.value.index(index))
    }

    fn field<T>(&self, kind: Kind, item: &Item<T>, field: &str) -> Range<usize> {
        self.item_node(kind, item.file, item.index)
            .and_then(|n| n.get(field))
            .map_or(0..0, |e| e.value.span.clone())
    }

    fn elem<T>(&self, kind: Kind, item: &Item<T>, field: &str, j: usize) -> Range<usize> {
        self.item_node(kind, item.file, item.index)
            .and_then(|n| n.get(field))
            .and_then(|e| e.value.index(j))
            .map_or(0..0, |n| n.span.clone())
    }

    /// The span of an item as a whole: its `[[kind]]` header.
    fn item_span<T>(&self, kind: Kind, item: &Item<T>) -> Range<usize> {
        self.item_node(kind, item.file, item.index)
            .map_or(0..0, |n| n.span.clone())
    }

    fn origin(&self, file: usize, span: &Range<usize>) -> Origin {
        let line = match self.lines[file].binary_search(&span.start) {
            Ok(i) => i + 1,
            Err(i) => i,
        };
        Origin {
            file: self.paths[file].clone(),
            line,
        }
    }

    fn push(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    fn addr_error(&mut self, e: AddrError, what: &str, file: usize, span: Range<usize>) {
        let (code, msg) = match e {
            AddrError::Malformed(m) => (Code::BadAddress, m),
            AddrError::Port(m) => (Code::BadPort, m),
        };
        self.push(Diagnostic::new(code, format!("invalid {what}: {msg}")).at(file, span, msg));
    }
}

#[derive(Default)]
struct Parsed {
    portals: Vec<Item<PortalSrc>>,
    relays: Vec<Item<RelaySrc>>,
    services: Vec<Item<ServiceSrc>>,
    access: Vec<Item<AccessSrc>>,
    tests: Vec<Item<TestSrc>>,
    revoked: Vec<Item<RevokedSrc>>,
}

/// Checks a policy given as file contents. Pure: no I/O, no clock.
pub fn check(sources: Vec<SourceFile>) -> Report {
    let mut ctx = Ctx {
        trees: Vec::with_capacity(sources.len()),
        lines: sources
            .iter()
            .map(|s| {
                std::iter::once(0)
                    .chain(s.content.match_indices('\n').map(|(i, _)| i + 1))
                    .collect()
            })
            .collect(),
        paths: sources.iter().map(|s| s.path.as_str().into()).collect(),
        diags: Vec::new(),
        poisoned: HashSet::new(),
    };
    let mut parsed = Parsed::default();
    if sources.is_empty() {
        ctx.push(
            Diagnostic::new(Code::NoPolicyFiles, "no *.toml policy files found").note(
                "a policy is a directory of *.toml files; names starting with '.' are skipped",
            ),
        );
    }
    for (file, src) in sources.iter().enumerate() {
        parse_file(&mut ctx, file, src, &mut parsed);
    }
    let policy = semantic(&mut ctx, parsed);
    let mut tests = TestSummary::default();
    let has_errors = ctx.diags.iter().any(|d| d.severity() == Severity::Error);
    let policy = match policy {
        Some(p) if !has_errors => {
            run_tests(&mut ctx, &p, &mut tests);
            Some(p)
        }
        Some(p) => {
            tests.skipped = p.tests.len();
            None
        }
        None => None,
    };
    let policy = policy.filter(|_| tests.failed == 0);
    let mut diagnostics = ctx.diags;
    diag::sort(&mut diagnostics);
    Report {
        sources,
        diagnostics,
        policy,
        tests,
    }
}

fn parse_file(ctx: &mut Ctx, file: usize, src: &SourceFile, parsed: &mut Parsed) {
    let tree = match node::parse(&src.content) {
        Ok(t) => t,
        Err(errors) => {
            for e in errors {
                ctx.push(
                    Diagnostic::new(Code::TomlSyntax, format!("invalid TOML: {}", e.message))
                        .at(file, e.span, "here"),
                );
            }
            ctx.poisoned.extend(Kind::ALL);
            ctx.trees.push(None);
            return;
        }
    };
    let json = tree.to_json();
    let errors = schema::validate(file, &tree, &json);
    // Items (kind, index) spoiled by a schema error, and kinds spoiled as a whole.
    let mut broken: HashSet<(String, usize)> = HashSet::new();
    for e in errors {
        // An unknown key spoils nothing else: the item is still checked, so one run reports
        // everything else that is wrong with it too.
        let spoils = e.diagnostic.code != Code::UnknownKey;
        match e.path.as_slice() {
            _ if !spoils => {}
            [Seg::Key(k), Seg::Index(i), ..] => {
                broken.insert((k.clone(), *i));
            }
            [Seg::Key(k)] => {
                if let Some(kind) = Kind::ALL.iter().find(|kind| kind.key() == k) {
                    ctx.poisoned.insert(*kind);
                }
            }
            _ => {}
        }
        ctx.push(e.diagnostic);
    }
    ctx.trees.push(Some(tree));
    let Some(obj) = json.as_object() else { return };
    for kind in Kind::ALL {
        let Some(items) = obj.get(kind.key()).and_then(|v| v.as_array()) else {
            continue;
        };
        for (index, value) in items.iter().enumerate() {
            if broken.contains(&(kind.key().to_string(), index)) {
                ctx.poisoned.insert(kind);
                continue;
            }
            macro_rules! take {
                ($list:expr) => {
                    match serde_json::from_value(value.clone()) {
                        Ok(v) => $list.push(Item { file, index, v }),
                        Err(err) => {
                            // The schema should have caught this; report rather than panic.
                            ctx.poisoned.insert(kind);
                            let span =
                                ctx.span(file, &[Seg::Key(kind.key().into()), Seg::Index(index)]);
                            ctx.push(
                                Diagnostic::new(
                                    Code::WrongType,
                                    format!("[[{}]] #{}: {err}", kind.key(), index + 1),
                                )
                                .at(file, span, "here"),
                            );
                        }
                    }
                };
            }
            match kind {
                Kind::Portal => take!(parsed.portals),
                Kind::Relay => take!(parsed.relays),
                Kind::Service => take!(parsed.services),
                Kind::Access => take!(parsed.access),
                Kind::Test => take!(parsed.tests),
                Kind::Revoked => take!(parsed.revoked),
            }
        }
    }
}

/// Reports duplicate names and returns the surviving items sorted by name (first definition
/// in file order wins).
fn dedupe<T>(
    ctx: &mut Ctx,
    kind: Kind,
    items: Vec<Item<T>>,
    name: impl Fn(&T) -> &str,
) -> Vec<Item<T>> {
    // name -> (file, index) of the first definition; spans are looked up only for duplicates.
    let mut first: HashMap<&str, (usize, usize)> = HashMap::with_capacity(items.len());
    let mut dup = vec![false; items.len()];
    for (i, item) in items.iter().enumerate() {
        let n = name(&item.v);
        match first.get(n) {
            Some(&(f, idx)) => {
                dup[i] = true;
                let span = ctx.field(kind, item, "name");
                let first_span = ctx
                    .item_node(kind, f, idx)
                    .and_then(|node| node.get("name"))
                    .map_or(0..0, |e| e.value.span.clone());
                let d = Diagnostic::new(
                    Code::DuplicateName,
                    format!("duplicate {} name `{n}`", kind.key()),
                )
                .at(item.file, span, "defined again here")
                .at(f, first_span, "first defined here")
                .note(format!(
                    "names are unique per kind: rename or remove one of the [[{}]] entries",
                    kind.key()
                ));
                ctx.push(d);
            }
            None => {
                first.insert(n, (item.file, item.index));
            }
        }
    }
    drop(first);
    let mut kept: Vec<Item<T>> = items
        .into_iter()
        .zip(dup)
        .filter_map(|(item, d)| (!d).then_some(item))
        .collect();
    kept.sort_by(|a, b| name(&a.v).cmp(name(&b.v)));
    kept
}

fn sorted_unique(v: &[String]) -> Vec<String> {
    v.iter()
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn decode_key(hex_str: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_str, &mut out).ok()?;
    Some(out)
}

fn semantic(ctx: &mut Ctx, parsed: Parsed) -> Option<Policy> {
    let portals = dedupe(ctx, Kind::Portal, parsed.portals, |p| &p.name);
    let relays = dedupe(ctx, Kind::Relay, parsed.relays, |r| &r.name);
    let services = dedupe(ctx, Kind::Service, parsed.services, |s| &s.name);
    let access = dedupe(ctx, Kind::Access, parsed.access, |a| &a.name);

    // Revocations.
    let mut revoked_keys: HashMap<[u8; 32], (usize, Range<usize>)> = HashMap::new();
    let mut revocations: Vec<Revocation> = Vec::new();
    let mut revocation_of: HashMap<[u8; 32], usize> = HashMap::new();
    for item in &parsed.revoked {
        let Some(key) = decode_key(&item.v.spki_sha256) else {
            continue;
        };
        let span = ctx.field(Kind::Revoked, item, "spki_sha256");
        if let Some((f, s)) = revoked_keys.get(&key) {
            ctx.push(
                Diagnostic::new(Code::DuplicateRevocation, "this key is revoked twice")
                    .at(item.file, span.clone(), "revoked again here")
                    .at(*f, s.clone(), "first revoked here"),
            );
            // The reason is part of the policy hash: keep the same one whatever the file
            // order (the smallest), so the hash does not depend on it (found by fuzzing).
            let reason = item.v.reason.clone().unwrap_or_default();
            if let Some(r) = revocation_of
                .get(&key)
                .and_then(|i| revocations.get_mut(*i))
                && reason < r.reason
            {
                r.reason = reason;
                r.origin = ctx.origin(item.file, &span);
            }
            continue;
        }
        revoked_keys.insert(key, (item.file, span.clone()));
        revocation_of.insert(key, revocations.len());
        revocations.push(Revocation {
            spki_sha256: item.v.spki_sha256.to_ascii_lowercase(),
            reason: item.v.reason.clone().unwrap_or_default(),
            origin: ctx.origin(item.file, &span),
        });
    }
    revocations.sort_by(|a, b| a.spki_sha256.cmp(&b.spki_sha256));

    // Portals.
    let mut portal_out = Vec::with_capacity(portals.len());
    let mut legacy_ids: HashMap<String, (usize, Range<usize>)> = HashMap::new();
    let mut pins: HashMap<[u8; 32], (usize, Range<usize>, String)> = HashMap::new();
    let mut portal_tags: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    // Uniqueness of pins and legacy ids, in file order so "again" points at the later one.
    let mut in_file_order: Vec<&Item<PortalSrc>> = portals.iter().collect();
    in_file_order.sort_by_key(|item| (item.file, item.index));
    for item in in_file_order {
        let p = &item.v;
        if let Some(key) = p.spki_sha256.as_deref().and_then(decode_key) {
            let span = ctx.field(Kind::Portal, item, "spki_sha256");
            if let Some((f, s, other)) = pins.get(&key) {
                let d = Diagnostic::new(
                    Code::DuplicateKeyPin,
                    format!("portals `{other}` and `{}` pin the same key", p.name),
                )
                .at(item.file, span, "pinned again here")
                .at(*f, s.clone(), format!("pinned by `{other}` here"))
                .note("each portal has its own key: issue a certificate per portal");
                ctx.push(d);
            } else {
                pins.insert(key, (item.file, span, p.name.clone()));
            }
        }
        if let Some(id) = &p.legacy_id {
            let span = ctx.field(Kind::Portal, item, "legacy_id");
            let id = id.to_ascii_uppercase();
            if let Some((f, s)) = legacy_ids.get(&id) {
                let d = Diagnostic::new(
                    Code::DuplicateLegacyId,
                    format!("legacy_id {id} is used by two portals"),
                )
                .at(item.file, span, "used again here")
                .at(*f, s.clone(), "first used here");
                ctx.push(d);
            } else {
                legacy_ids.insert(id, (item.file, span));
            }
        }
    }
    for (i, item) in portals.iter().enumerate() {
        let p = &item.v;
        let pin = p.spki_sha256.as_deref().and_then(decode_key);
        let tags = sorted_unique(&p.tags);
        for t in &tags {
            portal_tags.entry(t.clone()).or_default().push(i as u32);
        }
        let name_span = ctx.field(Kind::Portal, item, "name");
        portal_out.push(Portal {
            name: p.name.clone(),
            tags,
            spki_sha256: p.spki_sha256.as_ref().map(|s| s.to_ascii_lowercase()),
            legacy_id: p.legacy_id.as_ref().map(|s| s.to_ascii_uppercase()),
            legacy_user: p.legacy_user.as_ref().map(|s| s.to_ascii_uppercase()),
            revoked: pin.is_some_and(|k| revoked_keys.contains_key(&k)),
            pin,
            origin: ctx.origin(item.file, &name_span),
        });
    }
    let portal_idx = name_index(portal_out.iter().map(|x| x.name.as_str()));

    // Relays.
    let mut relay_out = Vec::with_capacity(relays.len());
    let mut relay_tags: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    // address -> (first, last, file, span of `ports` or the name, relay name, label)
    type RangeAt = (u16, u16, usize, Range<usize>, String, &'static str);
    let mut ranges: BTreeMap<String, Vec<RangeAt>> = BTreeMap::new();
    for (i, item) in relays.iter().enumerate() {
        let r = &item.v;
        let addr_span = ctx.field(Kind::Relay, item, "address");
        if let Err(e) = addr::check_relay_host(&r.address) {
            ctx.addr_error(e, "relay address", item.file, addr_span);
        }
        // A range that does not parse is reported and kept out of the overlap check; the
        // relay still compiles (with the default) so its references resolve.
        let (first, last, ports_ok) = match &r.ports {
            None => (DEFAULT_RELAY_PORTS.0, DEFAULT_RELAY_PORTS.1, true),
            Some(ports) => {
                let span = ctx.field(Kind::Relay, item, "ports");
                match addr::parse_range(ports) {
                    Ok((a, b)) => (a, b, true),
                    Err(e) => {
                        let (code, msg) = match e {
                            AddrError::Malformed(m) => (Code::BadPortRange, m),
                            AddrError::Port(m) => (Code::BadPort, m),
                        };
                        ctx.push(
                            Diagnostic::new(
                                code,
                                format!("invalid relay port range `{ports}`: {msg}"),
                            )
                            .at(item.file, span, msg),
                        );
                        (DEFAULT_RELAY_PORTS.0, DEFAULT_RELAY_PORTS.1, false)
                    }
                }
            }
        };
        if ports_ok {
            // Point at `ports`, or at the name when the default range is implied.
            let (span, how) = match r.ports {
                Some(_) => (ctx.field(Kind::Relay, item, "ports"), ""),
                None => (ctx.field(Kind::Relay, item, "name"), " (the default range)"),
            };
            ranges
                .entry(addr::canonical_host(&r.address))
                .or_default()
                .push((first, last, item.file, span, r.name.clone(), how));
        }
        let tags = sorted_unique(&r.tags);
        for t in &tags {
            relay_tags.entry(t.clone()).or_default().push(i as u32);
        }
        let name_span = ctx.field(Kind::Relay, item, "name");
        relay_out.push(Relay {
            name: r.name.clone(),
            address: r.address.clone(),
            port_first: first,
            port_last: last,
            tags,
            origin: ctx.origin(item.file, &name_span),
        });
    }
    for (address, mut list) in ranges {
        // Every overlapping pair (relays per host are few); the later definition is primary.
        list.sort_by_key(|r| (r.2, r.3.start));
        for (i, a) in list.iter().enumerate() {
            for b in &list[i + 1..] {
                if b.0 <= a.1 && a.0 <= b.1 {
                    let d = Diagnostic::new(
                        Code::RelayRangeOverlap,
                        format!(
                            "relays `{}` and `{}` share the address {address} and overlapping ports",
                            a.4, b.4
                        ),
                    )
                    .at(b.2, b.3.clone(), format!("{}-{}{} here", b.0, b.1, b.5))
                    .at(a.2, a.3.clone(), format!("overlaps {}-{}{} here", a.0, a.1, a.5))
                    .note("relays on one host need disjoint port ranges");
                    ctx.push(d);
                }
            }
        }
    }
    let relay_idx = name_index(relay_out.iter().map(|x| x.name.as_str()));

    // Services.
    let mut service_out = Vec::with_capacity(services.len());
    for item in &services {
        let s = &item.v;
        let p = portal_idx.get(&s.portal).copied();
        if p.is_none() && !ctx.poisoned.contains(&Kind::Portal) {
            let span = ctx.field(Kind::Service, item, "portal");
            ctx.push(unknown(
                Code::UnknownPortal,
                "portal",
                &s.portal,
                item.file,
                span,
            ));
        }
        let span = ctx.field(Kind::Service, item, "target");
        if let Err(e) = addr::parse_target(&s.target) {
            ctx.addr_error(e, "target", item.file, span);
        }
        if let Some(p) = p
            && portal_out[p as usize].revoked
        {
            let span = ctx.field(Kind::Service, item, "portal");
            ctx.push(
                Diagnostic::new(
                    Code::RevokedServicePortal,
                    format!(
                        "service `{}` is served by portal `{}`, whose key is revoked",
                        s.name, s.portal
                    ),
                )
                .at(item.file, span, "this portal's key is revoked")
                .note("requests for this service are denied until the portal gets a new key"),
            );
        }
        let name_span = ctx.field(Kind::Service, item, "name");
        service_out.push(Service {
            name: s.name.clone(),
            portal: s.portal.clone(),
            target: s.target.clone(),
            protocol: match s.protocol {
                Some(ProtocolSrc::Udp) => Protocol::Udp,
                _ => Protocol::Tcp,
            },
            portal_idx: p.unwrap_or(u32::MAX),
            origin: ctx.origin(item.file, &name_span),
        });
    }
    let service_idx = name_index(service_out.iter().map(|x| x.name.as_str()));

    // Access rules.
    let mut access_out = Vec::with_capacity(access.len());
    let mut relays_by_rule = Vec::with_capacity(access.len());
    for item in &access {
        let a = &item.v;
        let mut portals: Vec<u32> = Vec::new();
        for (j, sel) in a.from.iter().enumerate() {
            if let Some(tag) = sel.strip_prefix("tag:") {
                match portal_tags.get(tag) {
                    Some(list) => portals.extend_from_slice(list),
                    None if !ctx.poisoned.contains(&Kind::Portal) => {
                        let span = ctx.elem(Kind::Access, item, "from", j);
                        ctx.push(
                            Diagnostic::new(
                                Code::UnknownTag,
                                format!("no portal has the tag `{tag}`"),
                            )
                            .at(item.file, span, "this selector matches no portal")
                            .note(format!(
                                "add tags = [\"{tag}\"] to a [[portal]], or fix the tag's spelling"
                            )),
                        );
                    }
                    None => {}
                }
            } else {
                match portal_idx.get(sel) {
                    Some(&p) => portals.push(p),
                    None if !ctx.poisoned.contains(&Kind::Portal) => {
                        let span = ctx.elem(Kind::Access, item, "from", j);
                        ctx.push(unknown(Code::UnknownPortal, "portal", sel, item.file, span));
                    }
                    None => {}
                }
            }
        }
        let s = service_idx.get(&a.service).copied();
        if s.is_none() && !ctx.poisoned.contains(&Kind::Service) {
            let span = ctx.field(Kind::Access, item, "service");
            ctx.push(unknown(
                Code::UnknownService,
                "service",
                &a.service,
                item.file,
                span,
            ));
        }
        let listen_span = ctx.field(Kind::Access, item, "listen");
        let listen_addr = match addr::parse_listen(&a.listen) {
            Ok(sa) => Some(sa),
            Err(e) => {
                ctx.addr_error(e, "listen address", item.file, listen_span);
                None
            }
        };
        let mut rule_relays: BTreeSet<u32> = BTreeSet::new();
        match &a.relays {
            None => rule_relays.extend(0..relay_out.len() as u32),
            Some(sels) => {
                for (j, sel) in sels.iter().enumerate() {
                    if let Some(tag) = sel.strip_prefix("tag:") {
                        match relay_tags.get(tag) {
                            Some(list) => rule_relays.extend(list),
                            None if !ctx.poisoned.contains(&Kind::Relay) => {
                                let span = ctx.elem(Kind::Access, item, "relays", j);
                                ctx.push(
                                    Diagnostic::new(Code::UnknownTag, format!("no relay has the tag `{tag}`"))
                                        .at(item.file, span, "this selector matches no relay")
                                        .note(format!("add tags = [\"{tag}\"] to a [[relay]], or fix the tag's spelling")),
                                );
                            }
                            None => {}
                        }
                    } else {
                        match relay_idx.get(sel) {
                            Some(&r) => {
                                rule_relays.insert(r);
                            }
                            None if !ctx.poisoned.contains(&Kind::Relay) => {
                                let span = ctx.elem(Kind::Access, item, "relays", j);
                                ctx.push(unknown(
                                    Code::UnknownRelay,
                                    "relay",
                                    sel,
                                    item.file,
                                    span,
                                ));
                            }
                            None => {}
                        }
                    }
                }
            }
        }
        portals.sort_unstable();
        portals.dedup();
        let portal_idx_list = portals;
        let name_span = ctx.field(Kind::Access, item, "name");
        relays_by_rule.push(rule_relays.iter().copied().collect::<Vec<u32>>());
        access_out.push(AccessRule {
            name: a.name.clone(),
            from: sorted_unique(&a.from),
            listen: a.listen.clone(),
            service: a.service.clone(),
            relay_selectors: a.relays.as_deref().map(sorted_unique).unwrap_or_default(),
            relays: rule_relays
                .iter()
                .map(|&r| relay_out[r as usize].name.clone())
                .collect(),
            listen_addr,
            portal_idx: portal_idx_list,
            service_idx: s.unwrap_or(u32::MAX),
            origin: ctx.origin(item.file, &name_span),
        });
    }

    let index = Index::build(
        Names {
            portal: portal_idx,
            service: service_idx,
            relay: relay_idx,
        },
        &portal_out,
        &access_out,
        relays_by_rule,
        revoked_keys.keys().copied().collect(),
    );
    listen_conflicts(
        ctx,
        &access,
        &access_out,
        &service_out,
        &portal_out,
        &index.grants,
    );

    // Warnings about what cannot work.
    if relay_out.is_empty() && !access_out.is_empty() && !ctx.poisoned.contains(&Kind::Relay) {
        let item = &access[0];
        let span = ctx.field(Kind::Access, item, "name");
        ctx.push(
            Diagnostic::new(
                Code::NoRelay,
                "no [[relay]] is defined, so no access rule can be carried",
            )
            .at(item.file, span, "this rule has no relay")
            .note("add a [[relay]] with the address portals dial"),
        );
    }
    for (i, item) in services.iter().enumerate() {
        if index.rules_by_service[i].is_empty() && !ctx.poisoned.contains(&Kind::Access) {
            let span = ctx.field(Kind::Service, item, "name");
            ctx.push(
                Diagnostic::new(
                    Code::UnreachableService,
                    format!("no access rule grants the service `{}`", item.v.name),
                )
                .at(item.file, span, "nothing can reach this service")
                .note("add an [[access]] rule for it, or remove it"),
            );
        }
    }

    // Tests: references first; they run after compilation.
    let mut tests = Vec::with_capacity(parsed.tests.len());
    for item in &parsed.tests {
        let t = &item.v;
        let mut ok = true;
        if !index.portal.contains_key(&t.from) && !ctx.poisoned.contains(&Kind::Portal) {
            let span = ctx.field(Kind::Test, item, "from");
            ctx.push(unknown(
                Code::UnknownPortal,
                "portal",
                &t.from,
                item.file,
                span,
            ));
            ok = false;
        }
        if !index.service.contains_key(&t.service) && !ctx.poisoned.contains(&Kind::Service) {
            let span = ctx.field(Kind::Test, item, "service");
            ctx.push(unknown(
                Code::UnknownService,
                "service",
                &t.service,
                item.file,
                span,
            ));
            ok = false;
        }
        let span = ctx.item_span(Kind::Test, item);
        if ok {
            tests.push(PolicyTest {
                from: t.from.clone(),
                service: t.service.clone(),
                expect: match t.expect {
                    ExpectSrc::Allow => Expect::Allow,
                    ExpectSrc::Deny => Expect::Deny,
                },
                origin: ctx.origin(item.file, &span),
                label: (item.file, span),
            });
        }
    }

    Some(
        Policy {
            hash: String::new(),
            portals: portal_out,
            relays: relay_out,
            services: service_out,
            access: access_out,
            revoked: revocations,
            tests,
            index,
        }
        .seal(),
    )
}

fn unknown(code: Code, kind: &str, name: &str, file: usize, span: Range<usize>) -> Diagnostic {
    Diagnostic::new(code, format!("unknown {kind} `{name}`"))
        .at(file, span, format!("no [[{kind}]] has this name"))
        .note(format!(
            "define it with [[{kind}]] name = \"{name}\", or fix the spelling"
        ))
}

/// Two rules that give one portal listeners on the same port and protocol, where the
/// addresses overlap (equal, or either is the unspecified address).
fn listen_conflicts(
    ctx: &mut Ctx,
    items: &[Item<AccessSrc>],
    rules: &[AccessRule],
    services: &[Service],
    portals: &[Portal],
    grants: &crate::compiled::Grants,
) {
    let protocol = |r: &AccessRule| {
        services
            .get(r.service_idx as usize)
            .map_or(Protocol::Tcp, |s| s.protocol)
    };
    // (rule a, rule b) -> portals affected
    let mut conflicts: BTreeMap<(u32, u32), Vec<u32>> = BTreeMap::new();
    // One scratch list reused for every portal: (protocol, port, rule), sorted, so rules on
    // the same port stand next to each other. Called for every portal: no allocation inside.
    let mut scratch: Vec<(Protocol, u16, u32)> = Vec::new();
    for p in 0..grants.portals() {
        let list = grants.of(p as u32);
        if list.len() < 2 {
            continue;
        }
        scratch.clear();
        scratch.extend(list.iter().filter_map(|&(_, r)| {
            let rule = &rules[r as usize];
            rule.listen_addr.map(|sa| (protocol(rule), sa.port(), r))
        }));
        scratch.sort_unstable();
        let mut start = 0;
        while start < scratch.len() {
            let key = (scratch[start].0, scratch[start].1);
            let end = start
                + scratch[start..]
                    .iter()
                    .take_while(|e| (e.0, e.1) == key)
                    .count();
            let group = &scratch[start..end];
            for (i, &(_, _, a)) in group.iter().enumerate() {
                for &(_, _, b) in &group[i + 1..] {
                    let (x, y) = (rules[a as usize].listen_addr, rules[b as usize].listen_addr);
                    let (Some(x), Some(y)) = (x, y) else { continue };
                    if x.ip() == y.ip() || x.ip().is_unspecified() || y.ip().is_unspecified() {
                        conflicts
                            .entry((a.min(b), a.max(b)))
                            .or_default()
                            .push(p as u32);
                    }
                }
            }
            start = end;
        }
    }
    for ((a, b), affected) in conflicts {
        let (ra, rb) = (&rules[a as usize], &rules[b as usize]);
        let names: Vec<&str> = affected
            .iter()
            .take(3)
            .map(|&p| portals[p as usize].name.as_str())
            .collect();
        let more = if affected.len() > 3 {
            format!(" and {} more", affected.len() - 3)
        } else {
            String::new()
        };
        let (ia, ib) = (&items[a as usize], &items[b as usize]);
        let sa = ctx.field(Kind::Access, ia, "listen");
        let sb = ctx.field(Kind::Access, ib, "listen");
        // Report at the later definition, in file order.
        let ((fa, spa, na), (fb, spb, nb)) = if (ia.file, sa.start) <= (ib.file, sb.start) {
            ((ia.file, sa, &ra.name), (ib.file, sb, &rb.name))
        } else {
            ((ib.file, sb, &rb.name), (ia.file, sa, &ra.name))
        };
        let d = Diagnostic::new(
            Code::ListenConflict,
            format!(
                "access rules `{na}` and `{nb}` both make {} listen on the same address",
                if affected.len() == 1 {
                    format!("portal `{}`", names[0])
                } else {
                    format!(
                        "portals {}{more}",
                        names
                            .iter()
                            .map(|n| format!("`{n}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            ),
        )
        .at(fb, spb, format!("`{nb}` listens here"))
        .at(fa, spa, format!("`{na}` listens here"))
        .note("give one of the rules another listen port, or narrow its `from`");
        ctx.push(d);
    }
}

fn run_tests(ctx: &mut Ctx, policy: &Policy, summary: &mut TestSummary) {
    for t in &policy.tests {
        let got = policy.decide(&Request::new(&t.from, &t.service));
        let pass = matches!(
            (&got, t.expect),
            (Ok(_), Expect::Allow) | (Err(_), Expect::Deny)
        );
        if pass {
            summary.passed += 1;
            continue;
        }
        summary.failed += 1;
        let (file, span) = t.label.clone();
        let mut d = match &got {
            Ok(permit) => Diagnostic::new(
                Code::TestFailed,
                format!(
                    "test failed: expected `{}` to be denied `{}`, but access rule `{}` allows it",
                    t.from, t.service, permit.rule.name
                ),
            )
            .at(file, span, "expects deny"),
            Err(denied) => Diagnostic::new(
                Code::TestFailed,
                format!(
                    "test failed: expected `{}` to be allowed `{}`, but it is denied ({})",
                    t.from, t.service, denied.reason
                ),
            )
            .at(file, span, "expects allow"),
        };
        let rule = match &got {
            Ok(permit) => Some(permit.rule.name.as_str()),
            Err(denied) => denied.closest.as_deref(),
        };
        if let Some(rule) = rule.and_then(|r| policy.access_rule(r)) {
            d = d.note(format!(
                "{} rule `{}` is at {}",
                if got.is_ok() {
                    "the deciding"
                } else {
                    "the closest"
                },
                rule.name,
                rule.origin
            ));
        }
        ctx.push(d);
    }
}
