//! Offline tools: read a stopped server's data directory, never modify it.
//!
//! Exit codes (SPEC §12): 0 for a clean log and for a torn tail (reported: the next open
//! truncates it, and nothing acknowledged lives there), 2 for corruption before the tail,
//! 1 when the log cannot be read at all.

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
