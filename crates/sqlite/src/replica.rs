//! One replica of one database: uploads the shadow WAL as it grows (one object per sync),
//! snapshots (at a new generation, every snapshot interval), and retention.
//!
//! Requests: an idle database publishes no new shadow position, so the replica makes no
//! request at all; a busy one makes one PUT per sync interval. LIST is used once at start
//! and once per retention check.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cloud_dump_pipeline::{EncodeSpec, Encoder, Encryption, Sink};
use cloud_dump_storage::Repo;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::ReplicaSpec;
use crate::db::{now_ms, ShadowPos, Shared};
use crate::error::{Result, SqliteError};
use crate::layout::{self, Entry};

#[derive(Debug, Default)]
pub struct ReplicaMetrics {
    pub syncs: AtomicU64,
    pub sync_errors: AtomicU64,
    pub bytes: AtomicU64,
    pub snapshots: AtomicU64,
    /// Milliseconds from reading the WAL to the upload being durable, for the last sync.
    pub lag_ms: AtomicI64,
    /// Data time (unix ms) of the newest uploaded WAL.
    pub position_time_ms: AtomicI64,
    pub validations: AtomicU64,
    pub validation_errors: AtomicU64,
}

/// Uploaded up to `offset` of shadow WAL `index` of `generation`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Uploaded {
    generation: String,
    index: u64,
    offset: u64,
}

pub struct Replica {
    pub spec: ReplicaSpec,
    repo: Repo,
    encode: Arc<EncodeSpec>,
    shared: Arc<Shared>,
    slot: usize,
    at: Option<Uploaded>,
    last_snapshot_ms: Option<i64>,
    next_retention_ms: i64,
    next_validation_ms: Option<i64>,
    pub metrics: Arc<ReplicaMetrics>,
}

pub fn encode_spec(spec: &ReplicaSpec) -> EncodeSpec {
    EncodeSpec {
        compression: spec.compression,
        level: spec.compression.default_level(),
        threads: 0,
        encryption: if spec.recipients.is_empty() {
            Encryption::None
        } else {
            Encryption::Recipients(spec.recipients.clone())
        },
    }
}

impl Replica {
    pub fn new(spec: ReplicaSpec, repo: Repo, shared: Arc<Shared>, slot: usize) -> Replica {
        Replica {
            encode: Arc::new(encode_spec(&spec)),
            spec,
            repo,
            shared,
            slot,
            at: None,
            last_snapshot_ms: None,
            next_retention_ms: 0,
            next_validation_ms: None,
            metrics: Arc::default(),
        }
    }

    fn name(&self) -> String {
        format!("{} ({})", self.spec.name, self.repo.url())
    }

    fn report(&self) {
        let mut p = self.shared.replica_pos.lock().unwrap_or_else(|e| e.into_inner());
        p[self.slot] = self.at.as_ref().map(|a| (a.generation.clone(), a.index));
    }

