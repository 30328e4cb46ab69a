//! Every daemon validates its configuration before binding anything and exits 2 with a
//! message that names the key.

use std::process::Command;

use netport_e2e::{Pki, binary};
use netport_proto::identity::Role;

fn run(bin: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(binary(bin)).args(args).output().expect("runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configurations_exit_two_naming_the_key() {
    let pki = Pki::new().expect("pki");
    let d = pki.dir.path();
    let portal = pki.issue(Role::Portal, "alice").expect("issue");
    let tls = |cert: &str| {
        format!(
            "[tls]\nca = \"{}\"\ncert = \"{cert}\"\nkey = \"{}\"\n",
            pki.ca_path().display(),
            portal.key.display()
        )
    };
    let good_cert = portal.cert.display().to_string();
    let cases: Vec<(&str, Vec<&str>, String, &str)> = vec![
        (
            "portal",
            vec![],
            format!(
                "servers = [\"127.0.0.1:1\"]\ncolour = 1\n{}",
                tls(&good_cert)
            ),
            "colour",
        ),
        (
            "portal",
            vec![],
            format!("servers = [\"127.0.0.1:1\"]\n{}", tls("/nonexistent.crt")),
            "tls.cert",
        ),
        (
            "portal",
            vec![],
            format!("servers = [\"no-port\"]\n{}", tls(&good_cert)),
            "servers",
        ),
        (
            "portal",
            vec![],
            format!(
                "servers = [\"127.0.0.1:1\"]\nquic = \"sometimes\"\n{}",
                tls(&good_cert)
            ),
            "quic",
        ),
        (
            "portal",
            vec![],
            format!(
                "servers = [\"127.0.0.1:1\"]\nquic_timeout_ms = 5\n{}",
                tls(&good_cert)
            ),
            "quic_timeout_ms",
        ),
        (
            "portal",
            vec![],
            format!(
                "servers = [\"127.0.0.1:1\"]\nthreads = 5000\n{}",
                tls(&good_cert)
            ),
            "threads",
        ),
        (
            "relayd",
            vec![],
            format!(
                "servers = [\"127.0.0.1:1\"]\npublic_address = \"127.0.0.1\"\nports = \"5-4\"\n{}",
                tls(&good_cert)
            ),
            "ports",
        ),
        (
            "relayd",
            vec![],
            format!(
                "servers = [\"127.0.0.1:1\"]\npublic_address = \"127.0.0.1\"\nports = \"40000-40010\"\n{}",
                tls(&good_cert)
            ),
            "relay certificate",
        ),
        (
            "portal",
            vec![],
            format!(
                "servers = [\"127.0.0.1:1\"]\nudp_max_datagram = 70000\n{}",
                tls(&good_cert)
            ),
            "udp_max_datagram",
        ),
        (
            "relayd",
            vec![],
            format!(
                "servers = [\"127.0.0.1:1\"]\npublic_address = \"127.0.0.1\"\nports = \"40000-40010\"\nudp_fast_path = \"ebpf\"\n{}",
                tls(&good_cert)
            ),
            "udp_fast_path",
        ),
        (
            "relayd",
            vec![],
            format!(
                "servers = [\"127.0.0.1:1\"]\npublic_address = \"127.0.0.1\"\nports = \"40000-40010\"\ntcp_fast_path = \"ebpf\"\n{}",
                tls(&good_cert)
            ),
            "tcp_fast_path",
        ),
        (
            "relayd",
            vec![],
            format!(
                "servers = [\"127.0.0.1:1\"]\npublic_address = \"127.0.0.1\"\nports = \"40000-40010\"\nfirewall = \"iptables\"\n{}",
                tls(&good_cert)
            ),
            "firewall",
        ),
        (
            "netportd",
            vec!["run"],
            format!(
                "listen = [\"127.0.0.1:0\"]\npolicy = \"{}\"\n{}",
                d.join("nope").display(),
                tls(&good_cert)
            ),
            "server certificate",
        ),
        (
            "netportd",
            vec!["run"],
            format!(
                "listen = [\"127.0.0.1:0\"]\npolicy = \"{}\"\nhandshake_timeout_secs = 0\n{}",
                d.join("nope").display(),
                tls(&good_cert)
            ),
            "handshake_timeout_secs",
        ),
    ];
    for (i, (bin, pre, text, needle)) in cases.into_iter().enumerate() {
        let cfg = d.join(format!("case-{i}.toml"));
        std::fs::write(&cfg, &text).expect("write");
        let mut args = pre.clone();
        args.extend(["--config", cfg.to_str().expect("utf-8")]);
        let (code, err) = run(bin, &args);
        assert_eq!(code, Some(2), "{bin} case {i}: {err}");
        assert!(
            err.contains(needle),
            "{bin} case {i}: expected `{needle}` in: {err}"
        );
    }
    let (code, err) = run(
        "netportd",
        &["run", "--config", "/nonexistent/netportd.toml"],
    );
    assert_eq!(code, Some(2));
    assert!(err.contains("cannot read the configuration"), "{err}");
}
