//! The live-heap counter's cost (`src/heap.rs`), against its own baseline in the same run.
//!
//! Run: `cargo bench --bench heap` (env `BENCH_SECS` per measurement, default 2).
//!
//! Each thread keeps a ring of 64 live blocks and replaces one per step (free, then
//! allocate a size from a fixed cycle of 16 B – 4 KiB, the sizes a request mostly asks
//! for), through plain mimalloc and through `heap::Counted<mimalloc>`, with 1 and 2
//! threads (2 is every core of the reference machine: slots must not share cache lines
//! across cores). The two run alternately, three rounds each, so drift in a noisy
//! host lands on both. Prints ns per free + allocate and the ratio counted / plain.

mod common;

use std::alloc::{GlobalAlloc, Layout};
use std::time::{Duration, Instant};

use reelbatch::heap::Counted;

/// Live blocks per thread: enough that the allocator's free lists are exercised, not
/// so many that the run measures cache misses.
const RING_BLOCKS: usize = 64;
/// Sizes cycled through (bytes).
const SIZES: [usize; 8] = [16, 24, 48, 64, 128, 256, 1024, 4096];

fn secs() -> Duration {
    common::bench_secs(2.0)
}

/// Steps of free + allocate per second on one thread, for `secs()`.
fn churn<A: GlobalAlloc>(a: &A) -> f64 {
    let layout = |i: usize| Layout::from_size_align(SIZES[i % SIZES.len()], 8).expect("valid");
    // SAFETY: every block is allocated and freed through `a` with the layout it was
    // allocated with (`layout(slot index + generation)` is recomputed the same way).
    unsafe {
        let mut ring: Vec<(*mut u8, Layout)> = (0..RING_BLOCKS)
            .map(|i| {
                let l = layout(i);
                (a.alloc(l), l)
            })
            .collect();
        let deadline = Instant::now() + secs();
        let start = Instant::now();
        let mut steps = 0u64;
        // Bounded by the deadline, checked every 4,096 steps.
        'run: loop {
            for _ in 0..4096 {
                let slot = (steps as usize) % RING_BLOCKS;
                let (p, l) = ring[slot];
                assert!(!p.is_null(), "out of memory");
                a.dealloc(p, l);
                let l = layout(slot + (steps as usize) / RING_BLOCKS);
                ring[slot] = (a.alloc(l), l);
                steps += 1;
            }
            if Instant::now() >= deadline {
                break 'run;
            }
        }
        let rate = steps as f64 / start.elapsed().as_secs_f64();
        for (p, l) in ring {
            a.dealloc(p, l);
        }
        rate
    }
}

/// Steps per second over `threads` threads together.
fn run<A: GlobalAlloc + Sync>(a: &A, threads: usize) -> f64 {
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads).map(|_| s.spawn(|| churn(a))).collect();
        hs.into_iter().map(|h| h.join().expect("no panic")).sum()
    })
}

fn main() {
    let plain = mimalloc::MiMalloc;
    let counted = Counted(mimalloc::MiMalloc);
    println!("| threads | round | plain ns/step | counted ns/step | counted / plain |");
    println!("|---|---|---|---|---|");
    for threads in [1, 2] {
        let mut ratios = Vec::new();
        for round in 1..=3 {
            // Alternate which goes first, so warm-up and drift fall on both.
            let (p, c) = if round % 2 == 1 {
                let p = run(&plain, threads);
                (p, run(&counted, threads))
            } else {
                let c = run(&counted, threads);
                (run(&plain, threads), c)
            };
            // ns per step per thread (each thread steps on its own).
            let p_ns = 1e9 * threads as f64 / p;
            let c_ns = 1e9 * threads as f64 / c;
            ratios.push(c_ns / p_ns);
            println!(
                "| {threads} | {round} | {p_ns:.1} | {c_ns:.1} | {:.3} |",
                c_ns / p_ns
            );
        }
        ratios.sort_by(f64::total_cmp);
        println!("| {threads} | median | | | **{:.3}** |", ratios[1]);
    }
}
