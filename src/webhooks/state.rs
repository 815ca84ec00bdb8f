//! Endpoints and deliveries: the records that change them and `apply`, used live (under
//! the outbox lock, so apply order is LSN order) and in replay.
//!
//! A delivery is one event to one endpoint:
//! ```text
//! pending ─Attempted 2xx→ succeeded
//!         ─Attempted, next attempt→ pending (due at next_at_ms)
//!         ─Attempted, no next (schedule used up, 410, manual one-shot)→ failed
//!         ─endpoint disabled→ failed
//! succeeded | failed ─Redelivery→ pending (one manual attempt)
//! ```
//! Emission (`emit`) is not a record: it runs when the record that caused the event is
//! applied (see `payload.rs`). Which endpoints receive an event is decided by LSN (created
//! and enabled before the event), so it does not depend on the order in which actors
//! happen to emit live.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use crate::ids::{DeliveryId, EndpointId, EventId, TenantId};
use crate::webhooks::payload::{lsn_of, OutEvent};

/// Attempts kept per delivery (older ones are summarised by `attempts_total`).
pub const ATTEMPTS_KEPT: usize = 16;
/// Longest error text kept per attempt.
pub const ERROR_BYTES_MAX: usize = 300;

/// A signing secret.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Secret {
    /// `whsec_…`.
    pub value: String,
    /// Signs until then (an old secret during a rotation); `None`: the current one.
    pub until_ms: Option<u64>,
}

/// A tenant's endpoint.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Endpoint {
    pub id: EndpointId,
    /// Small number that names it inside delivery ids.
    pub seq: u32,
    pub tenant: TenantId,
    pub url: String,
    /// Bit set over `EVENT_TYPES`.
    pub events: u16,
    pub description: String,
    /// Current secret first; an old one while its overlap lasts.
    pub secrets: Vec<Secret>,
    pub enabled: bool,
    /// Why it was disabled (by the tenant, a 410, or sustained failure).
    pub disabled_reason: Option<String>,
    pub disabled_at_ms: Option<u64>,
    /// LSN from which it receives events (creation or the last enable).
    pub enabled_lsn: u64,
    /// First failure since the last success: disabled once it is old enough.
    pub failing_since_ms: Option<u64>,
    pub created_at_ms: u64,
    /// The tenant's `Idempotency-Key` of the creation (a repeat returns this endpoint).
    pub request_id: Option<String>,
}

impl Endpoint {
    /// Secrets that sign at `now_ms` (current first).
    pub fn signing_secrets(&self, now_ms: u64) -> Vec<String> {
        self.secrets
            .iter()
            .filter(|s| s.until_ms.is_none_or(|u| now_ms < u))
            .map(|s| s.value.clone())
            .collect()
    }
}

/// Where a delivery is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum DeliveryStatus {
    Pending,
    Succeeded,
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Succeeded => "succeeded",
            DeliveryStatus::Failed => "failed",
        }
    }
}

/// One attempt's outcome.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Attempt {
    pub at_ms: u64,
    /// HTTP status; 0 when no response came (connect error, timeout, refused target).
    pub status: u16,
    pub latency_ms: u32,
    /// Empty on success.
    pub error: String,
    /// The next automatic attempt; `None` ends the delivery (on failure: failed).
    pub next_at_ms: Option<u64>,
    /// Made by a manual redelivery.
    pub manual: bool,
}

