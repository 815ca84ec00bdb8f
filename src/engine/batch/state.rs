//! One batch: its fixed specification, its items' state machines, the events it records,
//! and `apply` (the one function that changes it, used live and in replay).
//!
//! State machines (SPEC §3):
//! ```text
//! batch: holding ─Accepted→ active ─Finished→ completed | partial | failed | canceled
//!        holding ─Rejected→ (gone: the hold was refused, the client got 402)
//! item:  pending ─Submitted→ running ─Succeeded→ succeeded
//!                                    ─Failed→ failed
//!                                    ─Retrying→ pending (transient failure or 429)
//!        pending ─Failed→ failed          (refused at submit, or attempts used up)
//!        pending ─CancelRequested→ canceled
//!        pending ─Expired→ failed (batch.expired)
//! ```
//! Money is not here: the batch actor settles or releases each terminal item at the wallet
//! with the (batch, item) key after its event is recorded. `Finished` records the batch's
//! settled/released figures once every item's money is confirmed, so a finished batch has
//! `held == settled + released` (asserted).

use crate::engine::batch::pricing::Params;
use crate::ids::{BatchId, KeyId, TenantId, VideoId};

/// Everything fixed at creation (recorded in `Created`).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct BatchSpec {
    /// Client's request id (`request_id` in the body): a repeat returns this batch.
    pub request_id: Option<String>,
    /// SHA-256 of the request's canonical form: the same request id with a different
    /// request is refused.
    pub fingerprint: [u8; 32],
    /// The template as submitted.
    pub template: String,
    /// Variables in first-appearance order.
    pub variables: Vec<(String, Vec<String>)>,
    /// Generation parameters.
    pub params: Params,
    /// Provider that runs the items.
    pub provider: String,
    /// The provider's model name.
    pub provider_model: String,
    /// Credits per item, fixed at quote time.
    pub unit_price: u64,
    /// Items.
    pub items: u32,
    /// For `retry-failed` batches: item `j` uses the template's prompt number
    /// `prompt_indices[j]`; empty otherwise (item `j` is prompt `j`).
    pub prompt_indices: Vec<u64>,
    /// The batch this one retries the failed items of.
    pub retry_of: Option<BatchId>,
    /// Make the watermarked rendition (plans without watermark-free downloads).
    pub watermark: bool,
    /// Attempts in flight allowed for the tenant (plan).
    pub tenant_concurrency: u32,
    /// Items not started by then fail with `batch.expired`.
    pub expires_at_ms: u64,
    /// The API key that created it (per-key daily spend caps, usage, audit).
    pub api_key: Option<KeyId>,
}

impl BatchSpec {
    /// The hold: `items × unit_price` (checked when the spec was made).
    pub fn total(&self) -> u64 {
        (self.items as u64)
            .checked_mul(self.unit_price)
            .expect("checked at creation")
    }

    /// The template prompt number of item `j`.
    pub fn prompt_index(&self, j: u32) -> u64 {
        if self.prompt_indices.is_empty() {
            j as u64
        } else {
            self.prompt_indices[j as usize]
        }
    }
}

/// Item status (SPEC §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ItemStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl ItemStatus {
    /// The name clients see.
    pub fn as_str(self) -> &'static str {
        match self {
            ItemStatus::Pending => "pending",
            ItemStatus::Running => "running",
            ItemStatus::Succeeded => "succeeded",
            ItemStatus::Failed => "failed",
            ItemStatus::Canceled => "canceled",
        }
    }
    /// Final (its money is settled or released).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            ItemStatus::Succeeded | ItemStatus::Failed | ItemStatus::Canceled
        )
    }
}

/// A failure as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Failure {
    /// Dotted code (`provider.timeout`, `safety.prompt_rejected`, `batch.expired`, …).
    pub code: String,
    /// The provider's message.
    pub message: String,
}

