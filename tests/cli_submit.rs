//! `reelbatch submit FILE --wait` against a real server process: a first run interrupted
//! after the server created the batch but before the client heard of it (the answer is
//! swallowed by a proxy on the way back, then the client is killed) leaves a ticket; the
//! re-run finds the same batch by its request id and follows it to the end, and a third
//! run only follows. Also: the prompt (declined → nothing submitted), a server refusal
//! (402 → exit 2, no batch), bad files, and `--new` for a deliberate second batch.

mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{rt, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TCP proxy to `target`. While `swallow` is on, a connection that carries a batch
/// creation (`POST /v1/batches `) forwards it but never returns the answer: the server
/// acts, the client hears nothing.
async fn proxy(target: String, swallow: Arc<AtomicBool>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                continue;
            };
            let swallow = Arc::clone(&swallow);
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let creating = Arc::new(AtomicBool::new(false));
                let c = Arc::clone(&creating);
                let up = tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if swallow.load(Ordering::SeqCst)
                            && buf[..n].windows(18).any(|w| w == b"POST /v1/batches H")
                        {
                            c.store(true, Ordering::SeqCst);
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if creating.load(Ordering::SeqCst) {
                        continue; // swallowed
                    }
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                up.abort();
            });
        }
    });
    format!("http://{addr}")
}

fn submit(args: &[&str], stdin: &str, env: &[(&str, &str)]) -> Output {
    support::run_with_stdin(
        Command::new(env!("CARGO_BIN_EXE_reelbatch"))
            .arg("submit")
            .args(args)
            .env_remove("REELBATCH_URL")
            .env_remove("REELBATCH_API_KEY")
            .envs(env.iter().copied()),
        stdin,
    )
}

fn batches(rt: &tokio::runtime::Runtime, s: &Server, key: &str) -> Vec<Value> {
    rt.block_on(async {
        let r = s.api().get(key, "/v1/batches").await;
        assert_eq!(r.status, 200, "{}", r.text);
        r.body["data"].as_array().unwrap().clone()
    })
}

fn write(dir: &Path, name: &str, content: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p.to_str().unwrap().to_owned()
}

const PILOT: &str = r#"
template = "{style} shot of {scene}"
[variables]
style = ["calm", "neon"]
scene = ["rain", "dawn", "a market [reject]"]
"#;

