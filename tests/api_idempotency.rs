//! Idempotency over HTTP: verbatim replay, mismatch, rejections not stored, concurrent
//! duplicates, and replay after kill -9 and a restart; graceful SIGTERM.

mod support;

use serde_json::{json, Value};
use support::{rt, Server};

#[test]
fn replay_mismatch_and_rejections_not_stored() {
    let server = Server::start(&[]);
    let api = server.api();
    rt().block_on(async {
        let t = api.tenant("pro").await;
        let key = api.key(&t).await;
        let path = format!("/admin/v1/tenants/{t}/top-ups");
        let body = json!({"amount": 100, "kind": "paid"});
        let first = api.admin("POST", &path, Some(&body), Some("top-1")).await;
        assert_eq!(first.status, 201, "{}", first.text);
        assert!(first.header("idempotent-replayed").is_none());
        let again = api.admin("POST", &path, Some(&body), Some("top-1")).await;
        assert_eq!(again.status, 201);
        assert_eq!(again.text, first.text, "replayed verbatim");
        assert_eq!(again.header("idempotent-replayed").as_deref(), Some("true"));
        let other = api
            .admin(
                "POST",
                &path,
                Some(&json!({"amount": 101, "kind": "paid"})),
                Some("top-1"),
            )
            .await;
        other.assert_problem(422, "idempotency_key_reused");
        assert_eq!(api.get(&key, "/v1/wallet").await.body["granted"], 100);

        // A 402 changed nothing, so it is not stored: the same key works once funded.
        let batch = json!({"template": "{a}", "variables": {"a": ["1", "2", "3"]}});
        let r = api.post(&key, "/v1/batches", &batch, Some("b-1")).await;
        r.assert_problem(402, "insufficient_credits");
        api.top_up(&t, 1_000, "top-2").await;
        let created = api.post(&key, "/v1/batches", &batch, Some("b-1")).await;
        assert_eq!(created.status, 201, "{}", created.text);
        let replay = api.post(&key, "/v1/batches", &batch, Some("b-1")).await;
        assert_eq!(replay.text, created.text);
        assert_eq!(
            replay.header("idempotent-replayed").as_deref(),
            Some("true")
        );
        // request_id in the body: a repeat is the same batch (no second hold).
        let with_id = json!({"template": "solo", "request_id": "order-7"});
        let a = api.post(&key, "/v1/batches", &with_id, None).await;
        let b = api.post(&key, "/v1/batches", &with_id, None).await;
        assert_eq!((a.status, b.status), (201, 201));
        assert_eq!(a.body["id"], b.body["id"]);
        let changed = json!({"template": "solo v2", "request_id": "order-7"});
        api.post(&key, "/v1/batches", &changed, None)
            .await
            .assert_problem(422, "idempotency_key_reused");
        let w = api.get(&key, "/v1/wallet").await.body;
        assert_eq!(w["granted"], 1_100);
        // Two batches committed: 3 × 40 and 1 × 40 (nothing fails on this provider setup).
        let committed = w["held"].as_u64().unwrap() + w["spent"].as_u64().unwrap();
        assert_eq!(committed, 160, "{w}");
        // Keys are scoped to the tenant: another tenant may use "b-1" for itself.
        let (_, k2) = api.funded("pro", 1_000).await;
        let own = api.post(&k2, "/v1/batches", &batch, Some("b-1")).await;
        assert_eq!(own.status, 201);
        assert_ne!(own.body["id"], created.body["id"]);
        // Key creation is replayed without its secret (secrets are stored only as hashes).
        let kpath = format!("/admin/v1/tenants/{t}/keys");
        let k1 = api
            .admin("POST", &kpath, Some(&json!({"name": "ci"})), Some("key-1"))
            .await;
        assert!(k1.body["key"].as_str().unwrap().starts_with("rbk_"));
        let k1r = api
            .admin("POST", &kpath, Some(&json!({"name": "ci"})), Some("key-1"))
            .await;
        assert_eq!(k1r.status, 201);
        assert_eq!(k1r.body["id"], k1.body["id"]);
        assert_eq!(k1r.body["key"], Value::Null);
        assert_eq!(k1r.body["key_redacted"], true);
        assert_eq!(api.reconcile().await["discrepancies"], json!([]));
    });
}

