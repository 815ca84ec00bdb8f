//! The crash campaign (issue 9, SPEC §10): the real server under concurrent batch
//! creations, top-ups and reads is killed with SIGKILL at a random moment, restarted from
//! the same data directory, and checked after every round:
//! - every acknowledged write is there (each top-up's ledger entry, each batch);
//! - no credit was created or destroyed: per wallet `available + held == granted +
//!   adjusted - spent - expired`, and across all wallets the grants equal the top-ups in
//!   the ledgers;
//! - every batch reaches a terminal state after the restart;
//! - the reconciliation is empty and every tenant's ledger chain verifies.
//!
//! CI runs `CRASH_ROUNDS` (default 20) rounds; the long run is by hand:
//! `CRASH_ROUNDS=500 CRASH_TRANSIENT_RATE=0.05 cargo test --release --test crash_campaign
//! -- --nocapture` (`CRASH_SEED` replays a campaign; the seed is printed).

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::campaign::{
    check, client, env_u64, next, offline_reconcile, provision, seed, Deadline, SERVER_ENV, WORKERS,
};
use support::Server;

#[test]
fn crash_rounds_lose_no_acknowledged_write_and_no_credit() {
    let rounds = env_u64("CRASH_ROUNDS", 20);
    let mut seed = seed("CRASH_SEED");
    println!("crash campaign: {rounds} rounds, CRASH_SEED={seed}");
    let rt = support::rt();
    // Transient provider failures retry after ≥ 1 s of backoff, which would make every
    // round wait: off in CI, on in the long run (`CRASH_TRANSIENT_RATE=0.05`).
    let transient = std::env::var("CRASH_TRANSIENT_RATE").unwrap_or_else(|_| "0".into());
    let mut env = SERVER_ENV.to_vec();
    env.push((
        "REELBATCH_PROVIDER__SIMULATED__TRANSIENT_FAILURE_RATE",
        transient.as_str(),
    ));
    let mut s = Server::start(&env);
    let (tenants, acked) = rt.block_on(provision(&s.api()));
    let tenants = Arc::new(tenants);
    let acked = Arc::new(Mutex::new(acked));
    let started = Instant::now();
    let (mut restart_s, mut check_s) = (0.0, 0.0);
    for round in 0..rounds {
        let api = s.api();
        let run_ms = 50 + next(&mut seed) % 400;
        let kill_at = Instant::now() + Duration::from_millis(next(&mut seed) % (run_ms + 1));
        let stop = Deadline::at(Instant::now() + Duration::from_millis(run_ms));
        rt.block_on(async {
            let handles: Vec<_> = (0..WORKERS)
                .map(|w| {
                    tokio::spawn(client(
                        api.clone(),
                        Arc::clone(&tenants),
                        Arc::clone(&acked),
                        round,
                        w,
                        next(&mut seed) | 1,
                        stop.clone(),
                    ))
                })
                .collect();
            tokio::time::sleep_until(kill_at.into()).await;
            // The crash: clients still running, writes in flight.
            s.kill9();
            for h in handles {
                let _tally = h.await.unwrap();
            }
        });
        let t = Instant::now();
        s.spawn().expect("the server restarts");
        restart_s += t.elapsed().as_secs_f64();
        let api = s.api();
        let a = acked.lock().unwrap();
        let t = Instant::now();
        rt.block_on(check(&api, &tenants, &a, round));
        check_s += t.elapsed().as_secs_f64();
        if round % 10 == 9 || round + 1 == rounds {
            println!(
                "  round {}: {} top-ups and {} batches acknowledged so far, {:.1} s \
                 ({restart_s:.1} s restarting, {check_s:.1} s checking)",
                round + 1,
                a.top_ups.len(),
                a.batches.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    // A graceful stop, then the offline reconciliation agrees.
    assert!(s.terminate().success());
    offline_reconcile(&s.dir);
}
