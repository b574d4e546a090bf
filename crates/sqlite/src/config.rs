//! The replication config: Litestream's YAML shape (`addr`, `dbs: [{path, replicas: [...]}]`,
//! S3 fields at the top level or per replica, Go-style durations), with environment
//! variables (`$VAR`, `${VAR}`) expanded before parsing, as Litestream does. Unknown keys are
//! reported as warnings, not errors, so a file written for Litestream keeps working.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use cloud_dump_pipeline::{parse_identities, parse_recipients, Compression};
use cloud_dump_storage::{Location, StorageOptions};
use serde::Deserialize;

use crate::error::{Result, SqliteError};

pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_RETENTION_CHECK_INTERVAL: Duration = Duration::from_secs(3600);
/// WAL pages after which we try a passive checkpoint (SQLite's own autocheckpoint default).
pub const DEFAULT_MIN_CHECKPOINT_PAGES: u64 = 1000;
/// WAL size above which we force a checkpoint, waiting for readers.
pub const DEFAULT_MAX_WAL_BYTES: u64 = 64 << 20;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct FileConfig {
    addr: Option<String>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    region: Option<String>,
    endpoint: Option<String>,
    #[serde(alias = "db")]
    dbs: Option<Vec<FileDb>>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct FileDb {
    path: Option<String>,
    replicas: Option<Vec<FileReplica>>,
    /// Litestream's README puts `retention` next to `replicas`; it is a default for them.
    retention: Option<String>,
    min_checkpoint_page_count: Option<u64>,
    max_wal_size: Option<String>,
    max_shadow_size: Option<String>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct FileReplica {
    #[serde(rename = "type")]
    kind: Option<String>,
    name: Option<String>,
    path: Option<String>,
    url: Option<String>,
    bucket: Option<String>,
    region: Option<String>,
    endpoint: Option<String>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    force_path_style: Option<bool>,
    skip_verify: Option<bool>,
    sync_interval: Option<String>,
    snapshot_interval: Option<String>,
    retention: Option<String>,
    retention_check_interval: Option<String>,
    validation_interval: Option<String>,
    compression: Option<String>,
    age: Option<FileAge>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAge {
    #[serde(default)]
    identities: Vec<String>,
    #[serde(default)]
    recipients: Vec<String>,
}

/// Everything `replicate` needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub addr: Option<String>,
    pub dbs: Vec<DbSpec>,
    /// Unknown keys, as `dbs[0].replicas[1].foo`, for the caller to warn about.
    pub ignored: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct DbSpec {
    pub path: PathBuf,
    pub replicas: Vec<ReplicaSpec>,
    pub min_checkpoint_pages: u64,
    pub max_wal_bytes: u64,
    /// The most the shadow directory may hold: past it, replicas too far behind (down)
    /// resume from a new snapshot instead of pinning every WAL byte ever written.
    pub max_shadow_bytes: u64,
}

impl DbSpec {
    pub fn new(path: PathBuf, replicas: Vec<ReplicaSpec>) -> DbSpec {
        DbSpec {
            path,
            replicas,
            min_checkpoint_pages: DEFAULT_MIN_CHECKPOINT_PAGES,
            max_wal_bytes: DEFAULT_MAX_WAL_BYTES,
            max_shadow_bytes: DEFAULT_MAX_SHADOW_BYTES,
        }
    }
}

#[derive(Clone)]
pub struct ReplicaSpec {
    pub name: String,
    pub url: String,
    pub storage: StorageOptions,
    pub sync_interval: Duration,
    pub snapshot_interval: Option<Duration>,
    pub retention: Duration,
    pub retention_check_interval: Duration,
    pub validation_interval: Option<Duration>,
    pub compression: Compression,
    pub recipients: Vec<age::x25519::Recipient>,
    pub identities: Vec<age::x25519::Identity>,
}

impl std::fmt::Debug for ReplicaSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaSpec")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("sync_interval", &self.sync_interval)
            .field("retention", &self.retention)
            .field("compression", &self.compression)
            .field("recipients", &self.recipients.len())
            .field("identities", &self.identities.len())
            .finish_non_exhaustive()
    }
}

impl ReplicaSpec {
    /// A replica with the defaults, for `replicate DB URL` and `restore URL`.
    pub fn from_url(url: &str, storage: StorageOptions) -> Result<ReplicaSpec> {
        Location::parse(url).map_err(|e| SqliteError::Config(e.to_string()))?;
        Ok(ReplicaSpec {
            name: scheme_name(url),
            url: url.to_owned(),
            storage,
            sync_interval: DEFAULT_SYNC_INTERVAL,
            snapshot_interval: None,
            retention: DEFAULT_RETENTION,
            retention_check_interval: DEFAULT_RETENTION_CHECK_INTERVAL,
            validation_interval: None,
            compression: Compression::Zstd,
            recipients: Vec::new(),
            identities: Vec::new(),
        })
    }

    /// How often a new snapshot is taken: `snapshot-interval`, else the retention period.
    pub fn snapshot_every(&self) -> Duration {
        self.snapshot_interval.unwrap_or(self.retention)
    }
}

fn scheme_name(url: &str) -> String {
    match url.split_once("://") {
        Some((s, _)) if s != "file" => s.to_owned(),
        _ => "file".to_owned(),
    }
}

/// Go's `time.ParseDuration` subset Litestream users write: `1h30m`, `10s`, `500ms`, `24h`.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let bad = || format!("invalid duration {s:?}: use e.g. 500ms, 10s, 5m, 24h or 1h30m");
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = t;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let n = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        let value: f64 = rest[..n].parse().map_err(|_| bad())?;
        rest = &rest[n..];
        let u = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let unit = match &rest[..u] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += value * unit;
        rest = &rest[u..];
    }
    // Duration::from_secs_f64 panics past its range: a setting like 99999999999999999999h
    // is an error, never a crash (on SIGHUP a panic would stop replication).
    if !total.is_finite() || total > MAX_DURATION.as_secs_f64() {
        return Err(format!("invalid duration {s:?}: at most {} days", MAX_DURATION.as_secs() / 86_400));
    }
    Ok(Duration::from_secs_f64(total))
}

