//! `reelbatch demo`: the seed deck's pilot, end to end, on embedded defaults.
//!
//! In a fresh temporary data directory it starts the real server in-process (the same
//! `serve` as `reelbatch serve`), then drives it over HTTP like a customer would: a pro
//! tenant and key, a top-up, a local webhook receiver, a quote, and a 20-video batch
//! (4 styles × 5 scenes; one scene carries `[reject]`, one `[flaky]`, so refunds and
//! retries show). A live progress bar, then a report: outcome, credits held / settled /
//! released, the wallet before and after, the statement, the webhook events with their
//! signature check, where the videos are, and the reconciliation. `--keep` leaves the
//! server running.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cli::client::Client;
use crate::cli::progress::BatchProgress;
use crate::config::Config;
use crate::webhooks::sign;

/// The demo's calls: every failure ends the demo with its message.
struct Demo(Client);

impl Demo {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
        idempotency_key: Option<&str>,
    ) -> Result<Value, String> {
        self.0
            .call(method.clone(), path, token, body.as_ref(), idempotency_key)
            .await
            .map_err(|e| format!("{method} {path}: {e}"))
    }
}

/// The whole demo is bounded by this.
const DEADLINE: Duration = Duration::from_secs(120);

/// A webhook request the local receiver got.
#[derive(Debug, Clone)]
struct Received {
    /// Method and path: printed for a request that does not verify (diagnosis).
    target: String,
    id: String,
    timestamp: String,
    signature: String,
    body: Vec<u8>,
}

