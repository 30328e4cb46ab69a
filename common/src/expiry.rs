//! Certificate expiry guard rails: a daemon refuses to start with an expired certificate of
//! its own, warns every day once its certificate is within the warning window, and
//! `netportd check` reports certificates that expire soon.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use netport_proto::identity::CertInfo;
use netport_proto::tls::Credentials;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;

/// Days before expiry from which daemons and `netportd check` warn, unless told otherwise.
pub const DEFAULT_WARN_DAYS: u32 = 30;

const DAY: i64 = 86_400;

/// Where a certificate stands against the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Valid for longer than the warning window.
    Fine,
    /// Expires within the warning window, in this many whole days (0: within a day).
    Soon {
        /// Whole days left.
        days: i64,
    },
    /// Expired this many whole days ago (0: within the last day).
    Expired {
        /// Whole days since expiry.
        days: i64,
    },
}

/// Classifies a certificate ending at `not_after` (unix seconds, inclusive) at `now`.
pub fn classify(not_after: i64, now: i64, warn_days: u32) -> Expiry {
    if now > not_after {
        Expiry::Expired {
            days: (now - not_after) / DAY,
        }
    } else if not_after - now < i64::from(warn_days) * DAY {
        Expiry::Soon {
            days: (not_after - now) / DAY,
        }
    } else {
        Expiry::Fine
    }
}

/// Now, in unix seconds.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `not_after` as an RFC 3339 date and time (UTC).
pub fn date(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("unix time {unix}"))
}

/// Fails when this daemon's own certificate has expired (checked before any socket opens).
pub fn refuse_expired(creds: &Credentials) -> Result<()> {
    let info = creds.info();
    if let Expiry::Expired { .. } = classify(info.not_after, now_unix(), 0) {
        bail!(
            "`tls.cert` ({}) expired on {}: issue a new one (`netportd ca issue {} {}`) and restart",
            creds.identity(),
            date(info.not_after),
            creds.identity().role.as_str(),
            creds.identity().name
        );
    }
    Ok(())
}

/// Logs a warning now and every day after while this daemon's certificate is within
/// `warn_days` of expiry (an error once it has expired). Runs until the runtime stops.
pub fn watch_own_certificate(creds: &Credentials, warn_days: u32) {
    let identity = creds.identity().to_string();
    let not_after = creds.info().not_after;
    tokio::spawn(async move {
        loop {
            match classify(not_after, now_unix(), warn_days) {
                Expiry::Fine => {}
                Expiry::Soon { days } => tracing::warn!(
                    certificate = %identity,
                    days_left = days,
                    not_after = %date(not_after),
                    "this daemon's certificate expires in {days} days: issue a new one (`netportd ca issue`) and restart before then"
                ),
                Expiry::Expired { .. } => tracing::error!(
                    certificate = %identity,
                    not_after = %date(not_after),
                    "this daemon's certificate has expired: peers refuse it; issue a new one and restart"
                ),
            }
            tokio::time::sleep(Duration::from_secs(DAY as u64)).await;
        }
    });
}

/// Every certificate in a PEM file (or one DER certificate), with what it says.
pub fn read_certificates(path: &Path) -> Result<Vec<CertInfo>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let ders: Vec<CertificateDer<'static>> = if bytes.trim_ascii_start().starts_with(b"-----BEGIN")
    {
        CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<_, _>>()
            .with_context(|| format!("{} is not PEM", path.display()))?
    } else {
        vec![CertificateDer::from(bytes)]
    };
    ders.iter()
        .map(|d| {
            netport_proto::identity::inspect(d).with_context(|| {
                format!("{} holds a certificate that cannot be read", path.display())
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_fine_soon_and_expired() {
        let now = 1_000 * DAY;
        assert_eq!(classify(now + 31 * DAY, now, 30), Expiry::Fine);
        assert_eq!(classify(now + 30 * DAY, now, 30), Expiry::Fine);
        assert_eq!(
            classify(now + 30 * DAY - 1, now, 30),
            Expiry::Soon { days: 29 }
        );
        assert_eq!(classify(now + 10, now, 30), Expiry::Soon { days: 0 });
        assert_eq!(classify(now, now, 30), Expiry::Soon { days: 0 });
        assert_eq!(classify(now - 1, now, 30), Expiry::Expired { days: 0 });
        assert_eq!(
            classify(now - 3 * DAY, now, 30),
            Expiry::Expired { days: 3 }
        );
        assert_eq!(classify(now + DAY, now, 0), Expiry::Fine);
    }
}
