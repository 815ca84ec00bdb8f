//! The one gate every routed request passes: auth, rate limit, scope, idempotency, usage
//! and metrics. Kept in one place so no route can forget a step.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::api::json::read_body;
use crate::api::problem::Problem;
use crate::api::ratelimit::Decision;
use crate::api::routes::{Auth, Route};
use crate::api::{AppState, Caller};
use crate::engine::idempotency::{Begin, StoredResponse};
use crate::engine::Engine;

/// Credits a response committed (holds of new batches), for per-key usage.
#[derive(Clone, Copy, Debug)]
pub struct CreditsCommitted(pub u64);

/// A response whose state change the log has not acknowledged yet. The gate waits for
/// it (or for the stored idempotent copy appended after it, which implies it) before the
/// response leaves: a handler may build its answer while the change syncs, and one wait
/// then covers both records.
#[derive(Clone)]
pub struct PendingAck(pub Arc<std::sync::Mutex<Option<crate::engine::Unacked>>>);

impl PendingAck {
    pub fn new(u: crate::engine::Unacked) -> Self {
        PendingAck(Arc::new(std::sync::Mutex::new(Some(u))))
    }

    fn take(&self) -> Option<crate::engine::Unacked> {
        self.0.lock().expect("not poisoned").take()
    }
}

/// Waits for a response's pending acknowledgement, if any; a refusal becomes a 503.
async fn settle_pending(resp: Response) -> Response {
    let Some(p) = resp
        .extensions()
        .get::<PendingAck>()
        .and_then(PendingAck::take)
    else {
        return resp;
    };
    match p.wait().await {
        Ok(()) => resp,
        Err(e) => Problem::unavailable(e.to_string()).into_response(),
    }
}

/// Longest `Idempotency-Key`.
pub const IDEMPOTENCY_KEY_CHARS_MAX: usize = 255;

