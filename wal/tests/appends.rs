//! Appending, group commit, durability and poisoning, against real files and real fdatasync.

use std::collections::HashSet;
use std::sync::Arc;

use proptest::prelude::*;
use wal::{Durability, Error, FaultInjector, Options, Wal, WriteFault};

fn payload_for(lsn_hint: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (lsn_hint as usize).wrapping_mul(31).wrapping_add(i) as u8)
        .collect()
}

fn replay_all(wal: &Wal, from: u64) -> Vec<(u64, Vec<u8>)> {
    let mut r = wal.replay(from).unwrap();
    let mut out = Vec::new();
    while let Some(f) = r.next_frame().unwrap() {
        assert_eq!(f.payload.as_ptr() as usize % wal::PAYLOAD_ALIGN, 0);
        out.push((f.lsn, f.payload.to_vec()));
    }
    out
}

fn opts_segment_max() -> u64 {
    1 << 20
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Random payload sizes 0..=1 MiB across several rotations: after reopening, payloads
    /// and LSNs are identical, in order, and replay from any LSN starts there.
    #[test]
    fn round_trip_across_rotations(sizes in prop::collection::vec(
        prop_oneof![0usize..64, 0usize..=(1 << 20)], 4..24),
        from_pick in 0usize..24,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let opts = Options { segment_bytes_max: opts_segment_max(), ..Options::default() };
        let mut written = Vec::new();
        {
            let (wal, report) = Wal::open(dir.path(), opts.clone()).unwrap();
            prop_assert_eq!(report.frames, 0);
            let handles: Vec<_> = sizes
                .iter()
                .enumerate()
                .map(|(i, &len)| {
                    let p = payload_for(i as u64, len);
                    let h = wal.append(&p).unwrap();
                    written.push((h.lsn(), p));
                    h
                })
                .collect();
            for h in handles {
                h.wait().unwrap();
            }
            wal.close().unwrap();
        }
        let (wal, report) = Wal::open(dir.path(), opts).unwrap();
        prop_assert!(report.torn_tail.is_none());
        prop_assert_eq!(report.frames, sizes.len() as u64);
        prop_assert_eq!(report.last_lsn, sizes.len() as u64);
        // Every segment but a single-frame one stays within the limit, so this many bytes
        // cannot fit in fewer segments.
        let encoded: u64 = sizes.iter().map(|s| (s + wal::FRAME_HEADER_BYTES) as u64).sum();
        let at_least = encoded.div_ceil(2 * opts_segment_max()) as usize;
        prop_assert!(report.segments >= at_least.max(1),
            "{} bytes in {} segments", encoded, report.segments);
        let expected_lsns: Vec<u64> = (1..=sizes.len() as u64).collect();
        prop_assert_eq!(written.iter().map(|w| w.0).collect::<Vec<_>>(), expected_lsns);
        prop_assert!(replay_all(&wal, 1) == written, "replay differs from what was written");
        let from = (from_pick % sizes.len()) as u64 + 1;
        prop_assert!(replay_all(&wal, from) == written[(from - 1) as usize..].to_vec());
    }
}

/// 64 concurrent appenders: LSNs unique and dense; every append whose durability resolved
/// is present after reopen with its payload.
#[test]
fn sixty_four_concurrent_appenders() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        segment_bytes_max: 256 << 10,
        ..Options::default()
    };
    let (wal, _) = Wal::open(dir.path(), opts.clone()).unwrap();
    let per_thread = 200u64;
    let acked: Vec<(u64, Vec<u8>)> = std::thread::scope(|s| {
        let joins: Vec<_> = (0..64u64)
            .map(|t| {
                let wal = wal.clone();
                s.spawn(move || {
                    let mut mine = Vec::new();
                    for i in 0..per_thread {
                        let p = format!("thread {t} record {i}").into_bytes();
                        let lsn = wal.append(&p).unwrap().wait().unwrap();
                        mine.push((lsn, p));
                    }
                    mine
                })
            })
            .collect();
        joins.into_iter().flat_map(|j| j.join().unwrap()).collect()
    });
    let total = 64 * per_thread;
    let lsns: HashSet<u64> = acked.iter().map(|a| a.0).collect();
    assert_eq!(lsns.len() as u64, total, "LSNs unique");
    assert_eq!(*lsns.iter().min().unwrap(), 1);
    assert_eq!(*lsns.iter().max().unwrap(), total, "LSNs dense");
    assert!(wal.durable_lsn() >= total);
    let stats = wal.stats();
    assert_eq!(stats.appends, total);
    assert!(
        stats.groups < total,
        "group commit shared fsyncs: {} groups for {} appends",
        stats.groups,
        total
    );
    drop(wal);

    let (wal, report) = Wal::open(dir.path(), opts).unwrap();
    assert!(report.segments > 1);
    let replayed: std::collections::HashMap<u64, Vec<u8>> =
        replay_all(&wal, 1).into_iter().collect();
    for (lsn, p) in &acked {
        assert_eq!(
            replayed.get(lsn),
            Some(p),
            "acked LSN {lsn} missing or different"
        );
    }
}

