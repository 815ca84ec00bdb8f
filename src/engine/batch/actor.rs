//! One actix actor per active batch.
//!
//! The actor owns the batch's state and is the only writer of its events. Work flows:
//! 1. started: `Holding` → places the hold at the wallet (key: the batch) → `Accepted`
//!    (or `Rejected` on insufficient credits). After a restart the same path re-places the
//!    hold, which the wallet recognises as a repeat.
//! 2. `Active`: ready items are announced to the scheduler; each `Permit` it sends starts
//!    one attempt task on the engine's worker runtime (`attempt.rs`). The task submits,
//!    reports the job id (`Submitted`, durable before it polls), polls, fetches, stores,
//!    and reports the `Outcome`; the actor decides success, retry or failure.
//! 3. Every terminal item is settled (success) or released (failure, cancel, expiry) at
//!    the wallet with the (batch, item) key; the wallet refuses to move an item twice, and
//!    after a restart only items the wallet has not seen are sent.
//! 4. When every item is terminal and its money confirmed: `Finished`, the state moves to
//!    the directory's finished map, and the actor stops.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use actix::{
    Actor, ActorContext, ActorFutureExt, AsyncContext, Context, Handler, Message, WrapFuture,
};

use crate::engine::batch::attempt::{self, AttemptTask};
use crate::engine::batch::state::{
    BatchEvent, BatchState, Counts, Failure, ItemStatus, Phase, StoredOutput,
};
use crate::engine::batch::template::Expansion;
use crate::engine::batch::{BatchCtx, BatchError, BatchView, ItemView};
use crate::engine::events::Record;
use crate::engine::journal;
use crate::engine::scheduler::Permit;
use crate::engine::wallet::actor::WalletActor;
use crate::engine::wallet::state::{Hold, WalletCommand, WalletError};
use crate::providers::{ErrorClass, JobRequest, ProviderError};

/// Money state of one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Money {
    /// Not sent (the item is not terminal yet, or a send failed and waits for a retry).
    None,
    /// Settle/release in flight.
    Sent,
    /// Confirmed by the wallet.
    Done,
}

/// The actor.
pub struct BatchActor {
    /// The batch.
    pub(crate) state: BatchState,
    /// Shared engine parts.
    pub(crate) ctx: Arc<BatchCtx>,
    /// The tenant's wallet.
    pub(crate) wallet: actix::Addr<WalletActor>,
    /// Prompts by index.
    pub(crate) expansion: Arc<Expansion>,
    /// Items to give the next permits to: pending and due, or running to resume.
    ready: VecDeque<u32>,
    /// Items with an attempt task in flight (indexed by item).
    in_flight: Vec<bool>,
    /// Of which still `Pending` in the state (dispatched, not yet submitted).
    in_flight_pending: u32,
    /// Money state per item.
    money: Vec<Money>,
    /// Settles/releases in flight.
    money_in_flight: u32,
    /// Credits confirmed settled / released.
    settled: u64,
    released: u64,
    /// Callers waiting for the hold's outcome (creation).
    accept_waiters: Vec<tokio::sync::oneshot::Sender<Result<(), BatchError>>>,
    /// Callers waiting for the batch to finish.
    finish_waiters: Vec<tokio::sync::oneshot::Sender<()>>,
    /// The log refused an event: stop doing anything until a restart.
    broken: bool,
}

impl BatchActor {
    /// An actor for `state`; `hold` is the wallet's hold for the batch, if any (recovery:
    /// which items' money is already confirmed).
    pub(crate) fn new(
        state: BatchState,
        ctx: Arc<BatchCtx>,
        wallet: actix::Addr<WalletActor>,
        expansion: Arc<Expansion>,
        hold: Option<&Hold>,
        accept_waiter: Option<tokio::sync::oneshot::Sender<Result<(), BatchError>>>,
    ) -> Self {
        let n = state.items.len();
        let mut money = vec![Money::None; n];
        let (mut settled, mut released) = (0, 0);
        if let Some(h) = hold {
            for (item, mv) in &h.items {
                if let Some(m) = money.get_mut(*item as usize) {
                    *m = Money::Done;
                }
                if mv.settled {
                    settled += mv.amount;
                } else {
                    released += mv.amount;
                }
            }
            assert_eq!((settled, released), (h.settled, h.released));
        }
        BatchActor {
            state,
            ctx,
            wallet,
            expansion,
            ready: VecDeque::new(),
            in_flight: vec![false; n],
            in_flight_pending: 0,
            money,
            money_in_flight: 0,
            settled,
            released,
            // The creator's waiter is registered before the actor starts: the hold's
            // outcome can never be decided before someone is listening.
            accept_waiters: accept_waiter.into_iter().collect(),
            finish_waiters: Vec::new(),
            broken: false,
        }
    }

