//! Model-based property test of the wallet engine.
//!
//! Random sequences of every wallet operation (grants with and without expiry, holds,
//! settles, releases, adjustments, clock moves, expiry, thresholds and deliberate repeats of
//! earlier operation keys, same and changed) run against a real `Engine` on a temporary
//! directory with a manual clock, and against a deliberately simple reference model that
//! tracks every credit as an individual unit. After every step the outcome, the balances of
//! every wallet, the per-grant and per-hold breakdown of the wallet that acted, and the
//! engine's own invariants must agree with the model. At the end the engine is restarted
//! (pure WAL replay, snapshot + replay, final snapshot) and the recovered state must equal
//! the state before the restart exactly.
//!
//! In assertion messages `left` is the engine and `right` the model.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::strategy::Union;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use reelbatch::engine::wallet::state::{
    Balances, GrantKind, WalletCommand, WalletError, WalletState,
};
use reelbatch::engine::{Engine, EngineConfig, ManualClock, Recovery};
use reelbatch::ids::{BatchId, TenantId};

const TENANTS: u8 = 3;
const START_MS: u64 = 1_000;
/// Grant expiries sit on this grid, so equal expiries (ties) happen.
const EXPIRY_GRID_MS: u64 = 50;

// ---------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------

/// Which batch a settle or release names.
#[derive(Debug, Clone)]
enum BatchSel {
    /// A batch from the small pool (may have no hold: `UnknownHold`).
    Pool(u8),
    /// One of the tenant's existing holds (the pool's first batch when there is none).
    Existing(Index),
}

#[derive(Debug, Clone)]
enum Op {
    /// Top-up; `expiry` k = the k-th expiry grid point at or after now (k = 0 may be due now).
    Grant {
        t: u8,
        key: u8,
        kind: GrantKind,
        amount: u64,
        expiry: Option<u64>,
    },
    Hold {
        t: u8,
        batch: u8,
        amount: u64,
    },
    Settle {
        t: u8,
        batch: BatchSel,
        item: u32,
        amount: u64,
    },
    Release {
        t: u8,
        batch: BatchSel,
        item: u32,
        amount: u64,
    },
    Adjust {
        t: u8,
        key: u8,
        delta: i64,
        reason: u8,
    },
    /// Moves the manual clock forward (no command: expiry happens at the next command).
    Advance {
        ms: u64,
    },
    ExpireDue {
        t: u8,
    },
    Threshold {
        t: u8,
        threshold: Option<u64>,
    },
    /// Re-sends an earlier command; `mutate` 0/1 unchanged, 2 other amount, 3 other parameter.
    Repeat {
        pick: Index,
        mutate: u8,
    },
    /// `engine.snapshot_now()` (mixed variant only).
    Snapshot,
    /// Restart the engine, with or without a final snapshot (mixed variant only).
    Restart {
        final_snapshot: bool,
    },
}

fn amount(max: u64) -> impl Strategy<Value = u64> {
    prop_oneof![1 => Just(0u64), 30 => 1..=max]
}

fn item_amount() -> impl Strategy<Value = u64> {
    prop_oneof![1 => Just(0u64), 20 => 1..=5u64, 10 => 6..=20u64]
}

fn batch_sel() -> impl Strategy<Value = BatchSel> {
    prop_oneof![
        1 => (0u8..5).prop_map(BatchSel::Pool),
        4 => any::<Index>().prop_map(BatchSel::Existing),
    ]
}

