//! Offline tools: read a stopped server's data directory, never modify it.
//!
//! `wal verify|dump` look at frames; `reconcile`, `ledger verify` and `ledger export`
//! rebuild the state exactly as the server's startup would (newest valid snapshot, then
//! the log through the same `apply`; `engine::rebuild::load_offline`) but without
//! truncating, renaming or removing anything.
//!
//! Exit codes (SPEC §12): 0 for a clean log and for a torn tail (reported: the next open
//! truncates it, and nothing acknowledged lives there), 2 for corruption before the tail
//! (and, for the money tools, for any discrepancy or broken hash chain), 1 when the data
//! cannot be read at all (or a named tenant does not exist).

use std::io::{self, Write};
use std::path::Path;

use wal::{Problem, ProblemKind, Scan};

/// Exit code for a clean log or a torn tail.
pub const EXIT_OK: u8 = 0;
/// Exit code when the log cannot be read (missing directory, permissions).
pub const EXIT_UNREADABLE: u8 = 1;
/// Exit code for corruption before the tail.
pub const EXIT_CORRUPT: u8 = 2;

fn exit_code(scan: &Scan) -> u8 {
    match scan.problem.as_ref().map(|p| p.kind) {
        Some(ProblemKind::Corruption) => EXIT_CORRUPT,
        _ => EXIT_OK,
    }
}

fn describe(p: &Problem) -> String {
    let name = p.segment.display();
    match p.kind {
        ProblemKind::TornTail => format!(
            "torn tail in {name} at offset {}: {} ({} bytes after the last valid frame; \
             the next open truncates them)",
            p.offset, p.reason, p.bytes_after
        ),
        ProblemKind::Corruption => format!(
            "CORRUPTION in {name} at offset {}: {} ({} bytes after it in that segment, {} later \
             segment(s), {} recognizable frame(s) beyond; the server refuses to start, \
             salvage would drop them)",
            p.offset,
            p.reason,
            p.bytes_after,
            p.later_segments.len(),
            p.frames_beyond
        ),
    }
}

fn open_dir(data_dir: &Path, err: &mut dyn Write) -> Result<std::path::PathBuf, u8> {
    let dir = crate::wal_dir(data_dir);
    if !dir.is_dir() {
        let _ = writeln!(err, "error: no WAL directory at {}", dir.display());
        return Err(EXIT_UNREADABLE);
    }
    Ok(dir)
}

/// `reelbatch wal verify --data-dir D`: checks every frame of every segment.
pub fn wal_verify(data_dir: &Path, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let dir = match open_dir(data_dir, err) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let scan = match wal::scan(&dir, |_| {}) {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            return EXIT_UNREADABLE;
        }
    };
    let first = scan.segments.first().map_or(0, |s| s.first_lsn);
    let _ = writeln!(out, "wal: {}", dir.display());
    let _ = writeln!(out, "segments: {}", scan.segments.len());
    if scan.frames() == 0 {
        let _ = writeln!(out, "frames: 0");
    } else {
        let _ = writeln!(
            out,
            "frames: {} (LSN {first}..={})",
            scan.frames(),
            scan.last_lsn()
        );
    }
    match &scan.problem {
        None => {
            let _ = writeln!(out, "status: clean");
        }
        Some(p) => {
            let _ = writeln!(out, "status: {}", describe(p));
        }
    }
    exit_code(&scan)
}

/// `reelbatch wal dump --data-dir D`: one line per valid frame, then the verdict.
pub fn wal_dump(data_dir: &Path, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let dir = match open_dir(data_dir, err) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let mut out = io::BufWriter::with_capacity(1 << 16, out);
    let mut write_failed = false;
    let scan = wal::scan(&dir, |f| {
        if write_failed {
            return;
        }
        let name = f.segment.file_name().unwrap_or_default().to_string_lossy();
        // A closed pipe (`| head`) stops the output, not the scan's verdict.
        write_failed = writeln!(
            out,
            "lsn={} segment={name} offset={} len={} crc={:#010x}",
            f.lsn, f.offset, f.len, f.crc
        )
        .is_err();
    });
    let scan = match scan {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            return EXIT_UNREADABLE;
        }
    };
    if let Some(p) = &scan.problem {
        let _ = writeln!(out, "# {}", describe(p));
    }
    let _ = out.flush();
    exit_code(&scan)
}

// ---------------------------------------------------------------------------------------
// Money tools: reconcile, ledger verify, ledger export.

use crate::engine::rebuild::{load_offline, Offline};
use crate::engine::wallet::ledger::{chain_hash, hex, verify_chain, GENESIS_HASH};
use crate::engine::{EngineConfig, EngineError};
use crate::ids::TenantId;

