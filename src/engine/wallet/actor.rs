//! One actix actor per tenant.
//!
//! A command is handled synchronously: expire due grants, `decide`, append each event to
//! the WAL (which assigns its LSN), `apply` it, and reply with the durability handle of the
//! last event. The caller awaits that handle; the actor is already handling the next
//! message while earlier events sync, and handles resolve in LSN order, so replies are
//! acknowledged in log order. Appending before applying means a refused append (poisoned
//! or closed log) leaves the state exactly as the log has it.
//!
//! Two ways in. `ExecuteAcked` (what `execute` sends; every caller that wants the outcome
//! only once acknowledged): the caller makes a `wal::Ticket`, sends it with the command
//! without awaiting a reply (`try_send`), and awaits the ticket's future; the actor appends
//! the command's last event with that ticket and puts the outcome in a oneshot the caller
//! reads once the ticket resolved. The caller is woken once per command (by the log's
//! completion), not twice (reply, then durability): on 2 cores the wake-ups, not the
//! wallet's arithmetic, are most of the cost. `Execute` replies through actix with the
//! durability handle, for callers that must act on an outcome before it is acknowledged
//! (the HTTP layer appends a stored response behind a top-up and waits once for both).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix::{Actor, Context, Handler, Message};

use crate::engine::events::Record;
use crate::engine::journal;
use crate::engine::wallet::history::{FiledPage, WalletHistory};
use crate::engine::wallet::ledger::LedgerEntry;
use crate::engine::wallet::state::{
    Balances, Decision, Statement, WalletCommand, WalletError, WalletEvent, WalletState,
};
use crate::engine::wallet::view::BalanceView;

/// What the caller must await before acknowledging.
pub enum Wait {
    /// The new events' durability handle (the last one covers all before it).
    Durable(wal::Durable),
    /// An LSN recorded earlier (a repeat waits for its original to be acknowledged).
    Acked(u64),
    /// The last new event (this LSN) was appended with the caller's ticket: its
    /// `Ticketed` future covers it and all before it.
    Ticketed(u64),
}

/// The actor.
pub struct WalletActor {
    /// The wallet.
    pub(crate) state: WalletState,
    /// What every wallet actor shares: one pointer per actor, not four (an idle tenant's
    /// memory is mostly its actor).
    pub(crate) shared: Arc<WalletShared>,
    /// Balances published after every command, for reads that skip the mailbox; made on
    /// the first balance read (`Read::View`).
    pub(crate) view: Option<Arc<BalanceView>>,
}

/// The parts all wallet actors share.
pub(crate) struct WalletShared {
    /// Where events go.
    pub(crate) wal: wal::Wal,
    /// Events appended by all wallets since start (drives periodic snapshots).
    pub(crate) events_appended: Arc<AtomicU64>,
    /// Time source, read when a command is handled (not when it was sent), so the
    /// ledger's times follow its order.
    pub(crate) clock: Arc<dyn crate::engine::Clock>,
    /// Where wallet events go as webhooks (top-ups, low balance).
    pub(crate) outbox: Arc<crate::webhooks::Outbox>,
    /// Filed ledger pages (a repeat of an old operation reads its entry back).
    pub(crate) history: Arc<WalletHistory>,
    /// Filed operations' keys (a repeat of an old operation finds its entry).
    pub(crate) ops: Arc<crate::engine::wallet::op_index::OpIndex>,
}

impl Actor for WalletActor {
    type Context = Context<Self>;
}

impl WalletActor {
    /// Appends `event` (with `ticket`, if given, to report its durability), then applies
    /// it. Returns what covers it.
    fn record(
        &mut self,
        event: WalletEvent,
        ticket: Option<wal::Ticket>,
    ) -> Result<Wait, WalletError> {
        let record = Record::Wallet {
            tenant: self.state.tenant,
            event,
        };
        let unavailable = |e: wal::Error| WalletError::Unavailable(e.to_string());
        let wait = match ticket {
            None => Wait::Durable(journal::append(&self.shared.wal, &record).map_err(unavailable)?),
            Some(t) => Wait::Ticketed(
                journal::append_ticketed(&self.shared.wal, &record, t).map_err(unavailable)?,
            ),
        };
        let Record::Wallet { event, .. } = record else {
            unreachable!("built above")
        };
        let lsn = wait.lsn();
        let before = self.state.available;
        self.state.apply(&event, lsn);
        let state = &self.state;
        // Most wallet events (holds, settlements) are no webhook: skip the outbox's lock.
        if crate::webhooks::payload::wallet_may_emit(state, &event) {
            self.shared.outbox.emit(state.tenant, || {
                crate::webhooks::payload::wallet_events(state, before, &event, lsn)
            });
        }
        self.shared.events_appended.fetch_add(1, Ordering::Relaxed);
        Ok(wait)
    }
}

