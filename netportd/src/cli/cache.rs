//! A cache of compiled policies for read-only commands (`explain`, `diff`), keyed by the
//! exact bytes of every policy file (see `netport_policy::input_key`). A hit skips parsing
//! and checking; a miss, an unreadable or damaged entry, or an unwritable cache directory
//! just means the policy is checked as usual.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use netport_policy::{Policy, SourceFile};
use sha2::{Digest, Sha256};

/// `$NETPORT_CACHE_DIR`, else `$XDG_CACHE_HOME/netport`, else `~/.cache/netport`.
fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("NETPORT_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("netport"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/netport"))
}

/// One entry per policy directory: a new version replaces the old one.
fn entry(dir: &Path) -> Option<PathBuf> {
    let canonical = fs::canonicalize(dir).ok()?;
    let name = hex::encode(Sha256::digest(canonical.as_os_str().as_encoded_bytes()));
    Some(
        cache_dir()?
            .join("policies")
            .join(format!("{}.bin", &name[..32])),
    )
}

pub fn get(dir: &Path, sources: &[SourceFile]) -> (Option<Policy>, String) {
    let key = netport_policy::input_key(sources);
    let hit = entry(dir)
        .and_then(|path| fs::read(path).ok())
        .and_then(|bytes| Policy::thaw(&bytes, &key));
    (hit, key)
}

pub fn put(dir: &Path, key: &str, policy: &Policy) {
    let Some(path) = entry(dir) else { return };
    let Some(parent) = path.parent() else { return };
    if fs::create_dir_all(parent).is_err() {
        return;
    }
    // Write a temporary file and rename it, so a reader never sees half an entry.
    let tmp = parent.join(format!(".tmp-{}", std::process::id()));
    let ok = fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&policy.freeze(key)))
        .is_ok();
    if !ok || fs::rename(&tmp, &path).is_err() {
        let _ = fs::remove_file(&tmp);
    }
}
