//! `netport-bench policy`: generate a policy, then time `netportd check`, `netportd explain`,
//! `netportd diff` (as subprocesses, the way CI and operators run them) and the engine
//! in-process (`load_dir`, `check`, `decide`, `explain`).

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use netport_policy::{Policy, Request, SourceFile};
use serde_json::Value;

use crate::Size;
use crate::generate::{Model, RuleDef, listen_for};
use crate::rng::Rng;

/// Goals on the reference machine (2 cores).
const GOAL_CHECK: Duration = Duration::from_secs(1);
const GOAL_EXPLAIN: Duration = Duration::from_millis(50);
const GOAL_DECIDE: Duration = Duration::from_nanos(1000);

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    size: Size,
    /// Timed runs of each measurement (after one untimed warm-up run).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Decisions per timed `decide` loop.
    #[arg(long, default_value_t = 1_000_000)]
    decisions: usize,
    /// Write the policy here and keep it, instead of in a temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The netportd binary to run (default: the one next to this binary).
    #[arg(long)]
    netportd: Option<PathBuf>,
}

/// Timings of one measurement.
#[derive(Debug, Clone)]
struct Stats {
    samples: Vec<Duration>,
}

impl Stats {
    fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        Self { samples }
    }

    fn median(&self) -> Duration {
        let n = self.samples.len();
        if n == 0 {
            return Duration::ZERO;
        }
        if n % 2 == 1 {
            self.samples[n / 2]
        } else {
            (self.samples[n / 2 - 1] + self.samples[n / 2]) / 2
        }
    }

    fn min(&self) -> Duration {
        self.samples.first().copied().unwrap_or_default()
    }
}

/// One line of the results table.
struct Row {
    what: String,
    stats: Stats,
    goal: Option<Duration>,
    note: String,
}

