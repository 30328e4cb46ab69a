//! The Netport PKI: one CA, and the certificates it issues to portals, relays and the server.
//!
//! Every leaf certificate carries exactly one identity, the SAN URI `netport://<role>/<name>`
//! (see [`netport_proto::identity`]); the daemons read it after rustls has verified the chain
//! against the CA. Generation ([`Ca::generate`], [`Ca::issue`]) is kept apart from the files
//! ([`write_ca`], [`write_issued`], [`Ca::load`]) so tests can make whatever certificates they
//! need — expired, not yet valid, from a second CA — without touching the disk.
//!
//! Keys are ECDSA P-256. Key files are created with mode 0600 from the first byte and replace
//! older files by rename, so a key is never readable by others, not even briefly.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use netport_proto::identity::{self, CertInfo, Identity, Role};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, DnsName};
use time::{Duration, OffsetDateTime};

/// The CA certificate's file name in a CA directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// The CA key's file name in a CA directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// The CA certificate's subject common name.
pub const CA_COMMON_NAME: &str = "Netport CA";
/// Default CA lifetime: ten years.
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// Default leaf lifetime: the CA/Browser Forum's 397 days, so the habit carries over.
pub const DEFAULT_LEAF_DAYS: u32 = 397;
/// How far new certificates are back-dated, so that a peer whose clock runs a little behind
/// still accepts a certificate issued a moment ago.
pub const BACKDATE: Duration = Duration::hours(1);

