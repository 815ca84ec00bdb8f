//! The stored-response index: where each filed idempotent response is (segment, offset,
//! fingerprint, time), so memory keeps only the responses stored since the last snapshot
//! however many keys are within retention.
//!
//! It is a small log-structured index. Each snapshot's segment (`response_files`) gets one
//! immutable **run**: its records sorted by key id, in checksummed 4 KiB blocks. Memory
//! holds per run only the first key of each block and a binary fuse filter of its keys
//! (about 1.7 bytes a key), so a lookup of a key that was never stored (the common case)
//! touches no disk, and one that was reads one block. Filing costs the same however
//! many rows the index holds: it writes one new file and never rewrites old ones in place.
//! (The B-tree this replaces inserted random 128-bit keys into a file larger than its cache:
//! each snapshot's filing cost grew with every key ever filed, and request latency with it.)
//!
//! Runs are merged two at a time, newest first, like a binary counter (the older of the
//! two no larger than the newer, and the result at most `MERGE_ENTRIES_MAX`), so there
//! are about log₂ runs below the cap plus one per capped run; a merge drops expired
//! entries and keeps the newer of two records of one key. Retention deletes a whole run
//! once its newest entry expired.
//!
//! ```text
//! Folder: <data>/archive/responses/ (beside the segments)
//! Run file: run-<first segment, 10 digits>-<last segment, 10 digits>: the records of those
//!           segments, written whole as <name>.tmp, synced in chunks, renamed, folder synced.
//! Block 0 (header, 4096 B): magic "RBRESIDX" | format u32 = 1 | first segment u32 |
//!           last segment u32 | reserved u32 = 0 | entries u64 | min at_ms u64 |
//!           max at_ms u64 | crc32 u32 (of bytes 0..48) | zeros
//! Block 1.. (4096 B each): count u16 (1..=56; all full but the last) | reserved u16 = 0 |
//!           crc32 u32 (of bytes 0..4 and the entries) | count × entry | zeros
//! Entry (72 B): key id u128 | segment u32 | len u32 | offset u64 | at_ms u64 |
//!           fingerprint [u8; 32], little-endian; key ids strictly ascending in the file.
//! File length: 4096 × (1 + ceil(entries / 56)).
//! ```
//!
//! Like the archive index it is derived data: a run is rebuilt from its segments. At open,
//! a run whose segment range lies inside another's (a merge that crashed before deleting its
//! inputs) is deleted, a run that does not validate is deleted (and rebuilt), and
//! `ResponseStore::attach` indexes every segment no run covers (a snapshot that crashed
//! between writing a segment and its run). Segments are deleted by the caller one snapshot
//! after their newest record expired (`expire` names them), so a request that read a
//! place in one just before is never left without the file.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use xorf::{BinaryFuse8, Filter};

use crate::engine::batch::archive::ArchiveError;
use crate::engine::response_files::{responses_dir, FiledRef};

/// Layout version (header `format`); a run of another one is deleted and rebuilt.
const FORMAT: u32 = 1;
const MAGIC: &[u8; 8] = b"RBRESIDX";
const BLOCK_BYTES: usize = 4096;
const ENTRY_BYTES: usize = 72;
/// Block prefix: count u16, reserved u16, crc32 u32.
const BLOCK_HEAD_BYTES: usize = 8;
const ENTRIES_PER_BLOCK: usize = (BLOCK_BYTES - BLOCK_HEAD_BYTES) / ENTRY_BYTES;
/// Header bytes covered by its crc.
const HEADER_CRC_AT: usize = 48;
/// A merge whose result would hold more entries stops here: a capped run is never
/// rewritten again and leaves whole when its newest entry expires. 1 Mi entries are a
/// 74 MiB file; merging two of half that took 1.0 s on the reference machine
/// (`benches/response_index.rs`; 2 Mi took 1.9 s, a longer stall of the snapshot's I/O
/// for fewer runs to probe). At the soak's rate a day's retention is then about 30 capped
/// runs, whose filters a lookup of a fresh key probes in well under a microsecond.
const MERGE_ENTRIES_MAX: u64 = 1 << 20;
/// Runs written and synced in chunks of about this many bytes, so the log's own syncs
/// never wait behind a large amount of dirty data.
const CHUNK_BYTES: usize = 8 << 20;
/// Blocks read at once when a merge streams a run.
const READ_BLOCKS: usize = 64;
/// Runs a data directory may hold (a bound on every loop over them; far above what the
/// merge policy leaves: log₂(cap / filing) + rows / cap).
const RUNS_MAX: usize = 4096;

/// The legacy B-tree index file (format before runs): derived data, deleted at open.
fn legacy_index_path(data_dir: &Path) -> PathBuf {
    data_dir.join("archive").join("responses.redb")
}

fn run_path(dir: &Path, first: u32, last: u32) -> PathBuf {
    dir.join(format!("run-{first:010}-{last:010}"))
}

