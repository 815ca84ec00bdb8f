//! Webhooks over real HTTP: a real server process delivers to a real receiving server on
//! loopback. Signatures are checked by an implementation of the Standard Webhooks spec
//! written here, independent of the server's; retries run on a compressed schedule from
//! config; crashes are SIGKILL.

mod support;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use support::{rt, Api, Server};

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Got {
    path: String,
    id: String,
    timestamp: String,
    signature: String,
    body: Vec<u8>,
    at: Instant,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }
    fn kind(&self) -> String {
        self.json()["type"].as_str().unwrap_or_default().to_owned()
    }
}

/// Answers to give, in order: (status, Retry-After seconds).
type Script = Arc<Mutex<VecDeque<(u16, Option<u64>)>>>;

/// A receiving server: records every request, answers from a script (then `fallback`).
#[derive(Clone)]
struct Receiver {
    got: Arc<Mutex<Vec<Got>>>,
    script: Script,
    fallback: Arc<Mutex<u16>>,
    base: String,
}

impl Receiver {
    async fn start() -> Receiver {
        let got: Arc<Mutex<Vec<Got>>> = Arc::default();
        let script: Script = Arc::default();
        let fallback = Arc::new(Mutex::new(200u16));
        let (g, s, f) = (got.clone(), script.clone(), fallback.clone());
        let app = axum::Router::new().fallback(
            move |uri: axum::http::Uri, headers: HeaderMap, body: axum::body::Bytes| {
                let (g, s, f) = (g.clone(), s.clone(), f.clone());
                async move {
                    let h = |n: &str| {
                        headers
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    g.lock().unwrap().push(Got {
                        path: uri.path().to_owned(),
                        id: h("webhook-id"),
                        timestamp: h("webhook-timestamp"),
                        signature: h("webhook-signature"),
                        body: body.to_vec(),
                        at: Instant::now(),
                    });
                    let (status, retry_after) = s
                        .lock()
                        .unwrap()
                        .pop_front()
                        .unwrap_or((*f.lock().unwrap(), None));
                    let mut r =
                        (StatusCode::from_u16(status).unwrap(), "receiver says no").into_response();
                    if let Some(ra) = retry_after {
                        r.headers_mut().insert("retry-after", ra.into());
                    }
                    r
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver {
            got,
            script,
            fallback,
            base,
        }
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// Waits (bounded) until `pred` holds over what was received.
    async fn wait_for(&self, what: &str, pred: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.got();
            if pred(&got) {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "receiver never saw {what}; got {:#?}",
                got.iter()
                    .map(|g| (g.path.clone(), g.kind()))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Standard Webhooks verification, written from the spec: the signed content is
/// `id.timestamp.body`, the key is the base64 part of `whsec_…`, the header holds
/// space-separated `v1,<base64 HMAC-SHA256>` entries, and one match is enough.
fn verifies(secret: &str, g: &Got) -> bool {
    let key = STANDARD
        .decode(secret.strip_prefix("whsec_").expect("whsec_ prefix"))
        .expect("base64 secret");
    let ts: i64 = g.timestamp.parse().expect("numeric timestamp");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    if (now - ts).abs() > 300 {
        return false; // the spec's replay window
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.", g.id, g.timestamp).as_bytes());
    mac.update(&g.body);
    let expected = STANDARD.encode(mac.finalize().into_bytes());
    g.signature
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .any(|s| s == expected)
}

/// Env of a server that may call the loopback receiver, with a fast schedule.
fn hook_env(schedule: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("REELBATCH_WEBHOOKS__ALLOW_PRIVATE_TARGETS", "true"),
        ("REELBATCH_WEBHOOKS__ALLOW_HTTP", "true"),
        ("REELBATCH_WEBHOOKS__RETRY_SCHEDULE_S", schedule),
    ]
}

/// Registers an endpoint; (id, secret).
async fn endpoint(api: &Api, key: &str, url: &str, events: Option<Value>) -> (String, String) {
    let mut body = json!({"url": url, "description": "test receiver"});
    if let Some(e) = events {
        body["events"] = e;
    }
    let r = api.post(key, "/v1/webhook-endpoints", &body, None).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let secret = r.body["secret"].as_str().expect("secret").to_owned();
    assert!(secret.starts_with("whsec_"), "{secret}");
    (r.body["id"].as_str().unwrap().to_owned(), secret)
}

/// Polls `probe` (bounded) until it yields a value.
async fn until<T, Fut: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut probe: impl FnMut() -> Fut,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The first delivery matching `query`, once there is one.
async fn first_delivery(api: &Api, key: &str, query: &str) -> Value {
    until(query, || async {
        deliveries(api, key, query).await.first().cloned()
    })
    .await
}

/// An endpoint once its status is `status`.
async fn endpoint_when(api: &Api, key: &str, ep: &str, status: &str) -> Value {
    until(status, || async {
        let r = api.get(key, &format!("/v1/webhook-endpoints/{ep}")).await;
        (r.body["status"] == status).then_some(r.body)
    })
    .await
}

async fn deliveries(api: &Api, key: &str, query: &str) -> Vec<Value> {
    let r = api
        .get(key, &format!("/v1/webhook-deliveries{query}"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["data"].as_array().unwrap().clone()
}

#[test]
fn events_are_signed_and_carry_the_credit_figures() {
    rt().block_on(async {
        let rx = Receiver::start().await;
        let server = Server::start(&hook_env("[0, 0.2, 0.2]"));
        let api = server.api();
        let (tenant, key) = api.funded("pro", 0).await;
        let (ep, secret) = endpoint(&api, &key, &format!("{}/hooks", rx.base), None).await;

        api.top_up(&tenant, 1000, "webhook-topup").await;
        let body = json!({"template": "a {x}", "variables": {"x": ["1", "2 [reject]", "3"]}});
        let r = api.post(&key, "/v1/batches", &body, None).await;
        assert_eq!(r.status, 201, "{}", r.text);
        let batch = r.body["id"].as_str().unwrap().to_owned();
        let done = api.wait_batch(&key, &batch).await;
        assert_eq!(done["status"], "partial");

        let got = rx
            .wait_for("batch.partial", |g| {
                g.iter().any(|g| g.kind() == "batch.partial")
            })
            .await;
        let kinds: Vec<String> = got.iter().map(Got::kind).collect();
        for k in [
            "wallet.topped_up",
            "batch.created",
            "batch.item.failed",
            "batch.partial",
        ] {
            assert_eq!(
                kinds.iter().filter(|x| *x == k).count(),
                1,
                "{k} in {kinds:?}"
            );
        }
        assert_eq!(
            kinds
                .iter()
                .filter(|x| *x == "batch.item.succeeded")
                .count(),
            2,
            "{kinds:?}"
        );
        for g in &got {
            assert_eq!(g.path, "/hooks");
            assert!(verifies(&secret, g), "signature does not verify: {g:?}");
            assert!(!verifies("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", g));
            let v = g.json();
            assert_eq!(v["id"], g.id.as_str(), "webhook-id is the event id");
            assert!(g.id.starts_with("evt_"));
            assert!(v["created_at"].is_string());
        }
        let ev = |k: &str| got.iter().find(|g| g.kind() == k).unwrap().json();
        let top = ev("wallet.topped_up");
        assert_eq!(top["data"]["amount"], 1000);
        assert_eq!(top["data"]["balances"]["available"], 1000);
        let fin = ev("batch.partial")["data"]["batch"].clone();
        assert_eq!(fin["id"], batch.as_str());
        assert_eq!(
            fin["credits"],
            json!({"held": 120, "settled": 80, "released": 40, "remaining": 0})
        );
        assert_eq!(fin["counts"]["succeeded"], 2);
        assert_eq!(fin["counts"]["failed"], 1);
        // Item events alone add up to the batch's final figures.
        let (mut settled, mut released) = (0, 0);
        for g in got.iter().filter(|g| g.kind().starts_with("batch.item.")) {
            let c = &g.json()["data"]["item"]["credits"];
            settled += c["settled"].as_u64().unwrap_or(0);
            released += c["released"].as_u64().unwrap_or(0);
        }
        assert_eq!((settled, released), (80, 40));
        let failed = ev("batch.item.failed")["data"]["item"].clone();
        assert_eq!(failed["failure_code"], "safety.prompt_rejected");
        assert_eq!(failed["index"], 1);

        // Low balance: an event when `available` crosses the threshold downwards.
        let r = api
            .call(
                "PATCH",
                "/v1/wallet",
                Some(&key),
                Some(&json!({"low_balance_threshold": 900})),
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["low_balance_threshold"], 900);
        assert_eq!(r.body["available"], 920);
        let one = json!({"template": "one more"});
        let r = api.post(&key, "/v1/batches", &one, None).await;
        assert_eq!(r.status, 201, "{}", r.text);
        api.wait_batch(&key, r.body["id"].as_str().unwrap()).await;
        let got = rx
            .wait_for("wallet.low_balance", |g| {
                g.iter().filter(|g| g.kind() == "batch.completed").count() == 1
                    && g.iter().any(|g| g.kind() == "wallet.low_balance")
            })
            .await;
        let low: Vec<Value> = got
            .iter()
            .filter(|g| g.kind() == "wallet.low_balance")
            .map(Got::json)
            .collect();
        assert_eq!(low.len(), 1, "one crossing, one event");
        assert_eq!(low[0]["data"]["threshold"], 900);
        assert_eq!(low[0]["data"]["balances"]["available"], 880);

        // The delivery log: one successful attempt each, filters work.
        let all = deliveries(&api, &key, "").await;
        assert_eq!(all.len(), 10, "{all:#?}");
        for d in &all {
            assert_eq!(d["status"], "succeeded", "{d}");
            assert_eq!(d["endpoint_id"], ep.as_str());
            assert_eq!(d["attempts"][0]["status"], 200);
            assert!(d["event"]["id"].as_str().unwrap().starts_with("evt_"));
        }
        let partial = deliveries(&api, &key, "?event_type=batch.partial").await;
        assert_eq!(partial.len(), 1);
        let page = deliveries(&api, &key, "?limit=4").await;
        assert_eq!(page.len(), 4);
        let r = api.get(&key, "/v1/webhook-deliveries?limit=4").await;
        let cursor = r.body["next_cursor"].as_str().unwrap().to_owned();
        let rest = deliveries(&api, &key, &format!("?limit=4&cursor={cursor}")).await;
        assert_eq!(rest.len(), 4);

        // Filters are kept: an endpoint for batch.completed only gets nothing here.
        let (_, _) = endpoint(
            &api,
            &key,
            &format!("{}/only-completed", rx.base),
            Some(json!(["batch.completed"])),
        )
        .await;
        api.top_up(&tenant, 5, "webhook-topup-2").await;
        rx.wait_for("the second top-up", |g| {
            g.iter().filter(|g| g.kind() == "wallet.topped_up").count() == 2
        })
        .await;
        assert!(rx.got().iter().all(|g| g.path == "/hooks"));

        // Another tenant sees none of it.
        let (_, other) = api.funded("pro", 0).await;
        api.get(&other, &format!("/v1/webhook-endpoints/{ep}"))
            .await
            .assert_problem(404, "not_found");
        let d = &all[0]["id"].as_str().unwrap();
        api.get(&other, &format!("/v1/webhook-deliveries/{d}"))
            .await
            .assert_problem(404, "not_found");
        api.post(
            &other,
            &format!("/v1/webhook-deliveries/{d}/redeliver"),
            &json!({}),
            None,
        )
        .await
        .assert_problem(404, "not_found");
        assert!(deliveries(&api, &other, "").await.is_empty());
        assert_eq!(api.reconcile().await["discrepancies"], json!([]));
    });
}

#[test]
fn retries_follow_the_schedule_and_retry_after_then_410_disables() {
    rt().block_on(async {
        let rx = Receiver::start().await;
        let server = Server::start(&hook_env("[0, 0.3, 0.3]"));
        let api = server.api();
        let (tenant, key) = api.funded("pro", 0).await;
        let (ep, _) = endpoint(&api, &key, &format!("{}/a", rx.base), None).await;

        // 500, then 429 asking for 2 s, then success.
        rx.script
            .lock()
            .unwrap()
            .extend([(500, None), (429, Some(2)), (200, None)]);
        api.top_up(&tenant, 10, "retry-1").await;
        let got = rx.wait_for("three attempts", |g| g.len() == 3).await;
        assert!(
            got.iter().all(|g| g.id == got[0].id),
            "webhook-id is stable"
        );
        let gap1 = got[1].at - got[0].at;
        let gap2 = got[2].at - got[1].at;
        assert!(
            gap1 >= Duration::from_millis(260),
            "schedule (0.3 s ± 10%): {gap1:?}"
        );
        assert!(
            gap2 >= Duration::from_millis(1900),
            "Retry-After 2 s: {gap2:?}"
        );
        let d = deliveries(&api, &key, "").await;
        let a = &d[0]["attempts"];
        assert_eq!(d[0]["status"], "succeeded");
        assert_eq!(
            [&a[0]["status"], &a[1]["status"], &a[2]["status"]],
            [&json!(500), &json!(429), &json!(200)]
        );
        assert!(a[0]["error"].as_str().unwrap().contains("500"));
        assert!(a[0]["next_attempt_at"].is_string());

        // The schedule runs out: failed after three attempts; a redelivery is one more.
        *rx.fallback.lock().unwrap() = 500;
        api.top_up(&tenant, 10, "retry-2").await;
        rx.wait_for("three more attempts", |g| g.len() == 6).await;
        let failed = first_delivery(&api, &key, "?status=failed").await;
        assert_eq!(failed["attempts_total"], 3);
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(rx.got().len(), 6, "no attempt after the schedule ran out");
        *rx.fallback.lock().unwrap() = 200;
        let id = failed["id"].as_str().unwrap();
        let r = api
            .post(
                &key,
                &format!("/v1/webhook-deliveries/{id}/redeliver"),
                &json!({}),
                None,
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.text);
        rx.wait_for("the redelivery", |g| g.len() == 7).await;
        let d = until("the redelivery succeeded", || async {
            let r = api.get(&key, &format!("/v1/webhook-deliveries/{id}")).await;
            (r.body["status"] == "succeeded").then_some(r.body)
        })
        .await;
        assert_eq!(d["attempts_total"], 4);
        assert_eq!(d["attempts"][3]["manual"], true);

        // 410 Gone disables the endpoint at once, visibly.
        *rx.fallback.lock().unwrap() = 410;
        api.top_up(&tenant, 10, "retry-3").await;
        rx.wait_for("the 410", |g| g.len() == 8).await;
        let e = endpoint_when(&api, &key, &ep, "disabled").await;
        assert!(e["disabled_reason"].as_str().unwrap().contains("410"));
        api.top_up(&tenant, 10, "retry-4").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(rx.got().len(), 8, "a disabled endpoint receives nothing");
        // Enabled again, it receives new events.
        *rx.fallback.lock().unwrap() = 200;
        let r = api
            .call(
                "PATCH",
                &format!("/v1/webhook-endpoints/{ep}"),
                Some(&key),
                Some(&json!({"enabled": true})),
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["status"], "enabled");
        api.top_up(&tenant, 10, "retry-5").await;
        rx.wait_for("an event after enabling", |g| g.len() == 9)
            .await;
    });
}

#[test]
fn sustained_failure_disables_and_a_crash_mid_retry_loses_no_event() {
    rt().block_on(async {
        let rx = Receiver::start().await;
        *rx.fallback.lock().unwrap() = 503;
        let mut env = hook_env("[0, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]");
        env.push(("REELBATCH_WEBHOOKS__DISABLE_AFTER_S", "3600"));
        let mut server = Server::start(&env);
        let api = server.api();
        let (tenant, key) = api.funded("pro", 0).await;
        endpoint(&api, &key, &format!("{}/crash", rx.base), None).await;
        for i in 0..3 {
            api.top_up(&tenant, 10, &format!("crash-{i}")).await;
        }
        // Every event was tried at least twice, none succeeded: crash now.
        rx.wait_for("retries of all three", |g| {
            let ids: std::collections::HashSet<&str> = g.iter().map(|g| g.id.as_str()).collect();
            ids.len() == 3 && g.len() >= 6
        })
        .await;
        server.kill9();
        *rx.fallback.lock().unwrap() = 200;
        let before_restart = rx.got().len();
        server.spawn().expect("restarts");
        let api = server.api();
        let got = rx
            .wait_for("all three delivered after the restart", |g| {
                let ok: std::collections::HashSet<&str> =
                    g[before_restart..].iter().map(|g| g.id.as_str()).collect();
                ok.len() == 3
            })
            .await;
        let ids: std::collections::HashSet<&str> = got.iter().map(|g| g.id.as_str()).collect();
        assert_eq!(ids.len(), 3, "no event invented, none lost");
        until("all three succeeded", || async {
            let d = deliveries(&api, &key, "").await;
            (d.len() == 3 && d.iter().all(|d| d["status"] == "succeeded")).then_some(())
        })
        .await;

        // Finished deliveries stay finished across a graceful restart (snapshot) and a
        // crash after it (snapshot + log tail): nothing is sent again.
        let n = rx.got().len();
        assert!(server.terminate().success());
        server.spawn().expect("restarts");
        let api = server.api();
        api.top_up(&tenant, 10, "after-snapshot").await;
        rx.wait_for("the new event", |g| g.len() == n + 1).await;
        // Its attempt is recorded (shown succeeded), then made durable by any
        // acknowledged write after it: the log is sequential.
        until("its attempt recorded", || async {
            (deliveries(&api, &key, "?status=succeeded").await.len() == 4).then_some(())
        })
        .await;
        api.tenant("pro").await;
        server.kill9();
        server.spawn().expect("restarts");
        let api = server.api();
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(
            rx.got().len(),
            n + 1,
            "nothing delivered twice after restarts"
        );
        assert_eq!(deliveries(&api, &key, "").await.len(), 4);

        // Sustained failure: a server that disables after 1 s of failures.
        let mut env2 = hook_env("[0, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]");
        env2.push(("REELBATCH_WEBHOOKS__DISABLE_AFTER_S", "1"));
        let dir = server.dir.clone();
        server.kill9();
        let mut server = Server::new_in(&dir, &env2, &[]);
        server.spawn().expect("restarts");
        let api = server.api();
        *rx.fallback.lock().unwrap() = 500;
        api.top_up(&tenant, 10, "sustained").await;
        let ep = api.get(&key, "/v1/webhook-endpoints").await.body["data"][0]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let e = endpoint_when(&api, &key, &ep, "disabled").await;
        let reason = e["disabled_reason"].as_str().unwrap();
        assert!(reason.contains("failing since"), "{reason}");
        let d = deliveries(&api, &key, "?status=failed").await;
        assert_eq!(d.len(), 1, "{d:#?}");
        assert!(d[0]["note"].as_str().unwrap().contains("endpoint_disabled"));
    });
}

#[test]
fn ssrf_guard_plans_scopes_and_secret_rotation() {
    rt().block_on(async {
        // Defaults: https only, no private targets.
        let strict = Server::start(&[]);
        let api = strict.api();
        let (_, key) = api.funded("pro", 0).await;
        for url in [
            "http://example.com/hook",
            "https://127.0.0.1/hook",
            "https://localhost/hook",
            "https://10.1.2.3/hook",
            "https://169.254.169.254/latest/meta-data",
            "https://[::1]/hook",
            "https://[::ffff:127.0.0.1]/hook",
            "https://user:pw@example.com/hook",
            "ftp://example.com/",
            "not a url",
        ] {
            let r = api
                .post(&key, "/v1/webhook-endpoints", &json!({"url": url}), None)
                .await;
            r.assert_problem(422, "invalid_request");
        }
        let r = api
            .post(
                &key,
                "/v1/webhook-endpoints",
                &json!({"url": "https://example.com", "events": ["batch.exploded"]}),
                None,
            )
            .await;
        r.assert_problem(422, "invalid_request");
        let r = api
            .post(
                &key,
                "/v1/webhook-endpoints",
                &json!({"url": "https://example.com", "x": 1}),
                None,
            )
            .await;
        r.assert_problem(422, "invalid_request");
        // A plan without webhooks, and a key without the scope.
        let (_, starter) = api.funded("starter", 0).await;
        api.get(&starter, "/v1/webhook-endpoints")
            .await
            .assert_problem(403, "plan_limit_exceeded");
        let t = api.tenant("pro").await;
        let (_, narrow) = api.key_with(&t, json!({"scopes": ["batches:read"]})).await;
        api.get(&narrow, "/v1/webhook-endpoints")
            .await
            .assert_problem(403, "forbidden");
        drop(strict);

        // Registered while private targets were allowed, refused at delivery once they
        // are not: the guard runs again for every attempt.
        let rx = Receiver::start().await;
        let mut server = Server::start(&hook_env("[0, 0.2]"));
        let api = server.api();
        let (tenant, key) = api.funded("pro", 0).await;
        let (ep, secret) = endpoint(&api, &key, &format!("{}/r", rx.base), None).await;

        // Rotation: both secrets sign during the overlap.
        let r = api
            .post(
                &key,
                &format!("/v1/webhook-endpoints/{ep}/rotate-secret"),
                &json!({}),
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let new_secret = r.body["secret"].as_str().unwrap().to_owned();
        assert_ne!(new_secret, secret);
        assert!(r.body["previous_secret_expires_at"].is_string());
        api.top_up(&tenant, 10, "rot-1").await;
        let got = rx.wait_for("an event", |g| g.len() == 1).await;
        assert_eq!(
            got[0].signature.split(' ').count(),
            2,
            "{}",
            got[0].signature
        );
        assert!(verifies(&secret, &got[0]) && verifies(&new_secret, &got[0]));
        // Without an overlap only the newest signs.
        let r = api
            .post(
                &key,
                &format!("/v1/webhook-endpoints/{ep}/rotate-secret"),
                &json!({"overlap_s": 0}),
                None,
            )
            .await;
        let newest = r.body["secret"].as_str().unwrap().to_owned();
        api.top_up(&tenant, 10, "rot-2").await;
        let got = rx.wait_for("a second event", |g| g.len() == 2).await;
        assert_eq!(got[1].signature.split(' ').count(), 1);
        assert!(verifies(&newest, &got[1]));
        assert!(!verifies(&new_secret, &got[1]) && !verifies(&secret, &got[1]));

        let dir = server.dir.clone();
        server.kill9();
        let mut env = hook_env("[0, 0.2]");
        env.retain(|(k, _)| !k.contains("ALLOW_PRIVATE"));
        let mut guarded = Server::new_in(&dir, &env, &[]);
        guarded.spawn().expect("restarts");
        let api = guarded.api();
        api.top_up(&tenant, 10, "rot-3").await;
        let d = first_delivery(&api, &key, "?status=failed").await;
        let err = d["attempts"][0]["error"].as_str().unwrap();
        assert!(err.contains("not allowed") || err.contains("SSRF"), "{err}");
        assert_eq!(d["attempts"][0]["status"], 0);
        assert_eq!(rx.got().len(), 2, "the refused target got nothing");

        // Delete: gone with its deliveries.
        let r = api
            .call(
                "DELETE",
                &format!("/v1/webhook-endpoints/{ep}"),
                Some(&key),
                None,
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(deliveries(&api, &key, "").await.is_empty());
        api.get(&key, &format!("/v1/webhook-endpoints/{ep}"))
            .await
            .assert_problem(404, "not_found");
    });
}
