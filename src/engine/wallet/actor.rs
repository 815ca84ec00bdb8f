//! One actix actor per tenant.
//!
//! A command is handled synchronously: expire due grants, `decide`, append each event to
//! the WAL (which assigns its LSN), `apply` it, and reply with the durability handle of the
//! last event. The caller awaits that handle; the actor is already handling the next
//! message while earlier events sync, and handles resolve in LSN order, so replies are
//! acknowledged in log order. Appending before applying means a refused append (poisoned
//! or closed log) leaves the state exactly as the log has it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix::{Actor, Context, Handler, Message};

use crate::engine::events::Record;
use crate::engine::journal;
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
}

impl Actor for WalletActor {
    type Context = Context<Self>;
}

impl WalletActor {
    fn record(&mut self, event: WalletEvent) -> Result<wal::Durable, WalletError> {
        let record = Record::Wallet {
            tenant: self.state.tenant,
            event,
        };
        let durable = journal::append(&self.shared.wal, &record)
            .map_err(|e| WalletError::Unavailable(e.to_string()))?;
        let Record::Wallet { event, .. } = record else {
            unreachable!("built above")
        };
        let lsn = durable.lsn();
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
        Ok(durable)
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
        let result = self.execute(msg);
        // Whatever the outcome (an error may follow expiries already recorded).
        if let Some(view) = &self.view {
            view.publish(&self.state);
        }
        result
    }
}

impl WalletActor {
    fn execute(&mut self, msg: Execute) -> Result<Executed, WalletError> {
        let now_ms = self.shared.clock.now_ms().max(self.state.last_at_ms());
        let before = self.state.ledger.len();
        let mut last = None;
        // Expire what is due first: facts in their own right, whatever the command's fate.
        for ev in self.state.expiry_events(now_ms) {
            last = Some(self.record(ev)?);
        }
        let wait = match self.state.decide(&msg.cmd, now_ms)? {
            Decision::Repeat(seq) => {
                let original = seq.and_then(|s| self.state.entry(s).cloned());
                let lsn = original.as_ref().map_or(self.state.last_lsn, |e| e.lsn);
                let mut entries = self.state.ledger[before..].to_vec();
                entries.extend(original);
                return Ok(Executed {
                    entries,
                    balances: self.state.balances(),
                    // Expiries recorded just now are newer than the original: waiting for
                    // them covers both.
                    wait: match last {
                        Some(d) => Wait::Durable(d),
                        None => Wait::Acked(lsn),
                    },
                });
            }
            Decision::Record(events) => {
                for ev in events {
                    last = Some(self.record(ev)?);
                }
                match last {
                    Some(d) => Wait::Durable(d),
                    None => Wait::Acked(self.state.last_lsn),
                }
            }
        };
        Ok(Executed {
            entries: self.state.ledger[before..].to_vec(),
            balances: self.state.balances(),
            wait,
        })
    }
}

/// Reads. Each answer carries the wallet's `last_lsn`: the caller waits until it is
/// acknowledged, so no read shows a change the log could still lose.
pub enum Read {
    /// The wallet's balance view, made now if it has none (see `wallet::view`).
    View,
    /// Entries with seq > `after`, at most `limit`.
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
    Ledger(Vec<LedgerEntry>),
    Statement(Box<Statement>),
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
                let start = (after as usize).min(s.ledger.len());
                let end = start.saturating_add(limit).min(s.ledger.len());
                ReadAnswer::Ledger(s.ledger[start..end].to_vec())
            }
            Read::Statement { from_ms, to_ms } => {
                ReadAnswer::Statement(Box::new(s.statement(from_ms, to_ms)))
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
    let (entries, balances, wait) = executed(addr.send(Execute { cmd })).await?;
    wait_for(wal, wait).await?;
    Ok((entries, balances))
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
    }
    Ok(())
}

impl Wait {
    /// The LSN to be acknowledged.
    pub fn lsn(&self) -> u64 {
        match self {
            Wait::Durable(d) => d.lsn(),
            Wait::Acked(lsn) => *lsn,
        }
    }
}
