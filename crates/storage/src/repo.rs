//! [`Repo`]: one repository (a store plus a key prefix) with the few operations backups
//! need, implemented once over `object_store` so every backend gets every feature.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};

use crate::diagnose::{ObservingConnector, Problem, Service, Watch, OBSERVATION_AGE};
use crate::error::{Result, StorageError};
use crate::location::Location;
use crate::storj;

/// How to reach the store. Secrets are kept out of `Debug`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct StorageOptions {
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub s3_virtual_hosted_style: bool,
    pub s3_allow_http: bool,
    pub s3_skip_verify: bool,
    /// The bucket has S3 Object Lock: every upload carries Content-MD5, as it requires.
    pub s3_object_lock: bool,
    pub s3_access_key_id: Option<String>,
    pub s3_secret_access_key: Option<String>,
    pub storj_access: Option<String>,
    pub storj_auth_service: Option<String>,
    pub storj_gateway: Option<String>,
    /// Parts of one multipart upload in flight at once (default 4).
    pub parts_in_flight: usize,
    /// Longest silence on a connection while a request streams (S3, GCS, Azure); a whole
    /// transfer may take as long as it needs. `None`: 300 s. (With reqwest the timer also
    /// runs while a request body is sent: an upload part must leave within it.)
    pub read_timeout: Option<std::time::Duration>,
}

impl std::fmt::Debug for StorageOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageOptions")
            .field("s3_endpoint", &self.s3_endpoint)
            .field("s3_region", &self.s3_region)
            .field("s3_virtual_hosted_style", &self.s3_virtual_hosted_style)
            .field("s3_allow_http", &self.s3_allow_http)
            .field("s3_access_key_id", &self.s3_access_key_id.as_ref().map(|_| "<set>"))
            .field("storj_access", &self.storj_access.as_ref().map(|_| "<set>"))
            .field("storj_gateway", &self.storj_gateway)
            .field("read_timeout", &self.read_timeout)
            .finish_non_exhaustive()
    }
}

/// The file a file:// repository's directory holds from its creation (first backup or
/// replication): an empty directory without it is an unmounted volume, not a repository.
pub const REPOSITORY_MARKER: &str = "cloud-dump-repository";

/// Object sizes and checksums as the store reports them.
#[derive(Debug, Clone)]
pub struct ObjectInfo {
    /// Key relative to the repository root.
    pub key: String,
    pub size: u64,
    pub last_modified: std::time::SystemTime,
    /// The store's entity tag, where it gives one (same in LIST and HEAD).
    pub e_tag: Option<String>,
}

impl ObjectInfo {
    /// When it was last written, in µs since the epoch (0 before the epoch).
    pub fn modified_us(&self) -> i64 {
        self.last_modified.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
    }

    /// Whether two looks at a key saw the same object: the entity tags where both have one,
    /// else size and time to the second (LIST and HEAD differ in sub-second precision).
    pub fn same_object(&self, other: &ObjectInfo) -> bool {
        let secs = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        match (&self.e_tag, &other.e_tag) {
            (Some(a), Some(b)) => {
                let bare = |t: &str| t.trim_start_matches("W/").trim_matches('"').to_owned();
                bare(a) == bare(b) && self.size == other.size
            }
            _ => self.size == other.size && secs(self.last_modified) == secs(other.last_modified),
        }
    }
}

/// The directory mode that goes with file mode `mode`: who may read may also search.
pub fn dir_mode_for(mode: u32) -> u32 {
    let m = mode & 0o666;
    m | ((m & 0o444) >> 2)
}

#[derive(Clone)]
pub struct Repo {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    url: String,
    parts_in_flight: usize,
    /// The directory of a file:// repository, whose writes we fsync ourselves.
    local_root: Option<std::path::PathBuf>,
    /// For error messages: which store, and what its HTTP clients saw last.
    service: Service,
    watch: Arc<Watch>,
}

impl std::fmt::Debug for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Repo({})", self.url)
    }
}

