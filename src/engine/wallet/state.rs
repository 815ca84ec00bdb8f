//! One tenant's wallet: state, the commands it accepts, the events it records, `decide`
//! (validate a command against the state, produce the events; never mutates) and `apply`
//! (the one function that changes the state, used live and in replay).
//!
//! Money rules (SPEC §2) as code:
//! - `available + held == granted + adjusted - spent - expired`, nothing negative.
//! - Per hold: `amount == settled + released + remaining`; a draw per grant, same identity.
//! - Per grant: `amount == available + held + spent + expired + debited`.
//! - A hold draws from grants soonest-expiring first, promotional before paid at equal
//!   expiry, then oldest grant first. Settles consume a hold's draws in draw order (the
//!   soonest-expiring credits pay first); releases return credits from the last draw
//!   backwards, to the grant they came from; if that grant has expired meanwhile the
//!   returned credits expire at once, with their own ledger entry.

use std::collections::{BTreeMap, HashMap};

use crate::engine::wallet::history::{self, Filed, FiledPage};
use crate::engine::wallet::ledger::{chain_hash, EntryKind, LedgerEntry, GENESIS_HASH};
use crate::ids::{BatchId, TenantId};
use crate::money;

/// Where credits came from.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub enum GrantKind {
    /// Bought credits.
    Paid,
    /// Free credits (drawn before paid ones at equal expiry).
    Promotional,
    /// Created by an upward admin adjustment.
    Adjustment,
}

impl GrantKind {
    /// The name clients see.
    pub fn as_str(self) -> &'static str {
        match self {
            GrantKind::Paid => "paid",
            GrantKind::Promotional => "promotional",
            GrantKind::Adjustment => "adjustment",
        }
    }
    /// Draw priority at equal expiry: lower first.
    fn rank(self) -> u8 {
        match self {
            GrantKind::Promotional => 0,
            GrantKind::Paid | GrantKind::Adjustment => 1,
        }
    }
}

/// A lot of credits with one origin and one expiry.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Grant {
    /// 1-based per tenant; `grants[id - 1]`.
    pub id: u32,
    /// Origin.
    pub kind: GrantKind,
    /// As granted.
    pub amount: u64,
    /// Part that can be held now.
    pub available: u64,
    /// Part sitting in holds.
    pub held: u64,
    /// Part settled (paid for successes).
    pub spent: u64,
    /// Part that expired.
    pub expired: u64,
    /// Part taken away by downward adjustments.
    pub debited: u64,
    /// Expiry (ms since epoch); `None` never expires.
    pub expires_at_ms: Option<u64>,
    /// The expiry has been processed: nothing returns to `available` any more.
    pub is_expired: bool,
}

/// Credits of one hold that came from one grant.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Draw {
    /// The grant they came from.
    pub grant: u32,
    /// Drawn at hold time.
    pub amount: u64,
    /// Of which settled.
    pub settled: u64,
    /// Of which released.
    pub released: u64,
}

/// Sums over the grants retired from memory (`WalletState::retire_grants`). Each had
/// nothing available and nothing held, and either expired or never expires: no event can
/// name it again.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct RetiredGrants {
    /// How many (they are grants 1..=count).
    pub count: u32,
    /// Sum of their amounts.
    pub amount: u64,
    /// Sum of their amounts, adjustment grants left out (`granted`).
    pub granted: u64,
    /// Sums of their parts.
    pub spent: u64,
    pub expired: u64,
    pub debited: u64,
}

/// What `decide` may need beyond memory: the filed history of this wallet.
pub trait Recall {
    /// Ledger entry `seq` (in memory or filed).
    fn entry(&self, seq: u64) -> Result<LedgerEntry, WalletError>;
    /// A request-keyed operation whose entry is filed (not in `ops` any more).
    fn op(
        &self,
        request_id: &str,
    ) -> Result<Option<crate::engine::wallet::op_index::OpRow>, WalletError>;
}

impl Grant {
    /// Retired from memory: nothing available, nothing held, and no expiry still to come.
    fn is_final(&self) -> bool {
        self.available == 0 && self.held == 0 && (self.is_expired || self.expires_at_ms.is_none())
    }

    /// Nothing can be drawn from it ever again: it expired (credits released back to it
    /// expire at once), or nothing is available and nothing is held (only a release, of
    /// credits held from this grant, ever adds to `available`).
    fn is_dead(&self) -> bool {
        self.is_expired || (self.available == 0 && self.held == 0)
    }
}

impl Draw {
    fn remaining(&self) -> u64 {
        self.amount - self.settled - self.released
    }
}

/// What happened to one item of a hold (kept so repeats return the original outcome).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ItemMove {
    /// Settled (true) or released (false).
    pub settled: bool,
    /// Amount moved.
    pub amount: u64,
    /// Ledger entry of the move.
    pub ledger_seq: u64,
}

/// Credits held for one batch.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Hold {
    /// Held at creation (the batch's quote).
    pub amount: u64,
    /// Settled so far.
    pub settled: u64,
    /// Released so far.
    pub released: u64,
    /// Per-grant origin, in draw order.
    pub draws: Vec<Draw>,
    /// Outcome per item, for exactly-once settle/release.
    pub items: HashMap<u32, ItemMove>,
    /// Ledger entry of the hold.
    pub ledger_seq: u64,
}

impl Hold {
    /// Credits still held.
    pub fn remaining(&self) -> u64 {
        self.amount - self.settled - self.released
    }
}

/// An operation on a wallet. Every money operation carries its operation key: the request
/// id (grant, adjust), the batch (hold) or the (batch, item) pair (settle, release).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalletCommand {
    /// Top up.
    Grant {
        request_id: String,
        kind: GrantKind,
        amount: u64,
        expires_at_ms: Option<u64>,
    },
    /// Pre-check and hold a batch's quote (all or nothing).
    Hold { batch: BatchId, amount: u64 },
    /// Charge one succeeded item.
    Settle {
        batch: BatchId,
        item: u32,
        amount: u64,
    },
    /// Refund one failed or canceled item.
    Release {
        batch: BatchId,
        item: u32,
        amount: u64,
    },
    /// Admin adjustment (`delta` ≠ 0).
    Adjust {
        request_id: String,
        delta: i64,
        reason: String,
    },
    /// Expire grants whose expiry has passed (also done before every other command).
    ExpireDue,
    /// Threshold for the `wallet.low_balance` notification.
    SetLowBalanceThreshold { threshold: Option<u64> },
}

/// A fact recorded in the log. Carries every decision (which grants a hold drew from,
/// which a settle consumed), so `apply` never chooses anything.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum WalletEvent {
    /// The wallet exists (empty).
    Opened { at_ms: u64 },
    /// A top-up created grant `grant`.
    Granted {
        request_id: String,
        grant: u32,
        kind: GrantKind,
        amount: u64,
        expires_at_ms: Option<u64>,
        at_ms: u64,
    },
    /// A hold drew `draws` (grant, amount).
    Held {
        batch: BatchId,
        amount: u64,
        draws: Vec<(u32, u64)>,
        at_ms: u64,
    },
    /// An item was settled out of `parts` of the hold's draws.
    Settled {
        batch: BatchId,
        item: u32,
        amount: u64,
        parts: Vec<(u32, u64)>,
        at_ms: u64,
    },
    /// An item was released back to the grants in `parts`.
    Released {
        batch: BatchId,
        item: u32,
        amount: u64,
        parts: Vec<(u32, u64)>,
        at_ms: u64,
    },
    /// An upward adjustment (creates grant `grant`) or a downward one (takes `parts`).
    Adjusted {
        request_id: String,
        delta: i64,
        reason: String,
        grant: Option<u32>,
        parts: Vec<(u32, u64)>,
        at_ms: u64,
    },
    /// Grant `grant` expired with `amount` still available.
    GrantExpired { grant: u32, amount: u64, at_ms: u64 },
    /// Low-balance threshold changed.
    ThresholdSet { threshold: Option<u64>, at_ms: u64 },
}

