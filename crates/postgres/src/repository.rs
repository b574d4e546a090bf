//! The PostgreSQL repository in backup words: complete and unfinished backups, keep marks,
//! deleting a backup, and the `expire` runner that executes [`crate::expire::plan`].
//!
//! Keep marks are write-once objects in the backup's folder, never a rewritten manifest:
//! `keep-<µs>` keeps, `release-<µs>` releases; the newest of them says. Nothing here
//! rewrites an object, so a bucket with Object Lock holds everything as written.

use std::collections::BTreeMap;

use bytes::Bytes;
use cloud_dump_storage::{ObjectInfo, Repo, StorageError, Versions};

use crate::layout::{self, Layout};
use futures::StreamExt;

use crate::error::{Error, Result};
use crate::expire::{self, BackupFacts, ExpirePlan, Policy, WalObject};
use crate::manifest::BackupManifest;
use crate::old_versions;
use crate::wal::classify;

const KEEP_PREFIX: &str = "keep-";
const RELEASE_PREFIX: &str = "release-";
/// Written into a backup's folder before anything of it is deleted: a delete cut short
/// (kill -9, a store error) is finished by the next `expire` or `delete`, not mistaken for a
/// backup being written.
const DELETING_PREFIX: &str = "deleting-";

/// One complete backup: its manifest, its keep state and every object of its folder.
#[derive(Debug, Clone)]
pub struct StoredBackup {
    pub manifest: BackupManifest,
    pub kept: bool,
    /// With the passphrase at hand, for a passphrase-encrypted backup: whether its manifest's
    /// MAC verifies (`None`: not checked).
    pub authenticated: Option<bool>,
    /// Keys relative to the repository root.
    pub objects: Vec<ObjectInfo>,
}

impl StoredBackup {
    pub fn name(&self) -> &str {
        &self.manifest.name
    }
}

/// What the backup folder holds: complete backups (newest first) and folders without a
/// manifest (backups being written, or abandoned).
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    pub backups: Vec<StoredBackup>,
    pub unfinished: Vec<String>,
    /// Folders whose manifest exists but cannot be read, with why.
    pub unreadable: Vec<(String, String)>,
    /// Folders whose delete got past the manifest but did not finish (a deleting mark, no
    /// manifest), with what is left of them. A folder with a mark and its manifest is still
    /// a backup: a mark alone (planted, or a delete stopped before the manifest) deletes
    /// nothing.
    pub interrupted: Vec<(String, Vec<ObjectInfo>)>,
    /// Every backup folder the listing returned, whatever became of it since.
    pub listed: std::collections::BTreeSet<String>,
}

impl Inventory {
    /// Every backup folder that held an object when listed.
    pub fn folders(&self) -> std::collections::BTreeSet<String> {
        let mut all = self.listed.clone();
        all.extend(self.backups.iter().map(|b| b.name().to_owned()));
        all.extend(self.unfinished.iter().cloned());
        all.extend(self.unreadable.iter().map(|(n, _)| n.clone()));
        all.extend(self.interrupted.iter().map(|(n, _)| n.clone()));
        all
    }
}

/// The first key under `dir` that lies deeper than its folder, if any.
fn nested_key<'o>(dir: &str, objects: &'o [ObjectInfo]) -> Option<&'o str> {
    objects.iter().map(|o| o.key.as_str()).find(|k| k.strip_prefix(dir).is_none_or(|rel| rel.contains('/')))
}

pub struct PgRepository<'a> {
    repo: &'a Repo,
    layout: Layout,
    /// Authenticates manifests and marks of passphrase-encrypted backups (mac.rs).
    passphrase: Option<cloud_dump_pipeline::SecretString>,
}

/// Whether `key` is a deleting mark in backup folder `dir`.
pub(crate) fn is_deleting_mark(key: &str, dir: &str) -> bool {
    key.strip_prefix(dir).is_some_and(|n| n.starts_with(DELETING_PREFIX))
}

/// The key of a keep mark stamped `stamp_us` in backup folder `dir`.
pub(crate) fn keep_mark_key(dir: &str, stamp_us: i64) -> String {
    format!("{dir}{KEEP_PREFIX}{:020}", stamp_us.max(0))
}

/// A mark stamped more than this far ahead of the clock is not believed (a planted
/// `release-99999…` must not decide for ever).
const MARK_FUTURE_SLACK_US: i64 = 24 * 3600 * 1_000_000;

fn mark_stamp(name: &str) -> Option<(i64, bool)> {
    let (stamp, keep) = match (name.strip_prefix(KEEP_PREFIX), name.strip_prefix(RELEASE_PREFIX)) {
        (Some(s), _) => (s, true),
        (_, Some(s)) => (s, false),
        _ => return None,
    };
    if stamp.len() != 20 || !stamp.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((stamp.parse().ok()?, keep))
}

