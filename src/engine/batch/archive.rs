//! The batch archive: finished batches live in one append-only file, read on demand, so
//! memory keeps only where each one is (`ArchiveRef`) and not its items, prompts and
//! outputs. A finished batch never changes again, which is what makes it safe to write
//! once and forget.
//!
//! ```text
//! File: <data>/archive/batches, a sequence of records, nothing else.
//! Record: the engine's archive framing (`engine::framing`) around an rkyv BatchState.
//! ```
//!
//! Who writes: only the snapshot (one at a time, under the engine's snapshot lock), and
//! only final states whose last event the log has acknowledged, so the archive never holds
//! a change the log could lose. It appends at `end` with positional writes and
//! `fdatasync`s before any in-memory state is dropped and before the snapshot image that
//! leaves those batches out is written; a failed write leaves `end` where it was (the next
//! append overwrites the partial bytes).
//!
//! After every sync the archive's length is recorded in `batches.durable`
//! (`wal::write_file_atomic`: old or new, never half):
//! ```text
//! batches.durable: len u64 | crc32 u32 (of the 8 length bytes)
//! ```
//! Recovery reads records in order up to the first one that does not validate. Before the
//! recorded length that is damage and opening fails, like the log's corruption in the
//! middle (the log segments holding those batches' events are gone). At or after it, it
//! is a torn tail (an append that never reached its sync, possibly with later pages on
//! disk and earlier ones not) and is cut: the log still holds those batches' events.
//! The log's replay skips a batch's events at or below its `last_lsn`, and the archived
//! copy of a batch wins over an older copy in a snapshot image (a crash between the
//! archive's sync and the image's rename leaves both).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::engine::batch::state::BatchState;

use crate::engine::framing::{self, HEADER_BYTES};

/// Largest payload accepted when reading: far above a batch at the largest plan's item
/// cap, and small enough that a damaged length cannot ask for an absurd allocation.
const RECORD_BYTES_MAX: u64 = 256 << 20;
/// Appends are written and synced in chunks of about this many bytes.
const CHUNK_BYTES: usize = 8 << 20;

/// Where a finished batch sits in the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ArchiveRef {
    /// Offset of the record's header.
    pub offset: u64,
    /// Payload bytes (the record is `HEADER_BYTES + len`).
    pub len: u32,
}

impl ArchiveRef {
    /// Where the next record starts.
    pub(crate) fn end(&self) -> u64 {
        self.offset + (HEADER_BYTES as u64) + u64::from(self.len)
    }
}