/// Why a command was refused. Nothing was recorded for a refused command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalletError {
    /// No wallet for this tenant.
    #[error("no wallet for this tenant")]
    UnknownWallet,
    /// The pre-check failed: nothing was held.
    #[error("insufficient credits: {available} available, {needed} needed")]
    InsufficientCredits { available: u64, needed: u64 },
    /// The operation key was used before with different parameters.
    #[error("operation key {key} was already used with different parameters")]
    KeyReused { key: String },
    /// Settle/release of a batch that has no hold.
    #[error("no hold for batch {batch}")]
    UnknownHold { batch: BatchId },
    /// Settle/release beyond what the hold still has.
    #[error("hold of batch {batch} has {remaining} credits left, {requested} requested")]
    HoldExceeded {
        batch: BatchId,
        remaining: u64,
        requested: u64,
    },
    /// Amount zero (or a zero adjustment).
    #[error("amount must be positive")]
    ZeroAmount,
    /// A total would leave the u64 range.
    #[error("amount out of range")]
    OutOfRange,
    /// The log refused the event (poisoned or closed): nothing was changed.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl From<money::OutOfRange> for WalletError {
    fn from(_: money::OutOfRange) -> Self {
        WalletError::OutOfRange
    }
}

/// Balances as clients read them (SPEC §11 `GET /v1/wallet`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Balances {
    pub available: u64,
    pub held: u64,
    pub granted: u64,
    pub spent: u64,
    pub released: u64,
    pub adjusted: i64,
    pub expired: u64,
    pub low_balance_threshold: Option<u64>,
}

/// What a command produced: new events to record, or the original outcome of a repeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Record these events, in order.
    Record(Vec<WalletEvent>),
    /// Repeat of an earlier operation: its ledger entry (`None` when it has none).
    Repeat(Option<u64>),
}

/// One tenant's wallet.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WalletState {
    /// Owner.
    pub tenant: TenantId,
    /// Can be held now.
    pub available: u64,
    /// In holds.
    pub held: u64,
    /// Lifetime top-ups.
    pub granted: u64,
    /// Lifetime settled.
    pub spent: u64,
    /// Lifetime released (refunds).
    pub released: u64,
    /// Lifetime net admin adjustments (the one signed figure).
    pub adjusted: i64,
    /// Lifetime expired.
    pub expired: u64,
    /// `wallet.low_balance` threshold.
    pub low_balance_threshold: Option<u64>,
    /// Grants still in memory, `grants[id - 1 - retired count]`: every grant but the
    /// retired ones (`retired`).
    pub grants: Vec<Grant>,
    /// The leading grants that left memory because nothing can ever change them again
    /// (`retire_grants`): how many, and their sums (conservation checks use them). `None`
    /// until the first retirement, so a quiet wallet carries one pointer.
    pub retired: Option<Box<RetiredGrants>>,
    /// The highest grant id whose creating entry is filed: a grant retires only after its
    /// top-up's key went to the operation index with the grant's kind and expiry, so a
    /// repeat of an old top-up is still checked in full.
    pub grants_filed: u32,
    /// Holds by batch. A finished hold stays (repeats of its items are recognised) until
    /// its batch is archived: then nothing can send it a command any more and the snapshot
    /// retires it (`retire_holds`); its entries stay in the ledger.
    pub holds: HashMap<BatchId, Hold>,
    /// Request-keyed operations (top-ups, adjustments) → their ledger entry, for entries
    /// in memory; filed ones are in the operation index (`wallet::op_index`).
    pub ops: HashMap<String, u64>,
    /// The ledger's entries after the filed ones: `ledger[seq - 1 - filed entries]`.
    pub ledger: Vec<LedgerEntry>,
    /// Older entries moved to the history file (`wallet::history`); `None` until the first
    /// filing, so a quiet wallet carries one pointer.
    pub filed: Option<Box<Filed>>,
    /// LSN of the last event applied (replay skips events at or below it).
    pub last_lsn: u64,
    /// Sum of all grants' amounts: the credits ever created. Derived from `grants` and
    /// kept so a top-up's overflow check is O(1), not a pass over every grant. Not
    /// archived; `restore_derived` rebuilds it after a snapshot is read.
    #[rkyv(with = rkyv::with::Skip)]
    pub created: u64,
    /// Earliest `expires_at_ms` among grants not expired yet (`u64::MAX`: none). Every
    /// command first looks for due expiries; this lets it skip the pass over every grant
    /// when none is due. Derived like `created`.
    #[rkyv(with = rkyv::with::Skip)]
    pub next_expiry_ms: u64,
    /// How many grants, from the first, are spent for good (`Grant::is_dead`): a hold's
    /// draw order looks only at the grants after them, so a tenant with a long history of
    /// used-up top-ups does not pay for it on every hold. Only grows. Derived like
    /// `created`.
    #[rkyv(with = rkyv::with::Skip)]
    pub dead_grants: u32,
}

impl WalletState {
    /// An empty wallet.
    pub fn new(tenant: TenantId) -> Self {
        WalletState {
            tenant,
            available: 0,
            held: 0,
            granted: 0,
            spent: 0,
            released: 0,
            adjusted: 0,
            expired: 0,
            low_balance_threshold: None,
            grants: Vec::new(),
            retired: None,
            grants_filed: 0,
            holds: HashMap::new(),
            ops: HashMap::new(),
            ledger: Vec::new(),
            filed: None,
            last_lsn: 0,
            created: 0,
            next_expiry_ms: u64::MAX,
            dead_grants: 0,
        }
    }

    /// Advances `dead_grants` over grants that became dead (amortised O(1) per event).
    fn advance_dead_grants(&mut self) {
        while let Some(g) = self.grants.get(self.dead_grants as usize) {
            if !g.is_dead() {
                break;
            }
            self.dead_grants += 1;
        }
    }

    /// Rebuilds the fields derived from `grants` (not archived in snapshots).
    pub fn restore_derived(&mut self) {
        let retired = self.retired.as_ref().map_or(0, |r| r.amount);
        self.created = self
            .grants
            .iter()
            .fold(retired, |acc, g| money::add(acc, g.amount));
        self.next_expiry_ms = self.earliest_expiry();
        self.dead_grants = 0;
        self.advance_dead_grants();
    }