/// Rebuilds the state of `data_dir` read-only and says where it came from: on `out` when
/// `out` is for people, on `err` when `out` carries data (`info_to_err`).
fn load(
    data_dir: &Path,
    info_to_err: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Offline, u8> {
    if !crate::wal_dir(data_dir).is_dir() {
        let _ = writeln!(
            err,
            "error: no WAL directory at {}",
            crate::wal_dir(data_dir).display()
        );
        return Err(EXIT_UNREADABLE);
    }
    let state = match load_offline(&EngineConfig::new(data_dir), data_dir) {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            return Err(match e {
                EngineError::Record { .. }
                | EngineError::Gap { .. }
                | EngineError::Wal(wal::Error::Corruption { .. }) => EXIT_CORRUPT,
                _ => EXIT_UNREADABLE,
            });
        }
    };
    let say: &mut dyn Write = if info_to_err { err } else { out };
    let _ = match state.snapshot_lsn {
        Some(l) => writeln!(
            say,
            "data: {} (snapshot at LSN {l}, {} records replayed, last LSN {})",
            data_dir.display(),
            state.events_replayed,
            state.last_lsn
        ),
        None => writeln!(
            say,
            "data: {} (no snapshot, {} records replayed, last LSN {})",
            data_dir.display(),
            state.events_replayed,
            state.last_lsn
        ),
    };
    for (path, why) in &state.snapshots_skipped {
        let _ = writeln!(say, "skipped snapshot {}: {why}", path.display());
    }
    if let Some(p) = &state.wal_problem {
        let _ = writeln!(say, "log: {}", describe(p));
    }
    Ok(state)
}

/// Corruption in the log makes every money verdict incomplete: exit 2 even when what was
/// read agrees.
fn corrupt(state: &Offline) -> bool {
    state
        .wal_problem
        .as_ref()
        .is_some_and(|p| p.kind == ProblemKind::Corruption)
}

/// `reelbatch reconcile --data-dir D [--json]`: the admin endpoint's independent
/// recomputation over the state the server would recover; exit 2 on any discrepancy.
pub fn reconcile(data_dir: &Path, as_json: bool, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    // With --json the report alone goes to stdout (pipe it to jq); the rest to stderr.
    let state = match load(data_dir, as_json, out, err) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let report =
        crate::engine::reconcile::reconcile(&state.wallets, &state.batches, &Default::default());
    if as_json {
        let _ = writeln!(
            out,
            "{}",
            crate::api::routes::views::reconciliation(&report)
        );
    } else {
        let _ = writeln!(
            out,
            "checked: {} tenants, {} batches",
            report.tenants_checked, report.batches_checked
        );
        for d in &report.discrepancies {
            let batch = d.batch.map(|b| format!(" {b}")).unwrap_or_default();
            let _ = writeln!(out, "  {}{batch} {}: {}", d.tenant, d.check, d.detail);
        }
        let _ = writeln!(out, "discrepancies: {}", report.discrepancies.len());
    }
    if !report.discrepancies.is_empty() || corrupt(&state) {
        EXIT_CORRUPT
    } else {
        EXIT_OK
    }
}

/// `reelbatch ledger verify --data-dir D`: every tenant's hash chain; broken ones are
/// named with the first bad entry. Exit 2 if any chain is broken.
pub fn ledger_verify(data_dir: &Path, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let state = match load(data_dir, false, out, err) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let (mut entries, mut broken) = (0u64, 0usize);
    for w in &state.wallets {
        entries += w.ledger.len() as u64;
        if let Err(e) = verify_chain(w.tenant, &w.ledger) {
            broken += 1;
            let _ = writeln!(out, "  {} BROKEN: {e}", w.tenant);
        }
    }
    let _ = writeln!(
        out,
        "ledger: {} tenants, {entries} entries, {broken} broken chain(s)",
        state.wallets.len()
    );
    if broken > 0 || corrupt(&state) {
        EXIT_CORRUPT
    } else {
        EXIT_OK
    }
}

/// `reelbatch ledger export --data-dir D --tenant T`: the tenant's ledger as JSON lines
/// (the admin export's format: each entry with `prev_hash` and `hash`, then one
/// `{"object":"chain",…}` line). Exit 2 if the chain does not verify.
pub fn ledger_export(
    data_dir: &Path,
    tenant: &str,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> u8 {
    let Ok(t) = tenant.parse::<TenantId>() else {
        let _ = writeln!(err, "error: {tenant:?} is not a tenant id (ten_…)");
        return EXIT_UNREADABLE;
    };
    // The data goes to stdout; where it came from goes to stderr.
    let state = match load(data_dir, true, out, err) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let Some(w) = state.wallets.iter().find(|w| w.tenant == t) else {
        let _ = writeln!(
            err,
            "error: no wallet for tenant {t} in {}",
            data_dir.display()
        );
        return EXIT_UNREADABLE;
    };
    let mut out = io::BufWriter::with_capacity(1 << 16, out);
    let (mut prev, mut ok) = (GENESIS_HASH, true);
    for (i, e) in w.ledger.iter().enumerate() {
        ok &= chain_hash(&prev, t, e) == e.hash && e.seq == i as u64 + 1;
        let line = crate::api::routes::views::ledger_entry(t, e, Some(&prev));
        if writeln!(out, "{line}").is_err() {
            return EXIT_UNREADABLE;
        }
        prev = e.hash;
    }
    let chain = serde_json::json!({
        "object": "chain",
        "tenant_id": t.to_string(),
        "entries": w.ledger.len(),
        "verified": ok,
        "head": hex(&prev),
    });
    let _ = writeln!(out, "{chain}");
    let _ = out.flush();
    if ok && !corrupt(&state) {
        EXIT_OK
    } else {
        EXIT_CORRUPT
    }
}
