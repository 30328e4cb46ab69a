//! Running the daemons as an unprivileged user, for the tests that prove Netport works
//! without root: the relay's kernel fast paths and firewall cannot load and it falls back to
//! userspace. The test process itself stays root (it needs to switch user); once a test
//! binary calls [`enable`], every daemon it starts runs as `nobody` (uid and gid 65534) with no
//! capabilities, through `setpriv`, from copies of the binaries in a directory that user can
//! read (the build directory may sit below one it cannot enter).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};

/// The unprivileged user and group.
pub const UID: u32 = 65_534;

/// `setpriv` arguments: become `nobody`, with no supplementary groups and no capabilities
/// in any set, and no way to gain any.
pub const SETPRIV: &[&str] = &[
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all",
    "--bounding-set=-all",
    "--no-new-privs",
];

static ON: AtomicBool = AtomicBool::new(false);
static COPIES: OnceLock<std::result::Result<tempfile::TempDir, String>> = OnceLock::new();

/// Whether this process can run daemons as another user (it is root and has `setpriv`).
pub fn possible() -> bool {
    crate::netns::is_root()
        && Command::new("setpriv")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
}

/// From now on, this process starts every daemon as `nobody` with no capabilities.
pub fn enable() {
    ON.store(true, Ordering::SeqCst);
}

fn on() -> bool {
    ON.load(Ordering::SeqCst)
}

/// Lines for relayd.toml: unprivileged, the relay is told to attach its XDP program to `lo`,
/// so loading it is really tried and fails for want of privileges (with `bind` on loopback
/// and no interface named, relayd would not try at all).
pub fn relay_settings() -> &'static str {
    if on() {
        "xdp_interfaces = [\"lo\"]\n"
    } else {
        ""
    }
}

/// The copy of `bin` to run, when daemons run unprivileged.
pub fn binary(bin: &str) -> Result<Option<PathBuf>> {
    if !on() {
        return Ok(None);
    }
    let dir = COPIES
        .get_or_init(|| copy_binaries().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("copying the binaries for the unprivileged user: {e}"))?;
    let name = Path::new(bin)
        .file_name()
        .context("binary name")?
        .to_owned();
    Ok(Some(dir.path().join(name)))
}

fn copy_binaries() -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("netport-unprivileged-bin-")
        .tempdir()?;
    for bin in ["netportd", "relayd", "portal"] {
        let to = dir.path().join(bin);
        std::fs::copy(crate::binary(bin), &to)
            .with_context(|| format!("copying {bin} (build the workspace first)"))?;
    }
    hand_over(dir.path())?;
    Ok(dir)
}

/// Gives `dir` and everything in it to the unprivileged user (when daemons run as it), so
/// they can read their keys and write next to their configuration.
pub fn hand_over(dir: &Path) -> Result<()> {
    if !on() {
        return Ok(());
    }
    let ok = Command::new("chown")
        .arg("-R")
        .arg(format!("{UID}:{UID}"))
        .arg(dir)
        .status()
        .context("running chown")?
        .success();
    if !ok {
        bail!("chown -R {UID} {} failed", dir.display());
    }
    Ok(())
}
