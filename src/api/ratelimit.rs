//! Per-key rate limits: GCRA from the key's plan (`governor`), and the
//! draft-ietf-httpapi-ratelimit-headers fields every authenticated response carries.
//!
//! One keyed limiter per plan (a limiter has one quota). Memory is bounded: keys whose
//! state is indistinguishable from fresh are evicted every `SWEEP_EVERY` or as soon as a
//! limiter holds more than `keys_max` keys (a key that is evicted loses nothing: a fresh
//! state is exactly what it would have had).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use crate::config::Plan;
use crate::ids::KeyId;

type Keyed = RateLimiter<KeyId, DashMapStateStore<KeyId>, DefaultClock, StateInformationMiddleware>;

/// How often stale keys are swept even when below the bound.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

struct PlanLimiter {
    limiter: Keyed,
    /// Burst (the policy's quota `q`).
    burst: u32,
    /// Sustained rate per second.
    rate_per_s: u32,
}

/// The limiters of every plan.
pub struct Limiters {
    plans: HashMap<String, PlanLimiter>,
    keys_max: usize,
    /// Milliseconds since `born` of the last sweep.
    last_sweep_ms: AtomicU64,
    born: Instant,
}

/// A decision with what the headers need.
#[derive(Debug, Clone, Copy)]
pub struct Decision {
    /// Let through.
    pub allowed: bool,
    /// Requests left in the burst.
    pub remaining: u32,
    /// Seconds until the burst is full again (or, refused, until the next request may go).
    pub reset_s: u64,
    burst: u32,
    window_s: u64,
}

impl Limiters {
    pub fn new<'a>(
        plans: impl IntoIterator<Item = (&'a String, &'a Plan)>,
        keys_max: usize,
    ) -> Self {
        let plans = plans
            .into_iter()
            .map(|(name, p)| {
                let rate = NonZeroU32::new(p.rate_per_s.max(1)).expect("at least 1");
                let burst = NonZeroU32::new(p.burst.max(1)).expect("at least 1");
                let limiter = RateLimiter::dashmap(Quota::per_second(rate).allow_burst(burst))
                    .with_middleware::<StateInformationMiddleware>();
                (
                    name.clone(),
                    PlanLimiter {
                        limiter,
                        burst: burst.get(),
                        rate_per_s: rate.get(),
                    },
                )
            })
            .collect();
        Limiters {
            plans,
            keys_max: keys_max.max(1),
            last_sweep_ms: AtomicU64::new(0),
            born: Instant::now(),
        }
    }

    /// Takes one request from `key`'s allowance on `plan`. An unknown plan (removed from
    /// the config) is not limited here: the caller refuses such tenants elsewhere.
    pub fn check(&self, plan: &str, key: KeyId) -> Option<Decision> {
        let p = self.plans.get(plan)?;
        self.maybe_sweep(p);
        let window_s = (p.burst as u64).div_ceil(p.rate_per_s as u64).max(1);
        Some(match p.limiter.check_key(&key) {
            Ok(state) => {
                let remaining = state.remaining_burst_capacity().min(p.burst);
                let reset_s = ((p.burst - remaining) as u64).div_ceil(p.rate_per_s as u64);
                Decision {
                    allowed: true,
                    remaining,
                    reset_s,
                    burst: p.burst,
                    window_s,
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(p.limiter.clock().now());
                Decision {
                    allowed: false,
                    remaining: 0,
                    reset_s: wait.as_millis().div_ceil(1000).max(1) as u64,
                    burst: p.burst,
                    window_s,
                }
            }
        })
    }

    fn maybe_sweep(&self, p: &PlanLimiter) {
        let now_ms = self.born.elapsed().as_millis() as u64;
        let last = self.last_sweep_ms.load(Ordering::Relaxed);
        let due = now_ms.saturating_sub(last) >= SWEEP_EVERY.as_millis() as u64
            || p.limiter.len() > self.keys_max;
        // One sweeper at a time, and at most one sweep per 100 ms even over the bound.
        if due
            && now_ms.saturating_sub(last) >= 100
            && self
                .last_sweep_ms
                .compare_exchange(last, now_ms, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            for pl in self.plans.values() {
                pl.limiter.retain_recent();
                pl.limiter.shrink_to_fit();
            }
        }
    }

    /// Keys tracked across plans (metrics, tests).
    pub fn keys_tracked(&self) -> usize {
        self.plans.values().map(|p| p.limiter.len()).sum()
    }
}

impl Decision {
    /// Adds `RateLimit-Policy` and `RateLimit` (and `Retry-After` when refused).
    pub fn headers(&self, h: &mut HeaderMap) {
        let policy = format!("\"default\";q={};w={}", self.burst, self.window_s);
        let state = format!("\"default\";r={};t={}", self.remaining, self.reset_s);
        if let Ok(v) = HeaderValue::from_str(&policy) {
            h.insert("ratelimit-policy", v);
        }
        if let Ok(v) = HeaderValue::from_str(&state) {
            h.insert("ratelimit", v);
        }
        if !self.allowed {
            h.insert(
                axum::http::header::RETRY_AFTER,
                HeaderValue::from(self.reset_s),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refusal_with_wait() {
        let plan = Plan {
            rate_per_s: 1,
            burst: 3,
            max_items_per_batch: 1,
            items_per_day: 1,
            concurrency: 1,
            watermark: false,
            webhooks: false,
            embed_whitelist: false,
            key_spend_caps: false,
        };
        let name = "p".to_string();
        let l = Limiters::new([(&name, &plan)], 10);
        let k = KeyId(1);
        let seen: Vec<u32> = (0..3).map(|_| l.check("p", k).unwrap().remaining).collect();
        assert_eq!(seen, vec![2, 1, 0]);
        let d = l.check("p", k).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.reset_s, 1);
        let mut h = HeaderMap::new();
        d.headers(&mut h);
        assert_eq!(h["ratelimit-policy"], "\"default\";q=3;w=3");
        assert_eq!(h["ratelimit"], "\"default\";r=0;t=1");
        assert_eq!(h["retry-after"], "1");
        // Another key is independent; an unknown plan is not limited here.
        assert!(l.check("p", KeyId(2)).unwrap().allowed);
        assert!(l.check("nope", k).is_none());
    }
}
