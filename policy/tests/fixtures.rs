//! Fixture-driven policy tests.
//!
//! Every directory under `tests/fixtures/valid/` is a policy that must check clean; its compiled
//! table is snapshotted. Every directory under `tests/fixtures/invalid/` is named after the code
//! it shows (`e0007-duplicate-portal-across-files` must produce E0007, `w0001-...` W0001); its
//! rendered diagnostics are snapshotted. The cases are counted, and every code in `Code::ALL`
//! must have a fixture, so a glob that matches nothing cannot pass.
//!
//! Snapshots live in `tests/snapshots/`; CI runs with `INSTA_UPDATE=no`. To accept changes:
//! `INSTA_UPDATE=always cargo test -p netport-policy --test fixtures`, then read every diff.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use netport_policy::{Code, Report, Severity, SourceFile};

/// At least this many cases must exist; a glob that silently matches fewer fails.
const MIN_VALID: usize = 8;
const MIN_INVALID: usize = 30;

fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The case's directory name, e.g. `e0007-duplicate-portal-across-files`.
fn case_name(dir: &Path) -> String {
    dir.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_else(|| panic!("fixture path without a UTF-8 name: {}", dir.display()))
        .to_string()
}

/// Loads a fixture directory with the loader the daemon uses, then rewrites every path to be
/// relative to `tests/fixtures/` (`invalid/<case>/<file>`), so snapshots do not depend on
/// where the checkout is.
fn load_fixture(kind: &str, dir: &Path) -> Report {
    let case = case_name(dir);
    let sources = netport_policy::load_dir(dir)
        .unwrap_or_else(|e| panic!("cannot load fixture {}: {e}", dir.display()));
    assert!(
        !sources.is_empty(),
        "fixture {kind}/{case} holds no *.toml file"
    );
    let sources = sources
        .into_iter()
        .map(|s| {
            let rel = Path::new(&s.path)
                .strip_prefix(dir)
                .unwrap_or_else(|_| panic!("{} is not below {}", s.path, dir.display()))
                .to_string_lossy()
                .replace('\\', "/");
            SourceFile::new(format!("{kind}/{case}/{rel}"), s.content)
        })
        .collect();
    netport_policy::check(sources)
}

/// The code a case's directory name starts with: `e0007-...` -> E0007.
fn code_of_case(case: &str) -> Code {
    let prefix = case
        .split('-')
        .next()
        .unwrap_or_default()
        .to_ascii_uppercase();
    Code::ALL
        .iter()
        .copied()
        .find(|c| c.as_str() == prefix)
        .unwrap_or_else(|| {
            panic!(
                "invalid fixture `{case}` must be named after the code it shows, \
                 like e0007-duplicate-portal-across-files"
            )
        })
}

fn summary_line(report: &Report) -> String {
    let t = report.tests;
    format!(
        "tests: {} passed, {} failed, {} skipped",
        t.passed, t.failed, t.skipped
    )
}

#[test]
fn valid_fixtures() {
    let mut count = 0;
    insta::glob!("fixtures/valid/*", |dir| {
        assert!(dir.is_dir(), "{} is not a fixture directory", dir.display());
        count += 1;
        let case = case_name(dir);
        let report = load_fixture("valid", dir);
        let diagnostics = report.render_plain();
        assert!(
            report.diagnostics.is_empty(),
            "valid fixture `{case}` has diagnostics (warnings belong in invalid/w....):\n{diagnostics}"
        );
        let policy = report
            .policy
            .as_ref()
            .unwrap_or_else(|| panic!("valid fixture `{case}` did not compile"));
        // Every valid case carries embedded tests, and they all ran and passed.
        assert!(
            report.tests.passed > 0,
            "valid fixture `{case}` has no [[test]]: add at least one"
        );
        assert_eq!(report.tests.failed, 0, "{case}");
        assert_eq!(report.tests.skipped, 0, "{case}");
        assert_eq!(report.tests.passed, policy.tests.len(), "{case}");

        let json = serde_json::to_string_pretty(policy).unwrap_or_else(|e| panic!("{case}: {e}"));
        // The expanded grants: what the selectors and tags add up to.
        let grants: String = policy
            .grants()
            .iter()
            .map(|g| {
                format!(
                    "grant {} {} -> {} {} {} (rule {})\n",
                    g.portal, g.listen, g.service, g.target, g.protocol, g.rule
                )
            })
            .collect();
        let snapshot = format!("{json}\n\n{grants}\n{}\n", summary_line(&report));
        insta::assert_snapshot!(snapshot);
    });
    assert!(
        count >= MIN_VALID,
        "only {count} valid fixtures ran; expected at least {MIN_VALID}"
    );
}