fn op_strategy(with_restarts: bool) -> BoxedStrategy<Op> {
    // Tenant 1 gets most of the traffic (deeper states), 2 and 3 the rest.
    let t = || prop_oneof![6 => Just(1u8), 3 => Just(2u8), 2 => Just(3u8)];
    let mut arms: Vec<(u32, BoxedStrategy<Op>)> = vec![
        (
            8,
            (
                t(),
                0u8..8,
                // Adjustment-kind grants are refused (they come only from adjustments).
                prop_oneof![
                    10 => Just(GrantKind::Paid),
                    10 => Just(GrantKind::Promotional),
                    1 => Just(GrantKind::Adjustment),
                ],
                amount(50),
                prop::option::weighted(0.5, 0u64..=4),
            )
                .prop_map(|(t, key, kind, amount, expiry)| Op::Grant {
                    t,
                    key,
                    kind,
                    amount,
                    expiry,
                })
                .boxed(),
        ),
        (
            8,
            (
                t(),
                0u8..5,
                prop_oneof![1 => Just(0u64), 24 => 1..=12u64, 8 => 13..=80u64],
            )
                .prop_map(|(t, batch, amount)| Op::Hold { t, batch, amount })
                .boxed(),
        ),
        (
            5,
            (t(), batch_sel(), 0u32..=6, item_amount())
                .prop_map(|(t, batch, item, amount)| Op::Settle {
                    t,
                    batch,
                    item,
                    amount,
                })
                .boxed(),
        ),
        (
            4,
            (t(), batch_sel(), 0u32..=6, item_amount())
                .prop_map(|(t, batch, item, amount)| Op::Release {
                    t,
                    batch,
                    item,
                    amount,
                })
                .boxed(),
        ),
        (
            3,
            (
                t(),
                0u8..8,
                prop_oneof![1 => Just(0i64), 15 => 1..=40i64, 15 => -40..=-1i64],
                0u8..2,
            )
                .prop_map(|(t, key, delta, reason)| Op::Adjust {
                    t,
                    key,
                    delta,
                    reason,
                })
                .boxed(),
        ),
        (
            3,
            (1u64..=12).prop_map(|n| Op::Advance { ms: n * 10 }).boxed(),
        ),
        (1, t().prop_map(|t| Op::ExpireDue { t }).boxed()),
        (
            1,
            (t(), prop::option::of(0u64..100))
                .prop_map(|(t, threshold)| Op::Threshold { t, threshold })
                .boxed(),
        ),
        (
            5,
            (any::<Index>(), 0u8..4)
                .prop_map(|(pick, mutate)| Op::Repeat { pick, mutate })
                .boxed(),
        ),
    ];
    if with_restarts {
        arms.push((1, Just(Op::Snapshot).boxed()));
        arms.push((
            1,
            any::<bool>()
                .prop_map(|final_snapshot| Op::Restart { final_snapshot })
                .boxed(),
        ));
    }
    Union::new_weighted(arms).boxed()
}

fn ops_strategy(with_restarts: bool) -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op_strategy(with_restarts), 1..60)
}

fn request_id(key: u8) -> String {
    format!("req-{key}")
}

fn reason(r: u8) -> String {
    format!("reason-{r}")
}

fn batch_id(b: u8) -> BatchId {
    BatchId(1000 + u128::from(b))
}

// ---------------------------------------------------------------------------------------
// Reference model: every credit is a unit
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UnitState {
    Available,
    /// In a hold (the hold lists its units in draw order).
    Held,
    Spent,
    Expired,
    Debited,
}

#[derive(Debug, Clone)]
struct Unit {
    grant: u32,
    state: UnitState,
}

#[derive(Debug, Clone)]
struct MGrant {
    kind: GrantKind,
    expires_at_ms: Option<u64>,
    /// Expiry processed.
    expired: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PosState {
    Held,
    Settled,
    Released,
}

#[derive(Debug, Clone)]
struct MHold {
    amount: u64,
    /// Indices into `units`, in draw order, with what happened to each position.
    positions: Vec<(usize, PosState)>,
    /// item → (settled?, amount)
    items: BTreeMap<u32, (bool, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum MOp {
    Grant {
        kind: GrantKind,
        amount: u64,
        expires_at_ms: Option<u64>,
    },
    Adjust {
        delta: i64,
        reason: String,
    },
}

#[derive(Debug, Clone, Default)]
struct MWallet {
    grants: Vec<MGrant>,
    units: Vec<Unit>,
    holds: BTreeMap<BatchId, MHold>,
    ops: BTreeMap<String, MOp>,
    released: u64,
    threshold: Option<u64>,
}

/// What a command came to, as far as the model can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Ok,
    Insufficient { available: u64, needed: u64 },
    KeyReused,
    UnknownHold,
    HoldExceeded { remaining: u64, requested: u64 },
    ZeroAmount,
    Other(String),
}

impl From<&WalletError> for Outcome {
    fn from(e: &WalletError) -> Self {
        match e {
            WalletError::InsufficientCredits { available, needed } => Outcome::Insufficient {
                available: *available,
                needed: *needed,
            },
            WalletError::KeyReused { .. } => Outcome::KeyReused,
            WalletError::UnknownHold { .. } => Outcome::UnknownHold,
            WalletError::HoldExceeded {
                remaining,
                requested,
                ..
            } => Outcome::HoldExceeded {
                remaining: *remaining,
                requested: *requested,
            },
            WalletError::ZeroAmount => Outcome::ZeroAmount,
            other => Outcome::Other(format!("{other:?}")),
        }
    }
}

impl MWallet {
    fn count(&self, s: UnitState) -> u64 {
        self.units.iter().filter(|u| u.state == s).count() as u64
    }

