//! Wallet engine benchmark (issue 3), in one run beside a raw-WAL baseline.
//!
//! Run: `cargo bench --bench wallet` (env `BENCH_SECS` per measurement, default 3;
//! `BENCH_DIR` scratch directory on the disk under test, default `target/bench-scratch`;
//! `BENCH_IDLE_TENANTS`, default 100000; `BENCH_ARBITERS` overrides the arbiter count,
//! default one per core; `BENCH_ONLY`, a comma-separated subset of
//! `idle,baseline,pattern,spread,hot,none`, runs only those phases — for profiling one phase).
//!
//! Measures, with 256 concurrent callers (tokio tasks on a 2-worker runtime):
//! 1. the baselines: raw WAL appends (`sync`) of the wallet's mean record size; the bare
//!    actor pattern over 10,000 tenants (an actor per tenant that only appends and hands
//!    back durability), as a reply plus a durability handle, and with the caller's
//!    ticket (the shape the engine uses) — the ceilings the wallet logic sits on;
//! 2. durable hold+settle pairs spread over 10,000 tenants (`sync`);
//! 3. the same on one hot tenant (`sync`);
//! 4. the same over 10,000 tenants with durability `none` (the engine's CPU ceiling);
//!
//! and memory per idle tenant: resident set growth after opening N wallets with one
//! top-up each, divided by N. Each operation (a hold, a settle) counts as one op; latency
//! is per operation, from the call to its acknowledgement.

mod common;
use common::{runtime, scratch};

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use reelbatch::engine::wallet::state::{GrantKind, WalletCommand};
use reelbatch::engine::{Engine, EngineConfig};
use reelbatch::ids::{BatchId, TenantId};

const CALLERS: usize = 256;

fn secs() -> Duration {
    common::bench_secs(3.0)
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

struct Run {
    name: String,
    ops: u64,
    elapsed: f64,
    hist: Histogram<u64>,
    wal_bytes_per_op: f64,
}

impl Run {
    fn print(&self) {
        println!(
            "{:<48} {:>10.0} ops/s  p50 {:>8.1} us  p99 {:>8.1} us  {:>6.1} WAL bytes/op",
            self.name,
            self.ops as f64 / self.elapsed,
            self.hist.value_at_quantile(0.5) as f64 / 1000.0,
            self.hist.value_at_quantile(0.99) as f64 / 1000.0,
            self.wal_bytes_per_op
        );
    }
    fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed
    }
}

/// Runs `CALLERS` tasks until the deadline; each returns (operations, latency histogram).
/// Returns the total operations, the merged histogram and the elapsed seconds.
fn drive<F, Fut>(rt: &tokio::runtime::Runtime, caller: F) -> (u64, Histogram<u64>, f64)
where
    F: Fn(usize, Instant) -> Fut,
    Fut: std::future::Future<Output = (u64, Histogram<u64>)> + Send + 'static,
{
    rt.block_on(async {
        let deadline = Instant::now() + secs();
        let start = Instant::now();
        let tasks: Vec<_> = (0..CALLERS)
            .map(|c| tokio::spawn(caller(c, deadline)))
            .collect();
        let mut hist = Histogram::<u64>::new(3).unwrap();
        let mut ops = 0;
        for t in tasks {
            let (n, h) = t.await.unwrap();
            ops += n;
            hist.add(h).unwrap();
        }
        (ops, hist, start.elapsed().as_secs_f64())
    })
}

fn wal_baseline(dir: &std::path::Path, payload_len: usize) -> Run {
    let (wal, _) = wal::Wal::open(dir.join("baseline"), wal::Options::default()).unwrap();
    let rt = runtime();
    let payload = vec![0x42u8; payload_len];
    let (ops, hist, elapsed) = drive(&rt, |_, deadline| {
        let wal = wal.clone();
        let payload = payload.clone();
        async move {
            let mut h = Histogram::<u64>::new(3).unwrap();
            let mut n = 0u64;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                wal.append(&payload).unwrap().await.unwrap();
                h.record(t0.elapsed().as_nanos() as u64).unwrap();
                n += 1;
            }
            (n, h)
        }
    });
    let bytes = wal.stats().bytes_written as f64 / ops.max(1) as f64;
    Run {
        name: format!("baseline: raw WAL appends of {payload_len} B (sync)"),
        ops,
        elapsed,
        hist,
        wal_bytes_per_op: bytes,
    }
}