/// A stored output.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct StoredOutput {
    /// The video's id (its store keys derive from it).
    pub video: VideoId,
    /// MIME type.
    pub content_type: String,
    /// Size of the clean rendition.
    pub bytes: u64,
    /// Size of the watermarked rendition, when one was stored.
    pub watermarked_bytes: Option<u64>,
}

/// One item.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Item {
    /// Where it is in its state machine.
    pub status: ItemStatus,
    /// Attempts spent (a 429 does not spend one).
    pub attempts: u32,
    /// 429s seen (bounded separately).
    pub throttles: u32,
    /// Provider job of the running attempt: after a restart it is polled, not resubmitted.
    pub job: Option<String>,
    /// Not to be retried before this (after a transient failure).
    pub retry_at_ms: u64,
    /// The last failure (the final one for a failed item).
    pub failure: Option<Box<Failure>>,
    /// The output of a succeeded item.
    pub output: Option<Box<StoredOutput>>,
}

/// Batch status as clients see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum BatchStatus {
    Queued,
    Processing,
    Completed,
    Partial,
    Failed,
    Canceled,
}

impl BatchStatus {
    /// The name clients see.
    pub fn as_str(self) -> &'static str {
        match self {
            BatchStatus::Queued => "queued",
            BatchStatus::Processing => "processing",
            BatchStatus::Completed => "completed",
            BatchStatus::Partial => "partial",
            BatchStatus::Failed => "failed",
            BatchStatus::Canceled => "canceled",
        }
    }
    /// Finished.
    pub fn is_terminal(self) -> bool {
        !matches!(self, BatchStatus::Queued | BatchStatus::Processing)
    }
}

/// Where the batch is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Phase {
    /// Created; the hold is being placed.
    Holding,
    /// Held; items run.
    Active,
    /// Every item terminal and its money confirmed.
    Finished {
        status: BatchStatus,
        settled: u64,
        released: u64,
        at_ms: u64,
    },
}

/// Item counts (SPEC §11 `counts`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct Counts {
    pub total: u32,
    pub pending: u32,
    pub running: u32,
    pub succeeded: u32,
    pub failed: u32,
    pub canceled: u32,
}

impl Counts {
    fn slot(&mut self, s: ItemStatus) -> &mut u32 {
        match s {
            ItemStatus::Pending => &mut self.pending,
            ItemStatus::Running => &mut self.running,
            ItemStatus::Succeeded => &mut self.succeeded,
            ItemStatus::Failed => &mut self.failed,
            ItemStatus::Canceled => &mut self.canceled,
        }
    }
    /// Items in a terminal state.
    pub fn terminal(&self) -> u32 {
        self.succeeded + self.failed + self.canceled
    }
}

/// A fact about one batch.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum BatchEvent {
    /// The batch exists; its hold is being placed.
    Created {
        tenant: TenantId,
        spec: Box<BatchSpec>,
        at_ms: u64,
    },
    /// The hold is in place: items may run.
    Accepted { at_ms: u64 },
    /// The hold was refused: the batch is dropped.
    Rejected { at_ms: u64 },
    /// Attempt `attempt` of `item` is running at the provider as `job`.
    Submitted {
        item: u32,
        attempt: u32,
        job: String,
        at_ms: u64,
    },
    /// A transient failure (or a 429 when `throttled`): back to pending until `retry_at_ms`.
    Retrying {
        item: u32,
        attempt: u32,
        throttled: bool,
        failure: Failure,
        retry_at_ms: u64,
        at_ms: u64,
    },
    /// The item succeeded; its output is stored.
    Succeeded {
        item: u32,
        attempt: u32,
        output: StoredOutput,
        at_ms: u64,
    },
    /// The item failed for good.
    Failed {
        item: u32,
        attempt: u32,
        failure: Failure,
        at_ms: u64,
    },
    /// Cancel: every pending item is canceled now.
    CancelRequested { at_ms: u64 },
    /// Expiry: every pending item fails with `batch.expired`.
    Expired { at_ms: u64 },
    /// Every item terminal, its money confirmed.
    Finished {
        status: BatchStatus,
        settled: u64,
        released: u64,
        at_ms: u64,
    },
}

