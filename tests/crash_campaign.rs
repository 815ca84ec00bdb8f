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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{Api, Server, ADMIN};

const TENANTS: usize = 4;
/// Concurrent client tasks during a round.
const WORKERS: usize = 6;

fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// What the clients were told was done (acknowledged), across all rounds.
#[derive(Default)]
struct Acked {
    /// Top-up idempotency key → (tenant, amount).
    top_ups: BTreeMap<String, (String, u64)>,
    /// Batch id → tenant.
    batches: BTreeMap<String, String>,
}

async fn send(
    api: &Api,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<Value>,
    idem: Option<&str>,
) -> Option<(u16, Value)> {
    let mut rb = api
        .http
        .request(method, format!("{}{path}", api.base))
        .bearer_auth(token)
        .timeout(Duration::from_secs(10));
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    if let Some(k) = idem {
        rb = rb.header("idempotency-key", k);
    }
    let r = rb.send().await.ok()?;
    let status = r.status().as_u16();
    let v = r.json().await.ok()?;
    Some((status, v))
}

/// One client: random writes and reads until `stop`, recording what was acknowledged.
#[allow(clippy::too_many_arguments)]
async fn client(
    api: Api,
    tenants: Arc<Vec<(String, String)>>,
    acked: Arc<Mutex<Acked>>,
    round: u64,
    worker: usize,
    mut seed: u64,
    stop: Instant,
) {
    let mut n = 0u64;
    while Instant::now() < stop {
        n += 1;
        let (tenant, key) = &tenants[(next(&mut seed) % tenants.len() as u64) as usize];
        match next(&mut seed) % 10 {
            0..=2 => {
                let amount = 100 + next(&mut seed) % 900;
                let idem = format!("r{round}-w{worker}-n{n}");
                let r = send(
                    &api,
                    reqwest::Method::POST,
                    &format!("/admin/v1/tenants/{tenant}/top-ups"),
                    ADMIN,
                    Some(json!({"amount": amount, "kind": "paid"})),
                    Some(&idem),
                )
                .await;
                if let Some((201, _)) = r {
                    acked
                        .lock()
                        .unwrap()
                        .top_ups
                        .insert(idem, (tenant.clone(), amount));
                }
            }
            3..=5 => {
                let scenes = ["rain", "dawn", "a market [reject]", "snow"];
                let k = 1 + (next(&mut seed) % 4) as usize;
                let body = json!({
                    "template": "{a} at {b}",
                    "variables": {"a": ["fox", "owl"], "b": scenes[..k]},
                    "request_id": format!("r{round}-w{worker}-b{n}"),
                });
                let r = send(
                    &api,
                    reqwest::Method::POST,
                    "/v1/batches",
                    key,
                    Some(body),
                    None,
                )
                .await;
                if let Some((201, v)) = r {
                    let id = v["id"].as_str().unwrap_or_default().to_owned();
                    acked.lock().unwrap().batches.insert(id, tenant.clone());
                }
            }
            6..=7 => {
                let _ = send(&api, reqwest::Method::GET, "/v1/wallet", key, None, None).await;
            }
            _ => {
                let _ = send(&api, reqwest::Method::GET, "/v1/batches", key, None, None).await;
            }
        }
    }
}

/// Every page of a list route.
async fn all_pages(api: &Api, path: &str, token: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10_000 {
        let sep = if path.contains('?') { '&' } else { '?' };
        let p = match &cursor {
            Some(c) => format!("{path}{sep}limit=500&cursor={c}"),
            None => format!("{path}{sep}limit=500"),
        };
        let r = api.call("GET", &p, Some(token), None, None).await;
        assert_eq!(r.status, 200, "{p}: {}", r.text);
        out.extend(r.body["data"].as_array().cloned().unwrap_or_default());
        match r.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return out,
        }
    }
    panic!("{path}: more pages than any test makes");
}

