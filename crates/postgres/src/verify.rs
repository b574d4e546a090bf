//! `verify`: proves what is stored still restores, without writing anything to disk.
//!
//! Per backup: every object is streamed and its size and SHA-256 compared with the
//! manifest. With the keys (or for an unencrypted backup) the archives are also decrypted,
//! decompressed and walked, and every file is checked against PostgreSQL's own
//! `backup_manifest` (sizes and checksums, as pg_verifybackup does), whose own checksum is
//! checked first. WAL: each backup's WAL must run without a hole from its start to the
//! newest segment of its timeline, and each archived segment decodes to the size and
//! SHA-256 its record holds. What cannot be checked (no keys) is said, not skipped
//! silently. Memory is bounded by the stream buffers; objects are verified in parallel.

use std::collections::BTreeMap;
use std::io::Read;

use cloud_dump_pipeline::{read_decoded, Compression, Decryption, PipelineError, Source};
use cloud_dump_storage::Repo;

use crate::layout::Layout;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use sha2::Digest;

use crate::error::{Error, Result};
use crate::manifest::{BackupManifest, ObjectKind};
use crate::repository::PgRepository;
use crate::wal_archive::{WalArchive, WalKeys};

/// What to verify and with which keys.
pub struct VerifyRequest {
    /// Backups by name; `None`: all of them.
    pub names: Option<Vec<String>>,
    pub decryption: Decryption,
    /// Also check the WAL archive.
    pub wal: bool,
    pub wal_keys: WalKeys,
    pub parallel: usize,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct BackupReport {
    pub name: String,
    pub objects: usize,
    pub stored_bytes: u64,
    /// Files checked against backup_manifest (None: not checked).
    pub files_checked: Option<u64>,
    pub problems: Vec<String>,
    /// What could not be checked, and why.
    pub not_checked: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct WalReport {
    pub segments_checked: u64,
    pub bytes: u64,
    pub problems: Vec<String>,
    pub not_checked: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct VerifyReport {
    pub repository: String,
    pub backups: Vec<BackupReport>,
    pub wal: Option<WalReport>,
    pub seconds: f64,
}

impl VerifyReport {
    /// Every problem found, one line each.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for b in &self.backups {
            out.extend(b.problems.iter().map(|p| format!("backup {}: {p}", b.name)));
        }
        if let Some(w) = &self.wal {
            out.extend(w.problems.iter().map(|p| format!("WAL: {p}")));
        }
        out
    }
}

/// One file of PostgreSQL's backup_manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestFile {
    pub size: u64,
    pub algorithm: String,
    pub checksum: String,
}

/// Parses `backup_manifest` and checks its own checksum (SHA-256 of everything before the
/// `"Manifest-Checksum"` line). Returns path → file.
pub fn parse_backup_manifest(bytes: &[u8]) -> std::result::Result<BTreeMap<String, ManifestFile>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_owned())?;
    let at = text.find("\"Manifest-Checksum\"").ok_or("no Manifest-Checksum")?;
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let want = v["Manifest-Checksum"].as_str().ok_or("no Manifest-Checksum")?.to_ascii_lowercase();
    let got = hex::encode(sha2::Sha256::digest(&bytes[..at]));
    if got != want {
        return Err(format!("its own checksum does not match (SHA-256 {got}, recorded {want})"));
    }
    let mut files = BTreeMap::new();
    for f in v["Files"].as_array().ok_or("no Files")? {
        let path = match (f["Path"].as_str(), f["Encoded-Path"].as_str()) {
            (Some(p), _) => p.to_owned(),
            (None, Some(h)) => String::from_utf8_lossy(&hex::decode(h).map_err(|_| "bad Encoded-Path")?).into_owned(),
            _ => return Err("a file without a path".into()),
        };
        let size = f["Size"].as_u64().ok_or("a file without a size")?;
        let algorithm = f["Checksum-Algorithm"].as_str().unwrap_or("NONE").to_ascii_uppercase();
        let checksum = f["Checksum"].as_str().unwrap_or("").to_ascii_lowercase();
        files.insert(path, ManifestFile { size, algorithm, checksum });
    }
    Ok(files)
}

/// A running checksum of one of the algorithms backup_manifest uses.
enum FileSum {
    None,
    Crc32c(u32),
    Sha224(sha2::Sha224),
    Sha256(sha2::Sha256),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
}

