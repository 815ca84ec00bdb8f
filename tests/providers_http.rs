//! The Replicate and fal.ai adapters against in-test fake servers (axum on 127.0.0.1:0)
//! that speak each protocol and record every request they get: happy paths end to end,
//! throttling with `Retry-After`, 5xx, timeouts, safety refusals, cancel, output size
//! limits, auth only to the API's own origin, and no token in any error message.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Router;
use serde_json::{json, Value};

use reelbatch::engine::batch::pricing::Params;
use reelbatch::ids::BatchId;
use reelbatch::providers::fal::Fal;
use reelbatch::providers::http::HttpConfig;
use reelbatch::providers::replicate::Replicate;
use reelbatch::providers::{ErrorClass, JobRequest, JobStatus, OutputRef, Provider, ProviderError};

const TOKEN: &str = "r8_TEST-SECRET-token-0123456789";
const VIDEO: &[u8] = b"\x00\x00\x00\x18ftypmp42 fake video bytes for the test";

// ---------------------------------------------------------------- fake server plumbing

/// One request as the fake saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    auth: Option<String>,
    body: String,
}

impl Seen {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// A scripted answer.
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    delay_ms: u64,
}

impl Reply {
    fn json(status: u16, v: Value) -> Reply {
        Reply {
            status,
            headers: vec![("content-type", "application/json".into())],
            body: v.to_string().into_bytes(),
            delay_ms: 0,
        }
    }
    fn bytes(status: u16, content_type: &str, body: &[u8]) -> Reply {
        Reply {
            status,
            headers: vec![("content-type", content_type.to_string())],
            body: body.to_vec(),
            delay_ms: 0,
        }
    }
    fn header(mut self, name: &'static str, value: &str) -> Reply {
        self.headers.push((name, value.to_string()));
        self
    }
    fn delayed(mut self, ms: u64) -> Reply {
        self.delay_ms = ms;
        self
    }
}

/// The script: given the request, how many earlier requests had the same method and path,
/// and the server's own base URL, the answer.
type Script = dyn Fn(&Seen, usize, &str) -> Reply + Send + Sync;

struct Fake {
    seen: Mutex<Vec<Seen>>,
    script: Box<Script>,
    base: String,
}

/// A running fake: its base URL and what it received.
#[derive(Clone)]
struct FakeServer {
    base: String,
    state: Arc<Fake>,
}

impl FakeServer {
    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }
    fn seen_at(&self, method: &str, path: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.method == method && s.path == path)
            .collect()
    }
}

async fn handle(State(fake): State<Arc<Fake>>, req: Request) -> Response {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let seen = Seen {
        method,
        path,
        auth,
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    let n = {
        let mut all = fake.seen.lock().unwrap();
        let n = all
            .iter()
            .filter(|s| s.method == seen.method && s.path == seen.path)
            .count();
        all.push(seen.clone());
        n
    };
    let reply = (fake.script)(&seen, n, &fake.base);
    if reply.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(reply.delay_ms)).await;
    }
    let mut resp = Response::new(Body::from(reply.body));
    *resp.status_mut() = StatusCode::from_u16(reply.status).unwrap();
    let headers: &mut HeaderMap = resp.headers_mut();
    for (k, v) in reply.headers {
        headers.insert(
            HeaderName::from_static(k),
            HeaderValue::from_str(&v).unwrap(),
        );
    }
    resp
}

async fn serve<F>(script: F) -> FakeServer
where
    F: Fn(&Seen, usize, &str) -> Reply + Send + Sync + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let state = Arc::new(Fake {
        seen: Mutex::new(Vec::new()),
        script: Box::new(script),
        base: base.clone(),
    });
    let app = Router::new().fallback(handle).with_state(state.clone());
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    FakeServer { base, state }
}

/// A CDN: serves `body` at any path, records requests (for the auth check).
async fn cdn(content_type: &'static str, body: Vec<u8>) -> FakeServer {
    serve(move |_, _, _| Reply::bytes(200, content_type, &body)).await
}

