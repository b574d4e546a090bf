//! What backups a repository holds: a folder counts as a backup only once its
//! `manifest.json` exists.

use cloud_dump_storage::{Repo, StorageError};

use crate::layout::{self, Layout};

use crate::error::{Error, Result};
use crate::manifest::BackupManifest;

pub async fn load_manifest(repo: &Repo, layout: &Layout, name: &str) -> Result<BackupManifest> {
    layout::validate_component("backup name", name).map_err(Error::Config)?;
    let key = format!("{}{}", layout.backup_dir(name), layout::MANIFEST_FILE);
    match repo.get(&key).await {
        Ok(bytes) => {
            let m = BackupManifest::parse(&bytes).map_err(|reason| Error::BadManifest { key, reason })?;
            let dir = layout.backup_dir(name);
            if repo.list(&dir).await?.iter().any(|o| crate::repository::is_deleting_mark(&o.key, &dir)) {
                return Err(Error::Config(format!(
                    "backup {name} is being deleted (an earlier delete was cut short; the next expire or delete finishes it)"
                )));
            }
            Ok(m)
        }
        Err(StorageError::NotFound { .. }) => {
            let mut available: Vec<String> =
                list_backups(repo, layout).await.unwrap_or_default().into_iter().map(|m| m.name).collect();
            available.truncate(10);
            Err(Error::BackupNotFound { name: name.to_owned(), repo: repo.url().to_owned(), available })
        }
        Err(e) => Err(e.into()),
    }
}

/// Every complete backup, newest first (by stop time): the repository's inventory, so a
/// folder whose delete has begun is no backup here either. Unreadable manifests are
/// warned about and skipped.
pub async fn list_backups(repo: &Repo, layout: &Layout) -> Result<Vec<BackupManifest>> {
    let inv = crate::repository::PgRepository::new(repo, layout).inventory().await?;
    for (name, why) in &inv.unreadable {
        tracing::warn!("skipping backup folder {name}: {why}");
    }
    Ok(inv.backups.into_iter().map(|b| b.manifest).collect())
}
