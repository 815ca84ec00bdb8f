//! Stored idempotent responses on disk: each snapshot writes the responses stored since
//! the previous one into a new segment file, and memory keeps only where each one is
//! (`FiledRef`, with the fingerprint and time needed to answer without reading it). A
//! response's body is read back only when its key is repeated.
//!
//! ```text
//! Folder: <data>/archive/responses/
//! Segment: <segment, 10 decimal digits>, a sequence of records, nothing else, written whole
//!          by one snapshot: <name>.tmp, written and fdatasync'd in chunks, renamed, folder
//!          fsync'd. A segment under its final name is complete.
//! Record: the engine's archive framing (`engine::framing`) around an rkyv StoredResponse.
//! ```
//!
//! Lifecycle: a segment is referenced by the response index (`response_index`) from the
//! run that indexes its records. It is deleted one snapshot after its last record
//! expired or was stored again later. A segment no run covers (written by a snapshot that
//! crashed before indexing it) is indexed from its file at open
//! (`idempotency::ResponseStore::attach`). A lost index is rebuilt from the segments
//! present.
//!
//! This module only reads and writes files; `idempotency.rs` decides what goes where.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::engine::batch::archive::ArchiveError;
use crate::engine::framing::{self, HEADER_BYTES};
use crate::engine::idempotency::StoredResponse;

/// Largest record accepted when reading: a response body is bounded by the HTTP layer far
/// below this; a damaged reference cannot ask for an absurd allocation.
const RECORD_BYTES_MAX: u32 = 64 << 20;
/// Segments are written and synced in chunks of about this many bytes, so the log's own
/// syncs never wait behind a large amount of dirty data.
const CHUNK_BYTES: usize = 8 << 20;

/// Where a stored response sits on disk, and what a repeat needs to decide without
/// reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct FiledRef {
    /// SHA-256 of the first request: a repeat with another fingerprint is refused
    /// without a disk read.
    pub fingerprint: [u8; 32],
    /// When it was stored (retention counts from here).
    pub at_ms: u64,
    /// Segment number (the file's name).
    pub segment: u32,
    /// Payload bytes (the record is `HEADER_BYTES + len`).
    pub len: u32,
    /// Offset of the record's header in the segment.
    pub offset: u64,
}

/// The responses folder of a data directory.
pub fn responses_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("archive").join("responses")
}

fn segment_path(dir: &Path, segment: u32) -> PathBuf {
    dir.join(format!("{segment:010}"))
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates the folder if needed; returns the segments present (sorted) after removing
/// leftovers of interrupted writes (`*.tmp`).
pub(crate) fn open_dir(data_dir: &Path) -> Result<Vec<u32>, ArchiveError> {
    let dir = responses_dir(data_dir);
    if !dir.exists() {
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        // The new folders' entries must survive a crash like the files' bytes will.
        wal::fsync_dir(data_dir)?;
        wal::fsync_dir(dir.parent().expect("the folder has a parent"))?;
    }
    let mut segments = Vec::new();
    // Bounded by the folder's entries.
    for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
        let entry = entry.map_err(io_err(&dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".tmp") {
            std::fs::remove_file(entry.path()).map_err(io_err(&entry.path()))?;
        } else if let Ok(n) = name.parse::<u32>() {
            if name.len() == 10 {
                segments.push(n);
            }
        }
    }
    segments.sort_unstable();
    Ok(segments)
}

/// Writes `records` as segment `segment` (whole, synced, renamed into place) and returns
/// where each one went, in order.
pub(crate) fn write_segment(
    dir: &Path,
    segment: u32,
    records: &[Arc<StoredResponse>],
) -> Result<Vec<FiledRef>, ArchiveError> {
    let path = segment_path(dir, segment);
    let tmp = path.with_extension("tmp");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    let mut refs = Vec::with_capacity(records.len());
    let mut buf: Vec<u8> = Vec::new();
    let mut at = 0u64;
    for r in records {
        let payload = rkyv::to_bytes::<rkyv::rancor::Error>(r.as_ref())
            .expect("serializing a response cannot fail");
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&l| l <= RECORD_BYTES_MAX)
            .expect("a stored response is far below the record limit");
        refs.push(FiledRef {
            fingerprint: r.fingerprint,
            at_ms: r.at_ms,
            segment,
            len,
            offset: at,
        });
        framing::put(&mut buf, &payload);
        at += (HEADER_BYTES + payload.len()) as u64;
        if buf.len() >= CHUNK_BYTES {
            file.write_all(&buf).map_err(io_err(&tmp))?;
            file.sync_data().map_err(io_err(&tmp))?;
            buf.clear();
        }
    }
    file.write_all(&buf).map_err(io_err(&tmp))?;
    file.sync_data().map_err(io_err(&tmp))?;
    drop(file);
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    wal::fsync_dir(dir)?;
    Ok(refs)
}

