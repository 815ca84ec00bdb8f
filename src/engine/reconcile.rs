//! Reconciliation (SPEC §2): recompute every wallet from its ledger entries and every
//! batch's money from its items' outcomes, independently of the live counters, and report
//! every disagreement. The expected report is empty.
//!
//! Checks, per tenant: the hash chain verifies; walking the entries from zero reproduces
//! each entry's `available_after`/`held_after`; the sums by kind equal the lifetime
//! counters (`granted`, `spent`, `released`, `adjusted`, `expired`) and the final
//! `available`/`held`; conservation `available + held == granted + adjusted - spent -
//! expired`. Per batch: the ledger holds exactly `items × unit_price`; no item is settled
//! or released twice, or both; a settled item succeeded and a released one failed or was
//! canceled; a finished batch has every succeeded item settled, every other item released
//! and nothing remaining. This module only reads.

use std::collections::{HashMap, HashSet};

use crate::engine::batch::state::{BatchState, ItemStatus, Phase};
use crate::engine::wallet::ledger::{verify_chain, EntryKind};
use crate::engine::wallet::state::WalletState;
use crate::ids::{BatchId, TenantId};

/// One disagreement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discrepancy {
    pub tenant: TenantId,
    pub batch: Option<BatchId>,
    /// Stable name of the check that failed.
    pub check: &'static str,
    /// What was found, in words and figures.
    pub detail: String,
}

/// The report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub tenants_checked: usize,
    pub batches_checked: usize,
    pub discrepancies: Vec<Discrepancy>,
}

/// Most discrepancies listed (the count beyond is still reported in the last one).
pub const DISCREPANCIES_MAX: usize = 10_000;

#[derive(Default)]
struct BatchMoney {
    held: u128,
    holds: u32,
    settled: HashMap<u32, u64>,
    released: HashMap<u32, u64>,
    duplicate_items: Vec<u32>,
}

