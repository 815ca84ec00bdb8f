//! Durable responses for `Idempotency-Key` (SPEC §5, §11).
//!
//! The first response to a state-changing request is recorded in the WAL with a
//! fingerprint of the request; a repeat within the retention gets it back verbatim, a
//! different request under the same key is refused, and a repeat while the first is still
//! running is told so. Keys are scoped: `scope` is the tenant id for customer requests and
//! 0 for the admin API. Records older than the retention are forgotten (and left out of
//! snapshots). The number of remembered keys is bounded; beyond it new keyed requests are
//! refused as unavailable rather than letting memory grow.
//!
//! This module knows nothing of HTTP: a response is a status, a content type and bytes.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::engine::batch::archive::ArchiveError;
use crate::engine::response_files::FiledRef;

/// A stored response.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct StoredResponse {
    /// Tenant id, or 0 for admin requests.
    pub scope: u128,
    /// The client's key.
    pub key: String,
    /// SHA-256 of the request (method, route, body): a different request is refused.
    pub fingerprint: [u8; 32],
    /// HTTP status.
    pub status: u16,
    /// `Content-Type` of `body`.
    pub content_type: String,
    /// The response body, verbatim.
    pub body: Vec<u8>,
    /// When it was stored (retention counts from here).
    pub at_ms: u64,
}

/// What a keyed request should do.
#[derive(Debug)]
pub enum Begin {
    /// First time: run it, then `complete` (or `abandon`) the slot.
    Fresh,
    /// Done before: send this back.
    Replay(Arc<StoredResponse>),
    /// The first request with this key is still running.
    InProgress,
    /// The key was used with a different request.
    Mismatch,
    /// Too many keys remembered: refuse for now.
    Full,
    /// The stored response could not be read back from its file (a server fault: the
    /// request is neither run again nor answered).
    Unreadable(String),
}

/// What the table says of a key, before any file is read.
enum Lookup {
    Ready(Begin),
    /// Stored on disk: read it, then check that it is this key's.
    Filed(FiledRef),
}

enum Slot {
    InFlight {
        fingerprint: [u8; 32],
    },
    /// Stored since the last snapshot: in memory until the next one files it.
    Done(Arc<StoredResponse>),
    /// In a segment file (`response_files`).
    Filed(FiledRef),
}

impl Slot {
    fn at_ms(&self) -> Option<u64> {
        match self {
            Slot::InFlight { .. } => None,
            Slot::Done(r) => Some(r.at_ms),
            Slot::Filed(f) => Some(f.at_ms),
        }
    }
}

/// A filed response as the snapshot image lists it.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct FiledResponse {
    /// `key_id` of its scope and key.
    pub id: u128,
    /// Where it is.
    pub at: FiledRef,
}

/// An image's response list as taken under the store's lock, in table order. The image
/// needs it in time order (`restore` rebuilds the expiry queue from it); sorting waits
/// until the lock is released, because idempotent requests queue behind that lock
/// (measured at the soak's rate with ≈ 300,000 records: taking the list 1–67 ms, sorting it
/// 3–22 ms more).
pub(crate) struct ImageList(Vec<FiledResponse>);

impl ImageList {
    /// The list in time order, ready for the image.
    pub(crate) fn into_sorted(self) -> Vec<FiledResponse> {
        let mut listed = self.0;
        listed.sort_unstable_by_key(|f| (f.at.at_ms, f.at.segment, f.at.offset));
        listed
    }
}

/// The table's key: the first 16 bytes of SHA-256(scope, key). Memory keeps 16 bytes per
/// key instead of the client's string; a read back from disk checks the real scope and
/// key, so even a collision could not hand one tenant another's response.
pub(crate) fn key_id(scope: u128, key: &str) -> u128 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(scope.to_le_bytes());
    h.update(key.as_bytes());
    let d = h.finalize();
    u128::from_le_bytes(d[..16].try_into().expect("16 bytes"))
}

