//! Exact locations and wording of diagnostics, for cases the fixture snapshots do not pin
//! down on their own: label order when definitions are processed in name order rather than
//! file order, every pair of an overlap, and the words of a few messages. Each pins a detail
//! an earlier engine got wrong.

use netport_policy::{Code, Report, SourceFile};

fn check(files: &[(&str, &str)]) -> Report {
    netport_policy::check(
        files
            .iter()
            .map(|(path, text)| SourceFile::new(*path, *text))
            .collect(),
    )
}

/// Every diagnostic as `CODE file:line:column`, with its labels' locations after `<-`.
fn located(report: &Report) -> Vec<String> {
    report
        .diagnostics
        .iter()
        .map(|d| {
            let labels: Vec<String> = d
                .labels
                .iter()
                .map(|l| {
                    let loc = netport_policy::locate(&report.sources, l.file, l.span.start);
                    format!("{loc} {}", l.message)
                })
                .collect();
            format!("{} {}", d.code, labels.join(" <- "))
        })
        .collect()
}

fn messages(report: &Report, code: Code) -> Vec<String> {
    report
        .diagnostics
        .iter()
        .filter(|d| d.code == code)
        .map(|d| d.message.clone())
        .collect()
}

#[test]
fn columns_count_characters_not_bytes() {
    let report = check(&[(
        "p.toml",
        "[[portal]]\nname = \"zürich-nas\"\ntags = [\"ü\", \"Dev\"]\n",
    )]);
    assert_eq!(
        located(&report),
        [
            "E0005 p.toml:2:8 invalid name",
            "E0005 p.toml:3:9 invalid name",
            "E0005 p.toml:3:14 invalid name",
        ]
    );
}

#[test]
fn duplicate_across_files_points_at_the_later_file_first() {
    let report = check(&[
        ("policy/a.toml", "[[portal]]\nname = \"alice\"\n"),
        (
            "policy/z/b.toml",
            "\n\n[[portal]]\ntags = []\nname = \"alice\"\n",
        ),
    ]);
    assert_eq!(
        located(&report),
        ["E0007 policy/z/b.toml:5:8 defined again here <- policy/a.toml:2:8 first defined here"]
    );
}

#[test]
fn every_pair_of_conflicting_listeners_is_reported() {
    let text = r#"
[[portal]]
name = "alice"
[[portal]]
name = "nas"
[[relay]]
name = "r"
address = "relay.example.net"
[[service]]
name = "s"
portal = "nas"
target = "10.0.0.1:22"
[[access]]
name = "a1"
from = ["alice"]
listen = "127.0.0.1:2222"
service = "s"
[[access]]
name = "a2"
from = ["alice"]
listen = "127.0.0.1:2222"
service = "s"
[[access]]
name = "a3"
from = ["alice"]
listen = "0.0.0.0:2222"
service = "s"
"#;
    let report = check(&[("p.toml", text)]);
    assert_eq!(
        located(&report),
        [
            "E0012 p.toml:21:10 `a2` listens here <- p.toml:16:10 `a1` listens here",
            "E0012 p.toml:26:10 `a3` listens here <- p.toml:16:10 `a1` listens here",
            "E0012 p.toml:26:10 `a3` listens here <- p.toml:21:10 `a2` listens here",
        ]
    );
}

#[test]
fn failing_test_points_at_the_test_and_names_the_rule() {
    let text = r#"[[portal]]
name = "alice"
[[portal]]
name = "nas"
[[relay]]
name = "r"
address = "relay.example.net"
[[service]]
name = "s"
portal = "nas"
target = "10.0.0.1:22"
[[access]]
name = "nas-self"
from = ["nas"]
listen = "127.0.0.1:2222"
service = "s"

[[test]]
from = "alice"
service = "s"
expect = "allow"
"#;
    let report = check(&[("p.toml", text)]);
    assert_eq!(located(&report), ["E0016 p.toml:18:1 expects allow"]);
    let d = &report.diagnostics[0];
    assert!(d.message.contains("no-access-rule"), "{}", d.message);
    assert_eq!(
        d.notes,
        ["the closest rule `nas-self` is at p.toml:13".to_string()]
    );
    assert!(report.policy.is_none());
    assert_eq!((report.tests.passed, report.tests.failed), (0, 1));
}

/// Two portals pin one key. The portal defined second (in file order) is where the mistake
/// is; the engine walks portals in name order, so when the later one sorts first by name the
/// labels come out swapped.
#[test]
fn duplicate_key_pin_points_at_the_later_definition() {
    let key = "2e15b40525c460e282cd07f31837a2dbf900fc53ddd43a8f4e84c0d4bb6c50c2";
    let text = format!(
        "[[portal]]\nname = \"zed-laptop\"\nspki_sha256 = \"{key}\"\n\n\
         [[portal]]\nname = \"alice-laptop\"\nspki_sha256 = \"{key}\"\n"
    );
    let report = check(&[("p.toml", &text)]);
    assert_eq!(
        located(&report),
        ["E0018 p.toml:7:15 pinned again here <- p.toml:3:15 pinned by `zed-laptop` here"]
    );
}

