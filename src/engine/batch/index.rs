//! The archive index: what requests need to find an archived batch (where it is, its
//! listing entry, its request id, its videos), on disk and read through a bounded page
//! cache, so memory does not grow with the number of batches ever made.
//!
//! It is derived data: everything in it comes from the archive's records, and it can be
//! thrown away and rebuilt from them (`Engine::open` does that when it does not open or
//! disagrees with the archive). It lives in one `redb` file beside the archive:
//! ```text
//! <data>/archive/index.redb, tables:
//!   batches   batch id u128          → (tenant u128, offset u64, len u32, last_lsn u64)
//!   listing   (tenant u128, batch u128) → ()
//!   requests  (tenant u128, request id str) → (batch u128, fingerprint [u8; 32])
//!   videos    video id u128          → (tenant u128, batch u128, item u32)
//!   day_items (UTC day u64, tenant u128) → items created that day by archived batches
//!   day_key_credits (UTC day u64, key u128) → credits held that day by archived batches
//!   meta      name str → u64: format, covered_bytes, archived, items.<state>
//! ```
//! `covered_bytes` is the archive offset up to which every record is indexed; it moves in
//! the same transaction as the rows, so a crash leaves the index either before or after a
//! whole `add`. The snapshot adds records only after the archive synced them and recorded
//! its length, so `covered_bytes` never passes the archive's synced length; recovery
//! indexes whatever the archive holds beyond it (a crash between the two).
//!
//! Who writes: only the snapshot (under the engine's snapshot lock) and recovery. Readers
//! take a read transaction per lookup (MVCC: never blocked by the writer).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::engine::batch::archive::{ArchiveError, ArchiveRef};
use crate::engine::batch::state::{BatchState, Counts};
use crate::ids::{BatchId, KeyId, TenantId, VideoId};

/// Version of the index layout (`meta.format`); another one is rebuilt from the archive.
const FORMAT: u64 = 1;
/// The page cache: the index's whole resident memory, whatever its size on disk.
const CACHE_BYTES: usize = 32 << 20;
/// Listing pages and id scans read at most this many rows per call.
const LIST_ROWS_MAX: usize = 1000;

const BATCHES: TableDefinition<u128, (u128, u64, u32, u64)> = TableDefinition::new("batches");
const LISTING: TableDefinition<(u128, u128), ()> = TableDefinition::new("listing");
const REQUESTS: TableDefinition<(u128, &str), (u128, [u8; 32])> = TableDefinition::new("requests");
const VIDEOS: TableDefinition<u128, (u128, u128, u32)> = TableDefinition::new("videos");
const DAY_ITEMS: TableDefinition<(u64, u128), u64> = TableDefinition::new("day_items");
const DAY_KEY_CREDITS: TableDefinition<(u64, u128), u64> = TableDefinition::new("day_key_credits");
/// Every derived index's `meta` table (its `format` row marks it complete).
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Item states in `meta`, in `Counts` field order.
const COUNT_NAMES: [&str; 6] = [
    "items.total",
    "items.pending",
    "items.running",
    "items.succeeded",
    "items.failed",
    "items.canceled",
];

/// An archived batch as the index knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Indexed {
    /// Owner: every read checks it.
    pub tenant: TenantId,
    /// Where the record is.
    pub at: ArchiveRef,
    /// The archived state's last event: recovery skips the log's events at or below it.
    pub last_lsn: u64,
}

/// What the index covers, kept in memory so metrics never read the disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    /// Archive bytes indexed (every record before this offset).
    pub covered_bytes: u64,
    /// Batches indexed.
    pub archived: u64,
    /// Their items by state, in `COUNT_NAMES` order (u64: a day's items pass u32 soon).
    pub items: [u64; 6],
}

impl Totals {
    /// Counts one more archived batch with its items (the index's commit and the
    /// directory's chunks use this one rule).
    pub(crate) fn add_batch(&mut self, counts: &Counts) {
        self.archived += 1;
        for (t, x) in self.items.iter_mut().zip(count_fields(counts)) {
            *t = t.saturating_add(x);
        }
    }

    /// The item counts as the engine reports them.
    pub(crate) fn counts(&self) -> Counts {
        let c = |i: usize| u32::try_from(self.items[i]).unwrap_or(u32::MAX);
        Counts {
            total: c(0),
            pending: c(1),
            running: c(2),
            succeeded: c(3),
            failed: c(4),
            canceled: c(5),
        }
    }
}

