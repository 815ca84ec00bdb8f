//! One engine per data directory: an exclusive lock on `D/LOCK`, taken before anything in
//! the directory is opened and released only after everything is closed.
//!
//! Why a lock of its own: recovery truncates the log's torn tail and rebuilds derived
//! indexes. Done while another engine (another process, or an engine in this process
//! that is still stopping) writes to the same files, that would cut acknowledged writes.
//! The index files' own locks are taken too late for that (after the log is open).
//!
//! Why a bounded wait: an engine dropped without `shutdown` (a test's "kill", or the last
//! handle going away on another thread) finishes closing on whichever thread drops its
//! last reference, a moment after the caller's handle is gone; a process that was just
//! killed releases its lock when the kernel reaps it. Both clear in milliseconds; a
//! directory still locked after `LOCK_WAIT_MS_MAX` is in use, and opening it fails.
//!
//! The lock is `flock(LOCK_EX | LOCK_NB)`: tied to the open file, so the kernel drops it
//! when the process dies, and two opens in one process exclude each other. (`libc`
//! rather than `File::try_lock`, which needs a newer Rust than the crate's MSRV.)

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long `acquire` waits for a previous engine on the directory to let go.
pub(crate) const LOCK_WAIT_MS_MAX: u64 = 5_000;
/// Between tries: short, since the usual holder is an engine finishing its close.
const LOCK_RETRY_MS: u64 = 10;

/// The held lock; dropping it (closing the file) releases it.
#[derive(Debug)]
pub(crate) struct DirLock {
    /// The open `LOCK` file: the lock lives as long as this descriptor.
    _file: File,
}

/// Why the directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum DirLockError {
    /// Another engine holds the directory.
    #[error(
        "data directory {path} is in use (locked by another server or engine for {waited_ms} ms)"
    )]
    InUse {
        /// The lock file.
        path: PathBuf,
        /// How long this open waited.
        waited_ms: u64,
    },
    /// The lock file could not be created or locked.
    #[error("data directory lock {path}: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
}

impl DirLock {
    /// Creates `data_dir` if needed and locks it, waiting at most `wait_ms_max`.
    pub(crate) fn acquire(data_dir: &Path, wait_ms_max: u64) -> Result<DirLock, DirLockError> {
        let path = data_dir.join("LOCK");
        let io = |source| DirLockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(data_dir).map_err(io)?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io)?;
        let started = Instant::now();
        // Bounded: at most wait_ms_max / LOCK_RETRY_MS + 1 tries.
        loop {
            match try_lock(&file) {
                Ok(true) => return Ok(DirLock { _file: file }),
                Ok(false) => {}
                Err(e) => return Err(io(e)),
            }
            let waited_ms = started.elapsed().as_millis() as u64;
            if waited_ms >= wait_ms_max {
                return Err(DirLockError::InUse { path, waited_ms });
            }
            std::thread::sleep(Duration::from_millis(LOCK_RETRY_MS));
        }
    }
}

/// `Ok(false)`: another open file holds the lock.
#[cfg(unix)]
fn try_lock(file: &File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the call's duration (borrowed from `file`).
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        _ => Err(e),
    }
}

/// Elsewhere there is no lock: the server targets Linux (one engine per directory is
/// then the operator's rule, as it was before this module).
#[cfg(not(unix))]
fn try_lock(_file: &File) -> std::io::Result<bool> {
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_directory_waits_then_fails_and_succeeds_once_released() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path(), 0).unwrap();
        let err = DirLock::acquire(dir.path(), 50).unwrap_err();
        match err {
            DirLockError::InUse { waited_ms, .. } => assert!(waited_ms >= 50, "{waited_ms}"),
            e => panic!("expected InUse, got {e}"),
        }
        // Released on another thread while the second open waits: it gets the lock.
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            drop(first);
        });
        let second = DirLock::acquire(dir.path(), LOCK_WAIT_MS_MAX).unwrap();
        releaser.join().unwrap();
        drop(second);
        DirLock::acquire(dir.path(), 0).unwrap();
    }
}
