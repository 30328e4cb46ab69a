//! `portal.toml`: parsed, then validated completely before any socket is opened.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use netport_proto::identity::Role;
use netport_proto::tls::Credentials;
use serde::Deserialize;

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortalToml {
    /// netportd control addresses (`host:port`), tried in turn.
    pub servers: Vec<String>,
    /// Name to verify on the server certificate (default: the host of each address).
    pub server_name: Option<String>,
    /// Seconds a link with no stream stays open before it is closed (default 300).
    #[serde(default = "default_idle")]
    pub link_idle_secs: u64,
    /// Certificates.
    pub tls: TlsToml,
}

/// Certificate files.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsToml {
    /// The Netport CA certificate (PEM).
    pub ca: PathBuf,
    /// This portal's certificate chain (PEM), `netport://portal/<name>`.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

fn default_idle() -> u64 {
    300
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Control addresses with the name to verify for each.
    pub servers: Vec<(String, String)>,
    /// Idle link timeout.
    pub link_idle: std::time::Duration,
    /// TLS credentials.
    pub credentials: Credentials,
}

impl Config {
    /// Reads and validates `path`; relative paths are taken from its directory.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the configuration {}", path.display()))?;
        let raw: PortalToml = toml::from_str(&text)
            .with_context(|| format!("{} is not a valid portal.toml", path.display()))?;
        Self::validate(raw, path.parent().unwrap_or(Path::new(".")))
    }

    /// Validates a parsed file.
    pub fn validate(raw: PortalToml, base: &Path) -> Result<Config> {
        if raw.servers.is_empty() {
            bail!(
                "`servers` is empty: list at least one netportd address, like [\"netportd.example.net:7443\"]"
            );
        }
        let mut servers = Vec::new();
        for s in &raw.servers {
            let host = netport_proto::control::host_of(s).with_context(|| {
                format!("`servers` entry `{s}` is not host:port (for example \"netportd.example.net:7443\")")
            })?;
            servers.push((s.clone(), raw.server_name.clone().unwrap_or(host)));
        }
        let read = |key: &str, p: &Path| {
            let full = base.join(p);
            std::fs::read(&full).with_context(|| {
                format!("`tls.{key}`: cannot read {} (`netportd ca issue portal NAME` writes these files)", full.display())
            })
        };
        let credentials = Credentials::from_pem(
            &read("cert", &raw.tls.cert)?,
            &read("key", &raw.tls.key)?,
            &read("ca", &raw.tls.ca)?,
        )
        .context(
            "`tls`: the certificate, key and CA do not fit together (is `key` the key of `cert`?)",
        )?;
        if credentials.identity().role != Role::Portal {
            bail!(
                "`tls.cert` is for {}, but a portal needs a portal certificate (`netportd ca issue portal NAME`)",
                credentials.identity()
            );
        }
        if raw.link_idle_secs == 0 {
            bail!("`link_idle_secs` must be at least 1");
        }
        Ok(Config {
            servers,
            link_idle: std::time::Duration::from_secs(raw.link_idle_secs),
            credentials,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_documented_example_parses() {
        let text = include_str!("../../examples/config/portal.toml");
        let raw: Result<super::PortalToml, _> = toml::from_str(text);
        assert!(raw.is_ok(), "{raw:?}");
    }
}
