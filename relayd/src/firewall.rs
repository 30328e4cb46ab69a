//! relayd's own nftables table: the allocation range is closed except for allocated ports,
//! and a paired UDP port admits only its peer.
//!
//! ```text
//! table inet netport_relayd {
//!   set tcp_open  { type inet_service }                  # allocated, not yet paired
//!   set udp_open  { type inet_service }
//!   set udp_peers { type ipv4_addr . inet_service }      # paired UDP: peer . port
//!   chain input { type filter hook input priority -10; policy accept;
//!     ct state established,related accept
//!     tcp dport @tcp_open accept
//!     udp dport @udp_open accept
//!     ip saddr . udp dport @udp_peers accept
//!     tcp dport FIRST-LAST drop
//!     udp dport FIRST-LAST drop
//!   }
//! }
//! ```
//!
//! The table is relayd's alone: at start-up any table of that name (left by a relayd that
//! was killed) is deleted and built anew; at shutdown it is deleted. Traffic outside the
//! range is not touched. Rules and elements go through the `nftables` crate (JSON to the
//! `nft` binary).

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use netport_proto::control::Transport;
use nftables::batch::Batch;
use nftables::expr::{CT, Expression, NamedExpression, Payload, PayloadField, Range};
use nftables::helper;
use nftables::schema::{Chain, Element, NfListObject, Rule, Set, SetTypeValue, Table};
use nftables::stmt::{Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

/// The relay's table.
#[derive(Debug)]
pub struct Firewall {
    table: String,
}

fn field(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Borrowed(protocol),
            field: Cow::Borrowed(field),
        },
    )))
}

fn matches(
    left: Expression<'static>,
    right: Expression<'static>,
    op: Operator,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn set_ref(name: &str) -> Expression<'static> {
    Expression::String(Cow::Owned(format!("@{name}")))
}

fn nft_error(e: helper::NftablesError) -> anyhow::Error {
    match e {
        helper::NftablesError::NftFailed { stderr, .. } if stderr.trim().is_empty() => {
            // nft says nothing when it lacks the privilege.
            anyhow::anyhow!("nft failed without a message (does relayd have CAP_NET_ADMIN?)")
        }
        helper::NftablesError::NftFailed { stderr, hint, .. } => {
            anyhow::anyhow!("nft failed while {hint}: {}", stderr.trim())
        }
        other => {
            anyhow::anyhow!("{other} (is the `nft` binary installed? apt-get install nftables)")
        }
    }
}

