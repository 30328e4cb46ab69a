//! Hot reload: watch the policy directory the way sync tools write it, debounce, then run
//! the same loader as `netportd check`; swap only a policy that passes everything, and
//! reconcile the world to it.
//!
//! Watched: the directory's parent (a symlink flip of the whole directory, as git-sync does,
//! replaces the entry there) and the directory's current target, recursively (in-place
//! edits, rename-over, files added or removed in subdirectories, a ConfigMap `..data` swap).
//! After each reload the watches are set up again, so a flipped or recreated directory is
//! followed. SIGHUP also reloads.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use super::Server;

/// Watches `dir` and reloads on change until `shutdown`.
pub async fn watch(
    server: Arc<Server>,
    dir: PathBuf,
    debounce: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let parent = parent_of(&dir);
    let name = dir.file_name().map(|n| n.to_os_string());
    let handler = {
        let tx = tx.clone();
        move |res: notify::Result<notify::Event>| {
            // Reading the files (our own reloads) produces access events: only changes count.
            // In the parent directory only the policy entry itself counts: logs, the audit
            // log or other files living next to it must not hold off a reload.
            if let Ok(ev) = res
                && !matches!(ev.kind, notify::EventKind::Access(_))
                && ev.paths.iter().any(|p| {
                    p.parent() != Some(parent.as_path()) || p.file_name() == name.as_deref()
                })
            {
                let _ = tx.send(());
            }
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::error!("cannot watch the policy directory ({e}); reload with SIGHUP");
            None
        }
    };
    let mut watched = Watched::default();
    rewatch(&mut watcher, &dir, &mut watched);
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    // A safety net for events a file system does not deliver: a cheap content check.
    let mut poll = tokio::time::interval(Duration::from_secs(30));
    poll.tick().await;
    loop {
        tokio::select! {
            Some(()) = rx.recv() => {}
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                tracing::info!("SIGHUP: reloading the policy");
            }
            _ = poll.tick() => {}
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    return;
                }
                continue;
            }
        }
        // A burst of events (a git checkout, a rename dance) becomes one reload.
        loop {
            tokio::select! {
                Some(()) = rx.recv() => continue,
                _ = tokio::time::sleep(debounce) => break,
            }
        }
        while rx.try_recv().is_ok() {}
        let s = server.clone();
        let d = dir.clone();
        let _ = tokio::task::spawn_blocking(move || s.reload(&d)).await;
        if rewatch(&mut watcher, &dir, &mut watched) {
            let _ = tx.send(());
        }
    }
}

/// What is being watched: the parent (once, for good) and the target with its inode.
#[derive(Default)]
struct Watched {
    parent: Option<PathBuf>,
    target: Option<(PathBuf, u64)>,
}

/// (Re)establishes the watches: the directory's parent (kept for good once it is watched: a
/// symlink flip happens there, and unwatching it even briefly could miss one) and the
/// directory's current target, recursively. Returns true when the target watch moved (a
/// flip, or a directory deleted and recreated): changes made while it moved may have gone
/// unseen, so the caller checks the files once more.
fn rewatch(
    watcher: &mut Option<notify::RecommendedWatcher>,
    dir: &Path,
    watched: &mut Watched,
) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(w) = watcher.as_mut() else {
        return false;
    };
    if watched.parent.is_none() {
        let parent = parent_of(dir);
        match w.watch(&parent, RecursiveMode::NonRecursive) {
            Ok(()) => watched.parent = Some(parent),
            Err(e) => tracing::warn!(path = %parent.display(), "cannot watch: {e}"),
        }
    }
    let target = std::fs::canonicalize(dir)
        .ok()
        .and_then(|t| std::fs::metadata(&t).ok().map(|m| (t, m.ino())));
    if target == watched.target {
        return false;
    }
    if let Some((old, _)) = watched.target.take() {
        let _ = w.unwatch(&old);
    }
    if let Some((t, ino)) = target {
        match w.watch(&t, RecursiveMode::Recursive) {
            Ok(()) => watched.target = Some((t, ino)),
            Err(e) => tracing::warn!(path = %t.display(), "cannot watch: {e}"),
        }
    }
    true
}

/// The directory holding `dir` (`.` for a bare relative name).
fn parent_of(dir: &Path) -> PathBuf {
    dir.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}
