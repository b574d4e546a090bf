//! Where a replica keeps things, relative to the replica's URL:
//!
//! ```text
//! generations/<generation>/snapshots/<index>_<offset>_<unix-ms>.snapshot[.zst][.age]
//! generations/<generation>/wal/<index>_<start>_<end>_<unix-ms>.wal[.zst][.age]
//! ```
//!
//! `generation` is 16 lowercase hex digits; `index` (8 hex digits) counts WAL restarts within
//! a generation; offsets (8 hex digits) are byte offsets in that WAL; `unix-ms` (13 decimal
//! digits) is when the data was read from the database's WAL, which is what a point-in-time
//! restore compares against. A WAL object holds the WAL bytes `[start, end)`; the object at
//! start 0 begins with the 32-byte WAL header. A snapshot holds the database file as it was at
//! `(index, offset)`, and is made whole by replaying WAL `index` from its start. Everything a
//! restore needs is in the names, so one LIST of `generations/` plans it.

use cloud_dump_pipeline::Compression;
use rand::RngCore;

pub const GENERATIONS: &str = "generations";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Snapshot {
        offset: u64,
    },
    Wal {
        start: u64,
        end: u64,
    },
    /// An empty marker: WAL `index` ended at `end` (the replicator moved to `index + 1`).
    /// A restore crossing from one index to the next requires it, so a lost last object
    /// of an index is a gap, not a silent skip.
    IndexEnd {
        end: u64,
    },
}

/// One stored object, as its name describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub generation: String,
    pub index: u64,
    pub kind: Kind,
    pub time_ms: i64,
    pub compression: Compression,
    pub encrypted: bool,
    /// Key relative to the replica root, and stored size.
    pub key: String,
    pub size: u64,
    /// Snapshots: the generation's sequence number (newer generations have larger ones);
    /// `None` in names written before sequences existed.
    pub seq: Option<u64>,
    /// Snapshots: its checksum marker exists (see [`checksum_marker`]): the upload is
    /// complete and the marker holds the SHA-256 every downloaded byte must match.
    pub marked: bool,
}

impl Entry {
    pub fn is_snapshot(&self) -> bool {
        matches!(self.kind, Kind::Snapshot { .. })
    }
    pub fn is_wal(&self) -> bool {
        matches!(self.kind, Kind::Wal { .. })
    }
    /// WAL position the entry reaches: a snapshot's offset, a WAL object's end.
    pub fn end(&self) -> u64 {
        match self.kind {
            Kind::Snapshot { offset } => offset,
            Kind::Wal { end, .. } => end,
            Kind::IndexEnd { end } => end,
        }
    }
}

