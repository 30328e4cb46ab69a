//! `portal`: the Netport agent on each device.
//!
//! It will own the control session to netportd, the listeners the server pushes, links to
//! peer portals through relays, and the channels multiplexed over them.
//! Status: the agent lands with the tunnel (issue 3); only the crate boundary exists so far.
