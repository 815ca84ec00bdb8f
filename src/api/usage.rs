//! Per-key usage: requests by status class and credits committed per minute (last
//! `MINUTES_KEPT`); the same plus counts by route and latency percentiles (an HDR
//! histogram) per hour (last `HOURS_KEPT`) and per day (last `DAYS_KEPT`). The spec asks
//! for hours and days; minutes are totals for a live view, without the detail that would
//! make them the largest and longest-growing part of memory.
//!
//! In memory only: usage is operational insight, not money (money is in the ledger), so a
//! restart starts it afresh rather than costing a WAL write per request. Bounded: at most
//! `MINUTES_KEPT + HOURS_KEPT + DAYS_KEPT` buckets per key. Measured on the live heap
//! (`a_keys_usage_stays_within_its_memory_figure`): two hours of minute buckets plus two
//! hour and one day bucket over seven routes hold 15.8 KB a key. A minute bucket is 64 B
//! of totals (with route counts, as before, one held ≈ 450 B and a key 61.7 KB); an hour
//! or day bucket adds its detail, a histogram at 1 significant figure (432 `u32` counts)
//! and the route list, ≈ 2.3 KB. A key active every minute of a month holds up to
//! ≈ 120 × 0.07 + 79 × 2.4 ≈ 200 KB, most of it in day and hour buckets that arrive one
//! an hour; a fleet's usage grows by 64 B a key a minute for its first two hours, and by
//! a step each hour and day (`reelbatch_usage_buckets` counts buckets). Sharded locks
//! keep the per-request cost off a single mutex.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use axum::http::StatusCode;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::api::json::rfc3339;
use crate::ids::{KeyId, TenantId};

pub const MINUTES_KEPT: usize = 120;
pub const HOURS_KEPT: usize = 48;
pub const DAYS_KEPT: usize = 31;
const SHARDS: usize = 16;
/// Longest latency recorded (longer ones are clamped), in µs.
const LATENCY_US_MAX: u64 = 600_000_000;

struct Bucket {
    start_ms: u64,
    /// Requests by status class (1xx..5xx): the totals every granularity keeps.
    by_class: [u64; 5],
    credits: u64,
    /// Route and latency detail: hour and day buckets only. A minute bucket is 64 B of
    /// totals; with the detail one weighed ≈ 450 B, and 120 of them per key made usage
    /// the one part of memory that grew for two hours after start.
    detail: Option<Box<Detail>>,
}

/// What an hour or day bucket adds to the totals.
struct Detail {
    /// route → counts by status class, in first-use order. A key uses a handful of
    /// routes, so a short list scanned per request beats a hash map in memory.
    by_route: Vec<(&'static str, [u64; 5])>,
    latency_us: Histogram<u32>,
}

impl Bucket {
    fn new(start_ms: u64, detailed: bool) -> Self {
        Bucket {
            start_ms,
            by_class: [0; 5],
            credits: 0,
            detail: detailed.then(|| {
                Box::new(Detail {
                    by_route: Vec::new(),
                    latency_us: Histogram::new_with_bounds(1, LATENCY_US_MAX, 1)
                        .expect("valid bounds"),
                })
            }),
        }
    }

    fn requests(&self) -> u64 {
        self.by_class.iter().sum()
    }

    fn add(&mut self, route: &'static str, class: usize, latency_us: u64, credits: u64) {
        self.by_class[class] += 1;
        self.credits = self.credits.saturating_add(credits);
        let Some(d) = &mut self.detail else { return };
        // Bounded by the routes there are (a few dozen); usually a handful.
        match d.by_route.iter_mut().find(|(r, _)| *r == route) {
            Some((_, counts)) => counts[class] += 1,
            None => {
                let mut counts = [0; 5];
                counts[class] = 1;
                d.by_route.push((route, counts));
            }
        }
        d.latency_us
            .saturating_record(latency_us.clamp(1, LATENCY_US_MAX));
    }

