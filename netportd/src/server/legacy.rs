//! The legacy (V0.1) listener: the original Python portals log in here.
//!
//! A legacy session is registered in the same portal registry as native ones, under the
//! policy name its `legacy_id` maps to, so either kind can open a link to the other. The
//! session translates: a `LinkIncoming` with legacy details becomes a `CLKR`, `Refused`
//! closes the connection, and native-only messages (desired state, grant updates, link
//! closes) have no legacy counterpart and are dropped. Access is decided per portal pair:
//! a legacy link is allowed when the policy grants the requester at least one service on the
//! peer, because the legacy protocol never shows the server which target a channel opens.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use netport_policy::Request;
use netport_proto::control::{LegacyLink, LinkGrant, Message, RelayEndpoint};
use netport_proto::identity::Role;
use netport_proto::legacy::{
    self, AUTH_OK, Command, ControlMsg, Id4, LegacyName, Meeting, NO_REF, Token8,
};
use netport_proto::tls::Credentials;
use netport_proto::tls::legacy::{legacy_names, names_legacy_server};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{LinkInfo, PortalHandle, Server, lock};

/// `[legacy]` in netportd.toml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyToml {
    /// Where legacy portals connect (`ip:port`; they speak IPv4).
    pub listen: SocketAddr,
    /// The certificate legacy portals see; it must carry the DNS name `server`. Default:
    /// `tls.cert`.
    pub cert: Option<PathBuf>,
    /// Its key. Default: `tls.key`.
    pub key: Option<PathBuf>,
    /// Seconds between the server's keepalives (default 10; legacy portals give up after 30).
    #[serde(default = "default_keepalive")]
    pub keepalive_secs: u64,
    /// Seconds of silence after which a legacy portal is dropped (default 45; they send a
    /// keepalive about every 20).
    #[serde(default = "default_idle")]
    pub idle_secs: u64,
}

fn default_keepalive() -> u64 {
    10
}

fn default_idle() -> u64 {
    45
}

/// A validated `[legacy]`.
#[derive(Debug, Clone)]
pub struct LegacyConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// The certificate named `server`, its key, and the Netport CA.
    pub credentials: Credentials,
    /// Keepalive interval.
    pub keepalive: Duration,
    /// Silence limit.
    pub idle: Duration,
}

impl LegacyToml {
    /// Loads the certificate and checks every value.
    pub fn validate(self, tls: &netport_common::TlsToml, base: &Path) -> Result<LegacyConfig> {
        if !(1..30).contains(&self.keepalive_secs) {
            bail!(
                "`legacy.keepalive_secs` must be from 1 to 29: legacy portals drop a server silent for 30 s"
            );
        }
        if self.idle_secs == 0 {
            bail!("`legacy.idle_secs` must be at least 1");
        }
        let files = netport_common::TlsToml {
            ca: tls.ca.clone(),
            cert: self.cert.unwrap_or_else(|| tls.cert.clone()),
            key: self.key.unwrap_or_else(|| tls.key.clone()),
        };
        let credentials = files
            .load(base, Role::Server)
            .context("`legacy`: the legacy listener's certificate")?;
        if !names_legacy_server(credentials.info()) {
            bail!(
                "`legacy`: legacy portals require the server certificate name `server`, and {} does not carry it; \
                 issue one with `netportd ca issue server NAME --dns server` and give it as `legacy.cert`/`legacy.key`",
                base.join(&files.cert).display()
            );
        }
        Ok(LegacyConfig {
            listen: self.listen,
            credentials,
            keepalive: Duration::from_secs(self.keepalive_secs),
            idle: Duration::from_secs(self.idle_secs),
        })
    }
}

