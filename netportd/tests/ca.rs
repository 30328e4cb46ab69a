//! Runs the built `netportd ca` commands in a temporary directory, then checks with rustls
//! (ring provider) that the certificates they write work for TLS 1.3 mutual authentication.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use netport_proto::identity::{self, Identity, Role};
use netportd::pki::{Ca, IssueRequest};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{
    CertificateError, ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection,
};
use serde_json::Value;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn netportd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_netportd"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("netportd runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// Runs netportd and insists on exit 0.
fn ok(args: &[&str]) -> String {
    let out = netportd(args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "netportd {args:?}\nstdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

/// Runs netportd and insists on exit 2; returns stderr.
fn usage_error(args: &[&str]) -> String {
    let out = netportd(args);
    assert_eq!(
        out.status.code(),
        Some(2),
        "netportd {args:?}\nstdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    stderr(&out)
}

fn show_json(file: &Path) -> Value {
    let text = ok(&["ca", "show", path(file), "--format", "json"]);
    serde_json::from_str(&text).expect("ca show --format json prints JSON")
}

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

fn now() -> i64 {
    UnixTime::now().as_secs() as i64
}

/// A CA directory made by `netportd ca init`, inside a tempdir.
struct Pki {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Pki {
    fn init() -> Pki {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("ca");
        ok(&["ca", "init", "--dir", path(&dir)]);
        Pki { _tmp: tmp, dir }
    }

    fn issue(&self, role: &str, name: &str, extra: &[&str]) -> (PathBuf, PathBuf) {
        let mut args = vec!["ca", "issue", "--dir", path(&self.dir), role, name];
        args.extend_from_slice(extra);
        ok(&args);
        (
            self.dir.join(format!("{role}-{name}.crt")),
            self.dir.join(format!("{role}-{name}.key")),
        )
    }
}

#[test]
fn init_creates_a_private_ca() {
    let pki = Pki::init();
    let cert = pki.dir.join("ca.crt");
    let key = pki.dir.join("ca.key");
    assert!(
        fs::read_to_string(&cert)
            .expect("ca.crt")
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    assert!(
        fs::read_to_string(&key)
            .expect("ca.key")
            .starts_with("-----BEGIN PRIVATE KEY-----")
    );
    #[cfg(unix)]
    {
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&pki.dir), 0o700);
    }

    let info = show_json(&cert);
    assert_eq!(info["is_ca"], true);
    assert_eq!(info["subject"], "CN=Netport CA");
    assert_eq!(info["issuer"], "CN=Netport CA");
    assert_eq!(info["identity"], Value::Null);
    assert_eq!(info["status"], "valid");
    let days = info["expires_in_seconds"].as_i64().expect("seconds") as f64 / 86_400.0;
    assert!((days - 3650.0).abs() < 0.01, "{days}");
}

#[test]
fn init_refuses_to_overwrite_a_ca_without_force() {
    let pki = Pki::init();
    let cert = pki.dir.join("ca.crt");
    let before = fs::read(&cert).expect("ca.crt");
    let err = usage_error(&["ca", "init", "--dir", path(&pki.dir)]);
    assert!(err.contains("refusing to overwrite the CA"), "{err}");
    assert!(err.contains("--force"), "{err}");
    assert_eq!(fs::read(&cert).expect("ca.crt"), before);

    ok(&[
        "ca",
        "init",
        "--dir",
        path(&pki.dir),
        "--force",
        "--days",
        "10",
    ]);
    assert_ne!(fs::read(&cert).expect("ca.crt"), before);
    let days = show_json(&cert)["expires_in_seconds"]
        .as_i64()
        .expect("seconds")
        / 86_400;
    assert!((9..=10).contains(&days), "{days}");
    #[cfg(unix)]
    assert_eq!(mode(&pki.dir.join("ca.key")), 0o600);
}

#[test]
fn issue_writes_a_chain_and_a_private_key_for_every_role() {
    let pki = Pki::init();
    let ca_spki = show_json(&pki.dir.join("ca.crt"))["spki_sha256"].clone();
    for (role, name) in [
        ("portal", "alice-laptop"),
        ("relay", "relay-eu-1"),
        ("server", "hq"),
    ] {
        let out = ok(&["ca", "issue", "--dir", path(&pki.dir), role, name]);
        let uri = format!("netport://{role}/{name}");
        assert!(out.contains(&uri), "{out}");
        assert!(out.contains("expires in 397 days"), "{out}");

        let cert = pki.dir.join(format!("{role}-{name}.crt"));
        let key = pki.dir.join(format!("{role}-{name}.key"));
        #[cfg(unix)]
        assert_eq!(mode(&key), 0o600, "{}", key.display());
        assert!(
            fs::read_to_string(&key)
                .expect("key")
                .contains("PRIVATE KEY")
        );
        let chain = fs::read(&cert).expect("cert");
        let chain: Vec<_> = CertificateDer::pem_slice_iter(&chain)
            .collect::<Result<_, _>>()
            .expect("PEM chain");
        assert_eq!(chain.len(), 2, "leaf then CA");

        let info = show_json(&cert);
        assert_eq!(info["identity"], uri.as_str());
        assert_eq!(info["role"], role);
        assert_eq!(info["name"], name);
        assert_eq!(info["subject"], format!("CN={name}"));
        assert_eq!(info["issuer"], "CN=Netport CA");
        assert_eq!(info["is_ca"], false);
        assert_eq!(info["status"], "valid");
        assert_ne!(info["spki_sha256"], ca_spki);
        let spki = info["spki_sha256"].as_str().expect("hex");
        assert!(out.contains(spki), "issue prints the SPKI hash\n{out}");
        assert_eq!(spki.len(), 64);
        // The hash `show` prints is the one the daemons compute from the certificate.
        let parsed = identity::inspect(&chain[0]).expect("inspect");
        assert_eq!(parsed.spki_sha256_hex(), spki);
        let days = (info["not_after_unix"].as_i64().expect("unix") - now()) as f64 / 86_400.0;
        assert!((days - 397.0).abs() < 0.01, "{days}");
        assert!(info["not_after"].as_str().expect("date").ends_with('Z'));
    }
}

#[test]
fn server_certificates_carry_dns_names_and_ips() {
    let pki = Pki::init();
    let (cert, _) = pki.issue(
        "server",
        "hq",
        &[
            "--dns",
            "netport.example.net",
            "--dns",
            "hq.internal",
            "--ip",
            "127.0.0.1",
            "--ip",
            "::1",
            "--days",
            "30",
        ],
    );
    let info = show_json(&cert);
    assert_eq!(
        info["dns_names"],
        serde_json::json!(["netport.example.net", "hq.internal"])
    );
    assert_eq!(info["ip_addrs"], serde_json::json!(["127.0.0.1", "::1"]));
    let days = info["expires_in_seconds"].as_i64().expect("seconds") / 86_400;
    assert!((29..=30).contains(&days), "{days}");

    let text = ok(&["ca", "show", path(&cert)]);
    for line in [
        "identity     netport://server/hq",
        "role         server",
        "name         hq",
        "dns          netport.example.net, hq.internal",
        "ip           127.0.0.1, ::1",
        "ca           no",
        "issuer       CN=Netport CA",
        "status       valid, expires in 30 days",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    let spki = info["spki_sha256"].as_str().expect("hex");
    assert!(text.contains(&format!("spki_sha256  {spki}")), "{text}");
}

#[test]
fn issue_out_writes_elsewhere_and_refuses_to_overwrite() {
    let pki = Pki::init();
    let out_dir = pki.dir.with_file_name("portal-files");
    let args = [
        "ca",
        "issue",
        "--dir",
        path(&pki.dir),
        "portal",
        "bob-phone",
        "--out",
        path(&out_dir),
    ];
    ok(&args);
    let cert = out_dir.join("portal-bob-phone.crt");
    assert!(cert.exists());
    assert!(!pki.dir.join("portal-bob-phone.crt").exists());
    #[cfg(unix)]
    {
        assert_eq!(mode(&out_dir.join("portal-bob-phone.key")), 0o600);
        assert_eq!(mode(&out_dir), 0o700);
    }
    let before = fs::read(&cert).expect("cert");
    let err = usage_error(&args);
    assert!(
        err.contains("refusing to overwrite") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(fs::read(&cert).expect("cert"), before);
    let mut forced = args.to_vec();
    forced.push("--force");
    ok(&forced);
    assert_ne!(fs::read(&cert).expect("cert"), before);
}

#[test]
fn bad_names_exit_two() {
    let pki = Pki::init();
    let long = "a".repeat(64);
    for name in ["Alice", "-alice", "al_ice", "a.b", "", long.as_str()] {
        // `--` so that "-alice" reaches the name check instead of clap's flag parser.
        let err = usage_error(&["ca", "issue", "--dir", path(&pki.dir), "--", "portal", name]);
        assert!(err.contains("^[a-z0-9][a-z0-9-]{0,62}$"), "{name:?}: {err}");
    }
    let err = usage_error(&["ca", "issue", "--dir", path(&pki.dir), "admin", "x"]);
    assert!(err.contains("portal"), "{err}");
    // Nothing but the CA was written.
    assert_eq!(fs::read_dir(&pki.dir).expect("dir").count(), 2);
}

#[test]
fn host_names_are_only_for_servers() {
    let pki = Pki::init();
    for (role, flag, value) in [
        ("portal", "--dns", "a.example"),
        ("relay", "--dns", "a.example"),
        ("portal", "--ip", "10.0.0.1"),
    ] {
        let err = usage_error(&[
            "ca",
            "issue",
            "--dir",
            path(&pki.dir),
            role,
            "a",
            flag,
            value,
        ]);
        assert!(err.contains("only for server certificates"), "{err}");
    }
    let err = usage_error(&[
        "ca",
        "issue",
        "--dir",
        path(&pki.dir),
        "server",
        "hq",
        "--dns",
        "not a host",
    ]);
    assert!(err.contains("invalid DNS name"), "{err}");
    let err = usage_error(&[
        "ca",
        "issue",
        "--dir",
        path(&pki.dir),
        "server",
        "hq",
        "--ip",
        "300.1.1.1",
    ]);
    assert!(err.contains("300.1.1.1"), "{err}");
    assert_eq!(fs::read_dir(&pki.dir).expect("dir").count(), 2);
}

#[test]
fn missing_or_broken_files_exit_two_and_name_the_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let nowhere = tmp.path().join("nowhere");
    let err = usage_error(&["ca", "issue", "--dir", path(&nowhere), "relay", "r1"]);
    assert!(
        err.contains(&format!("{}", nowhere.join("ca.crt").display())),
        "{err}"
    );
    assert!(err.contains("netportd ca init --dir"), "{err}");

    let err = usage_error(&["ca", "show", path(&nowhere.join("x.crt"))]);
    assert!(err.contains("x.crt"), "{err}");

    let pki = Pki::init();
    let err = usage_error(&["ca", "show", path(&pki.dir.join("ca.key"))]);
    assert!(
        err.contains("ca.key") && err.contains("BEGIN CERTIFICATE"),
        "{err}"
    );

    // A CA key that is not the CA certificate's.
    let other = Pki::init();
    fs::copy(other.dir.join("ca.key"), pki.dir.join("ca.key")).expect("copy");
    let err = usage_error(&["ca", "issue", "--dir", path(&pki.dir), "relay", "r1"]);
    assert!(err.contains("does not belong to"), "{err}");
}

#[test]
fn show_reads_der_too() {
    let pki = Pki::init();
    let pem = fs::read(pki.dir.join("ca.crt")).expect("ca.crt");
    let der = CertificateDer::from_pem_slice(&pem).expect("PEM");
    let der_file = pki.dir.with_file_name("ca.der");
    fs::write(&der_file, der.as_ref()).expect("write");
    assert_eq!(show_json(&der_file)["is_ca"], true);
}

// --- TLS: the certificates work with rustls, TLS 1.3, mutual authentication. ---

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_crt: &Path) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_crt).expect("ca.crt") {
        roots.add(cert.expect("PEM")).expect("a valid trust anchor");
    }
    Arc::new(roots)
}

fn chain(crt: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(crt)
        .expect("certificate file")
        .collect::<Result<_, _>>()
        .expect("PEM chain")
}

fn key(file: &Path) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_file(file).expect("PEM key")
}

