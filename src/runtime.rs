//! The server's tokio runtimes, built one way: a fixed blocking pool, started up front and
//! kept.
//!
//! Why fixed: tokio starts blocking-pool threads on demand, up to the pool's bound, and
//! lets idle ones exit after 10 s. In the soak (BENCHMARKS.md, run G) a host stall held
//! every archive read at once and the HTTP pool grew from 13 to 35 threads mid-run; each
//! new thread took its own allocator pages, a resident step of about 14 MiB that never
//! came back. Started whole at boot and kept, the pools cost what they cost from the first
//! minute, and a slow disk queues work instead of adding threads.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Threads in each runtime's blocking pool (archive reads on the HTTP runtime, video puts
/// and reads on the engine's worker runtime). Blocking work here is file I/O on a 2-core
/// class of machine: more threads than this only wait on the same disk.
pub const BLOCKING_THREADS: usize = 16;

/// How long an idle blocking-pool thread lives (tokio's default is 10 s). Work that
/// comes every minute (each snapshot's file writes) otherwise got a new thread each time,
/// and a thread that exits leaves its allocator pages that still hold live blocks (index
/// filters, cache pages made on it) abandoned and resident with the free space around
/// them. After an idle hour a pool shrinks; it grows back at most to its bound.
pub const BLOCKING_THREAD_KEEP_ALIVE: Duration = Duration::from_secs(3600);

/// How long start-up waits for a pool's threads to start before going on without them
/// (the pool then grows on demand, as tokio's do, still bounded).
const POOL_START_WAIT: Duration = Duration::from_secs(10);

/// A multi-thread runtime: threads named `name`, `workers` worker threads (`None`: one per
/// core), timers and I/O on, and `blocking_threads` blocking threads already running.
pub fn multi_thread(
    name: &str,
    workers: Option<usize>,
    blocking_threads: usize,
) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        b.worker_threads(n.max(1));
    }
    let rt = b
        .thread_name(name)
        .max_blocking_threads(blocking_threads.max(1))
        .thread_keep_alive(BLOCKING_THREAD_KEEP_ALIVE)
        .enable_all()
        .build()?;
    start_blocking_pool(&rt, name, blocking_threads.max(1));
    Ok(rt)
}

/// A current-thread runtime (no timers or I/O: it drives a future that only awaits its own
/// blocking work) with `blocking_threads` blocking threads named `name` already running.
pub fn current_thread(
    name: &str,
    blocking_threads: usize,
) -> std::io::Result<tokio::runtime::Runtime> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .thread_name(name)
        .max_blocking_threads(blocking_threads.max(1))
        .thread_keep_alive(BLOCKING_THREAD_KEEP_ALIVE)
        .build()?;
    start_blocking_pool(&rt, name, blocking_threads.max(1));
    Ok(rt)
}

/// Starts all `threads` of `rt`'s blocking pool: `threads` tasks that each hold a thread
/// until all of them have one. Returns how many started (fewer only if the system would
/// not start threads within `POOL_START_WAIT`; then the rest start on demand).
fn start_blocking_pool(rt: &tokio::runtime::Runtime, name: &str, threads: usize) -> usize {
    // (tasks that hold a thread, released) under one lock; the condvar wakes both sides.
    let gate = Arc::new((Mutex::new((0usize, false)), Condvar::new()));
    for _ in 0..threads {
        let gate = Arc::clone(&gate);
        drop(rt.spawn_blocking(move || {
            let (lock, cv) = &*gate;
            let mut g = lock.lock().expect("not poisoned");
            g.0 += 1;
            cv.notify_all();
            // Bounded: start-up releases the gate after at most `POOL_START_WAIT`.
            let (_g, _) = cv
                .wait_timeout_while(g, POOL_START_WAIT * 2, |g| !g.1)
                .expect("not poisoned");
        }));
    }
    let (lock, cv) = &*gate;
    let g = lock.lock().expect("not poisoned");
    let (mut g, _) = cv
        .wait_timeout_while(g, POOL_START_WAIT, |g| g.0 < threads)
        .expect("not poisoned");
    let started = g.0;
    g.1 = true;
    cv.notify_all();
    if started < threads {
        tracing::warn!(
            runtime = name,
            started,
            threads,
            "not every blocking thread started in time: the rest start on demand"
        );
    }
    assert!(started <= threads, "one task per thread");
    started
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// This process's threads whose name is `name` (`/proc` keeps 15 bytes of a name).
    fn threads_named(name: &str) -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
            .filter(|comm| comm.trim_end() == name)
            .count()
    }

    #[test]
    fn pools_start_whole_and_do_not_grow_under_a_burst() {
        let rt = multi_thread("rt-test-multi", Some(1), 4).unwrap();
        // One worker and the four blocking threads, before any work.
        assert_eq!(threads_named("rt-test-multi"), 5);
        // Twelve blocking tasks at once: they queue on the four threads, none are added.
        let done: Vec<_> = (0..12)
            .map(|i| {
                rt.spawn_blocking(move || {
                    std::thread::sleep(Duration::from_millis(20));
                    i
                })
            })
            .collect();
        let sum: i32 = rt.block_on(async {
            let mut sum = 0;
            for d in done {
                sum += d.await.unwrap();
            }
            sum
        });
        assert_eq!(sum, (0..12).sum::<i32>(), "every task ran");
        assert_eq!(threads_named("rt-test-multi"), 5);

        let rt2 = current_thread("rt-test-single", 3).unwrap();
        assert_eq!(threads_named("rt-test-single"), 3);
        drop((rt, rt2));
    }
}
