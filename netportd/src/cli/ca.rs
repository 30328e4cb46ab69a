//! `netportd ca init|issue|show`: the Netport PKI without openssl.

use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Subcommand, ValueEnum};
use netport_proto::identity::{self, CertInfo, Role};
use netportd::pki::{self, Ca, IssueRequest, PkiError};
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{EXIT_OK, EXIT_USAGE, Format};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: CaCommand,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a CA: DIR/ca.crt (give it to every portal, relay and server) and DIR/ca.key
    /// (mode 0600; keep it offline if you can).
    Init(InitArgs),
    /// Issue a certificate and key for a portal, relay or server, signed by the CA in DIR.
    ///
    /// Writes OUT/<role>-<NAME>.crt (the certificate, then the CA certificate) and
    /// OUT/<role>-<NAME>.key (mode 0600). The certificate names its holder with the SAN URI
    /// netport://<role>/<NAME>; NAME is the name used in the policy.
    Issue(IssueArgs),
    /// Show a certificate's identity, SPKI SHA-256 (the policy's spki_sha256) and validity.
    Show(ShowArgs),
}

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// The CA directory; created with mode 0700 if missing.
    #[arg(long)]
    pub dir: PathBuf,
    /// How long the CA certificate is valid, in days.
    #[arg(long, default_value_t = pki::DEFAULT_CA_DAYS, value_parser = days_parser())]
    pub days: u32,
    /// Replace an existing CA. Every certificate the old CA issued stops being trusted.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, clap::Args)]
pub struct IssueArgs {
    /// The CA directory (holding ca.crt and ca.key).
    #[arg(long)]
    pub dir: PathBuf,
    /// What the certificate is for.
    #[arg(value_enum)]
    pub role: RoleArg,
    /// The portal's, relay's or server's name, as in the policy (^[a-z0-9][a-z0-9-]{0,62}$).
    #[arg(value_parser = parse_name)]
    pub name: String,
    /// How long the certificate is valid, in days.
    #[arg(long, default_value_t = pki::DEFAULT_LEAF_DAYS, value_parser = days_parser())]
    pub days: u32,
    /// A DNS name portals and relays dial the server by (server certificates only; repeat).
    #[arg(long = "dns", value_name = "NAME")]
    pub dns: Vec<String>,
    /// An IP address portals and relays dial the server at (server certificates only; repeat).
    #[arg(long = "ip", value_name = "ADDR")]
    pub ips: Vec<IpAddr>,
    /// A legacy (V0.1) portal's PortalID, 8 hex digits: adds the DNS name
    /// ID|IDV|USER|USERV that legacy portals check (portal certificates only).
    #[arg(long, value_name = "HEX", value_parser = parse_legacy_id, requires = "legacy_user")]
    pub legacy_id: Option<[u8; 4]>,
    /// The legacy portal's UserID, 8 hex digits (with --legacy-id).
    #[arg(long, value_name = "HEX", value_parser = parse_legacy_id, requires = "legacy_id")]
    pub legacy_user: Option<[u8; 4]>,
    /// The IDV the server announces for this portal, 8 hex digits.
    #[arg(long, value_name = "HEX", value_parser = parse_legacy_id, default_value = "00000001", requires = "legacy_id")]
    pub legacy_idv: [u8; 4],
    /// The UserV the server announces for this portal, 8 hex digits.
    #[arg(long, value_name = "HEX", value_parser = parse_legacy_id, default_value = "00000001", requires = "legacy_id")]
    pub legacy_userv: [u8; 4],
    /// Where to write the certificate and key (default: the CA directory).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Replace an existing certificate and key of the same role and name.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// A certificate file: PEM (the first certificate is shown) or DER.
    pub file: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

/// A certificate's role on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// An end device's agent.
    Portal,
    /// A relay daemon.
    Relay,
    /// The server, netportd.
    Server,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Portal => Role::Portal,
            RoleArg::Relay => Role::Relay,
            RoleArg::Server => Role::Server,
        }
    }
}

