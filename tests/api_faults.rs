//! A log that fails to sync poisons the server: writes are refused with 503 `unavailable`
//! (never acknowledged), `/readyz` turns 503, reads of acknowledged state still work, and
//! a restart recovers every acknowledged write.

mod support;

use std::sync::Arc;

use serde_json::json;

#[test]
fn fsync_failure_makes_the_server_unready_and_refuse_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let rt = support::rt();
    let faults = Arc::new(wal::FaultInjector::new());
    let server = support::InProcess::start(&rt, &data, &[], Arc::clone(&faults));
    let api = server.api.clone();
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
    // Shutting down a poisoned engine reports the log's failure; that is expected here.
    let _ = server.stop(&rt);
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