impl Attempt {
    pub fn succeeded(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// One event to one endpoint.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Delivery {
    pub id: DeliveryId,
    pub endpoint: EndpointId,
    pub event: OutEvent,
    pub status: DeliveryStatus,
    /// The newest `ATTEMPTS_KEPT` attempts.
    pub attempts: Vec<Attempt>,
    /// Attempts made in all (automatic and manual).
    pub attempts_total: u32,
    /// Automatic attempts made: the position in the retry schedule.
    pub attempts_scheduled: u32,
    /// Due then (pending only).
    pub next_at_ms: Option<u64>,
    /// The pending attempt is a manual one-shot (no retries after it).
    pub manual: bool,
    /// Why it failed without (or after) an attempt: `endpoint_disabled`, `backlog_full`.
    pub note: Option<String>,
    /// Order of finishing (pruning of the kept log).
    pub finished_seq: u64,
}

/// The endpoint number inside a delivery id.
pub fn endpoint_seq(d: DeliveryId) -> u32 {
    d.0 as u32
}

/// The event inside a delivery id.
pub fn event_of(d: DeliveryId) -> EventId {
    EventId(d.0 >> 32)
}

fn delivery_id(event: EventId, seq: u32) -> DeliveryId {
    DeliveryId((event.0 << 32) | seq as u128)
}

/// A fact about webhooks.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum WebhookRecord {
    /// An endpoint exists (its `seq` is the next free number, checked by `apply`).
    EndpointCreated(Box<Endpoint>),
    /// A new current secret; the old one signs until `previous_until_ms`.
    SecretRotated {
        endpoint: EndpointId,
        secret: String,
        previous_until_ms: u64,
        at_ms: u64,
    },
    /// Fields changed; `enabled: Some(false)` fails its pending deliveries.
    EndpointUpdated {
        endpoint: EndpointId,
        url: Option<String>,
        events: Option<u16>,
        description: Option<String>,
        enabled: Option<bool>,
        reason: Option<String>,
        at_ms: u64,
    },
    /// Gone, with its deliveries.
    EndpointDeleted { endpoint: EndpointId, at_ms: u64 },
    /// An attempt was made.
    Attempted {
        delivery: DeliveryId,
        attempt: Attempt,
    },
    /// A finished delivery is due again (one manual attempt).
    Redelivery { delivery: DeliveryId, at_ms: u64 },
}

/// The webhook part of a snapshot image.
#[derive(
    Debug, Clone, PartialEq, Eq, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct OutboxImage {
    pub last_lsn: u64,
    /// Events of records at or below it are in the image (or delivered and pruned).
    pub covered_lsn: u64,
    pub next_seq: u32,
    pub finish_counter: u64,
    pub endpoints: Vec<Endpoint>,
    pub deliveries: Vec<Delivery>,
    /// Events emitted from records above `covered_lsn`: replay does not emit them again.
    pub seen: Vec<EventId>,
}

/// Bounds of the state (from `WebhookConfig`; not persisted).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Delay of the first attempt after the event.
    pub first_delay_ms: u64,
    pub finished_per_tenant_max: usize,
    pub pending_per_endpoint_max: usize,
}

/// A delivery handed to the dispatcher.
#[derive(Debug, Clone)]
pub struct Job {
    pub delivery: DeliveryId,
    pub endpoint_seq: u32,
    pub url: String,
    /// Secrets signing now (current first).
    pub secrets: Vec<String>,
    /// `webhook-id`: the event id (the same for every attempt).
    pub webhook_id: String,
    pub body: Vec<u8>,
    /// Automatic attempts made before this one.
    pub attempts_scheduled: u32,
    /// A manual one-shot.
    pub manual: bool,
}

/// Endpoints and deliveries.
#[derive(Debug)]
pub struct OutboxState {
    pub(crate) limits: Limits,
    /// LSN of the last webhook record applied (replay skips those at or below).
    pub last_lsn: u64,
    /// See `OutboxImage::covered_lsn`.
    covered_lsn: u64,
    next_seq: u32,
    finish_counter: u64,
    endpoints: BTreeMap<u32, Endpoint>,
    by_id: HashMap<EndpointId, u32>,
    by_tenant: HashMap<TenantId, Vec<u32>>,
    deliveries: HashMap<DeliveryId, Delivery>,
    /// Per tenant, every kept delivery in id (= event) order: the log.
    tenant_log: HashMap<TenantId, BTreeSet<DeliveryId>>,
    /// Per tenant, finished deliveries in finishing order with their `finished_seq`.
    finished: HashMap<TenantId, VecDeque<(DeliveryId, u64)>>,
    pending_per_endpoint: HashMap<u32, usize>,
    /// Pending and not in flight, by due time.
    due: BTreeSet<(u64, DeliveryId)>,
    seen: BTreeSet<EventId>,
    /// Being attempted now (runtime only: after a restart everything pending is due).
    in_flight: HashSet<DeliveryId>,
    in_flight_per_endpoint: HashMap<u32, usize>,
}

impl OutboxState {
    /// Empty state.
    pub fn new(limits: Limits) -> Self {
        OutboxState {
            limits,
            last_lsn: 0,
            covered_lsn: 0,
            next_seq: 1,
            finish_counter: 0,
            endpoints: BTreeMap::new(),
            by_id: HashMap::new(),
            by_tenant: HashMap::new(),
            deliveries: HashMap::new(),
            tenant_log: HashMap::new(),
            finished: HashMap::new(),
            pending_per_endpoint: HashMap::new(),
            due: BTreeSet::new(),
            seen: BTreeSet::new(),
            in_flight: HashSet::new(),
            in_flight_per_endpoint: HashMap::new(),
        }
    }

