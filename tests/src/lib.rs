//! Helpers for whole-system tests: a throwaway PKI written to disk, free loopback ports,
//! starting the real binaries, and a scripted control peer for testing one daemon at a time.

// Test scaffolding: none of these types is printed.
#![allow(missing_debug_implementations)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use netport_proto::control::{Decoder, Message, encode_message};
use netport_proto::identity::Role;
use netport_proto::tls::Credentials;
use netportd::pki::{Ca, IssueRequest, Issued};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A CA and the files of the certificates issued from it, in a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
}

/// Paths of one issued certificate.
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub issued: Issued,
}

impl Pki {
    pub fn new() -> Result<Pki> {
        let dir = tempfile::tempdir()?;
        let ca = Ca::generate(30)?;
        std::fs::write(dir.path().join("ca.crt"), ca.cert_pem())?;
        Ok(Pki { dir, ca })
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// Issues a certificate (servers get 127.0.0.1 and localhost) and writes it out.
    pub fn issue(&self, role: Role, name: &str) -> Result<CertFiles> {
        let mut req = IssueRequest::new(role, name, 30);
        if role == Role::Server {
            req.dns = vec!["localhost".into()];
            req.ips = vec!["127.0.0.1".parse()?];
        }
        self.write(self.ca.issue(&req)?)
    }

    pub fn write(&self, issued: Issued) -> Result<CertFiles> {
        let stem = issued.file_stem();
        let cert = self.dir.path().join(format!("{stem}.crt"));
        let key = self.dir.path().join(format!("{stem}.key"));
        std::fs::write(&cert, &issued.chain_pem)?;
        std::fs::write(&key, &issued.key_pem)?;
        Ok(CertFiles { cert, key, issued })
    }

    pub fn credentials(&self, files: &CertFiles) -> Result<Credentials> {
        Ok(Credentials::from_pem(
            files.issued.chain_pem.as_bytes(),
            files.issued.key_pem.as_bytes(),
            self.ca.cert_pem().as_bytes(),
        )?)
    }
}

/// `n` distinct loopback ports that were free a moment ago, in one contiguous range.
pub fn free_port_range(n: u16) -> Result<(u16, u16)> {
    'search: for _ in 0..200 {
        let probe = TcpListener::bind("127.0.0.1:0")?;
        let start = probe.local_addr()?.port();
        drop(probe);
        if u32::from(start) + u32::from(n) > 65000 {
            continue;
        }
        let mut held = Vec::new();
        for p in start..start + n {
            match TcpListener::bind(("127.0.0.1", p)) {
                Ok(l) => held.push(l),
                Err(_) => continue 'search,
            }
        }
        return Ok((start, start + n - 1));
    }
    bail!("no free port range of {n} found")
}

/// A path to one of the workspace's binaries, built by cargo for this test run.
pub fn binary(name: &str) -> PathBuf {
    let mut dir = std::env::current_exe().unwrap_or_default();
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// A child process killed when dropped, with its stderr kept in a file for diagnosis.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(bin: &str, args: &[&str], log: &Path) -> Result<Daemon> {
        let err = std::fs::File::create(log)?;
        let child = Command::new(binary(bin))
            .args(args)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        Ok(Daemon {
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scripted control peer: accepts one TLS control connection and exchanges messages.
pub struct ControlPeer {
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

/// One accepted control connection.
pub struct ControlConn {
    stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    decoder: Decoder,
}

impl ControlPeer {
    pub async fn bind(creds: &Credentials) -> Result<ControlPeer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(creds.control_server()?));
        Ok(ControlPeer { listener, acceptor })
    }

    pub fn addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    pub async fn accept(&self) -> Result<ControlConn> {
        let (tcp, _) = tokio::time::timeout(Duration::from_secs(20), self.listener.accept())
            .await
            .context("no control connection within 20 s")??;
        let stream = self.acceptor.accept(tcp).await?;
        Ok(ControlConn {
            stream,
            decoder: Decoder::new(),
        })
    }
}

impl ControlConn {
    pub async fn send(&mut self, msg: &Message) -> Result<()> {
        self.stream.write_all(&encode_message(msg)).await?;
        Ok(())
    }

    /// The next message that is not a heartbeat, within `within`.
    pub async fn recv(&mut self, within: Duration) -> Result<Message> {
        let deadline = tokio::time::Instant::now() + within;
        let mut buf = [0u8; 8192];
        loop {
            while let Some(m) = self.decoder.next_message()? {
                if !matches!(m, Message::Heartbeat { .. }) {
                    return Ok(m);
                }
            }
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut buf))
                .await
                .context("no control message in time")??;
            if n == 0 {
                bail!("control connection closed");
            }
            self.decoder.push(&buf[..n]);
        }
    }
}