/// The checks after a restart.
async fn check(api: &Api, tenants: &[(String, String)], acked: &Acked, round: u64) {
    // Every batch reaches a terminal state (the simulated provider is fast).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut all_batches: BTreeSet<String> = BTreeSet::new();
    for (_, key) in tenants {
        loop {
            let list = all_pages(api, "/v1/batches", key).await;
            let open: Vec<&Value> = list
                .iter()
                .filter(|b| {
                    !["completed", "partial", "failed", "canceled"]
                        .contains(&b["status"].as_str().unwrap_or(""))
                })
                .collect();
            if open.is_empty() {
                all_batches.extend(list.iter().map(|b| b["id"].as_str().unwrap().to_owned()));
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: batches never finished: {open:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Every acknowledged batch is there.
    for id in acked.batches.keys() {
        assert!(
            all_batches.contains(id),
            "round {round}: acknowledged batch {id} is gone"
        );
    }
    // Every acknowledged top-up is in its tenant's ledger, with its amount; money is
    // conserved per wallet and overall.
    let (mut grants_total, mut ledger_top_ups_total) = (0u128, 0u128);
    for (tenant, key) in tenants {
        let ledger = all_pages(api, "/v1/wallet/ledger", key).await;
        let top_ups: BTreeMap<String, u64> = ledger
            .iter()
            .filter(|e| e["kind"] == "top_up")
            .filter_map(|e| Some((e["request_id"].as_str()?.to_owned(), e["amount"].as_u64()?)))
            .collect();
        for (idem, (t, amount)) in &acked.top_ups {
            if t == tenant {
                assert_eq!(
                    top_ups.get(idem),
                    Some(amount),
                    "round {round}: acknowledged top-up {idem} of {tenant} is missing"
                );
            }
        }
        ledger_top_ups_total += top_ups.values().map(|&a| a as u128).sum::<u128>();
        let w = api
            .call("GET", "/v1/wallet", Some(key), None, None)
            .await
            .body;
        let n = |k: &str| w[k].as_i64().unwrap_or_else(|| panic!("{k} in {w}")) as i128;
        assert_eq!(
            n("available") + n("held"),
            n("granted") + n("adjusted") - n("spent") - n("expired"),
            "round {round}: {tenant} does not conserve credits: {w}"
        );
        assert_eq!(n("held"), 0, "round {round}: all batches finished: {w}");
        grants_total += n("granted") as u128;
    }
    assert_eq!(
        grants_total, ledger_top_ups_total,
        "round {round}: credits granted differ from the top-ups in the ledgers"
    );
    // The reconciliation is empty and every chain verifies.
    let r = api
        .call("GET", "/admin/v1/reconciliation", Some(ADMIN), None, None)
        .await;
    assert_eq!(
        r.body["discrepancies"],
        json!([]),
        "round {round}: {}",
        r.text
    );
    for (tenant, _) in tenants {
        let r = api
            .call(
                "GET",
                &format!("/admin/v1/tenants/{tenant}/ledger/export"),
                Some(ADMIN),
                None,
                None,
            )
            .await;
        let last: Value = serde_json::from_str(r.text.lines().last().unwrap()).unwrap();
        assert_eq!(last["verified"], true, "round {round}: {tenant}: {last}");
    }
}

#[test]
fn crash_rounds_lose_no_acknowledged_write_and_no_credit() {
    let rounds: u64 = std::env::var("CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("crash campaign: {rounds} rounds, CRASH_SEED={seed}");
    let rt = support::rt();
    // Transient provider failures retry after ≥ 1 s of backoff, which would make every
    // round wait: off in CI, on in the long run (`CRASH_TRANSIENT_RATE=0.05`).
    let transient = std::env::var("CRASH_TRANSIENT_RATE").unwrap_or_else(|_| "0".into());
    let mut s = Server::start(&[
        // Refusals happen ([reject]); snapshots are frequent so kills land around them.
        (
            "REELBATCH_PROVIDER__SIMULATED__TRANSIENT_FAILURE_RATE",
            transient.as_str(),
        ),
        ("REELBATCH_SNAPSHOTS__EVERY_EVENTS", "300"),
        ("REELBATCH_SNAPSHOTS__EVERY_S", "1"),
        ("REELBATCH_PLANS__PRO__RATE_PER_S", "100000"),
        ("REELBATCH_PLANS__PRO__BURST", "100000"),
        ("REELBATCH_PLANS__PRO__ITEMS_PER_DAY", "100000000"),
    ]);
    let tenants: Vec<(String, String)> = rt.block_on(async {
        let api = s.api();
        let mut v = Vec::new();
        for _ in 0..TENANTS {
            v.push(api.funded("pro", 50_000).await);
        }
        v
    });
    let mut acked = Acked::default();
    for (t, _) in &tenants {
        acked
            .top_ups
            .insert(format!("fund-{t}"), (t.clone(), 50_000));
    }
    let tenants = Arc::new(tenants);
    let acked = Arc::new(Mutex::new(acked));
    let started = Instant::now();
    let (mut restart_s, mut check_s) = (0.0, 0.0);
    for round in 0..rounds {
        let api = s.api();
        let run_ms = 50 + next(&mut seed) % 400;
        let kill_at = Instant::now() + Duration::from_millis(next(&mut seed) % (run_ms + 1));
        let stop = Instant::now() + Duration::from_millis(run_ms);
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
                        stop,
                    ))
                })
                .collect();
            tokio::time::sleep_until(kill_at.into()).await;
            // The crash: clients still running, writes in flight.
            s.kill9();
            for h in handles {
                h.await.unwrap();
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
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_reelbatch"))
        .args(["reconcile", "--data-dir", s.dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