    /// State from a snapshot image.
    pub fn from_image(image: OutboxImage, limits: Limits) -> Self {
        let mut s = OutboxState::new(limits);
        s.last_lsn = image.last_lsn;
        s.covered_lsn = image.covered_lsn;
        s.next_seq = image.next_seq;
        s.finish_counter = image.finish_counter;
        for e in image.endpoints {
            s.insert_endpoint(e);
        }
        let mut finished: Vec<(u64, DeliveryId, TenantId)> = Vec::new();
        for d in image.deliveries {
            if d.status != DeliveryStatus::Pending {
                finished.push((d.finished_seq, d.id, d.event.tenant));
            }
            s.insert_delivery(d);
        }
        finished.sort();
        for (seq, id, tenant) in finished {
            s.finished.entry(tenant).or_default().push_back((id, seq));
        }
        s.seen = image.seen.into_iter().collect();
        s
    }

    /// The image of the state for a snapshot covering `covered_lsn` (captured after every
    /// wallet and batch, so each event of a captured record is here).
    pub fn image(&mut self, covered_lsn: u64) -> OutboxImage {
        let covered = covered_lsn.max(self.covered_lsn);
        self.seen.retain(|e| lsn_of(*e) > covered);
        self.covered_lsn = covered;
        let mut deliveries: Vec<Delivery> = self.deliveries.values().cloned().collect();
        deliveries.sort_by_key(|d| d.id);
        OutboxImage {
            last_lsn: self.last_lsn,
            covered_lsn: covered,
            next_seq: self.next_seq,
            finish_counter: self.finish_counter,
            endpoints: self.endpoints.values().cloned().collect(),
            deliveries,
            seen: self.seen.iter().copied().collect(),
        }
    }

    fn insert_endpoint(&mut self, e: Endpoint) {
        self.by_id.insert(e.id, e.seq);
        self.by_tenant.entry(e.tenant).or_default().push(e.seq);
        self.endpoints.insert(e.seq, e);
    }

    fn insert_delivery(&mut self, d: Delivery) {
        let seq = endpoint_seq(d.id);
        if d.status == DeliveryStatus::Pending {
            *self.pending_per_endpoint.entry(seq).or_default() += 1;
            if let Some(at) = d.next_at_ms {
                if !self.in_flight.contains(&d.id) {
                    self.due.insert((at, d.id));
                }
            }
        }
        self.tenant_log
            .entry(d.event.tenant)
            .or_default()
            .insert(d.id);
        self.deliveries.insert(d.id, d);
    }

    /// The next endpoint number (for a creation record).
    pub fn next_seq(&self) -> u32 {
        self.next_seq
    }

    /// Endpoints of a tenant, oldest first.
    pub fn endpoints_of(&self, tenant: TenantId) -> Vec<&Endpoint> {
        self.by_tenant
            .get(&tenant)
            .map(|v| v.iter().filter_map(|s| self.endpoints.get(s)).collect())
            .unwrap_or_default()
    }

    /// One endpoint of a tenant (another tenant's is not found).
    pub fn endpoint(&self, tenant: TenantId, id: EndpointId) -> Option<&Endpoint> {
        let e = self.endpoints.get(self.by_id.get(&id)?)?;
        (e.tenant == tenant).then_some(e)
    }

    /// The endpoint behind a number.
    pub fn endpoint_by_seq(&self, seq: u32) -> Option<&Endpoint> {
        self.endpoints.get(&seq)
    }

    /// One delivery of a tenant.
    pub fn delivery(&self, tenant: TenantId, id: DeliveryId) -> Option<&Delivery> {
        self.deliveries
            .get(&id)
            .filter(|d| d.event.tenant == tenant)
    }

    /// A tenant's deliveries, newest first, below `before`, passing `keep`.
    pub fn deliveries_of(
        &self,
        tenant: TenantId,
        before: Option<DeliveryId>,
        limit: usize,
        scan_max: usize,
        keep: impl Fn(&Delivery) -> bool,
    ) -> Vec<&Delivery> {
        let Some(log) = self.tenant_log.get(&tenant) else {
            return Vec::new();
        };
        let upper = before.unwrap_or(DeliveryId(u128::MAX));
        log.range(..upper)
            .rev()
            .take(scan_max)
            .filter_map(|id| self.deliveries.get(id))
            .filter(|d| keep(d))
            .take(limit)
            .collect()
    }