/// Runs the demo; the exit code is 0 when the batch finished and reconciliation is empty.
pub fn run(keep: bool) -> u8 {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("demo")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("reelbatch demo: cannot start the runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(demo(keep)) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("reelbatch demo: {e}");
            1
        }
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn receiver() -> Result<(String, Arc<Mutex<Vec<Received>>>), String> {
    let got: Arc<Mutex<Vec<Received>>> = Arc::default();
    let g = Arc::clone(&got);
    let app = axum::Router::new().fallback(
        move |method: axum::http::Method,
              uri: axum::http::Uri,
              headers: axum::http::HeaderMap,
              body: axum::body::Bytes| {
            let g = Arc::clone(&g);
            async move {
                let h = |n: &str| {
                    headers
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                g.lock().expect("not poisoned").push(Received {
                    target: format!("{method} {uri}"),
                    id: h("webhook-id"),
                    timestamp: h("webhook-timestamp"),
                    signature: h("webhook-signature"),
                    body: body.to_vec(),
                });
                axum::http::StatusCode::NO_CONTENT
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("webhook receiver: {e}"))?;
    let url = format!(
        "http://{}/webhooks",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, got))
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

async fn demo(keep: bool) -> Result<bool, String> {
    let started = Instant::now();
    let mut cfg = Config::load(None).map_err(|e| e.to_string())?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let dir = std::env::temp_dir().join(format!("reelbatch-demo-{}-{now_ms}", std::process::id()));
    let mut token = [0u8; 16];
    getrandom::fill(&mut token).map_err(|e| e.to_string())?;
    let admin = crate::hex(&token);
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    cfg.admin_token = admin.clone();
    cfg.public_url = format!("http://{listen}");
    // The receiver is on this machine: allow it (a real deployment keeps both false).
    cfg.webhooks.allow_private_targets = true;
    cfg.webhooks.allow_http = true;

    say("reelbatch demo — the pilot: one template, 20 videos, pay only for what succeeds");
    say(&format!("  data directory  {}", dir.display()));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (data, at) = (dir.clone(), listen.clone());
    let server = tokio::spawn(async move {
        crate::api::server::serve(
            cfg,
            data,
            &at,
            async move {
                let _ = stop_rx.await;
            },
            move |r| {
                let _ = ready_tx.send(r.addr);
            },
        )
        .await
    });
    let addr = tokio::time::timeout(Duration::from_secs(30), ready_rx)
        .await
        .map_err(|_| "the server did not start in 30 s".to_owned())?
        .map_err(|_| "the server stopped while starting".to_owned())?;
    let base = format!("http://{addr}");
    say(&format!("  server          {base}  (admin token {admin})"));
    let c = Demo(Client::new(&base, Duration::from_secs(30))?);
    use reqwest::Method;

    // A customer: tenant, key, credits, a webhook endpoint.
    let t = c
        .call(
            Method::POST,
            "/admin/v1/tenants",
            &admin,
            Some(json!({"name": "Acme Studio", "plan": "pro"})),
            None,
        )
        .await?;
    let tenant = t["id"].as_str().unwrap_or_default().to_owned();
    let k = c
        .call(
            Method::POST,
            &format!("/admin/v1/tenants/{tenant}/keys"),
            &admin,
            Some(json!({"name": "demo"})),
            None,
        )
        .await?;
    let key = k["key"].as_str().unwrap_or_default().to_owned();
    let (hook_url, received) = receiver().await?;
    let ep = c
        .call(
            Method::POST,
            "/v1/webhook-endpoints",
            &key,
            Some(json!({"url": hook_url})),
            None,
        )
        .await?;
    let secret = ep["secret"].as_str().unwrap_or_default().to_owned();
    c.call(
        Method::POST,
        &format!("/admin/v1/tenants/{tenant}/top-ups"),
        &admin,
        Some(json!({"amount": 2000, "kind": "paid"})),
        Some("demo-top-up"),
    )
    .await?;
    let before = c.call(Method::GET, "/v1/wallet", &key, None, None).await?;
    say(&format!(
        "  tenant          {tenant} (pro), key {}",
        k["id"].as_str().unwrap_or("")
    ));
    say(&format!("  webhooks        {hook_url}"));
    say(&format!(
        "  wallet before   {} available",
        before["available"]
    ));

    // The pilot: 4 styles × 5 scenes.
    let batch = json!({
        "template": "{style} shot of {scene}",
        "variables": {
            "style": ["cinematic", "watercolor", "neon", "claymation"],
            "scene": ["a lighthouse at dawn", "a rainy street [flaky]", "a desert caravan",
                      "a mountain lake", "a crowded market [reject]"],
        },
    });
    let q = c
        .call(
            Method::POST,
            "/v1/batches/quote",
            &key,
            Some(batch.clone()),
            None,
        )
        .await?;
    say(&format!(
        "  quote           {} videos × {} credits = {} credits  (e.g. \"{}\")",
        q["items"],
        q["unit_price"],
        q["total"],
        q["sample_prompts"][0].as_str().unwrap_or("")
    ));
    let b = c
        .call(
            Method::POST,
            "/v1/batches",
            &key,
            Some(batch),
            Some("demo-pilot"),
        )
        .await?;
    let id = b["id"].as_str().unwrap_or_default().to_owned();
    say(&format!(
        "  batch           {id}: {} credits held",
        b["credits"]["held"]
    ));
    let mut bar = BatchProgress::new(20);
    let fin = loop {
        let v = c
            .call(Method::GET, &format!("/v1/batches/{id}"), &key, None, None)
            .await?;
        bar.update(&v);
        if ["completed", "partial", "failed", "canceled"]
            .contains(&v["status"].as_str().unwrap_or(""))
        {
            bar.finish(&v);
            break v;
        }
        if started.elapsed() > DEADLINE {
            return Err(format!("the batch did not finish within {DEADLINE:?}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let after = c.call(Method::GET, "/v1/wallet", &key, None, None).await?;
    // The final event usually lands within milliseconds; give it a few seconds.
    let final_type = format!("batch.{}", fin["status"].as_str().unwrap_or(""));
    let wait_until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < wait_until {
        let seen = received.lock().expect("not poisoned").iter().any(|r| {
            serde_json::from_slice::<Value>(&r.body).is_ok_and(|v| v["type"] == final_type.as_str())
        });
        if seen {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let statement = c
        .call(Method::GET, "/v1/wallet/statement", &key, None, None)
        .await?;
    let recon = c
        .call(Method::GET, "/admin/v1/reconciliation", &admin, None, None)
        .await?;
    let items = c
        .call(
            Method::GET,
            &format!("/v1/batches/{id}/items?limit=50"),
            &key,
            None,
            None,
        )
        .await?;
    let first_video = items["data"]
        .as_array()
        .and_then(|a| a.iter().find_map(|i| i["video_id"].as_str()))
        .unwrap_or_default()
        .to_owned();

    // The report.
    let cr = &fin["credits"];
    let counts = &fin["counts"];
    say("");
    say(&format!(
        "batch {id}: {}",
        fin["status"].as_str().unwrap_or("?")
    ));
    say(&format!(
        "  videos          {} succeeded, {} failed (refunded), {} canceled, of {}",
        counts["succeeded"], counts["failed"], counts["canceled"], counts["total"]
    ));
    say(&format!(
        "  credits         held {}  settled {}  released {}  remaining {}",
        cr["held"], cr["settled"], cr["released"], cr["remaining"]
    ));
    say(&format!(
        "  wallet          before {}  after {}  (spent {}, held {})",
        before["available"], after["available"], after["spent"], after["held"]
    ));
    say(&format!(
        "  statement       opening {}  top-ups {}  held {}  settled {}  released {}  closing {} (+{} held)",
        statement["opening"]["available"],
        statement["top_ups"],
        statement["held"],
        statement["settled"],
        statement["released"],
        statement["closing"]["available"],
        statement["closing"]["held"]
    ));
    if let Some(failed) = items["data"].as_array() {
        for i in failed.iter().filter(|i| i["status"] == "failed") {
            say(&format!(
                "  refunded        #{} {:?}: {}",
                i["index"],
                i["prompt"].as_str().unwrap_or(""),
                i["failure_code"].as_str().unwrap_or("")
            ));
        }
        let retried = failed
            .iter()
            .filter(|i| i["status"] == "succeeded" && i["attempts"].as_u64().unwrap_or(0) > 1)
            .count();
        say(&format!(
            "  retried         {retried} videos succeeded after transient failures (charged once)"
        ));
    }
    let got = received.lock().expect("not poisoned").clone();
    let mut by_type: std::collections::BTreeMap<String, usize> = Default::default();
    let mut verified = 0;
    for r in &got {
        let ts: u64 = r.timestamp.parse().unwrap_or(0);
        let expected = sign::signature(&secret, &r.id, ts, &r.body).unwrap_or_default();
        if r.signature.split(' ').any(|s| s == expected) {
            verified += 1;
        } else {
            // Whatever it was, show it: a failed demo must say what arrived.
            let body = String::from_utf8_lossy(&r.body[..r.body.len().min(300)]).into_owned();
            say(&format!(
                "  NOT VERIFIED    {} id={:?} timestamp={:?} signature={:?} body={body:?}",
                r.target, r.id, r.timestamp, r.signature
            ));
        }
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        *by_type
            .entry(v["type"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    let types: Vec<String> = by_type.iter().map(|(t, n)| format!("{t} ×{n}")).collect();
    say(&format!(
        "  webhooks        {} received, {verified} signatures verified: {}",
        got.len(),
        types.join(", ")
    ));
    say(&format!(
        "  videos          {}/videos/ (the local object store)",
        dir.display()
    ));
    if !first_video.is_empty() {
        say(&format!(
            "  e.g.            {base}/v1/videos/{first_video}/content"
        ));
    }
    let discrepancies = recon["discrepancies"]
        .as_array()
        .map_or(usize::MAX, Vec::len);
    say(&format!(
        "  reconciliation  {} tenants, {} batches checked: {} discrepancies",
        recon["tenants_checked"], recon["batches_checked"], discrepancies
    ));
    say(&format!(
        "  took            {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    let ok = discrepancies == 0 && verified == got.len() && !got.is_empty();

    if keep {
        say("");
        say(&format!(
            "the server keeps running at {base} (Ctrl-C stops it)"
        ));
        say(&format!("  export U={base} K={key} A={admin}"));
        say("  curl -s $U/v1/batches -H \"Authorization: Bearer $K\"");
        crate::api::server::shutdown_signal().await;
    }
    let _ = stop_tx.send(());
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("server: {e}")),
        Err(e) => return Err(format!("server task: {e}")),
    }
    say(&format!(
        "data kept in {} (remove it when done)",
        dir.display()
    ));
    Ok(ok)
}