pub fn run(args: Args) -> Result<()> {
    let runs = args.runs.max(1);
    let netportd = match &args.netportd {
        Some(p) => p.clone(),
        None => find_netportd()?,
    };

    // 1. Generate.
    let tmp;
    let dir: PathBuf = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new()
                .prefix("netport-bench-")
                .tempdir()
                .context("creating a temporary directory")?;
            tmp.path().to_path_buf()
        }
    };
    let params = args.size.params();
    let started = Instant::now();
    let model = Model::generate(params)?;
    let files = model.write(&dir.join("policy"))?;
    let gen_time = started.elapsed();
    let policy_dir = dir.join("policy");
    // A second policy one access rule larger, for `netportd diff`.
    let mut bigger = model.clone();
    bigger.rules.push(RuleDef {
        name: "bench-extra-rule".into(),
        from: vec![format!("tag:{}", model.teams[0])],
        listen: listen_for(model.rules.len()),
        service: 0,
        relays: None,
        portals: Vec::new(),
    });
    let diff_dir = dir.join("policy-plus-one-rule");
    bigger.write(&diff_dir)?;
    let bytes: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(policy_dir.join(f)).ok())
        .map(|m| m.len())
        .sum();

    println!(
        "netport-bench policy: {} portals ({} teams), {} services, {} access rules \
         ({} portal-rule grants), {} relays, {} tests",
        model.portals.len(),
        model.teams.len(),
        model.services.len(),
        model.rules.len(),
        model.grants(),
        model.relays.len(),
        model.tests.len()
    );
    println!(
        "  {} files, {:.1} MiB, generated in {} into {}",
        files.len(),
        bytes as f64 / (1024.0 * 1024.0),
        fmt_d(gen_time),
        policy_dir.display()
    );
    println!(
        "  netportd: {}\n  {} CPUs available; {runs} timed runs per measurement (after a warm-up)",
        netportd.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    if let Some(load) = load_average() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        println!("  load average before the run: {load:.2}");
        if load > 0.5 * cpus as f64 {
            println!(
                "  warning: the machine is busy (load {load:.2} on {cpus} CPUs): timings will be inflated"
            );
        }
    }

    // 2. In-process: load, check, and where check spends its time.
    let mut rows = Vec::new();
    let mut load_times = Vec::new();
    let mut check_times = Vec::new();
    let mut sources = Vec::new();
    let mut policy: Option<Policy> = None;
    for i in 0..=runs {
        let t = Instant::now();
        let s = netport_policy::load_dir(&policy_dir)?;
        let load = t.elapsed();
        let input = s.clone();
        let t = Instant::now();
        let report = netport_policy::check(input);
        let check = t.elapsed();
        if i == 0 {
            let warnings = report.warnings().count();
            let Some(p) = report.policy.clone() else {
                eprint!("{}", report.render_plain());
                bail!("the generated policy does not pass check (a generator bug)");
            };
            if warnings > 0 {
                eprint!("{}", report.render_plain());
                println!("  note: check reports {warnings} warnings");
            }
            println!(
                "  in-process check: ok, policy {}, {} tests passed, {warnings} warnings",
                p.short_hash(),
                report.tests.passed
            );
            policy = Some(p);
            sources = s;
        } else {
            load_times.push(load);
            check_times.push(check);
        }
        drop(report);
    }
    let Some(policy) = policy else {
        bail!("no policy")
    };
    let load_stats = Stats::new(load_times);
    let check_stats = Stats::new(check_times);

    // 3. Subprocesses.
    let spawn = time_process(&netportd, &["--version".into()], runs, |o| {
        expect_exit(o, 0, "netportd --version")
    })?;
    let dir_arg = policy_dir.display().to_string();
    let check = time_process(&netportd, &["check".into(), dir_arg.clone()], runs, |o| {
        expect_exit(o, 0, "netportd check")?;
        let out = String::from_utf8_lossy(&o.stdout);
        if !out.contains("ok: policy") {
            bail!("netportd check did not report a valid policy:\n{out}");
        }
        Ok(())
    })?;
    let (allow_req, deny_req) = explain_requests(&model)?;
    let mut explain = Vec::new();
    // Cold: the policy is parsed and checked on every run. Cached: the first (untimed) run
    // stores the compiled policy, keyed by the files' bytes; the timed runs reuse it.
    for (cached, label, (p, s), verdict) in [
        (false, "permitted, cold", allow_req, "allow"),
        (false, "denied, cold", deny_req, "deny"),
        (true, "permitted, cached", allow_req, "allow"),
        (true, "denied, cached", deny_req, "deny"),
    ] {
        let mut argv = vec![
            "explain".into(),
            dir_arg.clone(),
            "--from".into(),
            model.portals[p].name.clone(),
            "--service".into(),
            model.services[s].name.clone(),
        ];
        if !cached {
            argv.push("--no-cache".into());
        }
        let stats = time_process(&netportd, &argv, runs, |o| {
            expect_exit(o, 0, "netportd explain")?;
            let out = String::from_utf8_lossy(&o.stdout);
            if !out.starts_with(verdict) {
                bail!("netportd explain: expected {verdict}, got: {out}");
            }
            Ok(())
        })?;
        explain.push((label, cached, stats));
    }
    let diff = time_process(
        &netportd,
        &[
            "diff".into(),
            policy_dir.display().to_string(),
            diff_dir.display().to_string(),
        ],
        // Informational and slow: a few runs are enough.
        runs.min(3),
        |o| {
            expect_exit(o, 0, "netportd diff")?;
            let out = String::from_utf8_lossy(&o.stdout);
            if !out.contains("+ grant") {
                bail!("netportd diff shows no added grant:\n{out}");
            }
            Ok(())
        },
    )?;
    let _ = std::fs::remove_dir_all(cache_dir());

    // 4. In-process decide and explain.
    let requests = decide_requests(&model, &policy)?;
    let mut mixed = Vec::new();
    let reps = runs.clamp(1, 5);
    for _ in 0..=reps {
        mixed.push(time_decisions(&policy, &requests.mixed, args.decisions));
    }
    mixed.remove(0);
    let allow: Vec<Duration> = (0..reps)
        .map(|_| time_decisions(&policy, &requests.allow, args.decisions))
        .collect();
    let deny: Vec<Duration> = (0..reps)
        .map(|_| time_decisions(&policy, &requests.deny, args.decisions))
        .collect();
    let lookup_ns = time_lookups(&policy, &requests.mixed, args.decisions);
    let explain_inproc = {
        let (p, s) = allow_req;
        let (pn, sn) = (&model.portals[p].name, &model.services[s].name);
        let n = 100_000;
        let t = Instant::now();
        for _ in 0..n {
            black_box(policy.explain(black_box(pn), black_box(sn)));
        }
        t.elapsed() / n
    };

    // 5. Where check's time goes (the engine's phases, replayed here with the same crates).
    let phases = phases(&sources, &policy, runs)?;

    // 6. The table.
    let spawn_median = spawn.median();
    rows.push(Row {
        what: "process spawn (netportd --version)".into(),
        stats: spawn,
        goal: None,
        note: "baseline".into(),
    });
    let ratio = |s: &Stats| {
        format!(
            "{:.0}x spawn",
            s.median().as_secs_f64() / spawn_median.as_secs_f64().max(1e-9)
        )
    };
    rows.push(Row {
        what: "netportd check".into(),
        note: ratio(&check),
        stats: check,
        goal: Some(GOAL_CHECK),
    });
    for (label, cached, stats) in explain {
        rows.push(Row {
            what: format!("netportd explain ({label})"),
            note: ratio(&stats),
            stats,
            // The goal applies to the cached path: a cold run must parse every file, which
            // alone takes longer than the goal on a policy this size.
            goal: cached.then_some(GOAL_EXPLAIN),
        });
    }
    rows.push(Row {
        what: "netportd diff (1 rule added)".into(),
        note: ratio(&diff),
        stats: diff,
        goal: None,
    });
    rows.push(Row {
        what: "decide, mixed (in-process)".into(),
        stats: Stats::new(mixed),
        goal: Some(GOAL_DECIDE),
        note: format!(
            "{} allow / {} deny per {}",
            requests.mixed_allows,
            requests.mixed.len() - requests.mixed_allows,
            requests.mixed.len()
        ),
    });
    rows.push(Row {
        what: "decide, allow only".into(),
        stats: Stats::new(allow),
        goal: Some(GOAL_DECIDE),
        note: String::new(),
    });
    rows.push(Row {
        what: "decide, deny only".into(),
        stats: Stats::new(deny),
        goal: Some(GOAL_DECIDE),
        note: String::new(),
    });
    rows.push(Row {
        what: "  of which: portal + service name lookup".into(),
        stats: Stats::new(vec![lookup_ns]),
        goal: None,
        note: "Policy::portal + Policy::service".into(),
    });
    rows.push(Row {
        what: "explain (in-process, Policy::explain)".into(),
        stats: Stats::new(vec![explain_inproc]),
        goal: None,
        note: String::new(),
    });
    rows.push(Row {
        what: "load_dir (in-process: read files)".into(),
        stats: load_stats,
        goal: None,
        note: String::new(),
    });
    let check_median = check_stats.median();
    rows.push(Row {
        what: "check() (in-process: all but I/O)".into(),
        stats: check_stats,
        goal: None,
        note: String::new(),
    });
    print_table(&rows);

    println!("\nwhere check() spends its time (engine phases replayed outside the engine):");
    let mut accounted = Duration::ZERO;
    for (what, d) in &phases {
        accounted += *d;
        println!(
            "  {what:<52} {:>10}  {:>5.1}%",
            fmt_d(*d),
            100.0 * d.as_secs_f64() / check_median.as_secs_f64().max(1e-9)
        );
    }
    let rest = check_median.saturating_sub(accounted);
    println!(
        "  {:<52} {:>10}  {:>5.1}%",
        "rest: semantic checks, compile, index, tests",
        fmt_d(rest),
        100.0 * rest.as_secs_f64() / check_median.as_secs_f64().max(1e-9)
    );

    let met = rows
        .iter()
        .filter_map(|r| r.goal.map(|g| r.stats.median() < g))
        .collect::<Vec<_>>();
    let ok = met.iter().filter(|m| **m).count();
    println!("\n{ok} of {} goals met", met.len());
    if args.dir.is_some() {
        println!("policies kept in {}", dir.display());
    }
    Ok(())
}