    fn available(&self) -> u64 {
        self.count(UnitState::Available)
    }

    /// Draw-order key: expiry ascending (none last), promotional first, then grant id.
    fn draw_key(&self, grant: u32) -> (u64, u8, u32) {
        let g = &self.grants[grant as usize - 1];
        let rank = u8::from(g.kind != GrantKind::Promotional);
        (g.expires_at_ms.unwrap_or(u64::MAX), rank, grant)
    }

    /// Indices of `n` available units in draw order (caller checked there are enough).
    fn take_available(&self, n: u64) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.units.len())
            .filter(|&i| self.units[i].state == UnitState::Available)
            .collect();
        idx.sort_by_key(|&i| (self.draw_key(self.units[i].grant), i));
        idx.truncate(n as usize);
        idx
    }

    fn new_grant(&mut self, kind: GrantKind, amount: u64, expires_at_ms: Option<u64>) {
        self.grants.push(MGrant {
            kind,
            expires_at_ms,
            expired: false,
        });
        let id = self.grants.len() as u32;
        for _ in 0..amount {
            self.units.push(Unit {
                grant: id,
                state: UnitState::Available,
            });
        }
    }

    fn expire_due(&mut self, now: u64) {
        for (i, g) in self.grants.iter_mut().enumerate() {
            if !g.expired && g.expires_at_ms.is_some_and(|e| e <= now) {
                g.expired = true;
                let id = i as u32 + 1;
                for u in self.units.iter_mut().filter(|u| u.grant == id) {
                    if u.state == UnitState::Available {
                        u.state = UnitState::Expired;
                    }
                }
            }
        }
    }

