//! The one error enum of the `wal` crate.

use std::path::PathBuf;

/// Everything that can go wrong in the log. Callers match on the variant: `Poisoned` and
/// `Closed` mean "stop writing", `Corruption` means "refuse to start unless salvaging".
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system call failed; `path` names the file or directory involved.
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A frame or segment header that is not a torn tail failed validation. `offset` is the
    /// byte offset of the first bad byte run inside `segment`.
    #[error("WAL corruption in {segment} at offset {offset}: {reason}")]
    Corruption {
        segment: PathBuf,
        offset: u64,
        reason: String,
    },
    /// An earlier write or fsync failed. After a failed fsync the kernel may have dropped
    /// dirty pages, so retrying could report durability that does not exist: the log refuses
    /// every later append instead.
    #[error("WAL is poisoned by an earlier failure ({0}); no further writes are accepted")]
    Poisoned(String),
    /// The log was closed (shut down) before this append was written.
    #[error("WAL is closed")]
    Closed,
    /// `try_append` found the bounded queue full.
    #[error("WAL append queue is full")]
    QueueFull,
    /// A payload above `Options::payload_bytes_max`.
    #[error("payload of {len} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge { len: usize, max: u32 },
    /// Replay was asked to start below the first LSN still on disk (segments were dropped
    /// after a snapshot).
    #[error("LSN {requested} is no longer in the log, which starts at LSN {first}")]
    LsnUnavailable { requested: u64, first: u64 },
    /// `Options` that cannot work together.
    #[error("invalid WAL options: {0}")]
    InvalidOptions(String),
    /// A snapshot file failed validation (bad magic, version, length or checksum).
    #[error("snapshot {path} is invalid: {reason}")]
    BadSnapshot { path: PathBuf, reason: String },
}

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn ctx(self, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}
