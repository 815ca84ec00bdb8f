//! `wal`: a segmented, group-committed write-ahead log with checksummed frames.
//!
//! It knows nothing of wallets, batches or HTTP: payloads are opaque bytes (reelbatch
//! puts rkyv events in them). Map of the crate:
//!
//! - `frame.rs`     the frame layout (len, version, LSN, crc32, payload), encode/decode
//! - `segment.rs`   segment files: names sorted by first LSN, magic+version header, creation
//! - `writer.rs`    group commit: one writer thread, bounded pending batch, one fdatasync
//!   per group, completions in LSN order, poisoning on the first failure
//! - `recovery.rs`  read-only scan (torn tail vs corruption) and the replay iterator
//! - `snapshot.rs`  atomic snapshot files and newest-valid lookup
//! - `fault.rs`     fault-injection points on the write path
//! - `aligned.rs`   16-byte-aligned payload buffer for rkyv's validated access
//! - `error.rs`     the crate's one error enum
//!
//! Usage: `Wal::open` scans and repairs (torn tail) or refuses (corruption, unless
//! `Options::salvage`), `Wal::replay(from)` yields every frame from an LSN, `Wal::append`
//! returns a `Durable` handle that resolves (as a future, or by blocking `wait`) once the
//! frame is durable under the chosen `Durability`.

mod aligned;
mod error;
mod fault;
mod frame;
mod recovery;
mod segment;
mod snapshot;
mod writer;

use std::fs::{self, OpenOptions};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

pub use aligned::{AlignedBuf, PAYLOAD_ALIGN};
pub use error::{Error, Result};
pub use fault::{FaultInjector, WriteFault};
pub use frame::{FRAME_HEADER_BYTES, FRAME_VERSION};
pub use recovery::{
    read_only, scan, Frame, FrameInfo, Problem, ProblemKind, Replay, Scan, SegmentSummary,
    SEGMENT_FILE_BYTES_LIMIT,
};
pub use segment::{fsync_dir, list_segments, segment_file_name, SEGMENT_HEADER_BYTES};
pub use snapshot::{
    find_latest_snapshot, latest_snapshot, prune_snapshots, read_snapshot, snapshot_file_name,
    write_file_atomic, write_snapshot, Snapshot, SnapshotLookup,
};

use error::IoContext;
use writer::{Batch, Counters, Pending, Shared};

/// When an append counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Resolve after the frame's group is written and fdatasynced (the default).
    Sync,
    /// Resolve after the frame is written (in the OS page cache); fdatasync at most every
    /// `n` ms. Survives a process crash, not a power loss of the last `n` ms.
    Interval(u64),
    /// Resolve after write; never fdatasync except at close. Benchmarks only.
    None,
}

/// How to open the log. Every limit has a default sized for reelbatch.
#[derive(Debug, Clone)]
pub struct Options {
    /// Durability mode.
    pub durability: Durability,
    /// A segment is rotated before a frame would take it past this size (a single larger
    /// frame gets a segment of its own).
    pub segment_bytes_max: u64,
    /// Largest payload `append` accepts.
    pub payload_bytes_max: u32,
    /// Bound on encoded bytes waiting for the writer; `append` blocks beyond it.
    pub queue_bytes_max: usize,
    /// Bound on appends waiting for the writer.
    pub queue_appends_max: usize,
    /// On corruption, truncate at the first bad frame instead of refusing to open.
    pub salvage: bool,
    /// Fault-injection points; `None` uses an injector nothing can arm.
    pub faults: Option<Arc<FaultInjector>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            durability: Durability::Sync,
            segment_bytes_max: 64 << 20,
            payload_bytes_max: 16 << 20,
            queue_bytes_max: 64 << 20,
            queue_appends_max: 1 << 16,
            salvage: false,
            faults: None,
        }
    }
}

impl Options {
    fn validate(&self) -> Result<()> {
        let bad = |s: &str| Err(Error::InvalidOptions(s.to_string()));
        if self.segment_bytes_max < 4096 {
            return bad("segment_bytes_max must be at least 4096");
        }
        if self.segment_bytes_max + u64::from(self.payload_bytes_max) + 64
            > SEGMENT_FILE_BYTES_LIMIT
        {
            return bad("segment_bytes_max + payload_bytes_max must stay below 1 GiB");
        }
        if self.queue_bytes_max == 0 || self.queue_appends_max == 0 {
            return bad("queue bounds must be positive");
        }
        if let Durability::Interval(0) = self.durability {
            return bad("interval durability needs interval_ms > 0");
        }
        Ok(())
    }
}

