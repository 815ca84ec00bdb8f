//! Batches (SPEC §3, §4): templates and prices, one actor per active batch, the attempts
//! it runs, and the engine operations the HTTP layer calls (quote, create, read, list,
//! cancel, retry-failed).
//!
//! - `template.rs` grammar, checked count, prompt `i` from `i` alone
//! - `pricing.rs`  params and the price table
//! - `state.rs`    spec, item/batch state machines, events, `apply`, invariants
//! - `actor.rs`    the per-batch actor: hold, dispatch, outcomes, money, finish
//! - `attempt.rs`  one attempt as a task: submit, durable job id, poll, fetch, store
//!
//! - `archive.rs`  finished batches on disk, read on demand
//! - `index.rs`    where each archived batch, request id and video is, on disk
//!
//! The directory (`Directory`) maps batch ids to live actors or to finished states (in
//! memory until the next snapshot moves them to the archive), and request ids and videos
//! to batches (a repeat of a creation returns the same batch). It holds only batches not
//! archived yet; every lookup that misses it asks the archive index, so memory does not
//! grow with the batches ever made.

pub mod actor;
pub mod archive;
pub mod attempt;
pub mod index;
pub mod pricing;
pub mod state;
pub mod template;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use actix::{Actor, Addr};
use sha2::{Digest, Sha256};

use crate::delivery::store::VideoStore;
use crate::engine::batch::actor::{
    AwaitAccepted, AwaitFinished, BatchActor, Cancel, Read, ReadAnswer,
};
use crate::engine::batch::pricing::{Params, PriceError, PriceTable};
use crate::engine::batch::state::{
    BatchEvent, BatchSpec, BatchState, BatchStatus, Counts, Failure, ItemStatus, Phase,
    StoredOutput,
};
use crate::engine::batch::template::{Expansion, TemplateError, TemplateLimits};
use crate::engine::events::Record;
use crate::engine::scheduler::Scheduler;
use crate::engine::wallet::state::Hold;
use crate::engine::{journal, Clock, Engine, EngineError};
use crate::ids::{BatchId, KeyId, TenantId, VideoId};
use crate::providers::Registry;

/// How attempts run. Every bound is here, with its default.
#[derive(Debug, Clone)]
pub struct ExecConfig {
    /// Attempts per item (SPEC §12 default 3, so `[flaky]` succeeds).
    pub attempts_max: u32,
    /// First retry delay; doubles per attempt (with jitter).
    pub backoff_base_ms: u64,
    /// Longest retry delay (also caps a provider's `Retry-After`).
    pub backoff_max_ms: u64,
    /// Deadline of one attempt, submit to stored output.
    pub attempt_timeout_ms: u64,
    /// Throttle after a 429 without `Retry-After`.
    pub throttle_default_ms: u64,
    /// 429s one item may see before it fails `provider.rate_limited`.
    pub throttles_max: u32,
    /// Failed polls of one running job before the attempt gives up.
    pub poll_errors_max: u32,
    /// Pause before resending a settle/release or hold the log could not take.
    pub money_retry_ms: u64,
    /// How often an active batch checks its expiry.
    pub expiry_check_ms: u64,
}

impl Default for ExecConfig {
    fn default() -> Self {
        ExecConfig {
            attempts_max: 3,
            backoff_base_ms: 1_000,
            backoff_max_ms: 60_000,
            attempt_timeout_ms: 15 * 60 * 1000,
            throttle_default_ms: 5_000,
            throttles_max: 50,
            poll_errors_max: 5,
            money_retry_ms: 1_000,
            expiry_check_ms: 1_000,
        }
    }
}

/// Batch settings of the engine.
#[derive(Clone)]
pub struct BatchConfig {
    /// Attempts.
    pub exec: ExecConfig,
    /// Unit prices.
    pub prices: PriceTable,
    /// Template bounds.
    pub template_limits: TemplateLimits,
    /// Providers with their concurrency limits.
    pub providers: Registry,
    /// Video store URL (`""`: `D/videos`).
    pub store_url: String,
    /// Sync each stored file and its directory before the item is recorded succeeded.
    pub store_fsync: bool,
    /// `expires_in` when none is given (SPEC §3: 24 h).
    pub expires_in_s_default: u64,
    /// Largest `expires_in` accepted.
    pub expires_in_s_max: u64,
    /// Prompts shown in a quote.
    pub sample_prompts: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            exec: ExecConfig::default(),
            prices: PriceTable::default(),
            template_limits: TemplateLimits::default(),
            providers: Registry::simulated(Default::default(), 1_000),
            store_url: String::new(),
            store_fsync: true,
            expires_in_s_default: 24 * 3600,
            expires_in_s_max: 30 * 24 * 3600,
            sample_prompts: 5,
        }
    }
}

/// What a tenant's plan allows a batch (the HTTP layer maps the plan onto it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanLimits {
    /// Items in one batch.
    pub max_items_per_batch: u64,
    /// Attempts in flight for the tenant.
    pub concurrency: u32,
    /// Downloads must be watermarked (make the watermarked rendition).
    pub watermark: bool,
    /// Items the tenant may create per UTC day (`u64::MAX`: no cap).
    pub items_per_day: u64,
}

/// A batch creation or quote request (SPEC §11 body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRequest {
    /// The template.
    pub template: String,
    /// name → values.
    pub variables: Vec<(String, Vec<String>)>,
    /// Generation parameters.
    pub params: Params,
    /// Client's request id: a repeat returns the same batch.
    pub request_id: Option<String>,
    /// Seconds until items not started fail `batch.expired`.
    pub expires_in_s: Option<u64>,
    /// The API key making the request.
    pub api_key: Option<KeyId>,
    /// That key's cap on credits held per UTC day.
    pub key_daily_credit_limit: Option<u64>,
}

/// A quote (SPEC §11 `POST /v1/batches/quote`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    /// Items.
    pub items: u64,
    /// Credits per item.
    pub unit_price: u64,
    /// Credits for the batch.
    pub total: u64,
    /// The first prompts.
    pub sample_prompts: Vec<String>,
}

