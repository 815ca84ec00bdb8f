//! Every route of the HTTP API with fuzzed bodies, query strings, path ids and
//! idempotency keys, through the real router, gate and handlers over a real engine (on a
//! tmpfs directory, durability `none` for speed): bad input is a 4xx problem+json, never a
//! 5xx or a panic (SPEC §11: "no handler can turn bad input into a 5xx").
//!
//! Input: byte 0 picks the route, byte 1 the choices (ids: known or fuzzed; idempotency
//! key: none or one of 8). The rest, split at the first `0xFF`: the text for path ids and
//! the query string, then the body.
//!
//! Known ids (a tenant, its key, a finished batch and its video) are made once through the
//! same router. Its wallet is left nearly empty, so valid batch bodies end at the hold
//! (402) instead of rendering videos, and the whole engine is rebuilt every
//! `EXECS_PER_ENGINE` inputs so that valid creations (tenants, keys) cannot pile up.

#![no_main]

use std::sync::Mutex;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use libfuzzer_sys::fuzz_target;
use reelbatch::api::routes::{Auth, ROUTES};
use serde_json::{json, Value};
use tower::ServiceExt;

const ADMIN: &str = "fuzz-admin-token";
const EXECS_PER_ENGINE: u64 = 200_000;

struct App {
    rt: tokio::runtime::Runtime,
    router: axum::Router,
    engine: reelbatch::engine::Engine,
    tenant: String,
    key: String,
    key_id: String,
    batch: String,
    video: String,
    execs: u64,
    _dir: tempfile::TempDir,
}

async fn call(
    router: &axum::Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
    idem: Option<&str>,
    body: Vec<u8>,
) -> Option<(StatusCode, Vec<u8>)> {
    let mut b = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json");
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    if let Some(k) = idem {
        b = b.header("idempotency-key", k);
    }
    let req = b.body(Body::from(body)).ok()?;
    let resp = router.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 64 << 20)
        .await
        .expect("a response body is readable");
    Some((status, bytes.to_vec()))
}

