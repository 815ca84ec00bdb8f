//! The delivery loop: takes due deliveries whose cause is acknowledged, sends each as a
//! signed POST (at most `concurrency_max` at once, `concurrency_per_endpoint` per
//! endpoint), records the attempt, schedules the next one or ends the delivery, and
//! disables endpoints that answer 410 or have failed for `disable_after_ms`.
//!
//! A task on the engine's worker runtime rather than an actix actor: all its state is
//! in the outbox (one lock), and its work is network I/O that actors would only forward.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::webhooks::outbox::Outbox;
use crate::webhooks::state::{Attempt, Job, WebhookRecord, ERROR_BYTES_MAX};
use crate::webhooks::{sign, ssrf};

/// Longest the loop sleeps without looking (also bounds the reaction to a clock jump).
const IDLE_MS_MAX: u64 = 1_000;
/// Bytes of a failed response's body kept in the log.
const BODY_SNIPPET_BYTES: usize = 200;

/// Runs until the outbox is stopped.
pub async fn run(outbox: Arc<Outbox>) {
    let cfg = &outbox.cfg;
    let client = match ssrf::client(
        cfg.allow_private_targets,
        Duration::from_millis(cfg.timeout_ms.max(1)),
    ) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "webhook client could not be built: no deliveries");
            return;
        }
    };
    let permits = Arc::new(Semaphore::new(cfg.concurrency_max.max(1)));
    while !outbox.stopped.load(Ordering::Acquire) {
        let now = outbox.clock.now_ms();
        let free = permits.available_permits();
        let (jobs, wake) = if free == 0 {
            (Vec::new(), None) // an attempt finishing notifies
        } else {
            outbox.lock().take_due(
                now,
                outbox.wal().acked_lsn(),
                free,
                cfg.concurrency_per_endpoint.max(1),
            )
        };
        for job in jobs {
            let permit = Arc::clone(&permits)
                .try_acquire_owned()
                .expect("no more jobs than free permits");
            let outbox = Arc::clone(&outbox);
            let client = client.clone();
            tokio::spawn(async move {
                attempt(&outbox, &client, job).await;
                drop(permit);
                outbox.notify.notify_one();
            });
        }
        let sleep_ms = wake
            .map_or(IDLE_MS_MAX, |w| w.saturating_sub(now))
            .clamp(1, IDLE_MS_MAX);
        tokio::select! {
            _ = outbox.notify.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(sleep_ms)) => {}
        }
    }
}

/// What one request produced.
struct Sent {
    status: u16,
    error: String,
    /// The receiver's `Retry-After` (delta-seconds form), in ms.
    retry_after_ms: Option<u64>,
}