/// Part size for multipart uploads: large enough that S3's 10,000-part limit allows
/// multi-terabyte archives when the size is known up front.
pub fn part_size_for(size_hint: Option<u64>) -> usize {
    const MIN: u64 = 16 << 20;
    let wanted = size_hint.map(|s| s / 9_000).unwrap_or(0);
    wanted.clamp(MIN, 512 << 20) as usize
}

impl Repo {
    /// Opens an existing repository at `url`. A file:// repository whose directory is
    /// missing is an error (an unmounted volume must not look like an empty repository);
    /// only [`Repo::create`] makes it. Network access happens only for Storj access grants.
    pub async fn open(url: &str, opts: &StorageOptions) -> Result<Repo> {
        Repo::open_inner(url, opts, false).await
    }

    /// Opens the repository at `url`, creating a file:// repository's directory first (the
    /// commands that start a repository: a backup, SQLite replication).
    pub async fn create(url: &str, opts: &StorageOptions) -> Result<Repo> {
        Repo::open_inner(url, opts, true).await
    }

    async fn open_inner(url: &str, opts: &StorageOptions, create: bool) -> Result<Repo> {
        let location = Location::parse(url)?;
        let cfg = |e: object_store::Error| StorageError::Config(crate::diagnose::one_line(&e));
        let service = service_of(&location, opts);
        let watch = Watch::with_content_md5(metadata_hosts(&location), opts.s3_object_lock);
        let observe = || ObservingConnector(watch.clone());
        let local_root = match &location {
            Location::File { path } => Some(path.clone()),
            _ => None,
        };
        let (store, prefix): (Arc<dyn ObjectStore>, String) = match location {
            Location::S3 { bucket, prefix } => {
                (Arc::new(s3_builder(&bucket, opts)?.with_http_connector(observe()).build().map_err(cfg)?), prefix)
            }
            Location::Storj { bucket, prefix } => {
                let mut b = s3_builder(&bucket, opts)?.with_http_connector(observe());
                let gateway = match (&opts.storj_access, &opts.s3_access_key_id) {
                    (Some(grant), _) => {
                        let service =
                            opts.storj_auth_service.as_deref().unwrap_or(storj::DEFAULT_AUTH_SERVICE);
                        let creds = storj::exchange_access_grant(service, grant).await?;
                        b = b
                            .with_access_key_id(creds.access_key_id)
                            .with_secret_access_key(creds.secret_access_key);
                        opts.storj_gateway.clone().or(creds.endpoint)
                    }
                    (None, Some(_)) => opts.storj_gateway.clone().or(opts.s3_endpoint.clone()),
                    (None, None) => {
                        return Err(StorageError::Config(
                            "storj:// needs --storj-access (an access grant) or S3 credentials for the gateway (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)".into(),
                        ))
                    }
                };
                let gateway = gateway.unwrap_or_else(|| storj::DEFAULT_GATEWAY.to_owned());
                b = b
                    .with_endpoint(gateway.clone())
                    .with_allow_http(opts.s3_allow_http || gateway.starts_with("http://"));
                (Arc::new(b.build().map_err(cfg)?), prefix)
            }
            Location::Gcs { bucket, prefix } => (
                Arc::new(
                    GoogleCloudStorageBuilder::from_env()
                        .with_bucket_name(bucket)
                        .with_client_options(client_options(opts, opts.s3_allow_http || env_true("GOOGLE_ALLOW_HTTP")))
                        .with_http_connector(observe())
                        .build()
                        .map_err(cfg)?,
                ),
                prefix,
            ),
            Location::Azure { container, prefix } => (
                Arc::new(
                    MicrosoftAzureBuilder::from_env()
                        .with_container_name(container)
                        .with_client_options(client_options(
                            opts,
                            opts.s3_allow_http
                                || env_true("AZURE_ALLOW_HTTP")
                                || env_true("AZURE_STORAGE_USE_EMULATOR"),
                        ))
                        .with_http_connector(observe())
                        .build()
                        .map_err(cfg)?,
                ),
                prefix,
            ),
            Location::File { path } => {
                let marker = path.join(REPOSITORY_MARKER);
                if create {
                    std::fs::create_dir_all(&path).map_err(|e| {
                        StorageError::Config(format!("cannot create repository directory {}: {e}", path.display()))
                    })?;
                    if !marker.exists() {
                        let mark = || -> std::io::Result<()> {
                            std::fs::write(&marker, b"cloud-dump repository\n")?;
                            std::fs::File::open(&marker)?.sync_all()?;
                            std::fs::File::open(&path)?.sync_all()
                        };
                        mark().map_err(|e| StorageError::Config(format!("cannot write {}: {e}", marker.display())))?;
                    }
                } else {
                    // A missing directory, or an empty one without the marker (the mount
                    // point of an unmounted volume), is not a repository. Repositories from
                    // before the marker hold objects.
                    let empty = std::fs::read_dir(&path).map(|mut d| d.next().is_none()).unwrap_or(true);
                    if !path.is_dir() || (!marker.exists() && empty) {
                        return Err(StorageError::MissingRepository { url: url.to_owned() });
                    }
                }
                let fs = LocalFileSystem::new_with_prefix(&path).map_err(cfg)?;
                (Arc::new(fs.with_automatic_cleanup(true)), String::new())
            }
            Location::Memory { prefix } => (Arc::new(InMemory::new()), prefix),
        };
        // Test hook for drills (README: "Fault injection"): never set in production.
        let store: Arc<dyn ObjectStore> = match std::env::var("CLOUD_DUMP_FAULTS") {
            Ok(spec) if !spec.is_empty() => {
                let cfg = crate::faults::FaultConfig::parse(&spec).map_err(StorageError::Config)?;
                tracing::warn!("CLOUD_DUMP_FAULTS is set: injecting storage faults ({spec})");
                Arc::new(crate::faults::FaultStore::new(store, cfg))
            }
            _ => store,
        };
        Ok(Repo {
            store,
            prefix,
            url: url.to_owned(),
            parts_in_flight: opts.parts_in_flight.max(1),
            local_root,
            service,
            watch,
        })
    }