    fn now_ms(&self) -> u64 {
        self.ctx.clock.now_ms()
    }

    fn record(&mut self, event: BatchEvent) -> Result<wal::Durable, BatchError> {
        let record = Record::Batch {
            batch: self.state.id,
            event,
        };
        let durable = match journal::append(&self.ctx.wal, &record) {
            Ok(d) => d,
            Err(e) => {
                self.broken = true;
                return Err(BatchError::Unavailable(e.to_string()));
            }
        };
        let Record::Batch { event, .. } = record else {
            unreachable!("built above")
        };
        let lsn = durable.lsn();
        self.state.apply(&event, lsn);
        if let BatchEvent::Succeeded { item, output, .. } = &event {
            let mut d = self.ctx.dir.map.write().expect("not poisoned");
            d.videos
                .insert(output.video, (self.state.tenant, self.state.id, *item));
        }
        if crate::webhooks::payload::batch_may_emit(&event) {
            let state = &self.state;
            self.ctx.outbox.emit(state.tenant, || {
                crate::webhooks::payload::batch_events(state, &event, lsn)
            });
        }
        self.ctx.events_appended.fetch_add(1, Ordering::Relaxed);
        Ok(durable)
    }

    /// The view clients read: dispatched-but-unsubmitted items count as running.
    pub(crate) fn view(&self) -> BatchView {
        let mut counts: Counts = self.state.counts;
        counts.pending -= self.in_flight_pending;
        counts.running += self.in_flight_pending;
        BatchView::of(&self.state, counts, self.settled, self.released)
    }

    fn job_request(&self, item: u32, attempt: u32) -> JobRequest {
        let spec = &self.state.spec;
        JobRequest {
            batch: self.state.id,
            item,
            attempt,
            prompt: self.expansion.prompt(spec.prompt_index(item)),
            params: spec.params.clone(),
            provider_model: spec.provider_model.clone(),
            watermark: spec.watermark,
        }
    }

    // ---- hold ------------------------------------------------------------------------

    fn place_hold(&mut self, ctx: &mut Context<Self>) {
        let cmd = WalletCommand::Hold {
            batch: self.state.id,
            amount: self.state.spec.total(),
        };
        let wallet = self.wallet.clone();
        let wal = self.ctx.wal.clone();
        let fut = async move { crate::engine::wallet::actor::execute(&wallet, &wal, cmd).await };
        ctx.spawn(
            fut.into_actor(self)
                .map(|res, act, ctx| act.hold_placed(res, ctx)),
        );
    }

    fn hold_placed(
        &mut self,
        res: Result<
            (
                Vec<crate::engine::wallet::ledger::LedgerEntry>,
                crate::engine::wallet::state::Balances,
            ),
            WalletError,
        >,
        ctx: &mut Context<Self>,
    ) {
        match res {
            Ok(_) => {
                let at_ms = self.now_ms();
                match self.record(BatchEvent::Accepted { at_ms }) {
                    Ok(durable) => {
                        // Waiters that arrive until the event is durable are answered too.
                        self.spawn_after(durable, ctx, move |act, _| {
                            for w in act.accept_waiters.drain(..) {
                                let _ = w.send(Ok(()));
                            }
                        });
                        self.activate(ctx);
                    }
                    Err(e) => self.fail_waiters(e),
                }
            }
            Err(WalletError::InsufficientCredits { available, needed }) => {
                let at_ms = self.now_ms();
                match self.record(BatchEvent::Rejected { at_ms }) {
                    Ok(durable) => {
                        self.ctx.dir.remove_rejected(&self.state);
                        let err = BatchError::InsufficientCredits { available, needed };
                        self.spawn_after(durable, ctx, move |act, ctx| {
                            for w in act.accept_waiters.drain(..) {
                                let _ = w.send(Err(err.clone()));
                            }
                            ctx.stop();
                        });
                    }
                    Err(e) => self.fail_waiters(e),
                }
            }
            Err(e) => {
                // The log is unavailable (or the wallet is gone): the outcome is unknown to
                // the caller (503); keep trying, a repeat of the request finds this batch.
                self.fail_waiters(BatchError::Unavailable(e.to_string()));
                ctx.run_later(
                    Duration::from_millis(self.ctx.cfg.money_retry_ms),
                    |act, ctx| act.place_hold(ctx),
                );
            }
        }
    }