    /// Runs until `stop` turns true, then uploads what is left and returns.
    /// Replicates until `stop`; true when the final sync (after the stop) succeeded.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> bool {
        let mut pos_rx = self.shared.pos.subscribe();
        self.next_retention_ms = now_ms() + self.spec.retention_check_interval.as_millis() as i64;
        self.next_validation_ms = self.spec.validation_interval.map(|v| now_ms() + v.as_millis() as i64);
        loop {
            let stopping = *stop.borrow();
            let started = tokio::time::Instant::now();
            let synced = self.sync().await;
            if let Err(e) = &synced {
                self.metrics.sync_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(replica = %self.name(), error = %e, "replication failed; retrying at the next sync");
            }
            if now_ms() >= self.next_retention_ms && !stopping {
                self.next_retention_ms = now_ms() + self.spec.retention_check_interval.as_millis() as i64;
                if let Err(e) = self.enforce_retention().await {
                    tracing::error!(replica = %self.name(), error = %e, "retention check failed");
                }
            }
            if let Some(at) = self.next_validation_ms.filter(|at| now_ms() >= *at && !stopping) {
                let every = self.spec.validation_interval.unwrap_or_default().as_millis() as i64;
                self.next_validation_ms = Some(at.max(now_ms()) + every);
                self.validate().await;
            }
            if stopping {
                return synced.is_ok();
            }
            // At most one sync per interval; then wait for new data (or the stop signal).
            let next = started + self.spec.sync_interval;
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = stop.changed() => continue,
            }
            let next_timer = self.next_validation_ms.map_or(self.next_retention_ms, |v| v.min(self.next_retention_ms));
            let until_retention = Duration::from_millis((next_timer - now_ms()).max(0) as u64);
            tokio::select! {
                r = pos_rx.changed() => { if r.is_err() { break false; } }
                _ = stop.changed() => {}
                _ = tokio::time::sleep(until_retention) => {}
            }
        }
    }

    /// Brings the replica up to the shadow position: snapshot when the generation is new
    /// to it or the last snapshot is older than the snapshot interval, then the WAL.
    pub async fn sync(&mut self) -> Result<()> {
        let cur = self.shared.pos.borrow().clone();
        if cur.generation.is_empty() {
            return Ok(());
        }
        if self.at.as_ref().map(|a| &a.generation) != Some(&cur.generation) {
            if let Some(old) = self.at.clone() {
                // Upload what the old generation still has in the shadow, then move on.
                if let Err(e) = self.upload_wal(&old.generation, u64::MAX, u64::MAX, cur.time_ms).await {
                    tracing::warn!(replica = %self.name(), generation = %old.generation, error = %e, "could not upload the end of the previous generation");
                }
            }
            self.resume(&cur.generation).await?;
        }
        let snapshot_due = match self.last_snapshot_ms {
            None => true,
            Some(t) => now_ms() - t >= self.spec.snapshot_every().as_millis() as i64,
        };
        if snapshot_due {
            self.snapshot().await?;
        }
        let cur = self.shared.pos.borrow().clone();
        if cur.generation == self.at.as_ref().map(|a| a.generation.clone()).unwrap_or_default() {
            self.upload_wal(&cur.generation, cur.index, cur.end, cur.time_ms).await?;
        }
        Ok(())
    }

    /// Finds where this replica stands in `generation` (one LIST).
    async fn resume(&mut self, generation: &str) -> Result<()> {
        let entries = list_entries(&self.repo, Some(generation)).await?;
        // Only complete snapshots (with their checksum marker) count.
        self.last_snapshot_ms = entries.iter().filter(|e| e.is_snapshot() && e.marked).map(|e| e.time_ms).max();
        let last_wal = entries.iter().filter(|e| !e.is_snapshot()).max_by_key(|e| (e.index, e.end()));
        self.at = match (self.last_snapshot_ms, last_wal) {
            (Some(_), Some(w)) => Some(Uploaded { generation: generation.into(), index: w.index, offset: w.end() }),
            _ => None,
        };
        if self.at.is_none() {
            self.last_snapshot_ms = None;
        }
        self.report();
        Ok(())
    }

    /// Streams the database file to a snapshot object while the database thread keeps its
    /// read transaction open (the gate), so the file plus WAL `index` from its start is the
    /// state at `(index, end)`.
    async fn snapshot(&mut self) -> Result<()> {
        let shared = self.shared.clone();
        let (tx, mut rx) = mpsc::channel::<Bytes>(8);
        let (pos_tx, pos_rx) = oneshot::channel::<ShadowPos>();
        let reader = tokio::task::spawn_blocking(move || -> Result<u64> {
            let _gate = shared.gate.read().unwrap_or_else(|e| e.into_inner());
            let _ = pos_tx.send(shared.pos.borrow().clone());
            let path = &shared.path;
            let file = shared.db_file.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let file = file.ok_or_else(|| SqliteError::db(path.display(), "the database is not open"))?;
            let mut total = 0u64;
            loop {
                let mut buf = vec![0u8; 1 << 20];
                let n = std::os::unix::fs::FileExt::read_at(&*file, &mut buf, total)
                    .map_err(|e| SqliteError::io(path.display(), e))?;
                if n == 0 {
                    break;
                }
                buf.truncate(n);
                total += n as u64;
                if tx.blocking_send(Bytes::from(buf)).is_err() {
                    break;
                }
            }
            Ok(total)
        });
        let pos = pos_rx.await.map_err(|_| SqliteError::Replica("snapshot reader stopped".into()))?;
        let size = std::fs::metadata(&self.shared.path).map(|m| m.len()).ok();
        let key =
            self.encode.object_name(&layout::snapshot_stem(&pos.generation, pos.index, pos.end, pos.time_ms, pos.seq));
        let mut sink = Sink::start(&self.repo, &key, size, self.encode.clone()).await?;
        let mut failed = None;
        while let Some(b) = rx.recv().await {
            if let Err(e) = sink.write(b).await {
                failed = Some(e);
                break;
            }
        }
        drop(rx);
        let read = reader.await.map_err(|e| SqliteError::Replica(format!("snapshot reader: {e}")))?;
        if let Some(e) = failed {
            sink.abort().await;
            return Err(e.into());
        }
        let total = match read {
            Ok(t) => t,
            Err(e) => {
                sink.abort().await;
                return Err(e);
            }
        };
        let stored = sink.finish().await?.wait().await?;
        let mode = self.shared.file_mode();
        self.repo.restrict_local(&key, mode)?;
        // The snapshot counts only once its checksum marker exists (restores verify every
        // byte against it).
        self.repo
            .put_durable(&layout::checksum_marker(&key), Bytes::from(layout::render_checksum(&stored.sha256)))
            .await?;
        self.repo.restrict_local(&layout::checksum_marker(&key), mode)?;
        self.metrics.snapshots.fetch_add(1, Ordering::Relaxed);
        self.metrics.bytes.fetch_add(stored.size, Ordering::Relaxed);
        self.last_snapshot_ms = Some(pos.time_ms);
        let keep = matches!(&self.at, Some(a) if a.generation == pos.generation && a.index >= pos.index);
        if !keep {
            self.at = Some(Uploaded { generation: pos.generation.clone(), index: pos.index, offset: 0 });
            self.report();
        }
        tracing::info!(replica = %self.name(), generation = %pos.generation, index = pos.index, bytes = total, stored = stored.size, "snapshot uploaded");
        Ok(())
    }

    /// Uploads shadow WAL bytes from the replica's position up to `(index, end)` of
    /// `generation`, one object per shadow file touched. `index == u64::MAX` uploads
    /// everything the shadow still has.
    async fn upload_wal(&mut self, generation: &str, index: u64, end: u64, time_ms: i64) -> Result<()> {
        loop {
            let Some(at) = self.at.clone() else { return Ok(()) };
            if at.generation != generation || at.index > index {
                return Ok(());
            }
            let path = self.shared.shadow_path(generation, at.index);
            let len = match std::fs::metadata(&path) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if index == u64::MAX {
                        return Ok(());
                    }
                    // The shadow file is gone (state removed by hand): start over with a snapshot.
                    self.last_snapshot_ms = None;
                    return Err(SqliteError::Replica(format!(
                        "shadow WAL {} is missing; a new snapshot will be taken",
                        path.display()
                    )));
                }
                Err(e) => return Err(SqliteError::io(path.display(), e)),
            };
            let stop_at = if at.index == index { end.min(len) } else { len };
            if stop_at > at.offset {
                let data = read_range(&path, at.offset, stop_at).await?;
                let key = self.encode.object_name(&layout::wal_stem(generation, at.index, at.offset, stop_at, time_ms));
                let encode = self.encode.clone();
                let encoded = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
                    let mut enc = Encoder::new(Vec::with_capacity(data.len() / 2 + 64), &encode)?;
                    std::io::Write::write_all(&mut enc, &data)?;
                    Ok(enc.finish()?.0)
                })
                .await
                .map_err(|e| SqliteError::Replica(format!("encoder: {e}")))?
                .map_err(|e| SqliteError::io(&key, e))?;
                let n = encoded.len() as u64;
                self.repo.put_durable(&key, Bytes::from(encoded)).await?;
                self.repo.restrict_local(&key, self.shared.file_mode())?;
                self.metrics.syncs.fetch_add(1, Ordering::Relaxed);
                self.metrics.bytes.fetch_add(n, Ordering::Relaxed);
                self.metrics.lag_ms.store(now_ms() - time_ms, Ordering::Relaxed);
                self.metrics.position_time_ms.store(time_ms, Ordering::Relaxed);
                self.at = Some(Uploaded { generation: generation.into(), index: at.index, offset: stop_at });
            }
            if at.index < index
                && (index != u64::MAX || std::fs::metadata(self.shared.shadow_path(generation, at.index + 1)).is_ok())
            {
                // Index `at.index` is complete: say where it ended before moving on.
                let ended = self.at.as_ref().map(|a| a.offset).unwrap_or(at.offset);
                self.repo
                    .put_durable(
                        &layout::index_end_key(generation, at.index, ended, time_ms),
                        Bytes::from_static(b"cloud-dump end of WAL index\n"),
                    )
                    .await?;
                self.at = Some(Uploaded { generation: generation.into(), index: at.index + 1, offset: 0 });
                self.report();
                continue;
            }
            self.report();
            return Ok(());
        }
    }

    /// `validation-interval`: restores the replica's latest state into a scratch file in the
    /// shadow directory (checksums verified, `PRAGMA integrity_check`), then removes it. It
    /// proves the replica restores; it does not compare with the live database, whose state
    /// at exactly the replica's position is not at hand without stopping the application.
    async fn validate(&mut self) {
        let scratch = self.shared.meta_dir.join(format!("validate-{}.db", self.spec.name));
        let _ = std::fs::remove_file(&scratch);
        use cloud_dump_pipeline::keys::{opener, Opener, Sealing};
        let dec = match opener(Sealing::ToRecipients, false, !self.spec.identities.is_empty()) {
            Opener::Identities => cloud_dump_pipeline::Decryption::Identities(self.spec.identities.clone()),
            _ => cloud_dump_pipeline::Decryption::None,
        };
        let started = std::time::Instant::now();
        let keys = !self.spec.identities.is_empty() || !self.spec.recipients.is_empty();
        let result = match crate::restore::plan_from(&self.repo, &crate::restore::Target::default(), keys).await {
            Ok(plan) => crate::restore::execute(&self.repo, &plan, dec, &scratch, 4).await.map(|r| (plan, r)),
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_file(&scratch);
        match result {
            Ok((plan, r)) => {
                self.metrics.validations.fetch_add(1, Ordering::Relaxed);
                tracing::info!(replica = %self.name(), generation = %plan.generation, bytes = r.bytes, secs = started.elapsed().as_secs_f64(), "validation: the replica restores and passes integrity_check");
            }
            Err(e) => {
                self.metrics.validation_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(replica = %self.name(), error = %e, "validation FAILED: the replica does not restore");
            }
        }
    }

    /// Deletes what the retention period no longer needs; see [`retention_plan`].
    pub async fn enforce_retention(&mut self) -> Result<()> {
        let entries = list_entries(&self.repo, None).await?;
        // The store lost what this replica built on (a bucket emptied, a volume remounted
        // empty): the WAL uploaded since continues a snapshot that no longer exists, and
        // nothing is restorable. Start over with a snapshot at the next sync, loudly.
        if let Some(at) = &self.at {
            let has_base = entries.iter().any(|e| e.generation == at.generation && e.is_snapshot() && e.marked);
            if !has_base {
                self.metrics.sync_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    replica = %self.name(),
                    generation = %at.generation,
                    "the replica's snapshot of its current generation is gone from the store (emptied or replaced?): nothing was restorable; taking a new snapshot now"
                );
                self.at = None;
                self.last_snapshot_ms = None;
                self.report();
                return Ok(());
            }
        }
        let cutoff = now_ms() - self.spec.retention.as_millis() as i64;
        let current = self.at.as_ref().map(|a| a.generation.clone()).unwrap_or_default();
        let doomed = retention_plan(&entries, cutoff, &current);
        for e in &doomed {
            self.repo.delete(&e.key).await?;
            if e.marked {
                self.repo.delete(&layout::checksum_marker(&e.key)).await?;
            }
        }
        if !doomed.is_empty() {
            tracing::info!(replica = %self.name(), objects = doomed.len(), "retention: removed objects older than the retention period");
        }
        Ok(())
    }
}

