//! Input shapes the fuzz targets share.

/// Splits `rest` into records (`len u8, payload`) up to a `0xFF` length (or the end).
/// Returns the records and the bytes after them.
pub fn records(rest: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let mut records = Vec::new();
    let mut at = 0;
    // Bounded by the input: every step moves `at` forward.
    while let Some(&len) = rest.get(at) {
        at += 1;
        if len == 0xFF {
            break;
        }
        let end = (at + len as usize).min(rest.len());
        records.push(&rest[at..end]);
        at = end;
    }
    (records, &rest[at.min(rest.len())..])
}
