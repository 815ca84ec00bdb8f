//! The HTTP facade (SPEC §5, §11, §12): axum routes over the engine.
//!
//! One table, `routes::ROUTES`, names every route with its method, path, auth and scope,
//! whether it mutates, and its handler; the router and `/openapi.json` are both built from
//! it, so the document cannot list a route the server does not serve or miss one it does.
//!
//! Every request passes one gate (`gate.rs`): match → authenticate (admin token or API key)
//! → rate limit (GCRA per key, headers on every response) → scope → idempotency for
//! mutating POSTs (durable responses in the WAL) → handler → usage and metrics. Handlers
//! only translate JSON to engine calls and back; they move no credits themselves.

pub mod gate;
pub mod json;
pub mod metrics;
pub mod openapi;
pub mod problem;
pub mod ratelimit;
pub mod routes;
pub mod server;
pub mod usage;

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::Router;

use crate::config::{Config, Plan};
use crate::engine::accounts::{ApiKey, Tenant};
use crate::engine::batch::PlanLimits;
use crate::engine::Engine;

/// Shared by every handler (cheap to clone).
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub cfg: Arc<Config>,
    pub limiters: Arc<ratelimit::Limiters>,
    pub usage: Arc<usage::Usage>,
    pub metrics: Arc<metrics::Metrics>,
    /// SHA-256 of the admin token (`None`: no token, the admin API refuses everything).
    pub admin_token_hash: Option<[u8; 32]>,
    /// False until recovery finished and while shutting down (`/readyz`).
    pub ready: Arc<AtomicBool>,
    /// Path pattern → its routes (one per method).
    pub(crate) table: Arc<HashMap<&'static str, Vec<&'static routes::Route>>>,
}

/// The authenticated customer of a `/v1` request.
#[derive(Clone, Debug)]
pub struct Caller {
    pub key: ApiKey,
    pub tenant: Tenant,
    pub plan: Plan,
}

impl Caller {
    /// What the plan allows a batch.
    pub fn limits(&self) -> PlanLimits {
        PlanLimits {
            max_items_per_batch: self.plan.max_items_per_batch,
            concurrency: self.plan.concurrency,
            watermark: self.plan.watermark,
            items_per_day: self.plan.items_per_day,
        }
    }
}

impl AppState {
    /// State for an engine and a configuration.
    pub fn new(engine: Engine, cfg: Config) -> Self {
        let limiters = ratelimit::Limiters::new(&cfg.plans, cfg.limits.rate_limiter_keys_max);
        let mut table: HashMap<&'static str, Vec<&'static routes::Route>> = HashMap::new();
        for r in routes::ROUTES {
            table.entry(r.path).or_default().push(r);
        }
        let admin_token_hash = (!cfg.admin_token.is_empty()).then(|| {
            use sha2::Digest;
            sha2::Sha256::digest(cfg.admin_token.as_bytes()).into()
        });
        AppState {
            admin_token_hash,
            engine,
            limiters: Arc::new(limiters),
            usage: Arc::new(usage::Usage::new()),
            metrics: Arc::new(metrics::Metrics::new(routes::ROUTES)),
            ready: Arc::new(AtomicBool::new(false)),
            table: Arc::new(table),
            cfg: Arc::new(cfg),
        }
    }
}

/// The router: every route of `routes::ROUTES` behind the gate.
pub fn router(state: AppState) -> Router {
    let mut r: Router<AppState> = Router::new();
    let mut by_path: Vec<(&'static str, axum::routing::MethodRouter<AppState>)> = Vec::new();
    for route in routes::ROUTES {
        let filter = axum::routing::MethodFilter::try_from(route.method.clone())
            .expect("route methods are standard");
        let mr = (route.handler)(filter);
        match by_path.iter_mut().find(|(p, _)| *p == route.path) {
            Some((_, existing)) => {
                let prev = std::mem::take(existing);
                *existing = prev.merge(mr);
            }
            None => by_path.push((route.path, mr)),
        }
    }
    for (path, mr) in by_path {
        r = r.route(path, mr.fallback(gate::method_not_allowed));
    }
    r.route_layer(axum::middleware::from_fn_with_state(
        state.clone(),
        gate::gate,
    ))
    .fallback(gate::not_found)
    .with_state(state)
}
