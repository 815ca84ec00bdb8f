//! The route table: the single source of the router and of `/openapi.json`.

pub mod admin;
pub mod batches;
pub mod system;
pub mod videos;
pub mod views;
pub mod wallet;
pub mod webhooks;

use axum::http::Method;
use axum::routing::{on, MethodFilter, MethodRouter};

use crate::api::AppState;

/// Scope bits (same order as `engine::accounts::SCOPES`).
pub const BATCHES_WRITE: u8 = 1;
pub const BATCHES_READ: u8 = 2;
pub const WALLET_READ: u8 = 4;
pub const VIDEOS_READ: u8 = 8;
pub const WEBHOOKS_WRITE: u8 = 16;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// Anyone (health, metrics, the OpenAPI document).
    Public,
    /// The admin token.
    Admin,
    /// An API key, with this scope if any.
    Key(Option<u8>),
}

/// One route.
pub struct Route {
    pub method: Method,
    /// axum path pattern (`/v1/batches/{id}`), also the OpenAPI path.
    pub path: &'static str,
    /// `METHOD path`: the label of metrics and usage.
    pub label: &'static str,
    pub operation_id: &'static str,
    pub summary: &'static str,
    pub auth: Auth,
    /// Changes state: runs on its own task and honours `Idempotency-Key`.
    pub mutating: bool,
    /// The response holds a secret: its stored idempotent copy is redacted.
    pub redact_secret: bool,
    /// Request body schema (a name in `openapi::schemas`).
    pub request: Option<&'static str>,
    /// Success status and its body schema.
    pub ok: (u16, &'static str),
    /// Query parameters accepted.
    pub query: &'static [&'static str],
    pub handler: fn(MethodFilter) -> MethodRouter<AppState>,
}

macro_rules! route {
    ($m:ident $path:literal, $op:literal, $summary:literal, $auth:expr,
     mutating: $mu:literal, request: $req:expr, ok: ($st:literal, $resp:literal),
     query: $q:expr, $h:path $(, redact: $red:literal)?) => {
        Route {
            method: Method::$m,
            path: $path,
            label: concat!(stringify!($m), " ", $path),
            operation_id: $op,
            summary: $summary,
            auth: $auth,
            mutating: $mu,
            redact_secret: false $(|| $red)?,
            request: $req,
            ok: ($st, $resp),
            query: $q,
            handler: |f| on(f, $h),
        }
    };
}

const LIST: &[&str] = &["limit", "cursor"];
const NONE: &[&str] = &[];

