//! Segment files: naming, the segment header, and creating a segment atomically.
//!
//! ```text
//! Segment file  <dir>/<first LSN, 20 digits>.wal  (names sort by first LSN)
//! Header (little-endian), SEGMENT_HEADER_BYTES = 32:
//!   [0..8)   magic      b"RBWALSEG"
//!   [8..12)  version    u32  SEGMENT_VERSION
//!   [12..16) reserved   u32  zero
//!   [16..24) first_lsn  u64  LSN of the first frame this segment holds (or will hold)
//!   [24..28) crc32      u32  crc32 over bytes [0..24)
//!   [28..32) reserved   u32  zero
//! Then frames (see frame.rs), back to back, no padding.
//! ```
//! A segment is created under a temporary name, fsynced, renamed and the directory fsynced,
//! so a crash never leaves a segment with a torn header.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

/// Bytes of the segment header.
pub const SEGMENT_HEADER_BYTES: usize = 32;
/// Magic at the start of every segment.
pub const SEGMENT_MAGIC: &[u8; 8] = b"RBWALSEG";
/// Segment format version.
pub const SEGMENT_VERSION: u32 = 1;
/// File name extension of segments.
pub const SEGMENT_EXT: &str = "wal";

/// The file name of the segment whose first LSN is `first_lsn`.
pub fn segment_file_name(first_lsn: u64) -> String {
    format!("{first_lsn:020}.{SEGMENT_EXT}")
}

/// Parses `<20 digits>.<ext>` into the number; anything else is `None`.
pub(crate) fn parse_numbered_name(name: &str, ext: &str) -> Option<u64> {
    let stem = name.strip_suffix(ext)?.strip_suffix('.')?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// Segments in `dir`, sorted by first LSN. Files that do not follow the naming scheme are
/// ignored (they are not ours).
pub fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    list_numbered(dir, SEGMENT_EXT)
}

pub(crate) fn list_numbered(dir: &Path, ext: &str) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).ctx(dir)? {
        let entry = entry.ctx(dir)?;
        let name = entry.file_name();
        if let Some(n) = name.to_str().and_then(|s| parse_numbered_name(s, ext)) {
            out.push((n, entry.path()));
        }
    }
    out.sort_unstable_by_key(|(n, _)| *n);
    Ok(out)
}

/// Encodes the header of a segment starting at `first_lsn`.
pub(crate) fn encode_header(first_lsn: u64) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut h = [0u8; SEGMENT_HEADER_BYTES];
    h[0..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&first_lsn.to_le_bytes());
    let crc = crc32fast::hash(&h[0..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Decodes a segment header, returning its first LSN or what is wrong with it.
pub(crate) fn decode_header(bytes: &[u8]) -> Result<u64, String> {
    if bytes.len() < SEGMENT_HEADER_BYTES {
        return Err(format!(
            "segment header truncated ({} of {SEGMENT_HEADER_BYTES} bytes)",
            bytes.len()
        ));
    }
    let h = &bytes[..SEGMENT_HEADER_BYTES];
    if &h[0..8] != SEGMENT_MAGIC {
        return Err("bad segment magic".into());
    }
    let stored = u32::from_le_bytes(h[24..28].try_into().expect("4 bytes"));
    if crc32fast::hash(&h[0..24]) != stored {
        return Err("segment header crc mismatch".into());
    }
    let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if version != SEGMENT_VERSION {
        return Err(format!("unknown segment version {version}"));
    }
    if h[12..16] != [0; 4] || h[28..32] != [0; 4] {
        return Err("reserved segment header bytes are not zero".into());
    }
    Ok(u64::from_le_bytes(h[16..24].try_into().expect("8 bytes")))
}

/// fsyncs a directory so that renames and unlinks in it are durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).ctx(dir)?.sync_all().ctx(dir)
}

/// Creates `<dir>/<first_lsn>.wal` atomically (tmp, write header, fsync, rename, fsync dir)
/// and returns it opened for appending.
pub(crate) fn create_segment(dir: &Path, first_lsn: u64) -> Result<(File, PathBuf)> {
    let path = dir.join(segment_file_name(first_lsn));
    let tmp = dir.join(format!("{}.tmp", segment_file_name(first_lsn)));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .ctx(&tmp)?;
        f.write_all(&encode_header(first_lsn)).ctx(&tmp)?;
        f.sync_all().ctx(&tmp)?;
    }
    fs::rename(&tmp, &path).ctx(&path)?;
    fsync_dir(dir)?;
    let f = OpenOptions::new().append(true).open(&path).ctx(&path)?;
    Ok((f, path))
}

/// Removes leftover `*.tmp` files of interrupted segment or snapshot writes.
pub(crate) fn remove_tmp_files(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(dir).ctx(dir)? {
        let entry = entry.ctx(dir)?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.ends_with(".tmp"))
        {
            fs::remove_file(entry.path()).ctx(&entry.path())?;
            removed += 1;
        }
    }
    if removed > 0 {
        fsync_dir(dir)?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_by_lsn_and_parse_back() {
        let a = segment_file_name(9);
        let b = segment_file_name(10);
        assert!(a < b);
        assert_eq!(parse_numbered_name(&b, SEGMENT_EXT), Some(10));
        assert_eq!(parse_numbered_name("10.wal", SEGMENT_EXT), None);
        assert_eq!(
            parse_numbered_name("0000000000000000000x.wal", SEGMENT_EXT),
            None
        );
    }

    #[test]
    fn header_round_trip_and_checks() {
        let h = encode_header(1234);
        assert_eq!(decode_header(&h), Ok(1234));
        for i in 0..SEGMENT_HEADER_BYTES {
            let mut bad = h;
            bad[i] ^= 0x40;
            assert!(decode_header(&bad).is_err(), "byte {i}");
        }
        assert!(decode_header(&h[..10]).is_err());
    }
}
