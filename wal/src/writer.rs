//! Group commit: appenders encode frames into a shared pending batch under one mutex; a
//! single writer thread owns the segment file, takes the whole batch, writes it with one
//! `write` and makes it durable with one `fdatasync`, then completes every waiter of the
//! batch in LSN order.
//!
//! Why this shape: LSN assignment and byte order in the batch happen under the same lock, so
//! file order equals LSN order without any reordering step; everything that arrives while
//! the writer is inside `fdatasync` forms the next group, so group size adapts to load.
//! The pending batch is bounded (`queue_bytes_max`, `queue_appends_max`): a full queue
//! blocks `append` (or fails `try_append`), so memory stays bounded under any load. At most
//! two batches exist: the one being filled and the one being written.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::error::{Error, IoContext, Result};
use crate::fault::FaultInjector;
use crate::frame::{self, FRAME_HEADER_BYTES};
use crate::segment::{self, SEGMENT_HEADER_BYTES};
use crate::Durability;

/// Completion of one append: `Ok` once durable (per the durability mode), else the error.
pub(crate) type Waiter = oneshot::Sender<Result<()>>;

/// Frames bound for one segment file.
#[derive(Default)]
pub(crate) struct Piece {
    /// `Some(first_lsn)`: rotate to a new segment starting at that LSN before writing.
    pub(crate) new_segment: Option<u64>,
    /// Encoded frames, back to back.
    pub(crate) bytes: Vec<u8>,
}

/// A group of appends written together.
#[derive(Default)]
pub(crate) struct Batch {
    /// One piece normally; one more per segment rotation inside the group.
    pub(crate) pieces: Vec<Piece>,
    /// Waiters in LSN order.
    pub(crate) waiters: Vec<Waiter>,
    /// Encoded bytes in all pieces (the queue bound).
    pub(crate) bytes: usize,
    /// LSN of the last frame in the batch.
    pub(crate) last_lsn: u64,
}

impl Batch {
    fn appends(&self) -> usize {
        self.waiters.len()
    }

    /// Empties the batch, keeping the first piece's allocation for reuse.
    fn clear(&mut self) {
        self.pieces.truncate(1);
        if let Some(p) = self.pieces.first_mut() {
            p.bytes.clear();
            p.new_segment = None;
        }
        self.waiters.clear();
        self.bytes = 0;
        self.last_lsn = 0;
    }
}

/// State behind the lock.
pub(crate) struct Pending {
    /// LSN the next append receives.
    pub(crate) next_lsn: u64,
    /// The batch being filled.
    pub(crate) batch: Batch,
    /// Size the active segment will have once everything pending is written; drives
    /// rotation decisions at append time, so a frame never spans two segments.
    pub(crate) segment_bytes: u64,
    /// The writer sleeps on `work`; appenders notify only then (saves a futex call per
    /// append under load).
    pub(crate) writer_idle: bool,
    /// Appenders blocked on `space`.
    pub(crate) appenders_waiting: usize,
    /// `close` was called: no new appends; the writer drains and exits.
    pub(crate) closing: bool,
    /// Set once by the first write/fsync failure; never cleared.
    pub(crate) poisoned: Option<String>,
}

/// Counters for metrics (`/metrics` exposes them as WAL fsync latency and group size).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) appends: AtomicU64,
    pub(crate) groups: AtomicU64,
    pub(crate) syncs: AtomicU64,
    pub(crate) sync_nanos_total: AtomicU64,
    pub(crate) sync_nanos_max: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
}

