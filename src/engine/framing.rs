//! The record framing shared by the engine's archive files (the batch archive and the
//! stored-response segments): each record says how long it is, carries a crc over
//! everything after the crc, and a format version, so a reader validates every byte it
//! takes from disk before decoding.
//!
//! ```text
//! Record: crc32 u32 (of bytes 4.. of the record) | len u32 (payload bytes) |
//!         version u8 = 1 | 7 reserved zero bytes | payload: an rkyv archive (the header
//!         keeps it 16-aligned within the record; copied into an AlignedVec before
//!         validated access, since rkyv's root sits at the end of the buffer)
//! ```

/// Record header bytes (crc, len, version, reserved).
pub(crate) const HEADER_BYTES: usize = 16;
/// Format of a record.
const VERSION: u8 = 1;

/// Appends one record (header + payload) to `out`.
pub(crate) fn put(out: &mut Vec<u8>, payload: &[u8]) {
    assert!(
        u32::try_from(payload.len()).is_ok(),
        "a record payload of {} bytes does not fit its length field",
        payload.len()
    );
    let start = out.len();
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.push(VERSION);
    out.extend_from_slice(&[0u8; 7]);
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[start + 4..]);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
}

/// The payload length a header announces (not yet validated: check it against the
/// caller's limit and the bytes left before reading that many).
pub(crate) fn announced_len(header: &[u8; HEADER_BYTES]) -> u64 {
    u64::from(u32::from_le_bytes(
        header[4..8].try_into().expect("4 bytes"),
    ))
}

/// Validates one whole record (header + payload) and returns its payload copied into an
/// aligned buffer, ready for rkyv's validated access.
pub(crate) fn payload(record: &[u8]) -> Result<rkyv::util::AlignedVec<16>, String> {
    if record.len() < HEADER_BYTES {
        return Err(format!("{} bytes, shorter than a header", record.len()));
    }
    let crc = u32::from_le_bytes(record[0..4].try_into().expect("4 bytes"));
    let len = u32::from_le_bytes(record[4..8].try_into().expect("4 bytes")) as usize;
    if record.len() != HEADER_BYTES + len {
        return Err(format!("length {len} does not match the record"));
    }
    if crc32fast::hash(&record[4..]) != crc {
        return Err("crc mismatch".into());
    }
    if record[8] != VERSION || record[9..16].iter().any(|&b| b != 0) {
        return Err(format!("unknown record version {}", record[8]));
    }
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(len);
    aligned.extend_from_slice(&record[HEADER_BYTES..]);
    Ok(aligned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_any_flipped_bit_is_refused() {
        let mut out = Vec::new();
        put(&mut out, b"payload bytes");
        assert_eq!(out.len(), HEADER_BYTES + 13);
        assert_eq!(payload(&out).unwrap().as_slice(), b"payload bytes");
        let header: [u8; HEADER_BYTES] = out[..HEADER_BYTES].try_into().unwrap();
        assert_eq!(announced_len(&header), 13);
        for bit in 0..out.len() * 8 {
            let mut bad = out.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                payload(&bad).is_err(),
                "bit {bit} flipped and still accepted"
            );
        }
        assert!(payload(&out[..out.len() - 1]).is_err());
    }
}
