//! `reelbatch wal verify` and `wal dump`, run as the real binary on real log files.

use std::path::Path;
use std::process::Command;

use wal::{Options, Wal};

fn reelbatch(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_reelbatch"))
        .args(args)
        .output()
        .expect("run reelbatch");
    (
        out.status.code().expect("exit code"),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Writes `n` frames of 100 bytes into `D/wal` and returns the frame offsets of the newest
/// segment as reported by the scan.
fn make_log(data_dir: &Path, n: u64) -> Vec<u64> {
    let (wal, _) = Wal::open(
        reelbatch::wal_dir(data_dir),
        Options {
            segment_bytes_max: 8192,
            ..Options::default()
        },
    )
    .unwrap();
    for i in 0..n {
        wal.append(&[i as u8; 100]).unwrap().wait().unwrap();
    }
    wal.close().unwrap();
    let newest = wal::list_segments(&reelbatch::wal_dir(data_dir))
        .unwrap()
        .pop()
        .unwrap()
        .1;
    let mut offsets = Vec::new();
    wal::scan(&reelbatch::wal_dir(data_dir), |f| {
        if f.segment == newest {
            offsets.push(f.offset);
        }
    })
    .unwrap();
    offsets
}

fn newest_segment(data_dir: &Path) -> std::path::PathBuf {
    wal::list_segments(&reelbatch::wal_dir(data_dir))
        .unwrap()
        .pop()
        .unwrap()
        .1
}

#[test]
fn verify_and_dump_a_clean_log() {
    let d = tempfile::tempdir().unwrap();
    make_log(d.path(), 300);
    let dir = d.path().to_str().unwrap();
    let (code, out, _) = reelbatch(&["wal", "verify", "--data-dir", dir]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("frames: 300 (LSN 1..=300)"), "{out}");
    assert!(out.contains("status: clean"), "{out}");
    assert!(out.contains("segments: "), "{out}");

    let (code, out, _) = reelbatch(&["wal", "dump", "--data-dir", dir]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 300);
    assert!(lines[0].starts_with("lsn=1 segment=00000000000000000001.wal offset=32 len=100 crc=0x"));
    assert!(lines[299].starts_with("lsn=300 "));
}

#[test]
fn torn_tail_is_reported_exit_zero_and_left_untouched() {
    let d = tempfile::tempdir().unwrap();
    let offsets = make_log(d.path(), 300);
    let seg = newest_segment(d.path());
    let cut = offsets[offsets.len() - 1] + 7;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let dir = d.path().to_str().unwrap();
    let (code, out, _) = reelbatch(&["wal", "verify", "--data-dir", dir]);
    assert_eq!(code, 0, "{out}");
    let expect = format!(
        "torn tail in {} at offset {}",
        seg.display(),
        offsets[offsets.len() - 1]
    );
    assert!(out.contains(&expect), "{out}");
    assert!(out.contains("frames: 299"), "{out}");
    assert_eq!(
        std::fs::metadata(&seg).unwrap().len(),
        cut,
        "verify never modifies"
    );

    let (code, out, _) = reelbatch(&["wal", "dump", "--data-dir", dir]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().filter(|l| l.starts_with("lsn=")).count(), 299);
    assert!(out.lines().last().unwrap().starts_with("# torn tail"));
}

#[test]
fn corruption_exits_two_with_the_offset() {
    let d = tempfile::tempdir().unwrap();
    let offsets = make_log(d.path(), 300);
    let seg = newest_segment(d.path());
    let victim = offsets[1];
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[victim as usize + 30] ^= 0x10;
    std::fs::write(&seg, bytes).unwrap();
    let dir = d.path().to_str().unwrap();
    let (code, out, _) = reelbatch(&["wal", "verify", "--data-dir", dir]);
    assert_eq!(code, 2, "{out}");
    let expect = format!("CORRUPTION in {} at offset {victim}", seg.display());
    assert!(out.contains(&expect), "{out}");
    let (code, out, _) = reelbatch(&["wal", "dump", "--data-dir", dir]);
    assert_eq!(code, 2);
    assert!(out.lines().last().unwrap().starts_with("# CORRUPTION"));
}

#[test]
fn missing_directory_is_exit_one() {
    let d = tempfile::tempdir().unwrap();
    let (code, _, err) = reelbatch(&["wal", "verify", "--data-dir", d.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("no WAL directory"), "{err}");
}