impl Firewall {
    /// Deletes any stale table of this name, then builds it for the range `first..=last`.
    pub fn start(table: &str, first: u16, last: u16) -> Result<Firewall> {
        let fw = Firewall {
            table: table.to_string(),
        };
        if fw.delete_table().is_ok() {
            tracing::info!(
                table,
                "removed the nftables table a previous relayd left behind"
            );
        }
        let mut b = Batch::new();
        b.add(NfListObject::Table(Table {
            family: NfFamily::INet,
            name: Cow::Owned(fw.table.clone()),
            handle: None,
        }));
        for (name, ty) in [
            (
                "tcp_open",
                SetTypeValue::Single(nftables::schema::SetType::InetService),
            ),
            (
                "udp_open",
                SetTypeValue::Single(nftables::schema::SetType::InetService),
            ),
            (
                "udp_peers",
                SetTypeValue::Concatenated(Cow::Borrowed(&[
                    nftables::schema::SetType::Ipv4Addr,
                    nftables::schema::SetType::InetService,
                ])),
            ),
        ] {
            b.add(NfListObject::Set(Box::new(Set {
                family: NfFamily::INet,
                table: Cow::Owned(fw.table.clone()),
                name: Cow::Borrowed(name),
                set_type: ty,
                ..Set::default()
            })));
        }
        b.add(NfListObject::Chain(Chain {
            family: NfFamily::INet,
            table: Cow::Owned(fw.table.clone()),
            name: Cow::Borrowed("input"),
            _type: Some(NfChainType::Filter),
            hook: Some(NfHook::Input),
            prio: Some(-10),
            policy: Some(NfChainPolicy::Accept),
            ..Chain::default()
        }));
        let range = || {
            Expression::Range(Box::new(Range {
                range: [
                    Expression::Number(u32::from(first)),
                    Expression::Number(u32::from(last)),
                ],
            }))
        };
        let rules: Vec<Vec<Statement<'static>>> = vec![
            vec![
                matches(
                    Expression::Named(NamedExpression::CT(CT {
                        key: Cow::Borrowed("state"),
                        family: None,
                        dir: None,
                    })),
                    Expression::List(vec![
                        Expression::String(Cow::Borrowed("established")),
                        Expression::String(Cow::Borrowed("related")),
                    ]),
                    Operator::IN,
                ),
                Statement::Accept(None),
            ],
            vec![
                matches(field("tcp", "dport"), set_ref("tcp_open"), Operator::EQ),
                Statement::Accept(None),
            ],
            vec![
                matches(field("udp", "dport"), set_ref("udp_open"), Operator::EQ),
                Statement::Accept(None),
            ],
            vec![
                matches(
                    Expression::Named(NamedExpression::Concat(vec![
                        field("ip", "saddr"),
                        field("udp", "dport"),
                    ])),
                    set_ref("udp_peers"),
                    Operator::EQ,
                ),
                Statement::Accept(None),
            ],
            vec![
                matches(field("tcp", "dport"), range(), Operator::EQ),
                Statement::Drop(None),
            ],
            vec![
                matches(field("udp", "dport"), range(), Operator::EQ),
                Statement::Drop(None),
            ],
        ];
        for expr in rules {
            b.add(NfListObject::Rule(Rule {
                family: NfFamily::INet,
                table: Cow::Owned(fw.table.clone()),
                chain: Cow::Borrowed("input"),
                expr: Cow::Owned(expr),
                ..Rule::default()
            }));
        }
        helper::apply_ruleset(&b.to_nftables())
            .map_err(nft_error)
            .with_context(|| format!("creating the nftables table inet {table}"))?;
        Ok(fw)
    }

    fn element(&self, set: &'static str, elem: Vec<Expression<'static>>) -> NfListObject<'static> {
        NfListObject::Element(Element {
            family: NfFamily::INet,
            table: Cow::Owned(self.table.clone()),
            name: Cow::Borrowed(set),
            elem: Cow::Owned(elem),
        })
    }

    /// The set elements for `ports` (a legacy allocation has one port, given twice).
    fn ports(ports: [u16; 2]) -> Vec<Expression<'static>> {
        let mut list = ports.to_vec();
        list.dedup();
        list.iter()
            .map(|p| Expression::Number(u32::from(*p)))
            .collect()
    }

    fn open_set(transport: Transport) -> &'static str {
        match transport {
            Transport::Tcp => "tcp_open",
            Transport::Udp => "udp_open",
        }
    }

    /// Opens an allocation's two ports to anyone (tokens decide who stays).
    pub fn open(&self, transport: Transport, ports: [u16; 2]) -> Result<()> {
        let mut b = Batch::new();
        b.add(self.element(Self::open_set(transport), Self::ports(ports)));
        helper::apply_ruleset(&b.to_nftables())
            .map_err(nft_error)
            .with_context(|| format!("opening ports {ports:?} in nftables"))
    }

    /// Closes an allocation's ports (and forgets its UDP peers). Established connections
    /// keep flowing (conntrack); new ones are dropped.
    pub fn close(&self, transport: Transport, ports: [u16; 2], peers: &[SocketAddr]) {
        let mut b = Batch::new();
        b.delete(self.element(Self::open_set(transport), Self::ports(ports)));
        let pinned = self.peer_elements(ports, peers);
        let _ = helper::apply_ruleset(&b.to_nftables());
        // Separately: deleting an element that is not there fails the whole batch.
        if !pinned.is_empty() {
            let mut b = Batch::new();
            b.delete(self.element("udp_peers", pinned));
            let _ = helper::apply_ruleset(&b.to_nftables());
        }
    }

    fn peer_elements(&self, ports: [u16; 2], peers: &[SocketAddr]) -> Vec<Expression<'static>> {
        ports
            .iter()
            .zip(peers)
            .filter_map(|(port, peer)| match peer.ip() {
                IpAddr::V4(ip) => Some(Expression::Named(NamedExpression::Concat(vec![
                    Expression::String(Cow::Owned(ip.to_string())),
                    Expression::Number(u32::from(*port)),
                ]))),
                IpAddr::V6(_) => None,
            })
            .collect()
    }

    /// A UDP pair joined: each port now admits only its peer (IPv4 peers; an IPv6 peer's
    /// port stays open to all).
    pub fn pin_udp(&self, ports: [u16; 2], peers: [SocketAddr; 2]) -> Result<()> {
        let pinned = self.peer_elements(ports, &peers);
        let still_open: Vec<u16> = ports
            .iter()
            .zip(&peers)
            .filter(|(_, p)| p.is_ipv4())
            .map(|(port, _)| *port)
            .collect();
        let mut b = Batch::new();
        if !pinned.is_empty() {
            b.add(self.element("udp_peers", pinned));
        }
        if !still_open.is_empty() {
            b.delete(
                self.element(
                    "udp_open",
                    still_open
                        .iter()
                        .map(|p| Expression::Number(u32::from(*p)))
                        .collect(),
                ),
            );
        }
        helper::apply_ruleset(&b.to_nftables())
            .map_err(nft_error)
            .context("admitting only the UDP peers in nftables")
    }

    fn delete_table(&self) -> Result<()> {
        let mut b = Batch::new();
        b.delete(NfListObject::Table(Table {
            family: NfFamily::INet,
            name: Cow::Owned(self.table.clone()),
            handle: None,
        }));
        helper::apply_ruleset(&b.to_nftables()).map_err(nft_error)
    }

    /// Deletes the table (shutdown).
    pub fn remove(&self) {
        match self.delete_table() {
            Ok(()) => tracing::info!(table = %self.table, "nftables table removed"),
            Err(e) => tracing::warn!(table = %self.table, "removing the nftables table: {e:#}"),
        }
    }
}