    /// Wraps an existing store (tests, fault injection).
    pub fn from_store(store: Arc<dyn ObjectStore>, prefix: &str, url: &str) -> Repo {
        Repo {
            store,
            prefix: crate::location::normalize_prefix(prefix),
            url: url.into(),
            parts_in_flight: 4,
            local_root: None,
            service: Service::Local,
            watch: Watch::new(Vec::new()),
        }
    }

    /// The error for a failed call on `key`: missing and existing objects are typed, the
    /// rest name the object and, where it can be told, what to do about it.
    pub(crate) fn fail(&self, op: &'static str, key: &str, e: object_store::Error) -> StorageError {
        match e {
            object_store::Error::NotFound { .. } => StorageError::NotFound { key: key.into() },
            object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => {
                StorageError::AlreadyExists { key: key.into() }
            }
            e => StorageError::Backend {
                op,
                object: self.object_url(key),
                problem: Box::new(Problem::classify(&e, &self.service, self.watch.recent(OBSERVATION_AGE))),
            },
        }
    }

    /// A user-metadata name as the backend accepts it: Azure wants C# identifiers (no
    /// `-`), the others keep the name as given.
    fn metadata_name(&self, name: &str) -> String {
        match self.service {
            Service::Azure { .. } => name.replace('-', "_"),
            _ => name.to_owned(),
        }
    }