/// The bearer token of a request (`Authorization: Bearer <token>`, scheme case-insensitive).
fn bearer(h: &HeaderMap) -> Option<&str> {
    let v = h.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Admin token check in constant time (over SHA-256 of both, so lengths leak nothing).
/// `configured` is the hash of the configured token, `None` when none is configured.
fn admin_ok(configured: Option<&[u8; 32]>, presented: Option<&str>) -> bool {
    use subtle::ConstantTimeEq;
    let (Some(a), Some(p)) = (configured, presented) else {
        return false;
    };
    let b: [u8; 32] = Sha256::digest(p.as_bytes()).into();
    bool::from(a.ct_eq(&b))
}

/// The `Idempotency-Key` header, validated.
fn idempotency_key(h: &HeaderMap) -> Result<Option<String>, Problem> {
    let Some(v) = h.get("idempotency-key") else {
        return Ok(None);
    };
    let s = v
        .to_str()
        .ok()
        .filter(|s| {
            !s.is_empty()
                && s.len() <= IDEMPOTENCY_KEY_CHARS_MAX
                && s.bytes().all(|b| b.is_ascii_graphic())
        })
        .ok_or_else(|| {
            Problem::invalid(format!(
                "Idempotency-Key must be 1..={IDEMPOTENCY_KEY_CHARS_MAX} visible ASCII characters"
            ))
        })?;
    Ok(Some(s.to_owned()))
}

fn fingerprint(method: &str, pattern: &str, path: &str, body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [method.as_bytes(), pattern.as_bytes(), path.as_bytes(), body] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// Refuses query parameters the route does not take (a typo is an error, not ignored).
fn known_query(route: &Route, query: Option<&str>) -> Result<(), Problem> {
    let Some(q) = query else { return Ok(()) };
    for (k, _) in url::form_urlencoded::parse(q.as_bytes()) {
        if !route.query.contains(&k.as_ref()) {
            return Err(Problem::invalid(if route.query.is_empty() {
                format!("unknown query parameter {k:?}: this route takes none")
            } else {
                format!(
                    "unknown query parameter {k:?} (known: {})",
                    route.query.join(", ")
                )
            }));
        }
    }
    Ok(())
}

/// Fallback for paths no route has.
pub async fn not_found(State(st): State<AppState>) -> Response {
    st.metrics.unmatched();
    Problem::new(StatusCode::NOT_FOUND, "not_found", "no such route").into_response()
}

/// Fallback for a known path with a method it does not serve.
pub async fn method_not_allowed() -> Response {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this path does not serve that method",
    )
    .into_response()
}

/// The middleware.
pub async fn gate(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route: Option<&'static Route> = req
        .extensions()
        .get::<MatchedPath>()
        .and_then(|m| st.table.get(m.as_str()))
        .and_then(|rs| rs.iter().find(|r| r.method == req.method()).copied());
    let Some(route) = route else {
        return next.run(req).await; // the method fallback answers
    };
    let mut caller: Option<Arc<Caller>> = None;
    let mut decision: Option<Decision> = None;
    let outcome: Result<(), Problem> = (|| match route.auth {
        Auth::Public => Ok(()),
        Auth::Admin => {
            if admin_ok(st.admin_token_hash.as_ref(), bearer(req.headers())) {
                Ok(())
            } else {
                Err(Problem::unauthorized("admin routes need the admin token"))
            }
        }
        Auth::Key(scope) => {
            let (key, tenant) = bearer(req.headers())
                .and_then(|s| st.engine.authenticate(s))
                .ok_or_else(|| {
                    Problem::unauthorized("missing, invalid, revoked or expired API key")
                })?;
            let plan = st.cfg.plans.get(&tenant.plan).cloned().ok_or_else(|| {
                Problem::forbidden(format!(
                    "the tenant's plan {:?} is not in the configuration",
                    tenant.plan
                ))
            })?;
            let d = st.limiters.check(&tenant.plan, key.id);
            decision = d;
            let c = Arc::new(Caller { key, tenant, plan });
            caller = Some(Arc::clone(&c));
            if let Some(d) = d {
                if !d.allowed {
                    return Err(Problem::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate_limited",
                        format!(
                            "this key may make {} requests per second (burst {})",
                            c.plan.rate_per_s, c.plan.burst
                        ),
                    )
                    .retry_after(d.reset_s));
                }
            }
            if let Some(bit) = scope {
                if c.key.scopes & bit == 0 {
                    return Err(Problem::forbidden(format!(
                        "the key lacks the scope {:?}",
                        crate::engine::accounts::scope_names(bit).join(",")
                    )));
                }
            }
            Ok(())
        }
    })()
    .and_then(|()| known_query(route, req.uri().query()));
    let mut resp = match outcome {
        Err(p) => p.into_response(),
        Ok(()) => {
            if let Some(c) = &caller {
                req.extensions_mut().insert(Arc::clone(c));
            }
            if route.mutating {
                let scope = caller.as_ref().map_or(0, |c| c.tenant.id.0);
                mutating(&st, route, scope, req, next).await
            } else {
                settle_pending(next.run(req).await).await
            }
        }
    };
    if let Some(d) = decision {
        d.headers(resp.headers_mut());
    }
    let elapsed = started.elapsed();
    st.metrics.observe(route, resp.status(), elapsed);
    if let Some(c) = &caller {
        let credits = resp
            .extensions()
            .get::<CreditsCommitted>()
            .map_or(0, |c| c.0);
        st.usage.record(
            c.key.id,
            c.tenant.id,
            route.label,
            resp.status(),
            elapsed,
            credits,
            st.engine.now_ms(),
        );
    }
    resp
}

/// Clears an in-flight idempotency slot unless the response was stored (also on panic).
struct Abandon {
    engine: Engine,
    scope: u128,
    key: String,
    armed: bool,
}

impl Drop for Abandon {
    fn drop(&mut self) {
        if self.armed {
            self.engine.idempotency_abandon(self.scope, &self.key);
        }
    }
}