fn days_parser() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..=36_500)
}

fn parse_legacy_id(s: &str) -> Result<[u8; 4], String> {
    netport_proto::legacy::parse_id(s)
        .ok_or_else(|| "a legacy id is 8 hex digits, like 0A0B0C0D".to_owned())
}

fn parse_name(name: &str) -> Result<String, String> {
    if identity::is_valid_name(name) {
        Ok(name.to_owned())
    } else {
        Err(
            "names match ^[a-z0-9][a-z0-9-]{0,62}$ (lower-case letters, digits and '-', \
             starting with a letter or digit), as in the policy"
                .to_owned(),
        )
    }
}

pub fn run(args: Args) -> u8 {
    let result = match args.command {
        CaCommand::Init(a) => init(a),
        CaCommand::Issue(a) => issue(a),
        CaCommand::Show(a) => show(a),
    };
    match result {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("error: {e:#}");
            EXIT_USAGE
        }
    }
}

fn init(args: InitArgs) -> Result<()> {
    let dir = &args.dir;
    let ca = Ca::generate(args.days).context("failed to generate the CA")?;
    let files = match pki::write_ca(dir, &ca, args.force) {
        Err(PkiError::Exists { path }) => bail!(
            "refusing to overwrite the CA in {}: {} already exists. Every certificate it issued \
             would stop being trusted; pass --force to replace it anyway",
            dir.display(),
            path.display()
        ),
        other => other.with_context(|| format!("failed to write the CA into {}", dir.display()))?,
    };
    let mut out = io::stdout().lock();
    writeln!(out, "created the Netport CA in {}", dir.display())?;
    writeln!(
        out,
        "  certificate  {}  (every portal, relay and server trusts it)",
        files.cert.display()
    )?;
    writeln!(
        out,
        "  key          {}  (mode 0600; it signs every Netport certificate: keep it secret)",
        files.key.display()
    )?;
    writeln!(out, "  spki_sha256  {}", ca.info().spki_sha256_hex())?;
    writeln!(out, "  expires      {}", expiry(ca.info(), now())?)?;
    writeln!(
        out,
        "next: netportd ca issue --dir {} server NAME --dns HOST",
        dir.display()
    )?;
    Ok(())
}