/// The 1-minute load average, where the OS tells it (Linux).
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The release `netportd` next to this binary.
fn find_netportd() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let dir = exe.parent().context("locating this binary's directory")?;
    let path = dir.join(format!("netportd{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        bail!(
            "{} not found: the benchmark runs the release netportd next to it.\n\
             Build it first:  cargo build --release -p netportd -p netport-bench\n\
             (or pass --netportd PATH)",
            path.display()
        );
    }
    if !dir.ends_with("release") {
        eprintln!(
            "warning: {} is not in a release directory; timings of a debug build mean little",
            path.display()
        );
    }
    Ok(path)
}

fn expect_exit(o: &Output, code: i32, what: &str) -> Result<()> {
    if o.status.code() != Some(code) {
        bail!(
            "{what} exited with {} (expected {code})\nstdout:\n{}\nstderr:\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(())
}

/// Runs a command once untimed (and checks its output), then `runs` times timed.
/// Every subprocess uses a compiled-policy cache in the bench's own directory, never the
/// user's.
fn time_process(
    bin: &Path,
    argv: &[String],
    runs: usize,
    check: impl Fn(&Output) -> Result<()>,
) -> Result<Stats> {
    let cache = cache_dir();
    let run = || -> Result<(Duration, Output)> {
        let t = Instant::now();
        let out = Command::new(bin)
            .args(argv)
            .env("NO_COLOR", "1")
            .env("NETPORT_CACHE_DIR", &cache)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        Ok((t.elapsed(), out))
    };
    let (_, out) = run()?;
    check(&out)?;
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let (d, out) = run()?;
        check(&out)?;
        samples.push(d);
    }
    Ok(Stats::new(samples))
}

/// The compiled-policy cache the subprocesses use (removed at the end of the run).
fn cache_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("netport-bench-cache-{}", std::process::id()))
}