    fn fail_waiters(&mut self, e: BatchError) {
        for w in self.accept_waiters.drain(..) {
            let _ = w.send(Err(e.clone()));
        }
    }

    /// Runs `then` on the actor once `durable` is acknowledged (a failed sync poisons the
    /// log: `then` is not run, and a restart recovers from what the log has). On failure
    /// the creation's waiters are answered `Unavailable` at once: their request's outcome
    /// is unknown (a repeat after the restart finds out), and leaving them waiting would
    /// hold the caller's connection until its own timeout.
    fn spawn_after(
        &mut self,
        durable: wal::Durable,
        ctx: &mut Context<Self>,
        then: impl FnOnce(&mut Self, &mut Context<Self>) + 'static,
    ) {
        ctx.spawn(
            durable
                .into_actor(self)
                .map(move |res, act, ctx| match res {
                    Ok(_) => then(act, ctx),
                    Err(e) => {
                        act.broken = true;
                        act.fail_waiters(BatchError::Unavailable(e.to_string()));
                    }
                }),
        );
    }

    // ---- running ---------------------------------------------------------------------

    /// Active: announce ready items, arm retry timers, resend missing money, check expiry.
    fn activate(&mut self, ctx: &mut Context<Self>) {
        let now = self.now_ms();
        let s = &self.state;
        let mut resume = Vec::new();
        let mut fresh = Vec::new();
        let mut later = Vec::new();
        let mut terminal = Vec::new();
        for (i, it) in s.items.iter().enumerate() {
            let i = i as u32;
            match it.status {
                ItemStatus::Running => resume.push(i),
                ItemStatus::Pending if it.retry_at_ms > now => later.push((i, it.retry_at_ms)),
                ItemStatus::Pending => fresh.push(i),
                _ => terminal.push(i),
            }
        }
        // Resumed jobs first: they already hold a place at the provider.
        self.ready.extend(resume);
        self.ready.extend(fresh);
        for (i, at) in later {
            self.retry_at(i, at, ctx);
        }
        let recipient = ctx.address().recipient::<Permit>();
        self.ctx.scheduler.register(
            self.state.tenant,
            self.state.spec.tenant_concurrency,
            self.state.id,
            &self.state.spec.provider,
            recipient,
        );
        self.ctx
            .scheduler
            .add_ready(self.state.tenant, self.state.id, self.ready.len() as u64);
        for i in terminal {
            self.send_money(i, ctx);
        }
        ctx.run_interval(
            Duration::from_millis(self.ctx.cfg.expiry_check_ms),
            |act, ctx| act.check_expiry(ctx),
        );
        self.check_expiry(ctx);
        self.maybe_finish(ctx);
    }

    fn retry_at(&mut self, item: u32, at_ms: u64, ctx: &mut Context<Self>) {
        let delay = at_ms.saturating_sub(self.now_ms());
        ctx.run_later(Duration::from_millis(delay), move |act, _| {
            if act.state.items[item as usize].status == ItemStatus::Pending
                && !act.in_flight[item as usize]
                && !act.broken
            {
                act.ready.push_back(item);
                act.ctx
                    .scheduler
                    .add_ready(act.state.tenant, act.state.id, 1);
            }
        });
    }

    fn check_expiry(&mut self, ctx: &mut Context<Self>) {
        if self.broken
            || self.state.expired
            || self.state.phase != Phase::Active
            || self.state.counts.pending == 0
            || self.now_ms() < self.state.spec.expires_at_ms
        {
            return;
        }
        let at_ms = self.now_ms();
        if self.record(BatchEvent::Expired { at_ms }).is_ok() {
            self.after_bulk_terminal(ctx);
        }
    }

    /// After cancel or expiry turned every pending item terminal.
    fn after_bulk_terminal(&mut self, ctx: &mut Context<Self>) {
        self.ctx
            .scheduler
            .clear_ready(self.state.tenant, self.state.id);
        self.ready.clear();
        // Dispatched items are now terminal: their tasks will be refused at `Submitted`.
        self.in_flight_pending = 0;
        for i in 0..self.state.items.len() as u32 {
            if self.state.items[i as usize].status.is_terminal() {
                self.send_money(i, ctx);
            }
        }
        self.maybe_finish(ctx);
    }