    /// `key` as a URL below the repository's (the repository itself for "").
    pub fn object_url(&self, key: &str) -> String {
        let base = self.url.trim_end_matches('/');
        match key.trim_start_matches('/') {
            "" => format!("{base}/"),
            k => format!("{base}/{k}"),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// True where a create-only write is atomic here (file://: a hard link; memory). Cloud
    /// stores honour create-only writes when they implement conditional requests; some
    /// S3-compatible stores check and write in two steps, so callers that must win a race
    /// confirm it there.
    pub fn create_is_atomic(&self) -> bool {
        self.local_root.is_some() || self.url.starts_with("memory://")
    }

    fn path(&self, key: &str) -> Path {
        Path::from(format!("{}{}", self.prefix, key.trim_start_matches('/')))
    }

    fn strip(&self, p: &Path) -> String {
        let s = p.as_ref();
        s.strip_prefix(self.prefix.as_str()).unwrap_or(s).to_owned()
    }

    pub async fn get(&self, key: &str) -> Result<Bytes> {
        let r = self.store.get(&self.path(key)).await.map_err(|e| self.fail("read", key, e))?;
        r.bytes().await.map_err(|e| self.fail("read", key, e))
    }

    pub async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        match self.store.head(&self.path(key)).await {
            Ok(m) => Ok(Some(ObjectInfo {
                key: key.to_owned(),
                size: m.size,
                last_modified: m.last_modified.into(),
                e_tag: m.e_tag,
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.fail("look up", key, e)),
        }
    }

    /// Writes a small object only if no object has that key. Where the backend offers a
    /// create-only conditional put it is used; the `head` before it covers stores that
    /// ignore the condition.
    pub async fn put_new(&self, key: &str, data: Bytes) -> Result<()> {
        if self.head(key).await?.is_some() {
            return Err(StorageError::AlreadyExists { key: key.into() });
        }
        let path = self.path(key);
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.store.put_opts(&path, PutPayload::from_bytes(data.clone()), opts).await {
            Ok(_) => {}
            Err(object_store::Error::NotImplemented { .. }) => self
                .store
                .put(&path, PutPayload::from_bytes(data))
                .await
                .map(|_| ())
                .map_err(|e| self.fail("write", key, e))?,
            Err(e) => return Err(self.fail("write", key, e)),
        }
        self.sync_local(key)
    }

    /// Like [`Repo::put_new`], recording `metadata` (name → value) with the object where
    /// the backend keeps user metadata (S3, GCS, Azure); elsewhere the object is stored
    /// without it. On a file:// repository the file and its folder are fsynced: when this
    /// returns, the object is durable.
    pub async fn put_new_durable(&self, key: &str, data: Bytes, metadata: &[(&'static str, String)]) -> Result<()> {
        if self.head(key).await?.is_some() {
            return Err(StorageError::AlreadyExists { key: key.into() });
        }
        let path = self.path(key);
        let mut attributes = object_store::Attributes::new();
        for (k, v) in metadata {
            attributes.insert(object_store::Attribute::Metadata(self.metadata_name(k).into()), v.clone().into());
        }
        let with_meta = PutOptions { mode: PutMode::Create, attributes, ..Default::default() };
        let plain = PutOptions { mode: PutMode::Create, ..Default::default() };
        let first = if metadata.is_empty() || self.local_root.is_some() {
            self.store.put_opts(&path, PutPayload::from_bytes(data.clone()), plain.clone()).await
        } else {
            self.store.put_opts(&path, PutPayload::from_bytes(data.clone()), with_meta).await
        };
        let result = match first {
            Err(object_store::Error::NotImplemented { .. }) => {
                match self.store.put_opts(&path, PutPayload::from_bytes(data.clone()), plain).await {
                    Err(object_store::Error::NotImplemented { .. }) => {
                        self.store.put(&path, PutPayload::from_bytes(data)).await
                    }
                    other => other,
                }
            }
            other => other,
        };
        result.map_err(|e| self.fail("write", key, e))?;
        self.sync_local(key)
    }

    /// Writes (or replaces) a small object with one request. On a file:// repository the
    /// file and its folder are fsynced: when this returns, the object is durable.
    pub async fn put_durable(&self, key: &str, data: Bytes) -> Result<()> {
        self.store.put(&self.path(key), PutPayload::from_bytes(data)).await.map_err(|e| self.fail("write", key, e))?;
        self.sync_local(key)
    }

    /// On a file:// repository, fsyncs an object and every folder from its own up to the
    /// repository root (a new backup's folder is itself new); elsewhere nothing to do (a
    /// completed PUT is durable). Every write of a Repo ends here.
    pub fn sync_local(&self, key: &str) -> Result<()> {
        if let Some(root) = &self.local_root {
            let file = root.join(self.path(key).as_ref());
            let sync = |p: &std::path::Path| {
                std::fs::File::open(p)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| StorageError::Config(format!("cannot fsync {}: {e}", p.display())))
            };
            sync(&file)?;
            let mut dir = file.parent();
            while let Some(d) = dir {
                sync(d)?;
                if d == root.as_path() || !d.starts_with(root) {
                    break;
                }
                dir = d.parent();
            }
        }
        Ok(())
    }

    /// On a file:// repository, gives object `key` the mode `mode` (and each folder between
    /// it and the repository root the matching directory mode: read → read + search), so a
    /// copy is readable by no one the original is not; elsewhere nothing to do.
    pub fn restrict_local(&self, key: &str, mode: u32) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let Some(root) = &self.local_root else { return Ok(()) };
        let file = root.join(self.path(key).as_ref());
        let set = |p: &std::path::Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m))
                .map_err(|e| StorageError::Config(format!("cannot set the mode of {}: {e}", p.display())))
        };
        set(&file, mode & 0o666)?;
        let dir_mode = dir_mode_for(mode);
        let mut dir = file.parent();
        while let Some(d) = dir {
            if d == root.as_path() || !d.starts_with(root) {
                break;
            }
            set(d, dir_mode)?;
            dir = d.parent();
        }
        Ok(())
    }

