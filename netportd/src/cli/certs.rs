//! Certificate expiry for `netportd check`: certificate files kept in the policy directory
//! (`*.crt`, `*.pem`) and, with `--config`, the daemon's own `[tls]` certificate and CA.

use std::path::{Path, PathBuf};

use netport_common::expiry::{self, Expiry};
use serde_json::json;

/// A certificate that expires within the warning window or has expired.
#[derive(Debug)]
pub struct Finding {
    pub file: String,
    pub who: String,
    pub not_after: i64,
    pub expiry: Expiry,
}

impl Finding {
    pub fn is_error(&self) -> bool {
        matches!(self.expiry, Expiry::Expired { .. })
    }

    pub fn message(&self) -> String {
        let when = expiry::date(self.not_after);
        match self.expiry {
            Expiry::Expired { days } => format!(
                "{}: certificate {} expired {days} days ago ({when}): issue a new one",
                self.file, self.who
            ),
            Expiry::Soon { days } => format!(
                "{}: certificate {} expires in {days} days ({when}): issue a new one before then",
                self.file, self.who
            ),
            Expiry::Fine => format!("{}: certificate {} is valid", self.file, self.who),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let (status, days) = match self.expiry {
            Expiry::Expired { days } => ("expired", days),
            Expiry::Soon { days } => ("expiring", days),
            Expiry::Fine => ("valid", 0),
        };
        json!({"file": self.file, "certificate": self.who, "not_after": expiry::date(self.not_after),
               "status": status, "days": days})
    }
}

/// Certificate files below `dir` (names starting with `.` skipped, like the policy loader).
fn certificate_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        if p.is_dir() {
            certificate_files(&p, out);
        } else if name.ends_with(".crt") || name.ends_with(".pem") {
            out.push(p);
        }
    }
}

/// The `[tls]` certificate and CA files named by a daemon configuration.
fn configured_files(config: &Path) -> Result<Vec<PathBuf>, String> {
    let text = std::fs::read_to_string(config)
        .map_err(|e| format!("cannot read {}: {e}", config.display()))?;
    let value: toml::Table = toml::from_str(&text)
        .map_err(|e| format!("{} is not a valid configuration: {e}", config.display()))?;
    let base = config.parent().unwrap_or(Path::new("."));
    let tls = value
        .get("tls")
        .and_then(|t| t.as_table())
        .ok_or_else(|| format!("{} has no [tls] table", config.display()))?;
    Ok(["cert", "ca"]
        .iter()
        .filter_map(|k| tls.get(*k).and_then(|v| v.as_str()))
        .map(|p| base.join(p))
        .collect())
}

/// Every certificate of the policy directory and of `config` that expires within
/// `warn_days`; and the files that could not be read.
pub fn scan(dir: &Path, config: Option<&Path>, warn_days: u32) -> (Vec<Finding>, Vec<String>) {
    let mut files = Vec::new();
    certificate_files(dir, &mut files);
    let mut problems = Vec::new();
    if let Some(c) = config {
        match configured_files(c) {
            Ok(f) => files.extend(f),
            Err(e) => problems.push(e),
        }
    }
    let now = expiry::now_unix();
    let mut findings = Vec::new();
    for f in files {
        match expiry::read_certificates(&f) {
            Ok(infos) => {
                for info in infos {
                    let e = expiry::classify(info.not_after, now, warn_days);
                    if e == Expiry::Fine {
                        continue;
                    }
                    let who = info
                        .identity
                        .as_ref()
                        .map(|i| i.to_string())
                        .unwrap_or_else(|| format!("`{}`", info.subject));
                    findings.push(Finding {
                        file: f.display().to_string(),
                        who,
                        not_after: info.not_after,
                        expiry: e,
                    });
                }
            }
            Err(e) => problems.push(format!("{e:#}")),
        }
    }
    (findings, problems)
}
