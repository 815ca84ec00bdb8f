//! `/v1/webhook-endpoints…` and `/v1/webhook-deliveries…` (SPEC §6), scope
//! `webhooks:write`, plans with `webhooks = true` only.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Extension;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::json::{json, next_cursor, page, path_id, rfc3339, JsonBody, Path, QueryMap};
use crate::api::problem::Problem;
use crate::api::{AppState, Caller};
use crate::ids::{DeliveryId, EndpointId};
use crate::webhooks::outbox::{EndpointChanges, NewEndpoint};
use crate::webhooks::state::{Delivery, DeliveryStatus, Endpoint};
use crate::webhooks::{event_type, ssrf, WebhookError, ALL_EVENTS, EVENT_TYPES};

/// Longest endpoint description.
const DESCRIPTION_BYTES_MAX: usize = 500;
/// Longest overlap of a rotation (the old secret signs at most this long after it).
const OVERLAP_S_MAX: u64 = 7 * 24 * 3600;

impl From<WebhookError> for Problem {
    fn from(e: WebhookError) -> Self {
        let detail = e.to_string();
        match e {
            WebhookError::NotFound => Problem::not_found(),
            WebhookError::Invalid(m) => Problem::invalid(m),
            WebhookError::TooMany(_) => Problem::plan_limit(detail),
            WebhookError::KeyReused(_) => Problem::key_reused(detail),
            WebhookError::Pending => Problem::new(StatusCode::CONFLICT, "delivery_pending", detail),
            WebhookError::Unavailable(m) => Problem::unavailable(m),
        }
    }
}

/// `POST /v1/webhook-endpoints`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointBody {
    url: String,
    /// Event types (absent or `["*"]`: all).
    #[serde(default)]
    events: Option<Vec<String>>,
    #[serde(default)]
    description: Option<String>,
}

/// `PATCH /v1/webhook-endpoints/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointPatch {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    events: Option<Vec<String>>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    enabled: Option<bool>,
}

/// `POST /v1/webhook-endpoints/{id}/rotate-secret`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RotateBody {
    /// Seconds the old secret keeps signing (default 24 h, at most 7 days).
    #[serde(default)]
    overlap_s: Option<u64>,
}

fn plan_allows(caller: &Caller) -> Result<(), Problem> {
    if caller.plan.webhooks {
        Ok(())
    } else {
        Err(Problem::plan_limit(format!(
            "the {} plan has no webhooks",
            caller.tenant.plan
        )))
    }
}

fn events_filter(names: Option<Vec<String>>) -> Result<u16, Problem> {
    let Some(names) = names else {
        return Ok(ALL_EVENTS);
    };
    if names.is_empty() {
        return Err(Problem::invalid(
            "events must name at least one event type (or \"*\")",
        ));
    }
    let mut bits = 0u16;
    for n in names.iter().take(EVENT_TYPES.len() + 1) {
        if n == "*" {
            bits = ALL_EVENTS;
            continue;
        }
        match event_type(n) {
            Some(i) => bits |= 1 << i,
            None => {
                return Err(Problem::invalid(format!(
                    "unknown event type {n:?}; known: {}",
                    EVENT_TYPES.join(", ")
                )))
            }
        }
    }
    if names.len() > EVENT_TYPES.len() + 1 {
        return Err(Problem::invalid("events lists too many entries"));
    }
    Ok(bits)
}

fn description(d: Option<String>) -> Result<Option<String>, Problem> {
    match d {
        Some(d) if d.len() > DESCRIPTION_BYTES_MAX => Err(Problem::invalid(format!(
            "description is longer than {DESCRIPTION_BYTES_MAX} bytes"
        ))),
        d => Ok(d),
    }
}

async fn checked_url(st: &AppState, url: &str) -> Result<String, Problem> {
    let w = &st.cfg.webhooks;
    ssrf::check_target(url, w.allow_http, w.allow_private_targets)
        .await
        .map(|u| u.to_string())
        .map_err(|e| Problem::invalid(format!("url: {e}")))
}

