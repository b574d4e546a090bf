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
    Snapshot { offset: u64 },
    Wal { start: u64, end: u64 },
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
}

impl Entry {
    pub fn is_snapshot(&self) -> bool {
        matches!(self.kind, Kind::Snapshot { .. })
    }
    /// WAL position the entry reaches: a snapshot's offset, a WAL object's end.
    pub fn end(&self) -> u64 {
        match self.kind {
            Kind::Snapshot { offset } => offset,
            Kind::Wal { end, .. } => end,
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

/// Name without the codec extensions (`EncodeSpec::object_name` adds them).
pub fn snapshot_stem(generation: &str, index: u64, offset: u64, time_ms: i64) -> String {
    format!("{GENERATIONS}/{generation}/snapshots/{index:08x}_{offset:08x}_{time_ms:013}.snapshot")
}

pub fn wal_stem(generation: &str, index: u64, start: u64, end: u64, time_ms: i64) -> String {
    format!("{GENERATIONS}/{generation}/wal/{index:08x}_{start:08x}_{end:08x}_{time_ms:013}.wal")
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
    let (stem, rest) = file.split_once('.')?;
    let mut exts = rest.split('.');
    let kind_ext = exts.next()?;
    let mut compression = Compression::None;
    let mut encrypted = false;
    for ext in exts {
        match ext {
            "age" if !encrypted => encrypted = true,
            e if !encrypted && compression == Compression::None => compression = Compression::from_ext(e)?,
            _ => return None,
        }
    }
    let fields: Vec<&str> = stem.split('_').collect();
    let hex = |s: &str| (s.len() == 8).then(|| u64::from_str_radix(s, 16).ok()).flatten();
    let time = |s: &str| (s.len() == 13).then(|| s.parse::<i64>().ok()).flatten();
    let (index, kind, time_ms) = match (dir, kind_ext, fields.as_slice()) {
        ("snapshots", "snapshot", [i, o, t]) => (hex(i)?, Kind::Snapshot { offset: hex(o)? }, time(t)?),
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
        let k = snapshot_stem(&g, 0, 4152, 5);
        let e = parse(&k, 1).unwrap();
        assert!(e.is_snapshot() && e.end() == 4152 && e.compression == Compression::None && !e.encrypted);
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
