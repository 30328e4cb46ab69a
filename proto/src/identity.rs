//! Who a certificate says its holder is.
//!
//! Every Netport certificate names exactly one identity in a SAN URI,
//! `netport://<role>/<name>`, with the role one of `portal`, `relay`, `server` and the name
//! following the policy's name rule (`^[a-z0-9][a-z0-9-]{0,62}$`). [`inspect`] reads that
//! identity, the SHA-256 of the SubjectPublicKeyInfo (the value operators write as
//! `spki_sha256` in the policy, to pin or revoke a key) and the validity period out of a DER
//! certificate.
//!
//! What this module does not do: it does not verify signatures or chains (rustls does that
//! during the handshake, against the Netport CA), it reads no files and it has no clock —
//! callers pass `now` to [`CertInfo::is_valid_at`].

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The URI scheme of Netport identities.
pub const SCHEME: &str = "netport";

/// The longest valid name, in bytes (the policy's name rule allows 1 + 62 characters).
pub const MAX_NAME_LEN: usize = 63;

/// What kind of party a certificate identifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// An end device's agent: connects to the server, listens for local clients, serves targets.
    Portal,
    /// A relay daemon: forwards end-to-end encrypted links between portals.
    Relay,
    /// The server (`netportd`): control plane, policy, relay allocation.
    Server,
}

impl Role {
    /// Every role, in URI order.
    pub const ALL: [Role; 3] = [Role::Portal, Role::Relay, Role::Server];

    /// The role as it appears in the URI path: `portal`, `relay` or `server`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Portal => "portal",
            Role::Relay => "relay",
            Role::Server => "server",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| IdentityError::UnknownRole(s.to_owned()))
    }
}

/// A role and a name: `netport://portal/alice-laptop`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identity {
    /// What the holder is.
    pub role: Role,
    /// Its name in the policy; satisfies [`is_valid_name`].
    pub name: String,
}

impl Identity {
    /// An identity, after checking the name against the policy's name rule.
    pub fn new(role: Role, name: impl Into<String>) -> Result<Self, IdentityError> {
        let name = name.into();
        if !is_valid_name(&name) {
            return Err(IdentityError::InvalidName(name));
        }
        Ok(Identity { role, name })
    }

    /// The SAN URI that carries this identity: `netport://<role>/<name>`.
    pub fn uri(&self) -> String {
        format!("{SCHEME}://{}/{}", self.role, self.name)
    }

    /// Parses `netport://<role>/<name>`, strictly: lower-case scheme, no port, no trailing
    /// slash, query or fragment, and a name that passes [`is_valid_name`].
    pub fn from_uri(uri: &str) -> Result<Self, IdentityError> {
        let bad = |reason: &'static str| IdentityError::InvalidUri {
            uri: uri.to_owned(),
            reason,
        };
        let rest = uri
            .strip_prefix(SCHEME)
            .and_then(|r| r.strip_prefix("://"))
            .ok_or_else(|| bad("it does not start with netport://"))?;
        let (role, name) = rest
            .split_once('/')
            .ok_or_else(|| bad("it is not of the form netport://<role>/<name>"))?;
        let role = Role::from_str(role)
            .map_err(|_| bad("the role is not one of portal, relay, server"))?;
        if !is_valid_name(name) {
            return Err(bad(
                "the name does not match ^[a-z0-9][a-z0-9-]{0,62}$ (lower-case letters, digits, '-')",
            ));
        }
        Ok(Identity {
            role,
            name: name.to_owned(),
        })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}://{}/{}", self.role, self.name)
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Identity::from_uri(s)
    }
}

/// The policy's name rule: `^[a-z0-9][a-z0-9-]{0,62}$`.
pub fn is_valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    match b.split_first() {
        Some((first, rest)) => {
            b.len() <= MAX_NAME_LEN && alnum(first) && rest.iter().all(|c| alnum(c) || *c == b'-')
        }
        None => false,
    }
}

