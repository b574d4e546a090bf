//! `manifest.json`: what one backup is and holds. It is written last; a backup folder
//! without it is an unfinished backup and does not exist for `list` or `restore`.

use serde::{Deserialize, Serialize};

use crate::lsn::Lsn;

pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ObjectKind {
    /// The main data directory archive.
    Base,
    /// One extra tablespace.
    Tablespace,
    /// The server's own `backup_manifest` (PostgreSQL 13+).
    BackupManifest,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ObjectEntry {
    /// Key relative to the backup's folder, e.g. `base.tar.zst.age`.
    pub key: String,
    pub kind: ObjectKind,
    /// Stored bytes.
    pub size: u64,
    /// SHA-256 of the stored bytes, hex.
    pub sha256: String,
    /// Bytes before compression and encryption.
    pub raw_size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tablespace_oid: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TablespaceEntry {
    pub oid: u32,
    /// Where the tablespace lived on the source server.
    pub location: String,
    pub key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackupManifest {
    pub format_version: u32,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// When the backup completed (RFC 3339, UTC) — the seed's `timestamp`.
    pub timestamp: String,
    pub start_time: String,
    pub stop_time: String,
    pub pg_version: String,
    pub pg_version_num: u32,
    pub system_id: String,
    pub timeline: u32,
    pub start_lsn: Lsn,
    pub end_lsn: Lsn,
    pub backup_label: String,
    /// The WAL needed for consistency is inside the base archive.
    pub wal_included: bool,
    pub compression: String,
    pub encrypted: bool,
    /// `none`, `passphrase` or `x25519`.
    pub encryption: String,
    /// With `passphrase`: this backup's X25519 identity, age-encrypted with the passphrase
    /// (hex). The archives are encrypted to it, so scrypt runs once per backup, not per object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_key: Option<String>,
    pub tablespaces: Vec<TablespaceEntry>,
    pub objects: Vec<ObjectEntry>,
    /// With `passphrase`: HMAC-SHA256 of this manifest (serialized without this field)
    /// under the key derived from the backup's identity (mac.rs), hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl BackupManifest {
    pub fn parse(bytes: &[u8]) -> Result<BackupManifest, String> {
        let m: BackupManifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if m.format_version > FORMAT_VERSION {
            return Err(format!(
                "format version {} is newer than this cloud-dump understands ({FORMAT_VERSION}); upgrade cloud-dump",
                m.format_version
            ));
        }
        Ok(m)
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("manifest serializes");
        v.push(b'\n');
        v
    }

    /// The bytes the MAC covers: the manifest as serialized without its MAC.
    pub fn mac_message(&self) -> Vec<u8> {
        let mut m = self.clone();
        m.mac = None;
        m.to_json()
    }

    /// Whether its MAC verifies under the key derived from `identity` (its text).
    pub fn mac_verifies(&self, identity: &str) -> bool {
        let key = crate::mac::backup_mac_key(identity);
        self.mac.as_deref().is_some_and(|m| crate::mac::verifies(&key, &self.mac_message(), m))
    }

    /// Stored bytes of all objects.
    pub fn stored_size(&self) -> u64 {
        self.objects.iter().map(|o| o.size).sum()
    }

    /// Database bytes (tar) of all archives.
    pub fn raw_size(&self) -> u64 {
        self.objects.iter().map(|o| o.raw_size).sum()
    }

    /// A small valid manifest for tests.
    #[cfg(test)]
    pub(crate) fn example() -> BackupManifest {
        BackupManifest {
            format_version: FORMAT_VERSION,
            name: "n".into(),
            cluster: None,
            timestamp: "2026-03-22T02:00:00Z".into(),
            start_time: "2026-03-22T01:59:00Z".into(),
            stop_time: "2026-03-22T02:00:00Z".into(),
            pg_version: "17.2".into(),
            pg_version_num: 170002,
            system_id: "7412".into(),
            timeline: 1,
            start_lsn: "0/2000028".parse().unwrap(),
            end_lsn: "0/2000100".parse().unwrap(),
            backup_label: "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n".into(),
            wal_included: true,
            compression: "zstd".into(),
            encrypted: false,
            encryption: "none".into(),
            sealed_key: None,
            mac: None,
            tablespaces: vec![],
            objects: vec![ObjectEntry {
                key: "base.tar.zst".into(),
                kind: ObjectKind::Base,
                size: 10,
                sha256: "ab".into(),
                raw_size: 20,
                tablespace_oid: None,
            }],
        }
    }

    /// The cluster's WAL segment size (initdb --wal-segsize), read from `backup_label`'s
    /// `START WAL LOCATION: 0/2000028 (file 000000010000000000000002)`: the one power of
    /// two from 1 MiB to 1 GiB that names that file for that LSN. 16 MiB when the label
    /// does not decide it.
    pub fn wal_segment_size(&self) -> u64 {
        let line = self.backup_label.lines().find_map(|l| l.strip_prefix("START WAL LOCATION: "));
        let parsed = line.and_then(|l| {
            let (lsn, rest) = l.split_once(' ')?;
            let file = rest.strip_prefix("(file ")?.strip_suffix(')')?;
            Some((lsn.parse::<Lsn>().ok()?, file.to_owned()))
        });
        if let Some((lsn, file)) = parsed {
            let tli = u32::from_str_radix(file.get(..8).unwrap_or(""), 16).unwrap_or(0);
            let fits: Vec<u64> = (20..=30).map(|k| 1u64 << k).filter(|s| lsn.segment_name(tli, *s) == file).collect();
            if fits.len() == 1 {
                return fits[0];
            }
        }
        16 << 20
    }

    /// Major.minor as `list` shows it ("17.2").
    pub fn short_version(&self) -> String {
        self.pg_version.split_whitespace().next().unwrap_or("").to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_future_versions_are_refused() {
        let m = BackupManifest::example();
        assert_eq!(m.wal_segment_size(), 16 << 20);
        let mut big = m.clone();
        big.backup_label = "START WAL LOCATION: 0/8000028 (file 000000010000000000000002)\n".into();
        assert_eq!(big.wal_segment_size(), 64 << 20);
        let back = BackupManifest::parse(&m.to_json()).unwrap();
        assert_eq!(back, m);
        let json = String::from_utf8(m.to_json()).unwrap();
        assert!(json.contains("\"end_lsn\": \"0/2000100\""), "{json}");
        let future = json.replace("\"format_version\": 1", "\"format_version\": 99");
        assert!(BackupManifest::parse(future.as_bytes()).unwrap_err().contains("upgrade"));
    }
}
