//! `portal.toml`: parsed, then validated completely before any socket is opened.

use std::path::Path;

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
    /// Where to serve `/metrics`, `/healthz`, `/readyz` and `/status` over plain HTTP
    /// (`ip:port`); off when absent. Bind it to loopback or a management network.
    #[serde(default)]
    pub admin_listen: Option<std::net::SocketAddr>,
    /// On SIGTERM, seconds that open connections may take to finish before the process
    /// exits (default 30); nothing new is accepted meanwhile.
    #[serde(default = "default_grace")]
    pub shutdown_grace_secs: u64,
    /// Seconds a UDP flow with no datagram either way lives before it is closed (default 60).
    #[serde(default = "default_udp_idle")]
    pub udp_idle_secs: u64,
    /// Largest UDP payload carried, in bytes; larger datagrams are counted and dropped with
    /// a log line (default and maximum 65507, the largest IPv4 UDP payload).
    #[serde(default = "default_udp_max")]
    pub udp_max_datagram: usize,
    /// Streams (client connections) one link carries at once; this portal refuses a
    /// connection beyond it, and the link goes on (default 1024, at most 16384).
    #[serde(default = "default_max_streams")]
    pub max_streams_per_link: usize,
    /// Links over QUIC through a relay UDP pair: `udp` (default) tries QUIC first for links
    /// set up by a UDP service, `auto` for every link, each falling back to the TCP pair;
    /// `off` uses TCP only (as a serving portal too).
    #[serde(default)]
    pub quic: QuicMode,
    /// Milliseconds a client portal gives the QUIC attempt (relay hello and handshake)
    /// before it falls back to TCP (default 3000).
    #[serde(default = "default_quic_timeout")]
    pub quic_timeout_ms: u64,
    /// Threads the portal runs on: 1 (the default) is a single-threaded portal, which
    /// spends less CPU on each new connection (no hand-offs between threads); 0 is one per
    /// CPU. README "Threads" has the measured trade-off.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Certificates.
    pub tls: netport_common::TlsToml,
}

/// Whether links may run over QUIC.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuicMode {
    /// Every link over QUIC when the relay's UDP pair works, else TCP.
    Auto,
    /// Links for UDP services over QUIC (datagrams, no head-of-line blocking), links for
    /// TCP services over TCP (faster for byte streams through a userspace relay); a serving
    /// portal takes either.
    #[default]
    Udp,
    /// TCP links only.
    Off,
}

impl QuicMode {
    /// Which links this portal runs over QUIC, as it announces them to netportd.
    pub fn links(self) -> netport_proto::control::QuicLinks {
        use netport_proto::control::QuicLinks;
        match self {
            QuicMode::Auto => QuicLinks::All,
            QuicMode::Udp => QuicLinks::ForUdp,
            QuicMode::Off => QuicLinks::None,
        }
    }
}

fn default_threads() -> usize {
    1
}

/// The most `threads` may be.
pub const MAX_THREADS: usize = 1024;

fn default_quic_timeout() -> u64 {
    3000
}

fn default_idle() -> u64 {
    300
}

fn default_grace() -> u64 {
    30
}

fn default_udp_idle() -> u64 {
    60
}

fn default_max_streams() -> usize {
    1024
}

/// The most `max_streams_per_link` may be; a serving portal accepts this many (plus room for
/// streams still closing) from any client portal, whatever the client's own setting.
pub const MAX_STREAMS_PER_LINK: usize = 16_384;

fn default_udp_max() -> usize {
    MAX_UDP_PAYLOAD
}

/// The largest UDP payload over IPv4 (65535 minus the IPv4 and UDP headers).
pub const MAX_UDP_PAYLOAD: usize = 65_507;

/// How UDP services are carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpConfig {
    /// A flow with no datagram either way for this long is closed.
    pub idle: std::time::Duration,
    /// Larger datagrams are dropped (and counted), never truncated.
    pub max_datagram: usize,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Control addresses with the name to verify for each.
    pub servers: Vec<(String, String)>,
    /// Idle link timeout.
    pub link_idle: std::time::Duration,
    /// Streams one link carries at once (`max_streams_per_link`).
    pub max_streams_per_link: usize,
    /// UDP flows.
    pub udp: UdpConfig,
    /// TLS credentials.
    pub credentials: Credentials,
    /// The admin endpoint's address.
    pub admin_listen: Option<std::net::SocketAddr>,
    /// How long a shutdown waits for open connections.
    pub shutdown_grace: std::time::Duration,
    /// Links over QUIC.
    pub quic: QuicMode,
    /// The client's QUIC attempt before it falls back to TCP.
    pub quic_timeout: std::time::Duration,
    /// Runtime threads (`threads`): 1 single-threaded, 0 one per CPU.
    pub threads: usize,
}

impl netport_common::DaemonConfig for Config {
    fn worker_threads(&self) -> usize {
        self.threads
    }
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
        let servers = netport_common::servers(&raw.servers, raw.server_name.as_deref())?;
        let credentials = raw.tls.load(base, Role::Portal)?;
        if raw.link_idle_secs == 0 {
            bail!("`link_idle_secs` must be at least 1");
        }
        if raw.udp_idle_secs == 0 {
            bail!("`udp_idle_secs` must be at least 1");
        }
        if raw.udp_max_datagram == 0 || raw.udp_max_datagram > MAX_UDP_PAYLOAD {
            bail!(
                "`udp_max_datagram` = {} must be between 1 and {MAX_UDP_PAYLOAD} bytes",
                raw.udp_max_datagram
            );
        }
        if raw.max_streams_per_link == 0 || raw.max_streams_per_link > MAX_STREAMS_PER_LINK {
            bail!(
                "`max_streams_per_link` = {} must be between 1 and {MAX_STREAMS_PER_LINK}",
                raw.max_streams_per_link
            );
        }
        if !(100..=60_000).contains(&raw.quic_timeout_ms) {
            bail!(
                "`quic_timeout_ms` = {} must be between 100 and 60000",
                raw.quic_timeout_ms
            );
        }
        if raw.threads > MAX_THREADS {
            bail!(
                "`threads` = {} is more than {MAX_THREADS}; use 1 (the default), a number of \
                 threads, or 0 for one per CPU",
                raw.threads
            );
        }
        Ok(Config {
            threads: raw.threads,
            servers,
            max_streams_per_link: raw.max_streams_per_link,
            link_idle: std::time::Duration::from_secs(raw.link_idle_secs),
            udp: UdpConfig {
                idle: std::time::Duration::from_secs(raw.udp_idle_secs),
                max_datagram: raw.udp_max_datagram,
            },
            credentials,
            admin_listen: raw.admin_listen,
            shutdown_grace: std::time::Duration::from_secs(raw.shutdown_grace_secs),
            quic: raw.quic,
            quic_timeout: std::time::Duration::from_millis(raw.quic_timeout_ms),
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