/// Why a batch operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// The template is malformed or too large.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// A parameter the price table does not offer.
    #[error(transparent)]
    Price(#[from] PriceError),
    /// Another invalid field.
    #[error("{0}")]
    Invalid(String),
    /// The pre-check failed: nothing was held and the batch does not exist.
    #[error("insufficient credits: {available} available, {needed} needed")]
    InsufficientCredits { available: u64, needed: u64 },
    /// No such batch for this tenant (or no wallet).
    #[error("not found")]
    NotFound,
    /// The request id was used with a different request.
    #[error("request id {0:?} was already used with a different request")]
    KeyReused(String),
    /// `retry-failed` on a batch without failed items.
    #[error("the batch has no failed items to retry")]
    NothingToRetry,
    /// The tenant's items per UTC day would be exceeded.
    #[error("the plan allows {limit} items per day; {used} were created today")]
    DailyItems {
        limit: u64,
        used: u64,
        retry_after_s: u64,
    },
    /// The key's credits per UTC day would be exceeded.
    #[error("the key may commit {limit} credits per day; {used} were committed today")]
    KeySpend {
        limit: u64,
        used: u64,
        retry_after_s: u64,
    },
    /// The log refused a write: nothing was acknowledged.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl BatchError {
    /// The stable code clients see (SPEC §11).
    pub fn code(&self) -> &'static str {
        match self {
            BatchError::Template(t) => t.code(),
            BatchError::Price(_) | BatchError::Invalid(_) | BatchError::NothingToRetry => {
                "invalid_request"
            }
            BatchError::InsufficientCredits { .. } => "insufficient_credits",
            BatchError::DailyItems { .. } => "plan_limit_exceeded",
            BatchError::KeySpend { .. } => "key_spend_limit_exceeded",
            BatchError::NotFound => "not_found",
            BatchError::KeyReused(_) => "idempotency_key_reused",
            BatchError::Unavailable(_) => "unavailable",
        }
    }
}

/// A batch as clients read it (SPEC §11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchView {
    pub id: BatchId,
    pub tenant: TenantId,
    pub status: BatchStatus,
    /// Credits per item.
    pub unit_price: u64,
    /// Credits held at creation (`counts.total × unit_price`).
    pub total: u64,
    pub counts: Counts,
    /// Credits held for the batch at creation (= `total`).
    pub held: u64,
    /// Credits settled (succeeded items).
    pub settled: u64,
    /// Credits released (failed, expired and canceled items).
    pub released: u64,
    /// Credits still held (`held - settled - released`).
    pub remaining: u64,
    pub cancel_requested: bool,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    pub template: String,
    pub params: Params,
    pub provider: String,
    pub request_id: Option<String>,
    pub retry_of: Option<BatchId>,
}

impl BatchView {
    pub(crate) fn of(s: &BatchState, counts: Counts, settled: u64, released: u64) -> Self {
        let (settled, released, finished_at_ms) = match s.phase {
            Phase::Finished {
                settled,
                released,
                at_ms,
                ..
            } => (settled, released, Some(at_ms)),
            _ => (settled, released, None),
        };
        let held = s.spec.total();
        BatchView {
            id: s.id,
            tenant: s.tenant,
            status: s.status(),
            unit_price: s.spec.unit_price,
            total: held,
            counts,
            held,
            settled,
            released,
            remaining: held - settled - released,
            cancel_requested: s.cancel_requested,
            created_at_ms: s.created_at_ms,
            expires_at_ms: s.spec.expires_at_ms,
            finished_at_ms,
            template: s.spec.template.clone(),
            params: s.spec.params.clone(),
            provider: s.spec.provider.clone(),
            request_id: s.spec.request_id.clone(),
            retry_of: s.spec.retry_of,
        }
    }
}

/// A stored video (SPEC §7 metadata).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VideoInfo {
    pub id: VideoId,
    pub tenant: TenantId,
    pub batch: BatchId,
    pub item_id: String,
    pub index: u32,
    pub prompt: String,
    pub content_type: String,
    /// Size of the clean rendition.
    pub bytes: u64,
    /// Size of the watermarked rendition, when one was made.
    pub watermarked_bytes: Option<u64>,
    pub created_at_ms: u64,
}

/// An item as clients read it (SPEC §11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemView {
    /// `itm_…`.
    pub id: String,
    /// 0-based.
    pub index: u32,
    pub prompt: String,
    pub status: ItemStatus,
    /// For failed items (and the last transient failure of a pending one).
    pub failure: Option<Failure>,
    pub attempts: u32,
    /// For succeeded items.
    pub output: Option<StoredOutput>,
}

impl ItemView {
    pub(crate) fn page(
        s: &BatchState,
        expansion: &Expansion,
        from: u32,
        limit: u32,
        in_flight: impl Fn(u32) -> bool,
    ) -> Vec<ItemView> {
        let end = (from as u64 + limit as u64).min(s.items.len() as u64) as u32;
        (from.min(end)..end)
            .map(|i| {
                let it = &s.items[i as usize];
                let status = match it.status {
                    ItemStatus::Pending if in_flight(i) => ItemStatus::Running,
                    st => st,
                };
                ItemView {
                    id: crate::ids::item_id(s.id, i),
                    index: i,
                    prompt: expansion.prompt(s.spec.prompt_index(i)),
                    status,
                    failure: it.failure.as_deref().cloned(),
                    attempts: it.attempts,
                    output: it.output.as_deref().cloned(),
                }
            })
            .collect()
    }
}

/// Shared by every batch actor.
pub(crate) struct BatchCtx {
    pub wal: wal::Wal,
    pub events_appended: Arc<AtomicU64>,
    pub clock: Arc<dyn Clock>,
    pub scheduler: Arc<Scheduler>,
    pub providers: Registry,
    pub store: VideoStore,
    /// The worker runtime attempts run on.
    pub workers: tokio::runtime::Handle,
    pub cfg: ExecConfig,
    pub dir: Arc<Directory>,
    /// Refusals by the wallet that should be impossible (reconciliation reports them).
    pub anomalies: AtomicU64,
    /// Attempt outcomes per provider (metrics).
    pub provider_stats: Arc<attempt::ProviderStats>,
    /// Where batch events go as webhooks.
    pub outbox: Arc<crate::webhooks::Outbox>,
    /// Finished batches moved out of memory.
    pub archive: Arc<archive::BatchArchive>,
    /// Where archived batches, their request ids and their videos are.
    pub index: Arc<index::ArchiveIndex>,
    /// Set when the index failed after the archive took records: the two disagree until
    /// a restart brings the index up to the archive, so nothing more is archived (finished
    /// batches stay in memory, correct but growing).
    pub archiving_stopped: std::sync::atomic::AtomicBool,
    /// The last few large archived batches read, newest first: a client paging through a
    /// 10,000-item batch would otherwise read and decode the whole record for every page.
    /// At most `RECENT_LARGE_MAX` entries, each at most a plan's item cap.
    pub recent_large: std::sync::Mutex<std::collections::VecDeque<FinishedCopy>>,
}

/// Where a batch is, as `locate` found it.
enum Located {
    /// Running: its actor answers.
    Live(Addr<BatchActor>),
    /// Finished: in memory (`None`) or in the archive, here.
    Finished(Option<archive::ArchiveRef>),
}

/// A finished batch's state and prompts, shared.
pub(crate) type FinishedCopy = (Arc<BatchState>, Arc<Expansion>);

