//! One control connection: identity, hello, then a portal or relay session.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use netport_policy::{Policy, Protocol, Request};
use netport_proto::control::{
    Decoder, LinkGrant, ListenerSpec, Message, PeerRole, QuicPath, RelayEndpoint, StreamError,
    Transport, VERSION, encode_message,
};
use netport_proto::identity::{CertInfo, Role};
use netport_proto::relay::token_to_hex;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use super::{PortalHandle, RelayHandle, Server, lock};

type Stream = TlsStream<TcpStream>;

/// Reads messages from one half of a control connection.
struct Reader {
    rd: ReadHalf<Stream>,
    decoder: Decoder,
    buf: Vec<u8>,
    /// Fired by the writer when the peer stopped reading.
    stalled: CancellationToken,
}

impl Reader {
    /// The next message; `Ok(None)` when the peer closed; an error after `idle` of silence.
    async fn next(&mut self, idle: Duration) -> Result<Option<Message>> {
        loop {
            if let Some(m) = self.decoder.next_message()? {
                return Ok(Some(m));
            }
            let n = tokio::select! {
                n = tokio::time::timeout(idle, self.rd.read(&mut self.buf)) => {
                    n.map_err(|_| anyhow!("no heartbeat for {} s", idle.as_secs()))??
                }
                _ = self.stalled.cancelled() => bail!("the peer stopped reading what this server sends"),
            };
            if n == 0 {
                return Ok(None);
            }
            self.decoder.push(&self.buf[..n]);
        }
    }
}

impl Reader {
    /// Like [`Reader::next`], but `Ok(None)` as soon as `cancel` fires (the server cut the
    /// session off).
    async fn next_or_cancelled(
        &mut self,
        idle: Duration,
        cancel: &CancellationToken,
    ) -> Result<Option<Message>> {
        tokio::select! {
            n = self.next(idle) => n,
            _ = cancel.cancelled() => Ok(None),
        }
    }
}

/// Removes `name`'s session from `map` unless a newer session has replaced it.
fn unregister<H>(
    map: &std::sync::Mutex<std::collections::HashMap<String, H>>,
    name: &str,
    conn: u64,
    conn_of: impl Fn(&H) -> u64,
) {
    let mut map = lock(map);
    if map.get(name).is_some_and(|h| conn_of(h) == conn) {
        map.remove(name);
    }
}

/// Sends queued messages and heartbeats until the queue closes or the peer goes away. A peer
/// that stops reading (no write completes for three heartbeat intervals) is cut off, so the
/// queue held for it stays small; the returned token fires then.
fn writer(
    mut wr: WriteHalf<Stream>,
    heartbeat: Duration,
    peer: SocketAddr,
) -> (mpsc::UnboundedSender<Message>, CancellationToken) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let stalled = CancellationToken::new();
    let fire = stalled.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        let mut seq = 0u64;
        loop {
            let msg = tokio::select! {
                m = rx.recv() => match m { Some(m) => m, None => break },
                _ = tick.tick() => { seq += 1; Message::Heartbeat { seq } }
            };
            let last = matches!(msg, Message::Refused { .. });
            match tokio::time::timeout(heartbeat * 3, wr.write_all(&encode_message(&msg))).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break,
                Err(_) => {
                    tracing::warn!(%peer, "closing the control connection: the peer has not read for {} s (flow control)", (heartbeat * 3).as_secs());
                    fire.cancel();
                    return;
                }
            }
            if last {
                break;
            }
        }
        // Bounded too: the close_notify of a peer that does not read would never be sent.
        let _ = tokio::time::timeout(Duration::from_secs(5), wr.shutdown()).await;
    });
    (tx, stalled)
}

/// Logs how a control connection ended: a broken protocol (a frame over the size limit, an
/// unknown message) is a warning that says so; anything else is routine.
pub fn log_end(peer: SocketAddr, e: &anyhow::Error) {
    if let Some(e) = e.downcast_ref::<StreamError>() {
        tracing::warn!(%peer, "closing the control connection: protocol violation: {e}");
    } else {
        tracing::info!(%peer, "control connection ended: {e:#}");
    }
}

/// Logs connections refused because too many are unauthenticated, at most once a second.
#[derive(Debug, Default)]
pub struct RefusalLog {
    since: Option<tokio::time::Instant>,
    count: u64,
}

