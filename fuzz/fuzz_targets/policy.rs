//! The policy loader: arbitrary TOML through the whole check, exactly as `netportd check`
//! and the daemon's reload run it (parse, schema, semantic checks, compile, embedded tests),
//! then the rendering of every diagnostic and, for a valid policy, decisions, explanations,
//! the diff and the frozen form.
//!
//! Input: up to eight files separated by NUL bytes (NUL is never valid in TOML).
//! Properties: nothing panics; a policy's hash does not depend on the order of its files;
//! a policy diffs empty against itself and thaws back to the same hash.

#![no_main]

use libfuzzer_sys::fuzz_target;
use netport_policy::{Request, SourceFile, check};

fuzz_target!(|data: &[u8]| {
    let sources: Vec<SourceFile> = data
        .split(|b| *b == 0)
        .take(8)
        .enumerate()
        .map(|(i, bytes)| {
            SourceFile::new(
                format!("policy/{i}.toml"),
                String::from_utf8_lossy(bytes).into_owned(),
            )
        })
        .collect();
    let report = check(sources.clone());
    let _ = report.render_plain();
    for d in &report.diagnostics {
        let _ = report.location(d);
    }
    let _ = netport_policy::to_codespan(&report.sources, &report.diagnostics);
    let Some(policy) = &report.policy else {
        return;
    };

    let reversed = check(sources.iter().rev().cloned().collect());
    assert_eq!(
        reversed.policy.as_ref().map(|p| &p.hash),
        Some(&policy.hash),
        "the file order changed the policy"
    );
    assert!(netport_policy::diff(policy, policy).is_empty());
    let key = netport_policy::input_key(&sources);
    let thawed = netport_policy::Policy::thaw(&policy.freeze(&key), &key);
    assert_eq!(thawed.map(|p| p.hash), Some(policy.hash.clone()));

    for portal in policy.portals.iter().take(8) {
        for service in policy.services.iter().take(8) {
            let _ = policy.decide(&Request::new(&portal.name, &service.name));
            let _ = policy.explain(&portal.name, &service.name);
        }
        let _ = policy.listeners_for(&portal.name).count();
    }
    let _ = policy.explain("no-such-portal", "no-such-service");
});