/// Durable handles are futures: many tasks on a tokio runtime await them concurrently.
#[test]
fn durable_handles_are_futures() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(dir.path(), Options::default()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let lsns = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..256u32 {
            let wal = wal.clone();
            tasks.push(tokio::task::spawn(async move {
                wal.append(&i.to_le_bytes()).unwrap().await.unwrap()
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let set: HashSet<u64> = lsns.into_iter().collect();
    assert_eq!(set, (1..=256).collect());
}

/// Tickets: an append made with a ticket resolves its `Ticketed` (held elsewhere) once
/// durable, in LSN order with plain appends; a ticket dropped unused, or whose append is
/// refused, resolves `Ok(false)`; a failed fsync resolves it with the poison.
#[test]
fn ticketed_appends_report_to_their_futures() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(FaultInjector::new());
    let opts = Options {
        faults: Some(faults.clone()),
        payload_bytes_max: 1024,
        ..Options::default()
    };
    let (wal, _) = Wal::open(dir.path(), opts).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        // The appends happen on other threads, the awaiting here: as an actor would.
        let mut waits = Vec::new();
        let mut appenders = Vec::new();
        for i in 0..64u32 {
            let (ticket, ticketed) = wal::Ticket::new();
            let wal = wal.clone();
            appenders.push(std::thread::spawn(move || {
                if i % 2 == 0 {
                    wal.append_ticketed(&i.to_le_bytes(), ticket).unwrap()
                } else {
                    let lsn = wal.append(&i.to_le_bytes()).unwrap().wait().unwrap();
                    drop(ticket);
                    lsn
                }
            }));
            waits.push((i, ticketed));
        }
        let lsns: Vec<u64> = appenders.into_iter().map(|t| t.join().unwrap()).collect();
        for (i, ticketed) in waits {
            let durable = ticketed.await.unwrap();
            assert_eq!(durable, i % 2 == 0, "ticket {i}");
            if durable {
                // Durable: so is everything up to its LSN (the acknowledged watermark
                // follows once the whole group's waiters are resolved).
                assert!(wal.durable_lsn() >= lsns[i as usize]);
            }
        }
        // Refused (too large): the ticket is dropped, its future says no append.
        let (ticket, ticketed) = wal::Ticket::new();
        assert!(matches!(
            wal.append_ticketed(&[0u8; 2048], ticket),
            Err(Error::PayloadTooLarge { .. })
        ));
        assert!(!ticketed.await.unwrap());
        // A failed fsync reaches the ticket's future as the poison.
        faults.fail_next_sync();
        let (ticket, ticketed) = wal::Ticket::new();
        wal.append_ticketed(b"doomed", ticket).unwrap();
        assert!(matches!(ticketed.await, Err(Error::Poisoned(_))));
    });
    let frames = replay_all(&wal, 1);
    assert!(frames.len() >= 64);
}

/// A tiny queue bound forces appenders to block; everything still completes, in order.
#[test]
fn bounded_queue_backpressure() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        queue_appends_max: 2,
        queue_bytes_max: 256,
        ..Options::default()
    };
    let (wal, _) = Wal::open(dir.path(), opts).unwrap();
    std::thread::scope(|s| {
        for _ in 0..8 {
            let wal = wal.clone();
            s.spawn(move || {
                for _ in 0..100 {
                    wal.append(&[7u8; 100]).unwrap().wait().unwrap();
                }
            });
        }
    });
    assert_eq!(wal.next_lsn(), 801);
    // try_append reports a full queue instead of blocking (the writer sits in fdatasync
    // most of the time, so a burst of try_appends overruns a 2-deep queue).
    let mut saw_full = false;
    let mut handles = Vec::new();
    for _ in 0..100_000 {
        match wal.try_append(b"x") {
            Ok(h) => handles.push(h),
            Err(Error::QueueFull) => {
                saw_full = true;
                break;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(saw_full, "a 2-deep queue never reported full");
    for h in handles {
        h.wait().unwrap();
    }
}

#[test]
fn oversize_payload_is_refused_without_touching_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        payload_bytes_max: 1000,
        ..Options::default()
    };
    let (wal, _) = Wal::open(dir.path(), opts).unwrap();
    assert!(matches!(
        wal.append(&[0u8; 1001]),
        Err(Error::PayloadTooLarge {
            len: 1001,
            max: 1000
        })
    ));
    assert_eq!(wal.append(&[0u8; 1000]).unwrap().wait().unwrap(), 1);
}

