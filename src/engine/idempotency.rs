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

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

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
}

enum Slot {
    InFlight { fingerprint: [u8; 32] },
    Done(Arc<StoredResponse>),
}

/// The live table (behind the engine's mutex).
pub(crate) struct ResponseStore {
    /// (scope, key) → slot.
    slots: HashMap<(u128, String), Slot>,
    /// Done records in storage order, for expiry from the front.
    order: VecDeque<(u64, (u128, String))>,
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
            let (at, k) = self.order.pop_front().expect("front exists");
            // A key stored again later (after expiry) has a newer record: keep it.
            if let Some(Slot::Done(r)) = self.slots.get(&k) {
                if r.at_ms == at {
                    self.slots.remove(&k);
                }
            }
        }
    }

    pub(crate) fn begin(&mut self, scope: u128, key: &str, fp: [u8; 32], now_ms: u64) -> Begin {
        self.expire(now_ms);
        match self.slots.get(&(scope, key.to_owned())) {
            Some(Slot::Done(r)) if r.fingerprint == fp => Begin::Replay(Arc::clone(r)),
            Some(Slot::Done(_)) => Begin::Mismatch,
            Some(Slot::InFlight { fingerprint }) if *fingerprint == fp => Begin::InProgress,
            Some(Slot::InFlight { .. }) => Begin::Mismatch,
            None if self.slots.len() >= self.keys_max => Begin::Full,
            None => {
                self.slots
                    .insert((scope, key.to_owned()), Slot::InFlight { fingerprint: fp });
                Begin::Fresh
            }
        }
    }

    /// The request ran without changing state: the key is free again.
    pub(crate) fn abandon(&mut self, scope: u128, key: &str) {
        let k = (scope, key.to_owned());
        if matches!(self.slots.get(&k), Some(Slot::InFlight { .. })) {
            self.slots.remove(&k);
        }
    }

    /// Records a response (live after its WAL append, and in replay).
    pub(crate) fn insert(&mut self, r: StoredResponse, now_ms: u64) {
        if now_ms.saturating_sub(r.at_ms) >= self.retention_ms {
            let k = (r.scope, r.key);
            if matches!(self.slots.get(&k), Some(Slot::InFlight { .. })) {
                self.slots.remove(&k);
            }
            return;
        }
        let k = (r.scope, r.key.clone());
        self.order.push_back((r.at_ms, k.clone()));
        self.slots.insert(k, Slot::Done(Arc::new(r)));
    }

    /// Remembered keys (metrics).
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Unexpired records, shared (cheap under the engine's mutex: snapshots copy and sort
    /// them with `sorted_copies` after releasing it).
    pub(crate) fn records(&self) -> Vec<Arc<StoredResponse>> {
        self.slots
            .values()
            .filter_map(|s| match s {
                Slot::Done(r) => Some(Arc::clone(r)),
                Slot::InFlight { .. } => None,
            })
            .collect()
    }
}

/// Owned copies of `records`, in storage order (the snapshot image's order).
pub(crate) fn sorted_copies(mut v: Vec<Arc<StoredResponse>>) -> Vec<StoredResponse> {
    v.sort_by(|a, b| (a.at_ms, a.scope, &a.key).cmp(&(b.at_ms, b.scope, &b.key)));
    v.into_iter().map(|r| (*r).clone()).collect()
}

impl crate::engine::Engine {
    /// Starts a keyed request (see `Begin`).
    pub fn idempotency_begin(&self, scope: u128, key: &str, fingerprint: [u8; 32]) -> Begin {
        let now = self.now_ms();
        self.inner
            .responses
            .lock()
            .expect("not poisoned")
            .begin(scope, key, fingerprint, now)
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
        assert_eq!(s.records().len(), 1);
        // Retention over: the key is free again.
        assert!(matches!(s.begin(1, "a", [9; 32], 1010), Begin::Fresh));
        assert_eq!(s.records().len(), 0);
        // Replaying a record already past retention keeps nothing.
        s.insert(rec("a", 9, 0), 5000);
        assert_eq!(s.len(), 0);
    }
}
