//! The HTTP API over real TCP against the real `reelbatch serve` process: every route's
//! happy path, its error codes, tenant isolation, scopes, revocation and expiry, and the
//! OpenAPI document against the routes served.

mod support;

use serde_json::{json, Value};
use support::{rt, Server, ADMIN};

/// A 3 × 2 batch with one rejected style: 4 succeed, 2 fail.
fn pilot() -> Value {
    json!({
        "template": "a {style} shot of {scene}",
        "variables": {"style": ["calm", "wild [reject]", "neon"], "scene": ["rain", "dawn"]},
    })
}

#[test]
fn core_flow_over_http() {
    let server = Server::start(&[]);
    let api = server.api();
    rt().block_on(async {
        let (t, key) = api.funded("pro", 10_000).await;

        // Quote: nothing held.
        let q = api.post(&key, "/v1/batches/quote", &pilot(), None).await;
        assert_eq!(q.status, 200, "{}", q.text);
        assert_eq!(q.body["items"], 6);
        assert_eq!(q.body["unit_price"], 40);
        assert_eq!(q.body["total"], 240);
        assert_eq!(q.body["sample_prompts"][0], "a calm shot of rain");
        let w = api.get(&key, "/v1/wallet").await;
        assert_eq!(
            (w.body["available"].as_u64(), w.body["held"].as_u64()),
            (Some(10_000), Some(0))
        );

        // Create: held at once, then items run; one style is rejected and refunded.
        let c = api.post(&key, "/v1/batches", &pilot(), None).await;
        assert_eq!(c.status, 201, "{}", c.text);
        let id = c.body["id"].as_str().unwrap().to_owned();
        assert!(id.starts_with("bat_"));
        assert_eq!(c.header("location").unwrap(), format!("/v1/batches/{id}"));
        assert_eq!(c.body["total"], 240);
        assert_eq!(c.body["credits"]["held"], 240);
        assert!(c.header("ratelimit").unwrap().starts_with("\"default\";r="));
        assert_eq!(
            c.header("ratelimit-policy").unwrap(),
            "\"default\";q=100;w=2"
        );
        let b = api.wait_batch(&key, &id).await;
        assert_eq!(b["status"], "partial", "{b}");
        assert_eq!(b["counts"]["succeeded"], 4);
        assert_eq!(b["counts"]["failed"], 2);
        assert_eq!(
            b["credits"],
            json!({"held": 240, "settled": 160, "released": 80, "remaining": 0})
        );

        // Items, paginated.
        let p1 = api
            .get(&key, &format!("/v1/batches/{id}/items?limit=4"))
            .await;
        assert_eq!(p1.status, 200, "{}", p1.text);
        assert_eq!(p1.body["data"].as_array().unwrap().len(), 4);
        let cursor = p1.body["next_cursor"].as_str().unwrap().to_owned();
        let p2 = api
            .get(
                &key,
                &format!("/v1/batches/{id}/items?limit=4&cursor={cursor}"),
            )
            .await;
        let items: Vec<Value> = p1.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .chain(p2.body["data"].as_array().unwrap())
            .cloned()
            .collect();
        assert_eq!(items.len(), 6);
        assert_eq!(p2.body["next_cursor"], Value::Null);
        for (i, it) in items.iter().enumerate() {
            assert_eq!(it["index"], i);
            assert!(it["id"].as_str().unwrap().starts_with("itm_"));
            if it["prompt"].as_str().unwrap().contains("[reject]") {
                assert_eq!(it["status"], "failed");
                assert_eq!(it["failure_code"], "safety.prompt_rejected");
            } else {
                assert_eq!(it["status"], "succeeded");
                assert!(it["video_id"].as_str().unwrap().starts_with("vid_"));
            }
        }

        // Wallet, ledger (hash chain continuous across pages), statement JSON and CSV.
        let w = api.get(&key, "/v1/wallet").await.body;
        assert_eq!(w["available"], 10_000 - 160);
        assert_eq!(w["spent"], 160);
        assert_eq!(w["released"], 80);
        assert_eq!(w["held"], 0);
        let mut cursor: Option<String> = None;
        let mut prev = "0".repeat(64);
        let mut kinds = Vec::new();
        loop {
            let path = match &cursor {
                None => "/v1/wallet/ledger?limit=3".to_owned(),
                Some(c) => format!("/v1/wallet/ledger?limit=3&cursor={c}"),
            };
            let r = api.get(&key, &path).await;
            assert_eq!(r.status, 200, "{}", r.text);
            for e in r.body["data"].as_array().unwrap() {
                assert_eq!(
                    e["prev_hash"].as_str().unwrap(),
                    prev,
                    "chain continues across pages"
                );
                prev = e["hash"].as_str().unwrap().to_owned();
                kinds.push(e["kind"].as_str().unwrap().to_owned());
            }
            match r.body["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
        assert_eq!(kinds.iter().filter(|k| *k == "settle").count(), 4);
        assert_eq!(kinds.iter().filter(|k| *k == "release").count(), 2);
        assert_eq!(kinds[0], "top_up");
        let s = api.get(&key, "/v1/wallet/statement").await;
        assert_eq!(s.status, 200, "{}", s.text);
        assert_eq!(s.body["settled"], 160);
        assert_eq!(s.body["settled_by_batch"][0]["batch_id"], id.as_str());
        assert_eq!(s.body["closing"]["available"], 10_000 - 160);
        let csv = api.get(&key, "/v1/wallet/statement?format=csv").await;
        assert_eq!(csv.status, 200);
        assert!(csv.header("content-type").unwrap().starts_with("text/csv"));
        assert!(csv.text.starts_with("line,reference,credits\n"));
        assert!(
            csv.text.contains(&format!("settled_by_batch,{id},160\n")),
            "{}",
            csv.text
        );

        // Retry the failed items: a new batch and a new hold; both again fail.
        let r = api
            .post(
                &key,
                &format!("/v1/batches/{id}/retry-failed"),
                &json!({}),
                None,
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
        assert_eq!(r.body["retry_of"], id.as_str());
        assert_eq!(r.body["counts"]["total"], 2);
        let retry = r.body["id"].as_str().unwrap().to_owned();
        let rb = api.wait_batch(&key, &retry).await;
        assert_eq!(rb["status"], "failed");
        // Cancel of a finished batch changes nothing.
        let cx = api
            .post(&key, &format!("/v1/batches/{id}/cancel"), &json!({}), None)
            .await;
        assert_eq!(cx.status, 200, "{}", cx.text);
        assert_eq!(cx.body["status"], "partial");

        // Lists and admin views.
        let l = api.get(&key, "/v1/batches?limit=1").await;
        assert_eq!(l.body["data"][0]["id"], id.as_str());
        let next = l.body["next_cursor"].as_str().unwrap();
        let l2 = api
            .get(&key, &format!("/v1/batches?limit=1&cursor={next}"))
            .await;
        assert_eq!(l2.body["data"][0]["id"], retry.as_str());
        let at = api
            .admin("GET", &format!("/admin/v1/tenants/{t}"), None, None)
            .await;
        assert_eq!(at.status, 200, "{}", at.text);
        assert_eq!(at.body["plan"], "pro");
        assert_eq!(at.body["wallet"]["spent"], 160);
        let tl = api.admin("GET", "/admin/v1/tenants", None, None).await;
        assert!(tl.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["id"] == t.as_str()));
        let kl = api
            .admin("GET", &format!("/admin/v1/tenants/{t}/keys"), None, None)
            .await;
        assert_eq!(kl.body["data"].as_array().unwrap().len(), 1);
        assert!(
            kl.body["data"][0].get("key").is_none(),
            "secrets are never listed"
        );

        // Adjustments, audit search, export, reconciliation.
        let adj = api
            .admin(
                "POST",
                &format!("/admin/v1/tenants/{t}/adjustments"),
                Some(&json!({"amount": -40, "reason": "goodwill reversal"})),
                Some("adj-1"),
            )
            .await;
        assert_eq!(adj.status, 201, "{}", adj.text);
        assert_eq!(adj.body["amount"], -40);
        assert_eq!(adj.body["kind"], "adjust");
        let au = api
            .admin(
                "GET",
                &format!("/admin/v1/audit?request_id=fund-{t}"),
                None,
                None,
            )
            .await;
        assert_eq!(au.status, 200, "{}", au.text);
        assert_eq!(au.body["data"].as_array().unwrap().len(), 1);
        assert_eq!(au.body["data"][0]["kind"], "top_up");
        let au = api
            .admin(
                "GET",
                &format!("/admin/v1/audit?tenant_id={t}&kind=settle&batch_id={id}"),
                None,
                None,
            )
            .await;
        assert_eq!(au.body["data"].as_array().unwrap().len(), 4);
        let ex = api
            .admin(
                "GET",
                &format!("/admin/v1/tenants/{t}/ledger/export"),
                None,
                None,
            )
            .await;
        assert_eq!(ex.status, 200);
        assert_eq!(ex.header("content-type").unwrap(), "application/x-ndjson");
        let lines: Vec<Value> = ex
            .text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let last = lines.last().unwrap();
        assert_eq!(last["object"], "chain");
        assert_eq!(last["verified"], true);
        assert_eq!(last["entries"].as_u64().unwrap() as usize, lines.len() - 1);
        let rec = api.reconcile().await;
        assert_eq!(rec["discrepancies"], json!([]), "{rec}");
        assert_eq!(rec["tenants_checked"], 1);
        assert_eq!(rec["batches_checked"], 2);

        // Usage (per key, by hour and day) and admin top.
        let u = api.get(&key, "/v1/usage?granularity=hour").await;
        assert_eq!(u.status, 200, "{}", u.text);
        let bucket = &u.body["data"][0];
        assert!(bucket["requests"].as_u64().unwrap() >= 10);
        assert_eq!(bucket["by_route"]["POST /v1/batches"]["2xx"], 1);
        assert_eq!(bucket["credits"], 240 + 80);
        assert!(bucket["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
        let ud = api.get(&key, "/v1/usage?granularity=day").await;
        assert_eq!(ud.body["data"].as_array().unwrap().len(), 1);
        let top = api
            .admin("GET", "/admin/v1/usage/top?window=hour", None, None)
            .await;
        assert_eq!(top.body["tenants"][0]["tenant_id"], t.as_str());

        // Health, readiness, metrics.
        assert_eq!(
            api.call("GET", "/healthz", None, None, None).await.status,
            200
        );
        assert_eq!(
            api.call("GET", "/readyz", None, None, None).await.status,
            200
        );
        let m = api.call("GET", "/metrics", None, None, None).await;
        assert_eq!(m.status, 200);
        for name in [
            "reelbatch_http_requests_total{route=\"POST /v1/batches\",class=\"2xx\"} 1",
            "reelbatch_http_request_duration_seconds_bucket{route=\"GET /v1/wallet\",le=\"+Inf\"}",
            "reelbatch_wal_fsyncs_total",
            "reelbatch_wal_group_size_mean",
            "reelbatch_wallet_mailbox_in_flight",
            "reelbatch_scheduler_ready_items",
            "reelbatch_items{state=\"succeeded\"} 4",
            "reelbatch_provider_attempts_total{provider=\"simulated\",outcome=\"succeeded\"} 4",
        ] {
            assert!(m.text.contains(name), "metrics lack {name}:\n{}", m.text);
        }
        // The response index: a gauge of its runs and of its memory.
        assert!(
            m.text.contains("reelbatch_response_index_runs "),
            "{}",
            m.text
        );
        assert!(m.text.contains("reelbatch_response_index_memory_bytes "));
        // The two B-tree indexes' page caches: present, and within their bounds.
        for index in ["archive", "operations"] {
            let line = format!("reelbatch_index_cache_bytes{{index=\"{index}\"}} ");
            let bytes: u64 = m
                .text
                .lines()
                .find_map(|l| l.strip_prefix(&line))
                .unwrap_or_else(|| panic!("metrics lack {line}:\n{}", m.text))
                .parse()
                .unwrap();
            assert!(bytes <= 32 << 20, "{index}: {bytes}");
            assert!(m.text.contains(&format!(
                "reelbatch_index_cache_evictions_total{{index=\"{index}\"}} "
            )));
        }
        // The live heap: counted by the server's allocator, so a running server holds some
        // (its tables, caches and buffers) and far less than the machine.
        let heap: f64 = m
            .text
            .lines()
            .find_map(|l| l.strip_prefix("reelbatch_heap_live_bytes "))
            .unwrap_or_else(|| panic!("metrics lack the live heap:\n{}", m.text))
            .parse()
            .unwrap();
        assert!((1e5..4e9).contains(&heap), "live heap {heap} bytes");
        // The server runs without transparent huge pages (`heap::disable_transparent_huge_pages`):
        // the kernel says so for the process itself.
        let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
        let thp = status
            .lines()
            .find_map(|l| l.strip_prefix("THP_enabled:"))
            .unwrap_or_else(|| panic!("this kernel reports no THP_enabled:\n{status}"));
        assert_eq!(
            thp.trim(),
            "0",
            "transparent huge pages are on for the server"
        );
    });
}

#[test]
fn bad_input_gets_problems_never_5xx() {
    let server = Server::start(&[]);
    let api = server.api();
    rt().block_on(async {
        let (t, key) = api.funded("pro", 100).await;
        let raw = |body: &'static str| {
            api.http
                .post(format!("{}/v1/batches", api.base))
                .bearer_auth(&key)
                .body(body)
        };
        // Path ids that are not UTF-8 (found by the `http_bodies` fuzz target: axum's own
        // extractor answered a plain-text 400): an id that cannot exist is a 404 problem.
        for path in ["/v/%A6", "/v1/batches/%FF%FE", "/v1/videos/%C3/content"] {
            let token = if path.starts_with("/v/") {
                ""
            } else {
                key.as_str()
            };
            api.call(
                "GET",
                path,
                Some(token).filter(|t| !t.is_empty()),
                None,
                None,
            )
            .await
            .assert_problem(404, "not_found");
        }
        api.admin("GET", "/admin/v1/tenants/%80", None, None)
            .await
            .assert_problem(404, "not_found");
        api.send(raw("{\"template\": "))
            .await
            .assert_problem(400, "invalid_json");
        api.send(raw("not json"))
            .await
            .assert_problem(400, "invalid_json");
        api.send(raw("{\"template\":\"x\",\"colour\":1}"))
            .await
            .assert_problem(422, "invalid_request");
        api.send(raw("{\"template\":5}"))
            .await
            .assert_problem(422, "invalid_request");
        api.send(raw("{\"template\":\"x\",\"expires_in\":-1}"))
            .await
            .assert_problem(422, "invalid_request");
        let big = format!("{{\"template\":\"{}\"}}", "x".repeat(1_100_000));
        let r = api
            .send(
                api.http
                    .post(format!("{}/v1/batches", api.base))
                    .bearer_auth(&key)
                    .body(big.clone()),
            )
            .await;
        r.assert_problem(413, "payload_too_large");
        let r = api
            .send(
                api.http
                    .post(format!("{}/v1/batches", api.base))
                    .bearer_auth(&key)
                    .header("idempotency-key", "big")
                    .body(big),
            )
            .await;
        r.assert_problem(413, "payload_too_large");

        api.post(&key, "/v1/batches", &json!({"template": "a {x"}), None)
            .await
            .assert_problem(422, "invalid_template");
        api.post(
            &key,
            "/v1/batches",
            &json!({"template": "x", "params": {"model": "nope"}}),
            None,
        )
        .await
        .assert_problem(422, "invalid_request");
        api.post(
            &key,
            "/v1/batches",
            &json!({"template": "x", "params": {"resolution": "8k"}}),
            None,
        )
        .await
        .assert_problem(422, "invalid_request");
        // 4 items × 40 > 100 available: nothing held.
        api.post(
            &key,
            "/v1/batches",
            &json!({"template": "{a}", "variables": {"a": ["1","2","3","4"]}}),
            None,
        )
        .await
        .assert_problem(402, "insufficient_credits");
        assert_eq!(api.get(&key, "/v1/wallet").await.body["held"], 0);
        // Larger than the plan allows.
        let many: Vec<String> = (0..201).map(|i| i.to_string()).collect();
        api.post(
            &key,
            "/v1/batches",
            &json!({"template": "{a}", "variables": {"a": many}}),
            None,
        )
        .await
        .assert_problem(403, "plan_limit_exceeded");

        api.call("GET", "/v1/nope", Some(&key), None, None)
            .await
            .assert_problem(404, "not_found");
        api.call("DELETE", "/v1/wallet", Some(&key), None, None)
            .await
            .assert_problem(405, "method_not_allowed");
        api.get(&key, "/v1/batches/bat_bogus")
            .await
            .assert_problem(404, "not_found");
        api.get(&key, "/v1/batches/bat_00000000000000000000000000")
            .await
            .assert_problem(404, "not_found");
        api.get(&key, "/v1/batches?limit=0")
            .await
            .assert_problem(422, "invalid_request");
        api.get(&key, "/v1/batches?limit=501")
            .await
            .assert_problem(422, "invalid_request");
        api.get(&key, "/v1/batches?cursor=nope")
            .await
            .assert_problem(422, "invalid_request");
        api.get(&key, "/v1/batches?colour=red")
            .await
            .assert_problem(422, "invalid_request");
        api.get(&key, "/v1/wallet/statement?from=yesterday")
            .await
            .assert_problem(422, "invalid_request");
        api.get(&key, "/v1/wallet/statement?format=pdf")
            .await
            .assert_problem(422, "invalid_request");

        // Auth.
        api.call("GET", "/v1/wallet", None, None, None)
            .await
            .assert_problem(401, "unauthorized");
        api.get("rbk_nope", "/v1/wallet")
            .await
            .assert_problem(401, "unauthorized");
        let mut forged = key.clone();
        forged.replace_range(forged.len() - 4.., "0000");
        api.get(&forged, "/v1/wallet")
            .await
            .assert_problem(401, "unauthorized");
        api.call("GET", "/admin/v1/tenants", Some(&key), None, None)
            .await
            .assert_problem(401, "unauthorized");
        api.call("GET", "/v1/wallet", Some(ADMIN), None, None)
            .await
            .assert_problem(401, "unauthorized");
        api.call("GET", "/admin/v1/tenants", None, None, None)
            .await
            .assert_problem(401, "unauthorized");

        // Admin input.
        api.admin(
            "POST",
            "/admin/v1/tenants",
            Some(&json!({"name": "x", "plan": "gold"})),
            None,
        )
        .await
        .assert_problem(422, "invalid_request");
        api.admin(
            "POST",
            "/admin/v1/tenants",
            Some(&json!({"name": "", "plan": "pro"})),
            None,
        )
        .await
        .assert_problem(422, "invalid_request");
        api.admin(
            "POST",
            &format!("/admin/v1/tenants/{t}/top-ups"),
            Some(&json!({"amount": 5, "kind": "paid"})),
            None,
        )
        .await
        .assert_problem(422, "invalid_request");
        api.admin(
            "POST",
            &format!("/admin/v1/tenants/{t}/top-ups"),
            Some(&json!({"amount": 0, "kind": "paid"})),
            Some("z"),
        )
        .await
        .assert_problem(422, "invalid_request");
        api.admin(
            "POST",
            &format!("/admin/v1/tenants/{t}/top-ups"),
            Some(&json!({"amount": 5, "kind": "gift"})),
            Some("g"),
        )
        .await
        .assert_problem(422, "invalid_request");
        api.admin(
            "POST",
            "/admin/v1/tenants/ten_00000000000000000000000000/top-ups",
            Some(&json!({"amount": 5, "kind": "paid"})),
            Some("n"),
        )
        .await
        .assert_problem(404, "not_found");
        api.admin(
            "POST",
            &format!("/admin/v1/tenants/{t}/keys"),
            Some(&json!({"name": "k", "scopes": ["root"]})),
            None,
        )
        .await
        .assert_problem(422, "invalid_request");
        api.admin(
            "POST",
            &format!("/admin/v1/tenants/{t}/keys"),
            Some(&json!({"name": "k", "daily_credit_limit": 5})),
            None,
        )
        .await
        .assert_problem(403, "plan_limit_exceeded");
        api.admin(
            "DELETE",
            "/admin/v1/keys/key_00000000000000000000000000",
            None,
            None,
        )
        .await
        .assert_problem(404, "not_found");
        let bad_key = api
            .call(
                "POST",
                "/v1/batches",
                Some(&key),
                Some(&json!({"template": "x"})),
                Some("has space"),
            )
            .await;
        bad_key.assert_problem(422, "invalid_request");

        // The starter plan: single generations only.
        let (_, skey) = api.funded("starter", 1_000).await;
        api.post(
            &skey,
            "/v1/batches",
            &json!({"template": "{a}", "variables": {"a": ["1", "2"]}}),
            None,
        )
        .await
        .assert_problem(403, "plan_limit_exceeded");
        let one = api
            .post(&skey, "/v1/batches", &json!({"template": "one clip"}), None)
            .await;
        assert_eq!(one.status, 201, "{}", one.text);

        // Nothing above went wrong inside: the server still reconciles to zero.
        assert_eq!(api.reconcile().await["discrepancies"], json!([]));
    });
}

#[test]
fn tenants_are_isolated_scopes_enforced_keys_revocable() {
    let server = Server::start(&[]);
    let api = server.api();
    rt().block_on(async {
        let (ta, ka) = api.funded("pro", 1_000).await;
        let (_tb, kb) = api.funded("pro", 1_000).await;
        let b = api
            .post(&kb, "/v1/batches", &json!({"template": "b's clip"}), None)
            .await;
        assert_eq!(b.status, 201);
        let bid = b.body["id"].as_str().unwrap().to_owned();
        api.wait_batch(&kb, &bid).await;
        // Every batch route with A's key on B's batch: not found, never forbidden.
        for (m, path) in [
            ("GET", format!("/v1/batches/{bid}")),
            ("GET", format!("/v1/batches/{bid}/items")),
            ("POST", format!("/v1/batches/{bid}/cancel")),
            ("POST", format!("/v1/batches/{bid}/retry-failed")),
        ] {
            let body = (m == "POST").then(|| json!({}));
            api.call(m, &path, Some(&ka), body.as_ref(), None)
                .await
                .assert_problem(404, "not_found");
        }
        assert_eq!(api.get(&ka, "/v1/batches").await.body["data"], json!([]));
        assert_eq!(api.get(&ka, "/v1/wallet").await.body["spent"], 0);
        assert_eq!(api.get(&kb, "/v1/wallet").await.body["spent"], 40);
        let bkeys = api
            .admin("GET", &format!("/admin/v1/tenants/{_tb}/keys"), None, None)
            .await;
        let bkey_id = bkeys.body["data"][0]["id"].as_str().unwrap().to_owned();
        api.get(&ka, &format!("/v1/usage?key_id={bkey_id}"))
            .await
            .assert_problem(404, "not_found");
        let ledger = api.get(&ka, "/v1/wallet/ledger").await;
        assert!(ledger.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["tenant_id"] == ta.as_str()));

        // Scopes.
        let (_, reader) = api.key_with(&ta, json!({"scopes": ["batches:read"]})).await;
        api.post(&reader, "/v1/batches", &json!({"template": "x"}), None)
            .await
            .assert_problem(403, "forbidden");
        api.post(
            &reader,
            "/v1/batches/quote",
            &json!({"template": "x"}),
            None,
        )
        .await
        .assert_problem(403, "forbidden");
        api.get(&reader, "/v1/wallet")
            .await
            .assert_problem(403, "forbidden");
        assert_eq!(api.get(&reader, "/v1/batches").await.status, 200);
        let (_, wallet_only) = api.key_with(&ta, json!({"scopes": ["wallet:read"]})).await;
        api.get(&wallet_only, "/v1/batches")
            .await
            .assert_problem(403, "forbidden");
        assert_eq!(api.get(&wallet_only, "/v1/wallet").await.status, 200);

        // Revocation and expiry.
        let (kid, secret) = api.key_with(&ta, json!({})).await;
        assert_eq!(api.get(&secret, "/v1/wallet").await.status, 200);
        let rv = api
            .admin("DELETE", &format!("/admin/v1/keys/{kid}"), None, None)
            .await;
        assert_eq!(rv.status, 200, "{}", rv.text);
        assert!(rv.body["revoked_at"].is_string());
        api.get(&secret, "/v1/wallet")
            .await
            .assert_problem(401, "unauthorized");
        let soon = humantime::format_rfc3339_millis(
            std::time::SystemTime::now() + std::time::Duration::from_millis(1500),
        )
        .to_string();
        let (_, short) = api.key_with(&ta, json!({"expires_at": soon})).await;
        assert_eq!(api.get(&short, "/v1/wallet").await.status, 200);
        tokio::time::sleep(std::time::Duration::from_millis(1700)).await;
        api.get(&short, "/v1/wallet")
            .await
            .assert_problem(401, "unauthorized");
        api.admin(
            "POST",
            &format!("/admin/v1/tenants/{ta}/keys"),
            Some(&json!({"name": "old", "expires_at": "2020-01-01T00:00:00Z"})),
            None,
        )
        .await
        .assert_problem(422, "invalid_request");
    });
}

#[test]
fn rate_limits_and_daily_caps() {
    let server = Server::start(&[
        ("REELBATCH_PLANS__STARTER__RATE_PER_S", "1"),
        ("REELBATCH_PLANS__STARTER__BURST", "3"),
        ("REELBATCH_PLANS__PRO__ITEMS_PER_DAY", "5"),
    ]);
    let api = server.api();
    rt().block_on(async {
        let (_, skey) = api.funded("starter", 0).await;
        let mut remaining = Vec::new();
        for _ in 0..3 {
            let r = api.get(&skey, "/v1/wallet").await;
            assert_eq!(r.status, 200);
            assert_eq!(r.header("ratelimit-policy").unwrap(), "\"default\";q=3;w=3");
            remaining.push(r.header("ratelimit").unwrap());
        }
        assert_eq!(remaining[0], "\"default\";r=2;t=1");
        assert_eq!(remaining[2], "\"default\";r=0;t=3");
        let r = api.get(&skey, "/v1/wallet").await;
        r.assert_problem(429, "rate_limited");
        assert_eq!(r.header("retry-after").unwrap(), "1");
        assert_eq!(r.header("ratelimit").unwrap(), "\"default\";r=0;t=1");
        // The allowance refills at the plan's rate.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        assert_eq!(api.get(&skey, "/v1/wallet").await.status, 200);

        // Daily item cap (pro, set to 5 here): 4 fit, 2 more do not, 1 more does.
        let (_, pkey) = api.funded("pro", 10_000).await;
        let four = json!({"template": "{a}", "variables": {"a": ["1", "2", "3", "4"]}});
        assert_eq!(
            api.post(&pkey, "/v1/batches", &four, None).await.status,
            201
        );
        let two = json!({"template": "{a}", "variables": {"a": ["1", "2"]}});
        let r = api.post(&pkey, "/v1/batches", &two, None).await;
        r.assert_problem(429, "plan_limit_exceeded");
        let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=86_400).contains(&wait));
        assert_eq!(
            api.post(&pkey, "/v1/batches", &json!({"template": "one"}), None)
                .await
                .status,
            201
        );

        // Per-key daily spend cap (enterprise): 80 fits a cap of 100, 40 more does not.
        let t = api.tenant("enterprise").await;
        api.top_up(&t, 10_000, "e-fund").await;
        let (_, capped) = api.key_with(&t, json!({"daily_credit_limit": 100})).await;
        let other = api.key(&t).await;
        assert_eq!(
            api.post(&capped, "/v1/batches", &two, None).await.status,
            201
        );
        let r = api
            .post(&capped, "/v1/batches", &json!({"template": "x"}), None)
            .await;
        r.assert_problem(429, "key_spend_limit_exceeded");
        assert!(r.header("retry-after").is_some());
        assert_eq!(
            api.post(&other, "/v1/batches", &json!({"template": "x"}), None)
                .await
                .status,
            201
        );
    });
}