/// Accepts legacy portals on `listener` until the task is aborted.
pub(super) async fn serve(server: Arc<Server>, listener: TcpListener, config: LegacyConfig) {
    let tls = match config.credentials.legacy_control_server() {
        Ok(t) => Arc::new(t),
        Err(e) => {
            tracing::error!("legacy listener disabled: {e}");
            return;
        }
    };
    tracing::info!(listen = ?listener.local_addr().ok(), "legacy (V0.1) listener serving");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let server = server.clone();
                let acceptor = acceptor.clone();
                let config = config.clone();
                tokio::spawn(async move {
                    if let Err(e) = session(server, acceptor, tcp, peer, &config).await {
                        tracing::info!(%peer, "legacy connection ended: {e:#}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("legacy accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reads one control frame's payload.
async fn read_frame<R: AsyncRead + Unpin>(rd: &mut R) -> std::io::Result<Vec<u8>> {
    let mut head = [0u8; legacy::CONTROL_HEADER];
    rd.read_exact(&mut head).await?;
    let mut payload = vec![0u8; usize::from(u16::from_le_bytes([head[0], head[1]]))];
    rd.read_exact(&mut payload).await?;
    Ok(payload)
}

fn frame(command: Command, reference: [u8; 4]) -> Vec<u8> {
    legacy::control_frame(&ControlMsg { reference, command })
}

async fn session(
    server: Arc<Server>,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    config: &LegacyConfig,
) -> Result<()> {
    let _ = tcp.set_nodelay(true);
    let stream = tokio::time::timeout(server.handshake_timeout, acceptor.accept(tcp))
        .await
        .context("TLS handshake timed out")?
        .context("TLS handshake failed (wrong CA, expired or not-yet-valid certificate?)")?;
    let info = netport_proto::tls::peer_info(stream.get_ref().1.peer_certificates())
        .context("peer certificate")?;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let login = tokio::time::timeout(server.handshake_timeout, read_frame(&mut rd))
        .await
        .with_context(|| format!("no login within {:?}", server.handshake_timeout))??;
    let (name, me) = match check_login(&server, &login, &info) {
        Ok(ok) => ok,
        Err(why) => {
            tracing::warn!(%peer, "legacy login refused: {why}");
            // Anything but `V0.1REPL.OK.` is a failure to the legacy portal.
            let reply = legacy::encode_control_frame(b"V0.1REPLDENY").unwrap_or_default();
            let _ = wr.write_all(&reply).await;
            let _ = wr.shutdown().await;
            bail!("legacy login refused: {why}");
        }
    };
    let frame_ok = legacy::encode_control_frame(AUTH_OK).unwrap_or_default();
    wr.write_all(&frame_ok).await?;
    wr.flush().await?;

    // Raw frames to the portal: one write each, so each frame is one TLS record.
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let cancel = CancellationToken::new();
    let keepalive = config.keepalive;
    let writer_cancel = cancel.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
        loop {
            let out = tokio::select! {
                f = raw_rx.recv() => match f { Some(f) => f, None => break },
                _ = tick.tick() => frame(Command::KeepAlive, NO_REF),
                _ = writer_cancel.cancelled() => break,
            };
            if wr.write_all(&out).await.is_err() || wr.flush().await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });

    // Native messages for this portal, translated.
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let translate_cancel = cancel.clone();
    let translate_raw = raw_tx.clone();
    let who = name.clone();
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            match msg {
                Message::LinkIncoming {
                    link_id,
                    relay,
                    token,
                    legacy: Some(l),
                    ..
                } => match connect_order(&relay, &token, &l) {
                    Some(m) => {
                        tracing::debug!(portal = %who, link_id, "CLKR sent");
                        let _ = translate_raw.send(frame(Command::ConnectLink(m), NO_REF));
                    }
                    None => {
                        tracing::warn!(portal = %who, link_id, "cannot express the link in V0.1")
                    }
                },
                Message::Refused { reason, message } => {
                    tracing::warn!(portal = %who, %reason, "cutting off legacy portal: {message}");
                    translate_cancel.cancel();
                }
                other => tracing::trace!(portal = %who, kind = other.kind(), "no V0.1 counterpart"),
            }
        }
    });

    let conn = server.id();
    let handle = PortalHandle {
        conn,
        tx,
        spki: info.spki_sha256,
        cancel: cancel.clone(),
        peer,
        connected_at: netport_common::admin::unix_now(),
        legacy: Some(me),
        speaks_legacy: true,
        quic: netport_proto::control::QuicLinks::None,
    };
    if let Some(old) = lock(&server.portals).insert(name.clone(), handle) {
        old.cancel.cancel();
    }
    tracing::info!(portal = %name, %peer, legacy = %me, spki = %info.spki_sha256_hex(), "portal connected (legacy V0.1)");
    let result = loop {
        let next = tokio::select! {
            f = tokio::time::timeout(config.idle, read_frame(&mut rd)) => f,
            _ = cancel.cancelled() => break Ok(()),
        };
        let payload = match next {
            Err(_) => break Err(anyhow!("no keepalive for {} s", config.idle.as_secs())),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Ok(Err(e)) => break Err(e.into()),
            Ok(Ok(p)) => p,
        };
        match legacy::decode_control(&payload) {
            Ok(ControlMsg {
                command: Command::KeepAlive,
                ..
            }) => {
                let _ = raw_tx.send(frame(Command::KeepAlive, NO_REF));
            }
            Ok(ControlMsg {
                reference,
                command: Command::RequestLink { other_id, .. },
            }) => {
                let server = server.clone();
                let name = name.clone();
                let raw = raw_tx.clone();
                let key = info.spki_sha256;
                tokio::spawn(async move {
                    let answer = request_link(&server, &name, &key, other_id).await;
                    let _ = raw.send(frame(answer, reference));
                });
            }
            Ok(other) => {
                tracing::debug!(portal = %name, "ignored a legacy message a portal does not send: {other:?}")
            }
            Err(e) => tracing::debug!(portal = %name, "ignored a malformed legacy message: {e}"),
        }
    };
    cancel.cancel();
    {
        let mut portals = lock(&server.portals);
        if portals.get(&name).is_some_and(|h| h.conn == conn) {
            portals.remove(&name);
        }
    }
    tracing::info!(portal = %name, "portal disconnected");
    result
}

/// The policy name and certificate name of a legacy login, or why it is refused.
fn check_login(
    server: &Server,
    login: &[u8],
    info: &netport_proto::identity::CertInfo,
) -> std::result::Result<(String, LegacyName), String> {
    let auth = legacy::decode_auth(login).map_err(|e| e.to_string())?;
    let id = legacy::id_hex(&auth.portal_id);
    let user = legacy::id_hex(&auth.user_id);
    let policy = server.policy();
    let portal = policy.portal_by_legacy_id(&id).ok_or_else(|| {
        format!(
            "no portal with legacy_id {id} in policy {}",
            policy.short_hash()
        )
    })?;
    if portal
        .legacy_user
        .as_deref()
        .is_some_and(|u| !u.eq_ignore_ascii_case(&user))
    {
        return Err(format!(
            "`{}` has legacy_user {}, the login says {user}",
            portal.name,
            portal.legacy_user.as_deref().unwrap_or("-")
        ));
    }
    let me = legacy_names(info)
        .find(|n| n.id == auth.portal_id && n.user == auth.user_id)
        .ok_or_else(|| {
            format!(
                "the client certificate carries no name {id}|IDV|{user}|USERV (it has {:?}); issue it with \
                 `netportd ca issue portal {} --legacy-id {id} --legacy-user {user}`",
                info.dns_names, portal.name
            )
        })?;
    if let Some(ident) = &info.identity
        && (ident.role != Role::Portal || ident.name != portal.name)
    {
        return Err(format!(
            "the certificate names {ident}, but legacy_id {id} is `{}`",
            portal.name
        ));
    }
    if portal.revoked || policy.is_revoked(&info.spki_sha256) {
        return Err(format!("the key of `{}` is revoked", portal.name));
    }
    if portal
        .spki_sha256
        .as_deref()
        .is_some_and(|pin| pin != info.spki_sha256_hex())
    {
        return Err(format!(
            "`{}` presented a key other than its pinned one",
            portal.name
        ));
    }
    Ok((portal.name.clone(), me))
}

/// The `CLKR` for a legacy link announced natively.
fn connect_order(relay: &RelayEndpoint, token: &str, l: &LegacyLink) -> Option<Meeting> {
    Some(Meeting {
        peer: LegacyName::parse(&l.peer_name)?,
        token_p: token8(&l.token_p)?,
        token_r: token8(token)?,
        relay_port: relay.port,
        relay_addr: relay.address.clone(),
    })
}

fn token8(hex_str: &str) -> Option<Token8> {
    let mut t = [0u8; 8];
    hex::decode_to_slice(hex_str, &mut t).ok()?;
    Some(t)
}

fn random8() -> Option<Token8> {
    let mut t = [0u8; 8];
    getrandom::fill(&mut t).ok()?;
    Some(t)
}

/// Why a legacy link could not be set up.
enum Refusal {
    Deny(String),
    NotFound(String),
    NoRelay(String),
}

impl Refusal {
    fn command(&self) -> Command {
        match self {
            Refusal::Deny(_) => Command::Deny,
            Refusal::NotFound(_) => Command::NotFound,
            Refusal::NoRelay(_) => Command::NoRelay,
        }
    }

    fn reason(&self) -> (&'static str, &str) {
        match self {
            Refusal::Deny(m) => ("legacy-denied", m),
            Refusal::NotFound(m) => ("peer-offline", m),
            Refusal::NoRelay(m) => ("no-relay", m),
        }
    }
}

/// A legacy link set up: what the requester is told.
struct Setup {
    token_p: Token8,
    token_r: Token8,
    endpoint: RelayEndpoint,
    alloc_id: u64,
    expires_in_ms: u64,
}

/// `RQRL` from the legacy portal `client` for the portal with PortalID `other_id`.
async fn request_link(server: &Server, client: &str, key: &[u8; 32], other_id: Id4) -> Command {
    let other = legacy::id_hex(&other_id);
    let answer = async {
        let policy = server.policy();
        let serving = policy
            .portal_by_legacy_id(&other)
            .map(|p| p.name.clone())
            .ok_or_else(|| Refusal::Deny(format!("no portal with legacy_id {other}")))?;
        let (grants, relays) = pair_grants(server, client, &serving, key);
        if grants.is_empty() {
            return Err(Refusal::Deny(format!(
                "the policy grants `{client}` no service on `{serving}`"
            )));
        }
        let peer_name = lock(&server.portals).get(&serving).map(|h| h.legacy);
        let peer_name = match peer_name {
            None => return Err(Refusal::NotFound(format!("`{serving}` is not connected"))),
            Some(None) => {
                return Err(Refusal::Deny(format!(
                    "`{serving}` has no legacy name in its certificate (issue it with --legacy-id)"
                )));
            }
            Some(Some(n)) => n,
        };
        let me = lock(&server.portals)
            .get(client)
            .and_then(|h| h.legacy)
            .ok_or_else(|| Refusal::NotFound(format!("`{client}` left")))?;
        let services: Vec<String> = grants.iter().map(|g| g.service.clone()).collect();
        let setup = setup(server, client, &serving, key, &relays, grants, me).await?;
        tracing::info!(client, serving = %serving, relay = %setup.endpoint.relay, link_id = setup.alloc_id, "legacy link allocated");
        server.obs.links_opened.inc();
        server.obs.audit(
            "decision",
            serde_json::json!({
                "verdict": "allow",
                "protocol": "legacy",
                "portal": client,
                "spki_sha256": hex::encode(key),
                "serving_portal": serving,
                "services": services,
                "relay": setup.endpoint.relay,
                "link_id": setup.alloc_id,
                "policy": server.policy().hash,
            }),
        );
        Ok(Command::Granted(Meeting {
            peer: peer_name,
            token_p: setup.token_p,
            token_r: setup.token_r,
            relay_port: setup.endpoint.port,
            relay_addr: setup.endpoint.address,
        }))
    };
    match answer.await {
        Ok(c) => c,
        Err(r) => {
            let (reason, message) = r.reason();
            tracing::info!(portal = %client, peer_id = %other, %reason, "legacy link denied: {message}");
            server.obs.denied(
                reason,
                serde_json::json!({
                    "protocol": "legacy",
                    "message": message,
                    "portal": client,
                    "spki_sha256": hex::encode(key),
                    "peer_legacy_id": other,
                    "policy": server.policy().hash,
                }),
            );
            r.command()
        }
    }
}

/// What `client` may reach on `serving`, and the relays the granting rules allow.
fn pair_grants(
    server: &Server,
    client: &str,
    serving: &str,
    key: &[u8; 32],
) -> (Vec<LinkGrant>, Vec<String>) {
    let policy = server.policy();
    let grants = super::session::link_grants(&policy, client, serving, key);
    let mut relays: Vec<String> = grants
        .iter()
        .filter_map(|g| {
            policy
                .decide(&Request::new(client, &g.service).with_key(key))
                .ok()
        })
        .flat_map(|p| p.relays().map(|r| r.name.clone()).collect::<Vec<_>>())
        .collect();
    relays.sort();
    relays.dedup();
    (grants, relays)
}

/// Allocates a legacy port on the least loaded allowed relay and tells the serving portal
/// (natively or as a `CLKR`) to meet `client`, whose certificate name is `client_name`.
async fn setup(
    server: &Server,
    client: &str,
    serving: &str,
    key: &[u8; 32],
    relays: &[String],
    grants: Vec<LinkGrant>,
    client_name: LegacyName,
) -> std::result::Result<Setup, Refusal> {
    let (Some(token_p), Some(token_r)) = (random8(), random8()) else {
        return Err(Refusal::NoRelay("no randomness for tokens".into()));
    };
    let (relay_name, relay_tx, alloc_id, rx) = {
        let mut all = lock(&server.relays);
        let pick = relays
            .iter()
            .filter_map(|r| all.get(r).map(|h| (r.clone(), h.live, h.capacity)))
            .filter(|(_, live, cap)| *live < *cap as usize)
            .min_by_key(|(_, live, _)| *live);
        let Some((relay_name, _, _)) = pick else {
            return Err(Refusal::NoRelay("no allowed relay is connected".into()));
        };
        let alloc_id = server.id();
        let (otx, orx) = oneshot::channel();
        let Some(h) = all.get_mut(&relay_name) else {
            return Err(Refusal::NoRelay("relay went away".into()));
        };
        h.pending.insert(alloc_id, otx);
        h.live += 1;
        (relay_name, h.tx.clone(), alloc_id, orx)
    };
    let ttl = server.token_ttl;
    let _ = relay_tx.send(Message::AllocateLegacy {
        alloc_id,
        token: hex::encode(token_r),
        ttl_ms: ttl.as_millis() as u64,
    });
    let port = match tokio::time::timeout(Duration::from_secs(5), rx).await {
        Ok(Ok(Ok((port, _)))) => port,
        other => {
            if let Some(h) = lock(&server.relays).get_mut(&relay_name) {
                h.pending.remove(&alloc_id);
                h.live = h.live.saturating_sub(1);
            }
            let why = match other {
                Ok(Ok(Err(reason))) => reason,
                _ => "no answer".into(),
            };
            return Err(Refusal::NoRelay(format!(
                "relay `{relay_name}` could not allocate: {why}"
            )));
        }
    };
    let policy = server.policy();
    let Some(relay) = policy.relay(&relay_name) else {
        return Err(Refusal::NoRelay("relay left the policy".into()));
    };
    let endpoint = RelayEndpoint {
        relay: relay_name.clone(),
        address: relay.address.clone(),
        port,
    };
    let expires_in_ms = ttl.as_millis() as u64;
    lock(&server.links).insert(
        alloc_id,
        LinkInfo {
            client: client.to_string(),
            serving: serving.to_string(),
            relay: relay_name,
            client_key: *key,
            grants: grants.clone(),
            quic_alloc: None,
            allocs: 1,
        },
    );
    let serving_tx = lock(&server.portals).get(serving).map(|h| h.tx.clone());
    let Some(serving_tx) = serving_tx else {
        return Err(Refusal::NotFound(format!("`{serving}` left")));
    };
    let _ = serving_tx.send(Message::LinkIncoming {
        link_id: alloc_id,
        peer: client.to_string(),
        relay: endpoint.clone(),
        token: hex::encode(token_r),
        expires_in_ms,
        grants,
        legacy: Some(LegacyLink {
            peer_name: client_name.to_string(),
            token_p: hex::encode(token_p),
            targets: Vec::new(),
        }),
        quic: None,
    });
    Ok(Setup {
        token_p,
        token_r,
        endpoint,
        alloc_id,
        expires_in_ms,
    })
}

/// A native portal's `OpenLink` whose serving portal is a legacy session: the link is set
/// up in V0.1 terms, and the native portal is told to speak V0.1 on it.
#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename these
pub(super) async fn offer_to_legacy(
    server: &Server,
    client: &str,
    key: &[u8; 32],
    request_id: u64,
    rule: &str,
    relays: &[String],
    serving: &str,
    grants: Vec<LinkGrant>,
) -> std::result::Result<(), Message> {
    let deny = |reason: &str, message: String| Message::LinkDenied {
        request_id,
        reason: reason.into(),
        rule: Some(rule.to_string()),
        message,
    };
    let names = {
        let portals = lock(&server.portals);
        (
            portals.get(client).and_then(|h| h.legacy),
            portals.get(serving).and_then(|h| h.legacy),
        )
    };
    let (Some(me), Some(peer)) = names else {
        return Err(deny(
            "legacy-name-missing",
            format!(
                "`{serving}` is a legacy portal: `{client}` needs a certificate with a legacy name \
                 (netportd ca issue portal {client} --legacy-id ... --legacy-user ...)"
            ),
        ));
    };
    let setup = setup(server, client, serving, key, relays, grants.clone(), me)
        .await
        .map_err(|r| {
            let (reason, message) = r.reason();
            deny(reason, message.to_string())
        })?;
    let client_tx = lock(&server.portals).get(client).map(|h| h.tx.clone());
    if let Some(tx) = client_tx {
        let _ = tx.send(Message::LinkOffer {
            request_id,
            link_id: setup.alloc_id,
            peer: serving.to_string(),
            relay: setup.endpoint.clone(),
            token: hex::encode(setup.token_r),
            expires_in_ms: setup.expires_in_ms,
            legacy: Some(LegacyLink {
                peer_name: peer.to_string(),
                token_p: hex::encode(setup.token_p),
                targets: grants,
            }),
            quic: None,
        });
    }
    tracing::info!(client, serving, rule, relay = %setup.endpoint.relay, link_id = setup.alloc_id, "link allocated (legacy peer)");
    Ok(())
}
