//! Whole-engine snapshot image: every wallet's state, rkyv-encoded behind the same
//! 16-byte version header as WAL records, written by `wal::write_snapshot` (atomic).
//!
//! Snapshots are fuzzy: wallets are captured one by one while others keep working. Each
//! wallet carries the LSN of the last event it applied, and replay skips a wallet's
//! events at or below it. `covered_lsn` is read before any capture starts, so every event
//! at or below it is inside the image; segments wholly below it can be dropped. The image is
//! written only after every captured LSN is acknowledged, so it never holds a change the
//! log could lose.

use crate::engine::journal::{JournalError, RECORD_HEADER_BYTES, RECORD_VERSION};
use crate::engine::wallet::state::WalletState;

/// The engine's state at a point in the log.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct EngineImage {
    /// Every event with LSN ≤ this is reflected in the image.
    pub covered_lsn: u64,
    /// All wallets (each with its own `last_lsn`).
    pub wallets: Vec<WalletState>,
}

/// Encodes an image.
pub fn encode(image: &EngineImage) -> Vec<u8> {
    let archive =
        rkyv::to_bytes::<rkyv::rancor::Error>(image).expect("serializing an image cannot fail");
    let mut out = Vec::with_capacity(RECORD_HEADER_BYTES + archive.len());
    out.push(RECORD_VERSION);
    out.extend_from_slice(&[0u8; RECORD_HEADER_BYTES - 1]);
    out.extend_from_slice(&archive);
    out
}

/// Decodes and validates an image (payload 16-byte aligned).
pub fn decode(payload: &[u8]) -> Result<EngineImage, JournalError> {
    if payload.len() < RECORD_HEADER_BYTES {
        return Err(JournalError::Short(payload.len()));
    }
    if payload[0] != RECORD_VERSION {
        return Err(JournalError::Version(payload[0]));
    }
    rkyv::from_bytes::<EngineImage, rkyv::rancor::Error>(&payload[RECORD_HEADER_BYTES..])
        .map_err(|e| JournalError::Invalid(e.to_string()))
}
