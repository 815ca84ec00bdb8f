//! The ledger: one entry per credit movement, chained per tenant by SHA-256.
//!
//! ```text
//! hash(entry n) = SHA-256( hash(entry n-1) | canonical(entry n) )   hash(entry 0) = 32 zero bytes
//! canonical(entry), all integers little-endian:
//!   b"RBLEDGER" | version u8 = 1 | tenant u128 | seq u64 | kind u8 | amount u64 |
//!   negative u8 | available_after u64 | held_after u64 |
//!   batch   (0u8 | 1u8 u128) | item (0u8 | 1u8 u32) | grant (0u8 | 1u8 u32) |
//!   parts   u32 count, then (grant u32, amount u64) each |
//!   request_id (0u8 | 1u8 u32 len, bytes) | reason (0u8 | 1u8 u32 len, bytes) | at_ms u64
//! ```
//! The tenant id is inside the hashed bytes, so an entry cannot be moved to another tenant's
//! chain. `lsn` is where the event sits in our log: storage, not content, so not hashed.

use sha2::{Digest, Sha256};

use crate::ids::{BatchId, TenantId};

/// What moved.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub enum EntryKind {
    /// Credits granted (paid or promotional).
    TopUp,
    /// available → held, for a batch.
    Hold,
    /// held → spent, for one succeeded item.
    Settle,
    /// held → available, for one failed or canceled item.
    Release,
    /// Admin adjustment, up (a new grant) or down (`negative`).
    Adjust,
    /// available → expired, for credits of a grant past its expiry.
    Expire,
}

impl EntryKind {
    /// The name clients see (`top_up`, `hold`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::TopUp => "top_up",
            EntryKind::Hold => "hold",
            EntryKind::Settle => "settle",
            EntryKind::Release => "release",
            EntryKind::Adjust => "adjust",
            EntryKind::Expire => "expire",
        }
    }

    fn code(self) -> u8 {
        match self {
            EntryKind::TopUp => 1,
            EntryKind::Hold => 2,
            EntryKind::Settle => 3,
            EntryKind::Release => 4,
            EntryKind::Adjust => 5,
            EntryKind::Expire => 6,
        }
    }
}

/// One movement of credits, with the balances after it and what it refers to.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct LedgerEntry {
    /// 1-based position in the tenant's ledger (the entry id is `led_<tenant>_<seq>`).
    pub seq: u64,
    /// What moved.
    pub kind: EntryKind,
    /// How much (always positive; direction is the kind's, or `negative` for adjust).
    pub amount: u64,
    /// Only for `Adjust`: the adjustment took credits away.
    pub negative: bool,
    /// `available` right after this movement.
    pub available_after: u64,
    /// `held` right after this movement.
    pub held_after: u64,
    /// Batch of a hold, settle or release.
    pub batch: Option<BatchId>,
    /// Item (0-based index) of a settle or release.
    pub item: Option<u32>,
    /// Grant created by a top-up or upward adjustment, or the grant that expired.
    pub grant: Option<u32>,
    /// Which grants the movement drew from or returned to: (grant, amount). This is how a
    /// statement shows which grant paid for what.
    pub parts: Vec<(u32, u64)>,
    /// Request id of a top-up or adjustment.
    pub request_id: Option<String>,
    /// Free text of an adjustment (who and why).
    pub reason: Option<String>,
    /// When, in ms since the Unix epoch (the engine clock at decision time).
    pub at_ms: u64,
    /// LSN of the event that made this entry (not hashed).
    pub lsn: u64,
    /// SHA-256 over the previous entry's hash and this entry's canonical bytes.
    pub hash: [u8; 32],
}

/// Hash that precedes the first entry.
pub const GENESIS_HASH: [u8; 32] = [0; 32];

fn put_opt_str(out: &mut Vec<u8>, s: &Option<String>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
}

/// The canonical bytes of `entry` (layout in the module doc).
pub fn canonical_bytes(tenant: TenantId, e: &LedgerEntry) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + e.parts.len() * 12);
    write_canonical(&mut out, tenant, e);
    out
}