/// Whether a backup folder's marks say "kept": the newest mark decides, by the store's own
/// time for it (the listing's last-modified), never by the stamp a host's clock wrote into
/// its name (a host a day ahead must not write a mark the server's clock ignores); the stamp
/// breaks ties, and at one stamp a keep wins (keeping is the safe reading). `marks`: (name
/// in the folder, store time µs).
pub fn kept_by_marks<'a>(marks: impl Iterator<Item = (&'a str, i64)>) -> bool {
    marks
        .filter_map(|(n, at)| mark_stamp(n).map(|(stamp, keep)| (at, stamp, keep)))
        .max_by_key(|m| *m)
        .is_some_and(|(_, _, keep)| keep)
}

/// The newest believable stamp among a folder's marks.
fn newest_mark<'a>(names: impl Iterator<Item = &'a str>, now_us: i64) -> Option<i64> {
    names.filter_map(mark_stamp).map(|(t, _)| t).filter(|t| *t <= now_us + MARK_FUTURE_SLACK_US).max()
}

/// The WAL file an archive object belongs to (`…0002.zst`, `…0002.sum` → `…0002`;
/// `00000002.history.zst` → `00000002.history`); `None` for anything else.
pub fn wal_name_of(rel: &str) -> Option<String> {
    let parts: Vec<&str> = rel.split('.').collect();
    (1..=parts.len().min(3)).rev().map(|n| parts[..n].join(".")).find(|c| classify(c).is_ok())
}

impl<'a> PgRepository<'a> {
    pub fn new(repo: &'a Repo, layout: &Layout) -> PgRepository<'a> {
        PgRepository { repo, layout: layout.clone(), passphrase: None }
    }

    /// With the repository's passphrase: manifests and marks of passphrase-encrypted backups
    /// are authenticated (a manifest whose MAC does not verify is not believed; a release
    /// mark whose MAC does not verify is ignored).
    pub fn with_passphrase(mut self, passphrase: Option<cloud_dump_pipeline::SecretString>) -> PgRepository<'a> {
        self.passphrase = passphrase;
        self
    }

