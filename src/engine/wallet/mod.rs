//! The wallet: the only code that moves credits (SPEC §2).
//!
//! - `state.rs`   `WalletState`: commands, events, `decide`, `apply`, invariants, statements
//! - `ledger.rs`  ledger entries and the per-tenant SHA-256 hash chain
//! - `actor.rs`   `WalletActor`: one per tenant; decide → append → apply, reply with the
//!   durability handle

pub mod actor;
pub mod ledger;
pub mod state;
