//! `netport-bench`: a policy generator and the policy benchmark.
//!
//! ```text
//! netport-bench gen --portals 10000 --services 1000 --access 10000 --out DIR
//! netport-bench policy [--portals N] [--services N] [--access N] [--runs N]
//! netport-bench tunnel [--rounds N] [--peers direct,plain-chain,netport,ssh,stunnel,rathole,tls-chain,mux-chain]
//! netport-bench relay-udp [--seconds N] [--sizes 64,1400] [--paths userspace,xdp]
//! netport-bench relay-tcp [--rounds N] [--mib N] [--paths copy,splice,sockmap]
//! netport-bench udp-tunnel [--rounds N] [--seconds N] [--sizes 64,1400]
//! netport-bench sessions [--portals N]
//! ```
//!
//! See `bench/README.md`.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};

mod forward;
mod generate;
mod policy;
mod relay_tcp;
mod relay_udp;
mod reload;
mod rng;
mod sessions;
mod streams;
mod tunnel;
mod udp_tunnel;

#[derive(Debug, Parser)]
#[command(
    name = "netport-bench",
    about = "Netport benchmarks: generate large policies, time check, explain and decide, and \
             measure the tunnel against its peers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a generated, valid policy directory.
    Gen {
        #[command(flatten)]
        size: Size,
        /// The directory to write (created if missing; stale generated chunks are replaced).
        #[arg(long)]
        out: PathBuf,
    },
    /// Generate a policy into a temporary directory and time check, explain and decide.
    Policy(policy::Args),
    /// Time the GitOps loop: a git-sync style symlink flip to the new policy being active,
    /// and a revocation to the end of the revoked portal's links.
    Reload(reload::Args),
    /// Measure Netport's tunnel against direct TCP, ssh -L, a stunnel chain and rathole, on
    /// 127.0.0.1: throughput, latency, new connections per second, memory.
    Tunnel(tunnel::Args),
    /// The relay's UDP forwarding rate and CPU per packet, XDP against userspace, between
    /// two network namespaces (needs root).
    RelayUdp(relay_udp::Args),
    /// The relay's TCP forwarding paths, copy against splice(2) against sockmap: bulk
    /// throughput, round-trip latency and CPU per GB, between two network namespaces
    /// (needs root).
    RelayTcp(relay_tcp::Args),
    /// UDP throughput through a whole tunnel (client, portal, relay, portal, UDP service)
    /// against direct UDP, on 127.0.0.1.
    UdpTunnel(udp_tunnel::Args),
    /// Connect many simulated portals to one netportd: memory per idle session, and the time
    /// a reload that changes every portal's listeners takes to reach all of them.
    Sessions(sessions::Args),
    /// Hold many concurrent streams through one relay and one pair of portals: memory per
    /// stream.
    Streams(streams::Args),
    /// The echo service of `streams`, run as its own process (internal).
    #[command(hide = true)]
    EchoService {
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
    /// One hop of `tunnel`'s plain, TLS and yamux chains (internal; src/forward.rs).
    #[command(hide = true)]
    Forward {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        to: std::net::SocketAddr,
        #[arg(long, value_enum, default_value = "plain")]
        hop: forward::Hop,
        #[command(flatten)]
        tls: forward::HopTls,
    },
}

/// The size and shape of a generated policy.
#[derive(Debug, Clone, Copy, Args)]
pub struct Size {
    /// Number of portals.
    #[arg(long, default_value_t = 10_000)]
    pub portals: usize,
    /// Number of services.
    #[arg(long, default_value_t = 1_000)]
    pub services: usize,
    /// Number of access rules.
    #[arg(long, default_value_t = 10_000)]
    pub access: usize,
    /// Number of embedded [[test]] blocks.
    #[arg(long, default_value_t = 200)]
    pub tests: usize,
    /// Seed of the generator: the same seed and sizes give the same files.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Portals or access rules per file.
    #[arg(long, default_value_t = 1_000)]
    pub chunk: usize,
}

impl Size {
    pub fn params(self) -> generate::Params {
        generate::Params {
            portals: self.portals,
            services: self.services,
            access: self.access,
            tests: self.tests,
            seed: self.seed,
            chunk: self.chunk,
        }
    }
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Gen { size, out } => {
            let started = Instant::now();
            let model = generate::Model::generate(size.params())?;
            let files = model.write(&out)?;
            println!(
                "wrote {} files to {} in {:.0?}: {} portals in {} teams, {} relays, {} services, \
                 {} access rules ({} portal-rule grants), {} revocations, {} tests",
                files.len(),
                out.display(),
                started.elapsed(),
                model.portals.len(),
                model.teams.len(),
                model.relays.len(),
                model.services.len(),
                model.rules.len(),
                model.grants(),
                model.revoked.len(),
                model.tests.len(),
            );
            // Check it in-process, so a generator bug is caught here and not in the benchmark.
            let report = netport_policy::load(&out)?;
            if report.policy.is_none() {
                eprint!("{}", report.render_plain());
                bail!("the generated policy does not pass check (a generator bug)");
            }
            let warnings = report.warnings().count();
            if warnings > 0 {
                eprint!("{}", report.render_plain());
            }
            println!(
                "check: ok, {} warnings, tests {} passed; `netportd check {}` should exit 0",
                warnings,
                report.tests.passed,
                out.display()
            );
            Ok(())
        }
        Command::Policy(args) => policy::run(args),
        Command::Tunnel(args) => tunnel::run(args),
        Command::Reload(args) => reload::run(args),
        Command::RelayUdp(args) => relay_udp::run(args),
        Command::RelayTcp(args) => relay_tcp::run(args),
        Command::UdpTunnel(args) => udp_tunnel::run(args),
        Command::Sessions(args) => sessions::run(args),
        Command::Streams(args) => streams::run(args),
        Command::EchoService { listen } => streams::echo_service(listen),
        Command::Forward {
            listen,
            to,
            hop,
            tls,
        } => forward::forward(listen, to, hop, &tls),
    }
}
