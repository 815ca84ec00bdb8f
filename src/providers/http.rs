//! What the HTTP adapters (`replicate.rs`, `fal.rs`) share: their configuration, one
//! bounded `reqwest::Client` each, HTTP status → error class, `Retry-After`, bounded body
//! reads, and keeping the API token out of every message.
//!
//! The mapping is the scheduler's contract (module docs of `providers`): 429 throttles the
//! provider without spending an attempt, 408/5xx/timeouts/connection errors are transient,
//! everything else a client error is permanent, and a refusal that mentions safety or a
//! content policy is a permanent `safety.*` failure, so no retry ever pays for the same
//! refused prompt twice.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{StatusCode, Url};

use crate::providers::{ErrorClass, ProviderError};

/// Longest `Retry-After` honoured: a provider asking for more is treated as asking for an
/// hour, so one bad header cannot park a provider for days.
pub const RETRY_AFTER_MS_MAX: u64 = 3_600_000;

/// Default per-request timeout (connect to end of body).
pub const REQUEST_TIMEOUT_MS_DEFAULT: u64 = 30_000;

/// Default pause between polls of a running job.
pub const POLL_INTERVAL_MS_DEFAULT: u64 = 2_000;

/// Default largest output accepted (512 MiB): a longer download is refused rather than
/// held in memory.
pub const OUTPUT_BYTES_MAX_DEFAULT: u64 = 512 * 1024 * 1024;

/// Largest JSON answer read from a provider's API (their answers are a few KiB).
pub const JSON_BYTES_MAX: u64 = 1024 * 1024;

/// Largest error body read to classify a failure (only its start ends up in the message).
pub const ERROR_BODY_BYTES_MAX: u64 = 16 * 1024;

/// Most redirects followed: output URLs on CDNs redirect once or twice.
pub const REDIRECTS_MAX: usize = 5;

/// Longest connect phase (capped by the request timeout).
const CONNECT_TIMEOUT_MS_MAX: u64 = 10_000;

/// Longest content type kept from a download's `Content-Type`.
const CONTENT_TYPE_CHARS_MAX: usize = 100;

/// What a body is replaced with in messages wherever the token appeared in it.
const REDACTED: &str = "[redacted]";

/// Words that mark a refusal as a safety or content-policy decision (matched
/// case-insensitively). Such refusals are permanent: retrying the same prompt is refused
/// again and may be billed.
const SAFETY_WORDS: [&str; 5] = [
    "nsfw",
    "safety",
    "content policy",
    "content_policy",
    "sensitive",
];

/// Settings of one HTTP provider (SPEC §12 `[provider.replicate]`, `[provider.fal]`).
///
/// `Debug` never shows the token.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// The API's base URL (`https://api.replicate.com`, `https://queue.fal.run`); tests
    /// point it at a local fake. A trailing `/` is ignored.
    pub base_url: String,
    /// The API token. Sent only to `base_url`'s origin and never put in a message.
    pub token: String,
    /// Per-request timeout, connect to end of body, in ms.
    pub request_timeout_ms: u64,
    /// Pause between polls of a running job, in ms.
    pub poll_interval_ms: u64,
    /// Largest output downloaded, in bytes.
    pub output_bytes_max: u64,
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("base_url", &self.base_url)
            .field("token", &REDACTED)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("poll_interval_ms", &self.poll_interval_ms)
            .field("output_bytes_max", &self.output_bytes_max)
            .finish()
    }
}

impl HttpConfig {
    /// A configuration with the default timeout, poll interval and output size limit.
    pub fn new(base_url: impl Into<String>, token: impl Into<String>) -> Self {
        HttpConfig {
            base_url: base_url.into(),
            token: token.into(),
            request_timeout_ms: REQUEST_TIMEOUT_MS_DEFAULT,
            poll_interval_ms: POLL_INTERVAL_MS_DEFAULT,
            output_bytes_max: OUTPUT_BYTES_MAX_DEFAULT,
        }
    }