fn count_fields(c: &Counts) -> [u64; 6] {
    [
        c.total.into(),
        c.pending.into(),
        c.running.into(),
        c.succeeded.into(),
        c.failed.into(),
        c.canceled.into(),
    ]
}

/// The open index.
pub(crate) struct ArchiveIndex {
    /// The database (its own page cache, bounded by `CACHE_BYTES`).
    db: Db,
    /// Mirrors `meta`; changed only with it, after the commit.
    totals: Mutex<Totals>,
}

/// The index file of a data directory.
pub fn index_path(data_dir: &Path) -> PathBuf {
    data_dir.join("archive").join("index.redb")
}

/// A derived-index database that can be closed while shared: `Engine::shutdown` closes it,
/// so the same process can open the data directory again (redb locks the file while it is
/// open). A transaction holds the read side of the lock, so closing waits for every one in
/// flight; after it, every transaction fails. Shared by the two B-tree indexes.
pub(crate) struct Db {
    /// `None` once closed.
    db: std::sync::RwLock<Option<Database>>,
    /// For error messages.
    path: PathBuf,
}

/// A write transaction and the hold on its database (the transaction drops first).
pub(crate) struct Tx<'a> {
    tx: redb::WriteTransaction,
    _open: std::sync::RwLockReadGuard<'a, Option<Database>>,
    db: &'a Db,
}

impl std::ops::Deref for Tx<'_> {
    type Target = redb::WriteTransaction;
    fn deref(&self) -> &redb::WriteTransaction {
        &self.tx
    }
}

impl Tx<'_> {
    /// Commits durably.
    pub(crate) fn commit(self) -> Result<(), ArchiveError> {
        let db = self.db;
        self.tx.commit().map_err(|e| db.err(e))
    }
}

impl Db {
    pub(crate) fn new(db: Database, path: &Path) -> Db {
        Db {
            db: std::sync::RwLock::new(Some(db)),
            path: path.to_path_buf(),
        }
    }

    /// Opens the derived index at `path` (its folder must exist). `(db, true)`: it carries
    /// `format` and can be used as it is. `(db, false)`: it was missing, unusable, of
    /// another format or never completed, and is now empty; the caller fills it from its
    /// source, then `write_format`.
    pub(crate) fn open(
        path: &Path,
        cache_bytes: usize,
        format: u64,
    ) -> Result<(Db, bool), ArchiveError> {
        let found = open_db(path, cache_bytes)?.and_then(|db| {
            let db = Db::new(db, path);
            match db.format().map_err(|e| e.to_string())? {
                Some(f) if f == format => Ok((db, true)),
                None => Ok((db, false)),
                Some(other) => Err(format!("format {other}, not {format}")),
            }
        });
        match found {
            Ok(x) => Ok(x),
            Err(reason) => {
                tracing::warn!(path = %path.display(), %reason, "derived index: rebuilding");
                remove_db(path)?;
                let db = open_db(path, cache_bytes)?.map_err(|reason| ArchiveError::Index {
                    path: path.to_path_buf(),
                    reason,
                })?;
                Ok((Db::new(db, path), false))
            }
        }
    }

    /// Marks the index complete (after it was filled from its source): until this row
    /// is written, an interrupted rebuild is started again at the next open.
    pub(crate) fn write_format(&self, format: u64) -> Result<(), ArchiveError> {
        let tx = self.begin_write()?;
        {
            let mut meta = tx.open_table(META).map_err(|e| self.err(e))?;
            meta.insert("format", format).map_err(|e| self.err(e))?;
        }
        tx.commit()
    }

    fn format(&self) -> Result<Option<u64>, ArchiveError> {
        self.read(
            |tx| Ok(tx.open_table(META)?.get("format")?.map(|v| v.value())),
            None,
        )
    }

    /// An index error about this file.
    pub(crate) fn err(&self, e: impl std::fmt::Display) -> ArchiveError {
        ArchiveError::Index {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    fn open_guard(&self) -> Result<std::sync::RwLockReadGuard<'_, Option<Database>>, ArchiveError> {
        let guard = self.db.read().expect("not poisoned");
        if guard.is_none() {
            return Err(self.err("the index is closed (the engine stopped)"));
        }
        Ok(guard)
    }

    /// Runs `f` in a read transaction. A table that does not exist yet (nothing was
    /// written to it) reads as `empty`.
    pub(crate) fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error>,
        empty: T,
    ) -> Result<T, ArchiveError> {
        let open = self.open_guard()?;
        let tx = open
            .as_ref()
            .expect("checked open")
            .begin_read()
            .map_err(|e| self.err(e))?;
        match f(&tx) {
            Ok(v) => Ok(v),
            Err(redb::Error::TableDoesNotExist(_)) => Ok(empty),
            Err(e) => Err(self.err(e)),
        }
    }