fn events_names(bits: u16) -> Vec<&'static str> {
    EVENT_TYPES
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, n)| *n)
        .collect()
}

/// An endpoint as the tenant reads it (no secret).
pub fn endpoint_view(e: &Endpoint) -> Value {
    let previous = e.secrets.iter().find_map(|s| s.until_ms);
    json!({
        "id": e.id.to_string(),
        "object": "webhook_endpoint",
        "url": e.url,
        "events": events_names(e.events),
        "description": e.description,
        "status": if e.enabled { "enabled" } else { "disabled" },
        "enabled": e.enabled,
        "disabled_reason": e.disabled_reason,
        "disabled_at": e.disabled_at_ms.map(rfc3339),
        "failing_since": e.failing_since_ms.map(rfc3339),
        "previous_secret_expires_at": previous.map(rfc3339),
        "created_at": rfc3339(e.created_at_ms),
    })
}

/// The endpoint with its current secret (creation and rotation only).
fn with_secret(e: &Endpoint) -> Value {
    let mut v = endpoint_view(e);
    let current = e.secrets.iter().find(|s| s.until_ms.is_none());
    v["secret"] = json!(current.map(|s| s.value.clone()));
    v
}

/// A delivery with its attempts.
pub fn delivery_view(d: &Delivery) -> Value {
    let event: Value = serde_json::from_slice(&d.event.body).unwrap_or(Value::Null);
    json!({
        "id": d.id.to_string(),
        "object": "webhook_delivery",
        "endpoint_id": d.endpoint.to_string(),
        "event_id": d.event.id.to_string(),
        "event_type": EVENT_TYPES[d.event.kind as usize],
        "status": d.status.as_str(),
        "attempts_total": d.attempts_total,
        "next_attempt_at": d.next_at_ms.map(rfc3339),
        "note": d.note,
        "created_at": rfc3339(d.event.at_ms),
        "attempts": d.attempts.iter().map(|a| json!({
            "at": rfc3339(a.at_ms),
            "status": a.status,
            "latency_ms": a.latency_ms,
            "error": if a.error.is_empty() { None } else { Some(&a.error) },
            "next_attempt_at": a.next_at_ms.map(rfc3339),
            "manual": a.manual,
        })).collect::<Vec<_>>(),
        "event": event,
    })
}