    /// A default configuration whose token is read from the environment variable
    /// `token_env_var` (tokens stay out of config files). The error names the variable,
    /// never its value.
    pub fn from_env(base_url: &str, token_env_var: &str) -> Result<HttpConfig, String> {
        let token = match std::env::var(token_env_var) {
            Ok(t) => t,
            Err(std::env::VarError::NotPresent) => {
                return Err(format!("environment variable {token_env_var} is not set"))
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(format!(
                    "environment variable {token_env_var} is not valid UTF-8"
                ))
            }
        };
        let token = token.trim();
        if token.is_empty() {
            return Err(format!("environment variable {token_env_var} is empty"));
        }
        Ok(HttpConfig::new(base_url, token))
    }
}

/// What an adapter builds once from its [`HttpConfig`]: the client, the parsed base URL and
/// the ready-made auth header.
pub(crate) struct HttpCore {
    /// One client per adapter: its connection pool is reused by every job.
    pub client: reqwest::Client,
    /// `base_url` without a trailing `/`.
    pub base: String,
    /// `base_url` parsed, to tell our API's origin from foreign hosts.
    pub base_url: Url,
    /// `Authorization` value (marked sensitive so it never shows in `Debug`).
    pub auth: HeaderValue,
    /// The token, to scrub it from any text that reaches a message.
    pub token: String,
    /// Largest output downloaded.
    pub output_bytes_max: u64,
    /// Pause between polls.
    pub poll_interval_ms: u64,
}

impl HttpCore {
    /// Builds the client: request timeout, bounded connect timeout, at most
    /// [`REDIRECTS_MAX`] redirects. `scheme` is the auth scheme (`Bearer`, `Key`).
    pub fn new(cfg: &HttpConfig, scheme: &str) -> Result<HttpCore, ProviderError> {
        let base = cfg.base_url.trim().trim_end_matches('/').to_string();
        let base_url = Url::parse(&base).map_err(|e| {
            ProviderError::permanent(
                "provider.invalid_config",
                format!("base URL {base:?} is not a URL: {e}"),
            )
        })?;
        if !matches!(base_url.scheme(), "http" | "https") || base_url.host_str().is_none() {
            return Err(ProviderError::permanent(
                "provider.invalid_config",
                format!("base URL {base:?} is not an http(s) URL"),
            ));
        }
        let token = cfg.token.trim().to_string();
        if token.is_empty() {
            return Err(ProviderError::permanent(
                "provider.invalid_config",
                "the API token is empty",
            ));
        }
        let mut auth = HeaderValue::from_str(&format!("{scheme} {token}")).map_err(|_| {
            ProviderError::permanent(
                "provider.invalid_config",
                "the API token contains characters not allowed in an HTTP header",
            )
        })?;
        auth.set_sensitive(true);
        let timeout_ms = cfg.request_timeout_ms.max(1);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(timeout_ms))
            .connect_timeout(Duration::from_millis(
                timeout_ms.min(CONNECT_TIMEOUT_MS_MAX),
            ))
            .redirect(reqwest::redirect::Policy::limited(REDIRECTS_MAX))
            .user_agent(concat!("reelbatch/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                ProviderError::permanent(
                    "provider.invalid_config",
                    format!("cannot build the HTTP client: {}", e.without_url()),
                )
            })?;
        Ok(HttpCore {
            client,
            base,
            base_url,
            auth,
            token,
            output_bytes_max: cfg.output_bytes_max,
            poll_interval_ms: cfg.poll_interval_ms,
        })
    }

    /// Whether `url` is on our API's origin (scheme, host, port), the only place the token
    /// may be sent. Output URLs usually point at a CDN.
    pub fn same_origin(&self, url: &Url) -> bool {
        url.origin() == self.base_url.origin()
    }

    /// `text` with the token replaced.
    pub fn scrub(&self, text: &str) -> String {
        redact(text, &self.token)
    }

    /// A request error as a provider error, with the token scrubbed.
    pub fn request_error(&self, e: reqwest::Error) -> ProviderError {
        let mut err = from_reqwest(e);
        err.message = self.scrub(&err.message);
        err
    }

    /// The classified failure of a non-2xx response (reads at most
    /// [`ERROR_BODY_BYTES_MAX`] of its body; the token is scrubbed before classifying, so
    /// no truncation can leave a piece of it).
    pub async fn error_of(&self, resp: reqwest::Response) -> ProviderError {
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = match read_prefix(resp, ERROR_BODY_BYTES_MAX).await {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(_) => String::new(),
        };
        classify(status, &headers, &self.scrub(&body))
    }

    /// Reads a 2xx JSON answer (at most [`JSON_BYTES_MAX`]); a non-2xx answer is
    /// classified.
    pub async fn json(&self, resp: reqwest::Response) -> Result<serde_json::Value, ProviderError> {
        if !resp.status().is_success() {
            return Err(self.error_of(resp).await);
        }
        let bytes = read_limited(resp, JSON_BYTES_MAX).await.map_err(|mut e| {
            e.message = self.scrub(&e.message);
            e
        })?;
        serde_json::from_slice(&bytes).map_err(|e| {
            ProviderError::transient(
                "provider.bad_response",
                format!("the provider answered with invalid JSON: {e}"),
            )
        })
    }

    /// Downloads an output: the token goes only to our own origin (reqwest also drops it on
    /// a redirect to another host), the body is bounded by `output_bytes_max`, the content
    /// type comes from the response (default `video/mp4`). No watermarked rendition: real
    /// video cannot be watermarked here.
    pub async fn fetch(&self, url: &str) -> Result<crate::providers::Output, ProviderError> {
        // The URL itself stays out of messages: it may carry a signed query string.
        let parsed = Url::parse(url).map_err(|e| {
            ProviderError::permanent(
                "provider.no_output",
                format!("the output URL is not a URL: {e}"),
            )
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(ProviderError::permanent(
                "provider.no_output",
                format!("unsupported output URL scheme {:?}", parsed.scheme()),
            ));
        }
        let mut req = self.client.get(parsed.clone());
        if self.same_origin(&parsed) {
            req = req.header(reqwest::header::AUTHORIZATION, self.auth.clone());
        }
        let resp = req.send().await.map_err(|e| self.request_error(e))?;
        if !resp.status().is_success() {
            return Err(self.error_of(resp).await);
        }
        let content_type = content_type_of(resp.headers());
        let bytes = read_limited(resp, self.output_bytes_max)
            .await
            .map_err(|mut e| {
                e.message = self.scrub(&e.message);
                e
            })?;
        Ok(crate::providers::Output {
            content_type,
            bytes,
            watermarked: None,
        })
    }
}

