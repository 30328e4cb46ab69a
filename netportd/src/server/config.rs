//! `netportd.toml`: parsed, then validated completely (certificates, policy) before any
//! socket is opened.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use netport_policy::Policy;
use netport_proto::identity::Role;
use netport_proto::tls::Credentials;
use serde::Deserialize;

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetportdToml {
    /// Control listeners for portals and relays (`ip:port`).
    pub listen: Vec<SocketAddr>,
    /// The policy directory.
    pub policy: PathBuf,
    /// Seconds between heartbeats (default 10); a peer silent for three is gone.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_secs: u32,
    /// Seconds a new control connection has to finish its TLS handshake and say hello
    /// (default 10); until then it counts against the 4,096 unauthenticated connections.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_secs: u32,
    /// Seconds a link's relay tokens stay valid (default 15).
    #[serde(default = "default_token_ttl")]
    pub token_ttl_secs: u64,
    /// Milliseconds of quiet after a change in the policy directory before it is reloaded
    /// (default 300): a burst of writes becomes one reload.
    #[serde(default = "default_debounce")]
    pub reload_debounce_ms: u64,
    /// Where to serve `/metrics`, `/healthz`, `/readyz` and `/status` over plain HTTP
    /// (`ip:port`); off when absent. Bind it to loopback or a management network.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// The audit log: JSON lines, one per decision, closed stream, reload and teardown.
    /// A file path (appended to) or `-` for standard output; off when absent.
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
    /// Start even when the policy directory is missing or invalid, and wait for a valid
    /// policy to appear (a git-sync sidecar's first clone) with `/readyz` not ready, rather
    /// than exit 2 (default false).
    #[serde(default)]
    pub wait_for_policy: bool,
    /// Certificates.
    pub tls: netport_common::TlsToml,
    /// The legacy (V0.1) listener for the original Python portals; off when absent.
    #[serde(default)]
    pub legacy: Option<super::legacy::LegacyToml>,
}

fn default_heartbeat() -> u32 {
    10
}

fn default_handshake_timeout() -> u32 {
    10
}

fn default_token_ttl() -> u64 {
    15
}

fn default_debounce() -> u64 {
    300
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Control listen addresses.
    pub listen: Vec<SocketAddr>,
    /// The policy directory.
    pub policy_dir: PathBuf,
    /// The policy loaded at start; `None` when `wait_for_policy` is set and there was no
    /// valid one yet.
    pub policy: Option<Policy>,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// How long a new control connection may take to authenticate.
    pub handshake_timeout: Duration,
    /// Token lifetime.
    pub token_ttl: Duration,
    /// Reload debounce.
    pub debounce: Duration,
    /// Server credentials.
    pub credentials: Credentials,
    /// The admin endpoint's address.
    pub admin_listen: Option<SocketAddr>,
    /// The audit log (`-` for standard output).
    pub audit_log: Option<PathBuf>,
    /// The legacy listener, when configured.
    pub legacy: Option<super::legacy::LegacyConfig>,
}

impl Config {
    /// Reads and validates `path`; relative paths in it are taken from its directory.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the configuration {}", path.display()))?;
        let raw: NetportdToml = toml::from_str(&text)
            .with_context(|| format!("{} is not a valid netportd.toml", path.display()))?;
        Self::validate(raw, path.parent().unwrap_or(Path::new(".")))
    }

    /// Validates a parsed file.
    pub fn validate(raw: NetportdToml, base: &Path) -> Result<Config> {
        if raw.listen.is_empty() {
            bail!("`listen` is empty: give at least one control address, like [\"0.0.0.0:7443\"]");
        }
        if raw.heartbeat_secs == 0 {
            bail!("`heartbeat_secs` must be at least 1");
        }
        if raw.handshake_timeout_secs == 0 {
            bail!("`handshake_timeout_secs` must be at least 1");
        }
        if raw.token_ttl_secs == 0 {
            bail!("`token_ttl_secs` must be at least 1");
        }
        let credentials = raw.tls.load(base, Role::Server)?;
        let policy_dir = base.join(&raw.policy);
        let audit_log = raw
            .audit_log
            .map(|p| if p == Path::new("-") { p } else { base.join(p) });
        if let Some(p) = &audit_log
            && p != Path::new("-")
            && let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.is_dir()
        {
            bail!(
                "`audit_log`: the directory {} does not exist (create it, or use \"-\" for standard output)",
                dir.display()
            );
        }
        let policy = match load_policy(&policy_dir) {
            Ok(p) => Some(p),
            Err(e) if raw.wait_for_policy => {
                tracing::warn!("no valid policy yet, waiting for one (`wait_for_policy`): {e:#}");
                None
            }
            Err(e) => return Err(e),
        };
        let legacy = raw.legacy.map(|l| l.validate(&raw.tls, base)).transpose()?;
        Ok(Config {
            legacy,
            listen: raw.listen,
            policy_dir,
            policy,
            heartbeat: Duration::from_secs(u64::from(raw.heartbeat_secs)),
            handshake_timeout: Duration::from_secs(u64::from(raw.handshake_timeout_secs)),
            token_ttl: Duration::from_secs(raw.token_ttl_secs),
            debounce: Duration::from_millis(raw.reload_debounce_ms),
            credentials,
            admin_listen: raw.admin_listen,
            audit_log,
        })
    }
}

/// Loads and checks the policy directory as `netportd check` does.
pub fn load_policy(dir: &Path) -> Result<Policy> {
    let report = netport_policy::load(dir).with_context(|| {
        format!(
            "`policy`: cannot read the policy directory {}",
            dir.display()
        )
    })?;
    let Some(policy) = report.policy.clone() else {
        bail!(
            "`policy`: the policy in {} is not valid:\n{}run `netportd check {}` for details",
            dir.display(),
            report.render_plain(),
            dir.display()
        );
    };
    Ok(policy)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_documented_example_parses() {
        let text = include_str!("../../../examples/config/netportd.toml");
        let raw: Result<super::NetportdToml, _> = toml::from_str(text);
        assert!(raw.is_ok(), "{raw:?}");
    }

    #[test]
    fn the_legacy_example_parses_with_its_listener() {
        let text = include_str!("../../../examples/config/netportd-legacy.toml");
        let raw: Result<super::NetportdToml, _> = toml::from_str(text);
        let legacy = raw
            .ok()
            .and_then(|r| r.legacy)
            .map(|l| (l.listen.port(), l.keepalive_secs, l.idle_secs));
        assert_eq!(legacy, Some((5000, 10, 45)));
    }
}
