//! Restore: plan from one LIST (which generation, which snapshot, which WAL objects, up to
//! which position), then download the snapshot into a temporary file beside the output,
//! replay the WAL frames onto it (salts and running checksums verified across objects),
//! run `PRAGMA integrity_check`, and only then rename it into place.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use cloud_dump_pipeline::{decoder, read_decoded, Decryption, Source};
use cloud_dump_storage::Repo;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use crate::error::{Result, SqliteError};
use crate::layout::{Entry, Kind};
use crate::replica::list_entries;
use crate::wal::{self, WalHeader, FRAME_HEADER_SIZE, HEADER_SIZE};

#[derive(Debug, Clone, Default)]
pub struct Target {
    pub generation: Option<String>,
    /// Last WAL index to apply (inclusive).
    pub index: Option<u64>,
    /// Unix milliseconds: the state as of the last sync at or before it.
    pub timestamp_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub generation: String,
    pub snapshot: PlanObject,
    pub wal: Vec<PlanObject>,
    /// Position the restored database reaches: WAL index and offset.
    pub index: u64,
    pub offset: u64,
    /// Data time of that position (unix ms).
    pub time_ms: i64,
    #[serde(skip)]
    entries: Vec<Entry>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanObject {
    pub key: String,
    pub size: u64,
    pub index: u64,
    pub time_ms: i64,
}

fn po(e: &Entry) -> PlanObject {
    PlanObject { key: e.key.clone(), size: e.size, index: e.index, time_ms: e.time_ms }
}

/// The WAL objects that carry the database from `(from_index, 0)` to `goal`, in order.
/// Where objects overlap (a PUT that landed but reported an error, retried next sync as a
/// longer range) the one reaching furthest is taken; replay skips what it already has.
/// A position nothing continues from is a gap, and an error naming it: a restore never
/// stops short of where it promised.
pub fn wal_chain<'a>(
    es: &[&'a Entry],
    from_index: u64,
    goal: (u64, u64),
) -> std::result::Result<Vec<&'a Entry>, String> {
    let wal: Vec<&Entry> = es.iter().copied().filter(|e| e.is_wal()).collect();
    let ends: Vec<&Entry> = es.iter().copied().filter(|e| matches!(e.kind, Kind::IndexEnd { .. })).collect();
    let mut out = Vec::new();
    let mut pos = (from_index, 0u64);
    while pos < goal {
        let next = wal
            .iter()
            .filter(|e| e.index == pos.0 && e.kind_start() <= pos.1 && e.end() > pos.1)
            .max_by_key(|e| e.end());
        if let Some(e) = next {
            out.push(*e);
            pos = (pos.0, e.end());
            continue;
        }
        let later_in_index =
            wal.iter().filter(|e| e.index == pos.0 && e.kind_start() > pos.1).map(|e| e.kind_start()).min();
        if let Some(at) = later_in_index {
            return Err(format!(
                "WAL index {} has nothing from offset {} to {at} (an object is missing)",
                pos.0, pos.1
            ));
        }
        let next_index_starts = wal.iter().any(|e| e.index == pos.0 + 1 && e.kind_start() == 0);
        if pos.1 > 0 && next_index_starts {
            // Replicators that write end markers (those that write sequence numbers in
            // snapshot names) write one per finished index: crossing to the next index
            // needs this index's marker at exactly this offset (else its last object is
            // missing). Generations from before markers are crossed as they are.
            if !ends.is_empty() || es.iter().any(|e| e.seq.is_some()) {
                match ends.iter().find(|m| m.index == pos.0) {
                    Some(m) if m.end() == pos.1 => {}
                    Some(m) => {
                        return Err(format!(
                            "WAL index {} ended at offset {} but the replica holds it only up to {} (its last object is missing)",
                            pos.0,
                            m.end(),
                            pos.1
                        ))
                    }
                    None => return Err(format!("WAL index {} has no end marker (its last object may be missing)", pos.0)),
                }
            }
            pos = (pos.0 + 1, 0);
            continue;
        }
        return Err(match pos.1 {
            0 => format!("WAL index {} has no object from its start", pos.0),
            o => format!(
                "nothing continues WAL index {} after offset {o} (the replica reaches index {} offset {})",
                pos.0, goal.0, goal.1
            ),
        });
    }
    Ok(out)
}