/// Everything the appenders and the writer thread share.
pub(crate) struct Shared {
    /// Directory of the segments.
    pub(crate) dir: PathBuf,
    /// How appends become durable.
    pub(crate) durability: Durability,
    /// Rotation threshold.
    pub(crate) segment_bytes_max: u64,
    /// Largest payload accepted.
    pub(crate) payload_bytes_max: u32,
    /// Bound on pending encoded bytes.
    pub(crate) queue_bytes_max: usize,
    /// Bound on pending appends.
    pub(crate) queue_appends_max: usize,
    /// Pending batch and flags.
    pub(crate) state: Mutex<Pending>,
    /// Set (under the lock) by every append, cleared by the writer when it takes a batch:
    /// lets the writer spin briefly without the lock before parking.
    pub(crate) has_work: AtomicBool,
    /// Writer waits here for appends.
    pub(crate) work: Condvar,
    /// Appenders wait here for queue space.
    pub(crate) space: Condvar,
    /// Segments on disk, oldest first; the writer pushes on rotation, compaction removes.
    pub(crate) segments: Mutex<Vec<(u64, PathBuf)>>,
    /// Highest LSN handed to `write` (readable by replay).
    pub(crate) written_lsn: AtomicU64,
    /// Highest LSN covered by a completed fdatasync.
    pub(crate) durable_lsn: AtomicU64,
    /// (highest acknowledged LSN, poisoned): published after each group's waiters are
    /// resolved, for callers that must wait for an LSN they hold no handle for (a repeated
    /// request waiting for its original, a read that must not show unacknowledged state).
    pub(crate) acked: tokio::sync::watch::Sender<(u64, bool)>,
    /// Fault-injection points.
    pub(crate) faults: Arc<FaultInjector>,
    /// Metrics.
    pub(crate) counters: Counters,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding this lock is a bug in this crate; the state is still
        // consistent (appends are all-or-nothing under the lock), so keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Encodes `payload` into the pending batch and returns its LSN; `waiter` is completed
    /// once the frame is durable (dropped unsent if the append is refused).
    pub(crate) fn append(&self, payload: &[u8], block: bool, waiter: Waiter) -> Result<u64> {
        if payload.len() > self.payload_bytes_max as usize {
            return Err(Error::PayloadTooLarge {
                len: payload.len(),
                max: self.payload_bytes_max,
            });
        }
        // Checksum a large payload before taking the lock (the header is combined in
        // later); a small one is cheaper to checksum in one pass under the lock.
        let payload_crc = (payload.len() > frame::CRC_COMBINE_BYTES_MIN).then(|| {
            let mut h = crc32fast::Hasher::new();
            h.update(payload);
            h
        });
        let frame_bytes = FRAME_HEADER_BYTES + payload.len();

        let mut st = self.lock();
        loop {
            if let Some(reason) = &st.poisoned {
                return Err(Error::Poisoned(reason.clone()));
            }
            if st.closing {
                return Err(Error::Closed);
            }
            let b = &st.batch;
            // An empty queue always admits one append, however large, so progress is certain.
            let fits = b.appends() == 0
                || (b.bytes + frame_bytes <= self.queue_bytes_max
                    && b.appends() < self.queue_appends_max);
            if fits {
                break;
            }
            if !block {
                return Err(Error::QueueFull);
            }
            st.appenders_waiting += 1;
            st = self.space.wait(st).unwrap_or_else(|e| e.into_inner());
            st.appenders_waiting -= 1;
        }

        let lsn = st.next_lsn;
        st.next_lsn = lsn.checked_add(1).expect("LSN space exhausted");
        let rotate = st.segment_bytes > SEGMENT_HEADER_BYTES as u64
            && st.segment_bytes + frame_bytes as u64 > self.segment_bytes_max;
        let batch = &mut st.batch;
        if rotate || batch.pieces.is_empty() {
            if rotate && batch.pieces.last().is_some_and(|p| p.bytes.is_empty()) {
                // Reuse the empty leading piece left by `clear`.
                batch.pieces.last_mut().expect("checked").new_segment = Some(lsn);
            } else {
                batch.pieces.push(Piece {
                    new_segment: rotate.then_some(lsn),
                    bytes: Vec::new(),
                });
            }
        }
        let piece = batch.pieces.last_mut().expect("a piece exists");
        frame::encode_into(&mut piece.bytes, lsn, payload, payload_crc.as_ref());
        batch.waiters.push(waiter);
        batch.bytes += frame_bytes;
        batch.last_lsn = lsn;
        st.segment_bytes = if rotate {
            (SEGMENT_HEADER_BYTES + frame_bytes) as u64
        } else {
            st.segment_bytes + frame_bytes as u64
        };
        self.has_work.store(true, Ordering::Release);
        let wake = st.writer_idle;
        st.writer_idle = false;
        drop(st);
        if wake {
            self.work.notify_one();
        }
        Ok(lsn)
    }

    /// Marks the log poisoned and fails every waiter that is not yet complete (through the
    /// completer, behind the groups that did succeed, so completions stay in LSN order).
    fn poison(&self, reason: String, in_flight: &mut Batch, completer: &Completer) {
        let mut st = self.lock();
        st.poisoned.get_or_insert(reason.clone());
        let mut pending = std::mem::take(&mut st.batch);
        let wake = st.appenders_waiting > 0;
        drop(st);
        if wake {
            self.space.notify_all();
        }
        let mut failed: Vec<Waiter> = in_flight.waiters.drain(..).collect();
        failed.append(&mut pending.waiters);
        completer.send(Completion {
            waiters: failed,
            last_lsn: 0,
            error: Some(reason),
        });
    }
}

/// Longest the writer spins for new work before parking on the condvar.
const WRITER_SPIN_BEFORE_PARK: Duration = Duration::from_micros(50);
/// The writer spins only after groups this small: with few appenders a park/unpark pair
/// dominates their latency; with many, groups are large, the next group is already
/// waiting, and spinning would only take a core from the appenders.
const SPIN_AFTER_GROUP_APPENDS_MAX: usize = 4;