/// Why the PKI could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file or directory could not be read or written.
    #[error("failed to {action} {}", path.display())]
    Io {
        /// What was attempted: "read", "write", "create directory", ...
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A file that would be overwritten exists and overwriting was not asked for.
    #[error("{} already exists", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// The CA certificate file holds no usable certificate.
    #[error("{} does not hold a PEM certificate: {reason}", path.display())]
    BadCertificate {
        /// The file, or `<memory>`.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The CA key file holds no usable private key.
    #[error("{} does not hold a PEM private key (PKCS#8, ECDSA or Ed25519)", path.display())]
    BadKey {
        /// The file, or `<memory>`.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// The CA certificate's basic constraints do not make it a CA.
    #[error("{} is not a CA certificate (its basic constraints say CA:FALSE or are missing)", path.display())]
    NotACa {
        /// The certificate file.
        path: PathBuf,
    },
    /// The CA key is not the key of the CA certificate.
    #[error("the key in {} does not belong to the certificate in {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// A name that breaks the policy's name rule.
    #[error(
        "invalid name {0:?}: names match ^[a-z0-9][a-z0-9-]{{0,62}}$ (lower-case letters, digits, '-'), as in the policy"
    )]
    InvalidName(String),
    /// `--dns`/`--ip` asked for a certificate that is not a server's.
    #[error(
        "DNS names and IP addresses go only into server certificates; a {0} is identified by its netport:// URI alone"
    )]
    HostNamesNotAllowed(Role),
    /// A legacy name on a certificate that is not a portal's.
    #[error("a legacy ID|IDV|USER|USERV name goes only into portal certificates, not a {0}'s")]
    LegacyNotAllowed(Role),
    /// A DNS name that is not one.
    #[error("invalid DNS name {0:?}: expected a host name such as netport.example.net")]
    InvalidDnsName(String),
    /// A validity period that ends before it starts.
    #[error(
        "the validity period is empty: not_after {not_after} is not after not_before {not_before}"
    )]
    EmptyValidity {
        /// Requested start.
        not_before: OffsetDateTime,
        /// Requested end.
        not_after: OffsetDateTime,
    },
    /// rcgen refused to build or sign the certificate.
    #[error("certificate generation failed")]
    Generate(#[from] rcgen::Error),
    /// A freshly made certificate did not read back (a bug, reported rather than hidden).
    #[error("the new certificate does not read back as a Netport certificate")]
    Inspect(#[from] identity::IdentityError),
}

/// The Netport CA: its certificate and its signing key.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: Vec<u8>,
    info: CertInfo,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key stays out of logs.
        f.debug_struct("Ca")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// A new CA valid from now (back-dated by [`BACKDATE`]) for `days`.
    pub fn generate(days: u32) -> Result<Ca, PkiError> {
        let now = OffsetDateTime::now_utc();
        Ca::generate_valid(now - BACKDATE, now + Duration::days(days.into()))
    }

    /// A new CA valid over exactly `[not_before, not_after]`: tests use it for expired CAs.
    pub fn generate_valid(
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Ca, PkiError> {
        check_validity(not_before, not_after)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, CA_COMMON_NAME);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let cert_der = cert.der().to_vec();
        let info = identity::inspect(&cert_der)?;
        Ok(Ca {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
            cert_der,
            info,
        })
    }

    /// A CA from its PEM certificate and PEM (PKCS#8) key. Errors name `<memory>` as the file;
    /// [`Ca::load`] names the real files.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let memory = Path::new("<memory>");
        Ca::from_pem_named(cert_pem, key_pem, memory, memory)
    }

    /// Loads `ca.crt` and `ca.key` from `dir`, checking that the key belongs to the
    /// certificate and that the certificate is a CA.
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = read_to_string(&cert_path)?;
        let key_pem = read_to_string(&key_path)?;
        Ca::from_pem_named(&cert_pem, &key_pem, &cert_path, &key_path)
    }

    fn from_pem_named(
        cert_pem: &str,
        key_pem: &str,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<Ca, PkiError> {
        let cert_der =
            first_certificate(cert_pem.as_bytes()).map_err(|reason| PkiError::BadCertificate {
                path: cert_path.to_owned(),
                reason,
            })?;
        let info = identity::inspect(&cert_der).map_err(|e| PkiError::BadCertificate {
            path: cert_path.to_owned(),
            reason: e.to_string(),
        })?;
        if !info.is_ca {
            return Err(PkiError::NotACa {
                path: cert_path.to_owned(),
            });
        }
        let key = KeyPair::from_pem(key_pem).map_err(|source| PkiError::BadKey {
            path: key_path.to_owned(),
            source,
        })?;
        if identity::spki_sha256(&key.subject_public_key_info()) != info.spki_sha256 {
            return Err(PkiError::KeyMismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            });
        }
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(cert_der.as_slice()), key)
            .map_err(|e| PkiError::BadCertificate {
                path: cert_path.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(Ca {
            issuer,
            cert_pem: pem_of(&cert_der),
            cert_der,
            info,
        })
    }

    /// The CA certificate, PEM: what every portal, relay and server trusts.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA's private key, PEM (PKCS#8). Secret.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// What the CA certificate says (validity, SPKI hash, subject).
    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// Issues a leaf certificate with a fresh ECDSA P-256 key.
    ///
    /// The leaf has CN = name, the SAN URI `netport://<role>/<name>`, the serverAuth and
    /// clientAuth EKUs (portals are TLS clients to the server and TLS servers on links), and
    /// CA:FALSE. DNS names and IP addresses are allowed for [`Role::Server`] only. The
    /// validity period is taken as given, so it may lie outside the CA's.
    pub fn issue(&self, req: &IssueRequest) -> Result<Issued, PkiError> {
        let identity = Identity::new(req.role, req.name.clone())
            .map_err(|_| PkiError::InvalidName(req.name.clone()))?;
        check_validity(req.not_before, req.not_after)?;
        if req.role != Role::Server && !(req.dns.is_empty() && req.ips.is_empty()) {
            return Err(PkiError::HostNamesNotAllowed(req.role));
        }

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, req.name.as_str());
        params.subject_alt_names = vec![SanType::URI(identity.uri().try_into()?)];
        for dns in &req.dns {
            if DnsName::try_from(dns.as_str()).is_err() || dns.parse::<IpAddr>().is_ok() {
                return Err(PkiError::InvalidDnsName(dns.clone()));
            }
            params
                .subject_alt_names
                .push(SanType::DnsName(dns.as_str().try_into()?));
        }
        params
            .subject_alt_names
            .extend(req.ips.iter().copied().map(SanType::IpAddress));
        if let Some(legacy) = &req.legacy {
            if req.role != Role::Portal {
                return Err(PkiError::LegacyNotAllowed(req.role));
            }
            // Not a valid DNS name (`|`), but what legacy portals check; rcgen takes any
            // IA5 string here.
            params
                .subject_alt_names
                .push(SanType::DnsName(legacy.to_string().as_str().try_into()?));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = req.not_before;
        params.not_after = req.not_after;

        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let cert_der = cert.der().to_vec();
        let info = identity::inspect(&cert_der)?;
        let cert_pem = cert.pem();
        let chain_pem = format!("{cert_pem}{}", self.cert_pem);
        Ok(Issued {
            identity,
            spki_sha256: info.spki_sha256,
            cert_pem,
            chain_pem,
            key_pem: key.serialize_pem(),
            cert_der,
            info,
        })
    }
}