/// The response's content type, bounded, without parameters; `video/mp4` when absent or
/// unreadable.
fn content_type_of(headers: &HeaderMap) -> String {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim())
        .filter(|v| !v.is_empty() && v.len() <= CONTENT_TYPE_CHARS_MAX)
        .unwrap_or("video/mp4")
        .to_string()
}

/// `text` with every occurrence of `token` replaced by `[redacted]` (an empty token
/// changes nothing).
pub fn redact(text: &str, token: &str) -> String {
    if token.is_empty() {
        text.to_string()
    } else {
        text.replace(token, REDACTED)
    }
}

/// Whether `text` reads as a safety or content-policy refusal ("nsfw", "safety",
/// "content policy", "content_policy", "sensitive", any case).
pub fn mentions_safety(text: &str) -> bool {
    let lower = text.to_lowercase();
    SAFETY_WORDS.iter().any(|w| lower.contains(w))
}

/// The `Retry-After` header in ms: delta-seconds or an HTTP-date (IMF-fixdate, e.g.
/// `Sun, 06 Nov 1994 08:49:37 GMT`; a date in the past is 0), capped at
/// [`RETRY_AFTER_MS_MAX`]. `None` when absent or unreadable.
pub fn retry_after_ms(headers: &HeaderMap) -> Option<u64> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // Digits only: an overflow means "very long", i.e. the cap.
        let ms = v
            .parse::<u64>()
            .map_or(RETRY_AFTER_MS_MAX, |s| s.saturating_mul(1000));
        return Some(ms.min(RETRY_AFTER_MS_MAX));
    }
    let at = parse_http_date(v)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Some(
        at.saturating_sub(now)
            .saturating_mul(1000)
            .min(RETRY_AFTER_MS_MAX),
    )
}

/// Seconds since the epoch of an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the form
/// RFC 9110 requires senders to use. The weekday is not checked.
fn parse_http_date(s: &str) -> Option<u64> {
    let (_weekday, rest) = s.split_once(", ")?;
    let mut parts = rest.split(' ');
    let day: u64 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: u64 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':');
    let h: u64 = hms.next()?.parse().ok()?;
    let m: u64 = hms.next()?.parse().ok()?;
    let sec: u64 = hms.next()?.parse().ok()?;
    if parts.next()? != "GMT" || parts.next().is_some() || hms.next().is_some() {
        return None;
    }
    if !(1..=31).contains(&day) || !(1970..=9999).contains(&year) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm), years ≥ 1970 only.
    let (y, mo) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * mo + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    Some(days * 86_400 + h * 3_600 + m * 60 + sec)
}

