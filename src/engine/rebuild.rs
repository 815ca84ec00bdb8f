//! Rebuilding state from disk: the newest valid snapshot, then every later record of the
//! log through the same `apply` the live actors use. Two callers: `Engine::open` (which
//! then starts actors on the result) and the offline tools (`reelbatch reconcile`,
//! `ledger verify|export`), which read a stopped server's data directory without
//! modifying a byte of it (`wal::read_only`, `wal::find_latest_snapshot`).

use std::collections::HashMap;
use std::path::Path;

use crate::delivery::access::AccessLog;
use crate::engine::accounts::AccountsState;
use crate::engine::batch::archive::ArchiveRef;
use crate::engine::batch::state::{BatchEvent, BatchState};
use crate::engine::events::Record;
use crate::engine::idempotency::ResponseStore;
use crate::engine::wallet::state::WalletState;
use crate::engine::{journal, snapshot, EngineConfig, EngineError};
use crate::ids::{BatchId, TenantId};
use crate::webhooks::payload;
use crate::webhooks::state::OutboxState;

/// The archived copy's `last_lsn` of a batch, if the archive holds it.
pub(crate) type Archived<'a> = &'a dyn Fn(BatchId) -> Result<Option<u64>, EngineError>;

/// Everything recovery rebuilds before any actor starts.
pub(crate) struct Rebuilt {
    /// Wallets by tenant.
    pub(crate) wallets: HashMap<TenantId, WalletState>,
    /// Batches (active and finished) by id.
    pub(crate) batches: HashMap<BatchId, BatchState>,
    /// Tenants and keys.
    pub(crate) accounts: AccountsState,
    /// Stored idempotent responses.
    pub(crate) responses: ResponseStore,
    /// Webhook endpoints and deliveries (events re-emitted by replay, as live).
    pub(crate) hooks: OutboxState,
    /// The access log.
    pub(crate) access: AccessLog,
    /// LSN of the snapshot loaded, if any.
    pub(crate) snapshot_lsn: Option<u64>,
    /// Records applied on top of the snapshot.
    pub(crate) events_replayed: u64,
    /// Highest LSN applied (the snapshot's, or the last replayed record's).
    pub(crate) last_lsn: u64,
    /// When recovery began: stored responses' retention counts from here.
    boot_ms: u64,
}

impl Rebuilt {
    /// The state of a snapshot (or the empty state without one) and every batch in the
    /// archive (the offline tools: they want every batch in memory). An archived batch
    /// replaces an older copy in the image (a crash between the archive's sync and the
    /// image's rename leaves both); the log's replay then skips its events, all at or
    /// below its `last_lsn`.
    pub(crate) fn with_archive(
        cfg: &EngineConfig,
        snap: Option<&wal::Snapshot>,
        archive: Vec<(ArchiveRef, BatchState)>,
    ) -> Result<Rebuilt, EngineError> {
        let mut r = Self::from_image(cfg, snap)?;
        for (_, state) in archive {
            if r.batches
                .get(&state.id)
                .is_some_and(|b| b.last_lsn > state.last_lsn)
            {
                continue;
            }
            r.batches.insert(state.id, state);
        }
        Ok(r)
    }

    /// Drops the image's copies of batches the archive holds (`archived`: the archived
    /// copy's `last_lsn`), as new or newer: the server keeps archived batches on disk only.
    /// The image's copy may be of a batch still running (a crash after a later snapshot
    /// archived it, before that snapshot's image was renamed): the archived copy is its
    /// final state, and replay skips the events in between.
    pub(crate) fn forget_archived(&mut self, archived: Archived<'_>) -> Result<(), EngineError> {
        let mut gone = Vec::new();
        for (id, b) in &self.batches {
            if archived(*id)?.is_some_and(|lsn| lsn >= b.last_lsn) {
                gone.push(*id);
            }
        }
        for id in gone {
            self.batches.remove(&id);
        }
        Ok(())
    }