/// What to issue: see [`Ca::issue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueRequest {
    /// Portal, relay or server.
    pub role: Role,
    /// The name, as in the policy.
    pub name: String,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// DNS names (server certificates only).
    pub dns: Vec<String>,
    /// IP addresses (server certificates only).
    pub ips: Vec<IpAddr>,
    /// A legacy (V0.1) portal's `ID|IDV|USER|USERV`, added as a DNS SAN (portals only).
    pub legacy: Option<netport_proto::legacy::LegacyName>,
}

impl IssueRequest {
    /// A request valid from now (back-dated by [`BACKDATE`]) for `days`, without DNS names
    /// or IPs.
    pub fn new(role: Role, name: impl Into<String>, days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        IssueRequest {
            role,
            name: name.into(),
            not_before: now - BACKDATE,
            not_after: now + Duration::days(days.into()),
            dns: Vec::new(),
            ips: Vec::new(),
            legacy: None,
        }
    }
}

/// An issued certificate and its key.
#[derive(Clone)]
pub struct Issued {
    /// The identity in the SAN URI.
    pub identity: Identity,
    /// The leaf certificate alone, PEM.
    pub cert_pem: String,
    /// The leaf then the CA certificate, PEM: what a daemon presents.
    pub chain_pem: String,
    /// The leaf's private key, PEM (PKCS#8). Secret.
    pub key_pem: String,
    /// SHA-256 of the leaf's SubjectPublicKeyInfo: the policy's `spki_sha256`.
    pub spki_sha256: [u8; 32],
    /// The leaf certificate, DER.
    pub cert_der: Vec<u8>,
    /// What the leaf says, as the daemons will read it.
    pub info: CertInfo,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("identity", &self.identity)
            .field("spki_sha256", &identity::spki_sha256_hex(&self.spki_sha256))
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Issued {
    /// The base name of its files: `<role>-<name>`.
    pub fn file_stem(&self) -> String {
        format!("{}-{}", self.identity.role, self.identity.name)
    }
}

/// Where [`write_ca`] put the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    /// `<dir>/ca.crt`.
    pub cert: PathBuf,
    /// `<dir>/ca.key`, mode 0600.
    pub key: PathBuf,
}

/// Where [`write_issued`] put a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedFiles {
    /// `<out>/<role>-<name>.crt`: the leaf, then the CA certificate.
    pub cert: PathBuf,
    /// `<out>/<role>-<name>.key`, mode 0600.
    pub key: PathBuf,
}

/// The CA's files in `dir`.
pub fn ca_files(dir: &Path) -> CaFiles {
    CaFiles {
        cert: dir.join(CA_CERT_FILE),
        key: dir.join(CA_KEY_FILE),
    }
}

/// An issued certificate's files in `out`.
pub fn issued_files(out: &Path, role: Role, name: &str) -> IssuedFiles {
    IssuedFiles {
        cert: out.join(format!("{role}-{name}.crt")),
        key: out.join(format!("{role}-{name}.key")),
    }
}

/// Writes `ca.crt` and `ca.key` (mode 0600) into `dir`, creating it with mode 0700 if
/// needed. Refuses with [`PkiError::Exists`] when either file exists, unless `overwrite`.
pub fn write_ca(dir: &Path, ca: &Ca, overwrite: bool) -> Result<CaFiles, PkiError> {
    let files = ca_files(dir);
    write_pair(
        dir,
        &files.cert,
        ca.cert_pem(),
        &files.key,
        &ca.key_pem(),
        overwrite,
    )?;
    Ok(files)
}

