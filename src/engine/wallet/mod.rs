//! The wallet: the only code that moves credits (SPEC §2).
//!
//! - `state.rs`   `WalletState`: commands, events, `decide`, `apply`, invariants, statements
//! - `ledger.rs`  ledger entries and the per-tenant SHA-256 hash chain
//! - `actor.rs`   `WalletActor`: one per tenant; decide → append → apply, reply with the
//!   durability handle
//! - `view.rs`    `BalanceView`: balances the actor publishes after each command, read
//!   without a round trip to the actor

pub mod actor;
pub mod history;
pub mod ledger;
pub mod state;
pub mod view;
