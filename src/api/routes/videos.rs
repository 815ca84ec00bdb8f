//! Delivery (SPEC §7): video metadata and content (Range), signed links (`/v/{id}`),
//! embeds (`/embed/{id}`, whitelisted domains), embed domains, the access log.
//!
//! Every download, link use and embed of a real video, allowed or denied, is recorded in
//! the access log and made durable before the answer is sent. The rendition served is
//! decided by the owner's plan: a plan with `watermark = true` gets the watermarked file
//! through every path, or a problem, never the clean file.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::json::{json, next_cursor, page, path_id, rfc3339, JsonBody, Path, QueryMap};
use crate::api::problem::Problem;
use crate::api::{AppState, Caller};
use crate::config::Plan;
use crate::delivery::access::{AccessEntry, AccessFilter, AccessKind};
use crate::delivery::links::{self, LinkError, LinkKind};
use crate::delivery::store::{Rendition, StoreError};
use crate::engine::accounts::embed_allowed;
use crate::engine::batch::VideoInfo;
use crate::ids::{AccessId, KeyId, TenantId, VideoId};

/// Longest life of a signed link or embed URL.
pub const LINK_EXPIRES_IN_S_MAX: u64 = 30 * 24 * 3600;

/// Who asked, for the access log.
struct Requester {
    ip: Option<String>,
    user_agent: Option<String>,
    /// Host of `Origin`, else of `Referer`.
    domain: Option<String>,
}

fn requester(parts: &Parts) -> Requester {
    let h = &parts.headers;
    let text = |n: header::HeaderName| h.get(n).and_then(|v| v.to_str().ok());
    let host_of = |v: &str| {
        url::Url::parse(v)
            .ok()?
            .host_str()
            .map(str::to_ascii_lowercase)
    };
    Requester {
        ip: parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip().to_string()),
        user_agent: text(header::USER_AGENT).map(str::to_owned),
        domain: text(header::ORIGIN)
            .and_then(host_of)
            .or_else(|| text(header::REFERER).and_then(host_of)),
    }
}

/// Records one access (durably) before the answer goes out.
async fn log_access(
    st: &AppState,
    info: &VideoInfo,
    kind: AccessKind,
    allowed: bool,
    detail: &str,
    who: &Requester,
    key: Option<KeyId>,
) -> Result<(), Problem> {
    st.engine
        .record_access(AccessEntry {
            id: AccessId(0),
            tenant: info.tenant,
            video: info.id,
            kind,
            allowed,
            detail: detail.to_owned(),
            domain: who.domain.clone(),
            ip: who.ip.clone(),
            user_agent: who.user_agent.clone(),
            key,
            at_ms: 0,
        })
        .await
        .map_err(|e| Problem::unavailable(e.to_string()))
}

/// The rendition a plan may receive.
fn rendition_for(plan: &Plan, info: &VideoInfo) -> Result<Rendition, Problem> {
    if !plan.watermark {
        return Ok(Rendition::Clean);
    }
    if info.watermarked_bytes.is_none() {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "watermark_unavailable",
            "this plan receives watermarked videos only, and this video has no watermarked \
             rendition",
        ));
    }
    Ok(Rendition::Watermarked)
}

fn rendition_name(r: Rendition) -> &'static str {
    match r {
        Rendition::Clean => "clean",
        Rendition::Watermarked => "watermarked",
    }
}

/// A tenant's plan, link secret and embed whitelist.
fn plan_of(st: &AppState, tenant: TenantId) -> Result<(Plan, [u8; 32], Vec<String>), Problem> {
    let t = st.engine.tenant(tenant).ok_or_else(Problem::not_found)?;
    let plan = st
        .cfg
        .plans
        .get(&t.plan)
        .cloned()
        .ok_or_else(|| Problem::unavailable(format!("plan {} is not configured", t.plan)))?;
    Ok((plan, t.link_secret, t.embed_domains))
}

/// A range no byte of the file is in (416).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsatisfiable;