fn issue(args: IssueArgs) -> Result<()> {
    let role = Role::from(args.role);
    if role != Role::Server && !(args.dns.is_empty() && args.ips.is_empty()) {
        bail!(
            "--dns and --ip are only for server certificates: a {role} is identified by its \
             netport://{role}/{} URI alone; drop them, or issue a server certificate",
            args.name
        );
    }
    let ca = Ca::load(&args.dir).map_err(|e| load_error(&args.dir, e))?;
    let now = now();
    if !ca.info().is_valid_at(now) {
        bail!(
            "the CA in {} is not valid now ({} to {}); create a new one with \
             `netportd ca init --dir {} --force`",
            args.dir.display(),
            rfc3339(ca.info().not_before)?,
            rfc3339(ca.info().not_after)?,
            args.dir.display()
        );
    }
    if role != Role::Portal && args.legacy_id.is_some() {
        bail!("--legacy-id and --legacy-user are only for portal certificates");
    }
    let legacy = match (args.legacy_id, args.legacy_user) {
        (Some(id), Some(user)) => Some(netport_proto::legacy::LegacyName {
            id,
            idv: args.legacy_idv,
            user,
            userv: args.legacy_userv,
        }),
        _ => None,
    };
    let req = IssueRequest {
        dns: args.dns,
        ips: args.ips,
        legacy,
        ..IssueRequest::new(role, args.name, args.days)
    };
    let issued = ca.issue(&req).context("failed to issue the certificate")?;
    let out_dir = args.out.as_deref().unwrap_or(&args.dir);
    let files = match pki::write_issued(out_dir, &issued, args.force) {
        Err(PkiError::Exists { path }) => bail!(
            "refusing to overwrite {}: a {role} certificate for {} already exists there; pass \
             --force to replace it (the old key stops matching; revoke its spki_sha256 in the \
             policy if it may have leaked)",
            path.display(),
            req.name
        ),
        other => other.with_context(|| {
            format!("failed to write the certificate into {}", out_dir.display())
        })?,
    };

    let mut out = io::stdout().lock();
    writeln!(out, "issued {}", issued.identity)?;
    writeln!(
        out,
        "  certificate  {}  (the certificate, then the CA)",
        files.cert.display()
    )?;
    writeln!(out, "  key          {}  (mode 0600)", files.key.display())?;
    writeln!(out, "  identity     {}", issued.identity)?;
    writeln!(out, "  spki_sha256  {}", issued.info.spki_sha256_hex())?;
    for dns in &issued.info.dns_names {
        if netport_proto::legacy::LegacyName::parse(dns).is_some() {
            writeln!(out, "  legacy       {dns}  (ID|IDV|USER|USERV)")?;
        } else {
            writeln!(out, "  dns          {dns}")?;
        }
    }
    for ip in &issued.info.ip_addrs {
        writeln!(out, "  ip           {ip}")?;
    }
    writeln!(out, "  expires      {}", expiry(&issued.info, now)?)?;
    if issued.info.not_after > ca.info().not_after {
        eprintln!(
            "warning: the certificate outlives the CA, which expires {}; it stops validating then",
            rfc3339(ca.info().not_after)?
        );
    }
    Ok(())
}

/// Turns a CA loading error into one that says how to fix it.
fn load_error(dir: &Path, e: PkiError) -> anyhow::Error {
    let init = |extra: &str| format!("`netportd ca init --dir {}{extra}`", dir.display());
    let hint = match &e {
        PkiError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
            format!(
                "is --dir the CA directory? Otherwise create a CA with {}",
                init("")
            )
        }
        PkiError::KeyMismatch { .. } => format!(
            "restore the matching ca.crt and ca.key from your backup, or create a new CA with {}",
            init(" --force")
        ),
        PkiError::NotACa { .. } | PkiError::BadCertificate { .. } | PkiError::BadKey { .. } => {
            format!(
                "ca.crt and ca.key must be the files written by {}",
                init("")
            )
        }
        _ => String::new(),
    };
    let err =
        anyhow::Error::new(e).context(format!("failed to load the CA from {}", dir.display()));
    if hint.is_empty() {
        err
    } else {
        anyhow::anyhow!("{err:#}\n  hint: {hint}")
    }
}

fn show(args: ShowArgs) -> Result<()> {
    let file = &args.file;
    let bytes =
        std::fs::read(file).with_context(|| format!("failed to read {}", file.display()))?;
    let der = pki::first_certificate(&bytes).map_err(|reason| {
        anyhow::anyhow!(
            "{} is not a certificate: {reason}; `ca show` reads .crt files",
            file.display()
        )
    })?;
    let info = identity::inspect(&der)
        .with_context(|| format!("{} is not a valid Netport certificate", file.display()))?;
    let now = now();
    match args.format {
        Format::Json => super::print_json(&show_json(file, &info, now)?),
        Format::Text => {
            let mut out = io::stdout().lock();
            let none = "-".to_owned();
            let (uri, role, name) = match &info.identity {
                Some(id) => (id.uri(), id.role.to_string(), id.name.clone()),
                None => (
                    "none (no netport:// URI)".to_owned(),
                    none.clone(),
                    none.clone(),
                ),
            };
            let list = |v: Vec<String>| {
                if v.is_empty() {
                    none.clone()
                } else {
                    v.join(", ")
                }
            };
            writeln!(out, "file         {}", file.display())?;
            writeln!(out, "identity     {uri}")?;
            writeln!(out, "role         {role}")?;
            writeln!(out, "name         {name}")?;
            writeln!(out, "spki_sha256  {}", info.spki_sha256_hex())?;
            writeln!(out, "not_before   {}", rfc3339(info.not_before)?)?;
            writeln!(out, "not_after    {}", rfc3339(info.not_after)?)?;
            writeln!(out, "status       {}", status_text(&info, now))?;
            writeln!(out, "subject      {}", info.subject)?;
            writeln!(out, "issuer       {}", info.issuer)?;
            writeln!(out, "dns          {}", list(info.dns_names.clone()))?;
            writeln!(
                out,
                "ip           {}",
                list(info.ip_addrs.iter().map(IpAddr::to_string).collect())
            )?;
            writeln!(
                out,
                "ca           {}",
                if info.is_ca { "yes" } else { "no" }
            )?;
        }
    }
    Ok(())
}

