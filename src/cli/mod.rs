//! Subcommands of the `reelbatch` binary that are more than argument parsing.
//!
//! `demo` and `submit` talk HTTP through `client` and show batches with `progress`;
//! `offline` reads a stopped server's data directory.

pub mod client;
pub mod demo;
pub mod offline;
pub mod progress;
pub mod submit;
