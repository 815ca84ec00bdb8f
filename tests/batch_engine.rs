//! Batch engine, end to end on a real `Engine` over a temporary data directory (real WAL
//! with fdatasync, real files in the video store): pay only for success, markers,
//! pre-check refusal, request-id repeats, cancel, expiry, retry-failed, fairness, 429
//! throttling, and restarts mid-batch.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reelbatch::delivery::store::Rendition;
use reelbatch::engine::batch::pricing::{ModelPrice, Params};
use reelbatch::engine::batch::state::{BatchStatus, ItemStatus};
use reelbatch::engine::batch::{BatchError, BatchRequest, BatchView, ItemView, PlanLimits};
use reelbatch::engine::wallet::ledger::{verify_chain, EntryKind};
use reelbatch::engine::wallet::state::{GrantKind, WalletCommand};
use reelbatch::engine::{Clock, Engine, EngineConfig, ManualClock};
use reelbatch::ids::TenantId;
use reelbatch::providers::simulated::SimConfig;
use reelbatch::providers::{
    BoxFut, ErrorClass, JobRequest, JobStatus, Output, OutputRef, Provider, ProviderError, Registry,
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime starts")
}

/// Zero-latency simulated provider with the given failure rates; fast retries.
fn config(dir: &Path, transient: f64, permanent: f64, latency_ms: (u64, u64)) -> EngineConfig {
    let mut cfg = EngineConfig::new(dir);
    cfg.snapshot_every_events = u64::MAX;
    cfg.snapshot_every_ms = u64::MAX;
    cfg.batch.providers = Registry::simulated(
        SimConfig {
            latency_ms,
            transient_failure_rate: transient,
            permanent_failure_rate: permanent,
            seed: 7,
            ..SimConfig::default()
        },
        1_000,
    );
    cfg.batch.exec.backoff_base_ms = 1;
    cfg.batch.exec.backoff_max_ms = 20;
    cfg.batch.exec.expiry_check_ms = 20;
    cfg
}

const PRO: PlanLimits = PlanLimits {
    max_items_per_batch: 10_000,
    concurrency: 256,
    watermark: false,
    items_per_day: u64::MAX,
};

async fn tenant_with(engine: &Engine, credits: u64) -> TenantId {
    let t = TenantId::generate(engine.now_ms());
    engine.open_wallet(t).await.unwrap();
    if credits > 0 {
        engine
            .execute(
                t,
                WalletCommand::Grant {
                    request_id: format!("top-{t}"),
                    kind: GrantKind::Paid,
                    amount: credits,
                    expires_at_ms: None,
                },
            )
            .await
            .unwrap();
    }
    t
}

fn request(template: &str, vars: &[(&str, Vec<String>)]) -> BatchRequest {
    BatchRequest {
        template: template.into(),
        variables: vars
            .iter()
            .map(|(n, v)| (n.to_string(), v.clone()))
            .collect(),
        params: Params::default(),
        request_id: None,
        expires_in_s: None,
        api_key: None,
        key_daily_credit_limit: None,
    }
}

