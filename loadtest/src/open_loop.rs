//! The open loop: request `i` is due at `t0 + i / rate`, whatever happened before it.
//!
//! A closed loop (send, wait, send) slows down when the server does and so hides stalls
//! ("coordinated omission"); here the schedule never waits for answers. Latency is
//! measured from the *intended* start, so a request that could not even be sent on time
//! (the in-flight bound, a busy client) carries that delay too; the service time from the
//! actual send is recorded beside it. Bounded: `requests_max`, the duration, and at most
//! `inflight_max` requests in flight (when reached, sending waits, and the wait shows in
//! the latency).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::funding::{Books, Funding};
use crate::mix::{request, Mix, Op};
use crate::provision::Tenant;
use crate::report::{Recorder, Summary};

/// Longest run.
pub const DURATION_MAX: Duration = Duration::from_secs(3600);
/// Most requests in one run.
pub const REQUESTS_MAX: u64 = 100_000_000;

/// One run's shape.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Requests per second offered.
    pub rate: f64,
    /// How long requests are started for.
    pub duration: Duration,
    /// At most this many requests.
    pub requests_max: u64,
    /// At most this many in flight.
    pub inflight_max: usize,
    /// Seed of the op and tenant choices.
    pub seed: u64,
    /// How top-ups are sized.
    pub funding: Funding,
    /// Charges and top-ups so far (shared by every run of one `loadtest` invocation).
    pub books: Arc<Books>,
}

/// xorshift64*: op and tenant choices, reproducible from the seed.
pub fn next(seed: &mut u64) -> u64 {
    let mut x = *seed;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *seed = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

fn outcome_of(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "error: timeout"
    } else if e.is_connect() {
        "error: connect"
    } else {
        "error: other"
    }
}

/// Runs the schedule against `base` and returns what was measured.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    http: &reqwest::Client,
    base: &str,
    admin: &str,
    tenants: Arc<Vec<Tenant>>,
    mix: &Mix,
    cfg: &RunConfig,
    run_id: &str,
) -> Summary {
    assert!(cfg.rate > 0.0 && !tenants.is_empty() && cfg.inflight_max > 0);
    let duration = cfg.duration.min(DURATION_MAX);
    let planned = (cfg.rate * duration.as_secs_f64()).floor() as u64;
    let total = planned.min(cfg.requests_max).min(REQUESTS_MAX);
    let rec = Arc::new(Mutex::new(Recorder::default()));
    let inflight = Arc::new(tokio::sync::Semaphore::new(cfg.inflight_max));
    let mut seed = cfg.seed | 1;
    let t0 = Instant::now() + Duration::from_millis(20);
    let mut sent = 0u64;
    for i in 0..total {
        let due = t0 + Duration::from_secs_f64(i as f64 / cfg.rate);
        tokio::time::sleep_until(due.into()).await;
        let Ok(permit) = Arc::clone(&inflight).acquire_owned().await else {
            break;
        };
        let op = mix.pick(next(&mut seed));
        let tenant = &tenants[(next(&mut seed) % tenants.len() as u64) as usize];
        // Steady funding: this top-up adds back what the tenant's creations were charged
        // since its last one (at least 1 credit: a top-up is always a real write).
        let steady = cfg.funding == Funding::Steady;
        let owed_taken = if steady && op == Op::TopUp {
            tenant.owed.swap(0, Ordering::Relaxed)
        } else {
            0
        };
        let topup_credits = owed_taken.max(1);
        let rb = request(http, base, admin, op, tenant, run_id, i, topup_credits);
        let rec = Arc::clone(&rec);
        let owed = Arc::clone(&tenant.owed);
        let books = Arc::clone(&cfg.books);
        sent += 1;
        tokio::spawn(async move {
            let at = Instant::now();
            // The answer is read to its end (a download is measured whole) and stamped
            // then, before the run's own bookkeeping, so that parsing a creation's body
            // is not server latency.
            let answer = match rb.send().await {
                Ok(r) => {
                    let status = r.status();
                    r.bytes().await.map(|body| (status, body))
                }
                Err(e) => Err(e),
            };
            let end = Instant::now();
            let mut ok = false;
            let outcome = match answer {
                Ok((status, body)) => {
                    ok = status.is_success();
                    if ok && steady && op == Op::Create {
                        let total = serde_json::from_slice::<serde_json::Value>(&body)
                            .ok()
                            .and_then(|v| v["total"].as_u64())
                            .unwrap_or(0);
                        owed.fetch_add(total, Ordering::Relaxed);
                        books.charged.fetch_add(total, Ordering::Relaxed);
                    }
                    status.as_str().to_owned()
                }
                Err(e) => outcome_of(&e).to_owned(),
            };
            if op == Op::TopUp {
                if ok {
                    books.topped_up.fetch_add(topup_credits, Ordering::Relaxed);
                } else {
                    // Not acknowledged (it may still land: then the tenant is over-funded
                    // by it, which is harmless): owed again, so the next top-up carries it.
                    owed.fetch_add(owed_taken, Ordering::Relaxed);
                }
            }
            rec.lock().expect("not poisoned").record(
                op,
                end.duration_since(due).as_micros() as u64,
                end.duration_since(at).as_micros() as u64,
                &outcome,
            );
            drop(permit);
        });
    }
    // Every request answered (or timed out): all permits back.
    let _ = inflight.acquire_many(cfg.inflight_max as u32).await;
    let elapsed_s = t0.elapsed().as_secs_f64();
    let rec = rec.lock().expect("not poisoned").clone();
    Summary {
        rate_target: cfg.rate,
        elapsed_s,
        sent,
        rec,
    }
}
