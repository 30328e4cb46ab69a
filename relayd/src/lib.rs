//! `relayd`: the Netport relay daemon.
//!
//! It registers with netportd over mutual TLS, opens a pair of ports for each allocation the
//! server asks for, accepts exactly one connection per side that presents that side's
//! single-use token before it expires, then splices the two connections. What passes after
//! the hello is the portals' own end-to-end TLS: the relay holds no key that could read it.
//! The data plane does not depend on the control connection: allocations keep forwarding
//! while the relay reconnects to the server.

pub mod config;
mod control;
mod firewall;
pub mod guard;
mod observe;
mod pairing;
mod tcp;
mod udp;
pub mod xdp;

pub use tcp::copy_until_end;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::sync::watch;

pub use config::Config;

/// Runs the relay until `shutdown` turns true.
pub async fn run(config: Config, mut shutdown: watch::Receiver<bool>) -> Result<()> {
    let config = Arc::new(config);
    netport_common::expiry::watch_own_certificate(
        &config.credentials,
        netport_common::expiry::DEFAULT_WARN_DAYS,
    );
    let fast = load_fast_path(&config);
    let tcp = tcp::TcpPath::start(config.tcp_fast_path);
    let fw = start_firewall(&config);
    let stats = Arc::new(observe::Stats::new(&config.credentials));
    let (allocations, mut closed) =
        pairing::Allocations::new(config.clone(), stats.clone(), fast, fw, tcp);
    if let Some(addr) = config.admin_listen {
        let listener = netport_common::admin::bind(addr).await?;
        let admin = observe::Admin {
            stats: stats.clone(),
            allocations: allocations.clone(),
        };
        tokio::spawn(netport_common::admin::serve(
            listener,
            Arc::new(admin),
            shutdown.clone(),
        ));
    }
    let mut backoff = Duration::from_millis(200);
    loop {
        for (addr, name) in &config.servers {
            if *shutdown.borrow() {
                allocations.drain(config.shutdown_grace).await;
                return Ok(());
            }
            let ended = control::session(
                &config,
                addr,
                name,
                &allocations,
                &mut closed,
                &mut shutdown,
                &stats.registered,
            )
            .await;
            stats
                .registered
                .store(false, std::sync::atomic::Ordering::Relaxed);
            match ended {
                Ok(control::End::Shutdown) => {
                    // Leaving the server first means no new allocation arrives meanwhile.
                    allocations.drain(config.shutdown_grace).await;
                    return Ok(());
                }
                Ok(control::End::Lost(why)) => {
                    tracing::warn!(server = %addr, "control session lost: {why}; reconnecting");
                    backoff = Duration::from_millis(200);
                }
                Err(e) => tracing::warn!(server = %addr, "cannot reach netportd: {e:#}"),
            }
        }
        let wait = netport_common::jitter(backoff);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Loads the UDP fast path if the configuration wants it; one log line either way.
fn load_fast_path(config: &Config) -> Option<Arc<xdp::FastPath>> {
    if !config.xdp.enabled {
        tracing::info!(
            path = "userspace",
            "UDP allocations forwarded in userspace (udp_fast_path = \"userspace\")"
        );
        return None;
    }
    match xdp::FastPath::load(&config.xdp) {
        Ok(f) => {
            let forwarding = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
                .map(|s| s.trim() == "1")
                .unwrap_or(false);
            tracing::info!(path = "xdp", interfaces = %f.attached.join(", "), "UDP fast path loaded: XDP forwards paired UDP allocations in the kernel");
            if !forwarding {
                tracing::warn!(
                    "net.ipv4.ip_forward is 0: the XDP program's route lookups fail, so UDP allocations fall back to userspace; set it to 1 (and drop forwarded traffic in nftables)"
                );
            }
            Some(Arc::new(f))
        }
        Err(why) => {
            tracing::warn!(
                path = "userspace",
                "UDP fast path unavailable, forwarding UDP allocations in userspace: {why}"
            );
            None
        }
    }
}

/// Builds relayd's nftables table if the configuration wants it; one log line either way.
fn start_firewall(config: &Config) -> Option<Arc<firewall::Firewall>> {
    let table = config.nftables_table.as_deref()?;
    if config.bind.is_loopback() {
        tracing::info!(
            "nftables table not used: `bind` = {} is a loopback address",
            config.bind
        );
        return None;
    }
    match firewall::Firewall::start(table, config.port_first, config.port_last) {
        Ok(fw) => {
            tracing::info!(table, ports = %format!("{}-{}", config.port_first, config.port_last), "nftables table in place: only allocated ports of the range are open");
            Some(Arc::new(fw))
        }
        Err(e) => {
            tracing::warn!(table, "running without the nftables table: {e:#}");
            None
        }
    }
}
