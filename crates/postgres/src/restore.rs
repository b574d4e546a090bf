//! Restoring a base backup into an empty data directory: plan (which objects, where they
//! go, what is refused), then stream each archive download → verify → decrypt →
//! decompress → untar, archives in parallel, with no staging copy.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cloud_dump_pipeline::{read_decoded, Compression, Decryption, PipelineError, Source};
use cloud_dump_storage::{Layout, Repo};
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

pub async fn plan_restore(repo: &Repo, req: &RestoreRequest) -> Result<RestorePlan> {
    if !req.pgdata.is_absolute() {
        return Err(Error::Config(format!("--pgdata must be an absolute path, not {}", req.pgdata.display())));
    }
    let manifest = load_manifest(repo, &req.layout, &req.name).await?;
    check_empty_target(&req.pgdata, "PGDATA")?;
    let mut tablespaces = HashMap::new();
    for (old, new) in &req.tablespace_mapping {
        if !manifest.tablespaces.iter().any(|t| &t.location == old) {
            let known: Vec<_> = manifest.tablespaces.iter().map(|t| t.location.as_str()).collect();
            return Err(Error::Config(format!(
                "--tablespace-mapping {old}=…: backup {} has no tablespace at {old} (it has: {})",
                manifest.name,
                if known.is_empty() { "none".to_owned() } else { known.join(", ") }
            )));
        }
        if !new.is_absolute() {
            return Err(Error::Config(format!("--tablespace-mapping target {} must be absolute", new.display())));
        }
    }
    for t in &manifest.tablespaces {
        let target = req
            .tablespace_mapping
            .iter()
            .find(|(old, _)| old == &t.location)
            .map(|(_, new)| new.clone())
            .unwrap_or_else(|| PathBuf::from(&t.location));
        if target.starts_with(&req.pgdata) {
            return Err(Error::Config(format!(
                "tablespace {} would be restored inside PGDATA ({}); map it elsewhere with --tablespace-mapping",
                t.oid,
                target.display()
            )));
        }
        check_empty_target(&target, &format!("tablespace {} directory", t.oid))?;
        tablespaces.insert(t.location.clone(), target);
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
    let decryption = match (&m.sealed_key, &req.decryption) {
        (Some(sealed), Decryption::Passphrase(p)) => {
            let (sealed, p, what) = (sealed.clone(), p.clone(), format!("{}manifest.json (backup key)", plan.dir));
            let id =
                tokio::task::spawn_blocking(move || cloud_dump_pipeline::repokey::open_identity(&sealed, &p, &what))
                    .await
                    .map_err(|e| Error::Io(std::io::Error::other(e)))??;
            Decryption::Identities(vec![id])
        }
        (_, d) => d.clone(),
    };
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
                    let mut f = fs::File::create(pgdata.join("backup_manifest"))
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

/// What PostgreSQL expects beyond the archives: tablespace links and `tablespace_map`
/// pointing at the restore locations, the directories a base backup leaves out, mode 0700.
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
        let p = pgdata.join(d);
        if !p.exists() {
            fs::create_dir_all(&p).map_err(|e| io(&p, e))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o700)).map_err(|e| io(&p, e))?;
        }
    }
    let map_path = pgdata.join("tablespace_map");
    if map_path.exists() {
        let text = fs::read_to_string(&map_path).map_err(|e| io(&map_path, e))?;
        let mut out = String::new();
        for line in text.lines() {
            match line.split_once(' ') {
                Some((oid, loc)) => {
                    let loc = plan.tablespaces.get(loc).map(|p| p.display().to_string()).unwrap_or(loc.to_owned());
                    out.push_str(&format!("{oid} {loc}\n"));
                }
                None if !line.is_empty() => out.push_str(&format!("{line}\n")),
                None => {}
            }
        }
        fs::write(&map_path, out).map_err(|e| io(&map_path, e))?;
    }
    for t in &plan.manifest.tablespaces {
        let link = pgdata.join("pg_tblspc").join(t.oid.to_string());
        let target = &plan.tablespaces[&t.location];
        if fs::symlink_metadata(&link).is_ok() {
            fs::remove_file(&link).map_err(|e| io(&link, e))?;
        }
        std::os::unix::fs::symlink(target, &link).map_err(|e| io(&link, e))?;
    }
    fs::set_permissions(pgdata, fs::Permissions::from_mode(0o700)).map_err(|e| io(pgdata, e))?;
    Ok(())
}
