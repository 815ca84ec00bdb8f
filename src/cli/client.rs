//! The CLI's HTTP client (`demo`, `submit`): JSON in and out, bounded answers, and the
//! API's problem documents turned into errors that keep their code, so a caller can tell
//! "the server said no" (do not retry) from "no answer" (the request may or may not have
//! been applied: retry with the same idempotency key).

use std::time::Duration;

use serde_json::Value;

/// Largest answer read (the API's pages are far smaller; a bigger one is not ours).
const ANSWER_BYTES_MAX: usize = 16 << 20;

/// Why a call did not return a success.
#[derive(Debug, Clone)]
pub enum CallError {
    /// No complete answer (connect, timeout, reset, unreadable body): the request may or
    /// may not have been applied.
    Network(String),
    /// An HTTP error answer.
    Status {
        /// HTTP status.
        status: u16,
        /// The problem's `code` (empty when the body was not a problem document).
        code: String,
        /// The problem's `detail`, or the body.
        detail: String,
        /// `Retry-After` in seconds, when given.
        retry_after_s: Option<u64>,
    },
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Network(e) => write!(f, "no answer: {e}"),
            CallError::Status {
                status,
                code,
                detail,
                ..
            } => write!(f, "{status} {code}: {detail}"),
        }
    }
}

impl CallError {
    /// Worth another try with the same idempotency key: no answer, a request still in
    /// progress, throttling, or the server unavailable.
    pub fn retryable(&self) -> bool {
        match self {
            CallError::Network(_) => true,
            CallError::Status { status, .. } => matches!(status, 409 | 429 | 502 | 503 | 504),
        }
    }
}

/// A base URL and an HTTP client.
pub struct Client {
    http: reqwest::Client,
    /// `http://host:port`, no trailing slash.
    pub base: String,
}

impl Client {
    /// A client for `base` with a per-request timeout.
    pub fn new(base: &str, timeout: Duration) -> Result<Client, String> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Client {
            http,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    /// One request; the JSON answer of a 2xx, or why not.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<&Value>,
        idempotency_key: Option<&str>,
    ) -> Result<Value, CallError> {
        let mut rb = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(b) = body {
            rb = rb.json(b);
        }
        if let Some(k) = idempotency_key {
            rb = rb.header("idempotency-key", k);
        }
        let net = |e: reqwest::Error| CallError::Network(format!("{method} {path}: {e}"));
        let mut r = rb.send().await.map_err(net)?;
        let status = r.status();
        let retry_after_s = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let mut bytes = Vec::new();
        while let Some(chunk) = r.chunk().await.map_err(net)? {
            if bytes.len() + chunk.len() > ANSWER_BYTES_MAX {
                return Err(CallError::Network(format!(
                    "{method} {path}: the answer exceeds {ANSWER_BYTES_MAX} bytes"
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            if v.is_null() && !bytes.is_empty() {
                return Err(CallError::Network(format!(
                    "{method} {path}: the answer is not JSON"
                )));
            }
            return Ok(v);
        }
        Err(CallError::Status {
            status: status.as_u16(),
            code: v["code"].as_str().unwrap_or_default().to_owned(),
            detail: v["detail"].as_str().map(str::to_owned).unwrap_or_else(|| {
                let mut s = String::from_utf8_lossy(&bytes).into_owned();
                crate::truncate_utf8(&mut s, 300);
                s
            }),
            retry_after_s,
        })
    }
}