/// Reads and validates the response at `r`.
pub(crate) fn read(dir: &Path, r: &FiledRef) -> Result<StoredResponse, ArchiveError> {
    let path = segment_path(dir, r.segment);
    let invalid = |reason: String| ArchiveError::Invalid {
        path: path.clone(),
        offset: r.offset,
        reason,
    };
    if r.len > RECORD_BYTES_MAX {
        return Err(invalid(format!("length {} is over the limit", r.len)));
    }
    let file = File::open(&path).map_err(io_err(&path))?;
    let mut record = vec![0u8; HEADER_BYTES + r.len as usize];
    file.read_exact_at(&mut record, r.offset)
        .map_err(io_err(&path))?;
    let aligned = framing::payload(&record).map_err(invalid)?;
    rkyv::from_bytes::<StoredResponse, rkyv::rancor::Error>(&aligned)
        .map_err(|e| invalid(e.to_string()))
}

/// Whether segment `segment` exists.
#[cfg(test)]
pub(crate) fn exists(dir: &Path, segment: u32) -> bool {
    segment_path(dir, segment).is_file()
}

/// Deletes segments (a missing one is already gone), then syncs the folder.
pub(crate) fn delete(dir: &Path, segments: &[u32]) -> Result<(), ArchiveError> {
    if segments.is_empty() {
        return Ok(());
    }
    for &s in segments {
        let path = segment_path(dir, s);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(ArchiveError::Io { path, source }),
        }
    }
    wal::fsync_dir(dir)?;
    Ok(())
}

/// Every record of segment `segment`, validated, with where each one is (rebuilding the
/// response index). A segment under its final name is complete, so any record that does
/// not validate is damage.
pub(crate) fn read_segment(
    dir: &Path,
    segment: u32,
) -> Result<Vec<(FiledRef, StoredResponse)>, ArchiveError> {
    let path = segment_path(dir, segment);
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    let mut out = Vec::new();
    let mut at = 0usize;
    // Bounded by the file's length: every step moves `at` forward by a whole record.
    while at < bytes.len() {
        let corrupt = |reason: String| ArchiveError::Corrupt {
            path: path.clone(),
            offset: at as u64,
            reason,
        };
        if bytes.len() - at < HEADER_BYTES {
            return Err(corrupt("a partial header".into()));
        }
        let header: &[u8; HEADER_BYTES] = bytes[at..at + HEADER_BYTES]
            .try_into()
            .expect("header length");
        let len = framing::announced_len(header);
        if len > u64::from(RECORD_BYTES_MAX) || len > (bytes.len() - at - HEADER_BYTES) as u64 {
            return Err(corrupt(format!("length {len} runs past the end")));
        }
        let end = at + HEADER_BYTES + len as usize;
        let aligned = framing::payload(&bytes[at..end]).map_err(corrupt)?;
        let r = rkyv::from_bytes::<StoredResponse, rkyv::rancor::Error>(&aligned)
            .map_err(|e| corrupt(e.to_string()))?;
        out.push((
            FiledRef {
                fingerprint: r.fingerprint,
                at_ms: r.at_ms,
                segment,
                len: len as u32,
                offset: at as u64,
            },
            r,
        ));
        at = end;
    }
    Ok(out)
}