    /// A user-metadata value of an object, when the backend keeps metadata.
    pub async fn metadata(&self, key: &str, name: &'static str) -> Result<Option<String>> {
        let opts = object_store::GetOptions { head: true, ..Default::default() };
        match self.store.get_opts(&self.path(key), opts).await {
            Ok(r) => Ok(r
                .attributes
                .get(&object_store::Attribute::Metadata(self.metadata_name(name).into()))
                .map(|v| v.to_string())),
            Err(object_store::Error::NotFound { .. }) => Err(StorageError::NotFound { key: key.into() }),
            Err(e) => Err(self.fail("look up", key, e)),
        }
    }

    pub async fn delete(&self, key: &str) -> Result<()> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.fail("delete", key, e)),
        }
    }

    /// Deletes `keys` (S3: DeleteObjects, 1000 keys a request). A missing key counts as
    /// deleted; the keys that could not be deleted come back with why (a locked object, a
    /// refusal), each tried once more on its own for a typed error.
    pub async fn delete_many(&self, keys: &[String]) -> Result<Vec<(String, StorageError)>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let paths: Vec<object_store::Result<Path>> = keys.iter().map(|k| Ok(self.path(k))).collect();
        let done: std::collections::HashSet<Path> = self
            .store
            .delete_stream(futures::stream::iter(paths).boxed())
            .filter_map(|r| async { r.ok() })
            .collect()
            .await;
        let mut failed = Vec::new();
        for k in keys {
            if !done.contains(&self.path(k)) {
                if let Err(e) = self.delete(k).await {
                    failed.push((k.clone(), e));
                }
            }
        }
        Ok(failed)
    }

    /// Every object below `dir` (recursively), keys relative to the repository root.
    pub async fn list(&self, dir: &str) -> Result<Vec<ObjectInfo>> {
        let p = self.path(dir);
        let prefix = if p.as_ref().is_empty() { None } else { Some(&p) };
        let metas: Vec<_> = self.store.list(prefix).try_collect().await.map_err(|e| self.fail("list", dir, e))?;
        Ok(metas
            .into_iter()
            .map(|m| ObjectInfo {
                key: self.strip(&m.location),
                size: m.size,
                last_modified: m.last_modified.into(),
                e_tag: m.e_tag,
            })
            .collect())
    }

    /// Up to `max` objects whose keys start with `prefix` and sort after `after` (S3's
    /// start-after: one request however large the folder).
    pub async fn list_after(&self, prefix: &str, after: &str, max: usize) -> Result<Vec<ObjectInfo>> {
        let p = self.path(prefix);
        let offset = self.path(after);
        // object_store lists by folder: list the folder holding the prefix, keep the prefix.
        let folder = match prefix.rfind('/') {
            Some(i) => self.path(&prefix[..i]),
            None => Path::from(self.prefix.trim_end_matches('/')),
        };
        let folder = if folder.as_ref().is_empty() { None } else { Some(&folder) };
        let mut stream = self.store.list_with_offset(folder, &offset);
        let mut out = Vec::new();
        while let Some(m) = stream.next().await {
            let m = m.map_err(|e| self.fail("list", prefix, e))?;
            if !m.location.as_ref().starts_with(p.as_ref()) {
                // Cloud stores list in key order: past the prefix, nothing more can match
                // (a local directory walk has no order).
                if self.local_root.is_none() && m.location.as_ref() > p.as_ref() {
                    break;
                }
                continue;
            }
            out.push(ObjectInfo {
                key: self.strip(&m.location),
                size: m.size,
                last_modified: m.last_modified.into(),
                e_tag: m.e_tag,
            });
            if out.len() >= max {
                break;
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// The immediate sub-folders of `dir` ("" for the root), as names without slashes.
    pub async fn list_dirs(&self, dir: &str) -> Result<Vec<String>> {
        let p = self.path(dir);
        let prefix = if p.as_ref().is_empty() { None } else { Some(&p) };
        let r = self.store.list_with_delimiter(prefix).await.map_err(|e| self.fail("list", dir, e))?;
        Ok(r.common_prefixes.iter().filter_map(|c| c.filename().map(str::to_owned)).collect())
    }

    /// Streams an object. Objects larger than one range are read as ranges, `concurrency`
    /// of them at a time, in order: restores are limited by the network, not one socket.
    pub async fn read(&self, key: &str, size: u64, concurrency: usize) -> Result<BoxStream<'static, Result<Bytes>>> {
        const RANGE: u64 = 8 << 20;
        let owned_key = key.to_owned();
        if concurrency <= 1 || size <= RANGE {
            let r = self.store.get(&self.path(key)).await.map_err(|e| self.fail("read", key, e))?;
            let repo = self.clone();
            return Ok(r.into_stream().map_err(move |e| repo.fail("read", &owned_key, e)).boxed());
        }
        let repo = self.clone();
        let path = self.path(key);
        let ranges: Vec<Range<u64>> = (0..size).step_by(RANGE as usize).map(|s| s..(s + RANGE).min(size)).collect();
        Ok(futures::stream::iter(ranges)
            .map(move |r| {
                let repo = repo.clone();
                let path = path.clone();
                let key = owned_key.clone();
                async move { repo.store.get_range(&path, r).await.map_err(|e| repo.fail("read", &key, e)) }
            })
            .buffered(concurrency)
            .boxed())
    }

    /// Starts a multipart upload. The object becomes visible only at [`Upload::finish`].
    pub async fn upload(&self, key: &str, size_hint: Option<u64>) -> Result<Upload> {
        let up = self.store.put_multipart(&self.path(key)).await.map_err(|e| self.fail("write", key, e))?;
        Ok(Upload {
            key: key.to_owned(),
            writer: Some(WriteMultipart::new_with_chunk_size(up, part_size_for(size_hint))),
            parts_in_flight: self.parts_in_flight,
            repo: self.clone(),
        })
    }
}

/// A boolean variable set to true (`true`, `1`, `yes`).
fn env_true(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
}

fn env_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty())
}

