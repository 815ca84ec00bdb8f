//! Engine values → the JSON shapes of SPEC §11 (one function per shape, so every route
//! that shows a batch shows it the same way).

use serde_json::{json, Value};

use crate::api::json::rfc3339;
use crate::engine::accounts::{scope_names, ApiKey, Tenant};
use crate::engine::batch::{BatchView, ItemView, Quote};
use crate::engine::wallet::ledger::{hex, LedgerEntry};
use crate::engine::wallet::state::{Balances, Statement};
use crate::ids::TenantId;

pub fn batch(v: &BatchView) -> Value {
    json!({
        "id": v.id.to_string(),
        "object": "batch",
        "status": v.status.as_str(),
        "unit_price": v.unit_price,
        "total": v.total,
        "counts": {
            "total": v.counts.total,
            "pending": v.counts.pending,
            "running": v.counts.running,
            "succeeded": v.counts.succeeded,
            "failed": v.counts.failed,
            "canceled": v.counts.canceled,
        },
        "credits": {
            "held": v.held,
            "settled": v.settled,
            "released": v.released,
            "remaining": v.remaining,
        },
        "template": v.template,
        "params": {
            "model": v.params.model,
            "duration_seconds": v.params.duration_seconds,
            "resolution": v.params.resolution,
            "aspect_ratio": v.params.aspect_ratio,
        },
        "provider": v.provider,
        "request_id": v.request_id,
        "retry_of": v.retry_of.map(|b| b.to_string()),
        "cancel_requested": v.cancel_requested,
        "created_at": rfc3339(v.created_at_ms),
        "expires_at": rfc3339(v.expires_at_ms),
        "finished_at": v.finished_at_ms.map(rfc3339),
    })
}

pub fn item(v: &ItemView) -> Value {
    json!({
        "id": v.id,
        "object": "item",
        "index": v.index,
        "prompt": v.prompt,
        "status": v.status.as_str(),
        "failure_code": v.failure.as_ref().map(|f| f.code.clone()),
        "failure_message": v.failure.as_ref().map(|f| f.message.clone()),
        "attempts": v.attempts,
        "video_id": v.output.as_ref().map(|o| o.video.to_string()),
    })
}

pub fn quote(q: &Quote) -> Value {
    json!({
        "items": q.items,
        "unit_price": q.unit_price,
        "total": q.total,
        "sample_prompts": q.sample_prompts,
    })
}

pub fn wallet(tenant: TenantId, b: &Balances) -> Value {
    json!({
        "object": "wallet",
        "tenant_id": tenant.to_string(),
        "available": b.available,
        "held": b.held,
        "granted": b.granted,
        "spent": b.spent,
        "released": b.released,
        "adjusted": b.adjusted,
        "expired": b.expired,
        "low_balance_threshold": b.low_balance_threshold,
    })
}

/// `led_<tenant's 26 characters>_<seq>`.
pub fn entry_id(tenant: TenantId, seq: u64) -> String {
    let t = tenant.to_string();
    format!("led_{}_{seq}", &t[TenantId::PREFIX.len()..])
}

/// A reconciliation report (the admin endpoint and `reelbatch reconcile --json`).
pub fn reconciliation(r: &crate::engine::reconcile::Report) -> Value {
    let discrepancies: Vec<Value> = r
        .discrepancies
        .iter()
        .map(|d| {
            json!({
                "tenant_id": d.tenant.to_string(),
                "batch_id": d.batch.map(|b| b.to_string()),
                "check": d.check,
                "detail": d.detail,
            })
        })
        .collect();
    json!({
        "tenants_checked": r.tenants_checked,
        "batches_checked": r.batches_checked,
        "discrepancies": discrepancies,
    })
}

pub fn ledger_entry(tenant: TenantId, e: &LedgerEntry, prev_hash: Option<&[u8; 32]>) -> Value {
    serde_json::to_value(LedgerEntryView::new(tenant, e, prev_hash))
        .expect("a ledger entry view always serialises")
}