/// `Range: bytes=…` of a `size`-byte file: `Ok(None)` for the whole file (no header, or
/// one this server ignores: other units, several ranges, bad syntax), `Err` when no byte
/// of the range exists (416).
pub fn parse_range(
    value: Option<&HeaderValue>,
    size: u64,
) -> Result<Option<Range<u64>>, Unsatisfiable> {
    let Some(spec) = value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        // Suffix: the last n bytes.
        let Ok(n) = b.parse::<u64>() else {
            return Ok(None);
        };
        if n == 0 || size == 0 {
            return Err(Unsatisfiable);
        }
        size.saturating_sub(n)..size
    } else {
        let Ok(start) = a.parse::<u64>() else {
            return Ok(None);
        };
        let end = if b.is_empty() {
            size
        } else {
            match b.parse::<u64>() {
                Ok(last) if last >= start => last.saturating_add(1).min(size),
                _ => return Ok(None),
            }
        };
        if start >= size {
            return Err(Unsatisfiable);
        }
        start..end
    };
    Ok(Some(range))
}

/// Streams a rendition with `Content-Type`, `Content-Length`, `ETag`, `Accept-Ranges`,
/// and Range support (206, 416); `If-None-Match` on the ETag gives 304.
async fn serve(
    st: &AppState,
    info: &VideoInfo,
    rendition: Rendition,
    headers: &HeaderMap,
) -> Result<Response, Problem> {
    let size = match rendition {
        Rendition::Clean => info.bytes,
        Rendition::Watermarked => info.watermarked_bytes.unwrap_or(0),
    };
    // Objects are written once and never change: the id and rendition name them.
    let etag = format!("\"{}.{}\"", info.id, rendition_name(rendition));
    let etag_value = HeaderValue::from_str(&etag).expect("ids are header-safe");
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if matches {
        let mut r = StatusCode::NOT_MODIFIED.into_response();
        r.headers_mut().insert(header::ETAG, etag_value);
        return Ok(r);
    }
    let range = match parse_range(headers.get(header::RANGE), size) {
        Ok(r) => r,
        Err(Unsatisfiable) => {
            let mut r = Problem::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("the file has {size} bytes"),
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(r);
        }
    };
    let stream = st
        .engine
        .video_store()
        .stream(info.id, rendition, &info.content_type, range.clone())
        .await
        .map_err(|e| match e {
            StoreError::NotFound(_) => Problem::not_found(),
            e => Problem::unavailable(e.to_string()),
        })?;
    let (status, len) = match &range {
        Some(r) => (StatusCode::PARTIAL_CONTENT, r.end - r.start),
        None => (StatusCode::OK, size),
    };
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&info.content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ETAG, etag_value);
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-transform"),
    );
    if let Some(r) = range {
        let v = format!("bytes {}-{}/{size}", r.start, r.end - 1);
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&v).expect("digits"),
        );
    }
    Ok(resp)
}

fn video_view(info: &VideoInfo, plan: &Plan) -> Value {
    let watermarked = plan.watermark;
    json!({
        "id": info.id.to_string(),
        "object": "video",
        "batch_id": info.batch.to_string(),
        "item_id": info.item_id,
        "index": info.index,
        "prompt": info.prompt,
        "content_type": info.content_type,
        "bytes": if watermarked { info.watermarked_bytes } else { Some(info.bytes) },
        "watermarked": watermarked,
        "created_at": rfc3339(info.created_at_ms),
    })
}

pub async fn get(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let id: VideoId = path_id(&id)?;
    let info = st.engine.video(Some(caller.tenant.id), id).await?;
    Ok(json(StatusCode::OK, &video_view(&info, &caller.plan)))
}

pub async fn content(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
    Path(id): Path<String>,
    parts: Parts,
) -> Result<Response, Problem> {
    let id: VideoId = path_id(&id)?;
    let info = st.engine.video(Some(caller.tenant.id), id).await?;
    let who = requester(&parts);
    let key = Some(caller.key.id);
    let kind = AccessKind::Download;
    match rendition_for(&caller.plan, &info) {
        Err(p) => {
            log_access(&st, &info, kind, false, p.code, &who, key).await?;
            Err(p)
        }
        Ok(r) => {
            log_access(&st, &info, kind, true, rendition_name(r), &who, key).await?;
            serve(&st, &info, r, &parts.headers).await
        }
    }
}

/// `POST /v1/videos/{id}/links`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkBody {
    /// Seconds the URL works (1 ..= 30 days).
    expires_in: u64,
    /// An embed page URL instead of a file URL (plans with an embed whitelist).
    #[serde(default)]
    embed: bool,
}

