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
mod guard;
mod pairing;

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
    let (allocations, mut closed) = pairing::Allocations::new(config.clone());
    let mut backoff = Duration::from_millis(200);
    loop {
        for (addr, name) in &config.servers {
            if *shutdown.borrow() {
                allocations.close_all();
                return Ok(());
            }
            match control::session(
                &config,
                addr,
                name,
                &allocations,
                &mut closed,
                &mut shutdown,
            )
            .await
            {
                Ok(control::End::Shutdown) => {
                    allocations.close_all();
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