    /// Earliest expiry among grants not expired yet (`u64::MAX`: none).
    fn earliest_expiry(&self) -> u64 {
        self.grants
            .iter()
            .filter(|g| !g.is_expired)
            .filter_map(|g| g.expires_at_ms)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Current balances.
    pub fn balances(&self) -> Balances {
        Balances {
            available: self.available,
            held: self.held,
            granted: self.granted,
            spent: self.spent,
            released: self.released,
            adjusted: self.adjusted,
            expired: self.expired,
            low_balance_threshold: self.low_balance_threshold,
        }
    }

    /// Entries filed to the history file.
    pub fn filed_entries(&self) -> u64 {
        self.filed.as_ref().map_or(0, |f| f.entries())
    }

    /// Entries in the whole ledger (filed and in memory): the last seq.
    pub fn ledger_len(&self) -> u64 {
        self.filed_entries() + self.ledger.len() as u64
    }

    /// Ledger entry `seq` (1-based) when it is in memory; a filed one is `None` (see
    /// `filed_page_of`).
    pub fn entry(&self, seq: u64) -> Option<&LedgerEntry> {
        seq.checked_sub(self.filed_entries() + 1)
            .and_then(|i| self.ledger.get(i as usize))
    }

    /// The filed page holding entry `seq`, if it is filed.
    pub fn filed_page_of(&self, seq: u64) -> Option<FiledPage> {
        self.filed.as_ref().and_then(|f| f.page_of(seq))
    }

    /// The filed pages a ledger read of entries with seq in `(after, after + limit]` needs.
    pub fn filed_pages_for(&self, after: u64, limit: usize) -> Vec<FiledPage> {
        let Some(f) = &self.filed else {
            return Vec::new();
        };
        let last = after.saturating_add(limit as u64);
        f.pages
            .iter()
            .filter(|p| p.last_seq() > after && p.first_seq <= last)
            .copied()
            .collect()
    }

    /// The filed pages a statement for `[from_ms, to_ms)` needs: from the last page that
    /// starts before `from_ms` (it may hold the opening balance) to the last that starts
    /// before `to_ms`.
    pub fn filed_pages_between(&self, from_ms: u64, to_ms: u64) -> Vec<FiledPage> {
        let Some(f) = &self.filed else {
            return Vec::new();
        };
        let start = f
            .pages
            .partition_point(|p| p.first_at_ms < from_ms)
            .saturating_sub(1);
        let end = f.pages.partition_point(|p| p.first_at_ms < to_ms);
        f.pages.get(start..end.max(start)).unwrap_or(&[]).to_vec()
    }

    /// The in-memory entries a filing would move now (all but the last `TAIL_KEEP`), or
    /// nothing while there are fewer than `PAGE_ENTRIES_MIN` of them.
    pub fn due_for_filing(&self) -> &[LedgerEntry] {
        let n = self.ledger.len().saturating_sub(history::TAIL_KEEP);
        if n < history::PAGE_ENTRIES_MIN {
            return &[];
        }
        &self.ledger[..n]
    }

    /// Finished holds among `candidates` (their batches are archived, so no command can
    /// name them again): what `retire_holds` may remove.
    pub fn retirable_holds(&self, candidates: impl Fn(BatchId) -> bool) -> Vec<BatchId> {
        self.holds
            .iter()
            .filter(|(b, h)| h.remaining() == 0 && candidates(**b))
            .map(|(b, _)| *b)
            .collect()
    }

    /// Removes finished holds whose batches are archived (see `holds`). Their credits have
    /// all been settled or released, so no balance or grant changes: only memory.
    pub fn retire_holds(&mut self, batches: &[BatchId]) {
        for b in batches {
            let h = self.holds.remove(b).expect("a retired hold exists");
            assert_eq!(h.remaining(), 0, "only finished holds retire (batch {b})");
            assert_eq!(
                h.settled + h.released,
                h.amount,
                "a finished hold moved all it held (batch {b})"
            );
        }
    }

    /// `page` (written and synced) holds the oldest in-memory entries: they leave memory.
    /// The same call on the live wallet and on its snapshot copy: both hold those entries
    /// at the front (the ledger only grows).
    pub fn filed_ledger(&mut self, page: FiledPage) {
        let k = page.entries as usize;
        assert_eq!(
            page.first_seq,
            self.filed_entries() + 1,
            "pages are filed in order"
        );
        assert!(
            k >= 1 && k < self.ledger.len(),
            "a page moves entries and the tail keeps at least one"
        );
        let last = &self.ledger[k - 1];
        assert_eq!(
            (last.seq, last.at_ms, self.ledger[0].at_ms),
            (page.last_seq(), page.last_at_ms, page.first_at_ms),
            "the page holds this wallet's oldest in-memory entries"
        );
        let last_hash = last.hash;
        let filed = self.filed.get_or_insert_with(|| {
            Box::new(Filed {
                pages: Vec::new(),
                last_hash: GENESIS_HASH,
            })
        });
        filed.pages.push(page);
        filed.last_hash = last_hash;
        let last_seq = page.last_seq();
        for e in self.ledger.drain(..k) {
            if matches!(e.kind, EntryKind::TopUp | EntryKind::Adjust) {
                if let Some(g) = e.grant {
                    self.grants_filed = self.grants_filed.max(g);
                }
            }
        }
        // Their keys are in the operation index now (the snapshot added them first).
        self.ops.retain(|_, seq| *seq > last_seq);
        // The tail's capacity grew with the entries just moved: give it back.
        self.ledger.shrink_to_fit();
    }

    /// Credits ever created (top-ups and upward adjustments) stay within `u64`, so every
    /// figure bounded by them (available, held, spent, expired, debited) cannot overflow.
    fn check_creation(&self, amount: u64) -> Result<(), WalletError> {
        money::try_add(self.created, amount)?;
        Ok(())
    }

    /// The time of the last ledger entry: decisions never go back in time, so the ledger
    /// is in time order and statements can cut it by time.
    pub fn last_at_ms(&self) -> u64 {
        match (self.ledger.last(), &self.filed) {
            (Some(e), _) => e.at_ms,
            (None, Some(f)) => f.pages.last().map_or(0, |p| p.last_at_ms),
            (None, None) => 0,
        }
    }

    /// Grant ids in draw order: soonest expiry, promotional first, oldest first.
    fn draw_order(&self) -> Vec<usize> {
        let mut idx: Vec<usize> = (self.dead_grants as usize..self.grants.len())
            .filter(|&i| self.grants[i].available > 0 && !self.grants[i].is_expired)
            .collect();
        idx.sort_by_key(|&i| {
            let g = &self.grants[i];
            (g.expires_at_ms.unwrap_or(u64::MAX), g.kind.rank(), g.id)
        });
        idx
    }

    /// Takes `amount` from available grants in draw order.
    fn take_from_grants(&self, amount: u64) -> Vec<(u32, u64)> {
        let mut left = amount;
        let mut out = Vec::new();
        for i in self.draw_order() {
            if left == 0 {
                break;
            }
            let g = &self.grants[i];
            let take = g.available.min(left);
            out.push((g.id, take));
            left -= take;
        }
        assert_eq!(left, 0, "caller checked available >= amount");
        out
    }

    /// The operation `request_id` made, from memory or (filed) from `recall`.
    fn known_op(
        &self,
        request_id: &str,
        recall: &dyn Recall,
    ) -> Result<Option<crate::engine::wallet::op_index::OpRow>, WalletError> {
        match self.ops.get(request_id) {
            Some(&seq) => Ok(Some(crate::engine::wallet::op_index::OpRow {
                seq,
                grant: None,
            })),
            None => recall.op(request_id),
        }
    }

    /// Events that expire every grant whose expiry is at or before `now_ms`.
    pub fn expiry_events(&self, now_ms: u64) -> Vec<WalletEvent> {
        if now_ms < self.next_expiry_ms {
            return Vec::new();
        }
        self.grants
            .iter()
            .filter(|g| !g.is_expired && g.expires_at_ms.is_some_and(|e| e <= now_ms))
            .map(|g| WalletEvent::GrantExpired {
                grant: g.id,
                amount: g.available,
                at_ms: now_ms,
            })
            .collect()
    }

    /// Validates `cmd` against the state and returns what to record. Never mutates.
    ///
    /// `recall(seq)` yields a recorded operation's ledger entry so that a repeated request
    /// can be compared with the original; the entry may have been filed
    /// (`wallet::history`), so only the caller can fetch it.
    pub fn decide(
        &self,
        cmd: &WalletCommand,
        now_ms: u64,
        recall: &dyn Recall,
    ) -> Result<Decision, WalletError> {
        match cmd {
            WalletCommand::Grant {
                request_id,
                kind,
                amount,
                expires_at_ms,
            } => {
                if let Some(op) = self.known_op(request_id, recall)? {
                    let e = recall.entry(op.seq)?;
                    // The grant itself while it is in memory, else what the operation
                    // index kept of it (nothing, for rows rebuilt from the history file:
                    // then the amount decides).
                    let same_grant = |g: u32| match self.grant(g) {
                        Some(g) => g.kind == *kind && g.expires_at_ms == *expires_at_ms,
                        None => op
                            .grant
                            .is_none_or(|(k, x)| k == *kind && x == *expires_at_ms),
                    };
                    let same = e.kind == EntryKind::TopUp
                        && e.amount == *amount
                        && e.grant.is_some_and(same_grant);
                    return if same {
                        Ok(Decision::Repeat(Some(op.seq)))
                    } else {
                        Err(WalletError::KeyReused {
                            key: request_id.clone(),
                        })
                    };
                }
                if *amount == 0 {
                    return Err(WalletError::ZeroAmount);
                }
                if *kind == GrantKind::Adjustment {
                    return Err(WalletError::KeyReused {
                        key: "adjustment grants come only from adjustments".into(),
                    });
                }
                self.check_creation(*amount)?;
                let grant = self.next_grant_id()?;
                Ok(Decision::Record(vec![WalletEvent::Granted {
                    request_id: request_id.clone(),
                    grant,
                    kind: *kind,
                    amount: *amount,
                    expires_at_ms: *expires_at_ms,
                    at_ms: now_ms,
                }]))
            }
            WalletCommand::Hold { batch, amount } => {
                if let Some(h) = self.holds.get(batch) {
                    return if h.amount == *amount {
                        Ok(Decision::Repeat(Some(h.ledger_seq)))
                    } else {
                        Err(WalletError::KeyReused {
                            key: batch.to_string(),
                        })
                    };
                }
                if *amount == 0 {
                    return Err(WalletError::ZeroAmount);
                }
                if self.available < *amount {
                    return Err(WalletError::InsufficientCredits {
                        available: self.available,
                        needed: *amount,
                    });
                }
                Ok(Decision::Record(vec![WalletEvent::Held {
                    batch: *batch,
                    amount: *amount,
                    draws: self.take_from_grants(*amount),
                    at_ms: now_ms,
                }]))
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
                let hold = self
                    .holds
                    .get(batch)
                    .ok_or(WalletError::UnknownHold { batch: *batch })?;
                if let Some(m) = hold.items.get(item) {
                    return if m.settled == settle && m.amount == *amount {
                        Ok(Decision::Repeat(Some(m.ledger_seq)))
                    } else {
                        Err(WalletError::KeyReused {
                            key: format!("{batch}/{item}"),
                        })
                    };
                }
                if *amount == 0 {
                    return Err(WalletError::ZeroAmount);
                }
                if *amount > hold.remaining() {
                    return Err(WalletError::HoldExceeded {
                        batch: *batch,
                        remaining: hold.remaining(),
                        requested: *amount,
                    });
                }
                // Lifetime totals: `spent` is bounded by what was ever created (checked at
                // creation), but `released` grows each time credits cycle through a hold.
                if settle {
                    money::try_add(self.spent, *amount)?;
                } else {
                    money::try_add(self.released, *amount)?;
                }
                let mut left = *amount;
                let mut parts = Vec::new();
                let order: Box<dyn Iterator<Item = &Draw>> = if settle {
                    Box::new(hold.draws.iter())
                } else {
                    Box::new(hold.draws.iter().rev())
                };
                for d in order {
                    if left == 0 {
                        break;
                    }
                    let take = d.remaining().min(left);
                    if take > 0 {
                        parts.push((d.grant, take));
                        left -= take;
                    }
                }
                assert_eq!(left, 0, "hold.remaining() == sum of draw remainders");
                let (batch, item, amount) = (*batch, *item, *amount);
                Ok(Decision::Record(vec![if settle {
                    WalletEvent::Settled {
                        batch,
                        item,
                        amount,
                        parts,
                        at_ms: now_ms,
                    }
                } else {
                    WalletEvent::Released {
                        batch,
                        item,
                        amount,
                        parts,
                        at_ms: now_ms,
                    }
                }]))
            }
            WalletCommand::Adjust {
                request_id,
                delta,
                reason,
            } => {
                if let Some(op) = self.known_op(request_id, recall)? {
                    let e = recall.entry(op.seq)?;
                    let same = e.kind == EntryKind::Adjust
                        && e.negative == (*delta < 0)
                        && e.amount == delta.unsigned_abs()
                        && e.reason.as_deref() == Some(reason.as_str());
                    return if same {
                        Ok(Decision::Repeat(Some(op.seq)))
                    } else {
                        Err(WalletError::KeyReused {
                            key: request_id.clone(),
                        })
                    };
                }
                if *delta == 0 {
                    return Err(WalletError::ZeroAmount);
                }
                let magnitude = delta.unsigned_abs();
                let (grant, parts) = if *delta > 0 {
                    self.check_creation(magnitude)?;
                    self.adjusted
                        .checked_add(*delta)
                        .ok_or(WalletError::OutOfRange)?;
                    (Some(self.next_grant_id()?), Vec::new())
                } else {
                    if self.available < magnitude {
                        return Err(WalletError::InsufficientCredits {
                            available: self.available,
                            needed: magnitude,
                        });
                    }
                    self.adjusted
                        .checked_add(*delta)
                        .ok_or(WalletError::OutOfRange)?;
                    (None, self.take_from_grants(magnitude))
                };
                Ok(Decision::Record(vec![WalletEvent::Adjusted {
                    request_id: request_id.clone(),
                    delta: *delta,
                    reason: reason.clone(),
                    grant,
                    parts,
                    at_ms: now_ms,
                }]))
            }
            WalletCommand::ExpireDue => Ok(Decision::Record(Vec::new())),
            WalletCommand::SetLowBalanceThreshold { threshold } => {
                if *threshold == self.low_balance_threshold {
                    return Ok(Decision::Repeat(None));
                }
                Ok(Decision::Record(vec![WalletEvent::ThresholdSet {
                    threshold: *threshold,
                    at_ms: now_ms,
                }]))
            }
        }
    }

    /// Appends a ledger entry, chaining its hash. Returns its seq.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        kind: EntryKind,
        amount: u64,
        negative: bool,
        refs: (Option<BatchId>, Option<u32>, Option<u32>),
        parts: Vec<(u32, u64)>,
        text: (Option<String>, Option<String>),
        at_ms: u64,
        lsn: u64,
    ) -> u64 {
        let seq = self.ledger_len() + 1;
        let mut e = LedgerEntry {
            seq,
            kind,
            amount,
            negative,
            available_after: self.available,
            held_after: self.held,
            batch: refs.0,
            item: refs.1,
            grant: refs.2,
            parts,
            request_id: text.0,
            reason: text.1,
            at_ms,
            lsn,
            hash: [0; 32],
        };
        let prev = match (self.ledger.last(), &self.filed) {
            (Some(p), _) => p.hash,
            (None, Some(f)) => f.last_hash,
            (None, None) => GENESIS_HASH,
        };
        e.hash = chain_hash(&prev, self.tenant, &e);
        push_small_first(&mut self.ledger, e);
        seq
    }