    fn json(&self, key: KeyId) -> Value {
        // Minute buckets carry no detail: `by_route` and `latency_ms` are null there.
        let (routes, latency) = match &self.detail {
            None => (None, None),
            Some(d) => {
                let mut by_name: Vec<&(&'static str, [u64; 5])> = d.by_route.iter().collect();
                by_name.sort_by_key(|(r, _)| *r);
                let routes: serde_json::Map<String, Value> = by_name
                    .into_iter()
                    .map(|(r, c)| ((*r).to_owned(), class_json(c)))
                    .collect();
                let h = &d.latency_us;
                let ms = |us: u64| us as f64 / 1000.0;
                let latency = (!h.is_empty()).then(|| {
                    json!({
                        "p50": ms(h.value_at_quantile(0.5)),
                        "p90": ms(h.value_at_quantile(0.9)),
                        "p99": ms(h.value_at_quantile(0.99)),
                        "max": ms(h.max()),
                    })
                });
                (Some(routes), latency)
            }
        };
        json!({
            "key_id": key.to_string(),
            "start": rfc3339(self.start_ms),
            "requests": self.requests(),
            "by_status_class": class_json(&self.by_class),
            "by_route": routes,
            "credits": self.credits,
            "latency_ms": latency,
        })
    }
}

fn class_json(c: &[u64; 5]) -> Value {
    json!({"1xx": c[0], "2xx": c[1], "3xx": c[2], "4xx": c[3], "5xx": c[4]})
}

struct KeyUsage {
    tenant: TenantId,
    minutes: VecDeque<Bucket>,
    hours: VecDeque<Bucket>,
    days: VecDeque<Bucket>,
}

fn bump(q: &mut VecDeque<Bucket>, start_ms: u64, keep: usize, detailed: bool) -> &mut Bucket {
    if q.back().is_none_or(|b| b.start_ms < start_ms) {
        // The closed bucket gets no new routes: give back its list's spare room.
        if let Some(d) = q.back_mut().and_then(|b| b.detail.as_mut()) {
            d.by_route.shrink_to_fit();
        }
        q.push_back(Bucket::new(start_ms, detailed));
        while q.len() > keep {
            q.pop_front();
        }
    }
    // A clock step backwards lands in the newest bucket rather than reordering them.
    q.back_mut().expect("just ensured")
}

/// All keys' usage.
pub struct Usage {
    shards: Vec<Mutex<HashMap<KeyId, KeyUsage>>>,
}

impl Default for Usage {
    fn default() -> Self {
        Self::new()
    }
}

impl Usage {
    pub fn new() -> Self {
        Usage {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, key: KeyId) -> &Mutex<HashMap<KeyId, KeyUsage>> {
        &self.shards[(key.0 % SHARDS as u128) as usize]
    }

    /// Counts one request.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        key: KeyId,
        tenant: TenantId,
        route: &'static str,
        status: StatusCode,
        latency: Duration,
        credits: u64,
        now_ms: u64,
    ) {
        let class = ((status.as_u16() / 100) as usize).clamp(1, 5) - 1;
        let us = latency.as_micros().min(u64::MAX as u128) as u64;
        let mut m = self.shard(key).lock().expect("not poisoned");
        let u = m.entry(key).or_insert_with(|| KeyUsage {
            tenant,
            minutes: VecDeque::new(),
            hours: VecDeque::new(),
            days: VecDeque::new(),
        });
        bump(
            &mut u.minutes,
            now_ms / 60_000 * 60_000,
            MINUTES_KEPT,
            false,
        )
        .add(route, class, us, credits);
        bump(
            &mut u.hours,
            now_ms / 3_600_000 * 3_600_000,
            HOURS_KEPT,
            true,
        )
        .add(route, class, us, credits);
        bump(
            &mut u.days,
            now_ms / 86_400_000 * 86_400_000,
            DAYS_KEPT,
            true,
        )
        .add(route, class, us, credits);
    }

    /// The tenant's buckets in `[from_ms, to_ms)` (by bucket start), per key.
    pub fn query(
        &self,
        tenant: TenantId,
        key: Option<KeyId>,
        granularity: Granularity,
        from_ms: u64,
        to_ms: u64,
    ) -> Value {
        let mut data = Vec::new();
        for shard in &self.shards {
            let m = shard.lock().expect("not poisoned");
            for (k, u) in m.iter() {
                if u.tenant != tenant || key.is_some_and(|want| want != *k) {
                    continue;
                }
                let q = match granularity {
                    Granularity::Minute => &u.minutes,
                    Granularity::Hour => &u.hours,
                    Granularity::Day => &u.days,
                };
                for b in q
                    .iter()
                    .filter(|b| b.start_ms >= from_ms && b.start_ms < to_ms)
                {
                    data.push((b.start_ms, *k, b.json(*k)));
                }
            }
        }
        data.sort_by_key(|(s, k, _)| (*s, *k));
        json!({
            "object": "usage",
            "granularity": granularity.as_str(),
            "from": rfc3339(from_ms),
            "to": rfc3339(to_ms),
            "data": data.into_iter().map(|(_, _, v)| v).collect::<Vec<_>>(),
        })
    }

