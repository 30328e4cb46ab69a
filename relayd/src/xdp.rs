//! The XDP fast path for UDP allocations: loads `relayd-ebpf/udp_relay.c` (compiled by
//! build.rs) with aya, attaches it to the relay's interfaces, and fills its flow map when an
//! allocation pairs up. Dropping the [`FastPath`] detaches the program.
//!
//! Map layouts mirror the C structs byte for byte (all fields in network byte order, as the
//! program reads them from packets): key `{saddr, daddr, sport, dport}` (12 bytes), value
//! `{saddr, daddr, sport, dport, pad, packets, bytes}` (32 bytes).

use std::net::SocketAddrV4;

/// Why the fast path is not in use; said once, at start-up, in one log line.
pub type Unavailable = String;

/// A flow map key: packets from `from` to the relay's `to`.
pub fn key(from: SocketAddrV4, to: SocketAddrV4) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[0..4].copy_from_slice(&from.ip().octets());
    k[4..8].copy_from_slice(&to.ip().octets());
    k[8..10].copy_from_slice(&from.port().to_be_bytes());
    k[10..12].copy_from_slice(&to.port().to_be_bytes());
    k
}

/// A flow map value: rewrite to leave the relay's `from` toward `to`; counters start at 0.
pub fn value(from: SocketAddrV4, to: SocketAddrV4) -> [u8; 32] {
    let mut v = [0u8; 32];
    v[..12].copy_from_slice(&key(from, to));
    v
}

/// The packet and payload byte counters of a flow map value.
pub fn counters(v: &[u8; 32]) -> (u64, u64) {
    let word = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&v[at..at + 8]);
        u64::from_ne_bytes(b)
    };
    (word(16), word(24))
}

/// Program-wide counters (per-CPU sums), in the order of the C enum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Rewritten and transmitted by XDP.
    pub forwarded: u64,
    /// Relay hellos handed to relayd.
    pub pass_hello: u64,
    /// No route or neighbour: handed to the stack (relayd forwards them).
    pub pass_fib: u64,
    /// TTL would expire.
    pub pass_ttl: u64,
}

#[cfg(netport_ebpf)]
mod imp {
    use std::sync::Mutex;

    use anyhow::{Context, Result};
    use aya::maps::{HashMap, MapData, PerCpuArray};
    use aya::programs::{Xdp, XdpMode};

    use super::{Stats, Unavailable};
    use crate::config::XdpSettings;

    struct Loaded {
        // Held for its bpf_links: dropping it detaches the program.
        _ebpf: aya::Ebpf,
        flows: HashMap<MapData, [u8; 12], [u8; 32]>,
        stats: PerCpuArray<MapData, u64>,
    }

    /// The loaded, attached program and its maps.
    pub struct FastPath {
        inner: Mutex<Loaded>,
        /// Where it is attached and how, for the log.
        pub attached: Vec<String>,
    }

