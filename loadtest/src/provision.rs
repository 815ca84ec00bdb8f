//! Provisioning through the admin API: tenants on a plan, one key each, credits, and a
//! small seed batch whose batch, items and first video the read ops use.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A provisioned tenant.
#[derive(Debug, Clone)]
pub struct Tenant {
    /// `ten_…`.
    pub id: String,
    /// Its API key (every scope).
    pub key: String,
    /// Its seed batch.
    pub batch: String,
    /// A video of the seed batch.
    pub video: String,
    /// Credits its creations were charged since its last top-up (steady funding sizes
    /// the next top-up with it; see `funding.rs`). Shared by the run's request tasks.
    pub owed: Arc<AtomicU64>,
}
/// Requests in flight while provisioning.
const CONCURRENCY: usize = 64;
/// Items of the seed batch (retries and three chances make a video near certain).
const SEED_ITEMS: usize = 3;
/// Longest wait for the seed batches.
const SEED_WAIT: Duration = Duration::from_secs(180);

async fn call(rb: reqwest::RequestBuilder, what: &str) -> Result<Value, String> {
    let r = rb.send().await.map_err(|e| format!("{what}: {e}"))?;
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        return Err(format!("{what}: {status}: {v}"));
    }
    Ok(v)
}

async fn one(
    http: reqwest::Client,
    base: String,
    admin: String,
    plan: String,
    i: usize,
    credits: u64,
) -> Result<(String, String, String), String> {
    let t = call(
        http.post(format!("{base}/admin/v1/tenants"))
            .bearer_auth(&admin)
            .json(&json!({"name": format!("load-{i}"), "plan": plan})),
        "create tenant",
    )
    .await?;
    let id = t["id"].as_str().ok_or("tenant without id")?.to_owned();
    let k = call(
        http.post(format!("{base}/admin/v1/tenants/{id}/keys"))
            .bearer_auth(&admin)
            .json(&json!({"name": "load"})),
        "create key",
    )
    .await?;
    let key = k["key"].as_str().ok_or("key without secret")?.to_owned();
    call(
        http.post(format!("{base}/admin/v1/tenants/{id}/top-ups"))
            .bearer_auth(&admin)
            .header("idempotency-key", format!("load-fund-{id}"))
            .json(&json!({"amount": credits, "kind": "paid"})),
        "top up",
    )
    .await?;
    let scenes: Vec<String> = (0..SEED_ITEMS).map(|n| format!("seed {n}")).collect();
    let b = call(
        http.post(format!("{base}/v1/batches"))
            .bearer_auth(&key)
            .header("idempotency-key", format!("load-seed-{id}"))
            .json(&json!({"template": "{s}", "variables": {"s": scenes}})),
        "seed batch",
    )
    .await?;
    let batch = b["id"].as_str().ok_or("batch without id")?.to_owned();
    Ok((id, key, batch))
}

async fn video_of(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    batch: &str,
    deadline: Instant,
) -> Result<String, String> {
    loop {
        let b = call(
            http.get(format!("{base}/v1/batches/{batch}"))
                .bearer_auth(key),
            "read seed batch",
        )
        .await?;
        let status = b["status"].as_str().unwrap_or("");
        if ["completed", "partial", "failed", "canceled"].contains(&status) {
            let items = call(
                http.get(format!("{base}/v1/batches/{batch}/items"))
                    .bearer_auth(key),
                "read seed items",
            )
            .await?;
            return items["data"]
                .as_array()
                .and_then(|a| a.iter().find_map(|i| i["video_id"].as_str()))
                .map(str::to_owned)
                .ok_or_else(|| format!("seed batch {batch} made no video"));
        }
        if Instant::now() > deadline {
            return Err(format!("seed batch {batch} did not finish in time"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Provisions `n` tenants on `plan`, each with `credits`. Tenants whose seed made no video are dropped (with
/// a note on stderr); fewer than half left is an error.
pub async fn provision(
    http: &reqwest::Client,
    base: &str,
    admin: &str,
    plan: &str,
    n: usize,
    credits: u64,
) -> Result<Vec<Tenant>, String> {
    let sem = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let permit = Arc::clone(&sem)
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let (http, base, admin, plan) = (
            http.clone(),
            base.to_owned(),
            admin.to_owned(),
            plan.to_owned(),
        );
        handles.push(tokio::spawn(async move {
            let r = one(http, base, admin, plan, i, credits).await;
            drop(permit);
            r
        }));
    }
    let mut created = Vec::with_capacity(n);
    for h in handles {
        created.push(h.await.map_err(|e| e.to_string())??);
    }
    let deadline = Instant::now() + SEED_WAIT;
    let mut tenants = Vec::with_capacity(n);
    let mut handles = Vec::with_capacity(n);
    for (id, key, batch) in created {
        let permit = Arc::clone(&sem)
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let (http, base) = (http.clone(), base.to_owned());
        handles.push(tokio::spawn(async move {
            let v = video_of(&http, &base, &key, &batch, deadline).await;
            drop(permit);
            (id, key, batch, v)
        }));
    }
    for h in handles {
        let (id, key, batch, v) = h.await.map_err(|e| e.to_string())?;
        match v {
            Ok(video) => tenants.push(Tenant {
                id,
                key,
                batch,
                video,
                owed: Arc::default(),
            }),
            Err(e) => eprintln!("loadtest: tenant {id} left out: {e}"),
        }
    }
    if tenants.len() * 2 < n {
        return Err(format!(
            "only {} of {n} tenants could be provisioned",
            tenants.len()
        ));
    }
    Ok(tenants)
}
