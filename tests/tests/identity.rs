//! netportd refuses certificates of another CA, expired certificates, revoked keys and
//! portals it does not know; it accepts a known portal.

use std::time::Duration;

use anyhow::{Result, bail};
use netport_e2e::{Pki, System, control_hello, wait_log};
use netport_proto::control::Message;
use netport_proto::identity::Role;
use netportd::pki::{Ca, IssueRequest};
use time::OffsetDateTime;

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_expired_revoked_and_unknown_identities_are_refused() -> Result<()> {
    let pki = Pki::new()?;
    let revoked = pki.issue(Role::Portal, "lost-laptop")?;
    let good = pki.issue(Role::Portal, "alice")?;
    let stranger = pki.issue(Role::Portal, "stranger")?;
    let mut req = IssueRequest::new(Role::Portal, "alice", 1);
    req.not_before = OffsetDateTime::now_utc() - time::Duration::days(10);
    req.not_after = OffsetDateTime::now_utc() - time::Duration::days(1);
    let expired = pki.write(pki.ca.issue(&req)?)?;
    let other_ca = Ca::generate(1)?;
    let foreign = other_ca.issue(&IssueRequest::new(Role::Portal, "alice", 1))?;
    let policy = format!(
        "[[portal]]\nname = \"alice\"\n[[portal]]\nname = \"lost-laptop\"\n\
         [[revoked]]\nspki_sha256 = \"{}\"\nreason = \"lost\"\n",
        revoked.issued.info.spki_sha256_hex()
    );
    let (good_creds, revoked_creds, stranger_creds, expired_creds) = (
        pki.credentials(&good)?,
        pki.credentials(&revoked)?,
        pki.credentials(&stranger)?,
        pki.credentials(&expired)?,
    );
    let foreign_creds = netport_proto::tls::Credentials::from_pem(
        foreign.chain_pem.as_bytes(),
        foreign.key_pem.as_bytes(),
        pki.ca.cert_pem().as_bytes(),
    )?;
    let sys = System::start_in(pki, &policy, &[], 1, "127.0.0.1")?;
    wait_log(&sys, "netportd", "netportd serving", T).await?;
    let server = sys.server_addr;

    match control_hello(&good_creds, server).await? {
        Message::Welcome { identity, .. } => assert_eq!(identity, "netport://portal/alice"),
        other => bail!("alice should be welcome, got {other:?}"),
    }
    match control_hello(&revoked_creds, server).await? {
        Message::Refused { reason, .. } => assert_eq!(reason, "revoked"),
        other => bail!("a revoked key must be refused, got {other:?}"),
    }
    match control_hello(&stranger_creds, server).await? {
        Message::Refused { reason, .. } => assert_eq!(reason, "unknown-portal"),
        other => bail!("an unknown portal must be refused, got {other:?}"),
    }
    // Expired and foreign certificates fail the TLS handshake itself.
    assert!(
        control_hello(&expired_creds, server).await.is_err(),
        "expired certificate accepted"
    );
    assert!(
        control_hello(&foreign_creds, server).await.is_err(),
        "foreign CA accepted"
    );
    wait_log(&sys, "netportd", "reason=\"revoked\"", T).await?;
    wait_log(&sys, "netportd", "TLS handshake failed", T).await?;
    Ok(())
}