/// What `open` found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments in the log after recovery.
    pub segments: usize,
    /// Valid frames in the log after recovery.
    pub frames: u64,
    /// First LSN still in the log (earlier ones were compacted away), or the next LSN when
    /// the log holds no frame.
    pub first_lsn: u64,
    /// Last LSN in the log, 0 when empty.
    pub last_lsn: u64,
    /// A torn tail that was truncated: the problem as scanned (segment, offset, bytes).
    pub torn_tail: Option<Problem>,
    /// Corruption that salvage truncated: exactly what was dropped.
    pub salvaged: Option<Problem>,
    /// Leftover temporary files of interrupted segment creations that were removed.
    pub tmp_files_removed: usize,
}

/// Point-in-time counters for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Appends written.
    pub appends: u64,
    /// Groups written (one write call each; appends / groups = mean group size).
    pub groups: u64,
    /// fdatasync calls.
    pub syncs: u64,
    /// Total time inside fdatasync.
    pub sync_nanos_total: u64,
    /// Longest fdatasync.
    pub sync_nanos_max: u64,
    /// Encoded bytes written.
    pub bytes_written: u64,
}

/// Resolves when an append is durable (per the mode); yields the append's LSN. Await it
/// from async code, or call `wait` from a plain thread. Dropping it does not cancel the
/// append: the frame is already in the log's order.
#[must_use = "an append is acknowledged only once its Durable resolves"]
pub struct Durable {
    /// The LSN the append received.
    lsn: u64,
    /// Completed by the writer thread, in LSN order.
    rx: oneshot::Receiver<Result<()>>,
}

impl Durable {
    /// The LSN assigned to this append.
    pub fn lsn(&self) -> u64 {
        self.lsn
    }

    /// Blocks the calling thread until durable. Not for use inside an async runtime.
    pub fn wait(self) -> Result<u64> {
        let lsn = self.lsn;
        match self.rx.blocking_recv() {
            Ok(r) => r.map(|()| lsn),
            Err(_) => Err(Error::Closed),
        }
    }
}

impl Future for Durable {
    type Output = Result<u64>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let lsn = self.lsn;
        Pin::new(&mut self.rx).poll(cx).map(|r| match r {
            Ok(r) => r.map(|()| lsn),
            Err(_) => Err(Error::Closed),
        })
    }
}

/// The right to report one append's durability to a `Ticketed` future, made before the
/// append exists (`Ticket::new`). Why: the party that awaits durability need not be the
/// one that appends. A caller hands the ticket to an actor along with its request; the
/// actor appends with it (`Wal::append_ticketed`) and the caller awaits one future, woken
/// once, when the frame is durable: no reply hop between appending and awaiting.
pub struct Ticket(oneshot::Sender<Result<()>>);

impl Ticket {
    /// A ticket and the future that resolves when an append made with it is durable.
    pub fn new() -> (Ticket, Ticketed) {
        let (tx, rx) = oneshot::channel();
        (Ticket(tx), Ticketed(rx))
    }
}

/// Resolves `Ok(true)` once the append made with its `Ticket` is durable (per the mode),
/// `Ok(false)` if the ticket was dropped without a successful append, or the error that
/// poisoned the log first. Appends complete in LSN order, so `Ok(true)` also covers every
/// earlier LSN.
#[must_use = "an append is acknowledged only once its Ticketed resolves"]
pub struct Ticketed(oneshot::Receiver<Result<()>>);

impl Future for Ticketed {
    type Output = Result<bool>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|r| match r {
            Ok(r) => r.map(|()| true),
            Err(_) => Ok(false),
        })
    }
}

/// A handle to an open log; clones share it. The writer thread stops (after draining and a
/// final sync) when the last clone is dropped or `close` is called.
#[derive(Clone)]
pub struct Wal {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = shutdown(&self.shared, &self.writer);
    }
}

fn shutdown(shared: &Shared, writer: &Mutex<Option<JoinHandle<()>>>) -> Result<()> {
    {
        let mut st = shared.lock();
        st.closing = true;
    }
    shared.work.notify_one();
    shared.space.notify_all();
    let handle = writer.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(h) = handle {
        let _ = h.join();
    }
    match &shared.lock().poisoned {
        Some(reason) => Err(Error::Poisoned(reason.clone())),
        None => Ok(()),
    }
}