/// A ledger entry as clients see it, serialised straight to bytes where it is the whole
/// response (a top-up, an adjustment, an export line): building a `Value` map first cost
/// more than the rest of the top-up handler. Fields are declared in alphabetical order,
/// the order a `Value` map writes them, so both paths produce the same bytes.
#[derive(serde::Serialize)]
pub struct LedgerEntryView<'a> {
    amount: Amount,
    at: String,
    available_after: u64,
    batch_id: Option<String>,
    grant: Option<u32>,
    hash: String,
    held_after: u64,
    id: String,
    item_id: Option<String>,
    item_index: Option<u32>,
    kind: &'static str,
    object: &'static str,
    parts: Vec<PartView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prev_hash: Option<String>,
    reason: Option<&'a str>,
    request_id: Option<&'a str>,
    seq: u64,
    tenant_id: String,
}

/// A signed amount: credits out of the wallet are negative.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum Amount {
    In(u64),
    Out(i64),
}

/// Which grant a movement drew on (alphabetical fields, as above).
#[derive(serde::Serialize)]
struct PartView {
    amount: u64,
    grant: u32,
}

impl<'a> LedgerEntryView<'a> {
    /// The view of `e`; `prev_hash` is shown in exports and ledger pages (the chain).
    pub fn new(tenant: TenantId, e: &'a LedgerEntry, prev_hash: Option<&[u8; 32]>) -> Self {
        LedgerEntryView {
            amount: if e.negative {
                Amount::Out(-(e.amount as i128) as i64)
            } else {
                Amount::In(e.amount)
            },
            at: rfc3339(e.at_ms),
            available_after: e.available_after,
            batch_id: e.batch.map(|b| b.to_string()),
            grant: e.grant,
            hash: hex(&e.hash),
            held_after: e.held_after,
            id: entry_id(tenant, e.seq),
            item_id: match (e.batch, e.item) {
                (Some(b), Some(i)) => Some(crate::ids::item_id(b, i)),
                _ => None,
            },
            item_index: e.item,
            kind: e.kind.as_str(),
            object: "ledger_entry",
            parts: e
                .parts
                .iter()
                .map(|&(grant, amount)| PartView { amount, grant })
                .collect(),
            prev_hash: prev_hash.map(|p| hex(p)),
            reason: e.reason.as_deref(),
            request_id: e.request_id.as_deref(),
            seq: e.seq,
            tenant_id: tenant.to_string(),
        }
    }
}

pub fn statement(tenant: TenantId, s: &Statement) -> Value {
    json!({
        "object": "statement",
        "tenant_id": tenant.to_string(),
        "from": rfc3339(s.from_ms),
        "to": rfc3339(s.to_ms),
        "opening": {"available": s.opening_available, "held": s.opening_held},
        "top_ups": s.top_ups,
        "held": s.held,
        "settled": s.settled,
        "released": s.released,
        "expired": s.expired,
        "adjusted": s.adjusted as i64,
        "settled_by_batch": s.settled_by_batch.iter()
            .map(|(b, c)| json!({"batch_id": b.to_string(), "credits": c})).collect::<Vec<_>>(),
        "settled_by_grant": s.settled_by_grant.iter()
            .map(|(g, c)| json!({"grant": g, "credits": c})).collect::<Vec<_>>(),
        "closing": {"available": s.closing_available, "held": s.closing_held},
        "entries": s.entries,
    })
}