    /// Applies `cmd` at `now` (expiry first, whatever the command's fate).
    fn exec(&mut self, cmd: &WalletCommand, now: u64) -> Outcome {
        self.expire_due(now);
        match cmd {
            WalletCommand::Grant {
                request_id,
                kind,
                amount,
                expires_at_ms,
            } => {
                let op = MOp::Grant {
                    kind: *kind,
                    amount: *amount,
                    expires_at_ms: *expires_at_ms,
                };
                if let Some(prev) = self.ops.get(request_id) {
                    return if *prev == op {
                        Outcome::Ok
                    } else {
                        Outcome::KeyReused
                    };
                }
                if *amount == 0 {
                    return Outcome::ZeroAmount;
                }
                if *kind == GrantKind::Adjustment {
                    return Outcome::KeyReused;
                }
                self.new_grant(*kind, *amount, *expires_at_ms);
                self.ops.insert(request_id.clone(), op);
                Outcome::Ok
            }
            WalletCommand::Hold { batch, amount } => {
                if let Some(h) = self.holds.get(batch) {
                    return if h.amount == *amount {
                        Outcome::Ok
                    } else {
                        Outcome::KeyReused
                    };
                }
                if *amount == 0 {
                    return Outcome::ZeroAmount;
                }
                let available = self.available();
                if available < *amount {
                    return Outcome::Insufficient {
                        available,
                        needed: *amount,
                    };
                }
                let taken = self.take_available(*amount);
                for &i in &taken {
                    self.units[i].state = UnitState::Held;
                }
                self.holds.insert(
                    *batch,
                    MHold {
                        amount: *amount,
                        positions: taken.into_iter().map(|i| (i, PosState::Held)).collect(),
                        items: BTreeMap::new(),
                    },
                );
                Outcome::Ok
            }
            WalletCommand::Settle {
                batch,
                item,
                amount,
            }
            | WalletCommand::Release {
                batch,
                item,
                amount,
            } => {
                let settle = matches!(cmd, WalletCommand::Settle { .. });
                let Some(h) = self.holds.get_mut(batch) else {
                    return Outcome::UnknownHold;
                };
                if let Some(&(was_settle, was_amount)) = h.items.get(item) {
                    return if was_settle == settle && was_amount == *amount {
                        Outcome::Ok
                    } else {
                        Outcome::KeyReused
                    };
                }
                if *amount == 0 {
                    return Outcome::ZeroAmount;
                }
                let held: Vec<usize> = (0..h.positions.len())
                    .filter(|&p| h.positions[p].1 == PosState::Held)
                    .collect();
                if (held.len() as u64) < *amount {
                    return Outcome::HoldExceeded {
                        remaining: held.len() as u64,
                        requested: *amount,
                    };
                }
                let n = *amount as usize;
                let chosen: Vec<usize> = if settle {
                    held[..n].to_vec()
                } else {
                    held[held.len() - n..].to_vec()
                };
                for p in chosen {
                    let unit = h.positions[p].0;
                    if settle {
                        h.positions[p].1 = PosState::Settled;
                        self.units[unit].state = UnitState::Spent;
                    } else {
                        h.positions[p].1 = PosState::Released;
                        let g = self.units[unit].grant;
                        self.units[unit].state = if self.grants[g as usize - 1].expired {
                            UnitState::Expired
                        } else {
                            UnitState::Available
                        };
                    }
                }
                h.items.insert(*item, (settle, *amount));
                if !settle {
                    self.released += *amount;
                }
                Outcome::Ok
            }
            WalletCommand::Adjust {
                request_id,
                delta,
                reason,
            } => {
                let op = MOp::Adjust {
                    delta: *delta,
                    reason: reason.clone(),
                };
                if let Some(prev) = self.ops.get(request_id) {
                    return if *prev == op {
                        Outcome::Ok
                    } else {
                        Outcome::KeyReused
                    };
                }
                if *delta == 0 {
                    return Outcome::ZeroAmount;
                }
                let magnitude = delta.unsigned_abs();
                if *delta > 0 {
                    self.new_grant(GrantKind::Adjustment, magnitude, None);
                } else {
                    let available = self.available();
                    if available < magnitude {
                        return Outcome::Insufficient {
                            available,
                            needed: magnitude,
                        };
                    }
                    for i in self.take_available(magnitude) {
                        self.units[i].state = UnitState::Debited;
                    }
                }
                self.ops.insert(request_id.clone(), op);
                Outcome::Ok
            }
            WalletCommand::ExpireDue => Outcome::Ok,
            WalletCommand::SetLowBalanceThreshold { threshold } => {
                self.threshold = *threshold;
                Outcome::Ok
            }
        }
    }

    fn balances(&self) -> Balances {
        let granted = self
            .units
            .iter()
            .filter(|u| self.grants[u.grant as usize - 1].kind != GrantKind::Adjustment)
            .count() as u64;
        let adjusted_up = self
            .units
            .iter()
            .filter(|u| self.grants[u.grant as usize - 1].kind == GrantKind::Adjustment)
            .count() as i64;
        Balances {
            available: self.available(),
            held: self.count(UnitState::Held),
            granted,
            spent: self.count(UnitState::Spent),
            released: self.released,
            adjusted: adjusted_up - self.count(UnitState::Debited) as i64,
            expired: self.count(UnitState::Expired),
            low_balance_threshold: self.threshold,
        }
    }