/// A generation's place in history: its sequence number (written by the replicator,
/// strictly increasing), then — for generations written before sequences — its newest
/// data time. Names never decide.
fn generation_order(es: &[&Entry]) -> (u64, i64) {
    let seq = es.iter().filter_map(|e| e.seq).max().unwrap_or(0);
    (seq, es.iter().map(|e| e.time_ms).max().unwrap_or(0))
}

/// Chooses what to restore from everything the replica holds. The position promised is
/// the newest one the target allows (latest; the last sync at or before `--timestamp`; the
/// end of `--index`); the plan reaches exactly it through a continuous WAL chain from a
/// verified snapshot, or fails naming what is missing.
pub fn plan(entries: Vec<Entry>, target: &Target) -> Result<Plan> {
    if entries.is_empty() {
        return Err(SqliteError::EmptyReplica("the replica holds no generations (nothing was replicated here)".into()));
    }
    let mut gens: BTreeMap<String, Vec<&Entry>> = BTreeMap::new();
    for e in &entries {
        gens.entry(e.generation.clone()).or_default().push(e);
    }
    let t = target.timestamp_ms.unwrap_or(i64::MAX);
    let max_index = target.index.unwrap_or(u64::MAX);
    let allowed = |e: &Entry| e.time_ms <= t && e.index <= max_index;
    let (g, es) = match &target.generation {
        Some(g) => match gens.get_key_value(g) {
            Some((g, es)) => (g.clone(), es),
            None => {
                let known: Vec<&str> = gens.keys().map(String::as_str).collect();
                return Err(SqliteError::Replica(format!(
                    "no generation {g} in the replica (it has: {})",
                    known.join(", ")
                )));
            }
        },
        None => {
            // The newest generation that had begun (holds a snapshot) by the target.
            let chosen = gens
                .iter()
                .filter(|(_, es)| es.iter().any(|e| e.is_snapshot() && allowed(e)))
                .max_by_key(|(_, es)| generation_order(es));
            match chosen {
                Some((g, es)) => (g.clone(), es),
                None => {
                    return Err(SqliteError::Replica(match target.timestamp_ms {
                        Some(ms) => {
                            format!("no snapshot at or before {} (the replica's oldest data is newer)", format_ms(ms))
                        }
                        None => "no complete snapshot in the replica".into(),
                    }))
                }
            }
        }
    };
    // The promised position: the furthest any allowed object of the generation reaches.
    let Some(goal_entry) = es.iter().copied().filter(|e| allowed(e)).max_by_key(|e| (e.index, e.end(), e.time_ms))
    else {
        return Err(SqliteError::Replica(format!("generation {g} holds nothing at or before the target")));
    };
    let goal = (goal_entry.index, goal_entry.end());
    let mut snaps: Vec<&Entry> =
        es.iter().copied().filter(|e| e.is_snapshot() && allowed(e) && (e.index, e.end()) <= goal).collect();
    snaps.sort_by_key(|e| std::cmp::Reverse((e.index, e.end())));
    if snaps.is_empty() {
        return Err(SqliteError::Replica(format!("generation {g} has no snapshot at or before the target")));
    }
    let unverified = snaps.iter().filter(|s| !s.marked).count();
    let mut first_gap = None;
    for snap in snaps.into_iter().filter(|s| s.marked) {
        // A snapshot is whole with its index's WAL replayed from the start to its offset;
        // one taken at the start of a WAL (offset ≤ header) needs none.
        let chain = if goal.0 == snap.index && goal.1 <= HEADER_SIZE as u64 {
            Ok(Vec::new())
        } else {
            wal_chain(es, snap.index, goal)
        };
        match chain {
            Ok(wal) => {
                let time = es
                    .iter()
                    .filter(|e| allowed(e) && (e.index, e.end()) <= goal)
                    .map(|e| e.time_ms)
                    .max()
                    .unwrap_or(snap.time_ms);
                return Ok(Plan {
                    generation: g.clone(),
                    snapshot: po(snap),
                    wal: wal.iter().map(|e| po(e)).collect(),
                    index: goal.0,
                    offset: goal.1,
                    time_ms: time,
                    entries: std::iter::once(snap).chain(wal.iter().copied()).cloned().collect(),
                });
            }
            Err(gap) => {
                first_gap.get_or_insert(gap);
            }
        }
    }
    Err(SqliteError::Replica(match first_gap {
        Some(gap) => format!(
            "generation {g} cannot be restored to index {} offset {} ({}): {gap}; refusing to restore an older state",
            goal.0,
            goal.1,
            format_ms(goal_entry.time_ms)
        ),
        None => format!(
            "generation {g} has {unverified} snapshot(s) at or before the target but none with a checksum marker (unfinished uploads, or written by an older cloud-dump)"
        ),
    }))
}

