//! Live heap bytes: the global allocator, wrapped to count what is allocated and not yet
//! freed (`/metrics`: `reelbatch_heap_live_bytes`); and transparent huge pages turned
//! off for the server (`disable_transparent_huge_pages`: why is there).
//!
//! Why: resident memory (RSS) mixes the live heap with what the allocator keeps for
//! reuse, fragmentation, thread stacks and file pages. A soak that sees RSS creep cannot
//! tell a growing data structure (live bytes climb with it) from allocator retention
//! (live bytes flat, RSS not) without this number.
//!
//! Cost: a plain load and store on this thread's own slot per allocation and per free (no
//! locked instruction: only the owner writes a slot, readers only sum). A thread takes a
//! slot on its first allocation and keeps it for life; slots are never handed back (that
//! would need a thread-exit destructor, which may allocate inside the allocator), so
//! threads beyond `SLOTS_COUNT` (a long run's short-lived blocking-pool threads) share one
//! slot with a locked add. A free may land on another slot than its allocation (another
//! thread freed it): only the sum means anything. `benches/heap.rs` measures the cost.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering::Relaxed};

/// Threads with a slot of their own. A server runs a few dozen threads at a time; the
/// slack covers the blocking pools' comings and goings for a good while.
const SLOTS_COUNT: usize = 256;

/// One count, alone on its cache line (128 bytes covers adjacent-line prefetching), so a
/// thread's stores do not invalidate a line another core is writing.
#[repr(align(128))]
struct Slot(AtomicIsize);

/// Signed: a slot whose thread mostly frees what others allocated goes negative.
static SLOTS: [Slot; SLOTS_COUNT] = [const { Slot(AtomicIsize::new(0)) }; SLOTS_COUNT];

/// Threads past `SLOTS_COUNT`, and frees after a thread's thread-locals are gone: shared,
/// so a locked add.
static SHARED: Slot = Slot(AtomicIsize::new(0));

/// The next slot to hand out (past `SLOTS_COUNT`: none left).
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

/// Marks a thread that has not allocated yet.
const UNASSIGNED: usize = usize::MAX;

thread_local! {
    /// This thread's slot. A `const`-initialised `Cell` has no destructor and allocates
    /// nothing, so reading it inside the allocator cannot recurse into it.
    static SLOT_INDEX: Cell<usize> = const { Cell::new(UNASSIGNED) };
}

/// Moves the count by `delta` bytes.
fn add(delta: isize) {
    let index = SLOT_INDEX
        .try_with(|slot| {
            let mut i = slot.get();
            if i == UNASSIGNED {
                // One increment per thread ever started: never near wrapping.
                i = NEXT_SLOT.fetch_add(1, Relaxed);
                slot.set(i);
            }
            i
        })
        .unwrap_or(UNASSIGNED);
    match SLOTS.get(index) {
        // Only this thread ever writes its slot, so load + store loses nothing.
        Some(own) => own
            .0
            .store(own.0.load(Relaxed).wrapping_add(delta), Relaxed),
        None => {
            SHARED.0.fetch_add(delta, Relaxed);
        }
    }
}

/// Bytes a size moves the count by. Layout sizes never exceed `isize::MAX` (a `Layout`
/// invariant), so the cast is exact.
fn signed(size: usize) -> isize {
    debug_assert!(
        size <= isize::MAX as usize,
        "Layout bounds sizes by isize::MAX"
    );
    size as isize
}

/// The global allocator `A`, counting live bytes (sizes asked for, not the allocator's
/// rounding: the number measures what the program holds, not how well `A` packs it).
pub struct Counted<A>(pub A);

// SAFETY: every method forwards to `A` with the caller's arguments unchanged and only
// adds bookkeeping on the side, so `A`'s guarantees carry over as they are.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counted<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract for `layout`.
        let p = unsafe { self.0.alloc(layout) };
        if !p.is_null() {
            add(signed(layout.size()));
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { self.0.alloc_zeroed(layout) };
        if !p.is_null() {
            add(signed(layout.size()));
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller passes a block this allocator gave out, with its layout.
        unsafe { self.0.dealloc(ptr, layout) };
        add(-signed(layout.size()));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract.
        let p = unsafe { self.0.realloc(ptr, layout, new_size) };
        // On failure the old block stays allocated and nothing changes.
        if !p.is_null() {
            add(signed(new_size) - signed(layout.size()));
        }
        p
    }
}

/// Heap bytes allocated and not yet freed, over all threads (a moment's sum: slots are
/// read one by one while threads allocate, so it is exact only when all is quiet).
pub fn live_bytes() -> u64 {
    let sum: i64 = SLOTS
        .iter()
        .chain(std::iter::once(&SHARED))
        .map(|s| s.0.load(Relaxed) as i64)
        .sum();
    // Negative only for a moment, when a free is summed before its allocation was.
    u64::try_from(sum).unwrap_or(0)
}

/// Turns transparent huge pages off for this process (and any process it starts).
///
/// Why: mimalloc advises huge pages on its arenas (`MADV_HUGEPAGE`) and gives freed memory
/// back to the system in pieces as small as 64 KiB. The kernel's `khugepaged` then folds
/// such partly given-back 2 MiB ranges into whole huge pages again: by default it
/// collapses a range with a single 4 KiB page still in use (`max_ptes_none` = 511), and
/// the rest comes back as resident zeros. Over a long run resident memory climbs away from
/// the live heap in steps, as the scanner works through the arenas (BENCHMARKS.md, Soak,
/// fifth sitting). Called once, before the server's threads start.
#[cfg(target_os = "linux")]
pub fn disable_transparent_huge_pages() -> std::io::Result<()> {
    // SAFETY: `PR_SET_THP_DISABLE` takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Elsewhere there is no `khugepaged` to undo the allocator's returns: nothing to do.
#[cfg(not(target_os = "linux"))]
pub fn disable_transparent_huge_pages() -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Through the real global allocator (this crate's binaries and tests use `Counted`):
    /// a large block held shows up in the count, and leaves it when freed. Other test
    /// threads allocate meanwhile, so the margins are wide against their noise and far
    /// below the block's size.
    #[test]
    fn a_held_block_is_counted_and_its_free_uncounted() {
        const BLOCK_BYTES: usize = 128 << 20;
        let before = live_bytes();
        let block = vec![1u8; BLOCK_BYTES];
        let held = live_bytes();
        assert!(
            held >= before + (BLOCK_BYTES as u64) - (32 << 20),
            "held {held}, before {before}"
        );
        let grown = {
            let mut v = block;
            v.reserve_exact(BLOCK_BYTES);
            let g = live_bytes();
            drop(v);
            g
        };
        assert!(
            grown >= held + (BLOCK_BYTES as u64) - (32 << 20),
            "realloc counted"
        );
        let after = live_bytes();
        assert!(
            after + (BLOCK_BYTES as u64) <= grown + (32 << 20),
            "freed: {after} vs {grown}"
        );
    }
}