    /// Buckets held, over every key and granularity (metrics: usage memory is this times
    /// a bucket's size, up to `MINUTES_KEPT + HOURS_KEPT + DAYS_KEPT` per key).
    pub fn buckets(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let m = s.lock().expect("not poisoned");
                m.values()
                    .map(|u| u.minutes.len() + u.hours.len() + u.days.len())
                    .sum::<usize>()
            })
            .sum()
    }

    /// Top tenants (by requests) and routes over the last `window_ms` (hour buckets).
    pub fn top(&self, now_ms: u64, window_ms: u64, limit: usize) -> Value {
        let since = (now_ms.saturating_sub(window_ms)) / 3_600_000 * 3_600_000;
        let mut tenants: HashMap<TenantId, (u64, u64, u64)> = HashMap::new();
        let mut routes: HashMap<&'static str, [u64; 5]> = HashMap::new();
        for shard in &self.shards {
            let m = shard.lock().expect("not poisoned");
            for u in m.values() {
                for b in u.hours.iter().filter(|b| b.start_ms >= since) {
                    let t = tenants.entry(u.tenant).or_default();
                    t.0 += b.requests();
                    t.1 = t.1.saturating_add(b.credits);
                    t.2 += b.by_class[3] + b.by_class[4];
                    for (r, c) in b.detail.iter().flat_map(|d| &d.by_route) {
                        let e = routes.entry(r).or_insert([0; 5]);
                        for i in 0..5 {
                            e[i] += c[i];
                        }
                    }
                }
            }
        }
        let mut t: Vec<(TenantId, (u64, u64, u64))> = tenants.into_iter().collect();
        t.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then(a.0.cmp(&b.0)));
        t.truncate(limit);
        let mut r: Vec<(&'static str, [u64; 5])> = routes.into_iter().collect();
        r.sort_by(|a, b| {
            b.1.iter()
                .sum::<u64>()
                .cmp(&a.1.iter().sum::<u64>())
                .then(a.0.cmp(b.0))
        });
        r.truncate(limit);
        json!({
            "object": "usage_top",
            "since": rfc3339(since),
            "tenants": t.iter().map(|(id, (req, cr, err))| json!({
                "tenant_id": id.to_string(), "requests": req, "credits": cr, "errors": err,
            })).collect::<Vec<_>>(),
            "routes": r.iter().map(|(name, c)| json!({
                "route": name, "requests": c.iter().sum::<u64>(), "by_status_class": class_json(c),
            })).collect::<Vec<_>>(),
        })
    }
}

/// Bucket size of a usage query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Minute,
    Hour,
    Day,
}

