//! The access log (SPEC §7): every download, link use and embed, allowed or denied.
//!
//! Each entry is a WAL record (`Record::Access`) made durable before the response it
//! describes is sent, so after a kill -9 the log holds every access up to the last one
//! answered. In memory the newest `entries_max` entries are kept (indexed per tenant);
//! older ones leave memory and, once a snapshot covers them, the log.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::ids::{AccessId, KeyId, TenantId, VideoId};

/// Longest user agent kept.
pub const USER_AGENT_BYTES_MAX: usize = 512;

/// How a video was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum AccessKind {
    /// `GET /v1/videos/{id}/content` with an API key.
    Download,
    /// `GET /v/{id}?exp&sig`: a signed link.
    Link,
    /// `GET /embed/{id}?exp&sig`: the embed page.
    Embed,
}

impl AccessKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AccessKind::Download => "download",
            AccessKind::Link => "link",
            AccessKind::Embed => "embed",
        }
    }

    pub fn parse(s: &str) -> Option<AccessKind> {
        match s {
            "download" => Some(AccessKind::Download),
            "link" => Some(AccessKind::Link),
            "embed" => Some(AccessKind::Embed),
            _ => None,
        }
    }
}

/// One access.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct AccessEntry {
    pub id: AccessId,
    pub tenant: TenantId,
    pub video: VideoId,
    pub kind: AccessKind,
    pub allowed: bool,
    /// Why it was denied (a problem code), or which rendition was served.
    pub detail: String,
    /// The requesting page's host (`Origin`/`Referer`), when one was sent.
    pub domain: Option<String>,
    /// The peer address.
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    /// The API key of a download.
    pub key: Option<KeyId>,
    pub at_ms: u64,
}

/// Which entries a query wants.
#[derive(Debug, Clone, Default)]
pub struct AccessFilter {
    pub tenant: Option<TenantId>,
    pub video: Option<VideoId>,
    pub kind: Option<AccessKind>,
    pub allowed: Option<bool>,
    pub from_ms: Option<u64>,
    pub to_ms: Option<u64>,
}

impl AccessFilter {
    fn keeps(&self, e: &AccessEntry) -> bool {
        self.video.is_none_or(|v| e.video == v)
            && self.kind.is_none_or(|k| e.kind == k)
            && self.allowed.is_none_or(|a| e.allowed == a)
            && self.from_ms.is_none_or(|f| e.at_ms >= f)
            && self.to_ms.is_none_or(|t| e.at_ms < t)
    }
}

/// The in-memory part of the log.
#[derive(Debug)]
pub struct AccessLog {
    /// Shared so that a snapshot takes the whole log under the lock as pointer copies and
    /// makes its deep copies after releasing it: copying 200,000 entries' strings under the
    /// lock held every download (and the request threads they block) for 100–300 ms.
    entries: BTreeMap<AccessId, Arc<AccessEntry>>,
    by_tenant: HashMap<TenantId, BTreeSet<AccessId>>,
    /// LSN of the last entry applied (replay skips those at or below).
    pub last_lsn: u64,
    entries_max: usize,
}

impl AccessLog {
    pub fn new(entries_max: usize) -> Self {
        AccessLog {
            entries: BTreeMap::new(),
            by_tenant: HashMap::new(),
            last_lsn: 0,
            entries_max: entries_max.max(1),
        }
    }

    /// The entries of a snapshot image, the last of which was at `last_lsn`.
    pub fn restore(&mut self, entries: Vec<AccessEntry>, last_lsn: u64) {
        for e in entries {
            self.insert(e);
        }
        self.last_lsn = last_lsn;
    }

    /// Adds an entry (live under the engine's lock, or in replay), dropping the oldest
    /// beyond the bound.
    pub fn apply(&mut self, e: AccessEntry, lsn: u64) {
        debug_assert!(lsn > self.last_lsn, "entries apply in LSN order");
        self.last_lsn = lsn;
        self.insert(e);
    }

