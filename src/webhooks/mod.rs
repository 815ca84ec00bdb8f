//! Webhooks (SPEC §6): the tenant's own systems learn of results from signed POSTs.
//!
//! - `payload.rs`    which state changes are events, and their JSON (pure: live = replay)
//! - `state.rs`      endpoints, deliveries and the records that change them (`apply`)
//! - `outbox.rs`     the `Outbox` handle: endpoint operations, queries, emission
//! - `dispatcher.rs` the delivery loop: due deliveries, bounded concurrency, retries
//! - `sign.rs`       Standard Webhooks secrets and signatures
//! - `ssrf.rs`       which targets may be called: URL rules and the address filter
//!
//! The outbox is not a second write. An event is a pure function of the batch or wallet
//! record that caused it (`payload.rs`), evaluated by the actor that appends the record
//! and, after a crash, by recovery as it replays it; its id is that record's LSN. So an
//! event exists exactly when its cause is in the log: a crash can neither lose one nor
//! invent one, and none is sent before its cause is acknowledged. Delivery progress
//! (attempts, disables, redeliveries) is recorded as `Record::Webhook`, so a restart
//! resumes where it stopped; an attempt whose record was lost is made again
//! (at-least-once, with the same `webhook-id`).

pub mod dispatcher;
pub mod outbox;
pub mod payload;
pub mod sign;
pub mod ssrf;
pub mod state;

pub use outbox::{Outbox, WebhookError};

/// The event types of SPEC §6, in a fixed order: an endpoint's filter is a bit set over it.
pub const EVENT_TYPES: [&str; 9] = [
    "batch.created",
    "batch.item.succeeded",
    "batch.item.failed",
    "batch.completed",
    "batch.partial",
    "batch.failed",
    "batch.canceled",
    "wallet.topped_up",
    "wallet.low_balance",
];

/// A filter that takes every event type.
pub const ALL_EVENTS: u16 = (1 << EVENT_TYPES.len()) - 1;

/// The index of an event type's name.
pub fn event_type(name: &str) -> Option<u8> {
    EVENT_TYPES.iter().position(|t| *t == name).map(|i| i as u8)
}

/// Webhook settings (from `[webhooks]`); every bound has a default.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Targets on loopback/private/link-local addresses are allowed (tests, demos).
    pub allow_private_targets: bool,
    /// `http://` targets are allowed (otherwise https only).
    pub allow_http: bool,
    /// Delay before each automatic attempt (the first is usually 0); its length is the
    /// number of attempts.
    pub retry_schedule_ms: Vec<u64>,
    /// Deadline of one attempt, connect to last byte.
    pub timeout_ms: u64,
    /// An endpoint failing without a success for this long is disabled.
    pub disable_after_ms: u64,
    /// ± this share (percent) of a retry delay is random, so receivers coming back are
    /// not hit by every delivery at once.
    pub jitter_pct: u64,
    /// A receiver's `Retry-After` is honoured up to this.
    pub retry_after_max_ms: u64,
    /// Attempts in flight across all endpoints.
    pub concurrency_max: usize,
    /// Attempts in flight to one endpoint.
    pub concurrency_per_endpoint: usize,
    /// Endpoints one tenant may register.
    pub endpoints_per_tenant_max: usize,
    /// Finished deliveries kept per tenant for the log and redelivery (oldest dropped).
    pub finished_per_tenant_max: usize,
    /// Pending deliveries one endpoint may have; beyond it a new event's delivery is
    /// recorded failed (`backlog_full`) at once and can be redelivered by hand.
    pub pending_per_endpoint_max: usize,
    /// Old secret's validity after a rotation when the request names none.
    pub rotation_overlap_ms_default: u64,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            allow_private_targets: false,
            allow_http: false,
            retry_schedule_ms: [0u64, 5, 300, 1800, 7200, 18000, 36000, 36000]
                .iter()
                .map(|s| s * 1000)
                .collect(),
            timeout_ms: 15_000,
            disable_after_ms: 5 * 24 * 3600 * 1000,
            jitter_pct: 10,
            retry_after_max_ms: 24 * 3600 * 1000,
            concurrency_max: 64,
            concurrency_per_endpoint: 4,
            endpoints_per_tenant_max: 16,
            finished_per_tenant_max: 1_000,
            pending_per_endpoint_max: 100_000,
            rotation_overlap_ms_default: 24 * 3600 * 1000,
        }
    }
}
