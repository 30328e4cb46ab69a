//! A test-only legacy (V0.1) portal, written from `LEGACY-PROTOCOL.md`: it logs in to
//! netportd's legacy listener, asks for links, meets its peer at the relay and speaks the
//! legacy link framing. Every read is a single fixed-size read of the length the protocol
//! announces, as the original Python portal does, and every message goes out in one write.
//! Also [`LegacySystem`]: netportd with a legacy listener, one relay, and optionally native
//! portals, on loopback.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use netport_proto::identity::Role;
use netport_proto::legacy::{
    self, Auth, Command, ControlMsg, Id4, LegacyName, LinkControl, Meeting, NO_REF,
};
use netport_proto::tls::Credentials;
use netportd::pki::IssueRequest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::{CertFiles, Daemon, Pki, free_port_range, path_str};

/// Anything a link or control connection runs over.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The largest data payload this portal puts in one link frame (one TLS record).
pub const DATA_CHUNK: usize = 16 * 1024 - 16;

/// A legacy portal's identity: its certificate (with the `ID|IDV|USER|USERV` name) and key.
pub struct LegacyPortal {
    pub name: LegacyName,
    pub creds: Credentials,
    control: Arc<rustls::ClientConfig>,
}

impl LegacyPortal {
    /// Issues `policy_name`'s certificate with the legacy name and builds the portal.
    pub fn issue(pki: &Pki, policy_name: &str, name: LegacyName) -> Result<LegacyPortal> {
        let files = pki.write(pki.ca.issue(&IssueRequest {
            legacy: Some(name),
            ..IssueRequest::new(Role::Portal, policy_name, 30)
        })?)?;
        Self::from_files(pki, &files, name)
    }

    /// A portal from certificate files (which may lack the legacy name, for refusal tests).
    pub fn from_files(pki: &Pki, files: &CertFiles, name: LegacyName) -> Result<LegacyPortal> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(files.issued.chain_pem.as_bytes())
                .collect::<Result<_, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(files.issued.key_pem.as_bytes())?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(pki.ca.cert_pem().as_bytes()) {
            roots.add(ca?)?;
        }
        // The legacy portal checks the server name `server` against its CA; no ALPN.
        let control = rustls::ClientConfig::builder_with_provider(netport_proto::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        Ok(LegacyPortal {
            name,
            creds: pki.credentials(files)?,
            control: Arc::new(control),
        })
    }

    /// Connects and sends the login; returns the connection and the login answer payload.
    pub async fn login_as(
        &self,
        server: SocketAddr,
        auth: Auth,
    ) -> Result<(LegacyControl, Vec<u8>)> {
        let tcp = TcpStream::connect(server).await?;
        tcp.set_nodelay(true)?;
        let connector = tokio_rustls::TlsConnector::from(self.control.clone());
        let tls = connector
            .connect(ServerName::try_from("server")?, tcp)
            .await
            .context("TLS to the legacy listener (the server must be named `server`)")?;
        let (rd, wr) = tokio::io::split(Box::new(tls) as Box<dyn Io>);
        let mut c = LegacyControl {
            rd,
            wr,
            next_ref: 1,
            clkr: Vec::new(),
        };
        c.write_payload(&legacy::encode_auth(&auth)).await?;
        let reply = c.recv_payload(Duration::from_secs(10)).await?;
        Ok((c, reply))
    }

    /// Logs in with this portal's own IDs and insists on success.
    pub async fn login(&self, server: SocketAddr) -> Result<LegacyControl> {
        let (c, reply) = self
            .login_as(
                server,
                Auth {
                    portal_id: self.name.id,
                    user_id: self.name.user,
                },
            )
            .await?;
        ensure!(
            reply == legacy::AUTH_OK,
            "login refused: {:?}",
            String::from_utf8_lossy(&reply)
        );
        Ok(c)
    }