fn values(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// The money identities every finished batch must satisfy.
fn assert_paid_for_success(v: &BatchView) {
    assert!(v.status.is_terminal(), "{v:?}");
    let c = v.counts;
    assert_eq!(c.pending + c.running, 0, "{v:?}");
    assert_eq!(c.succeeded + c.failed + c.canceled, c.total);
    assert_eq!(v.settled, c.succeeded as u64 * v.unit_price);
    assert_eq!(v.released, (c.failed + c.canceled) as u64 * v.unit_price);
    assert_eq!(v.remaining, 0);
    assert_eq!(v.held, v.settled + v.released);
}

#[test]
fn ten_thousand_items_pay_only_for_success() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let (engine, _) = Engine::open(config(dir.path(), 0.05, 0.02, (0, 0))).unwrap();
    rt.block_on(async {
        let t = tenant_with(&engine, 1_000_000).await;
        let req = request(
            "a {animal} in {place}",
            &[
                ("animal", values("animal", 100)),
                ("place", values("place", 100)),
            ],
        );
        let v = engine.create_batch(t, &req, &PRO).await.unwrap();
        assert_eq!(v.counts.total, 10_000);
        assert_eq!(v.unit_price, 40);
        assert_eq!(v.total, 400_000);
        let b = engine.balances(t).await.unwrap();
        // Items may already be settling: the hold's credits are held or spent, no more.
        assert_eq!(b.available + b.held + b.spent, 1_000_000);
        assert_eq!(b.available, 600_000 + b.released);
        let v = engine.wait_batch(t, v.id).await.unwrap();
        assert_paid_for_success(&v);
        assert_eq!(v.status, BatchStatus::Partial);
        // ~2% permanent, and a few of the 5% transient used up their 3 attempts.
        assert!(v.counts.failed > 100 && v.counts.failed < 400, "{v:?}");
        let b = engine.balances(t).await.unwrap();
        assert_eq!(b.held, 0);
        assert_eq!(b.spent, v.settled);
        assert_eq!(b.released, v.released);
        assert_eq!(b.available, 1_000_000 - v.settled);
        engine.check_invariants().await.unwrap();
        // Items: prompts by index, outputs stored, failures coded.
        let items = engine.batch_items(t, v.id, 0, 10_000).await.unwrap();
        assert_eq!(items.len(), 10_000);
        assert_eq!(items[0].prompt, "a animal0 in place0");
        assert_eq!(items[1].prompt, "a animal0 in place1");
        assert_eq!(items[9_999].prompt, "a animal99 in place99");
        let ok = items
            .iter()
            .find(|i| i.status == ItemStatus::Succeeded)
            .unwrap();
        let out = ok.output.as_ref().unwrap();
        let bytes = engine
            .video_store()
            .get(out.video, Rendition::Clean, &out.content_type)
            .await
            .unwrap();
        assert_eq!(&bytes[..6], b"GIF89a");
        assert_eq!(bytes.len() as u64, out.bytes);
        let failed = items
            .iter()
            .find(|i| i.status == ItemStatus::Failed)
            .unwrap();
        let code = &failed.failure.as_ref().unwrap().code;
        assert!(
            code == "safety.output_filtered" || code == "provider.unavailable",
            "{code}"
        );
        // The wallet's ledger: one settle per succeeded item, one release per failed one.
        let st = engine.wallet_state_expanded(t).await.unwrap();
        let settles = st
            .ledger
            .iter()
            .filter(|e| e.kind == EntryKind::Settle)
            .count();
        let releases = st
            .ledger
            .iter()
            .filter(|e| e.kind == EntryKind::Release)
            .count();
        assert_eq!(settles as u32, v.counts.succeeded);
        assert_eq!(releases as u32, v.counts.failed);
        verify_chain(t, &st.ledger).unwrap();
    });
    rt.block_on(engine.shutdown(true)).unwrap();
}

#[test]
fn markers_reject_flaky_and_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let (engine, _) = Engine::open(config(dir.path(), 0.0, 0.0, (0, 0))).unwrap();
    rt.block_on(async {
        let t = tenant_with(&engine, 1_000).await;
        let req = request(
            "{what} cat",
            &[(
                "what",
                vec!["a [reject] [flaky]".into(), "a [flaky]".into(), "a".into()],
            )],
        );
        let starter = PlanLimits {
            watermark: true,
            items_per_day: u64::MAX,
            ..PRO
        };
        let v = engine.create_batch(t, &req, &starter).await.unwrap();
        let v = engine.wait_batch(t, v.id).await.unwrap();
        assert_paid_for_success(&v);
        assert_eq!(v.status, BatchStatus::Partial);
        let items = engine.batch_items(t, v.id, 0, 50).await.unwrap();
        assert_eq!(items[0].status, ItemStatus::Failed);
        assert_eq!(
            items[0].failure.as_ref().unwrap().code,
            "safety.prompt_rejected"
        );
        assert_eq!(items[0].attempts, 1);
        assert_eq!(items[1].status, ItemStatus::Succeeded);
        assert_eq!(items[1].attempts, 3, "[flaky] fails twice then succeeds");
        assert_eq!(items[2].attempts, 1);
        // Watermarked rendition stored beside the clean one, and different.
        let out = items[2].output.as_ref().unwrap();
        assert!(out.watermarked_bytes.is_some());
        let store = engine.video_store();
        let clean = store
            .get(out.video, Rendition::Clean, &out.content_type)
            .await
            .unwrap();
        let wm = store
            .get(out.video, Rendition::Watermarked, &out.content_type)
            .await
            .unwrap();
        assert_ne!(clean, wm);
        // Files are real: in D/videos.
        let id = out.video.to_string();
        let file = dir
            .path()
            .join("videos/videos")
            .join(&id[id.len() - 2..])
            .join(format!("{id}.clean.gif"));
        assert_eq!(std::fs::read(&file).unwrap(), clean);
    });
    rt.block_on(engine.shutdown(false)).unwrap();
}

