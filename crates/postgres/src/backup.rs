//! A physical base backup streamed from the replication connection into the repository:
//! socket → (per archive) compress → encrypt → SHA-256 → multipart upload, and
//! `manifest.json` last. Nothing touches the local disk.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use cloud_dump_pipeline::{EncodeSpec, Sink, Stored};
use cloud_dump_storage::Repo;

use crate::layout::{self, Layout};
use postgres_protocol::message::backend::Message;
use tokio::task::JoinHandle;

use crate::client::{data_row, server_error, Connection};
use crate::conninfo::ConnConfig;
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::manifest::{BackupManifest, ObjectEntry, ObjectKind, TablespaceEntry, FORMAT_VERSION};
use crate::progress::Progress;
use crate::protocol::{self, BaseBackupOptions, CopyEvent, PG15};

pub struct BackupRequest {
    pub name: String,
    pub layout: Layout,
    pub conn: ConnConfig,
    pub spec: Arc<EncodeSpec>,
    pub fast_checkpoint: bool,
    pub max_rate_kb: Option<u32>,
    /// Archives whose upload may still be finishing while the next one streams.
    pub parallel: usize,
    pub label: Option<String>,
    /// Turns true when the backup must stop (SIGINT/SIGTERM): it then fails like any other
    /// failure — uploads aborted, its objects removed.
    pub cancel: Option<tokio::sync::watch::Receiver<bool>>,
    /// Write a keep mark before the manifest: the backup is kept from the moment it exists.
    pub keep: bool,
}

/// One row of the tablespace header: `None` oid is the main data directory.
#[derive(Debug, Clone)]
struct TablespaceRow {
    oid: Option<u32>,
    location: String,
    size: Option<u64>,
}

struct Current {
    kind: ObjectKind,
    oid: Option<u32>,
    location: String,
    sink: Sink,
    /// First bytes of the base archive, to read `backup_label` from.
    head: Option<Vec<u8>>,
}

/// An archive that is stored.
struct Done {
    kind: ObjectKind,
    oid: Option<u32>,
    location: String,
    label: Option<String>,
    stored: Stored,
}

struct Pending {
    kind: ObjectKind,
    oid: Option<u32>,
    location: String,
    label: Option<String>,
    task: cloud_dump_pipeline::Finishing,
}

const LABEL_SNIFF: usize = 64 << 10;

pub async fn run_backup(repo: &Repo, req: &BackupRequest, progress: &dyn Progress) -> Result<BackupManifest> {
    layout::validate_component("backup name", &req.name).map_err(Error::Config)?;
    let dir = req.layout.backup_dir(&req.name);
    if !repo.list(&dir).await?.is_empty() {
        return Err(Error::BackupExists { name: req.name.clone(), repo: repo.url().to_owned() });
    }
    // The name is claimed with one create-only write before anything else is stored: of
    // two backups with one name, the second stops here, having written nothing, and a
    // failed run removes only what it wrote itself.
    let claim_key = format!("{dir}{CLAIM_FILE}");
    let claim = format!(
        "cloud-dump backup claim\nname {}\npid {}\nstarted {}\ntoken {}\n",
        req.name,
        std::process::id(),
        now_rfc3339(),
        hex::encode(rand_token())
    );
    match repo.put_new(&claim_key, Bytes::from(claim.clone())).await {
        Ok(()) => {}
        Err(cloud_dump_storage::StorageError::AlreadyExists { .. }) => {
            return Err(Error::BackupExists { name: req.name.clone(), repo: repo.url().to_owned() })
        }
        // A write reported as failed may have landed: ours if it holds our token.
        Err(e) => match repo.get(&claim_key).await {
            Ok(b) if b == claim.as_bytes() => {}
            _ => return Err(e.into()),
        },
    }
    if !repo.create_is_atomic() {
        // Where the store may check-then-write, two claims can both "succeed": the later
        // write wins. Read it back once a racing write would have landed.
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        match repo.get(&claim_key).await {
            Ok(b) if b == claim.as_bytes() => {}
            Ok(_) => return Err(Error::BackupExists { name: req.name.clone(), repo: repo.url().to_owned() }),
            Err(e) => return Err(e.into()),
        }
    }
    let owned = Owned { repo, claim_key, claim };
    let mut written = Vec::new();
    let mut unknown = false;
    let result = backup_claimed(repo, req, &dir, progress, &mut written, &mut unknown).await;
    // An unknown manifest outcome leaves everything, claim included, as it is.
    if result.is_err() && !unknown {
        owned.cleanup(&written).await;
    }
    result
}