/// Archived batches with at least this many items are kept in `recent_large` once read.
const RECENT_LARGE_ITEMS_MIN: usize = 256;
/// How many large archived batches stay decoded.
const RECENT_LARGE_MAX: usize = 4;
/// Archived records up to this size are read on the calling thread.
const INLINE_READ_BYTES_MAX: u32 = 64 * 1024;

/// A finished batch not archived yet: its final state and prompts. A snapshot moves it to
/// the archive and its index, and drops it from memory.
pub(crate) struct Finished {
    /// The final state.
    pub state: Arc<BatchState>,
    /// Its prompts (reads of items need them).
    pub expansion: Arc<Expansion>,
}

#[derive(Default)]
pub(crate) struct DirState {
    /// Live actors.
    pub active: HashMap<BatchId, (TenantId, Addr<BatchActor>)>,
    /// Finished batches not archived yet.
    pub finished: HashMap<BatchId, Finished>,
    /// Items by state over `finished` (metrics without reading the archive).
    pub finished_counts: Counts,
    /// Archived batches and their items by state (the index's totals, moved under this
    /// lock at the moment batches leave `finished`, so metrics never count one twice).
    pub archived: index::Totals,
    /// Bumped each time batches leave memory for the index: a creation that looked up its
    /// request id in the index before taking the lock looks again if this moved.
    pub archived_generation: u64,
    /// Every batch not archived, by tenant, in id (= creation time) order: listing.
    pub by_tenant: BTreeSet<(TenantId, BatchId)>,
    /// (tenant, request id) → (batch, request fingerprint), for batches not archived.
    pub requests: HashMap<(TenantId, String), (BatchId, [u8; 32])>,
    /// (tenant, UTC day) → items created that day (daily item caps). Derived from the
    /// batches, so it is rebuilt by recovery; days before yesterday are pruned.
    pub day_items: HashMap<(TenantId, u64), u64>,
    /// (key, UTC day) → credits held by batches the key created that day.
    pub day_key_credits: HashMap<(KeyId, u64), u64>,
    /// The newest day counters were pruned for.
    pub pruned_day: u64,
    /// Every stored video of a batch not archived → (owner, batch, item):
    /// `/v1/videos/{id}`, links and embeds resolve through it (then through the index).
    /// Derived from the batches (rebuilt by recovery).
    pub videos: HashMap<VideoId, (TenantId, BatchId, u32)>,
}

/// Milliseconds per UTC day.
pub const DAY_MS: u64 = 86_400_000;

/// Daily limits that apply to one creation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DailyCaps {
    items_per_day: u64,
    key_credits_per_day: Option<u64>,
}

fn caps(req: &BatchRequest, plan: &PlanLimits) -> DailyCaps {
    DailyCaps {
        items_per_day: plan.items_per_day,
        key_credits_per_day: req.key_daily_credit_limit,
    }
}

impl DailyCaps {
    /// Refuses a creation that would pass a daily cap (checked under the directory lock,
    /// so two concurrent creations cannot both slip under it).
    fn check(
        &self,
        d: &DirState,
        tenant: TenantId,
        spec: &BatchSpec,
        now_ms: u64,
    ) -> Result<(), BatchError> {
        let day = now_ms / DAY_MS;
        let retry_after_s = ((day + 1) * DAY_MS - now_ms).div_ceil(1000);
        let used = d.day_items.get(&(tenant, day)).copied().unwrap_or(0);
        if used.saturating_add(spec.items as u64) > self.items_per_day {
            return Err(BatchError::DailyItems {
                limit: self.items_per_day,
                used,
                retry_after_s,
            });
        }
        if let (Some(key), Some(limit)) = (spec.api_key, self.key_credits_per_day) {
            let used = d.day_key_credits.get(&(key, day)).copied().unwrap_or(0);
            if used.saturating_add(spec.total()) > limit {
                return Err(BatchError::KeySpend {
                    limit,
                    used,
                    retry_after_s,
                });
            }
        }
        Ok(())
    }
}

/// Batch id → actor or finished state.
#[derive(Default)]
pub(crate) struct Directory {
    pub map: RwLock<DirState>,
}

impl Directory {
    pub(crate) fn finish(&self, state: BatchState, expansion: Arc<Expansion>) {
        let mut d = self.map.write().expect("not poisoned");
        d.active.remove(&state.id);
        add_counts(&mut d.finished_counts, &state.counts);
        let previous = d.finished.insert(
            state.id,
            Finished {
                state: Arc::new(state),
                expansion,
            },
        );
        assert!(previous.is_none(), "a batch finishes once");
    }

    pub(crate) fn remove_rejected(&self, state: &BatchState) {
        let mut d = self.map.write().expect("not poisoned");
        d.active.remove(&state.id);
        d.by_tenant.remove(&(state.tenant, state.id));
        if let Some(r) = &state.spec.request_id {
            d.requests.remove(&(state.tenant, r.clone()));
        }
        // A rejected batch held nothing: it does not count against the day.
        let day = state.created_at_ms / DAY_MS;
        if let Some(n) = d.day_items.get_mut(&(state.tenant, day)) {
            *n = n.saturating_sub(state.spec.items as u64);
        }
        if let Some(k) = state.spec.api_key {
            if let Some(c) = d.day_key_credits.get_mut(&(k, day)) {
                *c = c.saturating_sub(state.spec.total());
            }
        }
    }

    fn insert(&self, d: &mut DirState, state: &BatchState) {
        let day = state.created_at_ms / DAY_MS;
        let items = d.day_items.entry((state.tenant, day)).or_insert(0);
        *items = items.saturating_add(state.spec.items as u64);
        if let Some(k) = state.spec.api_key {
            let c = d.day_key_credits.entry((k, day)).or_insert(0);
            *c = c.saturating_add(state.spec.total());
        }
        // Bounded: when the first batch of a new day arrives, counters older than
        // yesterday go (once per day, so the sweep costs nothing per creation).
        if day > d.pruned_day {
            d.pruned_day = day;
            d.day_items.retain(|(_, dd), _| *dd + 1 >= day);
            d.day_key_credits.retain(|(_, dd), _| *dd + 1 >= day);
        }
        d.by_tenant.insert((state.tenant, state.id));
        for (i, item) in state.items.iter().enumerate() {
            if let Some(o) = &item.output {
                d.videos.insert(o.video, (state.tenant, state.id, i as u32));
            }
        }
        if let Some(r) = &state.spec.request_id {
            d.requests.insert(
                (state.tenant, r.clone()),
                (state.id, state.spec.fingerprint),
            );
        }
    }
}

/// An index or archive failure seen by a request: the batch cannot be read now.
fn unavailable(e: archive::ArchiveError) -> BatchError {
    BatchError::Unavailable(e.to_string())
}

