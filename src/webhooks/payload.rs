//! Which state changes are webhook events, and their bodies.
//!
//! Pure functions of a record and the state right after `apply`ing it, called by the actor
//! that appended the record and by recovery when it replays it: both make the same event
//! with the same id (`evt_` of the record's LSN) and the same bytes. Credit figures are
//! the batch's committed ones (a succeeded item's price is settled, a failed or canceled
//! one's released), so a receiver can reconcile from events alone:
//! `held = settled + released + remaining`, and a finished batch has `remaining = 0`.
//!
//! Items canceled or expired together (one record) are not one event each: the batch's
//! final event carries their counts and credits.

use serde_json::{json, Value};

use crate::engine::batch::state::{BatchEvent, BatchState, BatchStatus, Phase};
use crate::engine::wallet::state::{GrantKind, WalletEvent, WalletState};
use crate::ids::{EventId, TenantId};
use crate::webhooks::event_type;

/// One event to deliver.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct OutEvent {
    /// `evt_…`: the LSN of its cause and a number within it.
    pub id: EventId,
    /// Owner (only their endpoints receive it).
    pub tenant: TenantId,
    /// Index into `EVENT_TYPES`.
    pub kind: u8,
    /// When its cause happened (the first attempt is due then).
    pub at_ms: u64,
    /// The body, exactly as signed and sent: `{"id","type","created_at","data"}`.
    pub body: Vec<u8>,
}

impl OutEvent {
    /// LSN of the record that caused it (sent only once that is acknowledged).
    pub fn lsn(&self) -> u64 {
        lsn_of(self.id)
    }
}

/// The event id of the `n`th event of the record at `lsn`.
pub fn event_id(lsn: u64, n: u8) -> EventId {
    EventId(((lsn as u128) << 8) | n as u128)
}

/// The LSN inside an event id.
pub fn lsn_of(id: EventId) -> u64 {
    (id.0 >> 8) as u64
}

fn event(tenant: TenantId, lsn: u64, n: u8, kind: &str, at_ms: u64, data: Value) -> OutEvent {
    let id = event_id(lsn, n);
    let body = json!({
        "id": id.to_string(),
        "type": kind,
        "created_at": crate::api::json::rfc3339(at_ms),
        "data": data,
    });
    OutEvent {
        id,
        tenant,
        kind: event_type(kind).expect("a known event type"),
        at_ms,
        body: serde_json::to_vec(&body).expect("JSON values serialize"),
    }
}

/// The batch as an event shows it.
fn batch_data(s: &BatchState) -> Value {
    let c = &s.counts;
    let price = s.spec.unit_price;
    let held = s.spec.total();
    let (settled, released) = match s.phase {
        Phase::Finished {
            settled, released, ..
        } => (settled, released),
        // Committed: each terminal item's money follows its record.
        _ => (
            c.succeeded as u64 * price,
            (c.failed as u64 + c.canceled as u64) * price,
        ),
    };
    debug_assert!(settled + released <= held, "a batch moves at most its hold");
    json!({
        "id": s.id.to_string(),
        "status": s.status().as_str(),
        "request_id": s.spec.request_id,
        "retry_of": s.spec.retry_of.map(|b| b.to_string()),
        "unit_price": price,
        "total": held,
        "counts": {
            "total": c.total,
            "pending": c.pending,
            "running": c.running,
            "succeeded": c.succeeded,
            "failed": c.failed,
            "canceled": c.canceled,
        },
        "credits": {
            "held": held,
            "settled": settled,
            "released": released,
            "remaining": held - settled - released,
        },
    })
}

/// Whether a batch record can be an event at all (a cheap test before the outbox's lock).
pub fn batch_may_emit(ev: &BatchEvent) -> bool {
    matches!(
        ev,
        BatchEvent::Accepted { .. }
            | BatchEvent::Succeeded { .. }
            | BatchEvent::Failed { .. }
            | BatchEvent::Finished { .. }
    )
}