/// Run a command.
pub struct Execute {
    /// The command.
    pub cmd: WalletCommand,
}

/// A command's result before durability.
pub struct Executed {
    /// Ledger entries the command made, including expiries it triggered first (for a
    /// repeat: those expiries, then the original's entry).
    pub entries: Vec<LedgerEntry>,
    /// Balances right after.
    pub balances: Balances,
    /// What to await before acknowledging.
    pub wait: Wait,
}

impl Message for Execute {
    type Result = Result<Executed, WalletError>;
}

impl Handler<Execute> for WalletActor {
    type Result = Result<Executed, WalletError>;

    fn handle(&mut self, msg: Execute, _: &mut Context<Self>) -> Self::Result {
        let result = self.execute(msg.cmd, &mut None);
        self.publish();
        result
    }
}

/// Run a command; the outcome goes to `reply`, its acknowledgement to `ticket`'s future
/// (see the module doc). Sent with `try_send`: nothing to await but the ticket.
pub struct ExecuteAcked {
    /// The command.
    pub cmd: WalletCommand,
    /// Used for the command's last new event, if it makes any.
    pub ticket: wal::Ticket,
    /// Where the outcome goes (sent before the ticket is dropped unused, so a caller woken
    /// by the ticket always finds it).
    pub reply: tokio::sync::oneshot::Sender<Result<Executed, WalletError>>,
}

impl Message for ExecuteAcked {
    type Result = ();
}

impl Handler<ExecuteAcked> for WalletActor {
    type Result = ();

    fn handle(&mut self, msg: ExecuteAcked, _: &mut Context<Self>) {
        let mut ticket = Some(msg.ticket);
        let result = self.execute(msg.cmd, &mut ticket);
        self.publish();
        // A caller gone meanwhile is fine: the command is done and keyed; a repeat finds it.
        let _ = msg.reply.send(result);
        drop(ticket);
    }
}

impl WalletActor {
    /// Publishes the balances, whatever the command's outcome (an error may follow
    /// expiries already recorded).
    fn publish(&self) {
        if let Some(view) = &self.view {
            view.publish(&self.state);
        }
    }

    /// Runs `cmd`. If it records events and `ticket` is `Some`, the last event is appended
    /// with the ticket (taken) and the outcome's wait is `Wait::Ticketed`.
    fn execute(
        &mut self,
        cmd: WalletCommand,
        ticket: &mut Option<wal::Ticket>,
    ) -> Result<Executed, WalletError> {
        let now_ms = self.shared.clock.now_ms().max(self.state.last_at_ms());
        let before = self.state.ledger.len();
        let mut last = None;
        // Expire what is due first: facts in their own right, whatever the command's fate.
        for ev in self.state.expiry_events(now_ms) {
            last = Some(self.record(ev, None)?);
        }
        let wait = match self.state.decide(&cmd, now_ms, self)? {
            Decision::Repeat(seq) => {
                let original = match seq {
                    None => None,
                    Some(s) => Some(self.original_entry(s)?),
                };
                let lsn = original.as_ref().map_or(self.state.last_lsn, |e| e.lsn);
                let mut entries = self.state.ledger[before..].to_vec();
                entries.extend(original);
                return Ok(Executed {
                    entries,
                    balances: self.state.balances(),
                    // Expiries recorded just now are newer than the original: waiting for
                    // them covers both.
                    wait: last.unwrap_or(Wait::Acked(lsn)),
                });
            }
            Decision::Record(events) => {
                let n = events.len();
                for (i, ev) in events.into_iter().enumerate() {
                    let t = if i + 1 == n { ticket.take() } else { None };
                    last = Some(self.record(ev, t)?);
                }
                last.unwrap_or(Wait::Acked(self.state.last_lsn))
            }
        };
        Ok(Executed {
            entries: self.state.ledger[before..].to_vec(),
            balances: self.state.balances(),
            wait,
        })
    }
}

impl crate::engine::wallet::state::Recall for WalletActor {
    fn entry(&self, seq: u64) -> Result<LedgerEntry, WalletError> {
        self.original_entry(seq)
    }

    fn op(
        &self,
        request_id: &str,
    ) -> Result<Option<crate::engine::wallet::op_index::OpRow>, WalletError> {
        self.shared
            .ops
            .get(self.state.tenant, request_id)
            .map_err(|e| WalletError::Unavailable(e.to_string()))
    }
}