    /// The requester's side of a link (TLS client) from a `REPL` about portal `other`. As
    /// the Python portal does, with OpenSSL: the peer's name is the SNI and the name checked.
    pub async fn link_as_requester(&self, other: Id4, m: &Meeting) -> Result<LinkIo> {
        let tcp = meet_relay(m).await?;
        let mut peer = m.peer;
        peer.id = other;
        let connector = portal::legacy_tls::connector(&self.creds)?;
        let mut tls = portal::legacy_tls::connect(&connector, &peer.to_string(), tcp)
            .await
            .context("link TLS as client")?;
        // The TLS server speaks first: tokenP[0..4]; the client answers tokenP[4..8].
        let mut first = [0u8; 4];
        tls.read_exact(&mut first).await?;
        ensure!(first == m.token_p[..4], "tokenP[0..4] mismatch");
        tls.write_all(&m.token_p[4..]).await?;
        Ok(LinkIo::new(Box::new(tls)))
    }

    /// The `CLKR` receiver's side of a link (TLS server), with OpenSSL as the Python portal.
    pub async fn link_as_receiver(&self, m: &Meeting) -> Result<LinkIo> {
        let tcp = meet_relay(m).await?;
        let acceptor = portal::legacy_tls::acceptor(&self.creds)?;
        let mut tls = portal::legacy_tls::accept(&acceptor, tcp)
            .await
            .context("link TLS as server")?;
        let info = portal::legacy_tls::peer_info(&tls)?;
        ensure!(
            netport_proto::tls::legacy::has_legacy_name(&info, &m.peer),
            "the requester's certificate is not named {}",
            m.peer
        );
        tls.write_all(&m.token_p[..4]).await?;
        let mut second = [0u8; 4];
        tls.read_exact(&mut second).await?;
        ensure!(second == m.token_p[4..], "tokenP[4..8] mismatch");
        Ok(LinkIo::new(Box::new(tls)))
    }
}

/// Presents `tokenR` and waits for the echo, then `Ready !\n`.
pub async fn meet_relay(m: &Meeting) -> Result<TcpStream> {
    let mut tcp = relay_hello(m.relay_port, &m.relay_addr, &m.token_r).await?;
    let mut ready = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(15), tcp.read_exact(&mut ready))
        .await
        .context("no Ready from the relay")??;
    ensure!(
        &ready == legacy::RELAY_READY,
        "relay said {:?}",
        String::from_utf8_lossy(&ready)
    );
    Ok(tcp)
}

/// Sends a relay hello and reads the echo; fails with the relay's words otherwise.
pub async fn relay_hello(port: u16, addr: &str, token: &[u8; 8]) -> Result<TcpStream> {
    let mut tcp = TcpStream::connect((addr, port)).await?;
    tcp.set_nodelay(true)?;
    let hello = legacy::encode_relay_hello(token);
    tcp.write_all(&hello).await?;
    let mut echo = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut echo))
        .await
        .context("no answer from the relay")??;
    if echo != hello[..8] {
        bail!("relay answered {:?}", String::from_utf8_lossy(&echo));
    }
    let mut rest = [0u8; 56];
    tcp.read_exact(&mut rest).await?;
    ensure!(rest == hello[8..], "the echo differs from the hello");
    Ok(tcp)
}

/// The control connection after login.
pub struct LegacyControl {
    rd: ReadHalf<Box<dyn Io>>,
    wr: WriteHalf<Box<dyn Io>>,
    next_ref: u32,
    /// `CLKR`s that arrived while waiting for something else.
    clkr: Vec<Meeting>,
}

impl LegacyControl {
    async fn write_payload(&mut self, payload: &[u8]) -> Result<()> {
        self.wr
            .write_all(&legacy::encode_control_frame(payload)?)
            .await?;
        self.wr.flush().await?;
        Ok(())
    }

    /// The next frame's payload: one read of the header, one of the payload.
    pub async fn recv_payload(&mut self, within: Duration) -> Result<Vec<u8>> {
        tokio::time::timeout(within, async {
            let mut head = [0u8; 4];
            self.rd.read_exact(&mut head).await?;
            let mut p = vec![0u8; usize::from(u16::from_le_bytes([head[0], head[1]]))];
            self.rd.read_exact(&mut p).await?;
            Ok::<_, std::io::Error>(p)
        })
        .await
        .context("no legacy frame in time")?
        .context("control connection closed")
    }