fn client_verifier(ca_crt: &Path) -> Arc<dyn ClientCertVerifier> {
    WebPkiClientVerifier::builder_with_provider(roots(ca_crt), provider())
        .build()
        .expect("client verifier")
}

fn server_verifier(ca_crt: &Path) -> Arc<WebPkiServerVerifier> {
    WebPkiServerVerifier::builder_with_provider(roots(ca_crt), provider())
        .build()
        .expect("server verifier")
}

/// Verifies `chain` as a client certificate (what netportd does with portals and relays).
fn verify_as_client(
    verifier: &dyn ClientCertVerifier,
    chain: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<(), rustls::Error> {
    verifier
        .verify_client_cert(&chain[0], &chain[1..], now)
        .map(|_| ())
}

/// Verifies `chain` as a server certificate signed by the CA, without a host name: what a
/// client portal does on a link before checking the announced netport:// identity.
fn verify_as_link_server(
    ca_crt: &Path,
    chain: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<(), rustls::Error> {
    let parsed = rustls::server::ParsedCertificate::try_from(&chain[0])?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots(ca_crt),
        &chain[1..],
        now,
        provider().signature_verification_algorithms.all,
    )
}

#[test]
fn issued_chains_verify_against_the_ca_for_every_role() {
    let pki = Pki::init();
    let ca_crt = pki.dir.join("ca.crt");
    let clients = client_verifier(&ca_crt);
    let now = UnixTime::now();
    for (role, name) in [
        ("portal", "alice-laptop"),
        ("relay", "relay-eu-1"),
        ("server", "hq"),
    ] {
        let (crt, _) = pki.issue(role, name, &[]);
        let chain = chain(&crt);
        verify_as_client(clients.as_ref(), &chain, now)
            .unwrap_or_else(|e| panic!("{role} as TLS client: {e}"));
        verify_as_link_server(&ca_crt, &chain, now)
            .unwrap_or_else(|e| panic!("{role} as TLS server: {e}"));
    }

    let (server, _) = pki.issue(
        "server",
        "hq2",
        &[
            "--dns",
            "netport.example.net",
            "--ip",
            "127.0.0.1",
            "--ip",
            "::1",
        ],
    );
    let chain = chain(&server);
    let servers = server_verifier(&ca_crt);
    for name in ["netport.example.net", "127.0.0.1", "::1"] {
        let name = ServerName::try_from(name).expect("server name");
        servers
            .verify_server_cert(&chain[0], &chain[1..], &name, &[], now)
            .unwrap_or_else(|e| panic!("server cert for {name:?}: {e}"));
    }
    let wrong = ServerName::try_from("other.example.net").expect("server name");
    assert!(matches!(
        servers.verify_server_cert(&chain[0], &chain[1..], &wrong, &[], now),
        Err(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
        ))
    ));
}