/// The store of a location, and whether its credentials can only come from the instance
/// metadata service (nothing in the options or the environment names any).
fn service_of(location: &Location, opts: &StorageOptions) -> Service {
    let none_of = |vars: &[&str]| !vars.iter().any(|v| env_set(v));
    match location {
        Location::S3 { bucket, .. } => Service::S3 {
            bucket: bucket.clone(),
            credentials_from_metadata: opts.s3_access_key_id.is_none()
                && none_of(&[
                    "AWS_ACCESS_KEY_ID",
                    "AWS_WEB_IDENTITY_TOKEN_FILE",
                    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                    "AWS_SKIP_SIGNATURE",
                ]),
        },
        Location::Storj { bucket, .. } => Service::S3 { bucket: bucket.clone(), credentials_from_metadata: false },
        Location::Gcs { bucket, .. } => Service::Gcs {
            bucket: bucket.clone(),
            credentials_from_metadata: none_of(&[
                "GOOGLE_SERVICE_ACCOUNT",
                "GOOGLE_SERVICE_ACCOUNT_PATH",
                "GOOGLE_SERVICE_ACCOUNT_KEY",
                "GOOGLE_APPLICATION_CREDENTIALS",
                "GOOGLE_SKIP_SIGNATURE",
            ]),
        },
        Location::Azure { container, .. } => Service::Azure {
            container: container.clone(),
            credentials_from_metadata: none_of(&[
                "AZURE_STORAGE_ACCOUNT_KEY",
                "AZURE_STORAGE_ACCESS_KEY",
                "AZURE_STORAGE_MASTER_KEY",
                "AZURE_STORAGE_SAS_KEY",
                "AZURE_STORAGE_SAS_TOKEN",
                "AZURE_STORAGE_TOKEN",
                "AZURE_CLIENT_SECRET",
                "AZURE_FEDERATED_TOKEN_FILE",
                "AZURE_STORAGE_USE_EMULATOR",
                "AZURE_SKIP_SIGNATURE",
            ]),
        },
        Location::File { .. } | Location::Memory { .. } => Service::Local,
    }
}