/// Appends the canonical bytes of `e` to `out`.
fn write_canonical(out: &mut Vec<u8>, tenant: TenantId, e: &LedgerEntry) {
    out.reserve(128 + e.parts.len() * 12);
    out.extend_from_slice(b"RBLEDGER");
    out.push(1);
    out.extend_from_slice(&tenant.0.to_le_bytes());
    out.extend_from_slice(&e.seq.to_le_bytes());
    out.push(e.kind.code());
    out.extend_from_slice(&e.amount.to_le_bytes());
    out.push(e.negative as u8);
    out.extend_from_slice(&e.available_after.to_le_bytes());
    out.extend_from_slice(&e.held_after.to_le_bytes());
    match e.batch {
        None => out.push(0),
        Some(b) => {
            out.push(1);
            out.extend_from_slice(&b.0.to_le_bytes());
        }
    }
    for v in [e.item, e.grant] {
        match v {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    out.extend_from_slice(&(e.parts.len() as u32).to_le_bytes());
    for (g, a) in &e.parts {
        out.extend_from_slice(&g.to_le_bytes());
        out.extend_from_slice(&a.to_le_bytes());
    }
    put_opt_str(out, &e.request_id);
    put_opt_str(out, &e.reason);
    out.extend_from_slice(&e.at_ms.to_le_bytes());
}

/// Canonical bytes this large or larger are not kept for reuse.
const SCRATCH_KEEP_BYTES_MAX: usize = 4096;

thread_local! {
    /// This thread's buffer for canonical bytes: every movement is hashed on the wallet's
    /// arbiter, so one buffer per thread, reused, saves an allocation per entry.
    static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The chained hash of `entry` after `prev`.
pub fn chain_hash(prev: &[u8; 32], tenant: TenantId, entry: &LedgerEntry) -> [u8; 32] {
    let mut buf = SCRATCH.take();
    buf.clear();
    buf.extend_from_slice(prev);
    write_canonical(&mut buf, tenant, entry);
    let hash = Sha256::digest(&buf).into();
    if buf.capacity() < SCRATCH_KEEP_BYTES_MAX {
        SCRATCH.set(buf);
    }
    hash
}

/// Where a chain stops verifying.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// Entry at `index` does not carry `seq == index + 1`.
    #[error("entry {index} has seq {seq}, expected {}", index + 1)]
    Sequence { index: usize, seq: u64 },
    /// Entry `seq`'s stored hash is not the hash of its content after the previous hash.
    #[error("entry {seq}: stored hash does not match its content and predecessor")]
    Hash { seq: u64 },
}

/// Verifies a tenant's whole chain from the genesis hash.
pub fn verify_chain(tenant: TenantId, entries: &[LedgerEntry]) -> Result<(), ChainError> {
    verify_chain_from(tenant, GENESIS_HASH, 1, entries)
}

/// Checks a stretch of a chain: `entries` start at seq `first_seq`, after an entry whose
/// hash is `prev` (the in-memory tail after the filed pages).
pub fn verify_chain_from(
    tenant: TenantId,
    prev: [u8; 32],
    first_seq: u64,
    entries: &[LedgerEntry],
) -> Result<(), ChainError> {
    let mut prev = prev;
    for (index, e) in entries.iter().enumerate() {
        if e.seq != first_seq + index as u64 {
            return Err(ChainError::Sequence { index, seq: e.seq });
        }
        if chain_hash(&prev, tenant, e) != e.hash {
            return Err(ChainError::Hash { seq: e.seq });
        }
        prev = e.hash;
    }
    Ok(())
}

/// Lower-case hex of a hash (for exports).
pub use crate::hex;

#[cfg(test)]
mod tests {
    use super::*;

    /// The chain hash is SHA-256 over the previous hash then the canonical bytes, exactly
    /// as documented (the reused buffer changes nothing), for entries with and without
    /// the optional parts, and twice in a row on one thread.
    #[test]
    fn chain_hash_is_sha256_of_prev_then_canonical_bytes() {
        let mut e = LedgerEntry {
            seq: 3,
            kind: EntryKind::Adjust,
            amount: 40,
            negative: true,
            available_after: 60,
            held_after: 5,
            batch: Some(BatchId(9)),
            item: Some(2),
            grant: Some(1),
            parts: vec![(1, 30), (2, 10)],
            request_id: Some("req-1".into()),
            reason: Some("goodwill".into()),
            at_ms: 1_700_000_000_000,
            lsn: 77,
            hash: [0; 32],
        };
        let prev = [7u8; 32];
        for _ in 0..2 {
            for strip in [false, true] {
                if strip {
                    e.batch = None;
                    e.item = None;
                    e.parts.clear();
                    e.request_id = None;
                }
                let mut h = Sha256::new();
                h.update(prev);
                h.update(canonical_bytes(TenantId(4), &e));
                let expect: [u8; 32] = h.finalize().into();
                assert_eq!(chain_hash(&prev, TenantId(4), &e), expect);
                assert_ne!(
                    chain_hash(&prev, TenantId(5), &e),
                    expect,
                    "tenant is hashed"
                );
            }
        }
    }
}