#[test]
fn an_interrupted_submit_resumes_the_same_batch() {
    let rt = rt();
    let s = Server::start(&[]);
    let (_t, key) = rt.block_on(s.api().funded("pro", 10_000));
    let swallow = Arc::new(AtomicBool::new(true));
    let url = rt.block_on(proxy(
        s.base.trim_start_matches("http://").to_owned(),
        Arc::clone(&swallow),
    ));
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "pilot.toml", PILOT);
    let ticket = dir.path().join("pilot.toml.reelbatch.json");

    // Run 1: confirmed on stdin; the creation's answer never comes back; killed once the
    // server has the batch (a crash, a Ctrl-C, a laptop lid).
    let mut child = Command::new(env!("CARGO_BIN_EXE_reelbatch"))
        .args(["submit", &file, "--wait", "--url", &url, "--key", &key])
        .env_remove("REELBATCH_URL")
        .env_remove("REELBATCH_API_KEY")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"y\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while batches(&rt, &s, &key).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the first run never created a batch"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the client is still waiting for an answer"
    );
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let first = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(first.contains("quote: 6 videos"), "{first}");
    assert!(
        !first.contains("batch bat_"),
        "the client never learned the id: {first}"
    );
    let t: Value = serde_json::from_slice(&std::fs::read(&ticket).unwrap()).unwrap();
    let request_id = t["request_id"].as_str().unwrap().to_owned();
    assert!(request_id.starts_with("cli_"), "{t}");
    assert_eq!(t["batch_id"], Value::Null);
    assert!(!t.to_string().contains(&key), "the key is never written");
    let created = batches(&rt, &s, &key);
    assert_eq!(created.len(), 1);
    let id = created[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(created[0]["request_id"], request_id.as_str());

    // Run 2, through the same (now honest) proxy: the same request id, the same batch,
    // followed to the end (partial: the [reject] scene is refunded).
    swallow.store(false, Ordering::SeqCst);
    let out = submit(
        &[&file, "--wait", "--yes", "--url", &url, "--key", &key],
        "",
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", support::output_text(&out));
    let second = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        second.contains(&format!("resuming request {request_id}")),
        "{second}"
    );
    assert!(second.contains(&format!("batch {id}: partial")), "{second}");
    assert!(
        second.contains("4 succeeded, 2 failed (refunded)"),
        "{second}"
    );
    assert!(
        second.contains("held 240  settled 160  released 80"),
        "{second}"
    );
    assert!(second.contains("safety.prompt_rejected"), "{second}");
    // Not a terminal: plain progress lines on stderr.
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("progress "),
        "{}",
        support::output_text(&out)
    );
    assert_eq!(batches(&rt, &s, &key).len(), 1, "no second batch");
    let t: Value = serde_json::from_slice(&std::fs::read(&ticket).unwrap()).unwrap();
    assert_eq!(t["batch_id"], id.as_str());

    // Run 3, server and key from the environment: only follows the known batch.
    let out = submit(
        &[&file, "--wait"],
        "",
        &[("REELBATCH_URL", &url), ("REELBATCH_API_KEY", &key)],
    );
    assert_eq!(out.status.code(), Some(1), "{}", support::output_text(&out));
    let third = String::from_utf8_lossy(&out.stdout);
    assert!(!third.contains("quote:"), "nothing re-quoted: {third}");
    assert!(third.contains(&format!("batch {id}: partial")), "{third}");
    assert_eq!(batches(&rt, &s, &key).len(), 1);

    // A deliberate second batch: --new. Without --wait it exits 0 once accepted.
    let out = submit(
        &[&file, "--new", "--yes", "--url", &url, "--key", &key],
        "",
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", support::output_text(&out));
    assert_eq!(batches(&rt, &s, &key).len(), 2);

    // An edited file is a new request (no resume); declined at the prompt: nothing sent,
    // no ticket change.
    let edited = write(
        dir.path(),
        "pilot.toml",
        &PILOT.replace("\"dawn\"", "\"dusk\""),
    );
    let before = std::fs::read(&ticket).unwrap();
    let out = submit(&[&edited, "--url", &url, "--key", &key], "n\n", &[]);
    assert_eq!(out.status.code(), Some(2), "{}", support::output_text(&out));
    let o = String::from_utf8_lossy(&out.stdout);
    assert!(!o.contains("resuming"), "{o}");
    assert!(o.contains("nothing submitted"), "{o}");
    assert_eq!(std::fs::read(&ticket).unwrap(), before);
    assert_eq!(batches(&rt, &s, &key).len(), 2);

    // A batch that completes: exit 0 with --wait (JSON file this time).
    let ok = write(
        dir.path(),
        "ok.json",
        r#"{"template": "{a} at dawn", "variables": {"a": ["fox", "owl"]}}"#,
    );
    let out = submit(
        &[&ok, "--wait", "--yes", "--url", &url, "--key", &key],
        "",
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", support::output_text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(": completed"));
}

#[test]
fn refusals_exit_2_and_create_nothing() {
    let rt = rt();
    let s = Server::start(&[]);
    let (_t, poor) = rt.block_on(s.api().funded("pro", 100));
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "pilot.toml", PILOT);

    // 6 × 40 credits against 100: the server refuses the hold (402).
    let out = submit(&[&file, "--yes", "--url", &s.base, "--key", &poor], "", &[]);
    assert_eq!(out.status.code(), Some(2), "{}", support::output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("insufficient_credits"),
        "{}",
        support::output_text(&out)
    );
    assert!(batches(&rt, &s, &poor).is_empty());

    // A bad key, a bad file, a missing file, no key at all.
    let out = submit(
        &[&file, "--yes", "--url", &s.base, "--key", "rb_nope"],
        "",
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", support::output_text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    let yaml = write(dir.path(), "b.yaml", "template: x");
    let out = submit(&[&yaml, "--yes", "--url", &s.base, "--key", &poor], "", &[]);
    assert_eq!(out.status.code(), Some(2), "{}", support::output_text(&out));
    let bad = write(dir.path(), "bad.toml", "template = ");
    let out = submit(&[&bad, "--yes", "--url", &s.base, "--key", &poor], "", &[]);
    assert_eq!(out.status.code(), Some(2), "{}", support::output_text(&out));
    let missing = dir.path().join("missing.toml");
    let out = submit(
        &[missing.to_str().unwrap(), "--url", &s.base, "--key", &poor],
        "",
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", support::output_text(&out));
    let out = submit(&[&file, "--yes", "--url", &s.base], "", &[]);
    assert_eq!(out.status.code(), Some(2), "{}", support::output_text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("REELBATCH_API_KEY"));
    // A template the server refuses (unknown variable): 422, exit 2.
    let unknown = write(
        dir.path(),
        "u.json",
        r#"{"template": "{nope}", "variables": {}}"#,
    );
    let out = submit(
        &[&unknown, "--yes", "--url", &s.base, "--key", &poor],
        "",
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", support::output_text(&out));
    assert!(batches(&rt, &s, &poor).is_empty());
}
