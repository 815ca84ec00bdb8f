//! Crash-recovery tests against real segment files in temporary directories: torn tails at
//! every byte offset, garbage after the tail, bit flips (corruption vs salvage), damage in
//! older segments, LSN gaps between segments, snapshots with compaction, and leftover
//! temporary segment files.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use tempfile::TempDir;
use wal::{
    Error, Options, ProblemKind, RecoveryReport, Wal, FRAME_HEADER_BYTES, SEGMENT_HEADER_BYTES,
};

/// Small segments so a few dozen frames span several of them.
const SEGMENT_BYTES: u64 = 4096;

fn small_opts() -> Options {
    Options {
        segment_bytes_max: SEGMENT_BYTES,
        ..Default::default()
    }
}

fn salvage_opts() -> Options {
    Options {
        salvage: true,
        ..small_opts()
    }
}

/// Deterministic payload of LSN `lsn`: 0..200 bytes whose content depends on the LSN.
fn payload(lsn: u64) -> Vec<u8> {
    let len = ((lsn * 73 + 29) % 200) as usize;
    (0..len)
        .map(|i| (lsn as usize * 31 + i * 7 + (i >> 3)) as u8)
        .collect()
}

/// Tiny deterministic generator (xorshift64*) for "random" garbage.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| (self.next_u64() >> 56) as u8).collect()
    }
}

/// One frame as located on disk by `wal::scan`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Loc {
    /// File name of the segment (comparable across copies of the directory).
    segment: String,
    offset: u64,
    lsn: u64,
    len: u64,
}

impl Loc {
    fn end(&self) -> u64 {
        self.offset + FRAME_HEADER_BYTES as u64 + self.len
    }
}

fn file_name(p: &Path) -> String {
    p.file_name().unwrap().to_str().unwrap().to_string()
}

/// Every valid frame of the log in `dir`, asserting the scan found no problem.
fn frames_on_disk(dir: &Path) -> Vec<Loc> {
    let mut out = Vec::new();
    let scan = wal::scan(dir, |info| {
        out.push(Loc {
            segment: file_name(info.segment),
            offset: info.offset,
            lsn: info.lsn,
            len: u64::from(info.len),
        })
    })
    .unwrap();
    assert_eq!(scan.problem, None, "pristine log must scan clean");
    out
}

fn segment_names(dir: &Path) -> Vec<String> {
    wal::list_segments(dir)
        .unwrap()
        .iter()
        .map(|(_, p)| file_name(p))
        .collect()
}

/// All frames with LSN ≥ `from`, as (LSN, payload).
fn replay_all(w: &Wal, from: u64) -> Vec<(u64, Vec<u8>)> {
    let mut r = w.replay(from).unwrap();
    let mut out = Vec::new();
    while let Some(f) = r.next_frame().unwrap() {
        out.push((f.lsn, f.payload.to_vec()));
    }
    out
}

/// What replay should yield for LSNs `range`.
fn expected(range: std::ops::RangeInclusive<u64>) -> Vec<(u64, Vec<u8>)> {
    range.map(|l| (l, payload(l))).collect()
}

/// Appends `payload(lsn)` for the next `n` LSNs, waiting for each; returns the last LSN.
fn append_n(w: &Wal, n: u64) -> u64 {
    let mut last = 0;
    for _ in 0..n {
        let lsn = w.next_lsn();
        let d = w.append(&payload(lsn)).unwrap();
        assert_eq!(d.lsn(), lsn);
        last = d.wait().unwrap();
        assert_eq!(last, lsn);
    }
    last
}

/// A closed log in a fresh tempdir with `n` frames (LSN 1..=n).
fn build_log(n: u64) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    let (w, report) = Wal::open(dir.path(), small_opts()).unwrap();
    assert_eq!(report.last_lsn, 0);
    assert_eq!(report.first_lsn, 1);
    assert_eq!(append_n(&w, n), n);
    w.close().unwrap();
    dir
}

/// Copies every file of `src` (flat directory) into a fresh tempdir.
fn copy_log(src: &Path) -> TempDir {
    let dst = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), dst.path().join(entry.file_name())).unwrap();
    }
    dst
}