/// The live table (behind the engine's mutex).
pub(crate) struct ResponseStore {
    /// key id → slot.
    slots: HashMap<u128, Slot>,
    /// Done and filed records in storage order, for expiry from the front.
    order: VecDeque<(u64, u128)>,
    /// Segment → how many slots point into it. A segment at 0 is deleted after the next
    /// image (which no longer references it) is durable.
    segments: BTreeMap<u32, u64>,
    /// The segments folder; `None` for the offline tools, which never read bodies.
    dir: Option<PathBuf>,
    /// Number of the next segment written.
    next_segment: u32,
    /// How long a response is kept.
    pub retention_ms: u64,
    /// Most slots (in flight and done) at once.
    pub keys_max: usize,
}

impl ResponseStore {
    pub(crate) fn new(retention_ms: u64, keys_max: usize) -> Self {
        ResponseStore {
            slots: HashMap::new(),
            order: VecDeque::new(),
            segments: BTreeMap::new(),
            dir: None,
            next_segment: 1,
            retention_ms,
            keys_max: keys_max.max(1),
        }
    }

    /// Drops a slot, keeping the segments' counts.
    fn remove(&mut self, id: u128) {
        if let Some(Slot::Filed(f)) = self.slots.remove(&id) {
            let n = self
                .segments
                .get_mut(&f.segment)
                .expect("a filed slot's segment is counted");
            *n = n.checked_sub(1).expect("segment count never goes below 0");
        }
    }

    /// Forgets records whose retention ended (amortised O(1): oldest first).
    pub(crate) fn expire(&mut self, now_ms: u64) {
        // Bounded by the queue's length; each record leaves once.
        while let Some((at, _)) = self.order.front() {
            if now_ms.saturating_sub(*at) < self.retention_ms {
                break;
            }
            let (at, id) = self.order.pop_front().expect("front exists");
            // A key stored again later (after expiry) has a newer record: keep it.
            if self.slots.get(&id).and_then(Slot::at_ms) == Some(at) {
                self.remove(id);
            }
        }
    }

    fn lookup(&mut self, scope: u128, key: &str, fp: [u8; 32], now_ms: u64) -> Lookup {
        self.expire(now_ms);
        let id = key_id(scope, key);
        let begin = match self.slots.get(&id) {
            Some(Slot::Done(r)) if r.scope != scope || r.key != key => Begin::Mismatch,
            Some(Slot::Done(r)) if r.fingerprint == fp => Begin::Replay(Arc::clone(r)),
            Some(Slot::Done(_)) => Begin::Mismatch,
            Some(Slot::Filed(f)) if f.fingerprint == fp => return Lookup::Filed(*f),
            Some(Slot::Filed(_)) => Begin::Mismatch,
            Some(Slot::InFlight { fingerprint }) if *fingerprint == fp => Begin::InProgress,
            Some(Slot::InFlight { .. }) => Begin::Mismatch,
            None if self.slots.len() >= self.keys_max => Begin::Full,
            None => {
                self.slots.insert(id, Slot::InFlight { fingerprint: fp });
                Begin::Fresh
            }
        };
        Lookup::Ready(begin)
    }

    /// What a keyed request should do, for the in-memory cases (tests).
    #[cfg(test)]
    fn begin(&mut self, scope: u128, key: &str, fp: [u8; 32], now_ms: u64) -> Begin {
        match self.lookup(scope, key, fp, now_ms) {
            Lookup::Ready(b) => b,
            Lookup::Filed(f) => Begin::Unreadable(format!("filed in segment {}", f.segment)),
        }
    }

    /// The request ran without changing state: the key is free again.
    pub(crate) fn abandon(&mut self, scope: u128, key: &str) {
        let id = key_id(scope, key);
        if matches!(self.slots.get(&id), Some(Slot::InFlight { .. })) {
            self.slots.remove(&id);
        }
    }

    /// Records a response (live after its WAL append, and in replay).
    pub(crate) fn insert(&mut self, r: StoredResponse, now_ms: u64) {
        let id = key_id(r.scope, &r.key);
        if now_ms.saturating_sub(r.at_ms) >= self.retention_ms {
            if matches!(self.slots.get(&id), Some(Slot::InFlight { .. })) {
                self.slots.remove(&id);
            }
            return;
        }
        // Replay of a record a snapshot already filed (stored after the image's LSN was
        // read, filed before the image was written): keep the filed copy.
        if let Some(Slot::Filed(f)) = self.slots.get(&id) {
            if f.at_ms == r.at_ms && f.fingerprint == r.fingerprint {
                return;
            }
        }
        self.remove(id);
        self.order.push_back((r.at_ms, id));
        self.slots.insert(id, Slot::Done(Arc::new(r)));
    }