/// A permitted and a denied (portal, service) for `explain`.
fn explain_requests(model: &Model) -> Result<((usize, usize), (usize, usize))> {
    let mut rng = Rng::new(model.params.seed ^ 0xE);
    let mut allow = None;
    let mut deny = None;
    for _ in 0..100_000 {
        let r = &model.rules[rng.below(model.rules.len())];
        if allow.is_none() && !r.portals.is_empty() {
            let p = *rng.pick(&r.portals);
            if model.allows(p, r.service) {
                allow = Some((p, r.service));
            }
        }
        let (p, s) = (
            rng.below(model.portals.len()),
            rng.below(model.services.len()),
        );
        if deny.is_none() && !model.allows(p, s) {
            deny = Some((p, s));
        }
        if let (Some(a), Some(d)) = (allow, deny) {
            return Ok((a, d));
        }
    }
    bail!("could not find both a permitted and a denied request in this policy")
}

struct Requests {
    mixed: Vec<(String, String)>,
    mixed_allows: usize,
    allow: Vec<(String, String)>,
    deny: Vec<(String, String)>,
}

/// Request sets for the decide loops, each verified against the generator's model.
fn decide_requests(model: &Model, policy: &Policy) -> Result<Requests> {
    const N: usize = 4096;
    let mut rng = Rng::new(model.params.seed ^ 0xD);
    let name = |p: usize, s: usize| {
        (
            model.portals[p].name.clone(),
            model.services[s].name.clone(),
        )
    };
    let mut allow = Vec::with_capacity(N);
    let mut deny = Vec::with_capacity(N);
    let mut tries = 0;
    while (allow.len() < N || deny.len() < N) && tries < 1_000_000 {
        tries += 1;
        let r = &model.rules[rng.below(model.rules.len())];
        if allow.len() < N && !r.portals.is_empty() {
            let p = *rng.pick(&r.portals);
            if model.allows(p, r.service) {
                allow.push(name(p, r.service));
            }
        }
        // A realistic deny: a portal of the team next door asking for the same service.
        let p = rng.below(model.portals.len());
        if deny.len() < N && !model.allows(p, r.service) {
            deny.push(name(p, r.service));
        }
    }
    if allow.is_empty() || deny.is_empty() {
        bail!("could not build decide requests for this policy");
    }
    // Mixed: half allow, the rest mostly "no access rule", some unknown portals and
    // (if any) revoked portals.
    let revoked: Vec<usize> = (0..model.portals.len())
        .filter(|&p| model.portals[p].revoked)
        .collect();
    let mut mixed = Vec::with_capacity(N);
    for i in 0..N {
        let req = match i % 20 {
            0..=9 => allow[i % allow.len()].clone(),
            10..=17 => deny[i % deny.len()].clone(),
            18 if !revoked.is_empty() => {
                name(revoked[i % revoked.len()], rng.below(model.services.len()))
            }
            _ => (
                format!("unknown-portal-{i}"),
                model.services[rng.below(model.services.len())].name.clone(),
            ),
        };
        mixed.push(req);
    }
    // Verify every request against the model: a wrong answer fast is no answer.
    let portal_by_name: std::collections::HashMap<&str, usize> = model
        .portals
        .iter()
        .enumerate()
        .map(|(i, p)| (p.name.as_str(), i))
        .collect();
    let service_by_name: std::collections::HashMap<&str, usize> = model
        .services
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    let mut mixed_allows = 0;
    for set in [&mixed, &allow, &deny] {
        for (p, s) in set.iter() {
            let expected = match (
                portal_by_name.get(p.as_str()),
                service_by_name.get(s.as_str()),
            ) {
                (Some(&p), Some(&s)) => model.allows(p, s),
                _ => false,
            };
            let got = policy.decide(&Request::new(p, s)).is_ok();
            if got != expected {
                bail!(
                    "decide({p}, {s}) = {got}, but the generator expects {expected}: \
                     an engine or generator bug"
                );
            }
        }
    }
    for (p, s) in &mixed {
        if policy.decide(&Request::new(p, s)).is_ok() {
            mixed_allows += 1;
        }
    }
    Ok(Requests {
        mixed,
        mixed_allows,
        allow,
        deny,
    })
}

