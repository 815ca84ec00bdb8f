//! A byte buffer whose start is 16-byte aligned, so rkyv's validated `access` accepts it.
//!
//! rkyv places the archived root at the end of the buffer and checks alignment, so a payload
//! sliced out of a file buffer at an arbitrary offset cannot be read in place. Readers copy
//! each payload into this buffer (reused across frames, so replay does not allocate).

/// Backed by `u128` words: their alignment (16 on every 64-bit target Rust supports)
/// is the alignment of the bytes we hand out.
#[derive(Default, Clone)]
pub struct AlignedBuf {
    /// Storage; only the first `len` bytes are meaningful.
    words: Vec<u128>,
    /// Number of meaningful bytes.
    len: usize,
}

/// Alignment guaranteed for `AlignedBuf::as_slice().as_ptr()`.
pub const PAYLOAD_ALIGN: usize = std::mem::align_of::<u128>();

impl AlignedBuf {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the contents with `bytes`, growing the storage only when needed.
    pub fn set(&mut self, bytes: &[u8]) {
        let words = bytes.len().div_ceil(16);
        if self.words.len() < words {
            self.words.resize(words, 0);
        }
        let storage: &mut [u8] = bytemuck::cast_slice_mut(&mut self.words[..words]);
        storage[..bytes.len()].copy_from_slice(bytes);
        self.len = bytes.len();
    }

    /// The payload bytes, starting on a `PAYLOAD_ALIGN` boundary.
    pub fn as_slice(&self) -> &[u8] {
        let storage: &[u8] = bytemuck::cast_slice(&self.words);
        &storage[..self.len]
    }

    /// Number of payload bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contents_and_alignment() {
        let mut buf = AlignedBuf::new();
        for len in [0usize, 1, 15, 16, 17, 1000, 3] {
            let bytes: Vec<u8> = (0..len).map(|i| i as u8).collect();
            buf.set(&bytes);
            assert_eq!(buf.as_slice(), &bytes[..]);
            assert_eq!(buf.as_slice().as_ptr() as usize % PAYLOAD_ALIGN, 0);
        }
        assert_eq!(PAYLOAD_ALIGN, 16);
    }
}