impl WalletActor {
    /// Entry `seq`, from memory or (an old operation's repeat: rare) read back from its
    /// filed page, in place: a positional read of one page.
    fn original_entry(&self, seq: u64) -> Result<LedgerEntry, WalletError> {
        if let Some(e) = self.state.entry(seq) {
            return Ok(e.clone());
        }
        let page = self
            .state
            .filed_page_of(seq)
            .expect("a recorded operation's entry is in memory or filed");
        let p = self
            .shared
            .history
            .read(self.state.tenant, &page)
            .map_err(|e| WalletError::Unavailable(e.to_string()))?;
        let i = (seq - page.first_seq) as usize;
        Ok(p.entries.into_iter().nth(i).expect("the page was checked"))
    }
}

/// The snapshot made this wallet's copy smaller; the live wallet does the same:
/// `page` (written to the history file and synced) leaves memory
/// (`WalletState::filed_ledger`), and the finished holds of archived batches in `retire`
/// are removed (`WalletState::retire_holds`).
pub(crate) struct Compact {
    pub(crate) page: Option<FiledPage>,
    pub(crate) retire: Vec<crate::ids::BatchId>,
    /// Leading grants to retire (`WalletState::retire_grants`).
    pub(crate) retire_grants: u32,
}

impl Message for Compact {
    type Result = ();
}

impl Handler<Compact> for WalletActor {
    type Result = ();

    fn handle(&mut self, msg: Compact, _: &mut Context<Self>) {
        if let Some(page) = msg.page {
            self.state.filed_ledger(page);
        }
        self.state.retire_holds(&msg.retire);
        self.state.retire_grants(msg.retire_grants);
    }
}

/// Reads. Each answer carries the wallet's `last_lsn`: the caller waits until it is
/// acknowledged, so no read shows a change the log could still lose.
pub enum Read {
    /// The wallet's balance view, made now if it has none (see `wallet::view`).
    View,
    /// Entries with seq > `after`, at most `limit`: the in-memory ones, and the filed
    /// pages to read for the rest.
    Ledger { after: u64, limit: usize },
    /// Statement for `[from_ms, to_ms)`.
    Statement { from_ms: u64, to_ms: u64 },
    /// The whole state (snapshots, tests).
    Capture,
    /// `check_invariants` on the state.
    CheckInvariants,
}

/// Answer to a `Read`.
pub enum ReadAnswer {
    View(Arc<BalanceView>),
    Ledger {
        filed: Vec<FiledPage>,
        memory: Vec<LedgerEntry>,
    },
    /// The statement when no filed page is needed; otherwise the pages to read and the
    /// in-memory entries before `to_ms` (`state::statement_of` over both).
    Statement(Box<Statement>),
    StatementParts {
        filed: Vec<FiledPage>,
        memory: Vec<LedgerEntry>,
    },
    Capture(Box<WalletState>),
    Invariants(Result<(), String>),
}

impl Message for Read {
    type Result = (ReadAnswer, u64);
}

impl Handler<Read> for WalletActor {
    type Result = actix::MessageResult<Read>;

    fn handle(&mut self, msg: Read, _: &mut Context<Self>) -> Self::Result {
        if let Read::View = msg {
            let state = &self.state;
            let view = self
                .view
                .get_or_insert_with(|| Arc::new(BalanceView::of(state)));
            return actix::MessageResult((ReadAnswer::View(Arc::clone(view)), state.last_lsn));
        }
        let s = &self.state;
        let answer = match msg {
            Read::View => unreachable!("answered above"),
            Read::Ledger { after, limit } => {
                // In-memory entries have seq > filed; index of seq `after + 1` in the tail.
                let filed_n = s.filed_entries();
                let start = (after.saturating_sub(filed_n) as usize).min(s.ledger.len());
                let end = start.saturating_add(limit).min(s.ledger.len());
                ReadAnswer::Ledger {
                    filed: s.filed_pages_for(after, limit),
                    memory: s.ledger[start..end].to_vec(),
                }
            }
            Read::Statement { from_ms, to_ms } => {
                let filed = s.filed_pages_between(from_ms, to_ms);
                if filed.is_empty() {
                    ReadAnswer::Statement(Box::new(s.statement(&[], from_ms, to_ms)))
                } else {
                    let n = s.ledger.partition_point(|e| e.at_ms < to_ms);
                    ReadAnswer::StatementParts {
                        filed,
                        memory: s.ledger[..n].to_vec(),
                    }
                }
            }
            Read::Capture => ReadAnswer::Capture(Box::new(s.clone())),
            Read::CheckInvariants => ReadAnswer::Invariants(s.check_invariants()),
        };
        actix::MessageResult((answer, s.last_lsn))
    }
}

