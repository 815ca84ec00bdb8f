//! Fault-injection points on the write path.
//!
//! Tests (and the server's fault campaign) arm a fault; the writer thread consults the
//! injector right before each `write` and each `fdatasync`. An armed fault fires once. The
//! cost when nothing is armed is one relaxed atomic load per write and per sync.

use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// How an injected write failure behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFault {
    /// Nothing is written; the write returns EIO.
    Error,
    /// Half of the bytes are written, then EIO: a torn write.
    Short,
    /// Half of the bytes are written, then ENOSPC: a full disk.
    NoSpace,
}

/// Armed faults. Share it through `Options::faults` and keep a clone to arm it.
#[derive(Debug, Default)]
pub struct FaultInjector {
    /// 0 = none, else `WriteFault` + 1.
    write: AtomicU8,
    /// Next fdatasync fails with EIO.
    sync: AtomicBool,
}

const EIO: i32 = 5;
const ENOSPC: i32 = 28;

impl FaultInjector {
    /// A new injector with nothing armed.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next write by the log fails as `fault` says.
    pub fn fail_next_write(&self, fault: WriteFault) {
        let code = match fault {
            WriteFault::Error => 1,
            WriteFault::Short => 2,
            WriteFault::NoSpace => 3,
        };
        self.write.store(code, Ordering::SeqCst);
    }

    /// The next fdatasync by the log fails with EIO.
    pub fn fail_next_sync(&self) {
        self.sync.store(true, Ordering::SeqCst);
    }

    /// Writes `bytes` to `file`, unless a write fault is armed.
    pub(crate) fn write_all(&self, file: &mut File, bytes: &[u8]) -> io::Result<()> {
        if self.write.load(Ordering::Relaxed) != 0 {
            let code = self.write.swap(0, Ordering::SeqCst);
            let (partial, errno) = match code {
                1 => (false, EIO),
                2 => (true, EIO),
                3 => (true, ENOSPC),
                _ => (false, 0),
            };
            if errno != 0 {
                if partial {
                    file.write_all(&bytes[..bytes.len() / 2])?;
                }
                return Err(io::Error::from_raw_os_error(errno));
            }
        }
        file.write_all(bytes)
    }

    /// fdatasyncs `file`, unless a sync fault is armed.
    pub(crate) fn sync_data(&self, file: &File) -> io::Result<()> {
        if self.sync.load(Ordering::Relaxed) && self.sync.swap(false, Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(EIO));
        }
        file.sync_data()
    }
}
