//! The batch archive's recovery (record framing, the durable-length marker, torn tails
//! versus damage before the synced length), through the offline loader a stopped
//! server's data goes through (`engine::rebuild::load_offline`). Never a panic and never
//! an absurd allocation; a marker that promises more bytes than the file holds is refused.
//!
//! Input: byte 0 picks the shape. Bit 0 clear: the rest is the archive file, as is.
//! Bit 0 set: the rest is records (`len u8, payload`) up to a `0xFF` length, framed by the
//! documented format (crc32 | len u32 | version 1 | 7 zero bytes | payload) so the scan
//! reaches payload validation, then `(offset u16, xor u8)` damage triples. Bit 1 set:
//! a valid durable-length marker is written, its length taken from byte 1 as a fraction of
//! the file (255: twice the file). Bit 2 set: the marker's bytes are raw input instead.

#![no_main]

use libfuzzer_sys::fuzz_target;

mod input;

fn record(out: &mut Vec<u8>, payload: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.push(1);
    out.extend_from_slice(&[0; 7]);
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[start + 4..]);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    let Some((&shape, rest)) = data.split_first() else {
        return;
    };
    let (fraction, rest) = rest.split_first().map_or((0, rest), |(f, r)| (*f, r));
    let mut file = Vec::new();
    if shape & 1 == 0 {
        file.extend_from_slice(rest);
    } else {
        let (records, damage) = input::records(rest);
        for r in records {
            record(&mut file, r);
        }
        for d in damage.chunks_exact(3) {
            if file.is_empty() {
                break;
            }
            let offset = u16::from_le_bytes([d[0], d[1]]) as usize % file.len();
            file[offset] ^= d[2];
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    std::fs::create_dir_all(&archive).unwrap();
    std::fs::write(archive.join("batches"), &file).unwrap();
    let promised = if shape & 2 != 0 {
        let len = (file.len() as u64 * u64::from(fraction)) / 128;
        let mut marker = len.to_le_bytes().to_vec();
        marker.extend_from_slice(&crc32fast::hash(&len.to_le_bytes()).to_le_bytes());
        if shape & 4 != 0 {
            marker = rest.iter().take(12).copied().collect();
        }
        std::fs::write(archive.join("batches.durable"), &marker).unwrap();
        (shape & 4 == 0).then_some(len)
    } else {
        None
    };
    let cfg = reelbatch::engine::EngineConfig::new(dir.path());
    let loaded = reelbatch::engine::rebuild::load_offline(&cfg, dir.path());
    if let Some(len) = promised {
        if len > file.len() as u64 {
            assert!(loaded.is_err(), "a marker past the file's end is damage");
        }
    }
});