impl FileSum {
    fn new(algorithm: &str) -> Option<FileSum> {
        Some(match algorithm {
            "NONE" => FileSum::None,
            "CRC32C" => FileSum::Crc32c(0),
            "SHA224" => FileSum::Sha224(Default::default()),
            "SHA256" => FileSum::Sha256(Default::default()),
            "SHA384" => FileSum::Sha384(Default::default()),
            "SHA512" => FileSum::Sha512(Default::default()),
            _ => return None,
        })
    }
    fn update(&mut self, b: &[u8]) {
        match self {
            FileSum::None => {}
            FileSum::Crc32c(c) => *c = crc32c::crc32c_append(*c, b),
            FileSum::Sha224(h) => h.update(b),
            FileSum::Sha256(h) => h.update(b),
            FileSum::Sha384(h) => h.update(b),
            FileSum::Sha512(h) => h.update(b),
        }
    }
    /// As backup_manifest writes it: CRC32C's four bytes in memory (little-endian) order.
    fn hex(self) -> String {
        match self {
            FileSum::None => String::new(),
            FileSum::Crc32c(c) => hex::encode(c.to_le_bytes()),
            FileSum::Sha224(h) => hex::encode(h.finalize()),
            FileSum::Sha256(h) => hex::encode(h.finalize()),
            FileSum::Sha384(h) => hex::encode(h.finalize()),
            FileSum::Sha512(h) => hex::encode(h.finalize()),
        }
    }
}

/// Walks one tar archive, checking each regular file against `files`; returns the paths
/// seen (with `prefix`) and the problems.
fn check_archive(
    r: &mut dyn Read,
    prefix: &str,
    files: &BTreeMap<String, ManifestFile>,
) -> std::io::Result<(Vec<String>, Vec<String>)> {
    let mut seen = Vec::new();
    let mut problems = Vec::new();
    let mut archive = tar::Archive::new(r);
    let mut buf = vec![0u8; 256 << 10];
    for entry in archive.entries()? {
        let mut entry = entry?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let rel = entry.path()?.to_string_lossy().trim_start_matches("./").to_owned();
        let path = format!("{prefix}{rel}");
        let Some(want) = files.get(&path) else {
            // WAL shipped inside the archive is not in backup_manifest (WAL-Ranges cover it).
            if path.starts_with("pg_wal/") {
                continue;
            }
            problems.push(format!("{path} is in the archive but not in backup_manifest"));
            continue;
        };
        let Some(mut sum) = FileSum::new(&want.algorithm) else {
            problems.push(format!("{path}: unknown checksum algorithm {}", want.algorithm));
            continue;
        };
        let mut size = 0u64;
        loop {
            let n = entry.read(&mut buf)?;
            if n == 0 {
                break;
            }
            size += n as u64;
            sum.update(&buf[..n]);
        }
        if size != want.size {
            problems.push(format!("{path}: {size} bytes, backup_manifest says {}", want.size));
        } else if want.algorithm != "NONE" && sum.hex() != want.checksum {
            problems.push(format!("{path}: {} checksum differs from backup_manifest", want.algorithm));
        }
        seen.push(path);
    }
    Ok((seen, problems))
}

fn compression_of(m: &BackupManifest) -> Result<Compression> {
    m.compression.parse().map_err(|e: String| Error::BadManifest { key: m.name.clone(), reason: e })
}

/// Stream the stored bytes only: size and SHA-256 against the manifest.
async fn check_stored(repo: &Repo, key: &str, size: u64, sha: &str, parallel: usize) -> Option<String> {
    let stream = match repo.read(key, size, parallel).await {
        Ok(s) => s,
        Err(e) => return Some(e.to_string()),
    };
    let mut hasher = sha2::Sha256::new();
    let mut got = 0u64;
    let r: std::result::Result<(), cloud_dump_storage::StorageError> = stream
        .try_for_each(|b| {
            got += b.len() as u64;
            hasher.update(&b);
            futures::future::ready(Ok(()))
        })
        .await;
    if let Err(e) = r {
        return Some(e.to_string());
    }
    let digest = hex::encode(hasher.finalize());
    if got != size {
        Some(format!("{key}: {got} bytes stored, the manifest says {size}"))
    } else if digest != sha {
        Some(format!("{key}: SHA-256 {digest}, the manifest says {sha}"))
    } else {
        None
    }
}

