//! Runs the built `netportd` binary: exit codes, output formats, how the directory is read.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

const PORTALS: &str = r#"#:schema ../schema/policy.schema.json
[[portal]]
name = "alice-laptop"
tags = ["dev"]

[[portal]]
name = "office-nas"

[[portal]]
name = "bob-phone"
"#;

const REST: &str = r#"
[[relay]]
name = "relay-eu-1"
address = "relay1.example.net"
ports = "40000-40999"
tags = ["eu"]

[[service]]
name = "nas-ssh"
portal = "office-nas"
target = "192.168.1.10:22"

[[access]]
name = "devs-ssh-to-nas"
from = ["tag:dev"]
listen = "127.0.0.1:2222"
service = "nas-ssh"
relays = ["tag:eu"]

[[test]]
from = "alice-laptop"
service = "nas-ssh"
expect = "allow"

[[test]]
from = "bob-phone"
service = "nas-ssh"
expect = "deny"
"#;

fn netportd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_netportd"))
        .args(args)
        .env("NO_COLOR", "1")
        // Keep the compiled-policy cache of `explain` out of the user's home.
        .env(
            "NETPORT_CACHE_DIR",
            std::env::temp_dir().join("netport-cli-tests-cache"),
        )
        .output()
        .expect("netportd runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn valid_policy(dir: &Path) {
    fs::write(dir.join("portals.toml"), PORTALS).expect("write");
    fs::write(dir.join("rest.toml"), REST).expect("write");
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

#[test]
fn valid_policy_exits_zero_and_says_ok() {
    let dir = tempfile::tempdir().expect("tempdir");
    valid_policy(dir.path());
    let out = netportd(&["check", path(dir.path())]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(text.starts_with("ok: policy "), "{text}");
    assert!(text.contains("3 portals"), "{text}");
    assert!(text.contains("tests: 2 passed, 0 failed"), "{text}");
}

#[test]
fn errors_exit_one_with_rustc_style_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    valid_policy(dir.path());
    fs::write(
        dir.path().join("dup.toml"),
        "[[portal]]\nname = \"bob-phone\"\n",
    )
    .expect("write");
    let out = netportd(&["check", path(dir.path())]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.contains("error[E0007]: duplicate portal name `bob-phone`"),
        "{text}"
    );
    let dup = format!("--> {}:2:8", dir.path().join("dup.toml").display());
    assert!(text.contains(&dup), "expected {dup} in {text}");
    assert!(text.contains("2 | name = \"bob-phone\""), "{text}");
    assert!(text.contains("^^^^^^^^^^^ defined again here"), "{text}");
    // The other place is named too.
    assert!(text.contains("first defined here"), "{text}");
}

#[test]
fn failing_test_exits_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    valid_policy(dir.path());
    fs::write(
        dir.path().join("more-tests.toml"),
        "[[test]]\nfrom = \"bob-phone\"\nservice = \"nas-ssh\"\nexpect = \"allow\"\n",
    )
    .expect("write");
    let out = netportd(&["check", "--format", "json", path(dir.path())]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["ok"], false);
    assert_eq!(v["hash"], Value::Null);
    assert_eq!(v["tests"]["passed"], 2);
    assert_eq!(v["tests"]["failed"], 1);
    assert_eq!(v["errors"][0]["code"], "E0016");
    assert_eq!(v["errors"][0]["line"], 1);
}

#[test]
fn json_shape_for_a_valid_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    valid_policy(dir.path());
    let out = netportd(&["check", "--format=json", path(dir.path())]);
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["ok"], true);
    let hash = v["hash"].as_str().expect("hash is a string");
    assert_eq!(hash.len(), 64);
    assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(v["errors"], Value::Array(vec![]));
    assert_eq!(v["warnings"], Value::Array(vec![]));
    assert_eq!(v["tests"]["passed"], 2);
    assert_eq!(v["tests"]["failed"], 0);
}