    /// Whether the tenant has an endpoint that could receive an event now.
    pub fn listens(&self, tenant: TenantId) -> bool {
        self.by_tenant.contains_key(&tenant)
    }

    /// Endpoints of all tenants.
    pub fn endpoints_total(&self) -> usize {
        self.endpoints.len()
    }

    /// Deliveries for an event (its cause's record was just applied).
    pub fn emit(&mut self, ev: OutEvent) {
        let lsn = ev.lsn();
        if lsn <= self.covered_lsn || self.seen.contains(&ev.id) {
            return; // replay of an event the snapshot already has
        }
        let targets: Vec<u32> = self
            .by_tenant
            .get(&ev.tenant)
            .map(|v| {
                v.iter()
                    .copied()
                    .filter(|s| {
                        let e = &self.endpoints[s];
                        e.enabled && e.enabled_lsn < lsn && e.events & (1 << ev.kind) != 0
                    })
                    .collect()
            })
            .unwrap_or_default();
        if targets.is_empty() {
            return;
        }
        self.seen.insert(ev.id);
        for seq in targets {
            let e = &self.endpoints[&seq];
            let id = delivery_id(ev.id, seq);
            let backlog = self.pending_per_endpoint.get(&seq).copied().unwrap_or(0);
            let mut d = Delivery {
                id,
                endpoint: e.id,
                event: ev.clone(),
                status: DeliveryStatus::Pending,
                attempts: Vec::new(),
                attempts_total: 0,
                attempts_scheduled: 0,
                next_at_ms: Some(ev.at_ms.saturating_add(self.limits.first_delay_ms)),
                manual: false,
                note: None,
                finished_seq: 0,
            };
            if backlog >= self.limits.pending_per_endpoint_max {
                d.status = DeliveryStatus::Failed;
                d.next_at_ms = None;
                d.note = Some(format!(
                    "backlog_full: the endpoint had {backlog} deliveries pending"
                ));
                self.finish_counter += 1;
                d.finished_seq = self.finish_counter;
                let tenant = ev.tenant;
                self.insert_delivery(d);
                self.note_finished(tenant, id);
            } else {
                self.insert_delivery(d);
            }
        }
    }