/// A raw HTTP/1.1 server on a std thread that answers one request with a chunked body of
/// `total` bytes (no `Content-Length`), to exercise the counted read path.
fn chunked_server(total: usize) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: video/mp4\r\ntransfer-encoding: chunked\r\n\r\n",
            );
            let chunk = vec![b'v'; 256];
            let mut sent = 0;
            while sent < total {
                let n = chunk.len().min(total - sent);
                if s.write_all(format!("{n:x}\r\n").as_bytes()).is_err()
                    || s.write_all(&chunk[..n]).is_err()
                    || s.write_all(b"\r\n").is_err()
                {
                    return;
                }
                sent += n;
            }
            let _ = s.write_all(b"0\r\n\r\n");
        }
    });
    base
}

fn config(base: &str) -> HttpConfig {
    HttpConfig {
        base_url: base.to_string(),
        token: TOKEN.to_string(),
        request_timeout_ms: 5_000,
        poll_interval_ms: 10,
        output_bytes_max: 1024 * 1024,
    }
}

fn job(model: &str, prompt: &str) -> JobRequest {
    JobRequest {
        batch: BatchId(7),
        item: 3,
        attempt: 1,
        prompt: prompt.to_string(),
        params: Params {
            model: "some-model".into(),
            duration_seconds: 5,
            resolution: "1080p".into(),
            aspect_ratio: "9:16".into(),
        },
        provider_model: model.to_string(),
        watermark: true,
    }
}

/// No error message may ever carry the token.
fn assert_clean(e: &ProviderError) {
    assert!(!e.message.contains(TOKEN), "token leaked: {e:?}");
    assert!(!e.to_string().contains(TOKEN), "token leaked: {e}");
    assert!(!format!("{e:?}").contains(TOKEN), "token leaked: {e:?}");
}

/// Polls until the job settles (bounded).
async fn poll_until_done(p: &dyn Provider, j: &JobRequest, id: &str) -> (JobStatus, usize) {
    for polls in 1..=20 {
        let st = p.poll(j, id).await.expect("poll");
        if st != JobStatus::Running {
            return (st, polls);
        }
        tokio::time::sleep(Duration::from_millis(p.poll_interval_ms())).await;
    }
    panic!("job {id} never settled");
}

// ---------------------------------------------------------------- Replicate fake

