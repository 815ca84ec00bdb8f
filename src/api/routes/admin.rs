//! `/admin/v1…`: tenants, keys, top-ups, adjustments, reconciliation, audit, export.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use crate::api::gate::PendingAck;
use crate::api::json::{json, next_cursor, page, parse_time_ms, path_id, JsonBody, Path, QueryMap};
use crate::api::problem::Problem;
use crate::api::routes::views;
use crate::api::AppState;
use crate::engine::accounts::{scope_bit, NewKey, ALL_SCOPES};
use crate::engine::wallet::ledger::{EntryKind, LedgerEntry, GENESIS_HASH};
use crate::engine::wallet::state::{GrantKind, WalletCommand};
use crate::ids::{BatchId, KeyId, TenantId};

/// Longest adjustment reason.
pub const REASON_CHARS_MAX: usize = 500;
/// Ledger entries one audit request reads before it returns a page (with a cursor).
pub const AUDIT_SCAN_MAX: usize = 200_000;
/// Entries read from a wallet per step of an export or audit.
const LEDGER_CHUNK: usize = 1_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantBody {
    name: String,
    plan: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyBody {
    name: String,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    #[serde(default)]
    daily_credit_limit: Option<u64>,
    #[serde(default)]
    expires_at: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopUpBody {
    amount: u64,
    kind: String,
    #[serde(default)]
    expires_at: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdjustmentBody {
    amount: i64,
    reason: String,
}

fn required_key(h: &HeaderMap) -> Result<String, Problem> {
    h.get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| {
            Problem::invalid("this route moves credits: an Idempotency-Key header is required")
        })
}

fn optional_key(h: &HeaderMap) -> Option<String> {
    h.get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn tenant_of(st: &AppState, id: &str) -> Result<crate::engine::accounts::Tenant, Problem> {
    let id: TenantId = path_id(id)?;
    st.engine.tenant(id).ok_or_else(Problem::not_found)
}

pub async fn create_tenant(
    State(st): State<AppState>,
    headers: HeaderMap,
    JsonBody(b): JsonBody<TenantBody>,
) -> Result<Response, Problem> {
    if !st.cfg.plans.contains_key(&b.plan) {
        let known: Vec<&str> = st.cfg.plans.keys().map(String::as_str).collect();
        return Err(Problem::invalid(format!(
            "plan must be one of {}",
            known.join(", ")
        )));
    }
    let (t, _) = st
        .engine
        .create_tenant(&b.name, &b.plan, optional_key(&headers))
        .await?;
    let mut r = json(StatusCode::CREATED, &views::tenant(&t));
    if let Ok(loc) = HeaderValue::from_str(&format!("/admin/v1/tenants/{}", t.id)) {
        r.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(r)
}

pub async fn list_tenants(State(st): State<AppState>, q: QueryMap) -> Result<Response, Problem> {
    let limit = q.limit(&st)?;
    let after = match q.get("cursor") {
        None => None,
        Some(c) => Some(
            c.parse::<TenantId>()
                .map_err(|_| Problem::invalid("cursor is not one this API returned"))?,
        ),
    };
    let list = st.engine.tenant_page(after, limit);
    let next = next_cursor(&list, limit, |t| t.id.to_string());
    Ok(page(list.iter().map(views::tenant).collect(), next))
}

pub async fn get_tenant(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let t = tenant_of(&st, &id)?;
    let b = st.engine.balances(t.id).await?;
    let mut v = views::tenant(&t);
    v["wallet"] = views::wallet(t.id, &b);
    v["keys"] = json!(st.engine.keys_of(t.id).len());
    Ok(json(StatusCode::OK, &v))
}

pub async fn create_key(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(b): JsonBody<KeyBody>,
) -> Result<Response, Problem> {
    let t = tenant_of(&st, &id)?;
    let scopes = match &b.scopes {
        None => ALL_SCOPES,
        Some(list) => {
            let mut set = 0u8;
            for s in list {
                set |= scope_bit(s).ok_or_else(|| {
                    Problem::invalid(format!(
                        "unknown scope {s:?} (known: {})",
                        crate::engine::accounts::SCOPES.join(", ")
                    ))
                })?;
            }
            set
        }
    };
    if b.daily_credit_limit.is_some() {
        let plan = st.cfg.plans.get(&t.plan);
        if !plan.is_some_and(|p| p.key_spend_caps) {
            return Err(Problem::plan_limit(format!(
                "plan {:?} has no per-key spend caps",
                t.plan
            )));
        }
    }
    let expires_at_ms = b
        .expires_at
        .as_deref()
        .map(|s| parse_time_ms(s, "expires_at"))
        .transpose()?;
    if expires_at_ms.is_some_and(|e| e <= st.engine.now_ms()) {
        return Err(Problem::invalid("expires_at must be in the future"));
    }
    let (key, secret) = st
        .engine
        .create_key(
            t.id,
            NewKey {
                name: b.name,
                scopes,
                expires_at_ms,
                daily_credit_limit: b.daily_credit_limit,
                request_id: optional_key(&headers),
            },
        )
        .await?;
    let mut v = views::key(&key);
    v["key"] = json!(secret);
    if secret.is_none() {
        v["key_redacted"] = json!(true);
    }
    Ok(json(StatusCode::CREATED, &v))
}

pub async fn list_keys(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let t = tenant_of(&st, &id)?;
    let keys = st.engine.keys_of(t.id);
    Ok(page(keys.iter().map(views::key).collect(), None))
}

pub async fn revoke_key(
    State(st): State<AppState>,
    Path(key_id): Path<String>,
) -> Result<Response, Problem> {
    let id: KeyId = path_id(&key_id)?;
    let k = st.engine.revoke_key(id).await?;
    Ok(json(StatusCode::OK, &views::key(&k)))
}

/// The entry of `kind` among an operation's entries (expiries it triggered come first),
/// sent once the gate has the operation acknowledged.
fn main_entry(
    t: TenantId,
    entries: &[LedgerEntry],
    kind: EntryKind,
    pending: crate::engine::Unacked,
) -> Result<Response, Problem> {
    let e = entries
        .iter()
        .rev()
        .find(|e| e.kind == kind)
        .ok_or_else(|| Problem::unavailable("the operation returned no ledger entry"))?;
    let mut r = json(
        StatusCode::CREATED,
        &views::LedgerEntryView::new(t, e, None),
    );
    r.extensions_mut().insert(PendingAck::new(pending));
    Ok(r)
}

pub async fn top_up(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(b): JsonBody<TopUpBody>,
) -> Result<Response, Problem> {
    let t = tenant_of(&st, &id)?;
    let request_id = required_key(&headers)?;
    let kind = match b.kind.as_str() {
        "paid" => GrantKind::Paid,
        "promotional" => GrantKind::Promotional,
        _ => return Err(Problem::invalid("kind must be paid or promotional")),
    };
    if b.amount == 0 {
        return Err(Problem::invalid("amount must be at least 1"));
    }
    let expires_at_ms = b
        .expires_at
        .as_deref()
        .map(|s| parse_time_ms(s, "expires_at"))
        .transpose()?;
    let (out, pending) = st
        .engine
        .execute_unacked(
            t.id,
            WalletCommand::Grant {
                request_id,
                kind,
                amount: b.amount,
                expires_at_ms,
            },
        )
        .await?;
    main_entry(t.id, &out.entries, EntryKind::TopUp, pending)
}

pub async fn adjust(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(b): JsonBody<AdjustmentBody>,
) -> Result<Response, Problem> {
    let t = tenant_of(&st, &id)?;
    let request_id = required_key(&headers)?;
    if b.amount == 0 {
        return Err(Problem::invalid("amount must not be 0"));
    }
    let n = b.reason.chars().count();
    if n == 0 || n > REASON_CHARS_MAX {
        return Err(Problem::invalid(format!(
            "reason must be 1..={REASON_CHARS_MAX} characters"
        )));
    }
    let (out, pending) = st
        .engine
        .execute_unacked(
            t.id,
            WalletCommand::Adjust {
                request_id,
                delta: b.amount,
                reason: b.reason,
            },
        )
        .await?;
    main_entry(t.id, &out.entries, EntryKind::Adjust, pending)
}

pub async fn reconciliation(State(st): State<AppState>) -> Result<Response, Problem> {
    let r = st
        .engine
        .reconcile()
        .await
        .map_err(|e| Problem::unavailable(e.to_string()))?;
    Ok(json(StatusCode::OK, &views::reconciliation(&r)))
}

/// Audit search: ledger entries across tenants (or one), filtered, in (tenant, seq) order.
/// Cursor `<tenant>:<seq>`; one request scans at most `AUDIT_SCAN_MAX` entries.
pub async fn audit(State(st): State<AppState>, q: QueryMap) -> Result<Response, Problem> {
    let limit = q.limit(&st)?;
    let tenant_filter: Option<TenantId> = q
        .get("tenant_id")
        .map(|s| {
            s.parse()
                .map_err(|_| Problem::invalid("tenant_id is not a tenant id"))
        })
        .transpose()?;
    let kind = q.get("kind");
    if let Some(k) = kind {
        if !["top_up", "hold", "settle", "release", "adjust", "expire"].contains(&k) {
            return Err(Problem::invalid(
                "kind must be top_up, hold, settle, release, adjust or expire",
            ));
        }
    }
    let batch: Option<BatchId> = q
        .get("batch_id")
        .map(|s| {
            s.parse()
                .map_err(|_| Problem::invalid("batch_id is not a batch id"))
        })
        .transpose()?;
    let request_id = q.get("request_id");
    let from = q.time_ms("from")?.unwrap_or(0);
    let to = q.time_ms("to")?.unwrap_or(u64::MAX);
    let (start_tenant, start_seq) = match q.get("cursor") {
        None => (None, 0),
        Some(c) => {
            let bad = || Problem::invalid("cursor is not one this API returned");
            let (t, s) = c.split_once(':').ok_or_else(bad)?;
            (
                Some(t.parse::<TenantId>().map_err(|_| bad())?),
                s.parse::<u64>().map_err(|_| bad())?,
            )
        }
    };
    let tenants: Vec<TenantId> = match tenant_filter {
        Some(t) => vec![t],
        None => st.engine.tenants(),
    };
    let mut data = Vec::new();
    let mut scanned = 0usize;
    let mut next: Option<String> = None;
    'outer: for t in tenants {
        if start_tenant.is_some_and(|s| t < s) {
            continue;
        }
        let mut after = if start_tenant == Some(t) {
            start_seq
        } else {
            0
        };
        loop {
            let chunk = match st.engine.ledger_page(t, after, LEDGER_CHUNK).await {
                Ok(c) => c,
                Err(crate::engine::wallet::state::WalletError::UnknownWallet) => break,
                Err(e) => return Err(e.into()),
            };
            if chunk.is_empty() {
                break;
            }
            for e in &chunk {
                after = e.seq;
                scanned += 1;
                let hit = kind.is_none_or(|k| k == e.kind.as_str())
                    && batch.is_none_or(|b| e.batch == Some(b))
                    && request_id.is_none_or(|r| e.request_id.as_deref() == Some(r))
                    && e.at_ms >= from
                    && e.at_ms < to;
                if hit {
                    data.push(views::ledger_entry(t, e, None));
                }
                if data.len() == limit || scanned >= AUDIT_SCAN_MAX {
                    next = Some(format!("{t}:{}", e.seq));
                    break 'outer;
                }
            }
        }
    }
    Ok(page(data, next))
}

/// The tenant's ledger as JSON lines (each entry with `prev_hash` and `hash`), then one
/// line `{"object":"chain","entries","verified","head"}`. Read in chunks, streamed.
pub async fn export_ledger(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let t = tenant_of(&st, &id)?;
    let engine = st.engine.clone();
    let tenant = t.id;
    // State: (after seq, previous hash, entries, verified so far, done).
    let stream = futures_util::stream::unfold(
        (0u64, GENESIS_HASH, 0u64, true, false),
        move |(after, prev, n, ok, done)| {
            let engine = engine.clone();
            async move {
                if done {
                    return None;
                }
                let chunk = match engine.ledger_page(tenant, after, LEDGER_CHUNK).await {
                    Ok(c) => c,
                    Err(e) => {
                        let line = json!({"object": "error", "detail": e.to_string()});
                        return Some((
                            Ok::<_, std::io::Error>(format!("{line}\n")),
                            (after, prev, n, false, true),
                        ));
                    }
                };
                if chunk.is_empty() {
                    let line = json!({
                        "object": "chain",
                        "tenant_id": tenant.to_string(),
                        "entries": n,
                        "verified": ok,
                        "head": crate::engine::wallet::ledger::hex(&prev),
                    });
                    return Some((Ok(format!("{line}\n")), (after, prev, n, ok, true)));
                }
                let mut out = String::new();
                let (mut prev, mut ok, mut n, mut after) = (prev, ok, n, after);
                for e in &chunk {
                    let expect = crate::engine::wallet::ledger::chain_hash(&prev, tenant, e);
                    ok &= expect == e.hash && e.seq == n + 1;
                    out.push_str(
                        &serde_json::to_string(&views::LedgerEntryView::new(
                            tenant,
                            e,
                            Some(&prev),
                        ))
                        .expect("a ledger entry view always serialises"),
                    );
                    out.push('\n');
                    prev = e.hash;
                    n += 1;
                    after = e.seq;
                }
                Some((Ok(out), (after, prev, n, ok, false)))
            }
        },
    );
    let mut r = Body::from_stream(stream).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(r)
}

pub async fn top_usage(State(st): State<AppState>, q: QueryMap) -> Result<Response, Problem> {
    let window_ms = match q.get("window") {
        None | Some("day") => 24 * 3600 * 1000,
        Some("hour") => 3600 * 1000,
        Some(_) => return Err(Problem::invalid("window must be hour or day")),
    };
    let limit = q.limit(&st)?;
    let v = st.usage.top(st.engine.now_ms(), window_ms, limit);
    Ok(json(StatusCode::OK, &v))
}
