//! Restoring a base backup into an empty data directory: plan (which objects, where they
//! go, what is refused), then stream each archive download → verify → decrypt →
//! decompress → untar, archives in parallel, with no staging copy.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cloud_dump_pipeline::{read_decoded, Compression, Decryption, PipelineError, Source};
use cloud_dump_storage::Repo;

use crate::layout::Layout;
use futures::StreamExt;

use crate::catalog::load_manifest;
use crate::error::{Error, Result};
use crate::extract::{extract, ExtractTarget};
use crate::manifest::{BackupManifest, ObjectEntry, ObjectKind};
use crate::progress::Progress;

pub struct RestoreRequest {
    pub name: String,
    pub layout: Layout,
    pub pgdata: PathBuf,
    /// `OLD=NEW` tablespace relocations.
    pub tablespace_mapping: Vec<(String, PathBuf)>,
    pub decryption: Decryption,
    /// Archives restored at once; also the ranged reads in flight per archive.
    pub parallel: usize,
}

#[derive(Debug, Clone)]
pub struct RestorePlan {
    pub manifest: BackupManifest,
    pub dir: String,
    pub pgdata: PathBuf,
    /// Source location → restore location of each tablespace.
    pub tablespaces: HashMap<String, PathBuf>,
}

impl RestorePlan {
    /// Where one archive is unpacked (`None` for the server's backup_manifest, which goes
    /// into PGDATA as a file).
    pub fn target_of(&self, o: &ObjectEntry) -> Option<PathBuf> {
        match o.kind {
            ObjectKind::Base => Some(self.pgdata.clone()),
            ObjectKind::Tablespace => {
                let ts = self.manifest.tablespaces.iter().find(|t| Some(t.oid) == o.tablespace_oid)?;
                self.tablespaces.get(&ts.location).cloned()
            }
            ObjectKind::BackupManifest => None,
        }
    }
}

/// A directory that does not exist or is empty; anything else is refused.
pub fn check_empty_target(path: &Path, what: &str) -> Result<()> {
    match fs::read_dir(path) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(Error::Restore(format!(
                    "refusing to restore into {what} {}: it is not empty",
                    path.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            Err(Error::Restore(format!("{what} {} exists and is not a directory", path.display())))
        }
        Err(e) => Err(Error::Restore(format!("cannot inspect {what} {}: {e}", path.display()))),
    }
}

/// `p` with `.`/`..` resolved and its longest existing ancestor canonicalised, so that
/// two spellings of one place compare equal.
fn resolved(p: &Path) -> PathBuf {
    let mut lexical = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                lexical.pop();
            }
            std::path::Component::CurDir => {}
            c => lexical.push(c),
        }
    }
    let mut existing = lexical.clone();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            return rest.iter().rev().fold(real, |acc: PathBuf, n: &std::ffi::OsString| acc.join(n));
        }
        match (existing.file_name().map(|n| n.to_owned()), existing.parent().map(Path::to_path_buf)) {
            (Some(n), Some(parent)) => {
                rest.push(n);
                existing = parent;
            }
            _ => return lexical,
        }
    }
}

/// Where each tablespace goes (source location → restore location). Every tablespace must
/// be mapped explicitly (`OLD=OLD` keeps it in place): its location comes from the
/// repository, and a restore must never write where the operator did not say. Targets
/// must be absolute, distinct, outside PGDATA and not inside one another.
pub fn plan_tablespaces(
    manifest: &BackupManifest,
    pgdata: &Path,
    mapping: &[(String, PathBuf)],
) -> Result<HashMap<String, PathBuf>> {
    let known = || {
        let v: Vec<_> = manifest.tablespaces.iter().map(|t| t.location.as_str()).collect();
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.join(", ")
        }
    };
    for (i, (old, new)) in mapping.iter().enumerate() {
        if !manifest.tablespaces.iter().any(|t| &t.location == old) {
            return Err(Error::Config(format!(
                "--tablespace-mapping {old}=…: backup {} has no tablespace at {old} (it has: {})",
                manifest.name,
                known()
            )));
        }
        if mapping[..i].iter().any(|(o, _)| o == old) {
            return Err(Error::Config(format!("--tablespace-mapping: {old} is mapped twice")));
        }
        if !new.is_absolute() {
            return Err(Error::Config(format!("--tablespace-mapping target {} must be absolute", new.display())));
        }
        let text = new.to_string_lossy();
        if text.chars().any(|c| c.is_control() || c == '\\') {
            return Err(Error::Config(format!(
                "--tablespace-mapping target {text:?} holds a backslash or a control character; choose a plain path"
            )));
        }
    }
    let data = resolved(pgdata);
    let mut out: HashMap<String, PathBuf> = HashMap::new();
    let mut seen: Vec<(u32, PathBuf)> = Vec::new();
    for t in &manifest.tablespaces {
        let Some((_, new)) = mapping.iter().find(|(old, _)| old == &t.location) else {
            return Err(Error::Config(format!(
                "backup {} has tablespace {} at {:?}: say where it goes with --tablespace-mapping OLD=NEW (OLD=OLD restores it in place)",
                manifest.name, t.oid, t.location
            )));
        };
        let r = resolved(new);
        if r.starts_with(&data) || data.starts_with(&r) {
            return Err(Error::Config(format!(
                "tablespace {} would be restored at {}, which overlaps PGDATA {}; map it elsewhere",
                t.oid,
                new.display(),
                pgdata.display()
            )));
        }
        if let Some((other, _)) = seen.iter().find(|(_, p)| p.starts_with(&r) || r.starts_with(p)) {
            return Err(Error::Config(format!(
                "tablespaces {other} and {} would be restored into the same place ({}); map each to its own directory",
                t.oid,
                new.display()
            )));
        }
        seen.push((t.oid, r));
        out.insert(t.location.clone(), new.clone());
    }
    Ok(out)
}