async fn read_range(path: &std::path::Path, from: u64, to: u64) -> Result<Vec<u8>> {
    let p = path.to_owned();
    tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&p).map_err(|e| SqliteError::io(p.display(), e))?;
        f.seek(SeekFrom::Start(from)).map_err(|e| SqliteError::io(p.display(), e))?;
        let mut buf = vec![0u8; (to - from) as usize];
        f.read_exact(&mut buf).map_err(|e| SqliteError::io(p.display(), e))?;
        Ok(buf)
    })
    .await
    .map_err(|e| SqliteError::Replica(format!("reading the shadow WAL: {e}")))?
}

/// Every object of the replica (or of one generation), parsed from one LIST.
pub async fn list_entries(repo: &Repo, generation: Option<&str>) -> Result<Vec<Entry>> {
    let dir = match generation {
        Some(g) => layout::generation_dir(g),
        None => layout::GENERATIONS.to_owned(),
    };
    let objects = repo.list(&dir).await?;
    let marks: std::collections::HashSet<&str> =
        objects.iter().filter_map(|o| layout::parse_checksum_marker(&o.key)).collect();
    let mut out: Vec<Entry> = objects
        .iter()
        .filter_map(|o| layout::parse(&o.key, o.size))
        .map(|mut e| {
            if e.is_snapshot() {
                e.marked = marks.contains(e.key.as_str());
            }
            e
        })
        .collect();
    out.sort_by(|a, b| {
        (&a.generation, a.index, a.end(), a.is_snapshot()).cmp(&(&b.generation, b.index, b.end(), b.is_snapshot()))
    });
    Ok(out)
}

