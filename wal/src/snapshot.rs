//! Snapshot files: written atomically, found again by the newest valid one.
//!
//! ```text
//! Snapshot file  <dir>/<LSN, 20 digits>.snap: the state after applying every frame ≤ LSN
//! Header (little-endian), SNAPSHOT_HEADER_BYTES = 40:
//!   [0..8)   magic     b"RBSNAPSH"
//!   [8..12)  version   u32  SNAPSHOT_VERSION
//!   [12..16) reserved  u32  zero
//!   [16..24) lsn       u64
//!   [24..32) len       u64  payload bytes
//!   [32..36) crc32     u32  over bytes [0..32) then the payload
//!   [36..40) reserved  u32  zero
//! Then the payload (opaque; the engine's rkyv image).
//! ```
//! Write protocol: `<name>.tmp`, write, fsync, rename to `<name>`, fsync the directory. A
//! crash leaves either the old set of snapshots or the new one, plus a stray `.tmp` that
//! the next lookup removes.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::aligned::AlignedBuf;
use crate::error::{Error, IoContext, Result};
use crate::segment::{fsync_dir, list_numbered, remove_tmp_files};

/// Bytes of the snapshot header.
pub const SNAPSHOT_HEADER_BYTES: usize = 40;
/// Magic at the start of every snapshot.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"RBSNAPSH";
/// Snapshot format version.
pub const SNAPSHOT_VERSION: u32 = 1;
const SNAPSHOT_EXT: &str = "snap";

/// The file name of the snapshot at `lsn`.
pub fn snapshot_file_name(lsn: u64) -> String {
    format!("{lsn:020}.{SNAPSHOT_EXT}")
}

/// A snapshot read back and validated.
#[derive(Debug)]
pub struct Snapshot {
    /// The state covers every frame with LSN ≤ this.
    pub lsn: u64,
    /// The file it came from.
    pub path: PathBuf,
    /// The payload, 16-byte aligned for rkyv.
    pub payload: AlignedBuf,
}

/// Result of looking for the newest valid snapshot.
#[derive(Debug, Default)]
pub struct SnapshotLookup {
    /// The newest snapshot that validated, if any.
    pub snapshot: Option<Snapshot>,
    /// Newer snapshot files that failed validation (skipped, not deleted), with the reason.
    pub skipped: Vec<(PathBuf, String)>,
}

/// Bytes of a file written atomically between two syncs of it.
const SNAPSHOT_WRITE_CHUNK_BYTES: usize = 8 << 20;

/// Writes the snapshot of the state at `lsn` atomically and returns its path.
pub fn write_snapshot(dir: &Path, lsn: u64, payload: &[u8]) -> Result<PathBuf> {
    fs::create_dir_all(dir).ctx(dir)?;
    let path = dir.join(snapshot_file_name(lsn));
    let mut header = [0u8; SNAPSHOT_HEADER_BYTES];
    header[0..8].copy_from_slice(SNAPSHOT_MAGIC);
    header[8..12].copy_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&lsn.to_le_bytes());
    header[24..32].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&header[0..32]);
    h.update(payload);
    header[32..36].copy_from_slice(&h.finalize().to_le_bytes());
    write_file_atomic(&path, &[&header, payload])?;
    Ok(path)
}

/// Writes `parts`, in order, as the whole content of `path`, atomically: a temporary file
/// `<path>.tmp` is written, synced, renamed over `path`, and the folder synced, so after
/// a crash `path` holds the old content or the new, never a mix.
pub fn write_file_atomic(path: &Path, parts: &[&[u8]]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .ctx(&tmp)?;
        // Written and synced in chunks: a snapshot is hundreds of MB, and one big write
        // left that much dirty data for the filesystem's next journal commit, which the
        // log's own fdatasync then waited behind (a soak saw 200 ms log syncs during
        // snapshot writes). Bounded dirty data keeps the log's syncs short.
        let mut unsynced = 0;
        for part in parts {
            for chunk in part.chunks(SNAPSHOT_WRITE_CHUNK_BYTES) {
                f.write_all(chunk).ctx(&tmp)?;
                unsynced += chunk.len();
                if unsynced >= SNAPSHOT_WRITE_CHUNK_BYTES {
                    f.sync_data().ctx(&tmp)?;
                    unsynced = 0;
                }
            }
        }
        f.sync_all().ctx(&tmp)?;
    }
    fs::rename(&tmp, path).ctx(path)?;
    fsync_dir(dir)
}