/// Time per decision over `n` decisions cycling through `requests`.
fn time_decisions(policy: &Policy, requests: &[(String, String)], n: usize) -> Duration {
    let reqs: Vec<Request<'_>> = requests.iter().map(|(p, s)| Request::new(p, s)).collect();
    let n = n.max(1);
    let t = Instant::now();
    let mut j = 0;
    for _ in 0..n {
        let v = policy.decide(black_box(&reqs[j]));
        black_box(&v);
        j += 1;
        if j == reqs.len() {
            j = 0;
        }
    }
    t.elapsed() / n as u32
}

/// Time per pair of name lookups (the hash-map part of `decide`).
fn time_lookups(policy: &Policy, requests: &[(String, String)], n: usize) -> Duration {
    let n = n.max(1);
    let t = Instant::now();
    let mut j = 0;
    for _ in 0..n {
        let (p, s) = &requests[j];
        black_box(policy.portal(black_box(p)));
        black_box(policy.service(black_box(s)));
        j += 1;
        if j == requests.len() {
            j = 0;
        }
    }
    t.elapsed() / n as u32
}

/// Replays the stages of `check` that can be replayed from outside the engine, with the
/// crates the engine uses, and returns the median time of each.
fn phases(
    sources: &[SourceFile],
    policy: &Policy,
    runs: usize,
) -> Result<Vec<(&'static str, Duration)>> {
    let schema: Value = serde_json::from_str(netport_policy::SCHEMA)?;
    let compile = Instant::now();
    let validator = jsonschema::draft202012::new(&schema)
        .map_err(|e| anyhow::anyhow!("compiling the schema: {e}"))?;
    let compile = compile.elapsed();
    let mut parse = Vec::new();
    let mut to_json = Vec::new();
    let mut validate = Vec::new();
    let mut typed = Vec::new();
    let mut hash = Vec::new();
    for i in 0..=runs {
        let (mut p, mut j, mut v, mut t) = (
            Duration::ZERO,
            Duration::ZERO,
            Duration::ZERO,
            Duration::ZERO,
        );
        for src in sources {
            let s = Instant::now();
            let (doc, errors) = toml::de::DeTable::parse_recoverable(&src.content);
            p += s.elapsed();
            if !errors.is_empty() {
                bail!("{}: TOML errors", src.path);
            }
            let s = Instant::now();
            let json = table_json(doc.get_ref());
            j += s.elapsed();
            let s = Instant::now();
            let n = validator.iter_errors(&json).count();
            v += s.elapsed();
            if n > 0 {
                bail!("{}: schema errors", src.path);
            }
            // The engine deserialises every item from its JSON value (cloned).
            let s = Instant::now();
            if let Some(obj) = json.as_object() {
                for items in obj.values().filter_map(|v| v.as_array()) {
                    for item in items {
                        black_box(serde_json::from_value::<serde_json::Map<String, Value>>(
                            item.clone(),
                        )?);
                    }
                }
            }
            t += s.elapsed();
        }
        let s = Instant::now();
        {
            use sha2::{Digest, Sha256};
            let bytes = serde_json::to_vec(policy)?;
            black_box(hex::encode(Sha256::digest(&bytes)));
        }
        let h = s.elapsed();
        if i > 0 {
            parse.push(p);
            to_json.push(j);
            validate.push(v);
            typed.push(t);
            hash.push(h);
        }
    }
    Ok(vec![
        ("JSON-Schema compile (once per process)", compile),
        (
            "TOML parse (toml DeTable, with spans)",
            Stats::new(parse).median(),
        ),
        ("TOML tree -> JSON value", Stats::new(to_json).median()),
        (
            "JSON-Schema validation (jsonschema)",
            Stats::new(validate).median(),
        ),
        (
            "typed items (clone + serde_json::from_value)",
            Stats::new(typed).median(),
        ),
        (
            "policy hash (serde_json + SHA-256)",
            Stats::new(hash).median(),
        ),
    ])
}