#[test]
fn refusals_repeats_and_reuse() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let (engine, _) = Engine::open(config(dir.path(), 0.0, 0.0, (0, 0))).unwrap();
    rt.block_on(async {
        let t = tenant_with(&engine, 100).await;
        // 3 items × 40 = 120 > 100: nothing held, no batch.
        let req = request("{a}", &[("a", values("v", 3))]);
        match engine.create_batch(t, &req, &PRO).await {
            Err(BatchError::InsufficientCredits { available, needed }) => {
                assert_eq!((available, needed), (100, 120));
            }
            other => panic!("{other:?}"),
        }
        assert!(engine.list_batches(t, None, 10).await.unwrap().is_empty());
        assert_eq!(engine.balances(t).await.unwrap().available, 100);
        // Template bomb: refused before anything is allocated.
        let bomb = request(
            "{a}{b}{c}{d}",
            &[
                ("a", values("x", 1000)),
                ("b", values("x", 1000)),
                ("c", values("x", 1000)),
                ("d", values("x", 1000)),
            ],
        );
        let e = engine.create_batch(t, &bomb, &PRO).await.unwrap_err();
        assert_eq!(e.code(), "plan_limit_exceeded");
        assert_eq!(
            engine.quote(&request("{a", &[]), &PRO).unwrap_err().code(),
            "invalid_template"
        );
        let mut bad = request("x", &[]);
        bad.params.resolution = "8k".into();
        assert_eq!(
            engine.quote(&bad, &PRO).unwrap_err().code(),
            "invalid_request"
        );
        // A request id: the repeat returns the same batch, once held once.
        let mut once = request("{a}", &[("a", values("v", 2))]);
        once.request_id = Some("req-1".into());
        let q = engine.quote(&once, &PRO).unwrap();
        assert_eq!((q.items, q.unit_price, q.total), (2, 40, 80));
        assert_eq!(q.sample_prompts, ["v0", "v1"]);
        let (a, b) = tokio::join!(
            engine.create_batch(t, &once, &PRO),
            engine.create_batch(t, &once, &PRO)
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.id, b.id);
        assert_eq!(engine.list_batches(t, None, 10).await.unwrap().len(), 1);
        let mut other = once.clone();
        other.template = "{a}!".into();
        assert!(matches!(
            engine.create_batch(t, &other, &PRO).await,
            Err(BatchError::KeyReused(_))
        ));
        let v = engine.wait_batch(t, a.id).await.unwrap();
        assert_eq!(v.status, BatchStatus::Completed);
        assert_eq!(engine.balances(t).await.unwrap().available, 20);
        // Another tenant cannot see it.
        let u = tenant_with(&engine, 0).await;
        assert_eq!(
            engine.batch(u, a.id).await.unwrap_err(),
            BatchError::NotFound
        );
        assert_eq!(
            engine.cancel_batch(u, a.id).await.unwrap_err(),
            BatchError::NotFound
        );
    });
    rt.block_on(engine.shutdown(false)).unwrap();
}

#[test]
fn cancel_expiry_and_retry_failed() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let clock = Arc::new(ManualClock::default());
    clock.0.store(1_700_000_000_000, Ordering::SeqCst);
    let mut cfg = config(dir.path(), 0.0, 0.0, (100, 100));
    cfg.clock = Arc::clone(&clock) as Arc<dyn Clock>;
    let (engine, _) = Engine::open(cfg).unwrap();
    let slow = PlanLimits {
        concurrency: 2,
        ..PRO
    };
    rt.block_on(async {
        let t = tenant_with(&engine, 100_000).await;
        // Cancel: two items run (and are charged on success), the rest are released now.
        let v = engine
            .create_batch(t, &request("{a}", &[("a", values("c", 50))]), &slow)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        let c = engine.cancel_batch(t, v.id).await.unwrap();
        assert!(c.cancel_requested);
        assert_eq!(c.counts.pending, 0);
        assert!(c.counts.canceled >= 46, "{c:?}");
        let v = engine.wait_batch(t, v.id).await.unwrap();
        assert_eq!(v.status, BatchStatus::Canceled);
        assert_paid_for_success(&v);
        assert!(v.counts.succeeded >= 1 && v.counts.succeeded <= 4, "{v:?}");
        // Cancel again: nothing changes.
        assert_eq!(engine.cancel_batch(t, v.id).await.unwrap(), v);

        // Expiry: items not started by the deadline fail `batch.expired`.
        let mut req = request("{a}", &[("a", values("e", 40))]);
        req.expires_in_s = Some(60);
        let v = engine.create_batch(t, &req, &slow).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        clock.0.fetch_add(61_000, Ordering::SeqCst);
        let v = engine.wait_batch(t, v.id).await.unwrap();
        assert_paid_for_success(&v);
        assert!(v.counts.failed >= 36, "{v:?}");
        let items = engine.batch_items(t, v.id, 0, 100).await.unwrap();
        let expired = items
            .iter()
            .filter(|i| {
                i.failure
                    .as_ref()
                    .is_some_and(|f| f.code == "batch.expired")
            })
            .count();
        assert_eq!(expired as u32, v.counts.failed);

        // Retry-failed: a new batch of just the failed items, with their prompts, new hold.
        let before = engine.balances(t).await.unwrap();
        let r = engine
            .retry_failed(t, v.id, None, &slow, None, None)
            .await
            .unwrap();
        assert_eq!(r.retry_of, Some(v.id));
        assert_eq!(r.counts.total, v.counts.failed);
        assert_eq!(r.total, r.counts.total as u64 * 40);
        let after = engine.balances(t).await.unwrap();
        // The new hold came out of available (items may already be settling).
        assert_eq!(
            after.available + after.held + after.spent,
            before.available + before.held + before.spent
        );
        assert_eq!(
            after.available,
            before.available - r.total + (after.released - before.released)
        );
        let failed_prompts: Vec<String> = items
            .iter()
            .filter(|i| i.status == ItemStatus::Failed)
            .map(|i| i.prompt.clone())
            .collect();
        let retried: Vec<String> = engine
            .batch_items(t, r.id, 0, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.prompt)
            .collect();
        assert_eq!(retried, failed_prompts);
        let r = engine.wait_batch(t, r.id).await.unwrap();
        assert_eq!(r.status, BatchStatus::Completed);
        assert_eq!(
            engine
                .retry_failed(t, r.id, None, &slow, None, None)
                .await
                .unwrap_err(),
            BatchError::NothingToRetry
        );
        engine.check_invariants().await.unwrap();
    });
    rt.block_on(engine.shutdown(false)).unwrap();
}