/// The longest duration any setting takes (100 years).
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Checks a duration setting against its sane range; `0` is allowed only where it means "off"
/// (and is then filtered by the caller).
pub fn check_range(key: &str, v: Duration, min: Duration) -> std::result::Result<Duration, String> {
    if v < min {
        return Err(format!("{key}: {v:?} is too short (at least {min:?})"));
    }
    Ok(v)
}

/// The smallest `max-wal-size`: a WAL limit below a few pages would force a checkpoint at
/// every commit.
pub const MIN_MAX_WAL_BYTES: u64 = 1 << 20;

/// Default bound of the shadow directory (`max-shadow-size`).
pub const DEFAULT_MAX_SHADOW_BYTES: u64 = 1 << 30;

/// Parses a size such as `64MB`, `1GiB`, `4096`.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let n = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let value: u64 = t[..n].parse().map_err(|_| format!("invalid size {s:?}: use e.g. 64MB"))?;
    let mult = match t[n..].trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("invalid size {s:?}: use e.g. 64MB")),
    };
    value.checked_mul(mult).ok_or_else(|| format!("invalid size {s:?}: too large"))
}

/// `$VAR` and `${VAR}` replaced by the environment (unset: empty), as Go's `os.ExpandEnv`.
pub fn expand_env(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        let rest = &text[i + 1..];
        let (name, skip) = if let Some(inner) = rest.strip_prefix('{') {
            match inner.find('}') {
                Some(end) => (&inner[..end], end + 2),
                None => {
                    out.push(c);
                    continue;
                }
            }
        } else {
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
            (&rest[..end], end)
        };
        if name.is_empty() {
            out.push(c);
            continue;
        }
        out.push_str(&std::env::var(name).unwrap_or_default());
        for _ in 0..skip {
            chars.next();
        }
    }
    out
}

