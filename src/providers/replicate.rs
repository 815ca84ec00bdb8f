//! Replicate's predictions HTTP API (<https://replicate.com/docs/reference/http>):
//! create a prediction, get it until it settles, download its output, cancel it.
//!
//! - submit: a `provider_model` with a version (`owner/name:version`) creates through
//!   `POST /v1/predictions` with `{"version", "input"}`; an official model name
//!   (`owner/name`) through `POST /v1/models/{owner}/{name}/predictions` with `{"input"}`.
//!   The job id is the prediction id.
//! - poll: `GET /v1/predictions/{id}`; `starting`/`processing` run, `succeeded` carries the
//!   output URL (a string or the first of a list), `failed` is a safety filter when its
//!   error says so (permanent) and otherwise transient, `canceled`/`aborted` transient.
//! - fetch: the output URL, with the token only when it is on the API's own origin.
//! - cancel: `POST /v1/predictions/{id}/cancel`.
//!
//! Auth: `Authorization: Bearer <token>`. Stateless: a recorded prediction id is all a
//! restarted server needs to resume polling.

use serde_json::{json, Value};

use crate::providers::http::{is_safe_segment, mentions_safety, HttpConfig, HttpCore};
use crate::providers::{BoxFut, JobRequest, JobStatus, Output, OutputRef, Provider, ProviderError};

/// The Replicate adapter.
pub struct Replicate {
    core: HttpCore,
}

impl Replicate {
    /// An adapter for `cfg` (base URL normally `https://api.replicate.com`). Fails on a
    /// base URL that is not http(s) or a token that cannot be sent in a header.
    pub fn new(cfg: HttpConfig) -> Result<Self, ProviderError> {
        Ok(Replicate {
            core: HttpCore::new(&cfg, "Bearer")?,
        })
    }

    /// The create URL and body for `job` (see the module docs).
    fn create_request(&self, job: &JobRequest) -> Result<(String, Value), ProviderError> {
        let input = input_json(job);
        let model = job.provider_model.trim();
        if let Some((_name, version)) = model.split_once(':') {
            if !is_safe_segment(version) {
                return Err(invalid_model(model));
            }
            let url = format!("{}/v1/predictions", self.core.base);
            Ok((url, json!({ "version": version, "input": input })))
        } else {
            let (owner, name) = model.split_once('/').ok_or_else(|| invalid_model(model))?;
            if !is_safe_segment(owner) || !is_safe_segment(name) {
                return Err(invalid_model(model));
            }
            let url = format!("{}/v1/models/{owner}/{name}/predictions", self.core.base);
            Ok((url, json!({ "input": input })))
        }
    }

    /// `{base}/v1/predictions/{id}{suffix}`, refusing an id that is not one URL segment.
    fn prediction_url(&self, id: &str, suffix: &str) -> Result<String, ProviderError> {
        if !is_safe_segment(id) {
            return Err(ProviderError::permanent(
                "provider.invalid_job",
                "not a Replicate prediction id",
            ));
        }
        Ok(format!("{}/v1/predictions/{id}{suffix}", self.core.base))
    }

    /// What a prediction's JSON says about the job.
    fn status_of(&self, prediction: &Value) -> Result<JobStatus, ProviderError> {
        let status = prediction
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("");
        match status {
            "starting" | "processing" => Ok(JobStatus::Running),
            "succeeded" => {
                let output = prediction.get("output");
                let url = match output {
                    Some(Value::String(s)) => Some(s.as_str()),
                    Some(Value::Array(items)) => items.first().and_then(Value::as_str),
                    _ => None,
                };
                match url.map(str::trim).filter(|u| !u.is_empty()) {
                    Some(u) => Ok(JobStatus::Succeeded(OutputRef(u.to_string()))),
                    None => Ok(JobStatus::Failed(ProviderError::permanent(
                        "provider.no_output",
                        "the prediction succeeded without an output URL",
                    ))),
                }
            }
            "failed" => {
                let text = match prediction.get("error") {
                    Some(Value::String(s)) => s.clone(),
                    None | Some(Value::Null) => String::new(),
                    Some(other) => other.to_string(),
                };
                let text = self.core.scrub(&text);
                Ok(JobStatus::Failed(if mentions_safety(&text) {
                    ProviderError::permanent("safety.output_filtered", text)
                } else if text.trim().is_empty() {
                    ProviderError::transient("provider.failed", "the prediction failed")
                } else {
                    ProviderError::transient("provider.failed", text)
                }))
            }
            "canceled" | "aborted" => Ok(JobStatus::Failed(ProviderError::transient(
                "provider.canceled",
                format!("the prediction was {status}"),
            ))),
            other => Err(ProviderError::transient(
                "provider.bad_response",
                format!(
                    "unknown prediction status {:?}",
                    other.chars().take(40).collect::<String>()
                ),
            )),
        }
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

fn invalid_model(model: &str) -> ProviderError {
    ProviderError::permanent(
        "provider.invalid_input",
        format!(
            "{:?} is not a Replicate model (owner/name or owner/name:version)",
            model.chars().take(100).collect::<String>()
        ),
    )
}

impl Provider for Replicate {
    fn submit<'a>(&'a self, job: &'a JobRequest) -> BoxFut<'a, Result<String, ProviderError>> {
        Box::pin(async move {
            let (url, body) = self.create_request(job)?;
            let resp = self
                .core
                .client
                .post(url)
                .header(reqwest::header::AUTHORIZATION, self.core.auth.clone())
                .json(&body)
                .send()
                .await
                .map_err(|e| self.core.request_error(e))?;
            let prediction = self.core.json(resp).await?;
            match prediction.get("id").and_then(Value::as_str) {
                Some(id) if is_safe_segment(id) => Ok(id.to_string()),
                _ => Err(ProviderError::transient(
                    "provider.bad_response",
                    "the created prediction has no usable id",
                )),
            }
        })
    }

    /// HTTP failures are `Err` (the poll failed); a settled prediction is `Ok`.
    fn poll<'a>(
        &'a self,
        _job: &'a JobRequest,
        job_id: &'a str,
    ) -> BoxFut<'a, Result<JobStatus, ProviderError>> {
        Box::pin(async move {
            let url = self.prediction_url(job_id, "")?;
            let resp = self
                .core
                .client
                .get(url)
                .header(reqwest::header::AUTHORIZATION, self.core.auth.clone())
                .send()
                .await
                .map_err(|e| self.core.request_error(e))?;
            let prediction = self.core.json(resp).await?;
            self.status_of(&prediction)
        })
    }

    fn fetch<'a>(
        &'a self,
        _job: &'a JobRequest,
        output: &'a OutputRef,
    ) -> BoxFut<'a, Result<Output, ProviderError>> {
        Box::pin(async move { self.core.fetch(&output.0).await })
    }

    fn cancel<'a>(&'a self, job_id: &'a str) -> BoxFut<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let url = self.prediction_url(job_id, "/cancel")?;
            let resp = self
                .core
                .client
                .post(url)
                .header(reqwest::header::AUTHORIZATION, self.core.auth.clone())
                .send()
                .await
                .map_err(|e| self.core.request_error(e))?;
            if resp.status().is_success() {
                Ok(())
            } else {
                Err(self.core.error_of(resp).await)
            }
        })
    }

    fn poll_interval_ms(&self) -> u64 {
        self.core.poll_interval_ms
    }
}
