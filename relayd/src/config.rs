//! `relayd.toml`: parsed, then validated completely before any socket is opened.

use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, Result, bail};
use netport_proto::identity::Role;
use netport_proto::tls::Credentials;
use serde::Deserialize;

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaydToml {
    /// netportd control addresses (`host:port`), tried in turn.
    pub servers: Vec<String>,
    /// Name to verify on the server certificate (default: the host of each server address).
    pub server_name: Option<String>,
    /// Host or IP that portals dial; announced to the server.
    pub public_address: String,
    /// Local address the allocation ports bind to (default 0.0.0.0).
    #[serde(default = "default_bind")]
    pub bind: IpAddr,
    /// Allocation port range, FIRST-LAST.
    pub ports: String,
    /// Allocations held at once (default: half the ports).
    pub capacity: Option<u32>,
    /// Seconds a connection may stay silent before sending its hello (default 5).
    #[serde(default = "default_hello_timeout")]
    pub hello_timeout_secs: u64,
    /// Where to serve `/metrics`, `/healthz`, `/readyz` and `/status` over plain HTTP
    /// (`ip:port`); off when absent. Bind it to loopback or a management network.
    #[serde(default)]
    pub admin_listen: Option<std::net::SocketAddr>,
    /// On SIGTERM, seconds that open allocations may take to finish before the process
    /// exits (default 30); nothing new is accepted meanwhile.
    #[serde(default = "default_grace")]
    pub shutdown_grace_secs: u64,
    /// Seconds a paired UDP allocation may carry nothing before it is closed (default 120).
    #[serde(default = "default_udp_idle")]
    pub udp_idle_secs: u64,
    /// How UDP allocations are forwarded: "xdp" (the default: the kernel fast path when it
    /// can load, else userspace, with one log line saying why) or "userspace".
    #[serde(default = "default_udp_fast_path")]
    pub udp_fast_path: String,
    /// How paired TCP allocations are forwarded: "copy" (default: a copy loop in relayd, a
    /// thread per direction),
    /// "splice" (splice(2) through a pipe per direction: no copy into userspace) or
    /// "sockmap" (relayd-ebpf/tcp_splice.c redirects segments in the kernel; copy when the
    /// program cannot load, with one log line saying why).
    #[serde(default = "default_tcp_fast_path")]
    pub tcp_fast_path: String,
    /// XDP attach mode: "auto" (the kernel chooses; default), "native" or "skb".
    #[serde(default = "default_xdp_mode")]
    pub xdp_mode: String,
    /// Interfaces to attach the XDP program to (default: every interface but loopback).
    pub xdp_interfaces: Option<Vec<String>>,
    /// "nftables" (default): keep a table that admits only allocated ports of the range;
    /// "none": leave the firewall alone.
    #[serde(default = "default_firewall")]
    pub firewall: String,
    /// The nftables table relayd owns (family inet). Default "netport_relayd".
    #[serde(default = "default_nftables_table")]
    pub nftables_table: String,
    /// Certificates.
    pub tls: netport_common::TlsToml,
}

fn default_bind() -> IpAddr {
    IpAddr::from([0, 0, 0, 0])
}

fn default_hello_timeout() -> u64 {
    5
}

fn default_grace() -> u64 {
    30
}

fn default_udp_idle() -> u64 {
    120
}

fn default_udp_fast_path() -> String {
    "xdp".into()
}

fn default_tcp_fast_path() -> String {
    "copy".into()
}

fn default_firewall() -> String {
    "nftables".into()
}

fn default_nftables_table() -> String {
    "netport_relayd".into()
}

fn default_xdp_mode() -> String {
    "auto".into()
}

/// Where and how the XDP fast path runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdpSettings {
    /// Whether to try the fast path at all.
    pub enabled: bool,
    /// "auto", "native" or "skb".
    pub mode: String,
    /// Interfaces named in the configuration, or `None` for every one but loopback.
    pub interfaces: Option<Vec<String>>,
    /// The relay's bind address.
    pub bind: IpAddr,
}

impl XdpSettings {
    /// The interfaces to attach to: those configured, else every one but loopback. A relay
    /// bound to a loopback address gets none: loopback traffic never meets an XDP program,
    /// and the host's real interfaces are left alone.
    pub fn interfaces(&self, bind: IpAddr) -> Result<Vec<String>> {
        if let Some(list) = &self.interfaces {
            return Ok(list.clone());
        }
        if bind.is_loopback() {
            bail!("`bind` = {bind} is a loopback address, which XDP never sees");
        }
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/sys/class/net").context("listing /sys/class/net")? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name != "lo" {
                found.push(name);
            }
        }
        found.sort();
        Ok(found)
    }
}

/// How paired TCP allocations are forwarded (`tcp_fast_path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpFastPath {
    /// A copy loop in relayd, a thread per direction.
    Copy,
    /// splice(2) through a pipe per direction.
    Splice,
    /// The kernel's sockmap redirects segments (relayd-ebpf/tcp_splice.c).
    Sockmap,
}