impl Entry {
    fn kind_start(&self) -> u64 {
        match self.kind {
            Kind::Wal { start, .. } => start,
            Kind::Snapshot { .. } | Kind::IndexEnd { .. } => 0,
        }
    }
}

pub fn format_ms(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    t.format(&f).unwrap_or_default()
}

/// Splits `entries` into those a restore may read and the unencrypted ones it must refuse:
/// in a replica configured with keys (`keys`), or holding any encrypted object, an
/// unencrypted snapshot or WAL object is never read (someone who can write to the bucket,
/// without any key, could otherwise plant a plain generation whose newer sequence wins).
/// Pure.
pub fn refuse_plain(entries: Vec<Entry>, keys: bool) -> (Vec<Entry>, Vec<Entry>) {
    if !keys && !entries.iter().any(|e| e.encrypted) {
        return (entries, Vec::new());
    }
    entries.into_iter().partition(|e| e.encrypted)
}

/// Plans a restore from a replica (one LIST). `keys`: the replica is configured with keys
/// (see [`refuse_plain`]).
pub async fn plan_from(repo: &Repo, target: &Target, keys: bool) -> Result<Plan> {
    let (entries, refused) = refuse_plain(list_entries(repo, None).await?, keys);
    if let Some(e) = refused.first() {
        tracing::warn!(
            refused = refused.len(),
            example = %e.key,
            "unencrypted objects in an encrypted replica are refused (planted by someone without the key?)"
        );
    }
    if entries.is_empty() {
        // "Empty" only when nothing at all is stored under generations/: objects this
        // version does not recognise are not "nothing was replicated".
        let stored = repo.list(crate::layout::GENERATIONS).await?.len();
        if stored > 0 {
            return Err(SqliteError::Replica(format!(
                "the replica holds {stored} objects under {}/ but none this cloud-dump recognises (written by a newer version?)",
                crate::layout::GENERATIONS
            )));
        }
    }
    plan(entries, target)
}

#[derive(Debug, Clone, Serialize)]
pub struct Restored {
    pub path: PathBuf,
    pub bytes: u64,
    pub frames: u64,
}

/// Replays WAL frames onto the file being restored.
struct Replay {
    file: File,
    header: Option<WalHeader>,
    index: u64,
    /// WAL offset replayed so far in `index`.
    offset: u64,
    checksum: (u32, u32),
    db_pages: Option<u32>,
    frames: u64,
}