/// Why the archive could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The file system refused.
    #[error("archive file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Bytes before the recorded synced length (or the marker itself) do not validate.
    #[error("archive file {path}: record at offset {offset} is damaged ({reason}), before the synced length")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// A record that an in-memory reference points at does not validate.
    #[error("archive file {path}: record at offset {offset}: {reason}")]
    Invalid {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// Writing the synced-length marker, or syncing a folder, failed.
    #[error(transparent)]
    File(#[from] wal::Error),
    /// The archive's index (`batch::index`) refused a read or a write.
    #[error("archive index {path}: {reason}")]
    Index { path: PathBuf, reason: String },
}

/// The archive file of a data directory.
pub fn archive_path(data_dir: &Path) -> PathBuf {
    data_dir.join("archive").join("batches")
}

/// A record decoder: validates a whole record (header + payload) and decodes it.
pub(crate) type Decode<T> = fn(&[u8]) -> Result<T, String>;

/// The open batch archive.
pub(crate) struct BatchArchive(RecordFile);

impl BatchArchive {
    /// Opens (or creates) the archive and cuts a torn tail. Records before `from` were
    /// validated when they were written or first read (the index covers them); every valid
    /// record from `from` on is decoded and handed to `visit`, in order, so recovery never
    /// holds more than the caller keeps. Fails on damage in the middle, and when `from`
    /// lies past the valid records (the index is ahead of the archive).
    pub(crate) fn open(
        data_dir: &Path,
        from: u64,
        visit: &mut dyn FnMut(ArchiveRef, BatchState) -> Result<(), ArchiveError>,
    ) -> Result<BatchArchive, ArchiveError> {
        let file = RecordFile::open(data_dir, archive_path(data_dir), from, decode_record, visit)?;
        Ok(BatchArchive(file))
    }

    /// Reads the records of a stopped server's archive without changing it (offline tools).
    /// A missing archive has no records.
    pub(crate) fn read_only(
        data_dir: &Path,
    ) -> Result<Vec<(ArchiveRef, BatchState)>, ArchiveError> {
        RecordFile::read_only(archive_path(data_dir), decode_record)
    }

    /// Appends the states (one record each) and syncs. Returns where each one went, in
    /// order. On error nothing is referenced.
    pub(crate) fn append_durable(
        &self,
        states: &[&BatchState],
    ) -> Result<Vec<ArchiveRef>, ArchiveError> {
        let payloads = states.iter().map(|s| {
            rkyv::to_bytes::<rkyv::rancor::Error>(*s)
                .expect("serializing a batch cannot fail")
                .to_vec()
        });
        self.0.append_durable(payloads)
    }

    /// The batch at `r` (validated).
    pub(crate) fn read(&self, r: ArchiveRef) -> Result<BatchState, ArchiveError> {
        self.0.read(r, decode_record)
    }

    /// Bytes of valid records (metrics, tests).
    pub(crate) fn bytes(&self) -> u64 {
        self.0.bytes()
    }
}

/// An append-only file of framed records with a synced-length marker beside it (the
/// protocol of the module doc), whatever the records hold.
pub(crate) struct RecordFile {
    /// Opened read + write; reads and writes are positional, so readers never share a cursor.
    file: File,
    /// For error messages.
    path: PathBuf,
    /// Where the next record goes (every byte before it is a valid record). Behind a mutex
    /// only to make appends exclusive; readers never take it.
    end: Mutex<u64>,
}

impl RecordFile {
    /// Opens (or creates) the file at `path` (inside `data_dir`), cuts a torn tail, and
    /// hands every valid record from offset `from` on, decoded, to `visit`. Fails on damage
    /// in the middle, and when `from` is not the start of a valid record or the end.
    pub(crate) fn open<T>(
        data_dir: &Path,
        path: PathBuf,
        from: u64,
        decode: Decode<T>,
        visit: &mut dyn FnMut(ArchiveRef, T) -> Result<(), ArchiveError>,
    ) -> Result<RecordFile, ArchiveError> {
        let io_err = |source| ArchiveError::Io {
            path: path.clone(),
            source,
        };
        let dir = path.parent().expect("the archive path has a folder");
        debug_assert!(dir.starts_with(data_dir));
        let created = !dir.exists();
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err)?;
        if created {
            // The new folder's entry must survive a crash like the file's bytes will.
            wal::fsync_dir(data_dir)?;
            wal::fsync_dir(dir)?;
        }
        let durable = read_durable(&path)?;
        let valid_bytes = scan(&file, &path, durable, from, decode, visit)?;
        let len = file.metadata().map_err(io_err)?.len();
        if len > valid_bytes {
            tracing::warn!(
                path = %path.display(),
                cut_bytes = len - valid_bytes,
                "archive file: torn tail cut"
            );
            file.set_len(valid_bytes).map_err(io_err)?;
            file.sync_data().map_err(io_err)?;
        }
        Ok(RecordFile {
            file,
            path,
            end: Mutex::new(valid_bytes),
        })
    }

    /// Reads the records of a stopped server's file without changing it (offline tools).
    /// A missing file has no records.
    pub(crate) fn read_only<T>(
        path: PathBuf,
        decode: Decode<T>,
    ) -> Result<Vec<(ArchiveRef, T)>, ArchiveError> {
        let mut out = Vec::new();
        Self::visit_read_only(path, decode, &mut |r, t| {
            out.push((r, t));
            Ok(())
        })?;
        Ok(out)
    }

    /// Hands every valid record of the file to `visit`, in order, without changing the
    /// file or keeping any record. A missing file has no records.
    pub(crate) fn visit_read_only<T>(
        path: PathBuf,
        decode: Decode<T>,
        visit: &mut dyn FnMut(ArchiveRef, T) -> Result<(), ArchiveError>,
    ) -> Result<(), ArchiveError> {
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(ArchiveError::Io { path, source }),
        };
        let durable = read_durable(&path)?;
        scan(&file, &path, durable, 0, decode, visit)?;
        Ok(())
    }

    /// Appends the payloads (one record each) and syncs. Returns where each one went, in
    /// order. On error nothing is referenced and `end` does not move.
    pub(crate) fn append_durable(
        &self,
        payloads: impl ExactSizeIterator<Item = Vec<u8>>,
    ) -> Result<Vec<ArchiveRef>, ArchiveError> {
        let mut end = self.end.lock().expect("not poisoned");
        let mut refs = Vec::with_capacity(payloads.len());
        let mut buf: Vec<u8> = Vec::new();
        let mut at = *end;
        let mut written = *end;
        for payload in payloads {
            assert!(
                (payload.len() as u64) <= RECORD_BYTES_MAX,
                "a record of {} bytes is over the archive's limit",
                payload.len()
            );
            refs.push(ArchiveRef {
                offset: at,
                len: payload.len() as u32,
            });
            framing::put(&mut buf, &payload);
            at += (HEADER_BYTES + payload.len()) as u64;
            // Bounded buffer, written and synced every few MiB: a sync never has more than
            // that much dirty data to flush, so the log's own syncs, which the file
            // system's journal can make wait behind it, never wait long.
            if buf.len() >= CHUNK_BYTES {
                self.write_at(&buf, written)?;
                self.file.sync_data().map_err(|source| self.io(source))?;
                written += buf.len() as u64;
                buf.clear();
            }
        }
        self.write_at(&buf, written)?;
        self.file.sync_data().map_err(|source| self.io(source))?;
        debug_assert_eq!(written + buf.len() as u64, at);
        write_durable(&self.path, at)?;
        *end = at;
        Ok(refs)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), ArchiveError> {
        if buf.is_empty() {
            return Ok(());
        }
        self.file
            .write_all_at(buf, offset)
            .map_err(|source| self.io(source))
    }

    fn io(&self, source: io::Error) -> ArchiveError {
        ArchiveError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// The record at `r`, validated and decoded.
    pub(crate) fn read<T>(&self, r: ArchiveRef, decode: Decode<T>) -> Result<T, ArchiveError> {
        let mut record = vec![0u8; HEADER_BYTES + r.len as usize];
        self.file
            .read_exact_at(&mut record, r.offset)
            .map_err(|source| self.io(source))?;
        decode(&record).map_err(|reason| ArchiveError::Invalid {
            path: self.path.clone(),
            offset: r.offset,
            reason,
        })
    }

    /// Bytes of valid records (metrics, tests).
    pub(crate) fn bytes(&self) -> u64 {
        *self.end.lock().expect("not poisoned")
    }

    /// The file's path (error messages).
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

fn durable_path(path: &Path) -> PathBuf {
    path.with_extension("durable")
}

/// The recorded durable length (0 when none was recorded yet).
fn read_durable(path: &Path) -> Result<u64, ArchiveError> {
    let marker = durable_path(path);
    let bytes = match std::fs::read(&marker) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(ArchiveError::Io {
                path: marker,
                source,
            })
        }
    };
    let valid = bytes.len() == 12
        && crc32fast::hash(&bytes[0..8]) == u32::from_le_bytes(bytes[8..12].try_into().expect("4"));
    if !valid {
        return Err(ArchiveError::Corrupt {
            path: marker,
            offset: 0,
            reason: "the durable-length marker does not validate".into(),
        });
    }
    Ok(u64::from_le_bytes(bytes[0..8].try_into().expect("8 bytes")))
}

