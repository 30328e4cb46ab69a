//! Netport's policy engine.
//!
//! What it does: reads a policy directory (every `*.toml` below it), validates each file
//! against `schema/policy.schema.json`, runs the semantic checks, compiles a deterministic
//! table whose SHA-256 is the policy version, decides requests (`Policy::decide`), explains
//! them, diffs two policies and runs the policy's embedded `[[test]]` blocks.
//!
//! What it does not do: no sockets, no clock, no threads, no tokio. The only I/O is
//! [`load_dir`], which reads the directory it is given; [`check`] takes file contents, so the
//! daemon's reload pipeline, `netportd check` and the fuzzers all run the same code.

#![warn(clippy::print_stdout, clippy::print_stderr)]

mod addr;
mod check;
mod compiled;
mod decide;
mod diag;
mod diff;
mod freeze;
mod node;
mod schema;
mod source;

pub use check::{DEFAULT_RELAY_PORTS, Report, TestSummary, check, load};
pub use compiled::{
    AccessRule, Expect, Origin, Policy, PolicyTest, Portal, Protocol, Relay, Revocation, Service,
};
pub use decide::{Denied, DenyReason, Explanation, Permit, Request, Verdict};
pub use diag::{
    Code, Diagnostic, Label, Location, Severity, locate, render_plain, term_config, to_codespan,
};
pub use diff::{Grant, PolicyDiff, RelayChange, diff};
pub use freeze::input_key;
pub use schema::SCHEMA;
pub use source::{LoadError, SourceFile, load_dir};