#[test]
fn concurrent_duplicates_make_one_grant() {
    let server = Server::start(&[]);
    let api = server.api();
    rt().block_on(async {
        let t = api.tenant("pro").await;
        let key = api.key(&t).await;
        let path = format!("/admin/v1/tenants/{t}/top-ups");
        let mut tasks = Vec::new();
        for _ in 0..48 {
            let api = api.clone();
            let path = path.clone();
            tasks.push(tokio::spawn(async move {
                api.admin(
                    "POST",
                    &path,
                    Some(&json!({"amount": 500, "kind": "paid"})),
                    Some("storm"),
                )
                .await
            }));
        }
        let mut bodies = std::collections::HashSet::new();
        let (mut created, mut in_progress) = (0, 0);
        for t in tasks {
            let r = t.await.unwrap();
            match r.status {
                201 => {
                    created += 1;
                    bodies.insert(r.text);
                }
                409 => {
                    r.assert_problem(409, "request_in_progress");
                    in_progress += 1;
                }
                s => panic!("unexpected {s}: {}", r.text),
            }
        }
        assert!(created >= 1);
        assert_eq!(created + in_progress, 48);
        assert_eq!(bodies.len(), 1, "every success is the same response");
        let w = api.get(&key, "/v1/wallet").await.body;
        assert_eq!(w["granted"], 500, "one grant");
        let ledger = api.get(&key, "/v1/wallet/ledger").await.body;
        assert_eq!(ledger["data"].as_array().unwrap().len(), 1);
    });
}

#[test]
fn replay_after_kill9_and_restart() {
    let mut server = Server::start(&[]);
    let rt = rt();
    let (t, key, top, batch, batch_body) = rt.block_on(async {
        let api = server.api();
        let t = api.tenant("pro").await;
        let key = api.key(&t).await;
        let top = api.top_up(&t, 5_000, "grant-1").await;
        let batch_body = json!({"template": "{a} at night", "variables": {"a": ["owl", "fox"]}});
        let batch = api
            .post(&key, "/v1/batches", &batch_body, Some("mk-1"))
            .await;
        assert_eq!(batch.status, 201, "{}", batch.text);
        (t, key, top, batch, batch_body)
    });
    server.kill9();
    server.spawn().expect("restarts on the same directory");
    rt.block_on(async {
        let api = server.api();
        assert_eq!(
            api.call("GET", "/readyz", None, None, None).await.status,
            200
        );
        // The key still authenticates; both responses replay verbatim.
        let top2 = api.top_up(&t, 5_000, "grant-1").await;
        assert_eq!(top2.text, top.text);
        assert_eq!(top2.header("idempotent-replayed").as_deref(), Some("true"));
        let batch2 = api
            .post(&key, "/v1/batches", &batch_body, Some("mk-1"))
            .await;
        assert_eq!(batch2.text, batch.text);
        let id = batch.body["id"].as_str().unwrap();
        let done = api.wait_batch(&key, id).await;
        assert_eq!(done["status"], "completed", "{done}");
        let w = api.get(&key, "/v1/wallet").await.body;
        assert_eq!(w["granted"], 5_000);
        assert_eq!(w["spent"], 80);
        assert_eq!(
            api.get(&key, "/v1/batches").await.body["data"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        assert_eq!(api.reconcile().await["discrepancies"], json!([]));
    });
    // Graceful stop: exit 0 with a snapshot, and the next start recovers from it.
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
    let snaps = std::fs::read_dir(server.dir.join("snapshots"))
        .unwrap()
        .count();
    assert!(snaps >= 1, "a final snapshot was written");
    server.spawn().expect("restarts after a graceful stop");
    rt.block_on(async {
        let api = server.api();
        let w = api.get(&key, "/v1/wallet").await.body;
        assert_eq!(w["spent"], 80);
        let again = api.top_up(&t, 5_000, "grant-1").await;
        assert_eq!(
            again.text, top.text,
            "stored responses survive snapshots too"
        );
    });
    // The final snapshot filed both responses in a segment: the image lists only where
    // they are. After a kill -9 (no snapshot, nothing in the log for them) they are read
    // back from that file.
    let files: Vec<String> = std::fs::read_dir(server.dir.join("archive").join("responses"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let segments = files.iter().filter(|f| f.len() == 10).count();
    let runs = files.iter().filter(|f| f.starts_with("run-")).count();
    assert_eq!(
        (segments, runs),
        (1, 1),
        "a segment and its index run: {files:?}"
    );
    server.kill9();
    server.spawn().expect("restarts after a kill -9");
    rt.block_on(async {
        let api = server.api();
        let again = api.top_up(&t, 5_000, "grant-1").await;
        assert_eq!(again.text, top.text);
        assert_eq!(again.header("idempotent-replayed").as_deref(), Some("true"));
        let batch3 = api
            .post(&key, "/v1/batches", &batch_body, Some("mk-1"))
            .await;
        assert_eq!(batch3.status, 201);
        assert_eq!(batch3.text, batch.text, "a filed response replays verbatim");
        let other = json!({"template": "{a} by day", "variables": {"a": ["owl"]}});
        let reused = api.post(&key, "/v1/batches", &other, Some("mk-1")).await;
        assert_eq!(reused.status, 422, "{}", reused.text);
        let w = api.get(&key, "/v1/wallet").await.body;
        assert_eq!(w["granted"], 5_000, "no second grant");
    });
}