    impl std::fmt::Debug for FastPath {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("FastPath")
                .field("attached", &self.attached)
                .finish_non_exhaustive()
        }
    }

    static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/udp_relay.o"));

    impl FastPath {
        /// Loads and attaches the program, or says why it cannot.
        pub fn load(settings: &XdpSettings) -> Result<FastPath, Unavailable> {
            Self::try_load(settings).map_err(|e| format!("{e:#}"))
        }

        fn try_load(settings: &XdpSettings) -> Result<FastPath> {
            let interfaces = settings.interfaces(settings.bind)?;
            if interfaces.is_empty() {
                anyhow::bail!("no network interface to attach to (set `xdp_interfaces`)");
            }
            let mut ebpf = aya::Ebpf::load(OBJECT).context(
                "loading the XDP program needs CAP_BPF and CAP_NET_ADMIN (run relayd as root or grant both capabilities)",
            )?;
            let prog: &mut Xdp = ebpf
                .program_mut("np_udp_relay")
                .context("the object has no program np_udp_relay")?
                .try_into()
                .context("np_udp_relay is not an XDP program")?;
            prog.load().context(
                "the kernel refused the XDP program (needs CAP_BPF and CAP_NET_ADMIN; the verifier log follows)",
            )?;
            let mode = match settings.mode.as_str() {
                "native" => XdpMode::Driver,
                "skb" => XdpMode::Skb,
                _ => XdpMode::Default,
            };
            let mut attached = Vec::new();
            for name in &interfaces {
                prog.attach(name, mode)
                    .with_context(|| format!("attaching the XDP program to {name}"))?;
                attached.push(format!("{name} ({})", settings.mode));
            }
            let flows = HashMap::try_from(ebpf.take_map("np_flows").context("no map np_flows")?)
                .context("np_flows")?;
            let stats =
                PerCpuArray::try_from(ebpf.take_map("np_stats").context("no map np_stats")?)
                    .context("np_stats")?;
            Ok(FastPath {
                inner: Mutex::new(Loaded {
                    _ebpf: ebpf,
                    flows,
                    stats,
                }),
                attached,
            })
        }

        fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
            self.inner.lock().unwrap_or_else(|p| p.into_inner())
        }

        /// Adds a flow entry (both directions are two calls).
        pub fn insert(&self, key: [u8; 12], value: [u8; 32]) -> Result<()> {
            self.lock()
                .flows
                .insert(key, value, 0)
                .context("adding a flow to the XDP map")
        }

        /// Removes a flow entry; returns its last value.
        pub fn remove(&self, key: &[u8; 12]) -> Option<[u8; 32]> {
            let mut l = self.lock();
            let v = l.flows.get(key, 0).ok();
            let _ = l.flows.remove(key);
            v
        }

        /// A flow entry's current value.
        pub fn get(&self, key: &[u8; 12]) -> Option<[u8; 32]> {
            self.lock().flows.get(key, 0).ok()
        }

        /// The program's counters, summed over CPUs.
        pub fn stats(&self) -> Stats {
            let l = self.lock();
            let sum = |i: u32| {
                l.stats
                    .get(&i, 0)
                    .map(|v| v.iter().copied().sum::<u64>())
                    .unwrap_or(0)
            };
            Stats {
                forwarded: sum(0),
                pass_hello: sum(1),
                pass_fib: sum(2),
                pass_ttl: sum(3),
            }
        }
    }
}

#[cfg(not(netport_ebpf))]
mod imp {
    use anyhow::Result;

    use super::{Stats, Unavailable};
    use crate::config::XdpSettings;

    /// Stands in for the fast path in a relayd built without it: never loads.
    #[derive(Debug)]
    pub struct FastPath {
        /// Never populated.
        pub attached: Vec<String>,
    }

    impl FastPath {
        /// Always says why not.
        pub fn load(_: &XdpSettings) -> Result<FastPath, Unavailable> {
            Err("this relayd was built without the XDP program (no clang at build time, or the `xdp` feature off)".into())
        }

        pub fn insert(&self, _: [u8; 12], _: [u8; 32]) -> Result<()> {
            anyhow::bail!("no fast path")
        }

        pub fn remove(&self, _: &[u8; 12]) -> Option<[u8; 32]> {
            None
        }

        pub fn get(&self, _: &[u8; 12]) -> Option<[u8; 32]> {
            None
        }

        pub fn stats(&self) -> Stats {
            Stats::default()
        }
    }
}

pub use imp::FastPath;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_layout_matches_the_c_structs() {
        let x: SocketAddrV4 = "10.1.2.3:4000".parse().expect("addr");
        let r: SocketAddrV4 = "10.9.9.9:40001".parse().expect("addr");
        let k = key(x, r);
        assert_eq!(&k[..4], &[10, 1, 2, 3]);
        assert_eq!(&k[4..8], &[10, 9, 9, 9]);
        assert_eq!(&k[8..10], &4000u16.to_be_bytes());
        assert_eq!(&k[10..], &40001u16.to_be_bytes());
        let mut v = value(r, x);
        assert_eq!(counters(&v), (0, 0));
        v[16..24].copy_from_slice(&7u64.to_ne_bytes());
        v[24..32].copy_from_slice(&700u64.to_ne_bytes());
        assert_eq!(counters(&v), (7, 700));
    }
}