pub async fn create_endpoint(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
    headers: HeaderMap,
    JsonBody(b): JsonBody<EndpointBody>,
) -> Result<Response, Problem> {
    plan_allows(&caller)?;
    let events = events_filter(b.events)?;
    let description = description(b.description)?.unwrap_or_default();
    let url = checked_url(&st, &b.url).await?;
    let request_id = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (e, _) = st
        .engine
        .webhooks()
        .create_endpoint(
            caller.tenant.id,
            NewEndpoint {
                url,
                events,
                description,
                request_id,
            },
        )
        .await?;
    let mut r = json(StatusCode::CREATED, &with_secret(&e));
    if let Ok(loc) = HeaderValue::from_str(&format!("/v1/webhook-endpoints/{}", e.id)) {
        r.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(r)
}

pub async fn list_endpoints(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
) -> Result<Response, Problem> {
    plan_allows(&caller)?;
    let list = st.engine.webhooks().endpoints(caller.tenant.id);
    Ok(page(list.iter().map(endpoint_view).collect(), None))
}

pub async fn get_endpoint(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    plan_allows(&caller)?;
    let id: EndpointId = path_id(&id)?;
    let e = st
        .engine
        .webhooks()
        .endpoint(caller.tenant.id, id)
        .ok_or_else(Problem::not_found)?;
    Ok(json(StatusCode::OK, &endpoint_view(&e)))
}

pub async fn update_endpoint(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<EndpointPatch>,
) -> Result<Response, Problem> {
    plan_allows(&caller)?;
    let id: EndpointId = path_id(&id)?;
    let events = match b.events {
        None => None,
        Some(v) => Some(events_filter(Some(v))?),
    };
    let description = description(b.description)?;
    let url = match b.url {
        None => None,
        Some(u) => Some(checked_url(&st, &u).await?),
    };
    let e = st
        .engine
        .webhooks()
        .update_endpoint(
            caller.tenant.id,
            id,
            EndpointChanges {
                url,
                events,
                description,
                enabled: b.enabled,
            },
        )
        .await?;
    Ok(json(StatusCode::OK, &endpoint_view(&e)))
}

pub async fn delete_endpoint(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    plan_allows(&caller)?;
    let id: EndpointId = path_id(&id)?;
    let e = st
        .engine
        .webhooks()
        .delete_endpoint(caller.tenant.id, id)
        .await?;
    let mut v = endpoint_view(&e);
    v["deleted"] = json!(true);
    Ok(json(StatusCode::OK, &v))
}

pub async fn rotate_secret(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<RotateBody>,
) -> Result<Response, Problem> {
    plan_allows(&caller)?;
    let id: EndpointId = path_id(&id)?;
    let overlap_ms = match b.overlap_s {
        None => st.engine.webhooks().cfg.rotation_overlap_ms_default,
        Some(s) if s <= OVERLAP_S_MAX => s * 1000,
        Some(_) => {
            return Err(Problem::invalid(format!(
                "overlap_s must be at most {OVERLAP_S_MAX}"
            )))
        }
    };
    let e = st
        .engine
        .webhooks()
        .rotate_secret(caller.tenant.id, id, overlap_ms)
        .await?;
    Ok(json(StatusCode::OK, &with_secret(&e)))
}

pub async fn list_deliveries(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
    q: QueryMap,
) -> Result<Response, Problem> {
    plan_allows(&caller)?;
    let limit = q.limit(&st)?;
    let before = match q.get("cursor") {
        None => None,
        Some(c) => Some(
            c.parse::<DeliveryId>()
                .map_err(|_| Problem::invalid("cursor is not one this API returned"))?,
        ),
    };
    let endpoint = match q.get("endpoint_id") {
        None => None,
        Some(e) => Some(
            e.parse::<EndpointId>()
                .map_err(|_| Problem::invalid("endpoint_id is not an endpoint id"))?,
        ),
    };
    let status = match q.get("status") {
        None => None,
        Some("pending") => Some(DeliveryStatus::Pending),
        Some("succeeded") => Some(DeliveryStatus::Succeeded),
        Some("failed") => Some(DeliveryStatus::Failed),
        Some(s) => {
            return Err(Problem::invalid(format!(
                "status must be pending, succeeded or failed, not {s:?}"
            )))
        }
    };
    let kind = match q.get("event_type") {
        None => None,
        Some(t) => Some(
            event_type(t).ok_or_else(|| Problem::invalid(format!("unknown event type {t:?}")))?,
        ),
    };
    let list = st
        .engine
        .webhooks()
        .deliveries(caller.tenant.id, before, limit, |d| {
            endpoint.is_none_or(|e| d.endpoint == e)
                && status.is_none_or(|s| d.status == s)
                && kind.is_none_or(|k| d.event.kind == k)
        });
    let next = next_cursor(&list, limit, |d| d.id.to_string());
    Ok(page(list.iter().map(delivery_view).collect(), next))
}

pub async fn get_delivery(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    plan_allows(&caller)?;
    let id: DeliveryId = path_id(&id)?;
    let d = st
        .engine
        .webhooks()
        .delivery(caller.tenant.id, id)
        .ok_or_else(Problem::not_found)?;
    Ok(json(StatusCode::OK, &delivery_view(&d)))
}

pub async fn redeliver(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    plan_allows(&caller)?;
    let id: DeliveryId = path_id(&id)?;
    let d = st.engine.webhooks().redeliver(caller.tenant.id, id).await?;
    Ok(json(StatusCode::ACCEPTED, &delivery_view(&d)))
}