/// Whether a wallet record can be an event at all (a cheap test before the outbox's lock).
pub fn wallet_may_emit(w: &WalletState, ev: &WalletEvent) -> bool {
    matches!(ev, WalletEvent::Granted { .. }) || w.low_balance_threshold.is_some()
}

/// The events of a batch record (`state` is after `apply`).
pub fn batch_events(s: &BatchState, ev: &BatchEvent, lsn: u64) -> Vec<OutEvent> {
    let price = s.spec.unit_price;
    let one =
        |kind: &str, at_ms: u64, data: Value| vec![event(s.tenant, lsn, 0, kind, at_ms, data)];
    match ev {
        BatchEvent::Accepted { at_ms } => {
            one("batch.created", *at_ms, json!({ "batch": batch_data(s) }))
        }
        BatchEvent::Succeeded {
            item,
            attempt,
            output,
            at_ms,
        } => one(
            "batch.item.succeeded",
            *at_ms,
            json!({
                "batch": batch_data(s),
                "item": {
                    "id": crate::ids::item_id(s.id, *item),
                    "index": item,
                    "status": "succeeded",
                    "attempts": attempt,
                    "video_id": output.video.to_string(),
                    "credits": { "settled": price },
                },
            }),
        ),
        BatchEvent::Failed {
            item,
            attempt,
            failure,
            at_ms,
        } => one(
            "batch.item.failed",
            *at_ms,
            json!({
                "batch": batch_data(s),
                "item": {
                    "id": crate::ids::item_id(s.id, *item),
                    "index": item,
                    "status": "failed",
                    "attempts": attempt,
                    "failure_code": failure.code,
                    "failure_message": failure.message,
                    "credits": { "released": price },
                },
            }),
        ),
        BatchEvent::Finished { status, at_ms, .. } => {
            let kind = match status {
                BatchStatus::Completed => "batch.completed",
                BatchStatus::Partial => "batch.partial",
                BatchStatus::Failed => "batch.failed",
                BatchStatus::Canceled => "batch.canceled",
                BatchStatus::Queued | BatchStatus::Processing => {
                    unreachable!("a batch finishes in a terminal status")
                }
            };
            one(kind, *at_ms, json!({ "batch": batch_data(s) }))
        }
        BatchEvent::Created { .. }
        | BatchEvent::Rejected { .. }
        | BatchEvent::Submitted { .. }
        | BatchEvent::Retrying { .. }
        | BatchEvent::CancelRequested { .. }
        | BatchEvent::Expired { .. } => Vec::new(),
    }
}

fn balances(w: &WalletState) -> Value {
    crate::api::routes::views::wallet(w.tenant, &w.balances())
}

/// The events of a wallet record (`w` is after `apply`; `available_before` before it).
pub fn wallet_events(
    w: &WalletState,
    available_before: u64,
    ev: &WalletEvent,
    lsn: u64,
) -> Vec<OutEvent> {
    let mut out = Vec::new();
    let at_ms = w.last_at_ms();
    if let WalletEvent::Granted {
        request_id,
        kind,
        amount,
        expires_at_ms,
        at_ms,
        ..
    } = ev
    {
        out.push(event(
            w.tenant,
            lsn,
            0,
            "wallet.topped_up",
            *at_ms,
            json!({
                "tenant_id": w.tenant.to_string(),
                "amount": amount,
                "kind": match kind {
                    GrantKind::Paid => "paid",
                    GrantKind::Promotional => "promotional",
                    GrantKind::Adjustment => "adjustment",
                },
                "request_id": request_id,
                "expires_at": expires_at_ms.map(crate::api::json::rfc3339),
                "balances": balances(w),
            }),
        ));
    }
    // Crossing the threshold downwards (not every movement below it).
    if let Some(threshold) = w.low_balance_threshold {
        if available_before >= threshold && w.available < threshold {
            out.push(event(
                w.tenant,
                lsn,
                1,
                "wallet.low_balance",
                at_ms,
                json!({
                    "tenant_id": w.tenant.to_string(),
                    "threshold": threshold,
                    "balances": balances(w),
                }),
            ));
        }
    }
    out
}
