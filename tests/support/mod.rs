//! Test support: the real `reelbatch serve` binary on a loopback port, driven over HTTP.
//!
//! Each `Server` owns a data directory and a child process; `kill9` and `restart` give
//! real crashes (SIGKILL, then a new process on the same directory). `InProcess` runs the
//! same server inside the test process, for tests that must hold the log's fault points.

#![allow(dead_code)]

pub mod campaign;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A 2-worker runtime for a test's client side.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Runs `cmd` with `stdin` piped in and stdout/stderr captured.
pub fn run_with_stdin(cmd: &mut Command, stdin: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the command runs");
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(stdin.as_bytes())
        .expect("stdin written");
    child.wait_with_output().expect("the command ends")
}

/// A finished command's exit code and output, for assertion messages.
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The admin token every test server gets.
pub const ADMIN: &str = "test-admin-token";

/// A server process.
pub struct Server {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    pub dir: PathBuf,
    env: Vec<(String, String)>,
    args: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
}

/// `base_env` with `extra` on top (a key in `extra` replaces the base's).
pub fn env_with(extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut e = base_env();
    for (k, v) in extra {
        e.retain(|(ek, _)| ek != k);
        e.push((k.to_string(), v.to_string()));
    }
    e
}

/// Environment every test server starts with: fast, deterministic simulated provider.
fn base_env() -> Vec<(String, String)> {
    [
        ("REELBATCH_ADMIN_TOKEN", ADMIN),
        ("REELBATCH_PROVIDER__SIMULATED__LATENCY_MS", "[5, 20]"),
        ("REELBATCH_PROVIDER__SIMULATED__TRANSIENT_FAILURE_RATE", "0"),
        ("REELBATCH_PROVIDER__SIMULATED__PERMANENT_FAILURE_RATE", "0"),
        ("REELBATCH_LOG__LEVEL", "warn"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

impl Server {
    /// A server on a fresh data directory with extra environment.
    pub fn start(env: &[(&str, &str)]) -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data");
        let mut s = Server::new_in(&dir, env, &[]);
        s._tmp = Some(tmp);
        s.spawn().expect("server starts");
        s
    }

    /// A server description on `dir` (not started).
    pub fn new_in(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Server {
        Server {
            child: None,
            base: String::new(),
            dir: dir.to_path_buf(),
            env: env_with(env),
            args: args.iter().map(|s| s.to_string()).collect(),
            _tmp: None,
        }
    }

    /// Starts the process and waits for its "listening" line; Err(stderr) if it exits.
    pub fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("log"))
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_reelbatch"));
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .args(&self.args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = cmd.spawn().expect("spawn reelbatch");
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        match line.trim().strip_prefix("reelbatch listening on ") {
            Some(url) => {
                self.base = url.to_string();
                self.child = Some(child);
                Ok(())
            }
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default())
            }
        }
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait (bounded) for a graceful exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = c.try_wait().expect("wait") {
                return st;
            }
            assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A new process on the same data directory.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn().expect("server restarts");
    }

    pub fn api(&self) -> Api {
        Api::new(&self.base)
    }

    /// The running process's id (to read its `/proc` entries).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The server inside the test process (`serve_engine` on the test's runtime), on a
/// directory a `Server` can reopen after it stops.
pub struct InProcess {
    pub api: Api,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), reelbatch::api::server::ServeError>>,
}

impl InProcess {
    /// Starts on `dir` with `env_with(env)`; the test keeps `faults` to arm them.
    pub fn start(
        rt: &tokio::runtime::Runtime,
        dir: &Path,
        env: &[(&str, &str)],
        faults: std::sync::Arc<wal::FaultInjector>,
    ) -> InProcess {
        let cfg = reelbatch::config::Config::load_with_env(None, env_with(env)).expect("config");
        let mut ecfg =
            reelbatch::api::server::engine_config(&cfg, dir.to_path_buf()).expect("engine config");
        ecfg.faults = Some(faults);
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = rt.spawn(reelbatch::api::server::serve_engine(
            ecfg,
            cfg,
            "127.0.0.1:0",
            async move {
                let _ = stop_rx.await;
            },
            move |r| {
                let _ = addr_tx.send(r.addr);
            },
        ));
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the in-process server starts");
        InProcess {
            api: Api::new(&format!("http://{addr}")),
            stop,
            task,
        }
    }

    /// Stops it (bounded: 30 s) and returns how the server ended.
    pub fn stop(
        self,
        rt: &tokio::runtime::Runtime,
    ) -> Result<(), reelbatch::api::server::ServeError> {
        let _ = self.stop.send(());
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), self.task).await })
            .expect("the in-process server stops within 30 s")
            .expect("server task")
    }
}