#[test]
fn certificates_of_another_ca_are_refused() {
    let ours = Pki::init();
    let theirs = Pki::init();
    let (crt, _) = theirs.issue("portal", "alice-laptop", &[]);
    let chain = chain(&crt);
    let ca_crt = ours.dir.join("ca.crt");
    let now = UnixTime::now();
    let err = verify_as_client(client_verifier(&ca_crt).as_ref(), &chain, now)
        .expect_err("a foreign portal certificate is refused");
    // Every Netport CA is "CN=Netport CA", so webpki finds a same-named anchor and reports
    // the signature; a CA with another name gives UnknownIssuer. Both are refusals.
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(
                CertificateError::BadSignature | CertificateError::UnknownIssuer
            )
        ),
        "{err:?}"
    );
    assert!(verify_as_link_server(&ca_crt, &chain, now).is_err());
}

#[test]
fn expired_and_future_certificates_are_refused() {
    let pki = Pki::init();
    let ca_crt = pki.dir.join("ca.crt");
    let ca = Ca::load(&pki.dir).expect("the CA that `ca init` wrote loads");
    let clients = client_verifier(&ca_crt);
    let at = |unix: i64| time::OffsetDateTime::from_unix_timestamp(unix).expect("time");
    let now = now();

    let expired = ca
        .issue(&IssueRequest {
            not_before: at(now - 10 * 86_400),
            not_after: at(now - 86_400),
            ..IssueRequest::new(Role::Portal, "old", 1)
        })
        .expect("issue");
    let future = ca
        .issue(&IssueRequest {
            not_before: at(now + 86_400),
            not_after: at(now + 2 * 86_400),
            ..IssueRequest::new(Role::Portal, "later", 1)
        })
        .expect("issue");
    let chain_of = |pem: &str| {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("PEM chain")
    };
    let unix_now = UnixTime::now();
    assert!(matches!(
        verify_as_client(clients.as_ref(), &chain_of(&expired.chain_pem), unix_now),
        Err(rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. }
        ))
    ));
    assert!(matches!(
        verify_as_client(clients.as_ref(), &chain_of(&future.chain_pem), unix_now),
        Err(rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }
        ))
    ));
    // The same certificate from the library is fine when valid.
    let fresh = ca
        .issue(&IssueRequest::new(Role::Portal, "fresh", 1))
        .expect("issue");
    verify_as_client(clients.as_ref(), &chain_of(&fresh.chain_pem), unix_now)
        .expect("a fresh library-issued certificate verifies");
}

