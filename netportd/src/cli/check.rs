//! `netportd check DIR`.

use std::io::Write;

use codespan_reporting::term::{self, termcolor::StandardStream};
use netport_policy::{Diagnostic, Report, Severity};
use serde_json::json;

use super::{CheckFormat, Color, Dir, EXIT_FAIL, EXIT_OK, EXIT_USAGE};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The policy directory: every *.toml file below it is read (names starting with '.' are skipped).
    pub dir: Dir,
    /// Output format.
    #[arg(long, value_enum, default_value_t = CheckFormat::Text)]
    pub format: CheckFormat,
    /// Treat warnings as errors (exit 1 when there are any).
    #[arg(long)]
    pub deny_warnings: bool,
    /// Warn about certificates (files *.crt and *.pem in the policy directory, and those of
    /// --config) that expire within this many days; an expired one is an error.
    #[arg(long, value_name = "DAYS", default_value_t = netport_common::expiry::DEFAULT_WARN_DAYS)]
    pub cert_warn_days: u32,
    /// A daemon configuration (netportd.toml, relayd.toml, portal.toml) whose [tls]
    /// certificate and CA are checked for expiry too.
    #[arg(long, value_name = "PATH")]
    pub config: Option<std::path::PathBuf>,
}

pub fn run(args: Args, color: Color) -> u8 {
    let report = match netport_policy::load(&args.dir) {
        Ok(r) => r,
        Err(e) => {
            match args.format {
                CheckFormat::Json => super::print_json(&json!({
                    "ok": false, "hash": null, "error": e.to_string(),
                    "errors": [], "warnings": [],
                    "tests": {"passed": 0, "failed": 0, "skipped": 0},
                })),
                CheckFormat::Github => println!("::error::{}", escape_data(&e.to_string())),
                CheckFormat::Text => {}
            }
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    let policy_ok = report.is_ok(args.deny_warnings);
    let (certs, unreadable) =
        super::certs::scan(&args.dir, args.config.as_deref(), args.cert_warn_days);
    let certs_ok =
        unreadable.is_empty() && !certs.iter().any(|c| c.is_error() || args.deny_warnings);
    let ok = policy_ok && certs_ok;
    match args.format {
        CheckFormat::Text => {
            let mut out = std::io::stdout().lock();
            emit_text(&report, color, &mut out, false);
            for c in &certs {
                let level = if c.is_error() { "error" } else { "warning" };
                let _ = writeln!(out, "{level}[certificate]: {}", c.message());
            }
            for e in &unreadable {
                let _ = writeln!(out, "error[certificate]: {e}");
            }
            let _ = writeln!(out, "{}", summary(&report, policy_ok, args.deny_warnings));
            if policy_ok && !certs_ok {
                let _ = writeln!(out, "error: {}", certs_summary(&certs, &unreadable));
            }
        }
        CheckFormat::Json => {
            let mut doc = to_json(&report, ok);
            doc["certificates"] = certs.iter().map(|c| c.to_json()).collect();
            doc["certificate_errors"] = unreadable.clone().into();
            super::print_json(&doc)
        }
        CheckFormat::Github => {
            let mut out = std::io::stdout().lock();
            for d in &report.diagnostics {
                let _ = writeln!(out, "{}", github_line(&report, d));
            }
            for c in &certs {
                let level = if c.is_error() { "error" } else { "warning" };
                let _ = writeln!(
                    out,
                    "::{level} file={},title=certificate expiry::{}",
                    escape_property(&c.file),
                    escape_data(&c.message())
                );
            }
            for e in &unreadable {
                let _ = writeln!(out, "::error title=certificate::{}", escape_data(e));
            }
            let _ = writeln!(out, "{}", summary(&report, policy_ok, args.deny_warnings));
        }
    }
    // A large policy takes a while to free; the process is about to exit anyway.
    std::mem::forget(report);
    if ok { EXIT_OK } else { EXIT_FAIL }
}

/// Writes the rustc-style diagnostics; to stderr when `stderr` is set.
pub fn emit_text(report: &Report, color: Color, fallback: &mut dyn Write, stderr: bool) {
    let choice = super::color_choice(color);
    let (files, list) = netport_policy::to_codespan(&report.sources, &report.diagnostics);
    let config = netport_policy::term_config();
    if matches!(choice, term::termcolor::ColorChoice::Never) {
        let _ = fallback.write_all(report.render_plain().as_bytes());
        return;
    }
    let stream = if stderr {
        StandardStream::stderr(choice)
    } else {
        StandardStream::stdout(choice)
    };
    let mut lock = stream.lock();
    for d in &list {
        let _ = term::emit_to_write_style(&mut lock, &config, &files, d);
    }
}

fn certs_summary(certs: &[super::certs::Finding], unreadable: &[String]) -> String {
    let expired = certs.iter().filter(|c| c.is_error()).count();
    format!(
        "certificates: {expired} expired, {} expiring soon, {} unreadable",
        certs.len() - expired,
        unreadable.len()
    )
}

fn summary(report: &Report, ok: bool, deny_warnings: bool) -> String {
    let errors = report.errors().count();
    let warnings = report.warnings().count();
    let t = report.tests;
    let plural = |n: usize, w: &str| format!("{n} {w}{}", if n == 1 { "" } else { "s" });
    let tests = if t.skipped > 0 {
        format!("{} not run because of errors", plural(t.skipped, "test"))
    } else {
        format!("tests: {} passed, {} failed", t.passed, t.failed)
    };
    match (&report.policy, ok) {
        (Some(p), true) => format!(
            "ok: policy {} is valid ({}, {}, {}, {}, {}; {}){}; {tests}",
            p.short_hash(),
            plural(report.sources.len(), "file"),
            plural(p.portals.len(), "portal"),
            plural(p.relays.len(), "relay"),
            plural(p.services.len(), "service"),
            plural(p.access.len(), "access rule"),
            plural(p.revoked.len(), "revocation"),
            if warnings > 0 {
                format!(" with {}", plural(warnings, "warning"))
            } else {
                String::new()
            },
        ),
        _ => format!(
            "error: the policy is not valid: {}, {}{}; {tests}",
            plural(errors, "error"),
            plural(warnings, "warning"),
            if deny_warnings && errors == 0 {
                " (--deny-warnings)"
            } else {
                ""
            },
        ),
    }
}

fn diag_json(report: &Report, d: &Diagnostic) -> serde_json::Value {
    let loc = report.location(d);
    let related: Vec<_> = d
        .labels
        .iter()
        .skip(1)
        .map(|l| {
            let at = netport_policy::locate(&report.sources, l.file, l.span.start);
            json!({"file": at.file, "line": at.line, "column": at.column, "message": l.message})
        })
        .collect();
    json!({
        "file": loc.as_ref().map(|l| l.file.clone()),
        "line": loc.as_ref().map(|l| l.line),
        "column": loc.as_ref().map(|l| l.column),
        "code": d.code.as_str(),
        "message": d.message,
        "related": related,
        "notes": d.notes,
    })
}

fn to_json(report: &Report, ok: bool) -> serde_json::Value {
    let pick = |sev: Severity| -> Vec<serde_json::Value> {
        report
            .diagnostics
            .iter()
            .filter(|d| d.severity() == sev)
            .map(|d| diag_json(report, d))
            .collect()
    };
    json!({
        "ok": ok,
        "hash": report.policy.as_ref().map(|p| p.hash.clone()),
        "errors": pick(Severity::Error),
        "warnings": pick(Severity::Warning),
        "tests": report.tests,
    })
}

/// GitHub workflow command escaping for the message.
fn escape_data(s: &str) -> String {
    s.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// GitHub workflow command escaping for property values.
fn escape_property(s: &str) -> String {
    escape_data(s).replace(':', "%3A").replace(',', "%2C")
}

fn github_line(report: &Report, d: &Diagnostic) -> String {
    let level = match d.severity() {
        Severity::Error => "error",
        Severity::Warning => "warning",
    };
    let mut message = d.message.clone();
    for l in d.labels.iter().skip(1) {
        let at = netport_policy::locate(&report.sources, l.file, l.span.start);
        message.push_str(&format!("\n{}: {at}", l.message));
    }
    for n in &d.notes {
        message.push_str(&format!("\n{n}"));
    }
    let title = escape_property(&format!("{} {}", d.code, d.code.summary()));
    match report.location(d) {
        Some(loc) => format!(
            "::{level} file={},line={},col={},title={title}::{}",
            escape_property(&loc.file),
            loc.line,
            loc.column,
            escape_data(&format!("{}: {message}", d.code))
        ),
        None => format!(
            "::{level} title={title}::{}",
            escape_data(&format!("{}: {message}", d.code))
        ),
    }
}
