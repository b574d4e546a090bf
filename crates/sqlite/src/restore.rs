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

/// The WAL objects of `es` from the start of `from_index`, contiguous, in order. Stops at
/// the first gap.
fn contiguous_wal<'a>(es: &[&'a Entry], from_index: u64) -> Vec<&'a Entry> {
    let mut wal: Vec<&Entry> = es.iter().copied().filter(|e| !e.is_snapshot() && e.index >= from_index).collect();
    wal.sort_by_key(|e| (e.index, e.end()));
    let mut out = Vec::new();
    let (mut index, mut offset) = (from_index, 0u64);
    for e in wal {
        let Kind::Wal { start, end } = e.kind else { continue };
        if e.index == index && start == offset {
            offset = end;
            out.push(e);
        } else if e.index == index + 1 && start == 0 && offset > 0 {
            index += 1;
            offset = end;
            out.push(e);
        } else if e.index == index && end <= offset {
            continue; // a duplicate upload of a range we have
        } else {
            break;
        }
    }
    out
}

/// Chooses what to restore from everything the replica holds.
pub fn plan(entries: Vec<Entry>, target: &Target) -> Result<Plan> {
    if entries.is_empty() {
        return Err(SqliteError::Replica("the replica holds no generations (nothing was replicated here)".into()));
    }
    let mut gens: BTreeMap<String, Vec<&Entry>> = BTreeMap::new();
    for e in &entries {
        gens.entry(e.generation.clone()).or_default().push(e);
    }
    if let Some(g) = &target.generation {
        if !gens.contains_key(g) {
            let known: Vec<&str> = gens.keys().map(String::as_str).collect();
            return Err(SqliteError::Replica(format!(
                "no generation {g} in the replica (it has: {})",
                known.join(", ")
            )));
        }
    }
    let t = target.timestamp_ms.unwrap_or(i64::MAX);
    let max_index = target.index.unwrap_or(u64::MAX);
    let mut best: Option<Plan> = None;
    for (g, es) in &gens {
        if target.generation.as_ref().is_some_and(|want| want != g) {
            continue;
        }
        let mut snaps: Vec<&Entry> =
            es.iter().copied().filter(|e| e.is_snapshot() && e.time_ms <= t && e.index <= max_index).collect();
        snaps.sort_by_key(|e| std::cmp::Reverse((e.index, e.end())));
        for snap in snaps {
            let wal = contiguous_wal(es, snap.index);
            // The snapshot is whole only with its index's WAL replayed up to its offset.
            let covers = snap.end() <= HEADER_SIZE as u64
                || wal.iter().any(|w| w.index > snap.index || (w.index == snap.index && w.end() >= snap.end()));
            if !covers {
                continue;
            }
            let mut chosen = Vec::new();
            let (mut index, mut offset, mut time) = (snap.index, snap.end(), snap.time_ms);
            for w in wal {
                let needed = w.index == snap.index && w.kind_start() < snap.end();
                if !needed && (w.time_ms > t || w.index > max_index) {
                    break;
                }
                chosen.push(w);
                if (w.index, w.end()) > (index, offset) {
                    if w.time_ms <= t && w.index <= max_index {
                        (index, offset, time) = (w.index, w.end(), w.time_ms.max(time));
                    } else {
                        break;
                    }
                }
            }
            let plan = Plan {
                generation: g.clone(),
                snapshot: po(snap),
                wal: chosen.iter().map(|e| po(e)).collect(),
                index,
                offset,
                time_ms: time,
                entries: std::iter::once(snap).chain(chosen.iter().copied()).cloned().collect(),
            };
            if best.as_ref().is_none_or(|b| plan.time_ms > b.time_ms) {
                best = Some(plan);
            }
            break;
        }
    }
    best.ok_or_else(|| {
        SqliteError::Replica(match target.timestamp_ms {
            Some(ms) => format!("no snapshot at or before {} (the replica's oldest data is newer)", format_ms(ms)),
            None => "no complete snapshot in the replica".into(),
        })
    })
}

impl Entry {
    fn kind_start(&self) -> u64 {
        match self.kind {
            Kind::Wal { start, .. } => start,
            Kind::Snapshot { .. } => 0,
        }
    }
}

pub fn format_ms(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    t.format(&f).unwrap_or_default()
}

/// Plans a restore from a replica (one LIST).
pub async fn plan_from(repo: &Repo, target: &Target) -> Result<Plan> {
    plan(list_entries(repo, None).await?, target)
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
    if out.exists() {
        return Err(SqliteError::db(
            &o,
            "already exists; restore refuses to overwrite (remove it or choose another -o)",
        ));
    }
    let tmp = tmp_path(out);
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", tmp.display()));
    }
    let result = restore_into(repo, plan, dec, &tmp, parallelism).await;
    let finish = result.and_then(|r| {
        if out.exists() {
            return Err(SqliteError::db(&o, "appeared while restoring; left as it is"));
        }
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
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(|e| SqliteError::db(&t, format!("cannot create the restore file: {e}")))?;
    let snap = &plan.entries[0];
    let src = Source {
        key: snap.key.clone(),
        size: snap.size,
        sha256: None,
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
    let mut replay = Replay { file, header: None, index: 0, checksum: (0, 0), db_pages: None, frames: 0 };
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
        replay.apply(&e.key, e.index, start, &data, limit(&e))?;
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