#[test]
fn a_small_batch_is_not_starved_by_a_large_one() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let mut cfg = config(dir.path(), 0.0, 0.0, (2, 2));
    cfg.batch.providers = Registry::simulated(
        SimConfig {
            latency_ms: (2, 2),
            transient_failure_rate: 0.0,
            permanent_failure_rate: 0.0,
            ..SimConfig::default()
        },
        8,
    );
    let (engine, _) = Engine::open(cfg).unwrap();
    let plan = PlanLimits {
        concurrency: 8,
        ..PRO
    };
    rt.block_on(async {
        let a = tenant_with(&engine, 1_000_000).await;
        let b = tenant_with(&engine, 1_000).await;
        let big = engine
            .create_batch(a, &request("{x}", &[("x", values("a", 5_000))]), &plan)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let start = Instant::now();
        let small = engine
            .create_batch(b, &request("{x}", &[("x", values("b", 5))]), &plan)
            .await
            .unwrap();
        let small = engine.wait_batch(b, small.id).await.unwrap();
        let small_took = start.elapsed();
        assert_eq!(small.status, BatchStatus::Completed);
        let big_now = engine.batch(a, big.id).await.unwrap();
        assert!(
            big_now.counts.pending > 2_500,
            "B finished while A is far from done: {big_now:?} (B took {small_took:?})"
        );
        let big = engine.wait_batch(a, big.id).await.unwrap();
        assert_eq!(big.status, BatchStatus::Completed);
    });
    rt.block_on(engine.shutdown(false)).unwrap();
}

/// A provider that answers 429 (Retry-After 1 ms) to the first `n` submits of each item,
/// then succeeds with a fixed file.
struct Throttling {
    n: u32,
    submits: std::sync::Mutex<std::collections::HashMap<u32, u32>>,
    total: AtomicU32,
}

impl Provider for Throttling {
    fn submit<'a>(&'a self, job: &'a JobRequest) -> BoxFut<'a, Result<String, ProviderError>> {
        Box::pin(async move {
            self.total.fetch_add(1, Ordering::SeqCst);
            let mut m = self.submits.lock().unwrap();
            let k = m.entry(job.item).or_default();
            *k += 1;
            if *k <= self.n {
                return Err(ProviderError::new(
                    ErrorClass::Throttled {
                        retry_after_ms: Some(1),
                    },
                    "provider.rate_limited",
                    "429",
                ));
            }
            Ok(format!("job-{}", job.item))
        })
    }
    fn poll<'a>(
        &'a self,
        _job: &'a JobRequest,
        job_id: &'a str,
    ) -> BoxFut<'a, Result<JobStatus, ProviderError>> {
        Box::pin(async move { Ok(JobStatus::Succeeded(OutputRef(job_id.to_string()))) })
    }
    fn fetch<'a>(
        &'a self,
        _job: &'a JobRequest,
        _output: &'a OutputRef,
    ) -> BoxFut<'a, Result<Output, ProviderError>> {
        Box::pin(async move {
            Ok(Output {
                content_type: "video/mp4".into(),
                bytes: bytes::Bytes::from_static(b"not really a video"),
                watermarked: None,
            })
        })
    }
    fn cancel<'a>(&'a self, _job_id: &'a str) -> BoxFut<'a, Result<(), ProviderError>> {
        Box::pin(async { Ok(()) })
    }
    fn poll_interval_ms(&self) -> u64 {
        0
    }
}