#[test]
fn json_errors_carry_file_line_column_code_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    valid_policy(dir.path());
    fs::write(
        dir.path().join("bad.toml"),
        "[[access]]\nname = \"x\"\nfrom = [\"ghost\"]\nlisten = \"127.0.0.1:0\"\nservice = \"nas-ssh\"\n",
    )
    .expect("write");
    let out = netportd(&["check", "--format", "json", path(dir.path())]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    let errors = v["errors"].as_array().expect("errors");
    let codes: Vec<&str> = errors.iter().filter_map(|e| e["code"].as_str()).collect();
    assert_eq!(codes, ["E0008", "E0014"], "{v}");
    let e = &errors[0];
    assert!(e["file"].as_str().expect("file").ends_with("bad.toml"));
    assert_eq!(e["line"], 3);
    assert_eq!(e["column"], 9);
    assert!(e["message"].as_str().expect("message").contains("ghost"));
}

#[test]
fn github_format_annotates() {
    let dir = tempfile::tempdir().expect("tempdir");
    valid_policy(dir.path());
    fs::write(dir.path().join("bad.toml"), "[[portal]]\nname = \"Bad\"\n").expect("write");
    let out = netportd(&["check", "--format", "github", path(dir.path())]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    let line = text
        .lines()
        .find(|l| l.starts_with("::error "))
        .expect("an ::error line");
    let file = dir.path().join("bad.toml").display().to_string();
    assert!(
        line.starts_with(&format!("::error file={file},line=2,col=8,")),
        "{line}"
    );
    assert!(line.contains("::E0005: "), "{line}");
}

#[test]
fn warnings_pass_unless_denied() {
    let dir = tempfile::tempdir().expect("tempdir");
    valid_policy(dir.path());
    fs::write(
        dir.path().join("unused.toml"),
        "[[service]]\nname = \"nas-web\"\nportal = \"office-nas\"\ntarget = \"192.168.1.10:443\"\n",
    )
    .expect("write");
    let out = netportd(&["check", path(dir.path())]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).contains("warning[W0004]"));
    let out = netportd(&["check", "--deny-warnings", path(dir.path())]);
    assert_eq!(out.status.code(), Some(1));
    let out = netportd(&[
        "check",
        "--deny-warnings",
        "--format",
        "github",
        path(dir.path()),
    ]);
    assert!(stdout(&out).contains("::warning file="), "{}", stdout(&out));
}

