//! TLS settings for the legacy (V0.1) protocol: TLS 1.2 or 1.3, no ALPN.
//!
//! A legacy portal's certificate names it with the DNS SAN `ID|IDV|USER|USERV`, which is not
//! a valid DNS name: rustls refuses it as a
//! [`ServerName`](rustls::pki_types::ServerName), so the client side of a link to a
//! legacy portal uses [`ExactPeerVerifier`], which checks the chain against the Netport CA
//! exactly as the default verifier does and then compares that one SAN. A server side
//! accepts any client certificate of the CA; the caller compares the name with
//! [`has_legacy_name`] after the handshake.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, ServerConfig};

use super::{Credentials, ExactPeerVerifier, Expected, TlsError, provider};
use crate::identity::CertInfo;
use crate::legacy::LegacyName;

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

impl Credentials {
    /// netportd's legacy listener: client certificates of the Netport CA required; the
    /// certificate presented should carry the DNS name `server`, which legacy portals check.
    /// (Not for the server side of legacy links: a Python portal sends the link peer's
    /// `ID|IDV|USER|USERV` name as SNI there, which rustls refuses; the portal uses OpenSSL.)
    pub fn legacy_control_server(&self) -> Result<ServerConfig, TlsError> {
        Ok(ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)?
            .with_client_cert_verifier(self.client_verifier()?)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?)
    }

    /// A Rust portal opening a link to a legacy portal: the server certificate must chain to
    /// the Netport CA and carry exactly the DNS SAN `peer` (as the server announced it).
    pub fn legacy_link_client(&self, peer: LegacyName) -> Result<ClientConfig, TlsError> {
        let verifier = Arc::new(ExactPeerVerifier {
            roots: self.roots.clone(),
            provider: provider(),
            peer: Expected::Legacy(peer),
        });
        Ok(ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?)
    }

    /// The certificate chain (leaf first), DER, for a TLS stack other than rustls: a legacy
    /// portal sends its peer's name as SNI, which rustls refuses as a server.
    pub fn chain_der(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The private key, DER (PKCS#8, SEC1 or PKCS#1 as it was read).
    pub fn key_der(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// The Netport CA certificates, DER.
    pub fn ca_der(&self) -> &[CertificateDer<'static>] {
        &self.ca
    }

    /// The legacy name this certificate carries, if any (the first valid one).
    pub fn legacy_name(&self) -> Option<LegacyName> {
        legacy_names(&self.info).next()
    }
}

/// Every valid `ID|IDV|USER|USERV` DNS SAN of a certificate.
pub fn legacy_names(info: &CertInfo) -> impl Iterator<Item = LegacyName> + '_ {
    info.dns_names.iter().filter_map(|n| LegacyName::parse(n))
}

/// Whether the certificate carries exactly the DNS SAN of `name`.
pub fn has_legacy_name(info: &CertInfo, name: &LegacyName) -> bool {
    legacy_names(info).any(|n| n == *name)
}

/// Whether the certificate carries the name legacy portals require of the server: a DNS
/// SAN `server`, or, when it has no DNS SAN at all, the common name `server`.
pub fn names_legacy_server(info: &CertInfo) -> bool {
    if info.dns_names.is_empty() {
        info.subject
            .split(',')
            .any(|rdn| rdn.trim() == format!("CN={}", crate::legacy::SERVER_NAME))
    } else {
        info.dns_names
            .iter()
            .any(|n| n == crate::legacy::SERVER_NAME)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    use super::super::tests::{ca, portal_with_dns};

    fn legacy_portal(
        ca: &super::super::tests::Ca,
        name: &str,
        legacy: &str,
    ) -> Result<Credentials, Box<dyn std::error::Error>> {
        portal_with_dns(ca, name, &[legacy])
    }

    fn handshake(client: ClientConfig, server: ServerConfig) -> Result<CertInfo, String> {
        let (c, s) = super::super::tests::drive(client, server, "link.netport.invalid")?;
        // Legacy portals speak no ALPN.
        if c.alpn_protocol().is_some() {
            return Err("ALPN agreed on a legacy link".into());
        }
        super::super::peer_info(s.peer_certificates()).map_err(|e| e.to_string())
    }

    const CAM: &str = "0A0B0C0D|00000001|11223344|00000002";
    const NAS: &str = "01020304|00000001|11223344|00000002";

    #[test]
    fn the_pipe_name_is_not_a_dns_name_for_rustls() {
        // Why the custom verifier exists at all.
        assert!(ServerName::try_from(CAM).is_err());
    }

    #[test]
    fn legacy_link_accepts_exactly_the_announced_name() -> TestResult {
        let ca = ca("Netport CA")?;
        let cam = legacy_portal(&ca, "cam", CAM)?;
        let nas = legacy_portal(&ca, "nas", NAS)?;
        assert_eq!(
            cam.legacy_name().map(|n| n.to_string()).as_deref(),
            Some(CAM)
        );
        let want = LegacyName::parse(NAS).ok_or("name")?;
        let seen = handshake(cam.legacy_link_client(want)?, nas.legacy_control_server()?)?;
        // The serving side then checks the client's name the same way.
        assert!(has_legacy_name(
            &seen,
            &LegacyName::parse(CAM).ok_or("name")?
        ));
        assert!(!has_legacy_name(&seen, &want));

        let other = LegacyName::parse("01020304|00000009|11223344|00000002").ok_or("name")?;
        let err = handshake(cam.legacy_link_client(other)?, nas.legacy_control_server()?)
            .err()
            .ok_or("a wrong IDV was accepted")?;
        assert!(err.contains("expected 01020304|00000009"), "{err}");
        Ok(())
    }

    #[test]
    fn legacy_link_refuses_another_ca_both_ways() -> TestResult {
        let ours = ca("Netport CA")?;
        let theirs = ca("Other CA")?;
        let cam = legacy_portal(&ours, "cam", CAM)?;
        let fake_nas = legacy_portal(&theirs, "nas", NAS)?;
        let nas_name = LegacyName::parse(NAS).ok_or("name")?;
        assert!(
            handshake(
                cam.legacy_link_client(nas_name)?,
                fake_nas.legacy_control_server()?
            )
            .is_err()
        );
        let real_nas = legacy_portal(&ours, "nas", NAS)?;
        let cam_name = LegacyName::parse(CAM).ok_or("name")?;
        assert!(
            handshake(
                fake_nas.legacy_link_client(cam_name)?,
                real_nas.legacy_control_server()?
            )
            .is_err()
        );
        Ok(())
    }

    #[test]
    fn legacy_control_server_accepts_a_pipe_named_client() -> TestResult {
        let ca = ca("Netport CA")?;
        let cam = legacy_portal(&ca, "cam", CAM)?;
        let server = legacy_portal(&ca, "netportd", "server")?;
        assert!(names_legacy_server(server.info()));
        assert!(!names_legacy_server(cam.info()));
        // A legacy portal verifies `server` the usual way; here: its name is a DNS name.
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            cam.roots.clone(),
            provider(),
        )
        .build()?;
        let cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)?
            .with_webpki_verifier(verifier)
            .with_client_auth_cert(cam.chain.clone(), cam.key.clone_key())?;
        let (_, s) = super::super::tests::drive(cfg, server.legacy_control_server()?, "server")?;
        let seen = super::super::peer_info(s.peer_certificates())?;
        assert_eq!(
            legacy_names(&seen)
                .map(|n| n.to_string())
                .collect::<Vec<_>>(),
            [CAM]
        );
        Ok(())
    }
}