/// Why a certificate or URI does not yield an identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The bytes are not a DER X.509 certificate.
    #[error("not a DER X.509 certificate: {0}")]
    NotACertificate(String),
    /// A certificate followed by more bytes: refused rather than guessed at.
    #[error("{0} bytes of trailing data after the certificate")]
    TrailingData(usize),
    /// The subjectAltName extension is malformed or present twice.
    #[error("the certificate's subjectAltName extension is invalid: {0}")]
    InvalidSan(String),
    /// A URI that is not a valid Netport identity.
    #[error("{uri:?} is not a Netport identity: {reason}")]
    InvalidUri {
        /// The URI as found.
        uri: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A role other than portal, relay, server.
    #[error("unknown role {0:?}: expected portal, relay or server")]
    UnknownRole(String),
    /// A name that breaks the policy's name rule.
    #[error(
        "invalid name {0:?}: names match ^[a-z0-9][a-z0-9-]{{0,62}}$ (lower-case letters, digits, '-')"
    )]
    InvalidName(String),
    /// The certificate names no Netport identity.
    #[error(
        "the certificate has no netport:// URI in its subjectAltName, so it identifies no portal, relay or server"
    )]
    NoIdentity,
    /// The certificate names more than one identity: ambiguous, so refused.
    #[error("the certificate has {} netport:// URIs in its subjectAltName ({}); exactly one is allowed", .0.len(), .0.join(", "))]
    MultipleIdentities(Vec<String>),
}

/// What Netport needs to know about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The identity from the one `netport://` SAN URI; `None` when there is none (a CA
    /// certificate, or one not issued for Netport). [`CertInfo::identity`] turns `None` into
    /// [`IdentityError::NoIdentity`].
    pub identity: Option<Identity>,
    /// SHA-256 of the DER SubjectPublicKeyInfo: the policy's `spki_sha256`.
    pub spki_sha256: [u8; 32],
    /// Start of validity, unix seconds.
    pub not_before: i64,
    /// End of validity (inclusive), unix seconds.
    pub not_after: i64,
    /// The subject distinguished name, RFC 4514 style.
    pub subject: String,
    /// The issuer distinguished name, RFC 4514 style.
    pub issuer: String,
    /// DNS names in the subjectAltName.
    pub dns_names: Vec<String>,
    /// IP addresses in the subjectAltName.
    pub ip_addrs: Vec<IpAddr>,
    /// Basic constraints say CA.
    pub is_ca: bool,
}

impl CertInfo {
    /// Whether `now_unix` (seconds) lies within `[not_before, not_after]`, both inclusive as in
    /// RFC 5280.
    pub fn is_valid_at(&self, now_unix: i64) -> bool {
        self.not_before <= now_unix && now_unix <= self.not_after
    }

    /// The identity, or [`IdentityError::NoIdentity`]: what a daemon calls on a peer's
    /// end-entity certificate.
    pub fn identity(&self) -> Result<&Identity, IdentityError> {
        self.identity.as_ref().ok_or(IdentityError::NoIdentity)
    }

    /// [`CertInfo::spki_sha256`] as lower-case hex, as written in the policy.
    pub fn spki_sha256_hex(&self) -> String {
        spki_sha256_hex(&self.spki_sha256)
    }
}

/// Reads a DER certificate. Never panics, whatever the input.
///
/// Fails when the bytes are not exactly one certificate, when the subjectAltName is invalid,
/// or when the certificate carries more than one `netport:` URI, or one that is not a valid
/// identity. A certificate without any `netport:` URI is not an error here (CA certificates
/// have none): its [`CertInfo::identity`] is `None`.
pub fn inspect(der: &[u8]) -> Result<CertInfo, IdentityError> {
    let (rest, cert) = X509Certificate::from_der(der)
        .map_err(|e| IdentityError::NotACertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(IdentityError::TrailingData(rest.len()));
    }

    let mut uris = Vec::new();
    let mut dns_names = Vec::new();
    let mut ip_addrs = Vec::new();
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::InvalidSan(e.to_string()))?;
    for name in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
        match name {
            // Any URI in the netport scheme counts, whatever its case, so a second,
            // oddly-spelled identity cannot hide next to the first.
            GeneralName::URI(uri) if is_netport_scheme(uri) => uris.push((*uri).to_owned()),
            GeneralName::DNSName(dns) => dns_names.push((*dns).to_owned()),
            GeneralName::IPAddress(bytes) => match ip_from_san(bytes) {
                Some(ip) => ip_addrs.push(ip),
                None => {
                    return Err(IdentityError::InvalidSan(format!(
                        "an IP address entry has {} bytes; expected 4 or 16",
                        bytes.len()
                    )));
                }
            },
            _ => {}
        }
    }
    let identity = match uris.as_slice() {
        [] => None,
        [uri] => Some(Identity::from_uri(uri)?),
        _ => return Err(IdentityError::MultipleIdentities(uris)),
    };

    Ok(CertInfo {
        identity,
        spki_sha256: spki_sha256(cert.public_key().raw),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        dns_names,
        ip_addrs,
        is_ca: cert.is_ca(),
    })
}