fn flip_bit(path: &Path, byte: u64, bit: u8) {
    let mut data = fs::read(path).unwrap();
    data[byte as usize] ^= 1 << bit;
    fs::write(path, data).unwrap();
}

fn append_bytes(path: &Path, bytes: &[u8]) {
    let mut f = OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

/// Opens, checks nothing was wrong, and returns the log with its report.
fn open_clean(dir: &Path) -> (Wal, RecoveryReport) {
    let (w, report) = Wal::open(dir, small_opts()).unwrap();
    assert_eq!(report.torn_tail, None);
    assert_eq!(report.salvaged, None);
    (w, report)
}

/// After recovery left `last` as the last LSN: one more append gets `last + 1`, survives a
/// clean close and reopen, and the log replays densely from its first LSN.
fn append_one_and_reopen(dir: &Path, w: Wal, last: u64) {
    assert_eq!(w.next_lsn(), last + 1);
    let lsn = w.append(&payload(last + 1)).unwrap().wait().unwrap();
    assert_eq!(lsn, last + 1);
    w.close().unwrap();
    drop(w);
    let (w, report) = open_clean(dir);
    assert_eq!(report.last_lsn, last + 1);
    assert_eq!(report.tmp_files_removed, 0);
    let first = report.first_lsn;
    assert_eq!(replay_all(&w, first), expected(first..=last + 1));
    w.close().unwrap();
}

#[test]
fn torn_tail_at_every_byte_offset_of_the_last_three_frames() {
    let src = tempfile::tempdir().unwrap();
    let (w, _) = Wal::open(src.path(), small_opts()).unwrap();
    let mut last = append_n(&w, 40);
    w.close().unwrap();
    drop(w);
    // Make sure the newest segment holds at least three frames (deterministic payloads, so
    // this loop runs a fixed number of times).
    loop {
        let newest = segment_names(src.path()).pop().unwrap();
        let in_newest = frames_on_disk(src.path())
            .iter()
            .filter(|l| l.segment == newest)
            .count();
        if in_newest >= 3 {
            break;
        }
        let (w, _) = open_clean(src.path());
        last = append_n(&w, 1);
        w.close().unwrap();
    }
    torn_tail_sweep(src.path(), last);
}

fn torn_tail_sweep(src: &Path, last: u64) {
    let segments = wal::list_segments(src).unwrap();
    assert!(segments.len() >= 2, "40 frames must span several segments");
    let newest_path = segments.last().unwrap().1.clone();
    let newest = file_name(&newest_path);
    let locs = frames_on_disk(src);
    assert_eq!(locs.len() as u64, last);
    assert_eq!(locs.last().unwrap().lsn, last);
    let in_newest: Vec<&Loc> = locs.iter().filter(|l| l.segment == newest).collect();
    assert!(in_newest.len() >= 3);
    let file_end = file_len(&newest_path);
    assert_eq!(in_newest.last().unwrap().end(), file_end);
    let start = in_newest[in_newest.len() - 3].offset;

    let mut torn_cases = 0;
    for cut in start..file_end {
        let dir = copy_log(src);
        let seg = dir.path().join(&newest);
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(cut)
            .unwrap();

        let (w, report) = Wal::open(dir.path(), small_opts())
            .unwrap_or_else(|e| panic!("open after cut at {cut} failed: {e}"));
        assert_eq!(report.salvaged, None, "cut {cut}");
        let survivors: Vec<&Loc> = locs
            .iter()
            .filter(|l| l.segment != newest || l.end() <= cut)
            .collect();
        let surviving_last = survivors.last().unwrap().lsn;
        let boundary = in_newest.iter().any(|l| l.offset == cut);
        match &report.torn_tail {
            None => assert!(boundary, "cut {cut} inside a frame but no torn tail"),
            Some(p) => {
                assert!(!boundary, "cut {cut} on a frame boundary reported {p:?}");
                torn_cases += 1;
                let torn = in_newest
                    .iter()
                    .find(|l| l.offset < cut && cut < l.end())
                    .unwrap();
                assert_eq!(p.kind, ProblemKind::TornTail);
                assert_eq!(file_name(&p.segment), newest);
                assert_eq!(p.offset, torn.offset, "cut {cut}");
                assert_eq!(p.bytes_after, cut - torn.offset, "cut {cut}");
                assert!(p.later_segments.is_empty());
                assert_eq!(p.frames_beyond, 0);
                assert_eq!(torn.lsn, surviving_last + 1);
                assert_eq!(file_len(&seg), torn.offset, "torn tail not truncated");
            }
        }
        assert_eq!(report.last_lsn, surviving_last, "cut {cut}");
        assert_eq!(report.frames, survivors.len() as u64);
        assert_eq!(report.first_lsn, 1);
        assert_eq!(
            replay_all(&w, 1),
            expected(1..=surviving_last),
            "replay after cut at {cut}"
        );
        append_one_and_reopen(dir.path(), w, surviving_last);
    }
    // Every offset but the three frame starts is inside a frame.
    assert_eq!(torn_cases, (file_end - start) - 3);
}

#[test]
fn zeros_or_garbage_after_the_last_frame_are_a_torn_tail() {
    let src = build_log(30);
    let newest = file_name(&wal::list_segments(src.path()).unwrap().pop().unwrap().1);
    let valid_len = file_len(&src.path().join(&newest));
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let lengths = [1usize, 2, 7, 19, 20, 21, 63, 64, 500, 1000, 4095, 4096];
    for random in [false, true] {
        for &n in &lengths {
            let dir = copy_log(src.path());
            let seg = dir.path().join(&newest);
            let junk = if random { rng.bytes(n) } else { vec![0u8; n] };
            append_bytes(&seg, &junk);
            assert_eq!(file_len(&seg), valid_len + n as u64);

            let (w, report) = Wal::open(dir.path(), small_opts())
                .unwrap_or_else(|e| panic!("{n} bytes (random: {random}): {e}"));
            let p = report
                .torn_tail
                .as_ref()
                .unwrap_or_else(|| panic!("{n} bytes (random: {random}): no torn tail"));
            assert_eq!(p.kind, ProblemKind::TornTail);
            assert_eq!(file_name(&p.segment), newest);
            assert_eq!(p.offset, valid_len, "{n} bytes (random: {random})");
            assert_eq!(p.bytes_after, n as u64, "{n} bytes (random: {random})");
            assert_eq!(p.frames_beyond, 0);
            assert_eq!(report.salvaged, None);
            assert_eq!(report.last_lsn, 30);
            assert_eq!(report.frames, 30);
            assert_eq!(file_len(&seg), valid_len, "junk not truncated");
            assert_eq!(replay_all(&w, 1), expected(1..=30));
            append_one_and_reopen(dir.path(), w, 30);
        }
    }
}

/// A bit flip in frame `victim` that open refuses and salvage truncates at.
fn check_flip(src: &Path, victim: &Loc, locs: &[Loc], byte: u64, bit: u8) {
    let what = format!("lsn {} byte {byte} bit {bit}", victim.lsn);
    let dir = copy_log(src);
    let seg = dir.path().join(&victim.segment);
    flip_bit(&seg, victim.offset + byte, bit);
    let all_segments = wal::list_segments(dir.path()).unwrap();
    let seg_index = all_segments.iter().position(|(_, p)| *p == seg).unwrap();
    let later: Vec<(PathBuf, u64)> = all_segments[seg_index + 1..]
        .iter()
        .map(|(_, p)| (p.clone(), file_len(p)))
        .collect();
    let beyond = locs.iter().filter(|l| l.lsn > victim.lsn).count() as u64;

    // Default options: refuse.
    match Wal::open(dir.path(), small_opts()) {
        Err(Error::Corruption {
            segment, offset, ..
        }) => {
            assert_eq!(segment, seg, "{what}");
            assert_eq!(offset, victim.offset, "{what}");
        }
        Err(e) => panic!("{what}: expected Corruption, got {e}"),
        Ok((_, r)) => panic!("{what}: open accepted a corrupt log: {r:?}"),
    }
    // Nothing was modified by the refused open.
    assert_eq!(
        file_len(&seg),
        src.join(&victim.segment).metadata().unwrap().len()
    );
    let scan = wal::scan(dir.path(), |_| {}).unwrap();
    let p = scan.problem.clone().expect("scan must report the flip");
    assert_eq!(p.kind, ProblemKind::Corruption, "{what}");
    assert_eq!(p.segment, seg, "{what}");
    assert_eq!(p.offset, victim.offset, "{what}");
    assert_eq!(p.frames_beyond, beyond, "{what}");
    assert_eq!(p.later_segments, later, "{what}");
    assert_eq!(scan.last_lsn(), victim.lsn - 1);

    // Salvage: truncate at the damaged frame, delete later segments.
    let (w, report) = Wal::open(dir.path(), salvage_opts())
        .unwrap_or_else(|e| panic!("{what}: salvage failed: {e}"));
    assert_eq!(report.torn_tail, None);
    let s = report.salvaged.as_ref().expect("salvaged reported");
    assert_eq!(s.kind, ProblemKind::Corruption);
    assert_eq!(s.segment, seg, "{what}");
    assert_eq!(s.offset, victim.offset, "{what}");
    assert_eq!(s.frames_beyond, beyond, "{what}");
    assert_eq!(s.later_segments, later, "{what}");
    for (p, _) in &later {
        assert!(!p.exists(), "{what}: later segment {p:?} not deleted");
    }
    assert_eq!(file_len(&seg), victim.offset, "{what}");
    assert_eq!(report.segments, seg_index + 1);
    assert_eq!(report.last_lsn, victim.lsn - 1);
    assert_eq!(replay_all(&w, 1), expected(1..=victim.lsn - 1), "{what}");
    append_one_and_reopen(dir.path(), w, victim.lsn - 1);
}

#[test]
fn bit_flip_in_a_middle_frame_of_the_newest_segment_is_corruption() {
    let src = build_log(40);
    let locs = frames_on_disk(src.path());
    let newest = segment_names(src.path()).pop().unwrap();
    let in_newest: Vec<&Loc> = locs.iter().filter(|l| l.segment == newest).collect();
    assert!(in_newest.len() >= 3);
    // A frame with a payload that is followed by at least one valid frame.
    let victim = in_newest[..in_newest.len() - 1]
        .iter()
        .rev()
        .find(|l| l.len >= 8)
        .copied()
        .expect("a middle frame with a payload");
    assert!(victim.lsn < locs.last().unwrap().lsn);
    // One bit in every header byte (crc, len, version, reserved, LSN).
    for byte in 0..FRAME_HEADER_BYTES as u64 {
        check_flip(src.path(), victim, &locs, byte, (byte % 8) as u8);
    }
    // The top bit of the length field: the frame claims more bytes than the file holds.
    check_flip(src.path(), victim, &locs, 7, 7);
    // Payload: first, middle and last byte.
    let h = FRAME_HEADER_BYTES as u64;
    for byte in [h, h + victim.len / 2, h + victim.len - 1] {
        check_flip(src.path(), victim, &locs, byte, 3);
    }
}

#[test]
fn bad_frame_in_an_older_segment_is_corruption_and_salvage_drops_later_segments() {
    let src = build_log(150);
    let locs = frames_on_disk(src.path());
    let names = segment_names(src.path());
    assert!(names.len() >= 4, "need several segments, got {names:?}");
    // The last frame of the second-newest segment: looks like a tail, but is not the log's.
    let second_newest = &names[names.len() - 2];
    let last_of_older = locs
        .iter()
        .rfind(|l| &l.segment == second_newest)
        .unwrap()
        .clone();
    let h = FRAME_HEADER_BYTES as u64;
    check_flip(src.path(), &last_of_older, &locs, 0, 0);
    check_flip(src.path(), &last_of_older, &locs, 14, 2);
    if last_of_older.len > 0 {
        check_flip(
            src.path(),
            &last_of_older,
            &locs,
            h + last_of_older.len - 1,
            6,
        );
    }
    // A middle frame of the oldest segment.
    let in_first: Vec<&Loc> = locs.iter().filter(|l| l.segment == names[0]).collect();
    let mid = in_first[in_first.len() / 2];
    check_flip(src.path(), mid, &locs, 5, 1);
    // The very first frame of the log: salvage leaves an empty first segment.
    check_flip(src.path(), &locs[0], &locs, 9, 0);
    // The first frame of a middle segment.
    let first_of_second = locs.iter().find(|l| l.segment == names[1]).unwrap();
    check_flip(src.path(), first_of_second, &locs, 2, 4);
}

#[test]
fn missing_middle_segment_is_an_lsn_gap() {
    let src = build_log(150);
    let segments = wal::list_segments(src.path()).unwrap();
    assert!(segments.len() >= 4);
    let locs = frames_on_disk(src.path());
    let dir = copy_log(src.path());
    let removed = dir.path().join(file_name(&segments[1].1));
    let following = dir.path().join(file_name(&segments[2].1));
    fs::remove_file(&removed).unwrap();

    match Wal::open(dir.path(), small_opts()) {
        Err(Error::Corruption {
            segment, offset, ..
        }) => {
            assert_eq!(segment, following);
            assert_eq!(offset, 0);
        }
        Err(e) => panic!("expected Corruption, got {e}"),
        Ok((_, r)) => panic!("open accepted a log with an LSN gap: {r:?}"),
    }
    let scan = wal::scan(dir.path(), |_| {}).unwrap();
    let p = scan.problem.clone().unwrap();
    assert_eq!(p.kind, ProblemKind::Corruption);
    assert_eq!((p.segment.clone(), p.offset), (following.clone(), 0));
    assert_eq!(p.segment_index, 1);
    assert!(p.reason.contains("gap"), "{}", p.reason);
    assert_eq!(scan.last_lsn(), segments[1].0 - 1);

    // Salvage keeps only the segment before the gap.
    let (w, report) = Wal::open(dir.path(), salvage_opts()).unwrap();
    let s = report.salvaged.unwrap();
    assert_eq!((s.segment, s.offset), (following.clone(), 0));
    assert!(!following.exists());
    for (path, _) in &s.later_segments {
        assert!(!path.exists());
    }
    assert_eq!(s.later_segments.len(), segments.len() - 3);
    let kept = locs.iter().filter(|l| l.lsn < segments[1].0).count() as u64;
    assert_eq!(report.last_lsn, kept);
    assert_eq!(replay_all(&w, 1), expected(1..=kept));
    append_one_and_reopen(dir.path(), w, kept);
}

#[test]
fn snapshot_then_compaction_then_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let logdir = dir.path().join("log");
    let snapdir = dir.path().join("snap");
    let (w, _) = Wal::open(&logdir, small_opts()).unwrap();
    let last = append_n(&w, 200);
    let before = wal::list_segments(&logdir).unwrap();
    assert!(before.len() >= 5, "{} segments", before.len());

    // Snapshot in the middle of the third segment.
    let lsn = (before[2].0 + before[3].0) / 2;
    assert!(before[2].0 < lsn && lsn + 1 < before[3].0);
    wal::write_snapshot(&snapdir, lsn, b"state at lsn").unwrap();

    let removed = w.drop_segments_below(lsn).unwrap();
    let expected_removed: Vec<PathBuf> = before[..2].iter().map(|(_, p)| p.clone()).collect();
    assert_eq!(removed, expected_removed);
    for p in &removed {
        assert!(!p.exists());
    }
    let after = wal::list_segments(&logdir).unwrap();
    assert_eq!(after, before[2..].to_vec());
    assert!(after[0].0 <= lsn + 1);
    assert!(after[1].0 > lsn + 1, "a segment wholly ≤ lsn was kept");
    assert_eq!(w.first_lsn(), after[0].0);
    // Idempotent.
    assert!(w.drop_segments_below(lsn).unwrap().is_empty());

    assert_eq!(replay_all(&w, lsn + 1), expected(lsn + 1..=last));
    assert_eq!(replay_all(&w, after[0].0), expected(after[0].0..=last));
    match w.replay(1) {
        Err(Error::LsnUnavailable { requested, first }) => {
            assert_eq!((requested, first), (1, after[0].0));
        }
        Err(e) => panic!("expected LsnUnavailable, got {e}"),
        Ok(_) => panic!("replay(1) after compaction succeeded"),
    }
    // Appends continue after compaction.
    let last = append_n(&w, 5);
    assert_eq!(last, 205);
    w.close().unwrap();
    drop(w);

    let (w, report) = open_clean(&logdir);
    assert_eq!(report.first_lsn, after[0].0);
    assert!(report.first_lsn > 1);
    assert_eq!(report.last_lsn, last);
    assert_eq!(report.frames, last - after[0].0 + 1);
    assert!(matches!(
        w.replay(report.first_lsn - 1),
        Err(Error::LsnUnavailable { .. })
    ));
    assert_eq!(replay_all(&w, lsn + 1), expected(lsn + 1..=last));
    let more = append_n(&w, 30);
    assert_eq!(more, last + 30);
    assert_eq!(replay_all(&w, lsn + 1), expected(lsn + 1..=more));

    // Compacting everything keeps the active segment.
    let removed = w.drop_segments_below(more).unwrap();
    assert!(!removed.is_empty());
    let remaining = wal::list_segments(&logdir).unwrap();
    assert_eq!(remaining.len(), 1);
    assert_eq!(
        replay_all(&w, remaining[0].0),
        expected(remaining[0].0..=more)
    );
    w.close().unwrap();
    drop(w);
    let (w, report) = open_clean(&logdir);
    assert_eq!((report.first_lsn, report.last_lsn), (remaining[0].0, more));
    append_one_and_reopen(&logdir, w, more);

    let lookup = wal::latest_snapshot(&snapdir, 1 << 20).unwrap();
    let snap = lookup.snapshot.expect("snapshot found");
    assert_eq!(snap.lsn, lsn);
    assert_eq!(snap.payload.as_slice(), b"state at lsn");
    assert!(lookup.skipped.is_empty());
}