    pub(crate) fn from_image(
        cfg: &EngineConfig,
        snap: Option<&wal::Snapshot>,
    ) -> Result<Rebuilt, EngineError> {
        let boot_ms = cfg.clock.now_ms();
        let hook_limits = crate::webhooks::outbox::limits(&cfg.webhooks);
        let mut r = Rebuilt {
            wallets: HashMap::new(),
            batches: HashMap::new(),
            accounts: AccountsState::default(),
            responses: ResponseStore::new(cfg.idempotency_retention_ms, cfg.idempotency_keys_max),
            hooks: OutboxState::new(hook_limits),
            access: AccessLog::new(cfg.access_log_max),
            snapshot_lsn: None,
            events_replayed: 0,
            last_lsn: 0,
            boot_ms,
        };
        let Some(snap) = snap else { return Ok(r) };
        let image = snapshot::decode(snap.payload.as_slice()).map_err(|e| EngineError::Record {
            lsn: snap.lsn,
            reason: format!("snapshot: {e}"),
        })?;
        if image.covered_lsn != snap.lsn {
            return Err(EngineError::Record {
                lsn: snap.lsn,
                reason: "snapshot header and image disagree on the LSN".into(),
            });
        }
        for w in image.wallets {
            r.wallets.insert(w.tenant, w);
        }
        for b in image.batches {
            r.batches.insert(b.id, b);
        }
        r.accounts = image.accounts;
        r.hooks = OutboxState::from_image(image.webhooks, hook_limits);
        r.access.restore(image.access, image.access_lsn);
        r.snapshot_lsn = Some(snap.lsn);
        r.last_lsn = snap.lsn;
        Ok(r)
    }

    /// The first LSN the log must supply.
    pub(crate) fn next_lsn(&self) -> u64 {
        self.snapshot_lsn.map_or(1, |l| l + 1)
    }

    /// Applies every frame of `replay` (records at or below what a part of the state
    /// already covers are skipped: a snapshot is fuzzy, each part has its own LSN).
    /// `archived` answers for batches not in memory: the archived copy's `last_lsn`.
    pub(crate) fn replay(
        &mut self,
        replay: &mut wal::Replay,
        archived: Archived<'_>,
    ) -> Result<(), EngineError> {
        while let Some(frame) = replay.next_frame()? {
            let lsn = frame.lsn;
            let record = journal::decode(frame.payload).map_err(|e| EngineError::Record {
                lsn,
                reason: e.to_string(),
            })?;
            self.apply(record, lsn, archived)?;
            self.last_lsn = lsn;
        }
        Ok(())
    }

    fn apply(
        &mut self,
        record: Record,
        lsn: u64,
        archived: Archived<'_>,
    ) -> Result<(), EngineError> {
        let hooks = &mut self.hooks;
        let applied = match record {
            Record::Wallet { tenant, event } => {
                let state = self
                    .wallets
                    .entry(tenant)
                    .or_insert_with(|| WalletState::new(tenant));
                let fresh = lsn > state.last_lsn;
                if fresh {
                    let before = state.available;
                    state.apply(&event, lsn);
                    // The same events the live actor emitted (see `webhooks`).
                    if hooks.listens(tenant) {
                        for e in payload::wallet_events(state, before, &event, lsn) {
                            hooks.emit(e);
                        }
                    }
                }
                fresh
            }
            Record::Access(e) => {
                let fresh = lsn > self.access.last_lsn;
                if fresh {
                    self.access.apply(e, lsn);
                }
                fresh
            }
            Record::Webhook(r) => {
                let fresh = lsn > hooks.last_lsn;
                if fresh {
                    hooks.apply(&r, lsn);
                }
                fresh
            }
            Record::Account(event) => {
                let fresh = lsn > self.accounts.last_lsn;
                if fresh {
                    self.accounts.apply(&event, lsn);
                }
                fresh
            }
            Record::Response(r) => {
                self.responses.insert(r, self.boot_ms);
                true
            }
            Record::Batch { batch, event } => match event {
                BatchEvent::Created {
                    tenant,
                    spec,
                    at_ms,
                } => match self.batches.entry(batch) {
                    // Archived (and so not in memory): its events are all in the archive.
                    std::collections::hash_map::Entry::Vacant(_)
                        if archived(batch)?.is_some_and(|last| lsn <= last) =>
                    {
                        false
                    }
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(BatchState::created(batch, tenant, *spec, at_ms, lsn));
                        true
                    }
                    std::collections::hash_map::Entry::Occupied(_) => false,
                },
                // A rejected batch is dropped; one already gone (not in a fuzzy snapshot
                // because it was dropped before the capture) is skipped.
                BatchEvent::Rejected { .. } => {
                    let fresh = self.batches.get(&batch).is_some_and(|s| lsn > s.last_lsn);
                    if fresh {
                        self.batches.remove(&batch);
                    }
                    fresh
                }
                event => {
                    if !self.batches.contains_key(&batch)
                        && archived(batch)?.is_some_and(|last| lsn <= last)
                    {
                        return Ok(());
                    }
                    let state =
                        self.batches
                            .get_mut(&batch)
                            .ok_or_else(|| EngineError::Record {
                                lsn,
                                reason: format!("event for unknown batch {batch}"),
                            })?;
                    let fresh = lsn > state.last_lsn;
                    if fresh {
                        state.apply(&event, lsn);
                        if hooks.listens(state.tenant) {
                            for e in payload::batch_events(state, &event, lsn) {
                                hooks.emit(e);
                            }
                        }
                    }
                    fresh
                }
            },
        };
        if applied {
            self.events_replayed += 1;
        }
        Ok(())
    }
}

