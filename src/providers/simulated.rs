//! The simulated provider (SPEC §4, §11): the embedded default, so reelbatch runs end to end
//! with no account anywhere.
//!
//! Deterministic per (seed, batch, item, attempt): the outcome and latency come from a hash
//! of those, never from a random generator's state, so a re-run of the same batch with the
//! same seed behaves the same. Prompt markers steer it: `[reject]` → permanent
//! `safety.prompt_rejected` at submit (it wins over the others); `[flaky]` → the first two
//! attempts fail transiently, the third succeeds; `[slow]` → ten times the latency.
//!
//! Stateless: the job id carries everything the poll needs
//! (`sim.<ready_at_ms>.<outcome>`), so after a crash and restart a recorded job id is
//! polled to the same outcome, exactly like a real provider's job.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::providers::media::{self, MediaSize};
use crate::providers::{BoxFut, JobRequest, JobStatus, Output, OutputRef, Provider, ProviderError};

/// Settings (SPEC §12 `[provider.simulated]`).
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Latency range `[min, max]` in ms.
    pub latency_ms: (u64, u64),
    /// Chance per attempt of a transient failure.
    pub transient_failure_rate: f64,
    /// Chance per attempt of a permanent failure.
    pub permanent_failure_rate: f64,
    /// Seed of every decision.
    pub seed: u64,
    /// Size of the rendered GIF.
    pub media: MediaSize,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            latency_ms: (200, 800),
            transient_failure_rate: 0.05,
            permanent_failure_rate: 0.02,
            seed: 0,
            media: MediaSize::default(),
        }
    }
}

/// The provider.
pub struct Simulated {
    cfg: SimConfig,
}

/// Longest wait inside one poll (a long poll: the job's remaining latency, capped).
const POLL_WAIT_MS_MAX: u64 = 1_000;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// splitmix64 finaliser: a well-mixed 64-bit hash of a 64-bit input.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Simulated {
    /// A simulated provider.
    pub fn new(cfg: SimConfig) -> Self {
        Simulated { cfg }
    }

    fn hash(&self, job: &JobRequest, salt: u64) -> u64 {
        let b = job.batch.0;
        let mut h = mix(self.cfg.seed ^ salt);
        for part in [
            b as u64,
            (b >> 64) as u64,
            job.item as u64,
            job.attempt as u64,
        ] {
            h = mix(h ^ part);
        }
        h
    }

    /// The outcome of this attempt: `ok`, `transient` or `permanent`.
    fn outcome(&self, job: &JobRequest) -> &'static str {
        if job.prompt.contains("[flaky]") {
            return if job.attempt <= 2 { "transient" } else { "ok" };
        }
        // A uniform draw in [0, 1) from 53 bits of the hash.
        let u = (self.hash(job, 1) >> 11) as f64 / (1u64 << 53) as f64;
        let permanent = self.cfg.permanent_failure_rate.clamp(0.0, 1.0);
        let transient = self.cfg.transient_failure_rate.clamp(0.0, 1.0);
        if u < permanent {
            "permanent"
        } else if u < permanent + transient {
            "transient"
        } else {
            "ok"
        }
    }

    fn latency_ms(&self, job: &JobRequest) -> u64 {
        let (lo, hi) = self.cfg.latency_ms;
        let (lo, hi) = (lo.min(hi), lo.max(hi));
        let base = lo + self.hash(job, 2) % (hi - lo + 1);
        if job.prompt.contains("[slow]") {
            base.saturating_mul(10)
        } else {
            base
        }
    }
}

impl Provider for Simulated {
    fn submit<'a>(&'a self, job: &'a JobRequest) -> BoxFut<'a, Result<String, ProviderError>> {
        Box::pin(async move {
            if job.prompt.contains("[reject]") {
                return Err(ProviderError::permanent(
                    "safety.prompt_rejected",
                    "the simulated safety filter rejected the prompt ([reject])",
                ));
            }
            let ready_at = now_ms().saturating_add(self.latency_ms(job));
            Ok(format!("sim.{ready_at}.{}", self.outcome(job)))
        })
    }