/// What retention deletes, given every entry and the oldest time that must stay
/// restorable (`cutoff`). Per generation, the newest snapshot at or before the cutoff
/// (the *floor*) and everything after it stay; older snapshots and WAL of earlier indexes
/// go. Whole generations go when a later generation already covers the cutoff. The
/// current generation keeps at least its newest snapshot.
pub fn retention_plan(entries: &[Entry], cutoff: i64, current: &str) -> Vec<Entry> {
    let mut gens: BTreeMap<&str, Vec<&Entry>> = BTreeMap::new();
    for e in entries {
        gens.entry(e.generation.as_str()).or_default().push(e);
    }
    // Generations in time order (by their first snapshot or object).
    let mut order: Vec<(&str, i64)> =
        gens.iter().map(|(g, es)| (*g, es.iter().map(|e| e.time_ms).min().unwrap_or(0))).collect();
    order.sort_by_key(|(_, t)| *t);
    // The newest generation that began at or before the cutoff holds the state at the cutoff.
    let base = order.iter().rposition(|(_, start)| *start <= cutoff).unwrap_or(0);
    let mut doomed = Vec::new();
    for (i, (g, _)) in order.iter().enumerate() {
        let es = &gens[g];
        if i < base && *g != current {
            doomed.extend(es.iter().map(|e| (*e).clone()));
            continue;
        }
        // The floor is a complete snapshot (marked); generations from before markers have none.
        let any_marked = es.iter().any(|e| e.is_snapshot() && e.marked);
        let mut snaps: Vec<&&Entry> = es.iter().filter(|e| e.is_snapshot() && (e.marked || !any_marked)).collect();
        snaps.sort_by_key(|e| (e.index, e.end()));
        let floor = snaps.iter().rev().find(|s| s.time_ms <= cutoff).or(snaps.first());
        let Some(floor) = floor else { continue };
        for e in es {
            let old =
                if e.is_snapshot() { (e.index, e.end()) < (floor.index, floor.end()) } else { e.index < floor.index };
            if old {
                doomed.push((*e).clone());
            }
        }
    }
    doomed
}

