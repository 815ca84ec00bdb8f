//! Delivery over real HTTP (SPEC §7): content with Range, watermark by plan, signed links,
//! embeds with domain whitelists, the access log, tenant isolation.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{rt, Api, Server};

/// A finished single-item batch's video id.
async fn video(api: &Api, key: &str) -> String {
    let r = api
        .post(
            key,
            "/v1/batches",
            &json!({"template": "a quiet lake"}),
            None,
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_owned();
    let b = api.wait_batch(key, &id).await;
    assert_eq!(b["status"], "completed", "{b}");
    let items = api.get(key, &format!("/v1/batches/{id}/items")).await;
    items.body["data"][0]["video_id"]
        .as_str()
        .expect("a video id")
        .to_owned()
}

/// The rendition's bytes as stored in the data directory (the store's key layout).
fn stored(server: &Server, vid: &str, rendition: &str) -> Vec<u8> {
    let shard = &vid[vid.len() - 2..];
    let path = server
        .dir
        .join(format!("videos/videos/{shard}/{vid}.{rendition}.gif"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

async fn raw(
    api: &Api,
    url: &str,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut rb = api.http.get(url);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let h = r.headers().clone();
    (status, h, r.bytes().await.unwrap().to_vec())
}

/// Starter keys are limited to 5 requests/s by default; these tests poll.
const FAST_STARTER: &[(&str, &str)] = &[
    ("REELBATCH_PLANS__STARTER__RATE_PER_S", "1000"),
    ("REELBATCH_PLANS__STARTER__BURST", "1000"),
];

async fn access(api: &Api, key: &str, query: &str) -> Vec<Value> {
    let r = api.get(key, &format!("/v1/access-log{query}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["data"].as_array().unwrap().clone()
}

async fn link(api: &Api, key: &str, vid: &str, body: Value) -> String {
    let r = api
        .post(key, &format!("/v1/videos/{vid}/links"), &body, None)
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert!(r.body["expires_at"].is_string());
    r.body["url"].as_str().unwrap().to_owned()
}

#[test]
fn content_ranges_watermarks_and_the_download_log() {
    rt().block_on(async {
        let server = Server::start(FAST_STARTER);
        let api = server.api();
        let (_, pro) = api.funded("pro", 1000).await;
        let (_, starter) = api.funded("starter", 1000).await;
        let vp = video(&api, &pro).await;
        let vs = video(&api, &starter).await;

        // Metadata.
        let m = api.get(&pro, &format!("/v1/videos/{vp}")).await;
        assert_eq!(m.status, 200, "{}", m.text);
        assert_eq!(m.body["content_type"], "image/gif");
        assert_eq!(m.body["prompt"], "a quiet lake");
        assert_eq!(m.body["watermarked"], false);
        assert!(m.body["item_id"].as_str().unwrap().starts_with("itm_"));

        // Pro gets the clean file, starter the watermarked one: byte for byte.
        let clean = stored(&server, &vp, "clean");
        let url = format!("{}/v1/videos/{vp}/content", api.base);
        let auth = format!("Bearer {pro}");
        let (st, h, body) = raw(&api, &url, &[("authorization", &auth)]).await;
        assert_eq!(st, 200);
        assert_eq!(body, clean);
        assert_eq!(h["content-type"], "image/gif");
        assert_eq!(h["content-length"], clean.len().to_string().as_str());
        assert_eq!(h["accept-ranges"], "bytes");
        let etag = h["etag"].to_str().unwrap().to_owned();
        let s_url = format!("{}/v1/videos/{vs}/content", api.base);
        let s_auth = format!("Bearer {starter}");
        let (st, _, body) = raw(&api, &s_url, &[("authorization", &s_auth)]).await;
        assert_eq!(st, 200);
        assert_eq!(body, stored(&server, &vs, "watermarked"));
        assert_ne!(body, stored(&server, &vs, "clean"));
        let m = api.get(&starter, &format!("/v1/videos/{vs}")).await;
        assert_eq!(m.body["watermarked"], true);

        // Ranges: 206 with Content-Range, suffix, open end; 416 beyond the end.
        let n = clean.len();
        let (st, h, body) = raw(
            &api,
            &url,
            &[("authorization", &auth), ("range", "bytes=0-9")],
        )
        .await;
        assert_eq!(st, 206);
        assert_eq!(body, &clean[..10]);
        assert_eq!(h["content-range"], format!("bytes 0-9/{n}").as_str());
        assert_eq!(h["content-length"], "10");
        let (st, _, body) = raw(
            &api,
            &url,
            &[("authorization", &auth), ("range", "bytes=-5")],
        )
        .await;
        assert_eq!((st, body.as_slice()), (206, &clean[n - 5..]));
        let (st, _, body) = raw(
            &api,
            &url,
            &[("authorization", &auth), ("range", "bytes=6-")],
        )
        .await;
        assert_eq!((st, body.as_slice()), (206, &clean[6..]));
        let beyond = format!("bytes={n}-");
        let (st, h, _) = raw(&api, &url, &[("authorization", &auth), ("range", &beyond)]).await;
        assert_eq!(st, 416);
        assert_eq!(h["content-range"], format!("bytes */{n}").as_str());
        let (st, _, body) = raw(
            &api,
            &url,
            &[("authorization", &auth), ("if-none-match", &etag)],
        )
        .await;
        assert_eq!((st, body.len()), (304, 0));

        // Every download is in the log with the key and the client's details.
        let log = access(&api, &pro, "?kind=download").await;
        assert_eq!(log.len(), 6, "{log:#?}");
        let e = &log[0];
        assert_eq!(e["video_id"], vp.as_str());
        assert_eq!(e["allowed"], true);
        assert!(e["key_id"].as_str().unwrap().starts_with("key_"));
        assert_eq!(e["ip"], "127.0.0.1");
        assert!(e["user_agent"].is_string() || e["user_agent"].is_null());
        assert!(e["at"].is_string());
        assert_eq!(e["detail"], "clean");
        let future = "2100-01-01T00:00:00Z";
        assert!(access(&api, &pro, &format!("?from={future}"))
            .await
            .is_empty());
        assert_eq!(access(&api, &pro, &format!("?to={future}")).await.len(), 6);
        let page = api.get(&pro, "/v1/access-log?limit=4").await;
        let cursor = page.body["next_cursor"].as_str().unwrap().to_owned();
        let rest = access(&api, &pro, &format!("?limit=4&cursor={cursor}")).await;
        assert_eq!(rest.len(), 2);
        let slog = access(&api, &starter, "").await;
        assert_eq!(slog.len(), 1);
        assert_eq!(slog[0]["detail"], "watermarked");

        // Another tenant's video is 404 everywhere (and not logged for them).
        for path in [
            format!("/v1/videos/{vp}"),
            format!("/v1/videos/{vp}/content"),
        ] {
            api.get(&starter, &path)
                .await
                .assert_problem(404, "not_found");
        }
        api.post(
            &starter,
            &format!("/v1/videos/{vp}/links"),
            &json!({"expires_in": 60}),
            None,
        )
        .await
        .assert_problem(404, "not_found");
        assert!(access(&api, &starter, &format!("?video_id={vp}"))
            .await
            .is_empty());
        api.get(&pro, "/v1/videos/vid_nope")
            .await
            .assert_problem(404, "not_found");
        api.get(&pro, "/v1/access-log?kind=stream")
            .await
            .assert_problem(422, "invalid_request");
    });
}

#[test]
fn signed_links_expire_refuse_tampering_and_rotate() {
    rt().block_on(async {
        let server = Server::start(FAST_STARTER);
        let api = server.api();
        let (_, pro) = api.funded("pro", 1000).await;
        let (_, starter) = api.funded("starter", 1000).await;
        let vp = video(&api, &pro).await;
        let vs = video(&api, &starter).await;
        let clean = stored(&server, &vp, "clean");

        let url = link(&api, &pro, &vp, json!({"expires_in": 2})).await;
        assert!(
            url.starts_with("http://127.0.0.1:8080/v/"),
            "public_url is the base: {url}"
        );
        let local = url.replacen("http://127.0.0.1:8080", &api.base, 1);
        let (st, h, body) = raw(&api, &local, &[("user-agent", "link-test/1")]).await;
        assert_eq!(st, 200);
        assert_eq!(body, clean);
        assert_eq!(h["content-type"], "image/gif");
        let (st, _, body) = raw(&api, &local, &[("range", "bytes=0-3")]).await;
        assert_eq!((st, body.as_slice()), (206, &clean[..4]));

        // Tampered signature, tampered expiry: invalid_signature; no key needed or used.
        let at = local.find("sig=").unwrap() + 4;
        let flip = if &local[at..at + 1] == "A" { "B" } else { "A" };
        let tampered = format!("{}{flip}{}", &local[..at], &local[at + 1..]);
        let r = api
            .call(
                "GET",
                &tampered.replacen(&api.base, "", 1),
                None,
                None,
                None,
            )
            .await;
        r.assert_problem(403, "invalid_signature");
        let exp: u64 = local
            .split("exp=")
            .nth(1)
            .unwrap()
            .split('&')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let later = local.replacen(&format!("exp={exp}"), &format!("exp={}", exp + 3600), 1);
        let r = api
            .call("GET", &later.replacen(&api.base, "", 1), None, None, None)
            .await;
        r.assert_problem(403, "invalid_signature");
        let r = api.call("GET", &format!("/v/{vp}"), None, None, None).await;
        r.assert_problem(403, "invalid_signature");

        // Expiry.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let r = api
            .call("GET", &local.replacen(&api.base, "", 1), None, None, None)
            .await;
        r.assert_problem(403, "link_expired");

        // Rotation revokes every link issued before it.
        let fresh = link(&api, &pro, &vp, json!({"expires_in": 600})).await;
        let fresh = fresh.replacen("http://127.0.0.1:8080", "", 1);
        assert_eq!(api.call("GET", &fresh, None, None, None).await.status, 200);
        let r = api
            .post(&pro, "/v1/link-secret/rotate", &json!({}), None)
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        api.call("GET", &fresh, None, None, None)
            .await
            .assert_problem(403, "invalid_signature");

        // A starter link serves the watermarked rendition.
        let s = link(&api, &starter, &vs, json!({"expires_in": 60})).await;
        let (st, _, body) = raw(
            &api,
            &s.replacen("http://127.0.0.1:8080", &api.base, 1),
            &[],
        )
        .await;
        assert_eq!(st, 200);
        assert_eq!(body, stored(&server, &vs, "watermarked"));

        // Bad requests.
        for body in [
            json!({"expires_in": 0}),
            json!({"expires_in": 99999999}),
            json!({}),
        ] {
            let r = api
                .post(&pro, &format!("/v1/videos/{vp}/links"), &body, None)
                .await;
            r.assert_problem(422, "invalid_request");
        }
        api.post(
            &pro,
            &format!("/v1/videos/{vp}/links"),
            &json!({"expires_in": 60, "embed": true}),
            None,
        )
        .await
        .assert_problem(403, "plan_limit_exceeded");

        // The log: allowed and denied link uses, with their reasons and user agent.
        let log = access(&api, &pro, "?kind=link").await;
        let denied: Vec<&Value> = log.iter().filter(|e| e["allowed"] == false).collect();
        let reasons: Vec<&str> = denied
            .iter()
            .map(|e| e["detail"].as_str().unwrap())
            .collect();
        assert_eq!(
            reasons,
            [
                "invalid_signature",
                "link_expired",
                "invalid_signature",
                "invalid_signature",
                "invalid_signature"
            ],
            "{log:#?}"
        );
        assert_eq!(log.iter().filter(|e| e["allowed"] == true).count(), 3);
        assert!(log.iter().all(|e| e["key_id"].is_null()));
        assert!(log.iter().any(|e| e["user_agent"] == "link-test/1"));
        let denied_only = access(&api, &pro, "?kind=link&allowed=false").await;
        assert_eq!(denied_only.len(), 5);
        // Admins see it across tenants.
        let r = api
            .admin("GET", "/admin/v1/access-log?kind=link", None, None)
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["data"].as_array().unwrap().len(), 9);
    });
}

#[test]
fn embeds_follow_the_whitelist_and_the_log_survives_a_crash() {
    rt().block_on(async {
        let mut server = Server::start(&[]);
        let api = server.api();
        let (_, ent) = api.funded("enterprise", 1000).await;
        let (_, pro) = api.funded("pro", 1000).await;
        let v = video(&api, &ent).await;

        // Whitelist management: enterprise only, validated.
        api.get(&pro, "/v1/embed-domains")
            .await
            .assert_problem(403, "plan_limit_exceeded");
        for d in ["example.com", "*.Partner.io"] {
            let r = api
                .post(&ent, "/v1/embed-domains", &json!({"domain": d}), None)
                .await;
            assert_eq!(r.status, 201, "{}", r.text);
        }
        for bad in [
            "http://x.com",
            "10.0.0.1",
            "nodot",
            "a..b.com",
            "*.",
            "ex ample.com",
        ] {
            let r = api
                .post(&ent, "/v1/embed-domains", &json!({"domain": bad}), None)
                .await;
            r.assert_problem(422, "invalid_request");
        }
        let r = api.get(&ent, "/v1/embed-domains").await;
        let list: Vec<&str> = r.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["domain"].as_str().unwrap())
            .collect();
        assert_eq!(list, ["*.partner.io", "example.com"]);

        let url = link(&api, &ent, &v, json!({"expires_in": 600, "embed": true})).await;
        assert!(url.contains("/embed/"), "{url}");
        let path = url.replacen("http://127.0.0.1:8080", "", 1);
        let page = |origin: Option<(&'static str, &'static str)>| {
            let api = api.clone();
            let path = path.clone();
            async move {
                let mut rb = api.http.get(format!("{}{path}", api.base));
                if let Some((h, v)) = origin {
                    rb = rb.header(h, v);
                }
                api.send(rb).await
            }
        };
        let ok = page(Some(("referer", "https://example.com/blog/post"))).await;
        assert_eq!(ok.status, 200, "{}", ok.text);
        assert!(ok.header("content-type").unwrap().starts_with("text/html"));
        assert!(ok.text.contains("<img src=\""), "{}", ok.text);
        assert!(ok.text.contains(&format!("/v/{v}?exp=")));
        assert!(ok
            .header("content-security-policy")
            .unwrap()
            .contains("frame-ancestors"));
        assert_eq!(
            page(Some(("origin", "https://shop.partner.io")))
                .await
                .status,
            200
        );
        assert_eq!(
            page(Some(("origin", "https://a.b.partner.io")))
                .await
                .status,
            200
        );
        for denied in [
            Some(("origin", "https://partner.io")), // the wildcard is for subdomains
            Some(("referer", "https://evil.com/example.com")),
            Some(("origin", "https://example.com.evil.com")),
            Some(("origin", "https://sub.example.com")), // exact entry: no subdomains
            None,
        ] {
            page(denied).await.assert_problem(403, "domain_not_allowed");
        }
        // The media URL inside the page works as a link.
        let src = ok
            .text
            .split("src=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let src = src
            .replace("&amp;", "&")
            .replacen("http://127.0.0.1:8080", &api.base, 1);
        let (st, _, body) = raw(&api, &src, &[]).await;
        assert_eq!((st, body), (200, stored(&server, &v, "clean")));
        // A link signature does not open the embed page, nor the other way round.
        let file = link(&api, &ent, &v, json!({"expires_in": 600})).await;
        let swapped = file
            .replacen("/v/", "/embed/", 1)
            .replacen("http://127.0.0.1:8080", "", 1);
        api.call("GET", &swapped, None, None, None)
            .await
            .assert_problem(403, "invalid_signature");

        // The log has every embed with its domain; it survives kill -9.
        let log = access(&api, &ent, "?kind=embed").await;
        assert_eq!(log.len(), 9, "{log:#?}");
        let allowed: Vec<&str> = log
            .iter()
            .filter(|e| e["allowed"] == true)
            .map(|e| e["domain"].as_str().unwrap())
            .collect();
        assert_eq!(
            allowed,
            ["a.b.partner.io", "shop.partner.io", "example.com"]
        );
        assert!(log
            .iter()
            .any(|e| e["allowed"] == false && e["domain"] == "evil.com"));
        assert!(log
            .iter()
            .any(|e| e["allowed"] == false && e["domain"].is_null()));
        let before = access(&api, &ent, "?limit=500").await;
        server.kill9();
        server.spawn().expect("restarts");
        let api = server.api();
        assert_eq!(access(&api, &ent, "?limit=500").await, before);
        // Removing a domain stops its embeds.
        let r = api
            .call(
                "DELETE",
                "/v1/embed-domains/example.com",
                Some(&ent),
                None,
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let mut rb = api.http.get(format!("{}{path}", api.base));
        rb = rb.header("referer", "https://example.com/");
        api.send(rb).await.assert_problem(403, "domain_not_allowed");
        api.call(
            "DELETE",
            "/v1/embed-domains/example.com",
            Some(&ent),
            None,
            None,
        )
        .await
        .assert_problem(404, "not_found");
    });
}