    /// Applies a record (live, or in replay when `lsn > last_lsn`).
    pub fn apply(&mut self, rec: &WebhookRecord, lsn: u64) {
        assert!(lsn > self.last_lsn, "webhook records apply in LSN order");
        self.last_lsn = lsn;
        match rec {
            WebhookRecord::EndpointCreated(e) => {
                assert_eq!(
                    e.seq, self.next_seq,
                    "endpoint numbers are handed out in order"
                );
                self.next_seq += 1;
                let mut e = (**e).clone();
                e.enabled_lsn = lsn;
                self.insert_endpoint(e);
            }
            WebhookRecord::SecretRotated {
                endpoint,
                secret,
                previous_until_ms,
                at_ms,
            } => {
                let Some(e) = self.endpoint_mut(*endpoint) else {
                    return;
                };
                // The current one becomes the old one; older ones stop now.
                let old = e.secrets.iter().find(|s| s.until_ms.is_none()).cloned();
                e.secrets = vec![Secret {
                    value: secret.clone(),
                    until_ms: None,
                }];
                if let Some(mut old) = old {
                    if *previous_until_ms > *at_ms {
                        old.until_ms = Some(*previous_until_ms);
                        e.secrets.push(old);
                    }
                }
            }
            WebhookRecord::EndpointUpdated {
                endpoint,
                url,
                events,
                description,
                enabled,
                reason,
                at_ms,
            } => {
                let Some(seq) = self.by_id.get(endpoint).copied() else {
                    return;
                };
                let e = self.endpoints.get_mut(&seq).expect("indexed");
                if let Some(u) = url {
                    e.url = u.clone();
                }
                if let Some(ev) = events {
                    e.events = *ev;
                }
                if let Some(d) = description {
                    e.description = d.clone();
                }
                match enabled {
                    Some(true) if !e.enabled => {
                        e.enabled = true;
                        e.enabled_lsn = lsn;
                        e.disabled_reason = None;
                        e.disabled_at_ms = None;
                        e.failing_since_ms = None;
                    }
                    Some(false) if e.enabled => {
                        e.enabled = false;
                        e.disabled_reason = reason.clone();
                        e.disabled_at_ms = Some(*at_ms);
                        let note = format!(
                            "endpoint_disabled: {}",
                            reason.as_deref().unwrap_or("by the tenant")
                        );
                        self.fail_pending_of(seq, &note);
                    }
                    _ => {}
                }
            }
            WebhookRecord::EndpointDeleted { endpoint, .. } => {
                let Some(seq) = self.by_id.remove(endpoint) else {
                    return;
                };
                let e = self.endpoints.remove(&seq).expect("indexed");
                if let Some(v) = self.by_tenant.get_mut(&e.tenant) {
                    v.retain(|s| *s != seq);
                    if v.is_empty() {
                        self.by_tenant.remove(&e.tenant);
                    }
                }
                let ids: Vec<DeliveryId> = self
                    .tenant_log
                    .get(&e.tenant)
                    .map(|l| {
                        l.iter()
                            .copied()
                            .filter(|d| endpoint_seq(*d) == seq)
                            .collect()
                    })
                    .unwrap_or_default();
                for id in ids {
                    self.remove_delivery(id);
                }
                if let Some(f) = self.finished.get_mut(&e.tenant) {
                    f.retain(|(d, _)| endpoint_seq(*d) != seq);
                }
                self.pending_per_endpoint.remove(&seq);
            }
            WebhookRecord::Attempted { delivery, attempt } => {
                let Some(d) = self.deliveries.get_mut(delivery) else {
                    return; // its endpoint was deleted since
                };
                let was_pending = d.status == DeliveryStatus::Pending;
                if let Some(at) = d.next_at_ms {
                    self.due.remove(&(at, d.id));
                }
                d.attempts.push(attempt.clone());
                if d.attempts.len() > ATTEMPTS_KEPT {
                    d.attempts.remove(0);
                }
                d.attempts_total += 1;
                if !attempt.manual {
                    d.attempts_scheduled += 1;
                }
                let tenant = d.event.tenant;
                let id = d.id;
                let finished = if attempt.succeeded() {
                    d.status = DeliveryStatus::Succeeded;
                    d.next_at_ms = None;
                    d.manual = false;
                    true
                } else if was_pending {
                    match attempt.next_at_ms {
                        Some(next) => {
                            d.next_at_ms = Some(next);
                            if !self.in_flight.contains(&id) {
                                self.due.insert((next, id));
                            }
                            false
                        }
                        None => {
                            d.status = DeliveryStatus::Failed;
                            d.next_at_ms = None;
                            d.manual = false;
                            true
                        }
                    }
                } else {
                    false // an attempt that outlived a disable: history only
                };
                if let Some(e) = self.endpoints.get_mut(&endpoint_seq(id)) {
                    if attempt.succeeded() {
                        e.failing_since_ms = None;
                    } else {
                        e.failing_since_ms.get_or_insert(attempt.at_ms);
                    }
                }
                if finished {
                    if was_pending {
                        self.pending_done(endpoint_seq(id));
                    }
                    self.finish_counter += 1;
                    let seq = self.finish_counter;
                    self.deliveries.get_mut(&id).expect("present").finished_seq = seq;
                    self.note_finished(tenant, id);
                }
            }
            WebhookRecord::Redelivery { delivery, at_ms } => {
                let Some(d) = self.deliveries.get_mut(delivery) else {
                    return;
                };
                if d.status == DeliveryStatus::Pending {
                    return;
                }
                d.status = DeliveryStatus::Pending;
                d.next_at_ms = Some(*at_ms);
                d.manual = true;
                d.note = None;
                let id = d.id;
                *self
                    .pending_per_endpoint
                    .entry(endpoint_seq(id))
                    .or_default() += 1;
                if !self.in_flight.contains(&id) {
                    self.due.insert((*at_ms, id));
                }
            }
        }
    }

    fn endpoint_mut(&mut self, id: EndpointId) -> Option<&mut Endpoint> {
        let seq = self.by_id.get(&id)?;
        self.endpoints.get_mut(seq)
    }

    fn pending_done(&mut self, seq: u32) {
        let n = self
            .pending_per_endpoint
            .get_mut(&seq)
            .expect("a pending delivery is counted");
        assert!(*n > 0, "pending count underflow");
        *n -= 1;
    }

