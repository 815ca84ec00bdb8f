//! The stored-response index's filing cost against the rows it already holds, in one run
//! (issue 9, item 6: the soak's p99 drift followed the old B-tree index's filing cost).
//!
//! Run: `cargo bench --bench response_index` (env `BENCH_ROWS`, rows to reach, default
//! 1,000,000; `BENCH_DIR` for the scratch directory, default `target/bench-scratch`).
//!
//! Files runs of 15,600 random keys (one snapshot's worth at the soak's rate of keyed
//! requests), each followed by the upkeep a snapshot does (`expire`: whole-run expiry,
//! merges), until the index holds `BENCH_ROWS`. Prints per window of 8 filings the rows,
//! the mean and largest time to write the new run (`add`) and the mean and largest upkeep
//! (merges: a binary counter, so the largest merge of a window doubles every time the
//! filings do, up to the cap), and the runs open. The baseline is the first window: the
//! ratio of the last window's `add` mean to it is how filing grows with the rows already
//! filed. Then times lookups of absent keys (the common case: a fresh Idempotency-Key) and
//! of present ones at the final size.

mod common;

use std::time::Instant;

use reelbatch::engine::response_files::FiledRef;
use reelbatch::engine::response_index::ResponseIndex;

/// Records per filing: one snapshot's worth in the soak (about a minute of keyed requests).
const FILING_RECORDS: u64 = 15_600;
/// Filings per printed window.
const WINDOW: usize = 8;

/// xorshift: random-looking key ids without a crate.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn id(state: &mut u64) -> u128 {
    (u128::from(next(state)) << 64) | u128::from(next(state))
}

fn main() {
    let rows_max: u64 = std::env::var("BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let data = common::scratch();
    std::fs::create_dir_all(data.join("archive").join("responses")).unwrap();
    let index = ResponseIndex::open(&data, &[]).unwrap();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut present: Vec<u128> = Vec::new();
    // (add ms, upkeep ms) per filing of the current window.
    let mut window: Vec<(f64, f64)> = Vec::new();
    let mut first_add_ms: Option<f64> = None;
    let mut last_add_ms = 0.0;
    let (mut add_total_ms, mut upkeep_total_ms) = (0.0, 0.0);
    println!("| rows after | add mean ms | add max ms | upkeep mean ms | upkeep max ms | runs |");
    println!("|---:|---:|---:|---:|---:|---:|");
    let filings = rows_max.div_ceil(FILING_RECORDS) as u32;
    for segment in 1..=filings {
        let at_ms = u64::from(segment) * 60_000;
        let records: Vec<(u128, FiledRef)> = (0..FILING_RECORDS)
            .map(|i| {
                let k = id(&mut rng);
                if i % 1000 == 0 {
                    present.push(k);
                }
                let f = FiledRef {
                    fingerprint: [i as u8; 32],
                    at_ms,
                    segment,
                    len: 900,
                    offset: i * 916,
                };
                (k, f)
            })
            .collect();
        let started = Instant::now();
        index.add(segment, &records).unwrap();
        let add_ms = started.elapsed().as_secs_f64() * 1e3;
        let started = Instant::now();
        // Nothing expires within the run (retention is a day): upkeep is the merges.
        index.expire(0, &[]).unwrap();
        let upkeep_ms = started.elapsed().as_secs_f64() * 1e3;
        add_total_ms += add_ms;
        upkeep_total_ms += upkeep_ms;
        window.push((add_ms, upkeep_ms));
        if window.len() == WINDOW || segment == filings {
            let n = window.len() as f64;
            let add_mean = window.iter().map(|w| w.0).sum::<f64>() / n;
            let add_max = window.iter().map(|w| w.0).fold(0.0, f64::max);
            let up_mean = window.iter().map(|w| w.1).sum::<f64>() / n;
            let up_max = window.iter().map(|w| w.1).fold(0.0, f64::max);
            println!(
                "| {} | {add_mean:.1} | {add_max:.1} | {up_mean:.1} | {up_max:.1} | {} |",
                index.rows(),
                index.run_count()
            );
            first_add_ms.get_or_insert(add_mean);
            last_add_ms = add_mean;
            window.clear();
        }
    }
    let first = first_add_ms.unwrap_or(1.0);
    println!(
        "\nadd: first window {first:.1} ms, last {last_add_ms:.1} ms, ratio last/first {:.2}; \
         over all {filings} filings: add {:.1} ms and upkeep {:.1} ms a filing on average; \
         index memory {:.2} MiB for {} rows",
        last_add_ms / first,
        add_total_ms / f64::from(filings),
        upkeep_total_ms / f64::from(filings),
        index.memory_bytes() as f64 / f64::from(1 << 20),
        index.rows()
    );
    let lookups = 200_000u32;
    let started = Instant::now();
    let mut found = 0u32;
    for _ in 0..lookups {
        found += u32::from(index.get(id(&mut rng)).unwrap().is_some());
    }
    let absent_ns = started.elapsed().as_nanos() as f64 / f64::from(lookups);
    assert_eq!(found, 0, "random ids are absent");
    let started = Instant::now();
    for k in &present {
        assert!(index.get(*k).unwrap().is_some());
    }
    let present_ns = started.elapsed().as_nanos() as f64 / present.len() as f64;
    println!(
        "lookup: absent key {:.2} µs, present key {:.2} µs (page cache warm), {} runs",
        absent_ns / 1e3,
        present_ns / 1e3,
        index.run_count()
    );
    let _ = std::fs::remove_dir_all(&data);
}