/// A validated configuration: everything the daemon needs, nothing left to check.
#[derive(Debug, Clone)]
pub struct Config {
    /// Control addresses with the name to verify for each.
    pub servers: Vec<(String, String)>,
    /// Announced address.
    pub public_address: String,
    /// Bind address of allocation ports.
    pub bind: IpAddr,
    /// First allocation port.
    pub port_first: u16,
    /// Last allocation port.
    pub port_last: u16,
    /// Allocations held at once.
    pub capacity: u32,
    /// Hello deadline.
    pub hello_timeout: std::time::Duration,
    /// A paired UDP allocation idle this long is closed.
    pub udp_idle: std::time::Duration,
    /// The UDP fast path.
    pub xdp: XdpSettings,
    /// The TCP forwarding path asked for.
    pub tcp_fast_path: TcpFastPath,
    /// The nftables table to keep, if any.
    pub nftables_table: Option<String>,
    /// TLS credentials.
    pub credentials: Credentials,
    /// The admin endpoint's address.
    pub admin_listen: Option<std::net::SocketAddr>,
    /// How long a shutdown waits for open connections.
    pub shutdown_grace: std::time::Duration,
}

impl netport_common::DaemonConfig for Config {
    /// One worker per CPU: a relay forwards for many links at once.
    fn worker_threads(&self) -> usize {
        0
    }
}

impl Config {
    /// Reads and validates `path`. Errors name the key and the fix.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the configuration {}", path.display()))?;
        let raw: RelaydToml = toml::from_str(&text)
            .with_context(|| format!("{} is not a valid relayd.toml", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::validate(raw, base)
    }

    /// Validates a parsed file; relative certificate paths are taken from `base`.
    pub fn validate(raw: RelaydToml, base: &Path) -> Result<Config> {
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
        if raw.public_address.trim().is_empty() {
            bail!(
                "`public_address` is empty: give the host or IP portals dial to reach this relay"
            );
        }
        let (port_first, port_last) = parse_range(&raw.ports).with_context(|| {
            format!("`ports` = \"{}\" is not a range FIRST-LAST with at least two ports, like \"40000-40999\"", raw.ports)
        })?;
        // Each allocation takes two ports of the range.
        let pairs = (u32::from(port_last) - u32::from(port_first)).div_ceil(2);
        let capacity = raw.capacity.unwrap_or(pairs);
        if capacity == 0 || capacity > pairs {
            bail!(
                "`capacity` = {capacity} must be between 1 and {pairs} (each allocation takes two ports of `ports`)"
            );
        }
        if raw.udp_idle_secs == 0 {
            bail!("`udp_idle_secs` must be at least 1");
        }
        let enabled = match raw.udp_fast_path.as_str() {
            "xdp" => true,
            "userspace" => false,
            other => bail!("`udp_fast_path` = \"{other}\" must be \"xdp\" or \"userspace\""),
        };
        let tcp_fast_path = match raw.tcp_fast_path.as_str() {
            "copy" => TcpFastPath::Copy,
            "splice" => TcpFastPath::Splice,
            "sockmap" => TcpFastPath::Sockmap,
            other => {
                bail!("`tcp_fast_path` = \"{other}\" must be \"copy\", \"splice\" or \"sockmap\"")
            }
        };
        if !["auto", "native", "skb"].contains(&raw.xdp_mode.as_str()) {
            bail!(
                "`xdp_mode` = \"{}\" must be \"auto\", \"native\" or \"skb\"",
                raw.xdp_mode
            );
        }
        let nftables_table = match raw.firewall.as_str() {
            "nftables" => {
                let t = &raw.nftables_table;
                if t.is_empty()
                    || t.len() > 64
                    || !t
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    bail!("`nftables_table` = \"{t}\" must be 1 to 64 letters, digits, `_` or `-`");
                }
                Some(raw.nftables_table.clone())
            }
            "none" => None,
            other => bail!("`firewall` = \"{other}\" must be \"nftables\" or \"none\""),
        };
        let credentials = raw.tls.load(base, Role::Relay)?;
        Ok(Config {
            nftables_table,
            udp_idle: std::time::Duration::from_secs(raw.udp_idle_secs),
            xdp: XdpSettings {
                enabled,
                mode: raw.xdp_mode,
                interfaces: raw.xdp_interfaces,
                bind: raw.bind,
            },
            tcp_fast_path,
            servers,
            public_address: raw.public_address,
            bind: raw.bind,
            port_first,
            port_last,
            capacity,
            hello_timeout: std::time::Duration::from_secs(raw.hello_timeout_secs.max(1)),
            credentials,
            admin_listen: raw.admin_listen,
            shutdown_grace: std::time::Duration::from_secs(raw.shutdown_grace_secs),
        })
    }
}

fn parse_range(s: &str) -> Option<(u16, u16)> {
    let (a, b) = s.split_once('-')?;
    let (a, b): (u16, u16) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a > 0 && a < b).then_some((a, b))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_documented_example_parses() {
        let text = include_str!("../../examples/config/relayd.toml");
        let raw: Result<super::RelaydToml, _> = toml::from_str(text);
        assert!(raw.is_ok(), "{raw:?}");
    }
}
