//! Request parsing that never turns bad input into a 5xx: JSON bodies (400 for bad JSON,
//! 422 for unknown fields, wrong types or out-of-range values, 413 past the body limit),
//! query strings (only known parameters), path ids (malformed → 404: it cannot exist),
//! list pagination and RFC 3339 times.

use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use crate::api::problem::Problem;
use crate::api::AppState;

/// A JSON body of `T` (whose serde derive denies unknown fields).
pub struct JsonBody<T>(pub T);

/// Reads a whole body under the configured limit.
pub async fn read_body(body: axum::body::Body, limit: usize) -> Result<Bytes, Problem> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| Problem::too_large(limit))
}

/// Parses JSON: syntax errors are 400 `invalid_json`, shape errors 422 `invalid_request`.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    let bytes = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice() // an empty body is an empty object (all fields optional or missing)
    } else {
        bytes
    };
    serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => {
                Problem::invalid_json(format!("the body is not valid JSON: {e}"))
            }
            Category::Data => Problem::invalid(e.to_string()),
        }
    })
}

impl<T: DeserializeOwned + Send> FromRequest<AppState> for JsonBody<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Problem> {
        let bytes = read_body(req.into_body(), state.cfg.limits.body_bytes_max).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// A path segment (an id). axum's own extractor answers a segment that is not UTF-8
/// (`/v/%A6`) with a plain-text 400; an id that cannot be decoded cannot exist: 404
/// problem+json, like any other unknown id.
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(_) => Err(Problem::not_found()),
        }
    }
}

/// Query parameters, refusing any not in the route's list.
pub struct QueryMap(pub HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for QueryMap {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Problem> {
        let q = parts.uri.query().unwrap_or("");
        let mut m = HashMap::new();
        for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
            if m.len() >= 32 {
                return Err(Problem::invalid("too many query parameters"));
            }
            if m.insert(k.to_string(), v.to_string()).is_some() {
                return Err(Problem::invalid(format!(
                    "query parameter {k:?} is repeated"
                )));
            }
        }
        Ok(QueryMap(m))
    }
}

impl QueryMap {
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    /// `limit` within 1..=max (default when absent).
    pub fn limit(&self, state: &AppState) -> Result<usize, Problem> {
        let l = &state.cfg.limits;
        match self.get("limit") {
            None => Ok(l.list_limit_default),
            Some(s) => match s.parse::<usize>() {
                Ok(n) if (1..=l.list_limit_max).contains(&n) => Ok(n),
                _ => Err(Problem::invalid(format!(
                    "limit must be an integer within 1..={}",
                    l.list_limit_max
                ))),
            },
        }
    }

    /// An unsigned integer parameter.
    pub fn u64(&self, k: &str) -> Result<Option<u64>, Problem> {
        self.get(k)
            .map(|s| {
                s.parse::<u64>()
                    .map_err(|_| Problem::invalid(format!("{k} must be a non-negative integer")))
            })
            .transpose()
    }

    /// A time parameter: RFC 3339 (`2026-11-22T10:00:00Z`) or Unix seconds; in ms.
    pub fn time_ms(&self, k: &str) -> Result<Option<u64>, Problem> {
        self.get(k).map(|s| parse_time_ms(s, k)).transpose()
    }
}

/// RFC 3339 or Unix seconds → ms since the epoch.
pub fn parse_time_ms(s: &str, field: &str) -> Result<u64, Problem> {
    if let Ok(secs) = s.parse::<u64>() {
        return secs
            .checked_mul(1000)
            .ok_or_else(|| Problem::invalid(format!("{field} is out of range")));
    }
    humantime::parse_rfc3339(s)
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .ok_or_else(|| {
            Problem::invalid(format!(
                "{field} must be an RFC 3339 time (2026-01-31T12:00:00Z) or Unix seconds"
            ))
        })
}

/// Latest time RFC 3339 can show (9999-12-31T23:59:59.999Z), in ms.
pub const TIME_MS_MAX: u64 = 253_402_300_799_999;

/// ms since the epoch → RFC 3339 with milliseconds, UTC (clamped to year 9999).
pub fn rfc3339(ms: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.min(TIME_MS_MAX));
    humantime::format_rfc3339_millis(t).to_string()
}

/// A path id of the expected kind; anything else cannot exist, so it is `not_found`.
pub fn path_id<T: std::str::FromStr>(s: &str) -> Result<T, Problem> {
    s.parse().map_err(|_| Problem::not_found())
}

/// Bytes reserved for a JSON body up front: most single-object responses fit, so the
/// buffer is not regrown and copied while serialising.
const JSON_BODY_BYTES_INITIAL: usize = 1024;

/// A JSON response with a status.
pub fn json<T: serde::Serialize + ?Sized>(status: StatusCode, v: &T) -> Response {
    let mut body = Vec::with_capacity(JSON_BODY_BYTES_INITIAL);
    match serde_json::to_writer(&mut body, v) {
        Ok(()) => (
            status,
            [(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        // Our own views always serialise (string keys, no failing `Serialize`).
        Err(e) => {
            Problem::unavailable(format!("the response could not be encoded: {e}")).into_response()
        }
    }
}

/// The cursor after a page: the last item's cursor when the page is full (there may be
/// more), none otherwise.
pub fn next_cursor<T>(
    page: &[T],
    limit: usize,
    cursor_of: impl Fn(&T) -> String,
) -> Option<String> {
    if page.len() == limit {
        page.last().map(cursor_of)
    } else {
        None
    }
}

/// `{"data": [...], "next_cursor": ...}`.
pub fn page(data: Vec<serde_json::Value>, next_cursor: Option<String>) -> Response {
    json(
        StatusCode::OK,
        &serde_json::json!({ "data": data, "next_cursor": next_cursor }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_json_errors() {
        assert_eq!(parse_time_ms("10", "t").unwrap(), 10_000);
        let ms = parse_time_ms("2026-11-22T10:00:00Z", "t").unwrap();
        assert_eq!(rfc3339(ms), "2026-11-22T10:00:00.000Z");
        assert!(parse_time_ms("yesterday", "t").is_err());
        assert_eq!(rfc3339(u64::MAX), "9999-12-31T23:59:59.999Z");
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct B {
            a: u32,
        }
        assert_eq!(parse_json::<B>(b"{").unwrap_err().code, "invalid_json");
        assert_eq!(
            parse_json::<B>(b"{\"b\":1}").unwrap_err().code,
            "invalid_request"
        );
        assert_eq!(
            parse_json::<B>(b"{\"a\":-1}").unwrap_err().code,
            "invalid_request"
        );
        assert_eq!(parse_json::<B>(b"{\"a\":1}").unwrap().a, 1);
    }
}