impl Replay {
    /// Applies `data` (WAL bytes `[start, ..)` of `index`) up to `limit` (a commit boundary).
    fn apply(&mut self, key: &str, index: u64, start: u64, data: &[u8], limit: u64) -> Result<()> {
        let bad = |why: String| SqliteError::Replica(format!("{key}: {why}"));
        let mut frames = data;
        if start == 0 {
            let h = wal::parse_header(data).map_err(|e| bad(e.to_string()))?;
            self.header = Some(h);
            self.index = index;
            self.checksum = h.checksum;
            frames = &data[HEADER_SIZE..];
        } else if self.header.is_none() || self.index != index {
            return Err(bad("does not follow the previous WAL object".into()));
        }
        let h = self.header.expect("header");
        let from = start.max(HEADER_SIZE as u64);
        let want = (limit.saturating_sub(from) as usize).min(frames.len());
        let s = wal::scan(&h, &frames[..want], self.checksum);
        if s.len != want {
            return Err(bad(format!("WAL frames fail their checksum at offset {}", from + s.len as u64)));
        }
        self.offset = from + want as u64;
        let fsz = FRAME_HEADER_SIZE + h.page_size as usize;
        for frame in frames[..want].chunks_exact(fsz) {
            let fh = wal::parse_frame_header(frame);
            let at = (fh.page_no as u64 - 1) * h.page_size as u64;
            self.file.write_all_at(&frame[FRAME_HEADER_SIZE..], at).map_err(|e| SqliteError::io(key, e))?;
            if fh.commit_size != 0 {
                self.db_pages = Some(fh.commit_size);
            }
            self.frames += 1;
        }
        self.checksum = s.checksum;
        Ok(())
    }
}

fn tmp_path(out: &Path) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    out.with_file_name(format!(".{name}.cloud-dump-restore"))
}

/// Runs `plan` into `out`, which must not exist.
pub async fn execute(repo: &Repo, plan: &Plan, dec: Decryption, out: &Path, parallelism: usize) -> Result<Restored> {
    let o = out.display().to_string();
    // symlink_metadata: a dangling link counts (a rename would replace the link itself).
    if let Ok(m) = std::fs::symlink_metadata(out) {
        return Err(SqliteError::db(
            &o,
            if m.file_type().is_symlink() {
                "is a symbolic link; restore never writes through or over links (give the link's target as -o)"
            } else {
                "already exists; restore refuses to overwrite (remove it or choose another -o)"
            },
        ));
    }
    // A -wal/-shm/-journal left beside the output belongs to an older database: SQLite
    // would replay it over the restored file on the next open.
    let leftovers = |out: &Path| -> Result<()> {
        for suffix in ["-wal", "-shm", "-journal"] {
            let side = PathBuf::from(format!("{o}{suffix}"));
            if std::fs::symlink_metadata(&side).is_ok() {
                return Err(SqliteError::db(
                    out.display().to_string(),
                    format!(
                        "{} exists beside it (left by an earlier database); SQLite would apply it to the restored file: remove it first",
                        side.display()
                    ),
                ));
            }
        }
        Ok(())
    };
    leftovers(out)?;
    let tmp = tmp_path(out);
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", tmp.display()));
    }
    let result = restore_into(repo, plan, dec, &tmp, parallelism).await;
    let finish = result.and_then(|r| {
        if std::fs::symlink_metadata(out).is_ok() {
            return Err(SqliteError::db(&o, "appeared while restoring; left as it is"));
        }
        leftovers(out)?;
        std::fs::rename(&tmp, out).map_err(|e| SqliteError::io(&o, e))?;
        if let Some(dir) = out.parent() {
            let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
            File::open(dir).and_then(|f| f.sync_all()).map_err(|e| SqliteError::io(dir.display(), e))?;
        }
        Ok(Restored { path: out.to_owned(), ..r })
    });
    if finish.is_err() {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", tmp.display()));
        }
    }
    finish
}

