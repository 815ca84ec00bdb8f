//! The stored-response index: where each filed idempotent response is (segment, offset,
//! fingerprint, time), on disk and read through a bounded page cache, so memory keeps only
//! the responses stored since the last snapshot however many keys are within retention.
//!
//! Like the archive index it is derived data: every row comes from a segment file
//! (`response_files`), and a missing or damaged index is rebuilt from the segments present
//! (`rebuild`). One `redb` file:
//! ```text
//! <data>/archive/responses.redb, tables:
//!   responses key id u128          → (segment u32, offset u64, len u32, at_ms u64, fingerprint [u8; 32])
//!   expiry    (at_ms u64, key id u128) → ()     retention sweeps, oldest first
//!   segments  segment u32          → records still pointing into it
//!   meta      name str → u64: format, rows
//! ```
//! Protocol: a snapshot writes a segment (whole, synced, renamed), then `add`s its records
//! here in one transaction, and only then drops them from memory. A segment the index
//! does not name was written by a snapshot that crashed before `add` and is deleted at
//! open (the log still holds its records). A segment whose count reaches 0 (every record
//! expired or stored again later) is deleted one snapshot later, so a request that read
//! its place just before is never left without the file.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use redb::{ReadableTable, TableDefinition};

use crate::engine::batch::archive::ArchiveError;
use crate::engine::batch::index::{Db, META};
use crate::engine::response_files::FiledRef;

/// Version of the layout (`meta.format`); another one is rebuilt from the segments.
const FORMAT: u64 = 1;
/// The page cache: the index's whole resident memory.
const CACHE_BYTES: usize = 16 << 20;
/// Rows one retention sweep removes at most (the rest wait for the next snapshot;
/// lookups already treat them as absent).
const EXPIRE_ROWS_MAX: usize = 500_000;

type Row = (u32, u64, u32, u64, [u8; 32]);
const RESPONSES: TableDefinition<u128, Row> = TableDefinition::new("responses");
const EXPIRY: TableDefinition<(u64, u128), ()> = TableDefinition::new("expiry");
const SEGMENTS: TableDefinition<u32, u64> = TableDefinition::new("segments");

fn row(f: &FiledRef) -> Row {
    (f.segment, f.offset, f.len, f.at_ms, f.fingerprint)
}

fn filed((segment, offset, len, at_ms, fingerprint): Row) -> FiledRef {
    FiledRef {
        fingerprint,
        at_ms,
        segment,
        len,
        offset,
    }
}

/// The index file of a data directory.
pub fn response_index_path(data_dir: &Path) -> PathBuf {
    data_dir.join("archive").join("responses.redb")
}

/// The open index.
pub(crate) struct ResponseIndex {
    /// The database (its own page cache, bounded by `CACHE_BYTES`).
    db: Db,
    /// Rows (metrics without a read), changed only after a commit.
    rows: Mutex<u64>,
}

impl ResponseIndex {
    /// Opens the index; `Ok((index, false))` when it is fresh or was unusable and replaced
    /// by an empty one, which the caller then fills from the segments (`rebuild`).
    pub(crate) fn open(data_dir: &Path) -> Result<(ResponseIndex, bool), ArchiveError> {
        let (db, usable) = Db::open(&response_index_path(data_dir), CACHE_BYTES, FORMAT)?;
        let index = ResponseIndex {
            db,
            rows: Mutex::new(0),
        };
        if usable {
            let rows = index.db.read(
                |tx| Ok(tx.open_table(META)?.get("rows")?.map_or(0, |v| v.value())),
                0,
            )?;
            *index.rows.lock().expect("not poisoned") = rows;
        }
        Ok((index, usable))
    }

    /// Closes the file (engine shutdown); later calls fail.
    pub(crate) fn close(&self) {
        self.db.close();
    }

    /// See `Db::cache_stats`.
    pub(crate) fn cache_stats(&self) -> Option<(usize, u64)> {
        self.db.cache_stats()
    }

    /// Marks the index complete after a rebuild from the segments.
    pub(crate) fn mark_complete(&self) -> Result<(), ArchiveError> {
        self.db.write_format(FORMAT)
    }

    /// Filed responses within retention or not yet swept (metrics).
    pub(crate) fn rows(&self) -> u64 {
        *self.rows.lock().expect("not poisoned")
    }

    /// Where the response with key id `id` is, if filed.
    pub(crate) fn get(&self, id: u128) -> Result<Option<FiledRef>, ArchiveError> {
        self.db.read(
            |tx| Ok(tx.open_table(RESPONSES)?.get(id)?.map(|v| filed(v.value()))),
            None,
        )
    }

    /// Segments the index names, with their live records.
    pub(crate) fn segments(&self) -> Result<Vec<(u32, u64)>, ArchiveError> {
        self.db.read(
            |tx| {
                let mut out = Vec::new();
                for r in tx.open_table(SEGMENTS)?.iter()? {
                    let (k, v) = r?;
                    out.push((k.value(), v.value()));
                }
                Ok(out)
            },
            Vec::new(),
        )
    }