    /// The next message, keepalives included.
    pub async fn recv(&mut self, within: Duration) -> Result<ControlMsg> {
        let p = self.recv_payload(within).await?;
        Ok(legacy::decode_control(&p)?)
    }

    /// Sends `.KA.`.
    pub async fn keepalive(&mut self) -> Result<()> {
        self.send(&ControlMsg {
            reference: NO_REF,
            command: Command::KeepAlive,
        })
        .await
    }

    pub async fn send(&mut self, msg: &ControlMsg) -> Result<()> {
        self.write_payload(&legacy::encode_control(msg)).await
    }

    /// `RQRL` for `other`; the `REPL` answer (keepalives skipped, `CLKR`s kept).
    pub async fn request_link(&mut self, other: Id4) -> Result<Command> {
        let reference = self.next_ref.to_le_bytes();
        self.next_ref += 1;
        self.send(&ControlMsg {
            reference,
            command: Command::RequestLink {
                other_id: other,
                seed: *b"seed0001",
            },
        })
        .await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let m = self.recv(left).await.context("no REPL within 10 s")?;
            match m.command {
                Command::KeepAlive => {}
                Command::ConnectLink(c) => self.clkr.push(c),
                c => {
                    ensure!(m.reference == reference, "REPL for another request");
                    return Ok(c);
                }
            }
        }
    }

    /// The next `CLKR`.
    pub async fn wait_clkr(&mut self, within: Duration) -> Result<Meeting> {
        if let Some(m) = self.clkr.pop() {
            return Ok(m);
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let m = self.recv(left).await.context("no CLKR in time")?;
            if let Command::ConnectLink(c) = m.command {
                return Ok(c);
            }
        }
    }
}

/// One link after the `tokenP` exchange.
pub struct LinkIo {
    pub rd: ReadHalf<Box<dyn Io>>,
    pub wr: WriteHalf<Box<dyn Io>>,
}

impl LinkIo {
    fn new(io: Box<dyn Io>) -> LinkIo {
        let (rd, wr) = tokio::io::split(io);
        LinkIo { rd, wr }
    }

    pub async fn send_control(&mut self, msg: &LinkControl) -> Result<()> {
        send_frame(&mut self.wr, 0, &legacy::encode_link_control(msg)).await
    }

    pub async fn recv_frame(&mut self, within: Duration) -> Result<(u16, Vec<u8>)> {
        recv_frame(&mut self.rd, within).await
    }

    /// The next channel-0 message that is not a keepalive, data frames skipped.
    pub async fn recv_control(&mut self, within: Duration) -> Result<LinkControl> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let (ch, p) = self.recv_frame(left).await?;
            if ch == 0 {
                let m = legacy::decode_link_control(&p)?;
                if m != LinkControl::KeepAlive {
                    return Ok(m);
                }
            }
        }
    }
}

/// Writes one link frame in one write.
pub async fn send_frame<W: AsyncWrite + Unpin>(wr: &mut W, ch: u16, payload: &[u8]) -> Result<()> {
    let mut out = Vec::with_capacity(4 + payload.len());
    legacy::encode_link_frame(ch, payload, &mut out)?;
    wr.write_all(&out).await?;
    wr.flush().await?;
    Ok(())
}

/// Reads one link frame: the header, then exactly its payload.
pub async fn recv_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    within: Duration,
) -> Result<(u16, Vec<u8>)> {
    tokio::time::timeout(within, async {
        let mut head = [0u8; 4];
        rd.read_exact(&mut head).await?;
        let mut p = vec![0u8; usize::from(u16::from_le_bytes([head[0], head[1]]))];
        rd.read_exact(&mut p).await?;
        Ok::<_, std::io::Error>((u16::from_le_bytes([head[2], head[3]]), p))
    })
    .await
    .context("no link frame in time")?
    .context("link closed")
}