/// The backup once its name is claimed. `written` collects the key of every object stored,
/// so that a failure removes exactly those.
async fn backup_claimed(
    repo: &Repo,
    req: &BackupRequest,
    dir: &str,
    progress: &dyn Progress,
    written: &mut Vec<String>,
    unknown: &mut bool,
) -> Result<BackupManifest> {
    let dir = dir.to_owned();

    // A passphrase is stretched once (scrypt, about a second) to seal a per-backup key that
    // the archives are encrypted to. It runs while the server checkpoints.
    let seal = match &req.spec.encryption {
        cloud_dump_pipeline::Encryption::Passphrase(p) => {
            let p = p.clone();
            Some(tokio::task::spawn_blocking(move || cloud_dump_pipeline::repokey::seal_new_identity(&p)))
        }
        _ => None,
    };

    let mut conn = Connection::connect(&req.conn).await?;
    let system = conn.identify_system().await?;
    let version = conn.server_version().to_owned();
    let version_num = conn.server_version_num();
    if version_num < 100000 {
        return Err(Error::Config(format!("PostgreSQL {version} is not supported; cloud-dump needs 10 or newer")));
    }
    tracing::info!(
        "connected to PostgreSQL {} ({}), system {}, timeline {}",
        version,
        req.conn.describe(),
        system.system_id,
        system.timeline
    );
    let start_time = now_rfc3339();
    let options = BaseBackupOptions {
        label: req.label.clone().unwrap_or_else(|| format!("cloud-dump {}", req.name)),
        fast_checkpoint: req.fast_checkpoint,
        wal: true,
        manifest: version_num >= 130000,
        tablespace_map: true,
        progress: true,
        max_rate_kb: req.max_rate_kb,
    };
    conn.send_query(&protocol::base_backup_command(&options, version_num)).await?;
    tracing::info!("base backup started ({} checkpoint)", if req.fast_checkpoint { "fast" } else { "spread" });

    let mut state = Streamer {
        cancel: req.cancel.clone(),
        repo,
        dir: &dir,
        spec: req.spec.clone(),
        seal,
        sealed_key: None,
        identity: None,
        parallel: req.parallel.max(1),
        version_num,
        result_sets: Vec::new(),
        tablespaces: Vec::new(),
        copy_outs: 0,
        current: None,
        pending: VecDeque::new(),
        done: Vec::new(),
        progress,
    };
    let streamed = state.stream(&mut conn).await;
    let finished = match streamed {
        Ok(()) => state.drain().await,
        Err(e) => Err(e),
    };
    if let Err(e) = finished {
        written.extend(state.abort().await);
        return Err(e);
    }
    written.extend(state.done.iter().map(|d| d.stored.key.clone()));
    progress.end();
    conn.terminate().await;

    let end = state.result_sets.last().and_then(|rs| rs.first()).cloned().unwrap_or_default();
    let end_lsn: Lsn = end
        .first()
        .cloned()
        .flatten()
        .ok_or_else(|| Error::Protocol("no end position after the base backup".into()))?
        .parse()
        .map_err(Error::Protocol)?;
    let end_tli: u32 = end.get(1).cloned().flatten().and_then(|t| t.parse().ok()).unwrap_or(system.timeline);
    let label_text = state
        .done
        .iter()
        .find_map(|d| d.label.clone())
        .ok_or_else(|| Error::Protocol("the base archive holds no backup_label".into()))?;
    let label = protocol::parse_backup_label(&label_text).map_err(Error::Protocol)?;

    let mut objects = Vec::new();
    let mut tablespaces = Vec::new();
    for d in state.sorted_done() {
        let key = d.stored.key.strip_prefix(dir.as_str()).unwrap_or(&d.stored.key).to_owned();
        if d.kind == ObjectKind::Tablespace {
            tablespaces.push(TablespaceEntry {
                oid: d.oid.unwrap_or(0),
                location: d.location.clone(),
                key: key.clone(),
            });
        }
        objects.push(ObjectEntry {
            key,
            kind: d.kind.clone(),
            size: d.stored.size,
            sha256: d.stored.sha256.clone(),
            raw_size: d.stored.raw_size,
            tablespace_oid: d.oid,
        });
    }
    let stop_time = now_rfc3339();
    let manifest = BackupManifest {
        format_version: FORMAT_VERSION,
        name: req.name.clone(),
        cluster: req.layout.cluster().map(str::to_owned),
        timestamp: stop_time.clone(),
        start_time,
        stop_time,
        pg_version: version.split_whitespace().next().unwrap_or(&version).to_owned(),
        pg_version_num: version_num,
        system_id: system.system_id.clone(),
        timeline: if label.start_timeline > 0 { label.start_timeline } else { end_tli },
        start_lsn: label.start_lsn,
        end_lsn,
        backup_label: label_text,
        wal_included: true,
        compression: req.spec.compression.name().to_owned(),
        encrypted: req.spec.encryption.is_on(),
        encryption: req.spec.encryption.mode().to_owned(),
        sealed_key: state.sealed_key.clone(),
        tablespaces,
        objects,
        mac: None,
    };
    // On a passphrase-encrypted backup the manifest and its marks carry a MAC under the
    // backup's own key: a writer without the passphrase cannot forge either.
    let mac_key = state.identity.as_ref().map(|id| {
        use cloud_dump_pipeline::ExposeSecret;
        crate::mac::backup_mac_key(id.to_string().expose_secret())
    });
    let mut manifest = manifest;
    if let Some(k) = &mac_key {
        manifest.mac = Some(crate::mac::mac_hex(k, &manifest.mac_message()));
    }
    if req.keep {
        let key = crate::repository::keep_mark_key(&dir, crate::repository::now_us());
        let name = key.strip_prefix(&dir).unwrap_or(&key).to_owned();
        repo.put_new(&key, Bytes::from(crate::mac::mark_body(true, &name, mac_key.as_ref()))).await?;
        written.push(key);
    }
    let manifest_key = format!("{dir}{}", layout::MANIFEST_FILE);
    // A delete of this folder begun meanwhile (`delete --abandoned`, or a planted mark):
    // the backup must not become visible.
    let deleting = |objects: &[cloud_dump_storage::ObjectInfo]| {
        objects.iter().any(|o| crate::repository::is_deleting_mark(&o.key, &dir))
    };
    if deleting(&repo.list(&dir).await?) {
        return Err(Error::Restore(format!(
            "backup {}: its folder {dir} is being deleted (a deleting mark appeared while it ran); the backup was not completed",
            manifest.name
        )));
    }
    let json = manifest.to_json();
    if let Err(e) = repo.put_new(&manifest_key, Bytes::from(json.clone())).await {
        // The manifest makes the backup visible. A write reported as failed may have
        // landed, or land later (a timed-out PUT): the archives stay, so whatever becomes
        // visible is complete; only the operator removes them.
        match repo.get(&manifest_key).await {
            Ok(b) if b == json => {}
            _ => {
                *unknown = true;
                return Err(Error::Restore(format!(
                    "{e}; {manifest_key} may or may not be stored: the archives are left in place (list shows the backup if it was stored; otherwise remove {dir} by hand)"
                )));
            }
        }
    }
    // Success only if what the manifest names is all there now, and no delete began. When
    // that cannot be told, everything stays as it is (the outcome is unknown).
    let after = match repo.list(&dir).await {
        Ok(a) => a,
        Err(e) => {
            *unknown = true;
            return Err(Error::Restore(format!(
                "{e}; backup {} was written but could not be checked afterwards: everything is left in place (verify --name {} tells)",
                manifest.name, manifest.name
            )));
        }
    };
    let mut missing = Vec::new();
    for o in &manifest.objects {
        let key = format!("{dir}{}", o.key);
        if after.iter().any(|a| a.key == key && a.size == o.size) {
            continue;
        }
        // A listing may lag a write: ask the object itself before calling it missing.
        match repo.head(&key).await {
            Ok(Some(h)) if h.size == o.size => {}
            Ok(_) => missing.push(o.key.as_str()),
            Err(e) => {
                *unknown = true;
                return Err(Error::Restore(format!(
                    "{e}; backup {} was written but could not be checked afterwards: everything is left in place",
                    manifest.name
                )));
            }
        }
    }
    if deleting(&after) || !missing.is_empty() {
        // The manifest goes first: the backup is invisible before anything else goes.
        written.insert(0, manifest_key.clone());
        return Err(Error::Restore(format!(
            "backup {}: its folder {dir} was deleted while the manifest was written ({}); the backup is not usable",
            manifest.name,
            if missing.is_empty() { "a deleting mark".to_owned() } else { format!("missing: {}", missing.join(", ")) }
        )));
    }
    tracing::info!(
        "backup {} complete: {} objects, {} bytes stored, LSN {} → {}",
        manifest.name,
        manifest.objects.len(),
        manifest.stored_size(),
        manifest.start_lsn,
        manifest.end_lsn
    );
    Ok(manifest)
}