#[test]
fn leftover_tmp_segment_is_removed_at_open() {
    let src = build_log(20);
    let dir = copy_log(src.path());
    let tmp = dir.path().join("00000000000000000999.wal.tmp");
    fs::write(&tmp, b"RBWALSEG half a header").unwrap();
    let names = segment_names(dir.path());

    let (w, report) = open_clean(dir.path());
    assert_eq!(report.tmp_files_removed, 1);
    assert!(!tmp.exists());
    assert_eq!(segment_names(dir.path()), names);
    assert_eq!(report.last_lsn, 20);
    assert_eq!(replay_all(&w, 1), expected(1..=20));
    append_one_and_reopen(dir.path(), w, 20);

    // Also in a brand-new directory.
    let fresh = tempfile::tempdir().unwrap();
    let tmp = fresh
        .path()
        .join(format!("{}.tmp", wal::segment_file_name(1)));
    fs::write(&tmp, [0u8; SEGMENT_HEADER_BYTES / 2]).unwrap();
    let (w, report) = open_clean(fresh.path());
    assert_eq!(report.tmp_files_removed, 1);
    assert!(!tmp.exists());
    assert_eq!((report.first_lsn, report.last_lsn), (1, 0));
    append_one_and_reopen(fresh.path(), w, 0);
}

