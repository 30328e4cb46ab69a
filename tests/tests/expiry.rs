//! Certificate expiry guard rails: daemons refuse to start with an expired certificate of
//! their own and warn when theirs expires soon; `netportd check` reports the certificates of
//! the policy directory and of a daemon configuration that expire soon or have expired.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use netport_e2e::{CertFiles, Pki, binary};
use netport_proto::identity::Role;
use netportd::pki::IssueRequest;
use time::OffsetDateTime;

/// A portal certificate valid from `from_days` to `to_days` and a half around now (the half
/// keeps whole-day counts away from their edges).
fn issue(pki: &Pki, name: &str, from_days: i64, to_days: i64) -> Result<CertFiles> {
    let now = OffsetDateTime::now_utc();
    let mut req = IssueRequest::new(Role::Portal, name, 1);
    req.not_before = now + time::Duration::days(from_days);
    req.not_after = now + time::Duration::days(to_days) + time::Duration::hours(12);
    pki.write(pki.ca.issue(&req)?)
}

fn portal_config(pki: &Pki, cert: &CertFiles) -> Result<std::path::PathBuf> {
    let cfg = pki.dir.path().join(format!(
        "portal-{}.toml",
        cert.cert
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("x")
    ));
    std::fs::write(
        &cfg,
        format!(
            "servers = [\"127.0.0.1:1\"]\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            pki.ca_path().display(),
            cert.cert.display(),
            cert.key.display()
        ),
    )?;
    Ok(cfg)
}

#[test]
fn a_daemon_refuses_to_start_with_an_expired_certificate() -> Result<()> {
    let pki = Pki::new()?;
    let old = issue(&pki, "old", -30, -1)?;
    let cfg = portal_config(&pki, &old)?;
    let out = Command::new(binary("portal"))
        .args(["--config", cfg.to_str().context("path")?])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("`tls.cert` (netport://portal/old) expired on"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn a_daemon_warns_when_its_certificate_expires_soon() -> Result<()> {
    let pki = Pki::new()?;
    let soon = issue(&pki, "soon", -1, 10)?;
    let cfg = portal_config(&pki, &soon)?;
    let log = pki.dir.path().join("portal.log");
    let mut child = Command::new(binary("portal"))
        .args(["--config", cfg.to_str().context("path")?])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut text = String::new();
    while tokio::time::Instant::now() < deadline {
        text = std::fs::read_to_string(&log)?;
        if text.contains("this daemon's certificate expires in 10 days") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        text.contains("this daemon's certificate expires in 10 days"),
        "{text}"
    );
    Ok(())
}

#[test]
fn check_reports_certificates_that_expire_soon_or_have_expired() -> Result<()> {
    let pki = Pki::new()?;
    let dir = pki.dir.path().join("policy");
    std::fs::create_dir_all(dir.join("certs"))?;
    std::fs::write(dir.join("policy.toml"), "[[portal]]\nname = \"alice\"\n")?;
    let check = |extra: &[&str]| -> Result<(Option<i32>, String)> {
        let out = Command::new(binary("netportd"))
            .arg("check")
            .arg(&dir)
            .args(extra)
            .env("NO_COLOR", "1")
            .output()?;
        Ok((
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    };

    // A certificate valid for a year: nothing to say.
    let fine = issue(&pki, "fine", -1, 365)?;
    std::fs::copy(&fine.cert, dir.join("certs/fine.crt"))?;
    let (code, out) = check(&[])?;
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("[certificate]"), "{out}");

    // One that expires in 10 days: a warning (an error with --deny-warnings).
    let soon = issue(&pki, "soon", -1, 10)?;
    std::fs::copy(&soon.cert, dir.join("certs/soon.pem"))?;
    let (code, out) = check(&[])?;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("warning[certificate]:")
            && out.contains("certificate netport://portal/soon expires in 10 days"),
        "{out}"
    );
    let (code, _) = check(&["--deny-warnings"])?;
    assert_eq!(code, Some(1));
    // A shorter window: not worth a warning yet.
    let (code, out) = check(&["--cert-warn-days", "5"])?;
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("[certificate]"), "{out}");

    // A daemon configuration's own certificate is checked too.
    let cfg = portal_config(&pki, &soon)?;
    let (_, out) = check(&[
        "--config",
        cfg.to_str().context("path")?,
        "--format",
        "json",
    ])?;
    let doc: serde_json::Value = serde_json::from_str(&out)?;
    let listed = doc["certificates"]
        .as_array()
        .context("certificates")?
        .iter()
        .filter(|c| c["status"] == "expiring" && c["certificate"] == "netport://portal/soon")
        .count();
    assert_eq!(listed, 2, "{out}");

    // An expired one is an error.
    let old = issue(&pki, "old", -30, -3)?;
    std::fs::copy(&old.cert, dir.join("certs/old.crt"))?;
    let (code, out) = check(&[])?;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("error[certificate]:")
            && out.contains("certificate netport://portal/old expired 2 days ago"),
        "{out}"
    );
    Ok(())
}