/// The statement as CSV: `line,reference,credits`.
pub fn statement_csv(s: &Statement) -> String {
    let mut out = String::from("line,reference,credits\n");
    let mut row = |line: &str, reference: &str, credits: String| {
        out.push_str(&format!("{line},{reference},{credits}\n"));
    };
    row("from", &rfc3339(s.from_ms), String::new());
    row("to", &rfc3339(s.to_ms), String::new());
    row("opening_available", "", s.opening_available.to_string());
    row("opening_held", "", s.opening_held.to_string());
    row("top_ups", "", s.top_ups.to_string());
    row("held", "", s.held.to_string());
    row("settled", "", s.settled.to_string());
    row("released", "", s.released.to_string());
    row("expired", "", s.expired.to_string());
    row("adjusted", "", s.adjusted.to_string());
    for (b, c) in &s.settled_by_batch {
        row("settled_by_batch", &b.to_string(), c.to_string());
    }
    for (g, c) in &s.settled_by_grant {
        row("settled_by_grant", &format!("grant_{g}"), c.to_string());
    }
    row("closing_available", "", s.closing_available.to_string());
    row("closing_held", "", s.closing_held.to_string());
    out
}

pub fn tenant(t: &Tenant) -> Value {
    json!({
        "id": t.id.to_string(),
        "object": "tenant",
        "name": t.name,
        "plan": t.plan,
        "created_at": rfc3339(t.created_at_ms),
    })
}

pub fn key(k: &ApiKey) -> Value {
    json!({
        "id": k.id.to_string(),
        "object": "api_key",
        "tenant_id": k.tenant.to_string(),
        "name": k.name,
        "scopes": scope_names(k.scopes),
        "daily_credit_limit": k.daily_credit_limit,
        "expires_at": k.expires_at_ms.map(rfc3339),
        "created_at": rfc3339(k.created_at_ms),
        "revoked_at": k.revoked_at_ms.map(rfc3339),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::wallet::ledger::EntryKind;
    use crate::ids::BatchId;

    fn entry(kind: EntryKind, negative: bool) -> LedgerEntry {
        LedgerEntry {
            seq: 7,
            kind,
            amount: 40,
            negative,
            available_after: 60,
            held_after: 40,
            batch: Some(BatchId(99)),
            item: Some(3),
            grant: None,
            parts: vec![(1, 30), (2, 10)],
            request_id: Some("req-1".into()),
            reason: Some("why \"quoted\"".into()),
            at_ms: 1_700_000_000_123,
            lsn: 11,
            hash: [0xab; 32],
        }
    }

    #[test]
    fn ledger_entry_view_writes_the_bytes_of_its_value() {
        let t = TenantId(5);
        let mut top_up = entry(EntryKind::TopUp, false);
        top_up.batch = None;
        top_up.item = None;
        top_up.parts.clear();
        top_up.reason = None;
        top_up.grant = Some(1);
        let cases = [
            (entry(EntryKind::Hold, true), Some([0x01u8; 32])),
            (top_up, None),
        ];
        for (e, prev) in &cases {
            let view = LedgerEntryView::new(t, e, prev.as_ref());
            let direct = serde_json::to_string(&view).unwrap();
            // A `Value` map writes keys sorted: equal bytes mean the struct's fields are
            // in that order and carry the same content.
            let via_value = ledger_entry(t, e, prev.as_ref()).to_string();
            assert_eq!(direct, via_value);
        }
        let hold = ledger_entry(t, &cases[0].0, cases[0].1.as_ref());
        assert_eq!(hold["amount"], json!(-40));
        assert_eq!(
            hold["parts"],
            json!([{"grant": 1, "amount": 30}, {"grant": 2, "amount": 10}])
        );
        assert_eq!(hold["prev_hash"], json!("01".repeat(32)));
        assert_eq!(hold["hash"], json!("ab".repeat(32)));
        assert_eq!(hold["item_index"], json!(3));
        let top = ledger_entry(t, &cases[1].0, None);
        assert_eq!(top["amount"], json!(40));
        assert!(top.get("prev_hash").is_none(), "no prev_hash unless asked");
        assert_eq!(top["batch_id"], Value::Null);
        assert_eq!(top["object"], json!("ledger_entry"));
    }
}