async fn json_call(
    router: &axum::Router,
    method: &str,
    uri: &str,
    token: &str,
    body: Value,
) -> Value {
    // Routes that move credits require a key; setup calls are made once per engine.
    let idem = format!("setup-{method}-{uri}");
    let (status, bytes) = call(
        router,
        method,
        uri,
        Some(token),
        Some(&idem),
        body.to_string().into_bytes(),
    )
    .await
    .expect("a valid request");
    assert!(
        status.is_success(),
        "{method} {uri}: {status} {}",
        String::from_utf8_lossy(&bytes)
    );
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

fn start() -> App {
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .unwrap();
    let env: Vec<(String, String)> = [
        ("REELBATCH_ADMIN_TOKEN", ADMIN),
        ("REELBATCH_PLANS__PRO__RATE_PER_S", "100000000"),
        ("REELBATCH_PLANS__PRO__BURST", "100000000"),
        ("REELBATCH_PROVIDER__SIMULATED__LATENCY_MS", "[1, 2]"),
        ("REELBATCH_PROVIDER__SIMULATED__TRANSIENT_FAILURE_RATE", "0"),
        ("REELBATCH_PROVIDER__SIMULATED__PERMANENT_FAILURE_RATE", "0"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let cfg = reelbatch::config::Config::load_with_env(None, env).unwrap();
    let mut ecfg = reelbatch::api::server::engine_config(&cfg, dir.path().join("data")).unwrap();
    ecfg.durability = wal::Durability::None;
    let (engine, _) = reelbatch::engine::Engine::open(ecfg).unwrap();
    let state = reelbatch::api::AppState::new(engine.clone(), cfg);
    state
        .ready
        .store(true, std::sync::atomic::Ordering::Release);
    let router = reelbatch::api::router(state);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (tenant, key, key_id, batch, video) = rt.block_on(async {
        let r = &router;
        let t = json_call(
            r,
            "POST",
            "/admin/v1/tenants",
            ADMIN,
            json!({"name": "f", "plan": "pro"}),
        )
        .await;
        let tenant = t["id"].as_str().unwrap().to_owned();
        let k = json_call(
            r,
            "POST",
            &format!("/admin/v1/tenants/{tenant}/keys"),
            ADMIN,
            json!({"name": "k"}),
        )
        .await;
        let (key_id, key) = (
            k["id"].as_str().unwrap().to_owned(),
            k["key"].as_str().unwrap().to_owned(),
        );
        let body = json!({"template": "a {x}", "variables": {"x": ["1"]}});
        let q = json_call(r, "POST", "/v1/batches/quote", &key, body.clone()).await;
        let total = q["total"].as_u64().expect("a quote has a total");
        json_call(
            r,
            "POST",
            &format!("/admin/v1/tenants/{tenant}/top-ups"),
            ADMIN,
            json!({"amount": total + 3, "kind": "paid"}),
        )
        .await;
        let b = json_call(r, "POST", "/v1/batches", &key, body).await;
        let batch = b["id"].as_str().unwrap().to_owned();
        let mut video = String::new();
        for _ in 0..2_000 {
            let items = json_call(
                r,
                "GET",
                &format!("/v1/batches/{batch}/items"),
                &key,
                Value::Null,
            )
            .await;
            if let Some(v) = items["data"][0]["video_id"].as_str() {
                video = v.to_owned();
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(!video.is_empty(), "the setup batch finished");
        (tenant, key, key_id, batch, video)
    });
    App {
        rt,
        router,
        engine,
        tenant,
        key,
        key_id,
        batch,
        video,
        execs: 0,
        _dir: dir,
    }
}

static APP: Mutex<Option<App>> = Mutex::new(None);

/// Bytes that may stand in a URI as they are; the rest is percent-encoded.
fn uri_text(bytes: &[u8], keep: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &b in bytes.iter().take(512) {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

fuzz_target!(|data: &[u8]| {
    let [pick, choices, rest @ ..] = data else {
        return;
    };
    let route = &ROUTES[*pick as usize % ROUTES.len()];
    let (text, body) = match rest.iter().position(|&b| b == 0xFF) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (&rest[..0], rest),
    };
    let mut guard = APP.lock().unwrap();
    if guard.as_ref().is_some_and(|a| a.execs >= EXECS_PER_ENGINE) {
        let old = guard.take().expect("checked");
        let _ = old.rt.block_on(old.engine.shutdown(false));
    }
    let app = guard.get_or_insert_with(start);
    app.execs += 1;

    // Path: each `{name}` becomes a known id or the fuzzed text.
    let fuzzed_ids = choices & 1 == 1;
    let mut path = String::new();
    let mut rest_path = route.path;
    while let Some(open) = rest_path.find('{') {
        let close = open + rest_path[open..].find('}').expect("closed");
        path.push_str(&rest_path[..open]);
        let id = if fuzzed_ids {
            uri_text(text, b"")
        } else if route.path.starts_with("/admin/v1/keys") {
            app.key_id.clone()
        } else if route.path.starts_with("/admin") {
            app.tenant.clone()
        } else if route.path.starts_with("/v1/batches") {
            app.batch.clone()
        } else {
            app.video.clone()
        };
        path.push_str(&id);
        rest_path = &rest_path[close + 1..];
    }
    path.push_str(rest_path);
    if !text.is_empty() && (!fuzzed_ids || choices & 2 == 2) {
        path.push('?');
        path.push_str(&uri_text(text, b"=&"));
    }
    let token = match route.auth {
        Auth::Public => None,
        Auth::Admin => Some(ADMIN),
        Auth::Key(_) => Some(app.key.as_str()),
    };
    let idem = (choices & 4 == 4).then(|| format!("fuzz-{}", (choices >> 3) & 7));
    let method = route.method.as_str();
    let Some((status, bytes)) = app.rt.block_on(call(
        &app.router,
        method,
        &path,
        token,
        idem.as_deref(),
        body.to_vec(),
    )) else {
        return; // not a valid HTTP request at all (the server would never see it)
    };
    assert!(
        !status.is_server_error(),
        "{method} {path} -> {status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    if status.is_client_error() {
        let v: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "{method} {path} -> {status}: not problem+json ({e}): {:?}",
                String::from_utf8_lossy(&bytes)
            )
        });
        assert!(v["code"].is_string(), "{v}");
    }
});