/// Writes `<role>-<name>.crt` (the chain) and `<role>-<name>.key` (mode 0600) into `out`,
/// creating it with mode 0700 if needed. Refuses with [`PkiError::Exists`] when either file
/// exists, unless `overwrite`.
pub fn write_issued(out: &Path, issued: &Issued, overwrite: bool) -> Result<IssuedFiles, PkiError> {
    let files = issued_files(out, issued.identity.role, &issued.identity.name);
    write_pair(
        out,
        &files.cert,
        &issued.chain_pem,
        &files.key,
        &issued.key_pem,
        overwrite,
    )?;
    Ok(files)
}

/// The first certificate of a PEM file, as DER. Files without any `-----BEGIN` line are
/// taken as DER.
pub fn first_certificate(bytes: &[u8]) -> Result<Vec<u8>, String> {
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Ok(bytes.to_vec());
    }
    match CertificateDer::from_pem_slice(bytes) {
        Ok(der) => Ok(der.to_vec()),
        Err(rustls_pki_types::pem::Error::NoItemsFound) => {
            Err("there is no -----BEGIN CERTIFICATE----- block (is it a key file?)".to_owned())
        }
        Err(e) => Err(format!("invalid PEM: {e}")),
    }
}

fn pem_of(der: &[u8]) -> String {
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    let b64 = base64_encode(der);
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from_be_bytes([0, b[0], b[1], b[2]]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn check_validity(not_before: OffsetDateTime, not_after: OffsetDateTime) -> Result<(), PkiError> {
    if not_after <= not_before {
        return Err(PkiError::EmptyValidity {
            not_before,
            not_after,
        });
    }
    Ok(())
}

fn read_to_string(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })
}