    /// Remembered keys (metrics).
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Responses still in memory, in storage order (the next segment's contents), and the
    /// number that segment will have. `None` when nothing is due.
    pub(crate) fn due_for_filing(&mut self) -> Option<(u32, Vec<Arc<StoredResponse>>)> {
        let mut v: Vec<Arc<StoredResponse>> = self
            .slots
            .values()
            .filter_map(|s| match s {
                Slot::Done(r) => Some(Arc::clone(r)),
                _ => None,
            })
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| (a.at_ms, a.scope, &a.key).cmp(&(b.at_ms, b.scope, &b.key)));
        let segment = self.next_segment;
        self.next_segment = segment.checked_add(1).expect("segment numbers last");
        Some((segment, v))
    }

    /// The segments folder (none for the offline tools).
    pub(crate) fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// `records` were written to `segment` at `refs`: each slot still holding that very
    /// record now points at the file instead.
    pub(crate) fn filed(
        &mut self,
        segment: u32,
        records: &[Arc<StoredResponse>],
        refs: &[FiledRef],
    ) {
        assert_eq!(records.len(), refs.len(), "one place per record");
        let mut n = 0u64;
        for (r, f) in records.iter().zip(refs) {
            debug_assert_eq!((r.at_ms, r.fingerprint), (f.at_ms, f.fingerprint));
            let id = key_id(r.scope, &r.key);
            if let Some(slot) = self.slots.get_mut(&id) {
                if matches!(slot, Slot::Done(d) if Arc::ptr_eq(d, r)) {
                    *slot = Slot::Filed(*f);
                    n += 1;
                }
            }
        }
        let previous = self.segments.insert(segment, n);
        assert!(previous.is_none(), "segment {segment} is new");
    }

    /// The image's list (every filed, unexpired record, unsorted: see `ImageList`) and the
    /// segments it does not reference, which may be deleted once that image is durable.
    /// Every record is filed when this runs under the snapshot: ones stored since are in
    /// the log after the image's LSN.
    pub(crate) fn image(&mut self, now_ms: u64) -> (ImageList, Vec<u32>) {
        self.expire(now_ms);
        let listed: Vec<FiledResponse> = self
            .slots
            .iter()
            .filter_map(|(id, s)| match s {
                Slot::Filed(f) => Some(FiledResponse { id: *id, at: *f }),
                _ => None,
            })
            .collect();
        let unreferenced = self
            .segments
            .iter()
            .filter(|(_, n)| **n == 0)
            .map(|(s, _)| *s)
            .collect();
        (ImageList(listed), unreferenced)
    }

    /// `segments` were deleted (after an image without them was written).
    pub(crate) fn deleted(&mut self, segments: &[u32]) {
        for s in segments {
            let n = self.segments.remove(s);
            assert_eq!(n, Some(0), "only unreferenced segments are deleted");
        }
    }

    /// Loads an image's list. Segments it names are known even when every record in them
    /// has expired (so the next snapshot deletes them).
    pub(crate) fn restore(&mut self, listed: Vec<FiledResponse>, now_ms: u64) {
        for f in listed {
            let n = self.segments.entry(f.at.segment).or_insert(0);
            if now_ms.saturating_sub(f.at.at_ms) >= self.retention_ms {
                continue;
            }
            *n += 1;
            self.order.push_back((f.at.at_ms, f.id));
            let previous = self.slots.insert(f.id, Slot::Filed(f.at));
            assert!(previous.is_none(), "an image lists a key once");
        }
        self.next_segment = self
            .segments
            .keys()
            .next_back()
            .map_or(1, |s| s.checked_add(1).expect("segment numbers last"));
    }