    fn poll<'a>(
        &'a self,
        _job: &'a JobRequest,
        job_id: &'a str,
    ) -> BoxFut<'a, Result<JobStatus, ProviderError>> {
        Box::pin(async move {
            let mut parts = job_id.split('.');
            let (Some("sim"), Some(ready), Some(outcome), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(ProviderError::permanent(
                    "provider.invalid_job",
                    format!("not a simulated job id: {job_id:?}"),
                ));
            };
            let ready_at: u64 = ready.parse().map_err(|_| {
                ProviderError::permanent("provider.invalid_job", "bad ready time in job id")
            })?;
            let now = now_ms();
            if now < ready_at {
                let wait = (ready_at - now).min(POLL_WAIT_MS_MAX);
                tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
                if now_ms() < ready_at {
                    return Ok(JobStatus::Running);
                }
            }
            Ok(match outcome {
                "ok" => JobStatus::Succeeded(OutputRef(format!("sim://{job_id}"))),
                "transient" => JobStatus::Failed(ProviderError::transient(
                    "provider.unavailable",
                    "simulated transient failure",
                )),
                "permanent" => JobStatus::Failed(ProviderError::permanent(
                    "safety.output_filtered",
                    "simulated permanent failure: the output was filtered",
                )),
                _ => {
                    return Err(ProviderError::permanent(
                        "provider.invalid_job",
                        "bad outcome in job id",
                    ))
                }
            })
        })
    }

    fn fetch<'a>(
        &'a self,
        job: &'a JobRequest,
        _output: &'a OutputRef,
    ) -> BoxFut<'a, Result<Output, ProviderError>> {
        Box::pin(async move {
            let clean = media::render(&job.prompt, self.cfg.media, false);
            let watermarked = job
                .watermark
                .then(|| media::render(&job.prompt, self.cfg.media, true).into());
            Ok(Output {
                content_type: media::GIF.to_string(),
                bytes: clean.into(),
                watermarked,
            })
        })
    }

    fn cancel<'a>(&'a self, _job_id: &'a str) -> BoxFut<'a, Result<(), ProviderError>> {
        Box::pin(async { Ok(()) })
    }

    fn poll_interval_ms(&self) -> u64 {
        // The poll itself waits for the job (up to POLL_WAIT_MS_MAX): no extra pause.
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::batch::pricing::Params;
    use crate::ids::BatchId;

    fn job(prompt: &str, item: u32, attempt: u32) -> JobRequest {
        JobRequest {
            batch: BatchId(42),
            item,
            attempt,
            prompt: prompt.into(),
            params: Params::default(),
            provider_model: "sim-standard".into(),
            watermark: false,
        }
    }

    #[test]
    fn markers_and_determinism() {
        let s = Simulated::new(SimConfig {
            latency_ms: (0, 0),
            ..SimConfig::default()
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let e = s
                .submit(&job("a [reject] [flaky]", 0, 1))
                .await
                .unwrap_err();
            assert_eq!(e.code, "safety.prompt_rejected");
            assert_eq!(e.class, crate::providers::ErrorClass::Permanent);
            for attempt in 1..=3 {
                let j = job("a [flaky] cat", 0, attempt);
                let id = s.submit(&j).await.unwrap();
                let st = s.poll(&j, &id).await.unwrap();
                assert_eq!(
                    matches!(st, JobStatus::Succeeded(_)),
                    attempt == 3,
                    "{st:?}"
                );
            }
            assert!(s.poll(&job("x", 0, 1), "sim.zz.ok").await.is_err());
        });
        // The failure mix over many items is close to the configured rates.
        let (mut t, mut p) = (0, 0);
        for i in 0..20_000 {
            match s.outcome(&job("x", i, 1)) {
                "transient" => t += 1,
                "permanent" => p += 1,
                _ => {}
            }
        }
        assert!((800..1200).contains(&t), "transient {t}");
        assert!((280..520).contains(&p), "permanent {p}");
        assert_eq!(s.outcome(&job("x", 7, 1)), s.outcome(&job("x", 7, 1)));
        let slow = Simulated::new(SimConfig::default());
        assert!(slow.latency_ms(&job("[slow]", 1, 1)) >= 2_000);
        assert!((200..=800).contains(&slow.latency_ms(&job("x", 1, 1))));
    }
}