/// Takes an archived batch's items out of the in-memory finished counts.
fn sub_counts(c: &mut Counts, x: &Counts) {
    c.total -= x.total;
    c.pending -= x.pending;
    c.running -= x.running;
    c.succeeded -= x.succeeded;
    c.failed -= x.failed;
    c.canceled -= x.canceled;
}

fn add_counts(c: &mut Counts, x: &Counts) {
    c.total += x.total;
    c.pending += x.pending;
    c.running += x.running;
    c.succeeded += x.succeeded;
    c.failed += x.failed;
    c.canceled += x.canceled;
}

/// Expansion of a recorded spec (validated when it was created; today's limits do not apply).
pub(crate) fn expansion_of(spec: &BatchSpec) -> Expansion {
    let unbounded = TemplateLimits {
        template_chars_max: usize::MAX - 1,
        variables_max: usize::MAX,
        values_per_variable_max: usize::MAX,
        value_chars_max: usize::MAX,
        prompt_chars_max: usize::MAX,
    };
    Expansion::new(&spec.template, &spec.variables, &unbounded, u64::MAX)
        .expect("a recorded template parses")
}

fn fingerprint(req: &BatchRequest, retry_of: Option<BatchId>) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut field = |b: &[u8]| {
        h.update((b.len() as u64).to_be_bytes());
        h.update(b);
    };
    field(req.template.as_bytes());
    let mut vars: Vec<&(String, Vec<String>)> = req.variables.iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (n, vs) in vars {
        field(n.as_bytes());
        field(&(vs.len() as u64).to_be_bytes());
        for v in vs {
            field(v.as_bytes());
        }
    }
    field(req.params.model.as_bytes());
    field(&req.params.duration_seconds.to_be_bytes());
    field(req.params.resolution.as_bytes());
    field(req.params.aspect_ratio.as_bytes());
    field(&req.expires_in_s.map_or([0xFF; 8], |s| s.to_be_bytes()));
    field(&retry_of.map_or([0xFF; 16], |b| b.0.to_be_bytes()));
    h.finalize().into()
}

/// Longest client request id.
pub const REQUEST_ID_CHARS_MAX: usize = 255;

impl Engine {
    pub(crate) fn batch_ctx(&self) -> &Arc<BatchCtx> {
        self.inner.batches.get().expect("set at open")
    }

    /// The template expanded under the plan's limit, the price, and the checked total:
    /// what a quote shows and a creation holds.
    fn validate(
        &self,
        req: &BatchRequest,
        plan: &PlanLimits,
    ) -> Result<(Expansion, pricing::Priced, u64), BatchError> {
        let cfg = &self.inner.cfg.batch;
        let expansion = Expansion::new(
            &req.template,
            &req.variables,
            &cfg.template_limits,
            plan.max_items_per_batch,
        )?;
        let priced = cfg.prices.price(&req.params)?;
        let total = expansion
            .count()
            .checked_mul(priced.unit_price)
            .ok_or_else(|| BatchError::Invalid("the total is out of range".into()))?;
        Ok((expansion, priced, total))
    }

    /// Validates and prices a request without holding anything.
    pub fn quote(&self, req: &BatchRequest, plan: &PlanLimits) -> Result<Quote, BatchError> {
        let (expansion, priced, total) = self.validate(req, plan)?;
        Ok(Quote {
            items: expansion.count(),
            unit_price: priced.unit_price,
            total,
            sample_prompts: expansion.samples(self.inner.cfg.batch.sample_prompts),
        })
    }

    /// Creates a batch: quote, hold (all or nothing: 402 otherwise), then items run.
    /// Returns once the hold and the batch are durable. A repeat of `request_id` returns
    /// the same batch; the same id with a different request is `KeyReused`.
    pub async fn create_batch(
        &self,
        tenant: TenantId,
        req: &BatchRequest,
        plan: &PlanLimits,
    ) -> Result<BatchView, BatchError> {
        let (expansion, priced, _) = self.validate(req, plan)?;
        let items = u32::try_from(expansion.count())
            .map_err(|_| BatchError::Invalid("too many items for one batch".into()))?;
        let spec = self.new_spec(req, plan, &priced, items, Vec::new(), None, &expansion)?;
        self.start_batch(tenant, spec, expansion, caps(req, plan))
            .await
    }

    #[allow(clippy::too_many_arguments)]
    fn new_spec(
        &self,
        req: &BatchRequest,
        plan: &PlanLimits,
        priced: &pricing::Priced,
        items: u32,
        prompt_indices: Vec<u64>,
        retry_of: Option<BatchId>,
        expansion: &Expansion,
    ) -> Result<BatchSpec, BatchError> {
        let cfg = &self.inner.cfg.batch;
        if let Some(r) = &req.request_id {
            if r.is_empty() || r.chars().count() > REQUEST_ID_CHARS_MAX {
                return Err(BatchError::Invalid(format!(
                    "request_id must be 1..={REQUEST_ID_CHARS_MAX} characters"
                )));
            }
        }
        let expires_in = req.expires_in_s.unwrap_or(cfg.expires_in_s_default);
        if expires_in == 0 || expires_in > cfg.expires_in_s_max {
            return Err(BatchError::Invalid(format!(
                "expires_in must be 1..={} seconds",
                cfg.expires_in_s_max
            )));
        }
        if cfg.providers.get(&priced.provider).is_none() {
            return Err(BatchError::Invalid(format!(
                "model {:?} runs on provider {:?}, which is not configured",
                req.params.model, priced.provider
            )));
        }
        (items as u64)
            .checked_mul(priced.unit_price)
            .ok_or_else(|| BatchError::Invalid("the total is out of range".into()))?;
        Ok(BatchSpec {
            request_id: req.request_id.clone(),
            fingerprint: fingerprint(req, retry_of),
            template: req.template.clone(),
            variables: expansion.variables().to_vec(),
            params: req.params.clone(),
            provider: priced.provider.clone(),
            provider_model: priced.provider_model.clone(),
            unit_price: priced.unit_price,
            items,
            prompt_indices,
            retry_of,
            watermark: plan.watermark,
            tenant_concurrency: plan.concurrency.max(1),
            api_key: req.api_key,
            expires_at_ms: self
                .now_ms()
                .saturating_add(expires_in.saturating_mul(1000)),
        })
    }