/// Hosts of the instance metadata services a backend may ask for credentials.
fn metadata_hosts(location: &Location) -> Vec<String> {
    let mut hosts = vec!["169.254.169.254".to_owned()];
    let configured = match location {
        Location::S3 { .. } => vec!["AWS_METADATA_ENDPOINT"],
        Location::Gcs { .. } => {
            hosts.push("metadata.google.internal".into());
            vec!["GCE_METADATA_HOST", "GCE_METADATA_ROOT"]
        }
        Location::Azure { .. } => vec!["MSI_ENDPOINT", "IDENTITY_ENDPOINT"],
        _ => vec![],
    };
    for var in configured {
        if let Ok(v) = std::env::var(var) {
            let with_scheme = if v.contains("://") { v } else { format!("http://{v}") };
            if let Some(h) = url::Url::parse(&with_scheme).ok().and_then(|u| u.host_str().map(str::to_owned)) {
                hosts.push(h);
            }
        }
    }
    hosts
}

/// The S3 endpoint asked for: the option, else the AWS SDKs' endpoint variables (a
/// Litestream config has no endpoint); `None`: AWS itself.
pub(crate) fn s3_endpoint(opts: &StorageOptions) -> Option<String> {
    opts.s3_endpoint.clone().or_else(|| {
        ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
            .iter()
            .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    })
}

/// The S3 region: the option, else `AWS_REGION` / `AWS_DEFAULT_REGION`, else us-east-1.
pub(crate) fn s3_region(opts: &StorageOptions) -> String {
    opts.s3_region
        .clone()
        .or_else(|| {
            ["AWS_REGION", "AWS_DEFAULT_REGION"].iter().find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        })
        .unwrap_or_else(|| "us-east-1".into())
}

fn s3_builder(bucket: &str, opts: &StorageOptions) -> Result<AmazonS3Builder> {
    let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
    let mut allow_http = opts.s3_allow_http;
    if let Some(ep) = s3_endpoint(opts) {
        b = b.with_endpoint(ep.clone());
        allow_http |= ep.starts_with("http://");
    }
    b = b.with_region(s3_region(opts));
    if let Some(k) = &opts.s3_access_key_id {
        b = b.with_access_key_id(k.clone());
    }
    if let Some(s) = &opts.s3_secret_access_key {
        b = b.with_secret_access_key(s.clone());
    }
    b = b.with_virtual_hosted_style_request(opts.s3_virtual_hosted_style);
    // Every PUT and part carries its SHA-256 (x-amz-checksum-sha256): the store refuses a
    // body damaged on the way, and buckets with Object Lock require a checksum on writes.
    b = b.with_checksum_algorithm(object_store::aws::Checksum::SHA256);
    // Fail within about a minute when the store is down (wal-fetch must not stall recovery
    // for long before it reports the failure), retrying transient errors meanwhile.
    b = b.with_retry(object_store::RetryConfig {
        max_retries: 4,
        retry_timeout: std::time::Duration::from_secs(60),
        ..Default::default()
    });
    let client = client_options(opts, allow_http);
    b = b.with_client_options(client);
    Ok(b)
}

