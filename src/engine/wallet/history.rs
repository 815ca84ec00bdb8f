//! Wallet history on disk: at each snapshot, a wallet's older ledger entries move to one
//! append-only file, and memory keeps per wallet only where each page is (`FiledPage`)
//! and the hash of the last filed entry (the chain continues from it). Ledger pages,
//! statements and repeats of old operations read pages back; reconciliation and the
//! offline tools read every page (`expand`).
//!
//! ```text
//! File: <data>/archive/ledger, its synced length in <data>/archive/ledger.durable: the
//!       batch archive's protocol (`batch::archive::RecordFile`: append, fdatasync in
//!       chunks, durable-length marker; a bad record before it refuses to start, after it
//!       is a torn tail and is cut).
//! Record: the engine's archive framing (`engine::framing`) around an rkyv HistoryPage.
//! ```
//!
//! Who writes: only the snapshot, after the log acknowledged every entry it files, and
//! before the image that references the pages is written; the live wallet drops the
//! entries only after the page is synced. A crash between the two leaves a page no image
//! references: dead bytes, never read (the log still holds those entries' events).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::engine::batch::archive::{ArchiveError, ArchiveRef, RecordFile};
use crate::engine::framing;
use crate::engine::wallet::ledger::LedgerEntry;
use crate::ids::TenantId;

/// Entries kept in memory after a filing: recent operations' repeats answer without a
/// read, and the chain's last hash and time stay at hand.
pub(crate) const TAIL_KEEP: usize = 16;
/// A wallet files only once it has this many entries beyond the tail: no tiny pages for
/// quiet tenants (an idle tenant is never filed at all).
pub(crate) const PAGE_ENTRIES_MIN: usize = 64;

/// One filing of a wallet's ledger: consecutive entries.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct HistoryPage {
    /// Owner (every read checks it).
    pub tenant: TenantId,
    /// Entries, in seq order, none missing.
    pub entries: Vec<LedgerEntry>,
}

/// Where a page is, and what reads need to know without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct FiledPage {
    /// Seq of the page's first entry.
    pub first_seq: u64,
    /// Entries in the page (≥ 1).
    pub entries: u32,
    /// Time of the first and the last entry (statements pick pages by time).
    pub first_at_ms: u64,
    pub last_at_ms: u64,
    /// Offset of the record's header in the file.
    pub offset: u64,
    /// Payload bytes.
    pub len: u32,
}

impl FiledPage {
    /// Seq of the page's last entry.
    pub fn last_seq(&self) -> u64 {
        self.first_seq + u64::from(self.entries) - 1
    }

    fn at(&self) -> ArchiveRef {
        ArchiveRef {
            offset: self.offset,
            len: self.len,
        }
    }
}

/// A wallet's filed history: the pages, oldest first, and the last filed entry's hash.
/// Boxed in `WalletState` so a wallet that never filed carries one pointer.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Filed {
    /// Pages in seq order, contiguous from seq 1.
    pub pages: Vec<FiledPage>,
    /// Hash of the last filed entry: the in-memory tail chains from it.
    pub last_hash: [u8; 32],
}

impl Filed {
    /// Entries filed (the seq of the last one).
    pub fn entries(&self) -> u64 {
        self.pages.last().map_or(0, FiledPage::last_seq)
    }

    /// The page holding `seq`, if it is filed.
    pub fn page_of(&self, seq: u64) -> Option<FiledPage> {
        let i = self.pages.partition_point(|p| p.last_seq() < seq);
        self.pages.get(i).copied().filter(|p| p.first_seq <= seq)
    }
}

/// The history file of a data directory.
pub fn history_path(data_dir: &Path) -> PathBuf {
    data_dir.join("archive").join("ledger")
}

fn decode_page(record: &[u8]) -> Result<HistoryPage, String> {
    let aligned = framing::payload(record)?;
    rkyv::from_bytes::<HistoryPage, rkyv::rancor::Error>(&aligned).map_err(|e| e.to_string())
}

/// At open only the framing is checked (crc, length, version): pages are decoded when read.
fn check_only(record: &[u8]) -> Result<(), String> {
    framing::payload(record).map(|_| ())
}

/// Checks that a page read back is the one a `FiledPage` describes.
fn check_page(tenant: TenantId, want: &FiledPage, page: &HistoryPage) -> Result<(), String> {
    let ok = page.tenant == tenant
        && page.entries.len() == want.entries as usize
        && page
            .entries
            .iter()
            .enumerate()
            .all(|(i, e)| e.seq == want.first_seq + i as u64)
        && page.entries.first().map(|e| e.at_ms) == Some(want.first_at_ms)
        && page.entries.last().map(|e| e.at_ms) == Some(want.last_at_ms);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "the page is not tenant {tenant}'s entries {}..={}",
            want.first_seq,
            want.last_seq()
        ))
    }
}