async fn verify_backup(repo: &Repo, layout: &Layout, m: &BackupManifest, req: &VerifyRequest) -> BackupReport {
    let dir = layout.backup_dir(&m.name);
    let mut rep = BackupReport {
        name: m.name.clone(),
        objects: m.objects.len(),
        stored_bytes: m.stored_size(),
        ..Default::default()
    };
    let can_decode = !m.encrypted || !matches!(req.decryption, Decryption::None);
    let compression = match compression_of(m) {
        Ok(c) => c,
        Err(e) => {
            rep.problems.push(e.to_string());
            return rep;
        }
    };
    if !can_decode {
        rep.not_checked.push("files against backup_manifest: the backup is encrypted and no key was given".into());
        let checks = m.objects.iter().map(|o| {
            let key = format!("{dir}{}", o.key);
            async move { check_stored(repo, &key, o.size, &o.sha256, req.parallel).await }
        });
        let found: Vec<Option<String>> =
            futures::stream::iter(checks).buffer_unordered(req.parallel.max(1)).collect().await;
        rep.problems.extend(found.into_iter().flatten());
        return rep;
    }
    let dec = match crate::restore::backup_decryption(m, &req.decryption, &dir).await {
        Ok(d) => d,
        Err(e) => {
            rep.problems.push(format!("cannot open the backup's key: {e}"));
            return rep;
        }
    };
    let source = |o: &crate::manifest::ObjectEntry| Source {
        key: format!("{dir}{}", o.key),
        size: o.size,
        sha256: Some(o.sha256.clone()),
        compression,
        encrypted: m.encrypted,
    };
    // PostgreSQL's backup_manifest first: it says what every archive must hold.
    let mut files: Option<BTreeMap<String, ManifestFile>> = None;
    if let Some(o) = m.objects.iter().find(|o| o.kind == ObjectKind::BackupManifest) {
        let got = read_decoded(repo, &source(o), req.parallel, dec.clone(), |r| {
            let mut v = Vec::new();
            r.read_to_end(&mut v).map_err(|e| PipelineError::io("backup_manifest", e))?;
            Ok(v)
        })
        .await;
        match got.map_err(|e| e.to_string()).and_then(|b| parse_backup_manifest(&b)) {
            Ok(f) => files = Some(f),
            Err(e) => rep.problems.push(format!("backup_manifest: {e}")),
        }
    } else if m.pg_version_num >= 130000 {
        // PostgreSQL 13+ always sends one: its absence is damage, not an old server.
        rep.problems.push("backup_manifest is missing (PostgreSQL 13 and later always send one)".into());
    } else {
        rep.not_checked.push("files: no backup_manifest (PostgreSQL before 13)".into());
    }
    let archives: Vec<_> = m.objects.iter().filter(|o| o.kind != ObjectKind::BackupManifest).collect();
    let jobs = archives.iter().map(|o| {
        let src = source(o);
        let prefix = match o.tablespace_oid {
            Some(oid) => format!("pg_tblspc/{oid}/"),
            None => String::new(),
        };
        let check_files = files.is_some();
        let files = files.clone().unwrap_or_default();
        let dec = dec.clone();
        async move {
            read_decoded(repo, &src, req.parallel, dec, move |r| {
                if check_files {
                    check_archive(r, &prefix, &files).map_err(|e| PipelineError::io(&prefix, e))
                } else {
                    std::io::copy(r, &mut std::io::sink()).map_err(|e| PipelineError::io(&prefix, e))?;
                    Ok((Vec::new(), Vec::new()))
                }
            })
            .await
        }
    });
    let results: Vec<_> = futures::stream::iter(jobs).buffer_unordered(req.parallel.max(1)).collect().await;
    let mut seen = Vec::new();
    for r in results {
        match r {
            Ok((s, p)) => {
                seen.extend(s);
                rep.problems.extend(p);
            }
            Err(e) => rep.problems.push(e.to_string()),
        }
    }
    if let Some(f) = &files {
        seen.sort();
        for path in f.keys() {
            if seen.binary_search(path).is_err() {
                rep.problems.push(format!("{path} is in backup_manifest but in no archive"));
            }
        }
        rep.files_checked = Some(seen.len() as u64);
    }
    rep
}

/// What the timeline graph says of the WAL the backups need: the path a restore to latest
/// follows from each backup (to each live branch it lies on), history files included.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalPaths {
    pub problems: Vec<String>,
    pub not_checked: Vec<String>,
    /// Every WAL file on those paths (to decode and check).
    pub files: Vec<String>,
}

/// A backup younger than this whose own WAL is not archived yet is archiving lag, not a hole.
const FRESH_BACKUP_US: i64 = 3600 * 1_000_000;

/// One backup for [`wal_paths`]: name, where it lies, its age (µs), the segments it
/// carries itself (its WAL included).
pub type PathBackup = (String, crate::timeline::BackupPoint, i64, Vec<String>);

