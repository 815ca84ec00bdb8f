//! The `Outbox` handle: endpoint operations and queries for the HTTP layer, emission for
//! the actors, and the state the dispatcher works from.
//!
//! One lock, not an actor (like `accounts.rs`): emission must happen inside the emitting
//! actor's handler, right after it applied the record (so a snapshot that captured the
//! actor also finds the event here), and reads are cheap and frequent. Every webhook
//! record is appended and applied under the lock, so apply order is LSN order, as in
//! replay. The lock is never held across an await.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::engine::events::Record;
use crate::engine::{journal, Clock};
use crate::ids::{DeliveryId, EndpointId, TenantId};
use crate::webhooks::payload::OutEvent;
use crate::webhooks::state::{
    Delivery, DeliveryStatus, Endpoint, Limits, OutboxImage, OutboxState, Secret, WebhookRecord,
};
use crate::webhooks::{sign, WebhookConfig};

/// Why a webhook operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// No such endpoint or delivery for this tenant.
    #[error("not found")]
    NotFound,
    /// A bad request (the message says which field).
    #[error("{0}")]
    Invalid(String),
    /// The tenant has as many endpoints as allowed.
    #[error("a tenant may have at most {0} webhook endpoints")]
    TooMany(usize),
    /// The same `Idempotency-Key` created another endpoint.
    #[error("idempotency key {0} was already used with a different request")]
    KeyReused(String),
    /// A redelivery of a delivery that is still pending.
    #[error("the delivery is still pending")]
    Pending,
    /// The log refused the write.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// An endpoint to create (the URL already passed the SSRF check).
#[derive(Debug, Clone)]
pub struct NewEndpoint {
    pub url: String,
    pub events: u16,
    pub description: String,
    pub request_id: Option<String>,
}

/// Changes to an endpoint (`None`: unchanged).
#[derive(Debug, Clone, Default)]
pub struct EndpointChanges {
    pub url: Option<String>,
    pub events: Option<u16>,
    pub description: Option<String>,
    pub enabled: Option<bool>,
}

/// The outbox.
pub struct Outbox {
    state: Mutex<OutboxState>,
    wal: wal::Wal,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) cfg: WebhookConfig,
    /// Wakes the dispatcher: new deliveries, a finished attempt.
    pub(crate) notify: tokio::sync::Notify,
    /// Engine-wide count of appended events (drives snapshots).
    events_appended: Arc<AtomicU64>,
    /// Set at shutdown: the dispatcher stops taking work.
    pub(crate) stopped: AtomicBool,
    /// Endpoints in all, raised before a creation is appended: an actor that finds it 0
    /// skips the lock, and no event logged after a creation can miss it.
    endpoints_total: AtomicUsize,
}

/// State bounds from the config.
pub fn limits(cfg: &WebhookConfig) -> Limits {
    Limits {
        first_delay_ms: cfg.retry_schedule_ms.first().copied().unwrap_or(0),
        finished_per_tenant_max: cfg.finished_per_tenant_max.max(1),
        pending_per_endpoint_max: cfg.pending_per_endpoint_max.max(1),
    }
}

