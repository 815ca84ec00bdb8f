//! How the load's tenants are funded, and (steady funding) the books that size top-ups.
//!
//! `fixed` gives every tenant a billion credits and every `topup` adds one: creations never
//! run dry, but each top-up leaves a one-credit grant that is never drawn (the billion is
//! drawn first), so the server's live money state grows with every top-up. Right for
//! short runs and the capacity sweep (a top-up costs the same durable write either way);
//! wrong for a soak, whose memory then measures the pile of grants, not the server.
//!
//! `steady` gives every tenant a working balance and makes every `topup` add back what
//! the tenant's creations were charged since its previous top-up: the balance hovers near
//! its start, grants are drawn in order and retire as they empty, and the live money
//! state stays about constant, as with a customer who tops up what they use.

use std::sync::atomic::{AtomicU64, Ordering};

/// The funding mode (`--funding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Funding {
    /// A billion credits each; one-credit top-ups.
    Fixed,
    /// `STEADY_CREDITS` each; top-ups replace what creations were charged.
    Steady,
}

/// Credits each tenant starts with under `fixed`: hours of `create` at any rate.
pub const FIXED_CREDITS: u64 = 1_000_000_000;
/// Credits each tenant starts with under `steady`: about 25 two-item creations at the
/// enterprise price, so the first grant is drawn down within minutes of a soak and the
/// churn of grants starts early; deep enough that a tenant's random run of creations
/// without a top-up between them (each op is equally likely to be either) never reaches
/// it in practice (25 in a row: odds about 3 in 100 million per top-up).
pub const STEADY_CREDITS: u64 = 2_000;

impl Funding {
    /// The first top-up of each provisioned tenant.
    pub fn initial_credits(self) -> u64 {
        match self {
            Funding::Fixed => FIXED_CREDITS,
            Funding::Steady => STEADY_CREDITS,
        }
    }

    /// The mode's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Funding::Fixed => "fixed",
            Funding::Steady => "steady",
        }
    }
}

/// What creations were charged and top-ups added over a run (steady funding keeps them;
/// a report shows them so a reader can check the books balance).
#[derive(Debug, Default)]
pub struct Books {
    /// Credits the answered creations held (each batch's `total`).
    pub charged: AtomicU64,
    /// Credits the acknowledged top-ups added.
    pub topped_up: AtomicU64,
}

impl Books {
    /// `{"mode", "charged_credits", "topped_up_credits"}` for the JSON reports.
    pub fn json(&self, mode: Funding) -> serde_json::Value {
        serde_json::json!({
            "mode": mode.name(),
            "charged_credits": self.charged.load(Ordering::Relaxed),
            "topped_up_credits": self.topped_up.load(Ordering::Relaxed),
        })
    }
}
