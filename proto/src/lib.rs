//! Netport wire protocol (sans-I/O).