/// Every route the server serves.
pub static ROUTES: &[Route] = &[
    // System.
    route!(GET "/healthz", "health", "Liveness", Auth::Public,
        mutating: false, request: None, ok: (200, "Health"), query: NONE, system::healthz),
    route!(GET "/readyz", "ready", "Readiness: recovered and the log writable", Auth::Public,
        mutating: false, request: None, ok: (200, "Health"), query: NONE, system::readyz),
    route!(GET "/metrics", "metrics", "Prometheus metrics", Auth::Public,
        mutating: false, request: None, ok: (200, "Text"), query: NONE, system::metrics),
    route!(GET "/openapi.json", "openapi", "This document", Auth::Public,
        mutating: false, request: None, ok: (200, "Object"), query: NONE, system::openapi),
    // Customer: batches.
    route!(POST "/v1/batches/quote", "quoteBatch", "Quote a batch (nothing is held)",
        Auth::Key(Some(BATCHES_WRITE)), mutating: false, request: Some("BatchRequest"),
        ok: (200, "Quote"), query: NONE, batches::quote),
    route!(POST "/v1/batches", "createBatch", "Create a batch: hold its total, run its items",
        Auth::Key(Some(BATCHES_WRITE)), mutating: true, request: Some("BatchRequest"),
        ok: (201, "Batch"), query: NONE, batches::create),
    route!(GET "/v1/batches", "listBatches", "The tenant's batches, oldest first",
        Auth::Key(Some(BATCHES_READ)), mutating: false, request: None,
        ok: (200, "BatchList"), query: LIST, batches::list),
    route!(GET "/v1/batches/{id}", "getBatch", "One batch with counts and credits",
        Auth::Key(Some(BATCHES_READ)), mutating: false, request: None,
        ok: (200, "Batch"), query: NONE, batches::get),
    route!(GET "/v1/batches/{id}/items", "listItems", "A batch's items by index",
        Auth::Key(Some(BATCHES_READ)), mutating: false, request: None,
        ok: (200, "ItemList"), query: LIST, batches::items),
    route!(POST "/v1/batches/{id}/cancel", "cancelBatch",
        "Cancel: pending items are released now, running ones finish",
        Auth::Key(Some(BATCHES_WRITE)), mutating: true, request: None,
        ok: (200, "Batch"), query: NONE, batches::cancel),
    route!(POST "/v1/batches/{id}/retry-failed", "retryFailed",
        "A new batch of the failed items (new hold)",
        Auth::Key(Some(BATCHES_WRITE)), mutating: true, request: Some("RetryRequest"),
        ok: (201, "Batch"), query: NONE, batches::retry_failed),
    // Customer: wallet and usage.
    route!(GET "/v1/wallet", "getWallet", "Balances", Auth::Key(Some(WALLET_READ)),
        mutating: false, request: None, ok: (200, "Wallet"), query: NONE, wallet::get),
    route!(PATCH "/v1/wallet", "updateWallet",
        "Set the low-balance threshold of the wallet.low_balance webhook",
        Auth::Key(Some(WEBHOOKS_WRITE)), mutating: true, request: Some("WalletPatch"),
        ok: (200, "Wallet"), query: NONE, wallet::update),
    route!(GET "/v1/wallet/ledger", "listLedger", "Ledger entries with their hash chain",
        Auth::Key(Some(WALLET_READ)), mutating: false, request: None,
        ok: (200, "LedgerList"), query: LIST, wallet::ledger),
    route!(GET "/v1/wallet/statement", "getStatement",
        "Statement for a period (JSON, or CSV with format=csv)",
        Auth::Key(Some(WALLET_READ)), mutating: false, request: None,
        ok: (200, "Statement"), query: &["from", "to", "format"], wallet::statement),
    route!(GET "/v1/usage", "getUsage", "This tenant's usage per key by hour or day",
        Auth::Key(None), mutating: false, request: None, ok: (200, "Usage"),
        query: &["granularity", "from", "to", "key_id"], system::usage),
    // Customer: videos, links, embeds, the access log.
    route!(GET "/v1/videos/{id}", "getVideo", "A video's metadata", Auth::Key(Some(VIDEOS_READ)),
        mutating: false, request: None, ok: (200, "Video"), query: NONE, videos::get),
    route!(GET "/v1/videos/{id}/content", "getVideoContent",
        "The file (the plan's rendition), with Range support",
        Auth::Key(Some(VIDEOS_READ)), mutating: false, request: None, ok: (200, "Binary"),
        query: NONE, videos::content),
    route!(POST "/v1/videos/{id}/links", "createVideoLink",
        "A signed, expiring URL of the file (or of its embed page)",
        Auth::Key(Some(VIDEOS_READ)), mutating: true, request: Some("LinkRequest"),
        ok: (201, "Link"), query: NONE, videos::create_link),
    route!(POST "/v1/link-secret/rotate", "rotateLinkSecret",
        "Revoke every signed link and embed URL issued so far",
        Auth::Key(Some(VIDEOS_READ)), mutating: true, request: None, ok: (200, "Object"),
        query: NONE, videos::rotate_link_secret),
    route!(GET "/v1/embed-domains", "listEmbedDomains", "Domains whose pages may embed",
        Auth::Key(Some(VIDEOS_READ)), mutating: false, request: None,
        ok: (200, "EmbedDomainList"), query: NONE, videos::list_domains),
    route!(POST "/v1/embed-domains", "addEmbedDomain",
        "Allow a domain (example.com or *.example.com) to embed",
        Auth::Key(Some(VIDEOS_READ)), mutating: true, request: Some("EmbedDomain"),
        ok: (201, "EmbedDomain"), query: NONE, videos::add_domain),
    route!(DELETE "/v1/embed-domains/{domain}", "removeEmbedDomain", "Stop a domain embedding",
        Auth::Key(Some(VIDEOS_READ)), mutating: true, request: None,
        ok: (200, "EmbedDomain"), query: NONE, videos::remove_domain),
    route!(GET "/v1/access-log", "listAccessLog",
        "Downloads, link uses and embeds, allowed or denied, newest first",
        Auth::Key(Some(VIDEOS_READ)), mutating: false, request: None,
        ok: (200, "AccessLogList"),
        query: &["video_id", "kind", "allowed", "from", "to", "limit", "cursor"],
        videos::access_log),
    route!(GET "/v/{id}", "openLink", "A signed link: the file without a key", Auth::Public,
        mutating: false, request: None, ok: (200, "Binary"), query: &["exp", "sig"],
        videos::link),
    route!(GET "/embed/{id}", "openEmbed",
        "A signed embed page, for pages on the owner's whitelist", Auth::Public,
        mutating: false, request: None, ok: (200, "Text"), query: &["exp", "sig"],
        videos::embed),
    // Customer: webhooks.
    route!(POST "/v1/webhook-endpoints", "createWebhookEndpoint",
        "Register an endpoint (the signing secret is returned here and on rotation only)",
        Auth::Key(Some(WEBHOOKS_WRITE)), mutating: true, request: Some("WebhookEndpointRequest"),
        ok: (201, "WebhookEndpointWithSecret"), query: NONE, webhooks::create_endpoint),
    route!(GET "/v1/webhook-endpoints", "listWebhookEndpoints", "The tenant's endpoints",
        Auth::Key(Some(WEBHOOKS_WRITE)), mutating: false, request: None,
        ok: (200, "WebhookEndpointList"), query: NONE, webhooks::list_endpoints),
    route!(GET "/v1/webhook-endpoints/{id}", "getWebhookEndpoint", "One endpoint",
        Auth::Key(Some(WEBHOOKS_WRITE)), mutating: false, request: None,
        ok: (200, "WebhookEndpoint"), query: NONE, webhooks::get_endpoint),
    route!(PATCH "/v1/webhook-endpoints/{id}", "updateWebhookEndpoint",
        "Change url, events or description; enable or disable",
        Auth::Key(Some(WEBHOOKS_WRITE)), mutating: true, request: Some("WebhookEndpointPatch"),
        ok: (200, "WebhookEndpoint"), query: NONE, webhooks::update_endpoint),
    route!(DELETE "/v1/webhook-endpoints/{id}", "deleteWebhookEndpoint",
        "Delete an endpoint and its deliveries", Auth::Key(Some(WEBHOOKS_WRITE)),
        mutating: true, request: None, ok: (200, "WebhookEndpoint"), query: NONE,
        webhooks::delete_endpoint),
    route!(POST "/v1/webhook-endpoints/{id}/rotate-secret", "rotateWebhookSecret",
        "New signing secret; the old one keeps signing during the overlap",
        Auth::Key(Some(WEBHOOKS_WRITE)), mutating: true, request: Some("RotateSecretRequest"),
        ok: (200, "WebhookEndpointWithSecret"), query: NONE, webhooks::rotate_secret),
    route!(GET "/v1/webhook-deliveries", "listWebhookDeliveries",
        "Deliveries with every attempt, newest first", Auth::Key(Some(WEBHOOKS_WRITE)),
        mutating: false, request: None, ok: (200, "WebhookDeliveryList"),
        query: &["endpoint_id", "status", "event_type", "limit", "cursor"],
        webhooks::list_deliveries),
    route!(GET "/v1/webhook-deliveries/{id}", "getWebhookDelivery", "One delivery",
        Auth::Key(Some(WEBHOOKS_WRITE)), mutating: false, request: None,
        ok: (200, "WebhookDelivery"), query: NONE, webhooks::get_delivery),
    route!(POST "/v1/webhook-deliveries/{id}/redeliver", "redeliverWebhook",
        "Attempt a finished delivery once more, now", Auth::Key(Some(WEBHOOKS_WRITE)),
        mutating: true, request: None, ok: (202, "WebhookDelivery"), query: NONE,
        webhooks::redeliver),
    // Admin.
    route!(POST "/admin/v1/tenants", "createTenant", "Create a tenant on a plan", Auth::Admin,
        mutating: true, request: Some("TenantRequest"), ok: (201, "Tenant"), query: NONE,
        admin::create_tenant),
    route!(GET "/admin/v1/tenants", "listTenants", "Tenants, oldest first", Auth::Admin,
        mutating: false, request: None, ok: (200, "TenantList"), query: LIST,
        admin::list_tenants),
    route!(GET "/admin/v1/tenants/{id}", "getTenant", "A tenant with its balances",
        Auth::Admin, mutating: false, request: None, ok: (200, "Tenant"), query: NONE,
        admin::get_tenant),
    route!(POST "/admin/v1/tenants/{id}/keys", "createKey",
        "Create an API key (the secret is returned once)", Auth::Admin, mutating: true,
        request: Some("KeyRequest"), ok: (201, "KeyWithSecret"), query: NONE,
        admin::create_key, redact: true),
    route!(GET "/admin/v1/tenants/{id}/keys", "listKeys", "A tenant's keys (no secrets)",
        Auth::Admin, mutating: false, request: None, ok: (200, "KeyList"), query: NONE,
        admin::list_keys),
    route!(DELETE "/admin/v1/keys/{key_id}", "revokeKey", "Revoke a key", Auth::Admin,
        mutating: true, request: None, ok: (200, "Key"), query: NONE, admin::revoke_key),
    route!(POST "/admin/v1/tenants/{id}/top-ups", "topUp",
        "Grant credits (Idempotency-Key required)", Auth::Admin, mutating: true,
        request: Some("TopUpRequest"), ok: (201, "LedgerEntry"), query: NONE, admin::top_up),
    route!(POST "/admin/v1/tenants/{id}/adjustments", "adjust",
        "Adjust credits up or down (Idempotency-Key required)", Auth::Admin, mutating: true,
        request: Some("AdjustmentRequest"), ok: (201, "LedgerEntry"), query: NONE,
        admin::adjust),
    route!(GET "/admin/v1/reconciliation", "reconcile",
        "Recompute every wallet and batch from the ledger and item outcomes", Auth::Admin,
        mutating: false, request: None, ok: (200, "Reconciliation"), query: NONE,
        admin::reconciliation),
    route!(GET "/admin/v1/audit", "audit", "Search ledger entries across tenants",
        Auth::Admin, mutating: false, request: None, ok: (200, "LedgerList"),
        query: &["tenant_id", "kind", "batch_id", "request_id", "from", "to", "limit", "cursor"],
        admin::audit),
    route!(GET "/admin/v1/tenants/{id}/ledger/export", "exportLedger",
        "The tenant's whole ledger as JSON lines with hashes, and whether the chain verifies",
        Auth::Admin, mutating: false, request: None, ok: (200, "Text"), query: NONE,
        admin::export_ledger),
    route!(GET "/admin/v1/access-log", "adminAccessLog",
        "The access log across tenants, newest first", Auth::Admin, mutating: false,
        request: None, ok: (200, "AccessLogList"),
        query: &["tenant_id", "video_id", "kind", "allowed", "from", "to", "limit", "cursor"],
        videos::admin_access_log),
    route!(GET "/admin/v1/usage/top", "topUsage", "Top tenants and routes over a window",
        Auth::Admin, mutating: false, request: None, ok: (200, "TopUsage"),
        query: &["window", "limit"], admin::top_usage),
];
