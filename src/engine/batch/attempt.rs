//! One attempt at one item, as a task on the engine's worker runtime (never on an actor's
//! thread: provider calls wait on the network).
//!
//! submit → report the job id to the batch actor and wait until it is durable → poll until
//! done → fetch → store every rendition → report the outcome. The whole attempt has one
//! deadline; past it the job is canceled at the provider (best effort) and the attempt is a
//! transient `provider.timeout`. Poll errors that are not permanent are retried inside the
//! attempt a bounded number of times (the job is still running at the provider). The
//! permit is held for the attempt's life and dropped at the end, returning its slots.

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use tokio::time::{timeout_at, Instant};

use crate::delivery::store::{Rendition, VideoStore};
use crate::engine::batch::actor::{BatchActor, Outcome, Submitted};
use crate::engine::batch::state::StoredOutput;
use crate::engine::batch::ExecConfig;
use crate::engine::scheduler::Permit;
use crate::engine::Clock;
use crate::ids::VideoId;
use crate::providers::{ErrorClass, JobRequest, JobStatus, Provider, ProviderError};

/// Everything one attempt needs.
pub(crate) struct AttemptTask {
    /// The batch actor to report to.
    pub addr: Addr<BatchActor>,
    /// The provider.
    pub provider: Arc<dyn Provider>,
    /// What to generate.
    pub req: JobRequest,
    /// A job recorded before a restart: poll it, do not resubmit.
    pub resume: Option<String>,
    /// Where outputs go.
    pub store: VideoStore,
    /// For video ids.
    pub clock: Arc<dyn Clock>,
    /// Deadlines and bounds.
    pub cfg: ExecConfig,
    /// The provider's name (metrics).
    pub provider_name: String,
    /// Outcome counters (metrics).
    pub stats: Arc<ProviderStats>,
}

/// Attempt outcomes per provider: (count, total latency in µs) per (provider, outcome).
/// Outcomes: `succeeded`, `transient`, `throttled`, `permanent`, `abandoned`.
#[derive(Default)]
pub struct ProviderStats {
    map: std::sync::Mutex<OutcomeCounts>,
}

/// (provider, outcome) → (attempts, total latency µs).
type OutcomeCounts = std::collections::BTreeMap<(String, &'static str), (u64, u64)>;

impl ProviderStats {
    fn record(&self, provider: &str, outcome: &'static str, latency: Duration) {
        let mut m = self.map.lock().expect("not poisoned");
        // Bounded: providers are configured, outcomes a fixed set.
        let e = m.entry((provider.to_owned(), outcome)).or_default();
        e.0 += 1;
        e.1 = e.1.saturating_add(latency.as_micros() as u64);
    }

    /// (provider, outcome, attempts, total latency µs), sorted.
    pub fn snapshot(&self) -> Vec<(String, &'static str, u64, u64)> {
        self.map
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|((p, o), (n, us))| (p.clone(), *o, *n, *us))
            .collect()
    }
}

enum End {
    /// Report this to the actor.
    Report(Result<StoredOutput, ProviderError>),
    /// The actor no longer wants this attempt (canceled, expired, log down).
    Abandoned,
}

fn timeout_error() -> ProviderError {
    ProviderError::transient("provider.timeout", "the attempt passed its deadline")
}

/// Runs the attempt and reports its outcome; the permit drops at the end.
pub(crate) async fn run(task: AttemptTask, permit: Permit) {
    let started = std::time::Instant::now();
    let end = attempt(&task).await;
    let outcome = match &end {
        End::Report(Ok(_)) => "succeeded",
        End::Report(Err(e)) => match e.class {
            ErrorClass::Transient => "transient",
            ErrorClass::Throttled { .. } => "throttled",
            ErrorClass::Permanent => "permanent",
        },
        End::Abandoned => "abandoned",
    };
    task.stats
        .record(&task.provider_name, outcome, started.elapsed());
    if let End::Report(result) = end {
        // If the actor is gone (engine stopping), the outcome is lost with it; a restart
        // resumes the item from the log (its job id, if recorded, is polled again).
        let _ = task
            .addr
            .send(Outcome {
                item: task.req.item,
                attempt: task.req.attempt,
                result,
            })
            .await;
    }
    drop(permit);
}

