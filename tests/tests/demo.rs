//! The README's main job: `netportd demo --once` brings the whole system up on loopback
//! with the quickstart policy and proves a round trip through the tunnel, then stops the
//! relay and portals gracefully before the server.

use std::process::Command;

#[test]
fn demo_proves_a_round_trip_and_exits_zero() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(netport_e2e::binary("netportd"))
        .args(["demo", "--once"])
        .current_dir(&root)
        .env("RUST_LOG", "info")
        .output()
        .expect("netportd runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("answered \"hello through the Netport tunnel\""),
        "{stdout}"
    );
    assert!(stdout.contains("curl http://127.0.0.1:18080/"), "{stdout}");
    // Each said goodbye on its control connection while the server still listened.
    for gone in [
        "portal disconnected portal=laptop",
        "portal disconnected portal=office",
        "relay disconnected relay=relay-1",
    ] {
        assert!(stderr.contains(gone), "no `{gone}` in:\n{stderr}");
    }
    assert!(!stderr.contains("close_notify"), "{stderr}");
    assert!(!stderr.contains("warning:"), "{stderr}");
    let stopped = stderr
        .find("netportd stopped")
        .expect("the server stops last");
    let last_gone = stderr
        .rfind(" disconnected ")
        .expect("departures are logged");
    assert!(last_gone < stopped, "{stderr}");
}
