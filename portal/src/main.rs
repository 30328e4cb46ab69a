//! `portal --config portal.toml`: the Netport agent.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use netport_common::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "portal",
    version,
    about = "Netport portal: forwards local ports to services behind other portals, as the policy allows",
    long_about = "Netport portal: keeps a mutual-TLS control session to netportd, listens where the \
policy says, and carries each connection through a relay to the portal serving it, with TLS end \
to end.\n\nExit codes: 0 after a clean shutdown (SIGTERM or Ctrl-C), 1 on a runtime failure, 2 \
when the configuration is invalid."
)]
struct Cli {
    /// The configuration file (see examples/config/portal.toml).
    #[arg(long, short, value_name = "PATH")]
    config: PathBuf,
    /// Log format (the level follows RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    netport_common::daemon_main(
        cli.log_format,
        || portal::Config::load(&cli.config),
        portal::run,
    )
}
