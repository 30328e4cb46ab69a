//! `netportd`, the Netport server, as a library: what the binary and the tests share.
//!
//! netportd owns the control plane — portal and relay sessions over mutual TLS, the policy
//! (loaded, checked and hot-reloaded through `netport-policy`), relay allocation — and the
//! Netport PKI ([`pki`]): the CA and the certificates it issues to portals, relays and the
//! server. The wire format and the reading of identities from certificates live in
//! `netport-proto`; access decisions live in `netport-policy`. The command line (`check`,
//! `explain`, `diff`, `ca`) is the binary's, in `src/cli/`.

pub mod pki;
pub mod server;