/// Reads and validates one snapshot file; files above `bytes_max` are refused unread.
pub fn read_snapshot(path: &Path, bytes_max: u64) -> Result<Snapshot> {
    let bad = |reason: String| Error::BadSnapshot {
        path: path.to_path_buf(),
        reason,
    };
    let len = fs::metadata(path).ctx(path)?.len();
    if len > bytes_max {
        return Err(bad(format!("{len} bytes exceeds the limit of {bytes_max}")));
    }
    let data = fs::read(path).ctx(path)?;
    if data.len() < SNAPSHOT_HEADER_BYTES {
        return Err(bad("shorter than its header".into()));
    }
    let h = &data[..SNAPSHOT_HEADER_BYTES];
    if &h[0..8] != SNAPSHOT_MAGIC {
        return Err(bad("bad magic".into()));
    }
    let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if version != SNAPSHOT_VERSION {
        return Err(bad(format!("unknown version {version}")));
    }
    let lsn = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
    let payload_len = u64::from_le_bytes(h[24..32].try_into().expect("8 bytes"));
    if payload_len != (data.len() - SNAPSHOT_HEADER_BYTES) as u64 {
        return Err(bad(format!(
            "header says {payload_len} payload bytes, file holds {}",
            data.len() - SNAPSHOT_HEADER_BYTES
        )));
    }
    let stored = u32::from_le_bytes(h[32..36].try_into().expect("4 bytes"));
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&h[0..32]);
    hasher.update(&data[SNAPSHOT_HEADER_BYTES..]);
    if hasher.finalize() != stored {
        return Err(bad("crc mismatch".into()));
    }
    let mut payload = AlignedBuf::new();
    payload.set(&data[SNAPSHOT_HEADER_BYTES..]);
    Ok(Snapshot {
        lsn,
        path: path.to_path_buf(),
        payload,
    })
}

/// Finds the newest snapshot that validates (and whose header LSN matches its name),
/// removing stray `.tmp` files of interrupted writes. A missing directory means none.
pub fn latest_snapshot(dir: &Path, bytes_max: u64) -> Result<SnapshotLookup> {
    if dir.exists() {
        remove_tmp_files(dir)?;
    }
    find_latest_snapshot(dir, bytes_max)
}

/// `latest_snapshot` without touching the directory (offline tools): stray `.tmp` files
/// are left for the server's next open.
pub fn find_latest_snapshot(dir: &Path, bytes_max: u64) -> Result<SnapshotLookup> {
    let mut lookup = SnapshotLookup::default();
    if !dir.exists() {
        return Ok(lookup);
    }
    for (lsn, path) in list_numbered(dir, SNAPSHOT_EXT)?.into_iter().rev() {
        match read_snapshot(&path, bytes_max) {
            Ok(s) if s.lsn == lsn => {
                lookup.snapshot = Some(s);
                break;
            }
            Ok(s) => lookup.skipped.push((
                path,
                format!("header LSN {} does not match the file name", s.lsn),
            )),
            Err(Error::BadSnapshot { reason, .. }) => lookup.skipped.push((path, reason)),
            Err(e) => return Err(e),
        }
    }
    Ok(lookup)
}

/// Deletes all but the newest `keep` snapshot files. Returns the deleted paths.
pub fn prune_snapshots(dir: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    let list = list_numbered(dir, SNAPSHOT_EXT)?;
    let excess = list.len().saturating_sub(keep);
    let mut removed = Vec::with_capacity(excess);
    for (_, path) in list.into_iter().take(excess) {
        fs::remove_file(&path).ctx(&path)?;
        removed.push(path);
    }
    if !removed.is_empty() {
        fsync_dir(dir)?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_find_newest_valid() {
        let dir = tempfile::tempdir().unwrap();
        write_snapshot(dir.path(), 10, b"ten").unwrap();
        write_snapshot(dir.path(), 20, b"twenty").unwrap();
        let newest = latest_snapshot(dir.path(), 1 << 20).unwrap();
        let s = newest.snapshot.unwrap();
        assert_eq!((s.lsn, s.payload.as_slice()), (20, &b"twenty"[..]));
        assert_eq!(s.payload.as_slice().as_ptr() as usize % 16, 0);

        // Damage the newest: the lookup falls back to the older one and says why.
        let p = dir.path().join(snapshot_file_name(20));
        let mut bytes = fs::read(&p).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&p, bytes).unwrap();
        fs::write(dir.path().join("00000000000000000030.snap.tmp"), b"partial").unwrap();
        let lookup = latest_snapshot(dir.path(), 1 << 20).unwrap();
        assert_eq!(lookup.snapshot.unwrap().lsn, 10);
        assert_eq!(lookup.skipped.len(), 1);
        assert!(lookup.skipped[0].1.contains("crc"));
        assert!(!dir.path().join("00000000000000000030.snap.tmp").exists());

        // Oversized files are refused without being read.
        assert!(matches!(
            read_snapshot(&dir.path().join(snapshot_file_name(10)), 8),
            Err(Error::BadSnapshot { .. })
        ));

        assert_eq!(prune_snapshots(dir.path(), 1).unwrap().len(), 1);
        assert!(dir.path().join(snapshot_file_name(20)).exists());
    }
}