/// Serves `n` requests on a link as the legacy portal does: dial `addr:port`, answer `N`,
/// carry bytes, pass half-closes and aborts on. Runs until the link ends.
pub fn serve_channels(link: LinkIo) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let LinkIo { mut rd, mut wr } = link;
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<(u16, Vec<u8>)>();
        let writer = tokio::spawn(async move {
            while let Some((ch, p)) = out_rx.recv().await {
                if send_frame(&mut wr, ch, &p).await.is_err() {
                    break;
                }
            }
        });
        let mut sockets: HashMap<u16, (tokio::net::tcp::OwnedWriteHalf, tokio::task::AbortHandle)> =
            HashMap::new();
        let mut next: u16 = 1;
        let mut req: u32 = 1;
        let control = |m: LinkControl| (0u16, legacy::encode_link_control(&m));
        while let Ok((ch, p)) = recv_frame(&mut rd, Duration::from_secs(3600)).await {
            if ch != 0 {
                if let Some((w, _)) = sockets.get_mut(&ch) {
                    let _ = w.write_all(&p).await;
                }
                continue;
            }
            match legacy::decode_link_control(&p) {
                Ok(LinkControl::Open {
                    req: r,
                    src,
                    port,
                    addr,
                }) => match TcpStream::connect((addr.as_str(), port)).await {
                    Ok(s) => {
                        let mine = next;
                        next += 1;
                        let (mut sr, sw) = s.into_split();
                        let tx = out_tx.clone();
                        let first_req = req;
                        req += 1;
                        let reader = tokio::spawn(async move {
                            let mut buf = vec![0u8; DATA_CHUNK];
                            loop {
                                match sr.read(&mut buf).await {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => {
                                        if tx.send((src, buf[..n].to_vec())).is_err() {
                                            return;
                                        }
                                    }
                                }
                            }
                            let _ = tx.send(control(LinkControl::HalfClose {
                                req: first_req,
                                dst: src,
                                src: mine,
                            }));
                        });
                        sockets.insert(mine, (sw, reader.abort_handle()));
                        let _ = out_tx.send(control(LinkControl::Opened {
                            req: r,
                            src,
                            new: mine,
                        }));
                    }
                    Err(_) => {
                        let _ = out_tx.send(control(LinkControl::Opened {
                            req: r,
                            src,
                            new: 0,
                        }));
                    }
                },
                Ok(LinkControl::HalfClose { req: r, dst, src }) => {
                    let ok = match sockets.get_mut(&dst) {
                        Some((w, _)) => w.shutdown().await.is_ok(),
                        None => false,
                    };
                    let _ = out_tx.send(control(LinkControl::HalfClosed { req: r, src, ok }));
                }
                Ok(LinkControl::Abort { req: r, dst, src }) => {
                    let ok = match sockets.remove(&dst) {
                        Some((_, reader)) => {
                            reader.abort();
                            true
                        }
                        None => false,
                    };
                    let _ = out_tx.send(control(LinkControl::Aborted { req: r, src, ok }));
                }
                _ => {}
            }
        }
        writer.abort();
    })
}

/// netportd with a legacy listener, one relay, and native portals, on loopback.
pub struct LegacySystem {
    pub pki: Pki,
    pub server_addr: SocketAddr,
    pub legacy_addr: SocketAddr,
    pub daemons: Vec<(String, Daemon)>,
    pub relay_ports: (u16, u16),
    relay_toml: String,
}

