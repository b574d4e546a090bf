//! The SQLite WAL file format (https://www.sqlite.org/fileformat2.html#walformat), parsed
//! without I/O: a 32-byte header, then frames of a 24-byte header and one page. A frame is
//! valid when its salts match the header's and its checksum continues the running checksum;
//! a frame with a non-zero "database size" ends a transaction. Only whole committed
//! transactions may be replicated.

use thiserror::Error;

pub const HEADER_SIZE: usize = 32;
pub const FRAME_HEADER_SIZE: usize = 24;
const MAGIC_LE: u32 = 0x377f_0682;
const MAGIC_BE: u32 = 0x377f_0683;
const VERSION: u32 = 3_007_000;

#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum WalError {
    #[error("WAL is shorter than its 32-byte header")]
    Short,
    #[error("not a SQLite WAL file (magic {0:#010x})")]
    Magic(u32),
    #[error("unsupported WAL format version {0}")]
    Version(u32),
    #[error("invalid WAL page size {0}")]
    PageSize(u32),
    #[error("WAL header checksum mismatch")]
    HeaderChecksum,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalHeader {
    pub big_endian_checksums: bool,
    pub page_size: u32,
    pub checkpoint_seq: u32,
    pub salt1: u32,
    pub salt2: u32,
    pub checksum: (u32, u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub page_no: u32,
    /// Database size in pages after this frame's transaction; non-zero only on commit frames.
    pub commit_size: u32,
    pub salt1: u32,
    pub salt2: u32,
    pub checksum: (u32, u32),
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// SQLite's running checksum over 8-byte units, continuing from `(s0, s1)`.
pub fn checksum(big_endian: bool, data: &[u8], (mut s0, mut s1): (u32, u32)) -> (u32, u32) {
    for chunk in data.chunks_exact(8) {
        let word = |i: usize| {
            let b = [chunk[i], chunk[i + 1], chunk[i + 2], chunk[i + 3]];
            if big_endian {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            }
        };
        s0 = s0.wrapping_add(word(0)).wrapping_add(s1);
        s1 = s1.wrapping_add(word(4)).wrapping_add(s0);
    }
    (s0, s1)
}

pub fn parse_header(b: &[u8]) -> Result<WalHeader, WalError> {
    if b.len() < HEADER_SIZE {
        return Err(WalError::Short);
    }
    let magic = be32(b, 0);
    let big = match magic {
        MAGIC_LE => false,
        MAGIC_BE => true,
        m => return Err(WalError::Magic(m)),
    };
    let version = be32(b, 4);
    if version != VERSION {
        return Err(WalError::Version(version));
    }
    let page_size = be32(b, 8);
    let page_size = if page_size == 1 { 65536 } else { page_size };
    if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
        return Err(WalError::PageSize(page_size));
    }
    let stored = (be32(b, 24), be32(b, 28));
    if checksum(big, &b[..24], (0, 0)) != stored {
        return Err(WalError::HeaderChecksum);
    }
    Ok(WalHeader {
        big_endian_checksums: big,
        page_size,
        checkpoint_seq: be32(b, 12),
        salt1: be32(b, 16),
        salt2: be32(b, 20),
        checksum: stored,
    })
}

pub fn parse_frame_header(b: &[u8]) -> FrameHeader {
    FrameHeader {
        page_no: be32(b, 0),
        commit_size: be32(b, 4),
        salt1: be32(b, 8),
        salt2: be32(b, 12),
        checksum: (be32(b, 16), be32(b, 20)),
    }
}

/// How much of a WAL holds whole, valid, committed transactions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub header: WalHeader,
    /// Byte offset just after the last valid commit frame (HEADER_SIZE when there is none).
    pub end: u64,
    /// Valid frames up to `end`.
    pub frames: u64,
    /// Database size in pages after the last commit.
    pub db_pages: u32,
    /// Running checksum at `end`, where the next frame's checksum must continue.
    pub checksum: (u32, u32),
}

/// Walks the frames of `wal` and returns its committed prefix. Frames after the first one
/// whose salt or checksum does not continue (left over from before a reset, or half
/// written) are ignored, as SQLite itself ignores them.
pub fn committed_prefix(wal: &[u8]) -> Result<Committed, WalError> {
    let header = parse_header(wal)?;
    let s = scan(&header, &wal[HEADER_SIZE..], header.checksum);
    Ok(Committed {
        header,
        end: HEADER_SIZE as u64 + s.len as u64,
        frames: s.frames,
        db_pages: s.db_pages,
        checksum: s.checksum,
    })
}

