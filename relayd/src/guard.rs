//! Defences of the allocation ports against hostile peers: a per-address limit on bad hellos
//! (token guessing) and a bound on connections waiting to say hello.
//!
//! Tokens are 256-bit random, so guessing cannot succeed; what the limit buys is that a
//! guesser costs the relay nothing for long and shows up in the log once, with its address.
//! It is per source address rather than per allocation, so a guesser cannot tear down an
//! allocation that legitimate portals are about to join.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Bad hellos one address may send within [`WINDOW`] before its connections are dropped.
/// A portal sends a bad hello only by mistake (a token reused after a retry), so a handful.
pub const MAX_BAD_HELLOS: u32 = 16;
/// The window over which bad hellos are counted, and how long an address stays refused.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Connections one allocation holds while they have not sent their hello yet; more are
/// closed at once. Two portals need two.
pub const MAX_PENDING_HELLOS: usize = 16;
/// Addresses tracked at most; beyond this, expired entries are pruned first, then the map is
/// cleared (a flood of addresses must not grow memory without bound).
const MAX_TRACKED: usize = 65_536;

#[derive(Debug, Clone, Copy)]
struct Record {
    since: Instant,
    bad: u32,
    /// When the address was refused (counted from here), if it is.
    blocked: Option<Instant>,
}

/// Bad-hello accounting per source address, shared by every allocation.
#[derive(Debug, Default)]
pub struct Guard {
    by_addr: Mutex<HashMap<IpAddr, Record>>,
}

impl Guard {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Record>> {
        self.by_addr.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether connections from `ip` are refused right now (without reading them).
    pub fn blocked(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let mut map = self.map();
        match map.get(&ip).and_then(|r| r.blocked) {
            Some(at) if now.duration_since(at) < WINDOW => true,
            Some(_) => {
                map.remove(&ip);
                false
            }
            None => false,
        }
    }

    /// Counts a bad hello from `ip`; logs and starts refusing it when it crosses the limit.
    pub fn bad_hello(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut map = self.map();
        if map.len() >= MAX_TRACKED && !map.contains_key(&ip) {
            map.retain(|_, r| now.duration_since(r.blocked.unwrap_or(r.since)) < WINDOW);
            if map.len() >= MAX_TRACKED {
                map.clear();
            }
        }
        let r = map.entry(ip).or_insert(Record {
            since: now,
            bad: 0,
            blocked: None,
        });
        if now.duration_since(r.since) >= WINDOW {
            *r = Record {
                since: now,
                bad: 0,
                blocked: None,
            };
        }
        r.bad += 1;
        if r.bad == MAX_BAD_HELLOS && r.blocked.is_none() {
            r.blocked = Some(now);
            tracing::warn!(
                peer = %ip,
                bad_hellos = r.bad,
                "token guessing: {} bad relay hellos from {ip} within {} s; refusing its connections for {} s",
                r.bad,
                WINDOW.as_secs(),
                WINDOW.as_secs()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_address_is_refused_after_the_limit_and_forgiven_after_the_window() {
        let guard = Guard::default();
        let bad: IpAddr = [127, 0, 0, 2].into();
        let good: IpAddr = [127, 0, 0, 1].into();
        for _ in 0..MAX_BAD_HELLOS - 1 {
            guard.bad_hello(bad);
        }
        assert!(!guard.blocked(bad));
        guard.bad_hello(bad);
        assert!(guard.blocked(bad));
        assert!(!guard.blocked(good), "other addresses are not affected");
        tokio::time::advance(WINDOW).await;
        assert!(!guard.blocked(bad));
        guard.bad_hello(bad);
        assert!(!guard.blocked(bad), "counting starts again");
    }
}