    fn backoff_ms(&self, item: u32, attempt: u32) -> u64 {
        let cfg = &self.ctx.cfg;
        let exp = cfg
            .backoff_base_ms
            .saturating_mul(1u64 << attempt.saturating_sub(1).min(30))
            .min(cfg.backoff_max_ms);
        // Jitter: half fixed, half spread by a hash of (batch, item, attempt), so retries
        // of many items do not arrive at the provider together.
        let h = crate::providers::simulated::mix(
            (self.state.id.0 as u64) ^ ((item as u64) << 32) ^ attempt as u64,
        );
        exp / 2 + if exp > 1 { h % (exp / 2 + 1) } else { 0 }
    }

    fn on_outcome(
        &mut self,
        item: u32,
        attempt: u32,
        result: Result<StoredOutput, ProviderError>,
        ctx: &mut Context<Self>,
    ) {
        let idx = item as usize;
        if self.in_flight[idx] {
            self.in_flight[idx] = false;
            if self.state.items[idx].status == ItemStatus::Pending {
                self.in_flight_pending -= 1;
            }
        }
        let status = self.state.items[idx].status;
        if status.is_terminal() || self.broken {
            return; // canceled or expired meanwhile: nothing to decide
        }
        let at_ms = self.now_ms();
        let cfg = self.ctx.cfg.clone();
        let event = match result {
            Ok(output) => {
                debug_assert_eq!(status, ItemStatus::Running);
                BatchEvent::Succeeded {
                    item,
                    attempt,
                    output,
                    at_ms,
                }
            }
            Err(e) => {
                let failure = Failure {
                    code: e.code.clone(),
                    message: e.message.clone(),
                };
                match e.class {
                    ErrorClass::Permanent => BatchEvent::Failed {
                        item,
                        attempt,
                        failure,
                        at_ms,
                    },
                    ErrorClass::Transient if attempt >= cfg.attempts_max => BatchEvent::Failed {
                        item,
                        attempt,
                        failure,
                        at_ms,
                    },
                    ErrorClass::Transient => BatchEvent::Retrying {
                        item,
                        attempt,
                        throttled: false,
                        failure,
                        retry_at_ms: at_ms + self.backoff_ms(item, attempt),
                        at_ms,
                    },
                    ErrorClass::Throttled { retry_after_ms } => {
                        let wait = retry_after_ms
                            .unwrap_or(cfg.throttle_default_ms)
                            .min(cfg.backoff_max_ms);
                        self.ctx.scheduler.throttle(&self.state.spec.provider, wait);
                        if self.state.items[idx].throttles + 1 > cfg.throttles_max {
                            BatchEvent::Failed {
                                item,
                                attempt,
                                failure: Failure {
                                    code: "provider.rate_limited".into(),
                                    message: format!(
                                        "the provider kept rate limiting ({} times): {}",
                                        cfg.throttles_max, e.message
                                    ),
                                },
                                at_ms,
                            }
                        } else {
                            BatchEvent::Retrying {
                                item,
                                attempt,
                                throttled: true,
                                failure,
                                retry_at_ms: at_ms + wait,
                                at_ms,
                            }
                        }
                    }
                }
            }
        };
        let retry = match &event {
            BatchEvent::Retrying { retry_at_ms, .. } => Some(*retry_at_ms),
            _ => None,
        };
        if self.record(event).is_err() {
            return;
        }
        match retry {
            Some(at) => self.retry_at(item, at, ctx),
            None => {
                self.send_money(item, ctx);
            }
        }
    }

    // ---- money -----------------------------------------------------------------------

