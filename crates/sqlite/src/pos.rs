//! A replication position: generation, WAL index, offset — printed as Litestream does
//! (`<generation>/<index:08x>:<offset:08x>`).

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    pub generation: String,
    pub index: u64,
    pub offset: u64,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{:08x}:{:08x}", self.generation, self.index, self.offset)
    }
}

impl FromStr for Pos {
    type Err = String;
    fn from_str(s: &str) -> Result<Pos, String> {
        let bad = || format!("invalid position {s:?}: expected GENERATION/INDEX:OFFSET (hex)");
        let (generation, rest) = s.split_once('/').ok_or_else(bad)?;
        let (index, offset) = rest.split_once(':').ok_or_else(bad)?;
        if generation.is_empty() || !generation.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        Ok(Pos {
            generation: generation.to_owned(),
            index: u64::from_str_radix(index, 16).map_err(|_| bad())?,
            offset: u64::from_str_radix(offset, 16).map_err(|_| bad())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let p = Pos { generation: "b16ddcf5c697540f".into(), index: 0x1a, offset: 4152 };
        assert_eq!(p.to_string(), "b16ddcf5c697540f/0000001a:00001038");
        assert_eq!(p.to_string().parse::<Pos>().unwrap(), p);
        for bad in ["", "x/1:2", "abc/1", "abc/zz:1", "/1:2"] {
            assert!(bad.parse::<Pos>().is_err(), "{bad}");
        }
    }
}