/// A YAML error without the values it quotes (`invalid type: string "AGE-SECRET-KEY-…"`):
/// a mistyped secret must not reach a log.
pub fn redact_yaml_values(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find(" \"") {
        out.push_str(&rest[..i]);
        rest = match rest[i + 2..].find('"') {
            Some(j) => &rest[i + 2 + j + 1..],
            None => "",
        };
    }
    out.push_str(rest);
    out
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SqliteError::Config(format!("cannot read config file {}: {e}", path.display())))?;
        Config::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<Config> {
        let cfg = |m: String| SqliteError::Config(format!("{origin}: {m}"));
        let expanded = expand_env(text);
        let mut file: FileConfig = if expanded.trim().is_empty() {
            FileConfig::default()
        } else {
            serde_yaml::from_str(&expanded).map_err(|e| cfg(redact_yaml_values(&e.to_string())))?
        };
        // `postgres:` describes PostgreSQL clusters for the other commands of the binary.
        let mut ignored: Vec<String> = file.other.keys().filter(|k| *k != "postgres").cloned().collect();
        let mut dbs = Vec::new();
        for (i, db) in file.dbs.take().unwrap_or_default().into_iter().enumerate() {
            ignored.extend(db.other.keys().map(|k| format!("dbs[{i}].{k}")));
            let path = db.path.ok_or_else(|| cfg(format!("dbs[{i}]: missing path")))?;
            let path = absolute(Path::new(&path));
            let mut replicas = Vec::new();
            let mut explicit = Vec::new();
            for (j, r) in db.replicas.unwrap_or_default().into_iter().enumerate() {
                let at = format!("dbs[{i}].replicas[{j}]");
                ignored.extend(r.other.keys().map(|k| format!("{at}.{k}")));
                explicit.push(r.name.is_some());
                replicas.push(replica(&file, r, db.retention.as_deref(), &at).map_err(cfg)?);
            }
            if replicas.is_empty() {
                return Err(cfg(format!("dbs[{i}] ({}): no replicas", path.display())));
            }
            // Unnamed replicas are named by type; a second one of a type becomes `s3-2`.
            let mut seen: Vec<String> = Vec::new();
            for (r, named) in replicas.iter_mut().zip(&explicit) {
                if seen.contains(&r.name) {
                    if *named {
                        return Err(cfg(format!(
                            "dbs[{i}]: two replicas are named {:?}; give each a distinct `name`",
                            r.name
                        )));
                    }
                    let base = r.name.clone();
                    let mut n = 2;
                    while seen.contains(&format!("{base}-{n}")) {
                        n += 1;
                    }
                    r.name = format!("{base}-{n}");
                }
                seen.push(r.name.clone());
            }
            let mut spec = DbSpec::new(path, replicas);
            if let Some(n) = db.min_checkpoint_page_count {
                if n == 0 {
                    return Err(cfg(format!("dbs[{i}].min-checkpoint-page-count: must be at least 1")));
                }
                spec.min_checkpoint_pages = n;
            }
            if let Some(s) = db.max_wal_size {
                let v = parse_size(&s).map_err(|m| cfg(format!("dbs[{i}].max-wal-size: {m}")))?;
                if v < MIN_MAX_WAL_BYTES {
                    return Err(cfg(format!(
                        "dbs[{i}].max-wal-size: {s:?} is {v} bytes; at least 1MB (a smaller limit would checkpoint at every commit)"
                    )));
                }
                spec.max_wal_bytes = v;
            }
            if let Some(s) = db.max_shadow_size {
                let v = parse_size(&s).map_err(|m| cfg(format!("dbs[{i}].max-shadow-size: {m}")))?;
                if v < 4 * MIN_MAX_WAL_BYTES {
                    return Err(cfg(format!("dbs[{i}].max-shadow-size: {s:?} is {v} bytes; at least 4MB")));
                }
                spec.max_shadow_bytes = v;
            }
            dbs.push(spec);
        }
        // Two databases sharing a replica location would interleave their generations and a
        // restore of one could return the other. Locations are compared as parsed and
        // canonical (store, endpoint, bucket, normalised prefix; the real path for files),
        // and one inside another counts as shared.
        let mut seen: Vec<(LocationKey, String)> = Vec::new();
        for (i, d) in dbs.iter().enumerate() {
            for r in &d.replicas {
                let key = location_key(&r.url, r.storage.s3_endpoint.as_deref())
                    .map_err(|e| cfg(format!("dbs[{i}] replica {}: {e}", r.name)))?;
                if let Some((_, other)) = seen.iter().find(|(k, _)| k.overlaps(&key)) {
                    return Err(cfg(format!(
                        "dbs[{i}] ({}) replicates to {}, the same place as {other} (or inside it); give each database (and each replica) its own location",
                        d.path.display(),
                        r.url
                    )));
                }
                seen.push((key, format!("{} (replica {}, {})", d.path.display(), r.name, r.url)));
            }
        }
        Ok(Config { addr: file.addr, dbs, ignored })
    }

    pub fn db(&self, path: &Path) -> Option<&DbSpec> {
        let want = absolute(path);
        self.dbs.iter().find(|d| d.path == want)
    }
}

