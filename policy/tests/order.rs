//! The policy hash does not depend on how the files are ordered (regression inputs found by
//! fuzzing: `fuzz/corpus/policy/regression-*`).

use netport_policy::{SourceFile, check};

fn hash(files: &[(&str, &str)]) -> Option<String> {
    check(
        files
            .iter()
            .map(|(path, text)| SourceFile::new(*path, *text))
            .collect(),
    )
    .policy
    .map(|p| p.hash)
}

#[test]
fn a_key_revoked_twice_with_different_reasons_hashes_the_same_in_any_file_order() {
    let key = "00ad71b7f784484af1b8a873ad0193ee89cb24903a77309b894e3e087513938b";
    let a = format!("[[revoked]]\nspki_sha256 = \"{key}\"\nreason = \"laptop lost\"\n");
    let b = format!(
        "[[revoked]]\nspki_sha256 = \"{}\"\nreason = \"same laptop, reported again\"\n",
        key.to_uppercase()
    );
    let forward = hash(&[("p/a.toml", &a), ("p/b.toml", &b)]);
    let backward = hash(&[("p/b.toml", &b), ("p/a.toml", &a)]);
    assert!(
        forward.is_some(),
        "a duplicate revocation is only a warning"
    );
    assert_eq!(forward, backward);
}

#[test]
fn every_regression_input_of_the_fuzzer_checks_without_panicking() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/policy");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz/corpus/policy") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !name.starts_with("regression-") {
            continue;
        }
        let bytes = std::fs::read(&path).expect("read");
        let files: Vec<SourceFile> = bytes
            .split(|b| *b == 0)
            .take(8)
            .enumerate()
            .map(|(i, f)| SourceFile::new(format!("p/{i}.toml"), String::from_utf8_lossy(f)))
            .collect();
        let forward = check(files.clone()).policy.map(|p| p.hash);
        let backward = check(files.into_iter().rev().collect())
            .policy
            .map(|p| p.hash);
        assert_eq!(forward, backward, "{name}");
        n += 1;
    }
    assert!(n > 0, "no regression input in {}", dir.display());
}
