//! reelbatch: a financially safe batch production line for AI video generation.
//!
//! Map of the crate (grows issue by issue; ARCHITECTURE.md has the bird's-eye view):
//!
//! - `main.rs`         the `reelbatch` command line (clap): parses, dispatches, sets exit codes
//! - `config.rs`       the configuration: embedded defaults, file, `REELBATCH_` environment
//! - `api/`            the HTTP facade (axum): routes, auth and rate limits (`gate.rs`,
//!   `ratelimit.rs`), problem+json, metrics, per-key usage, the OpenAPI document
//! - `cli/offline.rs`  offline tools on a stopped server's data directory: `wal verify`,
//!   `wal dump`, `reconcile`, `ledger verify`, `ledger export`
//! - `cli/demo.rs`     `reelbatch demo`: the pilot end to end against an in-process server
//! - `cli/submit.rs`, `client.rs`, `progress.rs`: `reelbatch submit` against a running
//!   server, its HTTP client and its progress display
//! - `engine/`         actors over the WAL: boot, recovery, snapshots, the actor directory
//!   - `engine/wallet/` the only code that moves credits: state (decide/apply), ledger
//!     hash chain, the per-tenant actor
//!   - `engine/batch/`  templates, prices, the per-batch actor, attempts
//!   - `engine/scheduler.rs` fair permits across tenants, provider and tenant limits
//!   - `engine/events.rs`, `journal.rs`, `snapshot.rs`: records, their encoding, images
//! - `providers/`      the provider trait; simulated (default), Replicate, fal; GIF media
//! - `delivery/`       the video store (`object_store`), signed download links, the
//!   download access log
//! - `webhooks/`       endpoints, the outbox derived from the log, signing, SSRF guard,
//!   the delivery loop
//! - `heap.rs`         the global allocator, wrapped to count live heap bytes (metrics);
//!   transparent huge pages off for the server
//! - `runtime.rs`      the tokio runtimes: fixed blocking pools, started at boot, kept
//! - `ids.rs`          prefixed sortable ids (`ten_…`, `bat_…`, `vid_…`, `itm_…`)
//! - `money.rs`        checked credit arithmetic
//! - `wal` (crate)     the write-ahead log every acknowledged write goes through
//!
//! Data directory layout (SPEC §12): `D/wal/<20-digit first LSN>.wal` segments,
//! `D/snapshots/<20-digit LSN>.snap` snapshots, and (default video store) `D/videos/`.

pub mod api;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod engine;
pub mod heap;
pub mod ids;
pub mod money;
pub mod providers;
pub mod runtime;
pub mod webhooks;

/// The allocator of every binary built on this crate (the server, its tests and benches).
/// glibc's malloc fragmented under the 30-minute soak: after each snapshot's large
/// temporaries were freed, its free-chunk walks (`_int_malloc`, `malloc_consolidate`) went
/// from 5 % to 13 % of the request threads' profile and request latency crept up with them.
/// mimalloc keeps small sizes in per-thread pages and returns freed memory to the system
/// on its own, so no trimming step is needed after a snapshot.
/// The `system-allocator` feature turns it off for heap profilers (see Cargo.toml).
/// Either way it is wrapped to count live heap bytes (`heap`).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: heap::Counted<mimalloc::MiMalloc> = heap::Counted(mimalloc::MiMalloc);
#[cfg(feature = "system-allocator")]
#[global_allocator]
static ALLOCATOR: heap::Counted<std::alloc::System> = heap::Counted(std::alloc::System);

use std::path::{Path, PathBuf};

/// Lower-case hex of bytes (hashes in exports, ids and fingerprints in the CLI).
pub fn hex(bytes: &[u8]) -> String {
    // A table, not `write!` per byte: every ledger entry shown carries a 32-byte hash.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    s
}

/// Cuts `s` to at most `bytes_max` bytes on a character boundary (bounded stored text).
pub fn truncate_utf8(s: &mut String, bytes_max: usize) {
    if s.len() > bytes_max {
        let mut end = bytes_max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// `D/wal`: where the segments of a data directory live.
pub fn wal_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("wal")
}

/// `D/snapshots`: where the snapshots of a data directory live.
pub fn snapshot_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("snapshots")
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_is_lower_case_two_digits_per_byte() {
        assert_eq!(super::hex(&[]), "");
        assert_eq!(super::hex(&[0x00, 0x0f, 0xab, 0xff]), "000fabff");
    }
}