/// A replica location as stored: which store, and the path inside it (a list of
/// components), so that spellings of one place compare equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocationKey {
    pub store: String,
    pub path: Vec<String>,
}

impl LocationKey {
    /// One location is the other, or lies inside it.
    pub fn overlaps(&self, other: &LocationKey) -> bool {
        self.store == other.store && (self.path.starts_with(&other.path) || other.path.starts_with(&self.path))
    }
}

/// The canonical key of replica location `url` (with the S3 endpoint it is used with):
/// `file:///x//rep`, `/x/./rep`, `file://localhost/x/rep` and `/x/y/../rep` are one
/// place, as are `s3://b//app/` and `s3://b/app`. A query string or fragment is refused
/// (nothing reads it). A file path is resolved through symbolic links as far as it exists.
pub fn location_key(url: &str, endpoint: Option<&str>) -> std::result::Result<LocationKey, String> {
    if url.contains(['?', '#']) {
        return Err(format!("{url}: a replica URL takes no query string or fragment"));
    }
    let loc = Location::parse(url).map_err(|e| e.to_string())?;
    let parts = |p: &str| -> Vec<String> { p.split('/').filter(|c| !c.is_empty()).map(str::to_owned).collect() };
    let endpoint = endpoint.map(|e| e.trim_end_matches('/').to_ascii_lowercase()).unwrap_or_default();
    Ok(match loc {
        Location::File { path } => LocationKey { store: "file".into(), path: real_components(&path) },
        Location::S3 { bucket, prefix } => {
            LocationKey { store: format!("s3 {endpoint} {bucket}"), path: parts(&prefix) }
        }
        Location::Gcs { bucket, prefix } => LocationKey { store: format!("gs {bucket}"), path: parts(&prefix) },
        Location::Azure { container, prefix } => {
            LocationKey { store: format!("az {endpoint} {container}"), path: parts(&prefix) }
        }
        Location::Storj { bucket, prefix } => LocationKey { store: format!("storj {bucket}"), path: parts(&prefix) },
        Location::Memory { prefix } => LocationKey { store: "memory".into(), path: parts(&prefix) },
    })
}

/// The components of `path` made absolute and lexically normal (`.`, `..`, `//`), then
/// resolved through links for the longest part that exists.
fn real_components(path: &Path) -> Vec<String> {
    real_path(path)
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect()
}

