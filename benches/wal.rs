//! WAL benchmark, in one run against raw baselines on the same disk (issue 2 targets).
//!
//! Run: `cargo bench --bench wal` (env: `BENCH_SECS` per measurement, default 3;
//! `BENCH_DIR` for the scratch directory, default `target/bench-scratch`, which must be on
//! the disk the server would use).
//!
//! Measures, with 128-byte payloads:
//! - raw baselines: a loop of `write` + `fdatasync` per record, per 256, per 4,096 records;
//! - the WAL in `sync` mode with 1, 16 and 256 concurrent appenders (tokio tasks awaiting
//!   their `Durable`), plus 1 appender blocking on `wait()` from a plain thread;
//! - the WAL in `none` mode with 256 appenders (the machinery's CPU ceiling);
//! - replay of 2,000,000 frames from a warm page cache.
//!
//! Prints a table and the ratios the targets are stated in.

mod common;
use common::scratch;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use wal::{Durability, Options, Wal};

const PAYLOAD: [u8; 128] = [0x5a; 128];

struct Result {
    name: String,
    ops_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    extra: String,
}

fn secs() -> Duration {
    common::bench_secs(3.0)
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap()
}

/// A loop of 128-byte writes with one fdatasync every `per` records.
fn raw(dir: &Path, per: u64) -> Result {
    let path = dir.join(format!("raw-{per}.bin"));
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    let mut h = hist();
    let deadline = Instant::now() + secs();
    let start = Instant::now();
    let mut n = 0u64;
    let mut group_start = Instant::now();
    while Instant::now() < deadline || n % per != 0 {
        f.write_all(&PAYLOAD).unwrap();
        n += 1;
        if n % per == 0 {
            f.sync_data().unwrap();
            // Every record of the group waited for this sync: record the group's latency.
            let us = group_start.elapsed().as_nanos() as u64;
            h.record_n(us.max(1), per).unwrap();
            group_start = Instant::now();
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(path).unwrap();
    Result {
        name: format!("raw write+fdatasync per {per}"),
        ops_per_s: n as f64 / elapsed,
        p50_us: h.value_at_quantile(0.5) as f64 / 1000.0,
        p99_us: h.value_at_quantile(0.99) as f64 / 1000.0,
        extra: String::new(),
    }
}

/// `appenders` tokio tasks each appending and awaiting durability in a loop.
fn wal_async(dir: &Path, appenders: usize, durability: Durability) -> Result {
    let wal_dir = dir.join(format!("wal-{appenders}-{durability:?}"));
    let (wal, _) = Wal::open(
        &wal_dir,
        Options {
            durability,
            ..Options::default()
        },
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let dur = secs();
    let start = Instant::now();
    let (count, h) = rt.block_on(async {
        let deadline = Instant::now() + dur;
        let tasks: Vec<_> = (0..appenders)
            .map(|_| {
                let wal = wal.clone();
                tokio::spawn(async move {
                    let mut h = hist();
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        let t0 = Instant::now();
                        wal.append(&PAYLOAD).unwrap().await.unwrap();
                        h.record(t0.elapsed().as_nanos() as u64).unwrap();
                        n += 1;
                    }
                    (n, h)
                })
            })
            .collect();
        let mut total = 0;
        let mut all = hist();
        for t in tasks {
            let (n, h) = t.await.unwrap();
            total += n;
            all.add(h).unwrap();
        }
        (total, all)
    });
    let elapsed = start.elapsed().as_secs_f64();
    let stats = wal.stats();
    wal.close().unwrap();
    drop(wal);
    std::fs::remove_dir_all(wal_dir).unwrap();
    Result {
        name: format!("wal {durability:?}, {appenders} async appenders"),
        ops_per_s: count as f64 / elapsed,
        p50_us: h.value_at_quantile(0.5) as f64 / 1000.0,
        p99_us: h.value_at_quantile(0.99) as f64 / 1000.0,
        extra: format!(
            "group {:.1}, fsync mean {:.1} us",
            stats.appends as f64 / stats.groups.max(1) as f64,
            stats.sync_nanos_total as f64 / stats.syncs.max(1) as f64 / 1000.0
        ),
    }
}

/// One plain thread appending and blocking on `wait()`.
fn wal_blocking_one(dir: &Path) -> Result {
    let wal_dir = dir.join("wal-blocking");
    let (wal, _) = Wal::open(&wal_dir, Options::default()).unwrap();
    let mut h = hist();
    let deadline = Instant::now() + secs();
    let start = Instant::now();
    let mut n = 0u64;
    while Instant::now() < deadline {
        let t0 = Instant::now();
        wal.append(&PAYLOAD).unwrap().wait().unwrap();
        h.record(t0.elapsed().as_nanos() as u64).unwrap();
        n += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    wal.close().unwrap();
    drop(wal);
    std::fs::remove_dir_all(wal_dir).unwrap();
    Result {
        name: "wal Sync, 1 blocking appender".into(),
        ops_per_s: n as f64 / elapsed,
        p50_us: h.value_at_quantile(0.5) as f64 / 1000.0,
        p99_us: h.value_at_quantile(0.99) as f64 / 1000.0,
        extra: String::new(),
    }
}

/// Replay of `frames` 128-byte frames from a warm page cache.
fn replay(dir: &Path, frames: u64) -> Result {
    let wal_dir = dir.join("wal-replay");
    let opts = Options {
        durability: Durability::None,
        ..Options::default()
    };
    {
        let (wal, _) = Wal::open(&wal_dir, opts.clone()).unwrap();
        let mut last = None;
        for _ in 0..frames {
            last = Some(wal.append(&PAYLOAD).unwrap());
        }
        last.unwrap().wait().unwrap();
        wal.close().unwrap();
    }
    let open_start = Instant::now();
    let (wal, report) = Wal::open(&wal_dir, opts).unwrap();
    let open_s = open_start.elapsed().as_secs_f64();
    assert_eq!(report.frames, frames);
    let mut best = 0.0f64;
    for _ in 0..3 {
        let start = Instant::now();
        let mut r = wal.replay(1).unwrap();
        let mut n = 0u64;
        let mut sum = 0u64;
        while let Some(f) = r.next_frame().unwrap() {
            sum += f.payload[0] as u64;
            n += 1;
        }
        assert_eq!(n, frames);
        assert_eq!(sum, frames * 0x5a);
        best = best.max(n as f64 / start.elapsed().as_secs_f64());
    }
    drop(wal);
    std::fs::remove_dir_all(wal_dir).unwrap();
    Result {
        name: format!("replay {frames} frames (warm)"),
        ops_per_s: best,
        p50_us: 0.0,
        p99_us: 0.0,
        extra: format!(
            "open+scan {:.0} ms ({:.0} frames/s)",
            open_s * 1000.0,
            frames as f64 / open_s
        ),
    }
}

fn main() {
    // `cargo bench` passes `--bench`; accept and ignore harness flags.
    let dir = scratch();
    println!(
        "scratch dir: {} ({} s per measurement)",
        dir.display(),
        secs().as_secs_f64()
    );
    let mut results = Vec::new();
    let mut run = |r: Result| {
        println!(
            "{:<44} {:>12.0} ops/s   p50 {:>8.1} us   p99 {:>8.1} us   {}",
            r.name, r.ops_per_s, r.p50_us, r.p99_us, r.extra
        );
        results.push(r);
    };
    run(raw(&dir, 1));
    run(raw(&dir, 256));
    run(raw(&dir, 4096));
    run(wal_async(&dir, 1, Durability::Sync));
    run(wal_blocking_one(&dir));
    run(wal_async(&dir, 16, Durability::Sync));
    run(wal_async(&dir, 256, Durability::Sync));
    run(wal_async(&dir, 256, Durability::None));
    run(replay(&dir, 2_000_000));
    std::fs::remove_dir_all(&dir).ok();

    let get = |prefix: &str| {
        results
            .iter()
            .find(|r| r.name.starts_with(prefix))
            .unwrap_or_else(|| panic!("{prefix}"))
    };
    let raw1 = get("raw write+fdatasync per 1").ops_per_s;
    let raw256 = get("raw write+fdatasync per 256").ops_per_s;
    let one = get("wal Sync, 1 async").ops_per_s;
    let one_blocking = get("wal Sync, 1 blocking").ops_per_s;
    let many = get("wal Sync, 256 async");
    println!();
    println!(
        "ratio 1 appender (async) / raw per-record fsync:    {:.2}  (target >= 0.70)",
        one / raw1
    );
    println!(
        "ratio 1 appender (blocking) / raw per-record fsync: {:.2}  (target >= 0.70)",
        one_blocking / raw1
    );
    println!(
        "ratio 256 appenders / raw fsync per 256:           {:.2}  (target >= 0.25)",
        many.ops_per_s / raw256
    );
    println!(
        "256 appenders absolute: {:.0} durable appends/s (target >= 1,000,000), p99 {:.1} us (target <= 1000)",
        many.ops_per_s, many.p99_us
    );
    println!(
        "replay: {:.0} frames/s (target >= 2,000,000)",
        get("replay").ops_per_s
    );
}
