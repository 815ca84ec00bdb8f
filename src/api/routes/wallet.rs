//! `/v1/wallet…`: balances, the ledger, statements (JSON and CSV).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;

use crate::api::json::{json, next_cursor, page, rfc3339, JsonBody, QueryMap};
use crate::api::problem::Problem;
use crate::api::routes::views;
use crate::api::{AppState, Caller};
use crate::engine::wallet::ledger::GENESIS_HASH;
use crate::engine::wallet::state::WalletCommand;

/// `PATCH /v1/wallet`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WalletPatch {
    /// `wallet.low_balance` fires when `available` drops below it; `null` clears it.
    low_balance_threshold: Option<u64>,
}

/// Sets the low-balance threshold (the wallet's one setting; scope `webhooks:write`,
/// since its only effect is the `wallet.low_balance` event).
pub async fn update(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
    JsonBody(b): JsonBody<WalletPatch>,
) -> Result<Response, Problem> {
    let out = st
        .engine
        .execute(
            caller.tenant.id,
            WalletCommand::SetLowBalanceThreshold {
                threshold: b.low_balance_threshold,
            },
        )
        .await?;
    Ok(json(
        StatusCode::OK,
        &views::wallet(caller.tenant.id, &out.balances),
    ))
}

pub async fn get(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
) -> Result<Response, Problem> {
    let b = st.engine.balances(caller.tenant.id).await?;
    Ok(json(StatusCode::OK, &views::wallet(caller.tenant.id, &b)))
}

/// The ledger page after `cursor` (a sequence number), with each entry's previous hash so
/// a client can check the chain page by page.
pub async fn ledger(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
    q: QueryMap,
) -> Result<Response, Problem> {
    let limit = q.limit(&st)?;
    let after = q.u64("cursor")?.unwrap_or(0);
    let t = caller.tenant.id;
    // One entry before the page gives the first entry's previous hash.
    let from = after.saturating_sub(1);
    let entries = st.engine.ledger_page(t, from, limit + 1).await?;
    let mut prev = GENESIS_HASH;
    let mut data = Vec::with_capacity(limit);
    for e in &entries {
        if e.seq > after && data.len() < limit {
            data.push(views::ledger_entry(t, e, Some(&prev)));
        }
        prev = e.hash;
    }
    let next = next_cursor(&data, limit, |v| v["seq"].to_string());
    Ok(page(data, next))
}

/// Start of the current UTC month, in ms.
fn month_start_ms(now_ms: u64) -> u64 {
    let s = rfc3339(now_ms);
    crate::api::json::parse_time_ms(&format!("{}-01T00:00:00Z", &s[..7]), "from").unwrap_or(0)
}

pub async fn statement(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
    q: QueryMap,
) -> Result<Response, Problem> {
    let now = st.engine.now_ms();
    let from = q.time_ms("from")?.unwrap_or_else(|| month_start_ms(now));
    let to = q.time_ms("to")?.unwrap_or(now.saturating_add(1));
    if from >= to {
        return Err(Problem::invalid("from must be before to"));
    }
    let csv = match q.get("format") {
        None | Some("json") => false,
        Some("csv") => true,
        Some(_) => return Err(Problem::invalid("format must be json or csv")),
    };
    let s = st.engine.statement(caller.tenant.id, from, to).await?;
    if csv {
        let mut r = (StatusCode::OK, views::statement_csv(&s)).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/csv; charset=utf-8"),
        );
        return Ok(r);
    }
    Ok(json(
        StatusCode::OK,
        &views::statement(caller.tenant.id, &s),
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn month_start() {
        let t = crate::api::json::parse_time_ms("2026-11-22T10:11:12Z", "t").unwrap();
        let m = crate::api::json::parse_time_ms("2026-11-01T00:00:00Z", "t").unwrap();
        assert_eq!(super::month_start_ms(t), m);
    }
}