    /// A write transaction (commit it with `Tx::commit`).
    pub(crate) fn begin_write(&self) -> Result<Tx<'_>, ArchiveError> {
        let open = self.open_guard()?;
        let tx = open
            .as_ref()
            .expect("checked open")
            .begin_write()
            .map_err(|e| self.err(e))?;
        Ok(Tx {
            tx,
            _open: open,
            db: self,
        })
    }

    /// Closes the database (waits for transactions in flight).
    pub(crate) fn close(&self) {
        drop(self.db.write().expect("not poisoned").take());
    }

    /// The page cache's resident bytes and its evictions so far (metrics: the cache is
    /// bounded, so these show whether resident memory is the cache still filling).
    /// `None` once closed.
    pub(crate) fn cache_stats(&self) -> Option<(usize, u64)> {
        let guard = self.db.read().expect("not poisoned");
        let s = guard.as_ref()?.cache_stats();
        Some((s.used_bytes(), s.evictions()))
    }
}

/// Opens (or creates) a derived-index database with a page cache of `cache_bytes`; the
/// folder must exist (the archive index and the operation index). The inner error is a file
/// that cannot be used (the caller rebuilds it); the outer one a file another open engine
/// holds, which must never be rebuilt under it.
fn open_db(path: &Path, cache_bytes: usize) -> Result<Result<Database, String>, ArchiveError> {
    match Database::builder().set_cache_size(cache_bytes).create(path) {
        Ok(db) => Ok(Ok(db)),
        Err(e @ redb::DatabaseError::DatabaseAlreadyOpen) => Err(ArchiveError::Index {
            path: path.to_path_buf(),
            reason: format!("{e} (is another server using this data directory?)"),
        }),
        Err(e) => Ok(Err(e.to_string())),
    }
}

/// Deletes a derived-index database (to rebuild it), syncing its folder.
fn remove_db(path: &Path) -> Result<(), ArchiveError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ArchiveError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    wal::fsync_dir(path.parent().expect("an index path has a folder"))?;
    Ok(())
}

