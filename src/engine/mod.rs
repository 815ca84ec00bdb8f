//! The engine: boots the actix System with one Arbiter per core, recovers state (newest
//! valid snapshot + WAL replay through the same `apply`), keeps the directory of actors
//! (tenant → `Addr`), takes periodic snapshots, and offers the async operations the HTTP
//! layer and batch actors call.
//!
//! Threads: `actix-system` runs the System; each Arbiter has its own thread; wallet actors
//! are spread over the arbiters by tenant. The engine's methods are plain futures (actix
//! `Addr::send` and WAL handles are `Send` and runtime-agnostic), so any tokio runtime, or
//! none, can drive them. `engine-snapshots` is a thread that snapshots by event count and by
//! time.

pub mod accounts;
pub mod batch;
pub mod dir_lock;
pub mod events;
pub(crate) mod framing;
pub mod idempotency;
pub mod journal;
pub mod rebuild;
pub mod reconcile;
// Public for `benches/response_index.rs` only: nothing outside the engine files responses.
#[doc(hidden)]
pub mod response_files;
#[doc(hidden)]
pub mod response_index;
pub mod scheduler;
pub mod snapshot;
pub mod wallet;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use actix::{Actor, Addr};

use crate::delivery::access::{AccessEntry, AccessFilter, AccessLog};
use crate::engine::accounts::AccountsState;
use crate::engine::batch::{BatchConfig, BatchCtx};
use crate::engine::events::Record;
use crate::engine::idempotency::{ResponseStore, StoredResponse};
use crate::engine::snapshot::EngineImage;
use crate::engine::wallet::actor::{Read, ReadAnswer, WalletActor};
use crate::engine::wallet::ledger::LedgerEntry;
use crate::engine::wallet::state::{
    Balances, Statement, WalletCommand, WalletError, WalletEvent, WalletState,
};
use crate::ids::{AccessId, TenantId};
use crate::webhooks::Outbox;

/// Wallet captures in flight at once while snapshotting.
const CAPTURE_CHUNK_WALLETS: usize = 16;
/// Nice value of the snapshot thread (0 is normal; higher yields more).
#[cfg(target_os = "linux")]
const SNAPSHOT_THREAD_NICE: libc::c_int = 10;
/// Blocking threads of the snapshot thread's runtime: its file steps run one after another,
/// so a few suffice (started at boot and kept: `runtime`).
const SNAPSHOT_IO_THREADS_MAX: usize = 4;

/// Source of time for decisions (expiry, ledger timestamps). Tests use `ManualClock`.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// A clock that moves only when told to.
#[derive(Default)]
pub struct ManualClock(pub AtomicU64);

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Engine settings. Every limit has a default; `config.rs` (issue 5) maps the TOML onto it.
#[derive(Clone)]
pub struct EngineConfig {
    /// Data directory: `D/wal`, `D/snapshots`.
    pub data_dir: PathBuf,
    /// WAL durability.
    pub durability: wal::Durability,
    /// WAL segment size.
    pub segment_bytes_max: u64,
    /// Snapshot after this many events since the last one.
    pub snapshot_every_events: u64,
    /// Snapshot after this long (if anything happened).
    pub snapshot_every_ms: u64,
    /// Largest snapshot file read at startup.
    pub snapshot_bytes_max: u64,
    /// Snapshots kept on disk.
    pub snapshots_kept: usize,
    /// Mailbox capacity of each actor (backpressure beyond it).
    pub mailbox_capacity: usize,
    /// Arbiters (threads) for actors; default one per core.
    pub arbiters: usize,
    /// Time source.
    pub clock: Arc<dyn Clock>,
    /// Fault injection on the WAL write path (tests, fault campaigns).
    pub faults: Option<Arc<wal::FaultInjector>>,
    /// Batches: prices, providers, attempts, the video store.
    pub batch: BatchConfig,
    /// How long an idempotent response is replayed (SPEC §5: 24 h).
    pub idempotency_retention_ms: u64,
    /// Idempotency keys remembered at once (beyond: refused as unavailable).
    pub idempotency_keys_max: usize,
    /// Webhook delivery: schedule, timeouts, bounds, SSRF policy.
    pub webhooks: crate::webhooks::WebhookConfig,
    /// Access-log entries kept in memory (and in snapshots); older ones are dropped.
    pub access_log_max: usize,
}

impl EngineConfig {
    /// Defaults for a data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        EngineConfig {
            data_dir: data_dir.into(),
            durability: wal::Durability::Sync,
            segment_bytes_max: 64 << 20,
            snapshot_every_events: 1_000_000,
            snapshot_every_ms: 60 * 1000,
            snapshot_bytes_max: 8 << 30,
            snapshots_kept: 2,
            mailbox_capacity: 1024,
            arbiters: std::thread::available_parallelism().map_or(2, |n| n.get()),
            clock: Arc::new(SystemClock),
            faults: None,
            batch: BatchConfig::default(),
            idempotency_retention_ms: 24 * 3600 * 1000,
            idempotency_keys_max: 1_000_000,
            webhooks: crate::webhooks::WebhookConfig::default(),
            access_log_max: 200_000,
        }
    }
}

