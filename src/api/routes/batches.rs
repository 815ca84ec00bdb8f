//! `/v1/batches…`: quote, create, list, read, items, cancel, retry-failed.

use std::collections::BTreeMap;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Deserialize;

use crate::api::gate::CreditsCommitted;
use crate::api::json::{json, next_cursor, page, path_id, JsonBody, Path, QueryMap};
use crate::api::problem::Problem;
use crate::api::routes::views;
use crate::api::{AppState, Caller};
use crate::engine::batch::pricing::Params;
use crate::engine::batch::BatchRequest;
use crate::ids::BatchId;

/// `params` (SPEC §12: every field optional, defaults of the price table).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ParamsBody {
    model: Option<String>,
    duration_seconds: Option<u32>,
    resolution: Option<String>,
    aspect_ratio: Option<String>,
}

/// The body of quote and create (SPEC §11).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchBody {
    template: String,
    #[serde(default)]
    variables: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    params: Option<ParamsBody>,
    #[serde(default)]
    request_id: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// The body of retry-failed.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RetryBody {
    #[serde(default)]
    request_id: Option<String>,
}

fn request(b: BatchBody, caller: &Caller, idempotency_key: Option<String>) -> BatchRequest {
    let d = Params::default();
    let p = b.params.unwrap_or_default();
    BatchRequest {
        template: b.template,
        variables: b.variables.into_iter().collect(),
        params: Params {
            model: p.model.unwrap_or(d.model),
            duration_seconds: p.duration_seconds.unwrap_or(d.duration_seconds),
            resolution: p.resolution.unwrap_or(d.resolution),
            aspect_ratio: p.aspect_ratio.unwrap_or(d.aspect_ratio),
        },
        request_id: b.request_id.or(idempotency_key),
        expires_in_s: b.expires_in,
        api_key: Some(caller.key.id),
        key_daily_credit_limit: caller.key.daily_credit_limit,
    }
}

fn header_key(h: &HeaderMap) -> Option<String> {
    h.get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn created(v: &crate::engine::batch::BatchView, status: StatusCode) -> Response {
    let mut r = json(status, &views::batch(v));
    if let Ok(loc) = HeaderValue::from_str(&format!("/v1/batches/{}", v.id)) {
        r.headers_mut().insert(header::LOCATION, loc);
    }
    r.extensions_mut().insert(CreditsCommitted(v.total));
    r
}

pub async fn quote(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
    JsonBody(body): JsonBody<BatchBody>,
) -> Result<Response, Problem> {
    let req = request(body, &caller, None);
    let q = st.engine.quote(&req, &caller.limits())?;
    Ok(json(StatusCode::OK, &views::quote(&q)))
}

pub async fn create(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<BatchBody>,
) -> Result<Response, Problem> {
    let req = request(body, &caller, header_key(&headers));
    let v = st
        .engine
        .create_batch(caller.tenant.id, &req, &caller.limits())
        .await?;
    Ok(created(&v, StatusCode::CREATED))
}

pub async fn list(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
    q: QueryMap,
) -> Result<Response, Problem> {
    let limit = q.limit(&st)?;
    let after = match q.get("cursor") {
        None => None,
        Some(c) => Some(
            c.parse::<BatchId>()
                .map_err(|_| Problem::invalid("cursor is not one this API returned"))?,
        ),
    };
    let list = st
        .engine
        .list_batches(caller.tenant.id, after, limit)
        .await?;
    let next = next_cursor(&list, limit, |b| b.id.to_string());
    Ok(page(list.iter().map(views::batch).collect(), next))
}

pub async fn get(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let id: BatchId = path_id(&id)?;
    let v = st.engine.batch(caller.tenant.id, id).await?;
    Ok(json(StatusCode::OK, &views::batch(&v)))
}

pub async fn items(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
    Path(id): Path<String>,
    q: QueryMap,
) -> Result<Response, Problem> {
    let id: BatchId = path_id(&id)?;
    let limit = q.limit(&st)?;
    let from = match q.get("cursor") {
        None => 0,
        Some(c) => c
            .parse::<u32>()
            .map_err(|_| Problem::invalid("cursor is not one this API returned"))?,
    };
    let list = st
        .engine
        .batch_items(caller.tenant.id, id, from, limit as u32)
        .await?;
    let next = next_cursor(&list, limit, |i| (i.index + 1).to_string());
    Ok(page(list.iter().map(views::item).collect(), next))
}

pub async fn cancel(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let id: BatchId = path_id(&id)?;
    let v = st.engine.cancel_batch(caller.tenant.id, id).await?;
    Ok(json(StatusCode::OK, &views::batch(&v)))
}

pub async fn retry_failed(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<RetryBody>,
) -> Result<Response, Problem> {
    let id: BatchId = path_id(&id)?;
    let v = st
        .engine
        .retry_failed(
            caller.tenant.id,
            id,
            body.request_id.or(header_key(&headers)),
            &caller.limits(),
            Some(caller.key.id),
            caller.key.daily_credit_limit,
        )
        .await?;
    Ok(created(&v, StatusCode::CREATED).into_response())
}