/// HTTP settings for every cloud backend. No limit on a whole request (a 512 MiB part or
/// a large GET takes as long as the link needs); a connection silent for `read_timeout`
/// fails and is retried.
fn client_options(opts: &StorageOptions, allow_http: bool) -> ClientOptions {
    let mut client = ClientOptions::new()
        .with_connect_timeout(std::time::Duration::from_secs(10))
        .with_timeout_disabled()
        .with_read_timeout(opts.read_timeout.unwrap_or(std::time::Duration::from_secs(300)))
        .with_allow_http(allow_http);
    if opts.s3_skip_verify {
        client = client.with_allow_invalid_certificates(true);
    }
    client
}

/// A multipart upload with a bounded number of parts in flight. Dropping it without
/// `finish` leaves no visible object; call `abort` to also free the parts on the server.
pub struct Upload {
    key: String,
    writer: Option<WriteMultipart>,
    parts_in_flight: usize,
    repo: Repo,
}

impl Upload {
    pub async fn put(&mut self, data: Bytes) -> Result<()> {
        let w = self.writer.as_mut().ok_or_else(|| StorageError::Abandoned { key: self.key.clone() })?;
        w.wait_for_capacity(self.parts_in_flight).await.map_err(|e| self.repo.fail("write", &self.key, e))?;
        w.put(data);
        Ok(())
    }

    pub async fn finish(mut self) -> Result<()> {
        let w = self.writer.take().ok_or_else(|| StorageError::Abandoned { key: self.key.clone() })?;
        w.finish().await.map(|_| ()).map_err(|e| self.repo.fail("write", &self.key, e))?;
        self.repo.sync_local(&self.key)
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub async fn abort(mut self) -> Result<()> {
        match self.writer.take() {
            Some(w) => w.abort().await.map_err(|e| self.repo.fail("abort the upload of", &self.key, e)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_new_refuses_to_overwrite_and_upload_is_invisible_until_finished() {
        let repo = Repo::open("memory://t", &StorageOptions::default()).await.unwrap();
        repo.put_new("a/manifest.json", Bytes::from_static(b"1")).await.unwrap();
        let err = repo.put_new("a/manifest.json", Bytes::from_static(b"2")).await.unwrap_err();
        assert!(matches!(err, StorageError::AlreadyExists { .. }), "{err}");
        assert_eq!(repo.get("a/manifest.json").await.unwrap(), Bytes::from_static(b"1"));

        let mut up = repo.upload("a/base.tar", None).await.unwrap();
        up.put(Bytes::from(vec![7u8; 100])).await.unwrap();
        assert!(repo.head("a/base.tar").await.unwrap().is_none());
        up.finish().await.unwrap();
        assert_eq!(repo.head("a/base.tar").await.unwrap().unwrap().size, 100);
        assert_eq!(repo.list_dirs("").await.unwrap(), vec!["a".to_string()]);
        let keys: Vec<_> = repo.list("a/").await.unwrap().into_iter().map(|o| o.key).collect();
        assert_eq!(keys.len(), 2);
        assert!(keys.contains(&"a/base.tar".to_string()));
    }

    #[tokio::test]
    async fn ranged_reads_reassemble_in_order() {
        let repo = Repo::open("memory://", &StorageOptions::default()).await.unwrap();
        let data: Vec<u8> = (0..(20u32 << 20)).map(|i| (i % 251) as u8).collect();
        let mut up = repo.upload("big", None).await.unwrap();
        up.put(Bytes::from(data.clone())).await.unwrap();
        up.finish().await.unwrap();
        let chunks: Vec<Bytes> = repo.read("big", data.len() as u64, 3).await.unwrap().try_collect().await.unwrap();
        assert!(chunks.len() >= 3);
        assert_eq!(chunks.concat(), data);
    }

    #[test]
    fn part_size_grows_with_size() {
        assert_eq!(part_size_for(None), 16 << 20);
        assert!(part_size_for(Some(1 << 40)) as u64 * 10_000 > 1 << 40);
    }
}