/// `(first, last)` of a run file's name.
fn parse_run_name(name: &str) -> Option<(u32, u32)> {
    let rest = name.strip_prefix("run-")?;
    let (a, b) = rest.split_once('-')?;
    if a.len() != 10 || b.len() != 10 {
        return None;
    }
    let (first, last) = (a.parse().ok()?, b.parse().ok()?);
    (first <= last).then_some((first, last))
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn put_entry(out: &mut [u8], id: u128, f: &FiledRef) {
    out[0..16].copy_from_slice(&id.to_le_bytes());
    out[16..20].copy_from_slice(&f.segment.to_le_bytes());
    out[20..24].copy_from_slice(&f.len.to_le_bytes());
    out[24..32].copy_from_slice(&f.offset.to_le_bytes());
    out[32..40].copy_from_slice(&f.at_ms.to_le_bytes());
    out[40..72].copy_from_slice(&f.fingerprint);
}

fn entry_key(e: &[u8]) -> u128 {
    u128::from_le_bytes(e[0..16].try_into().expect("16 bytes"))
}

fn get_entry(e: &[u8]) -> (u128, FiledRef) {
    let u32_at = |i: usize| u32::from_le_bytes(e[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(e[i..i + 8].try_into().expect("8 bytes"));
    (
        entry_key(e),
        FiledRef {
            segment: u32_at(16),
            len: u32_at(20),
            offset: u64_at(24),
            at_ms: u64_at(32),
            fingerprint: e[40..72].try_into().expect("32 bytes"),
        },
    )
}

/// The filter's key: the id's high half (ids are SHA-256 bits, so any half is uniform;
/// the high one keeps a run's filter keys in ascending order, so duplicates are adjacent).
fn filter_key(id: u128) -> u64 {
    (id >> 64) as u64
}

fn block_crc(block: &[u8], count: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&block[0..4]);
    h.update(&block[BLOCK_HEAD_BYTES..BLOCK_HEAD_BYTES + count * ENTRY_BYTES]);
    h.finalize()
}

/// The entries of a block that `check_block` passed with `count` entries, in key order.
fn block_entries(block: &[u8], count: usize) -> std::slice::ChunksExact<'_, u8> {
    block[BLOCK_HEAD_BYTES..BLOCK_HEAD_BYTES + count * ENTRY_BYTES].chunks_exact(ENTRY_BYTES)
}

/// Validates a data block; returns its entry count.
fn check_block(block: &[u8]) -> Result<usize, String> {
    let count = usize::from(u16::from_le_bytes([block[0], block[1]]));
    if count == 0 || count > ENTRIES_PER_BLOCK {
        return Err(format!("block entry count {count}"));
    }
    let crc = u32::from_le_bytes(block[4..8].try_into().expect("4 bytes"));
    if crc != block_crc(block, count) {
        return Err("block crc mismatch".into());
    }
    Ok(count)
}

/// One immutable run, open.
struct Run {
    /// Its file (kept open: a lookup racing a merge that unlinks it still reads it).
    file: File,
    path: PathBuf,
    /// The segments it covers (a merge joins two adjacent ranges).
    first_segment: u32,
    last_segment: u32,
    entries: u64,
    /// Its newest entry: the whole run expires with it.
    max_at_ms: u64,
    /// First key of each data block: which block a key can be in, without a read.
    block_first_keys: Vec<u128>,
    /// Keys it holds (no false negatives, ≈0.4 % false positives); `None` when empty or
    /// when the filter could not be built (every lookup then reads a block).
    filter: Option<BinaryFuse8>,
    /// Each segment it has entries of, with that segment's newest entry: a segment is
    /// deleted only once no run holds an unexpired entry of it.
    segments: BTreeMap<u32, u64>,
}

impl Run {
    fn read_block(&self, b: usize, buf: &mut [u8]) -> Result<usize, ArchiveError> {
        let offset = ((1 + b) * BLOCK_BYTES) as u64;
        self.file
            .read_exact_at(buf, offset)
            .map_err(io_err(&self.path))?;
        check_block(buf).map_err(|reason| ArchiveError::Invalid {
            path: self.path.clone(),
            offset,
            reason,
        })
    }

    fn get(&self, id: u128) -> Result<Option<FiledRef>, ArchiveError> {
        if let Some(f) = &self.filter {
            if !f.contains(&filter_key(id)) {
                return Ok(None);
            }
        }
        let b = self.block_first_keys.partition_point(|k| *k <= id);
        let Some(b) = b.checked_sub(1) else {
            return Ok(None);
        };
        let mut block = [0u8; BLOCK_BYTES];
        let count = self.read_block(b, &mut block)?;
        let entries = block_entries(&block, count);
        let (mut lo, mut hi) = (0usize, count);
        // Binary search: bounded by log₂(56) steps.
        while lo < hi {
            let mid = (lo + hi) / 2;
            let e = entries.clone().nth(mid).expect("mid < count");
            match entry_key(e).cmp(&id) {
                std::cmp::Ordering::Equal => return Ok(Some(get_entry(e).1)),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        Ok(None)
    }

    /// Opens and validates a whole run file (every block's crc and the key order), and
    /// builds its in-memory parts.
    fn load(path: PathBuf, first: u32, last: u32) -> Result<Run, ArchiveError> {
        let file = File::open(&path).map_err(io_err(&path))?;
        let corrupt = |offset: u64, reason: String| ArchiveError::Corrupt {
            path: path.clone(),
            offset,
            reason,
        };
        let len = file.metadata().map_err(io_err(&path))?.len();
        let mut header = [0u8; BLOCK_BYTES];
        if len < BLOCK_BYTES as u64 {
            return Err(corrupt(0, "shorter than its header".into()));
        }
        file.read_exact_at(&mut header, 0).map_err(io_err(&path))?;
        let u32_at = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().expect("4"));
        let u64_at = |i: usize| u64::from_le_bytes(header[i..i + 8].try_into().expect("8"));
        if &header[0..8] != MAGIC {
            return Err(corrupt(0, "not a response index run".into()));
        }
        if u32_at(HEADER_CRC_AT) != crc32fast::hash(&header[..HEADER_CRC_AT]) {
            return Err(corrupt(0, "header crc mismatch".into()));
        }
        if u32_at(8) != FORMAT {
            return Err(corrupt(0, format!("format {} is not {FORMAT}", u32_at(8))));
        }
        if (u32_at(12), u32_at(16)) != (first, last) {
            return Err(corrupt(
                0,
                "header and name disagree on its segments".into(),
            ));
        }
        let entries = u64_at(24);
        let max_at_ms = u64_at(40);
        let blocks = entries.div_ceil(ENTRIES_PER_BLOCK as u64);
        if len != (1 + blocks) * BLOCK_BYTES as u64 {
            return Err(corrupt(0, format!("{len} bytes for {entries} entries")));
        }
        let mut block_first_keys = Vec::with_capacity(blocks as usize);
        let mut keys = Vec::with_capacity(entries as usize);
        let mut segments = BTreeMap::new();
        let mut prev: Option<u128> = None;
        let mut seen = 0u64;
        let mut buf = vec![0u8; READ_BLOCKS * BLOCK_BYTES];
        let mut b = 0u64;
        // Bounded by the file's blocks.
        while b < blocks {
            let n = (blocks - b).min(READ_BLOCKS as u64) as usize;
            let chunk = &mut buf[..n * BLOCK_BYTES];
            file.read_exact_at(chunk, (1 + b) * BLOCK_BYTES as u64)
                .map_err(io_err(&path))?;
            for (i, block) in chunk.chunks_exact(BLOCK_BYTES).enumerate() {
                let offset = (1 + b + i as u64) * BLOCK_BYTES as u64;
                let count = check_block(block).map_err(|r| corrupt(offset, r))?;
                let last_block = b + i as u64 + 1 == blocks;
                if !last_block && count != ENTRIES_PER_BLOCK {
                    return Err(corrupt(
                        offset,
                        "a block before the last is not full".into(),
                    ));
                }
                for e in block_entries(block, count) {
                    let (id, f) = get_entry(e);
                    if prev.is_some_and(|p| p >= id) {
                        return Err(corrupt(offset, "keys out of order".into()));
                    }
                    if f.segment < first || f.segment > last || f.at_ms > max_at_ms {
                        return Err(corrupt(
                            offset,
                            "an entry outside the header's range".into(),
                        ));
                    }
                    if seen % ENTRIES_PER_BLOCK as u64 == 0 {
                        block_first_keys.push(id);
                    }
                    prev = Some(id);
                    seen += 1;
                    keys.push(filter_key(id));
                    let m = segments.entry(f.segment).or_insert(0u64);
                    *m = (*m).max(f.at_ms);
                }
            }
            b += n as u64;
        }
        if seen != entries {
            return Err(corrupt(0, format!("{seen} entries, header says {entries}")));
        }
        Ok(Run {
            file,
            path,
            first_segment: first,
            last_segment: last,
            entries,
            max_at_ms,
            block_first_keys,
            filter: build_filter(keys),
            segments,
        })
    }
}

/// The filter of a run's keys (ascending, so duplicates of the high half are adjacent).
fn build_filter(mut keys: Vec<u64>) -> Option<BinaryFuse8> {
    keys.dedup();
    if keys.is_empty() {
        return None;
    }
    match BinaryFuse8::try_from(&keys) {
        Ok(f) => Some(f),
        Err(e) => {
            // Correctness never depends on the filter: lookups then read a block.
            tracing::warn!(
                error = e,
                keys = keys.len(),
                "response index: no filter for a run"
            );
            None
        }
    }
}

/// Writes a run, entries in ascending key order.
struct RunWriter {
    tmp: PathBuf,
    path: PathBuf,
    file: File,
    first_segment: u32,
    last_segment: u32,
    /// Bytes not yet written (the header placeholder first, then whole blocks).
    chunk: Vec<u8>,
    /// The block being filled.
    block: Vec<u8>,
    in_block: usize,
    entries: u64,
    min_at_ms: u64,
    max_at_ms: u64,
    last_key: Option<u128>,
    block_first_keys: Vec<u128>,
    keys: Vec<u64>,
    segments: BTreeMap<u32, u64>,
}

impl RunWriter {
    fn create(dir: &Path, first: u32, last: u32) -> Result<RunWriter, ArchiveError> {
        let path = run_path(dir, first, last);
        let tmp = path.with_extension("tmp");
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        Ok(RunWriter {
            tmp,
            path,
            file,
            first_segment: first,
            last_segment: last,
            chunk: vec![0u8; BLOCK_BYTES],
            block: vec![0u8; BLOCK_BYTES],
            in_block: 0,
            entries: 0,
            min_at_ms: u64::MAX,
            max_at_ms: 0,
            last_key: None,
            block_first_keys: Vec::new(),
            keys: Vec::new(),
            segments: BTreeMap::new(),
        })
    }

    fn push(&mut self, id: u128, f: &FiledRef) -> Result<(), ArchiveError> {
        assert!(
            self.last_key.is_none_or(|k| k < id),
            "a run's keys are written in strictly ascending order"
        );
        assert!(
            (self.first_segment..=self.last_segment).contains(&f.segment),
            "an entry's segment is within its run's range"
        );
        if self.in_block == 0 {
            self.block_first_keys.push(id);
        }
        let at = BLOCK_HEAD_BYTES + self.in_block * ENTRY_BYTES;
        put_entry(&mut self.block[at..at + ENTRY_BYTES], id, f);
        self.in_block += 1;
        self.entries += 1;
        self.last_key = Some(id);
        self.keys.push(filter_key(id));
        self.min_at_ms = self.min_at_ms.min(f.at_ms);
        self.max_at_ms = self.max_at_ms.max(f.at_ms);
        let m = self.segments.entry(f.segment).or_insert(0);
        *m = (*m).max(f.at_ms);
        if self.in_block == ENTRIES_PER_BLOCK {
            self.seal_block()?;
        }
        Ok(())
    }

    fn seal_block(&mut self) -> Result<(), ArchiveError> {
        let count = self.in_block;
        self.block[0..2].copy_from_slice(&(count as u16).to_le_bytes());
        self.block[2..4].copy_from_slice(&[0, 0]);
        let crc = block_crc(&self.block, count);
        self.block[4..8].copy_from_slice(&crc.to_le_bytes());
        self.block[BLOCK_HEAD_BYTES + count * ENTRY_BYTES..].fill(0);
        self.chunk.extend_from_slice(&self.block);
        self.in_block = 0;
        if self.chunk.len() >= CHUNK_BYTES {
            self.file
                .write_all(&self.chunk)
                .map_err(io_err(&self.tmp))?;
            self.file.sync_data().map_err(io_err(&self.tmp))?;
            self.chunk.clear();
        }
        Ok(())
    }

    /// Writes the rest and the header, syncs, renames into place, syncs the folder.
    fn finish(mut self) -> Result<Run, ArchiveError> {
        if self.in_block > 0 {
            self.seal_block()?;
        }
        self.file
            .write_all(&self.chunk)
            .map_err(io_err(&self.tmp))?;
        let mut header = [0u8; BLOCK_BYTES];
        header[0..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&FORMAT.to_le_bytes());
        header[12..16].copy_from_slice(&self.first_segment.to_le_bytes());
        header[16..20].copy_from_slice(&self.last_segment.to_le_bytes());
        header[24..32].copy_from_slice(&self.entries.to_le_bytes());
        let min_at_ms = if self.entries == 0 { 0 } else { self.min_at_ms };
        header[32..40].copy_from_slice(&min_at_ms.to_le_bytes());
        header[40..48].copy_from_slice(&self.max_at_ms.to_le_bytes());
        let crc = crc32fast::hash(&header[..HEADER_CRC_AT]);
        header[HEADER_CRC_AT..HEADER_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        self.file
            .write_all_at(&header, 0)
            .map_err(io_err(&self.tmp))?;
        self.file.sync_data().map_err(io_err(&self.tmp))?;
        std::fs::rename(&self.tmp, &self.path).map_err(io_err(&self.path))?;
        wal::fsync_dir(self.path.parent().expect("a run is in a folder"))?;
        let file = File::open(&self.path).map_err(io_err(&self.path))?;
        Ok(Run {
            file,
            path: self.path,
            first_segment: self.first_segment,
            last_segment: self.last_segment,
            entries: self.entries,
            max_at_ms: self.max_at_ms,
            block_first_keys: self.block_first_keys,
            filter: build_filter(self.keys),
            segments: self.segments,
        })
    }
}

/// Streams a run's entries in key order (a merge input), a few blocks per read.
struct RunReader<'a> {
    run: &'a Run,
    buf: Vec<u8>,
    /// Entries decoded from `buf`, not yet taken.
    pending: std::collections::VecDeque<(u128, FiledRef)>,
    next_block: usize,
}

impl<'a> RunReader<'a> {
    fn new(run: &'a Run) -> Self {
        RunReader {
            run,
            buf: vec![0u8; READ_BLOCKS * BLOCK_BYTES],
            pending: std::collections::VecDeque::new(),
            next_block: 0,
        }
    }

    fn peek(&mut self) -> Result<Option<&(u128, FiledRef)>, ArchiveError> {
        let blocks = self.run.block_first_keys.len();
        if self.pending.is_empty() && self.next_block < blocks {
            let n = (blocks - self.next_block).min(READ_BLOCKS);
            let offset = ((1 + self.next_block) * BLOCK_BYTES) as u64;
            let chunk = &mut self.buf[..n * BLOCK_BYTES];
            self.run
                .file
                .read_exact_at(chunk, offset)
                .map_err(io_err(&self.run.path))?;
            for (i, block) in chunk.chunks_exact(BLOCK_BYTES).enumerate() {
                let count = check_block(block).map_err(|reason| ArchiveError::Invalid {
                    path: self.run.path.clone(),
                    offset: offset + (i * BLOCK_BYTES) as u64,
                    reason,
                })?;
                self.pending
                    .extend(block_entries(block, count).map(get_entry));
            }
            self.next_block += n;
        }
        Ok(self.pending.front())
    }

    fn take(&mut self) -> Option<(u128, FiledRef)> {
        self.pending.pop_front()
    }
}

/// The open index.
pub struct ResponseIndex {
    /// The folder (runs live beside the segments).
    dir: PathBuf,
    /// Runs, oldest (lowest segments) first; replaced whole, so a lookup takes the list in
    /// one short lock and reads files without it.
    runs: Mutex<Arc<Vec<Arc<Run>>>>,
    /// Segment files present (deleted ones leave in `expire`).
    files: Mutex<BTreeSet<u32>>,
    /// Set at engine shutdown: later lookups fail (the engine is going away).
    closed: AtomicBool,
    /// `MERGE_ENTRIES_MAX`, lowered by tests to reach capped runs with few entries.
    merge_entries_max: u64,
}

impl ResponseIndex {
    /// Opens the runs of a data directory. `segments` are the segment files present. A run
    /// that does not validate, or whose range lies within another's, is deleted (its
    /// segments are then not covered: see `uncovered`).
    pub fn open(data_dir: &Path, segments: &[u32]) -> Result<ResponseIndex, ArchiveError> {
        let legacy = legacy_index_path(data_dir);
        if legacy.exists() {
            std::fs::remove_file(&legacy).map_err(io_err(&legacy))?;
            tracing::info!(path = %legacy.display(), "response index: the B-tree file of the old format deleted (runs are rebuilt from the segments)");
        }
        let dir = responses_dir(data_dir);
        let mut found: Vec<(u32, u32)> = Vec::new();
        // Bounded by the folder's entries.
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            if let Some(r) = parse_run_name(&entry.file_name().to_string_lossy()) {
                found.push(r);
            }
        }
        // Widest first among equal starts, so a contained range meets its container first.
        found.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        let mut runs: Vec<Arc<Run>> = Vec::new();
        let mut doomed: Vec<PathBuf> = Vec::new();
        for (first, last) in found {
            let path = run_path(&dir, first, last);
            if let Some(prev) = runs.last() {
                if first <= prev.last_segment {
                    if last <= prev.last_segment {
                        // A merge's input whose output is in place.
                        doomed.push(path);
                        continue;
                    }
                    return Err(ArchiveError::Corrupt {
                        path,
                        offset: 0,
                        reason: format!(
                            "its segments overlap run {:010}-{:010} in part",
                            prev.first_segment, prev.last_segment
                        ),
                    });
                }
            }
            match Run::load(path.clone(), first, last) {
                Ok(run) => runs.push(Arc::new(run)),
                Err(ArchiveError::Corrupt { reason, offset, .. }) => {
                    tracing::warn!(path = %path.display(), offset, reason, "response index: a damaged run deleted (rebuilt from its segments)");
                    doomed.push(path);
                }
                Err(e) => return Err(e),
            }
        }
        assert!(runs.len() <= RUNS_MAX, "the merge policy bounds the runs");
        if !doomed.is_empty() {
            for p in &doomed {
                std::fs::remove_file(p).map_err(io_err(p))?;
            }
            wal::fsync_dir(&dir)?;
        }
        Ok(ResponseIndex {
            dir,
            runs: Mutex::new(Arc::new(runs)),
            files: Mutex::new(segments.iter().copied().collect()),
            closed: AtomicBool::new(false),
            merge_entries_max: MERGE_ENTRIES_MAX,
        })
    }

    fn runs(&self) -> Arc<Vec<Arc<Run>>> {
        Arc::clone(&self.runs.lock().expect("not poisoned"))
    }

    /// Of `segments` (present), those no run covers, ascending: to index from their files.
    pub(crate) fn uncovered(&self, segments: &[u32]) -> Vec<u32> {
        let runs = self.runs();
        segments
            .iter()
            .copied()
            .filter(|s| {
                !runs
                    .iter()
                    .any(|r| (r.first_segment..=r.last_segment).contains(s))
            })
            .collect()
    }

    /// Segments some run has an entry of at or after `cutoff_ms` (which must therefore
    /// exist), with that newest entry.
    pub(crate) fn live_segments(&self, cutoff_ms: u64) -> BTreeMap<u32, u64> {
        let mut out = BTreeMap::new();
        for r in self.runs().iter() {
            for (&s, &at) in &r.segments {
                if at >= cutoff_ms {
                    let m = out.entry(s).or_insert(0u64);
                    *m = (*m).max(at);
                }
            }
        }
        out
    }

    /// The highest segment a run covers (new segments are numbered above it).
    pub(crate) fn last_segment(&self) -> Option<u32> {
        self.runs().last().map(|r| r.last_segment)
    }

    /// Closes the index (engine shutdown); later lookups fail.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Entries in all runs: filed responses within retention or not yet swept (metrics).
    pub fn rows(&self) -> u64 {
        self.runs().iter().map(|r| r.entries).sum()
    }

    /// Runs open (metrics and tests).
    pub fn run_count(&self) -> usize {
        self.runs().len()
    }

    /// Bytes of memory the runs' filters and block keys hold (metrics).
    pub fn memory_bytes(&self) -> usize {
        self.runs()
            .iter()
            .map(|r| {
                r.block_first_keys.capacity() * 16
                    + r.filter.as_ref().map_or(0, |f| f.fingerprints.len())
            })
            .sum()
    }

    /// Where the response with key id `id` is, if filed: the newest run that has it.
    pub fn get(&self, id: u128) -> Result<Option<FiledRef>, ArchiveError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(ArchiveError::Index {
                path: self.dir.clone(),
                reason: "the engine is shutting down".into(),
            });
        }
        for run in self.runs().iter().rev() {
            if let Some(f) = run.get(id)? {
                return Ok(Some(f));
            }
        }
        Ok(None)
    }

    /// Indexes the records of segment `segment` (one no run covers) as one run, durably,
    /// and publishes it in its place by segment number (a snapshot's segment is the newest;
    /// at open, a rebuilt one may sit between others). `records` are `(key id, place)` in
    /// storage order: of two records with one key id, the later wins.
    pub fn add(&self, segment: u32, records: &[(u128, FiledRef)]) -> Result<(), ArchiveError> {
        let mut sorted: Vec<(u128, FiledRef)> = records.to_vec();
        // Stable: equal ids stay in storage order, and the last of each is kept.
        sorted.sort_by_key(|(id, _)| *id);
        let mut w = RunWriter::create(&self.dir, segment, segment)?;
        for (i, (id, f)) in sorted.iter().enumerate() {
            assert_eq!(f.segment, segment, "a record of the segment being added");
            if sorted.get(i + 1).is_some_and(|(next, _)| next == id) {
                continue;
            }
            w.push(*id, f)?;
        }
        let run = Arc::new(w.finish()?);
        {
            let mut guard = self.runs.lock().expect("not poisoned");
            let mut next: Vec<Arc<Run>> = guard.as_ref().clone();
            let at = next.partition_point(|r| r.first_segment < segment);
            next.insert(at, run);
            assert!(next.len() <= RUNS_MAX, "the merge policy bounds the runs");
            assert!(
                next.windows(2)
                    .all(|w| w[0].last_segment < w[1].first_segment),
                "a segment is indexed by one run only"
            );
            *guard = Arc::new(next);
        }
        self.files.lock().expect("not poisoned").insert(segment);
        Ok(())
    }

    /// Retention and upkeep, once per snapshot: forgets `deleted` segments (files already
    /// gone), deletes runs whose newest entry is before `cutoff_ms`, merges the newest runs
    /// (see the module doc). Returns (entries removed, segments whose newest record is
    /// before the cutoff: the caller deletes them at the next snapshot).
    pub fn expire(
        &self,
        cutoff_ms: u64,
        deleted: &[u32],
    ) -> Result<(usize, Vec<u32>), ArchiveError> {
        {
            let mut files = self.files.lock().expect("not poisoned");
            for s in deleted {
                files.remove(s);
            }
        }
        let mut removed = 0u64;
        let runs = self.runs();
        let gone: Vec<Arc<Run>> = runs
            .iter()
            .filter(|r| r.max_at_ms < cutoff_ms)
            .cloned()
            .collect();
        if !gone.is_empty() {
            removed += gone.iter().map(|r| r.entries).sum::<u64>();
            self.replace(&gone, None);
            for r in &gone {
                std::fs::remove_file(&r.path).map_err(io_err(&r.path))?;
            }
            wal::fsync_dir(&self.dir)?;
        }
        // Each merge removes a run: bounded by their number.
        for _ in 0..RUNS_MAX {
            let runs = self.runs();
            let n = runs.len();
            if n < 2 {
                break;
            }
            let (older, newer) = (&runs[n - 2], &runs[n - 1]);
            if older.entries > newer.entries
                || older.entries + newer.entries > self.merge_entries_max
            {
                break;
            }
            let merged = Arc::new(self.merge(older, newer, cutoff_ms)?);
            removed += older.entries + newer.entries - merged.entries;
            self.replace(&[Arc::clone(older), Arc::clone(newer)], Some(merged));
            // Lookups holding the old list still read the unlinked files.
            for r in [older, newer] {
                std::fs::remove_file(&r.path).map_err(io_err(&r.path))?;
            }
            wal::fsync_dir(&self.dir)?;
        }
        let live = self.live_segments(cutoff_ms);
        let files = self.files.lock().expect("not poisoned");
        let dead: Vec<u32> = files
            .iter()
            .copied()
            .filter(|s| !live.contains_key(s))
            .collect();
        Ok((removed as usize, dead))
    }

    /// Swaps runs in the published list: `old` leave, `new` (if any) goes in its place by
    /// segment number. Lookups holding the previous list keep reading its files.
    fn replace(&self, old: &[Arc<Run>], new: Option<Arc<Run>>) {
        let mut guard = self.runs.lock().expect("not poisoned");
        let mut next: Vec<Arc<Run>> = guard
            .iter()
            .filter(|r| !old.iter().any(|o| Arc::ptr_eq(o, r)))
            .cloned()
            .collect();
        assert_eq!(
            next.len() + old.len(),
            guard.len(),
            "the runs replaced were listed"
        );
        if let Some(run) = new {
            let at = next.partition_point(|r| r.first_segment < run.first_segment);
            next.insert(at, run);
        }
        assert!(
            next.windows(2)
                .all(|w| w[0].last_segment < w[1].first_segment),
            "runs cover disjoint, ascending segment ranges"
        );
        *guard = Arc::new(next);
    }

    /// One run of two adjacent ones: the newer record of a key wins, expired ones go.
    fn merge(&self, older: &Run, newer: &Run, cutoff_ms: u64) -> Result<Run, ArchiveError> {
        assert!(
            older.last_segment < newer.first_segment,
            "adjacent, in order"
        );
        let mut w = RunWriter::create(&self.dir, older.first_segment, newer.last_segment)?;
        let (mut a, mut b) = (RunReader::new(older), RunReader::new(newer));
        // Bounded by the two runs' entries: every step takes at least one.
        loop {
            let next = match (a.peek()?.map(|e| e.0), b.peek()?.map(|e| e.0)) {
                (None, None) => break,
                (Some(_), None) => a.take(),
                (None, Some(_)) => b.take(),
                (Some(x), Some(y)) if x < y => a.take(),
                (Some(x), Some(y)) if x > y => b.take(),
                (Some(_), Some(_)) => {
                    a.take();
                    b.take()
                }
            };
            let (id, f) = next.expect("peeked");
            if f.at_ms >= cutoff_ms {
                w.push(id, &f)?;
            }
        }
        w.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn place(segment: u32, i: u64, at_ms: u64) -> FiledRef {
        FiledRef {
            fingerprint: [(i % 251) as u8; 32],
            at_ms,
            segment,
            len: 100 + i as u32,
            offset: i * 200,
        }
    }

    /// A tiny deterministic generator (xorshift): random-looking key ids without a crate.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    fn open(data: &Path) -> ResponseIndex {
        let present = crate::engine::response_files::open_dir(data).unwrap();
        ResponseIndex::open(data, &present).unwrap()
    }

    /// Many filings, some keys stored again in later segments, retention moving: after
    /// every step each key answers with its newest unexpired place (or, expired, with
    /// nothing a caller would use), merges keep the runs few, capped runs stop growing,
    /// and a reopen from the files answers the same.
    #[test]
    fn runs_answer_like_a_map_through_merges_expiry_and_reopen() {
        let data = tempfile::tempdir().unwrap();
        let mut index = open(data.path());
        index.merge_entries_max = 1500;
        let mut model: HashMap<u128, FiledRef> = HashMap::new();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut keys: Vec<u128> = Vec::new();
        let mut now_ms = 1_000u64;
        let retention_ms = 40_000u64;
        for segment in 1..=60u32 {
            now_ms += 1_000;
            let mut records = Vec::new();
            for i in 0..(50 + next(&mut rng) % 150) {
                // One in ten stores a key seen before again (after its expiry, in the
                // server; here any time: the newer place must win either way).
                let id = if !keys.is_empty() && next(&mut rng) % 10 == 0 {
                    keys[(next(&mut rng) % keys.len() as u64) as usize]
                } else {
                    let id = (u128::from(next(&mut rng)) << 64) | u128::from(next(&mut rng));
                    keys.push(id);
                    id
                };
                let f = place(segment, i, now_ms);
                records.push((id, f));
                model.insert(id, f);
            }
            index.add(segment, &records).unwrap();
            let cutoff_ms = now_ms.saturating_sub(retention_ms);
            let (_, dead) = index.expire(cutoff_ms, &[]).unwrap();
            model.retain(|_, f| f.at_ms >= cutoff_ms);
            let runs = index.runs();
            assert!(runs.len() <= 16, "{} runs", runs.len());
            for r in runs.iter() {
                assert!(r.entries <= 1500 || r.first_segment == r.last_segment);
            }
            for (id, f) in &model {
                assert_eq!(index.get(*id).unwrap(), Some(*f), "segment {segment}");
            }
            for s in dead {
                assert!(
                    model.values().all(|f| f.segment != s),
                    "a dead segment is unused"
                );
            }
        }
        let merged = index
            .runs()
            .iter()
            .filter(|r| r.first_segment < r.last_segment)
            .count();
        assert!(
            merged >= 2,
            "merges reached the cap more than once: {merged}"
        );
        // Keys never stored: none found (the filters and the block search agree).
        for _ in 0..2000 {
            let id = (u128::from(next(&mut rng)) << 64) | u128::from(next(&mut rng));
            assert_eq!(index.get(id).unwrap(), None);
        }
        assert!(index.rows() >= model.len() as u64);
        assert!(index.memory_bytes() > 0);
        let runs_before = index.run_count();
        drop(index);
        let reopened = open(data.path());
        assert_eq!(reopened.run_count(), runs_before);
        // Only runs that expired whole left their segments uncovered.
        for s in reopened.uncovered(&(1..=60).collect::<Vec<_>>()) {
            assert!(model.values().all(|f| f.segment != s), "segment {s}");
        }
        for (id, f) in &model {
            assert_eq!(reopened.get(*id).unwrap(), Some(*f));
        }
        reopened.close();
        assert!(reopened.get(1).is_err(), "closed: lookups fail");
    }

    /// A merge that crashed after writing its output and before deleting its inputs: the
    /// inputs are deleted at open. A run overlapping another in part is damage.
    #[test]
    fn open_deletes_merge_inputs_and_refuses_partial_overlap() {
        let data = tempfile::tempdir().unwrap();
        let index = open(data.path());
        index.add(1, &[(5, place(1, 0, 10))]).unwrap();
        index.add(2, &[(7, place(2, 1, 20))]).unwrap();
        let dir = responses_dir(data.path());
        let (a, b) = (run_path(&dir, 1, 1), run_path(&dir, 2, 2));
        let (a_bytes, b_bytes) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        index.expire(0, &[]).unwrap();
        assert_eq!(index.run_count(), 1, "equal runs merge");
        assert!(!a.exists() && !b.exists() && run_path(&dir, 1, 2).exists());
        drop(index);
        std::fs::write(&a, &a_bytes).unwrap();
        std::fs::write(&b, &b_bytes).unwrap();
        let index = open(data.path());
        assert_eq!(index.run_count(), 1);
        assert!(!a.exists() && !b.exists(), "the merge's inputs are deleted");
        assert_eq!(index.get(7).unwrap().map(|f| f.segment), Some(2));
        index.add(3, &[(9, place(3, 0, 30))]).unwrap();
        drop(index);
        std::fs::copy(run_path(&dir, 3, 3), run_path(&dir, 2, 3)).unwrap();
        let present = crate::engine::response_files::open_dir(data.path()).unwrap();
        assert!(ResponseIndex::open(data.path(), &present).is_err());
    }

    /// Every part of a run file is checked when it is opened.
    #[test]
    fn a_run_that_does_not_validate_is_dropped_at_open() {
        let data = tempfile::tempdir().unwrap();
        let index = open(data.path());
        let records: Vec<(u128, FiledRef)> = (0..200u64)
            .map(|i| (u128::from(i) * 7 + 1, place(1, i, 10)))
            .collect();
        index.add(1, &records).unwrap();
        drop(index);
        let path = run_path(&responses_dir(data.path()), 1, 1);
        let good = std::fs::read(&path).unwrap();
        assert_eq!(
            good.len(),
            5 * BLOCK_BYTES,
            "a header and four blocks of 56"
        );
        for at in [
            3,
            30,
            BLOCK_BYTES + 1,
            BLOCK_BYTES + 100,
            4 * BLOCK_BYTES + 9,
        ] {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            std::fs::write(&path, &bad).unwrap();
            let index = open(data.path());
            assert_eq!(index.run_count(), 0, "damage at byte {at}");
            assert!(!path.exists());
            assert_eq!(index.uncovered(&[1]), vec![1], "left to rebuild");
        }
        // Cut short.
        std::fs::write(&path, &good[..good.len() - BLOCK_BYTES]).unwrap();
        assert_eq!(open(data.path()).run_count(), 0);
        std::fs::write(&path, &good).unwrap();
        let index = open(data.path());
        for (id, f) in &records {
            assert_eq!(index.get(*id).unwrap(), Some(*f));
            assert_eq!(index.get(id + 1).unwrap(), None);
        }
    }
}