pub fn new_generation() -> String {
    let mut b = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

pub fn is_generation(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub fn generation_dir(generation: &str) -> String {
    format!("{GENERATIONS}/{generation}")
}

/// Name without the codec extensions (`EncodeSpec::object_name` adds them). Offsets take
/// 8 hex digits, more past 4 GiB.
pub fn snapshot_stem(generation: &str, index: u64, offset: u64, time_ms: i64, seq: u64) -> String {
    format!("{GENERATIONS}/{generation}/snapshots/{index:08x}_{offset:08x}_{time_ms:013}_{seq:016x}.snapshot")
}

pub fn wal_stem(generation: &str, index: u64, start: u64, end: u64, time_ms: i64) -> String {
    format!("{GENERATIONS}/{generation}/wal/{index:08x}_{start:08x}_{end:08x}_{time_ms:013}.wal")
}

/// The end marker of WAL `index` (an empty object; see [`Kind::IndexEnd`]).
pub fn index_end_key(generation: &str, index: u64, end: u64, time_ms: i64) -> String {
    format!("{GENERATIONS}/{generation}/wal/{index:08x}_{end:08x}_{time_ms:013}.end")
}

/// The small object written after a snapshot is stored: it holds the SHA-256 of the stored
/// snapshot ([`render_checksum`]). One LIST tells a restore which snapshots are complete;
/// the restore reads the checksum of the one it uses and verifies every byte against it.
pub fn checksum_marker(snapshot_key: &str) -> String {
    format!("{snapshot_key}{CHECKSUM_MARK}")
}

const CHECKSUM_MARK: &str = ".sum";

/// The snapshot key when `key` is a checksum marker.
pub fn parse_checksum_marker(key: &str) -> Option<&str> {
    key.strip_suffix(CHECKSUM_MARK).filter(|k| k.contains(".snapshot"))
}

pub fn render_checksum(sha256: &str) -> String {
    format!("cloud-dump snapshot checksum\nsha256 {sha256}\n")
}

/// The SHA-256 a checksum marker holds.
pub fn parse_checksum(text: &str) -> Option<String> {
    let mut lines = text.lines();
    (lines.next()? == "cloud-dump snapshot checksum").then_some(())?;
    let sha = lines.next()?.strip_prefix("sha256 ")?;
    (sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit())).then(|| sha.to_ascii_lowercase())
}

/// Parses a key relative to the replica root; `None` for anything that is not ours.
pub fn parse(key: &str, size: u64) -> Option<Entry> {
    let mut parts = key.split('/');
    if parts.next()? != GENERATIONS {
        return None;
    }
    let generation = parts.next()?;
    let dir = parts.next()?;
    let file = parts.next()?;
    if parts.next().is_some() || !is_generation(generation) {
        return None;
    }
    let name = cloud_dump_pipeline::ObjectName::parse(file);
    let (compression, encrypted) = (name.compression, name.encrypted);
    let (stem, kind_ext) = name.stem.split_once('.')?;
    if kind_ext.contains('.') {
        return None;
    }
    let fields: Vec<&str> = stem.split('_').collect();
    // Offsets and indexes: 8 hex digits, up to 16 past 4 GiB.
    let hex = |s: &str| (8..=16).contains(&s.len()).then(|| u64::from_str_radix(s, 16).ok()).flatten();
    let time = |s: &str| (s.len() == 13).then(|| s.parse::<i64>().ok()).flatten();
    let mut seq = None;
    let (index, kind, time_ms) = match (dir, kind_ext, fields.as_slice()) {
        ("snapshots", "snapshot", [i, o, t]) => (hex(i)?, Kind::Snapshot { offset: hex(o)? }, time(t)?),
        ("snapshots", "snapshot", [i, o, t, q]) => {
            seq = Some(u64::from_str_radix(q, 16).ok().filter(|_| q.len() == 16)?);
            (hex(i)?, Kind::Snapshot { offset: hex(o)? }, time(t)?)
        }
        ("wal", "end", [i, e, t]) => (hex(i)?, Kind::IndexEnd { end: hex(e)? }, time(t)?),
        ("wal", "wal", [i, s, e, t]) => {
            let (start, end) = (hex(s)?, hex(e)?);
            if end <= start {
                return None;
            }
            (hex(i)?, Kind::Wal { start, end }, time(t)?)
        }
        _ => return None,
    };
    Some(Entry {
        generation: generation.to_owned(),
        index,
        kind,
        time_ms,
        compression,
        encrypted,
        key: key.to_owned(),
        size,
        seq,
        marked: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let g = new_generation();
        assert!(is_generation(&g));
        let k = format!("{}.zst.age", wal_stem(&g, 3, 32, 8272, 1_763_800_000_123));
        let e = parse(&k, 99).unwrap();
        assert_eq!((e.index, e.kind.clone(), e.time_ms), (3, Kind::Wal { start: 32, end: 8272 }, 1_763_800_000_123));
        assert_eq!((e.compression, e.encrypted, e.size), (Compression::Zstd, true, 99));
        let k = snapshot_stem(&g, 0, 4152, 5, 77);
        let e = parse(&k, 1).unwrap();
        assert!(e.is_snapshot() && e.end() == 4152 && e.compression == Compression::None && !e.encrypted);
        assert_eq!(e.seq, Some(77));
        // Names from before sequences, and offsets past 4 GiB.
        let old = format!("generations/{g}/snapshots/00000000_00001038_0000000000005.snapshot");
        assert_eq!(parse(&old, 1).unwrap().seq, None);
        let big = format!("{}.zst", wal_stem(&g, 1, 0x1_0000_0020, 0x1_2345_6789, 9));
        assert_eq!(parse(&big, 1).unwrap().kind, Kind::Wal { start: 0x1_0000_0020, end: 0x1_2345_6789 });
        let marker = checksum_marker(&k);
        assert!(parse(&marker, 0).is_none(), "a marker is not a snapshot");
        assert_eq!(parse_checksum_marker(&marker), Some(k.as_str()));
        assert_eq!(parse_checksum(&render_checksum(&"AB".repeat(32))), Some("ab".repeat(32)));
        assert_eq!(parse_checksum("cloud-dump snapshot checksum\nsha256 xyz\n"), None);
        for bad in [
            "generations/xyz/wal/00000000_00000000_00000020_0000000000001.wal",
            &format!("generations/{g}/wal/00000000_00000020_00000020_0000000000001.wal"),
            &format!("generations/{g}/wal/0_0_20_1.wal"),
            &format!("generations/{g}/snapshots/00000000_00000020_0000000000001.wal"),
            &format!("generations/{g}/wal/00000000_00000000_00000020_0000000000001.wal.age.zst"),
            "other/file",
        ] {
            assert!(parse(bad, 1).is_none(), "{bad}");
        }
    }
}