#[test]
fn a_429_slows_the_provider_without_spending_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let mut cfg = config(dir.path(), 0.0, 0.0, (0, 0));
    let throttling = Arc::new(Throttling {
        n: 5,
        submits: Default::default(),
        total: AtomicU32::new(0),
    });
    cfg.batch
        .providers
        .insert("scripted", Arc::clone(&throttling) as Arc<dyn Provider>, 4);
    cfg.batch.prices.models.insert(
        "scripted-model".into(),
        ModelPrice {
            provider: "scripted".into(),
            provider_model: "m".into(),
            per_second: [("720p".to_string(), 5)].into_iter().collect(),
            duration_seconds_max: 10,
            aspect_ratios: vec!["16:9".into()],
        },
    );
    let (engine, _) = Engine::open(cfg).unwrap();
    rt.block_on(async {
        let t = tenant_with(&engine, 10_000).await;
        let mut req = request("{x}", &[("x", values("s", 10))]);
        req.params.model = "scripted-model".into();
        let v = engine.create_batch(t, &req, &PRO).await.unwrap();
        assert_eq!(v.unit_price, 20);
        let v = engine.wait_batch(t, v.id).await.unwrap();
        // Five 429s per item, attempt limit 3: every item still succeeds, on attempt 1.
        assert_eq!(v.status, BatchStatus::Completed, "{v:?}");
        assert_paid_for_success(&v);
        for it in engine.batch_items(t, v.id, 0, 10).await.unwrap() {
            assert_eq!(it.attempts, 1);
        }
        assert_eq!(throttling.total.load(Ordering::SeqCst), 60);
    });
    rt.block_on(engine.shutdown(false)).unwrap();
}

#[test]
fn restarts_mid_batch_never_charge_twice() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let cfg = || config(dir.path(), 0.05, 0.02, (5, 30));
    let (engine, _) = Engine::open(cfg()).unwrap();
    let (t, ids) = rt.block_on(async {
        let t = tenant_with(&engine, 1_000_000).await;
        let mut ids = Vec::new();
        for k in 0..3 {
            let mut req = request("{a} {b}", &[("a", values("a", 20)), ("b", values("b", 20))]);
            req.request_id = Some(format!("r{k}"));
            ids.push(engine.create_batch(t, &req, &PRO).await.unwrap().id);
        }
        (t, ids)
    });
    let mut engine = Some(engine);
    let mut resumed = 0;
    // Kill (drop without shutdown) and reopen, several times, while items run.
    for round in 0..4 {
        std::thread::sleep(Duration::from_millis(60 + 40 * round));
        if round == 2 {
            rt.block_on(engine.as_ref().unwrap().snapshot_now())
                .unwrap();
        }
        drop(engine.take());
        let (e, rec) = Engine::open(cfg()).unwrap();
        assert_eq!(rec.batches, 3);
        // Some items were running at the provider (job id recorded): they resume by
        // polling that job.
        let running: usize = rt
            .block_on(e.capture_batches())
            .unwrap()
            .iter()
            .flat_map(|b| b.items.iter())
            .filter(|i| i.status == ItemStatus::Running && i.job.is_some())
            .count();
        resumed += running;
        engine = Some(e);
    }
    assert!(resumed > 0, "no restart caught an item running");
    let engine = engine.unwrap();
    rt.block_on(async {
        for id in &ids {
            let v = engine.wait_batch(t, *id).await.unwrap();
            assert_paid_for_success(&v);
        }
        engine.check_invariants().await.unwrap();
        let st = engine.wallet_state_expanded(t).await.unwrap();
        verify_chain(t, &st.ledger).unwrap();
        let mut seen = std::collections::HashSet::new();
        for e in &st.ledger {
            if matches!(e.kind, EntryKind::Settle | EntryKind::Release) {
                assert!(seen.insert((e.batch, e.item)), "moved twice: {e:?}");
            }
        }
        assert_eq!(seen.len(), 3 * 400);
        assert_eq!(st.held, 0);
        assert_eq!(engine.batch_anomalies(), 0);
    });
    // A clean restart reproduces the same batches.
    let before = rt.block_on(engine.capture_batches()).unwrap();
    rt.block_on(engine.shutdown(true)).unwrap();
    let (engine, _) = Engine::open(cfg()).unwrap();
    assert_eq!(rt.block_on(engine.capture_batches()).unwrap(), before);
    rt.block_on(engine.shutdown(false)).unwrap();
}