fn tls13_pair(
    ca_crt: &Path,
    (server_crt, server_key): (&Path, &Path),
    (client_crt, client_key): (&Path, &Path),
    server_name: &str,
) -> (ClientConnection, ServerConnection) {
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_client_cert_verifier(client_verifier(ca_crt))
        .with_single_cert(chain(server_crt), key(server_key))
        .expect("server certificate and key match");
    server.alpn_protocols = vec![netport_proto::ALPN.to_vec()];
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots(ca_crt))
        .with_client_auth_cert(chain(client_crt), key(client_key))
        .expect("client certificate and key match");
    client.alpn_protocols = vec![netport_proto::ALPN.to_vec()];
    let name = ServerName::try_from(server_name.to_owned()).expect("server name");
    (
        ClientConnection::new(Arc::new(client), name).expect("client"),
        ServerConnection::new(Arc::new(server)).expect("server"),
    )
}

/// Pumps TLS records between the two ends in memory until both finish the handshake.
fn handshake(client: &mut ClientConnection, server: &mut ServerConnection) -> Result<(), String> {
    let mut buf = Vec::new();
    for _ in 0..10 {
        while client.wants_write() {
            buf.clear();
            client.write_tls(&mut buf).map_err(|e| e.to_string())?;
            server
                .read_tls(&mut buf.as_slice())
                .map_err(|e| e.to_string())?;
            server
                .process_new_packets()
                .map_err(|e| format!("server: {e}"))?;
        }
        while server.wants_write() {
            buf.clear();
            server.write_tls(&mut buf).map_err(|e| e.to_string())?;
            client
                .read_tls(&mut buf.as_slice())
                .map_err(|e| e.to_string())?;
            client
                .process_new_packets()
                .map_err(|e| format!("client: {e}"))?;
        }
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
    }
    Err("the handshake did not finish".to_owned())
}