    async fn start_batch(
        &self,
        tenant: TenantId,
        spec: BatchSpec,
        expansion: Expansion,
        caps: DailyCaps,
    ) -> Result<BatchView, BatchError> {
        let wallet = self.addr(tenant).map_err(|_| BatchError::NotFound)?;
        let ctx = Arc::clone(self.batch_ctx());
        // An archived batch of the same request id is looked up before the lock (a disk
        // read must not hold it); the generation tells whether batches left memory for
        // the index meanwhile, in which case the lookup is repeated under the lock.
        let archived_request = match &spec.request_id {
            Some(r) => {
                let generation = ctx
                    .dir
                    .map
                    .read()
                    .expect("not poisoned")
                    .archived_generation;
                let found = ctx.index.request(tenant, r).map_err(unavailable)?;
                Some((generation, found))
            }
            None => None,
        };
        // Under the directory lock: find a batch of the same request id, or log and
        // register a new one (the lock makes the check and the insert one step).
        let started = {
            let mut d = ctx.dir.map.write().expect("not poisoned");
            let mut existing = spec
                .request_id
                .as_ref()
                .and_then(|r| d.requests.get(&(tenant, r.clone())).copied());
            if let (None, Some(r), Some((generation, found))) =
                (existing, &spec.request_id, archived_request)
            {
                existing = if generation == d.archived_generation {
                    found
                } else {
                    ctx.index.request(tenant, r).map_err(unavailable)?
                };
            }
            match existing {
                Some((id, fp)) => Err((id, fp)),
                None => {
                    let now = self.now_ms();
                    caps.check(&d, tenant, &spec, now)?;
                    let id = BatchId::generate(now);
                    let event = BatchEvent::Created {
                        tenant,
                        spec: Box::new(spec.clone()),
                        at_ms: now,
                    };
                    let record = Record::Batch { batch: id, event };
                    let durable = journal::append(&self.inner.wal, &record)
                        .map_err(|e| BatchError::Unavailable(e.to_string()))?;
                    self.inner.events_appended.fetch_add(1, Ordering::Relaxed);
                    let state = BatchState::created(id, tenant, spec.clone(), now, durable.lsn());
                    ctx.dir.insert(&mut d, &state);
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let addr =
                        self.start_batch_actor(state, wallet, Arc::new(expansion), None, Some(tx));
                    d.active.insert(id, (tenant, addr));
                    Ok((id, rx))
                }
            }
        };
        let (id, accepted) = match started {
            Ok(x) => x,
            Err((id, fp)) => {
                if fp != spec.fingerprint {
                    return Err(BatchError::KeyReused(
                        spec.request_id.clone().unwrap_or_default(),
                    ));
                }
                return self.await_accepted(tenant, id).await;
            }
        };
        accepted
            .await
            .map_err(|_| BatchError::Unavailable("the batch stopped".into()))??;
        self.batch(tenant, id).await
    }

    async fn await_accepted(&self, tenant: TenantId, id: BatchId) -> Result<BatchView, BatchError> {
        let addr = self.batch_addr(tenant, id)?;
        if let Some(addr) = addr {
            if let Ok(rx) = addr.send(AwaitAccepted).await {
                rx.await
                    .map_err(|_| BatchError::Unavailable("the batch stopped".into()))??;
            }
        }
        self.batch(tenant, id).await
    }

    pub(crate) fn start_batch_actor(
        &self,
        state: BatchState,
        wallet: Addr<crate::engine::wallet::actor::WalletActor>,
        expansion: Arc<Expansion>,
        hold: Option<&Hold>,
        accept_waiter: Option<tokio::sync::oneshot::Sender<Result<(), BatchError>>>,
    ) -> Addr<BatchActor> {
        let inner = &self.inner;
        let idx = (state.id.0 % inner.arbiters.len() as u128) as usize;
        let actor = BatchActor::new(
            state,
            Arc::clone(self.batch_ctx()),
            wallet,
            expansion,
            hold,
            accept_waiter,
        );
        let capacity = inner.cfg.mailbox_capacity;
        BatchActor::start_in_arbiter(&inner.arbiters[idx], move |ctx| {
            ctx.set_mailbox_capacity(capacity);
            actor
        })
    }

    /// The live actor of the tenant's batch (`None`: finished).
    fn batch_addr(
        &self,
        tenant: TenantId,
        id: BatchId,
    ) -> Result<Option<Addr<BatchActor>>, BatchError> {
        Ok(match self.locate(tenant, id)? {
            Located::Live(a) => Some(a),
            Located::Finished(_) => None,
        })
    }

    /// Where the tenant's batch is; another tenant's is `NotFound`.
    fn locate(&self, tenant: TenantId, id: BatchId) -> Result<Located, BatchError> {
        let d = self.batch_ctx().dir.map.read().expect("not poisoned");
        if let Some((t, a)) = d.active.get(&id) {
            return if *t == tenant {
                Ok(Located::Live(a.clone()))
            } else {
                Err(BatchError::NotFound)
            };
        }
        match d.finished.get(&id) {
            Some(f) if f.state.tenant == tenant => Ok(Located::Finished(None)),
            Some(_) => Err(BatchError::NotFound),
            None => {
                drop(d);
                match self.batch_ctx().index.batch(id).map_err(unavailable)? {
                    Some(i) if i.tenant == tenant => Ok(Located::Finished(Some(i.at))),
                    _ => Err(BatchError::NotFound),
                }
            }
        }
    }

    /// A finished batch's state, its prompts when known without work, and whether it came
    /// from the archive. Small records are read in place (a page-cache read of a few KiB
    /// costs less than a hand-off to the blocking pool, which a soak showed adding latency
    /// to every read); larger ones on the blocking pool. The caller checked the owner.
    /// `archived`: where the record is, when the caller already looked it up (an archived
    /// batch stays where it is).
    async fn finished_state(
        &self,
        id: BatchId,
        archived: Option<archive::ArchiveRef>,
    ) -> Result<(Arc<BatchState>, Option<Arc<Expansion>>, bool), BatchError> {
        let ctx = Arc::clone(self.batch_ctx());
        let at = match archived {
            Some(at) => at,
            None => {
                {
                    let d = ctx.dir.map.read().expect("not poisoned");
                    if let Some(f) = d.finished.get(&id) {
                        let e = Some(Arc::clone(&f.expansion));
                        return Ok((Arc::clone(&f.state), e, false));
                    }
                }
                // Not in memory: a snapshot archived it (the index commits before memory
                // lets go).
                ctx.index
                    .batch(id)
                    .map_err(unavailable)?
                    .ok_or(BatchError::NotFound)?
                    .at
            }
        };
        {
            let mut recent = ctx.recent_large.lock().expect("not poisoned");
            if let Some(i) = recent.iter().position(|(s, _)| s.id == id) {
                let hit = recent.remove(i).expect("found");
                recent.push_front(hit.clone());
                return Ok((hit.0, Some(hit.1), true));
            }
        }
        let state = if at.len <= INLINE_READ_BYTES_MAX {
            ctx.archive.read(at)
        } else {
            let reader = Arc::clone(&ctx);
            tokio::task::spawn_blocking(move || reader.archive.read(at))
                .await
                .map_err(|e| BatchError::Unavailable(e.to_string()))?
        }
        .map_err(|e| BatchError::Unavailable(e.to_string()))?;
        assert_eq!(state.id, id, "the archive reference points at its batch");
        let state = Arc::new(state);
        if state.items.len() < RECENT_LARGE_ITEMS_MIN {
            // Prompts are made only if an items page asks for them.
            return Ok((state, None, true));
        }
        let expansion = Arc::new(expansion_of(&state.spec));
        {
            let mut recent = ctx.recent_large.lock().expect("not poisoned");
            if !recent.iter().any(|(s, _)| s.id == id) {
                recent.push_front((Arc::clone(&state), Arc::clone(&expansion)));
                recent.truncate(RECENT_LARGE_MAX);
            }
        }
        Ok((state, Some(expansion), true))
    }