/// The committed part of `frames`: whole frames that continue the running checksum `sum`
/// of a WAL with `header`, up to the last commit frame among them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    /// Bytes of `frames` that hold whole committed transactions.
    pub len: usize,
    pub frames: u64,
    /// Database size in pages after the last commit (0 when there is none).
    pub db_pages: u32,
    /// Running checksum after `len` bytes.
    pub checksum: (u32, u32),
    /// Bytes of valid frames, committed or not: less than the whole frames given means
    /// the chain of frames ended inside `frames`.
    pub valid: usize,
}

pub fn scan(header: &WalHeader, frames: &[u8], mut sum: (u32, u32)) -> Scan {
    let frame_size = FRAME_HEADER_SIZE + header.page_size as usize;
    let mut out = Scan { len: 0, frames: 0, db_pages: 0, checksum: sum, valid: 0 };
    let (mut off, mut n) = (0, 0);
    while off + frame_size <= frames.len() {
        let frame = &frames[off..off + frame_size];
        let fh = parse_frame_header(frame);
        if fh.salt1 != header.salt1 || fh.salt2 != header.salt2 {
            break;
        }
        sum = checksum(header.big_endian_checksums, &frame[..8], sum);
        sum = checksum(header.big_endian_checksums, &frame[FRAME_HEADER_SIZE..], sum);
        if sum != fh.checksum {
            break;
        }
        n += 1;
        off += frame_size;
        out.valid = off;
        if fh.commit_size != 0 {
            out = Scan { len: off, frames: n, db_pages: fh.commit_size, checksum: sum, valid: off };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A real WAL written by the sqlite3 shell, kept by disabling the checkpoint on close.
    fn real_wal(statements: &[&str]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("t.db");
        let mut c = Command::new("sqlite3");
        c.arg(&db).args([".dbconfig no_ckpt_on_close on", "PRAGMA journal_mode=WAL;"]).args(statements);
        let out = c.output().unwrap_or_else(|e| panic!("the sqlite3 shell is needed for this test: {e}"));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        std::fs::read(dir.path().join("t.db-wal")).expect("sqlite3 left a WAL")
    }

    #[test]
    fn reads_a_real_wal_and_its_committed_prefix() {
        let wal = real_wal(&["CREATE TABLE x(a);", "INSERT INTO x VALUES (1),(2);", "INSERT INTO x VALUES (3);"]);
        let c = committed_prefix(&wal).unwrap();
        assert_eq!(c.header.page_size, 4096);
        assert_eq!(c.end as usize, wal.len(), "every frame of a cleanly written WAL is committed");
        let frame = FRAME_HEADER_SIZE as u64 + 4096;
        assert_eq!((c.end - HEADER_SIZE as u64) % frame, 0);
        assert_eq!(c.frames, (c.end - HEADER_SIZE as u64) / frame);
        assert!(c.db_pages >= 2);

        // A half-written last frame is not part of the committed prefix.
        let cut = &wal[..wal.len() - 100];
        assert!(committed_prefix(cut).unwrap().end < c.end);
        // A flipped byte in the last transaction's page: replication stops before it.
        let mut bad = wal.clone();
        let last = bad.len() - 10;
        bad[last] ^= 0xff;
        let p = committed_prefix(&bad).unwrap();
        assert!(p.end < c.end && p.end > HEADER_SIZE as u64);
        // A frame with other salts (left over from before a WAL reset) ends the walk.
        let mut salted = wal.clone();
        salted[HEADER_SIZE + 8] ^= 1;
        assert_eq!(committed_prefix(&salted).unwrap().end, HEADER_SIZE as u64);
    }

    #[test]
    fn bad_headers_are_named() {
        assert_eq!(parse_header(&[0u8; 10]), Err(WalError::Short));
        assert_eq!(parse_header(&[0u8; 32]), Err(WalError::Magic(0)));
        let wal = real_wal(&["CREATE TABLE y(b);"]);
        let mut h = wal[..32].to_vec();
        h[20] ^= 1;
        assert_eq!(parse_header(&h), Err(WalError::HeaderChecksum));
    }
}