/// Object that claims a backup name (create-only, written first, kept with the backup).
pub const CLAIM_FILE: &str = "claim";

fn rand_token() -> [u8; 16] {
    use sha2::Digest;
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let h = sha2::Sha256::digest(format!("{}:{}:{:?}", std::process::id(), t.as_nanos(), std::thread::current().id()));
    let mut out = [0u8; 16];
    out.copy_from_slice(&h[..16]);
    out
}

/// What a run owns once it has claimed its name.
struct Owned<'a> {
    repo: &'a Repo,
    claim_key: String,
    claim: String,
}

impl Owned<'_> {
    /// Best effort after a failure: remove exactly the objects this run stored, then its
    /// claim if it is still the one this run wrote (the backup is already invisible
    /// without its manifest; this frees the storage and the name).
    async fn cleanup(&self, written: &[String]) {
        for k in written {
            let _ = self.repo.delete(k).await;
        }
        if let Ok(b) = self.repo.get(&self.claim_key).await {
            if b == self.claim.as_bytes() {
                let _ = self.repo.delete(&self.claim_key).await;
            }
        }
    }
}

/// Completes when `cancel` turns true; never without one.
async fn until_cancelled(cancel: &mut Option<tokio::sync::watch::Receiver<bool>>) {
    match cancel {
        Some(rx) => {
            if rx.wait_for(|c| *c).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// Now, to the microsecond: point-in-time restores compare targets with a backup's end,
/// and a time rounded down to the second could make a backup that ended after the target
/// look usable for it.
fn now_rfc3339() -> String {
    let t = time::OffsetDateTime::now_utc();
    t.replace_nanosecond(t.microsecond() * 1000)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

type Seal = JoinHandle<std::io::Result<(age::x25519::Identity, String)>>;

struct Streamer<'a> {
    cancel: Option<tokio::sync::watch::Receiver<bool>>,
    repo: &'a Repo,
    dir: &'a str,
    spec: Arc<EncodeSpec>,
    /// The per-backup key being sealed with the passphrase; resolved before the first archive.
    seal: Option<Seal>,
    sealed_key: Option<String>,
    /// The backup's own identity once sealed (its MAC key derives from it).
    identity: Option<age::x25519::Identity>,
    parallel: usize,
    version_num: u32,
    result_sets: Vec<Vec<Vec<Option<String>>>>,
    tablespaces: Vec<TablespaceRow>,
    copy_outs: usize,
    current: Option<Current>,
    pending: VecDeque<Pending>,
    done: Vec<Done>,
    progress: &'a dyn Progress,
}

impl Streamer<'_> {
    async fn stream(&mut self, conn: &mut Connection) -> Result<()> {
        let mut failure = None;
        loop {
            let msg = tokio::select! {
                m = conn.read_message() => m?,
                _ = until_cancelled(&mut self.cancel) => {
                    return Err(Error::Restore("interrupted (SIGINT/SIGTERM)".into()));
                }
            };
            match msg {
                Message::RowDescription(_) => self.result_sets.push(Vec::new()),
                Message::DataRow(r) => {
                    let row = data_row(&r)?;
                    match self.result_sets.last_mut() {
                        Some(rs) => rs.push(row),
                        None => return Err(Error::Protocol("data row outside a result set".into())),
                    }
                    if self.result_sets.len() == 2 {
                        self.on_tablespace_header();
                    }
                }
                Message::CopyOutResponse(_) => {
                    if self.copy_outs == 0 {
                        let sizes: Vec<u64> = self.tablespaces.iter().filter_map(|t| t.size).collect();
                        let total = (sizes.len() == self.tablespaces.len()).then(|| sizes.iter().sum());
                        self.progress.begin("backup", total);
                    }
                    if self.version_num < PG15 {
                        self.start_legacy_archive().await?;
                    }
                    self.copy_outs += 1;
                }
                Message::CopyData(body) => {
                    let data = body.into_bytes();
                    if self.version_num >= PG15 {
                        self.on_copy_event(data).await?;
                    } else {
                        self.write(data).await?;
                    }
                }
                Message::CopyDone => {
                    if self.version_num < PG15 {
                        self.finish_current(true).await?;
                    } else {
                        self.finish_current(false).await?;
                    }
                }
                Message::ErrorResponse(body) => failure = Some(server_error(body.fields())),
                Message::ReadyForQuery(_) => break,
                Message::CommandComplete(_) => {}
                _ => {}
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn on_tablespace_header(&mut self) {
        let rows = &self.result_sets[1];
        let row = rows.last().expect("just pushed");
        let get = |i: usize| row.get(i).cloned().flatten();
        self.tablespaces.push(TablespaceRow {
            oid: get(0).and_then(|s| s.parse().ok()),
            location: get(1).unwrap_or_default(),
            size: get(2).and_then(|s| s.parse::<u64>().ok()).map(|kb| kb * 1024),
        });
    }

    async fn on_copy_event(&mut self, msg: Bytes) -> Result<()> {
        match protocol::parse_copy_event(&msg).map_err(Error::Protocol)? {
            CopyEvent::NewArchive { name, location } => {
                self.finish_current(false).await?;
                let row = self
                    .tablespaces
                    .iter()
                    .find(|t| if location.is_empty() { t.oid.is_none() } else { t.location == location })
                    .cloned();
                let oid = row.as_ref().and_then(|r| r.oid);
                let stem = if name.ends_with(".tar") { name.clone() } else { format!("{name}.tar") };
                let kind = if oid.is_none() && location.is_empty() { ObjectKind::Base } else { ObjectKind::Tablespace };
                self.start(kind, oid, location, &stem, row.and_then(|r| r.size)).await
            }
            CopyEvent::Data(_) => self.write(msg.slice(1..)).await,
            CopyEvent::Progress(_) => Ok(()),
            CopyEvent::Manifest => {
                self.finish_current(false).await?;
                self.start(ObjectKind::BackupManifest, None, String::new(), "backup_manifest", None).await
            }
        }
    }

    async fn start_legacy_archive(&mut self) -> Result<()> {
        let idx = self.copy_outs;
        if let Some(row) = self.tablespaces.get(idx).cloned() {
            let (kind, stem) = match row.oid {
                None => (ObjectKind::Base, "base.tar".to_owned()),
                Some(oid) => (ObjectKind::Tablespace, format!("{oid}.tar")),
            };
            self.start(kind, row.oid, row.location.clone(), &stem, row.size).await
        } else {
            self.start(ObjectKind::BackupManifest, None, String::new(), "backup_manifest", None).await
        }
    }

    async fn start(
        &mut self,
        kind: ObjectKind,
        oid: Option<u32>,
        location: String,
        stem: &str,
        size: Option<u64>,
    ) -> Result<()> {
        if let Some(seal) = self.seal.take() {
            let (identity, sealed) = seal.await.map_err(|e| Error::Io(std::io::Error::other(e)))??;
            let mut spec = (*self.spec).clone();
            spec.encryption = cloud_dump_pipeline::Encryption::Recipients(vec![identity.to_public()]);
            self.spec = Arc::new(spec);
            self.sealed_key = Some(sealed);
            self.identity = Some(identity);
        }
        let key = format!("{}{}", self.dir, self.spec.object_name(stem));
        tracing::debug!("streaming {key}");
        let sink = Sink::start(self.repo, &key, size, self.spec.clone()).await?;
        let head = (kind == ObjectKind::Base).then(Vec::new);
        self.current = Some(Current { kind, oid, location, sink, head });
        Ok(())
    }

    async fn write(&mut self, data: Bytes) -> Result<()> {
        let cur =
            self.current.as_mut().ok_or_else(|| Error::Protocol("archive data before any archive began".into()))?;
        if let Some(head) = cur.head.as_mut() {
            if head.len() < LABEL_SNIFF {
                let n = (LABEL_SNIFF - head.len()).min(data.len());
                head.extend_from_slice(&data[..n]);
            }
        }
        if cur.kind != ObjectKind::BackupManifest {
            self.progress.advance(data.len() as u64);
        }
        cur.sink.write(data).await?;
        Ok(())
    }

    /// Ends the archive being streamed; its upload finishes in the background, with at
    /// most `parallel` such uploads at once.
    async fn finish_current(&mut self, legacy: bool) -> Result<()> {
        let Some(mut cur) = self.current.take() else {
            return Ok(());
        };
        if legacy && cur.kind != ObjectKind::BackupManifest {
            // Servers before 15 leave the end-of-archive marker to the client.
            cur.sink.write(Bytes::from(vec![0u8; 1024])).await?;
        }
        let label = cur
            .head
            .as_deref()
            .and_then(|h| protocol::tar_find_file(h, "backup_label"))
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        let task = cur.sink.finish().await?;
        self.pending.push_back(Pending { kind: cur.kind, oid: cur.oid, location: cur.location, label, task });
        while self.pending.len() > self.parallel {
            self.complete_oldest().await?;
        }
        Ok(())
    }

    async fn complete_oldest(&mut self) -> Result<()> {
        if let Some(p) = self.pending.pop_front() {
            let stored = p.task.wait().await?;
            tracing::info!("stored {} ({} bytes)", stored.key, stored.size);
            self.done.push(Done { kind: p.kind, oid: p.oid, location: p.location, label: p.label, stored });
        }
        Ok(())
    }

    async fn drain(&mut self) -> Result<()> {
        self.finish_current(self.version_num < PG15).await?;
        while !self.pending.is_empty() {
            self.complete_oldest().await?;
        }
        if !self.done.iter().any(|d| d.kind == ObjectKind::Base) {
            return Err(Error::Protocol("the server sent no base archive".into()));
        }
        Ok(())
    }

    /// Stops every upload (aborting multipart uploads on the server, so no parts stay
    /// behind) and returns the keys of every object this run stored.
    async fn abort(&mut self) -> Vec<String> {
        if let Some(cur) = self.current.take() {
            cur.sink.abort().await;
        }
        let mut written: Vec<String> = self.done.iter().map(|d| d.stored.key.clone()).collect();
        for p in self.pending.drain(..) {
            if let Some(k) = p.task.abort().await {
                written.push(k);
            }
        }
        written
    }

    /// Stored archives in manifest order: base, tablespaces by oid, the server manifest.
    fn sorted_done(&mut self) -> &[Done] {
        self.done.sort_by_key(|d| (matches!(d.kind, ObjectKind::BackupManifest), d.kind != ObjectKind::Base, d.oid));
        &self.done
    }
}