    /// Grants retired from memory (the first `retired_count` ids).
    fn retired_count(&self) -> u32 {
        self.retired.as_ref().map_or(0, |r| r.count)
    }

    /// The id the next grant gets.
    fn next_grant_id(&self) -> Result<u32, WalletError> {
        u32::try_from(self.retired_count() as usize + self.grants.len() + 1)
            .map_err(|_| WalletError::OutOfRange)
    }

    /// Grant `id`, unless it was retired.
    pub fn grant(&self, id: u32) -> Option<&Grant> {
        let i = id.checked_sub(self.retired_count() + 1)?;
        self.grants.get(i as usize)
    }

    fn grant_mut(&mut self, id: u32) -> &mut Grant {
        let gone = self.retired_count();
        assert!(id > gone, "grant {id} is retired: no event can name it");
        &mut self.grants[(id - gone) as usize - 1]
    }

    /// How many leading grants may retire now: final ones (`Grant::is_final`) whose
    /// creating entry is filed (`grants_filed`).
    pub fn retirable_grants(&self) -> u32 {
        let n = self
            .grants
            .iter()
            .take_while(|g| g.id <= self.grants_filed && g.is_final())
            .count();
        u32::try_from(n).expect("grant ids fit u32")
    }

    /// Retires the first `n` grants in memory (see `retirable_grants`): their sums move to
    /// `retired`, balances and the ledger do not change. Applied alike to the snapshot's
    /// copy and to the live wallet (the `Compact` message).
    pub fn retire_grants(&mut self, n: u32) {
        if n == 0 {
            return;
        }
        let n = n as usize;
        assert!(n <= self.grants.len(), "retires grants it has");
        let r = self
            .retired
            .get_or_insert_with(|| Box::new(RetiredGrants::default()));
        for g in self.grants.drain(..n) {
            assert!(g.is_final(), "only final grants retire (grant {})", g.id);
            assert!(
                g.id <= self.grants_filed,
                "grant {} retires after its entry is filed",
                g.id
            );
            assert_eq!(g.id, r.count + 1, "grants retire in id order");
            r.count += 1;
            r.amount = money::add(r.amount, g.amount);
            if g.kind != GrantKind::Adjustment {
                r.granted = money::add(r.granted, g.amount);
            }
            r.spent = money::add(r.spent, g.spent);
            r.expired = money::add(r.expired, g.expired);
            r.debited = money::add(r.debited, g.debited);
        }
        // Final grants are dead, and dead ones lead: the count stays relative to memory.
        self.dead_grants = self
            .dead_grants
            .checked_sub(n as u32)
            .expect("retired grants were counted dead");
        self.grants.shrink_to_fit();
    }

