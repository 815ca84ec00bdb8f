//! Batch engine benchmark (issue 4): items per second end to end — hold, run on the
//! simulated provider with zero latency, store every output, settle — beside the
//! wallet-only rate in the same run.
//!
//! Run: `cargo bench --bench batch` (env `BENCH_ITEMS` items per measured run, default
//! 40000, spread over `BENCH_TENANTS` tenants, default 4, as batches of up to 10,000;
//! `BENCH_DIR` scratch directory on the disk under test, default `target/bench-scratch`).
//!
//! Runs, each on a fresh data directory:
//! 1. baseline, wallet only (`sync`): 256 callers settling items of held batches — the
//!    money work one item needs, without the batch machinery;
//! 2. end to end (`sync`, outputs to a local directory store): create the batches, wait
//!    until every one is finished; items/s = items / (last finish − first create);
//! 3. end to end with durability `none` and an in-memory store: the engine's CPU ceiling.
//!
//! Each end-to-end item is three WAL records (`Submitted`, `Succeeded`, the wallet's
//! `Settled`) plus a GIF render and a store put; the report prints WAL appends, bytes and
//! fsyncs per item, and process CPU seconds per 1,000 items.

mod common;
use common::{runtime, scratch};

use std::path::PathBuf;
use std::time::Instant;

use hdrhistogram::Histogram;
use reelbatch::engine::batch::pricing::Params;
use reelbatch::engine::batch::state::BatchStatus;
use reelbatch::engine::batch::{BatchRequest, PlanLimits};
use reelbatch::engine::wallet::state::{GrantKind, WalletCommand};
use reelbatch::engine::{Engine, EngineConfig};
use reelbatch::ids::{BatchId, TenantId};
use reelbatch::providers::simulated::SimConfig;
use reelbatch::providers::Registry;

const CALLERS: usize = 256;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// User + system CPU seconds of this process so far.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which may contain spaces) start after ") ".
    let rest = &stat[stat.rfind(") ").unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn config(
    dir: PathBuf,
    durability: wal::Durability,
    store_url: &str,
    store_fsync: bool,
) -> EngineConfig {
    let mut cfg = EngineConfig::new(dir);
    cfg.durability = durability;
    cfg.snapshot_every_events = u64::MAX;
    cfg.snapshot_every_ms = u64::MAX;
    cfg.batch.providers = Registry::simulated(
        SimConfig {
            latency_ms: (0, 0),
            transient_failure_rate: 0.0,
            permanent_failure_rate: 0.0,
            ..SimConfig::default()
        },
        4_096,
    );
    cfg.batch.store_url = store_url.to_string();
    cfg.batch.store_fsync = store_fsync;
    cfg
}

struct Run {
    name: String,
    items: u64,
    elapsed: f64,
    cpu: f64,
    appends_per_item: f64,
    bytes_per_item: f64,
    syncs_per_item: f64,
    latency: Option<Histogram<u64>>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.items as f64 / self.elapsed
    }
    fn print(&self) {
        print!(
            "{:<58} {:>9.0} items/s  {:>5.2} CPU s/1k items  {:>4.1} appends, {:>6.1} WAL B, {:>5.3} fsyncs per item",
            self.name,
            self.rate(),
            self.cpu / self.items as f64 * 1000.0,
            self.appends_per_item,
            self.bytes_per_item,
            self.syncs_per_item,
        );
        if let Some(h) = &self.latency {
            print!(
                "  settle p50 {:.1} us p99 {:.1} us",
                h.value_at_quantile(0.5) as f64 / 1000.0,
                h.value_at_quantile(0.99) as f64 / 1000.0
            );
        }
        println!();
    }
}

fn per_item(engine: &Engine, before: wal::Stats, items: u64) -> (f64, f64, f64) {
    let s = engine.wal().stats();
    let n = items.max(1) as f64;
    (
        (s.appends - before.appends) as f64 / n,
        (s.bytes_written - before.bytes_written) as f64 / n,
        (s.syncs - before.syncs) as f64 / n,
    )
}

/// Baseline: the wallet work of `items` items (one settle each) from 256 callers.
fn wallet_only(items: u64) -> Run {
    let (engine, _) =
        Engine::open(config(scratch(), wal::Durability::Sync, "memory://", false)).unwrap();
    let rt = runtime();
    let per_batch = 10_000u64;
    let batches = items.div_ceil(per_batch);
    let tenant = TenantId(1);
    rt.block_on(async {
        engine.open_wallet(tenant).await.unwrap();
        engine
            .execute(
                tenant,
                WalletCommand::Grant {
                    request_id: "setup".into(),
                    kind: GrantKind::Paid,
                    amount: 1 << 50,
                    expires_at_ms: None,
                },
            )
            .await
            .unwrap();
        for b in 0..batches {
            engine
                .execute(
                    tenant,
                    WalletCommand::Hold {
                        batch: BatchId(b as u128 + 1),
                        amount: per_batch * 40,
                    },
                )
                .await
                .unwrap();
        }
    });
    let before = engine.wal().stats();
    let cpu0 = cpu_secs();
    let start = Instant::now();
    let hist = rt.block_on(async {
        let tasks: Vec<_> = (0..CALLERS as u64)
            .map(|c| {
                let engine = engine.clone();
                tokio::spawn(async move {
                    let mut h = Histogram::<u64>::new(3).unwrap();
                    let mut i = c;
                    while i < items {
                        let t0 = Instant::now();
                        engine
                            .execute(
                                tenant,
                                WalletCommand::Settle {
                                    batch: BatchId((i / per_batch) as u128 + 1),
                                    item: (i % per_batch) as u32,
                                    amount: 40,
                                },
                            )
                            .await
                            .unwrap();
                        h.record(t0.elapsed().as_nanos() as u64).unwrap();
                        i += CALLERS as u64;
                    }
                    h
                })
            })
            .collect();
        let mut all = Histogram::<u64>::new(3).unwrap();
        for t in tasks {
            all.add(t.await.unwrap()).unwrap();
        }
        all
    });
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_secs() - cpu0;
    let (appends, bytes, syncs) = per_item(&engine, before, items);
    rt.block_on(engine.shutdown(false)).unwrap();
    Run {
        name: "baseline: wallet only, one settle per item (sync)".into(),
        items,
        elapsed,
        cpu,
        appends_per_item: appends,
        bytes_per_item: bytes,
        syncs_per_item: syncs,
        latency: Some(hist),
    }
}