    fn insert(&mut self, e: AccessEntry) {
        self.by_tenant.entry(e.tenant).or_default().insert(e.id);
        self.entries.insert(e.id, Arc::new(e));
        while self.entries.len() > self.entries_max {
            let (id, old) = self.entries.pop_first().expect("longer than the bound");
            if let Some(set) = self.by_tenant.get_mut(&old.tenant) {
                set.remove(&id);
                if set.is_empty() {
                    self.by_tenant.remove(&old.tenant);
                }
            }
        }
    }

    /// Entries newest first below `before`, passing `filter`; at most `scan_max` looked at.
    pub fn page(
        &self,
        filter: &AccessFilter,
        before: Option<AccessId>,
        limit: usize,
        scan_max: usize,
    ) -> Vec<AccessEntry> {
        let upper = before.unwrap_or(AccessId(u128::MAX));
        let ids: Box<dyn Iterator<Item = &AccessId>> = match filter.tenant {
            Some(t) => match self.by_tenant.get(&t) {
                Some(set) => Box::new(set.range(..upper).rev()),
                None => return Vec::new(),
            },
            None => Box::new(self.entries.range(..upper).rev().map(|(id, _)| id)),
        };
        ids.take(scan_max)
            .filter_map(|id| self.entries.get(id))
            .filter(|e| filter.keeps(e))
            .take(limit)
            .map(|e| AccessEntry::clone(e))
            .collect()
    }

    /// Every entry kept, oldest first (snapshots): pointer copies only, so the caller's
    /// lock is held for one pass over the map, not for copying every entry's strings.
    pub fn image(&self) -> Vec<Arc<AccessEntry>> {
        self.entries.values().map(Arc::clone).collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u128, tenant: u128, allowed: bool) -> AccessEntry {
        AccessEntry {
            id: AccessId(id),
            tenant: TenantId(tenant),
            video: VideoId(1),
            kind: AccessKind::Link,
            allowed,
            detail: String::new(),
            domain: None,
            ip: None,
            user_agent: None,
            key: None,
            at_ms: id as u64,
        }
    }

    #[test]
    fn bounded_newest_first_filtered() {
        let mut log = AccessLog::new(3);
        for i in 1..=5 {
            log.apply(entry(i, i % 2, i % 2 == 0), i as u64);
        }
        assert_eq!(log.len(), 3);
        let all = log.page(&AccessFilter::default(), None, 10, 100);
        assert_eq!(
            all.iter().map(|e| e.id.0).collect::<Vec<_>>(),
            vec![5, 4, 3]
        );
        let t1 = AccessFilter {
            tenant: Some(TenantId(1)),
            ..Default::default()
        };
        assert_eq!(log.page(&t1, None, 10, 100).len(), 2);
        let denied = AccessFilter {
            allowed: Some(false),
            ..Default::default()
        };
        assert_eq!(log.page(&denied, Some(AccessId(5)), 10, 100).len(), 1);
    }

    /// A snapshot's image shares the entries (no copy under the caller's lock), oldest
    /// first, and an image taken before later appends and evictions keeps what it took.
    #[test]
    fn the_image_shares_entries_and_restores_the_same_log() {
        let mut log = AccessLog::new(3);
        for i in 1..=4 {
            log.apply(entry(i, 1, true), i as u64);
        }
        let image = log.image();
        assert_eq!(
            image.iter().map(|e| e.id.0).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        assert!(
            image.iter().all(|e| Arc::strong_count(e) == 2),
            "shared, not copied"
        );
        log.apply(entry(5, 1, true), 5);
        assert_eq!(image.len(), 3, "later appends do not reach a taken image");
        assert_eq!(
            Arc::strong_count(&image[0]),
            1,
            "evicted: only the image holds it"
        );
        let mut restored = AccessLog::new(3);
        restored.restore(image.iter().map(|e| AccessEntry::clone(e)).collect(), 4);
        assert_eq!(restored.last_lsn, 4);
        let page = restored.page(&AccessFilter::default(), None, 10, 100);
        assert_eq!(
            page.iter().map(|e| e.id.0).collect::<Vec<_>>(),
            vec![4, 3, 2]
        );
        assert_eq!(page[2], *image[0], "the same entry, by value");
    }
}