pub async fn plan_restore(repo: &Repo, req: &RestoreRequest) -> Result<RestorePlan> {
    if !req.pgdata.is_absolute() {
        return Err(Error::Config(format!("--pgdata must be an absolute path, not {}", req.pgdata.display())));
    }
    let manifest = load_manifest(repo, &req.layout, &req.name).await?;
    check_empty_target(&req.pgdata, "PGDATA")?;
    let tablespaces = plan_tablespaces(&manifest, &req.pgdata, &req.tablespace_mapping)?;
    for (oid, target) in manifest.tablespaces.iter().map(|t| (t.oid, &tablespaces[&t.location])) {
        check_empty_target(target, &format!("tablespace {oid} directory"))?;
    }
    Ok(RestorePlan { dir: req.layout.backup_dir(&manifest.name), manifest, pgdata: req.pgdata.clone(), tablespaces })
}

fn compression_of(m: &BackupManifest) -> Result<Compression> {
    m.compression
        .parse()
        .map_err(|e: String| Error::BadManifest { key: format!("{}/manifest.json", m.name), reason: e })
}

/// Runs the plan. On failure the error says what was left on disk.
pub async fn run_restore(
    repo: &Repo,
    plan: &RestorePlan,
    req: &RestoreRequest,
    progress: Arc<dyn Progress>,
) -> Result<()> {
    let result = restore_inner(repo, plan, req, progress).await;
    result.map_err(|e| {
        let mut dirs = vec![plan.pgdata.display().to_string()];
        dirs.extend(plan.tablespaces.values().map(|p| p.display().to_string()));
        Error::Restore(format!(
            "{e}; restore failed: {} may hold a partial restore: remove it before retrying, never start PostgreSQL on it",
            dirs.join(", ")
        ))
    })
}

async fn restore_inner(
    repo: &Repo,
    plan: &RestorePlan,
    req: &RestoreRequest,
    progress: Arc<dyn Progress>,
) -> Result<()> {
    let m = &plan.manifest;
    let compression = compression_of(m)?;
    let decryption = backup_decryption(m, &req.decryption, &plan.dir).await?;
    let mk = |p: &Path| -> Result<()> {
        fs::create_dir_all(p).map_err(|e| Error::Restore(format!("cannot create {}: {e}", p.display())))?;
        fs::set_permissions(p, fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::Restore(format!("cannot set mode 0700 on {}: {e}", p.display())))
    };
    mk(&plan.pgdata)?;
    for p in plan.tablespaces.values() {
        mk(p)?;
    }
    let total: u64 = m.objects.iter().filter(|o| o.kind != ObjectKind::BackupManifest).map(|o| o.raw_size).sum();
    progress.begin("restore", Some(total));
    let parallel = req.parallel.max(1);
    let jobs = m.objects.iter().map(|o| {
        let src = Source {
            key: format!("{}{}", plan.dir, o.key),
            size: o.size,
            sha256: Some(o.sha256.clone()),
            compression,
            encrypted: m.encrypted,
        };
        let target = plan.target_of(o);
        let kind = o.kind.clone();
        let maps = plan.tablespaces.clone();
        let pgdata = plan.pgdata.clone();
        let dec = decryption.clone();
        let progress = progress.clone();
        async move {
            let key = src.key.clone();
            let r = read_decoded(repo, &src, parallel, dec, move |r| match (kind, target) {
                (ObjectKind::BackupManifest, _) => {
                    let mut f = fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(pgdata.join("backup_manifest"))
                        .map_err(|e| PipelineError::io("backup_manifest", e))?;
                    std::io::copy(r, &mut f).map_err(|e| PipelineError::io("backup_manifest", e))?;
                    Ok(Ok(()))
                }
                (_, Some(root)) => {
                    let t =
                        ExtractTarget { root: &root, tablespaces: &maps, archive: &key, progress: progress.as_ref() };
                    Ok(extract(r, &t).map(|_| ()))
                }
                (_, None) => Ok(Err(Error::Restore(format!("{key}: no restore location for this tablespace")))),
            })
            .await;
            match r {
                Ok(inner) => inner,
                Err(e) => Err(Error::Pipeline(e)),
            }
        }
    });
    let results: Vec<Result<()>> = futures::stream::iter(jobs).buffer_unordered(parallel).collect().await;
    for r in results {
        r?;
    }
    progress.end();
    finish_layout(plan)?;
    Ok(())
}