    /// Applies a recorded event. The one place wallet state changes, live and in replay.
    /// Events were validated by `decide`; any inconsistency here is corruption and panics.
    pub fn apply(&mut self, event: &WalletEvent, lsn: u64) {
        assert!(lsn > self.last_lsn, "events apply in LSN order");
        match event {
            WalletEvent::Opened { .. } => {}
            WalletEvent::Granted {
                request_id,
                grant,
                kind,
                amount,
                expires_at_ms,
                at_ms,
            } => {
                assert_eq!(Ok(*grant), self.next_grant_id(), "grant ids are dense");
                self.grants.push(Grant {
                    id: *grant,
                    kind: *kind,
                    amount: *amount,
                    available: *amount,
                    held: 0,
                    spent: 0,
                    expired: 0,
                    debited: 0,
                    expires_at_ms: *expires_at_ms,
                    is_expired: false,
                });
                self.created = money::add(self.created, *amount);
                if let Some(e) = *expires_at_ms {
                    self.next_expiry_ms = self.next_expiry_ms.min(e);
                }
                self.available = money::add(self.available, *amount);
                self.granted = money::add(self.granted, *amount);
                let seq = self.record(
                    EntryKind::TopUp,
                    *amount,
                    false,
                    (None, None, Some(*grant)),
                    vec![(*grant, *amount)],
                    (Some(request_id.clone()), None),
                    *at_ms,
                    lsn,
                );
                self.ops.insert(request_id.clone(), seq);
            }
            WalletEvent::Held {
                batch,
                amount,
                draws,
                at_ms,
            } => {
                assert!(!self.holds.contains_key(batch), "one hold per batch");
                let mut sum = 0;
                for &(g, a) in draws {
                    let grant = self.grant_mut(g);
                    grant.available = money::sub(grant.available, a);
                    grant.held = money::add(grant.held, a);
                    sum = money::add(sum, a);
                }
                assert_eq!(sum, *amount, "draws add up to the hold");
                self.available = money::sub(self.available, *amount);
                self.held = money::add(self.held, *amount);
                let seq = self.record(
                    EntryKind::Hold,
                    *amount,
                    false,
                    (Some(*batch), None, None),
                    draws.clone(),
                    (None, None),
                    *at_ms,
                    lsn,
                );
                self.holds.insert(
                    *batch,
                    Hold {
                        amount: *amount,
                        settled: 0,
                        released: 0,
                        draws: draws
                            .iter()
                            .map(|&(grant, amount)| Draw {
                                grant,
                                amount,
                                settled: 0,
                                released: 0,
                            })
                            .collect(),
                        items: HashMap::new(),
                        ledger_seq: seq,
                    },
                );
            }
            WalletEvent::Settled {
                batch,
                item,
                amount,
                parts,
                at_ms,
            } => {
                self.move_from_hold(*batch, *item, *amount, parts, true);
                for &(g, a) in parts {
                    let grant = self.grant_mut(g);
                    grant.held = money::sub(grant.held, a);
                    grant.spent = money::add(grant.spent, a);
                }
                self.held = money::sub(self.held, *amount);
                self.spent = money::add(self.spent, *amount);
                let seq = self.record(
                    EntryKind::Settle,
                    *amount,
                    false,
                    (Some(*batch), Some(*item), None),
                    parts.clone(),
                    (None, None),
                    *at_ms,
                    lsn,
                );
                self.note_item(*batch, *item, true, *amount, seq);
            }
            WalletEvent::Released {
                batch,
                item,
                amount,
                parts,
                at_ms,
            } => {
                self.move_from_hold(*batch, *item, *amount, parts, false);
                let mut expired_parts = Vec::new();
                for &(g, a) in parts {
                    let grant = self.grant_mut(g);
                    grant.held = money::sub(grant.held, a);
                    grant.available = money::add(grant.available, a);
                    if grant.is_expired {
                        expired_parts.push((g, a));
                    }
                }
                self.held = money::sub(self.held, *amount);
                self.available = money::add(self.available, *amount);
                self.released = money::add(self.released, *amount);
                let seq = self.record(
                    EntryKind::Release,
                    *amount,
                    false,
                    (Some(*batch), Some(*item), None),
                    parts.clone(),
                    (None, None),
                    *at_ms,
                    lsn,
                );
                self.note_item(*batch, *item, false, *amount, seq);
                // Credits returned to a grant that expired meanwhile expire now.
                for (g, a) in expired_parts {
                    self.expire_from_grant(g, a, *at_ms, lsn);
                }
            }
            WalletEvent::Adjusted {
                request_id,
                delta,
                reason,
                grant,
                parts,
                at_ms,
            } => {
                let magnitude = delta.unsigned_abs();
                if *delta > 0 {
                    let id = grant.expect("upward adjustment creates a grant");
                    assert_eq!(Ok(id), self.next_grant_id(), "grant ids are dense");
                    push_small_first(
                        &mut self.grants,
                        Grant {
                            id,
                            kind: GrantKind::Adjustment,
                            amount: magnitude,
                            available: magnitude,
                            held: 0,
                            spent: 0,
                            expired: 0,
                            debited: 0,
                            expires_at_ms: None,
                            is_expired: false,
                        },
                    );
                    self.created = money::add(self.created, magnitude);
                    self.available = money::add(self.available, magnitude);
                } else {
                    let mut sum = 0;
                    for &(g, a) in parts {
                        let grant = self.grant_mut(g);
                        grant.available = money::sub(grant.available, a);
                        grant.debited = money::add(grant.debited, a);
                        sum = money::add(sum, a);
                    }
                    assert_eq!(sum, magnitude, "parts add up to the adjustment");
                    self.available = money::sub(self.available, magnitude);
                }
                self.adjusted = self
                    .adjusted
                    .checked_add(*delta)
                    .expect("adjusted within i64");
                let seq = self.record(
                    EntryKind::Adjust,
                    magnitude,
                    *delta < 0,
                    (None, None, *grant),
                    if *delta > 0 {
                        vec![(grant.expect("checked"), magnitude)]
                    } else {
                        parts.clone()
                    },
                    (Some(request_id.clone()), Some(reason.clone())),
                    *at_ms,
                    lsn,
                );
                self.ops.insert(request_id.clone(), seq);
            }
            WalletEvent::GrantExpired {
                grant,
                amount,
                at_ms,
            } => {
                let g = self.grant_mut(*grant);
                assert!(!g.is_expired, "a grant expires once");
                assert_eq!(g.available, *amount, "expiry takes all that is available");
                g.is_expired = true;
                // Rare (once per expiring grant): a full pass is fine here.
                self.next_expiry_ms = self.earliest_expiry();
                if *amount > 0 {
                    self.expire_from_grant(*grant, *amount, *at_ms, lsn);
                }
            }
            WalletEvent::ThresholdSet { threshold, .. } => {
                self.low_balance_threshold = *threshold;
            }
        }
        self.advance_dead_grants();
        self.last_lsn = lsn;
        self.assert_conservation();
    }

