//! Video generation providers behind one trait (SPEC §4): submit a job, poll it by its
//! job id, fetch the output, cancel where supported.
//!
//! - `simulated.rs` the embedded default: deterministic per (seed, item), markers
//!   `[reject]`, `[flaky]`, `[slow]`, real GIF output (`media.rs`)
//! - `replicate.rs` Replicate's predictions API (create, get, cancel)
//! - `fal.rs`       fal.ai's queue API (submit, status, result, cancel)
//! - `http.rs`      what both HTTP adapters share: status → error class, `Retry-After`
//!
//! Errors carry a class the scheduler acts on: `Transient` retries with backoff,
//! `Throttled` slows the whole provider and retries without spending an attempt,
//! `Permanent` fails the item at once. Codes are SPEC §3's dotted codes.

pub mod fal;
pub mod http;
pub mod media;
pub mod replicate;
pub mod simulated;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::engine::batch::pricing::Params;
use crate::ids::BatchId;

/// A boxed, sendable future (the trait is used as `dyn Provider`).
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One attempt at one item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRequest {
    /// The batch.
    pub batch: BatchId,
    /// 0-based item index.
    pub item: u32,
    /// 1-based attempt number.
    pub attempt: u32,
    /// The item's prompt.
    pub prompt: String,
    /// Generation parameters.
    pub params: Params,
    /// The provider's model name (from the price table).
    pub provider_model: String,
    /// Whether a watermarked rendition is needed (plans without watermark-free downloads).
    pub watermark: bool,
}

/// Where a finished job's output can be fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputRef(pub String);

/// A job's state at the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobStatus {
    /// Queued or running.
    Running,
    /// Done; the output is there.
    Succeeded(OutputRef),
    /// Done, failed.
    Failed(ProviderError),
}

/// Fetched output, ready for the object store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// MIME type.
    pub content_type: String,
    /// The file.
    pub bytes: bytes::Bytes,
    /// The watermarked rendition, when one was asked for and the provider can make it.
    pub watermarked: Option<bytes::Bytes>,
}

/// How the scheduler treats a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Retry with backoff, spending an attempt (timeouts, 5xx, connection errors).
    Transient,
    /// The provider is rate limiting: slow the provider, retry without spending an attempt.
    Throttled {
        /// The provider's `Retry-After`, if it sent one.
        retry_after_ms: Option<u64>,
    },
    /// Fail the item now (safety refusals, invalid input).
    Permanent,
}

/// A provider failure with its SPEC §3 code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ProviderError {
    /// What the scheduler does about it.
    pub class: ErrorClass,
    /// Dotted code (`provider.timeout`, `safety.prompt_rejected`, …).
    pub code: String,
    /// The provider's message (bounded by the adapters).
    pub message: String,
}

/// Longest provider message kept on an item.
pub const MESSAGE_CHARS_MAX: usize = 500;

impl ProviderError {
    /// A failure of class `class`.
    pub fn new(class: ErrorClass, code: &str, message: impl Into<String>) -> Self {
        let mut message: String = message.into();
        if message.chars().count() > MESSAGE_CHARS_MAX {
            message = message.chars().take(MESSAGE_CHARS_MAX).collect();
        }
        ProviderError {
            class,
            code: code.to_string(),
            message,
        }
    }
    /// A transient failure.
    pub fn transient(code: &str, message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Transient, code, message)
    }
    /// A permanent failure.
    pub fn permanent(code: &str, message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Permanent, code, message)
    }
}

/// A video generation provider.
pub trait Provider: Send + Sync + 'static {
    /// Starts a job; returns the provider's job id.
    fn submit<'a>(&'a self, job: &'a JobRequest) -> BoxFut<'a, Result<String, ProviderError>>;
    /// The job's state. May wait up to `poll_interval_ms` for news.
    fn poll<'a>(
        &'a self,
        job: &'a JobRequest,
        job_id: &'a str,
    ) -> BoxFut<'a, Result<JobStatus, ProviderError>>;
    /// Downloads the output.
    fn fetch<'a>(
        &'a self,
        job: &'a JobRequest,
        output: &'a OutputRef,
    ) -> BoxFut<'a, Result<Output, ProviderError>>;
    /// Asks the provider to stop a job (best effort; `Ok` when unsupported).
    fn cancel<'a>(&'a self, job_id: &'a str) -> BoxFut<'a, Result<(), ProviderError>>;
    /// Pause between polls of a running job.
    fn poll_interval_ms(&self) -> u64;
}

/// A provider with its concurrency limit.
#[derive(Clone)]
pub struct Registered {
    /// The adapter.
    pub provider: Arc<dyn Provider>,
    /// Jobs in flight at this provider, across all tenants.
    pub concurrency_max: u32,
}

/// Providers by name (`simulated`, `replicate`, `fal`, or any name the config gives).
#[derive(Clone, Default)]
pub struct Registry {
    /// By name.
    pub providers: HashMap<String, Registered>,
}

impl Registry {
    /// The default: the simulated provider only.
    pub fn simulated(cfg: simulated::SimConfig, concurrency_max: u32) -> Self {
        let mut r = Registry::default();
        r.insert(
            "simulated",
            Arc::new(simulated::Simulated::new(cfg)),
            concurrency_max,
        );
        r
    }

    /// Adds or replaces a provider.
    pub fn insert(&mut self, name: &str, provider: Arc<dyn Provider>, concurrency_max: u32) {
        self.providers.insert(
            name.to_string(),
            Registered {
                provider,
                concurrency_max: concurrency_max.max(1),
            },
        );
    }

    /// The provider called `name`.
    pub fn get(&self, name: &str) -> Option<&Registered> {
        self.providers.get(name)
    }
}