/// Salvaging a damaged header of the oldest remaining segment of a compacted log must not
/// restart LSNs at 1: the snapshot covers every LSN below that segment, so the log has to
/// continue at the segment's first LSN (as it does when a frame, not the header, is bad).
#[test]
fn salvage_of_first_segment_header_after_compaction_keeps_lsns_monotonic() {
    let dir = tempfile::tempdir().unwrap();
    let (w, _) = Wal::open(dir.path(), small_opts()).unwrap();
    let last = append_n(&w, 150);
    let segments = wal::list_segments(dir.path()).unwrap();
    assert!(segments.len() >= 3);
    // Snapshot at the end of the first segment; compaction drops it.
    let snap_lsn = segments[1].0 - 1;
    assert_eq!(
        w.drop_segments_below(snap_lsn).unwrap(),
        vec![segments[0].1.clone()]
    );
    w.close().unwrap();
    drop(w);
    let first = segments[1].0;
    let damaged = segments[1].1.clone();
    flip_bit(&damaged, 0, 0); // segment magic

    assert!(matches!(
        Wal::open(dir.path(), small_opts()),
        Err(Error::Corruption { offset: 0, .. })
    ));
    let (w, report) = Wal::open(dir.path(), salvage_opts()).unwrap();
    let s = report.salvaged.clone().unwrap();
    assert_eq!((s.segment.clone(), s.offset), (damaged, 0));
    assert_eq!(s.frames_beyond, last - first + 1);
    // Everything from `first` on is gone; the log must continue there, not at LSN 1
    // (LSNs 1..=snap_lsn are already covered by the snapshot and must never be reused).
    assert_eq!(report.first_lsn, first, "report: {report:?}");
    assert_eq!(w.next_lsn(), first);
    let lsn = w.append(b"after salvage").unwrap().wait().unwrap();
    assert_eq!(lsn, first);
    w.close().unwrap();
}