#[test]
fn usage_and_io_errors_exit_two() {
    let out = netportd(&["check", "/nonexistent/netport-policy"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/netport-policy")
    );
    let out = netportd(&["check"]);
    assert_eq!(out.status.code(), Some(2));
    let out = netportd(&["check", "--format", "yaml", "."]);
    assert_eq!(out.status.code(), Some(2));
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("a.toml");
    fs::write(&file, PORTALS).expect("write");
    let out = netportd(&["check", path(&file)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a directory"));
}

#[test]
fn empty_directory_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = netportd(&["check", path(dir.path())]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("error[E0020]"));
}

#[test]
fn hidden_entries_are_skipped_and_subdirectories_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    valid_policy(dir.path());
    // A .git directory and a hidden file holding a duplicate would fail if read.
    fs::create_dir_all(dir.path().join(".git/refs")).expect("mkdir");
    fs::write(dir.path().join(".git/refs/dup.toml"), PORTALS).expect("write");
    fs::write(dir.path().join(".hidden.toml"), PORTALS).expect("write");
    fs::create_dir_all(dir.path().join("team/ops")).expect("mkdir");
    fs::write(
        dir.path().join("team/ops/extra.toml"),
        "[[portal]]\nname = \"ops-box\"\n",
    )
    .expect("write");
    let out = netportd(&["check", path(dir.path())]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("(3 files, 4 portals"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn symlinked_files_and_configmap_layout_are_read_once() {
    // Kubernetes mounts a ConfigMap as: ..2026_11_27/ (real files), ..data -> ..2026_11_27,
    // and each visible file a symlink into ..data.
    let dir = tempfile::tempdir().expect("tempdir");
    let real = dir.path().join("..2026_11_27_00_00_00.1");
    fs::create_dir(&real).expect("mkdir");
    valid_policy(&real);
    std::os::unix::fs::symlink("..2026_11_27_00_00_00.1", dir.path().join("..data")).expect("ln");
    for f in ["portals.toml", "rest.toml"] {
        std::os::unix::fs::symlink(format!("..data/{f}"), dir.path().join(f)).expect("ln");
    }
    let out = netportd(&["check", path(dir.path())]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("(2 files, 3 portals"),
        "{}",
        stdout(&out)
    );

    // A symlinked policy directory (git-sync's `policy -> rev-<sha>`) is followed too.
    let link = dir.path().join("current");
    std::os::unix::fs::symlink(&real, &link).expect("ln");
    let out = netportd(&["check", path(&link)]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
}

#[test]
fn the_hash_ignores_file_split_and_formatting() {
    let a = tempfile::tempdir().expect("tempdir");
    valid_policy(a.path());
    let b = tempfile::tempdir().expect("tempdir");
    fs::write(
        b.path().join("all.toml"),
        format!("# one file, other order\n{REST}\n{PORTALS}"),
    )
    .expect("write");
    let hash = |d: &Path| {
        let out = netportd(&["check", "--format", "json", path(d)]);
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        v["hash"].as_str().expect("hash").to_string()
    };
    assert_eq!(hash(a.path()), hash(b.path()));
}

#[test]
fn explain_allow_and_deny() {
    let dir = tempfile::tempdir().expect("tempdir");
    valid_policy(dir.path());
    let d = path(dir.path());
    let out = netportd(&[
        "explain",
        d,
        "--from",
        "alice-laptop",
        "--service",
        "nas-ssh",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert!(
        text.starts_with("allow: access rule `devs-ssh-to-nas`"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 1);

    let out = netportd(&[
        "explain",
        d,
        "--from",
        "alice-laptop",
        "--service",
        "nas-ssh",
        "--format",
        "json",
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["verdict"], "allow");
    assert_eq!(v["rule"], "devs-ssh-to-nas");
    // The rule's `name` line.
    let loc = format!("{}:14", dir.path().join("rest.toml").display());
    assert_eq!(v["location"], Value::String(loc));
    assert_eq!(v["reason"], Value::Null);
    assert_eq!(v["relays"], serde_json::json!(["relay-eu-1"]));

    let out = netportd(&[
        "explain",
        d,
        "--from",
        "bob-phone",
        "--service",
        "nas-ssh",
        "--format",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["verdict"], "deny");
    assert_eq!(v["rule"], Value::Null);
    assert_eq!(v["location"], Value::Null);
    assert_eq!(v["reason"], "no-access-rule");
    assert_eq!(v["closest"], "devs-ssh-to-nas");

    let out = netportd(&[
        "explain",
        d,
        "--from",
        "mallory",
        "--service",
        "nas-ssh",
        "--format",
        "json",
        "--exit-code",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["reason"], "unknown-portal");

    let out = netportd(&["explain", d, "--from", "bob-phone", "--service", "nope"]);
    assert!(
        stdout(&out).starts_with("deny (unknown-service)"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn explain_on_a_broken_policy_shows_the_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("a.toml"), "[[portal]\n").expect("write");
    let out = netportd(&["explain", path(dir.path()), "--from", "a", "--service", "b"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error[E0001]"), "{err}");
}

#[test]
fn diff_lists_grants_relays_and_revocations() {
    let old = tempfile::tempdir().expect("tempdir");
    valid_policy(old.path());
    let new = tempfile::tempdir().expect("tempdir");
    valid_policy(new.path());
    let rest = REST
        .replace(
            "from = [\"tag:dev\"]",
            "from = [\"tag:dev\", \"bob-phone\"]",
        )
        .replace("40000-40999", "41000-41999");
    fs::write(new.path().join("rest.toml"), rest).expect("write");
    fs::write(
        new.path().join("revoked.toml"),
        format!(
            "[[revoked]]\nspki_sha256 = \"{}\"\nreason = \"lost\"\n",
            "ab".repeat(32)
        ),
    )
    .expect("write");
    // The old test now fails (bob is allowed): drop it from the new policy.
    let rest = fs::read_to_string(new.path().join("rest.toml")).expect("read");
    let cut = rest.rfind("[[test]]").expect("a test");
    fs::write(new.path().join("rest.toml"), &rest[..cut]).expect("write");

    let (o, n) = (path(old.path()), path(new.path()));
    let out = netportd(&["diff", o, n]);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert!(
        text.contains(
            "+ grant   bob-phone listens on 127.0.0.1:2222 for nas-ssh -> 192.168.1.10:22"
        ),
        "{text}"
    );
    assert!(text.contains("~ relay   relay-eu-1"), "{text}");
    assert!(
        text.contains(&format!("+ revoked {}", "ab".repeat(32))),
        "{text}"
    );

    let out = netportd(&["diff", o, n, "--format", "json", "--exit-code"]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["grants_added"].as_array().map(Vec::len), Some(1));
    assert_eq!(v["grants_added"][0]["portal"], "bob-phone");
    assert_eq!(v["grants_removed"], serde_json::json!([]));
    assert_eq!(v["relays_changed"].as_array().map(Vec::len), Some(1));

    let out = netportd(&["diff", o, o, "--exit-code"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("no change"));
}

#[test]
fn help_explains_commands_and_exit_codes() {
    let out = netportd(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    for word in ["check", "explain", "diff", "Exit codes"] {
        assert!(text.contains(word), "--help lacks {word}: {text}");
    }
    let out = netportd(&["check", "--help"]);
    assert!(stdout(&out).contains("--deny-warnings"));
}

#[test]
fn every_example_policy_passes_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies");
    let mut count = 0;
    for entry in fs::read_dir(&root).expect("examples/policies exists") {
        let dir = entry.expect("entry").path();
        if !dir.is_dir() {
            continue;
        }
        count += 1;
        let out = netportd(&["check", "--deny-warnings", path(&dir)]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: {}",
            dir.display(),
            stdout(&out)
        );
    }
    assert!(
        count >= 3,
        "expected at least three example policies, found {count}"
    );
}

#[test]
fn explain_caches_the_compiled_policy_by_content() {
    let dir = tempfile::tempdir().expect("tempdir");
    valid_policy(dir.path());
    let cache = tempfile::tempdir().expect("tempdir");
    let explain = |extra: &[&str]| {
        let mut args = vec![
            "explain",
            path(dir.path()),
            "--from",
            "bob-phone",
            "--service",
            "nas-ssh",
            "--format",
            "json",
        ];
        args.extend_from_slice(extra);
        let out = Command::new(env!("CARGO_BIN_EXE_netportd"))
            .args(&args)
            .env("NETPORT_CACHE_DIR", cache.path())
            .output()
            .expect("netportd runs");
        assert_eq!(out.status.code(), Some(0));
        serde_json::from_slice::<Value>(&out.stdout).expect("json")
    };
    let entries = || {
        fs::read_dir(cache.path().join("policies"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let uncached = explain(&["--no-cache"]);
    assert_eq!(entries(), 0, "--no-cache must not write the cache");
    let first = explain(&[]);
    assert_eq!(entries(), 1);
    let second = explain(&[]);
    assert_eq!(first, uncached);
    assert_eq!(second, uncached);
    assert_eq!(second["verdict"], "deny");

    // Editing the policy changes the key: the answer follows the files, not the cache.
    let rest = REST.replace(
        "from = [\"tag:dev\"]",
        "from = [\"tag:dev\", \"bob-phone\"]",
    );
    let cut = rest.rfind("[[test]]").expect("a test");
    fs::write(dir.path().join("rest.toml"), &rest[..cut]).expect("write");
    let changed = explain(&[]);
    assert_eq!(changed["verdict"], "allow");
    assert_ne!(changed["policy"], first["policy"]);

    // A damaged entry is a miss, not an error.
    for entry in fs::read_dir(cache.path().join("policies")).expect("cache dir") {
        fs::write(entry.expect("entry").path(), b"garbage").expect("write");
    }
    assert_eq!(explain(&[]), changed);
}
