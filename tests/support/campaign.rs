//! What the crash and fault campaigns share: the clients that write and read while the
//! server is killed or its disk fails, the record of what they were told was done, and the
//! checks after a restart.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{Api, ADMIN};

pub const TENANTS: usize = 4;
/// Concurrent client tasks during a round.
pub const WORKERS: usize = 6;
/// Server settings for a campaign: the clients are never rate-limited, snapshots are
/// frequent so that failures land around them.
pub const SERVER_ENV: &[(&str, &str)] = &[
    ("REELBATCH_SNAPSHOTS__EVERY_EVENTS", "300"),
    ("REELBATCH_SNAPSHOTS__EVERY_S", "1"),
    ("REELBATCH_PLANS__PRO__RATE_PER_S", "100000"),
    ("REELBATCH_PLANS__PRO__BURST", "100000"),
    ("REELBATCH_PLANS__PRO__ITEMS_PER_DAY", "100000000"),
];

pub fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// What the clients were told was done (acknowledged), across all rounds.
#[derive(Default)]
pub struct Acked {
    /// Top-up idempotency key → (tenant, amount).
    pub top_ups: BTreeMap<String, (String, u64)>,
    /// Batch id → tenant.
    pub batches: BTreeMap<String, String>,
}

pub async fn send(
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

/// The number in environment variable `var`, or `default`.
pub fn env_u64(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The campaign's seed: `var` replays an earlier campaign, else one from the clock.
pub fn seed(var: &str) -> u64 {
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    env_u64(var, clock) | 1
}

/// Credits each campaign tenant starts with.
pub const FUNDING: u64 = 50_000;

/// `TENANTS` funded pro tenants with a key each, and their funding as acknowledged.
pub async fn provision(api: &Api) -> (Vec<(String, String)>, Acked) {
    let mut tenants = Vec::new();
    let mut acked = Acked::default();
    for _ in 0..TENANTS {
        let (t, k) = api.funded("pro", FUNDING).await;
        acked
            .top_ups
            .insert(format!("fund-{t}"), (t.clone(), FUNDING));
        tenants.push((t, k));
    }
    (tenants, acked)
}

/// When clients stop; movable while they run (shared by clones).
#[derive(Clone, Debug)]
pub struct Deadline(Arc<Mutex<Instant>>);

impl Deadline {
    pub fn at(t: Instant) -> Deadline {
        Deadline(Arc::new(Mutex::new(t)))
    }

    /// Moves the deadline for every clone.
    pub fn set(&self, t: Instant) {
        *self.0.lock().unwrap() = t;
    }

    fn passed(&self) -> bool {
        Instant::now() >= *self.0.lock().unwrap()
    }
}

/// What one client saw of its writes.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    /// Writes answered 201 (and recorded in `Acked`).
    pub acked: u64,
    /// Writes refused with 503 `unavailable` (a poisoned log).
    pub refused: u64,
    /// Writes with no answer (connection closed by a crash, or a timeout).
    pub unanswered: u64,
}

impl Tally {
    fn count(&mut self, r: &Option<(u16, Value)>) {
        match r {
            Some((201, _)) => self.acked += 1,
            Some((503, v)) => {
                assert_eq!(v["code"], "unavailable", "a 503 is `unavailable`: {v}");
                self.refused += 1;
            }
            Some(_) => {}
            None => self.unanswered += 1,
        }
    }

    /// The sum of two tallies.
    pub fn add(self, o: Tally) -> Tally {
        Tally {
            acked: self.acked + o.acked,
            refused: self.refused + o.refused,
            unanswered: self.unanswered + o.unanswered,
        }
    }
}

/// One client: random writes and reads until `stop`, recording what was acknowledged.
#[allow(clippy::too_many_arguments)]
pub async fn client(
    api: Api,
    tenants: Arc<Vec<(String, String)>>,
    acked: Arc<Mutex<Acked>>,
    round: u64,
    worker: usize,
    mut seed: u64,
    stop: Deadline,
) -> Tally {
    let mut tally = Tally::default();
    let mut n = 0u64;
    while !stop.passed() {
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
                tally.count(&r);
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
                tally.count(&r);
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
    tally
}

/// Every page of a list route.
pub async fn all_pages(api: &Api, path: &str, token: &str) -> Vec<Value> {
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
pub async fn check(api: &Api, tenants: &[(String, String)], acked: &Acked, round: u64) {
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

/// The offline reconciliation (`reelbatch reconcile`) over a stopped server's `data`
/// exits 0.
pub fn offline_reconcile(data: &std::path::Path) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_reelbatch"))
        .args(["reconcile", "--data-dir", data.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