impl Outbox {
    pub(crate) fn new(
        state: OutboxState,
        wal: wal::Wal,
        clock: Arc<dyn Clock>,
        cfg: WebhookConfig,
        events_appended: Arc<AtomicU64>,
    ) -> Arc<Outbox> {
        Arc::new(Outbox {
            endpoints_total: AtomicUsize::new(state.endpoints_total()),
            state: Mutex::new(state),
            wal,
            clock,
            cfg,
            notify: tokio::sync::Notify::new(),
            events_appended,
            stopped: AtomicBool::new(false),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, OutboxState> {
        self.state.lock().expect("not poisoned")
    }

    /// Events of a record just applied by an actor. `make` runs only when the tenant has
    /// an endpoint (most don't: no JSON is built for them).
    pub fn emit(&self, tenant: TenantId, make: impl FnOnce() -> Vec<OutEvent>) {
        if self.endpoints_total.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut st = self.lock();
        if !st.listens(tenant) {
            return;
        }
        let events = make();
        if events.is_empty() {
            return;
        }
        for e in events {
            st.emit(e);
        }
        debug_assert_eq!(st.check_invariants(), Ok(()));
        drop(st);
        self.notify.notify_one();
    }

    /// Appends and applies a record under the lock.
    pub(crate) fn append(
        &self,
        st: &mut OutboxState,
        rec: WebhookRecord,
    ) -> Result<wal::Durable, WebhookError> {
        let record = Record::Webhook(rec);
        let durable = journal::append(&self.wal, &record)
            .map_err(|e| WebhookError::Unavailable(e.to_string()))?;
        let Record::Webhook(rec) = record else {
            unreachable!("built above")
        };
        st.apply(&rec, durable.lsn());
        self.events_appended.fetch_add(1, Ordering::Relaxed);
        debug_assert_eq!(st.check_invariants(), Ok(()));
        Ok(durable)
    }

    async fn durable(d: wal::Durable) -> Result<(), WebhookError> {
        d.await
            .map(|_| ())
            .map_err(|e| WebhookError::Unavailable(e.to_string()))
    }

    /// Creates an endpoint with a new secret. A repeat of `request_id` returns the first
    /// endpoint (`false`: not created now).
    pub async fn create_endpoint(
        &self,
        tenant: TenantId,
        new: NewEndpoint,
    ) -> Result<(Endpoint, bool), WebhookError> {
        let secret = sign::new_secret().map_err(|e| WebhookError::Unavailable(e.to_string()))?;
        let (endpoint, durable) = {
            let mut st = self.lock();
            let mine = st.endpoints_of(tenant);
            let repeat = new.request_id.as_ref().and_then(|r| {
                mine.iter()
                    .find(|e| e.request_id.as_ref() == Some(r))
                    .map(|e| (r.clone(), (*e).clone()))
            });
            if let Some((r, e)) = repeat {
                if e.url != new.url || e.events != new.events {
                    return Err(WebhookError::KeyReused(r));
                }
                (e, None)
            } else if mine.len() >= self.cfg.endpoints_per_tenant_max {
                return Err(WebhookError::TooMany(self.cfg.endpoints_per_tenant_max));
            } else {
                let now = self.clock.now_ms();
                let endpoint = Endpoint {
                    id: EndpointId::generate(now),
                    seq: st.next_seq(),
                    tenant,
                    url: new.url,
                    events: new.events,
                    description: new.description,
                    secrets: vec![Secret {
                        value: secret,
                        until_ms: None,
                    }],
                    enabled: true,
                    disabled_reason: None,
                    disabled_at_ms: None,
                    enabled_lsn: 0,
                    failing_since_ms: None,
                    created_at_ms: now,
                    request_id: new.request_id,
                };
                let id = endpoint.id;
                self.endpoints_total.fetch_add(1, Ordering::SeqCst);
                let appended =
                    self.append(&mut st, WebhookRecord::EndpointCreated(Box::new(endpoint)));
                self.endpoints_total
                    .store(st.endpoints_total(), Ordering::SeqCst);
                let d = appended?;
                (
                    st.endpoint(tenant, id).expect("just created").clone(),
                    Some(d),
                )
            }
        };
        match durable {
            Some(d) => {
                Self::durable(d).await?;
                Ok((endpoint, true))
            }
            None => {
                // The original may not be acknowledged yet: wait for all appended so far.
                self.wal
                    .wait_acked(self.wal.next_lsn().saturating_sub(1))
                    .await
                    .map_err(|e| WebhookError::Unavailable(e.to_string()))?;
                Ok((endpoint, false))
            }
        }
    }

    /// A new current secret; the old one keeps signing for `overlap_ms`.
    pub async fn rotate_secret(
        &self,
        tenant: TenantId,
        id: EndpointId,
        overlap_ms: u64,
    ) -> Result<Endpoint, WebhookError> {
        let secret = sign::new_secret().map_err(|e| WebhookError::Unavailable(e.to_string()))?;
        let (e, d) = {
            let mut st = self.lock();
            st.endpoint(tenant, id).ok_or(WebhookError::NotFound)?;
            let now = self.clock.now_ms();
            let d = self.append(
                &mut st,
                WebhookRecord::SecretRotated {
                    endpoint: id,
                    secret,
                    previous_until_ms: now.saturating_add(overlap_ms),
                    at_ms: now,
                },
            )?;
            (st.endpoint(tenant, id).expect("exists").clone(), d)
        };
        Self::durable(d).await?;
        Ok(e)
    }

    /// Changes an endpoint (the URL already passed the SSRF check).
    pub async fn update_endpoint(
        &self,
        tenant: TenantId,
        id: EndpointId,
        ch: EndpointChanges,
    ) -> Result<Endpoint, WebhookError> {
        let (e, d) = {
            let mut st = self.lock();
            st.endpoint(tenant, id).ok_or(WebhookError::NotFound)?;
            let d = self.append(
                &mut st,
                WebhookRecord::EndpointUpdated {
                    endpoint: id,
                    url: ch.url,
                    events: ch.events,
                    description: ch.description,
                    enabled: ch.enabled,
                    reason: ch
                        .enabled
                        .and_then(|e| (!e).then(|| "by the tenant".to_owned())),
                    at_ms: self.clock.now_ms(),
                },
            )?;
            (st.endpoint(tenant, id).expect("exists").clone(), d)
        };
        Self::durable(d).await?;
        Ok(e)
    }

    /// Deletes an endpoint and its deliveries.
    pub async fn delete_endpoint(
        &self,
        tenant: TenantId,
        id: EndpointId,
    ) -> Result<Endpoint, WebhookError> {
        let (e, d) = {
            let mut st = self.lock();
            let e = st
                .endpoint(tenant, id)
                .ok_or(WebhookError::NotFound)?
                .clone();
            let d = self.append(
                &mut st,
                WebhookRecord::EndpointDeleted {
                    endpoint: id,
                    at_ms: self.clock.now_ms(),
                },
            )?;
            self.endpoints_total
                .store(st.endpoints_total(), Ordering::SeqCst);
            (e, d)
        };
        Self::durable(d).await?;
        Ok(e)
    }

    /// Makes a finished delivery due now, for one attempt.
    pub async fn redeliver(
        &self,
        tenant: TenantId,
        id: DeliveryId,
    ) -> Result<Delivery, WebhookError> {
        let (del, d) = {
            let mut st = self.lock();
            let del = st.delivery(tenant, id).ok_or(WebhookError::NotFound)?;
            if del.status == DeliveryStatus::Pending || st.in_flight(id) {
                return Err(WebhookError::Pending);
            }
            if st.endpoint(tenant, del.endpoint).is_none_or(|e| !e.enabled) {
                return Err(WebhookError::Invalid(
                    "the endpoint is disabled: enable it first".into(),
                ));
            }
            let d = self.append(
                &mut st,
                WebhookRecord::Redelivery {
                    delivery: id,
                    at_ms: self.clock.now_ms(),
                },
            )?;
            (st.delivery(tenant, id).expect("exists").clone(), d)
        };
        Self::durable(d).await?;
        self.notify.notify_one();
        Ok(del)
    }

    /// A tenant's endpoints, oldest first.
    pub fn endpoints(&self, tenant: TenantId) -> Vec<Endpoint> {
        self.lock()
            .endpoints_of(tenant)
            .into_iter()
            .cloned()
            .collect()
    }

    /// One endpoint.
    pub fn endpoint(&self, tenant: TenantId, id: EndpointId) -> Option<Endpoint> {
        self.lock().endpoint(tenant, id).cloned()
    }

    /// One delivery.
    pub fn delivery(&self, tenant: TenantId, id: DeliveryId) -> Option<Delivery> {
        self.lock().delivery(tenant, id).cloned()
    }

    /// A page of the delivery log, newest first.
    pub fn deliveries(
        &self,
        tenant: TenantId,
        before: Option<DeliveryId>,
        limit: usize,
        keep: impl Fn(&Delivery) -> bool,
    ) -> Vec<Delivery> {
        // A filtered page looks at no more than this many entries (bounded work per request).
        const SCAN_MAX: usize = 100_000;
        self.lock()
            .deliveries_of(tenant, before, limit, SCAN_MAX, keep)
            .into_iter()
            .cloned()
            .collect()
    }

    /// The snapshot image (after every actor was captured).
    pub(crate) fn image(&self, covered_lsn: u64) -> OutboxImage {
        self.lock().image(covered_lsn)
    }

    /// Pending deliveries (metrics).
    pub fn pending(&self) -> usize {
        self.lock().pending()
    }

    /// Invariants of the state.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.lock().check_invariants()
    }

    /// Stops the dispatcher taking new work.
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    pub(crate) fn wal(&self) -> &wal::Wal {
        &self.wal
    }
}
