//! `relayd`: the Netport relay daemon.
//!
//! It will own allocations, pairing, forwarding (userspace, sockmap, XDP) and its nftables
//! table. This crate holds no portal keys and never reads the traffic it forwards.
//! Status: the daemon lands with the tunnel (issue 3); only the crate boundary exists so far.