/// The replica's owner record: which database writes into it (written create-only by the
/// first replicator).
pub const OWNER_OBJECT: &str = "cloud-dump-sqlite-owner";

fn owner_text(db: &std::path::Path) -> String {
    format!("database {}\n", crate::config::real_path(db).display())
}

/// The database a replica's owner record names, if it has one.
pub async fn owner(repo: &Repo) -> Result<Option<String>> {
    match repo.get(OWNER_OBJECT).await {
        Ok(b) => Ok(String::from_utf8_lossy(&b).trim().strip_prefix("database ").map(str::to_owned)),
        Err(cloud_dump_storage::StorageError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Claims replica `repo` for database `db` (create-only), or refuses when another database
/// owns it: two replicators (two configs, two hosts) writing one location would interleave
/// their generations, and a restore would return the other database.
pub async fn claim_owner(repo: &Repo, db: &std::path::Path) -> Result<()> {
    let mine = owner_text(db);
    if owner(repo).await?.is_none() {
        match repo.put_new(OWNER_OBJECT, Bytes::from(mine.clone())).await {
            Ok(()) => {
                let mode =
                    std::fs::metadata(db).map(|m| std::os::unix::fs::MetadataExt::mode(&m) & 0o666).unwrap_or(0o600);
                repo.restrict_local(OWNER_OBJECT, mode)?;
            }
            Err(cloud_dump_storage::StorageError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    check_owner(repo, db).await
}

/// Refuses replica `repo` for database `db` when its owner record names another database.
pub async fn check_owner(repo: &Repo, db: &std::path::Path) -> Result<()> {
    let mine = crate::config::real_path(db).display().to_string();
    match owner(repo).await? {
        Some(other) if other != mine => Err(SqliteError::Config(format!(
            "replica {} belongs to database {other} (its {OWNER_OBJECT} record), not {mine}: give this database its own replica location",
            repo.url()
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{parse, snapshot_stem, wal_stem};

    fn e(key: String) -> Entry {
        parse(&key, 1).unwrap()
    }

    #[test]
    fn retention_keeps_the_window() {
        let (g1, g2) = ("aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb");
        let all = vec![
            e(snapshot_stem(g1, 0, 4152, 100, 1)),
            e(wal_stem(g1, 0, 0, 4152, 100)),
            e(wal_stem(g1, 1, 0, 8272, 150)),
            e(snapshot_stem(g1, 2, 32, 200, 1)),
            e(wal_stem(g1, 2, 0, 8272, 210)),
            e(snapshot_stem(g1, 3, 4152, 300, 1)),
            e(wal_stem(g1, 3, 0, 4152, 300)),
            e(snapshot_stem(g2, 0, 4152, 400, 1)),
            e(wal_stem(g2, 0, 0, 4152, 400)),
        ];
        // Cutoff inside g1 after its second snapshot: the first snapshot and index 0-1 go.
        let doomed: Vec<String> = retention_plan(&all, 250, g2).into_iter().map(|e| e.key).collect();
        assert_eq!(doomed, vec![all[0].key.clone(), all[1].key.clone(), all[2].key.clone()]);
        // Cutoff after g2 began: g1 goes entirely.
        let doomed = retention_plan(&all, 450, g2);
        assert_eq!(doomed.len(), 7);
        assert!(doomed.iter().all(|e| e.generation == g1));
        // Cutoff before everything: nothing goes.
        assert!(retention_plan(&all, 50, g2).is_empty());
    }
}