impl LegacySystem {
    /// Starts netportd (legacy keepalive `keepalive_secs`, idle limit `idle_secs`) and
    /// relay-1. With `relay = false` the policy names the relay but none runs.
    pub fn start(
        pki: Pki,
        policy: &str,
        keepalive_secs: u64,
        idle_secs: u64,
        relay: bool,
    ) -> Result<LegacySystem> {
        let dir = pki.dir.path().to_path_buf();
        let (first, last) = free_port_range(20)?;
        std::fs::create_dir_all(dir.join("policy"))?;
        let relay_toml = format!(
            "\n[[relay]]\nname = \"relay-1\"\naddress = \"127.0.0.1\"\nports = \"{first}-{last}\"\n"
        );
        std::fs::write(
            dir.join("policy/policy.toml"),
            format!("{policy}{relay_toml}"),
        )?;
        // One certificate for both listeners: the native name and `server` for legacy portals.
        let server = pki.write(pki.ca.issue(&IssueRequest {
            dns: vec!["localhost".into(), "server".into()],
            ips: vec!["127.0.0.1".parse()?],
            ..IssueRequest::new(Role::Server, "netportd", 30)
        })?)?;
        let (port, _) = free_port_range(2)?;
        let server_addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let legacy_addr: SocketAddr = format!("127.0.0.1:{}", port + 1).parse()?;
        let cfg = dir.join("netportd.toml");
        std::fs::write(
            &cfg,
            format!(
                "listen = [\"{server_addr}\"]\npolicy = \"policy\"\nheartbeat_secs = 2\n{}\n[legacy]\nlisten = \"{legacy_addr}\"\nkeepalive_secs = {keepalive_secs}\nidle_secs = {idle_secs}\n",
                tls_toml(&pki, &server)
            ),
        )?;
        let mut daemons = vec![(
            "netportd".to_string(),
            Daemon::start(
                "netportd",
                &["run", "--config", path_str(&cfg)?],
                &dir.join("netportd.log"),
            )?,
        )];
        if relay {
            let files = pki.issue(Role::Relay, "relay-1")?;
            let cfg = dir.join("relay-1.toml");
            std::fs::write(
                &cfg,
                format!(
                    "servers = [\"{server_addr}\"]\npublic_address = \"127.0.0.1\"\nbind = \"127.0.0.1\"\nports = \"{first}-{last}\"\n{}",
                    tls_toml(&pki, &files)
                ),
            )?;
            daemons.push((
                "relayd".into(),
                Daemon::start(
                    "relayd",
                    &["--config", path_str(&cfg)?],
                    &dir.join("relayd.log"),
                )?,
            ));
        }
        Ok(LegacySystem {
            pki,
            server_addr,
            legacy_addr,
            daemons,
            relay_ports: (first, last),
            relay_toml,
        })
    }

    /// Replaces the policy (the relay stays), writing a temporary file and renaming it.
    pub fn set_policy(&self, policy: &str) -> Result<()> {
        let dir = self.pki.dir.path().join("policy");
        let tmp = dir.join(".policy.toml.tmp");
        std::fs::write(&tmp, format!("{policy}{}", self.relay_toml))?;
        std::fs::rename(&tmp, dir.join("policy.toml"))?;
        Ok(())
    }

    /// Starts a native portal with certificate `files`.
    pub fn start_portal(&mut self, name: &str, files: &CertFiles) -> Result<()> {
        let dir = self.pki.dir.path();
        let cfg = dir.join(format!("portal-{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "servers = [\"{}\"]\n{}",
                self.server_addr,
                tls_toml(&self.pki, files)
            ),
        )?;
        let d = Daemon::start(
            "portal",
            &["--config", path_str(&cfg)?],
            &dir.join(format!("portal-{name}.log")),
        )?;
        self.daemons.push((format!("portal-{name}"), d));
        Ok(())
    }

    pub fn log(&self, name: &str) -> String {
        crate::log_of(&self.daemons, name)
    }

    pub fn logs(&self) -> String {
        crate::logs_of(&self.daemons)
    }

    /// Waits until `needle` appears in the log of `name`.
    pub async fn wait_log(&self, name: &str, needle: &str, within: Duration) -> Result<()> {
        crate::wait_log(self, name, needle, within).await
    }
}

impl crate::Daemons for LegacySystem {
    fn daemons(&self) -> &[(String, Daemon)] {
        &self.daemons
    }
}

fn tls_toml(pki: &Pki, f: &CertFiles) -> String {
    let p = |p: &Path| p.display().to_string();
    format!(
        "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        p(&pki.ca_path()),
        p(&f.cert),
        p(&f.key)
    )
}
