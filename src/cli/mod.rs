//! Subcommands of the `reelbatch` binary that are more than argument parsing.

pub mod demo;
pub mod offline;