fn show_json(file: &Path, info: &CertInfo, now: i64) -> Result<serde_json::Value> {
    let id = info.identity.as_ref();
    Ok(json!({
        "file": file.display().to_string(),
        "identity": id.map(|i| i.uri()),
        "role": id.map(|i| i.role.as_str()),
        "name": id.map(|i| i.name.as_str()),
        "spki_sha256": info.spki_sha256_hex(),
        "not_before": rfc3339(info.not_before)?,
        "not_after": rfc3339(info.not_after)?,
        "not_before_unix": info.not_before,
        "not_after_unix": info.not_after,
        "status": status(info, now),
        "expires_in_seconds": info.not_after - now,
        "subject": info.subject,
        "issuer": info.issuer,
        "dns_names": info.dns_names,
        "ip_addrs": info.ip_addrs.iter().map(IpAddr::to_string).collect::<Vec<_>>(),
        "is_ca": info.is_ca,
    }))
}

/// `valid`, `expired` or `not_yet_valid`.
fn status(info: &CertInfo, now: i64) -> &'static str {
    if now > info.not_after {
        "expired"
    } else if now < info.not_before {
        "not_yet_valid"
    } else {
        "valid"
    }
}

fn status_text(info: &CertInfo, now: i64) -> String {
    match status(info, now) {
        "expired" => format!("expired {} ago", span(now - info.not_after)),
        "not_yet_valid" => format!("not yet valid (starts in {})", span(info.not_before - now)),
        _ => format!("valid, expires in {}", span(info.not_after - now)),
    }
}

/// `2026-05-01T12:00:00Z (expires in 397 days)`.
fn expiry(info: &CertInfo, now: i64) -> Result<String> {
    Ok(format!(
        "{} ({})",
        rfc3339(info.not_after)?,
        status_text(info, now)
    ))
}

/// A duration in whole days (rounded to the nearest), or hours below a day.
fn span(seconds: i64) -> String {
    const DAY: i64 = 86_400;
    const HOUR: i64 = 3_600;
    let plural = |n: i64, unit: &str| format!("{n} {unit}{}", if n == 1 { "" } else { "s" });
    if seconds >= DAY {
        plural((seconds + DAY / 2) / DAY, "day")
    } else if seconds >= HOUR {
        plural((seconds + HOUR / 2) / HOUR, "hour")
    } else {
        "less than an hour".to_owned()
    }
}

fn rfc3339(unix: i64) -> Result<String> {
    OffsetDateTime::from_unix_timestamp(unix)
        .context("certificate date out of range")?
        .format(&Rfc3339)
        .context("certificate date cannot be written as RFC 3339")
}

fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_round_to_what_people_expect() {
        assert_eq!(span(397 * 86_400 - 5), "397 days");
        assert_eq!(span(86_400), "1 day");
        assert_eq!(span(86_399), "24 hours");
        assert_eq!(span(3_600), "1 hour");
        assert_eq!(span(59), "less than an hour");
    }
}