    /// Fails every pending delivery of an endpoint (it was disabled).
    fn fail_pending_of(&mut self, seq: u32, note: &str) {
        let Some(tenant) = self.endpoints.get(&seq).map(|e| e.tenant) else {
            return;
        };
        let ids: Vec<DeliveryId> = self
            .tenant_log
            .get(&tenant)
            .map(|l| {
                l.iter()
                    .copied()
                    .filter(|d| endpoint_seq(*d) == seq)
                    .filter(|d| self.deliveries[d].status == DeliveryStatus::Pending)
                    .collect()
            })
            .unwrap_or_default();
        for id in ids {
            let d = self.deliveries.get_mut(&id).expect("in the log");
            if let Some(at) = d.next_at_ms.take() {
                self.due.remove(&(at, id));
            }
            d.status = DeliveryStatus::Failed;
            d.manual = false;
            d.note = Some(note.to_owned());
            self.finish_counter += 1;
            d.finished_seq = self.finish_counter;
            self.pending_done(seq);
            self.note_finished(tenant, id);
        }
    }

    /// Keeps the finished log of a tenant bounded (oldest finished dropped).
    fn note_finished(&mut self, tenant: TenantId, id: DeliveryId) {
        let seq = self.deliveries[&id].finished_seq;
        let max = self.limits.finished_per_tenant_max;
        let q = self.finished.entry(tenant).or_default();
        q.push_back((id, seq));
        let mut drop_now = Vec::new();
        while q.len() > max {
            drop_now.push(q.pop_front().expect("longer than the bound"));
        }
        for (old, old_seq) in drop_now {
            // An entry is stale when its delivery was redelivered and finished again
            // (a newer entry stands for it) or is being attempted.
            let current = self
                .deliveries
                .get(&old)
                .is_some_and(|d| d.status != DeliveryStatus::Pending && d.finished_seq == old_seq);
            if current && !self.in_flight.contains(&old) {
                self.remove_delivery(old);
            }
        }
    }

    fn remove_delivery(&mut self, id: DeliveryId) {
        let Some(d) = self.deliveries.remove(&id) else {
            return;
        };
        if d.status == DeliveryStatus::Pending {
            if let Some(at) = d.next_at_ms {
                self.due.remove(&(at, id));
            }
            if let Some(n) = self.pending_per_endpoint.get_mut(&endpoint_seq(id)) {
                *n = n.saturating_sub(1);
            }
        }
        if let Some(l) = self.tenant_log.get_mut(&d.event.tenant) {
            l.remove(&id);
            if l.is_empty() {
                self.tenant_log.remove(&d.event.tenant);
            }
        }
    }

    /// Deliveries due at `now_ms` whose cause is acknowledged (`acked_lsn`), up to `limit`,
    /// at most `per_endpoint` in flight per endpoint; they are marked in flight. Also the
    /// time of the next due delivery not taken (when to look again).
    pub fn take_due(
        &mut self,
        now_ms: u64,
        acked_lsn: u64,
        limit: usize,
        per_endpoint: usize,
    ) -> (Vec<Job>, Option<u64>) {
        // Bounded scan: deliveries skipped (endpoint busy, cause not yet durable) stay due.
        const SCAN_MAX: usize = 4096;
        let mut jobs = Vec::new();
        let mut wake = None;
        let mut taken = Vec::new();
        for &(at, id) in self.due.iter().take(SCAN_MAX) {
            if at > now_ms {
                wake = Some(at);
                break;
            }
            if jobs.len() >= limit {
                wake = Some(now_ms);
                break;
            }
            let d = &self.deliveries[&id];
            let seq = endpoint_seq(id);
            let busy = self.in_flight_per_endpoint.get(&seq).copied().unwrap_or(0);
            if d.event.lsn() > acked_lsn || busy >= per_endpoint {
                wake = Some(wake.map_or(now_ms + 5, |w: u64| w.min(now_ms + 5)));
                continue;
            }
            let Some(e) = self.endpoints.get(&seq) else {
                continue;
            };
            *self.in_flight_per_endpoint.entry(seq).or_default() += 1;
            taken.push((at, id));
            jobs.push(Job {
                delivery: id,
                endpoint_seq: seq,
                url: e.url.clone(),
                secrets: e.signing_secrets(now_ms),
                webhook_id: d.event.id.to_string(),
                body: d.event.body.clone(),
                attempts_scheduled: d.attempts_scheduled,
                manual: d.manual,
            });
        }
        for (at, id) in taken {
            self.due.remove(&(at, id));
            self.in_flight.insert(id);
        }
        (jobs, wake)
    }

