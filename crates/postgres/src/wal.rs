//! WAL file names: segments, timeline history files, backup history files and partial
//! segments, and the segments that follow a given one (for prefetch).

/// Default WAL segment size (initdb --wal-segsize changes it).
pub const DEFAULT_SEGMENT_SIZE: u64 = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalFileKind {
    /// `000000010000000000000002`
    Segment,
    /// `00000002.history`
    History,
    /// `000000010000000000000002.00000028.backup`
    Backup,
    /// `000000010000000000000002.partial`
    Partial,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

/// What kind of WAL file `name` is, or why it is not one (names are also object keys, so
/// anything else is refused).
pub fn classify(name: &str) -> Result<WalFileKind, String> {
    let bad =
        || format!("{name:?} is not a WAL file name (expected e.g. 000000010000000000000002 or 00000002.history)");
    match name.split_once('.') {
        None if is_hex(name, 24) => Ok(WalFileKind::Segment),
        Some((tli, "history")) if is_hex(tli, 8) => Ok(WalFileKind::History),
        Some((seg, "partial")) if is_hex(seg, 24) => Ok(WalFileKind::Partial),
        Some((seg, rest)) if is_hex(seg, 24) => match rest.split_once('.') {
            Some((off, "backup")) if is_hex(off, 8) => Ok(WalFileKind::Backup),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

/// The segment number of a segment name (log × segments per log + seg), for a cluster
/// with `segment_size`-byte segments; `None` for other names.
pub fn segment_number(segment: &str, segment_size: u64) -> Option<u64> {
    if classify(segment) != Ok(WalFileKind::Segment) {
        return None;
    }
    let log = u64::from_str_radix(&segment[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&segment[16..24], 16).ok()?;
    Some(log * (0x1_0000_0000u64 / segment_size.max(1)) + seg)
}

/// The `n` segment names after `segment` on the same timeline.
pub fn next_segments(segment: &str, n: usize, segment_size: u64) -> Vec<String> {
    let Some(mut no) = segment_number(segment, segment_size) else { return Vec::new() };
    let tli = &segment[..8];
    let per_log = 0x1_0000_0000u64 / segment_size.max(1);
    (0..n)
        .map(|_| {
            no += 1;
            format!("{tli}{:08X}{:08X}", no / per_log, no % per_log)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_names() {
        assert_eq!(classify("000000010000000000000002"), Ok(WalFileKind::Segment));
        assert_eq!(classify("00000002.history"), Ok(WalFileKind::History));
        assert_eq!(classify("000000010000000000000002.00000028.backup"), Ok(WalFileKind::Backup));
        assert_eq!(classify("000000010000000000000002.partial"), Ok(WalFileKind::Partial));
        for bad in
            ["", "../etc/passwd", "00000001000000000000000g", "0000000100000000000000021", "x.history", "RECOVERYXLOG"]
        {
            assert!(classify(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn segment_numbers() {
        assert_eq!(segment_number("000000020000000100000003", 16 << 20), Some(256 + 3));
        assert_eq!(segment_number("000000020000000100000003", 64 << 20), Some(64 + 3));
        assert_eq!(segment_number("00000002.history", 16 << 20), None);
    }

    #[test]
    fn next_segments_cross_log_boundaries() {
        assert_eq!(
            next_segments("0000000100000000000000FE", 3, DEFAULT_SEGMENT_SIZE),
            ["0000000100000000000000FF", "000000010000000100000000", "000000010000000100000001"]
        );
        assert!(next_segments("00000002.history", 3, DEFAULT_SEGMENT_SIZE).is_empty());
        assert_eq!(next_segments("000000010000000000000003", 1, 64 << 20), ["000000010000000000000004"]);
        assert_eq!(next_segments("000000010000000000000003", 1, 1 << 30), ["000000010000000100000000"]);
    }
}