/// The open history file.
pub(crate) struct WalletHistory(RecordFile);

impl WalletHistory {
    /// Opens (or creates) the file, cutting a torn tail. Fails on damage in the middle.
    pub(crate) fn open(data_dir: &Path) -> Result<WalletHistory, ArchiveError> {
        let file = RecordFile::open(
            data_dir,
            history_path(data_dir),
            0,
            check_only,
            &mut |_, _| Ok(()),
        )?;
        Ok(WalletHistory(file))
    }

    /// Appends one page per wallet and syncs; returns where each went, in order.
    pub(crate) fn append(&self, pages: &[HistoryPage]) -> Result<Vec<FiledPage>, ArchiveError> {
        let payloads = pages.iter().map(|p| {
            assert!(!p.entries.is_empty(), "a page has entries");
            rkyv::to_bytes::<rkyv::rancor::Error>(p)
                .expect("serializing a page cannot fail")
                .to_vec()
        });
        let refs = self.0.append_durable(payloads)?;
        Ok(pages
            .iter()
            .zip(refs)
            .map(|(p, at)| FiledPage {
                first_seq: p.entries[0].seq,
                entries: u32::try_from(p.entries.len()).expect("a page is far below 4 G entries"),
                first_at_ms: p.entries[0].at_ms,
                last_at_ms: p.entries[p.entries.len() - 1].at_ms,
                offset: at.offset,
                len: at.len,
            })
            .collect())
    }

    /// Reads `page` of `tenant` back, checked against what it should hold.
    pub(crate) fn read(
        &self,
        tenant: TenantId,
        page: &FiledPage,
    ) -> Result<HistoryPage, ArchiveError> {
        let p = self.0.read(page.at(), decode_page)?;
        check_page(tenant, page, &p).map_err(|reason| ArchiveError::Invalid {
            path: self.0.path().to_path_buf(),
            offset: page.offset,
            reason,
        })?;
        Ok(p)
    }

    /// Bytes of valid records (metrics).
    pub(crate) fn bytes(&self) -> u64 {
        self.0.bytes()
    }
}

/// Hands every page of the history file to `visit`, oldest first, keeping none (the
/// operation index's rebuild). Pages no image references (a crash between a page's sync
/// and the image) are visited too: they hold entries the log replays the same way.
pub(crate) fn visit_pages(
    data_dir: &Path,
    visit: &mut dyn FnMut(HistoryPage) -> Result<(), ArchiveError>,
) -> Result<(), ArchiveError> {
    RecordFile::visit_read_only(history_path(data_dir), decode_page, &mut |_, p| visit(p))
}

/// Every page of a stopped server's history file, by offset (offline tools).
pub(crate) fn read_all(data_dir: &Path) -> Result<HashMap<u64, HistoryPage>, ArchiveError> {
    Ok(RecordFile::read_only(history_path(data_dir), decode_page)?
        .into_iter()
        .map(|(at, p)| (at.offset, p))
        .collect())
}

/// Puts every filed entry back in front of the tail (reconciliation, offline tools): the
/// wallet then looks as if nothing had been filed.
pub(crate) fn expand(
    w: &mut crate::engine::wallet::state::WalletState,
    mut read: impl FnMut(TenantId, &FiledPage) -> Result<HistoryPage, ArchiveError>,
) -> Result<(), ArchiveError> {
    let Some(filed) = w.filed.take() else {
        return Ok(());
    };
    let mut all = Vec::with_capacity(filed.entries() as usize + w.ledger.len());
    for p in &filed.pages {
        all.extend(read(w.tenant, p)?.entries);
    }
    all.append(&mut w.ledger);
    w.ledger = all;
    Ok(())
}

/// `read` for `expand` over `read_all`'s pages.
pub(crate) fn from_pages(
    pages: &HashMap<u64, HistoryPage>,
) -> impl FnMut(TenantId, &FiledPage) -> Result<HistoryPage, ArchiveError> + '_ {
    move |tenant, want| {
        let invalid = |reason: String| ArchiveError::Invalid {
            path: PathBuf::from("archive/ledger"),
            offset: want.offset,
            reason,
        };
        let p = pages
            .get(&want.offset)
            .ok_or_else(|| invalid("no valid page at this offset".into()))?;
        check_page(tenant, want, p).map_err(invalid)?;
        Ok(p.clone())
    }
}