impl Granularity {
    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Minute => "minute",
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a key's two hours of minute buckets cost, measured on the live heap: 1,000
    /// keys each calling the soak mix's seven routes every minute for `MINUTES_KEPT`
    /// minutes (two hour buckets and one day bucket each as well). The bound (100 B a minute
    /// bucket, 2.5 KB an hour or day bucket) is what the module's memory figures promise:
    /// 15,800 B a key measured (61,736 B when minute buckets kept route counts). Other
    /// tests would allocate meanwhile in this process (they added 30 MB in CI), so the
    /// measurement runs in a process of its own that runs only this test.
    #[test]
    fn a_keys_usage_stays_within_its_memory_figure() {
        const ALONE: &str = "REELBATCH_USAGE_MEASURE_ALONE";
        const NAME: &str = "api::usage::tests::a_keys_usage_stays_within_its_memory_figure";
        if std::env::var_os(ALONE).is_none() {
            let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
                .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
                .env(ALONE, "1")
                .output()
                .expect("the test binary runs");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "{text}");
            // It ran (a filter matching nothing would pass too).
            assert!(text.contains("1 passed"), "{text}");
            for line in text.lines().filter(|l| l.starts_with("usage: ")) {
                eprintln!("{line}");
            }
            return;
        }
        const KEYS: u128 = 1_000;
        let routes = [
            "GET /v1/wallet",
            "GET /v1/batches/{id}",
            "GET /v1/batches/{id}/items",
            "GET /v1/ledger",
            "GET /v1/videos/{id}/content",
            "POST /v1/quotes",
            "POST /v1/batches",
        ];
        let u = Usage::new();
        let before = crate::heap::live_bytes();
        for minute in 0..MINUTES_KEPT as u64 {
            for k in 0..KEYS {
                for r in routes {
                    u.record(
                        KeyId(k),
                        TenantId(1),
                        r,
                        StatusCode::OK,
                        Duration::from_millis(2),
                        1,
                        1 + minute * 60_000,
                    );
                }
            }
        }
        let grown = crate::heap::live_bytes().saturating_sub(before);
        // What the module's memory figures promise.
        const MINUTE_BUCKET_BYTES_MAX: u64 = 100;
        const DETAILED_BUCKET_BYTES_MAX: u64 = 2_500;
        assert_eq!(u.buckets(), KEYS as usize * (MINUTES_KEPT + 3));
        let per_key = grown / KEYS as u64;
        eprintln!("usage: {per_key} B a key ({MINUTES_KEPT} minute buckets, 3 with histograms)");
        let bound = MINUTES_KEPT as u64 * MINUTE_BUCKET_BYTES_MAX + 3 * DETAILED_BUCKET_BYTES_MAX;
        assert!(per_key <= bound, "{per_key} B a key, bound {bound}");
        // And it is really held (the count is not missing the buckets).
        assert!(per_key >= MINUTES_KEPT as u64 * 64, "{per_key} B a key");
    }

    /// Minute buckets keep totals (requests, status classes, credits); the route and
    /// latency detail of the same requests is in the hour bucket.
    #[test]
    fn minute_buckets_hold_totals_and_hours_the_detail() {
        let u = Usage::new();
        let (k, t) = (KeyId(3), TenantId(1));
        let at = 10 * 3_600_000 + 5 * 60_000;
        for (route, status, credits) in [
            ("GET /v1/wallet", StatusCode::OK, 0),
            ("POST /v1/batches", StatusCode::CREATED, 25),
            ("POST /v1/batches", StatusCode::TOO_MANY_REQUESTS, 0),
        ] {
            u.record(k, t, route, status, Duration::from_millis(3), credits, at);
        }
        let m = u.query(t, None, Granularity::Minute, 0, u64::MAX);
        let m = &m["data"][0];
        assert_eq!(m["requests"], 3);
        assert_eq!(m["by_status_class"]["2xx"], 2);
        assert_eq!(m["by_status_class"]["4xx"], 1);
        assert_eq!(m["credits"], 25);
        assert_eq!(m["start"], rfc3339(10 * 3_600_000 + 5 * 60_000));
        assert!(m["by_route"].is_null() && m["latency_ms"].is_null(), "{m}");
        let h = u.query(t, None, Granularity::Hour, 0, u64::MAX);
        let h = &h["data"][0];
        assert_eq!(h["requests"], 3);
        assert_eq!(h["by_route"]["POST /v1/batches"]["4xx"], 1);
        assert_eq!(h["by_route"]["POST /v1/batches"]["2xx"], 1);
        assert_eq!(h["by_route"]["GET /v1/wallet"]["2xx"], 1);
        assert!(h["latency_ms"]["p50"].as_f64().unwrap() >= 2.0, "{h}");
    }

    #[test]
    fn buckets_roll_and_stay_bounded() {
        let u = Usage::new();
        let (k, t) = (KeyId(7), TenantId(1));
        let h = 3_600_000;
        for i in 0..(HOURS_KEPT as u64 + 5) {
            u.record(
                k,
                t,
                "GET /v1/wallet",
                StatusCode::OK,
                Duration::from_millis(2),
                0,
                i * h,
            );
        }
        u.record(
            k,
            t,
            "POST /v1/batches",
            StatusCode::CREATED,
            Duration::from_millis(9),
            40,
            60 * h,
        );
        u.record(
            k,
            t,
            "POST /v1/batches",
            StatusCode::PAYMENT_REQUIRED,
            Duration::from_millis(1),
            0,
            60 * h,
        );
        let v = u.query(t, None, Granularity::Hour, 0, u64::MAX);
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len(), HOURS_KEPT, "old hours are dropped");
        let last = data.last().unwrap();
        assert_eq!(last["requests"], 2);
        assert_eq!(last["credits"], 40);
        assert_eq!(last["by_route"]["POST /v1/batches"]["4xx"], 1);
        assert!(last["latency_ms"]["p99"].as_f64().unwrap() >= 8.0);
        assert_eq!(
            u.query(TenantId(2), None, Granularity::Day, 0, u64::MAX)["data"]
                .as_array()
                .unwrap()
                .len(),
            0
        );
        let top = u.top(60 * h, h, 10);
        assert_eq!(top["tenants"][0]["requests"], 2);
        assert_eq!(top["tenants"][0]["errors"], 1);
    }
}