    fn send_money(&mut self, item: u32, ctx: &mut Context<Self>) {
        let idx = item as usize;
        if self.money[idx] != Money::None || self.broken {
            return;
        }
        let status = self.state.items[idx].status;
        assert!(status.is_terminal(), "money only for terminal items");
        self.money[idx] = Money::Sent;
        self.money_in_flight += 1;
        let batch = self.state.id;
        let amount = self.state.spec.unit_price;
        let settle = status == ItemStatus::Succeeded;
        let cmd = if settle {
            WalletCommand::Settle {
                batch,
                item,
                amount,
            }
        } else {
            WalletCommand::Release {
                batch,
                item,
                amount,
            }
        };
        let wallet = self.wallet.clone();
        let wal = self.ctx.wal.clone();
        let fut = async move { crate::engine::wallet::actor::execute(&wallet, &wal, cmd).await };
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            act.money_in_flight -= 1;
            match res {
                Ok(_) => {
                    act.money[idx] = Money::Done;
                    if settle {
                        act.settled += amount;
                    } else {
                        act.released += amount;
                    }
                    act.maybe_finish(ctx);
                }
                Err(WalletError::Unavailable(_)) => {
                    // Retry later: the wallet's (batch, item) key makes a repeat harmless.
                    act.money[idx] = Money::None;
                    ctx.run_later(
                        Duration::from_millis(act.ctx.cfg.money_retry_ms),
                        move |act, ctx| act.send_money(item, ctx),
                    );
                }
                Err(e) => {
                    // The wallet refused: a bug (the hold covers every item exactly once).
                    // Leave the item unconfirmed so the batch does not finish and
                    // reconciliation reports it.
                    act.ctx.anomalies.fetch_add(1, Ordering::Relaxed);
                    debug_assert!(false, "wallet refused money for {batch} item {item}: {e}");
                }
            }
        }));
    }

    fn maybe_finish(&mut self, ctx: &mut Context<Self>) {
        let s = &self.state;
        if self.broken
            || s.phase != Phase::Active
            || s.counts.terminal() != s.counts.total
            || self.money_in_flight != 0
            || self.money.iter().any(|m| *m != Money::Done)
        {
            return;
        }
        let status = s.final_status();
        // What must hold: the hold is used up exactly by the outcomes.
        let unit = s.spec.unit_price;
        assert_eq!(self.settled, s.counts.succeeded as u64 * unit);
        assert_eq!(
            self.released,
            (s.counts.failed + s.counts.canceled) as u64 * unit
        );
        let at_ms = self.now_ms();
        let Ok(durable) = self.record(BatchEvent::Finished {
            status,
            settled: self.settled,
            released: self.released,
            at_ms,
        }) else {
            return;
        };
        self.ctx
            .scheduler
            .unregister(self.state.tenant, self.state.id);
        self.ctx
            .dir
            .finish(self.state.clone(), Arc::clone(&self.expansion));
        let waiters = std::mem::take(&mut self.finish_waiters);
        self.spawn_after(durable, ctx, move |_, ctx| {
            for w in waiters {
                let _ = w.send(());
            }
            ctx.stop();
        });
    }
}

impl Actor for BatchActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        match self.state.phase {
            Phase::Holding => self.place_hold(ctx),
            Phase::Active => self.activate(ctx),
            Phase::Finished { .. } => ctx.stop(),
        }
    }
}

impl Handler<Permit> for BatchActor {
    type Result = ();

    fn handle(&mut self, permit: Permit, ctx: &mut Context<Self>) {
        if self.broken || self.state.phase != Phase::Active {
            return; // the permit drops here and returns its slots
        }
        // Bounded by the queue's length: stale entries (canceled, expired) are skipped.
        while let Some(item) = self.ready.pop_front() {
            let idx = item as usize;
            let it = &self.state.items[idx];
            if self.in_flight[idx] || it.status.is_terminal() {
                continue;
            }
            let (attempt, resume) = match it.status {
                ItemStatus::Running => (it.attempts, it.job.clone()),
                _ => (it.attempts + 1, None),
            };
            if resume.is_none() {
                self.in_flight_pending += 1;
            }
            self.in_flight[idx] = true;
            let Some(registered) = self.ctx.providers.get(&self.state.spec.provider).cloned()
            else {
                self.in_flight[idx] = false;
                if resume.is_none() {
                    self.in_flight_pending -= 1;
                }
                let e = ProviderError::permanent(
                    "provider.unknown",
                    format!("no provider {:?} is configured", self.state.spec.provider),
                );
                self.on_outcome(item, attempt.max(1), Err(e), ctx);
                continue;
            };
            let task = AttemptTask {
                addr: ctx.address(),
                provider: registered.provider,
                req: self.job_request(item, attempt),
                resume,
                store: self.ctx.store.clone(),
                clock: Arc::clone(&self.ctx.clock),
                cfg: self.ctx.cfg.clone(),
                provider_name: self.state.spec.provider.clone(),
                stats: Arc::clone(&self.ctx.provider_stats),
            };
            self.ctx.workers.spawn(attempt::run(task, permit));
            return;
        }
    }
}

/// The attempt task's job id for `item`: record it (durable before polling). `None` when
/// the item is no longer pending (canceled or expired meanwhile): the task cancels the job.
pub(crate) struct Submitted {
    pub item: u32,
    pub attempt: u32,
    pub job: String,
}

impl Message for Submitted {
    type Result = Option<wal::Durable>;
}

impl Handler<Submitted> for BatchActor {
    type Result = actix::MessageResult<Submitted>;