    /// Compares the engine's per-grant and per-hold breakdown with the model's.
    fn check_detail(&self, w: &WalletState) -> Result<(), TestCaseError> {
        prop_assert_eq!(w.grants.len(), self.grants.len(), "grant count");
        let mut per_grant = vec![[0u64; 5]; self.grants.len()];
        for u in &self.units {
            let slot = match u.state {
                UnitState::Available => 0,
                UnitState::Held => 1,
                UnitState::Spent => 2,
                UnitState::Expired => 3,
                UnitState::Debited => 4,
            };
            per_grant[u.grant as usize - 1][slot] += 1;
        }
        for (i, (g, m)) in w.grants.iter().zip(&self.grants).enumerate() {
            let c = per_grant[i];
            prop_assert_eq!(g.id as usize, i + 1, "grant ids are dense");
            prop_assert_eq!(
                (g.kind, g.expires_at_ms, g.is_expired),
                (m.kind, m.expires_at_ms, m.expired),
                "grant {} kind/expiry",
                g.id
            );
            prop_assert_eq!(
                [g.available, g.held, g.spent, g.expired, g.debited],
                c,
                "grant {} [available, held, spent, expired, debited]",
                g.id
            );
            prop_assert_eq!(g.amount, c.iter().sum::<u64>(), "grant {} amount", g.id);
        }
        let engine_batches: BTreeSet<BatchId> = w.holds.keys().copied().collect();
        let model_batches: BTreeSet<BatchId> = self.holds.keys().copied().collect();
        prop_assert_eq!(engine_batches, model_batches, "hold batches");
        for (batch, mh) in &self.holds {
            let h = &w.holds[batch];
            // Draws: consecutive positions of one grant, with what became of them.
            let mut draws: Vec<(u32, u64, u64, u64)> = Vec::new();
            for &(unit, st) in &mh.positions {
                let g = self.units[unit].grant;
                if draws.last().is_none_or(|d| d.0 != g) {
                    draws.push((g, 0, 0, 0));
                }
                let d = draws.last_mut().expect("just pushed");
                d.1 += 1;
                match st {
                    PosState::Held => {}
                    PosState::Settled => d.2 += 1,
                    PosState::Released => d.3 += 1,
                }
            }
            let engine_draws: Vec<(u32, u64, u64, u64)> = h
                .draws
                .iter()
                .map(|d| (d.grant, d.amount, d.settled, d.released))
                .collect();
            prop_assert_eq!(
                engine_draws,
                draws,
                "hold {:?} draws (grant, amount, settled, released)",
                batch
            );
            let settled: u64 = mh.items.values().filter(|m| m.0).map(|m| m.1).sum();
            let released: u64 = mh.items.values().filter(|m| !m.0).map(|m| m.1).sum();
            prop_assert_eq!(
                (h.amount, h.settled, h.released),
                (mh.amount, settled, released),
                "hold {:?} amount/settled/released",
                batch
            );
            let items: BTreeMap<u32, (bool, u64)> = h
                .items
                .iter()
                .map(|(i, m)| (*i, (m.settled, m.amount)))
                .collect();
            prop_assert_eq!(&items, &mh.items, "hold {:?} items", batch);
        }
        let engine_ops: BTreeSet<&String> = w.ops.keys().collect();
        let model_ops: BTreeSet<&String> = self.ops.keys().collect();
        prop_assert_eq!(engine_ops, model_ops, "operation keys");
        prop_assert_eq!(w.low_balance_threshold, self.threshold, "threshold");
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

fn fail(what: &str, e: impl std::fmt::Debug) -> TestCaseError {
    TestCaseError::fail(format!("{what}: {e:?}"))
}

struct Harness {
    // Declared before `dir`: dropped (stopped) before the directory is removed.
    engine: Engine,
    cfg: EngineConfig,
    clock: Arc<ManualClock>,
    models: Vec<MWallet>,
    history: Vec<(u8, WalletCommand)>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn new() -> Result<Harness, TestCaseError> {
        let dir = tempfile::tempdir().map_err(|e| fail("tempdir", e))?;
        let clock = Arc::new(ManualClock::default());
        clock.0.store(START_MS, Ordering::SeqCst);
        let mut cfg = EngineConfig::new(dir.path());
        cfg.clock = clock.clone();
        cfg.snapshot_every_events = u64::MAX;
        cfg.snapshot_every_ms = u64::MAX;
        cfg.arbiters = 2;
        // Small segments: rotation happens, and snapshots really drop old segments.
        cfg.segment_bytes_max = 4096;
        let (engine, _) = Engine::open(cfg.clone()).map_err(|e| fail("open", e))?;
        for t in 1..=TENANTS {
            let created = engine
                .open_wallet(TenantId(u128::from(t)))
                .await
                .map_err(|e| fail("open_wallet", e))?;
            prop_assert!(created, "wallet {} created", t);
        }
        Ok(Harness {
            engine,
            cfg,
            clock,
            models: vec![MWallet::default(); TENANTS as usize],
            history: Vec::new(),
            _dir: dir,
        })
    }

    fn now(&self) -> u64 {
        self.clock.0.load(Ordering::SeqCst)
    }

    fn batch(&self, t: u8, sel: &BatchSel) -> BatchId {
        match sel {
            BatchSel::Pool(b) => batch_id(*b),
            BatchSel::Existing(i) => {
                // Prefer holds with credits left; else any hold; else the pool's first.
                let holds = &self.models[t as usize - 1].holds;
                let open: Vec<BatchId> = holds
                    .iter()
                    .filter(|(_, h)| h.positions.iter().any(|p| p.1 == PosState::Held))
                    .map(|(b, _)| *b)
                    .collect();
                let all: Vec<BatchId> = holds.keys().copied().collect();
                let pick = if open.is_empty() { &all } else { &open };
                if pick.is_empty() {
                    batch_id(0)
                } else {
                    pick[i.index(pick.len())]
                }
            }
        }
    }

    /// The concrete command an op stands for (None for non-commands and empty repeats).
    fn command(&self, op: &Op) -> Option<(u8, WalletCommand)> {
        let now = self.now();
        Some(match *op {
            Op::Grant {
                t,
                key,
                kind,
                amount,
                expiry,
            } => (
                t,
                WalletCommand::Grant {
                    request_id: request_id(key),
                    kind,
                    amount,
                    expires_at_ms: expiry.map(|k| {
                        now.div_ceil(EXPIRY_GRID_MS) * EXPIRY_GRID_MS + k * EXPIRY_GRID_MS
                    }),
                },
            ),
            Op::Hold { t, batch, amount } => (
                t,
                WalletCommand::Hold {
                    batch: batch_id(batch),
                    amount,
                },
            ),
            Op::Settle {
                t,
                ref batch,
                item,
                amount,
            } => (
                t,
                WalletCommand::Settle {
                    batch: self.batch(t, batch),
                    item,
                    amount,
                },
            ),
            Op::Release {
                t,
                ref batch,
                item,
                amount,
            } => (
                t,
                WalletCommand::Release {
                    batch: self.batch(t, batch),
                    item,
                    amount,
                },
            ),
            Op::Adjust {
                t,
                key,
                delta,
                reason: r,
            } => (
                t,
                WalletCommand::Adjust {
                    request_id: request_id(key),
                    delta,
                    reason: reason(r),
                },
            ),
            Op::ExpireDue { t } => (t, WalletCommand::ExpireDue),
            Op::Threshold { t, threshold } => {
                (t, WalletCommand::SetLowBalanceThreshold { threshold })
            }
            Op::Repeat { ref pick, mutate } => {
                if self.history.is_empty() {
                    return None;
                }
                let (t, cmd) = self.history[pick.index(self.history.len())].clone();
                (t, mutated(cmd, mutate, now))
            }
            Op::Advance { .. } | Op::Snapshot | Op::Restart { .. } => return None,
        })
    }

    async fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Advance { ms } => {
                self.clock.0.fetch_add(ms, Ordering::SeqCst);
            }
            Op::Snapshot => {
                self.engine
                    .snapshot_now()
                    .await
                    .map_err(|e| fail("snapshot_now", e))?;
            }
            Op::Restart { final_snapshot } => {
                self.restart(final_snapshot).await?;
            }
            _ => {
                if let Some((t, cmd)) = self.command(op) {
                    self.run(t, cmd).await?;
                }
            }
        }
        self.check_all().await
    }

