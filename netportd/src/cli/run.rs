//! `netportd run --config netportd.toml`.

use std::path::PathBuf;

use netport_common::{LogFormat, on_worker, prepare_process, runtime, wait_for_signal};
use netportd::server;
use tokio::sync::watch;

use super::{EXIT_FAIL, EXIT_OK, EXIT_USAGE};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The configuration file (see examples/config/netportd.toml).
    #[arg(long, short, value_name = "PATH")]
    pub config: PathBuf,
    /// Log format (the level follows RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

pub fn run(args: Args) -> u8 {
    prepare_process(args.log_format);
    // Validate everything before any socket opens.
    let config = match server::Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return EXIT_USAGE;
        }
    };
    // A thread per CPU: netportd serves every portal's control session.
    let rt = match runtime(0) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return EXIT_FAIL;
        }
    };
    let obs = match server::observe(&config) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e:#}");
            return EXIT_USAGE;
        }
    };
    rt.block_on(async move {
        let bound = match server::bind(&config).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: {e:#}");
                return EXIT_USAGE;
            }
        };
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down");
            let _ = tx.send(true);
        });
        match on_worker(server::run(bound, config, obs, rx)).await {
            Ok(()) => EXIT_OK,
            Err(e) => {
                tracing::error!("{e:#}");
                EXIT_FAIL
            }
        }
    })
}
