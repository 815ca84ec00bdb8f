//! fal.ai's queue API (<https://docs.fal.ai/model-endpoints/queue>): submit a request, read
//! its status until it completes, read its result, cancel it.
//!
//! - submit: `POST {base}/{model_id}` with the input JSON → `{"request_id", …}`.
//! - status: `GET {base}/{app}/requests/{id}/status` → `IN_QUEUE` | `IN_PROGRESS` |
//!   `COMPLETED` (with an optional `error`). The app is the model id's first two path
//!   segments (`fal-ai/kling-video/v1/standard/text-to-video` → `fal-ai/kling-video`).
//! - result: `GET {base}/{app}/requests/{id}` → `video.url` (or `video` as a string, or
//!   `output.url`). A client error there (fal answers 422 when the output broke a content
//!   policy) fails the job; a safety refusal is permanent `safety.output_filtered`.
//! - fetch: the output URL, with the token only when it is on the API's own origin.
//! - cancel: `PUT {base}/{app}/requests/{id}/cancel`.
//!
//! Auth: `Authorization: Key <token>`.
//!
//! The job id is `{app}/{request_id}` (e.g. `fal-ai/kling-video/764cabcf-…`), not the bare
//! request id: `Provider::cancel` gets only the job id, and fal's cancel URL needs the app.
//! That keeps the adapter stateless, so a restarted server can poll or cancel a recorded
//! job. A bare request id is still polled (the app then comes from `job.provider_model`).

use serde_json::{json, Value};

use crate::providers::http::{is_safe_segment, mentions_safety, HttpConfig, HttpCore};
use crate::providers::{
    BoxFut, ErrorClass, JobRequest, JobStatus, Output, OutputRef, Provider, ProviderError,
};

/// Most path segments accepted in a model id.
const MODEL_SEGMENTS_MAX: usize = 8;

/// The fal.ai adapter.
pub struct Fal {
    core: HttpCore,
}

impl Fal {
    /// An adapter for `cfg` (base URL normally `https://queue.fal.run`). Fails on a base URL
    /// that is not http(s) or a token that cannot be sent in a header.
    pub fn new(cfg: HttpConfig) -> Result<Self, ProviderError> {
        Ok(Fal {
            core: HttpCore::new(&cfg, "Key")?,
        })
    }

    /// `{base}/{app}/requests/{request_id}{suffix}`.
    fn request_url(&self, app: &str, request_id: &str, suffix: &str) -> String {
        format!("{}/{app}/requests/{request_id}{suffix}", self.core.base)
    }

    /// A GET with our auth (status and result).
    async fn get(&self, url: String) -> Result<reqwest::Response, ProviderError> {
        self.core
            .client
            .get(url)
            .header(reqwest::header::AUTHORIZATION, self.core.auth.clone())
            .send()
            .await
            .map_err(|e| self.core.request_error(e))
    }

    /// Reads a completed request's result: its output URL, or why it failed.
    async fn result(&self, app: &str, request_id: &str) -> Result<JobStatus, ProviderError> {
        let resp = self.get(self.request_url(app, request_id, "")).await?;
        let status = resp.status();
        if !status.is_success() {
            let mut err = self.core.error_of(resp).await;
            // The request ran: a refusal now is about its output, not the prompt.
            if err.code == "safety.prompt_rejected" {
                err.code = "safety.output_filtered".to_string();
            }
            // A client error on the result settles the job; 429/5xx only fail this poll.
            return if err.class == ErrorClass::Permanent {
                Ok(JobStatus::Failed(err))
            } else {
                Err(err)
            };
        }
        let result = self.core.json(resp).await?;
        let url = result
            .pointer("/video/url")
            .and_then(Value::as_str)
            .or_else(|| result.get("video").and_then(Value::as_str))
            .or_else(|| result.pointer("/output/url").and_then(Value::as_str))
            .map(str::trim)
            .filter(|u| !u.is_empty());
        Ok(match url {
            Some(u) => JobStatus::Succeeded(OutputRef(u.to_string())),
            None => JobStatus::Failed(ProviderError::permanent(
                "provider.no_output",
                "the completed request has no video URL",
            )),
        })
    }
}

/// The model id's path segments, each checked to be one safe URL segment.
fn model_segments(model: &str) -> Result<Vec<&str>, ProviderError> {
    let segments: Vec<&str> = model.trim().trim_matches('/').split('/').collect();
    if segments.len() < 2
        || segments.len() > MODEL_SEGMENTS_MAX
        || !segments.iter().all(|s| is_safe_segment(s))
    {
        return Err(ProviderError::permanent(
            "provider.invalid_input",
            format!(
                "{:?} is not a fal model id (owner/app[/path…])",
                model.chars().take(100).collect::<String>()
            ),
        ));
    }
    Ok(segments)
}

/// The app of a model id: its first two segments.
fn app_of(model: &str) -> Result<String, ProviderError> {
    let s = model_segments(model)?;
    Ok(format!("{}/{}", s[0], s[1]))
}