#[test]
fn duplicate_legacy_id_points_at_the_later_definition() {
    let text = "[[portal]]\nname = \"zed-cam\"\nlegacy_id = \"0A0B0C0D\"\n\n\
                [[portal]]\nname = \"alice-cam\"\nlegacy_id = \"0a0b0c0d\"\n";
    let report = check(&[("p.toml", text)]);
    assert_eq!(
        located(&report),
        ["E0017 p.toml:7:13 used again here <- p.toml:3:13 first used here"]
    );
}

/// relay-a's range holds both relay-b's and relay-c's; each overlapping pair is a problem.
#[test]
fn every_overlapping_relay_pair_is_reported() {
    let text = r#"[[relay]]
name = "relay-a"
address = "relay1.example.net"
ports = "40000-45000"

[[relay]]
name = "relay-b"
address = "relay1.example.net"
ports = "41000-41999"

[[relay]]
name = "relay-c"
address = "relay1.example.net"
ports = "43000-43999"
"#;
    let report = check(&[("p.toml", text)]);
    let mut got = messages(&report, Code::RelayRangeOverlap);
    got.sort();
    assert_eq!(
        got,
        [
            "relays `relay-a` and `relay-b` share the address relay1.example.net and overlapping ports",
            "relays `relay-a` and `relay-c` share the address relay1.example.net and overlapping ports",
        ]
    );
}

/// Three ranges on one host that all overlap each other: three pairs. Reporting each range
/// against only the widest one before it leaves relay-b/relay-c for the next run.
#[test]
fn overlapping_pairs_not_involving_the_widest_range_are_reported() {
    let text = r#"[[relay]]
name = "relay-a"
address = "relay1.example.net"
ports = "40000-40999"

[[relay]]
name = "relay-b"
address = "relay1.example.net"
ports = "40000-40999"

[[relay]]
name = "relay-c"
address = "relay1.example.net"
ports = "40500-41500"
"#;
    let report = check(&[("p.toml", text)]);
    let mut got = messages(&report, Code::RelayRangeOverlap);
    got.sort();
    assert_eq!(
        got,
        [
            "relays `relay-a` and `relay-b` share the address relay1.example.net and overlapping ports",
            "relays `relay-a` and `relay-c` share the address relay1.example.net and overlapping ports",
            "relays `relay-b` and `relay-c` share the address relay1.example.net and overlapping ports",
        ],
        "{}",
        report.render_plain()
    );
}

/// Without `ports` a relay allocates from DEFAULT_RELAY_PORTS, so two such relays on one
/// address (or one with a range inside the default) allocate the same ports.
#[test]
fn relays_on_one_address_with_the_default_range_overlap() {
    let both_default = r#"[[relay]]
name = "relay-a"
address = "relay1.example.net"

[[relay]]
name = "relay-b"
address = "relay1.example.net"
"#;
    let report = check(&[("p.toml", both_default)]);
    assert_eq!(
        messages(&report, Code::RelayRangeOverlap).len(),
        1,
        "{}",
        report.render_plain()
    );

    let one_default = r#"[[relay]]
name = "relay-a"
address = "relay1.example.net"

[[relay]]
name = "relay-b"
address = "relay1.example.net"
ports = "40500-41500"
"#;
    let report = check(&[("p.toml", one_default)]);
    assert_eq!(
        messages(&report, Code::RelayRangeOverlap).len(),
        1,
        "{}",
        report.render_plain()
    );
}

#[test]
fn bracketed_and_bare_ipv6_relay_addresses_are_one_address() {
    let text = r#"[[relay]]
name = "relay-a"
address = "2001:db8::40"
ports = "40000-40999"

[[relay]]
name = "relay-b"
address = "[2001:db8::40]"
ports = "40000-40999"
"#;
    let report = check(&[("p.toml", text)]);
    assert_eq!(
        messages(&report, Code::RelayRangeOverlap).len(),
        1,
        "{}",
        report.render_plain()
    );
}

#[test]
fn wrong_type_messages_use_the_right_article() {
    let text = "[[portal]]\nname = \"alice\"\ntags = \"dev\"\n\n\
                [[relay]]\nname = \"r\"\naddress = \"relay.example.net\"\nports = 40000\n";
    let report = check(&[("p.toml", text)]);
    let got = messages(&report, Code::WrongType);
    assert_eq!(
        got,
        [
            "`tags` of [[portal]] #1 must be an array, found a string",
            "`ports` of [[relay]] #1 must be a string, found an integer",
        ]
    );
}

/// A test's `from` is a portal name; a tag selector is not allowed there, so the message
/// must not suggest one.
#[test]
fn bad_test_from_is_described_as_a_name() {
    let text = "[[test]]\nfrom = \"Alice\"\nservice = \"s\"\nexpect = \"allow\"\n";
    let report = check(&[("p.toml", text)]);
    let d = report
        .diagnostics
        .iter()
        .find(|d| d.code == Code::InvalidName)
        .unwrap_or_else(|| panic!("no E0005:\n{}", report.render_plain()));
    assert_eq!(
        d.message,
        "`from` of [[test]] #1 is not a valid name: \"Alice\""
    );
    assert!(d.notes.iter().all(|n| !n.contains("tag:")), "{:?}", d.notes);
}