impl Wal {
    /// Opens (creating if needed) the log in `dir`: scans every segment, truncates a torn
    /// tail, refuses corruption unless `opts.salvage`, and starts the writer thread.
    pub fn open(dir: impl AsRef<Path>, opts: Options) -> Result<(Wal, RecoveryReport)> {
        opts.validate()?;
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).ctx(&dir)?;
        let tmp_files_removed = segment::remove_tmp_files(&dir)?;
        let scan = recovery::scan(&dir, |_| {})?;
        let mut torn_tail = None;
        let mut salvaged = None;
        let mut segments: Vec<(u64, PathBuf)> = scan
            .segments
            .iter()
            .map(|s| (s.first_lsn, s.path.clone()))
            .collect();
        // The next LSN continues after the last valid frame; with no valid frame at all it is
        // the newest scanned segment's first LSN (taken before salvage may delete that
        // segment, so a compacted log never restarts at LSN 1 under its own snapshot).
        let next_lsn = match scan.last_lsn() {
            0 => scan.segments.last().map_or(1, |s| s.first_lsn),
            last => last + 1,
        };
        if let Some(p) = &scan.problem {
            match p.kind {
                ProblemKind::TornTail => {
                    truncate(&p.segment, p.offset)?;
                    torn_tail = Some(p.clone());
                }
                ProblemKind::Corruption if opts.salvage => {
                    if p.offset < SEGMENT_HEADER_BYTES as u64 {
                        fs::remove_file(&p.segment).ctx(&p.segment)?;
                        segments.truncate(p.segment_index);
                    } else {
                        truncate(&p.segment, p.offset)?;
                    }
                    for (path, _) in &p.later_segments {
                        fs::remove_file(path).ctx(path)?;
                    }
                    segment::fsync_dir(&dir)?;
                    salvaged = Some(p.clone());
                }
                ProblemKind::Corruption => {
                    return Err(Error::Corruption {
                        segment: p.segment.clone(),
                        offset: p.offset,
                        reason: p.reason.clone(),
                    });
                }
            }
        }
        // An empty log (or one whose only segment salvage removed) starts a fresh segment
        // at `next_lsn` below.
        let (file, path, segment_bytes) = match segments.last() {
            Some((_, path)) => {
                let f = OpenOptions::new().append(true).open(path).ctx(path)?;
                let len = f.metadata().ctx(path)?.len();
                (f, path.clone(), len)
            }
            None => {
                let (f, path) = segment::create_segment(&dir, next_lsn)?;
                segments.push((next_lsn, path.clone()));
                (f, path, SEGMENT_HEADER_BYTES as u64)
            }
        };
        // Frames salvage dropped from a truncated segment are not counted by the scan.
        let frames = scan.frames();
        let written_lsn = next_lsn - 1;
        let report = RecoveryReport {
            segments: segments.len(),
            frames,
            first_lsn: segments[0].0,
            last_lsn: scan.last_lsn(),
            torn_tail,
            salvaged,
            tmp_files_removed,
        };
        let shared = Arc::new(Shared {
            dir,
            durability: opts.durability,
            segment_bytes_max: opts.segment_bytes_max,
            payload_bytes_max: opts.payload_bytes_max,
            queue_bytes_max: opts.queue_bytes_max,
            queue_appends_max: opts.queue_appends_max,
            state: Mutex::new(Pending {
                next_lsn,
                batch: Batch::default(),
                segment_bytes,
                writer_idle: false,
                appenders_waiting: 0,
                closing: false,
                poisoned: None,
            }),
            has_work: std::sync::atomic::AtomicBool::new(false),
            work: Condvar::new(),
            space: Condvar::new(),
            segments: Mutex::new(segments),
            written_lsn: AtomicU64::new(written_lsn),
            durable_lsn: AtomicU64::new(written_lsn),
            acked: tokio::sync::watch::channel((written_lsn, false)).0,
            faults: opts.faults.unwrap_or_default(),
            counters: Counters::default(),
        });
        let thread_shared = Arc::clone(&shared);
        let writer = std::thread::Builder::new()
            .name("wal-writer".into())
            .spawn(move || writer::run_writer(thread_shared, file, path))
            .map_err(|source| Error::Io {
                path: PathBuf::from("<wal-writer thread>"),
                source,
            })?;
        let wal = Wal {
            inner: Arc::new(Inner {
                shared,
                writer: Mutex::new(Some(writer)),
            }),
        };
        Ok((wal, report))
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// Appends `payload`, blocking while the pending queue is full. Returns at once with
    /// the frame's LSN inside a `Durable` that resolves when the frame is durable.
    pub fn append(&self, payload: &[u8]) -> Result<Durable> {
        let (tx, rx) = oneshot::channel();
        let lsn = self.shared().append(payload, true, tx)?;
        Ok(Durable { lsn, rx })
    }