    /// Attaches the segments folder at open: deletes segments the image does not name
    /// (written by a snapshot that crashed before its image), checks that every named one
    /// exists.
    pub(crate) fn attach(&mut self, data_dir: &Path) -> Result<(), ArchiveError> {
        let dir = crate::engine::response_files::responses_dir(data_dir);
        let present = crate::engine::response_files::open_dir(data_dir)?;
        let orphans: Vec<u32> = present
            .iter()
            .copied()
            .filter(|s| !self.segments.contains_key(s))
            .collect();
        if !orphans.is_empty() {
            tracing::warn!(segments = ?orphans, "stored responses: segments no image names deleted");
        }
        crate::engine::response_files::delete(&dir, &orphans)?;
        for (&s, &n) in &self.segments {
            if n > 0 && !crate::engine::response_files::exists(&dir, s) {
                return Err(ArchiveError::Corrupt {
                    path: dir.join(format!("{s:010}")),
                    offset: 0,
                    reason: "a segment the snapshot image references is missing".into(),
                });
            }
        }
        let newest = present.iter().copied().max().unwrap_or(0);
        self.next_segment = self
            .next_segment
            .max(newest.checked_add(1).expect("segment numbers last"));
        self.dir = Some(dir);
        Ok(())
    }
}

impl crate::engine::Engine {
    /// Starts a keyed request (see `Begin`).
    pub fn idempotency_begin(&self, scope: u128, key: &str, fingerprint: [u8; 32]) -> Begin {
        let now = self.now_ms();
        let (found, dir) = {
            let mut store = self.inner.responses.lock().expect("not poisoned");
            match store.lookup(scope, key, fingerprint, now) {
                Lookup::Ready(b) => return b,
                Lookup::Filed(f) => (f, store.dir().map(Path::to_path_buf)),
            }
        };
        // Read outside the lock every keyed request takes: a small positional read, from
        // the page cache unless the response is old.
        let Some(dir) = dir else {
            return Begin::Unreadable("stored responses are not attached".into());
        };
        match crate::engine::response_files::read(&dir, &found) {
            Ok(r) if r.scope == scope && r.key == key && r.fingerprint == fingerprint => {
                Begin::Replay(Arc::new(r))
            }
            // Another key's record under the same 128-bit id: never hand it out.
            Ok(_) => Begin::Mismatch,
            Err(e) => {
                tracing::error!(error = %e, "a stored response could not be read back");
                Begin::Unreadable(e.to_string())
            }
        }
    }

    /// The keyed request changed nothing: its key may be used again.
    pub fn idempotency_abandon(&self, scope: u128, key: &str) {
        self.inner
            .responses
            .lock()
            .expect("not poisoned")
            .abandon(scope, key);
    }

    /// Stores the response of a keyed request that changed state. The caller awaits the
    /// returned handle before sending the response (it also covers every earlier append,
    /// such as the state change itself: the log acknowledges in order).
    pub fn idempotency_store(&self, response: StoredResponse) -> Result<wal::Durable, wal::Error> {
        use crate::engine::events::Record;
        // Encoded outside the lock; appended under it, so the log's order of stored
        // responses is the store's order.
        let record = Record::Response(response);
        let payload = crate::engine::journal::encode(&record);
        let Record::Response(response) = record else {
            unreachable!("built just above")
        };
        let mut store = self.inner.responses.lock().expect("not poisoned");
        match self.inner.wal.append(&payload) {
            Ok(d) => {
                self.inner
                    .events_appended
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                store.insert(response, self.now_ms());
                Ok(d)
            }
            Err(e) => {
                store.abandon(response.scope, &response.key);
                Err(e)
            }
        }
    }

    /// Idempotency keys remembered (metrics).
    pub fn idempotency_keys(&self) -> usize {
        self.inner.responses.lock().expect("not poisoned").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: &str, fp: u8, at_ms: u64) -> StoredResponse {
        StoredResponse {
            scope: 1,
            key: key.into(),
            fingerprint: [fp; 32],
            status: 201,
            content_type: "application/json".into(),
            body: b"{}".to_vec(),
            at_ms,
        }
    }

