//! The wallet: the only code that moves credits (SPEC §2).
//!
//! - `state.rs`   `WalletState`: commands, events, `decide`, `apply`, invariants, statements
//! - `ledger.rs`  ledger entries and the per-tenant SHA-256 hash chain
//! - `actor.rs`   `WalletActor`: one per tenant; decide → append → apply, reply with the
//!   durability handle
//! - `history.rs` older ledger entries on disk (one page per wallet per snapshot)
//! - `op_index.rs` old top-ups' and adjustments' keys on disk (repeats of old operations)
//! - `view.rs`    `BalanceView`: balances the actor publishes after each command, read
//!   without a round trip to the actor

pub mod actor;
pub mod history;
pub mod ledger;
pub mod op_index;
pub mod state;
pub mod view;
