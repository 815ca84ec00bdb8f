//! Health, readiness, metrics, the OpenAPI document, usage.

use std::sync::atomic::Ordering;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde_json::json;

use crate::api::json::{json, QueryMap};
use crate::api::problem::Problem;
use crate::api::{AppState, Caller};
use crate::ids::KeyId;

pub async fn healthz() -> Response {
    json(StatusCode::OK, &json!({"status": "ok"}))
}

/// 200 once recovery is done and while the log takes writes; 503 `unavailable` otherwise.
pub async fn readyz(State(st): State<AppState>) -> Response {
    if let Some(reason) = st.engine.wal().poisoned() {
        return Problem::unavailable(format!("the write-ahead log refuses writes: {reason}"))
            .into_response();
    }
    if !st.ready.load(Ordering::Acquire) {
        return Problem::unavailable("starting or stopping").into_response();
    }
    json(StatusCode::OK, &json!({"status": "ready"}))
}

pub async fn metrics(State(st): State<AppState>) -> Response {
    let body = st.metrics.render(&st).await;
    let mut r = (StatusCode::OK, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

pub async fn openapi() -> Response {
    json(StatusCode::OK, &crate::api::openapi::document())
}

/// The tenant's usage per key (`key_id` narrows it), by hour or day.
pub async fn usage(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
    q: QueryMap,
) -> Result<Response, Problem> {
    use crate::api::usage::Granularity;
    let granularity = match q.get("granularity") {
        None | Some("hour") => Granularity::Hour,
        Some("day") => Granularity::Day,
        Some("minute") => Granularity::Minute,
        Some(_) => return Err(Problem::invalid("granularity must be minute, hour or day")),
    };
    let key: Option<KeyId> = q
        .get("key_id")
        .map(|s| {
            s.parse()
                .map_err(|_| Problem::invalid("key_id is not a key id"))
        })
        .transpose()?;
    if let Some(k) = key {
        // Another tenant's key is simply not found.
        if st
            .engine
            .api_key(k)
            .is_none_or(|k| k.tenant != caller.tenant.id)
        {
            return Err(Problem::not_found());
        }
    }
    let now = st.engine.now_ms();
    let to = q.time_ms("to")?.unwrap_or(now.saturating_add(1));
    let span = match granularity {
        Granularity::Minute => 2 * 3_600_000,
        Granularity::Hour => 48 * 3_600_000,
        Granularity::Day => 31 * 86_400_000,
    };
    let from = q.time_ms("from")?.unwrap_or(to.saturating_sub(span));
    if from >= to {
        return Err(Problem::invalid("from must be before to"));
    }
    let v = st.usage.query(caller.tenant.id, key, granularity, from, to);
    Ok(json(StatusCode::OK, &v))
}