/// Every (LSN, payload) a read-only replay from `from` yields, and its scan's verdict.
fn read_only_all(dir: &Path, from: u64) -> (wal::Scan, Vec<(u64, Vec<u8>)>) {
    let (scan, mut r) = wal::read_only(dir, from).unwrap();
    let mut out = Vec::new();
    while let Some(f) = r.next_frame().unwrap() {
        out.push((f.lsn, f.payload.to_vec()));
    }
    (scan, out)
}

/// Bytes of every file in a flat directory, by name (to prove nothing was modified).
fn dir_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (file_name(&p), fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn read_only_replay_stops_at_the_first_problem_and_modifies_nothing() {
    let src = build_log(120);
    assert!(
        segment_names(src.path()).len() > 2,
        "spans several segments"
    );

    // Clean: every frame, from any start.
    let (scan, frames) = read_only_all(src.path(), 1);
    assert!(scan.problem.is_none());
    assert_eq!(frames, expected(1..=120));
    assert_eq!(read_only_all(src.path(), 37).1, expected(37..=120));

    // A torn tail: the valid frames, the tail left in place for the server to cut.
    let torn = copy_log(src.path());
    let newest = torn.path().join(segment_names(torn.path()).last().unwrap());
    append_bytes(&newest, &[0x5a; 11]);
    let before = dir_bytes(torn.path());
    let (scan, frames) = read_only_all(torn.path(), 1);
    assert_eq!(scan.problem.unwrap().kind, ProblemKind::TornTail);
    assert_eq!(frames, expected(1..=120));
    assert_eq!(
        dir_bytes(torn.path()),
        before,
        "read-only left the tail alone"
    );

    // Corruption in the middle: frames up to it, the verdict names it, nothing repaired.
    let bad = copy_log(src.path());
    let victim = frames_on_disk(src.path())[70].clone();
    flip_bit(
        &bad.path().join(&victim.segment),
        victim.offset + FRAME_HEADER_BYTES as u64,
        3,
    );
    let before = dir_bytes(bad.path());
    let (scan, frames) = read_only_all(bad.path(), 1);
    assert_eq!(scan.problem.unwrap().kind, ProblemKind::Corruption);
    assert_eq!(frames, expected(1..=victim.lsn - 1));
    assert_eq!(dir_bytes(bad.path()), before);

    // A leftover temporary file stays too (Wal::open would remove it).
    let tmp = copy_log(src.path());
    fs::write(tmp.path().join("00000000000000000999.wal.tmp"), b"partial").unwrap();
    let before = dir_bytes(tmp.path());
    assert_eq!(read_only_all(tmp.path(), 1).1, expected(1..=120));
    assert_eq!(dir_bytes(tmp.path()), before);

    // The log is still opened normally afterwards.
    let (w, report) = open_clean(src.path());
    assert_eq!(report.last_lsn, 120);
    w.close().unwrap();
}