/// Whether the key given fits the backup: a key for a plain backup is refused (whoever can
/// write to the repository could have swapped an encrypted backup for a plain one); an
/// encrypted backup without a key is refused when the key is needed (not for a dry run).
pub fn check_decryption(m: &BackupManifest, given: &Decryption, key_needed: bool) -> Result<()> {
    let none = matches!(given, Decryption::None);
    if !m.encrypted && !none {
        return Err(Error::Config(format!(
            "backup {} is not encrypted although a key was given; refusing to restore it (whoever can write to the repository could have replaced an encrypted backup with a plain one)",
            m.name
        )));
    }
    if m.encrypted && none && key_needed {
        return Err(Error::Config(format!(
            "backup {} is encrypted ({}): give {}",
            m.name,
            m.encryption,
            if m.encryption == "x25519" {
                "--identity-key FILE"
            } else {
                "--passphrase-file FILE or CLOUD_DUMP_PASSPHRASE"
            }
        )));
    }
    Ok(())
}

/// Proves the key given opens this backup, as the real restore would: the backup key is
/// opened, then the smallest object is downloaded, decoded and checked against its SHA-256
/// (for a dry run, which otherwise writes and downloads nothing).
pub async fn check_backup_key(repo: &Repo, plan: &RestorePlan, req: &RestoreRequest) -> Result<()> {
    let m = &plan.manifest;
    check_decryption(m, &req.decryption, true)?;
    if !m.encrypted {
        return Ok(());
    }
    let dec = backup_decryption(m, &req.decryption, &plan.dir).await?;
    let Some(o) = m.objects.iter().min_by_key(|o| o.size) else { return Ok(()) };
    let src = Source {
        key: format!("{}{}", plan.dir, o.key),
        size: o.size,
        sha256: Some(o.sha256.clone()),
        compression: compression_of(m)?,
        encrypted: true,
    };
    read_decoded(repo, &src, 1, dec, |r| {
        std::io::copy(r, &mut std::io::sink()).map_err(|e| PipelineError::io("backup object", e))?;
        Ok(())
    })
    .await?;
    Ok(())
}

/// Which key opens a backup's objects: a passphrase opens the backup's sealed X25519 key
/// (one scrypt), and that key opens every archive; identities and plain backups as given.
/// Restore and verify both ask here.
pub async fn backup_decryption(m: &BackupManifest, given: &Decryption, dir: &str) -> Result<Decryption> {
    use cloud_dump_pipeline::keys::{opener, Opener, Sealing};
    let sealing = match (m.encrypted, &m.sealed_key, m.encryption.as_str()) {
        (false, _, _) => Sealing::Plain,
        (true, Some(_), _) => Sealing::ToBackupKey,
        (true, None, "passphrase") => Sealing::ToPassphrase,
        (true, None, _) => Sealing::ToRecipients,
    };
    let (has_passphrase, has_identities) =
        (matches!(given, Decryption::Passphrase(_)), matches!(given, Decryption::Identities(_)));
    match (opener(sealing, has_passphrase, has_identities), &m.sealed_key, given) {
        (Opener::BackupKey, Some(sealed), Decryption::Passphrase(p)) => {
            let (sealed, p, what) = (sealed.clone(), p.clone(), format!("{dir}manifest.json (backup key)"));
            let id =
                tokio::task::spawn_blocking(move || cloud_dump_pipeline::repokey::open_identity(&sealed, &p, &what))
                    .await
                    .map_err(|e| Error::Io(std::io::Error::other(e)))??;
            Ok(Decryption::Identities(vec![id]))
        }
        // The key as given: it opens the object, or the decoder names what is missing.
        (_, _, d) => Ok(d.clone()),
    }
}