    async fn wait_acked(&self, lsn: u64) -> Result<(), BatchError> {
        if self.inner.wal.acked_lsn() < lsn {
            self.inner
                .wal
                .wait_acked(lsn)
                .await
                .map_err(|e| BatchError::Unavailable(e.to_string()))?;
        }
        Ok(())
    }

    async fn read_batch(
        &self,
        tenant: TenantId,
        id: BatchId,
        read: impl Fn() -> Read,
    ) -> Result<ReadAnswer, BatchError> {
        // At most two tries: an actor that finishes between the lookup and the read has
        // moved its state to the finished map.
        for _ in 0..2 {
            match self.locate(tenant, id)? {
                Located::Live(addr) => {
                    if let Ok((answer, lsn)) = addr.send(read()).await {
                        self.wait_acked(lsn).await?;
                        return Ok(answer);
                    }
                }
                Located::Finished(place) => {
                    let (s, exp, archived) = self.finished_state(id, place).await?;
                    // An archived state was acknowledged before it was written there.
                    if !archived {
                        self.wait_acked(s.last_lsn).await?;
                    }
                    return Ok(match read() {
                        Read::View => ReadAnswer::View(Box::new(BatchView::of(&s, s.counts, 0, 0))),
                        Read::Items { from, limit } => {
                            let exp = exp.unwrap_or_else(|| Arc::new(expansion_of(&s.spec)));
                            ReadAnswer::Items(ItemView::page(&s, &exp, from, limit, |_| false))
                        }
                        Read::Capture => ReadAnswer::Capture(Box::new((*s).clone())),
                    });
                }
            }
        }
        Err(BatchError::Unavailable("the batch moved twice".into()))
    }

    /// The tenant's batch.
    pub async fn batch(&self, tenant: TenantId, id: BatchId) -> Result<BatchView, BatchError> {
        match self.read_batch(tenant, id, || Read::View).await? {
            ReadAnswer::View(v) => Ok(*v),
            _ => unreachable!("answer matches the read"),
        }
    }

    /// Items with index ≥ `from`, at most `limit`.
    pub async fn batch_items(
        &self,
        tenant: TenantId,
        id: BatchId,
        from: u32,
        limit: u32,
    ) -> Result<Vec<ItemView>, BatchError> {
        match self
            .read_batch(tenant, id, || Read::Items { from, limit })
            .await?
        {
            ReadAnswer::Items(v) => Ok(v),
            _ => unreachable!("answer matches the read"),
        }
    }

    /// A stored video: its owner, where it came from, its renditions. `tenant: None`
    /// (links and embeds, which carry no key) finds any tenant's; otherwise another
    /// tenant's video is `NotFound`.
    pub async fn video(
        &self,
        tenant: Option<TenantId>,
        id: VideoId,
    ) -> Result<VideoInfo, BatchError> {
        let ctx = self.batch_ctx();
        let in_memory = ctx
            .dir
            .map
            .read()
            .expect("not poisoned")
            .videos
            .get(&id)
            .copied();
        let found = match in_memory {
            Some(f) => Some(f),
            None => ctx.index.video(id).map_err(unavailable)?,
        };
        let (owner, batch, item) = found
            .filter(|(owner, ..)| tenant.is_none_or(|t| t == *owner))
            .ok_or(BatchError::NotFound)?;
        let view = self
            .batch_items(owner, batch, item, 1)
            .await?
            .pop()
            .ok_or(BatchError::NotFound)?;
        let output = view
            .output
            .filter(|o| o.video == id)
            .ok_or(BatchError::NotFound)?;
        Ok(VideoInfo {
            id,
            tenant: owner,
            batch,
            item_id: view.id,
            index: view.index,
            prompt: view.prompt,
            content_type: output.content_type,
            bytes: output.bytes,
            watermarked_bytes: output.watermarked_bytes,
            // Video ids carry their creation time in the high 48 bits.
            created_at_ms: (id.0 >> 80) as u64,
        })
    }

    /// A copy of a batch's whole state (tests, reconciliation).
    pub async fn batch_state(
        &self,
        tenant: TenantId,
        id: BatchId,
    ) -> Result<BatchState, BatchError> {
        match self.read_batch(tenant, id, || Read::Capture).await? {
            ReadAnswer::Capture(s) => Ok(*s),
            _ => unreachable!("answer matches the read"),
        }
    }

