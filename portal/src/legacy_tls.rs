//! OpenSSL for the TLS server side of links with legacy (V0.1, Python) portals.
//!
//! A Python portal opening a link sends its peer's certificate name, `ID|IDV|USER|USERV`, as
//! the TLS server name (SNI). rustls refuses a ClientHello whose SNI is not a valid DNS name
//! with a fatal alert, and the name cannot be rewritten without breaking the handshake
//! transcript, so the side that accepts those handshakes uses OpenSSL, as Python does.
//! Everything else (native links, the client side of legacy links, control connections) stays
//! on rustls. The peer is verified against the Netport CA here; its name is checked by the
//! caller with [`netport_proto::tls::legacy::has_legacy_name`].

use std::pin::Pin;

use anyhow::{Context, Result, anyhow};
use netport_proto::identity::{self, CertInfo};
use netport_proto::tls::Credentials;
use openssl::pkey::PKey;
use openssl::ssl::{Ssl, SslAcceptor, SslConnector, SslContextBuilder, SslMethod, SslVerifyMode};
use openssl::x509::X509;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_openssl::SslStream;

/// Certificate, chain, key and trusted CA of `creds`, peer certificates required.
fn configure(b: &mut SslContextBuilder, creds: &Credentials) -> Result<()> {
    let mut chain = creds.chain_der().iter();
    let leaf = chain.next().context("no certificate")?;
    let leaf = X509::from_der(leaf)?;
    b.set_certificate(&leaf)?;
    for c in chain {
        b.add_extra_chain_cert(X509::from_der(c)?)?;
    }
    let key = PKey::private_key_from_der(creds.key_der().secret_der())?;
    b.set_private_key(&key)?;
    b.check_private_key()
        .context("the key does not match the certificate")?;
    for ca in creds.ca_der() {
        b.cert_store_mut().add_cert(X509::from_der(ca)?)?;
    }
    b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
    Ok(())
}

/// The server side: TLS 1.2 or 1.3, any SNI, a client certificate of the Netport CA.
pub fn acceptor(creds: &Credentials) -> Result<SslAcceptor> {
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())?;
    configure(&mut b, creds)?;
    Ok(b.build())
}

/// The client side as a Python portal does it: the server name is the peer's legacy name,
/// sent as SNI and checked against the certificate by OpenSSL (tests use this to play one).
pub fn connector(creds: &Credentials) -> Result<SslConnector> {
    let mut b = SslConnector::builder(SslMethod::tls_client())?;
    configure(&mut b, creds)?;
    Ok(b.build())
}

/// Accepts a TLS client on `io`.
pub async fn accept<S>(acceptor: &SslAcceptor, io: S) -> Result<SslStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let ssl = Ssl::new(acceptor.context())?;
    let mut stream = SslStream::new(ssl, io)?;
    Pin::new(&mut stream)
        .accept()
        .await
        .map_err(|e| anyhow!("{e}"))?;
    Ok(stream)
}

/// Connects as a TLS client on `io`, with `server_name` as SNI and as the name to verify.
pub async fn connect<S>(connector: &SslConnector, server_name: &str, io: S) -> Result<SslStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let ssl = connector.configure()?.into_ssl(server_name)?;
    let mut stream = SslStream::new(ssl, io)?;
    Pin::new(&mut stream)
        .connect()
        .await
        .map_err(|e| anyhow!("{e}"))?;
    Ok(stream)
}

/// What the peer's certificate says.
pub fn peer_info<S>(stream: &SslStream<S>) -> Result<CertInfo> {
    let cert = stream
        .ssl()
        .peer_certificate()
        .context("the peer presented no certificate")?;
    Ok(identity::inspect(&cert.to_der()?)?)
}
