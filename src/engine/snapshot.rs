//! Whole-engine snapshot image: every wallet's state, rkyv-encoded behind the same
//! 16-byte version header as WAL records, written by `wal::write_snapshot` (atomic).
//!
//! Snapshots are fuzzy: wallets are captured one by one while others keep working. Each
//! wallet carries the LSN of the last event it applied, and replay skips a wallet's
//! events at or below it. `covered_lsn` is read before any capture starts, so every event
//! at or below it is inside the image; segments wholly below it can be dropped. The image is
//! written only after every captured LSN is acknowledged, so it never holds a change the
//! log could lose.

use crate::delivery::access::AccessEntry;
use crate::engine::accounts::AccountsState;
use crate::engine::batch::state::BatchState;
use crate::engine::journal::{archive_of, with_header, JournalError};
use crate::engine::wallet::state::WalletState;
use crate::webhooks::state::OutboxImage;

/// Version of the image encoding (the header's first byte). 3: everything up to the
/// batch archive (images shared the log records' version until then); 4: stored
/// responses listed by where they are filed, their bodies in the response segments; 5:
/// wallets carry where their filed ledger pages are (`WalletState::filed`); 6: no stored
/// responses (the response index on disk has the filed ones, the log the others); 7:
/// wallets carry their retired grants' sums (`WalletState::retired`, `grants_filed`). An
/// image of another version is refused: startup fails with the version named.
pub const IMAGE_VERSION: u8 = 7;

/// The engine's state at a point in the log.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct EngineImage {
    /// Every event with LSN ≤ this is reflected in the image.
    pub covered_lsn: u64,
    /// All wallets (each with its own `last_lsn`).
    pub wallets: Vec<WalletState>,
    /// All batches, active and finished (each with its own `last_lsn`).
    pub batches: Vec<BatchState>,
    /// Tenants and keys (with their own `last_lsn`).
    pub accounts: AccountsState,
    /// Webhook endpoints and deliveries (captured after every wallet and batch).
    pub webhooks: OutboxImage,
    /// The access log's entries kept in memory, and the LSN of the last one.
    pub access: Vec<AccessEntry>,
    pub access_lsn: u64,
}

/// Encodes an image.
pub fn encode(image: &EngineImage) -> Vec<u8> {
    let archive =
        rkyv::to_bytes::<rkyv::rancor::Error>(image).expect("serializing an image cannot fail");
    with_header(&archive, IMAGE_VERSION)
}

/// Decodes and validates an image (payload 16-byte aligned).
pub fn decode(payload: &[u8]) -> Result<EngineImage, JournalError> {
    let mut image =
        rkyv::from_bytes::<EngineImage, rkyv::rancor::Error>(archive_of(payload, IMAGE_VERSION)?)
            .map_err(|e| JournalError::Invalid(e.to_string()))?;
    // Fields derived from the grants are not archived.
    for w in &mut image.wallets {
        w.restore_derived();
    }
    Ok(image)
}