    /// The tenant's batches with id > `after`, oldest first, at most `limit`.
    pub async fn list_batches(
        &self,
        tenant: TenantId,
        after: Option<BatchId>,
        limit: usize,
    ) -> Result<Vec<BatchView>, BatchError> {
        let ctx = self.batch_ctx();
        // Memory first, then the index: a batch leaves memory only after the index has it,
        // so it is in at least one of the two (both for a moment: kept once).
        let mut ids: Vec<BatchId> = {
            let d = ctx.dir.map.read().expect("not poisoned");
            let from = (
                tenant,
                after.map_or(BatchId(0), |a| BatchId(a.0.saturating_add(1))),
            );
            d.by_tenant
                .range(from..)
                .take_while(|(t, _)| *t == tenant)
                .filter(|(_, b)| after.is_none_or(|a| *b > a))
                .take(limit)
                .map(|(_, b)| *b)
                .collect()
        };
        ids.extend(ctx.index.list(tenant, after, limit).map_err(unavailable)?);
        ids.sort_unstable();
        ids.dedup();
        ids.truncate(limit);
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match self.batch(tenant, id).await {
                Ok(v) => out.push(v),
                Err(BatchError::NotFound) => {} // rejected meanwhile
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Cancels: pending items are canceled and released now; running items finish and are
    /// charged only if they succeed. Canceling a finished batch changes nothing.
    pub async fn cancel_batch(
        &self,
        tenant: TenantId,
        id: BatchId,
    ) -> Result<BatchView, BatchError> {
        if let Some(addr) = self.batch_addr(tenant, id)? {
            if let Ok(res) = addr.send(Cancel).await {
                let (view, durable) = res?;
                if let Some(d) = durable {
                    d.await
                        .map_err(|e| BatchError::Unavailable(e.to_string()))?;
                }
                return Ok(view);
            }
        }
        self.batch(tenant, id).await
    }

    /// A new batch of the failed items of `id` (new hold, today's price).
    pub async fn retry_failed(
        &self,
        tenant: TenantId,
        id: BatchId,
        request_id: Option<String>,
        plan: &PlanLimits,
        api_key: Option<KeyId>,
        key_daily_credit_limit: Option<u64>,
    ) -> Result<BatchView, BatchError> {
        let source = self.batch_state(tenant, id).await?;
        let failed: Vec<u64> = source
            .items
            .iter()
            .enumerate()
            .filter(|(_, it)| it.status == ItemStatus::Failed)
            .map(|(i, _)| source.spec.prompt_index(i as u32))
            .collect();
        if failed.is_empty() {
            return Err(BatchError::NothingToRetry);
        }
        if failed.len() as u64 > plan.max_items_per_batch {
            return Err(TemplateError::TooManyItems {
                count: Some(failed.len() as u64),
                limit: plan.max_items_per_batch,
            }
            .into());
        }
        let req = BatchRequest {
            template: source.spec.template.clone(),
            variables: source.spec.variables.clone(),
            params: source.spec.params.clone(),
            request_id,
            expires_in_s: None,
            api_key,
            key_daily_credit_limit,
        };
        let priced = self.inner.cfg.batch.prices.price(&req.params)?;
        let expansion = expansion_of(&source.spec);
        let items = failed.len() as u32;
        let spec = self.new_spec(&req, plan, &priced, items, failed, Some(id), &expansion)?;
        self.start_batch(tenant, spec, expansion, caps(&req, plan))
            .await
    }

    /// Attempt outcomes per provider: (provider, outcome, attempts, total latency µs).
    pub fn provider_stats(&self) -> Vec<(String, &'static str, u64, u64)> {
        self.batch_ctx().provider_stats.snapshot()
    }

    /// Items by state over every batch (active ones read from their actors).
    pub async fn item_counts(&self) -> Result<Counts, BatchError> {
        let (mut c, addrs) = {
            let d = self.batch_ctx().dir.map.read().expect("not poisoned");
            let mut c = d.finished_counts;
            add_counts(&mut c, &d.archived.counts());
            let addrs: Vec<Addr<BatchActor>> = d.active.values().map(|(_, a)| a.clone()).collect();
            (c, addrs)
        };
        for chunk in addrs.chunks(1024) {
            let pending: Vec<_> = chunk.iter().map(|a| a.send(Read::View)).collect();
            for p in pending {
                if let Ok((ReadAnswer::View(v), _)) = p.await {
                    add_counts(&mut c, &v.counts);
                }
            }
        }
        Ok(c)
    }

    /// Every batch id known now (active and finished).
    pub(crate) fn batch_ids(&self) -> Result<Vec<BatchId>, BatchError> {
        let ctx = self.batch_ctx();
        let mut ids: Vec<BatchId> = {
            let d = ctx.dir.map.read().expect("not poisoned");
            d.by_tenant.iter().map(|(_, b)| *b).collect()
        };
        ids.extend(
            ctx.index
                .all()
                .map_err(unavailable)?
                .into_iter()
                .map(|(b, _)| b),
        );
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    /// Waits until the batch is finished (tests, the demo, `submit --wait`).
    pub async fn wait_batch(&self, tenant: TenantId, id: BatchId) -> Result<BatchView, BatchError> {
        if let Some(addr) = self.batch_addr(tenant, id)? {
            if let Ok(rx) = addr.send(AwaitFinished).await {
                let _ = rx.await;
            }
        }
        self.batch(tenant, id).await
    }

    /// Every batch's state (reconciliation, tests), by id: archived ones are read back.
    pub async fn capture_batches(&self) -> Result<Vec<BatchState>, BatchError> {
        let (mut out, hot) = self.capture_for_snapshot().await?;
        out.extend(hot.iter().map(|s| (**s).clone()));
        let ctx = Arc::clone(self.batch_ctx());
        let cold: Vec<archive::ArchiveRef> = ctx
            .index
            .all()
            .map_err(unavailable)?
            .into_iter()
            .map(|(_, i)| i.at)
            .collect();
        let read = tokio::task::spawn_blocking(move || {
            cold.into_iter()
                .map(|at| ctx.archive.read(at))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| BatchError::Unavailable(e.to_string()))?
        .map_err(|e| BatchError::Unavailable(e.to_string()))?;
        out.extend(read);
        // A snapshot running meanwhile may have archived a batch this call also captured
        // (live or in memory): keep each batch once, its newest copy.
        out.sort_by(|a, b| a.id.cmp(&b.id).then(b.last_lsn.cmp(&a.last_lsn)));
        out.dedup_by_key(|b| b.id);
        Ok(out)
    }

    /// What a snapshot needs of the batches: every active batch's state (captured from its
    /// actor) and the finished batches still in memory. Archived ones are left out: the
    /// archive holds them.
    pub(crate) async fn capture_for_snapshot(
        &self,
    ) -> Result<(Vec<BatchState>, Vec<Arc<BatchState>>), BatchError> {
        let addrs: Vec<Addr<BatchActor>> = {
            let d = self.batch_ctx().dir.map.read().expect("not poisoned");
            d.active.values().map(|(_, a)| a.clone()).collect()
        };
        let mut out = Vec::with_capacity(addrs.len());
        for a in addrs {
            match a.send(Read::Capture).await {
                Ok((ReadAnswer::Capture(s), _)) => out.push(*s),
                Ok(_) => unreachable!("answer matches the read"),
                // Finished meanwhile: its final state is in the finished map now.
                Err(_) => {}
            }
        }
        // Then every finished batch in memory, including those that finished while
        // capturing (read after the captures, so none is missed; one captured live keeps
        // that capture). Under the directory lock only the shared pointers are taken: the
        // deep copies are made after it is released, so batch reads and finishing batches
        // never wait for a snapshot's copying (a soak showed 1 s stalls when they did).
        let captured: std::collections::HashSet<BatchId> = out.iter().map(|b| b.id).collect();
        let hot: Vec<Arc<BatchState>> = {
            let d = self.batch_ctx().dir.map.read().expect("not poisoned");
            d.finished
                .iter()
                .filter(|(id, _)| !captured.contains(id))
                .map(|(_, f)| Arc::clone(&f.state))
                .collect()
        };
        out.sort_by_key(|b| b.id);
        Ok((out, hot))
    }

    /// Moves finished batches to the archive (appended and synced), then drops their
    /// states from memory. Every state's last event must be acknowledged already (the
    /// snapshot waits for that first), so the archive never holds a change the log could
    /// lose. Returns how many moved.
    pub(crate) async fn archive_finished(
        &self,
        mut hot: Vec<Arc<BatchState>>,
    ) -> Result<usize, BatchError> {
        if hot.is_empty() || self.batch_ctx().archiving_stopped.load(Ordering::Relaxed) {
            return Ok(0);
        }
        let acked = self.inner.wal.acked_lsn();
        for s in &hot {
            assert!(
                s.last_lsn <= acked,
                "batch {} archived before its last event was acknowledged",
                s.id
            );
            assert!(
                matches!(s.phase, Phase::Finished { .. }),
                "only finished batches are archived"
            );
        }
        hot.sort_by_key(|s| s.id);
        let ctx = Arc::clone(self.batch_ctx());
        // Archive (synced, length recorded), then index (committed): only then can memory
        // let go, so every lookup finds the batch in one place or the other.
        let (hot, totals) = tokio::task::spawn_blocking(move || {
            let states: Vec<&BatchState> = hot.iter().map(|s| &**s).collect();
            let totals = ctx.archive.append_durable(&states).and_then(|refs| {
                let records: Vec<(archive::ArchiveRef, &BatchState)> =
                    refs.into_iter().zip(states.iter().copied()).collect();
                ctx.index
                    .add(&records, ctx.archive.bytes())
                    .inspect_err(|e| {
                        ctx.archiving_stopped.store(true, Ordering::Relaxed);
                        tracing::error!(
                            error = %e,
                            "archive index failed after the archive synced: archiving stops \
                             until a restart re-indexes the archive"
                        );
                    })
            });
            (hot, totals)
        })
        .await
        .map_err(|e| BatchError::Unavailable(e.to_string()))?;
        let totals = totals.map_err(unavailable)?;
        // Memory lets go in chunks, one write lock each: a snapshot thread (low priority)
        // holding the directory for all of a minute's batches kept batch reads and
        // creations waiting. Between chunks a batch is both in memory and in the index;
        // lookups find it either way, and each chunk moves its counts from the finished
        // totals to the archived ones, so totals never count a batch twice or not at all.
        const FORGET_CHUNK_BATCHES: usize = 256;
        for chunk in hot.chunks(FORGET_CHUNK_BATCHES) {
            let mut d = self.batch_ctx().dir.map.write().expect("not poisoned");
            for s in chunk {
                let gone = d
                    .finished
                    .remove(&s.id)
                    .expect("finished batches stay until archived");
                assert!(Arc::ptr_eq(&gone.state, s), "archived once");
                sub_counts(&mut d.finished_counts, &s.counts);
                d.archived.add_batch(&s.counts);
                d.by_tenant.remove(&(s.tenant, s.id));
                if let Some(r) = &s.spec.request_id {
                    d.requests.remove(&(s.tenant, r.clone()));
                }
                for item in &s.items {
                    if let Some(o) = &item.output {
                        d.videos.remove(&o.video);
                    }
                }
            }
            // Creations that looked a request id up in the index before this chunk left
            // memory look it up again.
            d.archived_generation += 1;
        }
        let mut d = self.batch_ctx().dir.map.write().expect("not poisoned");
        assert_eq!(
            (d.archived.archived, d.archived.items),
            (totals.archived, totals.items),
            "the chunks moved exactly what the index took"
        );
        d.archived = totals;
        Ok(hot.len())
    }

    /// Which of `batches` are in the archive (final, acknowledged, never changing again).
    pub(crate) fn archived_among(
        &self,
        batches: &[BatchId],
    ) -> Result<HashSet<BatchId>, BatchError> {
        self.batch_ctx()
            .index
            .archived_among(batches)
            .map_err(unavailable)
    }

    /// Finished batches in the archive, and the archive's bytes (metrics).
    pub fn batch_archive_stats(&self) -> (u64, u64) {
        let ctx = self.batch_ctx();
        let archived = ctx.dir.map.read().expect("not poisoned").archived.archived;
        (archived, ctx.archive.bytes())
    }

    /// Entries the batch directory holds in memory: (batches not archived, request ids,
    /// videos). None of them counts archived batches, so at a steady load they stay level
    /// (metrics, tests).
    pub fn batch_directory_entries(&self) -> (usize, usize, usize) {
        let d = self.batch_ctx().dir.map.read().expect("not poisoned");
        assert_eq!(
            d.by_tenant.len(),
            d.active.len() + d.finished.len(),
            "every batch in memory is listed once"
        );
        (d.by_tenant.len(), d.requests.len(), d.videos.len())
    }

    /// Refusals by wallets that should be impossible (0 in a healthy engine).
    pub fn batch_anomalies(&self) -> u64 {
        self.batch_ctx().anomalies.load(Ordering::Relaxed)
    }

    /// The scheduler's figures.
    pub fn scheduler_stats(&self) -> crate::engine::scheduler::SchedulerStats {
        self.batch_ctx().scheduler.stats()
    }

    /// The video store.
    pub fn video_store(&self) -> &VideoStore {
        &self.batch_ctx().store
    }
}

/// Recovery helper: puts recovered batches (none of them archived: the index has those)
/// into the directory and starts the active ones. The daily caps' counters get the
/// archived batches' share from the index.
pub(crate) fn restore(
    engine: &Engine,
    batches: HashMap<BatchId, BatchState>,
    holds: &HashMap<BatchId, Hold>,
) -> Result<(), EngineError> {
    let ctx = Arc::clone(engine.batch_ctx());
    let today = ctx.clock.now_ms() / DAY_MS;
    let (day_items, day_credits) = ctx.index.days_from(today.saturating_sub(1))?;
    let mut d = ctx.dir.map.write().expect("not poisoned");
    d.archived = ctx.index.totals();
    for (k, n) in day_items {
        let c = d.day_items.entry(k).or_insert(0);
        *c = c.saturating_add(n);
    }
    for (k, n) in day_credits {
        let c = d.day_key_credits.entry(k).or_insert(0);
        *c = c.saturating_add(n);
    }
    for (id, state) in batches {
        ctx.dir.insert(&mut d, &state);
        if matches!(state.phase, Phase::Finished { .. }) {
            add_counts(&mut d.finished_counts, &state.counts);
            let expansion = Arc::new(expansion_of(&state.spec));
            let entry = Finished {
                state: Arc::new(state),
                expansion,
            };
            d.finished.insert(id, entry);
            continue;
        }
        let expansion = Arc::new(expansion_of(&state.spec));
        let tenant = state.tenant;
        let wallet = engine.addr(tenant)?;
        let addr = engine.start_batch_actor(state, wallet, expansion, holds.get(&id), None);
        d.active.insert(id, (tenant, addr));
    }
    Ok(())
}
