//! TLS 1.3 settings for every Netport connection, built from PEM bytes (no files read here).
//!
//! - Control connections (portal/relay → netportd): mutual TLS against the Netport CA, ALPN
//!   `netport/1`; the client checks the server certificate against the name it dialled.
//! - Links (portal ↔ portal through a relay): mutual TLS, ALPN `netport-link/2` (streams
//!   framed by [`crate::mux`]); both sides accept exactly the peer identity the server
//!   announced, whatever the chain says besides.
//!   Link certificates carry no DNS name, so the client side uses [`ExactPeerVerifier`]
//!   instead of host-name checks.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::identity::{self, CertInfo, Identity};

pub mod legacy;

/// ALPN of links between portals. Version 2: streams framed by [`crate::mux`] (version 1
/// carried yamux).
pub const LINK_ALPN: &[u8] = b"netport-link/2";
/// ALPN of links between portals over QUIC (same certificates and peer checks as
/// [`LINK_ALPN`]; a distinct name so neither transport's handshake can be mistaken for the other's).
pub const QUIC_LINK_ALPN: &[u8] = b"netport-quic/1";

/// Building TLS settings failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// No certificate in the PEM given for `what`.
    #[error("no certificate found in the {what} PEM")]
    NoCertificate {
        /// Which input.
        what: &'static str,
    },
    /// The PEM for `what` could not be parsed.
    #[error("cannot parse the {what} PEM: {detail}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// Parser message.
        detail: String,
    },
    /// The certificate does not name a Netport identity.
    #[error("the certificate does not carry a netport:// identity: {0}")]
    Identity(#[from] identity::IdentityError),
    /// rustls refused the settings (a key that does not match, a bad CA).
    #[error("TLS settings refused: {0}")]
    Rustls(#[from] rustls::Error),
    /// The CA certificate could not be used as a trust anchor.
    #[error("the CA certificate cannot be used to verify peers: {0}")]
    Verifier(String),
}

/// The ring-based crypto provider Netport uses everywhere.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain, its key, and the Netport CA that peers must be issued by.
#[derive(Debug)]
pub struct Credentials {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    /// The CA certificates as given, for TLS stacks other than rustls (legacy links).
    ca: Vec<CertificateDer<'static>>,
    info: CertInfo,
    /// What the CA certificates say (expiry).
    ca_info: Vec<CertInfo>,
    identity: Identity,
}

impl Clone for Credentials {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            roots: self.roots.clone(),
            ca: self.ca.clone(),
            info: self.info.clone(),
            ca_info: self.ca_info.clone(),
            identity: self.identity.clone(),
        }
    }
}

impl Credentials {
    /// Parses the chain (leaf first), the key and the CA certificate; checks that the key
    /// belongs to the leaf and that the leaf names an identity.
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8], ca_pem: &[u8]) -> Result<Self, TlsError> {
        let chain = certs(chain_pem, "certificate")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem {
            what: "key",
            detail: e.to_string(),
        })?;
        let mut roots = RootCertStore::empty();
        let ca = certs(ca_pem, "CA certificate")?;
        let mut ca_info = Vec::new();
        for c in &ca {
            ca_info.push(identity::inspect(c)?);
            roots
                .add(c.clone())
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
        }
        let info = identity::inspect(&chain[0])?;
        let identity = info.identity()?.clone();
        // Proves the key matches the certificate before any socket is opened.
        let signing = provider().key_provider.load_private_key(key.clone_key())?;
        rustls::sign::CertifiedKey::new(chain.clone(), signing).keys_match()?;
        Ok(Self {
            chain,
            key,
            roots: Arc::new(roots),
            ca,
            info,
            ca_info,
            identity,
        })
    }

    /// Who these credentials are.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// What the leaf certificate says (expiry, key hash).
    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// What the trusted CA certificates say (expiry, for metrics and warnings).
    pub fn ca_info(&self) -> &[CertInfo] {
        &self.ca_info
    }

    fn client_verifier(
        &self,
    ) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
        WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))
    }

    /// netportd's control listener: TLS 1.3, client certificates required.
    pub fn control_server(&self) -> Result<ServerConfig, TlsError> {
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(self.client_verifier()?)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![crate::ALPN.to_vec()];
        Ok(cfg)
    }

    /// A portal's or relay's control connection: the server certificate must be valid for
    /// the name dialled and name a `netport://server/...` identity (checked after the
    /// handshake with [`peer_info`]).
    pub fn control_client(&self) -> Result<ClientConfig, TlsError> {
        let verifier = WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_webpki_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![crate::ALPN.to_vec()];
        Ok(cfg)
    }

    /// The serving portal's side of a link: any certificate of the CA is accepted by the
    /// handshake; the caller then checks [`peer_info`] against the announced peer.
    pub fn link_server(&self) -> Result<ServerConfig, TlsError> {
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(self.client_verifier()?)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![LINK_ALPN.to_vec()];
        Ok(cfg)
    }

    /// The client portal's side of a link: the serving portal must be exactly `peer`.
    pub fn link_client(&self, peer: Identity) -> Result<ClientConfig, TlsError> {
        let verifier = Arc::new(ExactPeerVerifier {
            roots: self.roots.clone(),
            provider: provider(),
            peer: Expected::Identity(peer),
        });
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![LINK_ALPN.to_vec()];
        Ok(cfg)
    }
}

