//! RFC 9457 problem details: every error the API returns (SPEC §11 codes).
//!
//! Body: `{"type","title","status","detail","code"}` with `application/problem+json`.
//! `type` is `https://reelbatch.dev/problems/<code>`; `code` is the stable name clients
//! switch on. Everything that can go wrong maps here, so no handler invents a shape.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::engine::accounts::AccountError;
use crate::engine::batch::BatchError;
use crate::engine::wallet::state::WalletError;

/// An error response.
#[derive(Debug, Clone)]
pub struct Problem {
    pub status: StatusCode,
    /// Stable code (SPEC §11).
    pub code: &'static str,
    /// Human explanation of this occurrence.
    pub detail: String,
    /// `Retry-After` seconds (429, 503).
    pub retry_after_s: Option<u64>,
}

impl Problem {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Problem {
            status,
            code,
            detail: detail.into(),
            retry_after_s: None,
        }
    }

    pub fn retry_after(mut self, s: u64) -> Self {
        self.retry_after_s = Some(s);
        self
    }

    pub fn unauthorized(detail: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
    }
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such resource")
    }
    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", detail)
    }
    pub fn invalid_json(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_json", detail)
    }
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than {limit} bytes"),
        )
    }
    pub fn key_reused(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            detail,
        )
    }
    pub fn plan_limit(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "plan_limit_exceeded", detail)
    }
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail).retry_after(1)
    }

    fn title(&self) -> &'static str {
        match self.code {
            "unauthorized" => "Unauthorized",
            "forbidden" => "Forbidden",
            "not_found" => "Not found",
            "insufficient_credits" => "Insufficient credits",
            "invalid_template" => "Invalid template",
            "invalid_request" => "Invalid request",
            "invalid_json" => "Invalid JSON",
            "plan_limit_exceeded" => "Plan limit exceeded",
            "key_spend_limit_exceeded" => "Key spend limit exceeded",
            "rate_limited" => "Rate limited",
            "idempotency_key_reused" => "Idempotency key reused",
            "request_in_progress" => "Request in progress",
            "payload_too_large" => "Payload too large",
            "method_not_allowed" => "Method not allowed",
            "unavailable" => "Service unavailable",
            _ => "Error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "type": format!("https://reelbatch.dev/problems/{}", self.code),
            "title": self.title(),
            "status": self.status.as_u16(),
            "detail": self.detail,
            "code": self.code,
        })
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.body()).expect("a JSON value serializes");
        let mut r = (self.status, body).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(s) = self.retry_after_s {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s.max(1)));
        }
        r
    }
}

impl From<BatchError> for Problem {
    fn from(e: BatchError) -> Self {
        let detail = e.to_string();
        match e {
            BatchError::Template(t) => {
                let status = if t.code() == "plan_limit_exceeded" {
                    StatusCode::FORBIDDEN
                } else {
                    StatusCode::UNPROCESSABLE_ENTITY
                };
                Problem::new(status, t.code(), detail)
            }
            BatchError::Price(_) | BatchError::Invalid(_) | BatchError::NothingToRetry => {
                Problem::invalid(detail)
            }
            BatchError::InsufficientCredits { .. } => {
                Problem::new(StatusCode::PAYMENT_REQUIRED, "insufficient_credits", detail)
            }
            BatchError::DailyItems { retry_after_s, .. } => {
                Problem::new(StatusCode::TOO_MANY_REQUESTS, "plan_limit_exceeded", detail)
                    .retry_after(retry_after_s)
            }
            BatchError::KeySpend { retry_after_s, .. } => Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "key_spend_limit_exceeded",
                detail,
            )
            .retry_after(retry_after_s),
            BatchError::NotFound => Problem::not_found(),
            BatchError::KeyReused(_) => Problem::key_reused(detail),
            BatchError::Unavailable(_) => Problem::unavailable(detail),
        }
    }
}

impl From<WalletError> for Problem {
    fn from(e: WalletError) -> Self {
        let detail = e.to_string();
        match e {
            WalletError::UnknownWallet => Problem::not_found(),
            WalletError::Unavailable(_) => Problem::unavailable(detail),
            WalletError::InsufficientCredits { .. } => {
                Problem::new(StatusCode::PAYMENT_REQUIRED, "insufficient_credits", detail)
            }
            WalletError::KeyReused { .. } => Problem::key_reused(detail),
            _ => Problem::invalid(detail),
        }
    }
}

impl From<AccountError> for Problem {
    fn from(e: AccountError) -> Self {
        let detail = e.to_string();
        match e {
            AccountError::NotFound => Problem::not_found(),
            AccountError::Invalid(_) => Problem::invalid(detail),
            AccountError::KeyReused(_) => Problem::key_reused(detail),
            AccountError::Unavailable(_) => Problem::unavailable(detail),
        }
    }
}