    #[test]
    fn replay_mismatch_in_progress_expiry_and_bound() {
        let mut s = ResponseStore::new(1000, 2);
        assert!(matches!(s.begin(1, "a", [1; 32], 0), Begin::Fresh));
        assert!(matches!(s.begin(1, "a", [1; 32], 0), Begin::InProgress));
        assert!(matches!(s.begin(1, "a", [2; 32], 0), Begin::Mismatch));
        assert!(matches!(s.begin(2, "a", [2; 32], 0), Begin::Fresh));
        assert!(matches!(s.begin(3, "a", [2; 32], 0), Begin::Full));
        s.abandon(2, "a");
        s.insert(rec("a", 1, 10), 10);
        assert!(matches!(s.begin(1, "a", [1; 32], 500), Begin::Replay(_)));
        assert!(matches!(s.begin(1, "a", [9; 32], 500), Begin::Mismatch));
        assert_eq!(s.len(), 1);
        // Retention over: the key is free again.
        assert!(matches!(s.begin(1, "a", [9; 32], 1010), Begin::Fresh));
        s.abandon(1, "a");
        assert_eq!(s.len(), 0);
        // Replaying a record already past retention keeps nothing.
        s.insert(rec("a", 9, 0), 5000);
        assert_eq!(s.len(), 0);
    }

    /// Filing through real files: bodies leave memory, repeats read them back, a replayed
    /// copy of a filed record is not stored twice, expired segments become deletable, and
    /// a restore from the image's list answers like before.
    #[test]
    fn filed_responses_are_read_back_and_their_segments_retire() {
        let data = tempfile::tempdir().unwrap();
        let mut s = ResponseStore::new(1000, 100);
        s.attach(data.path()).unwrap();
        s.insert(rec("a", 1, 10), 10);
        s.insert(rec("b", 2, 20), 20);
        let (segment, due) = s.due_for_filing().unwrap();
        let dir = s.dir().unwrap().to_path_buf();
        let refs = crate::engine::response_files::write_segment(&dir, segment, &due).unwrap();
        s.filed(segment, &due, &refs);
        assert!(s.due_for_filing().is_none(), "nothing left in memory");
        let f = match s.lookup(1, "a", [1; 32], 30) {
            Lookup::Filed(f) => f,
            _ => panic!("a filed record is looked up on disk"),
        };
        let back = crate::engine::response_files::read(&dir, &f).unwrap();
        assert_eq!(back, rec("a", 1, 10));
        assert!(matches!(s.begin(1, "a", [7; 32], 30), Begin::Mismatch));
        // The log replays a record the snapshot already filed: still one filed slot.
        s.insert(rec("b", 2, 20), 30);
        assert!(s.due_for_filing().is_none());
        let (listed, unreferenced) = s.image(30);
        let listed = listed.into_sorted();
        assert_eq!(listed.len(), 2);
        assert!(unreferenced.is_empty());
        // A restore from that list (a restart) finds both on disk.
        let mut r = ResponseStore::new(1000, 100);
        r.restore(listed.clone(), 40);
        r.attach(data.path()).unwrap();
        assert!(matches!(r.lookup(1, "b", [2; 32], 40), Lookup::Filed(_)));
        // Past retention the segment is unreferenced, deleted after the next image.
        let (listed, unreferenced) = s.image(1020);
        let listed = listed.into_sorted();
        assert!(listed.is_empty());
        assert_eq!(unreferenced, vec![segment]);
        crate::engine::response_files::delete(&dir, &unreferenced).unwrap();
        s.deleted(&unreferenced);
        assert!(!crate::engine::response_files::exists(&dir, segment));
        // A segment no image names (a snapshot crashed before its image) goes at open;
        // one an image names but is missing refuses to open.
        let stray = crate::engine::response_files::write_segment(&dir, 9, &due).unwrap();
        assert_eq!(stray.len(), 2);
        let mut fresh = ResponseStore::new(1000, 100);
        fresh.attach(data.path()).unwrap();
        assert!(!crate::engine::response_files::exists(&dir, 9));
        let mut broken = ResponseStore::new(1000, 100);
        broken.restore(listed_of(&refs), 40);
        assert!(broken.attach(data.path()).is_err());
    }

    fn listed_of(refs: &[FiledRef]) -> Vec<FiledResponse> {
        refs.iter()
            .enumerate()
            .map(|(i, f)| FiledResponse {
                id: i as u128,
                at: *f,
            })
            .collect()
    }
}