    async fn run(&mut self, t: u8, cmd: WalletCommand) -> Result<(), TestCaseError> {
        let now = self.now();
        let model = &mut self.models[t as usize - 1];
        let expected = model.exec(&cmd, now);
        let got = self
            .engine
            .execute(TenantId(u128::from(t)), cmd.clone())
            .await;
        let actual = match &got {
            Ok(_) => Outcome::Ok,
            Err(e) => Outcome::from(e),
        };
        prop_assert_eq!(&actual, &expected, "outcome of {:?} on tenant {}", cmd, t);
        if let Ok(out) = &got {
            prop_assert_eq!(
                out.balances,
                model.balances(),
                "balances in the outcome of {:?}",
                cmd
            );
        }
        let state = self
            .engine
            .wallet_state(TenantId(u128::from(t)))
            .await
            .map_err(|e| fail("wallet_state", e))?;
        model.check_detail(&state)?;
        self.history.push((t, cmd));
        Ok(())
    }

    async fn check_all(&self) -> Result<(), TestCaseError> {
        for t in 1..=TENANTS {
            let b = self
                .engine
                .balances(TenantId(u128::from(t)))
                .await
                .map_err(|e| fail("balances", e))?;
            prop_assert_eq!(
                b,
                self.models[t as usize - 1].balances(),
                "balances of tenant {}",
                t
            );
        }
        let inv = self.engine.check_invariants().await;
        prop_assert!(inv.is_ok(), "invariants: {:?}", inv);
        Ok(())
    }

