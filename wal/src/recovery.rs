//! Recovery: a read-only scan of every segment that classifies the end of the log, and the
//! replay iterator.
//!
//! The scan is the single source of truth for "what is in this log": `Wal::open` acts on its
//! verdict (truncate a torn tail, refuse or salvage corruption), `wal verify` prints it, and
//! `wal dump` prints the frames it walks. It never modifies a file.
//!
//! Classification of the first invalid bytes at offset `o` of segment `s`:
//! - torn tail: `s` is the newest segment, the problem is a short, garbled or zeroed frame
//!   (not a valid frame with the wrong LSN), and no valid frame with a plausible LSN starts
//!   anywhere after `o`. This is what a crash during a write leaves; those frames were never
//!   acknowledged (the fdatasync covering them had not returned).
//! - corruption: anything else: a bad frame followed by valid ones, a bad frame or header in
//!   an older segment, an LSN gap inside or between segments.
//!
//! Power loss can persist a later page of an unsynced write but not an earlier one; that
//! also reads as corruption (valid frames after a hole). We refuse to guess: the operator
//! salvages explicitly and the report names exactly what salvage dropped.
//!
//! Known limit: damage confined to the very last frame of the newest segment (a bit flip in
//! an acknowledged frame with nothing after it) looks exactly like a torn write and is
//! truncated as one. Telling them apart needs an independent durable record of the last
//! acknowledged LSN; the engine's snapshots bound how far back that can reach, and the
//! report always names the truncated offset and byte count.

use std::fs;
use std::path::{Path, PathBuf};

use crate::aligned::AlignedBuf;
use crate::error::{Error, IoContext, Result};
use crate::frame::{self, FrameProblem, FRAME_HEADER_BYTES};
use crate::segment::{self, SEGMENT_HEADER_BYTES};

/// Largest segment file the scanner reads into memory; a larger file is corruption (we never
/// write one: `Options::validate` keeps `segment_bytes_max + payload_bytes_max` below this).
pub const SEGMENT_FILE_BYTES_LIMIT: u64 = 1 << 30;

/// One valid frame as seen by the scan (what `wal dump` prints).
#[derive(Debug, Clone)]
pub struct FrameInfo<'a> {
    /// The segment file holding the frame.
    pub segment: &'a Path,
    /// Byte offset of the frame header inside the segment.
    pub offset: u64,
    /// The frame's LSN.
    pub lsn: u64,
    /// Payload length in bytes.
    pub len: u32,
    /// Stored crc32.
    pub crc: u32,
}

/// What the scan learned about one segment (up to the first problem, if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentSummary {
    /// First LSN, from the file name (checked against the header).
    pub first_lsn: u64,
    /// Path of the segment file.
    pub path: PathBuf,
    /// Valid frames in the segment.
    pub frames: u64,
    /// LSN of the last valid frame, `None` if the segment holds no frame.
    pub last_lsn: Option<u64>,
    /// Bytes up to the end of the last valid frame (the header when empty).
    pub valid_bytes: u64,
    /// Bytes in the file.
    pub file_bytes: u64,
}

/// Torn tail or corruption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// Incomplete last write of the newest segment: safe to truncate.
    TornTail,
    /// Damage before the end of the log: opening refuses unless salvaging.
    Corruption,
}

/// The first invalid bytes of the log and what lies behind them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Torn tail or corruption.
    pub kind: ProblemKind,
    /// Segment where the first invalid bytes are.
    pub segment: PathBuf,
    /// Index of that segment in `Scan::segments` (it is always present there).
    pub segment_index: usize,
    /// Byte offset of the first invalid bytes in that segment.
    pub offset: u64,
    /// Human-readable cause.
    pub reason: String,
    /// Bytes from `offset` to the end of that segment file.
    pub bytes_after: u64,
    /// Segments after the damaged one, with their sizes (truncation removes them).
    pub later_segments: Vec<(PathBuf, u64)>,
    /// Frames that still look valid beyond the damage (in the damaged segment after
    /// `offset` and in later segments): what salvage throws away.
    pub frames_beyond: u64,
}

/// Result of scanning a log directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// Segments up to and including the damaged one.
    pub segments: Vec<SegmentSummary>,
    /// The first problem found, if any.
    pub problem: Option<Problem>,
}

impl Scan {
    /// Valid frames before the first problem.
    pub fn frames(&self) -> u64 {
        self.segments.iter().map(|s| s.frames).sum()
    }
    /// LSN of the last valid frame before the first problem (0 for an empty log).
    pub fn last_lsn(&self) -> u64 {
        self.segments
            .iter()
            .rev()
            .find_map(|s| s.last_lsn)
            .unwrap_or(0)
    }
}

pub(crate) fn read_segment(path: &Path) -> Result<Vec<u8>> {
    let len = fs::metadata(path).ctx(path)?.len();
    if len > SEGMENT_FILE_BYTES_LIMIT {
        return Err(Error::Corruption {
            segment: path.to_path_buf(),
            offset: SEGMENT_FILE_BYTES_LIMIT,
            reason: format!("segment file of {len} bytes exceeds {SEGMENT_FILE_BYTES_LIMIT}"),
        });
    }
    fs::read(path).ctx(path)
}