/// One group's waiters and its outcome, handed from the writer to the completer.
struct Completion {
    waiters: Vec<Waiter>,
    /// Last LSN of the group (published as acknowledged once its waiters are resolved).
    last_lsn: u64,
    /// `None`: durable; `Some(reason)`: the log was poisoned.
    error: Option<String>,
}

/// Groups in flight between writer and completer; beyond it the writer waits (bounded).
const COMPLETION_QUEUE_GROUPS_MAX: usize = 64;

/// Wakes waiters on its own thread. Waking a task is a queue push and often a futex call
/// per waiter; done on the writer thread it would add to every group's latency, done
/// here it overlaps with the next group's write and fdatasync. One thread and a FIFO
/// channel keep completions in LSN order.
///
/// Small groups with no backlog are completed inline by the writer instead: with one or a
/// few appenders the extra thread hop would cost more than the wakes it saves. Inline is
/// allowed only when every earlier group is complete (`backlog == 0`), so order holds.
struct Completer {
    tx: Option<std::sync::mpsc::SyncSender<Completion>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Groups sent and not yet fully completed by the completer thread.
    backlog: Arc<AtomicU64>,
    /// The acknowledged-LSN watermark, for inline completions.
    acked: tokio::sync::watch::Sender<(u64, bool)>,
}

/// Groups of at most this many waiters are completed inline when there is no backlog.
const INLINE_COMPLETION_WAITERS_MAX: usize = 4;

fn complete(c: Completion, acked: &tokio::sync::watch::Sender<(u64, bool)>) {
    match c.error {
        None => {
            for w in c.waiters {
                let _ = w.send(Ok(()));
            }
            acked.send_if_modified(|v| {
                let advance = c.last_lsn > v.0;
                if advance {
                    v.0 = c.last_lsn;
                }
                advance
            });
        }
        Some(reason) => {
            for w in c.waiters {
                let _ = w.send(Err(Error::Poisoned(reason.clone())));
            }
            acked.send_modify(|v| v.1 = true);
        }
    }
}