    /// Captures, stops (with or without a final snapshot), reopens, compares.
    async fn restart(&mut self, final_snapshot: bool) -> Result<Recovery, TestCaseError> {
        let before = self
            .engine
            .capture_all()
            .await
            .map_err(|e| fail("capture_all", e))?;
        self.engine
            .shutdown(final_snapshot)
            .await
            .map_err(|e| fail("shutdown", e))?;
        let (engine, recovery) = Engine::open(self.cfg.clone()).map_err(|e| fail("reopen", e))?;
        self.engine = engine;
        let after = self
            .engine
            .capture_all()
            .await
            .map_err(|e| fail("capture_all after restart", e))?;
        compare_states(&before, &after)?;
        if final_snapshot {
            prop_assert_eq!(
                recovery.events_replayed,
                0,
                "nothing to replay after a final snapshot"
            );
            prop_assert!(recovery.snapshot_lsn.is_some(), "final snapshot loaded");
        }
        self.check_all().await?;
        Ok(recovery)
    }
}

/// Changes an earlier command for a deliberate repeat.
fn mutated(cmd: WalletCommand, mutate: u8, now: u64) -> WalletCommand {
    if mutate < 2 {
        return cmd;
    }
    let other_amount = |a: u64| if a % 2 == 0 { a + 1 } else { a - 1 };
    match cmd {
        WalletCommand::Grant {
            request_id,
            kind,
            amount,
            expires_at_ms,
        } => {
            let (kind, amount, expires_at_ms) = if mutate == 2 {
                (kind, other_amount(amount), expires_at_ms)
            } else if expires_at_ms.is_some() {
                (kind, amount, None)
            } else {
                let flipped = if kind == GrantKind::Paid {
                    GrantKind::Promotional
                } else {
                    GrantKind::Paid
                };
                (flipped, amount, Some(now + 10 * EXPIRY_GRID_MS))
            };
            WalletCommand::Grant {
                request_id,
                kind,
                amount,
                expires_at_ms,
            }
        }
        WalletCommand::Hold { batch, amount } => WalletCommand::Hold {
            batch,
            amount: other_amount(amount),
        },
        WalletCommand::Settle {
            batch,
            item,
            amount,
        } => {
            if mutate == 2 {
                WalletCommand::Settle {
                    batch,
                    item,
                    amount: other_amount(amount),
                }
            } else {
                WalletCommand::Release {
                    batch,
                    item,
                    amount,
                }
            }
        }
        WalletCommand::Release {
            batch,
            item,
            amount,
        } => {
            if mutate == 2 {
                WalletCommand::Release {
                    batch,
                    item,
                    amount: other_amount(amount),
                }
            } else {
                WalletCommand::Settle {
                    batch,
                    item,
                    amount,
                }
            }
        }
        WalletCommand::Adjust {
            request_id,
            delta,
            reason,
        } => {
            if mutate == 2 {
                WalletCommand::Adjust {
                    request_id,
                    delta: -delta,
                    reason,
                }
            } else {
                WalletCommand::Adjust {
                    request_id,
                    delta,
                    reason: format!("{reason}-changed"),
                }
            }
        }
        WalletCommand::ExpireDue => WalletCommand::ExpireDue,
        WalletCommand::SetLowBalanceThreshold { threshold } => {
            WalletCommand::SetLowBalanceThreshold {
                threshold: match threshold {
                    Some(x) => Some(x + 1),
                    None => Some(0),
                },
            }
        }
    }
}

