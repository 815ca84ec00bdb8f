//! Durable responses for `Idempotency-Key` (SPEC §5, §11).
//!
//! The first response to a state-changing request is recorded in the WAL with a
//! fingerprint of the request; a repeat within the retention gets it back verbatim, a
//! different request under the same key is refused, and a repeat while the first is still
//! running is told so. Keys are scoped: `scope` is the tenant id for customer requests and
//! 0 for the admin API. Records older than the retention are forgotten. Memory holds only
//! keys in flight and responses stored since the last snapshot, at most `keys_max` of
//! them (beyond it new keyed requests are refused as unavailable rather than letting
//! memory grow); each snapshot files them into a segment (`response_files`) and the
//! response index on disk (`response_index`), whose size is the retention × the rate.
//!
//! This module knows nothing of HTTP: a response is a status, a content type and bytes.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::engine::batch::archive::ArchiveError;
use crate::engine::response_files::FiledRef;
use crate::engine::response_index::ResponseIndex;

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
    /// Stored since the last snapshot: in memory until the next one files it (then the
    /// response index knows where it is and memory forgets it).
    Done(Arc<StoredResponse>),
}

/// The response index's rows for responses and where each was filed: `(key_id, place)`.
pub(crate) fn index_rows<'a>(
    filed: impl IntoIterator<Item = (&'a StoredResponse, FiledRef)>,
) -> Vec<(u128, FiledRef)> {
    filed
        .into_iter()
        .map(|(r, f)| (key_id(r.scope, &r.key), f))
        .collect()
}

/// The id a key is stored under: 128 bits of SHA-256 over scope and key. A collision
/// between two keys is caught where it matters: a stored response read back is checked
/// against the scope and key asked for.
pub(crate) fn key_id(scope: u128, key: &str) -> u128 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(scope.to_le_bytes());
    h.update(key.as_bytes());
    let d = h.finalize();
    u128::from_le_bytes(d[..16].try_into().expect("16 bytes"))
}

/// The live table (behind the engine's mutex): keys in flight and responses stored since
/// the last snapshot. Older ones are in the response index (`response_index`), on disk.
pub(crate) struct ResponseStore {
    /// key id → slot (in memory only: bounded by `keys_max`).
    slots: HashMap<u128, Slot>,
    /// Done records in storage order, for expiry from the front.
    order: VecDeque<(u64, u128)>,
    /// Filed responses; `None` for the offline tools (and before `attach`).
    index: Option<Arc<ResponseIndex>>,
    /// The segments folder; `None` for the offline tools, which never read bodies.
    dir: Option<PathBuf>,
    /// Bumped whenever records leave memory for the index: a lookup that read the index
    /// before taking the lock reads it again if this moved meanwhile.
    generation: u64,
    /// Segments at 0 records, deleted at the next snapshot (a request may have read a
    /// place in one just before it emptied).
    dead: Vec<u32>,
    /// Number of the next segment written.
    next_segment: u32,
    /// How long a response is kept.
    pub retention_ms: u64,
    /// Most slots in memory (in flight and done) at once.
    pub keys_max: usize,
}

impl ResponseStore {
    pub(crate) fn new(retention_ms: u64, keys_max: usize) -> Self {
        ResponseStore {
            slots: HashMap::new(),
            order: VecDeque::new(),
            index: None,
            dir: None,
            generation: 0,
            dead: Vec::new(),
            next_segment: 1,
            retention_ms,
            keys_max: keys_max.max(1),
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
            if matches!(self.slots.get(&id), Some(Slot::Done(r)) if r.at_ms == at) {
                self.slots.remove(&id);
            }
        }
    }

    /// What a keyed request should do. `filed` answers for keys not in memory (the
    /// response index, or nothing); an error there is a server fault.
    fn lookup(
        &mut self,
        scope: u128,
        key: &str,
        fp: [u8; 32],
        now_ms: u64,
        filed: impl FnOnce(&Self) -> Result<Option<FiledRef>, String>,
    ) -> Lookup {
        self.expire(now_ms);
        let id = key_id(scope, key);
        let begin = match self.slots.get(&id) {
            Some(Slot::Done(r)) if r.scope != scope || r.key != key => Begin::Mismatch,
            Some(Slot::Done(r)) if r.fingerprint == fp => Begin::Replay(Arc::clone(r)),
            Some(Slot::Done(_)) => Begin::Mismatch,
            Some(Slot::InFlight { fingerprint }) if *fingerprint == fp => Begin::InProgress,
            Some(Slot::InFlight { .. }) => Begin::Mismatch,
            None => match filed(self) {
                Err(e) => Begin::Unreadable(e),
                Ok(Some(f)) if now_ms.saturating_sub(f.at_ms) < self.retention_ms => {
                    if f.fingerprint == fp {
                        return Lookup::Filed(f);
                    }
                    Begin::Mismatch
                }
                Ok(_) if self.slots.len() >= self.keys_max => Begin::Full,
                Ok(_) => {
                    self.slots.insert(id, Slot::InFlight { fingerprint: fp });
                    Begin::Fresh
                }
            },
        };
        Lookup::Ready(begin)
    }