fn table_json(t: &toml::de::DeTable<'_>) -> Value {
    Value::Object(
        t.iter()
            .map(|(k, v)| (k.get_ref().to_string(), value_json(v.get_ref())))
            .collect(),
    )
}

fn value_json(v: &toml::de::DeValue<'_>) -> Value {
    use toml::de::DeValue;
    match v {
        DeValue::String(s) => Value::String(s.to_string()),
        DeValue::Integer(i) => i64::from_str_radix(&i.as_str().replace('_', ""), i.radix())
            .map_or(Value::Null, Value::from),
        DeValue::Float(f) => f
            .as_str()
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or(Value::Null, Value::Number),
        DeValue::Boolean(b) => Value::Bool(*b),
        DeValue::Datetime(d) => Value::String(d.to_string()),
        DeValue::Array(a) => Value::Array(a.iter().map(|n| value_json(n.get_ref())).collect()),
        DeValue::Table(t) => table_json(t),
    }
}

fn fmt_d(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns < 1_000 {
        format!("{ns} ns")
    } else if ns < 1_000_000 {
        format!("{:.1} µs", ns as f64 / 1e3)
    } else if ns < 1_000_000_000 {
        format!("{:.1} ms", ns as f64 / 1e6)
    } else {
        format!("{:.2} s", ns as f64 / 1e9)
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "\n{:<40} {:>10} {:>10} {:>10}  {:<6} note",
        "measurement", "median", "min", "goal", "met?"
    );
    println!("{}", "-".repeat(100));
    for r in rows {
        let (goal, met) = match r.goal {
            Some(g) => (
                format!("< {}", fmt_d(g)),
                if r.stats.median() < g { "yes" } else { "NO" }.to_string(),
            ),
            None => ("-".into(), String::new()),
        };
        println!(
            "{:<40} {:>10} {:>10} {:>10}  {:<6} {}",
            r.what,
            fmt_d(r.stats.median()),
            fmt_d(r.stats.min()),
            goal,
            met,
            r.note
        );
    }
}
