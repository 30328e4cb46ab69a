//! `netportd diff OLD NEW`.

use std::fmt::Write as _;

use netport_policy::{Grant, PolicyDiff, Relay};

use super::{Color, Dir, EXIT_FAIL, EXIT_OK, EXIT_USAGE, Format};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The policy directory before the change.
    pub old: Dir,
    /// The policy directory after the change.
    pub new: Dir,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Exit 1 when the policies differ, like `git diff --exit-code`.
    #[arg(long)]
    pub exit_code: bool,
}

pub fn run(args: Args, color: Color) -> u8 {
    // An invalid input is a usage problem here: exit 1 is reserved for "they differ".
    let Ok(old) = super::load_valid(&args.old, color, "old ", false) else {
        return EXIT_USAGE;
    };
    let Ok(new) = super::load_valid(&args.new, color, "new ", false) else {
        return EXIT_USAGE;
    };
    let d = netport_policy::diff(&old, &new);
    match args.format {
        Format::Text => {
            print!("{}", render(&d));
        }
        Format::Json => super::print_json(&serde_json::to_value(&d).unwrap_or_default()),
    }
    if args.exit_code && !d.is_empty() {
        EXIT_FAIL
    } else {
        EXIT_OK
    }
}

fn grant(g: &Grant) -> String {
    format!(
        "{} listens on {} for {} -> {} ({}, rule {})",
        g.portal, g.listen, g.service, g.target, g.protocol, g.rule
    )
}

fn relay(r: &Relay) -> String {
    let tags = if r.tags.is_empty() {
        String::new()
    } else {
        format!(" tags {}", r.tags.join(","))
    };
    format!(
        "{} {} ports {}-{}{tags}",
        r.name, r.address, r.port_first, r.port_last
    )
}

fn render(d: &PolicyDiff) -> String {
    let mut s = String::new();
    let short = |h: &str| h.chars().take(12).collect::<String>();
    let _ = writeln!(s, "policy {} -> {}", short(&d.old_hash), short(&d.new_hash));
    if d.is_empty() {
        let _ = writeln!(s, "no change in grants, relays or revocations");
        return s;
    }
    for g in &d.grants_added {
        let _ = writeln!(s, "+ grant   {}", grant(g));
    }
    for g in &d.grants_removed {
        let _ = writeln!(s, "- grant   {}", grant(g));
    }
    for r in &d.relays_added {
        let _ = writeln!(s, "+ relay   {}", relay(r));
    }
    for r in &d.relays_removed {
        let _ = writeln!(s, "- relay   {}", relay(r));
    }
    for c in &d.relays_changed {
        let _ = writeln!(s, "~ relay   {}  (was {})", relay(&c.new), relay(&c.old));
    }
    for k in &d.revoked_added {
        let _ = writeln!(s, "+ revoked {k}");
    }
    for k in &d.revoked_removed {
        let _ = writeln!(s, "- revoked {k}");
    }
    let _ = writeln!(
        s,
        "{} grants added, {} removed; {} relays added, {} removed, {} changed; {} keys revoked, {} unrevoked",
        d.grants_added.len(),
        d.grants_removed.len(),
        d.relays_added.len(),
        d.relays_removed.len(),
        d.relays_changed.len(),
        d.revoked_added.len(),
        d.revoked_removed.len()
    );
    s
}