/// An fsync failure poisons the log: the append it covered fails, every later one fails,
/// nothing after the failure is reported durable, and the file is never synced again.
#[test]
fn injected_fsync_failure_poisons() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(FaultInjector::new());
    let opts = Options {
        faults: Some(faults.clone()),
        ..Options::default()
    };
    let (wal, _) = Wal::open(dir.path(), opts).unwrap();
    for i in 0..10u8 {
        wal.append(&[i]).unwrap().wait().unwrap();
    }
    let durable_before = wal.durable_lsn();
    assert_eq!(durable_before, 10);
    let syncs_before = wal.stats().syncs;
    faults.fail_next_sync();
    let err = wal.append(b"doomed").unwrap().wait().unwrap_err();
    assert!(
        matches!(err, Error::Poisoned(ref m) if m.contains("Input/output error")),
        "{err}"
    );
    assert!(wal.poisoned().is_some());
    for _ in 0..3 {
        assert!(matches!(wal.append(b"later"), Err(Error::Poisoned(_))));
    }
    assert_eq!(
        wal.durable_lsn(),
        durable_before,
        "nothing after the failure is durable"
    );
    assert_eq!(
        wal.stats().syncs,
        syncs_before,
        "no fsync after the failed one"
    );
    assert!(matches!(wal.close(), Err(Error::Poisoned(_))));
    drop(wal);

    // Every acknowledged append survives; the unacknowledged one may or may not.
    let (wal, _) = Wal::open(dir.path(), Options::default()).unwrap();
    let frames = replay_all(&wal, 1);
    assert!(frames.len() >= 10);
    for (i, (lsn, p)) in frames.iter().take(10).enumerate() {
        assert_eq!((*lsn, p.as_slice()), (i as u64 + 1, &[i as u8][..]));
    }
}

/// A torn write (half written, then EIO) and a full disk (ENOSPC) poison the log; the
/// next open truncates the torn tail and every acknowledged append is intact.
#[test]
fn injected_write_failures_poison_and_recover() {
    for fault in [WriteFault::Short, WriteFault::NoSpace, WriteFault::Error] {
        let dir = tempfile::tempdir().unwrap();
        let faults = Arc::new(FaultInjector::new());
        let opts = Options {
            faults: Some(faults.clone()),
            ..Options::default()
        };
        let (wal, _) = Wal::open(dir.path(), opts).unwrap();
        for i in 0..5u8 {
            wal.append(&[i; 64]).unwrap().wait().unwrap();
        }
        faults.fail_next_write(fault);
        let err = wal.append(&[9u8; 64]).unwrap().wait().unwrap_err();
        assert!(matches!(err, Error::Poisoned(_)), "{fault:?}: {err}");
        assert!(matches!(wal.append(b"x"), Err(Error::Poisoned(_))));
        drop(wal);
        let (wal, report) = Wal::open(dir.path(), Options::default()).unwrap();
        assert_eq!(
            report.torn_tail.is_some(),
            fault != WriteFault::Error,
            "{fault:?}: {report:?}"
        );
        let frames = replay_all(&wal, 1);
        assert_eq!(frames.len(), 5, "{fault:?}");
        assert!(frames
            .iter()
            .enumerate()
            .all(|(i, f)| f.1 == vec![i as u8; 64]));
        // The log goes on from the last good frame.
        assert_eq!(wal.append(b"next").unwrap().wait().unwrap(), 6);
    }
}

/// `interval` and `none` modes: appends resolve after the write; close syncs; nothing lost.
#[test]
fn interval_and_none_modes_keep_everything_on_clean_close() {
    for durability in [Durability::Interval(5), Durability::None] {
        let dir = tempfile::tempdir().unwrap();
        let opts = Options {
            durability,
            ..Options::default()
        };
        let (wal, _) = Wal::open(dir.path(), opts.clone()).unwrap();
        for i in 0..1000u32 {
            wal.append(&i.to_le_bytes()).unwrap().wait().unwrap();
        }
        if durability == Durability::Interval(5) {
            // The periodic sync catches up while idle.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while wal.durable_lsn() < 1000 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            assert_eq!(wal.durable_lsn(), 1000);
        }
        wal.close().unwrap();
        assert!(matches!(wal.append(b"x"), Err(Error::Closed)));
        drop(wal);
        let (wal, _) = Wal::open(dir.path(), opts).unwrap();
        let frames = replay_all(&wal, 1);
        assert_eq!(frames.len(), 1000);
        assert_eq!(frames[999].1, 999u32.to_le_bytes());
    }
}

#[test]
fn invalid_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for opts in [
        Options {
            segment_bytes_max: 10,
            ..Options::default()
        },
        Options {
            durability: Durability::Interval(0),
            ..Options::default()
        },
        Options {
            queue_appends_max: 0,
            ..Options::default()
        },
    ] {
        assert!(matches!(
            Wal::open(dir.path(), opts),
            Err(Error::InvalidOptions(_))
        ));
    }
}