    /// The MAC key of a passphrase-encrypted backup (one scrypt), when the passphrase is at
    /// hand; `Err` when the passphrase does not open its key.
    async fn mac_key(&self, m: &BackupManifest) -> Result<Option<[u8; 32]>> {
        let (Some(p), Some(sealed)) = (self.passphrase.clone(), m.sealed_key.clone()) else { return Ok(None) };
        let what = format!("{}manifest.json (backup key)", self.layout.backup_dir(&m.name));
        let id = tokio::task::spawn_blocking(move || cloud_dump_pipeline::repokey::open_identity(&sealed, &p, &what))
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))??;
        use cloud_dump_pipeline::ExposeSecret;
        Ok(Some(crate::mac::backup_mac_key(id.to_string().expose_secret())))
    }

    pub fn repo(&self) -> &Repo {
        self.repo
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// One recursive LIST of the backup folder, then the manifests (eight at a time).
    pub async fn inventory(&self) -> Result<Inventory> {
        let root = self.layout.backups_root();
        let wal_dir = self.layout.wal_dir();
        let mut folders: BTreeMap<String, Vec<ObjectInfo>> = BTreeMap::new();
        for o in self.repo.list(&root).await? {
            if o.key.starts_with(&wal_dir) {
                continue;
            }
            let Some(rel) = o.key.strip_prefix(&root) else { continue };
            let Some((folder, _)) = rel.split_once('/') else { continue };
            if layout::validate_component("backup name", folder).is_err() {
                continue;
            }
            folders.entry(folder.to_owned()).or_default().push(o);
        }
        // A backup folder holds only its own objects, side by side: a folder with nested keys
        // (another cluster's tree beside a flat layout, say) is never a backup, nor a backup
        // cut short.
        folders.retain(|name, objects| nested_key(&self.layout.backup_dir(name), objects).is_none());
        let listed: std::collections::BTreeSet<String> = folders.keys().cloned().collect();
        let with_manifest: Vec<(String, Vec<ObjectInfo>)> = folders.into_iter().collect::<Vec<_>>();
        let mut unfinished = Vec::new();
        let mut interrupted = Vec::new();
        let mut todo = Vec::new();
        for (name, objects) in with_manifest {
            let dir = self.layout.backup_dir(&name);
            let manifest_key = format!("{dir}{}", layout::MANIFEST_FILE);
            let has_manifest = objects.iter().any(|o| o.key == manifest_key);
            if !has_manifest && objects.iter().any(|o| is_deleting_mark(&o.key, &dir)) {
                interrupted.push((name, objects));
            } else if has_manifest {
                todo.push((name, objects, manifest_key));
            } else {
                unfinished.push(name);
            }
        }
        let loaded: Vec<_> = futures::stream::iter(todo)
            .map(|(name, objects, key)| async move { (self.repo.get(&key).await, name, objects, key) })
            .buffer_unordered(8)
            .collect()
            .await;
        let mut backups = Vec::new();
        let mut unreadable = Vec::new();
        for (got, name, objects, key) in loaded {
            match got {
                Ok(bytes) => {
                    let manifest = match BackupManifest::parse(&bytes) {
                        Ok(m) => m,
                        Err(reason) => {
                            unreadable.push((name, Error::BadManifest { key: key.clone(), reason }.to_string()));
                            continue;
                        }
                    };
                    let dir = self.layout.backup_dir(&name);
                    // With the key: the manifest's MAC, and only release marks whose MAC
                    // verifies count (a planted release must not un-keep a backup).
                    let (authenticated, believed) = match self.mac_key(&manifest).await {
                        Ok(Some(k)) => {
                            let ok = manifest
                                .mac
                                .as_deref()
                                .is_some_and(|mac| crate::mac::verifies(&k, &manifest.mac_message(), mac));
                            let mut believed = Vec::new();
                            for o in &objects {
                                let Some(n) = o.key.strip_prefix(&dir) else { continue };
                                if n.starts_with(RELEASE_PREFIX) {
                                    let body = match self.repo.get(&o.key).await {
                                        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
                                        Err(StorageError::NotFound { .. }) => continue,
                                        Err(e) => return Err(e.into()),
                                    };
                                    if !crate::mac::mark_verifies(&k, n, &body) {
                                        tracing::warn!("{}: its MAC does not verify; ignored (planted?)", o.key);
                                        continue;
                                    }
                                }
                                believed.push((n.to_owned(), o.modified_us()));
                            }
                            (Some(ok), Some(believed))
                        }
                        Ok(None) => (None, None),
                        // A passphrase that does not open this backup's key: not authenticated.
                        Err(_) => (Some(false), None),
                    };
                    let kept = match &believed {
                        Some(b) => kept_by_marks(b.iter().map(|(n, t)| (n.as_str(), *t))),
                        None => kept_by_marks(
                            objects.iter().filter_map(|o| Some((o.key.strip_prefix(&dir)?, o.modified_us()))),
                        ),
                    };
                    backups.push(StoredBackup { manifest, kept, authenticated, objects });
                }
                // Deleted since the listing: it is gone.
                Err(StorageError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // By time, parsed (an RFC 3339 string does not sort as its instant does).
        backups.sort_by(|a, b| {
            parse_time_us(&b.manifest.stop_time).cmp(&parse_time_us(&a.manifest.stop_time)).then(b.name().cmp(a.name()))
        });
        unfinished.sort();
        unreadable.sort();
        Ok(Inventory { backups, unfinished, unreadable, interrupted, listed })
    }

    /// Keeps a backup from `expire`, or releases it: a new write-once mark either way.
    pub async fn set_keep(&self, name: &str, keep: bool) -> Result<()> {
        crate::catalog::load_manifest(self.repo, &self.layout, name).await?;
        let dir = self.layout.backup_dir(name);
        let now = now_us();
        let rel = |o: &ObjectInfo| o.key.strip_prefix(&dir).map(str::to_owned);
        let names: Vec<String> = self.repo.list(&dir).await?.iter().filter_map(rel).collect();
        if let Some(n) = names.iter().find(|n| mark_stamp(n).is_some_and(|(t, _)| t > now + MARK_FUTURE_SLACK_US)) {
            tracing::warn!(
                "{dir}{n} is stamped more than a day ahead of this host's clock: it is ignored now, but will decide once that time comes"
            );
        }
        // After every mark there is, whatever this host's clock says.
        let stamp = newest_mark(names.iter().map(String::as_str), now).map_or(now, |t| t.max(now - 1) + 1).max(0);
        let key = format!("{dir}{}{stamp:020}", if keep { KEEP_PREFIX } else { RELEASE_PREFIX });
        let m = crate::catalog::load_manifest(self.repo, &self.layout, name).await?;
        let mac_key = self.mac_key(&m).await?;
        let mark = key.strip_prefix(&dir).unwrap_or(&key).to_owned();
        let body = crate::mac::mark_body(keep, &mark, mac_key.as_ref());
        self.repo.put_new(&key, Bytes::from(body)).await?;
        // Read back, judged by the store's time as expire judges it: the marks must now say
        // what was asked.
        let after: Vec<(String, i64)> = self
            .repo
            .list(&dir)
            .await?
            .iter()
            .filter_map(|o| Some((o.key.strip_prefix(&dir)?.to_owned(), o.modified_us())))
            .collect();
        if kept_by_marks(after.iter().map(|(n, t)| (n.as_str(), *t))) != keep {
            return Err(Error::Config(format!(
                "backup {name}: the {} mark was written, but another mark in {dir} decides otherwise",
                if keep { "keep" } else { "release" }
            )));
        }
        Ok(())
    }

    /// Deletes one backup: a deleting mark, then the manifest (the backup is gone from that
    /// moment on), then its other objects, the claim, and the marks last. Returns the keys
    /// that could not be deleted; the folder then stays marked and the next `expire` or
    /// `delete` finishes it.
    pub async fn delete_backup(&self, b: &StoredBackup) -> Result<Vec<(String, String)>> {
        self.delete_folder(b.name(), &b.objects).await
    }

    /// Deletes whatever is in a backup folder, in the order [`Self::delete_backup`] gives
    /// (also an interrupted delete, or an abandoned unfinished backup).
    pub async fn delete_folder(&self, name: &str, objects: &[ObjectInfo]) -> Result<Vec<(String, String)>> {
        let dir = self.layout.backup_dir(name);
        let is_mark = |k: &str| is_deleting_mark(k, &dir);
        let manifest_key = format!("{dir}{}", layout::MANIFEST_FILE);
        // What is deleted by key must still be what was listed: a name deleted and backed up
        // again since (by another run) is left alone, and gets no mark.
        for key in [manifest_key.clone(), format!("{dir}{}", crate::backup::CLAIM_FILE)] {
            let listed = objects.iter().find(|o| o.key == key);
            let now = self.repo.head(&key).await?;
            let same = match (listed, &now) {
                (Some(a), Some(b)) => a.same_object(b),
                (_, None) => true,
                (None, Some(_)) => false,
            };
            if !same {
                return Ok(vec![(key, "changed since it was listed (a new backup of that name?): left alone".into())]);
            }
        }
        let mut marks: Vec<String> = objects.iter().map(|o| o.key.clone()).filter(|k| is_mark(k)).collect();
        if marks.is_empty() {
            let mark = format!("{dir}{DELETING_PREFIX}{:020}", now_us().max(0));
            self.repo.put_new(&mark, Bytes::from_static(b"deleting\n")).await?;
            marks.push(mark);
        }
        match self.repo.delete(&manifest_key).await {
            Ok(()) | Err(StorageError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let claim_key = format!("{dir}{}", crate::backup::CLAIM_FILE);
        let rest: Vec<String> = objects
            .iter()
            .map(|o| o.key.clone())
            .filter(|k| *k != manifest_key && *k != claim_key && !is_mark(k))
            .collect();
        let mut failed = self.repo.delete_many(&rest).await?;
        if failed.is_empty() {
            failed = self.repo.delete_many(std::slice::from_ref(&claim_key)).await?;
        }
        if failed.is_empty() {
            failed = self.repo.delete_many(&marks).await?;
        }
        Ok(failed.into_iter().map(|(k, e)| (k, e.to_string())).collect())
    }

    /// Deletes an unfinished backup's folder (no manifest: killed, or still running) when
    /// its claim says it started at least `min_age_us` ago; a younger or unreadable claim
    /// is refused, as the backup may still be writing. Returns the objects deleted.
    pub async fn delete_abandoned(&self, name: &str, min_age_us: i64) -> Result<usize> {
        let dir = self.layout.backup_dir(name);
        let objects = self.repo.list(&dir).await?;
        let claim_key = format!("{dir}{}", crate::backup::CLAIM_FILE);
        let started = match self.repo.get(&claim_key).await {
            Ok(b) => String::from_utf8_lossy(&b).lines().find_map(|l| l.strip_prefix("started ").and_then(time_us)),
            Err(StorageError::NotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        // The newest of the claim's start and the folder's objects: a backup still
        // uploading keeps it young.
        let newest = objects.iter().map(ObjectInfo::modified_us).max();
        let since = match (started, newest) {
            (Some(a), Some(b)) => a.max(b),
            (a, b) => a.or(b).unwrap_or(i64::MAX),
        };
        if objects.iter().any(|o| o.key == format!("{dir}{}", layout::MANIFEST_FILE)) {
            return Err(Error::Config(format!("{dir} has a manifest: it is a backup, not an abandoned one")));
        }
        if let Some(k) = nested_key(&dir, &objects) {
            return Err(Error::Config(format!(
                "{dir} is not a backup folder: it holds nested keys such as {k} (a cluster's tree, another tool's files); nothing was deleted"
            )));
        }
        if !objects.iter().any(|o| o.key == claim_key) {
            return Err(Error::Config(format!(
                "{dir} has no claim ({claim_key}): it is no backup cloud-dump started; nothing was deleted"
            )));
        }
        let age = now_us() - since;
        if age < min_age_us {
            return Err(Error::Config(format!(
                "backup folder {dir} started {} ago (claim {claim_key}): it may still be running; an abandoned backup can be deleted {} after it started",
                fmt_age(age),
                fmt_age(min_age_us)
            )));
        }
        let failed = self.delete_folder(name, &objects).await?;
        if let Some((k, e)) = failed.first() {
            return Err(Error::Config(format!(
                "{} object(s) of {dir} are left, e.g. {k}: {e}; run it again",
                failed.len()
            )));
        }
        Ok(objects.len())
    }

    /// The WAL archive's objects, with the WAL file each belongs to.
    pub async fn wal_objects(&self) -> Result<Vec<(WalObject, ObjectInfo)>> {
        let dir = self.layout.wal_dir();
        Ok(self
            .repo
            .list(&dir)
            .await?
            .into_iter()
            .filter_map(|o| {
                let rel = o.key.strip_prefix(&dir)?;
                let name = wal_name_of(rel)?;
                Some((WalObject { key: o.key.clone(), name }, o))
            })
            .collect())
    }

    /// What the repository can restore (`info`): backups, WAL per timeline, the recovery
    /// window, sizes. Three LISTs (backups, WAL, everything for the size) and the manifests.
    /// The inventory it was made from comes back too.
    pub async fn summary(&self, now_us: i64) -> Result<(Inventory, crate::info::Summary)> {
        let inv = self.inventory().await?;
        let segment_size = inv.backups.first().map(|b| b.manifest.wal_segment_size()).unwrap_or(16 << 20);
        let objects = self.wal_objects().await?;
        let mut names: Vec<(String, std::time::SystemTime)> =
            objects.iter().map(|(w, o)| (w.name.clone(), o.last_modified)).collect();
        names.sort();
        names.dedup_by(|a, b| a.0 == b.0);
        let graph = crate::wal_archive::WalArchive::new(self.repo, &self.layout)
            .graph_of(&names, segment_size, &crate::WalKeys::default())
            .await?;
        let wal: Vec<crate::info::WalLine> = objects
            .into_iter()
            .map(|(w, o)| crate::info::WalLine { name: w.name, bytes: o.size, stored_us: o.modified_us() })
            .collect();
        let root = match self.layout.cluster() {
            Some(c) => format!("{c}/"),
            None => String::new(),
        };
        let repository_bytes: u64 = self.repo.list(&root).await?.iter().map(|o| o.size).sum();
        let backups = inv.backups.iter().map(|b| crate::info::BackupLine::of(&b.manifest, b.kept)).collect();
        let mut summary = crate::info::summarize(
            self.layout.cluster().map(str::to_owned),
            self.repo.url().to_owned(),
            backups,
            inv.unfinished.clone(),
            &wal,
            repository_bytes,
            segment_size,
            now_us,
            &graph,
        );
        summary.unreadable = inv.unreadable.clone();
        // The window ends at the last commit the archive holds on its path: a time target
        // past it cannot be reached (PostgreSQL ends recovery before it).
        if let Some((from, _)) = summary.recovery_window.clone() {
            let wal = crate::wal_archive::WalArchive::new(self.repo, &self.layout);
            if let Some(t) = wal.last_commit_on(&summary.recovery_window_path, 16).await? {
                if time_us(&from).is_some_and(|f| t >= f) {
                    summary.recovery_window = Some((from, crate::info::fmt_us(t)));
                    summary.recovery_window_end = Some("last commit".into());
                } else {
                    // Nothing committed since the window's first backup: only LSN targets
                    // (and latest) reach past it.
                    summary.recovery_window_end =
                        Some("newest segment (no commit since the first backup: no time target can be reached)".into());
                }
            }
        }
        Ok((inv, summary))
    }

    /// The system identifier the archive records (written by the first wal-push).
    pub async fn archive_system(&self) -> Result<Option<String>> {
        crate::wal_archive::WalArchive::new(self.repo, &self.layout).recorded_system().await
    }

    /// Plans an `expire` run (nothing is deleted). The WAL segment size is the one the
    /// newest backup's label tells.
    pub async fn plan_expire(&self, policy: &Policy) -> Result<(Inventory, ExpirePlan)> {
        let inv = self.inventory().await?;
        let objects = self.wal_objects().await?;
        let graph = self.graph_of(&inv, &objects).await?;
        let system = self.archive_system().await?;
        let facts = backup_facts(&inv, &self.layout, &graph, system.as_deref(), now_us());
        let wal: Vec<WalObject> = objects.into_iter().map(|(w, _)| w).collect();
        let plan = expire::plan(&facts, &wal, system.as_deref(), policy, inv.unreadable.len(), &graph)
            .map_err(Error::Config)?;
        Ok((inv, plan))
    }

    /// The timeline graph of the WAL objects listed, with the newest backup's segment size.
    pub async fn graph_of(
        &self,
        inv: &Inventory,
        objects: &[(WalObject, ObjectInfo)],
    ) -> Result<crate::timeline::TimelineGraph> {
        let segment_size = inv.backups.first().map(|b| b.manifest.wal_segment_size()).unwrap_or(16 << 20);
        let mut names: Vec<(String, std::time::SystemTime)> =
            objects.iter().map(|(w, o)| (w.name.clone(), o.last_modified)).collect();
        names.sort();
        names.dedup_by(|a, b| a.0 == b.0);
        crate::wal_archive::WalArchive::new(self.repo, &self.layout)
            .graph_of(&names, segment_size, &crate::WalKeys::default())
            .await
    }

    /// Carries out a plan: backups first (each manifest first), then WAL.
    pub async fn execute_expire(&self, inv: &Inventory, plan: &ExpirePlan) -> Result<ExpireOutcome> {
        let mut out = ExpireOutcome::default();
        for (name, objects) in &inv.interrupted {
            let failed = self.delete_folder(name, objects).await?;
            out.interrupted_finished.push(name.clone());
            out.failed.extend(failed);
        }
        for (name, verdict) in &plan.backups {
            if !verdict.is_delete() {
                continue;
            }
            let Some(b) = inv.backups.iter().find(|b| b.name() == name) else { continue };
            let failed = self.delete_backup(b).await?;
            out.backups_deleted.push(name.clone());
            out.failed.extend(failed);
        }
        let failed = self.repo.delete_many(&plan.wal_delete).await?;
        out.wal_deleted = plan.wal_delete.len() - failed.len();
        out.failed.extend(failed.into_iter().map(|(k, e)| (k, e.to_string())));
        Ok(out)
    }
}

/// A manifest whose stop time is this far past the store's own time for it is not believed.
const STOP_TIME_SLACK_US: i64 = 3600 * 1_000_000;

/// What the expire plan needs of each complete backup, with why it is not believed when it
/// is not: an object the manifest names missing or of another size (a manifest copied or
/// written without its backup), a stop time after the store wrote the manifest (a planted
/// date), or — older than an hour, in the archive's system — WAL from its start to its end
/// that the archive does not hold.
pub(crate) fn backup_facts(
    inv: &Inventory,
    layout: &Layout,
    graph: &crate::timeline::TimelineGraph,
    archive_system: Option<&str>,
    now: i64,
) -> Vec<BackupFacts> {
    let written_us = |b: &StoredBackup| {
        let dir = layout.backup_dir(b.name());
        b.objects.iter().find(|o| o.key.strip_prefix(&dir) == Some(layout::MANIFEST_FILE)).map(|o| o.modified_us())
    };
    let first_mac_us = inv.backups.iter().filter(|b| b.authenticated == Some(true)).filter_map(written_us).min();
    inv.backups
        .iter()
        .map(|b| {
            let m = &b.manifest;
            let dir = layout.backup_dir(b.name());
            let sizes: BTreeMap<&str, u64> =
                b.objects.iter().filter_map(|o| Some((o.key.strip_prefix(&dir)?, o.size))).collect();
            let stop = time_us(&m.stop_time);
            let written = sizes.get(layout::MANIFEST_FILE).and_then(|_| {
                b.objects
                    .iter()
                    .find(|o| o.key.strip_prefix(&dir) == Some(layout::MANIFEST_FILE))
                    .map(|o| o.modified_us())
            });
            let point = crate::recovery::backup_point(m);
            // A manifest without a MAC counts only when it was written before the first one
            // that has a valid MAC (backups from before manifests carried one).
            let mac_doubt = match b.authenticated {
                Some(false) if m.mac.is_some() => Some("its MAC does not verify (forged or damaged)".to_owned()),
                Some(false) if first_mac_us.zip(written).is_some_and(|(f, w)| w >= f) => {
                    Some("it has no MAC although it was written after backups that have one (forged?)".to_owned())
                }
                _ => None,
            };
            let doubt = if let Some(d) = mac_doubt {
                Some(d)
            } else if let Some(o) = m.objects.iter().find(|o| sizes.get(o.key.as_str()) != Some(&o.size)) {
                Some(format!("{} is not in the store at the size its manifest records ({} bytes)", o.key, o.size))
            } else if let (Some(stop), Some(w)) = (stop, written.filter(|w| *w > 0)) {
                (stop > w + STOP_TIME_SLACK_US).then(|| {
                    format!(
                        "its stop time {} is after the store wrote its manifest ({})",
                        m.stop_time,
                        crate::info::fmt_us(w)
                    )
                })
            } else {
                None
            };
            let doubt = doubt.or_else(|| {
                let ours = archive_system.is_none_or(|s| s == m.system_id);
                let old = stop.is_some_and(|t| now - t > STOP_TIME_SLACK_US);
                if !ours || !old || m.wal_included || graph.root().is_none() {
                    return None;
                }
                match graph.needed(&point, m.timeline, crate::timeline::Until::Consistent) {
                    Ok(Some(n)) if !n.missing.is_empty() => {
                        Some(format!("the WAL it needs to become consistent ({}) is not in the archive", n.missing[0]))
                    }
                    _ => None,
                }
            });
            BackupFacts {
                name: b.name().to_owned(),
                stop_time_us: stop,
                segment_size: m.wal_segment_size(),
                start_lsn: m.start_lsn,
                system_id: m.system_id.clone(),
                kept: b.kept,
                point,
                doubt,
            }
        })
        .collect()
}

/// What a pass over old versions did (or, in a dry run, would do).
#[derive(Debug, Default, Clone)]
pub struct OldVersionsOutcome {
    /// Data versions deleted for good (planned, in a dry run).
    pub removed: usize,
    /// Delete markers removed once their key's data was gone.
    pub markers_removed: usize,
    /// Data versions refused as still locked (AccessDenied while their retention may still
    /// run); their keys keep their markers and a later run tries again.
    pub locked: usize,
    /// Other refusals, by code (AccessDenied long after the lock should have passed counts
    /// here: the credentials may not delete versions).
    pub refused: BTreeMap<String, usize>,
    /// Deleted backup folders whose old versions stay, with why.
    pub hidden_backups_kept: Vec<(String, String)>,
}

impl<'a> PgRepository<'a> {
    /// After an expire on a bucket with Object Lock: deletes for good the old versions the
    /// [`old_versions::plan`] allows; versions still locked stay for a later run. The
    /// inventory is taken again (after the expire's deletes). `retention_days`: the
    /// bucket's default retention, to tell a lock from a missing permission.
    pub async fn expire_old_versions(
        &self,
        versions: &Versions,
        policy: &Policy,
        expire_plan: &ExpirePlan,
        retention_days: Option<u32>,
        dry_run: bool,
    ) -> Result<OldVersionsOutcome> {
        let inv = self.inventory().await?;
        let graph = match &expire_plan.wal_rule {
            Some(r) => r.graph.clone(),
            None => self.graph_of(&inv, &self.wal_objects().await?).await?,
        };
        let system = self.archive_system().await?;
        let facts = backup_facts(&inv, &self.layout, &graph, system.as_deref(), now_us());
        let live = inv.folders();
        let prefix = match self.layout.cluster() {
            Some(c) => format!("{c}/"),
            None => String::new(),
        };
        let listed = versions.list(&prefix).await.map_err(Error::OldVersions)?;
        // What each hidden backup was: every old version of its manifest, read.
        let mut hidden: BTreeMap<String, old_versions::Hidden> = BTreeMap::new();
        for (folder, manifests) in old_versions::hidden_folders(&listed, &self.layout, &live) {
            let dir = self.layout.backup_dir(&folder);
            // A keep mark it ever had keeps it (a later release may be someone else's).
            let kept = listed
                .iter()
                .filter(|x| !x.delete_marker)
                .filter_map(|x| x.key.strip_prefix(&dir))
                .any(|n| mark_stamp(n).is_some_and(|(t, keep)| keep && t <= now_us() + MARK_FUTURE_SLACK_US));
            let mut what = if manifests.is_empty() {
                old_versions::Hidden::NeverABackup
            } else {
                old_versions::Hidden::Backup(Vec::new())
            };
            for v in manifests {
                let bytes = versions.get(&v.key, &v.version_id).await.map_err(Error::OldVersions)?;
                let read = BackupManifest::parse(&bytes).ok().filter(|m| m.cluster.as_deref() == self.layout.cluster());
                match (&mut what, read) {
                    (old_versions::Hidden::Backup(all), Some(m)) => all.push(BackupFacts {
                        name: m.name.clone(),
                        stop_time_us: time_us(&m.stop_time),
                        segment_size: m.wal_segment_size(),
                        start_lsn: m.start_lsn,
                        system_id: m.system_id.clone(),
                        kept,
                        point: crate::recovery::backup_point(&m),
                        doubt: None,
                    }),
                    (old_versions::Hidden::Backup(_), None) => {
                        what = old_versions::Hidden::Unreadable(format!(
                            "version {} of its manifest is not a manifest of this repository",
                            v.version_id
                        ))
                    }
                    _ => {}
                }
            }
            hidden.insert(folder, what);
        }
        let plan =
            old_versions::plan(&listed, &self.layout, &hidden, &facts, system.as_deref(), expire_plan, policy, &graph);
        let mut out =
            OldVersionsOutcome { hidden_backups_kept: plan.hidden_backups_kept.clone(), ..Default::default() };
        if dry_run {
            out.removed = plan.remove.len() + plan.remove_last.len();
            out.markers_removed = plan.markers.len();
            return Ok(out);
        }
        // When each key's newest data was written: a lock from then has passed after the
        // bucket's retention (a day's slack for clocks and explicit locks).
        let written: BTreeMap<&str, i64> = listed
            .iter()
            .filter(|v| !v.delete_marker)
            .filter_map(|v| time_us(&v.last_modified).map(|t| (v.key.as_str(), t)))
            .fold(BTreeMap::new(), |mut m, (k, t)| {
                let e = m.entry(k).or_insert(t);
                *e = (*e).max(t);
                m
            });
        let now = now_us();
        let count = |refused: &[cloud_dump_storage::VersionRefused], out: &mut OldVersionsOutcome| {
            for r in refused {
                let lock_passed = retention_days
                    .zip(written.get(r.key.as_str()))
                    .is_some_and(|(d, t)| now > t + (i64::from(d) + 1) * 86_400_000_000);
                if r.code == "AccessDenied" && !lock_passed {
                    out.locked += 1;
                } else {
                    let code = if r.code == "AccessDenied" { "AccessDenied after the lock passed" } else { &r.code };
                    *out.refused.entry(code.to_owned()).or_default() += 1;
                }
            }
        };
        // 1. Everything but the manifests.
        let refused = versions.delete(&plan.remove).await.map_err(Error::OldVersions)?;
        count(&refused, &mut out);
        out.removed = plan.remove.len() - refused.len().min(plan.remove.len());
        // 2. A folder's manifest once the store lists nothing else of it.
        let after = versions.list(&prefix).await.map_err(Error::OldVersions)?;
        let left: std::collections::BTreeSet<&str> = after
            .iter()
            .filter(|v| !v.delete_marker && !v.key.ends_with(&format!("/{}", layout::MANIFEST_FILE)))
            .filter_map(|v| v.key.rsplit_once('/').map(|(dir, _)| dir))
            .collect();
        let last: Vec<(String, String)> = plan
            .remove_last
            .iter()
            .filter(|(k, _)| k.rsplit_once('/').is_some_and(|(dir, _)| !left.contains(dir)))
            .cloned()
            .collect();
        let refused = versions.delete(&last).await.map_err(Error::OldVersions)?;
        count(&refused, &mut out);
        out.removed += last.len() - refused.len().min(last.len());
        // 3. A key's markers once the store lists no data of it.
        let after = versions.list(&prefix).await.map_err(Error::OldVersions)?;
        let with_data: std::collections::BTreeSet<&str> =
            after.iter().filter(|v| !v.delete_marker).map(|v| v.key.as_str()).collect();
        let markers: Vec<(String, String)> =
            plan.markers.into_iter().filter(|(k, _)| !with_data.contains(k.as_str())).collect();
        let refused = versions.delete(&markers).await.map_err(Error::OldVersions)?;
        for r in &refused {
            *out.refused.entry(format!("{} (delete marker)", r.code)).or_default() += 1;
        }
        out.markers_removed = markers.len() - refused.len().min(markers.len());
        Ok(out)
    }
}

/// What an expire run did.
#[derive(Debug, Default, Clone)]
pub struct ExpireOutcome {
    pub backups_deleted: Vec<String>,
    /// Deletes cut short earlier, finished now.
    pub interrupted_finished: Vec<String>,
    pub wal_deleted: usize,
    /// Objects that could not be deleted (locked, denied): the next run tries again.
    pub failed: Vec<(String, String)>,
}

fn fmt_age(us: i64) -> String {
    let s = us.max(0) / 1_000_000;
    if s >= 3600 {
        format!("{:.1} h", s as f64 / 3600.0)
    } else {
        format!("{} min", s / 60)
    }
}

pub fn now_us() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64
}

/// RFC 3339 → µs since the epoch, if it reads.
pub fn time_us(s: &str) -> Option<i64> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| (t.unix_timestamp_nanos() / 1000) as i64)
}

/// RFC 3339 → µs since the epoch (0 for an unreadable time).
pub fn parse_time_us(s: &str) -> i64 {
    time_us(s).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_mark_decides_by_store_time() {
        let k = |s: i64| format!("keep-{s:020}");
        let r = |s: i64| format!("release-{s:020}");
        let kept = |v: &[(String, i64)]| kept_by_marks(v.iter().map(|(n, t)| (n.as_str(), *t)));
        assert!(!kept(&[]));
        assert!(kept(&[(k(5), 100)]));
        assert!(!kept(&[(k(5), 100), (r(6), 200)]));
        assert!(kept(&[(k(5), 100), (r(6), 200), (k(7), 300)]));
        // One store time: the stamp decides, and at one stamp keeping wins.
        assert!(!kept(&[(k(5), 100), (r(6), 100)]));
        assert!(kept(&[(k(5), 100), (r(5), 100)]));
        assert!(!kept(&[("keep-x".into(), 1), ("base.tar.zst".into(), 1), ("manifest.json".into(), 1)]));
        // A keep written by a host a day ahead, then a release from a host on time: the
        // store's clock orders them, whatever the stamps say.
        let day = 86_400_000_000i64;
        assert!(!kept(&[(k(10 * day), 100), (r(9 * day), 200)]));
        assert!(kept(&[(r(9 * day), 100), (k(10 * day), 200)]));
        assert_eq!(newest_mark([k(5), r(9)].iter().map(String::as_str), 1_000_000_000), Some(9));
    }

    #[test]
    fn wal_names_of_objects() {
        let seg = "000000010000000000000002";
        assert_eq!(wal_name_of(&format!("{seg}.zst")).as_deref(), Some(seg));
        assert_eq!(wal_name_of(&format!("{seg}.sum")).as_deref(), Some(seg));
        assert_eq!(wal_name_of(&format!("{seg}.zst.age")).as_deref(), Some(seg));
        assert_eq!(wal_name_of(seg).as_deref(), Some(seg));
        assert_eq!(wal_name_of("00000002.history.zst").as_deref(), Some("00000002.history"));
        assert_eq!(wal_name_of(&format!("{seg}.partial.lz4")).as_deref(), Some(&*format!("{seg}.partial")));
        assert_eq!(
            wal_name_of(&format!("{seg}.00000028.backup.sum")).as_deref(),
            Some(&*format!("{seg}.00000028.backup"))
        );
        assert_eq!(wal_name_of("system-identifier"), None);
        assert_eq!(wal_name_of(".key"), None);
    }
}