async fn attempt(t: &AttemptTask) -> End {
    let deadline = Instant::now() + Duration::from_millis(t.cfg.attempt_timeout_ms);
    let job_id = match &t.resume {
        Some(j) => j.clone(),
        None => {
            let id = match timeout_at(deadline, t.provider.submit(&t.req)).await {
                Err(_) => return End::Report(Err(timeout_error())),
                Ok(Err(e)) => return End::Report(Err(e)),
                Ok(Ok(id)) => id,
            };
            let recorded = t
                .addr
                .send(Submitted {
                    item: t.req.item,
                    attempt: t.req.attempt,
                    job: id.clone(),
                })
                .await;
            match recorded {
                Ok(Some(durable)) => {
                    if durable.await.is_err() {
                        return End::Abandoned;
                    }
                }
                _ => {
                    let _ = timeout_at(deadline, t.provider.cancel(&id)).await;
                    return End::Abandoned;
                }
            }
            id
        }
    };
    // At least 1 ms between polls of a running job: a provider that answers "running"
    // at once must not turn the loop into a busy spin until the deadline.
    let interval = Duration::from_millis(t.provider.poll_interval_ms().max(1));
    let mut poll_errors = 0u32;
    let output_ref = loop {
        match timeout_at(deadline, t.provider.poll(&t.req, &job_id)).await {
            Err(_) => {
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), t.provider.cancel(&job_id)).await;
                return End::Report(Err(timeout_error()));
            }
            Ok(Ok(JobStatus::Running)) => {
                // Past the deadline, the next poll's timeout reports it.
                let _ = timeout_at(deadline, tokio::time::sleep(interval)).await;
            }
            Ok(Ok(JobStatus::Succeeded(r))) => break r,
            Ok(Ok(JobStatus::Failed(e))) => return End::Report(Err(e)),
            Ok(Err(e)) if e.class == ErrorClass::Permanent => return End::Report(Err(e)),
            Ok(Err(e)) => {
                // The job still runs at the provider: ask again later, a bounded number of
                // times, rather than resubmitting it.
                poll_errors += 1;
                if poll_errors > t.cfg.poll_errors_max {
                    return End::Report(Err(e));
                }
                let pause = match e.class {
                    ErrorClass::Throttled { retry_after_ms } => {
                        retry_after_ms.unwrap_or(t.cfg.throttle_default_ms)
                    }
                    _ => t.cfg.backoff_base_ms,
                }
                .min(t.cfg.backoff_max_ms);
                let _ =
                    timeout_at(deadline, tokio::time::sleep(Duration::from_millis(pause))).await;
            }
        }
    };
    let output = match timeout_at(deadline, t.provider.fetch(&t.req, &output_ref)).await {
        Err(_) => return End::Report(Err(timeout_error())),
        Ok(Err(e)) => return End::Report(Err(e)),
        Ok(Ok(o)) => o,
    };
    let video = VideoId::generate(t.clock.now_ms());
    let store_err = |e: crate::delivery::store::StoreError| {
        ProviderError::transient("storage.unavailable", e.to_string())
    };
    let bytes = output.bytes.len() as u64;
    if let Err(e) = t
        .store
        .put(video, Rendition::Clean, &output.content_type, output.bytes)
        .await
    {
        return End::Report(Err(store_err(e)));
    }
    let mut watermarked_bytes = None;
    if let Some(wm) = output.watermarked {
        watermarked_bytes = Some(wm.len() as u64);
        if let Err(e) = t
            .store
            .put(video, Rendition::Watermarked, &output.content_type, wm)
            .await
        {
            return End::Report(Err(store_err(e)));
        }
    }
    End::Report(Ok(StoredOutput {
        video,
        content_type: output.content_type,
        bytes,
        watermarked_bytes,
    }))
}