#[test]
fn invalid_fixtures() {
    let mut count = 0;
    let mut covered = BTreeSet::new();
    insta::glob!("fixtures/invalid/*", |dir| {
        assert!(dir.is_dir(), "{} is not a fixture directory", dir.display());
        count += 1;
        let case = case_name(dir);
        let code = code_of_case(&case);
        covered.insert(code);
        let report = load_fixture("invalid", dir);
        let rendered = report.render_plain();
        assert!(
            report.diagnostics.iter().any(|d| d.code == code),
            "fixture `{case}` must produce {code}, got:\n{rendered}"
        );
        // Every diagnostic points somewhere (only E0020, an empty directory, has no place).
        for d in &report.diagnostics {
            let loc = report.location(d);
            assert!(
                loc.is_some(),
                "{case}: {} `{}` has no location",
                d.code,
                d.message
            );
        }
        match code.severity() {
            Severity::Error => assert!(
                report.policy.is_none(),
                "fixture `{case}` has an error, so the policy must be rejected"
            ),
            // A warning-only fixture: the policy works, with the warning.
            Severity::Warning => {
                assert!(
                    report.errors().next().is_none(),
                    "warning fixture `{case}` must have no errors, got:\n{rendered}"
                );
                assert!(report.policy.is_some(), "{case}: policy must compile");
                assert!(report.is_ok(false) && !report.is_ok(true), "{case}");
            }
        }

        let mut out = rendered;
        let _ = writeln!(out, "---");
        match &report.policy {
            Some(p) => {
                let _ = writeln!(out, "policy: compiled, hash {}", p.hash);
            }
            None => {
                let _ = writeln!(out, "policy: rejected");
            }
        }
        let _ = writeln!(out, "{}", summary_line(&report));
        insta::assert_snapshot!(out);
    });
    assert!(
        count >= MIN_INVALID,
        "only {count} invalid fixtures ran; expected at least {MIN_INVALID}"
    );
    // E0020 (no *.toml file) cannot be a committed fixture: git does not keep empty
    // directories. `empty_directory_is_e0020` covers it.
    let missing: Vec<&str> = Code::ALL
        .iter()
        .filter(|c| **c != Code::NoPolicyFiles && !covered.contains(*c))
        .map(|c| c.as_str())
        .collect();
    assert!(
        missing.is_empty(),
        "codes without an invalid fixture: {missing:?}"
    );
}

/// E0020: a directory without policy files. Made here, since git cannot hold an empty one.
#[test]
fn empty_directory_is_e0020() {
    let empty = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    // Only files that are not policy files: another extension, and a hidden .toml.
    let not_policy = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    for (name, content) in [
        ("README.md", "# notes\n"),
        (".draft.toml", "[[portal]]\nname = \"a\"\n"),
        ("policy.toml.bak", "[[portal]]\nname = \"b\"\n"),
    ] {
        std::fs::write(not_policy.path().join(name), content)
            .unwrap_or_else(|e| panic!("write {name}: {e}"));
    }
    for dir in [empty.path(), not_policy.path()] {
        let report = netport_policy::load(dir).unwrap_or_else(|e| panic!("load: {e}"));
        let codes: Vec<Code> = report.diagnostics.iter().map(|d| d.code).collect();
        assert_eq!(codes, [Code::NoPolicyFiles], "{}", dir.display());
        assert!(report.policy.is_none());
        assert!(!report.is_ok(false));
        assert_eq!(
            report.render_plain(),
            "error[E0020]: no *.toml policy files found\n \
             = a policy is a directory of *.toml files; names starting with '.' are skipped\n\n"
        );
    }
    // The same through `check` directly, as the fuzzers and the reload pipeline call it.
    let report = netport_policy::check(Vec::new());
    assert_eq!(report.diagnostics.len(), 1);
    assert_eq!(report.diagnostics[0].code, Code::NoPolicyFiles);
}

/// One run reports every problem in a file, not just the first.
#[test]
fn many_errors_are_all_reported_in_one_run() {
    let dir = fixtures_root().join("invalid/e0007-many-errors-at-once");
    let report = load_fixture("invalid", &dir);
    let mut got: Vec<&str> = report.diagnostics.iter().map(|d| d.code.as_str()).collect();
    got.sort_unstable();
    assert_eq!(
        got,
        [
            "E0002", // unknown key `colour`
            "E0007", // alice-laptop twice
            "E0008", // service portal office-nas
            "E0008", // test from bob-phone
            "E0009", // tag:ops
            "E0010", // service web
            "E0011", // relay-2
            "E0013", // relay address with a port
            "E0013", // listen port `http`
            "E0014", // target port 0
            "E0015", // reversed relay range
            "W0004", // service `unused`
        ],
        "{}",
        report.render_plain()
    );
    // Sorted by position in the file.
    let lines: Vec<usize> = report
        .diagnostics
        .iter()
        .filter_map(|d| report.location(d))
        .map(|l| l.line)
        .collect();
    assert!(lines.windows(2).all(|w| w[0] <= w[1]), "{lines:?}");
}

/// The fixtures directory itself is laid out as the tests expect: nothing but case
/// directories under valid/ and invalid/, so no stray file is silently skipped.
#[test]
fn fixture_folders_hold_only_case_directories() {
    for kind in ["valid", "invalid"] {
        let dir = fixtures_root().join(kind);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
            assert!(path.is_dir(), "{} is not a case directory", path.display());
        }
    }
}