impl ArchiveIndex {
    /// Opens (or creates) the index. An index that does not open, or has another format,
    /// is replaced by an empty one (the caller then indexes the whole archive).
    pub(crate) fn open(data_dir: &Path) -> Result<ArchiveIndex, ArchiveError> {
        let path = index_path(data_dir);
        let dir = path.parent().expect("the index path has a folder");
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|source| ArchiveError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
            wal::fsync_dir(data_dir)?;
        }
        Self::open_at(&path)
    }

    fn open_at(path: &Path) -> Result<ArchiveIndex, ArchiveError> {
        let (db, usable) = Db::open(path, CACHE_BYTES, FORMAT)?;
        let index = ArchiveIndex {
            db,
            totals: Mutex::new(Totals::default()),
        };
        if usable {
            *index.totals.lock().expect("not poisoned") = index.read_meta()?;
        } else {
            index.db.write_format(FORMAT)?;
        }
        Ok(index)
    }

    /// Replaces the index with an empty one (damaged, another format, or ahead of the
    /// archive): the caller indexes the archive from its start.
    pub(crate) fn reset(self) -> Result<ArchiveIndex, ArchiveError> {
        let path = self.db.path.clone();
        drop(self);
        remove_db(&path)?;
        Self::open_at(&path)
    }

    fn read_meta(&self) -> Result<Totals, ArchiveError> {
        self.db.read(
            |tx| {
                let meta = tx.open_table(META)?;
                let get = |k: &str| -> Result<u64, redb::Error> {
                    Ok(meta.get(k)?.map_or(0, |v| v.value()))
                };
                let mut totals = Totals {
                    covered_bytes: get("covered_bytes")?,
                    archived: get("archived")?,
                    items: [0; 6],
                };
                for (i, name) in COUNT_NAMES.iter().enumerate() {
                    totals.items[i] = get(name)?;
                }
                Ok(totals)
            },
            Totals::default(),
        )
    }

    /// Closes the file (engine shutdown); later calls fail.
    pub(crate) fn close(&self) {
        self.db.close();
    }

    /// See `Db::cache_stats`.
    pub(crate) fn cache_stats(&self) -> Option<(usize, u64)> {
        self.db.cache_stats()
    }

    /// What the index covers now.
    pub(crate) fn totals(&self) -> Totals {
        *self.totals.lock().expect("not poisoned")
    }

    /// Indexes `records`, which must be the archive's records from `covered_bytes` up to
    /// `covered_to`, in order, and commits durably. Day counters older than the day before
    /// the newest batch's day are pruned in the same transaction (the caps look at today
    /// only; yesterday stays for batches created just before midnight).
    pub(crate) fn add(
        &self,
        records: &[(ArchiveRef, &BatchState)],
        covered_to: u64,
    ) -> Result<Totals, ArchiveError> {
        let mut totals = self.totals();
        // The records continue the archive exactly where the index stopped.
        let mut next = totals.covered_bytes;
        for (at, _) in records {
            assert_eq!(at.offset, next, "index records follow the archive in order");
            next = at.end();
        }
        assert_eq!(
            next, covered_to,
            "index records end where the coverage ends"
        );
        if records.is_empty() {
            return Ok(totals);
        }
        let tx = self.db.begin_write()?;
        let mut newest_day = 0u64;
        {
            let mut batches = tx.open_table(BATCHES).map_err(|e| self.db.err(e))?;
            let mut listing = tx.open_table(LISTING).map_err(|e| self.db.err(e))?;
            let mut requests = tx.open_table(REQUESTS).map_err(|e| self.db.err(e))?;
            let mut videos = tx.open_table(VIDEOS).map_err(|e| self.db.err(e))?;
            let mut day_items = tx.open_table(DAY_ITEMS).map_err(|e| self.db.err(e))?;
            let mut day_credits = tx.open_table(DAY_KEY_CREDITS).map_err(|e| self.db.err(e))?;
            for (at, s) in records {
                let fresh = batches
                    .insert(s.id.0, (s.tenant.0, at.offset, at.len, s.last_lsn))
                    .map_err(|e| self.db.err(e))?
                    .is_none();
                // The live server archives a batch once; a batch archived again would be
                // counted twice in the totals and the day counters.
                assert!(fresh, "batch {} is indexed once", s.id);
                listing
                    .insert((s.tenant.0, s.id.0), ())
                    .map_err(|e| self.db.err(e))?;
                if let Some(r) = &s.spec.request_id {
                    requests
                        .insert((s.tenant.0, r.as_str()), (s.id.0, s.spec.fingerprint))
                        .map_err(|e| self.db.err(e))?;
                }
                for (i, item) in s.items.iter().enumerate() {
                    if let Some(o) = &item.output {
                        videos
                            .insert(o.video.0, (s.tenant.0, s.id.0, i as u32))
                            .map_err(|e| self.db.err(e))?;
                    }
                }
                let day = s.created_at_ms / super::DAY_MS;
                newest_day = newest_day.max(day);
                let items = day_items
                    .get((day, s.tenant.0))
                    .map_err(|e| self.db.err(e))?
                    .map_or(0, |v| v.value());
                day_items
                    .insert((day, s.tenant.0), items.saturating_add(s.spec.items as u64))
                    .map_err(|e| self.db.err(e))?;
                if let Some(k) = s.spec.api_key {
                    let c = day_credits
                        .get((day, k.0))
                        .map_err(|e| self.db.err(e))?
                        .map_or(0, |v| v.value());
                    day_credits
                        .insert((day, k.0), c.saturating_add(s.spec.total()))
                        .map_err(|e| self.db.err(e))?;
                }
                totals.add_batch(&s.counts);
            }
            // Bounded: only today's and yesterday's counters stay.
            let cutoff = (newest_day.saturating_sub(1), 0u128);
            day_items
                .retain_in(..cutoff, |_, _| false)
                .map_err(|e| self.db.err(e))?;
            day_credits
                .retain_in(..cutoff, |_, _| false)
                .map_err(|e| self.db.err(e))?;
            totals.covered_bytes = covered_to;
            let mut meta = tx.open_table(META).map_err(|e| self.db.err(e))?;
            meta.insert("covered_bytes", totals.covered_bytes)
                .map_err(|e| self.db.err(e))?;
            meta.insert("archived", totals.archived)
                .map_err(|e| self.db.err(e))?;
            for (name, v) in COUNT_NAMES.iter().zip(totals.items) {
                meta.insert(*name, v).map_err(|e| self.db.err(e))?;
            }
        }
        tx.commit()?;
        *self.totals.lock().expect("not poisoned") = totals;
        Ok(totals)
    }

    /// The archived batch `id`.
    pub(crate) fn batch(&self, id: BatchId) -> Result<Option<Indexed>, ArchiveError> {
        self.db.read(
            |tx| {
                let t = tx.open_table(BATCHES)?;
                let found = t.get(id.0)?.map(|v| {
                    let (tenant, offset, len, last_lsn) = v.value();
                    Indexed {
                        tenant: TenantId(tenant),
                        at: ArchiveRef { offset, len },
                        last_lsn,
                    }
                });
                Ok(found)
            },
            None,
        )
    }

    /// Which of `ids` are archived (one read transaction for all).
    pub(crate) fn archived_among(&self, ids: &[BatchId]) -> Result<HashSet<BatchId>, ArchiveError> {
        self.db.read(
            |tx| {
                let t = tx.open_table(BATCHES)?;
                let mut out = HashSet::new();
                for id in ids {
                    if t.get(id.0)?.is_some() {
                        out.insert(*id);
                    }
                }
                Ok(out)
            },
            HashSet::new(),
        )
    }

    /// The archived video `id`: (owner, batch, item).
    pub(crate) fn video(
        &self,
        id: VideoId,
    ) -> Result<Option<(TenantId, BatchId, u32)>, ArchiveError> {
        self.db.read(
            |tx| {
                let t = tx.open_table(VIDEOS)?;
                let found = t.get(id.0)?.map(|v| {
                    let (tenant, batch, item) = v.value();
                    (TenantId(tenant), BatchId(batch), item)
                });
                Ok(found)
            },
            None,
        )
    }

    /// The archived batch the tenant created with request id `request_id`, and that
    /// request's fingerprint.
    pub(crate) fn request(
        &self,
        tenant: TenantId,
        request_id: &str,
    ) -> Result<Option<(BatchId, [u8; 32])>, ArchiveError> {
        self.db.read(
            |tx| {
                let t = tx.open_table(REQUESTS)?;
                let found = t.get((tenant.0, request_id))?.map(|v| {
                    let (batch, fp) = v.value();
                    (BatchId(batch), fp)
                });
                Ok(found)
            },
            None,
        )
    }

    /// The tenant's archived batches with id > `after`, in id order, at most `limit`
    /// (itself at most `LIST_ROWS_MAX`).
    pub(crate) fn list(
        &self,
        tenant: TenantId,
        after: Option<BatchId>,
        limit: usize,
    ) -> Result<Vec<BatchId>, ArchiveError> {
        let limit = limit.min(LIST_ROWS_MAX);
        let from = after.map_or(0, |a| a.0.saturating_add(1));
        if after.is_some_and(|a| a.0 == u128::MAX) {
            return Ok(Vec::new());
        }
        self.db.read(
            |tx| {
                let t = tx.open_table(LISTING)?;
                let mut out = Vec::with_capacity(limit);
                for row in t
                    .range((tenant.0, from)..=(tenant.0, u128::MAX))?
                    .take(limit)
                {
                    out.push(BatchId(row?.0.value().1));
                }
                Ok(out)
            },
            Vec::new(),
        )
    }

    /// Items and credits of archived batches by day, for days ≥ `from_day` (recovery puts
    /// them back into the daily caps' counters).
    #[allow(clippy::type_complexity)]
    pub(crate) fn days_from(
        &self,
        from_day: u64,
    ) -> Result<(Vec<((TenantId, u64), u64)>, Vec<((KeyId, u64), u64)>), ArchiveError> {
        self.db.read(
            |tx| {
                let mut items = Vec::new();
                for row in tx.open_table(DAY_ITEMS)?.range((from_day, 0u128)..)? {
                    let (k, v) = row?;
                    let (day, tenant) = k.value();
                    items.push(((TenantId(tenant), day), v.value()));
                }
                let mut credits = Vec::new();
                for row in tx.open_table(DAY_KEY_CREDITS)?.range((from_day, 0u128)..)? {
                    let (k, v) = row?;
                    let (day, key) = k.value();
                    credits.push(((KeyId(key), day), v.value()));
                }
                Ok((items, credits))
            },
            (Vec::new(), Vec::new()),
        )
    }

    /// Every archived batch and where it is, in id order (reconciliation: O(archive)).
    pub(crate) fn all(&self) -> Result<Vec<(BatchId, Indexed)>, ArchiveError> {
        self.db.read(
            |tx| {
                let t = tx.open_table(BATCHES)?;
                let mut out = Vec::new();
                for row in t.iter()? {
                    let (k, v) = row?;
                    let (tenant, offset, len, last_lsn) = v.value();
                    out.push((
                        BatchId(k.value()),
                        Indexed {
                            tenant: TenantId(tenant),
                            at: ArchiveRef { offset, len },
                            last_lsn,
                        },
                    ));
                }
                Ok(out)
            },
            Vec::new(),
        )
    }
}