/// End to end: `items` over `tenants` tenants in batches of ≤ 10,000.
fn end_to_end(
    name: &str,
    items: u64,
    tenants: u64,
    durability: wal::Durability,
    store: &str,
    store_fsync: bool,
) -> Run {
    let dir = scratch();
    let (engine, _) = Engine::open(config(dir, durability, store, store_fsync)).unwrap();
    let rt = runtime();
    let plan = PlanLimits {
        max_items_per_batch: 10_000,
        concurrency: 1_024,
        watermark: false,
        items_per_day: u64::MAX,
    };
    let per_tenant = items / tenants;
    let tenant_ids: Vec<TenantId> = (1..=tenants).map(|t| TenantId(t as u128)).collect();
    rt.block_on(async {
        for t in &tenant_ids {
            engine.open_wallet(*t).await.unwrap();
            engine
                .execute(
                    *t,
                    WalletCommand::Grant {
                        request_id: "setup".into(),
                        kind: GrantKind::Paid,
                        amount: 1 << 50,
                        expires_at_ms: None,
                    },
                )
                .await
                .unwrap();
        }
    });
    let before = engine.wal().stats();
    let cpu0 = cpu_secs();
    let start = Instant::now();
    let total: u64 = rt.block_on(async {
        let mut created = Vec::new();
        for t in &tenant_ids {
            let mut left = per_tenant;
            let mut k = 0;
            while left > 0 {
                let n = left.min(10_000);
                left -= n;
                // n = 100 × (n / 100) prompts: two variables, so the template is real.
                let a = 100.min(n);
                let b = n / a;
                let req = BatchRequest {
                    template: format!("shot {{a}} of scene {{b}} ({t} #{k})"),
                    variables: vec![
                        ("a".into(), (0..a).map(|i| format!("a{i}")).collect()),
                        ("b".into(), (0..b).map(|i| format!("b{i}")).collect()),
                    ],
                    params: Params::default(),
                    request_id: None,
                    expires_in_s: None,
                    api_key: None,
                    key_daily_credit_limit: None,
                };
                k += 1;
                created.push((*t, engine.create_batch(*t, &req, &plan).await.unwrap()));
            }
        }
        let mut total = 0u64;
        for (t, v) in created {
            let done = engine.wait_batch(t, v.id).await.unwrap();
            assert_eq!(done.status, BatchStatus::Completed, "{done:?}");
            assert_eq!(done.settled, done.counts.total as u64 * done.unit_price);
            total += done.counts.total as u64;
        }
        total
    });
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_secs() - cpu0;
    let (appends, bytes, syncs) = per_item(&engine, before, total);
    rt.block_on(async {
        engine.check_invariants().await.unwrap();
        engine.shutdown(false).await.unwrap();
    });
    Run {
        name: name.to_string(),
        items: total,
        elapsed,
        cpu,
        appends_per_item: appends,
        bytes_per_item: bytes,
        syncs_per_item: syncs,
        latency: None,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this with no filter too:
    // keep that run tiny so the test suite stays fast.
    let quick = std::env::args().all(|a| a != "--bench");
    let items = if quick {
        2_000
    } else {
        env_u64("BENCH_ITEMS", 40_000)
    };
    let tenants = env_u64("BENCH_TENANTS", 4).max(1);
    println!(
        "batch benchmark: {items} items over {tenants} tenants, zero-latency simulated provider, 2-worker runtime"
    );
    let base = wallet_only(items);
    base.print();
    let sync = end_to_end(
        "end to end (sync, local store, files fsynced)",
        items,
        tenants,
        wal::Durability::Sync,
        "",
        true,
    );
    sync.print();
    let sync_nofsync = end_to_end(
        "end to end (sync, local store, files not fsynced)",
        items,
        tenants,
        wal::Durability::Sync,
        "",
        false,
    );
    sync_nofsync.print();
    let none = end_to_end(
        "end to end (durability none, memory store: CPU ceiling)",
        items,
        tenants,
        wal::Durability::None,
        "memory://",
        false,
    );
    none.print();
    println!(
        "ratios: end-to-end sync / wallet-only = {:.3}; files not fsynced / fsynced = {:.2}; none / sync = {:.2}",
        sync.rate() / base.rate(),
        sync_nofsync.rate() / sync.rate(),
        none.rate() / sync.rate()
    );
}
