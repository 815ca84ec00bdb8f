//! The frame: one record in a segment.
//!
//! ```text
//! Frame (little-endian), FRAME_HEADER_BYTES = 20:
//!   [0..4)   crc32     u32  crc32 (IEEE) over bytes [4..20) of this header, then the payload
//!   [4..8)   len       u32  payload length in bytes
//!   [8]      version   u8   frame format version, FRAME_VERSION
//!   [9..12)  reserved  3×u8 zero; a non-zero value is invalid (room for flags later)
//!   [12..20) lsn       u64  log sequence number: dense, +1 per frame across all segments
//!   [20..)   payload   len bytes, opaque to this crate
//! ```
//! The checksum covers the length and the LSN, so a torn or misdirected write cannot pass
//! as a valid frame at the wrong place in the sequence.

/// Bytes of the frame header.
pub const FRAME_HEADER_BYTES: usize = 20;
/// Version byte written in every frame; readers reject any other.
pub const FRAME_VERSION: u8 = 1;

/// Payloads above this are checksummed before the writer lock and combined (combining
/// costs a few hundred ns, checksumming 4 KiB about as much).
pub(crate) const CRC_COMBINE_BYTES_MIN: usize = 4096;

/// Appends one encoded frame to `out`. `payload_crc`, when given, is a hasher that has
/// already seen the payload (computed outside the writer lock), combined after the header.
pub(crate) fn encode_into(
    out: &mut Vec<u8>,
    lsn: u64,
    payload: &[u8],
    payload_crc: Option<&crc32fast::Hasher>,
) {
    let len = u32::try_from(payload.len()).expect("payload length checked against u32 max");
    let mut header = [0u8; FRAME_HEADER_BYTES];
    header[4..8].copy_from_slice(&len.to_le_bytes());
    header[8] = FRAME_VERSION;
    header[12..20].copy_from_slice(&lsn.to_le_bytes());
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[4..]);
    match payload_crc {
        Some(p) => hasher.combine(p),
        None => hasher.update(payload),
    }
    header[0..4].copy_from_slice(&hasher.finalize().to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
}

/// Why bytes at an offset are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameProblem {
    /// Fewer bytes left than the header, or than the header's length field announces.
    Truncated { have: u64, need: u64 },
    /// Version byte other than `FRAME_VERSION`.
    BadVersion(u8),
    /// Reserved bytes not zero.
    ReservedNonZero,
    /// The checksum does not match.
    CrcMismatch { stored: u32, computed: u32 },
    /// A valid frame, but not the LSN that must come next.
    LsnMismatch { expected: u64, found: u64 },
}

impl std::fmt::Display for FrameProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Truncated { have, need } => {
                write!(f, "truncated frame ({have} of {need} bytes present)")
            }
            Self::BadVersion(v) => write!(f, "unknown frame version {v}"),
            Self::ReservedNonZero => write!(f, "reserved header bytes are not zero"),
            Self::CrcMismatch { stored, computed } => {
                write!(
                    f,
                    "crc mismatch (stored {stored:#010x}, computed {computed:#010x})"
                )
            }
            Self::LsnMismatch { expected, found } => {
                write!(f, "LSN gap (expected {expected}, found {found})")
            }
        }
    }
}

/// A frame that passed every check, as positions into the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef {
    /// The frame's LSN.
    pub lsn: u64,
    /// Stored checksum (shown by `wal dump`).
    pub crc: u32,
    /// Offset of the payload within the buffer that was decoded.
    pub payload_start: usize,
    /// Payload length.
    pub payload_len: usize,
}

impl FrameRef {
    /// Offset just past this frame.
    pub fn end(&self) -> usize {
        self.payload_start + self.payload_len
    }
}

/// Decodes the frame at `buf[at..]`. `expected_lsn`, when given, must match. Never
/// allocates: the length field is checked against the bytes actually present.
pub(crate) fn decode(
    buf: &[u8],
    at: usize,
    expected_lsn: Option<u64>,
) -> Result<FrameRef, FrameProblem> {
    let rest = &buf[at..];
    if rest.len() < FRAME_HEADER_BYTES {
        return Err(FrameProblem::Truncated {
            have: rest.len() as u64,
            need: FRAME_HEADER_BYTES as u64,
        });
    }
    let stored = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes"));
    let len = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes")) as usize;
    let version = rest[8];
    if version != FRAME_VERSION {
        return Err(FrameProblem::BadVersion(version));
    }
    if rest[9..12] != [0, 0, 0] {
        return Err(FrameProblem::ReservedNonZero);
    }
    let need = FRAME_HEADER_BYTES + len;
    if rest.len() < need {
        return Err(FrameProblem::Truncated {
            have: rest.len() as u64,
            need: need as u64,
        });
    }
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&rest[4..need]);
    let computed = hasher.finalize();
    if computed != stored {
        return Err(FrameProblem::CrcMismatch { stored, computed });
    }
    let lsn = u64::from_le_bytes(rest[12..20].try_into().expect("8 bytes"));
    if let Some(expected) = expected_lsn {
        if lsn != expected {
            return Err(FrameProblem::LsnMismatch {
                expected,
                found: lsn,
            });
        }
    }
    Ok(FrameRef {
        lsn,
        crc: stored,
        payload_start: at + FRAME_HEADER_BYTES,
        payload_len: len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(lsn: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_into(&mut out, lsn, payload, None);
        out
    }

    #[test]
    fn combined_and_direct_checksums_agree() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let mut h = crc32fast::Hasher::new();
        h.update(&payload);
        let mut combined = Vec::new();
        encode_into(&mut combined, 3, &payload, Some(&h));
        assert_eq!(combined, encode(3, &payload));
    }

    #[test]
    fn round_trip() {
        let buf = encode(42, b"hello");
        let f = decode(&buf, 0, Some(42)).unwrap();
        assert_eq!(f.lsn, 42);
        assert_eq!(&buf[f.payload_start..f.end()], b"hello");
        assert_eq!(f.end(), buf.len());
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let buf = encode(7, b"payload bytes");
        for bit in 0..buf.len() * 8 {
            let mut bad = buf.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                decode(&bad, 0, Some(7)).is_err(),
                "bit {bit} flip undetected"
            );
        }
    }

    #[test]
    fn wrong_lsn_and_truncation() {
        let buf = encode(7, b"abc");
        assert_eq!(
            decode(&buf, 0, Some(8)),
            Err(FrameProblem::LsnMismatch {
                expected: 8,
                found: 7
            })
        );
        for cut in 0..buf.len() {
            assert!(matches!(
                decode(&buf[..cut], 0, None),
                Err(FrameProblem::Truncated { .. })
            ));
        }
    }

    #[test]
    fn huge_length_field_does_not_allocate_or_panic() {
        let mut buf = encode(1, b"x");
        buf[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&buf, 0, None),
            Err(FrameProblem::Truncated { .. })
        ));
    }
}
