//! Prometheus text exposition (format 0.0.4): per-route request counts and latency
//! histograms, WAL appends/groups/fsync latency, scheduler and mailbox depths, items by
//! state, provider outcomes, and the sizes of bounded tables.
//!
//! Route metrics are lock-free atomics in a map fixed at startup (one entry per route of
//! the table), so observing a request never allocates or locks.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::http::StatusCode;

use crate::api::routes::Route;
use crate::api::AppState;

/// Histogram bounds, seconds.
const BOUNDS_S: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default)]
struct RouteMetrics {
    /// Cumulative-by-render counts per bound (+Inf is `count`).
    buckets: [AtomicU64; BOUNDS_S.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
    by_class: [AtomicU64; 5],
}

/// All counters.
pub struct Metrics {
    routes: HashMap<&'static str, RouteMetrics>,
    unmatched: AtomicU64,
}

impl Metrics {
    pub fn new(routes: &'static [Route]) -> Self {
        Metrics {
            routes: routes
                .iter()
                .map(|r| (r.label, RouteMetrics::default()))
                .collect(),
            unmatched: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, route: &Route, status: StatusCode, elapsed: Duration) {
        let Some(m) = self.routes.get(route.label) else {
            return;
        };
        let s = elapsed.as_secs_f64();
        if let Some(i) = BOUNDS_S.iter().position(|b| s <= *b) {
            m.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        m.count.fetch_add(1, Ordering::Relaxed);
        m.sum_us
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        let class = ((status.as_u16() / 100) as usize).clamp(1, 5) - 1;
        m.by_class[class].fetch_add(1, Ordering::Relaxed);
    }

    pub fn unmatched(&self) {
        self.unmatched.fetch_add(1, Ordering::Relaxed);
    }

    /// The exposition.
    pub async fn render(&self, st: &AppState) -> String {
        let mut o = String::with_capacity(16 * 1024);
        let mut labels: Vec<&&'static str> = self.routes.keys().collect();
        labels.sort();
        o.push_str("# HELP reelbatch_http_requests_total Requests by route and status class.\n");
        o.push_str("# TYPE reelbatch_http_requests_total counter\n");
        for l in &labels {
            let m = &self.routes[**l];
            for (i, c) in m.by_class.iter().enumerate() {
                let n = c.load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        o,
                        "reelbatch_http_requests_total{{route=\"{l}\",class=\"{}xx\"}} {n}",
                        i + 1
                    );
                }
            }
        }
        let _ = writeln!(
            o,
            "reelbatch_http_requests_total{{route=\"unmatched\",class=\"4xx\"}} {}",
            self.unmatched.load(Ordering::Relaxed)
        );
        o.push_str("# HELP reelbatch_http_request_duration_seconds Latency by route.\n");
        o.push_str("# TYPE reelbatch_http_request_duration_seconds histogram\n");
        for l in &labels {
            let m = &self.routes[**l];
            let count = m.count.load(Ordering::Relaxed);
            if count == 0 {
                continue;
            }
            let mut cum = 0;
            for (i, b) in BOUNDS_S.iter().enumerate() {
                cum += m.buckets[i].load(Ordering::Relaxed);
                let _ = writeln!(
                    o,
                    "reelbatch_http_request_duration_seconds_bucket{{route=\"{l}\",le=\"{b}\"}} {cum}"
                );
            }
            let _ = writeln!(
                o,
                "reelbatch_http_request_duration_seconds_bucket{{route=\"{l}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                o,
                "reelbatch_http_request_duration_seconds_sum{{route=\"{l}\"}} {}",
                m.sum_us.load(Ordering::Relaxed) as f64 / 1e6
            );
            let _ = writeln!(
                o,
                "reelbatch_http_request_duration_seconds_count{{route=\"{l}\"}} {count}"
            );
        }
        let e = &st.engine;
        let w = e.wal().stats();
        let mut gauge = |name: &str, kind: &str, help: &str, v: f64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        gauge(
            "reelbatch_wal_appends_total",
            "counter",
            "Records appended.",
            w.appends as f64,
        );
        gauge(
            "reelbatch_wal_groups_total",
            "counter",
            "Group writes (appends/groups = group size).",
            w.groups as f64,
        );
        gauge(
            "reelbatch_wal_group_size_mean",
            "gauge",
            "Mean appends per group write.",
            if w.groups == 0 {
                0.0
            } else {
                w.appends as f64 / w.groups as f64
            },
        );
        gauge(
            "reelbatch_wal_fsyncs_total",
            "counter",
            "fdatasync calls.",
            w.syncs as f64,
        );
        gauge(
            "reelbatch_wal_fsync_seconds_total",
            "counter",
            "Time inside fdatasync.",
            w.sync_nanos_total as f64 / 1e9,
        );
        gauge(
            "reelbatch_wal_fsync_seconds_max",
            "gauge",
            "Longest fdatasync.",
            w.sync_nanos_max as f64 / 1e9,
        );
        gauge(
            "reelbatch_wal_bytes_written_total",
            "counter",
            "Bytes written to the log.",
            w.bytes_written as f64,
        );
        gauge(
            "reelbatch_wal_poisoned",
            "gauge",
            "1 when the log refuses writes.",
            if e.wal().poisoned().is_some() {
                1.0
            } else {
                0.0
            },
        );
        let (archived, archive_bytes) = e.batch_archive_stats();
        gauge(
            "reelbatch_batches_archived",
            "gauge",
            "Finished batches kept in the batch archive (on disk, read on demand).",
            archived as f64,
        );
        gauge(
            "reelbatch_batch_archive_bytes",
            "gauge",
            "Bytes of valid records in the batch archive.",
            archive_bytes as f64,
        );
        let (dir_batches, dir_requests, dir_videos) = e.batch_directory_entries();
        gauge(
            "reelbatch_batch_directory_batches",
            "gauge",
            "Batches in memory (active, or finished and not archived yet).",
            dir_batches as f64,
        );
        gauge(
            "reelbatch_batch_directory_videos",
            "gauge",
            "Videos of batches in memory (archived batches' videos are in the archive index).",
            dir_videos as f64,
        );
        gauge(
            "reelbatch_batch_directory_requests",
            "gauge",
            "Request ids of batches in memory (archived ones are in the archive index).",
            dir_requests as f64,
        );
        gauge(
            "reelbatch_ledger_history_bytes",
            "gauge",
            "Bytes of valid pages in the wallets' ledger history file (filed entries, read on demand).",
            e.ledger_history_bytes() as f64,
        );
        let s = e.scheduler_stats();
        gauge(
            "reelbatch_scheduler_permits_outstanding",
            "gauge",
            "Attempts holding a permit.",
            s.outstanding as f64,
        );
        gauge(
            "reelbatch_scheduler_ready_items",
            "gauge",
            "Items waiting for a permit (the scheduler queue).",
            s.ready as f64,
        );
        gauge(
            "reelbatch_scheduler_tenants",
            "gauge",
            "Tenants with registered batches.",
            s.tenants as f64,
        );
        gauge(
            "reelbatch_wallet_mailbox_in_flight",
            "gauge",
            "Wallet commands sent and not yet done: queued in wallet mailboxes, being handled, or awaiting the log's acknowledgement.",
            e.wallet_ops_in_flight() as f64,
        );
        gauge(
            "reelbatch_webhook_deliveries_pending",
            "gauge",
            "Webhook deliveries waiting for a (next) attempt.",
            e.webhooks().pending() as f64,
        );
        gauge(
            "reelbatch_batch_anomalies_total",
            "counter",
            "Impossible wallet refusals seen by batches.",
            e.batch_anomalies() as f64,
        );
        gauge(
            "reelbatch_idempotency_keys",
            "gauge",
            "Idempotency keys remembered.",
            e.idempotency_keys() as f64,
        );
        let (runs, index_bytes) = e.response_index_stats();
        gauge(
            "reelbatch_response_index_runs",
            "gauge",
            "Runs (sorted files) in the stored-response index: about log2 of its rows below the merge cap, plus one per capped run.",
            runs as f64,
        );
        gauge(
            "reelbatch_response_index_memory_bytes",
            "gauge",
            "Memory the stored-response index holds: its runs' filters and block keys (about 1.7 bytes per filed response).",
            index_bytes as f64,
        );
        gauge(
            "reelbatch_ratelimit_keys",
            "gauge",
            "Keys tracked by the rate limiters.",
            st.limiters.keys_tracked() as f64,
        );
        gauge(
            "reelbatch_usage_buckets",
            "gauge",
            "Per-key usage buckets held (minutes, hours and days over all keys).",
            st.usage.buckets() as f64,
        );
        gauge(
            "reelbatch_access_log_entries",
            "gauge",
            "Access-log entries in memory (bounded).",
            e.access_log_entries() as f64,
        );
        gauge(
            "reelbatch_heap_live_bytes",
            "gauge",
            "Heap bytes allocated and not yet freed (resident memory less this is allocator reserve, stacks and file pages).",
            crate::heap::live_bytes() as f64,
        );
        gauge(
            "reelbatch_tenants",
            "gauge",
            "Tenants with a wallet.",
            e.tenants().len() as f64,
        );
        let caches = e.index_cache_stats();
        o.push_str("# HELP reelbatch_index_cache_bytes Resident bytes of each on-disk index's page cache (bounded).\n# TYPE reelbatch_index_cache_bytes gauge\n");
        for (index, bytes, _) in &caches {
            let _ = writeln!(
                o,
                "reelbatch_index_cache_bytes{{index=\"{index}\"}} {bytes}"
            );
        }
        o.push_str("# HELP reelbatch_index_cache_evictions_total Pages evicted from each on-disk index's page cache.\n# TYPE reelbatch_index_cache_evictions_total counter\n");
        for (index, _, evictions) in &caches {
            let _ = writeln!(
                o,
                "reelbatch_index_cache_evictions_total{{index=\"{index}\"}} {evictions}"
            );
        }
        if let Ok(c) = e.item_counts().await {
            o.push_str("# HELP reelbatch_items Items by state.\n# TYPE reelbatch_items gauge\n");
            for (state, n) in [
                ("pending", c.pending),
                ("running", c.running),
                ("succeeded", c.succeeded),
                ("failed", c.failed),
                ("canceled", c.canceled),
            ] {
                let _ = writeln!(o, "reelbatch_items{{state=\"{state}\"}} {n}");
            }
        }
        o.push_str("# HELP reelbatch_provider_attempts_total Attempts by provider and outcome.\n# TYPE reelbatch_provider_attempts_total counter\n");
        let stats = e.provider_stats();
        for (p, outcome, n, _) in &stats {
            let _ = writeln!(
                o,
                "reelbatch_provider_attempts_total{{provider=\"{p}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        o.push_str("# HELP reelbatch_provider_attempt_seconds_total Time in attempts by provider and outcome.\n# TYPE reelbatch_provider_attempt_seconds_total counter\n");
        for (p, outcome, _, us) in &stats {
            let _ = writeln!(
                o,
                "reelbatch_provider_attempt_seconds_total{{provider=\"{p}\",outcome=\"{outcome}\"}} {}",
                *us as f64 / 1e6
            );
        }
        o
    }
}