/// `path` made absolute and lexically normal, then resolved through links for the longest
/// part that exists.
pub fn real_path(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut lexical = PathBuf::from("/");
    for c in absolute(path).components() {
        match c {
            Component::ParentDir => {
                lexical.pop();
            }
            Component::Normal(n) => lexical.push(n),
            _ => {}
        }
    }
    // The longest existing ancestor, resolved; the rest appended as written.
    let mut existing = lexical.clone();
    let mut rest = Vec::new();
    let resolved = loop {
        if let Ok(r) = std::fs::canonicalize(&existing) {
            break r;
        }
        match (existing.file_name().map(|n| n.to_owned()), existing.parent().map(Path::to_path_buf)) {
            (Some(n), Some(parent)) => {
                rest.push(n);
                existing = parent;
            }
            _ => break existing,
        }
    };
    let mut full = resolved;
    for n in rest.into_iter().rev() {
        full.push(n);
    }
    full
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        std::env::current_dir().map(|d| d.join(p)).unwrap_or_else(|_| p.to_owned())
    }
}

fn replica(
    d: &FileConfig,
    r: FileReplica,
    db_retention: Option<&str>,
    at: &str,
) -> std::result::Result<ReplicaSpec, String> {
    let kind = r.kind.as_deref().map(str::to_ascii_lowercase);
    let url = match (&r.url, kind.as_deref(), &r.path, &r.bucket) {
        (Some(u), _, _, _) => u.clone(),
        (None, None | Some("file"), Some(p), None) => absolute(Path::new(p)).display().to_string(),
        (None, Some(t @ ("s3" | "gs" | "gcs" | "abs" | "az" | "storj")), path, bucket) => {
            let scheme = match t {
                "gcs" => "gs",
                "abs" => "az",
                t => t,
            };
            let path = path.as_deref().unwrap_or("").trim_matches('/');
            match bucket {
                Some(b) => format!("{scheme}://{b}/{path}"),
                None => format!("{scheme}://{path}"),
            }
        }
        (None, None, path, Some(b)) => format!("s3://{b}/{}", path.as_deref().unwrap_or("").trim_matches('/')),
        (None, Some(t), _, _) if !["file", "s3", "gs", "gcs", "abs", "az", "storj"].contains(&t) => {
            return Err(format!("{at}: unknown replica type {t:?} (file, s3, gs, az, storj)"))
        }
        _ => {
            return Err(format!("{at}: give the replica a `url`, or a `path` (and `type`/`bucket` for object storage)"))
        }
    };
    Location::parse(&url).map_err(|e| format!("{at}: {e}"))?;
    let mut storage = StorageOptions {
        s3_endpoint: r.endpoint.or_else(|| d.endpoint.clone()),
        s3_region: r.region.or_else(|| d.region.clone()),
        s3_access_key_id: r.access_key_id.or_else(|| d.access_key_id.clone()),
        s3_secret_access_key: r.secret_access_key.or_else(|| d.secret_access_key.clone()),
        s3_skip_verify: r.skip_verify.unwrap_or(false),
        parts_in_flight: 4,
        ..Default::default()
    };
    if r.force_path_style == Some(false) {
        storage.s3_virtual_hosted_style = true;
    }
    let dur = |v: &Option<String>, key: &str| -> std::result::Result<Option<Duration>, String> {
        v.as_deref().map(parse_duration).transpose().map_err(|e| format!("{at}.{key}: {e}"))
    };
    let mut spec = ReplicaSpec::from_url(&url, storage).map_err(|e| format!("{at}: {e}"))?;
    if let Some(n) = r.name {
        spec.name = n;
    }
    // Each setting within its sane range (0 means "off" only where it says so).
    let ms = Duration::from_millis;
    let ranged = |v: Option<Duration>, key: &str, min: Duration| {
        v.map(|v| check_range(&format!("{at}.{key}"), v, min)).transpose()
    };
    if let Some(v) = ranged(dur(&r.sync_interval, "sync-interval")?, "sync-interval", ms(1))? {
        spec.sync_interval = v;
    }
    spec.snapshot_interval = dur(&r.snapshot_interval, "snapshot-interval")?.filter(|d| !d.is_zero());
    ranged(spec.snapshot_interval, "snapshot-interval", ms(1000))?;
    let retention = r.retention.clone().or(db_retention.map(str::to_owned));
    // retention 0 would take a snapshot at every sync.
    if let Some(v) = ranged(dur(&retention, "retention")?, "retention", ms(1000))? {
        spec.retention = v;
    }
    if let Some(v) =
        ranged(dur(&r.retention_check_interval, "retention-check-interval")?, "retention-check-interval", ms(1000))?
    {
        spec.retention_check_interval = v;
    }
    spec.validation_interval = dur(&r.validation_interval, "validation-interval")?.filter(|d| !d.is_zero());
    ranged(spec.validation_interval, "validation-interval", ms(1000))?;
    if let Some(c) = &r.compression {
        spec.compression = Compression::from_str(c).map_err(|e| format!("{at}.compression: {e}"))?;
    }
    if let Some(age) = r.age {
        for (n, id) in age.identities.iter().enumerate() {
            let ids = parse_identities(id, &format!("{at}.age.identities[{n}]")).map_err(|e| e.to_string())?;
            spec.identities.extend(ids);
        }
        for (n, rc) in age.recipients.iter().enumerate() {
            let rs = parse_recipients(rc, &format!("{at}.age.recipients[{n}]")).map_err(|e| e.to_string())?;
            spec.recipients.extend(rs);
        }
        if spec.recipients.is_empty() && !spec.identities.is_empty() {
            // Litestream 0.3 encrypts to the identities' public halves when no recipient is given.
            spec.recipients = spec.identities.iter().map(|i| i.to_public()).collect();
        }
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        for bad in ["", "1d", "h", "10"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_size("64MB").unwrap(), 64 << 20);
        assert!(parse_size("lots").is_err());
        // Out of range: an error, never a panic or a wrap to 0.
        assert!(parse_duration("99999999999999999999h").is_err());
        assert!(parse_duration("1e400s").is_err());
        assert!(parse_size("18446744073709551615GB").is_err());
        assert!(parse_size("99999999999999999999999").is_err());
    }

    #[test]
    fn one_place_spelled_many_ways_is_one_place() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("x");
        std::fs::create_dir_all(real.join("rep")).unwrap();
        std::os::unix::fs::symlink(&real, d.path().join("link")).unwrap();
        let base = location_key(&format!("{}/rep", real.display()), None).unwrap();
        for same in [
            format!("file://{}//rep", real.display()),
            format!("file://{}/./rep/", real.display()),
            format!("file://localhost{}/rep", real.display()),
            format!("{}/y/../rep", real.display()),
            format!("{}/link/rep", d.path().display()),
        ] {
            assert_eq!(location_key(&same, None).unwrap(), base, "{same}");
        }
        let inside = location_key(&format!("{}/rep/deeper", real.display()), None).unwrap();
        assert!(inside.overlaps(&base) && base.overlaps(&inside));
        assert!(!location_key(&format!("{}/rep2", real.display()), None).unwrap().overlaps(&base));
        let s3 = location_key("s3://b/app", Some("http://H:9000/")).unwrap();
        assert_eq!(location_key("s3://b//app/", Some("http://h:9000")).unwrap(), s3);
        assert!(!location_key("s3://b/app", Some("http://other:9000")).unwrap().overlaps(&s3));
        assert!(location_key("s3://b/app?x=1", None).is_err());
        // In a config: two databases on one place, however spelled, are refused.
        let cfg = format!(
            "dbs:\n  - path: /a.db\n    replicas:\n      - path: {r}/rep\n  - path: /b.db\n    replicas:\n      - url: file://{r}//rep/\n",
            r = real.display()
        );
        assert!(Config::parse(&cfg, "t").unwrap_err().to_string().contains("same place"));
    }

    #[test]
    fn settings_out_of_range_are_refused_with_a_reason() {
        let with = |line: &str| {
            Config::parse(&format!("dbs:\n  - path: /p\n{line}    replicas:\n      - url: s3://b/db\n"), "t")
        };
        let replica = |line: &str| {
            Config::parse(&format!("dbs:\n  - path: /p\n    replicas:\n      - url: s3://b/db\n        {line}\n"), "t")
        };
        for (bad, says) in [
            ("sync-interval: 99999999999999999999h", "sync-interval"),
            ("sync-interval: 0", "sync-interval"),
            ("retention: 0", "retention"),
            ("retention: 1ms", "retention"),
            ("snapshot-interval: 10ms", "snapshot-interval"),
            ("retention-check-interval: 0", "retention-check-interval"),
        ] {
            let e = replica(bad).err().unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(e.to_string().contains(says), "{bad}: {e}");
        }
        for (bad, says) in [
            ("    max-wal-size: 64\n", "max-wal-size"),
            ("    max-wal-size: 18446744073709551615GB\n", "max-wal-size"),
            ("    min-checkpoint-page-count: 0\n", "min-checkpoint-page-count"),
        ] {
            let e = with(bad).err().unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(e.to_string().contains(says), "{bad}: {e}");
        }
        assert!(replica("snapshot-interval: 0").is_ok(), "0 means off");
        assert!(with("    max-wal-size: 2MB\n").is_ok());
    }

    #[test]
    fn litestream_shapes() {
        std::env::set_var("CLOUD_DUMP_TEST_BUCKET", "envbkt");
        let c = Config::parse(
            "access-key-id: AKIAxxxxxxxxxxxxxxxx\nsecret-access-key: xxx/yyy\naddr: \":9090\"\ndbs:\n  - path: /path/to/db\n    replicas:\n      - url: s3://mybkt/db\n      - path: /path/to/replica\n        retention: 1h\n      - type: s3\n        bucket: ${CLOUD_DUMP_TEST_BUCKET}\n        path: app\n        endpoint: http://127.0.0.1:9000\n        force-path-style: true\n        sync-interval: 250ms\n        wibble: 1\n",
            "t.yml",
        )
        .unwrap();
        assert_eq!(c.addr.as_deref(), Some(":9090"));
        let db = &c.dbs[0];
        assert_eq!(db.path, PathBuf::from("/path/to/db"));
        assert_eq!(db.replicas[0].url, "s3://mybkt/db");
        assert_eq!(db.replicas[0].storage.s3_access_key_id.as_deref(), Some("AKIAxxxxxxxxxxxxxxxx"));
        assert_eq!(db.replicas[1].url, "/path/to/replica");
        assert_eq!(db.replicas[1].retention, Duration::from_secs(3600));
        assert_eq!(db.replicas[2].url, "s3://envbkt/app");
        assert_eq!((db.replicas[0].name.as_str(), db.replicas[2].name.as_str()), ("s3", "s3-2"));
        assert_eq!(db.replicas[2].sync_interval, Duration::from_millis(250));
        assert_eq!(c.ignored, vec!["dbs[0].replicas[2].wibble".to_owned()]);
        // The README's retention example spells `db:` and puts retention beside replicas.
        let c = Config::parse("db:\n  - path: /p\n    replicas:\n      - url: s3://b/db\n    retention: 1h\n", "t")
            .unwrap();
        assert_eq!(c.dbs[0].replicas[0].retention, Duration::from_secs(3600));
        let twice = "dbs:\n  - path: /a.db\n    replicas:\n      - url: s3://b/x\n  - path: /b.db\n    replicas:\n      - url: s3://b/x/\n";
        let err = Config::parse(twice, "t").unwrap_err().to_string();
        assert!(err.contains("the same place"), "{err}");
        let err = Config::parse("dbs:\n  - path: /p\n    replicas:\n      - url: ftp://x/y\n", "t").unwrap_err();
        assert!(err.to_string().contains("unknown scheme"), "{err}");
        assert!(Config::parse("dbs:\n  - path: /p\n", "t").unwrap_err().to_string().contains("no replicas"));
    }
}