fn signed_url(
    st: &AppState,
    kind: LinkKind,
    video: VideoId,
    exp_s: u64,
    secret: &[u8; 32],
) -> String {
    let base = st.cfg.public_url.trim_end_matches('/');
    let path = match kind {
        LinkKind::Link => "v",
        LinkKind::Embed => "embed",
    };
    let sig = links::sign(secret, kind, video, exp_s);
    format!("{base}/{path}/{video}?exp={exp_s}&sig={sig}")
}

fn now_s(st: &AppState) -> u64 {
    st.engine.now_ms() / 1000
}

pub async fn create_link(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<LinkBody>,
) -> Result<Response, Problem> {
    let id: VideoId = path_id(&id)?;
    if b.expires_in == 0 || b.expires_in > LINK_EXPIRES_IN_S_MAX {
        return Err(Problem::invalid(format!(
            "expires_in must be within 1..={LINK_EXPIRES_IN_S_MAX} seconds"
        )));
    }
    if b.embed && !caller.plan.embed_whitelist {
        return Err(Problem::plan_limit(format!(
            "the {} plan has no embeds",
            caller.tenant.plan
        )));
    }
    let info = st.engine.video(Some(caller.tenant.id), id).await?;
    // The plan's rendition must exist, or the URL could only ever be refused.
    rendition_for(&caller.plan, &info)?;
    let (_, secret, _) = plan_of(&st, caller.tenant.id)?;
    let exp_s = now_s(&st).saturating_add(b.expires_in);
    let kind = if b.embed {
        LinkKind::Embed
    } else {
        LinkKind::Link
    };
    Ok(json(
        StatusCode::CREATED,
        &json!({
            "object": "link",
            "video_id": id.to_string(),
            "kind": if b.embed { "embed" } else { "link" },
            "url": signed_url(&st, kind, id, exp_s, &secret),
            "expires_at": rfc3339(exp_s.saturating_mul(1000)),
        }),
    ))
}

pub async fn rotate_link_secret(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
) -> Result<Response, Problem> {
    st.engine.rotate_link_secret(caller.tenant.id).await?;
    Ok(json(
        StatusCode::OK,
        &json!({"object": "link_secret", "rotated_at": rfc3339(st.engine.now_ms())}),
    ))
}

/// The video behind a public URL, and its owner's plan, secret and whitelist.
async fn public_video(
    st: &AppState,
    id: &str,
) -> Result<(VideoInfo, Plan, [u8; 32], Vec<String>), Problem> {
    let id: VideoId = path_id(id)?;
    let info = st.engine.video(None, id).await?;
    let (plan, secret, domains) = plan_of(st, info.tenant)?;
    Ok((info, plan, secret, domains))
}

fn link_problem(e: LinkError) -> Problem {
    match e {
        LinkError::InvalidSignature => Problem::new(
            StatusCode::FORBIDDEN,
            "invalid_signature",
            "the link's signature does not match",
        ),
        LinkError::Expired => Problem::new(
            StatusCode::FORBIDDEN,
            "link_expired",
            "the link has expired",
        ),
    }
}

/// `GET /v/{id}?exp&sig`: the file, without a key.
pub async fn link(
    State(st): State<AppState>,
    Path(id): Path<String>,
    q: QueryMap,
    parts: Parts,
) -> Result<Response, Problem> {
    let (info, plan, secret, _) = public_video(&st, &id).await?;
    let who = requester(&parts);
    let kind = AccessKind::Link;
    let checked = links::verify(
        &secret,
        LinkKind::Link,
        info.id,
        q.get("exp"),
        q.get("sig"),
        now_s(&st),
    )
    .map_err(link_problem)
    .and_then(|()| rendition_for(&plan, &info));
    match checked {
        Err(p) => {
            log_access(&st, &info, kind, false, p.code, &who, None).await?;
            Err(p)
        }
        Ok(r) => {
            log_access(&st, &info, kind, true, rendition_name(r), &who, None).await?;
            serve(&st, &info, r, &parts.headers).await
        }
    }
}

fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `GET /embed/{id}?exp&sig`: a small page showing the video, only for pages on the
/// owner's whitelist (`Origin` or `Referer` host).
pub async fn embed(
    State(st): State<AppState>,
    Path(id): Path<String>,
    q: QueryMap,
    parts: Parts,
) -> Result<Response, Problem> {
    let (info, plan, secret, domains) = public_video(&st, &id).await?;
    let who = requester(&parts);
    let kind = AccessKind::Embed;
    let now = now_s(&st);
    let exp = q.get("exp");
    let checked = links::verify(&secret, LinkKind::Embed, info.id, exp, q.get("sig"), now)
        .map_err(link_problem)
        .and_then(|()| {
            let allowed = plan.embed_whitelist
                && who
                    .domain
                    .as_deref()
                    .is_some_and(|d| embed_allowed(&domains, d));
            if allowed {
                Ok(())
            } else {
                Err(Problem::new(
                    StatusCode::FORBIDDEN,
                    "domain_not_allowed",
                    "the embedding page's domain is not on the owner's whitelist",
                ))
            }
        })
        .and_then(|()| rendition_for(&plan, &info));
    if let Err(p) = checked {
        log_access(&st, &info, kind, false, p.code, &who, None).await?;
        return Err(p);
    }
    log_access(&st, &info, kind, true, "page", &who, None).await?;
    // The media inside is a link with the same expiry (its use is logged as a link).
    let exp_s: u64 = exp.and_then(|e| e.parse().ok()).unwrap_or(now);
    let src = html_escape(&signed_url(&st, LinkKind::Link, info.id, exp_s, &secret));
    let alt = html_escape(&info.prompt);
    let media = if info.content_type.starts_with("video/") {
        format!(r#"<video src="{src}" controls playsinline title="{alt}"></video>"#)
    } else {
        format!(r#"<img src="{src}" alt="{alt}">"#)
    };
    let page = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{alt}</title>\
         <style>html,body{{margin:0;height:100%;background:#000}}\
         img,video{{display:block;width:100%;height:100%;object-fit:contain}}</style>\
         </head><body>{media}</body></html>"
    );
    let ancestors: Vec<String> = domains
        .iter()
        .flat_map(|d| [format!("https://{d}"), format!("http://{d}")])
        .collect();
    let csp = format!(
        "default-src 'none'; img-src *; media-src *; style-src 'unsafe-inline'; \
         frame-ancestors {}",
        if ancestors.is_empty() {
            "'none'".to_owned()
        } else {
            ancestors.join(" ")
        }
    );
    let mut r = (StatusCode::OK, page).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    );
    if let Ok(v) = HeaderValue::from_str(&csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    Ok(r)
}

fn whitelist_allowed(caller: &Caller) -> Result<(), Problem> {
    if caller.plan.embed_whitelist {
        Ok(())
    } else {
        Err(Problem::plan_limit(format!(
            "the {} plan has no embed domain whitelist",
            caller.tenant.plan
        )))
    }
}

fn domains_page(list: &[String]) -> Response {
    page(
        list.iter()
            .map(|d| json!({"object": "embed_domain", "domain": d}))
            .collect(),
        None,
    )
}

pub async fn list_domains(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
) -> Result<Response, Problem> {
    whitelist_allowed(&caller)?;
    let (_, _, domains) = plan_of(&st, caller.tenant.id)?;
    Ok(domains_page(&domains))
}

/// `POST /v1/embed-domains`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainBody {
    domain: String,
}

pub async fn add_domain(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
    JsonBody(b): JsonBody<DomainBody>,
) -> Result<Response, Problem> {
    whitelist_allowed(&caller)?;
    let d = st
        .engine
        .set_embed_domain(caller.tenant.id, &b.domain, true)
        .await?;
    Ok(json(
        StatusCode::CREATED,
        &json!({"object": "embed_domain", "domain": d}),
    ))
}

pub async fn remove_domain(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
    Path(domain): Path<String>,
) -> Result<Response, Problem> {
    whitelist_allowed(&caller)?;
    let d = st
        .engine
        .set_embed_domain(caller.tenant.id, &domain, false)
        .await?;
    Ok(json(
        StatusCode::OK,
        &json!({"object": "embed_domain", "domain": d, "deleted": true}),
    ))
}

fn entry_view(e: &AccessEntry) -> Value {
    json!({
        "id": e.id.to_string(),
        "object": "access",
        "tenant_id": e.tenant.to_string(),
        "video_id": e.video.to_string(),
        "kind": e.kind.as_str(),
        "allowed": e.allowed,
        "detail": e.detail,
        "domain": e.domain,
        "ip": e.ip,
        "user_agent": e.user_agent,
        "key_id": e.key.map(|k| k.to_string()),
        "at": rfc3339(e.at_ms),
    })
}

fn access_filter(q: &QueryMap, tenant: Option<TenantId>) -> Result<AccessFilter, Problem> {
    let video = match q.get("video_id") {
        None => None,
        Some(v) => Some(
            v.parse::<VideoId>()
                .map_err(|_| Problem::invalid("video_id is not a video id"))?,
        ),
    };
    let kind = match q.get("kind") {
        None => None,
        Some(k) => Some(
            AccessKind::parse(k)
                .ok_or_else(|| Problem::invalid("kind must be download, link or embed"))?,
        ),
    };
    let allowed = match q.get("allowed") {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(_) => return Err(Problem::invalid("allowed must be true or false")),
    };
    Ok(AccessFilter {
        tenant,
        video,
        kind,
        allowed,
        from_ms: q.time_ms("from")?,
        to_ms: q.time_ms("to")?,
    })
}

fn access_response(
    st: &AppState,
    q: &QueryMap,
    filter: &AccessFilter,
) -> Result<Response, Problem> {
    let limit = q.limit(st)?;
    let before = match q.get("cursor") {
        None => None,
        Some(c) => Some(
            c.parse::<AccessId>()
                .map_err(|_| Problem::invalid("cursor is not one this API returned"))?,
        ),
    };
    let list = st.engine.access_page(filter, before, limit);
    let next = next_cursor(&list, limit, |e| e.id.to_string());
    Ok(page(list.iter().map(entry_view).collect(), next))
}

pub async fn access_log(
    State(st): State<AppState>,
    Extension(caller): Extension<Arc<Caller>>,
    q: QueryMap,
) -> Result<Response, Problem> {
    let filter = access_filter(&q, Some(caller.tenant.id))?;
    access_response(&st, &q, &filter)
}

pub async fn admin_access_log(
    State(st): State<AppState>,
    q: QueryMap,
) -> Result<Response, Problem> {
    let tenant = match q.get("tenant_id") {
        None => None,
        Some(t) => Some(
            t.parse::<TenantId>()
                .map_err(|_| Problem::invalid("tenant_id is not a tenant id"))?,
        ),
    };
    let filter = access_filter(&q, tenant)?;
    access_response(&st, &q, &filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        let r = |s: &str, size| parse_range(Some(&h(s)), size);
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(r("bytes=0-3", 10), Ok(Some(0..4)));
        assert_eq!(r("bytes=5-", 10), Ok(Some(5..10)));
        assert_eq!(r("bytes=-4", 10), Ok(Some(6..10)));
        assert_eq!(r("bytes=-40", 10), Ok(Some(0..10)));
        assert_eq!(r("bytes=8-100", 10), Ok(Some(8..10)));
        assert_eq!(r("bytes=10-", 10), Err(Unsatisfiable));
        assert_eq!(r("bytes=-0", 10), Err(Unsatisfiable));
        assert_eq!(r("bytes=0-1,4-5", 10), Ok(None));
        assert_eq!(r("items=0-1", 10), Ok(None));
        assert_eq!(r("bytes=5-2", 10), Ok(None));
        assert_eq!(r("bytes=x-", 10), Ok(None));
    }

    #[test]
    fn a_watermark_plan_never_gets_the_clean_file() {
        let cfg = crate::config::Config::load_with_env(None, Vec::new()).unwrap();
        let mut info = VideoInfo {
            id: VideoId(1),
            tenant: TenantId(1),
            batch: crate::ids::BatchId(1),
            item_id: String::new(),
            index: 0,
            prompt: String::new(),
            content_type: "image/gif".into(),
            bytes: 10,
            watermarked_bytes: Some(12),
            created_at_ms: 0,
        };
        let starter = &cfg.plans["starter"];
        let pro = &cfg.plans["pro"];
        assert_eq!(
            rendition_for(starter, &info).unwrap(),
            Rendition::Watermarked
        );
        assert_eq!(rendition_for(pro, &info).unwrap(), Rendition::Clean);
        info.watermarked_bytes = None;
        let refused = rendition_for(starter, &info).unwrap_err();
        assert_eq!(refused.code, "watermark_unavailable");
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
    }

    #[test]
    fn escaping() {
        assert_eq!(
            html_escape(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