/// Deep equality of two captures, reporting the first wallet and field that differ.
fn compare_states(before: &[WalletState], after: &[WalletState]) -> Result<(), TestCaseError> {
    prop_assert_eq!(before.len(), after.len(), "wallet count after restart");
    for (b, a) in before.iter().zip(after) {
        if b == a {
            continue;
        }
        let t = b.tenant;
        prop_assert_eq!(b.tenant, a.tenant, "tenant order");
        prop_assert_eq!(b.balances(), a.balances(), "{:?} balances after restart", t);
        prop_assert_eq!(&b.grants, &a.grants, "{:?} grants after restart", t);
        prop_assert_eq!(&b.holds, &a.holds, "{:?} holds after restart", t);
        prop_assert_eq!(&b.ops, &a.ops, "{:?} ops after restart", t);
        prop_assert_eq!(
            b.ledger.len(),
            a.ledger.len(),
            "{:?} ledger length after restart",
            t
        );
        for (eb, ea) in b.ledger.iter().zip(&a.ledger) {
            prop_assert_eq!(eb, ea, "{:?} ledger entry after restart", t);
        }
        prop_assert_eq!(b.last_lsn, a.last_lsn, "{:?} last_lsn after restart", t);
        prop_assert!(false, "{:?}: states differ after restart", t);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------

fn run_property<S: Strategy>(
    cases: u32,
    strategy: S,
    case: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    // PROPTEST_CASES overrides the per-property default (for longer runs).
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    if let Err(e) = runner.run(&strategy, case) {
        panic!("{e}");
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().expect("tokio runtime")
}

/// Ops, then restart with pure WAL replay (no snapshot anywhere).
#[test]
fn model_then_wal_replay() {
    let rt = runtime();
    run_property(48, ops_strategy(false), |ops| {
        rt.block_on(async {
            let mut h = Harness::new().await?;
            for op in &ops {
                h.step(op).await?;
            }
            let rec = h.restart(false).await?;
            prop_assert_eq!(rec.snapshot_lsn, None, "no snapshot was taken");
            prop_assert!(rec.events_replayed > 0, "the log was replayed");
            h.engine
                .shutdown(false)
                .await
                .map_err(|e| fail("shutdown", e))?;
            Ok(())
        })
    });
}

/// Ops with a snapshot taken in the middle, then restart: snapshot + replay of the rest.
#[test]
fn model_snapshot_mid_then_replay() {
    let rt = runtime();
    run_property(48, (ops_strategy(false), any::<Index>()), |(ops, at)| {
        rt.block_on(async {
            let mut h = Harness::new().await?;
            let at = at.index(ops.len() + 1);
            let mut snap = None;
            for (i, op) in ops.iter().enumerate() {
                if i == at {
                    snap = Some(
                        h.engine
                            .snapshot_now()
                            .await
                            .map_err(|e| fail("snapshot", e))?,
                    );
                }
                h.step(op).await?;
            }
            if at == ops.len() {
                snap = Some(
                    h.engine
                        .snapshot_now()
                        .await
                        .map_err(|e| fail("snapshot", e))?,
                );
            }
            let rec = h.restart(false).await?;
            prop_assert_eq!(rec.snapshot_lsn, snap, "the mid-run snapshot was loaded");
            h.engine
                .shutdown(false)
                .await
                .map_err(|e| fail("shutdown", e))?;
            Ok(())
        })
    });
}

/// Ops, then restart from a final snapshot.
#[test]
fn model_then_final_snapshot() {
    let rt = runtime();
    run_property(48, ops_strategy(false), |ops| {
        rt.block_on(async {
            let mut h = Harness::new().await?;
            for op in &ops {
                h.step(op).await?;
            }
            h.restart(true).await?;
            h.engine
                .shutdown(false)
                .await
                .map_err(|e| fail("shutdown", e))?;
            Ok(())
        })
    });
}

/// Snapshots and restarts (either kind) anywhere in the sequence, work continuing after
/// each; a last restart at the end.
#[test]
fn model_with_snapshots_and_restarts_anywhere() {
    let rt = runtime();
    run_property(32, (ops_strategy(true), any::<bool>()), |(ops, last)| {
        rt.block_on(async {
            let mut h = Harness::new().await?;
            for op in &ops {
                h.step(op).await?;
            }
            h.restart(last).await?;
            // The log keeps going after the restarts: one more command, one more restart.
            h.run(1, WalletCommand::ExpireDue).await?;
            h.check_all().await?;
            h.restart(false).await?;
            h.engine
                .shutdown(false)
                .await
                .map_err(|e| fail("shutdown", e))?;
            Ok(())
        })
    });
}
