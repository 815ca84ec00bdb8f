//! A log that fails to sync poisons the server: writes are refused with 503 `unavailable`
//! (never acknowledged), `/readyz` turns 503, reads of acknowledged state still work, and
//! a restart recovers every acknowledged write.

mod support;

use std::sync::Arc;

use serde_json::json;
use support::{Api, ADMIN};

#[test]
fn fsync_failure_makes_the_server_unready_and_refuse_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let rt = support::rt();
    let env = vec![("REELBATCH_ADMIN_TOKEN".to_string(), ADMIN.to_string())];
    let cfg = reelbatch::config::Config::load_with_env(None, env.clone()).unwrap();
    let mut ecfg = reelbatch::api::server::engine_config(&cfg, data.clone()).unwrap();
    let faults = Arc::new(wal::FaultInjector::new());
    ecfg.faults = Some(Arc::clone(&faults));
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(async move {
        reelbatch::api::server::serve_engine(
            ecfg,
            cfg,
            "127.0.0.1:0",
            async move {
                let _ = stop_rx.await;
            },
            |r| {
                let _ = addr_tx.send(r.addr);
            },
        )
        .await
    });
    let addr = addr_rx.recv().unwrap();
    let api = Api {
        http: reqwest::Client::new(),
        base: format!("http://{addr}"),
    };
    let (t, key) = rt.block_on(async {
        let (t, key) = api.funded("pro", 1_000).await;
        assert_eq!(
            api.call("GET", "/readyz", None, None, None).await.status,
            200
        );
        faults.fail_next_sync();
        let r = api
            .admin(
                "POST",
                &format!("/admin/v1/tenants/{t}/top-ups"),
                Some(&json!({"amount": 7, "kind": "paid"})),
                Some("lost"),
            )
            .await;
        r.assert_problem(503, "unavailable");
        assert!(r.header("retry-after").is_some());
        api.call("GET", "/readyz", None, None, None)
            .await
            .assert_problem(503, "unavailable");
        // Every later write is refused too; nothing is acknowledged.
        let r = api
            .post(&key, "/v1/batches", &json!({"template": "x"}), Some("b"))
            .await;
        r.assert_problem(503, "unavailable");
        let m = api.call("GET", "/metrics", None, None, None).await;
        assert!(m.text.contains("reelbatch_wal_poisoned 1"));
        (t, key)
    });
    let _ = stop_tx.send(());
    // Shutting down a poisoned engine reports the log's failure; that is expected here.
    let _ = rt.block_on(server);
    drop(rt);

    // A restart (without faults) has exactly the acknowledged writes.
    let mut s = support::Server::new_in(&data, &[], &[]);
    s.spawn().unwrap();
    let api = s.api();
    support::rt().block_on(async {
        let w = api.get(&key, "/v1/wallet").await;
        assert_eq!(w.status, 200, "{}", w.text);
        // The refused top-up was never acknowledged: it may or may not have reached the
        // disk before the failed sync, but it can never count twice.
        let granted = w.body["granted"].as_u64().unwrap();
        assert!(granted == 1_000 || granted == 1_007, "{granted}");
        assert_eq!(api.get(&key, "/v1/batches").await.body["data"], json!([]));
        let again = api
            .admin(
                "POST",
                &format!("/admin/v1/tenants/{t}/top-ups"),
                Some(&json!({"amount": 7, "kind": "paid"})),
                Some("lost"),
            )
            .await;
        assert_eq!(
            again.status, 201,
            "the refused request may be retried: {}",
            again.text
        );
        assert_eq!(api.get(&key, "/v1/wallet").await.body["granted"], 1_007);
        assert_eq!(api.reconcile().await["discrepancies"], json!([]));
    });
}