/// A stopped server's state, read without modifying anything.
pub struct Offline {
    /// Wallets, ordered by tenant.
    pub wallets: Vec<WalletState>,
    /// Batches, ordered by id.
    pub batches: Vec<BatchState>,
    /// Tenants and keys.
    pub accounts: AccountsState,
    /// LSN of the snapshot loaded, if any.
    pub snapshot_lsn: Option<u64>,
    /// Newer snapshot files that failed validation (skipped), with the reason.
    pub snapshots_skipped: Vec<(std::path::PathBuf, String)>,
    /// Records applied on top of the snapshot.
    pub events_replayed: u64,
    /// Highest LSN read.
    pub last_lsn: u64,
    /// What the log's scan found after its last valid frame: a torn tail (never
    /// acknowledged; the server's next open cuts it) or corruption (the state stops there).
    pub wal_problem: Option<wal::Problem>,
}

/// Reads the data directory `data_dir` as the server would recover it, read-only.
pub fn load_offline(cfg: &EngineConfig, data_dir: &Path) -> Result<Offline, EngineError> {
    let lookup = wal::find_latest_snapshot(&crate::snapshot_dir(data_dir), cfg.snapshot_bytes_max)?;
    let archive = crate::engine::batch::archive::BatchArchive::read_only(data_dir)?;
    let mut r = Rebuilt::with_archive(cfg, lookup.snapshot.as_ref(), archive)?;
    let wal_dir = crate::wal_dir(data_dir);
    let (scan, mut replay) = match wal::read_only(&wal_dir, r.next_lsn()) {
        Ok(x) => x,
        Err(wal::Error::LsnUnavailable { requested, first }) => {
            return Err(EngineError::Gap {
                snapshot: requested - 1,
                first,
            })
        }
        Err(e) => return Err(e.into()),
    };
    r.replay(&mut replay, &|_| Ok(None))?;
    let mut wallets: Vec<WalletState> = r.wallets.into_values().collect();
    wallets.sort_by_key(|w| w.tenant);
    // The offline tools see every entry: filed pages go back in front of each tail.
    if wallets.iter().any(|w| w.filed.is_some()) {
        let pages = crate::engine::wallet::history::read_all(data_dir)?;
        for w in &mut wallets {
            crate::engine::wallet::history::expand(
                w,
                crate::engine::wallet::history::from_pages(&pages),
            )?;
        }
    }
    let mut batches: Vec<BatchState> = r.batches.into_values().collect();
    batches.sort_by_key(|b| b.id);
    Ok(Offline {
        wallets,
        batches,
        accounts: r.accounts,
        snapshot_lsn: r.snapshot_lsn,
        snapshots_skipped: lookup.skipped,
        events_replayed: r.events_replayed,
        last_lsn: r.last_lsn,
        wal_problem: scan.problem,
    })
}