    fn handle(&mut self, msg: Submitted, _: &mut Context<Self>) -> Self::Result {
        let idx = msg.item as usize;
        if self.broken
            || !self.in_flight[idx]
            || self.state.items[idx].status != ItemStatus::Pending
        {
            return actix::MessageResult(None);
        }
        let at_ms = self.now_ms();
        let res = self.record(BatchEvent::Submitted {
            item: msg.item,
            attempt: msg.attempt,
            job: msg.job,
            at_ms,
        });
        if res.is_ok() {
            self.in_flight_pending -= 1;
        }
        actix::MessageResult(res.ok())
    }
}

/// An attempt's result.
pub(crate) struct Outcome {
    pub item: u32,
    pub attempt: u32,
    pub result: Result<StoredOutput, ProviderError>,
}

impl Message for Outcome {
    type Result = ();
}

impl Handler<Outcome> for BatchActor {
    type Result = ();

    fn handle(&mut self, msg: Outcome, ctx: &mut Context<Self>) {
        self.on_outcome(msg.item, msg.attempt, msg.result, ctx);
    }
}

/// Cancel (SPEC §3): pending items are canceled and released now; running ones finish.
pub(crate) struct Cancel;

impl Message for Cancel {
    type Result = Result<(BatchView, Option<wal::Durable>), BatchError>;
}

impl Handler<Cancel> for BatchActor {
    type Result = Result<(BatchView, Option<wal::Durable>), BatchError>;

    fn handle(&mut self, _: Cancel, ctx: &mut Context<Self>) -> Self::Result {
        if self.broken {
            return Err(BatchError::Unavailable("the log refused a write".into()));
        }
        if self.state.cancel_requested || self.state.phase != Phase::Active {
            return Ok((self.view(), None));
        }
        let at_ms = self.now_ms();
        let durable = self.record(BatchEvent::CancelRequested { at_ms })?;
        self.after_bulk_terminal(ctx);
        Ok((self.view(), Some(durable)))
    }
}

/// Reads (each answer carries the batch's `last_lsn`: the caller waits until it is
/// acknowledged, so no read shows a change the log could still lose).
pub(crate) enum Read {
    /// The batch.
    View,
    /// Items with index ≥ `from`, at most `limit`.
    Items { from: u32, limit: u32 },
    /// The whole state (snapshots, tests).
    Capture,
}

pub(crate) enum ReadAnswer {
    View(Box<BatchView>),
    Items(Vec<ItemView>),
    Capture(Box<BatchState>),
}

impl Message for Read {
    type Result = (ReadAnswer, u64);
}

impl Handler<Read> for BatchActor {
    type Result = actix::MessageResult<Read>;

    fn handle(&mut self, msg: Read, _: &mut Context<Self>) -> Self::Result {
        let answer = match msg {
            Read::View => ReadAnswer::View(Box::new(self.view())),
            Read::Items { from, limit } => ReadAnswer::Items(ItemView::page(
                &self.state,
                &self.expansion,
                from,
                limit,
                |i| self.in_flight[i as usize],
            )),
            Read::Capture => ReadAnswer::Capture(Box::new(self.state.clone())),
        };
        actix::MessageResult((answer, self.state.last_lsn))
    }
}

/// Wait for the hold's outcome (creation).
pub(crate) struct AwaitAccepted;

impl Message for AwaitAccepted {
    type Result = tokio::sync::oneshot::Receiver<Result<(), BatchError>>;
}

impl Handler<AwaitAccepted> for BatchActor {
    type Result = actix::MessageResult<AwaitAccepted>;

    fn handle(&mut self, _: AwaitAccepted, _: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = tokio::sync::oneshot::channel();
        match self.state.phase {
            // The log failed under this actor: whether its events are durable is unknown.
            _ if self.broken => {
                let _ = tx.send(Err(BatchError::Unavailable(
                    "the log refused a write".into(),
                )));
            }
            Phase::Holding => self.accept_waiters.push(tx),
            _ => {
                let _ = tx.send(Ok(()));
            }
        }
        actix::MessageResult(rx)
    }
}

/// Wait for the batch to finish.
pub(crate) struct AwaitFinished;

impl Message for AwaitFinished {
    type Result = tokio::sync::oneshot::Receiver<()>;
}

impl Handler<AwaitFinished> for BatchActor {
    type Result = actix::MessageResult<AwaitFinished>;

    fn handle(&mut self, _: AwaitFinished, _: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.finish_waiters.push(tx);
        actix::MessageResult(rx)
    }
}
