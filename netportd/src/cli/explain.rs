//! `netportd explain DIR --from PORTAL --service SERVICE`.

use netport_policy::Verdict;

use super::{Color, Dir, EXIT_FAIL, EXIT_OK, Format};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The policy directory.
    pub dir: Dir,
    /// The requesting portal.
    #[arg(long, value_name = "PORTAL")]
    pub from: String,
    /// The requested service.
    #[arg(long, value_name = "SERVICE")]
    pub service: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Exit 1 when the verdict is deny.
    #[arg(long)]
    pub exit_code: bool,
    /// Check the policy even if it is unchanged since the last run. By default the compiled
    /// policy is cached (in $NETPORT_CACHE_DIR, $XDG_CACHE_HOME/netport or ~/.cache/netport),
    /// keyed by the exact contents of every file.
    #[arg(long)]
    pub no_cache: bool,
}

pub fn run(args: Args, color: Color) -> u8 {
    let policy = match super::load_valid(&args.dir, color, "", !args.no_cache) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let e = policy.explain(&args.from, &args.service);
    match args.format {
        Format::Text => {
            println!("{}", e.message);
        }
        Format::Json => {
            let mut v = serde_json::to_value(&e).unwrap_or_default();
            if let Some(obj) = v.as_object_mut() {
                obj.insert("policy".into(), policy.hash.clone().into());
            }
            super::print_json(&v);
        }
    }
    // A large policy takes a while to free; the process is about to exit anyway.
    std::mem::forget(policy);
    if args.exit_code && e.verdict == Verdict::Deny {
        EXIT_FAIL
    } else {
        EXIT_OK
    }
}