/// The failure a non-2xx answer means (see the module docs). `body_text` ends up in the
/// message (bounded by [`ProviderError::new`]); callers scrub the token from it first.
pub fn classify(status: StatusCode, headers: &HeaderMap, body_text: &str) -> ProviderError {
    let snippet: String = body_text.split_whitespace().collect::<Vec<_>>().join(" ");
    let message = if snippet.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {snippet}")
    };
    let code = status.as_u16();
    match code {
        429 => ProviderError::new(
            ErrorClass::Throttled {
                retry_after_ms: retry_after_ms(headers),
            },
            "provider.rate_limited",
            message,
        ),
        408 | 500..=599 => ProviderError::transient("provider.unavailable", message),
        401 | 403 => ProviderError::permanent("provider.unauthorized", message),
        400 | 404 | 422 if mentions_safety(body_text) => {
            ProviderError::permanent("safety.prompt_rejected", message)
        }
        400..=499 => ProviderError::permanent("provider.invalid_input", message),
        _ => ProviderError::transient("provider.unavailable", message),
    }
}

/// A request that got no HTTP answer: a timeout is `provider.timeout`, anything else
/// (connect, TLS, reset, too many redirects) `provider.unavailable`; both transient. The
/// URL is left out of the message: output URLs carry signed query strings.
pub fn from_reqwest(e: reqwest::Error) -> ProviderError {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    // The source chain says what actually failed ("connection refused"); bounded anyway.
    let mut depth = 0;
    while let Some(s) = source {
        if depth >= 4 {
            break;
        }
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
        depth += 1;
    }
    if e.is_timeout() {
        ProviderError::transient("provider.timeout", format!("request timed out: {text}"))
    } else if e.is_connect() {
        ProviderError::transient("provider.unavailable", format!("cannot connect: {text}"))
    } else {
        ProviderError::transient("provider.unavailable", format!("request failed: {text}"))
    }
}

