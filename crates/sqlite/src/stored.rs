//! A SQLite replica in backup words: its generations, each with its snapshots and WAL, what
//! span of time it can restore, and the plans over it — restore to a target, retention,
//! verify. Object names are layout.rs's; the plans are pure (restore::plan,
//! replica::retention_plan, [`generations`]); this type lists once and hands the entries
//! to them, so the binary only prints.

use std::collections::BTreeMap;
use std::path::Path;

use cloud_dump_pipeline::Decryption;
use cloud_dump_storage::Repo;
use serde::Serialize;

use crate::error::Result;
use crate::layout::Entry;
use crate::restore::{Plan, Target};

/// One generation as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Generation {
    pub generation: String,
    pub snapshots: usize,
    pub wal_objects: usize,
    pub bytes: u64,
    /// Its first and newest object (ms since the epoch).
    pub first_ms: i64,
    pub last_ms: i64,
    /// The first complete (checksummed) snapshot: the earliest point it restores.
    pub restorable_from_ms: Option<i64>,
    /// The replicator's sequence number for it (higher: started later).
    pub seq: u64,
}

/// The generations in `entries`, by name. Pure.
pub fn generations(entries: &[Entry]) -> Vec<Generation> {
    let mut by: BTreeMap<&str, Vec<&Entry>> = BTreeMap::new();
    for e in entries {
        by.entry(e.generation.as_str()).or_default().push(e);
    }
    by.into_iter()
        .map(|(g, es)| Generation {
            generation: g.to_owned(),
            snapshots: es.iter().filter(|e| e.is_snapshot()).count(),
            wal_objects: es.iter().filter(|e| e.is_wal()).count(),
            bytes: es.iter().map(|e| e.size).sum(),
            first_ms: es.iter().map(|e| e.time_ms).min().unwrap_or(0),
            last_ms: es.iter().map(|e| e.time_ms).max().unwrap_or(0),
            restorable_from_ms: es.iter().filter(|e| e.is_snapshot() && e.marked).map(|e| e.time_ms).min(),
            seq: es.iter().filter_map(|e| e.seq).max().unwrap_or(0),
        })
        .collect()
}

/// The newest generation: the highest sequence number of a snapshot, then the latest
/// activity. Pure.
pub fn newest(entries: &[Entry]) -> Option<&str> {
    entries
        .iter()
        .filter(|e| e.is_snapshot())
        .max_by_key(|e| (e.seq.unwrap_or(0), e.time_ms))
        .map(|e| e.generation.as_str())
}

/// A replica's repository, read in backup words.
pub struct StoredReplica<'a> {
    repo: &'a Repo,
}

impl<'a> StoredReplica<'a> {
    pub fn new(repo: &'a Repo) -> StoredReplica<'a> {
        StoredReplica { repo }
    }

    /// Every object of the replica, parsed (one LIST).
    pub async fn entries(&self) -> Result<Vec<Entry>> {
        crate::replica::list_entries(self.repo, None).await
    }

    pub async fn generations(&self) -> Result<Vec<Generation>> {
        Ok(generations(&self.entries().await?))
    }

    /// What a restore to `target` would read; `keys`: the replica is configured with keys
    /// (unencrypted objects are then refused).
    pub async fn plan_restore(&self, target: &Target, keys: bool) -> Result<Plan> {
        crate::restore::plan_from(self.repo, target, keys).await
    }

    /// Every generation planned and, with keys, restored into `scratch` and checked.
    pub async fn verify(
        &self,
        dec: &Decryption,
        can_decrypt: bool,
        scratch: &Path,
        parallelism: usize,
    ) -> Result<Vec<crate::verify::GenerationCheck>> {
        crate::verify::verify_replica(self.repo, dec, can_decrypt, scratch, parallelism).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Kind;

    fn e(generation: &str, kind: Kind, time_ms: i64, size: u64, marked: bool, seq: Option<u64>) -> Entry {
        Entry {
            key: format!("{generation}/{time_ms}"),
            generation: generation.into(),
            index: 0,
            kind,
            time_ms,
            size,
            marked,
            seq,
            encrypted: false,
            compression: cloud_dump_pipeline::Compression::None,
        }
    }

    #[test]
    fn generations_sum_up_and_the_newest_is_by_sequence() {
        let entries = vec![
            e("a", Kind::Snapshot { offset: 0 }, 100, 10, true, Some(5)),
            e("a", Kind::Wal { start: 0, end: 8 }, 200, 3, false, None),
            e("b", Kind::Snapshot { offset: 0 }, 50, 7, false, Some(9)),
            e("b", Kind::Snapshot { offset: 0 }, 60, 7, true, Some(9)),
        ];
        let g = generations(&entries);
        assert_eq!(g.len(), 2);
        assert_eq!((g[0].snapshots, g[0].wal_objects, g[0].bytes, g[0].first_ms, g[0].last_ms), (1, 1, 13, 100, 200));
        assert_eq!(g[0].restorable_from_ms, Some(100));
        // The unmarked snapshot (not known complete) does not start b's restorable span.
        assert_eq!(g[1].restorable_from_ms, Some(60));
        // b started later (sequence 9), though a was active more recently.
        assert_eq!(newest(&entries), Some("b"));
    }
}