/// Runs a mutating request on its own task (a client that goes away does not cut an
/// operation in half), with the idempotency protocol when the request has a key.
async fn mutating(
    st: &AppState,
    route: &'static Route,
    scope: u128,
    req: Request,
    next: Next,
) -> Response {
    let key = match idempotency_key(req.headers()) {
        Ok(k) => k,
        Err(p) => return p.into_response(),
    };
    let Some(key) = key else {
        return tokio::spawn(async move { settle_pending(next.run(req).await).await })
            .await
            .unwrap_or_else(|_| Problem::unavailable("the request failed").into_response());
    };
    let (parts, body) = req.into_parts();
    let bytes = match read_body(body, st.cfg.limits.body_bytes_max).await {
        Ok(b) => b,
        Err(p) => return p.into_response(),
    };
    let fp = fingerprint(parts.method.as_str(), route.path, parts.uri.path(), &bytes);
    match st.engine.idempotency_begin(scope, &key, fp) {
        Begin::Replay(r) => replay(&r),
        Begin::InProgress => Problem::new(
            StatusCode::CONFLICT,
            "request_in_progress",
            "a request with this Idempotency-Key is still in progress",
        )
        .retry_after(1)
        .into_response(),
        Begin::Mismatch => {
            Problem::key_reused("this Idempotency-Key was used with a different request")
                .into_response()
        }
        Begin::Unreadable(_) => Problem::unavailable(
            "the stored response for this Idempotency-Key cannot be read now; retry later",
        )
        .into_response(),
        Begin::Full => {
            Problem::unavailable("too many idempotency keys are remembered; retry later")
                .into_response()
        }
        Begin::Fresh => {
            let engine = st.engine.clone();
            let redact = route.redact_secret;
            let req = Request::from_parts(parts, Body::from(bytes));
            let task = tokio::spawn(async move {
                let mut guard = Abandon {
                    engine: engine.clone(),
                    scope,
                    key: key.clone(),
                    armed: true,
                };
                let resp = next.run(req).await;
                let status = resp.status();
                // Only responses of requests that changed state are stored (SPEC §11).
                if !status.is_success() {
                    return settle_pending(resp).await;
                }
                let pending = resp
                    .extensions()
                    .get::<PendingAck>()
                    .and_then(PendingAck::take);
                let (parts, body) = resp.into_parts();
                let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
                    return Problem::unavailable("the response could not be read").into_response();
                };
                let content_type = parts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("application/json")
                    .to_owned();
                let stored_body = if redact {
                    redacted(&bytes)
                } else {
                    bytes.to_vec()
                };
                let stored = StoredResponse {
                    scope,
                    key,
                    fingerprint: fp,
                    status: status.as_u16(),
                    content_type,
                    body: stored_body,
                    at_ms: engine.now_ms(),
                };
                guard.armed = false;
                let acked = match engine.idempotency_store(stored) {
                    // Durable in log order: this covers the pending change too.
                    Ok(durable) => {
                        debug_assert!(pending.as_ref().is_none_or(|p| p.covered_by(durable.lsn())));
                        durable.await.map(|_| ()).map_err(|e| e.to_string())
                    }
                    Err(e) => {
                        // No stored copy: a repeat re-runs the request, and the engine's
                        // own operation keys return the same outcome. The change itself
                        // must still be acknowledged before anything is sent.
                        tracing::error!(error = %e, "storing an idempotent response failed");
                        match pending {
                            Some(p) => p.wait().await.map_err(|e| e.to_string()),
                            None => Ok(()),
                        }
                    }
                };
                if let Err(e) = acked {
                    return Problem::unavailable(e).into_response();
                }
                Response::from_parts(parts, Body::from(bytes))
            });
            task.await
                .unwrap_or_else(|_| Problem::unavailable("the request failed").into_response())
        }
    }
}

/// A stored response, verbatim, marked as a replay.
fn replay(r: &Arc<StoredResponse>) -> Response {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::OK);
    let mut resp = (status, r.body.clone()).into_response();
    if let Ok(v) = HeaderValue::from_str(&r.content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp.headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    resp
}

/// A key-creation body without its secret (secrets are stored only as hashes).
fn redacted(body: &[u8]) -> Vec<u8> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(mut v) => {
            if let Some(o) = v.as_object_mut() {
                o.insert("key".into(), serde_json::Value::Null);
                o.insert("key_redacted".into(), serde_json::Value::Bool(true));
            }
            serde_json::to_vec(&v).unwrap_or_default()
        }
        Err(_) => Vec::new(),
    }
}
