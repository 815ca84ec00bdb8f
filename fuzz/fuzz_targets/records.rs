//! The WAL record and snapshot image decoders (rkyv, validated): arbitrary bytes read
//! from disk decode to a record or an error, never a panic or an out-of-bounds read.
//! Each input is tried as given and behind a valid version header (which the fuzzer would
//! otherwise need to find first), always from a 16-byte aligned buffer as in replay.

#![no_main]

use libfuzzer_sys::fuzz_target;
use reelbatch::engine::{journal, snapshot};

fuzz_target!(|data: &[u8]| {
    let mut buf = wal::AlignedBuf::new();
    buf.set(data);
    let _ = journal::decode(buf.as_slice());
    let _ = snapshot::decode(buf.as_slice());
    let mut framed = Vec::with_capacity(journal::RECORD_HEADER_BYTES + data.len());
    framed.push(journal::RECORD_VERSION);
    framed.resize(journal::RECORD_HEADER_BYTES, 0);
    framed.extend_from_slice(data);
    buf.set(&framed);
    if let Ok(record) = journal::decode(buf.as_slice()) {
        // A record that validates encodes back to a record that decodes to the same.
        let again = journal::encode(&record);
        buf.set(&again);
        let back = journal::decode(buf.as_slice()).expect("re-encoded record decodes");
        assert_eq!(back, record);
    }
    let _ = snapshot::decode(buf.as_slice());
});