/// Everything a client can read about a tenant's batches: list, each batch, its items,
/// each video's metadata.
async fn readable(
    engine: &Engine,
    t: TenantId,
) -> (
    Vec<BatchView>,
    Vec<ItemView>,
    Vec<reelbatch::engine::batch::VideoInfo>,
) {
    let list = engine.list_batches(t, None, 1_000).await.unwrap();
    let mut items = Vec::new();
    let mut videos = Vec::new();
    for b in &list {
        assert_eq!(engine.batch(t, b.id).await.unwrap(), *b);
        for it in engine.batch_items(t, b.id, 0, 1_000).await.unwrap() {
            if let Some(o) = &it.output {
                videos.push(engine.video(Some(t), o.video).await.unwrap());
                assert!(matches!(
                    engine.video(Some(TenantId(t.0 + 1)), o.video).await,
                    Err(BatchError::NotFound)
                ));
            }
            items.push(it);
        }
        // Another tenant never sees it, archived or not.
        assert!(matches!(
            engine.batch(TenantId(t.0 + 1), b.id).await,
            Err(BatchError::NotFound)
        ));
    }
    (list, items, videos)
}

/// Finished batches leave memory at a snapshot (appended to the archive and synced) and
/// read back exactly as before, across restarts; a crash between the archive's sync and
/// the snapshot image (simulated: the image removed, the log still whole) recovers from
/// archive + log; a torn archive tail is cut; damage inside it refuses to start.
#[test]
fn finished_batches_move_to_the_archive_and_read_back_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let cfg = || config(dir.path(), 0.2, 0.1, (0, 0));
    let (engine, _) = Engine::open(cfg()).unwrap();
    let (t, before, states) = rt.block_on(async {
        let t = tenant_with(&engine, 1_000_000).await;
        // Five small batches and one large enough to stay decoded once read (its videos'
        // lookups read it again and again).
        for k in 0..6 {
            let (a, b) = if k == 5 { (20, 15) } else { (3, 4) };
            let mut req = request("{a} {b}", &[("a", values("a", a)), ("b", values("b", b))]);
            req.request_id = Some(format!("r{k}"));
            let id = engine.create_batch(t, &req, &PRO).await.unwrap().id;
            assert_paid_for_success(&engine.wait_batch(t, id).await.unwrap());
        }
        assert_eq!(engine.batch_archive_stats(), (0, 0));
        (
            t,
            readable(&engine, t).await,
            engine.capture_batches().await.unwrap(),
        )
    });
    assert_eq!(before.0.len(), 6);
    assert!(!before.2.is_empty(), "some items succeeded");
    rt.block_on(async {
        let wallet_before = engine.wallet_state(t).await.unwrap();
        assert_eq!(
            wallet_before.holds.len(),
            6,
            "finished holds stay until archived"
        );
        engine.snapshot_now().await.unwrap();
        let (archived, bytes) = engine.batch_archive_stats();
        assert_eq!(archived, 6);
        // The archived batches' finished holds are retired; nothing else changes.
        let wallet_after = engine.wallet_state(t).await.unwrap();
        assert!(wallet_after.holds.is_empty(), "{:?}", wallet_after.holds);
        assert_eq!(engine.balances(t).await.unwrap(), wallet_before.balances());
        assert_eq!(
            engine.wallet_state_expanded(t).await.unwrap().ledger,
            wallet_before.ledger
        );
        engine.check_invariants().await.unwrap();
        assert!(bytes > 0);
        assert_eq!(readable(&engine, t).await, before);
        assert_eq!(engine.capture_batches().await.unwrap(), states);
        // A repeat of a creation still finds its (archived) batch.
        let mut req = request("{a} {b}", &[("a", values("a", 3)), ("b", values("b", 4))]);
        req.request_id = Some("r0".into());
        let again = engine.create_batch(t, &req, &PRO).await.unwrap();
        assert_eq!(again, before.0[0]);
        assert!(engine.reconcile().await.unwrap().discrepancies.is_empty());
    });
    rt.block_on(engine.shutdown(false)).unwrap();

    // Crash after the archive synced, before the image was renamed into place: no image,
    // the whole log, the archive. Replay skips what the archive holds.
    let snaps = reelbatch::snapshot_dir(dir.path());
    for f in std::fs::read_dir(&snaps).unwrap() {
        std::fs::remove_file(f.unwrap().path()).unwrap();
    }
    let (engine, rec) = Engine::open(cfg()).unwrap();
    assert_eq!(rec.snapshot_lsn, None);
    assert_eq!(rec.batches, 6);
    rt.block_on(async {
        assert_eq!(
            engine.wallet_state(t).await.unwrap().holds.len(),
            6,
            "the replayed log brings the holds back until the next snapshot"
        );
        assert_eq!(engine.batch_archive_stats().0, 6);
        assert_eq!(readable(&engine, t).await, before);
        assert_eq!(engine.capture_batches().await.unwrap(), states);
        engine.check_invariants().await.unwrap();
        assert!(engine.reconcile().await.unwrap().discrepancies.is_empty());
    });
    rt.block_on(engine.shutdown(true)).unwrap();

    // A torn tail (an append that never synced) is cut; the records before it stay. Its
    // pages may reach the disk out of order, so a whole valid record after the torn one
    // (here: a copy of the first) is still part of the tail.
    let archive = reelbatch::engine::batch::archive::archive_path(dir.path());
    let synced = std::fs::read(&archive).unwrap();
    let first_len = 16 + u32::from_le_bytes(synced[4..8].try_into().unwrap()) as usize;
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&archive)
            .unwrap();
        f.write_all(&[0xAB; 100]).unwrap();
        f.write_all(&synced[..first_len]).unwrap();
    }
    let synced_bytes = synced.len() as u64;
    let (engine, _) = Engine::open(cfg()).unwrap();
    assert_eq!(std::fs::metadata(&archive).unwrap().len(), synced_bytes);
    rt.block_on(async {
        assert!(
            engine.wallet_state(t).await.unwrap().holds.is_empty(),
            "the final snapshot retired them again"
        );
        engine.check_invariants().await.unwrap();
        assert_eq!(readable(&engine, t).await, before);
    });
    rt.block_on(engine.shutdown(false)).unwrap();

    // Damage inside a synced record: recovery refuses rather than lose batches whose log
    // segments may be gone.
    let mut bytes = std::fs::read(&archive).unwrap();
    bytes[40] ^= 0x55;
    std::fs::write(&archive, &bytes).unwrap();
    let err = Engine::open(cfg())
        .err()
        .expect("a damaged archive is refused");
    assert!(err.to_string().contains("damaged"), "{err}");
}

