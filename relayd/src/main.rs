//! `relayd --config relayd.toml`: the Netport relay.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use netport_common::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "relayd",
    version,
    about = "Netport relay: pairs two portals' connections and forwards bytes it cannot read",
    long_about = "Netport relay: registers with netportd, opens a port pair per allocation, \
accepts one connection per side that presents its single-use token, then forwards bytes \
between them. The portals run TLS end to end through it.\n\n\
Exit codes: 0 after a clean shutdown (SIGTERM or Ctrl-C), 1 on a runtime failure, 2 when the \
configuration is invalid."
)]
struct Cli {
    /// The configuration file (see examples/config/relayd.toml).
    #[arg(long, short, value_name = "PATH")]
    config: PathBuf,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    netport_common::daemon_main(
        cli.log_format,
        || relayd::Config::load(&cli.config),
        relayd::run,
    )
}
