//! Write-ahead-log positions and timelines.

use std::fmt;
use std::str::FromStr;

/// A WAL position, printed as PostgreSQL does: `16/B374D848`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Name of the 16 MiB WAL segment holding this position on `timeline`.
    pub fn segment_name(self, timeline: u32, segment_size: u64) -> String {
        let segno = self.0 / segment_size;
        let per_xlogid = 0x1_0000_0000u64 / segment_size;
        format!("{:08X}{:08X}{:08X}", timeline, segno / per_xlogid, segno % per_xlogid)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = String;
    /// Accepts both print formats: `0/2000028` and the zero-padded `0/02000028` (PG 18).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid LSN {s:?}: expected two hex numbers like 0/2000028");
        let (hi, lo) = s.trim().split_once('/').ok_or_else(bad)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(bad());
        }
        let hi = u64::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn((hi << 32) | lo))
    }
}

impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_both_formats() {
        for s in ["0/0", "16/B374D848", "FFFFFFFF/FFFFFFFF", "0/2000028"] {
            assert_eq!(s.parse::<Lsn>().unwrap().to_string(), s);
        }
        assert_eq!("0/02000028".parse::<Lsn>().unwrap(), "0/2000028".parse::<Lsn>().unwrap());
        for bad in ["", "0", "x/1", "1/", "/1", "123456789/0"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad}");
        }
        assert!(Lsn(1) < "0/2".parse().unwrap());
    }

    #[test]
    fn segment_names() {
        let lsn: Lsn = "0/2000028".parse().unwrap();
        assert_eq!(lsn.segment_name(1, 16 << 20), "000000010000000000000002");
        let lsn: Lsn = "1/FF000000".parse().unwrap();
        assert_eq!(lsn.segment_name(2, 16 << 20), "0000000200000001000000FF");
    }
}
