//! Command-line interface.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

mod ca;
mod cache;
mod certs;
mod check;
mod demo;
mod diff;
mod explain;
mod run;
mod status;

/// Exit code: the command did what it was asked and found nothing wrong.
pub const EXIT_OK: u8 = 0;
/// Exit code: the policy has errors, a test failed, or (with --exit-code) a difference/deny.
pub const EXIT_FAIL: u8 = 1;
/// Exit code: usage or I/O error.
pub const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "netportd",
    version,
    about = "Netport server: secure port-based tunnels with access decided by a policy kept in git",
    long_about = "Netport server: secure port-based tunnels with access decided by a policy kept in git.\n\n\
The policy is a directory of TOML files. Run `netportd check DIR` in CI on every pull request; \
`netportd explain` says why a portal may or may not reach a service; `netportd diff` shows which \
grants a change adds or removes.\n\n\
Exit codes: 0 success, 1 policy errors / failed tests (or a difference with --exit-code), 2 usage or I/O errors."
)]
pub struct Cli {
    /// When to colour output.
    #[arg(long, value_enum, default_value_t = Color::Auto, global = true)]
    pub color: Color,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Color {
    /// Colour when writing to a terminal and NO_COLOR is unset.
    Auto,
    /// Always colour.
    Always,
    /// Never colour.
    Never,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a policy directory: schema, semantics and the embedded [[test]] blocks.
    ///
    /// Exits 0 when the policy is valid and every test passes, 1 when it has errors or a test
    /// fails (or warnings, with --deny-warnings), 2 when the directory cannot be read.
    Check(check::Args),
    /// Say whether a portal may reach a service, and which rule decides it.
    Explain(explain::Args),
    /// Show the grants, relays and revocations that differ between two policy directories.
    Diff(diff::Args),
    /// Run the Netport PKI: create a CA, issue portal, relay and server certificates, show one.
    Ca(ca::Args),
    /// Run the server: accept portals and relays, decide link requests by the policy.
    Run(run::Args),
    /// Show a running server's state from its admin endpoint: policy hash, when it was
    /// loaded, the last reload error, connected portals and relays.
    ///
    /// Exits 0 when the server is ready and its last reload succeeded, 1 otherwise, 2 when
    /// the endpoint cannot be reached.
    Status(status::Args),
    /// Start a server, a relay and two portals on loopback with a throwaway PKI and
    /// examples/policies/quickstart, prove a round trip through the tunnel, and keep running.
    Demo(demo::Args),
}

/// Output format of `check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CheckFormat {
    /// rustc-style diagnostics with source lines.
    Text,
    /// One JSON document.
    Json,
    /// GitHub Actions workflow commands (::error file=...), to annotate pull requests.
    Github,
}

/// Output format of `explain` and `diff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Readable text.
    Text,
    /// One JSON document.
    Json,
}

pub fn run(cli: Cli) -> ExitCode {
    let color = cli.color;
    let code = match cli.command {
        Command::Check(args) => check::run(args, color),
        Command::Explain(args) => explain::run(args, color),
        Command::Diff(args) => diff::run(args, color),
        Command::Run(args) => run::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Status(args) => status::run(args),
        Command::Ca(args) => ca::run(args),
    };
    ExitCode::from(code)
}

/// A policy directory argument.
pub type Dir = PathBuf;

/// Loads a policy for a command that needs a valid one; prints why not and returns the exit
/// code otherwise. With `cache`, an unchanged directory is read from the compiled-policy
/// cache instead of being checked again.
pub fn load_valid(
    dir: &Dir,
    color: Color,
    what: &str,
    cache: bool,
) -> Result<netport_policy::Policy, u8> {
    let sources = match netport_policy::load_dir(dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return Err(EXIT_USAGE);
        }
    };
    let key = if cache {
        match cache::get(dir, &sources) {
            (Some(policy), _) => {
                // Freeing the sources costs time for nothing: the command exits soon.
                std::mem::forget(sources);
                return Ok(policy);
            }
            (None, key) => Some(key),
        }
    } else {
        None
    };
    let mut report = netport_policy::check(sources);
    match report.policy.take() {
        Some(p) => {
            if let Some(key) = key {
                cache::put(dir, &key, &p);
            }
            Ok(p)
        }
        None => {
            let mut err = std::io::stderr().lock();
            check::emit_text(&report, color, &mut err, true);
            let _ = writeln!(
                err,
                "error: the {what}policy in {} has errors; `netportd check {}` lists them",
                dir.display(),
                dir.display()
            );
            Err(EXIT_FAIL)
        }
    }
}

pub fn color_choice(color: Color) -> codespan_reporting::term::termcolor::ColorChoice {
    use codespan_reporting::term::termcolor::ColorChoice;
    use std::io::IsTerminal;
    match color {
        Color::Always => ColorChoice::Always,
        Color::Never => ColorChoice::Never,
        Color::Auto if std::env::var_os("NO_COLOR").is_some() => ColorChoice::Never,
        Color::Auto if std::io::stdout().is_terminal() => ColorChoice::Auto,
        Color::Auto => ColorChoice::Never,
    }
}

/// Prints JSON to stdout.
pub fn print_json(value: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer_pretty(&mut out, value);
    let _ = writeln!(out);
}