impl RefusalLog {
    pub fn note(&mut self, peer: SocketAddr) {
        self.count += 1;
        let now = tokio::time::Instant::now();
        if self
            .since
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            tracing::warn!(
                %peer,
                refused = self.count,
                "refusing control connections: {} are already in their TLS handshake or hello (stalled clients?)",
                super::MAX_UNAUTHENTICATED
            );
            self.since = Some(now);
            self.count = 0;
        }
    }
}

/// `unauthenticated` is held until the peer has completed TLS and said hello.
pub async fn handle(
    server: Arc<Server>,
    tcp: TcpStream,
    peer: SocketAddr,
    unauthenticated: tokio::sync::OwnedSemaphorePermit,
) -> Result<()> {
    let _ = tcp.set_nodelay(true);
    let acceptor = tokio_rustls::TlsAcceptor::from(server.tls.clone());
    // A client that never finishes its handshake must not hold a task forever.
    let stream = tokio::time::timeout(server.handshake_timeout, acceptor.accept(tcp))
        .await
        .context("TLS handshake timed out")?
        .context("TLS handshake failed (wrong CA, expired or not-yet-valid certificate?)")?;
    let info: CertInfo = netport_proto::tls::peer_info(stream.get_ref().1.peer_certificates())
        .context("peer certificate")?;
    let identity = info.identity()?.clone();
    let (rd, wr) = tokio::io::split(stream);
    let (tx, stalled) = writer(wr, server.heartbeat, peer);
    let mut reader = Reader {
        rd,
        decoder: Decoder::new(),
        // What portals and relays send is small (requests, heartbeats): a small buffer keeps
        // an idle session cheap (thousands of sessions per server).
        buf: vec![0u8; 4 * 1024],
        stalled,
    };
    let refuse = |reason: &str, message: String| {
        tracing::warn!(%peer, %identity, reason, "refused: {message}");
        let _ = tx.send(Message::Refused {
            reason: reason.into(),
            message: message.clone(),
        });
        anyhow!("refused {identity}: {message}")
    };
    let hello = reader.next(server.handshake_timeout).await?;
    drop(unauthenticated);
    let Some(Message::Hello {
        role,
        versions,
        software,
    }) = hello
    else {
        return Err(refuse("protocol", "the first message must be hello".into()));
    };
    if !versions.contains(&VERSION) {
        return Err(refuse(
            "version",
            format!("this server speaks version {VERSION}, the peer offers {versions:?}"),
        ));
    }
    let policy = server.policy();
    match (role, identity.role) {
        (PeerRole::Portal, Role::Portal) => {
            let Some(portal) = policy.portal(&identity.name) else {
                return Err(refuse(
                    "unknown-portal",
                    format!(
                        "no portal `{}` in policy {}",
                        identity.name,
                        policy.short_hash()
                    ),
                ));
            };
            if portal.revoked || policy.is_revoked(&info.spki_sha256) {
                return Err(refuse(
                    "revoked",
                    format!("the key of `{}` is revoked", identity.name),
                ));
            }
            if portal
                .spki_sha256
                .as_deref()
                .is_some_and(|pin| pin != info.spki_sha256_hex())
            {
                return Err(refuse(
                    "key-mismatch",
                    format!(
                        "`{}` presented a key other than its pinned one",
                        identity.name
                    ),
                ));
            }
            let quic = netport_proto::control::QuicLinks::announced(&software);
            portal_session(server, identity.name.clone(), info, reader, tx, peer, quic).await
        }
        (PeerRole::Relay, Role::Relay) => {
            if policy.relay(&identity.name).is_none() {
                return Err(refuse(
                    "unknown-relay",
                    format!(
                        "no relay `{}` in policy {}",
                        identity.name,
                        policy.short_hash()
                    ),
                ));
            }
            relay_session(server, identity.name.clone(), reader, tx, peer).await
        }
        _ => Err(refuse(
            "role",
            format!(
                "a {} certificate cannot open a {role:?} session",
                identity.role.as_str()
            ),
        )),
    }
}

pub(super) fn desired_state(policy: &Policy, portal: &str) -> Message {
    let listeners = policy
        .listeners_for(portal)
        .filter_map(|rule| {
            let service = policy.service(&rule.service)?;
            Some(ListenerSpec {
                access: rule.name.clone(),
                listen: rule.listen.clone(),
                service: service.name.clone(),
                serving_portal: service.portal.clone(),
                transport: transport(service.protocol),
            })
        })
        .collect();
    Message::DesiredState {
        policy: policy.hash.clone(),
        listeners,
    }
}