/// Reconciles captured wallets and batches. `young` are batches created after the batch
/// capture of a live reconciliation (their money may be in the wallets already): they are
/// not reported as money without a batch.
///
/// A live capture takes the batches first and the wallets second, so a wallet may be
/// ahead of a batch (an item settled after the batch was read) but never behind it: a
/// finished batch's settles and releases were all acknowledged before it finished.
pub fn reconcile(
    wallets: &[WalletState],
    batches: &[BatchState],
    young: &HashSet<BatchId>,
) -> Report {
    let mut r = Report::default();
    let push = |r: &mut Report, d: Discrepancy| {
        if r.discrepancies.len() < DISCREPANCIES_MAX {
            r.discrepancies.push(d);
        }
    };
    let mut money: HashMap<BatchId, BatchMoney> = HashMap::new();
    let mut tenants: HashSet<TenantId> = HashSet::new();
    for w in wallets {
        r.tenants_checked += 1;
        tenants.insert(w.tenant);
        let t = w.tenant;
        let d = |check, detail: String| Discrepancy {
            tenant: t,
            batch: None,
            check,
            detail,
        };
        if let Err(e) = verify_chain(t, &w.ledger) {
            push(&mut r, d("ledger_chain", e.to_string()));
        }
        // i128: a corrupted entry must produce a report, never an overflow.
        let (mut avail, mut held) = (0i128, 0i128);
        let (mut granted, mut spent, mut released, mut adjusted, mut expired) =
            (0i128, 0i128, 0i128, 0i128, 0i128);
        for e in &w.ledger {
            let a = e.amount as i128;
            match e.kind {
                EntryKind::TopUp => {
                    avail += a;
                    granted += a;
                }
                EntryKind::Hold => {
                    avail -= a;
                    held += a;
                }
                EntryKind::Settle => {
                    held -= a;
                    spent += a;
                }
                EntryKind::Release => {
                    held -= a;
                    avail += a;
                    released += a;
                }
                EntryKind::Adjust => {
                    let s = if e.negative { -a } else { a };
                    avail += s;
                    adjusted += s;
                }
                EntryKind::Expire => {
                    avail -= a;
                    expired += a;
                }
            }
            if avail != e.available_after as i128
                || held != e.held_after as i128
                || avail < 0
                || held < 0
            {
                push(
                    &mut r,
                    d(
                        "ledger_balances",
                        format!(
                            "entry {}: recomputed available {avail} held {held}, entry says {} and {}",
                            e.seq, e.available_after, e.held_after
                        ),
                    ),
                );
            }
            if let Some(b) = e.batch {
                let m = money.entry(b).or_default();
                match (e.kind, e.item) {
                    (EntryKind::Hold, _) => {
                        m.held += e.amount as u128;
                        m.holds += 1;
                    }
                    (EntryKind::Settle, Some(i)) => {
                        let again = m.settled.insert(i, e.amount).is_some();
                        if again {
                            m.duplicate_items.push(i);
                        }
                    }
                    (EntryKind::Release, Some(i)) => {
                        let again = m.released.insert(i, e.amount).is_some();
                        if again {
                            m.duplicate_items.push(i);
                        }
                    }
                    _ => {}
                }
            }
        }
        let counters = [
            ("available", avail, w.available as i128),
            ("held", held, w.held as i128),
            ("granted", granted, w.granted as i128),
            ("spent", spent, w.spent as i128),
            ("released", released, w.released as i128),
            ("adjusted", adjusted, w.adjusted as i128),
            ("expired", expired, w.expired as i128),
        ];
        for (name, from_ledger, counter) in counters {
            if from_ledger != counter {
                push(
                    &mut r,
                    d(
                        "wallet_vs_ledger",
                        format!("{name}: ledger sums to {from_ledger}, the wallet says {counter}"),
                    ),
                );
            }
        }
        let lhs = w.available as i128 + w.held as i128;
        let rhs = w.granted as i128 + w.adjusted as i128 - w.spent as i128 - w.expired as i128;
        if lhs != rhs {
            push(
                &mut r,
                d(
                    "conservation",
                    format!(
                        "available + held = {lhs}, granted + adjusted - spent - expired = {rhs}"
                    ),
                ),
            );
        }
    }
    for b in batches {
        r.batches_checked += 1;
        let t = b.tenant;
        let d = |check, detail: String| Discrepancy {
            tenant: t,
            batch: Some(b.id),
            check,
            detail,
        };
        if !tenants.contains(&t) {
            push(
                &mut r,
                d(
                    "batch_without_wallet",
                    "the batch's tenant has no wallet".into(),
                ),
            );
            continue;
        }
        let m = money.remove(&b.id).unwrap_or_default();
        let unit = b.spec.unit_price;
        let total = b.spec.total() as u128;
        if matches!(b.phase, Phase::Holding) {
            // Not yet accepted: the hold may or may not have reached the wallet.
            if m.holds > 1 || (m.holds == 1 && m.held != total) {
                push(
                    &mut r,
                    d("hold", format!("held {} for a batch of {total}", m.held)),
                );
            }
            continue;
        }
        if m.holds != 1 || m.held != total {
            push(
                &mut r,
                d(
                    "hold",
                    format!(
                        "{} holds of {} in the ledger for a batch of {total}",
                        m.holds, m.held
                    ),
                ),
            );
        }
        for i in &m.duplicate_items {
            push(
                &mut r,
                d(
                    "item_charged_twice",
                    format!("item {i} was settled or released twice"),
                ),
            );
        }
        let finished = matches!(b.phase, Phase::Finished { .. });
        for (i, it) in b.items.iter().enumerate() {
            let i = i as u32;
            let s = m.settled.get(&i);
            let rel = m.released.get(&i);
            let problem = match (it.status, s, rel) {
                (_, Some(_), Some(_)) => Some("settled and released"),
                (_, Some(a), _) if *a != unit => Some("settled at another price"),
                (_, _, Some(a)) if *a != unit => Some("released at another price"),
                (ItemStatus::Succeeded, None, None) if finished => {
                    Some("succeeded but not settled")
                }
                (ItemStatus::Succeeded, None, Some(_)) => Some("succeeded but released"),
                (ItemStatus::Failed | ItemStatus::Canceled, Some(_), None) => {
                    Some("failed or canceled but settled")
                }
                (ItemStatus::Failed | ItemStatus::Canceled, None, None) if finished => {
                    Some("failed or canceled but not released")
                }
                // (A running item of an active batch may already be settled: the wallet
                // was read after the batch.)
                (ItemStatus::Pending | ItemStatus::Running, Some(_), _)
                | (ItemStatus::Pending | ItemStatus::Running, _, Some(_))
                    if finished =>
                {
                    Some("the batch finished with the item unresolved")
                }
                (ItemStatus::Pending | ItemStatus::Running, None, None) if finished => {
                    Some("the batch finished with the item unresolved")
                }
                _ => None,
            };
            if let Some(p) = problem {
                push(
                    &mut r,
                    d(
                        "item_money",
                        format!("item {i} ({}): {p}", it.status.as_str()),
                    ),
                );
            }
        }
        if let Phase::Finished {
            settled, released, ..
        } = b.phase
        {
            let s: u128 = m.settled.values().map(|&a| a as u128).sum();
            let rl: u128 = m.released.values().map(|&a| a as u128).sum();
            if s != settled as u128 || rl != released as u128 || s + rl != total {
                push(
                    &mut r,
                    d(
                        "batch_totals",
                        format!(
                            "ledger settled {s} released {rl} of {total}; the batch says {settled} and {released}"
                        ),
                    ),
                );
            }
        }
    }
    // Money for batches that do not exist (a rejected batch never reaches the wallet).
    let mut orphans: Vec<(BatchId, BatchMoney)> = money.into_iter().collect();
    orphans.sort_by_key(|(b, _)| *b);
    for (b, m) in orphans {
        if young.contains(&b) {
            continue;
        }
        if m.holds > 0 || !m.settled.is_empty() || !m.released.is_empty() {
            let tenant = wallets
                .iter()
                .find(|w| w.ledger.iter().any(|e| e.batch == Some(b)))
                .map_or(TenantId(0), |w| w.tenant);
            push(
                &mut r,
                Discrepancy {
                    tenant,
                    batch: Some(b),
                    check: "money_without_batch",
                    detail: format!("{} credits held for a batch that does not exist", m.held),
                },
            );
        }
    }
    r
}

impl crate::engine::Engine {
    /// Reconciles the engine's current state (captured like a snapshot).
    pub async fn reconcile(&self) -> Result<Report, crate::engine::EngineError> {
        let batches = self.capture_batches().await?;
        let mut wallets = self.capture_all().await?;
        // Every entry counts: filed pages are read back (O(history), like the checks).
        for w in &mut wallets {
            self.expand_history(w)?;
        }
        let seen: HashSet<BatchId> = batches.iter().map(|b| b.id).collect();
        let young: HashSet<BatchId> = self
            .batch_ids()?
            .into_iter()
            .filter(|b| !seen.contains(b))
            .collect();
        Ok(reconcile(&wallets, &batches, &young))
    }
}
