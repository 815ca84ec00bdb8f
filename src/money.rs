//! Credits: integer amounts (`u64`), checked arithmetic only. No floating point touches
//! money anywhere in reelbatch.
//!
//! `try_*` are for deciding (an overflow is the caller's error, reported); `add`/`sub` are
//! for applying facts that were already decided, where an overflow or underflow means
//! the state is corrupt, and the process must stop rather than continue with wrong money.

/// Overflow or underflow while deciding an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("credit arithmetic out of range")]
pub struct OutOfRange;

/// `a + b`, or `OutOfRange`.
pub fn try_add(a: u64, b: u64) -> Result<u64, OutOfRange> {
    a.checked_add(b).ok_or(OutOfRange)
}

/// `a - b`, or `OutOfRange` when `b > a`.
pub fn try_sub(a: u64, b: u64) -> Result<u64, OutOfRange> {
    a.checked_sub(b).ok_or(OutOfRange)
}

/// `a + b` for decided facts; panics on overflow (corrupt state).
#[track_caller]
pub fn add(a: u64, b: u64) -> u64 {
    a.checked_add(b)
        .expect("credit overflow applying a decided event")
}

/// `a - b` for decided facts; panics when `b > a` (a balance would go negative).
#[track_caller]
pub fn sub(a: u64, b: u64) -> u64 {
    a.checked_sub(b)
        .expect("credit underflow applying a decided event: a balance would go negative")
}