/// Reads the whole body, refusing (`provider.output_too_large`, permanent) one longer than
/// `bytes_max`: a declared `Content-Length` over the limit is refused before reading
/// anything, and a body without one is counted as it arrives, so memory stays bounded.
pub async fn read_limited(
    mut resp: reqwest::Response,
    bytes_max: u64,
) -> Result<bytes::Bytes, ProviderError> {
    let too_large = || {
        ProviderError::permanent(
            "provider.output_too_large",
            format!("the response is larger than {bytes_max} bytes"),
        )
    };
    let declared = resp.content_length();
    if declared.is_some_and(|n| n > bytes_max) {
        return Err(too_large());
    }
    // Pre-allocate what was declared, but never trust it for more than 8 MiB up front.
    let initial = declared.unwrap_or(0).min(bytes_max).min(8 * 1024 * 1024);
    let mut buf = bytes::BytesMut::with_capacity(usize::try_from(initial).unwrap_or(0));
    while let Some(chunk) = resp.chunk().await.map_err(from_reqwest)? {
        if (buf.len() as u64).saturating_add(chunk.len() as u64) > bytes_max {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Reads at most `bytes_max` of the body (the rest is dropped): enough of an error body
/// to classify it.
async fn read_prefix(
    mut resp: reqwest::Response,
    bytes_max: u64,
) -> Result<bytes::Bytes, ProviderError> {
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = resp.chunk().await.map_err(from_reqwest)? {
        let room = usize::try_from(bytes_max.saturating_sub(buf.len() as u64)).unwrap_or(0);
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if buf.len() as u64 >= bytes_max {
            break;
        }
    }
    Ok(buf.freeze())
}

/// Whether `s` is safe as one URL path segment of a job id (ids go into URLs: no `/`,
/// `?`, `..`, bounded length).
pub(crate) fn is_safe_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(retry_after: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_str(retry_after).unwrap());
        h
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(retry_after_ms(&headers("7")), Some(7_000));
        assert_eq!(retry_after_ms(&headers(" 0 ")), Some(0));
        assert_eq!(retry_after_ms(&headers("86400")), Some(RETRY_AFTER_MS_MAX));
        assert_eq!(
            retry_after_ms(&headers("99999999999999999999999")),
            Some(RETRY_AFTER_MS_MAX)
        );
        assert_eq!(retry_after_ms(&headers("soon")), None);
        assert_eq!(retry_after_ms(&headers("-5")), None);
        assert_eq!(retry_after_ms(&HeaderMap::new()), None);
        // A date in the past: retry now.
        assert_eq!(
            retry_after_ms(&headers("Sun, 06 Nov 1994 08:49:37 GMT")),
            Some(0)
        );
        // A date far ahead: the cap.
        assert_eq!(
            retry_after_ms(&headers("Fri, 01 Jan 2100 00:00:00 GMT")),
            Some(RETRY_AFTER_MS_MAX)
        );
        assert_eq!(
            retry_after_ms(&headers("Sun, 06 Foo 1994 08:49:37 GMT")),
            None
        );
    }

    #[test]
    fn http_date_is_exact() {
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(
            parse_http_date("Tue, 29 Feb 2000 12:00:00 GMT"),
            Some(951_825_600)
        );
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 UTC"), None);
        assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), None);
    }

    #[test]
    fn classify_matrix() {
        let h = headers("7");
        let c = |s: u16, body: &str| classify(StatusCode::from_u16(s).unwrap(), &h, body);
        let e = c(429, "slow down");
        assert_eq!(
            e.class,
            ErrorClass::Throttled {
                retry_after_ms: Some(7_000)
            }
        );
        assert_eq!(e.code, "provider.rate_limited");
        assert!(e.message.contains("slow down"), "{}", e.message);
        for s in [408, 500, 502, 503, 504, 599] {
            let e = c(s, "");
            assert_eq!(
                (e.class, e.code.as_str()),
                (ErrorClass::Transient, "provider.unavailable")
            );
        }
        for s in [401, 403] {
            let e = c(s, "NSFW");
            assert_eq!(
                (e.class, e.code.as_str()),
                (ErrorClass::Permanent, "provider.unauthorized")
            );
        }
        for s in [400, 404, 422] {
            assert_eq!(c(s, "bad field").code, "provider.invalid_input");
            for body in [
                "NSFW content detected",
                "flagged by the Safety checker",
                "violates our Content Policy",
                "{\"type\":\"content_policy_violation\"}",
                "prompt is SENSITIVE",
            ] {
                let e = c(s, body);
                assert_eq!(
                    (e.class, e.code.as_str()),
                    (ErrorClass::Permanent, "safety.prompt_rejected"),
                    "{s} {body}"
                );
            }
        }
        // Other 4xx: invalid input even when the body mentions safety.
        let e = c(409, "safety");
        assert_eq!(
            (e.class, e.code.as_str()),
            (ErrorClass::Permanent, "provider.invalid_input")
        );
        for s in [200, 302, 101] {
            assert_eq!(c(s, "").class, ErrorClass::Transient);
        }
        // Long bodies are bounded.
        let e = c(500, &"x".repeat(10_000));
        assert!(e.message.chars().count() <= crate::providers::MESSAGE_CHARS_MAX);
    }

    #[test]
    fn redaction_and_segments() {
        assert_eq!(
            redact("Bearer abc.def ok", "abc.def"),
            "Bearer [redacted] ok"
        );
        assert_eq!(redact("same", ""), "same");
        assert!(is_safe_segment("ufawqhfynnddngldkgtslldrkq"));
        assert!(is_safe_segment("764cabcf-b745-4b3e-ae38-1200304cf45b"));
        for bad in ["", "..", "a/b", "a?b", "a b", &"x".repeat(201)] {
            assert!(!is_safe_segment(bad), "{bad}");
        }
    }

    #[test]
    fn config_debug_hides_token() {
        let cfg = HttpConfig::new("https://api.example", "sk-very-secret");
        assert!(!format!("{cfg:?}").contains("sk-very-secret"));
        assert_eq!(cfg.request_timeout_ms, 30_000);
        assert_eq!(cfg.poll_interval_ms, 2_000);
        assert_eq!(cfg.output_bytes_max, 512 * 1024 * 1024);
    }
}