    /// A job's attempt is over (its record, if any, was applied just before).
    pub fn done(&mut self, job: &Job) {
        if self.in_flight.remove(&job.delivery) {
            let n = self
                .in_flight_per_endpoint
                .get_mut(&job.endpoint_seq)
                .expect("counted when taken");
            *n -= 1;
        }
        // Still pending (no record applied, e.g. the log refused it): due again.
        if let Some(d) = self.deliveries.get(&job.delivery) {
            if d.status == DeliveryStatus::Pending {
                if let Some(at) = d.next_at_ms {
                    self.due.insert((at, d.id));
                }
            }
        }
    }

    /// Whether a delivery is being attempted now.
    pub fn in_flight(&self, id: DeliveryId) -> bool {
        self.in_flight.contains(&id)
    }

    /// Pending deliveries in all (metrics).
    pub fn pending(&self) -> usize {
        self.pending_per_endpoint.values().sum()
    }

    /// Invariants; tests call it, debug builds after every change.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut pending: HashMap<u32, usize> = HashMap::new();
        for d in self.deliveries.values() {
            let seq = endpoint_seq(d.id);
            if d.status == DeliveryStatus::Pending {
                *pending.entry(seq).or_default() += 1;
                let Some(at) = d.next_at_ms else {
                    return Err(format!("pending delivery {} has no due time", d.id));
                };
                if !self.in_flight.contains(&d.id) && !self.due.contains(&(at, d.id)) {
                    return Err(format!("pending delivery {} is not due", d.id));
                }
            } else if d.next_at_ms.is_some() {
                return Err(format!("finished delivery {} has a due time", d.id));
            }
            if !self
                .tenant_log
                .get(&d.event.tenant)
                .is_some_and(|l| l.contains(&d.id))
            {
                return Err(format!("delivery {} is not in its tenant's log", d.id));
            }
            if event_of(d.id) != d.event.id {
                return Err(format!("delivery {} names another event", d.id));
            }
        }
        for (seq, n) in &self.pending_per_endpoint {
            if pending.get(seq).copied().unwrap_or(0) != *n {
                return Err(format!("endpoint #{seq}: {n} pending counted"));
            }
        }
        for (_, id) in &self.due {
            if self.deliveries.get(id).map(|d| d.status) != Some(DeliveryStatus::Pending) {
                return Err(format!("due delivery {id} is not pending"));
            }
        }
        for (tenant, seqs) in &self.by_tenant {
            if seqs.iter().any(|s| self.endpoints[s].tenant != *tenant) {
                return Err(format!("tenant {tenant} lists another's endpoint"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhooks::payload::event_id;
    use crate::webhooks::ALL_EVENTS;

    const LIMITS: Limits = Limits {
        first_delay_ms: 0,
        finished_per_tenant_max: 3,
        pending_per_endpoint_max: 4,
    };
    const T: TenantId = TenantId(7);

    fn endpoint(seq: u32) -> WebhookRecord {
        WebhookRecord::EndpointCreated(Box::new(Endpoint {
            id: EndpointId(100 + seq as u128),
            seq,
            tenant: T,
            url: "https://example.com/h".into(),
            events: ALL_EVENTS,
            description: String::new(),
            secrets: vec![Secret {
                value: "whsec_AAAA".into(),
                until_ms: None,
            }],
            enabled: true,
            disabled_reason: None,
            disabled_at_ms: None,
            enabled_lsn: 0,
            failing_since_ms: None,
            created_at_ms: 1,
            request_id: None,
        }))
    }

    fn ev(lsn: u64) -> OutEvent {
        OutEvent {
            id: event_id(lsn, 0),
            tenant: T,
            kind: 0,
            at_ms: lsn,
            body: b"{}".to_vec(),
        }
    }

    fn attempt(status: u16, next: Option<u64>) -> Attempt {
        Attempt {
            at_ms: 50,
            status,
            latency_ms: 1,
            error: String::new(),
            next_at_ms: next,
            manual: false,
        }
    }

    #[test]
    fn only_events_after_an_endpoint_reach_it() {
        let mut s = OutboxState::new(LIMITS);
        s.emit(ev(1)); // no endpoint yet
        s.apply(&endpoint(1), 2);
        s.emit(ev(1)); // emitted late (another actor), still before the endpoint
        s.emit(ev(3));
        s.emit(ev(3)); // a repeat is ignored
        assert_eq!(s.pending(), 1);
        s.check_invariants().unwrap();
    }

    #[test]
    fn a_fuzzy_snapshot_neither_loses_nor_repeats_events() {
        let mut live = OutboxState::new(LIMITS);
        live.apply(&endpoint(1), 1);
        live.emit(ev(5));
        live.emit(ev(9)); // after the snapshot's covered LSN, before its capture
        let (jobs, _) = live.take_due(100, u64::MAX, 10, 10);
        let d9 = jobs
            .iter()
            .find(|j| event_of(j.delivery) == event_id(9, 0))
            .unwrap();
        live.apply(
            &WebhookRecord::Attempted {
                delivery: d9.delivery,
                attempt: attempt(200, None),
            },
            10,
        );
        for j in &jobs {
            live.done(j);
        }
        let image = live.image(7);
        assert_eq!(image.seen, vec![event_id(9, 0)]);
        // Replay of the log above LSN 7 emits 9 again: already here, and delivered.
        let mut back = OutboxState::from_image(image.clone(), LIMITS);
        back.emit(ev(9));
        back.emit(ev(6)); // at or below the covered LSN: replay never re-emits it
        back.check_invariants().unwrap();
        assert_eq!(back.pending(), 1, "only event 5 is still pending");
        assert_eq!(back.image(7), image);
    }

    #[test]
    fn backlog_fails_at_once_and_finished_log_is_bounded() {
        let mut s = OutboxState::new(LIMITS);
        s.apply(&endpoint(1), 1);
        for lsn in 2..=8 {
            s.emit(ev(lsn));
        }
        assert_eq!(s.pending(), 4);
        let failed = s
            .deliveries_of(T, None, 100, 100, |d| d.status == DeliveryStatus::Failed)
            .len();
        assert_eq!(failed, 3, "over the backlog: failed at once, visible");
        s.check_invariants().unwrap();
        // Four more finish: the finished log keeps the newest three.
        let (jobs, _) = s.take_due(100, u64::MAX, 10, 10);
        assert_eq!(jobs.len(), 4);
        let mut lsn = 100;
        for j in &jobs {
            lsn += 1;
            s.apply(
                &WebhookRecord::Attempted {
                    delivery: j.delivery,
                    attempt: attempt(200, None),
                },
                lsn,
            );
            s.done(j);
        }
        assert_eq!(s.pending(), 0);
        assert_eq!(s.deliveries_of(T, None, 100, 100, |_| true).len(), 3);
        s.check_invariants().unwrap();
    }

    #[test]
    fn retries_disable_and_redelivery() {
        let mut s = OutboxState::new(LIMITS);
        s.apply(&endpoint(1), 1);
        s.emit(ev(2));
        assert!(
            s.take_due(1, 2, 10, 10).0.is_empty(),
            "due at its event's time"
        );
        let (jobs, wake) = s.take_due(10, 1, 10, 10);
        assert!(jobs.is_empty(), "its cause is not acknowledged yet");
        assert!(wake.is_some());
        let (jobs, _) = s.take_due(10, 2, 10, 10);
        let j = &jobs[0];
        assert_eq!(j.webhook_id, event_id(2, 0).to_string());
        s.apply(
            &WebhookRecord::Attempted {
                delivery: j.delivery,
                attempt: attempt(500, Some(1_000)),
            },
            3,
        );
        s.done(j);
        assert!(
            s.take_due(999, 2, 10, 10).0.is_empty(),
            "not due before its time"
        );
        assert_eq!(s.endpoint_by_seq(1).unwrap().failing_since_ms, Some(50));
        s.apply(
            &WebhookRecord::EndpointUpdated {
                endpoint: EndpointId(101),
                url: None,
                events: None,
                description: None,
                enabled: Some(false),
                reason: Some("test".into()),
                at_ms: 60,
            },
            4,
        );
        let d = s.delivery(T, j.delivery).unwrap();
        assert_eq!(d.status, DeliveryStatus::Failed);
        assert!(d.note.as_deref().unwrap().contains("endpoint_disabled"));
        s.emit(ev(5)); // disabled: not delivered
        assert_eq!(s.pending(), 0);
        s.apply(
            &WebhookRecord::Redelivery {
                delivery: j.delivery,
                at_ms: 70,
            },
            6,
        );
        let (jobs, _) = s.take_due(70, 6, 10, 10);
        assert!(jobs[0].manual);
        s.check_invariants().unwrap();
    }
}