/// `(app, request_id)` of a job id `{owner}/{app}/{request_id}`; a bare request id takes
/// the app of `model` when there is one.
fn split_job_id(job_id: &str, model: Option<&str>) -> Result<(String, String), ProviderError> {
    let invalid = || ProviderError::permanent("provider.invalid_job", "not a fal job id");
    let parts: Vec<&str> = job_id.split('/').collect();
    match parts.as_slice() {
        [owner, app, id] if [owner, app, id].iter().all(|s| is_safe_segment(s)) => {
            Ok((format!("{owner}/{app}"), id.to_string()))
        }
        [id] if is_safe_segment(id) => match model {
            Some(m) => Ok((app_of(m)?, id.to_string())),
            None => Err(invalid()),
        },
        _ => Err(invalid()),
    }
}

/// The model input every video model gets (SPEC §4).
fn input_json(job: &JobRequest) -> Value {
    json!({
        "prompt": job.prompt,
        "duration": job.params.duration_seconds,
        "aspect_ratio": job.params.aspect_ratio,
        "resolution": job.params.resolution,
    })
}

impl Provider for Fal {
    /// Returns the job id `{app}/{request_id}` (see the module docs).
    fn submit<'a>(&'a self, job: &'a JobRequest) -> BoxFut<'a, Result<String, ProviderError>> {
        Box::pin(async move {
            let segments = model_segments(&job.provider_model)?;
            let app = format!("{}/{}", segments[0], segments[1]);
            let url = format!("{}/{}", self.core.base, segments.join("/"));
            let resp = self
                .core
                .client
                .post(url)
                .header(reqwest::header::AUTHORIZATION, self.core.auth.clone())
                .json(&input_json(job))
                .send()
                .await
                .map_err(|e| self.core.request_error(e))?;
            let answer = self.core.json(resp).await?;
            match answer.get("request_id").and_then(Value::as_str) {
                Some(id) if is_safe_segment(id) => Ok(format!("{app}/{id}")),
                _ => Err(ProviderError::transient(
                    "provider.bad_response",
                    "the queued request has no usable request_id",
                )),
            }
        })
    }

    /// HTTP failures are `Err` (the poll failed); a settled request is `Ok`.
    fn poll<'a>(
        &'a self,
        job: &'a JobRequest,
        job_id: &'a str,
    ) -> BoxFut<'a, Result<JobStatus, ProviderError>> {
        Box::pin(async move {
            let (app, id) = split_job_id(job_id, Some(&job.provider_model))?;
            let resp = self.get(self.request_url(&app, &id, "/status")).await?;
            let status = self.core.json(resp).await?;
            let state = status.get("status").and_then(Value::as_str).unwrap_or("");
            match state {
                "IN_QUEUE" | "IN_PROGRESS" => Ok(JobStatus::Running),
                "COMPLETED" => {
                    let error = match status.get("error") {
                        None | Some(Value::Null) => None,
                        Some(Value::String(s)) if s.trim().is_empty() => None,
                        Some(Value::String(s)) => Some(s.clone()),
                        Some(other) => Some(other.to_string()),
                    };
                    match error {
                        Some(text) => {
                            let text = self.core.scrub(&text);
                            Ok(JobStatus::Failed(if mentions_safety(&text) {
                                ProviderError::permanent("safety.output_filtered", text)
                            } else {
                                ProviderError::transient("provider.failed", text)
                            }))
                        }
                        None => self.result(&app, &id).await,
                    }
                }
                other => Err(ProviderError::transient(
                    "provider.bad_response",
                    format!(
                        "unknown request status {:?}",
                        other.chars().take(40).collect::<String>()
                    ),
                )),
            }
        })
    }

    fn fetch<'a>(
        &'a self,
        _job: &'a JobRequest,
        output: &'a OutputRef,
    ) -> BoxFut<'a, Result<Output, ProviderError>> {
        Box::pin(async move { self.core.fetch(&output.0).await })
    }

    /// Needs a job id of the form `{app}/{request_id}`; a request that already completed is
    /// not an error (there is nothing left to stop).
    fn cancel<'a>(&'a self, job_id: &'a str) -> BoxFut<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let (app, id) = split_job_id(job_id, None)?;
            let resp = self
                .core
                .client
                .put(self.request_url(&app, &id, "/cancel"))
                .header(reqwest::header::AUTHORIZATION, self.core.auth.clone())
                .send()
                .await
                .map_err(|e| self.core.request_error(e))?;
            if resp.status().is_success() {
                return Ok(());
            }
            let err = self.core.error_of(resp).await;
            if err.message.contains("ALREADY_COMPLETED") {
                Ok(())
            } else {
                Err(err)
            }
        })
    }

    fn poll_interval_ms(&self) -> u64 {
        self.core.poll_interval_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_and_job_ids() {
        assert_eq!(
            app_of("fal-ai/kling-video/v1/standard/text-to-video").unwrap(),
            "fal-ai/kling-video"
        );
        assert!(app_of("just-one").is_err());
        assert!(app_of("fal-ai/../x").is_err());
        assert_eq!(
            split_job_id("fal-ai/kling-video/abc-123", None).unwrap(),
            ("fal-ai/kling-video".to_string(), "abc-123".to_string())
        );
        assert_eq!(
            split_job_id("abc-123", Some("fal-ai/veo3/fast")).unwrap(),
            ("fal-ai/veo3".to_string(), "abc-123".to_string())
        );
        assert!(split_job_id("abc-123", None).is_err());
        assert!(split_job_id("a/b/c/d", None).is_err());
        assert!(split_job_id("a/b/c?x", None).is_err());
    }
}
