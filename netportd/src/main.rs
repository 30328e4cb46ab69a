//! `netportd`: the Netport server and its command line.
//!
//! The offline commands (`check`, `explain`, `diff`) are the GitOps loop's tools: they run in
//! CI on every pull request and call exactly the loader the daemon uses.

use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    cli::run(args)
}
