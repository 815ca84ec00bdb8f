//! `reelbatch serve`: engine + axum, and a graceful stop.
//!
//! Threads: the engine's actix System and arbiters run on their own threads (the engine
//! starts them); axum runs on the caller's multi-thread tokio runtime. Startup: recover
//! the data directory (off the async threads), bind, mark ready. Stop (SIGINT/SIGTERM or
//! the given future): not ready, stop accepting, drain in-flight requests (bounded),
//! then a final snapshot, flush and close of the log.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::api::{router, AppState};
use crate::config::{Config, HttpProviderConfig};
use crate::engine::batch::{BatchConfig, ExecConfig};
use crate::engine::{Engine, EngineConfig};
use crate::providers::http::HttpConfig;
use crate::providers::simulated::SimConfig;
use crate::providers::{Provider, ProviderError, Registry};
use crate::webhooks::WebhookConfig;

/// Longest wait for in-flight requests at shutdown.
pub const DRAIN_MAX: Duration = Duration::from_secs(30);

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("recovery failed: {0}")]
    Engine(#[from] crate::engine::EngineError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
}

/// The engine settings a configuration asks for.
pub fn engine_config(cfg: &Config, data_dir: PathBuf) -> Result<EngineConfig, ServeError> {
    let mut e = EngineConfig::new(data_dir);
    e.durability = cfg.durability();
    e.snapshot_every_events = cfg.snapshots.every_events.max(1);
    e.snapshot_every_ms = cfg.snapshots.every_s.saturating_mul(1000).max(1000);
    e.snapshots_kept = cfg.snapshots.kept.max(1);
    e.mailbox_capacity = cfg.limits.mailbox_capacity;
    e.access_log_max = cfg.limits.access_log_max.max(1);
    e.idempotency_retention_ms = cfg.limits.idempotency_retention_s.saturating_mul(1000);
    e.idempotency_keys_max = cfg.limits.idempotency_keys_max;
    let s = &cfg.provider.simulated;
    let mut providers = Registry::simulated(
        SimConfig {
            latency_ms: (s.latency_ms[0], s.latency_ms[1]),
            transient_failure_rate: s.transient_failure_rate,
            permanent_failure_rate: s.permanent_failure_rate,
            seed: s.seed,
            ..SimConfig::default()
        },
        s.concurrency_max,
    );
    type Make = fn(HttpConfig) -> Result<Arc<dyn Provider>, ProviderError>;
    let http_providers: [(&str, &HttpProviderConfig, Make); 2] = [
        ("replicate", &cfg.provider.replicate, |h| {
            Ok(Arc::new(crate::providers::replicate::Replicate::new(h)?))
        }),
        ("fal", &cfg.provider.fal, |h| {
            Ok(Arc::new(crate::providers::fal::Fal::new(h)?))
        }),
    ];
    for (name, p, make) in http_providers {
        if !p.enabled {
            continue;
        }
        let err = |m: String| ServeError::Config(format!("provider.{name}: {m}"));
        let http = HttpConfig::from_env(&p.base_url, &p.token_env).map_err(err)?;
        let provider = make(http).map_err(|e| err(e.message))?;
        providers.insert(name, provider, p.concurrency_max);
    }
    let w = &cfg.webhooks;
    let ms = |s: f64| (s * 1000.0).round() as u64;
    e.webhooks = WebhookConfig {
        allow_private_targets: w.allow_private_targets,
        allow_http: w.allow_http,
        retry_schedule_ms: w.retry_schedule_s.iter().map(|&s| ms(s)).collect(),
        timeout_ms: ms(w.timeout_s),
        disable_after_ms: ms(w.disable_after_s),
        concurrency_max: w.concurrency_max,
        concurrency_per_endpoint: w.concurrency_per_endpoint,
        endpoints_per_tenant_max: w.endpoints_per_tenant_max,
        finished_per_tenant_max: w.deliveries_kept_per_tenant,
        pending_per_endpoint_max: w.pending_per_endpoint_max,
        ..WebhookConfig::default()
    };
    e.batch = BatchConfig {
        exec: ExecConfig {
            attempts_max: cfg.batches.attempts_max,
            attempt_timeout_ms: cfg.batches.attempt_timeout_s.saturating_mul(1000).max(1000),
            ..ExecConfig::default()
        },
        providers,
        store_url: cfg.batches.store_url.clone(),
        expires_in_s_default: cfg.batches.expires_in_s_default,
        expires_in_s_max: cfg.batches.expires_in_s_max,
        ..BatchConfig::default()
    };
    Ok(e)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// A running server.
pub struct Running {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    pub state: AppState,
}

/// Recovers, binds and serves until `stop` resolves; then drains and shuts down.
/// `on_ready` is called once the server accepts requests.
pub async fn serve(
    cfg: Config,
    data_dir: PathBuf,
    listen: &str,
    stop: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(&Running),
) -> Result<(), ServeError> {
    let ecfg = engine_config(&cfg, data_dir)?;
    serve_engine(ecfg, cfg, listen, stop, on_ready).await
}

/// As `serve`, with the engine settings given (fault injection, test clocks).
pub async fn serve_engine(
    ecfg: EngineConfig,
    cfg: Config,
    listen: &str,
    stop: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(&Running),
) -> Result<(), ServeError> {
    let data_dir = ecfg.data_dir.clone();
    std::fs::create_dir_all(&data_dir)?;
    let (engine, recovery) = tokio::task::spawn_blocking(move || Engine::open(ecfg))
        .await
        .map_err(|e| ServeError::Config(format!("recovery task: {e}")))??;
    tracing::info!(
        data_dir = %data_dir.display(),
        snapshot_lsn = ?recovery.snapshot_lsn,
        events_replayed = recovery.events_replayed,
        wallets = recovery.wallets,
        batches = recovery.batches,
        torn_tail = recovery.wal.torn_tail.is_some(),
        "recovered"
    );
    if cfg.admin_token.is_empty() {
        tracing::warn!("no admin token configured (REELBATCH_ADMIN_TOKEN): the admin API refuses every request");
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen.to_owned(),
            source,
        })?;
    let addr = listener.local_addr()?;
    // Without TCP_NODELAY a response written in pieces (a streamed download: headers, then
    // body chunks) waits for the client's delayed ACK: ~40 ms added to every download.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY not set on a connection: {e}");
        }
    });
    let state = AppState::new(engine.clone(), cfg);
    let app = router(state.clone());
    state.ready.store(true, Ordering::Release);
    let running = Running {
        addr,
        state: state.clone(),
    };
    on_ready(&running);
    tracing::info!(%addr, "listening");
    let ready = Arc::clone(&state.ready);
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        stop.await;
        ready.store(false, Ordering::Release);
        let _ = stopping_tx.send(());
        tracing::info!("stopping: draining requests");
    });
    let server = tokio::spawn(async move { server.await });
    // Drain: once stop fired, give in-flight requests at most DRAIN_MAX.
    let mut server = server;
    tokio::select! {
        r = &mut server => { r.map_err(|e| ServeError::Config(e.to_string()))??; }
        _ = async {
            let _ = stopping_rx.await;
            tokio::time::sleep(DRAIN_MAX).await;
        } => {
            tracing::warn!("drain timed out; stopping with requests in flight");
            server.abort();
        }
    }
    tracing::info!("final snapshot and log close");
    engine.shutdown(true).await?;
    Ok(())
}