/// The WAL continuity check on the graph (pure).
pub fn wal_paths(graph: &crate::timeline::TimelineGraph, backups: &[PathBackup]) -> WalPaths {
    use crate::timeline::Until;
    let mut out = WalPaths::default();
    for e in graph.problems() {
        out.problems.push(format!("{e}: recovery to the timelines after it cannot be told or stops there"));
    }
    let heads = graph.heads();
    if heads.len() > 1 {
        out.not_checked.push(format!(
            "\"latest\" is ambiguous ({}): restores must name --recovery-target-timeline; each branch is checked",
            heads.iter().map(|h| h.describe()).collect::<Vec<_>>().join(", ")
        ));
    }
    let mut files = std::collections::BTreeSet::new();
    for (name, b, age_us, own) in backups {
        let mut targets: Vec<u32> = heads.iter().map(|h| h.tli).filter(|t| graph.on_ancestry(*t, b)).collect();
        if targets.is_empty() {
            // On a branch no live timeline continues: to the end of its own timeline.
            out.not_checked.push(format!(
                "backup {name} lies on timeline {}'s branch, which no live timeline continues: checked to that branch's end",
                b.tli
            ));
            targets.push(b.tli);
        }
        for t in targets {
            match graph.needed(b, t, Until::Latest) {
                Err(e) => out.problems.push(format!("backup {name}: {e}")),
                Ok(None) => {}
                Ok(Some(mut n)) => {
                    n.missing.retain(|m| !own.contains(m));
                    files.extend(n.segments.iter().filter(|s| !n.missing.contains(s)).cloned());
                    files.extend(n.histories.iter().filter(|s| !n.missing.contains(s)).cloned());
                    let own_end =
                        crate::timeline::segment_name(b.tli, b.end.0 / graph.segment_size(), graph.segment_size());
                    if n.missing.is_empty() {
                        continue;
                    }
                    // Within an hour of the backup's end, WAL not archived yet at the end of
                    // the path (nothing after it is) is archiving lag, not a hole.
                    let at = |x: &str| n.segments.iter().position(|s| s == x);
                    let last_present = n.last.as_deref().and_then(at);
                    let lag = *age_us < FRESH_BACKUP_US
                        && n.missing.iter().all(|m| {
                            at(m).is_some_and(|i| {
                                at(&own_end).is_some_and(|o| i >= o) && last_present.is_none_or(|l| i > l)
                            })
                        });
                    let first = &n.missing[0];
                    let what = if first.ends_with(".history") { "history file" } else { "segment" };
                    let msg = format!(
                        "backup {name} to latest on timeline {t}: {what} {first} is missing{} (its WAL has a hole): a restore stops there",
                        if n.missing.len() > 1 { format!(" ({} files missing in all)", n.missing.len()) } else { String::new() }
                    );
                    if lag {
                        out.not_checked.push(format!("{msg} (the backup is less than an hour old: not archived yet?)"));
                    } else {
                        out.problems.push(msg);
                    }
                }
            }
        }
    }
    out.files = files.into_iter().collect();
    out
}

/// WAL continuity from each backup's start along the timeline graph, then every file on
/// those paths decoded and checked.
async fn verify_wal(
    repo: &Repo,
    layout: &Layout,
    backups: &[BackupManifest],
    req: &VerifyRequest,
) -> Result<WalReport> {
    let pg = PgRepository::new(repo, layout);
    let wal = WalArchive::new(repo, layout);
    let objects = pg.wal_objects().await?;
    let mut rep = WalReport::default();
    let segment_size = backups.first().map(|b| b.wal_segment_size()).unwrap_or(16 << 20);
    rep.bytes = objects.iter().map(|(_, o)| o.size).sum();
    let graph = wal.timeline_graph(segment_size, &req.wal_keys).await?;
    let now = crate::repository::now_us();
    let points: Vec<PathBackup> = backups
        .iter()
        .map(|b| {
            let own = if b.wal_included { crate::recovery::own_segments(b, segment_size) } else { Vec::new() };
            (
                b.name.clone(),
                crate::recovery::backup_point(b),
                now - crate::repository::parse_time_us(&b.stop_time),
                own,
            )
        })
        .collect();
    let paths = wal_paths(&graph, &points);
    rep.problems.extend(paths.problems);
    rep.not_checked.extend(paths.not_checked);
    let names = paths.files;
    let encrypted = objects.iter().any(|(_, o)| o.key.ends_with(".age"));
    if encrypted && !req.wal_keys.any() {
        rep.not_checked.push("segment contents: the WAL is encrypted and no key was given".into());
        return Ok(rep);
    }
    let checks = names.iter().map(|n| {
        let wal = &wal;
        let keys = &req.wal_keys;
        async move {
            match wal.fetch(n, keys).await {
                Ok(Some(_)) => None,
                Ok(None) => Some(format!("{n}: listed but not found")),
                Err(e) => Some(format!("{n}: {e}")),
            }
        }
    });
    let found: Vec<Option<String>> =
        futures::stream::iter(checks).buffer_unordered(req.parallel.max(1) * 2).collect().await;
    rep.segments_checked = names.len() as u64;
    rep.problems.extend(found.into_iter().flatten());
    Ok(rep)
}