    fn expire_from_grant(&mut self, grant: u32, amount: u64, at_ms: u64, lsn: u64) {
        let g = self.grant_mut(grant);
        g.available = money::sub(g.available, amount);
        g.expired = money::add(g.expired, amount);
        self.available = money::sub(self.available, amount);
        self.expired = money::add(self.expired, amount);
        self.record(
            EntryKind::Expire,
            amount,
            false,
            (None, None, Some(grant)),
            vec![(grant, amount)],
            (None, None),
            at_ms,
            lsn,
        );
    }

    fn move_from_hold(
        &mut self,
        batch: BatchId,
        item: u32,
        amount: u64,
        parts: &[(u32, u64)],
        settle: bool,
    ) {
        let hold = self
            .holds
            .get_mut(&batch)
            .expect("settle/release has a hold");
        assert!(!hold.items.contains_key(&item), "an item moves once");
        assert!(amount <= hold.remaining(), "never beyond the hold");
        let mut sum = 0;
        for &(g, a) in parts {
            let d = hold
                .draws
                .iter_mut()
                .find(|d| d.grant == g)
                .expect("part names a draw of this hold");
            assert!(a <= d.remaining(), "never beyond a draw");
            if settle {
                d.settled += a;
            } else {
                d.released += a;
            }
            sum = money::add(sum, a);
        }
        assert_eq!(sum, amount, "parts add up to the amount");
        if settle {
            hold.settled = money::add(hold.settled, amount);
        } else {
            hold.released = money::add(hold.released, amount);
        }
    }

    fn note_item(&mut self, batch: BatchId, item: u32, settled: bool, amount: u64, seq: u64) {
        let hold = self
            .holds
            .get_mut(&batch)
            .expect("checked in move_from_hold");
        hold.items.insert(
            item,
            ItemMove {
                settled,
                amount,
                ledger_seq: seq,
            },
        );
    }

    /// The O(1) identity checked after every event.
    fn assert_conservation(&self) {
        let lhs = self.available as i128 + self.held as i128;
        let rhs = self.granted as i128 + self.adjusted as i128
            - self.spent as i128
            - self.expired as i128;
        assert_eq!(
            lhs, rhs,
            "wallet conservation broken for {}: available + held != granted + adjusted - spent - expired",
            self.tenant
        );
    }