/// One batch's state.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct BatchState {
    /// Id.
    pub id: BatchId,
    /// Owner.
    pub tenant: TenantId,
    /// Fixed at creation.
    pub spec: Box<BatchSpec>,
    /// Life stage.
    pub phase: Phase,
    /// Cancel was requested (the batch ends `canceled`).
    pub cancel_requested: bool,
    /// The expiry was processed.
    pub expired: bool,
    /// Items, by index.
    pub items: Vec<Item>,
    /// Counts by status (kept in step with `items` by `apply`).
    pub counts: Counts,
    /// Creation time.
    pub created_at_ms: u64,
    /// An item was ever submitted (`queued` → `processing`).
    pub started: bool,
    /// LSN of the last event applied (replay skips events at or below it).
    pub last_lsn: u64,
}

impl BatchState {
    /// The state `Created` makes.
    pub fn created(id: BatchId, tenant: TenantId, spec: BatchSpec, at_ms: u64, lsn: u64) -> Self {
        let n = spec.items;
        BatchState {
            id,
            tenant,
            spec: Box::new(spec),
            phase: Phase::Holding,
            cancel_requested: false,
            expired: false,
            items: vec![
                Item {
                    status: ItemStatus::Pending,
                    attempts: 0,
                    throttles: 0,
                    job: None,
                    retry_at_ms: 0,
                    failure: None,
                    output: None,
                };
                n as usize
            ],
            counts: Counts {
                total: n,
                pending: n,
                ..Counts::default()
            },
            created_at_ms: at_ms,
            started: false,
            last_lsn: lsn,
        }
    }

    /// Status as clients see it.
    pub fn status(&self) -> BatchStatus {
        match self.phase {
            Phase::Finished { status, .. } => status,
            _ if self.started => BatchStatus::Processing,
            _ => BatchStatus::Queued,
        }
    }

    /// The status a batch with these final counts ends in.
    pub fn final_status(&self) -> BatchStatus {
        let c = &self.counts;
        if self.cancel_requested {
            BatchStatus::Canceled
        } else if c.succeeded == c.total {
            BatchStatus::Completed
        } else if c.succeeded == 0 {
            BatchStatus::Failed
        } else {
            BatchStatus::Partial
        }
    }

    fn set_status(&mut self, item: u32, to: ItemStatus) {
        let it = &mut self.items[item as usize];
        let from = it.status;
        let allowed = matches!(
            (from, to),
            (ItemStatus::Pending, ItemStatus::Running)
                | (ItemStatus::Pending, ItemStatus::Pending)
                | (ItemStatus::Running, ItemStatus::Pending)
                | (ItemStatus::Running, ItemStatus::Succeeded)
                | (
                    ItemStatus::Pending | ItemStatus::Running,
                    ItemStatus::Failed
                )
                | (ItemStatus::Pending, ItemStatus::Canceled)
        );
        assert!(
            allowed,
            "item {item}: {from:?} → {to:?} is not a transition"
        );
        it.status = to;
        *self.counts.slot(from) -= 1;
        *self.counts.slot(to) += 1;
    }