/// Counts frames that decode validly at any byte offset from `from` on, with an LSN of at
/// least `lsn_min` (garbage that happens to checksum is astronomically unlikely; an old
/// frame cannot exist past the end because we never reuse file space without truncating).
fn recognizable_frames(data: &[u8], from: usize, lsn_min: u64) -> u64 {
    let mut count = 0;
    let mut at = from;
    while at + FRAME_HEADER_BYTES <= data.len() {
        match frame::decode(data, at, None) {
            Ok(f) if f.lsn >= lsn_min => {
                count += 1;
                at = f.end();
            }
            _ => at += 1,
        }
    }
    count
}

/// Opens the log of `dir` for reading only (offline tools on a stopped server): scans it,
/// then returns the scan's verdict and a replay of every valid frame from `from_lsn` up to
/// the first problem. Nothing is truncated, renamed or removed, so a torn tail is still
/// there for the server's next open to report and cut. `from_lsn` below the first LSN on
/// disk is `Error::LsnUnavailable` (a snapshot must cover what compaction deleted).
pub fn read_only(dir: &Path, from_lsn: u64) -> Result<(Scan, Replay)> {
    let scan = scan(dir, |_| {})?;
    let end = scan.last_lsn();
    let segments: Vec<(u64, PathBuf)> = scan
        .segments
        .iter()
        .map(|s| (s.first_lsn, s.path.clone()))
        .collect();
    let replay = Replay::over(&segments, from_lsn, end)?;
    Ok((scan, replay))
}

/// Scans the segments of `dir` without modifying anything. `on_frame` sees every valid
/// frame in log order up to the first problem.
pub fn scan(dir: &Path, mut on_frame: impl FnMut(&FrameInfo<'_>)) -> Result<Scan> {
    let list = segment::list_segments(dir)?;
    let mut segments: Vec<SegmentSummary> = Vec::with_capacity(list.len());
    let mut expected: Option<u64> = None;
    for (index, (name_lsn, path)) in list.iter().enumerate() {
        let is_newest = index + 1 == list.len();
        let data = match read_segment(path) {
            Ok(d) => d,
            Err(Error::Corruption { reason, .. }) => {
                let summary = summary_of(*name_lsn, path, 0, SEGMENT_FILE_BYTES_LIMIT);
                segments.push(summary);
                let p = problem(ProblemKind::Corruption, &list, index, 0, reason, 0, 0)?;
                return Ok(Scan {
                    segments,
                    problem: Some(p),
                });
            }
            Err(e) => return Err(e),
        };
        let file_bytes = data.len() as u64;
        let mut summary = summary_of(*name_lsn, path, 0, file_bytes);
        let header_problem = match segment::decode_header(&data) {
            Err(reason) => Some(reason),
            Ok(first) if first != *name_lsn => Some(format!(
                "segment header says first LSN {first} but the file name says {name_lsn}"
            )),
            Ok(first) => match expected {
                Some(e) if e != first => Some(format!(
                    "LSN gap between segments: expected {e}, segment starts at {first}"
                )),
                _ => None,
            },
        };
        if let Some(reason) = header_problem {
            let beyond = recognizable_frames(&data, 0, expected.unwrap_or(0));
            segments.push(summary);
            let p = problem(
                ProblemKind::Corruption,
                &list,
                index,
                0,
                reason,
                file_bytes,
                beyond,
            )?;
            return Ok(Scan {
                segments,
                problem: Some(p),
            });
        }
        let mut next = *name_lsn;
        let mut at = SEGMENT_HEADER_BYTES;
        while at < data.len() {
            match frame::decode(&data, at, Some(next)) {
                Ok(f) => {
                    on_frame(&FrameInfo {
                        segment: path,
                        offset: at as u64,
                        lsn: f.lsn,
                        len: f.payload_len as u32,
                        crc: f.crc,
                    });
                    summary.frames += 1;
                    summary.last_lsn = Some(f.lsn);
                    next += 1;
                    at = f.end();
                }
                Err(why) => {
                    let beyond = recognizable_frames(&data, at + 1, next);
                    let torn = is_newest
                        && beyond == 0
                        && !matches!(why, FrameProblem::LsnMismatch { .. });
                    let kind = if torn {
                        ProblemKind::TornTail
                    } else {
                        ProblemKind::Corruption
                    };
                    summary.valid_bytes = at as u64;
                    segments.push(summary);
                    let bytes_after = file_bytes - at as u64;
                    let p = problem(
                        kind,
                        &list,
                        index,
                        at as u64,
                        why.to_string(),
                        bytes_after,
                        beyond,
                    )?;
                    return Ok(Scan {
                        segments,
                        problem: Some(p),
                    });
                }
            }
        }
        summary.valid_bytes = at as u64;
        segments.push(summary);
        expected = Some(next);
    }
    Ok(Scan {
        segments,
        problem: None,
    })
}

fn summary_of(first_lsn: u64, path: &Path, valid_bytes: u64, file_bytes: u64) -> SegmentSummary {
    SegmentSummary {
        first_lsn,
        path: path.to_path_buf(),
        frames: 0,
        last_lsn: None,
        valid_bytes,
        file_bytes,
    }
}

/// Builds a `Problem`, measuring the later segments that truncation would remove.
fn problem(
    kind: ProblemKind,
    list: &[(u64, PathBuf)],
    index: usize,
    offset: u64,
    reason: String,
    bytes_after: u64,
    mut frames_beyond: u64,
) -> Result<Problem> {
    let mut later_segments = Vec::new();
    for (_, path) in &list[index + 1..] {
        let len = fs::metadata(path).ctx(path)?.len();
        if len <= SEGMENT_FILE_BYTES_LIMIT {
            let data = fs::read(path).ctx(path)?;
            frames_beyond += recognizable_frames(&data, SEGMENT_HEADER_BYTES.min(data.len()), 0);
        }
        later_segments.push((path.clone(), len));
    }
    Ok(Problem {
        kind,
        segment: list[index].1.clone(),
        segment_index: index,
        offset,
        reason,
        bytes_after,
        later_segments,
        frames_beyond,
    })
}

/// One frame handed out by `Replay`: its LSN and its payload in a 16-byte-aligned buffer.
#[derive(Debug)]
pub struct Frame<'a> {
    /// The frame's LSN.
    pub lsn: u64,
    /// The payload, aligned to `PAYLOAD_ALIGN` (valid until the next call).
    pub payload: &'a [u8],
}