async fn restore_into(repo: &Repo, plan: &Plan, dec: Decryption, tmp: &Path, parallelism: usize) -> Result<Restored> {
    let t = tmp.display().to_string();
    // Owner-only: the restored database is as private as a database should be by default.
    let file =
        std::os::unix::fs::OpenOptionsExt::mode(OpenOptions::new().read(true).write(true).create_new(true), 0o600)
            .open(tmp)
            .map_err(|e| SqliteError::db(&t, format!("cannot create the restore file: {e}")))?;
    let snap = &plan.entries[0];
    // Every downloaded byte is checked: the snapshot against its checksum marker, WAL
    // objects by SQLite's running frame checksums.
    let marker = crate::layout::checksum_marker(&snap.key);
    let text = repo.get(&marker).await?;
    let Some(sha) = crate::layout::parse_checksum(&String::from_utf8_lossy(&text)) else {
        return Err(SqliteError::Replica(format!(
            "{marker}: not a checksum marker; refusing an unverifiable snapshot"
        )));
    };
    let src = Source {
        key: snap.key.clone(),
        size: snap.size,
        sha256: Some(sha),
        compression: snap.compression,
        encrypted: snap.encrypted,
    };
    let mut w = file.try_clone().map_err(|e| SqliteError::io(&t, e))?;
    let key = snap.key.clone();
    read_decoded(repo, &src, parallelism.max(1), dec.clone(), move |r| {
        std::io::copy(r, &mut w).map_err(|e| cloud_dump_pipeline::PipelineError::io(&key, e))?;
        Ok(())
    })
    .await?;
    let mut replay = Replay { file, header: None, index: 0, offset: 0, checksum: (0, 0), db_pages: None, frames: 0 };
    let limit = |e: &Entry| if e.index == plan.index { plan.offset } else { u64::MAX };
    // Fetch and decode up to `parallelism` WAL objects at once; apply them in order.
    let mut fetched = futures::stream::iter(plan.entries[1..].iter().cloned())
        .map(|e| {
            let repo = repo.clone();
            let dec = dec.clone();
            async move {
                let raw = repo.get(&e.key).await?;
                let key = e.key.clone();
                let plain = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
                    let mut r = decoder(&raw[..], e.compression, e.encrypted, &dec, &key)?;
                    let mut out = Vec::new();
                    r.read_to_end(&mut out).map_err(|err| SqliteError::io(&key, err))?;
                    Ok(out)
                })
                .await
                .map_err(|err| SqliteError::Replica(format!("decoder: {err}")))??;
                Ok::<_, SqliteError>((e, plain))
            }
        })
        .buffered(parallelism.max(1));
    while let Some((e, data)) = fetched.try_next().await? {
        let Kind::Wal { start, end } = e.kind else { continue };
        if data.len() as u64 != end - start {
            return Err(SqliteError::Replica(format!(
                "{}: holds {} bytes, its name says {}",
                e.key,
                data.len(),
                end - start
            )));
        }
        // An object overlapping what was replayed (a retried upload) continues from there.
        let skip = if replay.header.is_some() && e.index == replay.index && start < replay.offset {
            replay.offset - start
        } else {
            0
        };
        if skip >= data.len() as u64 {
            continue;
        }
        replay.apply(&e.key, e.index, start + skip, &data[skip as usize..], limit(&e))?;
        if (e.index, end) >= (plan.index, plan.offset) {
            break;
        }
    }
    let mut file = replay.file;
    if let Some(pages) = replay.db_pages {
        let page = replay.header.map(|h| h.page_size as u64).unwrap_or(4096);
        file.set_len(pages as u64 * page).map_err(|e| SqliteError::io(&t, e))?;
    }
    file.sync_all().map_err(|e| SqliteError::io(&t, e))?;
    let bytes = file.seek(SeekFrom::End(0)).map_err(|e| SqliteError::io(&t, e))?;
    file.flush().map_err(|e| SqliteError::io(&t, e))?;
    drop(file);
    integrity_check(tmp)?;
    Ok(Restored { path: tmp.to_owned(), bytes, frames: replay.frames })
}