    /// Like `append`, but fails with `Error::QueueFull` instead of blocking.
    pub fn try_append(&self, payload: &[u8]) -> Result<Durable> {
        let (tx, rx) = oneshot::channel();
        let lsn = self.shared().append(payload, false, tx)?;
        Ok(Durable { lsn, rx })
    }

    /// Like `append`, but the append's durability is reported to the `Ticketed` future made
    /// with `ticket` (by whoever holds it) instead of a new `Durable`. Returns the LSN. If
    /// the append is refused, the ticket is dropped and its `Ticketed` resolves `Ok(false)`.
    pub fn append_ticketed(&self, payload: &[u8], ticket: Ticket) -> Result<u64> {
        self.shared().append(payload, true, ticket.0)
    }

    /// Replays every frame with LSN ≥ `from_lsn` that was written when this is called.
    /// `from_lsn` below the first LSN still on disk is `Error::LsnUnavailable`.
    pub fn replay(&self, from_lsn: u64) -> Result<Replay> {
        let end = self.shared().written_lsn.load(Ordering::Acquire);
        let segments = self
            .shared()
            .segments
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Replay::over(&segments, from_lsn, end)
    }

    /// Deletes every segment whose frames all have LSN ≤ `lsn` (covered by a snapshot at
    /// `lsn`). The active segment is never deleted. Returns the deleted paths.
    pub fn drop_segments_below(&self, lsn: u64) -> Result<Vec<PathBuf>> {
        let mut segments = self
            .shared()
            .segments
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut removed = Vec::new();
        // Segment k is wholly ≤ lsn iff segment k+1 starts at or below lsn + 1. Delete
        // oldest first, so a crash midway leaves a contiguous suffix of the log.
        while segments.len() >= 2 && segments[1].0 <= lsn.saturating_add(1) {
            let (_, path) = segments.remove(0);
            fs::remove_file(&path).ctx(&path)?;
            removed.push(path);
        }
        if !removed.is_empty() {
            segment::fsync_dir(&self.shared().dir)?;
        }
        Ok(removed)
    }

    /// First LSN still in the log.
    pub fn first_lsn(&self) -> u64 {
        let segs = self
            .shared()
            .segments
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        segs.first().map_or(1, |s| s.0)
    }

    /// LSN the next append will receive.
    pub fn next_lsn(&self) -> u64 {
        self.shared().lock().next_lsn
    }

    /// Highest LSN covered by a completed fdatasync.
    pub fn durable_lsn(&self) -> u64 {
        self.shared().durable_lsn.load(Ordering::Acquire)
    }

    /// Highest LSN whose append has been acknowledged (its `Durable` resolved `Ok`); every
    /// smaller LSN is acknowledged too.
    pub fn acked_lsn(&self) -> u64 {
        self.shared().acked.borrow().0
    }

    /// Resolves once `lsn` is acknowledged (durable under the mode), or fails if the log is
    /// poisoned first. For callers holding an LSN but no `Durable`: a repeated request
    /// waiting for its original, a read that must not expose unacknowledged state.
    pub async fn wait_acked(&self, lsn: u64) -> Result<()> {
        let mut rx = self.shared().acked.subscribe();
        let seen = rx
            .wait_for(|(acked, poisoned)| *acked >= lsn || *poisoned)
            .await
            .map(|v| *v)
            .map_err(|_| Error::Closed)?;
        if seen.0 >= lsn {
            Ok(())
        } else {
            Err(Error::Poisoned(self.poisoned().unwrap_or_default()))
        }
    }

    /// The failure that poisoned the log, if any.
    pub fn poisoned(&self) -> Option<String> {
        self.shared().lock().poisoned.clone()
    }

    /// The segment directory.
    pub fn dir(&self) -> &Path {
        &self.shared().dir
    }

    /// Counters since open.
    pub fn stats(&self) -> Stats {
        let c = &self.shared().counters;
        Stats {
            appends: c.appends.load(Ordering::Relaxed),
            groups: c.groups.load(Ordering::Relaxed),
            syncs: c.syncs.load(Ordering::Relaxed),
            sync_nanos_total: c.sync_nanos_total.load(Ordering::Relaxed),
            sync_nanos_max: c.sync_nanos_max.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting appends, writes and syncs everything pending, and stops the writer.
    /// Later appends fail with `Error::Closed`. Returns the poison reason if poisoned.
    pub fn close(&self) -> Result<()> {
        shutdown(&self.inner.shared, &self.inner.writer)
    }
}

/// Cuts `path` to `len` bytes and makes that durable.
fn truncate(path: &Path, len: u64) -> Result<()> {
    let f = OpenOptions::new().write(true).open(path).ctx(path)?;
    f.set_len(len).ctx(path)?;
    f.sync_all().ctx(path)
}