/// De-escapes one `tablespace_map` file: lines `OID PATH`, where PostgreSQL 15+ writes a
/// backslash before `\\`, newline and CR in PATH (14+), older servers before newline and CR.
/// Returns (oid, path) pairs or the reason the file is not one.
pub fn parse_tablespace_map(text: &str, version_num: u32) -> std::result::Result<Vec<(String, String)>, String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    let mut escaped = false;
    for ch in text.chars() {
        if escaped {
            if version_num < 140000 && ch != '\n' && ch != '\r' {
                cur.push('\\');
            }
            cur.push(ch);
            escaped = false;
        } else if ch == '\\' {
            escaped = true;
        } else if ch == '\n' || ch == '\r' {
            if !cur.is_empty() {
                lines.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(ch);
        }
    }
    if escaped {
        cur.push('\\');
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
        .into_iter()
        .map(|l| match l.split_once(' ') {
            Some((oid, path)) if !oid.is_empty() && oid.bytes().all(|b| b.is_ascii_digit()) && !path.is_empty() => {
                Ok((oid.to_owned(), path.to_owned()))
            }
            _ => Err(format!("bad line {l:?}")),
        })
        .collect()
}

/// The `tablespace_map` a restore writes: one line per tablespace, at its restore location.
/// Every line of the backup's map must name a tablespace of the manifest at its recorded
/// location; anything else is refused (the server would recreate links from it).
pub fn rewrite_tablespace_map(text: &str, plan: &RestorePlan) -> Result<String> {
    let bad = |reason: String| Error::Restore(format!("tablespace_map of backup {}: {reason}", plan.manifest.name));
    let mut out = String::new();
    let mut done = Vec::new();
    for (oid, path) in parse_tablespace_map(text, plan.manifest.pg_version_num).map_err(bad)? {
        let t = plan
            .manifest
            .tablespaces
            .iter()
            .find(|t| t.oid.to_string() == oid)
            .ok_or_else(|| bad(format!("names tablespace {oid}, which the manifest does not list")))?;
        if t.location != path {
            return Err(bad(format!("places tablespace {oid} at {path:?}, the manifest at {:?}", t.location)));
        }
        if done.contains(&t.oid) {
            return Err(bad(format!("names tablespace {oid} twice")));
        }
        done.push(t.oid);
        let target = plan.tablespaces.get(&t.location).ok_or_else(|| bad(format!("tablespace {oid} is not mapped")))?;
        // Targets hold no backslash or control character (plan_tablespaces refuses them).
        out.push_str(&format!("{oid} {}\n", target.display()));
    }
    Ok(out)
}

/// What PostgreSQL expects beyond the archives: tablespace links and `tablespace_map`
/// pointing at the restore locations, the directories a base backup leaves out, mode 0700.
/// Nothing here follows a link the archive created.
fn finish_layout(plan: &RestorePlan) -> Result<()> {
    let io = |p: &Path, e: std::io::Error| Error::Restore(format!("{}: {e}", p.display()));
    let pgdata = &plan.pgdata;
    for d in [
        "pg_wal/archive_status",
        "pg_tblspc",
        "pg_replslot",
        "pg_stat_tmp",
        "pg_notify",
        "pg_serial",
        "pg_snapshots",
        "pg_subtrans",
        "pg_commit_ts",
        "pg_dynshmem",
        "pg_twophase",
        "pg_logical/snapshots",
        "pg_logical/mappings",
    ] {
        crate::extract::ensure_dir_nofollow(pgdata, Path::new(d)).map_err(Error::Restore)?;
    }
    let map_path = pgdata.join("tablespace_map");
    match fs::symlink_metadata(&map_path) {
        Ok(m) if m.is_file() => {
            let text = fs::read_to_string(&map_path).map_err(|e| io(&map_path, e))?;
            let out = rewrite_tablespace_map(&text, plan)?;
            let tmp = pgdata.join("tablespace_map.cloud-dump.tmp");
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .and_then(|mut f| std::io::Write::write_all(&mut f, out.as_bytes()))
                .and_then(|_| fs::rename(&tmp, &map_path))
                .map_err(|e| io(&map_path, e))?;
        }
        Ok(_) => return Err(Error::Restore(format!("{} is not a regular file", map_path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&map_path, e)),
    }
    for t in &plan.manifest.tablespaces {
        let link = pgdata.join("pg_tblspc").join(t.oid.to_string());
        let target = &plan.tablespaces[&t.location];
        match fs::symlink_metadata(&link) {
            Ok(m) if m.file_type().is_symlink() => fs::remove_file(&link).map_err(|e| io(&link, e))?,
            Ok(_) => return Err(Error::Restore(format!("{} is not a tablespace link", link.display()))),
            Err(_) => {}
        }
        std::os::unix::fs::symlink(target, &link).map_err(|e| io(&link, e))?;
    }
    fs::set_permissions(pgdata, fs::Permissions::from_mode(0o700)).map_err(|e| io(pgdata, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{BackupManifest, TablespaceEntry};

    fn manifest(ts: &[(u32, &str)]) -> BackupManifest {
        let mut m = BackupManifest::example();
        m.tablespaces = ts
            .iter()
            .map(|(oid, loc)| TablespaceEntry { oid: *oid, location: (*loc).into(), key: String::new() })
            .collect();
        m
    }

    #[test]
    fn tablespace_mapping_is_explicit_distinct_and_outside_pgdata() {
        let m = manifest(&[(16384, "/srv/a"), (16385, "/srv/b")]);
        let pg = Path::new("/restore/data");
        let map = |v: &[(&str, &str)]| -> Vec<(String, PathBuf)> {
            v.iter().map(|(o, n)| ((*o).to_owned(), PathBuf::from(n))).collect()
        };
        let ok = plan_tablespaces(&m, pg, &map(&[("/srv/a", "/restore/a"), ("/srv/b", "/srv/b")])).unwrap();
        assert_eq!(ok["/srv/a"], PathBuf::from("/restore/a"));
        let err = |v: &[(&str, &str)]| plan_tablespaces(&m, pg, &map(v)).unwrap_err().to_string();
        assert!(err(&[("/srv/a", "/restore/a")]).contains("16385"), "unmapped tablespace refused");
        assert!(err(&[("/srv/a", "/restore/x"), ("/srv/b", "/restore/x")]).contains("same place"));
        assert!(err(&[("/srv/a", "/restore/x"), ("/srv/b", "/restore/x/y")]).contains("same place"));
        assert!(err(&[("/srv/a", "/restore/x"), ("/srv/b", "/restore/y/../x")]).contains("same place"));
        assert!(err(&[("/srv/a", "/restore/data/ts"), ("/srv/b", "/b")]).contains("overlaps PGDATA"));
        assert!(err(&[("/srv/a", "/restore"), ("/srv/b", "/b")]).contains("overlaps PGDATA"));
        assert!(err(&[("/srv/a", "/x\nevil"), ("/srv/b", "/b")]).contains("control"));
        assert!(err(&[("/srv/a", "/a"), ("/srv/a", "/b")]).contains("twice"));
    }

    #[test]
    fn tablespace_map_is_de_escaped_and_every_line_checked() {
        // PostgreSQL 15 writes a backslash before \, newline and CR in the path.
        let path = "/srv/we\\ird\nname\rx";
        let escaped = path.replace('\\', "\\\\").replace('\n', "\\\n").replace('\r', "\\\r");
        let text = &format!("16384 {escaped}\n16385 /srv/b\n");
        let parsed = parse_tablespace_map(text, 150000).unwrap();
        assert_eq!(parsed[0], ("16384".to_owned(), path.to_owned()));
        let m = manifest(&[(16384, &parsed[0].1), (16385, "/srv/b")]);
        let mut tablespaces = HashMap::new();
        tablespaces.insert(parsed[0].1.clone(), PathBuf::from("/new/a"));
        tablespaces.insert("/srv/b".to_owned(), PathBuf::from("/new/b"));
        let plan = RestorePlan { manifest: m, dir: String::new(), pgdata: "/d".into(), tablespaces };
        assert_eq!(rewrite_tablespace_map(text, &plan).unwrap(), "16384 /new/a\n16385 /new/b\n");
        // A line the manifest does not back is refused, never kept.
        assert!(rewrite_tablespace_map("16384 /elsewhere\n", &plan).is_err());
        assert!(rewrite_tablespace_map("99 /srv/b\n", &plan).is_err());
        assert!(rewrite_tablespace_map("16385 /srv/b\n16385 /srv/b\n", &plan).is_err());
        assert!(rewrite_tablespace_map("garbage\n", &plan).is_err());
    }
}