/// A response, read whole.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
    /// The body as JSON (`Null` when it is not JSON).
    pub body: Value,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    /// Asserts an RFC 9457 problem with `status` and `code`.
    pub fn assert_problem(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{}", self.text);
        assert_eq!(
            self.header("content-type").as_deref(),
            Some("application/problem+json"),
            "{}",
            self.text
        );
        assert_eq!(self.body["code"], code, "{}", self.text);
        assert_eq!(self.body["status"], status, "{}", self.text);
        for f in ["type", "title", "detail"] {
            assert!(self.body[f].is_string(), "problem lacks {f}: {}", self.text);
        }
    }
}

/// An HTTP client bound to a server.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
}

impl Api {
    /// A client of the server at `base` (`http://127.0.0.1:PORT`).
    pub fn new(base: &str) -> Api {
        Api {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client"),
            base: base.to_owned(),
        }
    }

    /// Any request: method, path, bearer token, JSON body, idempotency key.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        idem: Option<&str>,
    ) -> Resp {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut rb = self.http.request(m, format!("{}{}", self.base, path));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb
                .header("content-type", "application/json")
                .body(serde_json::to_vec(b).expect("json"));
        }
        if let Some(k) = idem {
            rb = rb.header("idempotency-key", k);
        }
        self.send(rb).await
    }

    pub async fn send(&self, rb: reqwest::RequestBuilder) -> Resp {
        let r = rb.send().await.expect("request reaches the server");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            text,
            body,
        }
    }

    pub async fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        idem: Option<&str>,
    ) -> Resp {
        self.call(method, path, Some(ADMIN), body, idem).await
    }

    pub async fn get(&self, key: &str, path: &str) -> Resp {
        self.call("GET", path, Some(key), None, None).await
    }

    pub async fn post(&self, key: &str, path: &str, body: &Value, idem: Option<&str>) -> Resp {
        self.call("POST", path, Some(key), Some(body), idem).await
    }

    /// A tenant on `plan`; its id.
    pub async fn tenant(&self, plan: &str) -> String {
        let r = self
            .admin(
                "POST",
                "/admin/v1/tenants",
                Some(&json!({"name": "t", "plan": plan})),
                None,
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
        r.body["id"].as_str().expect("id").to_owned()
    }

    /// A key for `tenant` with `body` (name defaulted); (key id, secret).
    pub async fn key_with(&self, tenant: &str, mut body: Value) -> (String, String) {
        if body.get("name").is_none() {
            body["name"] = json!("k");
        }
        let r = self
            .admin(
                "POST",
                &format!("/admin/v1/tenants/{tenant}/keys"),
                Some(&body),
                None,
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
        (
            r.body["id"].as_str().expect("id").to_owned(),
            r.body["key"].as_str().expect("secret").to_owned(),
        )
    }

    /// A key with every scope.
    pub async fn key(&self, tenant: &str) -> String {
        self.key_with(tenant, json!({})).await.1
    }

    /// A paid top-up.
    pub async fn top_up(&self, tenant: &str, amount: u64, idem: &str) -> Resp {
        let r = self
            .admin(
                "POST",
                &format!("/admin/v1/tenants/{tenant}/top-ups"),
                Some(&json!({"amount": amount, "kind": "paid"})),
                Some(idem),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
        r
    }

    /// A tenant on `plan` with `credits` and a key: (tenant, secret).
    pub async fn funded(&self, plan: &str, credits: u64) -> (String, String) {
        let t = self.tenant(plan).await;
        let k = self.key(&t).await;
        if credits > 0 {
            self.top_up(&t, credits, &format!("fund-{t}")).await;
        }
        (t, k)
    }

    /// Polls a batch until it is terminal (bounded).
    pub async fn wait_batch(&self, key: &str, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = self.get(key, &format!("/v1/batches/{id}")).await;
            assert_eq!(r.status, 200, "{}", r.text);
            let s = r.body["status"].as_str().unwrap_or("").to_owned();
            if ["completed", "partial", "failed", "canceled"].contains(&s.as_str()) {
                return r.body;
            }
            assert!(
                Instant::now() < deadline,
                "batch {id} never finished: {}",
                r.text
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The admin reconciliation report.
    pub async fn reconcile(&self) -> Value {
        let r = self
            .admin("GET", "/admin/v1/reconciliation", None, None)
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        r.body
    }
}