#[test]
fn openapi_lists_every_route_the_router_serves() {
    let server = Server::start(&[]);
    let api = server.api();
    rt().block_on(async {
        let doc = api.call("GET", "/openapi.json", None, None, None).await;
        assert_eq!(doc.status, 200);
        assert_eq!(doc.body["openapi"], "3.1.0");
        let paths = doc.body["paths"].as_object().unwrap();
        let mut documented = Vec::new();
        for (p, item) in paths {
            for m in item.as_object().unwrap().keys() {
                documented.push((m.to_uppercase(), p.clone()));
            }
        }
        // Every documented route is served: with placeholder ids it answers anything but
        // the router's "no such route" 404 or a 405.
        for (m, p) in &documented {
            let concrete = p
                .replace("{id}", "ten_00000000000000000000000000")
                .replace("{key_id}", "key_00000000000000000000000000");
            let r = api.call(m, &concrete, None, None, None).await;
            assert_ne!(r.status, 405, "{m} {p} is documented but not served");
            assert!(
                !(r.status == 404 && r.body["detail"] == "no such route"),
                "{m} {p} is documented but not served"
            );
        }
        // And the document holds every route SPEC §5/§11 pins for this API.
        for (m, p) in [
            ("POST", "/v1/batches/quote"),
            ("POST", "/v1/batches"),
            ("GET", "/v1/batches"),
            ("GET", "/v1/batches/{id}"),
            ("GET", "/v1/batches/{id}/items"),
            ("POST", "/v1/batches/{id}/cancel"),
            ("POST", "/v1/batches/{id}/retry-failed"),
            ("GET", "/v1/wallet"),
            ("GET", "/v1/wallet/ledger"),
            ("GET", "/v1/wallet/statement"),
            ("GET", "/v1/usage"),
            ("POST", "/admin/v1/tenants"),
            ("POST", "/admin/v1/tenants/{id}/keys"),
            ("DELETE", "/admin/v1/keys/{key_id}"),
            ("POST", "/admin/v1/tenants/{id}/top-ups"),
            ("POST", "/admin/v1/tenants/{id}/adjustments"),
            ("GET", "/admin/v1/reconciliation"),
            ("GET", "/openapi.json"),
            ("GET", "/healthz"),
            ("GET", "/readyz"),
            ("GET", "/metrics"),
        ] {
            assert!(
                documented.contains(&(m.to_string(), p.to_string())),
                "{m} {p} missing from the document"
            );
        }
        // A path the document does not list is not served.
        let r = api.call("GET", "/v1/secret-admin", None, None, None).await;
        r.assert_problem(404, "not_found");
    });
}