/// Records `len` as durable (atomically).
fn write_durable(path: &Path, len: u64) -> Result<(), ArchiveError> {
    let len_bytes = len.to_le_bytes();
    let crc = crc32fast::hash(&len_bytes).to_le_bytes();
    wal::write_file_atomic(&durable_path(path), &[&len_bytes, &crc])?;
    Ok(())
}

/// Validates one whole record's frame and checksum, decoding nothing.
fn check_frame(record: &[u8]) -> Result<(), String> {
    framing::payload(record).map(|_| ())
}

/// Validates one whole record (header + payload) and decodes its batch.
fn decode_record(record: &[u8]) -> Result<BatchState, String> {
    let aligned = framing::payload(record)?;
    rkyv::from_bytes::<BatchState, rkyv::rancor::Error>(&aligned).map_err(|e| e.to_string())
}

/// Checks every record before `from`, then reads every valid record from `from` on and
/// hands each to `visit`; returns the bytes
/// the valid records cover. A bad record before `durable` (or a file shorter than it) is
/// `Corrupt`; one at or after it starts a torn tail (the caller decides whether to cut
/// it). `from` past the synced length is `Corrupt` too: whoever said the records up to
/// there were valid was wrong.
fn scan<T>(
    file: &File,
    path: &Path,
    durable: u64,
    from: u64,
    decode: Decode<T>,
    visit: &mut dyn FnMut(ArchiveRef, T) -> Result<(), ArchiveError>,
) -> Result<u64, ArchiveError> {
    let io_err = |source| ArchiveError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file_len = file.metadata().map_err(io_err)?.len();
    if file_len < durable {
        return Err(ArchiveError::Corrupt {
            path: path.to_path_buf(),
            offset: file_len,
            reason: format!("the file ends before its recorded durable length {durable}"),
        });
    }
    // The index commits only after the archive's length marker: it never covers more.
    if from > durable {
        return Err(ArchiveError::Corrupt {
            path: path.to_path_buf(),
            offset: durable,
            reason: format!("the synced length is below offset {from}, which the index covers"),
        });
    }
    // Records before `from` are checked (frame and checksum) but not decoded: damage
    // anywhere before the synced length still refuses to start, and nothing of them is
    // kept. This reads the whole file once per start.
    let mut at = 0u64;
    while at < from {
        match read_record_at(file, at, file_len, check_frame) {
            Ok((r, ())) => at = r.end(),
            Err(reason) => {
                return Err(ArchiveError::Corrupt {
                    path: path.to_path_buf(),
                    offset: at,
                    reason,
                })
            }
        }
    }
    if at != from {
        return Err(ArchiveError::Corrupt {
            path: path.to_path_buf(),
            offset: from,
            reason: "the index's covered length falls inside a record".into(),
        });
    }
    // Bounded by the file's length: every step moves `at` forward by a whole record.
    while at < file_len {
        match read_record_at(file, at, file_len, decode) {
            Ok((r, state)) => {
                at += HEADER_BYTES as u64 + u64::from(r.len);
                visit(r, state)?;
            }
            Err(reason) if at < durable => {
                return Err(ArchiveError::Corrupt {
                    path: path.to_path_buf(),
                    offset: at,
                    reason,
                });
            }
            Err(_) => return Ok(at),
        }
    }
    Ok(at)
}

/// The record starting at `at` of a file of `file_len` bytes, validated.
fn read_record_at<T>(
    file: &File,
    at: u64,
    file_len: u64,
    decode: Decode<T>,
) -> Result<(ArchiveRef, T), String> {
    let rest = file_len - at;
    if rest < HEADER_BYTES as u64 {
        return Err("a partial header".into());
    }
    let mut header = [0u8; HEADER_BYTES];
    file.read_exact_at(&mut header, at)
        .map_err(|e| e.to_string())?;
    let len = framing::announced_len(&header);
    if len > RECORD_BYTES_MAX || len > rest - HEADER_BYTES as u64 {
        return Err(format!("length {len} runs past the end"));
    }
    let mut record = vec![0u8; HEADER_BYTES + len as usize];
    file.read_exact_at(&mut record, at)
        .map_err(|e| e.to_string())?;
    let state = decode(&record)?;
    Ok((
        ArchiveRef {
            offset: at,
            len: len as u32,
        },
        state,
    ))
}
