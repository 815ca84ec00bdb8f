//! What every benchmark binary shares (included with `mod common;`).
#![allow(dead_code)] // each bench uses its own subset

use std::path::PathBuf;
use std::time::Duration;

/// How long one measurement runs: env `BENCH_SECS` (seconds, fractions allowed), else
/// `default_s`, the bench's own choice.
pub fn bench_secs(default_s: f64) -> Duration {
    let s: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_s);
    Duration::from_secs_f64(s)
}

/// A fresh scratch directory on the disk under test: `BENCH_DIR` (default
/// `target/bench-scratch`), kept after the run so its files can be inspected.
pub fn scratch() -> PathBuf {
    let base = std::env::var("BENCH_DIR").unwrap_or_else(|_| "target/bench-scratch".into());
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap().keep()
}

/// The 2-worker tokio runtime the callers run on (the machine has 2 cores).
pub fn runtime() -> tokio::runtime::Runtime {
    named_runtime("tokio-rt-worker")
}

/// As `runtime`, with its threads named `name` (so a profile tells a server's threads
/// from its client's when both run in one process).
pub fn named_runtime(name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .unwrap()
}