fn certs(pem: &[u8], what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let list = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            detail: e.to_string(),
        })?;
    if list.is_empty() {
        return Err(TlsError::NoCertificate { what });
    }
    Ok(list)
}

/// What the peer's leaf certificate says, from the certificates a handshake delivered.
pub fn peer_info(
    certs: Option<&[CertificateDer<'_>]>,
) -> Result<CertInfo, identity::IdentityError> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or(identity::IdentityError::NoIdentity)?;
    identity::inspect(leaf)
}

/// Verifies a server certificate against the Netport CA and accepts only one peer;
/// the name the client dialled is ignored (links go through relays, not names).
#[derive(Debug)]
pub struct ExactPeerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    peer: Expected,
}

/// Who the link peer must be.
#[derive(Debug)]
enum Expected {
    /// A native peer: exactly this `netport://` identity.
    Identity(Identity),
    /// A legacy (V0.1) peer: exactly this `ID|IDV|USER|USERV` DNS SAN, which is not a valid
    /// DNS name and so cannot go through rustls' name checks.
    Legacy(crate::legacy::LegacyName),
}

impl ServerCertVerifier for ExactPeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let info = identity::inspect(end_entity)
            .map_err(|e| rustls::Error::General(format!("peer certificate: {e}")))?;
        let peer = match &self.peer {
            Expected::Legacy(name) if legacy::has_legacy_name(&info, name) => {
                return Ok(ServerCertVerified::assertion());
            }
            Expected::Legacy(name) => {
                return Err(rustls::Error::General(format!(
                    "legacy link peer certificate names {:?}, expected {name}",
                    info.dns_names
                )));
            }
            Expected::Identity(peer) => peer,
        };
        match info.identity {
            Some(id) if id == *peer => Ok(ServerCertVerified::assertion()),
            Some(id) => Err(rustls::Error::General(format!(
                "link peer is {id}, expected {peer}"
            ))),
            None => Err(rustls::Error::General(
                "link peer certificate names no netport identity".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    pub(super) struct Ca {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    pub(super) fn ca(cn: &str) -> Result<Ca, rcgen::Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    fn portal(ca: &Ca, name: &str) -> Result<Credentials, Box<dyn std::error::Error>> {
        portal_with_dns(ca, name, &[])
    }

    /// A portal certificate that also carries the DNS SANs `dns`.
    pub(super) fn portal_with_dns(
        ca: &Ca,
        name: &str,
        dns: &[&str],
    ) -> Result<Credentials, Box<dyn std::error::Error>> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names =
            vec![SanType::URI(format!("netport://portal/{name}").try_into()?)];
        for d in dns {
            params
                .subject_alt_names
                .push(SanType::DnsName((*d).try_into()?));
        }
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca.issuer)?;
        Ok(Credentials::from_pem(
            cert.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
            ca.pem.as_bytes(),
        )?)
    }

    /// Runs a TLS handshake in memory; returns the server's view of the client identity.
    fn handshake(client: ClientConfig, server: ServerConfig) -> Result<CertInfo, String> {
        let (c, s) = drive(client, server, "peer.netport.invalid")?;
        if c.alpn_protocol() != Some(LINK_ALPN) {
            return Err("no ALPN agreed".into());
        }
        peer_info(s.peer_certificates()).map_err(|e| e.to_string())
    }

    /// Runs a TLS handshake in memory, the client dialling `name`.
    pub(super) fn drive(
        client: ClientConfig,
        server: ServerConfig,
        name: &str,
    ) -> Result<(rustls::ClientConnection, rustls::ServerConnection), String> {
        let name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
        let mut c =
            rustls::ClientConnection::new(Arc::new(client), name).map_err(|e| e.to_string())?;
        let mut s = rustls::ServerConnection::new(Arc::new(server)).map_err(|e| e.to_string())?;
        for _ in 0..20 {
            if !c.is_handshaking() && !s.is_handshaking() {
                break;
            }
            let mut buf = Vec::new();
            c.write_tls(&mut buf).map_err(|e| e.to_string())?;
            s.read_tls(&mut buf.as_slice()).map_err(|e| e.to_string())?;
            s.process_new_packets()
                .map_err(|e| format!("server: {e}"))?;
            let mut buf = Vec::new();
            s.write_tls(&mut buf).map_err(|e| e.to_string())?;
            c.read_tls(&mut buf.as_slice()).map_err(|e| e.to_string())?;
            c.process_new_packets()
                .map_err(|e| format!("client: {e}"))?;
        }
        Ok((c, s))
    }

    #[test]
    fn link_accepts_exactly_the_announced_peer() -> TestResult {
        let ca = ca("Netport CA")?;
        let alice = portal(&ca, "alice")?;
        let bob = portal(&ca, "bob")?;
        let seen = handshake(
            alice.link_client(Identity::new(identity::Role::Portal, "bob")?)?,
            bob.link_server()?,
        )?;
        assert_eq!(seen.identity()?.uri(), "netport://portal/alice");

        let err = handshake(
            alice.link_client(Identity::new(identity::Role::Portal, "carol")?)?,
            bob.link_server()?,
        )
        .err()
        .ok_or("handshake with the wrong peer succeeded")?;
        assert!(err.contains("expected netport://portal/carol"), "{err}");
        Ok(())
    }

    #[test]
    fn a_link_from_a_portal_with_the_other_stream_framing_is_refused() -> TestResult {
        let ca = ca("Netport CA")?;
        let alice = portal(&ca, "alice")?;
        let bob = portal(&ca, "bob")?;
        // A portal from before the link's own multiplexer (yamux, `netport-link/1`).
        let mut old = alice.link_client(Identity::new(identity::Role::Portal, "bob")?)?;
        old.alpn_protocols = vec![b"netport-link/1".to_vec()];
        let err = handshake(old, bob.link_server()?)
            .err()
            .ok_or("a link with another stream framing was set up")?;
        assert!(err.contains("doesn't support any known protocol"), "{err}");
        Ok(())
    }

    #[test]
    fn link_refuses_a_peer_from_another_ca() -> TestResult {
        let ours = ca("Netport CA")?;
        let theirs = ca("Other CA")?;
        let alice = portal(&ours, "alice")?;
        let mallory = portal(&theirs, "bob")?;
        let bob = Identity::new(identity::Role::Portal, "bob")?;
        assert!(handshake(alice.link_client(bob)?, mallory.link_server()?).is_err());
        // And the serving side refuses a client of another CA.
        let real_bob = portal(&ours, "bob")?;
        let alice_id = Identity::new(identity::Role::Portal, "bob")?;
        assert!(handshake(mallory.link_client(alice_id)?, real_bob.link_server()?).is_err());
        Ok(())
    }

    #[test]
    fn credentials_refuse_a_key_of_another_certificate() -> TestResult {
        let ca = ca("Netport CA")?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI("netport://portal/alice".try_into()?)];
        let key = KeyPair::generate()?;
        let other = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca.issuer)?;
        let err = Credentials::from_pem(
            cert.pem().as_bytes(),
            other.serialize_pem().as_bytes(),
            ca.pem.as_bytes(),
        )
        .err()
        .ok_or("a mismatched key was accepted")?;
        assert!(matches!(err, TlsError::Rustls(_)), "{err}");
        assert!(matches!(
            Credentials::from_pem(b"", key.serialize_pem().as_bytes(), ca.pem.as_bytes()),
            Err(TlsError::NoCertificate { .. })
        ));
        Ok(())
    }
}