    /// Recomputes every derived figure from grants, holds and the ledger, and compares.
    /// Cost is linear in the wallet's size: for tests and reconciliation, not the hot path.
    pub fn check_invariants(&self) -> Result<(), String> {
        let err = |m: String| Err(format!("{}: {m}", self.tenant));
        let retired = self.retired.as_deref().cloned().unwrap_or_default();
        let created = self
            .grants
            .iter()
            .map(|g| u128::from(g.amount))
            .sum::<u128>()
            + u128::from(retired.amount);
        if u128::from(self.created) != created {
            return err(format!(
                "created {} != sum of grants {created}",
                self.created
            ));
        }
        if let Some(g) = self.grants[..self.dead_grants as usize]
            .iter()
            .find(|g| !g.is_dead())
        {
            return err(format!("grant {} is counted dead but is not", g.id));
        }
        if self.next_expiry_ms != self.earliest_expiry() {
            return err(format!(
                "next expiry {} != earliest unexpired grant's {}",
                self.next_expiry_ms,
                self.earliest_expiry()
            ));
        }
        let lhs = self.available as i128 + self.held as i128;
        let rhs = self.granted as i128 + self.adjusted as i128
            - self.spent as i128
            - self.expired as i128;
        if lhs != rhs {
            return err(format!("conservation: {lhs} != {rhs}"));
        }
        let (mut avail, mut held) = (0u128, 0u128);
        let mut spent = u128::from(retired.spent);
        let mut expired = u128::from(retired.expired);
        let mut granted = u128::from(retired.granted);
        if retired.count > 0 && retired.amount != retired.spent + retired.expired + retired.debited
        {
            return err("retired grants: parts != amount".into());
        }
        if self
            .grants
            .first()
            .is_some_and(|g| g.id != retired.count + 1)
        {
            return err("grants in memory do not follow the retired ones".into());
        }
        if let Some((k, seq)) = self.ops.iter().find(|(_, s)| **s <= self.filed_entries()) {
            return err(format!(
                "operation {k} names filed entry {seq} but is still in memory"
            ));
        }
        for g in &self.grants {
            let sum = g.available as u128
                + g.held as u128
                + g.spent as u128
                + g.expired as u128
                + g.debited as u128;
            if sum != g.amount as u128 {
                return err(format!(
                    "grant {}: parts {sum} != amount {}",
                    g.id, g.amount
                ));
            }
            if g.is_expired && g.available != 0 {
                return err(format!(
                    "expired grant {} still has available credits",
                    g.id
                ));
            }
            avail += g.available as u128;
            held += g.held as u128;
            spent += g.spent as u128;
            expired += g.expired as u128;
            if g.kind != GrantKind::Adjustment {
                granted += g.amount as u128;
            }
        }
        if avail != self.available as u128 || spent != self.spent as u128 {
            return err(format!(
                "grants say available {avail} spent {spent}, wallet says {} {}",
                self.available, self.spent
            ));
        }
        if expired != self.expired as u128 || granted != self.granted as u128 {
            return err(format!(
                "grants say expired {expired} granted {granted}, wallet says {} {}",
                self.expired, self.granted
            ));
        }
        let mut hold_remaining = 0u128;
        let mut draw_held: BTreeMap<u32, u128> = BTreeMap::new();
        for (batch, h) in &self.holds {
            if h.amount as u128 != h.settled as u128 + h.released as u128 + h.remaining() as u128 {
                return err(format!("hold {batch}: arithmetic"));
            }
            let (mut s, mut r, mut a) = (0u64, 0u64, 0u64);
            for d in &h.draws {
                if d.settled + d.released > d.amount {
                    return err(format!("hold {batch}: draw beyond its amount"));
                }
                s += d.settled;
                r += d.released;
                a += d.amount;
                *draw_held.entry(d.grant).or_default() += d.remaining() as u128;
            }
            if (a, s, r) != (h.amount, h.settled, h.released) {
                return err(format!("hold {batch}: draws disagree with the hold"));
            }
            let items_settled: u64 = h
                .items
                .values()
                .filter(|m| m.settled)
                .map(|m| m.amount)
                .sum();
            let items_released: u64 = h
                .items
                .values()
                .filter(|m| !m.settled)
                .map(|m| m.amount)
                .sum();
            if (items_settled, items_released) != (h.settled, h.released) {
                return err(format!("hold {batch}: items disagree with the hold"));
            }
            hold_remaining += h.remaining() as u128;
        }
        if hold_remaining != self.held as u128 || held != self.held as u128 {
            return err(format!(
                "held {} but holds have {hold_remaining} and grants {held}",
                self.held
            ));
        }
        for (g, h) in &draw_held {
            match self.grant(*g) {
                Some(grant) if grant.held as u128 == *h => {}
                Some(_) => return err(format!("grant {g}: held disagrees with the holds")),
                // A finished hold may still name a retired grant, with nothing left in it.
                None if *h == 0 => {}
                None => return err(format!("a hold still holds {h} of retired grant {g}")),
            }
        }
        if let Some(last) = self.ledger.last() {
            if (last.available_after, last.held_after) != (self.available, self.held) {
                return err("last ledger entry's balances are not the wallet's".into());
            }
        }
        let (prev, first_seq) = match &self.filed {
            None => (GENESIS_HASH, 1),
            Some(f) => {
                let mut next = 1;
                for p in &f.pages {
                    if p.first_seq != next || p.entries == 0 {
                        return err(format!("filed page at seq {} out of order", p.first_seq));
                    }
                    next = p.last_seq() + 1;
                }
                (f.last_hash, next)
            }
        };
        crate::engine::wallet::ledger::verify_chain_from(self.tenant, prev, first_seq, &self.ledger)
            .or_else(|e| err(e.to_string()))
    }

    /// The statement for `[from_ms, to_ms)`, computed from the ledger alone: `filed` are
    /// the entries of `filed_pages_between(from_ms, to_ms)`, read back, in order.
    pub fn statement(&self, filed: &[LedgerEntry], from_ms: u64, to_ms: u64) -> Statement {
        statement_of(filed.iter().chain(self.ledger.iter()), from_ms, to_ms)
    }
}

/// A statement from consecutive entries in time order (the ledger's order).
pub(crate) fn statement_of<E: std::borrow::Borrow<LedgerEntry>>(
    entries: impl Iterator<Item = E>,
    from_ms: u64,
    to_ms: u64,
) -> Statement {
    let mut st = Statement {
        from_ms,
        to_ms,
        ..Statement::default()
    };
    // The last entry before `to_ms` gives the closing (the opening when there was none).
    let mut closing = None;
    for e in entries {
        let e = e.borrow();
        if e.at_ms >= to_ms {
            break;
        }
        closing = Some((e.available_after, e.held_after));
        if e.at_ms < from_ms {
            st.opening_available = e.available_after;
            st.opening_held = e.held_after;
            continue;
        }
        st.entries += 1;
        match e.kind {
            EntryKind::TopUp => st.top_ups += e.amount,
            EntryKind::Hold => st.held += e.amount,
            EntryKind::Settle => {
                st.settled += e.amount;
                if let Some(b) = e.batch {
                    *st.settled_by_batch.entry(b).or_default() += e.amount;
                }
                for &(g, a) in &e.parts {
                    *st.settled_by_grant.entry(g).or_default() += a;
                }
            }
            EntryKind::Release => st.released += e.amount,
            EntryKind::Expire => st.expired += e.amount,
            EntryKind::Adjust => {
                if e.negative {
                    st.adjusted -= e.amount as i128;
                } else {
                    st.adjusted += e.amount as i128;
                }
            }
        }
    }
    (st.closing_available, st.closing_held) =
        closing.unwrap_or((st.opening_available, st.opening_held));
    st
}

/// Pushes onto `v`, reserving room for exactly one element when it is empty. Most
/// tenants are idle with one grant and a ledger entry or two; `Vec`'s first allocation
/// reserves four, which for ~200-byte entries is most of an idle tenant's memory. Later
/// growth doubles as usual.
fn push_small_first<T>(v: &mut Vec<T>, item: T) {
    if v.capacity() == 0 {
        v.reserve_exact(1);
    }
    v.push(item);
}