/// An allocation's ports, open in the table until dropped (however the allocation ends).
#[derive(Debug)]
pub struct Opened {
    fw: Arc<Firewall>,
    transport: Transport,
    ports: [u16; 2],
    peers: Mutex<Vec<SocketAddr>>,
}

impl Opened {
    /// Opens `ports`; `None` (after a log line) when nft refuses.
    pub fn new(fw: &Arc<Firewall>, transport: Transport, ports: [u16; 2]) -> Option<Opened> {
        match fw.open(transport, ports) {
            Ok(()) => Some(Opened {
                fw: fw.clone(),
                transport,
                ports,
                peers: Mutex::default(),
            }),
            Err(e) => {
                tracing::warn!(?ports, "{e:#}");
                None
            }
        }
    }

    /// A UDP pair joined: admit only its peers from now on.
    pub fn pin_udp(&self, peers: [SocketAddr; 2]) {
        match self.fw.pin_udp(self.ports, peers) {
            Ok(()) => *self.peers.lock().unwrap_or_else(|p| p.into_inner()) = peers.to_vec(),
            Err(e) => tracing::warn!(ports = ?self.ports, "{e:#}"),
        }
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        let peers = std::mem::take(&mut *self.peers.lock().unwrap_or_else(|p| p.into_inner()));
        self.fw.close(self.transport, self.ports, &peers);
    }
}