async fn send(outbox: &Outbox, client: &reqwest::Client, job: &Job, now_ms: u64) -> Sent {
    let fail = |error: String| Sent {
        status: 0,
        error,
        retry_after_ms: None,
    };
    // The URL was checked at registration; literal addresses are checked again here
    // (names are checked by the client's resolver at connection time).
    let url = match ssrf::check_url(&job.url, outbox.cfg.allow_http) {
        Ok(u) => u,
        Err(e) => return fail(format!("refused: {e}")),
    };
    if let Err(e) = ssrf::check_literal(&url, outbox.cfg.allow_private_targets) {
        return fail(format!("refused: {e}"));
    }
    let ts = now_ms / 1000;
    let secrets: Vec<&str> = job.secrets.iter().map(String::as_str).collect();
    let signature = sign::header(&secrets, &job.webhook_id, ts, &job.body);
    let resp = client
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", &job.webhook_id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", signature)
        .body(job.body.clone())
        .send()
        .await;
    let mut resp = match resp {
        Ok(r) => r,
        Err(e) => return fail(error_chain(&e)),
    };
    let status = resp.status().as_u16();
    let retry_after_ms = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| s.saturating_mul(1000));
    let error = if (200..300).contains(&status) {
        String::new()
    } else if (300..400).contains(&status) {
        format!("HTTP {status}: redirects are not followed")
    } else {
        // A little of the body helps the tenant see why; read no more than that.
        let mut snippet = Vec::new();
        while snippet.len() < BODY_SNIPPET_BYTES {
            match resp.chunk().await {
                Ok(Some(c)) => snippet.extend_from_slice(&c),
                _ => break,
            }
        }
        snippet.truncate(BODY_SNIPPET_BYTES);
        let text = String::from_utf8_lossy(&snippet);
        if text.trim().is_empty() {
            format!("HTTP {status}")
        } else {
            format!("HTTP {status}: {}", text.trim())
        }
    };
    Sent {
        status,
        error,
        retry_after_ms,
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    // Bounded: error chains are short, and the text is cut below anyway.
    for _ in 0..8 {
        let Some(inner) = src else { break };
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// `delay_ms` ± `jitter_pct` percent.
fn jittered(delay_ms: u64, jitter_pct: u64) -> u64 {
    let span = delay_ms.saturating_mul(jitter_pct.min(100)) / 100;
    if span == 0 {
        return delay_ms;
    }
    let r = getrandom::u64().unwrap_or(0) % (2 * span + 1);
    delay_ms - span + r
}

fn cut(mut s: String) -> String {
    crate::truncate_utf8(&mut s, ERROR_BYTES_MAX);
    s
}

/// One attempt of one delivery, recorded.
async fn attempt(outbox: &Outbox, client: &reqwest::Client, job: Job) {
    let cfg = &outbox.cfg;
    let started_ms = outbox.clock.now_ms();
    let started = Instant::now();
    let sent = send(outbox, client, &job, started_ms).await;
    let latency_ms = started.elapsed().as_millis().min(u32::MAX as u128) as u32;
    let now = outbox.clock.now_ms();
    let succeeded = (200..300).contains(&sent.status);
    let gone = sent.status == 410;
    let next_at_ms = if succeeded || gone || job.manual {
        None
    } else {
        let n = job.attempts_scheduled as usize + 1;
        cfg.retry_schedule_ms.get(n).map(|&d| {
            let mut delay = jittered(d, cfg.jitter_pct);
            if matches!(sent.status, 429 | 503) {
                if let Some(ra) = sent.retry_after_ms {
                    delay = delay.max(ra.min(cfg.retry_after_max_ms));
                }
            }
            now.saturating_add(delay)
        })
    };
    let record = WebhookRecord::Attempted {
        delivery: job.delivery,
        attempt: Attempt {
            at_ms: started_ms,
            status: sent.status,
            latency_ms,
            error: cut(sent.error),
            next_at_ms,
            manual: job.manual,
        },
    };
    let mut st = outbox.lock();
    // A refused append (poisoned log) leaves the delivery pending: it is attempted again
    // after a restart, which is what at-least-once allows.
    if outbox.append(&mut st, record).is_ok() && !succeeded {
        let endpoint = st
            .endpoint_by_seq(job.endpoint_seq)
            .filter(|e| e.enabled)
            .map(|e| (e.id, e.failing_since_ms));
        if let Some((id, failing_since)) = endpoint {
            let reason = if gone {
                Some("the receiver answered 410 Gone".to_owned())
            } else {
                failing_since
                    .filter(|&since| now.saturating_sub(since) >= cfg.disable_after_ms)
                    .map(|since| {
                        format!(
                            "failing since {} without a success",
                            crate::api::json::rfc3339(since)
                        )
                    })
            };
            if let Some(reason) = reason {
                tracing::warn!(endpoint = %id, %reason, "webhook endpoint disabled");
                let _ = outbox.append(
                    &mut st,
                    WebhookRecord::EndpointUpdated {
                        endpoint: id,
                        url: None,
                        events: None,
                        description: None,
                        enabled: Some(false),
                        reason: Some(reason),
                        at_ms: now,
                    },
                );
            }
        }
    }
    st.done(&job);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_its_share() {
        for _ in 0..1000 {
            let d = jittered(10_000, 10);
            assert!((9_000..=11_000).contains(&d), "{d}");
        }
        assert_eq!(jittered(0, 10), 0);
        assert_eq!(jittered(5, 0), 5);
    }

    #[test]
    fn errors_are_cut_on_a_char_boundary() {
        let s = cut("é".repeat(400));
        assert!(s.len() <= ERROR_BYTES_MAX);
        assert!(s.chars().all(|c| c == 'é'));
    }
}
