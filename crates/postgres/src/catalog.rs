//! What backups a repository holds: a folder counts as a backup only once its
//! `manifest.json` exists.

use cloud_dump_storage::{Repo, StorageError};
use futures::StreamExt;

use crate::layout::{self, Layout};

use crate::error::{Error, Result};
use crate::manifest::BackupManifest;

pub async fn load_manifest(repo: &Repo, layout: &Layout, name: &str) -> Result<BackupManifest> {
    layout::validate_component("backup name", name).map_err(Error::Config)?;
    let key = format!("{}{}", layout.backup_dir(name), layout::MANIFEST_FILE);
    match repo.get(&key).await {
        Ok(bytes) => BackupManifest::parse(&bytes).map_err(|reason| Error::BadManifest { key, reason }),
        Err(StorageError::NotFound { .. }) => {
            let mut available: Vec<String> =
                list_backups(repo, layout).await.unwrap_or_default().into_iter().map(|m| m.name).collect();
            available.truncate(10);
            Err(Error::BackupNotFound { name: name.to_owned(), repo: repo.url().to_owned(), available })
        }
        Err(e) => Err(e.into()),
    }
}

/// Every complete backup, newest first (by stop time). One LIST of the backup folder's
/// subfolders, then one GET per manifest (eight at a time).
pub async fn list_backups(repo: &Repo, layout: &Layout) -> Result<Vec<BackupManifest>> {
    let root = layout.backups_root();
    let wal_dir = layout.wal_dir();
    let dirs = repo.list_dirs(&root).await?;
    let keys: Vec<String> = dirs
        .into_iter()
        .map(|d| format!("{root}{d}/"))
        .filter(|d| *d != wal_dir)
        .map(|d| format!("{d}{}", layout::MANIFEST_FILE))
        .collect();
    let results: Vec<_> = futures::stream::iter(keys)
        .map(|key| async move { (repo.get(&key).await, key) })
        .buffer_unordered(8)
        .collect()
        .await;
    let mut out = Vec::new();
    for (r, key) in results {
        match r {
            Ok(bytes) => match BackupManifest::parse(&bytes) {
                Ok(m) => out.push(m),
                Err(reason) => tracing::warn!("skipping {key}: unreadable manifest: {reason}"),
            },
            Err(StorageError::NotFound { .. }) => {} // unfinished or not a backup
            Err(e) => return Err(e.into()),
        }
    }
    // By instant (an RFC 3339 string does not sort as its instant does).
    let at = |m: &BackupManifest| crate::repository::parse_time_us(&m.stop_time);
    out.sort_by(|a, b| at(b).cmp(&at(a)).then(b.name.cmp(&a.name)));
    Ok(out)
}