fn transport(p: Protocol) -> Transport {
    match p {
        Protocol::Tcp => Transport::Tcp,
        Protocol::Udp => Transport::Udp,
    }
}

async fn portal_session(
    server: Arc<Server>,
    name: String,
    info: CertInfo,
    mut reader: Reader,
    tx: mpsc::UnboundedSender<Message>,
    peer: SocketAddr,
    quic: netport_proto::control::QuicLinks,
) -> Result<()> {
    let conn = server.id();
    let policy = server.policy();
    let _ = tx.send(Message::Welcome {
        version: VERSION,
        identity: format!("netport://portal/{name}"),
        policy: policy.hash.clone(),
        heartbeat_secs: server.heartbeat.as_secs() as u32,
    });
    let _ = tx.send(desired_state(&policy, &name));
    let cancel = CancellationToken::new();
    let handle = PortalHandle {
        conn,
        tx: tx.clone(),
        spki: info.spki_sha256,
        cancel: cancel.clone(),
        peer,
        connected_at: netport_common::admin::unix_now(),
        legacy: netport_proto::tls::legacy::legacy_names(&info).next(),
        speaks_legacy: false,
        quic,
    };
    if let Some(old) = lock(&server.portals).insert(name.clone(), handle) {
        // A portal reconnecting replaces its old session.
        old.cancel.cancel();
    }
    tracing::info!(portal = %name, %peer, spki = %info.spki_sha256_hex(), "portal connected");
    let result = loop {
        match reader
            .next_or_cancelled(server.heartbeat * 3, &cancel)
            .await
        {
            Ok(Some(Message::OpenLink { request_id, access })) => {
                let server = server.clone();
                let name = name.clone();
                let tx = tx.clone();
                let key = info.spki_sha256;
                tokio::spawn(async move {
                    let who = Requester {
                        name: &name,
                        key: &key,
                        source: peer,
                    };
                    let answer = open_link(&server, &who, request_id, &access).await;
                    if let Err(denied) = answer {
                        if let Message::LinkDenied {
                            reason,
                            rule,
                            message,
                            ..
                        } = &denied
                        {
                            tracing::info!(
                                portal = %name,
                                access = %access,
                                reason = %reason,
                                rule = rule.as_deref().unwrap_or("-"),
                                "link denied: {message}"
                            );
                            server.obs.denied(
                                reason,
                                json!({
                                    "rule": rule,
                                    "message": message,
                                    "portal": name,
                                    "spki_sha256": hex::encode(key),
                                    "source": peer.to_string(),
                                    "access": access,
                                    "policy": server.policy().hash,
                                }),
                            );
                        }
                        let _ = tx.send(denied);
                    }
                });
            }
            Ok(Some(Message::LinkClosed { link_id, reason })) => {
                tracing::debug!(portal = %name, link_id, %reason, "link closed");
                server.release_link(&name, link_id);
            }
            Ok(Some(Message::StreamClosed {
                link_id,
                access,
                service,
                source,
                bytes_to_service,
                bytes_from_service,
                duration_ms,
            })) => {
                let obs = &server.obs;
                obs.streams_closed.inc();
                for (direction, n) in [
                    ("to_service", bytes_to_service),
                    ("from_service", bytes_from_service),
                ] {
                    obs.stream_bytes
                        .get_or_create(&super::observe::DirectionLabel {
                            direction: direction.into(),
                        })
                        .inc_by(n);
                }
                obs.audit(
                    "stream_closed",
                    json!({
                        "portal": name,
                        "link_id": link_id,
                        "access": access,
                        "service": service,
                        "source": source,
                        "bytes_to_service": bytes_to_service,
                        "bytes_from_service": bytes_from_service,
                        "duration_ms": duration_ms,
                    }),
                );
            }
            Ok(Some(Message::Heartbeat { .. })) => {}
            Ok(Some(other)) => tracing::debug!(portal = %name, kind = other.kind(), "ignored"),
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    unregister(&server.portals, &name, conn, |h| h.conn);
    tracing::info!(portal = %name, "portal disconnected");
    result
}

/// Everything `client` may reach on `serving`: all of it rides one link.
pub(super) fn link_grants(
    policy: &Policy,
    client: &str,
    serving: &str,
    key: &[u8; 32],
) -> Vec<LinkGrant> {
    policy
        .services
        .iter()
        .filter(|s| s.portal == serving)
        .filter(|s| {
            policy
                .decide(&Request::new(client, &s.name).with_key(key))
                .is_ok()
        })
        .map(|s| LinkGrant {
            service: s.name.clone(),
            target: s.target.clone(),
            transport: transport(s.protocol),
        })
        .collect()
}

/// Who asks for a link.
struct Requester<'a> {
    name: &'a str,
    key: &'a [u8; 32],
    /// Its control connection's address.
    source: SocketAddr,
}

/// Sets up a link for `who` through `access`; on refusal returns the `LinkDenied` to send.
async fn open_link(
    server: &Server,
    who: &Requester<'_>,
    request_id: u64,
    access: &str,
) -> std::result::Result<(), Message> {
    let (client, key) = (who.name, who.key);
    let deny = |reason: &str, rule: Option<String>, message: String| Message::LinkDenied {
        request_id,
        reason: reason.into(),
        rule,
        message,
    };
    let policy = server.policy();
    let Some(rule) = policy.access_rule(access) else {
        return Err(deny(
            "unknown-access-rule",
            None,
            format!(
                "no access rule `{access}` in policy {}",
                policy.short_hash()
            ),
        ));
    };
    let permit = policy
        .decide(&Request::new(client, &rule.service).with_key(key))
        .map_err(|d| {
            let e = policy.explain(client, &rule.service);
            deny(d.reason.as_str(), d.closest.clone(), e.message)
        })?;
    let service = permit.service;
    let serving = service.portal.clone();
    let serving_tx = lock(&server.portals)
        .get(&serving)
        .map(|h| h.tx.clone())
        .ok_or_else(|| {
            deny(
                "peer-offline",
                Some(permit.rule.name.clone()),
                format!(
                    "portal `{serving}` serving `{}` is not connected",
                    service.name
                ),
            )
        })?;
    // Everything the client may reach on the serving portal rides the same link.
    let grants = link_grants(&policy, client, &serving, key);
    // A legacy peer: the legacy link protocol, set up by the legacy module.
    if lock(&server.portals)
        .get(&serving)
        .is_some_and(|h| h.speaks_legacy)
    {
        let relays: Vec<String> = permit.relays().map(|r| r.name.clone()).collect();
        let rule = permit.rule.name.clone();
        return super::legacy::offer_to_legacy(
            server, client, key, request_id, &rule, &relays, &serving, grants,
        )
        .await;
    }
    // The rule's relays, the least loaded connected one first.
    let (relay_name, relay_tx, alloc_id, rx) = {
        let mut relays = lock(&server.relays);
        let pick = permit
            .relays()
            .filter_map(|r| {
                relays
                    .get(&r.name)
                    .map(|h| (r.name.clone(), h.live, h.capacity))
            })
            .filter(|(_, live, cap)| *live < *cap as usize)
            .min_by_key(|(_, live, _)| *live);
        let Some((relay_name, _, _)) = pick else {
            return Err(deny(
                "no-relay",
                Some(permit.rule.name.clone()),
                format!("no relay allowed by `{}` is connected", permit.rule.name),
            ));
        };
        let alloc_id = server.id();
        let (otx, orx) = oneshot::channel();
        let Some(h) = relays.get_mut(&relay_name) else {
            return Err(deny("no-relay", None, "relay went away".into()));
        };
        h.pending.insert(alloc_id, otx);
        h.live += 1;
        (relay_name, h.tx.clone(), alloc_id, orx)
    };
    let Some((ta, tb)) = token_pair() else {
        unpend(server, &relay_name, alloc_id);
        return Err(deny("internal", None, "no randomness for tokens".into()));
    };
    let ttl = server.token_ttl;
    let _ = relay_tx.send(Message::Allocate {
        alloc_id,
        token_a: token_to_hex(&ta),
        token_b: token_to_hex(&tb),
        ttl_ms: ttl.as_millis() as u64,
        transport: Transport::Tcp,
    });
    let ports = match tokio::time::timeout(Duration::from_secs(5), rx).await {
        Ok(Ok(Ok(ports))) => ports,
        other => {
            unpend(server, &relay_name, alloc_id);
            let why = match other {
                Ok(Ok(Err(reason))) => reason,
                _ => "no answer".into(),
            };
            return Err(deny(
                "no-relay",
                Some(permit.rule.name.clone()),
                format!("relay `{relay_name}` could not allocate: {why}"),
            ));
        }
    };
    let Some(relay) = policy.relay(&relay_name) else {
        return Err(deny("no-relay", None, "relay left the policy".into()));
    };
    let endpoint = |port| RelayEndpoint {
        relay: relay_name.clone(),
        address: relay.address.clone(),
        port,
    };
    // A UDP pair on the same relay, so the portals can run the link over QUIC, when the
    // client runs this link over QUIC (every link, or those for UDP services) and the
    // serving portal serves over QUIC; without one they use the TCP pair alone.
    let both_quic = {
        let portals = lock(&server.portals);
        portals
            .get(client)
            .is_some_and(|h| h.quic.opens(transport(service.protocol)))
            && portals.get(&serving).is_some_and(|h| h.quic.serves())
    };
    let quic = if both_quic {
        allocate_udp(server, &relay_name, &relay_tx, ttl).await
    } else {
        None
    };
    let expires_in_ms = ttl.as_millis() as u64;
    lock(&server.links).insert(
        alloc_id,
        super::LinkInfo {
            client: client.to_string(),
            serving: serving.clone(),
            relay: relay_name.clone(),
            client_key: *key,
            grants: grants.clone(),
            quic_alloc: quic.as_ref().map(|q| q.alloc_id),
            allocs: 1 + u8::from(quic.is_some()),
        },
    );
    let _ = serving_tx.send(Message::LinkIncoming {
        link_id: alloc_id,
        peer: client.to_string(),
        relay: endpoint(ports.1),
        token: token_to_hex(&tb),
        expires_in_ms,
        grants,
        legacy: None,
        quic: quic.as_ref().map(|q| QuicPath {
            port: q.port_b,
            token: token_to_hex(&q.token_b),
        }),
    });
    let client_tx = lock(&server.portals).get(client).map(|h| h.tx.clone());
    if let Some(tx) = client_tx {
        let _ = tx.send(Message::LinkOffer {
            request_id,
            link_id: alloc_id,
            peer: serving.clone(),
            relay: endpoint(ports.0),
            token: token_to_hex(&ta),
            expires_in_ms,
            legacy: None,
            quic: quic.as_ref().map(|q| QuicPath {
                port: q.port_a,
                token: token_to_hex(&q.token_a),
            }),
        });
    }
    tracing::info!(client, serving = %serving, rule = %permit.rule.name, relay = %relay_name, link_id = alloc_id, quic = quic.is_some(), "link allocated");
    server.obs.links_opened.inc();
    server.obs.audit(
        "decision",
        json!({
            "verdict": "allow",
            "rule": permit.rule.name,
            "portal": client,
            "spki_sha256": hex::encode(key),
            "source": who.source.to_string(),
            "access": access,
            "listen": permit.rule.listen,
            "service": service.name,
            "serving_portal": serving,
            "target": service.target,
            "relay": relay_name,
            "link_id": alloc_id,
            "policy": policy.hash,
        }),
    );
    Ok(())
}

/// Two fresh random tokens, `None` without randomness.
fn token_pair() -> Option<([u8; 32], [u8; 32])> {
    let mut ta = [0u8; 32];
    let mut tb = [0u8; 32];
    (getrandom::fill(&mut ta).is_ok() && getrandom::fill(&mut tb).is_ok()).then_some((ta, tb))
}

/// Forgets an allocation request that got no usable answer.
fn unpend(server: &Server, relay: &str, alloc_id: u64) {
    if let Some(h) = lock(&server.relays).get_mut(relay) {
        h.pending.remove(&alloc_id);
        h.live = h.live.saturating_sub(1);
    }
}

/// A relay UDP pair for a link over QUIC.
struct UdpPair {
    alloc_id: u64,
    port_a: u16,
    port_b: u16,
    token_a: [u8; 32],
    token_b: [u8; 32],
}

/// Asks `relay` for a UDP pair beside a link's TCP pair; `None` (logged) when it cannot
/// give one in time, and the link runs over TCP only.
async fn allocate_udp(
    server: &Server,
    relay: &str,
    relay_tx: &mpsc::UnboundedSender<Message>,
    ttl: Duration,
) -> Option<UdpPair> {
    let (token_a, token_b) = token_pair()?;
    let alloc_id = server.id();
    let (otx, orx) = oneshot::channel();
    {
        let mut relays = lock(&server.relays);
        let h = relays.get_mut(relay)?;
        h.pending.insert(alloc_id, otx);
        h.live += 1;
    }
    let _ = relay_tx.send(Message::Allocate {
        alloc_id,
        token_a: token_to_hex(&token_a),
        token_b: token_to_hex(&token_b),
        ttl_ms: ttl.as_millis() as u64,
        transport: Transport::Udp,
    });
    match tokio::time::timeout(Duration::from_secs(3), orx).await {
        Ok(Ok(Ok((port_a, port_b)))) => Some(UdpPair {
            alloc_id,
            port_a,
            port_b,
            token_a,
            token_b,
        }),
        other => {
            unpend(server, relay, alloc_id);
            let why = match other {
                Ok(Ok(Err(reason))) => reason,
                _ => "no answer".into(),
            };
            tracing::info!(%relay, "no UDP pair for a QUIC link ({why}): the link uses TCP");
            None
        }
    }
}

async fn relay_session(
    server: Arc<Server>,
    name: String,
    mut reader: Reader,
    tx: mpsc::UnboundedSender<Message>,
    peer: SocketAddr,
) -> Result<()> {
    let Some(Message::RelayRegister {
        address,
        port_first,
        port_last,
        capacity,
    }) = reader.next(Duration::from_secs(10)).await?
    else {
        bail!("relay `{name}` did not register");
    };
    let conn = server.id();
    let policy = server.policy();
    if let Some(r) = policy.relay(&name)
        && r.address != address
    {
        tracing::warn!(relay = %name, announced = %address, policy = %r.address, "relay announces another address than the policy; portals dial the policy's");
    }
    let _ = tx.send(Message::Welcome {
        version: VERSION,
        identity: format!("netport://relay/{name}"),
        policy: policy.hash.clone(),
        heartbeat_secs: server.heartbeat.as_secs() as u32,
    });
    let cancel = CancellationToken::new();
    let previous = lock(&server.relays).insert(
        name.clone(),
        RelayHandle {
            conn,
            tx: tx.clone(),
            cancel: cancel.clone(),
            live: 0,
            capacity,
            pending: Default::default(),
            peer,
            connected_at: netport_common::admin::unix_now(),
        },
    );
    if let Some(old) = previous {
        // A relay reconnecting replaces its old session.
        old.cancel.cancel();
    }
    tracing::info!(relay = %name, %peer, ports = %format!("{port_first}-{port_last}"), capacity, "relay connected");
    let result = loop {
        match reader
            .next_or_cancelled(server.heartbeat * 3, &cancel)
            .await
        {
            Ok(Some(Message::Allocated {
                alloc_id,
                port_a,
                port_b,
            })) => {
                let waiter = lock(&server.relays)
                    .get_mut(&name)
                    .and_then(|h| h.pending.remove(&alloc_id));
                if let Some(w) = waiter {
                    let _ = w.send(Ok((port_a, port_b)));
                }
            }
            Ok(Some(Message::AllocateFailed { alloc_id, reason })) => {
                let waiter = lock(&server.relays)
                    .get_mut(&name)
                    .and_then(|h| h.pending.remove(&alloc_id));
                if let Some(w) = waiter {
                    let _ = w.send(Err(reason));
                }
            }
            Ok(Some(Message::AllocationClosed {
                alloc_id,
                bytes_a_to_b,
                bytes_b_to_a,
                reason,
            })) => {
                if let Some(h) = lock(&server.relays).get_mut(&name) {
                    h.live = h.live.saturating_sub(1);
                }
                match super::allocation_closed(&server, alloc_id) {
                    Some((link_id, true)) => {
                        tracing::info!(relay = %name, link_id, alloc_id, bytes_a_to_b, bytes_b_to_a, %reason, "link ended")
                    }
                    // The pair the portals did not use (TCP or UDP) closed; the link goes on.
                    Some((link_id, false)) => {
                        tracing::info!(relay = %name, link_id, alloc_id, bytes_a_to_b, bytes_b_to_a, %reason, "link allocation closed; the link's other pair remains")
                    }
                    None => {
                        tracing::info!(relay = %name, link_id = alloc_id, bytes_a_to_b, bytes_b_to_a, %reason, "link ended")
                    }
                }
            }
            Ok(Some(Message::Heartbeat { .. })) => {}
            Ok(Some(other)) => tracing::debug!(relay = %name, kind = other.kind(), "ignored"),
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    unregister(&server.relays, &name, conn, |h| h.conn);
    tracing::info!(relay = %name, "relay disconnected");
    result
}