/// Opens wallets 1..=`tenants` and gives each one top-up, from 256 concurrent tasks.
fn open_and_grant(
    rt: &tokio::runtime::Runtime,
    engine: &Engine,
    tenants: u128,
    kind: GrantKind,
    amount: u64,
) {
    rt.block_on(async {
        let tasks: Vec<_> = (0..CALLERS as u128)
            .map(|c| {
                let engine = engine.clone();
                tokio::spawn(async move {
                    let mut t = c;
                    while t < tenants {
                        let tenant = TenantId(t + 1);
                        engine.open_wallet(tenant).await.unwrap();
                        engine
                            .execute(
                                tenant,
                                WalletCommand::Grant {
                                    request_id: "setup".into(),
                                    kind,
                                    amount,
                                    expires_at_ms: None,
                                },
                            )
                            .await
                            .unwrap();
                        t += CALLERS as u128;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
}

/// 256 callers doing hold+settle pairs over `tenants` tenants.
fn hold_settle(
    dir: &std::path::Path,
    name: &str,
    tenants: u128,
    durability: wal::Durability,
) -> Run {
    let mut cfg = EngineConfig::new(dir.join(name.replace([' ', ','], "-")));
    cfg.durability = durability;
    if let Some(n) = std::env::var("BENCH_ARBITERS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        cfg.arbiters = n;
    }
    cfg.snapshot_every_events = u64::MAX;
    cfg.snapshot_every_ms = u64::MAX;
    let (engine, _) = Engine::open(cfg).unwrap();
    let rt = runtime();
    open_and_grant(&rt, &engine, tenants, GrantKind::Paid, 1 << 50);
    let stats_before = engine.wal().stats();
    let (ops, hist, elapsed) = drive(&rt, |c, deadline| {
        let engine = engine.clone();
        async move {
            let mut h = Histogram::<u64>::new(3).unwrap();
            let mut n = 0u64;
            let mut k = 0u128;
            while Instant::now() < deadline {
                let tenant = TenantId((c as u128 + k * CALLERS as u128) % tenants + 1);
                let batch = BatchId(((c as u128) << 64) | k);
                k += 1;
                let t0 = Instant::now();
                engine
                    .execute(tenant, WalletCommand::Hold { batch, amount: 10 })
                    .await
                    .unwrap();
                let t1 = Instant::now();
                let settle = WalletCommand::Settle {
                    batch,
                    item: 0,
                    amount: 10,
                };
                engine.execute(tenant, settle).await.unwrap();
                h.record((t1 - t0).as_nanos() as u64).unwrap();
                h.record(t1.elapsed().as_nanos() as u64).unwrap();
                n += 2;
            }
            (n, h)
        }
    });
    let stats = engine.wal().stats();
    let bytes = (stats.bytes_written - stats_before.bytes_written) as f64
        / (stats.appends - stats_before.appends).max(1) as f64;
    rt.block_on(async {
        engine.check_invariants().await.unwrap();
        engine.shutdown(false).await.unwrap();
    });
    Run {
        name: name.to_string(),
        ops,
        elapsed,
        hist,
        wal_bytes_per_op: bytes,
    }
}

/// The design's bare pattern, as the ceiling the wallet sits on: one actix actor per
/// tenant over one arbiter per core; the handler appends a fixed record of the wallet's
/// size and returns the durability handle; the caller awaits the reply, then the handle.
/// No wallet logic (no decide/apply, no ledger, no hash chain).
mod pattern {
    use actix::{Actor, Addr, Context, Handler, Message};

    pub struct Tenant {
        pub wal: wal::Wal,
        pub payload: Vec<u8>,
    }
    impl Actor for Tenant {
        type Context = Context<Self>;
    }
    pub struct Op;
    impl Message for Op {
        type Result = Result<wal::Durable, wal::Error>;
    }
    impl Handler<Op> for Tenant {
        type Result = Result<wal::Durable, wal::Error>;
        fn handle(&mut self, _: Op, _: &mut Context<Self>) -> Self::Result {
            self.wal.append(&self.payload)
        }
    }

    /// The same append, durability reported to the caller's ticket (sent with
    /// `try_send`): the engine's `ExecuteAcked` shape, one wake-up per operation.
    pub struct TicketOp(pub wal::Ticket);
    impl Message for TicketOp {
        type Result = ();
    }
    impl Handler<TicketOp> for Tenant {
        type Result = ();
        fn handle(&mut self, op: TicketOp, _: &mut Context<Self>) {
            self.wal.append_ticketed(&self.payload, op.0).unwrap();
        }
    }

    /// Starts an actix System with `arbiters` arbiters on its own thread and `tenants`
    /// actors spread over them.
    pub fn start(
        wal: &wal::Wal,
        tenants: usize,
        arbiters: usize,
    ) -> (actix::System, Vec<Addr<Tenant>>) {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runner = actix::System::new();
            let arbs: Vec<actix::Arbiter> =
                runner.block_on(async { (0..arbiters).map(|_| actix::Arbiter::new()).collect() });
            let handles = arbs.iter().map(|a| a.handle()).collect::<Vec<_>>();
            let system = runner.block_on(async { actix::System::current() });
            tx.send((system, handles)).unwrap();
            let _ = runner.run();
            drop(arbs);
        });
        let (system, handles) = rx.recv().unwrap();
        let addrs = (0..tenants)
            .map(|t| {
                let actor = Tenant {
                    wal: wal.clone(),
                    payload: vec![0x42; 150],
                };
                Tenant::start_in_arbiter(&handles[t % handles.len()], move |ctx| {
                    ctx.set_mailbox_capacity(1024);
                    actor
                })
            })
            .collect();
        (system, addrs)
    }
}

/// The bare pattern (see `pattern`) over 10,000 tenants with 256 callers, durable;
/// `ticketed`: the caller sends a ticket and awaits it (no reply hop).
fn pattern_baseline(dir: &std::path::Path, ticketed: bool) -> Run {
    let name = if ticketed {
        "pattern-ticket"
    } else {
        "pattern"
    };
    let (wal, _) = wal::Wal::open(dir.join(name), wal::Options::default()).unwrap();
    let arbiters = std::env::var("BENCH_ARBITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let tenants = 10_000;
    let (system, addrs) = pattern::start(&wal, tenants, arbiters);
    let addrs = std::sync::Arc::new(addrs);
    let rt = runtime();
    let (ops, hist, elapsed) = drive(&rt, |c, deadline| {
        let addrs = addrs.clone();
        async move {
            let mut h = Histogram::<u64>::new(3).unwrap();
            let mut n = 0u64;
            let mut k = 0usize;
            while Instant::now() < deadline {
                let t = (c + k * CALLERS) % tenants;
                k += 1;
                let t0 = Instant::now();
                if ticketed {
                    let (ticket, durable) = wal::Ticket::new();
                    addrs[t].try_send(pattern::TicketOp(ticket)).unwrap();
                    assert!(durable.await.unwrap());
                } else {
                    addrs[t]
                        .send(pattern::Op)
                        .await
                        .unwrap()
                        .unwrap()
                        .await
                        .unwrap();
                }
                h.record(t0.elapsed().as_nanos() as u64).unwrap();
                n += 1;
            }
            (n, h)
        }
    });
    system.stop();
    let bytes = wal.stats().bytes_written as f64 / ops.max(1) as f64;
    Run {
        name: if ticketed {
            "pattern: actor appends 150 B with caller's ticket (sync)".into()
        } else {
            "pattern: actor appends 150 B, caller awaits (sync)".into()
        },
        ops,
        elapsed,
        hist,
        wal_bytes_per_op: bytes,
    }
}

fn idle_tenants(dir: &std::path::Path, n: u128) -> (f64, f64) {
    let mut cfg = EngineConfig::new(dir.join("idle"));
    cfg.durability = wal::Durability::None;
    cfg.snapshot_every_events = u64::MAX;
    cfg.snapshot_every_ms = u64::MAX;
    let (engine, _) = Engine::open(cfg).unwrap();
    let rt = runtime();
    let before = rss_bytes();
    open_and_grant(&rt, &engine, n, GrantKind::Promotional, 100);
    std::thread::sleep(Duration::from_millis(200));
    let after = rss_bytes();
    let per_tenant = (after.saturating_sub(before)) as f64 / n as f64;
    let snap_start = Instant::now();
    rt.block_on(async { engine.snapshot_now().await.unwrap() });
    let snap_s = snap_start.elapsed().as_secs_f64();
    rt.block_on(async { engine.shutdown(false).await.unwrap() });
    (per_tenant, snap_s)
}

/// Deletes what the phases wrote and waits until the disk has written back everything
/// dirty: otherwise a phase's `fdatasync`s compete with the write-back of the hundreds of
/// MB the phases before it left in the page cache, and the order of phases decides the
/// figures.
fn settle_disk(dir: &std::path::Path) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        std::fs::remove_dir_all(entry.path()).ok();
    }
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// `run`, after `settle_disk`.
fn settled(dir: &std::path::Path, run: Run) -> Run {
    settle_disk(dir);
    run
}

/// Whether phase `name` runs (`BENCH_ONLY` unset: all of them).
fn runs(name: &str) -> bool {
    std::env::var("BENCH_ONLY").map_or(true, |only| only.split(',').any(|p| p.trim() == name))
}

fn main() {
    let dir = scratch();
    println!(
        "scratch dir: {} ({} s per measurement, {CALLERS} callers)",
        dir.display(),
        secs().as_secs_f64()
    );
    // Memory first, while the process has freed nothing the allocator could reuse (a
    // later phase would count recycled memory as free).
    let n: u128 = std::env::var("BENCH_IDLE_TENANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    if runs("idle") {
        let (per_tenant, snap_s) = idle_tenants(&dir, n);
        settle_disk(&dir);
        println!("idle tenants: {n}, resident growth {per_tenant:.0} bytes per tenant (target <= 2048); snapshot of them {snap_s:.2} s");
    }
    // The wallet's records for hold and settle are about this size (measured below).
    let baseline = runs("baseline").then(|| settled(&dir, wal_baseline(&dir, 150)));
    let pattern = runs("pattern").then(|| settled(&dir, pattern_baseline(&dir, false)));
    let pattern_ticket = runs("pattern").then(|| settled(&dir, pattern_baseline(&dir, true)));
    let phases = [
        (
            "spread",
            "hold+settle, 10,000 tenants, sync",
            10_000,
            wal::Durability::Sync,
        ),
        (
            "hot",
            "hold+settle, 1 hot tenant, sync",
            1,
            wal::Durability::Sync,
        ),
        (
            "none",
            "hold+settle, 10,000 tenants, none",
            10_000,
            wal::Durability::None,
        ),
    ];
    baseline.iter().for_each(Run::print);
    pattern.iter().for_each(Run::print);
    pattern_ticket.iter().for_each(Run::print);
    let mut rates = Vec::new();
    for (key, name, tenants, durability) in phases {
        if runs(key) {
            let run = settled(&dir, hold_settle(&dir, name, tenants, durability));
            run.print();
            rates.push((key, run.rate()));
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    println!();
    if let Some(base) = &baseline {
        for (key, rate) in &rates {
            println!("ratio {key} / raw WAL baseline: {:.2}", rate / base.rate());
        }
    }
    if let Some(pat) = &pattern {
        for (key, rate) in &rates {
            println!("ratio {key} / bare actor pattern: {:.2}", rate / pat.rate());
        }
    }
    if let Some(pat) = &pattern_ticket {
        for (key, rate) in &rates {
            println!(
                "ratio {key} / bare actor pattern with tickets: {:.2}",
                rate / pat.rate()
            );
        }
    }
    for (key, rate) in &rates {
        let target = if *key == "hot" { 100_000 } else { 300_000 };
        println!("{key}: {rate:.0} ops/s (target >= {target} durable ops/s)");
    }
}