/// Writes a certificate (0644) and its key (0600), key first, each through a temporary file
/// renamed into place.
fn write_pair(
    dir: &Path,
    cert: &Path,
    cert_pem: &str,
    key: &Path,
    key_pem: &str,
    overwrite: bool,
) -> Result<(), PkiError> {
    create_private_dir(dir)?;
    if !overwrite {
        for path in [cert, key] {
            match fs::symlink_metadata(path) {
                Ok(_) => {
                    return Err(PkiError::Exists {
                        path: path.to_owned(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(PkiError::Io {
                        action: "check",
                        path: path.to_owned(),
                        source,
                    });
                }
            }
        }
    }
    write_file(key, key_pem.as_bytes(), 0o600)?;
    write_file(cert, cert_pem.as_bytes(), 0o644)
}

fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| PkiError::Io {
        action: "create directory",
        path: dir.to_owned(),
        source,
    })
}

/// Writes `path` atomically: a new temporary file created with `mode` (so the content is never
/// readable more widely, even for an instant), synced, then renamed over `path`.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let io_err = |action: &'static str, p: &Path| {
        let p = p.to_owned();
        move |source| PkiError::Io {
            action,
            path: p,
            source,
        }
    };
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    // A temporary file left by a crashed run of this same process id is stale.
    let _ = fs::remove_file(&tmp);
    let result = options
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(contents)?;
            f.sync_all()
        })
        .map_err(io_err("write", &tmp))
        .and_then(|()| fs::rename(&tmp, path).map_err(io_err("write", path)));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn at(unix: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(unix).unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    #[test]
    fn legacy_portal_certificate_carries_the_pipe_name_and_only_portals_get_one() -> TestResult {
        let ca = Ca::generate(30)?;
        let name = netport_proto::legacy::LegacyName::parse("0A0B0C0D|00000001|11223344|00000002")
            .ok_or("name")?;
        let issued = ca.issue(&IssueRequest {
            legacy: Some(name),
            ..IssueRequest::new(Role::Portal, "cam", 10)
        })?;
        assert_eq!(
            issued.info.dns_names,
            ["0A0B0C0D|00000001|11223344|00000002"]
        );
        assert_eq!(issued.identity.uri(), "netport://portal/cam");
        assert!(matches!(
            ca.issue(&IssueRequest {
                legacy: Some(name),
                ..IssueRequest::new(Role::Relay, "r", 10)
            }),
            Err(PkiError::LegacyNotAllowed(Role::Relay))
        ));
        Ok(())
    }

    #[test]
    fn issued_certificate_reads_back_with_its_identity_key_and_expiry() -> TestResult {
        let ca = Ca::generate(30)?;
        assert!(ca.info().is_ca);
        assert_eq!(ca.info().subject, "CN=Netport CA");
        assert_eq!(ca.info().identity, None);

        let ip: IpAddr = "127.0.0.1".parse()?;
        let req = IssueRequest {
            dns: vec!["netport.example.net".into()],
            ips: vec![ip],
            ..IssueRequest::new(Role::Server, "hq", 10)
        };
        let issued = ca.issue(&req)?;
        let info = identity::inspect(&issued.cert_der)?;
        assert_eq!(info.identity()?, &Identity::new(Role::Server, "hq")?);
        assert_eq!(issued.identity.uri(), "netport://server/hq");
        assert_eq!(info.spki_sha256, issued.spki_sha256);
        let key = KeyPair::from_pem(&issued.key_pem)?;
        assert_eq!(
            identity::spki_sha256(&key.subject_public_key_info()),
            issued.spki_sha256
        );
        assert_eq!(info.not_after, req.not_after.unix_timestamp());
        assert_eq!(info.not_before, req.not_before.unix_timestamp());
        assert_eq!(info.subject, "CN=hq");
        assert_eq!(info.issuer, "CN=Netport CA");
        assert_eq!(info.dns_names, ["netport.example.net"]);
        assert_eq!(info.ip_addrs, [ip]);
        assert!(!info.is_ca);
        assert!(info.is_valid_at(OffsetDateTime::now_utc().unix_timestamp()));

        // The chain is the leaf, then the CA.
        let chain: Vec<_> = CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
            .collect::<Result<_, _>>()?;
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[0].as_ref(), issued.cert_der.as_slice());
        assert_eq!(chain[1].as_ref(), ca.cert_der());
        assert_eq!(issued.file_stem(), "server-hq");
        Ok(())
    }

    #[test]
    fn odd_validity_periods_are_issued_as_asked() -> TestResult {
        let ca = Ca::generate(1)?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let expired = ca.issue(&IssueRequest {
            not_before: at(now - 10 * 86400),
            not_after: at(now - 86400),
            ..IssueRequest::new(Role::Portal, "old", 1)
        })?;
        assert!(!expired.info.is_valid_at(now));
        assert_eq!(expired.info.not_after, now - 86400);
        let future = ca.issue(&IssueRequest {
            not_before: at(now + 86400),
            not_after: at(now + 2 * 86400),
            ..IssueRequest::new(Role::Relay, "later", 1)
        })?;
        assert!(!future.info.is_valid_at(now));
        assert!(future.info.is_valid_at(now + 86400));

        let backwards = IssueRequest {
            not_before: at(now),
            not_after: at(now),
            ..IssueRequest::new(Role::Portal, "x", 1)
        };
        assert!(matches!(
            ca.issue(&backwards),
            Err(PkiError::EmptyValidity { .. })
        ));
        let expired_ca = Ca::generate_valid(at(now - 100), at(now - 50))?;
        assert!(!expired_ca.info().is_valid_at(now));
        Ok(())
    }

    #[test]
    fn bad_requests_are_refused() -> TestResult {
        let ca = Ca::generate(1)?;
        for name in ["", "Alice", "-a", "a_b", "a/b", &"a".repeat(64)] {
            assert!(
                matches!(
                    ca.issue(&IssueRequest::new(Role::Portal, name, 1)),
                    Err(PkiError::InvalidName(_))
                ),
                "{name:?}"
            );
        }
        for role in [Role::Portal, Role::Relay] {
            let with_dns = IssueRequest {
                dns: vec!["a.example".into()],
                ..IssueRequest::new(role, "a", 1)
            };
            assert!(matches!(
                ca.issue(&with_dns),
                Err(PkiError::HostNamesNotAllowed(r)) if r == role
            ));
            let with_ip = IssueRequest {
                ips: vec!["::1".parse()?],
                ..IssueRequest::new(role, "a", 1)
            };
            assert!(ca.issue(&with_ip).is_err());
        }
        for dns in [
            "",
            "a b",
            "exa mple.net",
            "10.0.0.1",
            "bad..name",
            "é.example",
        ] {
            let req = IssueRequest {
                dns: vec![dns.into()],
                ..IssueRequest::new(Role::Server, "hq", 1)
            };
            assert!(
                matches!(ca.issue(&req), Err(PkiError::InvalidDnsName(_))),
                "{dns:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn a_second_ca_is_a_different_issuer() -> TestResult {
        let a = Ca::generate(1)?;
        let b = Ca::generate(1)?;
        assert_ne!(a.info().spki_sha256, b.info().spki_sha256);
        let leaf = b.issue(&IssueRequest::new(Role::Portal, "mallory", 1))?;
        assert!(leaf.chain_pem.ends_with(b.cert_pem()));
        assert!(!leaf.chain_pem.contains(a.cert_pem()));
        Ok(())
    }

    #[test]
    fn ca_round_trips_through_files() -> TestResult {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("ca");
        let ca = Ca::generate(5)?;
        let files = write_ca(&dir, &ca, false)?;
        assert_eq!(files, ca_files(&dir));
        let loaded = Ca::load(&dir)?;
        assert_eq!(loaded.cert_der(), ca.cert_der());
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        assert_eq!(loaded.info(), ca.info());

        // A leaf from the loaded CA names the CA as issuer and chains to it.
        let leaf = loaded.issue(&IssueRequest::new(Role::Relay, "relay-eu-1", 1))?;
        assert_eq!(leaf.info.issuer, ca.info().subject);
        assert!(leaf.chain_pem.ends_with(ca.cert_pem()));

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| fs::metadata(p).map(|m| m.permissions().mode() & 0o777);
            assert_eq!(mode(&files.key)?, 0o600);
            assert_eq!(mode(&dir)?, 0o700);
        }

        assert!(matches!(
            write_ca(&dir, &Ca::generate(5)?, false),
            Err(PkiError::Exists { .. })
        ));
        // Still the first CA.
        assert_eq!(Ca::load(&dir)?.cert_der(), ca.cert_der());
        let other = Ca::generate(5)?;
        write_ca(&dir, &other, true)?;
        assert_eq!(Ca::load(&dir)?.cert_der(), other.cert_der());

        let out = tmp.path().join("out");
        let files = write_issued(&out, &leaf, false)?;
        assert_eq!(files.cert, out.join("relay-relay-eu-1.crt"));
        assert_eq!(fs::read_to_string(&files.cert)?, leaf.chain_pem);
        assert_eq!(fs::read_to_string(&files.key)?, leaf.key_pem);
        assert!(write_issued(&out, &leaf, false).is_err());
        write_issued(&out, &leaf, true)?;
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(&out)?.count(), 2);
        Ok(())
    }

    #[test]
    fn load_names_the_broken_file() -> TestResult {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path();
        assert!(
            matches!(Ca::load(dir), Err(PkiError::Io { ref path, .. }) if path.ends_with("ca.crt"))
        );

        let ca = Ca::generate(1)?;
        let other = Ca::generate(1)?;
        fs::write(dir.join(CA_CERT_FILE), ca.cert_pem())?;
        fs::write(dir.join(CA_KEY_FILE), other.key_pem())?;
        assert!(matches!(Ca::load(dir), Err(PkiError::KeyMismatch { .. })));

        fs::write(dir.join(CA_KEY_FILE), "not a key")?;
        assert!(matches!(Ca::load(dir), Err(PkiError::BadKey { .. })));

        fs::write(dir.join(CA_CERT_FILE), ca.key_pem())?;
        assert!(matches!(
            Ca::load(dir),
            Err(PkiError::BadCertificate { .. })
        ));

        // A leaf is not a CA.
        let leaf = ca.issue(&IssueRequest::new(Role::Portal, "a", 1))?;
        fs::write(dir.join(CA_CERT_FILE), &leaf.cert_pem)?;
        fs::write(dir.join(CA_KEY_FILE), &leaf.key_pem)?;
        assert!(matches!(Ca::load(dir), Err(PkiError::NotACa { .. })));
        Ok(())
    }

    #[test]
    fn pem_encoding_matches_rcgen() -> TestResult {
        let ca = Ca::generate(1)?;
        assert_eq!(pem_of(ca.cert_der()), ca.cert_pem());
        for (input, want) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
        ] {
            assert_eq!(base64_encode(input), want);
        }
        Ok(())
    }
}