/// A period's statement for one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Statement {
    /// Start of the period (inclusive), ms.
    pub from_ms: u64,
    /// End of the period (exclusive), ms.
    pub to_ms: u64,
    /// Balances before the period.
    pub opening_available: u64,
    pub opening_held: u64,
    /// Movements in the period.
    pub top_ups: u64,
    pub held: u64,
    pub settled: u64,
    pub released: u64,
    pub expired: u64,
    pub adjusted: i128,
    /// Settled credits per batch.
    pub settled_by_batch: BTreeMap<BatchId, u64>,
    /// Settled credits per grant: which grant paid for what.
    pub settled_by_grant: BTreeMap<u32, u64>,
    /// Balances at the end of the period.
    pub closing_available: u64,
    pub closing_held: u64,
    /// Ledger entries in the period.
    pub entries: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::wallet::op_index::OpRow;

    /// The history a test wallet recalls: entries in memory, filed operations from a map
    /// (standing in for the operation index).
    struct Mem<'a>(&'a WalletState, HashMap<String, OpRow>);

    impl Recall for Mem<'_> {
        fn entry(&self, seq: u64) -> Result<LedgerEntry, WalletError> {
            self.0
                .entry(seq)
                .cloned()
                .ok_or(WalletError::Unavailable(format!("entry {seq} is filed")))
        }
        fn op(&self, request_id: &str) -> Result<Option<OpRow>, WalletError> {
            Ok(self.1.get(request_id).copied())
        }
    }

    /// Runs `cmd` through decide and apply, as the actor does (LSNs from `lsn`).
    fn run(w: &mut WalletState, cmd: WalletCommand, lsn: &mut u64) {
        let Decision::Record(events) = w
            .decide(&cmd, 1_000, &Mem(w, HashMap::new()))
            .expect("accepted")
        else {
            panic!("not a repeat")
        };
        for e in events {
            *lsn += 1;
            w.apply(&e, *lsn);
        }
        w.check_invariants().expect("invariants hold");
    }

    #[test]
    fn used_up_grants_leave_the_draw_order_for_good() {
        let mut w = WalletState::new(TenantId(1));
        let mut lsn = 0;
        for i in 0..3 {
            let request_id = format!("t{i}");
            let grant = WalletCommand::Grant {
                request_id,
                kind: GrantKind::Paid,
                amount: 10,
                expires_at_ms: None,
            };
            run(&mut w, grant, &mut lsn);
        }
        assert_eq!(w.dead_grants, 0);
        // Hold 15: all of grant 1, half of grant 2 (oldest first).
        let batch = BatchId(7);
        run(&mut w, WalletCommand::Hold { batch, amount: 15 }, &mut lsn);
        assert_eq!(w.dead_grants, 0, "grant 1's credits are still held");
        let settle = WalletCommand::Settle {
            batch,
            item: 0,
            amount: 10,
        };
        run(&mut w, settle, &mut lsn);
        assert_eq!(
            w.dead_grants, 1,
            "grant 1 is spent: nothing can come back to it"
        );
        let release = WalletCommand::Release {
            batch,
            item: 1,
            amount: 5,
        };
        run(&mut w, release, &mut lsn);
        assert_eq!(w.dead_grants, 1, "grant 2 got its 5 back and is live");
        assert_eq!(w.draw_order(), vec![1, 2]);
        // Derived fields rebuild to the same values.
        let mut copy = w.clone();
        copy.restore_derived();
        assert_eq!(copy, w);
    }

    /// A wallet with one paid grant of `amount`, and the LSN of its last event.
    fn funded(amount: u64) -> (WalletState, u64) {
        let mut w = WalletState::new(TenantId(1));
        let mut lsn = 0;
        let grant = WalletCommand::Grant {
            request_id: "t".into(),
            kind: GrantKind::Paid,
            amount,
            expires_at_ms: None,
        };
        run(&mut w, grant, &mut lsn);
        (w, lsn)
    }

    /// Spent grants leave memory once their top-ups are filed; nothing else changes, new
    /// grants continue the ids, and a repeat of an old top-up is still checked through the
    /// operation index's row (kind and expiry), or on its amount when the row has neither.
    #[test]
    fn final_grants_retire_after_their_top_ups_are_filed() {
        let mut w = WalletState::new(TenantId(1));
        let mut lsn = 0;
        for i in 0..3 {
            let grant = WalletCommand::Grant {
                request_id: format!("t{i}"),
                kind: GrantKind::Paid,
                amount: 10,
                expires_at_ms: None,
            };
            run(&mut w, grant, &mut lsn);
        }
        let batch = BatchId(9);
        run(&mut w, WalletCommand::Hold { batch, amount: 25 }, &mut lsn);
        assert_eq!(w.retirable_grants(), 0, "grants 1 and 2 are held");
        for (item, amount) in [(0, 20), (1, 5)] {
            let settle = WalletCommand::Settle {
                batch,
                item,
                amount,
            };
            run(&mut w, settle, &mut lsn);
        }
        assert_eq!(
            w.retirable_grants(),
            0,
            "spent, but their top-ups are not filed"
        );
        // File the first two entries (the top-ups of grants 1 and 2).
        let (first, second) = (w.ledger[0].clone(), w.ledger[1].clone());
        w.filed_ledger(FiledPage {
            first_seq: 1,
            entries: 2,
            first_at_ms: first.at_ms,
            last_at_ms: second.at_ms,
            offset: 0,
            len: 0,
        });
        assert_eq!(w.grants_filed, 2);
        assert_eq!(
            w.ops.keys().collect::<Vec<_>>(),
            vec!["t2"],
            "filed keys left memory"
        );
        assert_eq!(w.retirable_grants(), 2);
        let before = w.balances();
        w.retire_grants(2);
        assert_eq!(w.balances(), before);
        assert_eq!(
            (
                w.grant(1),
                w.grant(2).is_some(),
                w.grant(3).map(|g| g.available)
            ),
            (None, false, Some(5))
        );
        assert_eq!(
            w.retired.as_ref().map(|r| (r.count, r.amount, r.spent)),
            Some((2, 20, 20))
        );
        w.check_invariants().unwrap();
        let mut copy = w.clone();
        copy.restore_derived();
        assert_eq!(copy, w);
        // The next grant continues the ids.
        let grant = WalletCommand::Grant {
            request_id: "t3".into(),
            kind: GrantKind::Promotional,
            amount: 7,
            expires_at_ms: None,
        };
        run(&mut w, grant, &mut lsn);
        assert_eq!(w.grant(4).map(|g| g.amount), Some(7));
        // Repeats of a filed top-up whose grant is retired: the index row decides.
        let repeat = |kind| WalletCommand::Grant {
            request_id: "t0".into(),
            kind,
            amount: 10,
            expires_at_ms: None,
        };
        let row = |grant| HashMap::from([("t0".to_string(), OpRow { seq: 1, grant })]);
        let mut filed_entry = w.clone();
        filed_entry.ledger.insert(0, first);
        filed_entry.filed = None;
        let known = Some((GrantKind::Paid, None));
        assert!(matches!(
            w.decide(
                &repeat(GrantKind::Paid),
                2_000,
                &Mem(&filed_entry, row(known))
            ),
            Ok(Decision::Repeat(Some(1)))
        ));
        assert!(matches!(
            w.decide(
                &repeat(GrantKind::Promotional),
                2_000,
                &Mem(&filed_entry, row(known))
            ),
            Err(WalletError::KeyReused { .. })
        ));
        assert!(matches!(
            w.decide(
                &repeat(GrantKind::Promotional),
                2_000,
                &Mem(&filed_entry, row(None))
            ),
            Ok(Decision::Repeat(Some(1)))
        ));
    }

    #[test]
    #[should_panic(expected = "only final grants retire")]
    fn a_grant_with_credits_left_never_retires() {
        let (mut w, _) = funded(100);
        w.grants_filed = 1;
        w.retire_grants(1);
    }

    #[test]
    fn only_finished_holds_retire_and_balances_do_not_move() {
        let (mut w, mut lsn) = funded(100);
        let (done, open) = (BatchId(1), BatchId(2));
        for batch in [done, open] {
            run(&mut w, WalletCommand::Hold { batch, amount: 20 }, &mut lsn);
        }
        let settle = WalletCommand::Settle {
            batch: done,
            item: 0,
            amount: 12,
        };
        run(&mut w, settle, &mut lsn);
        let release = WalletCommand::Release {
            batch: done,
            item: 1,
            amount: 8,
        };
        run(&mut w, release, &mut lsn);
        assert_eq!(
            w.retirable_holds(|_| true),
            vec![done],
            "open still holds 20"
        );
        assert!(w.retirable_holds(|b| b != done).is_empty());
        let before = w.balances();
        w.retire_holds(&[done]);
        assert_eq!(w.balances(), before);
        assert_eq!(w.holds.keys().copied().collect::<Vec<_>>(), vec![open]);
        w.check_invariants().unwrap();
        let mut copy = w.clone();
        copy.restore_derived();
        assert_eq!(copy, w);
    }

    #[test]
    #[should_panic(expected = "only finished holds retire")]
    fn retiring_a_hold_that_still_holds_credits_is_refused() {
        let (mut w, mut lsn) = funded(100);
        let batch = BatchId(1);
        run(&mut w, WalletCommand::Hold { batch, amount: 20 }, &mut lsn);
        w.retire_holds(&[batch]);
    }
}