/// Sends `cmd` to a wallet actor and waits until its outcome is acknowledged (durable):
/// the one path every caller (HTTP, batch actors) takes to move credits.
pub(crate) async fn execute(
    addr: &actix::Addr<WalletActor>,
    wal: &wal::Wal,
    cmd: WalletCommand,
) -> Result<(Vec<LedgerEntry>, Balances), WalletError> {
    send_acked(addr, cmd).finish(wal).await
}

/// An `ExecuteAcked` in the mailbox (or still to be sent: see `send_acked`); `finish`
/// awaits its acknowledged outcome.
#[must_use = "the outcome is known only once finished"]
pub(crate) struct Acked {
    /// Resolves once the command's last event is durable (or says it made none).
    ticketed: wal::Ticketed,
    /// The outcome, sent by the actor before it drops an unused ticket.
    reply: tokio::sync::oneshot::Receiver<Result<Executed, WalletError>>,
    /// The message, when the mailbox was full: `finish` sends it with backpressure.
    unsent: Option<(actix::Addr<WalletActor>, ExecuteAcked)>,
}

/// Puts `cmd` in the actor's mailbox without waiting (so it may be called under a lock).
/// Only a full mailbox clones the address (two allocations in actix), for `finish` to
/// wait for room; a stopped actor drops the message, and `finish` reports the wallet
/// unavailable.
pub(crate) fn send_acked(addr: &actix::Addr<WalletActor>, cmd: WalletCommand) -> Acked {
    let (ticket, ticketed) = wal::Ticket::new();
    let (tx, reply) = tokio::sync::oneshot::channel();
    let msg = ExecuteAcked {
        cmd,
        ticket,
        reply: tx,
    };
    let unsent = match addr.try_send(msg) {
        Ok(()) => None,
        Err(actix::prelude::SendError::Full(msg)) => Some((addr.clone(), msg)),
        // Dropped with its reply sender: `finish` reports the actor as unavailable.
        Err(actix::prelude::SendError::Closed(_)) => None,
    };
    Acked {
        ticketed,
        reply,
        unsent,
    }
}

impl Acked {
    /// Sends the message `send_acked` could not queue (mailbox full: waits for room), then
    /// waits for the acknowledged outcome.
    pub(crate) async fn finish(
        self,
        wal: &wal::Wal,
    ) -> Result<(Vec<LedgerEntry>, Balances), WalletError> {
        let unavailable = |e: &dyn std::fmt::Display| WalletError::Unavailable(e.to_string());
        if let Some((addr, msg)) = self.unsent {
            addr.send(msg).await.map_err(|e| unavailable(&e))?;
        }
        // Usually the one wake-up: the log's completion of the ticket.
        let appended = self.ticketed.await;
        let done = self
            .reply
            .await
            .map_err(|_| unavailable(&"wallet actor stopped"))??;
        match done.wait {
            Wait::Ticketed(_) => match appended {
                Ok(true) => {}
                Ok(false) => return Err(unavailable(&"the command's append was refused")),
                Err(e) => return Err(unavailable(&e)),
            },
            other => wait_for(wal, other).await?,
        }
        Ok((done.entries, done.balances))
    }
}

/// The outcome of an `Execute` already sent, not yet acknowledged: the caller must
/// `wait_for` the returned `Wait` (or a later append's durability, which implies it)
/// before it acknowledges anything. The caller may have sent it under a lock, without
/// cloning the address (each `Addr` clone allocates in actix).
pub(crate) async fn executed(
    request: actix::dev::Request<WalletActor, Execute>,
) -> Result<(Vec<LedgerEntry>, Balances, Wait), WalletError> {
    let done = request
        .await
        .map_err(|e| WalletError::Unavailable(e.to_string()))??;
    Ok((done.entries, done.balances, done.wait))
}

/// Waits until a command's outcome is acknowledged.
pub(crate) async fn wait_for(wal: &wal::Wal, wait: Wait) -> Result<(), WalletError> {
    let unavailable = |e: &dyn std::fmt::Display| WalletError::Unavailable(e.to_string());
    match wait {
        Wait::Durable(d) => {
            d.await.map_err(|e| unavailable(&e))?;
        }
        Wait::Acked(lsn) => wal.wait_acked(lsn).await.map_err(|e| unavailable(&e))?,
        // Only `Acked::finish` holds the ticket's future; anyone else waits for the LSN.
        Wait::Ticketed(lsn) => wal.wait_acked(lsn).await.map_err(|e| unavailable(&e))?,
    }
    Ok(())
}

impl Wait {
    /// The LSN to be acknowledged.
    pub fn lsn(&self) -> u64 {
        match self {
            Wait::Durable(d) => d.lsn(),
            Wait::Acked(lsn) | Wait::Ticketed(lsn) => *lsn,
        }
    }
}