#[test]
fn config_errors_stop_startup_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("c.toml");
    std::fs::write(&cfg, "[limits]\nbody_bytes_mx = 5\n").unwrap();
    let mut s = Server::new_in(
        &tmp.path().join("d"),
        &[],
        &["--config", cfg.to_str().unwrap()],
    );
    let err = s.spawn().unwrap_err();
    assert!(
        err.contains("unknown config key `limits.body_bytes_mx`"),
        "{err}"
    );
    let mut s = Server::new_in(
        &tmp.path().join("d"),
        &[("REELBATCH_LIMITS__NOPE", "1")],
        &[],
    );
    let err = s.spawn().unwrap_err();
    assert!(err.contains("limits.nope"), "{err}");
    // A valid file is applied: a tiny body limit turns a normal request into a 413.
    std::fs::write(&cfg, "[limits]\nbody_bytes_max = 64\n").unwrap();
    let mut s = Server::new_in(
        &tmp.path().join("d"),
        &[],
        &["--config", cfg.to_str().unwrap()],
    );
    s.spawn().unwrap();
    let api = s.api();
    rt().block_on(async {
        let t = api.tenant("pro").await;
        let r = api
            .admin(
                "POST",
                &format!("/admin/v1/tenants/{t}/adjustments"),
                Some(&json!({"amount": 5, "reason": "x".repeat(100)})),
                Some("a"),
            )
            .await;
        r.assert_problem(413, "payload_too_large");
    });
}

#[test]
fn a_second_server_on_the_same_data_directory_refuses_to_start() {
    let server = Server::start(&[]);
    let api = server.api();
    let (t, key) = rt().block_on(api.funded("pro", 500));
    // The second process would otherwise repair (truncate) the log the first one is
    // writing: it waits a bounded time for the directory's lock, then exits with a reason.
    let mut second = Server::new_in(&server.dir, &[], &[]);
    let log = second.spawn().expect_err("a second server must not start");
    assert!(log.contains("is in use"), "{log}");
    assert!(log.contains("LOCK"), "{log}");
    // The first one is untouched: still serving, its acknowledged writes intact.
    rt().block_on(async {
        api.top_up(&t, 25, "after-second").await;
        let w = api.get(&key, "/v1/wallet").await;
        assert_eq!(w.status, 200, "{}", w.text);
        assert_eq!(w.body["available"], 525, "{}", w.text);
    });
}
