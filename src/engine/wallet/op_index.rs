//! The operation index: which ledger entry each old request-keyed wallet operation
//! (top-up, adjustment) made, on disk and read through a bounded page cache, so a wallet
//! keeps in memory only the keys of the operations still in its ledger tail however many
//! top-ups it has had.
//!
//! ```text
//! <data>/archive/ops.redb, tables:
//!   ops   (tenant u128, request id str) → (seq u64, grant kind u8, grant expiry u64)
//!         kind 0: not known (rebuilt from the history file), 1 paid, 2 promotional,
//!         3 adjustment; expiry u64::MAX: none
//!   meta  name str → u64: format
//! ```
//!
//! Who writes: only the snapshot, when it files a wallet's older ledger entries
//! (`Engine::compact_wallets`): the history page is synced, then the operations of its
//! entries are added here (committed durably), and only then does the wallet drop them
//! from memory. A crash before the commit leaves them in the wallet's memory (the image
//! or the log has them); a crash after it leaves them in both, which agree.
//!
//! A missing or unusable index is rebuilt from the history file (every page's top-up and
//! adjustment entries carry their request id). The grant kind and expiry of a top-up are
//! not in its entry, so rebuilt rows do not know them: a repeat of such a top-up whose
//! grant is also gone from memory is then checked on its amount alone.

use std::path::{Path, PathBuf};

use redb::{ReadableTable, TableDefinition};

use crate::engine::batch::archive::ArchiveError;
use crate::engine::batch::index::Db;
use crate::engine::wallet::history::HistoryPage;
use crate::engine::wallet::ledger::EntryKind;
use crate::engine::wallet::state::GrantKind;
use crate::ids::TenantId;

/// Version of the layout (`meta.format`); another one is rebuilt.
const FORMAT: u64 = 1;
/// The page cache: the index's whole resident memory.
const CACHE_BYTES: usize = 16 << 20;
/// Rows written per transaction while rebuilding.
const REBUILD_ROWS_PER_TX: usize = 50_000;

type Row = (u64, u8, u64);
const OPS: TableDefinition<(u128, &str), Row> = TableDefinition::new("ops");

/// A filed operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpRow {
    /// The ledger entry it made.
    pub seq: u64,
    /// For a top-up: the kind and expiry of the grant it created, when known.
    pub grant: Option<(GrantKind, Option<u64>)>,
}

fn encode(r: &OpRow) -> Row {
    match r.grant {
        None => (r.seq, 0, u64::MAX),
        Some((kind, expires)) => (
            r.seq,
            match kind {
                GrantKind::Paid => 1,
                GrantKind::Promotional => 2,
                GrantKind::Adjustment => 3,
            },
            expires.unwrap_or(u64::MAX),
        ),
    }
}

fn decode((seq, kind, expires): Row) -> OpRow {
    let kind = match kind {
        1 => Some(GrantKind::Paid),
        2 => Some(GrantKind::Promotional),
        3 => Some(GrantKind::Adjustment),
        _ => None,
    };
    OpRow {
        seq,
        grant: kind.map(|k| (k, (expires != u64::MAX).then_some(expires))),
    }
}

/// The index file of a data directory.
pub fn op_index_path(data_dir: &Path) -> PathBuf {
    data_dir.join("archive").join("ops.redb")
}

/// The open index.
pub(crate) struct OpIndex {
    /// The database (its own page cache, bounded by `CACHE_BYTES`).
    db: Db,
}

impl OpIndex {
    /// Opens the index; one that is missing, unusable or of another format is rebuilt from
    /// the history file (streamed: a page at a time).
    pub(crate) fn open(data_dir: &Path) -> Result<OpIndex, ArchiveError> {
        let (db, usable) = Db::open(&op_index_path(data_dir), CACHE_BYTES, FORMAT)?;
        let index = OpIndex { db };
        if usable {
            return Ok(index);
        }
        let mut rows: Vec<(TenantId, String, OpRow)> = Vec::new();
        crate::engine::wallet::history::visit_pages(data_dir, &mut |page| {
            rows.extend(ops_of(&page, |_| None));
            if rows.len() >= REBUILD_ROWS_PER_TX {
                index.add(&rows)?;
                rows.clear();
            }
            Ok(())
        })?;
        index.add(&rows)?;
        // Only now: a rebuild cut short starts again at the next open.
        index.db.write_format(FORMAT)?;
        Ok(index)
    }

    /// Closes the file (engine shutdown); later calls fail.
    pub(crate) fn close(&self) {
        self.db.close();
    }

    /// See `Db::cache_stats`.
    pub(crate) fn cache_stats(&self) -> Option<(usize, u64)> {
        self.db.cache_stats()
    }

    /// Adds operations (a key already present gets the same entry again: a page filed
    /// twice after a crash holds the same entries) and commits durably.
    pub(crate) fn add(&self, rows: &[(TenantId, String, OpRow)]) -> Result<(), ArchiveError> {
        let tx = self.db.begin_write()?;
        {
            let mut ops = tx.open_table(OPS).map_err(|e| self.db.err(e))?;
            for (tenant, request_id, row) in rows {
                let old = ops
                    .insert((tenant.0, request_id.as_str()), encode(row))
                    .map_err(|e| self.db.err(e))?
                    .map(|v| decode(v.value()));
                // One key, one entry, forever: a key filed again names the same entry.
                assert!(
                    old.is_none_or(|o| o.seq == row.seq),
                    "operation {request_id} of {tenant} names one ledger entry"
                );
            }
        }
        tx.commit()
    }

    /// The filed operation `request_id` of `tenant`.
    pub(crate) fn get(
        &self,
        tenant: TenantId,
        request_id: &str,
    ) -> Result<Option<OpRow>, ArchiveError> {
        self.db.read(
            |tx| {
                let ops = tx.open_table(OPS)?;
                let found = ops.get((tenant.0, request_id))?.map(|v| decode(v.value()));
                Ok(found)
            },
            None,
        )
    }
}

/// The request-keyed operations among a page's entries, with what `grant` knows of the
/// grant each top-up created.
pub(crate) fn ops_of(
    page: &HistoryPage,
    grant: impl Fn(u32) -> Option<(GrantKind, Option<u64>)>,
) -> Vec<(TenantId, String, OpRow)> {
    page.entries
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::TopUp | EntryKind::Adjust))
        .filter_map(|e| {
            let request_id = e.request_id.clone()?;
            let grant = match e.kind {
                EntryKind::TopUp => e.grant.and_then(&grant),
                _ => None,
            };
            Some((page.tenant, request_id, OpRow { seq: e.seq, grant }))
        })
        .collect()
}