    /// Indexes the records of segments, in storage order (`(key id, place)`; a later
    /// record of the same key replaces an earlier one, whose segment loses a record), and
    /// commits durably. Every segment named in `segments` gets a row, even one whose
    /// records were all replaced (it is then at 0 and deleted like an expired one).
    pub(crate) fn add(
        &self,
        segments: &[u32],
        records: &[(u128, FiledRef)],
    ) -> Result<(), ArchiveError> {
        let tx = self.db.begin_write()?;
        let mut rows = self.rows();
        {
            let mut responses = tx.open_table(RESPONSES).map_err(|e| self.db.err(e))?;
            let mut expiry = tx.open_table(EXPIRY).map_err(|e| self.db.err(e))?;
            let mut segs = tx.open_table(SEGMENTS).map_err(|e| self.db.err(e))?;
            for s in segments {
                if segs.get(*s).map_err(|e| self.db.err(e))?.is_none() {
                    segs.insert(*s, 0).map_err(|e| self.db.err(e))?;
                }
            }
            for (id, f) in records {
                assert!(
                    segments.contains(&f.segment),
                    "a record's segment is being added"
                );
                let old = responses
                    .insert(*id, row(f))
                    .map_err(|e| self.db.err(e))?
                    .map(|v| filed(v.value()));
                match old {
                    Some(old) => {
                        expiry
                            .remove((old.at_ms, *id))
                            .map_err(|e| self.db.err(e))?;
                        let n = segs
                            .get(old.segment)
                            .map_err(|e| self.db.err(e))?
                            .map_or(0, |v| v.value());
                        let n = n
                            .checked_sub(1)
                            .expect("a filed record's segment counts it");
                        segs.insert(old.segment, n).map_err(|e| self.db.err(e))?;
                    }
                    None => rows += 1,
                }
                expiry
                    .insert((f.at_ms, *id), ())
                    .map_err(|e| self.db.err(e))?;
                let n = segs
                    .get(f.segment)
                    .map_err(|e| self.db.err(e))?
                    .map_or(0, |v| v.value());
                segs.insert(f.segment, n + 1).map_err(|e| self.db.err(e))?;
            }
            let mut meta = tx.open_table(META).map_err(|e| self.db.err(e))?;
            meta.insert("rows", rows).map_err(|e| self.db.err(e))?;
        }
        tx.commit()?;
        *self.rows.lock().expect("not poisoned") = rows;
        Ok(())
    }

    /// Removes responses stored before `cutoff_ms` (at most `EXPIRE_ROWS_MAX`), and the
    /// rows of `deleted` segments (files already gone). Returns (responses removed,
    /// segments now at 0 records: the caller deletes them after the next snapshot).
    pub(crate) fn expire(
        &self,
        cutoff_ms: u64,
        deleted: &[u32],
    ) -> Result<(usize, Vec<u32>), ArchiveError> {
        let tx = self.db.begin_write()?;
        let mut rows = self.rows();
        let mut removed = 0usize;
        let mut empty = Vec::new();
        {
            let mut responses = tx.open_table(RESPONSES).map_err(|e| self.db.err(e))?;
            let mut expiry = tx.open_table(EXPIRY).map_err(|e| self.db.err(e))?;
            let mut segs = tx.open_table(SEGMENTS).map_err(|e| self.db.err(e))?;
            let due: Vec<(u64, u128)> = expiry
                .range(..(cutoff_ms, 0u128))
                .map_err(|e| self.db.err(e))?
                .take(EXPIRE_ROWS_MAX)
                .map(|r| r.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()
                .map_err(|e| self.db.err(e))?;
            for (at_ms, id) in due {
                expiry.remove((at_ms, id)).map_err(|e| self.db.err(e))?;
                let current = responses
                    .get(id)
                    .map_err(|e| self.db.err(e))?
                    .map(|v| filed(v.value()));
                // Only the row this expiry entry was made for (`add` moves the entry when
                // a key is stored again).
                let Some(f) = current.filter(|f| f.at_ms == at_ms) else {
                    continue;
                };
                responses.remove(id).map_err(|e| self.db.err(e))?;
                rows = rows.checked_sub(1).expect("rows counts every response");
                removed += 1;
                let n = segs
                    .get(f.segment)
                    .map_err(|e| self.db.err(e))?
                    .map_or(0, |v| v.value());
                segs.insert(
                    f.segment,
                    n.checked_sub(1).expect("segment counts its records"),
                )
                .map_err(|e| self.db.err(e))?;
            }
            for s in deleted {
                let n = segs
                    .remove(*s)
                    .map_err(|e| self.db.err(e))?
                    .map(|v| v.value());
                assert!(
                    matches!(n, Some(0) | None),
                    "only empty segments are deleted"
                );
            }
            for r in segs.iter().map_err(|e| self.db.err(e))? {
                let (k, v) = r.map_err(|e| self.db.err(e))?;
                if v.value() == 0 {
                    empty.push(k.value());
                }
            }
            let mut meta = tx.open_table(META).map_err(|e| self.db.err(e))?;
            meta.insert("rows", rows).map_err(|e| self.db.err(e))?;
        }
        tx.commit()?;
        *self.rows.lock().expect("not poisoned") = rows;
        Ok((removed, empty))
    }
}