/// A tenant's batch ids, page by page (`limit` each, at most `pages_max` pages).
async fn list_all(
    engine: &Engine,
    t: TenantId,
    limit: usize,
    pages_max: usize,
) -> Vec<reelbatch::ids::BatchId> {
    let mut ids = Vec::new();
    let mut after = None;
    for _ in 0..pages_max {
        let page = engine.list_batches(t, after, limit).await.unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().map(|b| b.id);
        ids.extend(page.into_iter().map(|b| b.id));
    }
    ids
}

/// Creates a batch and waits until it finished.
async fn finished(
    engine: &Engine,
    t: TenantId,
    req: &BatchRequest,
    plan: &PlanLimits,
) -> reelbatch::ids::BatchId {
    let id = engine.create_batch(t, req, plan).await.unwrap().id;
    engine.wait_batch(t, id).await.unwrap();
    id
}

/// Archived batches leave the in-memory directory entirely (listing, request ids,
/// videos) and are found through the on-disk archive index: reads, listing pages that
/// span memory and the index, request-id repeats, daily caps after a restart. The index
/// is derived data: one that lags the archive (a crash between the archive's sync and the
/// index's commit, reproduced with an older copy of the index file), one deleted and one
/// overwritten with junk are all rebuilt at startup, and everything reads the same.
#[test]
fn archived_batches_are_found_through_the_index_and_the_index_rebuilds() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let cfg = || config(dir.path(), 0.2, 0.1, (0, 0));
    let index = reelbatch::engine::batch::index::index_path(dir.path());
    // 12 items per batch; the cap leaves room for exactly 8 batches today.
    let capped = PlanLimits {
        items_per_day: 8 * 12 + 5,
        ..PRO
    };
    let batch_req = |k: usize| {
        let mut req = request("{a} {b}", &[("a", values("a", 3)), ("b", values("b", 4))]);
        req.request_id = Some(format!("r{k}"));
        req
    };
    let (engine, _) = Engine::open(cfg()).unwrap();
    let (t, ids) = rt.block_on(async {
        let t = tenant_with(&engine, 1_000_000).await;
        let mut ids = Vec::new();
        for k in 0..6 {
            ids.push(finished(&engine, t, &batch_req(k), &capped).await);
        }
        let (batches, requests, videos) = engine.batch_directory_entries();
        assert_eq!((batches, requests), (6, 6));
        assert!(videos > 0, "some items succeeded");
        engine.snapshot_now().await.unwrap();
        assert_eq!(engine.batch_directory_entries(), (0, 0, 0));
        assert_eq!(engine.batch_archive_stats().0, 6);
        (t, ids)
    });
    let index_after_six = std::fs::read(&index).unwrap();
    let before = rt.block_on(async {
        // Two more, finished but still in memory: pages span memory and the index.
        let mut ids = ids.clone();
        for k in 6..8 {
            ids.push(finished(&engine, t, &batch_req(k), &capped).await);
        }
        assert_eq!(engine.batch_directory_entries().0, 2);
        let paged = list_all(&engine, t, 3, 10).await;
        assert_eq!(paged, ids, "every batch once, in creation order");
        // Repeats of archived and in-memory creations return their batch; a changed
        // request under an archived request id is refused.
        for (k, id) in ids.iter().enumerate() {
            let again = engine
                .create_batch(t, &batch_req(k), &capped)
                .await
                .unwrap();
            assert_eq!(again.id, *id);
        }
        let mut changed = request("{a} other", &[("a", values("a", 3))]);
        changed.request_id = Some("r0".into());
        assert!(matches!(
            engine.create_batch(t, &changed, &capped).await,
            Err(BatchError::KeyReused(_))
        ));
        engine.snapshot_now().await.unwrap();
        assert_eq!(engine.batch_directory_entries(), (0, 0, 0));
        readable(&engine, t).await
    });
    assert_eq!(before.0.len(), 8);
    rt.block_on(engine.shutdown(false)).unwrap();

    let check = |label: &str| {
        let (engine, rec) = Engine::open(cfg()).unwrap();
        assert_eq!(rec.batches, 8, "{label}");
        rt.block_on(async {
            assert_eq!(engine.batch_directory_entries(), (0, 0, 0), "{label}");
            assert_eq!(engine.batch_archive_stats().0, 8, "{label}");
            assert_eq!(readable(&engine, t).await, before, "{label}");
            // Today's items of the archived batches still count against the cap.
            let refused = engine.create_batch(t, &batch_req(99), &capped).await;
            assert!(
                matches!(refused, Err(BatchError::DailyItems { used: 96, .. })),
                "{label}: {refused:?}"
            );
            let again = engine
                .create_batch(t, &batch_req(3), &capped)
                .await
                .unwrap();
            assert_eq!(again.id, before.0[3].id, "{label}");
            engine.check_invariants().await.unwrap();
            assert!(engine.reconcile().await.unwrap().discrepancies.is_empty());
        });
        rt.block_on(engine.shutdown(false)).unwrap();
    };
    check("restart");
    // The index as it was before the second archiving: the archive is ahead of it.
    std::fs::write(&index, &index_after_six).unwrap();
    check("index behind the archive");
    std::fs::remove_file(&index).unwrap();
    check("index deleted");
    std::fs::write(&index, vec![0x5Au8; 64 * 1024]).unwrap();
    check("index overwritten");
}

