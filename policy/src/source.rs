//! Reading a policy directory: the only I/O this crate does.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

/// One policy file as read from disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// The path shown in diagnostics: the directory as given, joined with the file's path below it.
    pub path: String,
    /// The file's contents.
    pub content: String,
}

impl SourceFile {
    /// A source from memory (tests, fuzzing, the reload pipeline's own copies).
    pub fn new(path: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            content: content.into(),
        }
    }
}

/// Reading the policy directory failed (as opposed to the policy being wrong).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The directory (or something below it) could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// What could not be read.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The path given is not a directory.
    #[error("{path} is not a directory (give the policy directory, not a file)")]
    NotADirectory {
        /// The path given.
        path: String,
    },
    /// A policy file is not UTF-8.
    #[error("{path} is not valid UTF-8 text")]
    NotUtf8 {
        /// The offending file.
        path: String,
    },
}

/// Reads every `*.toml` file below `dir`, recursively, in a stable (sorted) order.
///
/// Entries whose name starts with `.` are skipped, so `.git` and the `..data` / `..2024_…`
/// folders of a Kubernetes ConfigMap mount are not read (the ConfigMap's visible files are
/// symlinks into them and are read once, through the link). Symlinks are followed; a symlink
/// cycle is read once.
pub fn load_dir(dir: &Path) -> Result<Vec<SourceFile>, LoadError> {
    let meta = fs::metadata(dir).map_err(|source| LoadError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(LoadError::NotADirectory {
            path: dir.display().to_string(),
        });
    }
    let mut files = Vec::new();
    let mut seen_dirs = HashSet::new();
    walk(dir, dir, &mut files, &mut seen_dirs)?;
    files.sort();
    let mut out = Vec::with_capacity(files.len());
    for (_, path) in files {
        let bytes = fs::read(&path).map_err(|source| LoadError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let content = String::from_utf8(bytes).map_err(|_| LoadError::NotUtf8 {
            path: path.display().to_string(),
        })?;
        out.push(SourceFile {
            path: path.display().to_string(),
            content,
        });
    }
    Ok(out)
}

/// Collects `(relative path, display path)` pairs; the relative path (as a string with `/`)
/// gives the stable order.
fn walk(
    root: &Path,
    dir: &Path,
    out: &mut Vec<(String, PathBuf)>,
    seen_dirs: &mut HashSet<PathBuf>,
) -> Result<(), LoadError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| LoadError::Io { path, source }
    };
    // Following symlinks can revisit a directory; canonical paths break the cycle.
    let canonical = fs::canonicalize(dir).map_err(io(dir))?;
    if !seen_dirs.insert(canonical) {
        return Ok(());
    }
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        entries.push(entry.path());
    }
    entries.sort();
    for path in entries {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        // metadata() follows symlinks; a dangling link is an error worth reporting.
        let meta = fs::metadata(&path).map_err(io(&path))?;
        if meta.is_dir() {
            walk(root, &path, out, seen_dirs)?;
        } else if meta.is_file() && name.ends_with(".toml") {
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .replace('\\', "/");
            out.push((rel, path));
        }
    }
    Ok(())
}