/// Iterates frames `[from, end]` in LSN order, re-validating every byte it reads. A lending
/// iterator: each payload lives in one reused aligned buffer, so replay does not allocate
/// per frame. Reads one segment at a time (memory bounded by the segment size).
pub struct Replay {
    /// Segments still to read, oldest first.
    segments: std::vec::IntoIter<(u64, PathBuf)>,
    /// Contents of the segment being read.
    data: Vec<u8>,
    /// Path of that segment (for error messages).
    path: PathBuf,
    /// Read position in `data`.
    pos: usize,
    /// LSN the next frame in `data` must carry.
    expect: u64,
    /// First LSN to hand out.
    from: u64,
    /// Last LSN to hand out (inclusive); frames after it may be mid-write.
    end: u64,
    /// The reused aligned payload buffer.
    buf: AlignedBuf,
}

impl Replay {
    pub(crate) fn new(segments: Vec<(u64, PathBuf)>, from: u64, end: u64) -> Self {
        Replay {
            segments: segments.into_iter(),
            data: Vec::new(),
            path: PathBuf::new(),
            pos: 0,
            expect: 0,
            from,
            end,
            buf: AlignedBuf::new(),
        }
    }

    /// A replay of `segments` (oldest first) from `from_lsn` to `end`; `from_lsn` below
    /// the first segment is `Error::LsnUnavailable` (compaction deleted those frames).
    pub(crate) fn over(segments: &[(u64, PathBuf)], from_lsn: u64, end: u64) -> Result<Replay> {
        let first = segments.first().map_or(end + 1, |s| s.0);
        let from = from_lsn.max(1);
        if from < first && end >= first {
            return Err(Error::LsnUnavailable {
                requested: from,
                first,
            });
        }
        let start = segments.iter().rposition(|(f, _)| *f <= from).unwrap_or(0);
        Ok(Replay::new(segments[start..].to_vec(), from, end))
    }

    /// Last LSN this replay will return (0 when the log is empty).
    pub fn end_lsn(&self) -> u64 {
        self.end
    }

    /// The next frame, `Ok(None)` at the end, or the corruption found.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>> {
        loop {
            if self.expect > self.end || self.from > self.end {
                return Ok(None);
            }
            if self.pos >= self.data.len() {
                let Some((first, path)) = self.segments.next() else {
                    return Err(Error::Corruption {
                        segment: self.path.clone(),
                        offset: self.pos as u64,
                        reason: format!("log ends before LSN {}", self.end),
                    });
                };
                self.data = read_segment(&path)?;
                let header_first =
                    segment::decode_header(&self.data).map_err(|reason| Error::Corruption {
                        segment: path.clone(),
                        offset: 0,
                        reason,
                    })?;
                if header_first != first || (self.expect != 0 && first != self.expect) {
                    return Err(Error::Corruption {
                        segment: path,
                        offset: 0,
                        reason: format!("segment starts at LSN {first}, expected {}", self.expect),
                    });
                }
                self.expect = first;
                self.path = path;
                self.pos = SEGMENT_HEADER_BYTES;
                continue;
            }
            let f = frame::decode(&self.data, self.pos, Some(self.expect)).map_err(|why| {
                Error::Corruption {
                    segment: self.path.clone(),
                    offset: self.pos as u64,
                    reason: why.to_string(),
                }
            })?;
            self.pos = f.end();
            self.expect += 1;
            if f.lsn >= self.from {
                self.buf.set(&self.data[f.payload_start..f.end()]);
                return Ok(Some(Frame {
                    lsn: f.lsn,
                    payload: self.buf.as_slice(),
                }));
            }
        }
    }
}
