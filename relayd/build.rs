//! Compiles the kernel fast path (relayd-ebpf/*.c) with clang when the `xdp` feature is on.
//!
//! Without the feature, or without clang, relayd builds without the programs and the
//! binary says so at run time (cfg `netport_ebpf` is not set). Set `NETPORT_CLANG` to use
//! another clang.

use std::path::PathBuf;
use std::process::Command;

const PROGRAMS: &[&str] = &["udp_relay", "tcp_splice"];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(netport_ebpf)");
    println!("cargo::rerun-if-env-changed=NETPORT_CLANG");
    if std::env::var_os("CARGO_FEATURE_XDP").is_none() {
        return;
    }
    let src = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default())
        .join("../relayd-ebpf");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_default());
    let clang = std::env::var("NETPORT_CLANG").unwrap_or_else(|_| "clang".into());
    // Debian keeps asm/types.h under the multiarch include directory.
    let arch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("aarch64") => "aarch64-linux-gnu",
        _ => "x86_64-linux-gnu",
    };
    for name in PROGRAMS {
        let c = src.join(format!("{name}.c"));
        println!("cargo::rerun-if-changed={}", c.display());
        let status = Command::new(&clang)
            .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
            .arg(format!("-I/usr/include/{arch}"))
            .arg("-c")
            .arg(&c)
            .arg("-o")
            .arg(out.join(format!("{name}.o")))
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => {
                // clang is there but the program does not compile: that is a bug to fix,
                // not a reason to ship without the fast path.
                panic!("clang failed ({s}) on {}", c.display());
            }
            Err(e) => {
                println!(
                    "cargo::warning=relayd: building without the kernel fast paths (XDP, sockmap): cannot run `{clang}` ({e}); install clang and libbpf-dev"
                );
                return;
            }
        }
    }
    println!("cargo::rustc-cfg=netport_ebpf");
}