/// Engine-level failures.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The log failed to open, append or replay.
    #[error(transparent)]
    Wal(#[from] wal::Error),
    /// A record or snapshot failed validation.
    #[error("invalid record at LSN {lsn}: {reason}")]
    Record { lsn: u64, reason: String },
    /// The snapshot ends before the oldest segment starts: segments are missing.
    #[error("snapshot covers LSN {snapshot}, but the log starts at {first}: segments are missing")]
    Gap { snapshot: u64, first: u64 },
    /// The actix system could not start.
    #[error("actor system: {0}")]
    System(String),
    /// A wallet refused or failed an operation.
    #[error(transparent)]
    Wallet(#[from] WalletError),
    /// The video store could not be opened.
    #[error(transparent)]
    Store(#[from] crate::delivery::store::StoreError),
    /// A batch operation failed.
    #[error(transparent)]
    Batch(#[from] crate::engine::batch::BatchError),
    /// The batch archive could not be opened, read or written.
    #[error(transparent)]
    Archive(#[from] crate::engine::batch::archive::ArchiveError),
    /// Another engine holds the data directory.
    #[error(transparent)]
    Locked(#[from] dir_lock::DirLockError),
}

/// What startup found.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// The WAL's recovery report (torn tail truncated, salvage, …).
    pub wal: wal::RecoveryReport,
    /// LSN of the snapshot loaded, if any.
    pub snapshot_lsn: Option<u64>,
    /// Snapshot files that failed validation and were skipped.
    pub snapshots_skipped: usize,
    /// Events replayed on top of the snapshot.
    pub events_replayed: u64,
    /// Wallets in memory after recovery.
    pub wallets: usize,
    /// Batches recovered (active and finished, archived ones included).
    pub batches: usize,
}

/// A wallet operation's acknowledged result.
#[derive(Debug, Clone)]
pub struct WalletOutcome {
    /// Ledger entries made, including expiries the command triggered first (a repeat
    /// returns those and the original's entry).
    pub entries: Vec<LedgerEntry>,
    /// Balances right after the operation.
    pub balances: Balances,
}

/// An outcome the log has not acknowledged yet (see `Engine::execute_unacked`).
#[must_use = "an outcome may be shown only once acknowledged"]
pub struct Unacked {
    wait: wallet::actor::Wait,
    wal: wal::Wal,
}

impl Unacked {
    /// The LSN that must be acknowledged.
    pub fn lsn(&self) -> u64 {
        self.wait.lsn()
    }

    /// Waits for the acknowledgement.
    pub async fn wait(self) -> Result<(), WalletError> {
        wallet::actor::wait_for(&self.wal, self.wait).await
    }

    /// Acknowledged already when `later` (appended after this outcome) is durable.
    pub fn covered_by(&self, later_lsn: u64) -> bool {
        later_lsn > self.lsn()
    }
}

/// A wallet in the directory: its actor, and the balances it publishes.
struct WalletEntry {
    /// Where commands and reads other than balances go.
    addr: Addr<WalletActor>,
    /// Balances without a round trip to the actor, once the first read made the view.
    view: OnceLock<Arc<wallet::view::BalanceView>>,
}

struct Inner {
    cfg: EngineConfig,
    wal: wal::Wal,
    wallets: RwLock<HashMap<TenantId, WalletEntry>>,
    /// What every wallet actor shares (handed to each as one `Arc`).
    wallet_shared: Arc<wallet::actor::WalletShared>,
    arbiters: Vec<actix::ArbiterHandle>,
    system: actix::System,
    system_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    events_appended: Arc<AtomicU64>,
    events_at_last_snapshot: AtomicU64,
    last_snapshot: Mutex<Instant>,
    snapshot_lock: tokio::sync::Mutex<()>,
    stop_ticker: Arc<AtomicBool>,
    ticker: Mutex<Option<std::thread::JoinHandle<()>>>,
    stopped: AtomicBool,
    /// Batch actors' shared parts (set once at open).
    batches: OnceLock<Arc<BatchCtx>>,
    /// The runtime attempts and the scheduler run on (taken at shutdown).
    workers: Mutex<Option<tokio::runtime::Runtime>>,
    /// Tenants and keys (see `accounts.rs` for why a lock and not an actor).
    accounts: RwLock<AccountsState>,
    /// Idempotent responses.
    responses: Mutex<ResponseStore>,
    /// Wallet commands the engine's callers sent and are still waiting on: in a mailbox,
    /// being handled, or (for `execute`) waiting for the log's acknowledgement.
    wallet_ops_in_flight: AtomicU64,
    /// Webhook endpoints and deliveries; actors emit into it.
    outbox: Arc<Outbox>,
    /// The access log (appended and applied under this lock: LSN order).
    access: Mutex<AccessLog>,
    /// The data directory's lock, released once the log and the indexes are closed and
    /// the actors stopped: at the end of `shutdown`, or (last field, so dropped last)
    /// after `Drop`'s body.
    dir_lock: Mutex<Option<dir_lock::DirLock>>,
}

/// The engine handle; clones share it.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

fn unavailable(e: impl std::fmt::Display) -> WalletError {
    WalletError::Unavailable(e.to_string())
}

/// Opens the batch archive and its index, and brings the index up to the archive: the
/// records a crash left unindexed (archived, then the crash before the index committed)
/// are indexed now. An index that is damaged, of another format, or ahead of the archive
/// is rebuilt from the whole archive, a chunk of records per transaction, so memory stays
/// bounded however long the archive is.
fn open_archive(
    data_dir: &std::path::Path,
) -> Result<(batch::archive::BatchArchive, batch::index::ArchiveIndex), EngineError> {
    use batch::archive::{ArchiveError, ArchiveRef, BatchArchive};
    use batch::state::BatchState;
    /// Records indexed per transaction while catching up.
    const CHUNK_RECORDS: usize = 4096;
    let mut index = batch::index::ArchiveIndex::open(data_dir)?;
    // Two tries at most: from where the index stops, then (it was wrong) from the start.
    for attempt in 0..2 {
        let from = index.totals().covered_bytes;
        let mut chunk: Vec<(ArchiveRef, BatchState)> = Vec::new();
        let flush = |chunk: &mut Vec<(ArchiveRef, BatchState)>| -> Result<(), ArchiveError> {
            let Some((last, _)) = chunk.last() else {
                return Ok(());
            };
            let end = last.end();
            let records: Vec<(ArchiveRef, &BatchState)> =
                chunk.iter().map(|(r, s)| (*r, s)).collect();
            index.add(&records, end)?;
            chunk.clear();
            Ok(())
        };
        let opened = BatchArchive::open(data_dir, from, &mut |r, s| {
            chunk.push((r, s));
            if chunk.len() >= CHUNK_RECORDS {
                flush(&mut chunk)?;
            }
            Ok(())
        });
        match opened {
            Ok(archive) => {
                flush(&mut chunk)?;
                assert_eq!(
                    index.totals().covered_bytes,
                    archive.bytes(),
                    "the index covers the whole archive"
                );
                return Ok((archive, index));
            }
            Err(ArchiveError::Corrupt { reason, offset, .. }) if from > 0 && attempt == 0 => {
                tracing::warn!(
                    offset,
                    %reason,
                    "archive index disagrees with the archive: rebuilding it"
                );
                index = index.reset()?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    unreachable!("the second try starts from 0 and either opens or fails")
}

impl Engine {
    /// Recovers the data directory and starts the actors.
    pub fn open(cfg: EngineConfig) -> Result<(Engine, Recovery), EngineError> {
        // Before anything in the directory is read or repaired (see `dir_lock`).
        let dir_lock = dir_lock::DirLock::acquire(&cfg.data_dir, dir_lock::LOCK_WAIT_MS_MAX)?;
        let wal_dir = crate::wal_dir(&cfg.data_dir);
        let snap_dir = crate::snapshot_dir(&cfg.data_dir);
        let lookup = wal::latest_snapshot(&snap_dir, cfg.snapshot_bytes_max)?;
        let (wal, report) = wal::Wal::open(
            &wal_dir,
            wal::Options {
                durability: cfg.durability,
                segment_bytes_max: cfg.segment_bytes_max,
                faults: cfg.faults.clone(),
                ..wal::Options::default()
            },
        )?;

        let (archive, index) = open_archive(&cfg.data_dir)?;
        let archived = |id| Ok(index.batch(id)?.map(|i| i.last_lsn));
        let mut rebuilt = rebuild::Rebuilt::from_image(&cfg, lookup.snapshot.as_ref())?;
        rebuilt.forget_archived(&archived)?;
        let from = rebuilt.next_lsn();
        if report.frames > 0 && wal.first_lsn() > from {
            return Err(EngineError::Gap {
                snapshot: from - 1,
                first: wal.first_lsn(),
            });
        }
        rebuilt.replay(&mut wal.replay(from)?, &archived)?;
        let rebuild::Rebuilt {
            wallets: states,
            batches,
            accounts,
            responses,
            hooks,
            access,
            snapshot_lsn,
            events_replayed: replayed,
            ..
        } = rebuilt;
        let mut responses = responses;
        responses.attach(&cfg.data_dir, cfg.clock.now_ms())?;

        // Holds of batches still running: which items' money the wallet already has.
        let holds: HashMap<crate::ids::BatchId, wallet::state::Hold> = batches
            .values()
            .filter(|b| !matches!(b.phase, batch::state::Phase::Finished { .. }))
            .filter_map(|b| {
                let h = states.get(&b.tenant)?.holds.get(&b.id)?;
                Some((b.id, h.clone()))
            })
            .collect();
        let store = crate::delivery::store::VideoStore::open(
            &cfg.batch.store_url,
            &cfg.data_dir,
            cfg.batch.store_fsync,
        )?;
        // Video puts and reads run on its blocking pool: fixed like the HTTP runtime's.
        let workers = crate::runtime::multi_thread(
            "engine-worker",
            Some(cfg.arbiters.max(1)),
            crate::runtime::BLOCKING_THREADS,
        )
        .map_err(|e| EngineError::System(e.to_string()))?;
        let (system, arbiters, system_thread) = start_system(cfg.arbiters.max(1))?;
        let events_appended = Arc::new(AtomicU64::new(0));
        hooks
            .check_invariants()
            .map_err(|reason| EngineError::Record { lsn: 0, reason })?;
        let outbox = Outbox::new(
            hooks,
            wal.clone(),
            Arc::clone(&cfg.clock),
            cfg.webhooks.clone(),
            Arc::clone(&events_appended),
        );
        let wallets_n = states.len();
        let wallet_shared = Arc::new(wallet::actor::WalletShared {
            wal: wal.clone(),
            events_appended: Arc::clone(&events_appended),
            clock: Arc::clone(&cfg.clock),
            outbox: Arc::clone(&outbox),
            history: Arc::new(wallet::history::WalletHistory::open(&cfg.data_dir)?),
            // After the history file (its open cuts a torn tail): a rebuild reads it.
            ops: Arc::new(wallet::op_index::OpIndex::open(&cfg.data_dir)?),
        });
        let inner = Arc::new(Inner {
            wallet_shared,
            wal,
            wallets: RwLock::new(HashMap::with_capacity(states.len())),
            arbiters,
            system,
            system_thread: Mutex::new(Some(system_thread)),
            events_appended,
            events_at_last_snapshot: AtomicU64::new(0),
            last_snapshot: Mutex::new(Instant::now()),
            snapshot_lock: tokio::sync::Mutex::new(()),
            stop_ticker: Arc::new(AtomicBool::new(false)),
            ticker: Mutex::new(None),
            stopped: AtomicBool::new(false),
            batches: OnceLock::new(),
            workers: Mutex::new(None),
            accounts: RwLock::new(accounts),
            responses: Mutex::new(responses),
            wallet_ops_in_flight: AtomicU64::new(0),
            outbox,
            access: Mutex::new(access),
            cfg,
            dir_lock: Mutex::new(Some(dir_lock)),
        });
        let engine = Engine { inner };
        {
            let mut dir = engine.inner.wallets.write().expect("not poisoned");
            for (tenant, state) in states {
                dir.insert(tenant, engine.start_actor(state));
            }
        }
        // A tenant whose wallet opening was lost in a crash gets it now.
        let orphans: Vec<TenantId> = {
            let acc = engine.inner.accounts.read().expect("not poisoned");
            let dir = engine.inner.wallets.read().expect("not poisoned");
            acc.tenants
                .keys()
                .filter(|t| !dir.contains_key(t))
                .copied()
                .collect()
        };
        for t in orphans {
            if let Some(d) = engine.open_wallet_now(t)? {
                d.wait()?;
            }
        }
        let scheduler = scheduler::Scheduler::new(
            engine
                .inner
                .cfg
                .batch
                .providers
                .providers
                .iter()
                .map(|(n, r)| (n.clone(), r.concurrency_max)),
        );
        workers.spawn(Arc::clone(&scheduler).run());
        workers.spawn(crate::webhooks::dispatcher::run(Arc::clone(
            &engine.inner.outbox,
        )));
        let ctx = Arc::new(BatchCtx {
            wal: engine.inner.wal.clone(),
            events_appended: Arc::clone(&engine.inner.events_appended),
            clock: Arc::clone(&engine.inner.cfg.clock),
            scheduler,
            providers: engine.inner.cfg.batch.providers.clone(),
            store,
            workers: workers.handle().clone(),
            cfg: engine.inner.cfg.batch.exec.clone(),
            dir: Arc::new(batch::Directory::default()),
            anomalies: AtomicU64::new(0),
            provider_stats: Arc::default(),
            outbox: Arc::clone(&engine.inner.outbox),
            archive: Arc::new(archive),
            index: Arc::new(index),
            archiving_stopped: Default::default(),
            recent_large: Default::default(),
        });
        let _ = engine.inner.batches.set(ctx);
        *engine.inner.workers.lock().expect("not poisoned") = Some(workers);
        let batches_n = batches.len() + engine.batch_ctx().index.totals().archived as usize;
        batch::restore(&engine, batches, &holds)?;
        engine.start_ticker();
        let recovery = Recovery {
            wal: report,
            snapshot_lsn,
            snapshots_skipped: lookup.skipped.len(),
            events_replayed: replayed,
            wallets: wallets_n,
            batches: batches_n,
        };
        Ok((engine, recovery))
    }

    fn start_actor(&self, state: WalletState) -> WalletEntry {
        let inner = &self.inner;
        let idx = (state.tenant.0 % inner.arbiters.len() as u128) as usize;
        let actor = WalletActor {
            view: None,
            state,
            shared: Arc::clone(&inner.wallet_shared),
        };
        let capacity = inner.cfg.mailbox_capacity;
        let addr = WalletActor::start_in_arbiter(&inner.arbiters[idx], move |ctx| {
            ctx.set_mailbox_capacity(capacity);
            actor
        });
        WalletEntry {
            addr,
            view: OnceLock::new(),
        }
    }

    fn start_ticker(&self) {
        // The snapshot thread yields to request threads: a snapshot is background work
        // (copying and encoding the whole state takes CPU on a 2-core machine), and a
        // later snapshot costs nothing in safety. Per-thread nice value on Linux.
        #[cfg(target_os = "linux")]
        fn background_priority() {
            // SAFETY: gettid and setpriority have no preconditions; a failure leaves the
            // thread at normal priority, which is still correct.
            unsafe {
                let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                let _ = libc::setpriority(libc::PRIO_PROCESS, tid, SNAPSHOT_THREAD_NICE);
            }
        }
        #[cfg(not(target_os = "linux"))]
        fn background_priority() {}
        let weak = Arc::downgrade(&self.inner);
        let stop = Arc::clone(&self.inner.stop_ticker);
        let handle = std::thread::Builder::new()
            .name("engine-snapshots".into())
            .spawn(move || {
                // One small runtime for the thread's life: the snapshot future is
                // runtime-agnostic, it only needs something to drive it.
                // Its blocking pool does the snapshot's file work (a few steps in turn):
                // named, small, and kept between snapshots (see the keep-alive's doc).
                let Ok(rt) =
                    crate::runtime::current_thread("engine-snapshot-io", SNAPSHOT_IO_THREADS_MAX)
                else {
                    return;
                };
                background_priority();
                while !stop.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(50));
                    let Some(inner) = weak.upgrade() else { return };
                    let engine = Engine { inner };
                    if engine.snapshot_due() {
                        // A failed snapshot is retried at the next tick; the log still
                        // holds everything, so nothing is lost, only startup gets slower.
                        let _ = rt.block_on(engine.snapshot_now());
                    }
                }
            })
            .ok();
        *self.inner.ticker.lock().expect("not poisoned") = handle;
    }

    fn snapshot_due(&self) -> bool {
        let i = &self.inner;
        let since = i.events_appended.load(Ordering::Relaxed)
            - i.events_at_last_snapshot.load(Ordering::Relaxed);
        if since == 0 || i.wal.poisoned().is_some() {
            return false;
        }
        since >= i.cfg.snapshot_every_events
            || i.last_snapshot.lock().expect("not poisoned").elapsed()
                >= Duration::from_millis(i.cfg.snapshot_every_ms)
    }

    /// The WAL (for metrics and readiness).
    pub fn wal(&self) -> &wal::Wal {
        &self.inner.wal
    }

    /// Wallet commands the engine's callers are waiting on (metrics; see the field).
    pub fn wallet_ops_in_flight(&self) -> u64 {
        self.inner.wallet_ops_in_flight.load(Ordering::Relaxed)
    }

    /// Engine time.
    pub fn now_ms(&self) -> u64 {
        self.inner.cfg.clock.now_ms()
    }

    fn addr(&self, tenant: TenantId) -> Result<Addr<WalletActor>, WalletError> {
        self.inner
            .wallets
            .read()
            .expect("not poisoned")
            .get(&tenant)
            .map(|w| w.addr.clone())
            .ok_or(WalletError::UnknownWallet)
    }

    /// Opens the tenant's wallet (idempotent). Returns whether it was created now.
    pub async fn open_wallet(&self, tenant: TenantId) -> Result<bool, WalletError> {
        match self.open_wallet_now(tenant).map_err(unavailable)? {
            None => Ok(false),
            Some(durable) => {
                durable.await.map_err(unavailable)?;
                Ok(true)
            }
        }
    }

    /// Appends and applies a wallet opening; `None` if the wallet exists.
    fn open_wallet_now(&self, tenant: TenantId) -> Result<Option<wal::Durable>, wal::Error> {
        let mut dir = self.inner.wallets.write().expect("not poisoned");
        if dir.contains_key(&tenant) {
            return Ok(None);
        }
        let event = WalletEvent::Opened {
            at_ms: self.now_ms(),
        };
        let durable = journal::append(
            &self.inner.wal,
            &Record::Wallet {
                tenant,
                event: event.clone(),
            },
        )?;
        let mut state = WalletState::new(tenant);
        state.apply(&event, durable.lsn());
        self.inner.events_appended.fetch_add(1, Ordering::Relaxed);
        dir.insert(tenant, self.start_actor(state));
        Ok(Some(durable))
    }

    /// Runs a wallet command and waits until it is acknowledged (durable).
    pub async fn execute(
        &self,
        tenant: TenantId,
        cmd: WalletCommand,
    ) -> Result<WalletOutcome, WalletError> {
        // Queued under the directory's read lock (no `Addr` clone: two allocations in
        // actix); only a full mailbox takes a clone, to wait for room outside the lock.
        let acked = self
            .inner
            .wallets
            .read()
            .expect("not poisoned")
            .get(&tenant)
            .map(|w| wallet::actor::send_acked(&w.addr, cmd))
            .ok_or(WalletError::UnknownWallet)?;
        let gauge = &self.inner.wallet_ops_in_flight;
        gauge.fetch_add(1, Ordering::Relaxed);
        let r = acked.finish(&self.inner.wal).await;
        gauge.fetch_sub(1, Ordering::Relaxed);
        let (entries, balances) = r?;
        Ok(WalletOutcome { entries, balances })
    }

    /// Runs a wallet command without waiting for its acknowledgement: the outcome is not
    /// acknowledged yet, and must not be shown to anyone until `Unacked::wait` resolved,
    /// or until something appended after it is durable (the log acknowledges in order).
    /// Used by the HTTP layer to wait once for a command and its stored response.
    pub async fn execute_unacked(
        &self,
        tenant: TenantId,
        cmd: WalletCommand,
    ) -> Result<(WalletOutcome, Unacked), WalletError> {
        // Sent under the directory's read lock: no `Addr` clone (two allocations in actix).
        let request = self
            .inner
            .wallets
            .read()
            .expect("not poisoned")
            .get(&tenant)
            .map(|w| w.addr.send(wallet::actor::Execute { cmd }))
            .ok_or(WalletError::UnknownWallet)?;
        let gauge = &self.inner.wallet_ops_in_flight;
        gauge.fetch_add(1, Ordering::Relaxed);
        let r = wallet::actor::executed(request).await;
        gauge.fetch_sub(1, Ordering::Relaxed);
        let (entries, balances, wait) = r?;
        Ok((
            WalletOutcome { entries, balances },
            Unacked {
                wait,
                wal: self.inner.wal.clone(),
            },
        ))
    }

    async fn read(&self, tenant: TenantId, read: Read) -> Result<ReadAnswer, WalletError> {
        let addr = self.addr(tenant)?;
        let (answer, lsn) = addr.send(read).await.map_err(unavailable)?;
        if self.inner.wal.acked_lsn() < lsn {
            self.inner.wal.wait_acked(lsn).await.map_err(unavailable)?;
        }
        Ok(answer)
    }

    /// Current balances (only acknowledged changes are ever visible).
    pub async fn balances(&self, tenant: TenantId) -> Result<Balances, WalletError> {
        // From the published view: no round trip to the actor (see `wallet::view`). The
        // first read asks the actor to make the view.
        let published = {
            let dir = self.inner.wallets.read().expect("not poisoned");
            let w = dir.get(&tenant).ok_or(WalletError::UnknownWallet)?;
            match w.view.get() {
                Some(view) => Ok(view.read()),
                None => Err(w.addr.send(Read::View)),
            }
        };
        let (balances, lsn) = match published {
            Ok(p) => p,
            Err(request) => {
                let (ReadAnswer::View(view), _) = request.await.map_err(unavailable)? else {
                    unreachable!("answer matches the read")
                };
                let p = view.read();
                if let Some(w) = self
                    .inner
                    .wallets
                    .read()
                    .expect("not poisoned")
                    .get(&tenant)
                {
                    // A concurrent first read may have set it: the actor gave both the
                    // same view.
                    let _ = w.view.set(view);
                }
                p
            }
        };
        if self.inner.wal.acked_lsn() < lsn {
            self.inner.wal.wait_acked(lsn).await.map_err(unavailable)?;
        }
        Ok(balances)
    }

    /// Ledger entries with seq > `after`, at most `limit`.
    pub async fn ledger_page(
        &self,
        tenant: TenantId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<LedgerEntry>, WalletError> {
        let ReadAnswer::Ledger { filed, memory } =
            self.read(tenant, Read::Ledger { after, limit }).await?
        else {
            unreachable!("answer matches the read")
        };
        let mut out = Vec::with_capacity(limit.min(memory.len() + 256 * filed.len()));
        // Filed pages hold the lower seqs; each is a positional read of one page.
        for p in &filed {
            let page = self.read_filed(tenant, p)?;
            let room = limit.saturating_sub(out.len());
            out.extend(
                page.entries
                    .into_iter()
                    .filter(|e| e.seq > after)
                    .take(room),
            );
        }
        out.extend(memory);
        out.truncate(limit);
        debug_assert!(out.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
        Ok(out)
    }

    /// Bytes of the ledger history file (metrics).
    pub fn ledger_history_bytes(&self) -> u64 {
        self.inner.wallet_shared.history.bytes()
    }

    /// A filed ledger page of `tenant`, read back and checked.
    fn read_filed(
        &self,
        tenant: TenantId,
        page: &wallet::history::FiledPage,
    ) -> Result<wallet::history::HistoryPage, WalletError> {
        self.inner
            .wallet_shared
            .history
            .read(tenant, page)
            .map_err(|e| {
                tracing::error!(error = %e, "a filed ledger page could not be read back");
                WalletError::Unavailable(e.to_string())
            })
    }

    /// Puts a captured wallet's filed entries back in front of its tail (reconciliation).
    pub(crate) fn expand_history(&self, w: &mut WalletState) -> Result<(), EngineError> {
        let history = &self.inner.wallet_shared.history;
        wallet::history::expand(w, |t, p| history.read(t, p))?;
        Ok(())
    }

    /// Statement for `[from_ms, to_ms)`.
    pub async fn statement(
        &self,
        tenant: TenantId,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<Statement, WalletError> {
        match self
            .read(tenant, Read::Statement { from_ms, to_ms })
            .await?
        {
            ReadAnswer::Statement(s) => Ok(*s),
            ReadAnswer::StatementParts { filed, memory } => {
                // Page by page: a long period never holds more than one page read back.
                let mut failed = None;
                let read = filed
                    .iter()
                    .map_while(|p| match self.read_filed(tenant, p) {
                        Ok(page) => Some(page.entries),
                        Err(e) => {
                            failed = Some(e);
                            None
                        }
                    })
                    .flatten();
                let s = wallet::state::statement_of(read.chain(memory), from_ms, to_ms);
                match failed {
                    Some(e) => Err(e),
                    None => Ok(s),
                }
            }
            _ => unreachable!("answer matches the read"),
        }
    }

    /// A copy of one wallet's state as held in memory: ledger entries already filed to the
    /// history file are described by `filed`, not listed (see `wallet_state_expanded`).
    pub async fn wallet_state(&self, tenant: TenantId) -> Result<WalletState, WalletError> {
        match self.read(tenant, Read::Capture).await? {
            ReadAnswer::Capture(s) => Ok(*s),
            _ => unreachable!("answer matches the read"),
        }
    }

    /// `wallet_state` with every filed entry read back into `ledger` (`filed` is `None`):
    /// the whole ledger, for audits and tests. Reads the wallet's pages from disk.
    pub async fn wallet_state_expanded(
        &self,
        tenant: TenantId,
    ) -> Result<WalletState, WalletError> {
        let mut w = self.wallet_state(tenant).await?;
        let engine = self.clone();
        tokio::task::spawn_blocking(move || {
            engine
                .expand_history(&mut w)
                .map(|()| w)
                .map_err(|e| WalletError::Unavailable(e.to_string()))
        })
        .await
        .map_err(|e| WalletError::Unavailable(e.to_string()))?
    }

    /// Tenants with a wallet.
    pub fn tenants(&self) -> Vec<TenantId> {
        let mut v: Vec<TenantId> = self
            .inner
            .wallets
            .read()
            .expect("not poisoned")
            .keys()
            .copied()
            .collect();
        v.sort_unstable();
        v
    }

    /// Every wallet's state, sorted by tenant (tests compare recovered state with it).
    pub async fn capture_all(&self) -> Result<Vec<WalletState>, WalletError> {
        let addrs: Vec<Addr<WalletActor>> = {
            let dir = self.inner.wallets.read().expect("not poisoned");
            let mut v: Vec<(TenantId, Addr<WalletActor>)> =
                dir.iter().map(|(t, w)| (*t, w.addr.clone())).collect();
            v.sort_unstable_by_key(|(t, _)| *t);
            v.into_iter().map(|(_, a)| a).collect()
        };
        let mut out = Vec::with_capacity(addrs.len());
        // Enqueue a chunk of requests, then collect: the actors work in parallel. Small
        // chunks, so that a snapshot's copies never fill the arbiters' queues: requests for
        // other tenants interleave with them instead of waiting behind a thousand copies.
        for chunk in addrs.chunks(CAPTURE_CHUNK_WALLETS) {
            let pending: Vec<_> = chunk.iter().map(|a| a.send(Read::Capture)).collect();
            for p in pending {
                match p.await.map_err(unavailable)? {
                    (ReadAnswer::Capture(s), _) => out.push(*s),
                    _ => unreachable!("answer matches the read"),
                }
            }
        }
        Ok(out)
    }

    /// Runs `check_invariants` on every wallet; the first failure, if any.
    pub async fn check_invariants(&self) -> Result<(), String> {
        for tenant in self.tenants() {
            match self.read(tenant, Read::CheckInvariants).await {
                Ok(ReadAnswer::Invariants(r)) => r?,
                Ok(_) => unreachable!("answer matches the read"),
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    }

    /// Webhook endpoints and deliveries.
    pub fn webhooks(&self) -> &Arc<Outbox> {
        &self.inner.outbox
    }

    /// Records an access and waits until it is durable (the caller answers after).
    pub async fn record_access(&self, mut entry: AccessEntry) -> Result<(), EngineError> {
        entry.at_ms = self.now_ms();
        entry.id = AccessId::generate(entry.at_ms);
        if let Some(ua) = &mut entry.user_agent {
            crate::truncate_utf8(ua, crate::delivery::access::USER_AGENT_BYTES_MAX);
        }
        let durable = {
            let mut log = self.inner.access.lock().expect("not poisoned");
            let record = Record::Access(entry);
            let durable = journal::append(&self.inner.wal, &record)?;
            let Record::Access(entry) = record else {
                unreachable!("built above")
            };
            log.apply(entry, durable.lsn());
            self.inner.events_appended.fetch_add(1, Ordering::Relaxed);
            durable
        };
        durable.await?;
        Ok(())
    }

    /// Access-log entries in memory (metrics; bounded by `access_log_max`).
    pub fn access_log_entries(&self) -> usize {
        self.inner.access.lock().expect("not poisoned").len()
    }

    /// Access-log entries, newest first, below `before`.
    pub fn access_page(
        &self,
        filter: &AccessFilter,
        before: Option<AccessId>,
        limit: usize,
    ) -> Vec<AccessEntry> {
        // A filtered page looks at no more than this many entries (bounded work).
        const SCAN_MAX: usize = 200_000;
        self.inner
            .access
            .lock()
            .expect("not poisoned")
            .page(filter, before, limit, SCAN_MAX)
    }

    /// Takes a snapshot now; returns the LSN it covers. Older segments and snapshots
    /// are then deleted.
    pub async fn snapshot_now(&self) -> Result<u64, EngineError> {
        let i = &self.inner;
        let _guard = i.snapshot_lock.lock().await;
        let started = Instant::now();
        let appended = i.events_appended.load(Ordering::Relaxed);
        // Read before any capture: every event at or below it is in the captured states.
        let covered_lsn = i.wal.next_lsn() - 1;
        let mut wallets = self.capture_all().await?;
        let (batches, finished) = self.capture_for_snapshot().await?;
        let accounts = i.accounts.read().expect("not poisoned").clone();
        // Responses stored so far (every one at or below `covered_lsn` among them) go to a
        // new segment below, after the captures.
        let due = {
            let mut r = i.responses.lock().expect("not poisoned");
            r.expire(self.now_ms());
            r.due_for_filing()
        };
        // Last: every event of a record some captured state holds was emitted already.
        let webhooks = i.outbox.image(covered_lsn);
        let (access, access_lsn) = {
            let a = i.access.lock().expect("not poisoned");
            (a.image(), a.last_lsn)
        };
        // The deep copies, after the lock is released (downloads keep recording meanwhile).
        let access: Vec<AccessEntry> = access.iter().map(|e| AccessEntry::clone(e)).collect();
        // Everything captured was appended before this point: once it is acknowledged,
        // the image holds nothing the log could still lose.
        let newest = i.wal.next_lsn() - 1;
        i.wal.wait_acked(newest.max(covered_lsn)).await?;
        let captured = started.elapsed();
        // Finished batches go to the archive (synced) before the image that leaves them
        // out is written; their memory is freed now.
        // Each step's time goes into the log line: a snapshot that stalls requests is
        // diagnosed from it (which step, how long), not guessed at.
        let ms = |since: Instant| since.elapsed().as_millis() as u64;
        let step = Instant::now();
        let archived = self.archive_finished(finished).await?;
        let archive_ms = ms(step);
        let step = Instant::now();
        let responses_filed = self.file_responses(due).await?;
        let responses_ms = ms(step);
        let step = Instant::now();
        let responses_expired = self.expire_responses().await?;
        let expire_ms = ms(step);
        let step = Instant::now();
        let (ledger_pages, holds_retired) = self.compact_wallets(&mut wallets).await?;
        let compact_ms = ms(step);
        let step = Instant::now();
        let bytes = snapshot::encode(&EngineImage {
            covered_lsn,
            wallets,
            batches,
            accounts,
            webhooks,
            access,
            access_lsn,
        });
        let encode_ms = ms(step);
        let step = Instant::now();
        let snap_dir = crate::snapshot_dir(&i.cfg.data_dir);
        wal::write_snapshot(&snap_dir, covered_lsn, &bytes)?;
        let write_ms = ms(step);
        i.wal.drop_segments_below(covered_lsn)?;
        wal::prune_snapshots(&snap_dir, i.cfg.snapshots_kept.max(1))?;
        i.events_at_last_snapshot.store(appended, Ordering::Relaxed);
        *i.last_snapshot.lock().expect("not poisoned") = Instant::now();
        let image_bytes = bytes.len();
        drop(bytes);
        tracing::info!(
            covered_lsn,
            bytes = image_bytes,
            capture_ms = captured.as_millis() as u64,
            batches_archived = archived,
            responses_filed,
            responses_expired,
            ledger_pages,
            holds_retired,
            archive_ms,
            responses_ms,
            expire_ms,
            compact_ms,
            encode_ms,
            write_ms,
            total_ms = started.elapsed().as_millis() as u64,
            "snapshot written"
        );
        Ok(covered_lsn)
    }

    /// Writes the responses due for filing to their segment and indexes them (off the
    /// async threads), then lets memory forget them; returns how many were written.
    async fn file_responses(
        &self,
        due: Option<(u32, Vec<Arc<StoredResponse>>)>,
    ) -> Result<usize, EngineError> {
        let Some((segment, records)) = due else {
            return Ok(0);
        };
        let Some((dir, index)) = self.inner.responses.lock().expect("not poisoned").files() else {
            return Ok(0);
        };
        let (records, written) = tokio::task::spawn_blocking(move || {
            let written = response_files::write_segment(&dir, segment, &records).and_then(|refs| {
                let rows =
                    crate::engine::idempotency::index_rows(records.iter().map(|r| &**r).zip(refs));
                index.add(segment, &rows)
            });
            (records, written)
        })
        .await
        .map_err(|e| EngineError::System(e.to_string()))?;
        written?;
        self.inner
            .responses
            .lock()
            .expect("not poisoned")
            .forget_filed(&records);
        Ok(records.len())
    }

    /// Retention for filed responses: segments emptied before the previous snapshot are
    /// deleted, expired rows leave the index, and segments that emptied now wait for the
    /// next snapshot. Returns how many responses expired.
    async fn expire_responses(&self) -> Result<usize, EngineError> {
        let (files, dead) = {
            let mut r = self.inner.responses.lock().expect("not poisoned");
            (r.files(), r.take_dead())
        };
        let Some((dir, index)) = files else {
            return Ok(0);
        };
        let cutoff_ms = self
            .now_ms()
            .saturating_sub(self.inner.cfg.idempotency_retention_ms);
        let (removed, empty) = tokio::task::spawn_blocking(move || {
            response_files::delete(&dir, &dead)?;
            index.expire(cutoff_ms, &dead)
        })
        .await
        .map_err(|e| EngineError::System(e.to_string()))??;
        self.inner
            .responses
            .lock()
            .expect("not poisoned")
            .set_dead(empty);
        Ok(removed)
    }

    /// Makes the captured wallets and their live actors smaller, the same way: ledger
    /// entries beyond each busy wallet's tail go to the history file (synced first), and
    /// finished holds of archived batches are retired. Returns (pages filed, holds retired).
    async fn compact_wallets(
        &self,
        wallets: &mut [WalletState],
    ) -> Result<(usize, usize), EngineError> {
        // Holds are retired only once their batch is in the archive: its last event was
        // acknowledged and no actor can send the wallet a command for it again.
        let finished: Vec<crate::ids::BatchId> = wallets
            .iter()
            .flat_map(|w| w.retirable_holds(|_| true))
            .collect();
        let archived = self.archived_among(&finished)?;
        let mut pages = Vec::new();
        let mut ops = Vec::new();
        let mut plans = Vec::new();
        for (i, w) in wallets.iter().enumerate() {
            let due = w.due_for_filing();
            let retire = w.retirable_holds(|b| archived.contains(&b));
            if due.is_empty() && retire.is_empty() && w.retirable_grants() == 0 {
                continue;
            }
            let page = if due.is_empty() {
                None
            } else {
                let page = wallet::history::HistoryPage {
                    tenant: w.tenant,
                    entries: due.to_vec(),
                };
                // Every grant a page's top-up created is still in memory: grants retire
                // only after their entry is filed.
                ops.extend(wallet::op_index::ops_of(&page, |g| {
                    w.grant(g).map(|g| (g.kind, g.expires_at_ms))
                }));
                pages.push(page);
                Some(pages.len() - 1)
            };
            plans.push((i, page, retire));
        }
        if plans.is_empty() {
            return Ok((0, 0));
        }
        // The pages are synced, then their operations' keys committed to the index, before
        // any wallet lets go of them.
        let filed = if pages.is_empty() {
            Vec::new()
        } else {
            let shared = Arc::clone(&self.inner.wallet_shared);
            tokio::task::spawn_blocking(move || {
                let filed = shared.history.append(&pages)?;
                shared.ops.add(&ops)?;
                Ok::<_, crate::engine::batch::archive::ArchiveError>(filed)
            })
            .await
            .map_err(|e| EngineError::System(e.to_string()))??
        };
        let mut retired = 0;
        let mut messages = Vec::with_capacity(plans.len());
        for (i, page, retire) in plans {
            let page = page.map(|p| filed[p]);
            if let Some(p) = page {
                wallets[i].filed_ledger(p);
            }
            wallets[i].retire_holds(&retire);
            retired += retire.len();
            let retire_grants = wallets[i].retirable_grants();
            wallets[i].retire_grants(retire_grants);
            messages.push((
                wallets[i].tenant,
                wallet::actor::Compact {
                    page,
                    retire,
                    retire_grants,
                },
            ));
        }
        let live: Vec<(Addr<WalletActor>, wallet::actor::Compact)> = {
            let dir = self.inner.wallets.read().expect("not poisoned");
            messages
                .into_iter()
                .filter_map(|(t, m)| Some((dir.get(&t)?.addr.clone(), m)))
                .collect()
        };
        // In small chunks, like the captures, so other tenants' requests interleave. A
        // wallet that misses its message (stopping) keeps the entries and holds in memory
        // and is compacted again later: consistent either way.
        let mut live = live.into_iter();
        loop {
            let pending: Vec<_> = live
                .by_ref()
                .take(CAPTURE_CHUNK_WALLETS)
                .map(|(a, m)| a.send(m))
                .collect();
            if pending.is_empty() {
                break;
            }
            for p in pending {
                p.await.map_err(|e| EngineError::System(e.to_string()))?;
            }
        }
        Ok((filed.len(), retired))
    }

    /// Stops the engine: optionally a final snapshot, then the log is flushed and closed
    /// and the actors stopped. Later operations fail with `Unavailable`.
    pub async fn shutdown(&self, final_snapshot: bool) -> Result<(), EngineError> {
        let i = &self.inner;
        if i.stopped.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        i.stop_ticker.store(true, Ordering::Release);
        i.outbox.stop();
        let ticker = i.ticker.lock().expect("not poisoned").take();
        if let Some(t) = ticker {
            let _ = t.join();
        }
        let snap = if final_snapshot && i.wal.poisoned().is_none() {
            self.snapshot_now().await.map(|_| ())
        } else {
            Ok(())
        };
        let closed = i.wal.close();
        i.close_indexes();
        i.system.stop();
        let thread = i.system_thread.lock().expect("not poisoned").take();
        if let Some(t) = thread {
            let _ = t.join();
        }
        if let Some(rt) = i.workers.lock().expect("not poisoned").take() {
            rt.shutdown_background();
        }
        // Everything that writes to the directory is closed: another engine may open it.
        drop(i.dir_lock.lock().expect("not poisoned").take());
        snap?;
        closed?;
        Ok(())
    }
}

impl Engine {
    /// The on-disk indexes' page caches: (index name, resident bytes, evictions so far),
    /// for those open. Each cache is bounded (16–32 MiB), so after warm-up resident
    /// memory should stop moving with them.
    pub fn index_cache_stats(&self) -> Vec<(&'static str, usize, u64)> {
        let i = &self.inner;
        let mut out = Vec::with_capacity(2);
        if let Some((b, e)) = i.batches.get().and_then(|c| c.index.cache_stats()) {
            out.push(("archive", b, e));
        }
        if let Some((b, e)) = i.wallet_shared.ops.cache_stats() {
            out.push(("operations", b, e));
        }
        out
    }
}

impl Inner {
    /// Closes the on-disk indexes: requests still in flight get `Unavailable`, and a new
    /// engine in this process can open the same directory (redb locks an open file).
    fn close_indexes(&self) {
        if let Some(ctx) = self.batches.get() {
            ctx.index.close();
        }
        if let Some((_, index)) = self.responses.lock().ok().and_then(|r| r.files()) {
            index.close();
        }
        self.wallet_shared.ops.close();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Close the log first: actors on arbiter threads and tasks on the worker runtime
        // may outlive this drop for a moment, and none of them may write to the files
        // after it returns (a new engine may already be opening the same directory).
        let _ = self.wal.close();
        self.close_indexes();
        self.stop_ticker.store(true, Ordering::Release);
        self.system.stop();
        if let Some(t) = self.system_thread.lock().ok().and_then(|mut g| g.take()) {
            let _ = t.join();
        }
        if let Some(rt) = self.workers.lock().ok().and_then(|mut g| g.take()) {
            rt.shutdown_background();
        }
    }
}

/// Starts the actix System on its own thread with `n` arbiters.
fn start_system(
    n: usize,
) -> Result<
    (
        actix::System,
        Vec<actix::ArbiterHandle>,
        std::thread::JoinHandle<()>,
    ),
    EngineError,
> {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("actix-system".into())
        .spawn(move || {
            let runner = actix::System::new();
            let arbiters: Vec<actix::Arbiter> =
                runner.block_on(async { (0..n).map(|_| actix::Arbiter::new()).collect() });
            let handles = arbiters.iter().map(|a| a.handle()).collect::<Vec<_>>();
            let system = runner.block_on(async { actix::System::current() });
            let _ = tx.send((system, handles));
            let _ = runner.run();
            drop(arbiters);
        })
        .map_err(|e| EngineError::System(e.to_string()))?;
    let (system, handles) = rx
        .recv()
        .map_err(|_| EngineError::System("actix system thread died at start".into()))?;
    Ok((system, handles, thread))
}