    /// What a keyed request should do, for the in-memory cases (tests).
    #[cfg(test)]
    fn begin(&mut self, scope: u128, key: &str, fp: [u8; 32], now_ms: u64) -> Begin {
        let index = self.index.clone();
        let filed = |_: &Self| match &index {
            Some(ix) => ix.get(key_id(scope, key)).map_err(|e| e.to_string()),
            None => Ok(None),
        };
        match self.lookup(scope, key, fp, now_ms, filed) {
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
        self.order.push_back((r.at_ms, id));
        self.slots.insert(id, Slot::Done(Arc::new(r)));
    }

    /// Remembered keys: in memory and filed (metrics).
    pub(crate) fn len(&self) -> usize {
        let filed = self.index.as_ref().map_or(0, |ix| ix.rows());
        self.slots.len().saturating_add(filed as usize)
    }

    /// Responses still in memory, in storage order (the next segment's contents), and the
    /// number that segment will have. `None` when nothing is due (or nowhere to file).
    pub(crate) fn due_for_filing(&mut self) -> Option<(u32, Vec<Arc<StoredResponse>>)> {
        self.index.as_ref()?;
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

    /// The segments folder and the index (none for the offline tools).
    pub(crate) fn files(&self) -> Option<(PathBuf, Arc<ResponseIndex>)> {
        Some((self.dir.clone()?, Arc::clone(self.index.as_ref()?)))
    }

    /// `records` are filed and indexed: each slot still holding that very record leaves
    /// memory (the index answers for it from now on).
    pub(crate) fn forget_filed(&mut self, records: &[Arc<StoredResponse>]) {
        for r in records {
            let id = key_id(r.scope, &r.key);
            if matches!(self.slots.get(&id), Some(Slot::Done(d)) if Arc::ptr_eq(d, r)) {
                self.slots.remove(&id);
            }
        }
        let slots = &self.slots;
        self.order
            .retain(|(at, id)| matches!(slots.get(id), Some(Slot::Done(r)) if r.at_ms == *at));
        self.generation += 1;
    }

    /// Segments to delete now (emptied before the previous snapshot).
    pub(crate) fn take_dead(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.dead)
    }

    /// Segments that emptied now: deleted at the next snapshot.
    pub(crate) fn set_dead(&mut self, segments: Vec<u32>) {
        self.dead = segments;
    }

    /// Attaches the segments folder and the response index at open. Segments no run covers
    /// (written by a snapshot that crashed before indexing them, or whose run was damaged)
    /// are indexed from their files; a segment a run holds unexpired records of (as of
    /// `now_ms`) that is missing refuses to open. Records replay brought back into memory
    /// that the index already has are dropped.
    pub(crate) fn attach(&mut self, data_dir: &Path, now_ms: u64) -> Result<(), ArchiveError> {
        let dir = crate::engine::response_files::responses_dir(data_dir);
        let present = crate::engine::response_files::open_dir(data_dir)?;
        let index = ResponseIndex::open(data_dir, &present)?;
        let uncovered = index.uncovered(&present);
        if !uncovered.is_empty() {
            tracing::info!(segments = ?uncovered, "stored responses: indexing segments no run covers");
        }
        // Ascending, so each goes in its place by number.
        for &s in &uncovered {
            let segment = crate::engine::response_files::read_segment(&dir, s)?;
            index.add(s, &index_rows(segment.iter().map(|(f, r)| (r, *f))))?;
        }
        let cutoff_ms = now_ms.saturating_sub(self.retention_ms);
        let live = index.live_segments(cutoff_ms);
        for &s in live.keys() {
            if present.binary_search(&s).is_err() {
                return Err(ArchiveError::Corrupt {
                    path: dir.join(format!("{s:010}")),
                    offset: 0,
                    reason: "a segment the response index references is missing".into(),
                });
            }
        }
        let mut filed_already = Vec::new();
        for (id, slot) in &self.slots {
            if let Slot::Done(r) = slot {
                if index
                    .get(*id)?
                    .is_some_and(|f| f.at_ms == r.at_ms && f.fingerprint == r.fingerprint)
                {
                    filed_already.push(Arc::clone(r));
                }
            }
        }
        let newest = present
            .last()
            .copied()
            .max(index.last_segment())
            .unwrap_or(0);
        self.next_segment = self
            .next_segment
            .max(newest.checked_add(1).expect("segment numbers last"));
        // Segments whose records all expired: deleted at the next snapshot.
        self.dead = present
            .iter()
            .copied()
            .filter(|s| !live.contains_key(s))
            .collect();
        self.index = Some(Arc::new(index));
        self.dir = Some(dir);
        self.forget_filed(&filed_already);
        Ok(())
    }
}

impl crate::engine::Engine {
    /// Starts a keyed request (see `Begin`).
    pub fn idempotency_begin(&self, scope: u128, key: &str, fingerprint: [u8; 32]) -> Begin {
        let now = self.now_ms();
        let id = key_id(scope, key);
        // The index is read before the lock every keyed request takes (a disk read must
        // not hold it), and again under it only if records were filed meanwhile.
        let (files, generation) = {
            let store = self.inner.responses.lock().expect("not poisoned");
            (store.files(), store.generation)
        };
        let early = files.as_ref().map(|(_, ix)| ix.get(id));
        let (found, dir) = {
            let mut store = self.inner.responses.lock().expect("not poisoned");
            let filed = |s: &ResponseStore| match (&files, early) {
                (None, _) => Ok(None),
                (Some(_), Some(r)) if s.generation == generation => r.map_err(|e| e.to_string()),
                (Some((_, ix)), _) => ix.get(id).map_err(|e| e.to_string()),
            };
            match store.lookup(scope, key, fingerprint, now, filed) {
                Lookup::Ready(b) => return b,
                Lookup::Filed(f) => (f, files.map(|(dir, _)| dir)),
            }
        };
        // Read outside the lock: a small positional read, from the page cache unless the
        // response is old.
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

    /// The response index's runs and the memory its filters and block keys hold (metrics).
    pub fn response_index_stats(&self) -> (usize, usize) {
        let files = self.inner.responses.lock().expect("not poisoned").files();
        files.map_or((0, 0), |(_, ix)| (ix.run_count(), ix.memory_bytes()))
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

    /// Files `s`'s in-memory responses the way a snapshot does: a segment, then the index,
    /// then memory forgets them. Returns the segment and where each record went.
    fn file(s: &mut ResponseStore) -> (u32, Vec<FiledRef>) {
        let (segment, due) = s.due_for_filing().unwrap();
        let (dir, index) = s.files().unwrap();
        let refs = crate::engine::response_files::write_segment(&dir, segment, &due).unwrap();
        let rows = index_rows(due.iter().map(|r| &**r).zip(refs.iter().copied()));
        index.add(segment, &rows).unwrap();
        s.forget_filed(&due);
        (segment, refs)
    }

    fn filed_place(s: &mut ResponseStore, key: &str, fp: u8, now_ms: u64) -> Option<FiledRef> {
        let index = s.files().map(|(_, ix)| ix);
        let lookup = s.lookup(1, key, [fp; 32], now_ms, |_| match &index {
            Some(ix) => ix.get(key_id(1, key)).map_err(|e| e.to_string()),
            None => Ok(None),
        });
        match lookup {
            Lookup::Filed(f) => Some(f),
            Lookup::Ready(_) => None,
        }
    }

    /// Filing through real files and the on-disk index: bodies and places leave memory,
    /// repeats read them back, a replayed copy of a filed record is dropped at attach,
    /// retention empties a segment which is then deleted, a segment the index does not name
    /// goes at open, a deleted index is rebuilt from the segments, and a named segment
    /// that is missing refuses to open.
    #[test]
    fn filed_responses_are_read_back_and_their_segments_retire() {
        let data = tempfile::tempdir().unwrap();
        let mut s = ResponseStore::new(1000, 100);
        s.attach(data.path(), 0).unwrap();
        s.insert(rec("a", 1, 10), 10);
        s.insert(rec("b", 2, 20), 20);
        let (segment, refs) = file(&mut s);
        assert!(s.due_for_filing().is_none(), "nothing left in memory");
        assert_eq!(s.slots.len(), 0);
        assert!(
            s.order.is_empty(),
            "the expiry queue forgets filed records too"
        );
        assert_eq!(s.len(), 2, "both are remembered, on disk");
        let dir = s.files().unwrap().0;
        let f = filed_place(&mut s, "a", 1, 30).expect("a filed record is found on disk");
        assert_eq!(f, refs[0]);
        let back = crate::engine::response_files::read(&dir, &f).unwrap();
        assert_eq!(back, rec("a", 1, 10));
        assert!(matches!(s.begin(1, "a", [7; 32], 30), Begin::Mismatch));
        drop(s);

        // A restart: the log replays a record the snapshot already filed; attach drops it.
        let mut r = ResponseStore::new(1000, 100);
        r.insert(rec("b", 2, 20), 40);
        r.attach(data.path(), 40).unwrap();
        assert!(r.due_for_filing().is_none(), "not filed twice");
        assert!(filed_place(&mut r, "b", 2, 40).is_some());
        // Past retention: the rows go, the segment empties, waits a snapshot, is deleted.
        let (_, index) = r.files().unwrap();
        let (removed, empty) = index.expire(1021 - 1000, &[]).unwrap();
        assert_eq!((removed, empty.clone()), (2, vec![segment]));
        assert!(matches!(r.begin(1, "a", [1; 32], 1021), Begin::Fresh));
        r.abandon(1, "a");
        crate::engine::response_files::delete(&dir, &empty).unwrap();
        assert_eq!(index.expire(1021 - 1000, &empty).unwrap(), (0, vec![]));
        assert_eq!(index.run_count(), 0, "the expired run is gone");
        assert!(!crate::engine::response_files::exists(&dir, segment));
        assert_eq!(r.len(), 0);

        // A segment no run covers (a snapshot crashed between writing it and its run) is
        // indexed at open.
        let due = vec![Arc::new(rec("z", 3, 1500))];
        crate::engine::response_files::write_segment(&dir, 9, &due).unwrap();
        r.insert(rec("c", 4, 1500), 1500);
        let (kept, _) = file(&mut r);
        assert!(kept < 9);
        drop((r, index));
        let mut fresh = ResponseStore::new(1000, 100);
        fresh.attach(data.path(), 1600).unwrap();
        assert_eq!(fresh.len(), 2);
        let z = filed_place(&mut fresh, "z", 3, 1600).expect("the uncovered segment is indexed");
        assert_eq!(z.segment, 9);
        assert!(filed_place(&mut fresh, "c", 4, 1600).is_some());
        assert_eq!(
            fresh.next_segment, 10,
            "new segments go above every one present"
        );
        drop(fresh);

        // The runs deleted, and a stray temporary one: rebuilt from the segments present.
        let runs = run_files(&dir);
        assert_eq!(runs.len(), 2, "one run per segment filed");
        for p in &runs {
            std::fs::remove_file(p).unwrap();
        }
        std::fs::write(dir.join("run-0000000001-0000000009.tmp"), b"partial").unwrap();
        let mut rebuilt = ResponseStore::new(1000, 100);
        rebuilt.attach(data.path(), 1600).unwrap();
        assert_eq!(rebuilt.len(), 2);
        let c = filed_place(&mut rebuilt, "c", 4, 1600).expect("found after the rebuild");
        assert_eq!(
            crate::engine::response_files::read(&dir, &c).unwrap(),
            rec("c", 4, 1500)
        );
        assert!(!dir.join("run-0000000001-0000000009.tmp").exists());
        drop(rebuilt);

        // A damaged run is deleted and rebuilt from its segment.
        let run = run_files(&dir).into_iter().next().unwrap();
        let mut bytes = std::fs::read(&run).unwrap();
        bytes[4096 + 20] ^= 0xff;
        std::fs::write(&run, &bytes).unwrap();
        let mut mended = ResponseStore::new(1000, 100);
        mended.attach(data.path(), 1600).unwrap();
        assert!(filed_place(&mut mended, "c", 4, 1600).is_some());
        assert!(filed_place(&mut mended, "z", 3, 1600).is_some());
        assert_eq!(
            std::fs::read(&run).unwrap().len(),
            2 * 4096,
            "rewritten whole"
        );
        drop(mended);

        // A segment a run holds live records of, missing: refuses to open.
        std::fs::remove_file(dir.join(format!("{kept:010}"))).unwrap();
        let mut broken = ResponseStore::new(1000, 100);
        assert!(broken.attach(data.path(), 1600).is_err());
        // Once those records are past retention, the missing file is no longer needed.
        let mut later = ResponseStore::new(1000, 100);
        later.attach(data.path(), 2600).unwrap();
    }

    fn run_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("run-"))
            .collect();
        v.sort();
        v
    }
}