    /// Applies one event (live and in replay). Events are validated by the actor before
    /// they are recorded; an impossible one here is a bug and panics.
    pub fn apply(&mut self, event: &BatchEvent, lsn: u64) {
        assert!(lsn > self.last_lsn, "events apply in log order");
        match event {
            BatchEvent::Created { .. } => unreachable!("Created makes the state"),
            BatchEvent::Accepted { .. } => {
                assert_eq!(self.phase, Phase::Holding);
                self.phase = Phase::Active;
            }
            BatchEvent::Rejected { .. } => {
                assert_eq!(self.phase, Phase::Holding);
            }
            BatchEvent::Submitted {
                item, attempt, job, ..
            } => {
                self.set_status(*item, ItemStatus::Running);
                let it = &mut self.items[*item as usize];
                it.job = Some(job.clone());
                it.attempts = it.attempts.max(*attempt);
                it.retry_at_ms = 0;
                self.started = true;
            }
            BatchEvent::Retrying {
                item,
                attempt,
                throttled,
                failure,
                retry_at_ms,
                ..
            } => {
                self.set_status(*item, ItemStatus::Pending);
                let it = &mut self.items[*item as usize];
                it.job = None;
                if *throttled {
                    it.throttles += 1;
                } else {
                    it.attempts = it.attempts.max(*attempt);
                }
                it.retry_at_ms = *retry_at_ms;
                it.failure = Some(Box::new(failure.clone()));
                self.started = true;
            }
            BatchEvent::Succeeded {
                item,
                attempt,
                output,
                ..
            } => {
                self.set_status(*item, ItemStatus::Succeeded);
                let it = &mut self.items[*item as usize];
                it.attempts = it.attempts.max(*attempt);
                it.job = None;
                it.failure = None;
                it.output = Some(Box::new(output.clone()));
                self.started = true;
            }
            BatchEvent::Failed {
                item,
                attempt,
                failure,
                ..
            } => {
                self.set_status(*item, ItemStatus::Failed);
                let it = &mut self.items[*item as usize];
                it.attempts = it.attempts.max(*attempt);
                it.job = None;
                it.failure = Some(Box::new(failure.clone()));
                self.started = true;
            }
            BatchEvent::CancelRequested { .. } => {
                self.cancel_requested = true;
                for i in 0..self.items.len() {
                    if self.items[i].status == ItemStatus::Pending {
                        self.set_status(i as u32, ItemStatus::Canceled);
                    }
                }
            }
            BatchEvent::Expired { .. } => {
                self.expired = true;
                for i in 0..self.items.len() {
                    if self.items[i].status == ItemStatus::Pending {
                        self.set_status(i as u32, ItemStatus::Failed);
                        self.items[i].failure = Some(Box::new(Failure {
                            code: "batch.expired".into(),
                            message: "the batch expired before this item started".into(),
                        }));
                    }
                }
            }
            BatchEvent::Finished {
                status,
                settled,
                released,
                at_ms,
            } => {
                assert_eq!(self.phase, Phase::Active);
                assert_eq!(self.counts.terminal(), self.counts.total);
                // Money: the hold is fully used, and exactly by the outcomes.
                assert_eq!(
                    settled.checked_add(*released),
                    Some(self.spec.total()),
                    "finished batch has remaining == 0"
                );
                assert_eq!(
                    *settled,
                    self.counts.succeeded as u64 * self.spec.unit_price,
                    "settled == succeeded × unit price"
                );
                self.phase = Phase::Finished {
                    status: *status,
                    settled: *settled,
                    released: *released,
                    at_ms: *at_ms,
                };
            }
        }
        self.last_lsn = lsn;
        debug_assert!(
            self.check_invariants().is_ok(),
            "{:?}",
            self.check_invariants()
        );
    }

    /// Counts agree with the items; a finished batch is all terminal with its money used.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut c = Counts {
            total: self.items.len() as u32,
            ..Counts::default()
        };
        for it in &self.items {
            *c.slot(it.status) += 1;
            if it.status == ItemStatus::Succeeded && it.output.is_none() {
                return Err(format!("{}: succeeded item without output", self.id));
            }
            if it.status == ItemStatus::Running && it.job.is_none() {
                return Err(format!("{}: running item without a job", self.id));
            }
        }
        if c != self.counts {
            return Err(format!(
                "{}: counts {:?} != items {:?}",
                self.id, self.counts, c
            ));
        }
        if c.total != self.spec.items {
            return Err(format!("{}: item count differs from the spec", self.id));
        }
        if let Phase::Finished {
            settled, released, ..
        } = self.phase
        {
            if c.terminal() != c.total {
                return Err(format!("{}: finished with unfinished items", self.id));
            }
            if settled + released != self.spec.total() {
                return Err(format!("{}: finished with credits still held", self.id));
            }
        }
        Ok(())
    }
}