/// A snapshot that archives more batches than one directory write lock takes (256) lets
/// them go in chunks: afterwards nothing is left in memory, the item totals are what they
/// were before (moved from the finished totals to the archived ones, none lost or counted
/// twice), every batch lists once, and every request id still answers with its batch.
#[test]
fn a_snapshot_archiving_several_chunks_keeps_totals_and_request_ids() {
    const BATCHES: usize = 600;
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let (engine, _) = Engine::open(config(dir.path(), 0.2, 0.1, (0, 0))).unwrap();
    let batch_req = |k: usize| {
        let mut req = request("{a}", &[("a", values("a", 2))]);
        req.request_id = Some(format!("chunk-{k}"));
        req
    };
    rt.block_on(async {
        let t = tenant_with(&engine, 1_000_000).await;
        let mut ids = Vec::with_capacity(BATCHES);
        for k in 0..BATCHES {
            ids.push(
                engine
                    .create_batch(t, &batch_req(k), &PRO)
                    .await
                    .unwrap()
                    .id,
            );
        }
        for id in &ids {
            engine.wait_batch(t, *id).await.unwrap();
        }
        let before = engine.item_counts().await.unwrap();
        assert_eq!(before.total as usize, 2 * BATCHES);
        assert_eq!(engine.batch_directory_entries().0, BATCHES);
        engine.snapshot_now().await.unwrap();
        assert_eq!(engine.batch_directory_entries(), (0, 0, 0));
        assert_eq!(engine.batch_archive_stats().0, BATCHES as u64);
        assert_eq!(engine.item_counts().await.unwrap(), before);
        let listed = list_all(&engine, t, 100, BATCHES).await;
        assert_eq!(listed, ids, "every batch once, in creation order");
        for (k, id) in ids.iter().enumerate().step_by(37) {
            let again = engine.create_batch(t, &batch_req(k), &PRO).await.unwrap();
            assert_eq!(
                again.id, *id,
                "request id {k} answers with its archived batch"
            );
        }
        engine.shutdown(false).await.unwrap();
    });
}
