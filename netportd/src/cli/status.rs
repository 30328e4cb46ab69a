//! `netportd status`: what a running netportd says on its admin endpoint, readably.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{EXIT_FAIL, EXIT_OK, EXIT_USAGE, Format};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The admin endpoint (`admin_listen` in netportd.toml), like 127.0.0.1:7480.
    #[arg(long, value_name = "ADDR", conflicts_with = "config")]
    pub admin: Option<String>,
    /// Read the admin address from this netportd.toml instead.
    #[arg(long, short, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

/// Exit 0 when the server is ready, 1 when it answers but is not ready (or its last reload
/// failed), 2 when it cannot be reached.
pub fn run(args: Args) -> u8 {
    let addr = match admin_address(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            return EXIT_USAGE;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return EXIT_USAGE;
        }
    };
    let status = rt.block_on(netport_common::admin::get(&addr, "/status"));
    let body = match status {
        Ok((200, body)) => body,
        Ok((code, body)) => {
            eprintln!("error: {addr}/status answered {code}: {}", body.trim());
            return EXIT_USAGE;
        }
        Err(e) => {
            eprintln!("error: cannot read the status from {addr}: {e:#}");
            return EXIT_USAGE;
        }
    };
    let doc: Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {addr}/status is not JSON: {e}");
            return EXIT_USAGE;
        }
    };
    match args.format {
        Format::Json => println!("{body}"),
        Format::Text => print!("{}", render(&doc)),
    }
    let ready = doc["ready"].as_bool().unwrap_or(false);
    if ready && doc["reload"]["last_error"].is_null() {
        EXIT_OK
    } else {
        EXIT_FAIL
    }
}

fn admin_address(args: &Args) -> Result<String> {
    if let Some(a) = &args.admin {
        return Ok(a.clone());
    }
    let Some(path) = &args.config else {
        bail!("give --admin ADDR or --config netportd.toml");
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let raw: netportd::server::config::NetportdToml = toml::from_str(&text)
        .with_context(|| format!("{} is not a valid netportd.toml", path.display()))?;
    let Some(mut a) = raw.admin_listen else {
        bail!(
            "{} has no `admin_listen`: the admin endpoint is off",
            path.display()
        );
    };
    if a.ip().is_unspecified() {
        a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Ok(a.to_string())
}

fn when(v: &Value) -> String {
    match v.as_i64() {
        Some(t) => {
            let ago = netport_common::admin::unix_now() - t;
            time::OffsetDateTime::from_unix_timestamp(t)
                .ok()
                .and_then(|d| {
                    d.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .map(|d| format!("{d} ({ago} s ago)"))
                .unwrap_or_else(|| t.to_string())
        }
        None => "never".into(),
    }
}

/// The status document as text.
pub fn render(doc: &Value) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let reload = &doc["reload"];
    if doc["ready"].as_bool() != Some(true) {
        let _ = writeln!(o, "netportd is NOT ready");
        if let Some(w) = doc["waiting_for"].as_str() {
            let _ = writeln!(o, "  waiting for a valid policy: {w}");
        }
        return o;
    }
    let p = &doc["policy"];
    let _ = writeln!(
        o,
        "policy     {} ({} portals, {} services, {} access rules, {} relays)",
        p["hash"].as_str().unwrap_or("?"),
        p["portals"],
        p["services"],
        p["access_rules"],
        p["relays"]
    );
    let _ = writeln!(o, "loaded     {}", when(&reload["loaded_at"]));
    let _ = writeln!(o, "last try   {}", when(&reload["last_attempt"]));
    match reload["last_error"].as_str() {
        Some(e) => {
            let _ = writeln!(
                o,
                "last error {} ({} rejected reloads in all); the policy above stays in force:",
                when(&reload["last_error_at"]),
                reload["failures"]
            );
            for line in e.lines() {
                let _ = writeln!(o, "  | {line}");
            }
        }
        None => {
            let _ = writeln!(o, "last error none");
        }
    }
    let empty = Vec::new();
    let portals = doc["portals"].as_array().unwrap_or(&empty);
    let _ = writeln!(o, "portals    {} connected", portals.len());
    for p in portals {
        let _ = writeln!(
            o,
            "  {:<24} from {:<22} since {}",
            p["name"].as_str().unwrap_or("?"),
            p["address"].as_str().unwrap_or("?"),
            when(&p["connected_at"])
        );
    }
    let relays = doc["relays"].as_array().unwrap_or(&empty);
    let _ = writeln!(o, "relays     {} connected", relays.len());
    for r in relays {
        let _ = writeln!(
            o,
            "  {:<24} from {:<22} {}/{} allocations",
            r["name"].as_str().unwrap_or("?"),
            r["address"].as_str().unwrap_or("?"),
            r["live"],
            r["capacity"]
        );
    }
    let _ = writeln!(o, "links      {}", doc["links"]);
    o
}
