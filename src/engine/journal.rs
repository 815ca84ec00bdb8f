//! Record ⇄ WAL payload.
//!
//! ```text
//! Payload: version u8 (RECORD_VERSION) | 15 zero bytes | rkyv archive of `Record`
//! ```
//! The 16-byte header keeps the archive 16-byte aligned inside the WAL's aligned payload
//! buffer, so it is validated in place (`rkyv::from_bytes` checks every byte: data read
//! from disk is never trusted).

use crate::engine::events::Record;

/// Version of the record encoding. 2: accounts, stored responses, the batch's API key;
/// 3: webhook records and the outbox in snapshots, tenants' link secrets and embed
/// domains, the access log (versions 1–2 came from development builds only and are
/// refused).
pub const RECORD_VERSION: u8 = 3;
/// Bytes before the archive.
pub const RECORD_HEADER_BYTES: usize = 16;

/// A payload that is not a valid record.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Shorter than the header.
    #[error("record of {0} bytes is shorter than its header")]
    Short(usize),
    /// Unknown version byte or non-zero padding.
    #[error("record version {0} is not supported")]
    Version(u8),
    /// The archive failed validation.
    #[error("record does not validate: {0}")]
    Invalid(String),
}

/// Puts the version header in front of an rkyv archive (records and snapshot images).
pub(crate) fn with_header(archive: &[u8], version: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(RECORD_HEADER_BYTES + archive.len());
    out.push(version);
    out.extend_from_slice(&[0u8; RECORD_HEADER_BYTES - 1]);
    out.extend_from_slice(archive);
    out
}

/// Checks the version header and returns the (still 16-byte aligned) archive behind it.
pub(crate) fn archive_of(payload: &[u8], version: u8) -> Result<&[u8], JournalError> {
    if payload.len() < RECORD_HEADER_BYTES {
        return Err(JournalError::Short(payload.len()));
    }
    if payload[0] != version || payload[1..RECORD_HEADER_BYTES].iter().any(|&b| b != 0) {
        return Err(JournalError::Version(payload[0]));
    }
    Ok(&payload[RECORD_HEADER_BYTES..])
}

/// Encodes a record into a WAL payload.
pub fn encode(record: &Record) -> Vec<u8> {
    with_encoded(record, <[u8]>::to_vec)
}

/// Encodes `record` in this thread's reusable buffer and appends it to `wal`.
pub(crate) fn append(wal: &wal::Wal, record: &Record) -> Result<wal::Durable, wal::Error> {
    with_encoded(record, |payload| wal.append(payload))
}

/// As `append`, reporting durability to the ticket's `Ticketed` future. Returns the LSN.
pub(crate) fn append_ticketed(
    wal: &wal::Wal,
    record: &Record,
    ticket: wal::Ticket,
) -> Result<u64, wal::Error> {
    with_encoded(record, |payload| wal.append_ticketed(payload, ticket))
}

/// Encoding buffers this large or larger are not kept for reuse (a rare big record must
/// not pin its memory on the thread).
const SCRATCH_KEEP_BYTES_MAX: usize = 64 * 1024;

thread_local! {
    /// This thread's encoding buffer. Every wallet and batch event is encoded on an
    /// arbiter thread and copied into the WAL's batch at once, so one buffer per thread,
    /// reused, saves two allocations and a copy per event. A `Cell<Option<_>>`, taken
    /// while in use: a nested encode simply gets a fresh buffer.
    static SCRATCH: std::cell::Cell<Option<rkyv::util::AlignedVec>> =
        const { std::cell::Cell::new(None) };
}

/// Calls `f` with `record` encoded as a WAL payload (header, then the archive).
fn with_encoded<R>(record: &Record, f: impl FnOnce(&[u8]) -> R) -> R {
    let mut buf = SCRATCH.take().unwrap_or_default();
    buf.clear();
    buf.push(RECORD_VERSION);
    buf.extend_from_slice(&[0u8; RECORD_HEADER_BYTES - 1]);
    // The archive is written after the header; the buffer is 16-byte aligned and the
    // header 16 bytes long, so the archive's alignment is the same as at offset 0 (rkyv
    // pads relative to the buffer start, and its pointers are relative).
    let buf = rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(record, buf)
        .expect("serializing a record cannot fail");
    debug_assert!(buf.len() > RECORD_HEADER_BYTES);
    let out = f(&buf);
    if buf.capacity() < SCRATCH_KEEP_BYTES_MAX {
        SCRATCH.set(Some(buf));
    }
    out
}

/// Decodes and validates a WAL payload (which must start 16-byte aligned).
pub fn decode(payload: &[u8]) -> Result<Record, JournalError> {
    rkyv::from_bytes::<Record, rkyv::rancor::Error>(archive_of(payload, RECORD_VERSION)?)
        .map_err(|e| JournalError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::wallet::state::WalletEvent;
    use crate::ids::{BatchId, TenantId};

    #[test]
    fn round_trip_and_garbage_is_refused() {
        let rec = Record::Wallet {
            tenant: TenantId(7),
            event: WalletEvent::Held {
                batch: BatchId(9),
                amount: 40,
                draws: vec![(1, 30), (2, 10)],
                at_ms: 5,
            },
        };
        let bytes = encode(&rec);
        // The reused buffer yields exactly header + the archive encoded on its own.
        let alone = rkyv::to_bytes::<rkyv::rancor::Error>(&rec).unwrap();
        assert_eq!(bytes, with_header(&alone, RECORD_VERSION));
        assert_eq!(
            encode(&rec),
            bytes,
            "a reused buffer encodes the same bytes"
        );
        let mut aligned = wal::AlignedBuf::new();
        aligned.set(&bytes);
        assert_eq!(decode(aligned.as_slice()).unwrap(), rec);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] = bad[i].wrapping_add(0x55);
            aligned.set(&bad);
            // Never a panic; either an error or (for bytes that are free data) a record.
            let _ = decode(aligned.as_slice());
        }
        aligned.set(&bytes[..10]);
        assert!(decode(aligned.as_slice()).is_err());
    }
}