impl Completer {
    fn start(acked: tokio::sync::watch::Sender<(u64, bool)>) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Completion>(COMPLETION_QUEUE_GROUPS_MAX);
        let backlog = Arc::new(AtomicU64::new(0));
        let acked_inline = acked.clone();
        let thread_backlog = Arc::clone(&backlog);
        let thread = std::thread::Builder::new()
            .name("wal-completer".into())
            .spawn(move || {
                for c in rx {
                    complete(c, &acked);
                    thread_backlog.fetch_sub(1, Ordering::AcqRel);
                }
            })
            .ok();
        Completer {
            tx: Some(tx),
            thread,
            backlog,
            acked: acked_inline,
        }
    }

    fn send(&self, c: Completion) {
        let idle = self.backlog.load(Ordering::Acquire) == 0;
        match (&self.tx, &self.thread) {
            (Some(tx), Some(_)) if !(idle && c.waiters.len() <= INLINE_COMPLETION_WAITERS_MAX) => {
                self.backlog.fetch_add(1, Ordering::AcqRel);
                // The receiver lives until `tx` is dropped, so this cannot fail.
                let _ = tx.send(c);
            }
            // Small group and nothing earlier pending, or no completer thread could be
            // spawned: complete inline (still in order).
            _ => complete(c, &self.acked),
        }
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The writer thread's loop. Owns the active segment file.
pub(crate) fn run_writer(shared: Arc<Shared>, mut file: File, mut path: PathBuf) {
    let completer = Completer::start(shared.acked.clone());
    let mut in_flight = Batch::default();
    let mut last_group_appends = 0usize;
    let mut unsynced = false;
    let mut last_sync = Instant::now();
    loop {
        let mut st = shared.lock();
        let mut spun = false;
        loop {
            if st.poisoned.is_some() {
                return;
            }
            if st.batch.appends() > 0 {
                break;
            }
            if !spun && !st.closing && last_group_appends <= SPIN_AFTER_GROUP_APPENDS_MAX {
                // Parking costs a futex wake for the next appender and a thread wake-up
                // (tens of µs on a busy VM) for us; an appender that just got its ack
                // usually appends again within microseconds. Spin a bounded while first.
                spun = true;
                drop(st);
                let until = Instant::now() + WRITER_SPIN_BEFORE_PARK;
                'spin: loop {
                    for _ in 0..64 {
                        if shared.has_work.load(Ordering::Acquire) {
                            break 'spin;
                        }
                        std::hint::spin_loop();
                    }
                    if Instant::now() >= until {
                        break;
                    }
                    // On a saturated machine the spin must not take a core from the
                    // threads that would produce the work (the appenders, the actors):
                    // give way to any runnable thread; with none, this returns at once.
                    std::thread::yield_now();
                }
                st = shared.lock();
                continue;
            }
            if st.closing {
                drop(st);
                if unsynced {
                    if let Err(e) = sync(&shared, &file, &path) {
                        shared.poison(e.to_string(), &mut in_flight, &completer);
                    }
                }
                return;
            }
            st.writer_idle = true;
            st = match shared.durability {
                Durability::Interval(ms) if unsynced => {
                    let due = last_sync + Duration::from_millis(ms);
                    let now = Instant::now();
                    if now >= due {
                        st.writer_idle = false;
                        drop(st);
                        match sync(&shared, &file, &path) {
                            Ok(()) => {
                                unsynced = false;
                                last_sync = Instant::now();
                                let written = shared.written_lsn.load(Ordering::Acquire);
                                shared.durable_lsn.store(written, Ordering::Release);
                            }
                            Err(e) => {
                                shared.poison(e.to_string(), &mut in_flight, &completer);
                                return;
                            }
                        }
                        shared.lock()
                    } else {
                        shared
                            .work
                            .wait_timeout(st, due - now)
                            .unwrap_or_else(|e| e.into_inner())
                            .0
                    }
                }
                _ => shared.work.wait(st).unwrap_or_else(|e| e.into_inner()),
            };
            st.writer_idle = false;
        }
        std::mem::swap(&mut st.batch, &mut in_flight);
        shared.has_work.store(false, Ordering::Release);
        last_group_appends = in_flight.appends();
        let wake = st.appenders_waiting > 0;
        drop(st);
        if wake {
            shared.space.notify_all();
        }

        let result = write_batch(
            &shared,
            &mut file,
            &mut path,
            &in_flight,
            &mut unsynced,
            &mut last_sync,
        );
        match result {
            Ok(()) => {
                let c = &shared.counters;
                c.groups.fetch_add(1, Ordering::Relaxed);
                c.appends
                    .fetch_add(in_flight.appends() as u64, Ordering::Relaxed);
                c.bytes_written
                    .fetch_add(in_flight.bytes as u64, Ordering::Relaxed);
                shared
                    .written_lsn
                    .store(in_flight.last_lsn, Ordering::Release);
                if !unsynced && shared.durability != Durability::None {
                    shared
                        .durable_lsn
                        .store(in_flight.last_lsn, Ordering::Release);
                }
                // In LSN order: nothing is acknowledged before an earlier frame.
                let waiters = std::mem::take(&mut in_flight.waiters);
                completer.send(Completion {
                    waiters,
                    last_lsn: in_flight.last_lsn,
                    error: None,
                });
                in_flight.clear();
            }
            Err(e) => {
                shared.poison(e.to_string(), &mut in_flight, &completer);
                return;
            }
        }
    }
}

fn sync(shared: &Shared, file: &File, path: &std::path::Path) -> Result<()> {
    let start = Instant::now();
    shared.faults.sync_data(file).ctx(path)?;
    let nanos = start.elapsed().as_nanos() as u64;
    let c = &shared.counters;
    c.syncs.fetch_add(1, Ordering::Relaxed);
    c.sync_nanos_total.fetch_add(nanos, Ordering::Relaxed);
    c.sync_nanos_max.fetch_max(nanos, Ordering::Relaxed);
    Ok(())
}

fn write_batch(
    shared: &Shared,
    file: &mut File,
    path: &mut PathBuf,
    batch: &Batch,
    unsynced: &mut bool,
    last_sync: &mut Instant,
) -> Result<()> {
    for piece in &batch.pieces {
        if let Some(first_lsn) = piece.new_segment {
            // Finish the old segment durably before the new one gets frames, so an older
            // segment is always complete on disk: damage there is corruption, not a tail.
            if shared.durability != Durability::None {
                sync(shared, file, path)?;
            }
            let (f, p) = segment::create_segment(&shared.dir, first_lsn)?;
            *file = f;
            *path = p.clone();
            shared
                .segments
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((first_lsn, p));
        }
        if !piece.bytes.is_empty() {
            shared.faults.write_all(file, &piece.bytes).ctx(path)?;
        }
    }
    match shared.durability {
        Durability::Sync => {
            sync(shared, file, path)?;
            *last_sync = Instant::now();
            *unsynced = false;
        }
        Durability::Interval(ms) => {
            *unsynced = true;
            if last_sync.elapsed() >= Duration::from_millis(ms) {
                sync(shared, file, path)?;
                *last_sync = Instant::now();
                *unsynced = false;
            }
        }
        Durability::None => {}
    }
    Ok(())
}