/// SHA-256 of a DER SubjectPublicKeyInfo.
pub fn spki_sha256(spki_der: &[u8]) -> [u8; 32] {
    Sha256::digest(spki_der).into()
}

/// Lower-case hex, the form the policy's `spki_sha256` uses.
pub fn spki_sha256_hex(spki_sha256: &[u8; 32]) -> String {
    hex::encode(spki_sha256)
}

/// Parses a policy-style `spki_sha256` (64 hex digits, either case).
pub fn parse_spki_sha256_hex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

fn is_netport_scheme(uri: &str) -> bool {
    uri.get(..SCHEME.len() + 1)
        .is_some_and(|p| p.eq_ignore_ascii_case("netport:"))
}

fn ip_from_san(bytes: &[u8]) -> Option<IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        Some(IpAddr::from(v4))
    } else if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        Some(IpAddr::from(v6))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };
    use time::{Duration, OffsetDateTime};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    struct TestCa {
        issuer: Issuer<'static, KeyPair>,
        der: Vec<u8>,
    }

    fn test_ca() -> Result<TestCa, rcgen::Error> {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "Test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(TestCa {
            der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A leaf with the given SANs, valid from `not_before` for `days`; returns (der, spki der).
    fn leaf(
        ca: &TestCa,
        sans: Vec<SanType>,
        not_before: OffsetDateTime,
        days: i64,
    ) -> Result<(Vec<u8>, Vec<u8>), rcgen::Error> {
        use rcgen::PublicKeyData;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "leaf");
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before;
        params.not_after = not_before + Duration::days(days);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca.issuer)?;
        Ok((cert.der().to_vec(), key.subject_public_key_info()))
    }

    fn uri(s: &str) -> Result<SanType, rcgen::Error> {
        Ok(SanType::URI(s.try_into()?))
    }

    /// A fixed instant, so the tests do not depend on the clock.
    fn t0() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_750_000_000).unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    #[test]
    fn uri_round_trips_for_every_role() -> TestResult {
        for role in Role::ALL {
            let id = Identity::new(role, "alice-laptop")?;
            let uri = id.uri();
            assert_eq!(uri, format!("netport://{role}/alice-laptop"));
            assert_eq!(id.to_string(), uri);
            assert_eq!(Identity::from_uri(&uri)?, id);
            assert_eq!(uri.parse::<Identity>()?, id);
        }
        Ok(())
    }

    #[test]
    fn malformed_uris_are_refused() {
        let long = format!("netport://portal/{}", "a".repeat(64));
        for bad in [
            "",
            "netport://",
            "netport://portal",
            "netport://portal/",
            "netport://portal/Alice",
            "netport://portal/-alice",
            "netport://portal/alice/",
            "netport://portal/alice?x=1",
            "netport://portal/alice#f",
            "netport://portal/al_ice",
            "netport://portal:443/alice",
            "netport://admin/alice",
            "NETPORT://portal/alice",
            "netport:/portal/alice",
            "spiffe://portal/alice",
            "https://portal/alice",
            long.as_str(),
        ] {
            assert!(Identity::from_uri(bad).is_err(), "{bad:?} was accepted");
        }
        let longest = format!("netport://relay/{}", "a".repeat(63));
        assert!(Identity::from_uri(&longest).is_ok());
    }

    #[test]
    fn name_rule_matches_the_policy() {
        for ok in ["a", "0", "a-b", "relay-eu-1", "9-", &"x".repeat(63)] {
            assert!(is_valid_name(ok), "{ok:?}");
        }
        for bad in ["", "-a", "A", "a_b", "a.b", "é", "a b", &"x".repeat(64)] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
        assert!(matches!(
            Identity::new(Role::Portal, "Bad"),
            Err(IdentityError::InvalidName(_))
        ));
    }

    #[test]
    fn inspect_reads_identity_key_and_validity() -> TestResult {
        use rcgen::PublicKeyData;
        let ca = test_ca()?;
        let ip: IpAddr = "192.0.2.7".parse()?;
        let ip6: IpAddr = "2001:db8::1".parse()?;
        let (der, spki) = leaf(
            &ca,
            vec![
                uri("netport://server/hq")?,
                uri("https://example.net/other")?,
                SanType::DnsName("netport.example.net".try_into()?),
                SanType::IpAddress(ip),
                SanType::IpAddress(ip6),
            ],
            t0(),
            30,
        )?;
        let info = inspect(&der)?;
        assert_eq!(info.identity, Some(Identity::new(Role::Server, "hq")?));
        assert_eq!(info.identity()?.name, "hq");
        assert_eq!(info.spki_sha256, spki_sha256(&spki));
        assert_eq!(info.spki_sha256, <[u8; 32]>::from(Sha256::digest(&spki)));
        assert_eq!(
            parse_spki_sha256_hex(&info.spki_sha256_hex()),
            Some(info.spki_sha256)
        );
        assert_eq!(info.not_before, t0().unix_timestamp());
        assert_eq!(info.not_after, (t0() + Duration::days(30)).unix_timestamp());
        assert_eq!(info.dns_names, ["netport.example.net"]);
        assert_eq!(info.ip_addrs, [ip, ip6]);
        assert_eq!(info.subject, "CN=leaf");
        assert_eq!(info.issuer, "CN=Test CA");
        assert!(!info.is_ca);

        assert!(!info.is_valid_at(info.not_before - 1));
        assert!(info.is_valid_at(info.not_before));
        assert!(info.is_valid_at(info.not_after));
        assert!(!info.is_valid_at(info.not_after + 1));

        // The CA certificate: no identity, but readable.
        let ca_info = inspect(&ca.der)?;
        assert!(ca_info.is_ca);
        assert_eq!(ca_info.identity, None);
        assert_eq!(ca_info.identity(), Err(IdentityError::NoIdentity));
        assert_eq!(
            ca_info.spki_sha256,
            spki_sha256(&ca.issuer.key().subject_public_key_info())
        );
        Ok(())
    }

    #[test]
    fn two_identities_or_none_are_reported() -> TestResult {
        let ca = test_ca()?;
        let (two, _) = leaf(
            &ca,
            vec![uri("netport://portal/a")?, uri("netport://portal/b")?],
            t0(),
            1,
        )?;
        match inspect(&two) {
            Err(IdentityError::MultipleIdentities(uris)) => {
                assert_eq!(uris, ["netport://portal/a", "netport://portal/b"]);
            }
            other => panic!("expected MultipleIdentities, got {other:?}"),
        }
        // A second identity in another spelling of the scheme still counts.
        let (sneaky, _) = leaf(
            &ca,
            vec![uri("netport://portal/a")?, uri("NetPort://server/hq")?],
            t0(),
            1,
        )?;
        assert!(matches!(
            inspect(&sneaky),
            Err(IdentityError::MultipleIdentities(_))
        ));

        let (none, _) = leaf(&ca, vec![uri("https://example.net/")?], t0(), 1)?;
        let info = inspect(&none)?;
        assert_eq!(info.identity, None);
        let err = info.identity().err();
        assert_eq!(err, Some(IdentityError::NoIdentity));
        assert!(
            err.map(|e| e.to_string())
                .unwrap_or_default()
                .contains("no netport:// URI")
        );

        let (bad, _) = leaf(&ca, vec![uri("netport://portal/Not_Valid")?], t0(), 1)?;
        assert!(matches!(
            inspect(&bad),
            Err(IdentityError::InvalidUri { .. })
        ));
        Ok(())
    }

    #[test]
    fn trailing_bytes_are_refused() -> TestResult {
        let ca = test_ca()?;
        let mut der = ca.der.clone();
        der.push(0);
        assert_eq!(inspect(&der), Err(IdentityError::TrailingData(1)));
        Ok(())
    }

    #[test]
    fn inspect_never_panics_on_truncated_or_random_input() -> TestResult {
        let ca = test_ca()?;
        let (der, _) = leaf(&ca, vec![uri("netport://portal/a")?], t0(), 1)?;
        for cut in 0..der.len() {
            assert!(
                inspect(&der[..cut]).is_err(),
                "prefix of {cut} bytes parsed"
            );
        }
        // Deterministic xorshift, so a failure reproduces.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..2000 {
            let len = (next() % 600) as usize;
            let random: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = inspect(&random);
            // Random bytes behind a plausible SEQUENCE header reach deeper into the parser.
            let mut framed = vec![0x30, 0x82, (len >> 8) as u8, len as u8];
            framed.extend_from_slice(&random);
            let _ = inspect(&framed);
            // And single-byte corruptions of a real certificate reach deeper still.
            let mut flipped = der.clone();
            let at = (next() as usize) % flipped.len();
            flipped[at] ^= (next() as u8) | 1;
            let _ = inspect(&flipped);
        }
        Ok(())
    }
}
