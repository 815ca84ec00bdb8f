//! Real crashes at the engine level: a child process drives the wallet engine and prints
//! every acknowledged operation; the parent kills it with SIGKILL at a random moment
//! (sometimes also tearing the WAL tail), restarts the engine from the same data directory
//! and checks: every acknowledged operation is in its tenant's ledger with the same hash,
//! every invariant holds, every chain verifies. Unacknowledged operations may vanish.
//!
//! The child is this test binary, re-run with `--ignored --exact crash_child`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reelbatch::engine::wallet::ledger::hex;
use reelbatch::engine::wallet::state::{GrantKind, WalletCommand, WalletError};
use reelbatch::engine::{Engine, EngineConfig};
use reelbatch::ids::{BatchId, TenantId};

const TENANTS: u128 = 6;
const ROUNDS: u64 = 6;

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

fn config(dir: &std::path::Path) -> EngineConfig {
    let mut cfg = EngineConfig::new(dir);
    // Frequent snapshots so crashes also land during and after them.
    cfg.snapshot_every_events = 300;
    cfg.snapshot_every_ms = 200;
    cfg.segment_bytes_max = 64 << 10;
    cfg
}

/// The child: runs until killed. Not a test on its own (ignored); the parent runs it.
#[test]
#[ignore = "run by crash_rounds as a child process"]
fn crash_child() {
    let Ok(dir) = std::env::var("RB_CRASH_DIR") else {
        return;
    };
    let round: u64 = std::env::var("RB_CRASH_ROUND").unwrap().parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let (engine, _) = Engine::open(config(std::path::Path::new(&dir))).unwrap();
        for t in 1..=TENANTS {
            engine.open_wallet(TenantId(t)).await.unwrap();
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        for worker in 0..16u64 {
            let engine = engine.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut seed = (round << 32) ^ (worker * 0x9E37_79B9) ^ 0xDEAD_BEEF;
                for op in 0u64.. {
                    let tenant = TenantId(rng(&mut seed) as u128 % TENANTS + 1);
                    let batch = BatchId(
                        ((round as u128) << 64) | ((worker as u128) << 32) | (op as u128 / 4),
                    );
                    let cmd = match op % 4 {
                        0 => WalletCommand::Grant {
                            request_id: format!("r{round}-w{worker}-{op}"),
                            kind: if rng(&mut seed) % 2 == 0 {
                                GrantKind::Paid
                            } else {
                                GrantKind::Promotional
                            },
                            amount: 50 + rng(&mut seed) % 100,
                            expires_at_ms: None,
                        },
                        1 => WalletCommand::Hold { batch, amount: 30 },
                        2 => WalletCommand::Settle {
                            batch,
                            item: 0,
                            amount: 10,
                        },
                        _ => WalletCommand::Release {
                            batch,
                            item: 1,
                            amount: 20,
                        },
                    };
                    match engine.execute(tenant, cmd).await {
                        Ok(out) => {
                            for e in out.entries {
                                let _ =
                                    tx.send(format!("ACK {} {} {}", tenant.0, e.seq, hex(&e.hash)));
                            }
                        }
                        Err(WalletError::InsufficientCredits { .. })
                        | Err(WalletError::UnknownHold { .. }) => {}
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
            });
        }
        drop(tx);
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "READY");
        let _ = out.flush();
        while let Some(line) = rx.recv().await {
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    });
}

/// Tears the tail of the newest segment: appends half a frame of garbage, as a crash in
/// the middle of a write leaves it.
fn tear_tail(dir: &std::path::Path, seed: &mut u64) {
    let segs = wal::list_segments(&reelbatch::wal_dir(dir)).unwrap();
    let newest = &segs.last().unwrap().1;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(newest)
        .unwrap();
    let garbage: Vec<u8> = (0..(rng(seed) % 200 + 1))
        .map(|_| rng(seed) as u8)
        .collect();
    f.write_all(&garbage).unwrap();
}

#[test]
fn crash_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut seed = 0x1234_5678_9abc_def0u64;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut acked_total = 0usize;
    for round in 0..ROUNDS {
        let mut child = Command::new(&exe)
            .args([
                "--ignored",
                "--exact",
                "crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("RB_CRASH_DIR", dir.path())
            .env("RB_CRASH_ROUND", round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut acks = Vec::new();
            let mut ready = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.ends_with("READY") {
                    ready = true;
                }
                let parts: Vec<&str> = line.split(' ').collect();
                // A line cut by the kill has fewer parts, or a short hash: ignore it.
                if parts.len() == 4 && parts[0] == "ACK" && parts[3].len() == 64 {
                    acks.push((
                        parts[1].parse::<u128>().unwrap(),
                        parts[2].parse::<u64>().unwrap(),
                        parts[3].to_string(),
                    ));
                }
            }
            (ready, acks)
        });
        // Let it work for a random while, then SIGKILL.
        let deadline = Instant::now() + Duration::from_millis(300 + rng(&mut seed) % 900);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let (ready, acks) = reader.join().unwrap();
        assert!(ready, "round {round}: the child never started");
        if round % 2 == 1 {
            tear_tail(dir.path(), &mut seed);
        }

        let (engine, recovery) = Engine::open(config(dir.path()))
            .unwrap_or_else(|e| panic!("round {round}: recovery failed: {e}"));
        if round % 2 == 1 {
            assert!(
                recovery.wal.torn_tail.is_some(),
                "round {round}: torn tail not seen"
            );
        }
        rt.block_on(async {
            engine
                .check_invariants()
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            let mut ledgers = std::collections::HashMap::new();
            for t in 1..=TENANTS {
                let entries = engine
                    .ledger_page(TenantId(t), 0, usize::MAX)
                    .await
                    .unwrap();
                reelbatch::engine::wallet::ledger::verify_chain(TenantId(t), &entries).unwrap();
                ledgers.insert(t, entries);
            }
            for (t, seq, hash) in &acks {
                let e = ledgers[t]
                    .get(*seq as usize - 1)
                    .unwrap_or_else(|| panic!("round {round}: acked entry {t}/{seq} lost"));
                assert_eq!(
                    &hex(&e.hash),
                    hash,
                    "round {round}: acked entry {t}/{seq} differs"
                );
            }
            engine.shutdown(false).await.unwrap();
        });
        acked_total += acks.len();
        eprintln!(
            "round {round}: {} acks verified, snapshot {:?}, {} events replayed, torn tail {}",
            acks.len(),
            recovery.snapshot_lsn,
            recovery.events_replayed,
            recovery.wal.torn_tail.is_some()
        );
    }
    assert!(
        acked_total > 100,
        "too little work to mean anything: {acked_total} acks"
    );
}