#[test]
fn a_portal_and_the_server_complete_a_tls13_mutual_handshake() -> TestResult {
    let pki = Pki::init();
    let ca_crt = pki.dir.join("ca.crt");
    let (server_crt, server_key) = pki.issue("server", "hq", &["--dns", "netport.example.net"]);
    let (portal_crt, portal_key) = pki.issue("portal", "alice-laptop", &[]);
    let (mut client, mut server) = tls13_pair(
        &ca_crt,
        (&server_crt, &server_key),
        (&portal_crt, &portal_key),
        "netport.example.net",
    );
    handshake(&mut client, &mut server)?;
    assert_eq!(
        client.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(server.alpn_protocol(), Some(netport_proto::ALPN));

    // Each side reads the other's identity from the verified end-entity certificate.
    let portal = server.peer_certificates().ok_or("no client certificate")?;
    let portal = identity::inspect(&portal[0])?;
    assert_eq!(
        portal.identity()?,
        &Identity::new(Role::Portal, "alice-laptop")?
    );
    let hq = client.peer_certificates().ok_or("no server certificate")?;
    assert_eq!(
        identity::inspect(&hq[0])?.identity()?,
        &Identity::new(Role::Server, "hq")?
    );
    Ok(())
}

#[test]
fn a_portal_of_another_ca_fails_the_handshake() {
    let pki = Pki::init();
    let other = Pki::init();
    let ca_crt = pki.dir.join("ca.crt");
    let (server_crt, server_key) = pki.issue("server", "hq", &["--ip", "127.0.0.1"]);
    let (portal_crt, portal_key) = other.issue("portal", "mallory", &[]);
    let (mut client, mut server) = tls13_pair(
        &ca_crt,
        (&server_crt, &server_key),
        (&portal_crt, &portal_key),
        "127.0.0.1",
    );
    let err = handshake(&mut client, &mut server).expect_err("refused");
    assert!(
        err.starts_with("server:")
            && (err.contains("BadSignature") || err.contains("UnknownIssuer")),
        "{err}"
    );
}