/// Verifies the chosen backups (and the WAL archive).
pub async fn verify(repo: &Repo, layout: &Layout, req: &VerifyRequest) -> Result<VerifyReport> {
    let started = std::time::Instant::now();
    let pg = PgRepository::new(repo, layout);
    let inv = pg.inventory().await?;
    let chosen: Vec<BackupManifest> = match &req.names {
        None => inv.backups.iter().map(|b| b.manifest.clone()).collect(),
        Some(names) => {
            let mut v = Vec::new();
            for n in names {
                v.push(crate::catalog::load_manifest(repo, layout, n).await?);
            }
            v
        }
    };
    let mut report = VerifyReport { repository: repo.url().to_owned(), ..Default::default() };
    // Backups whose manifest cannot be read are problems too, listed by name.
    {
        for (name, why) in &inv.unreadable {
            report.backups.push(BackupReport { name: name.clone(), problems: vec![why.clone()], ..Default::default() });
        }
    }
    for m in &chosen {
        report.backups.push(verify_backup(repo, layout, m, req).await);
    }
    if req.wal {
        report.wal = Some(verify_wal(repo, layout, &chosen, req).await?);
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_text(files: &str) -> String {
        let body = format!("{{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n{files}\n],\n");
        let sum = hex::encode(sha2::Sha256::digest(body.as_bytes()));
        format!("{body}\"Manifest-Checksum\": \"{sum}\"}}\n")
    }

    #[test]
    fn backup_manifest_checks_itself_and_lists_files() {
        let crc = hex::encode(crc32c::crc32c(b"hello").to_le_bytes());
        let text = manifest_text(&format!(
            "{{ \"Path\": \"base/1/1\", \"Size\": 5, \"Last-Modified\": \"x\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"{crc}\" }}"
        ));
        let files = parse_backup_manifest(text.as_bytes()).unwrap();
        assert_eq!(files["base/1/1"].size, 5);
        let tampered = text.replace("\"Size\": 5", "\"Size\": 6");
        assert!(parse_backup_manifest(tampered.as_bytes()).unwrap_err().contains("own checksum"));
    }

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (p, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            h.set_cksum();
            b.append_data(&mut h, p, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn archives_are_checked_file_by_file() {
        let crc = |d: &[u8]| hex::encode(crc32c::crc32c(d).to_le_bytes());
        let mut files = BTreeMap::new();
        files.insert(
            "base/1/1".to_string(),
            ManifestFile { size: 5, algorithm: "CRC32C".into(), checksum: crc(b"hello") },
        );
        files.insert(
            "pg_tblspc/16384/PG_15/1/2".to_string(),
            ManifestFile { size: 3, algorithm: "SHA256".into(), checksum: hex::encode(sha2::Sha256::digest(b"abc")) },
        );
        let good = tar_of(&[("base/1/1", b"hello"), ("pg_wal/000000010000000000000001", b"wal")]);
        let (seen, problems) = check_archive(&mut good.as_slice(), "", &files).unwrap();
        assert_eq!(seen, vec!["base/1/1"]);
        assert!(problems.is_empty(), "{problems:?}");
        let bad = tar_of(&[("base/1/1", b"hellO"), ("base/9/9", b"x")]);
        let (_, problems) = check_archive(&mut bad.as_slice(), "", &files).unwrap();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("checksum differs"));
        assert!(problems[1].contains("not in backup_manifest"));
        let ts = tar_of(&[("PG_15/1/2", b"abc")]);
        let (seen, problems) = check_archive(&mut ts.as_slice(), "pg_tblspc/16384/", &files).unwrap();
        assert_eq!(seen, vec!["pg_tblspc/16384/PG_15/1/2"]);
        assert!(problems.is_empty());
    }
}