/// `PRAGMA integrity_check` on the restored file; anything but "ok" is an error.
pub fn integrity_check(path: &Path) -> Result<()> {
    let p = path.display().to_string();
    let c = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)
        .map_err(|e| SqliteError::sql(&p, e))?;
    let rows: Vec<String> = {
        let mut st = c.prepare("PRAGMA integrity_check").map_err(|e| SqliteError::sql(&p, e))?;
        let r = st.query_map([], |r| r.get::<_, String>(0)).map_err(|e| SqliteError::sql(&p, e))?;
        r.collect::<std::result::Result<_, _>>().map_err(|e| SqliteError::sql(&p, e))?
    };
    drop(c);
    if rows != ["ok"] {
        let shown: Vec<&str> = rows.iter().take(3).map(String::as_str).collect();
        return Err(SqliteError::Replica(format!(
            "the restored database fails PRAGMA integrity_check: {}",
            shown.join("; ")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{parse, snapshot_stem, wal_stem};
    use rand::{Rng, SeedableRng};

    const G: &str = "00000000000000aa";
    const G2: &str = "00000000000000bb";

    fn snap(g: &str, index: u64, offset: u64, t: i64, seq: u64) -> Entry {
        let mut e = parse(&snapshot_stem(g, index, offset, t, seq), 10).unwrap();
        e.marked = true;
        e
    }

    fn wal(g: &str, index: u64, start: u64, end: u64, t: i64) -> Entry {
        parse(&wal_stem(g, index, start, end, t), end - start).unwrap()
    }

    /// A replica as the replicator writes it: a snapshot, then WAL objects in order over a
    /// few WAL restarts, one object per sync, each a little later in time.
    fn history(rng: &mut rand::rngs::StdRng) -> Vec<Entry> {
        let mut out = vec![snap(G, 0, 32, 1000, 5)];
        let mut t = 1000;
        let indexes = rng.gen_range(1..4u64);
        for index in 0..indexes {
            let mut off = 0;
            for _ in 0..rng.gen_range(1..8) {
                let end = off.max(32) + rng.gen_range(1..5) * 4120;
                t += rng.gen_range(1..1000);
                out.push(wal(G, index, off, end, t));
                off = end;
            }
            if index + 1 < indexes {
                out.push(parse(&crate::layout::index_end_key(G, index, off, t), 0).unwrap());
                // Sometimes a snapshot at the start of the next index (as after a restart).
                if rng.gen_bool(0.3) {
                    t += 1;
                    out.push(snap(G, index + 1, 32, t, 5));
                }
            }
        }
        out
    }

    /// The chain-fault drill: objects deleted, duplicated, overlapped by a longer retry and
    /// listed in any order. Every plan reaches exactly the position the target promises
    /// (the furthest allowed object), or fails naming a gap; an intact replica always plans.
    #[test]
    fn chain_fault_drill() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(20261123);
        let (mut exact, mut refused) = (0, 0);
        for round in 0..400 {
            let mut es = history(&mut rng);
            // Markers sit after their index's objects: faults pick among WAL objects only.
            let wal_idx: Vec<usize> = (1..es.len()).filter(|i| es[*i].is_wal()).collect();
            let wal_count = wal_idx.len();
            let fault = round % 5;
            match fault {
                0 => {} // intact
                1 => {
                    // delete one WAL object (the last of an index too)
                    let i = wal_idx[rng.gen_range(0..wal_count)];
                    es.remove(i);
                }
                2 => {
                    // duplicate one object (the same upload twice)
                    let i = wal_idx[rng.gen_range(0..wal_count)];
                    es.push(es[i].clone());
                }
                3 => {
                    // a retried upload: same start, longer range, later time; the short one stays
                    let i = wal_idx[rng.gen_range(0..wal_count)];
                    if let Kind::Wal { start, end } = es[i].kind {
                        let closed =
                            es.iter().any(|m| matches!(m.kind, Kind::IndexEnd { .. }) && m.index == es[i].index);
                        let longer = (i + 1..es.len())
                            .find(|j| es[*j].index == es[i].index && es[*j].is_wal())
                            .map(|j| es[j].end())
                            .or((!closed).then_some(end + 4120));
                        if let Some(longer) = longer {
                            let e = wal(G, es[i].index, start, longer, es[i].time_ms + 1);
                            es.push(e);
                        }
                    }
                }
                _ => {
                    // an index's end marker lost, or saying another offset: crossing it is
                    // refused, never skipped blindly
                    if let Some(i) = (1..es.len()).find(|i| !es[*i].is_wal() && !es[*i].is_snapshot()) {
                        if round % 2 == 0 {
                            es.remove(i);
                        } else {
                            let m = es[i].clone();
                            es[i] =
                                parse(&crate::layout::index_end_key(G, m.index, m.end() + 4120, m.time_ms), 0).unwrap();
                        }
                    }
                }
            }
            // Any listing order.
            for i in (1..es.len()).rev() {
                let j = rng.gen_range(0..=i);
                es.swap(i, j);
            }
            let times: Vec<i64> = es.iter().map(|e| e.time_ms).collect();
            let target = match round % 4 {
                0 => Target::default(),
                1 => Target { timestamp_ms: Some(times[rng.gen_range(0..times.len())]), ..Default::default() },
                2 => Target { timestamp_ms: Some(rng.gen_range(900..6000)), ..Default::default() },
                _ => Target { index: Some(rng.gen_range(0..3)), ..Default::default() },
            };
            let t = target.timestamp_ms.unwrap_or(i64::MAX);
            let max_index = target.index.unwrap_or(u64::MAX);
            let promised =
                es.iter().filter(|e| e.time_ms <= t && e.index <= max_index).map(|e| (e.index, e.end())).max();
            match plan(es.clone(), &target) {
                Ok(p) => {
                    assert_eq!(Some((p.index, p.offset)), promised, "round {round}: planned short of the target");
                    // The chain it hands to replay is continuous.
                    let mut pos = (p.snapshot.index, 0u64);
                    let mut lost_tail = false;
                    for w in &p.entries[1..] {
                        let Kind::Wal { start, end } = w.kind else { panic!() };
                        if w.index == pos.0 + 1 && start == 0 {
                            // Crossing an index: the original history ended that index here.
                            lost_tail |= !es
                                .iter()
                                .any(|m| matches!(m.kind, Kind::IndexEnd { end } if m.index == pos.0 && end == pos.1));
                            pos = (w.index, 0);
                        }
                        assert!(w.index == pos.0 && start <= pos.1 && end > pos.1, "round {round}: broken chain");
                        pos.1 = end;
                    }
                    assert!(pos >= (p.index, p.offset) || p.entries.len() == 1, "round {round}");
                    assert!(!lost_tail, "round {round}: crossed an index whose end is not proven");
                    exact += 1;
                }
                Err(e) => {
                    assert!(
                        fault == 1 || fault == 4 || promised.is_none(),
                        "round {round}: intact replica refused: {e}"
                    );
                    assert!(promised.is_none() || e.to_string().contains("refusing"), "{e}");
                    refused += 1;
                }
            }
        }
        assert!(exact > 200 && refused > 20, "{exact} exact, {refused} refused");
    }

    #[test]
    fn newest_generation_by_sequence_never_by_name_or_tied_time() {
        // The old generation's last upload carries the same time as the new snapshot.
        let old = vec![snap(G2, 0, 32, 100, 7), wal(G2, 0, 0, 4152, 500)];
        let new = vec![snap(G, 0, 32, 500, 8), wal(G, 0, 0, 4152, 500)];
        let all: Vec<Entry> = old.into_iter().chain(new).collect();
        assert_eq!(plan(all.clone(), &Target::default()).unwrap().generation, G);
        assert_eq!(plan(all.clone(), &Target { timestamp_ms: Some(500), ..Default::default() }).unwrap().generation, G);
        assert_eq!(plan(all, &Target { timestamp_ms: Some(499), ..Default::default() }).unwrap().generation, G2);
    }

    #[test]
    fn snapshots_without_a_checksum_marker_are_not_used() {
        let mut s = snap(G, 0, 32, 100, 1);
        s.marked = false;
        let err = plan(vec![s, wal(G, 0, 0, 4152, 200)], &Target::default()).unwrap_err().to_string();
        assert!(err.contains("checksum marker"), "{err}");
    }
}