/// What the Replicate fake does differently.
#[derive(Clone)]
enum RMode {
    /// Create, run twice, succeed with `output` (built from the base URL and CDN URL).
    Happy {
        output: fn(&str, &str) -> Value,
        cdn: String,
    },
    /// Every request: this status (with `Retry-After: 7` on 429), echoing the auth header.
    Status(u16),
    /// Every request sleeps 2 s.
    Slow,
    /// The prediction fails with this error.
    Failed(&'static str),
}

async fn fake_replicate(mode: RMode) -> FakeServer {
    serve(move |req, n, base| match &mode {
        RMode::Status(code) => {
            let r = Reply::json(
                *code,
                json!({"detail": format!("no thanks, you sent {}", req.auth.clone().unwrap_or_default())}),
            );
            if *code == 429 {
                r.header("retry-after", "7")
            } else {
                r
            }
        }
        RMode::Slow => Reply::json(201, json!({"id": "p1", "status": "starting"})).delayed(2_000),
        RMode::Happy { .. } | RMode::Failed(_) => {
            match (req.method.as_str(), req.path.as_str()) {
                ("POST", "/v1/predictions") | ("POST", "/v1/models/acme/vid/predictions") => {
                    Reply::json(201, json!({"id": "p1", "status": "starting"}))
                }
                ("GET", "/v1/predictions/p1") => match (&mode, n) {
                    (_, 0) => Reply::json(200, json!({"id": "p1", "status": "starting"})),
                    (_, 1) => Reply::json(200, json!({"id": "p1", "status": "processing"})),
                    (RMode::Happy { output, cdn }, _) => Reply::json(
                        200,
                        json!({"id": "p1", "status": "succeeded", "output": output(base, cdn)}),
                    ),
                    (RMode::Failed(err), _) => Reply::json(
                        200,
                        json!({"id": "p1", "status": "failed", "error": err}),
                    ),
                    _ => unreachable!(),
                },
                ("POST", "/v1/predictions/p1/cancel") => {
                    Reply::json(200, json!({"id": "p1", "status": "canceled"}))
                }
                ("GET", "/files/out.mp4") => Reply::bytes(200, "video/mp4", VIDEO),
                _ => Reply::json(404, json!({"detail": "not found"})),
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_happy_path_model_name() {
    let cdn = cdn("video/webm", VIDEO.to_vec()).await;
    let fake = fake_replicate(RMode::Happy {
        output: |_, cdn| json!(format!("{cdn}/deliveries/abc/out.webm")),
        cdn: cdn.base.clone(),
    })
    .await;
    let p = Replicate::new(config(&fake.base)).unwrap();
    assert_eq!(p.poll_interval_ms(), 10);
    let j = job("acme/vid", "a red fox [test]");

    let id = p.submit(&j).await.unwrap();
    assert_eq!(id, "p1");
    let created = fake.seen_at("POST", "/v1/models/acme/vid/predictions");
    assert_eq!(created.len(), 1);
    assert_eq!(
        created[0].auth.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    let body = created[0].json();
    assert_eq!(
        body,
        json!({"input": {"prompt": "a red fox [test]", "duration": 5,
                         "aspect_ratio": "9:16", "resolution": "1080p"}})
    );

    let (st, polls) = poll_until_done(&p, &j, &id).await;
    assert_eq!(polls, 3, "starting, processing, succeeded");
    let out = match st {
        JobStatus::Succeeded(o) => o,
        other => panic!("{other:?}"),
    };
    assert_eq!(out.0, format!("{}/deliveries/abc/out.webm", cdn.base));
    for s in fake.seen_at("GET", "/v1/predictions/p1") {
        assert_eq!(s.auth.as_deref(), Some(format!("Bearer {TOKEN}").as_str()));
    }

    let o = p.fetch(&j, &out).await.unwrap();
    assert_eq!(&o.bytes[..], VIDEO);
    assert_eq!(o.content_type, "video/webm");
    assert_eq!(o.watermarked, None);
    // The CDN is a foreign origin: it never sees the token.
    let cdn_seen = cdn.seen();
    assert_eq!(cdn_seen.len(), 1);
    assert_eq!(cdn_seen[0].path, "/deliveries/abc/out.webm");
    assert_eq!(cdn_seen[0].auth, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_happy_path_version_and_array_output() {
    let fake = fake_replicate(RMode::Happy {
        output: |base, _| json!([format!("{base}/files/out.mp4"), "ignored"]),
        cdn: String::new(),
    })
    .await;
    let p = Replicate::new(config(&format!("{}/", fake.base))).unwrap();
    let j = job(
        "acme/vid:5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa",
        "dawn over a lake",
    );
    let id = p.submit(&j).await.unwrap();
    let created = fake.seen_at("POST", "/v1/predictions");
    assert_eq!(created.len(), 1);
    let body = created[0].json();
    assert_eq!(
        body["version"],
        "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa"
    );
    assert_eq!(body["input"]["prompt"], "dawn over a lake");

    let (st, _) = poll_until_done(&p, &j, &id).await;
    let out = match st {
        JobStatus::Succeeded(o) => o,
        other => panic!("{other:?}"),
    };
    assert_eq!(out.0, format!("{}/files/out.mp4", fake.base));
    let o = p.fetch(&j, &out).await.unwrap();
    assert_eq!(&o.bytes[..], VIDEO);
    assert_eq!(o.content_type, "video/mp4");
    // Same origin as the API: the token goes along (Replicate's file URLs need it).
    let got = fake.seen_at("GET", "/files/out.mp4");
    assert_eq!(
        got[0].auth.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_throttled_unavailable_unauthorized() {
    let j = job("acme/vid", "x");
    let fake = fake_replicate(RMode::Status(429)).await;
    let p = Replicate::new(config(&fake.base)).unwrap();
    let e = p.submit(&j).await.unwrap_err();
    assert_eq!(
        e.class,
        ErrorClass::Throttled {
            retry_after_ms: Some(7000)
        }
    );
    assert_eq!(e.code, "provider.rate_limited");
    assert!(e.message.contains("no thanks"), "{}", e.message);
    assert_clean(&e);
    let e = p.poll(&j, "p1").await.unwrap_err();
    assert_eq!(e.code, "provider.rate_limited");
    assert_clean(&e);

    let fake = fake_replicate(RMode::Status(503)).await;
    let p = Replicate::new(config(&fake.base)).unwrap();
    let e = p.submit(&j).await.unwrap_err();
    assert_eq!(
        (e.class, e.code.as_str()),
        (ErrorClass::Transient, "provider.unavailable")
    );
    assert_clean(&e);
    let e = p.poll(&j, "p1").await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Transient);
    assert_clean(&e);

    // The fake echoes the Authorization header in its 401 body: scrubbed.
    let fake = fake_replicate(RMode::Status(401)).await;
    let p = Replicate::new(config(&fake.base)).unwrap();
    let e = p.submit(&j).await.unwrap_err();
    assert_eq!(
        (e.class, e.code.as_str()),
        (ErrorClass::Permanent, "provider.unauthorized")
    );
    assert!(e.message.contains("[redacted]"), "{}", e.message);
    assert_clean(&e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_timeout_is_transient() {
    let fake = fake_replicate(RMode::Slow).await;
    let mut cfg = config(&fake.base);
    cfg.request_timeout_ms = 200;
    let p = Replicate::new(cfg).unwrap();
    let j = job("acme/vid", "x");
    let t0 = std::time::Instant::now();
    let e = p.submit(&j).await.unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_millis(1_500),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(
        (e.class, e.code.as_str()),
        (ErrorClass::Transient, "provider.timeout")
    );
    assert_clean(&e);
    let e = p.poll(&j, "p1").await.unwrap_err();
    assert_eq!(e.code, "provider.timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_safety_and_plain_failures() {
    let j = job("acme/vid", "x");
    let fake = fake_replicate(RMode::Failed(
        "NSFW content detected. Try running it again, or try a different prompt.",
    ))
    .await;
    let p = Replicate::new(config(&fake.base)).unwrap();
    let id = p.submit(&j).await.unwrap();
    let (st, _) = poll_until_done(&p, &j, &id).await;
    match st {
        JobStatus::Failed(e) => {
            assert_eq!(e.class, ErrorClass::Permanent);
            assert_eq!(e.code, "safety.output_filtered");
            assert!(e.message.contains("NSFW"));
        }
        other => panic!("{other:?}"),
    }

    let fake = fake_replicate(RMode::Failed("CUDA out of memory")).await;
    let p = Replicate::new(config(&fake.base)).unwrap();
    let id = p.submit(&j).await.unwrap();
    let (st, _) = poll_until_done(&p, &j, &id).await;
    match st {
        JobStatus::Failed(e) => {
            assert_eq!(
                (e.class, e.code.as_str()),
                (ErrorClass::Transient, "provider.failed")
            );
            assert_eq!(e.message, "CUDA out of memory");
        }
        other => panic!("{other:?}"),
    }

    // A refusal at create time is a rejected prompt.
    let fake = serve(|_, _, _| {
        Reply::json(
            422,
            json!({"detail": "Input flagged as sensitive by the safety checker"}),
        )
    })
    .await;
    let p = Replicate::new(config(&fake.base)).unwrap();
    let e = p.submit(&j).await.unwrap_err();
    assert_eq!(
        (e.class, e.code.as_str()),
        (ErrorClass::Permanent, "safety.prompt_rejected")
    );
    assert_clean(&e);

    // A plain 422 is invalid input.
    let fake = serve(|_, _, _| Reply::json(422, json!({"detail": "duration must be <= 10"}))).await;
    let p = Replicate::new(config(&fake.base)).unwrap();
    let e = p.submit(&j).await.unwrap_err();
    assert_eq!(
        (e.class, e.code.as_str()),
        (ErrorClass::Permanent, "provider.invalid_input")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_cancel_reaches_the_fake() {
    let fake = fake_replicate(RMode::Happy {
        output: |base, _| json!(format!("{base}/files/out.mp4")),
        cdn: String::new(),
    })
    .await;
    let p = Replicate::new(config(&fake.base)).unwrap();
    p.cancel("p1").await.unwrap();
    let got = fake.seen_at("POST", "/v1/predictions/p1/cancel");
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].auth.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    // An id that is not one URL segment never reaches the network.
    let e = p.cancel("../models").await.unwrap_err();
    assert_eq!(e.code, "provider.invalid_job");
    assert_eq!(fake.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_output_too_large() {
    let big = cdn("video/mp4", vec![0u8; 4096]).await;
    let fake = fake_replicate(RMode::Status(500)).await;
    let mut cfg = config(&fake.base);
    cfg.output_bytes_max = 1024;
    let p = Replicate::new(cfg).unwrap();
    let j = job("acme/vid", "x");
    // With a Content-Length.
    let e = p
        .fetch(&j, &OutputRef(format!("{}/big.mp4", big.base)))
        .await
        .unwrap_err();
    assert_eq!(
        (e.class, e.code.as_str()),
        (ErrorClass::Permanent, "provider.output_too_large")
    );
    assert_clean(&e);
    // Chunked, without one: counted as it arrives.
    let chunked = chunked_server(4096);
    let e = p
        .fetch(&j, &OutputRef(format!("{chunked}/big.mp4")))
        .await
        .unwrap_err();
    assert_eq!(e.code, "provider.output_too_large");
    // A chunked body under the limit is read whole.
    let chunked = chunked_server(1000);
    let o = p
        .fetch(&j, &OutputRef(format!("{chunked}/ok.mp4")))
        .await
        .unwrap();
    assert_eq!(o.bytes.len(), 1000);
    assert!(o.bytes.iter().all(|&b| b == b'v'));
    // Exactly at the limit is fine.
    let exact = cdn("video/mp4", vec![1u8; 1024]).await;
    let o = p
        .fetch(&j, &OutputRef(format!("{}/exact.mp4", exact.base)))
        .await
        .unwrap();
    assert_eq!(o.bytes.len(), 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_to_a_foreign_host_drops_the_token() {
    let cdn = cdn("video/mp4", VIDEO.to_vec()).await;
    let target = format!("{}/real.mp4", cdn.base);
    let fake =
        serve(move |_, _, _| Reply::bytes(302, "text/plain", b"").header("location", &target))
            .await;
    let p = Replicate::new(config(&fake.base)).unwrap();
    let j = job("acme/vid", "x");
    let o = p
        .fetch(&j, &OutputRef(format!("{}/files/out.mp4", fake.base)))
        .await
        .unwrap();
    assert_eq!(&o.bytes[..], VIDEO);
    assert_eq!(
        fake.seen()[0].auth.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert_eq!(cdn.seen()[0].auth, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_is_transient() {
    // Bind then drop: nothing listens on that port any more.
    let base = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let p = Replicate::new(config(&base)).unwrap();
    let e = p.submit(&job("acme/vid", "x")).await.unwrap_err();
    assert_eq!(
        (e.class, e.code.as_str()),
        (ErrorClass::Transient, "provider.unavailable")
    );
    assert_clean(&e);
    let f = Fal::new(config(&base)).unwrap();
    let e = f
        .submit(&job("fal-ai/kling-video/v1", "x"))
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Transient);
}

#[test]
fn config_validation_and_env() {
    assert!(Replicate::new(config("ftp://example.com")).is_err());
    assert!(Replicate::new(config("not a url")).is_err());
    let mut cfg = config("http://127.0.0.1:1");
    cfg.token = "bad\ntoken".into();
    let e = Fal::new(cfg).err().unwrap();
    assert!(!e.message.contains("bad\ntoken"));
    let mut cfg = config("http://127.0.0.1:1");
    cfg.token = "  ".into();
    assert!(Replicate::new(cfg).is_err());

    let var = "REELBATCH_TEST_PROVIDERS_HTTP_TOKEN";
    let e = HttpConfig::from_env("https://api.replicate.com", var).unwrap_err();
    assert!(e.contains(var), "{e}");
    std::env::set_var(var, format!(" {TOKEN} "));
    let cfg = HttpConfig::from_env("https://api.replicate.com", var).unwrap();
    assert_eq!(cfg.token, TOKEN);
    assert_eq!(cfg.base_url, "https://api.replicate.com");
    assert_eq!(cfg.request_timeout_ms, 30_000);
    assert_eq!(cfg.poll_interval_ms, 2_000);
    assert_eq!(cfg.output_bytes_max, 512 * 1024 * 1024);
    assert!(!format!("{cfg:?}").contains(TOKEN));
    std::env::set_var(var, "");
    let e = HttpConfig::from_env("https://api.replicate.com", var).unwrap_err();
    assert!(e.contains(var) && !e.contains(TOKEN), "{e}");
    std::env::remove_var(var);
}

// ---------------------------------------------------------------- fal fake

const FAL_MODEL: &str = "fal-ai/kling-video/v1/standard/text-to-video";
const FAL_APP: &str = "fal-ai/kling-video";
const FAL_REQ: &str = "764cabcf-b745-4b3e-ae38-1200304cf45b";

/// What the fal fake does differently.
#[derive(Clone)]
enum FMode {
    /// Queue, run, complete; the result's video is on `cdn`.
    Happy { cdn: String },
    /// Every request: this status (with `Retry-After: 7` on 429).
    Status(u16),
    /// Every request sleeps 2 s.
    Slow,
    /// Submit is refused with 422 content policy.
    RejectSubmit,
    /// Completes, but the result is a 422 content-policy violation.
    RejectResult,
}

async fn fake_fal(mode: FMode) -> FakeServer {
    let status_path = format!("/{FAL_APP}/requests/{FAL_REQ}/status");
    let result_path = format!("/{FAL_APP}/requests/{FAL_REQ}");
    let cancel_path = format!("/{FAL_APP}/requests/{FAL_REQ}/cancel");
    serve(move |req, n, base| {
        match &mode {
            FMode::Status(code) => {
                let r = Reply::json(*code, json!({"detail": "busy"}));
                return if *code == 429 {
                    r.header("retry-after", "7")
                } else {
                    r
                };
            }
            FMode::Slow => return Reply::json(200, json!({"request_id": FAL_REQ})).delayed(2_000),
            _ => {}
        }
        let m = req.method.as_str();
        let p = req.path.as_str();
        if m == "POST" && p == format!("/{FAL_MODEL}") {
            if matches!(mode, FMode::RejectSubmit) {
                return Reply::json(
                    422,
                    json!({"detail": [{"loc": ["body", "prompt"],
                        "msg": "The prompt was flagged by our content policy",
                        "type": "content_policy_violation"}]}),
                );
            }
            return Reply::json(
                200,
                json!({"request_id": FAL_REQ,
                       "status_url": format!("{base}{status_path}"),
                       "response_url": format!("{base}{result_path}"),
                       "cancel_url": format!("{base}{cancel_path}")}),
            );
        }
        if m == "GET" && p == status_path {
            return match n {
                0 => Reply::json(202, json!({"status": "IN_QUEUE", "queue_position": 0})),
                1 => Reply::json(202, json!({"status": "IN_PROGRESS"})),
                _ => Reply::json(200, json!({"status": "COMPLETED"})),
            };
        }
        if m == "GET" && p == result_path {
            return match &mode {
                FMode::Happy { cdn } => Reply::json(
                    200,
                    json!({"video": {"url": format!("{cdn}/files/fal-out.mp4"),
                                     "content_type": "video/mp4"}}),
                ),
                _ => Reply::json(
                    422,
                    json!({"detail": [{"msg": "Output flagged by the content checker",
                                       "type": "content_policy_violation"}]}),
                ),
            };
        }
        if m == "PUT" && p == cancel_path {
            return Reply::json(202, json!({"status": "CANCELLATION_REQUESTED"}));
        }
        Reply::json(404, json!({"detail": "not found"}))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fal_happy_path() {
    let cdn = cdn("video/mp4", VIDEO.to_vec()).await;
    let fake = fake_fal(FMode::Happy {
        cdn: cdn.base.clone(),
    })
    .await;
    let p = Fal::new(config(&fake.base)).unwrap();
    let j = job(FAL_MODEL, "a paper boat in the rain");

    let id = p.submit(&j).await.unwrap();
    assert_eq!(id, format!("{FAL_APP}/{FAL_REQ}"));
    let submitted = fake.seen_at("POST", &format!("/{FAL_MODEL}"));
    assert_eq!(submitted.len(), 1);
    assert_eq!(
        submitted[0].auth.as_deref(),
        Some(format!("Key {TOKEN}").as_str())
    );
    assert_eq!(
        submitted[0].json(),
        json!({"prompt": "a paper boat in the rain", "duration": 5,
               "aspect_ratio": "9:16", "resolution": "1080p"})
    );

    let (st, polls) = poll_until_done(&p, &j, &id).await;
    assert_eq!(polls, 3, "IN_QUEUE, IN_PROGRESS, COMPLETED");
    let out = match st {
        JobStatus::Succeeded(o) => o,
        other => panic!("{other:?}"),
    };
    assert_eq!(out.0, format!("{}/files/fal-out.mp4", cdn.base));
    let results = fake.seen_at("GET", &format!("/{FAL_APP}/requests/{FAL_REQ}"));
    assert_eq!(results.len(), 1);
    assert_eq!(
        results[0].auth.as_deref(),
        Some(format!("Key {TOKEN}").as_str())
    );
    for s in fake.seen_at("GET", &format!("/{FAL_APP}/requests/{FAL_REQ}/status")) {
        assert_eq!(s.auth.as_deref(), Some(format!("Key {TOKEN}").as_str()));
    }

    let o = p.fetch(&j, &out).await.unwrap();
    assert_eq!(&o.bytes[..], VIDEO);
    assert_eq!(o.content_type, "video/mp4");
    assert_eq!(o.watermarked, None);
    assert_eq!(cdn.seen()[0].auth, None);

    // A bare request id (as fal itself names it) is polled with the job's model.
    let st = p.poll(&j, FAL_REQ).await.unwrap();
    assert!(matches!(st, JobStatus::Succeeded(_)), "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fal_result_shapes() {
    // `video` as a string, then `output.url`.
    for (i, shape) in [
        json!({"video": "https://cdn.example/a.mp4"}),
        json!({"output": {"url": "https://cdn.example/b.mp4"}}),
        json!({"images": []}),
    ]
    .into_iter()
    .enumerate()
    {
        let fake = serve(move |req, _, _| {
            if req.path.ends_with("/status") {
                Reply::json(200, json!({"status": "COMPLETED"}))
            } else {
                Reply::json(200, shape.clone())
            }
        })
        .await;
        let p = Fal::new(config(&fake.base)).unwrap();
        let j = job(FAL_MODEL, "x");
        let st = p.poll(&j, &format!("{FAL_APP}/{FAL_REQ}")).await.unwrap();
        match (i, st) {
            (0, JobStatus::Succeeded(o)) => assert_eq!(o.0, "https://cdn.example/a.mp4"),
            (1, JobStatus::Succeeded(o)) => assert_eq!(o.0, "https://cdn.example/b.mp4"),
            (2, JobStatus::Failed(e)) => assert_eq!(e.code, "provider.no_output"),
            (i, st) => panic!("{i}: {st:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fal_throttled_and_unavailable() {
    let j = job(FAL_MODEL, "x");
    let id = format!("{FAL_APP}/{FAL_REQ}");
    let fake = fake_fal(FMode::Status(429)).await;
    let p = Fal::new(config(&fake.base)).unwrap();
    for e in [
        p.submit(&j).await.unwrap_err(),
        p.poll(&j, &id).await.unwrap_err(),
    ] {
        assert_eq!(
            e.class,
            ErrorClass::Throttled {
                retry_after_ms: Some(7000)
            }
        );
        assert_eq!(e.code, "provider.rate_limited");
        assert_clean(&e);
    }

    let fake = fake_fal(FMode::Status(503)).await;
    let p = Fal::new(config(&fake.base)).unwrap();
    for e in [
        p.submit(&j).await.unwrap_err(),
        p.poll(&j, &id).await.unwrap_err(),
    ] {
        assert_eq!(
            (e.class, e.code.as_str()),
            (ErrorClass::Transient, "provider.unavailable")
        );
        assert_clean(&e);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fal_timeout_is_transient() {
    let fake = fake_fal(FMode::Slow).await;
    let mut cfg = config(&fake.base);
    cfg.request_timeout_ms = 200;
    let p = Fal::new(cfg).unwrap();
    let j = job(FAL_MODEL, "x");
    let t0 = std::time::Instant::now();
    let e = p.submit(&j).await.unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_millis(1_500),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(
        (e.class, e.code.as_str()),
        (ErrorClass::Transient, "provider.timeout")
    );
    assert_clean(&e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fal_safety_refusals() {
    let j = job(FAL_MODEL, "something the policy refuses");
    let fake = fake_fal(FMode::RejectSubmit).await;
    let p = Fal::new(config(&fake.base)).unwrap();
    let e = p.submit(&j).await.unwrap_err();
    assert_eq!(
        (e.class, e.code.as_str()),
        (ErrorClass::Permanent, "safety.prompt_rejected")
    );
    assert!(e.message.contains("content policy"), "{}", e.message);
    assert_clean(&e);

    let fake = fake_fal(FMode::RejectResult).await;
    let p = Fal::new(config(&fake.base)).unwrap();
    let id = p.submit(&j).await.unwrap();
    let (st, polls) = poll_until_done(&p, &j, &id).await;
    assert_eq!(polls, 3);
    match st {
        JobStatus::Failed(e) => {
            assert_eq!(
                (e.class, e.code.as_str()),
                (ErrorClass::Permanent, "safety.output_filtered")
            );
            assert_clean(&e);
        }
        other => panic!("{other:?}"),
    }

    // COMPLETED with an error in the status itself.
    let fake = serve(|_, _, _| {
        Reply::json(
            200,
            json!({"status": "COMPLETED", "error": "NSFW output blocked"}),
        )
    })
    .await;
    let p = Fal::new(config(&fake.base)).unwrap();
    match p.poll(&j, &format!("{FAL_APP}/{FAL_REQ}")).await.unwrap() {
        JobStatus::Failed(e) => assert_eq!(e.code, "safety.output_filtered"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fal_cancel_reaches_the_fake() {
    let fake = fake_fal(FMode::Happy { cdn: String::new() }).await;
    let p = Fal::new(config(&fake.base)).unwrap();
    p.cancel(&format!("{FAL_APP}/{FAL_REQ}")).await.unwrap();
    let got = fake.seen_at("PUT", &format!("/{FAL_APP}/requests/{FAL_REQ}/cancel"));
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].auth.as_deref(),
        Some(format!("Key {TOKEN}").as_str())
    );

    // Already completed: nothing to stop, not an error.
    let done = serve(|_, _, _| Reply::json(400, json!({"status": "ALREADY_COMPLETED"}))).await;
    let p = Fal::new(config(&done.base)).unwrap();
    p.cancel(&format!("{FAL_APP}/{FAL_REQ}")).await.unwrap();
    assert_eq!(done.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fal_output_too_large() {
    let big = cdn("video/mp4", vec![0u8; 64 * 1024]).await;
    let mut cfg = config(&big.base);
    cfg.output_bytes_max = 16 * 1024;
    let p = Fal::new(cfg).unwrap();
    let j = job(FAL_MODEL, "x");
    let e = p
        .fetch(&j, &OutputRef(format!("{}/files/big.mp4", big.base)))
        .await
        .unwrap_err();
    assert_eq!(
        (e.class, e.code.as_str()),
        (ErrorClass::Permanent, "provider.output_too_large")
    );
    assert_clean(&e);
    let chunked = chunked_server(64 * 1024);
    let e = p
        .fetch(&j, &OutputRef(format!("{chunked}/big.mp4")))
        .await
        .unwrap_err();
    assert_eq!(e.code, "provider.output_too_large");
}

/// The fake records every request, so the whole conversation of a happy fal job can be
/// checked in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fal_conversation_order() {
    let fake = fake_fal(FMode::Happy {
        cdn: "https://cdn.example".into(),
    })
    .await;
    let p = Fal::new(config(&fake.base)).unwrap();
    let j = job(FAL_MODEL, "x");
    let id = p.submit(&j).await.unwrap();
    poll_until_done(&p, &j, &id).await;
    let calls: Vec<(String, String)> = fake
        .seen()
        .into_iter()
        .map(|s| (s.method, s.path))
        .collect();
    let status = format!("/{FAL_APP}/requests/{FAL_REQ}/status");
    let expected: Vec<(String, String)> = vec![
        ("POST".into(), format!("/{FAL_MODEL}")),
        ("GET".into(), status.clone()),
        ("GET".into(), status.clone()),
        ("GET".into(), status),
        ("GET".into(), format!("/{FAL_APP}/requests/{FAL_REQ}")),
    ];
    assert_eq!(calls, expected);
    let counts: HashMap<String, usize> =
        fake.seen().into_iter().fold(HashMap::new(), |mut m, s| {
            *m.entry(s.method).or_default() += 1;
            m
        });
    assert_eq!(counts.get("PUT"), None, "no cancel was sent");
}
