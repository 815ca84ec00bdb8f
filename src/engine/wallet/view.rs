//! A wallet's balances as its actor last published them.
//!
//! `GET /v1/wallet` is the most frequent read. Through the actor it costs two thread
//! hand-offs (request → the actor's arbiter → back), which on a 2-core machine is most of
//! the read's price. The actor instead publishes its balances here after every command,
//! with the LSN of the last event applied; a reader copies them under a short lock and
//! then waits, as every wallet read does, until that LSN is acknowledged — so a read never
//! shows a change the log could still lose. Only the actor writes; nothing here moves
//! credits.
//!
//! A view is made on a wallet's first balance read (through the actor, which then keeps
//! publishing): an idle tenant carries no view, so its memory stays at what the actor
//! and its state need (≈ 130 bytes more once its balance has been read).

use std::sync::Mutex;

use crate::engine::wallet::state::{Balances, WalletState};

/// The published balances of one wallet.
#[derive(Debug)]
pub struct BalanceView {
    /// (balances, LSN of the last event they include). A `Mutex`, not atomics: the
    /// figures must be read as one consistent set (conservation holds between them).
    published: Mutex<(Balances, u64)>,
}

impl BalanceView {
    /// A view of `state` as it is now.
    pub(crate) fn of(state: &WalletState) -> Self {
        BalanceView {
            published: Mutex::new((state.balances(), state.last_lsn)),
        }
    }

    /// Publishes `state`'s balances (the actor, after each command).
    pub(crate) fn publish(&self, state: &WalletState) {
        let mut p = self.published.lock().unwrap_or_else(|e| e.into_inner());
        debug_assert!(state.last_lsn >= p.1, "a wallet's LSN never goes back");
        *p = (state.balances(), state.last_lsn);
    }

    /// The last published balances and the LSN the reader must see acknowledged first.
    pub(crate) fn read(&self) -> (Balances, u64) {
        *self.published.lock().unwrap_or_else(|e| e.into_inner())
    }
}
