//! The WAL archive: `wal-push` (the archive_command contract) and `wal-fetch` (the
//! restore_command contract).
//!
//! A WAL file `N` is stored once, as `<wal-dir>/N[.gz|.zst|.lz4][.age]`, and described by a
//! small *record* `<wal-dir>/N.sum` written before it (create-only): the object's key and
//! the size and SHA-256 of the original content. The record is what makes the archive
//! trustworthy on every backend:
//! - wal-fetch serves only the object the record names, and only after the decoded bytes
//!   match the record (a flipped byte, a short body, a planted `N` beside `N.zst.age` are
//!   all refused); with keys configured, an unencrypted object is refused;
//! - wal-push compares a re-push with the record without any key (identical: exit 0;
//!   different: refused), so PostgreSQL's retry after a crash never jams archiving.
//!
//! Objects archived before records existed are served only when the backend kept the
//! SHA-256 as object metadata.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use cloud_dump_pipeline::{decoder, repokey, Compression, Decryption, EncodeSpec, Encoder, ObjectName, SecretString};
use cloud_dump_storage::{Repo, StorageError};

use crate::layout::Layout;
use futures::StreamExt;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::wal::{classify, WalFileKind};

pub const SHA_METADATA: &str = "cloud-dump-sha256";
/// Suffix of the record that describes an archived WAL file.
pub const RECORD_SUFFIX: &str = ".sum";
/// The archive's system identifier, written once by the first wal-push.
pub const SYSTEM_FILE: &str = "system-identifier";

/// The database system identifier in the first page of the WAL segment `name` (or its
/// `.partial`), when that page is the segment's long header: the XLP_LONG_HEADER flag, the
/// timeline of the name, a power-of-two segment size (1 MiB to 1 GiB) and block size, and
/// the page address of the segment the name says. Anything else (a file that is not a
/// segment's start) gives `None`.
pub fn segment_system_id(name: &str, head: &[u8]) -> Option<u64> {
    const XLP_LONG_HEADER: u16 = 0x0002;
    let seg = name.get(..24)?;
    if classify(seg) != Ok(WalFileKind::Segment) {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(head.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(head.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(head.get(o..o + 8)?.try_into().ok()?));
    if u16_at(2)? & XLP_LONG_HEADER == 0 {
        return None;
    }
    let tli = u32::from_str_radix(&seg[..8], 16).ok()?;
    let seg_size = u32_at(32)? as u64;
    let block = u32_at(36)?;
    let sizes_ok = seg_size.is_power_of_two()
        && ((1 << 20)..=(1 << 30)).contains(&seg_size)
        && block.is_power_of_two()
        && (1024..=65536).contains(&block);
    if u32_at(4)? != tli || !sizes_ok {
        return None;
    }
    let number = crate::wal::segment_number(seg, seg_size)?;
    if u64_at(8)? != number.checked_mul(seg_size)? {
        return None;
    }
    let id = u64_at(24)?;
    (id != 0).then_some(id)
}
const RECORD_MAGIC: &str = "cloud-dump-wal-record 1";

/// What may open encrypted WAL: a passphrase (scrypt files, or the repository key), and
/// X25519 identities (key-pair files, or the repository key already opened by `restore`).
#[derive(Clone, Default)]
pub struct WalKeys {
    pub passphrase: Option<SecretString>,
    pub identities: Vec<age::x25519::Identity>,
    /// The archive is encrypted: unencrypted WAL objects are refused, never served. Set
    /// when WAL keys are configured (and by `restore` when the archive is encrypted).
    pub require_encrypted: bool,
}

impl WalKeys {
    /// True when unencrypted objects must be refused.
    pub fn any(&self) -> bool {
        self.require_encrypted
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum PushOutcome {
    Stored { key: String, size: u64 },
    AlreadyArchived { key: String },
}

/// The record of one archived WAL file (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalRecord {
    pub name: String,
    /// The object's name inside the WAL folder.
    pub object: String,
    pub size: u64,
    pub sha256: String,
    /// For a history file: its switch points (`1:0/3000000 2:0/5000A8`), so the timeline
    /// graph can be read without the keys that open the file (the reasons stay inside).
    pub switches: Option<String>,
    /// For a segment: its last transaction commit or abort (read at push time), the last
    /// point a time target can stop at in it; `None` in records written before this.
    pub last_commit: Option<crate::walscan::LastCommit>,
}

/// The switch points of a history file's text as a record carries them.
pub fn render_switches(tli: u32, text: &str) -> Option<String> {
    let h = crate::timeline::parse_history(tli, text).ok()?;
    Some(h.iter().map(|s| format!("{}:{}", s.tli, s.end)).collect::<Vec<_>>().join(" "))
}

/// A record's switch points back as history-file text.
pub fn switches_text(switches: &str) -> String {
    switches.split_whitespace().filter_map(|p| p.split_once(':')).map(|(t, l)| format!("{t}\t{l}\n")).collect()
}

impl WalRecord {
    pub fn render(&self) -> String {
        let mut s = format!(
            "{RECORD_MAGIC}\nname {}\nobject {}\nsize {}\nsha256 {}\n",
            self.name, self.object, self.size, self.sha256
        );
        if let Some(sw) = &self.switches {
            s.push_str(&format!("switches {sw}\n"));
        }
        match self.last_commit {
            Some(crate::walscan::LastCommit::At(t)) => s.push_str(&format!("commit {t}\n")),
            Some(crate::walscan::LastCommit::None) => s.push_str("commit none\n"),
            Some(crate::walscan::LastCommit::Unknown) => s.push_str("commit unknown\n"),
            None => {}
        }
        s
    }

    pub fn parse(text: &str) -> std::result::Result<WalRecord, String> {
        let mut lines = text.lines();
        if lines.next() != Some(RECORD_MAGIC) {
            return Err("not a cloud-dump WAL record".into());
        }
        let (mut name, mut object, mut size, mut sha, mut switches, mut commit) = (None, None, None, None, None, None);
        for l in lines {
            match l.split_once(' ') {
                Some(("name", v)) => name = Some(v.to_owned()),
                Some(("object", v)) => object = Some(v.to_owned()),
                Some(("switches", v)) => switches = Some(v.to_owned()),
                Some(("commit", v)) => {
                    use crate::walscan::LastCommit;
                    commit = Some(match v {
                        "none" => LastCommit::None,
                        "unknown" => LastCommit::Unknown,
                        t => LastCommit::At(t.parse::<i64>().map_err(|_| "bad commit time")?),
                    })
                }
                Some(("size", v)) => size = Some(v.parse::<u64>().map_err(|_| "bad size")?),
                Some(("sha256", v)) if v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    sha = Some(v.to_ascii_lowercase())
                }
                // Keys a later version adds are ignored (a record never decides content by
                // them: the object and its SHA-256 do).
                Some((k, _)) if !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'-') => {}
                _ => return Err(format!("bad line {l:?}")),
            }
        }
        match (name, object, size, sha) {
            (Some(name), Some(object), Some(size), Some(sha256)) => {
                // The object must be this WAL file under one of its own names.
                let (stem, _, _) = split_codec(&object).ok_or("bad object name")?;
                if stem != name {
                    return Err(format!("names object {object} for {name}"));
                }
                Ok(WalRecord { name, object, size, sha256, switches, last_commit: commit })
            }
            _ => Err("incomplete".into()),
        }
    }
}

pub struct WalArchive<'a> {
    repo: &'a Repo,
    dir: String,
}

fn sha_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn is_scrypt(stored: &[u8]) -> bool {
    let head = &stored[..stored.len().min(1024)];
    head.windows(10).any(|w| w == b"\n-> scrypt")
}

/// `…N.zst.age` → (`…N`, zstd, encrypted): an object name's codec suffixes.
/// `N.zst.age` → (`N`, zstd, encrypted); None for names that are no stored WAL object.
fn split_codec(object: &str) -> Option<(String, Compression, bool)> {
    let n = ObjectName::parse(object);
    classify(&n.stem).ok()?;
    Some((n.stem, n.compression, n.encrypted))
}

/// (compression, encrypted) from an object key's suffixes.
fn codec_of(key: &str) -> (Compression, bool) {
    let n = ObjectName::parse(key);
    (n.compression, n.encrypted)
}

fn damaged(name: &str, key: &str, reason: impl Into<String>) -> Error {
    Error::WalDamaged { name: name.into(), key: key.into(), reason: reason.into() }
}

impl<'a> WalArchive<'a> {
    pub fn new(repo: &'a Repo, layout: &Layout) -> WalArchive<'a> {
        WalArchive { repo, dir: layout.wal_dir() }
    }

    pub fn dir(&self) -> &str {
        &self.dir
    }

    fn record_key(&self, name: &str) -> String {
        format!("{}{name}{RECORD_SUFFIX}", self.dir)
    }

    /// The record of `name`, if one was written. A record that does not parse is damage.
    pub async fn record(&self, name: &str) -> Result<Option<WalRecord>> {
        let key = self.record_key(name);
        match self.repo.get(&key).await {
            Ok(b) => {
                let r = WalRecord::parse(&String::from_utf8_lossy(&b)).map_err(|e| damaged(name, &key, e))?;
                if r.name != name {
                    return Err(damaged(name, &key, format!("it describes {}", r.name)));
                }
                Ok(Some(r))
            }
            Err(StorageError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Every key a file called `name` may be stored under (objects archived before records).
    fn candidates(&self, name: &str) -> Vec<String> {
        let mut v = Vec::new();
        for ext in ["", ".zst", ".gz", ".lz4"] {
            for age in ["", ".age"] {
                v.push(format!("{}{name}{ext}{age}", self.dir));
            }
        }
        v
    }

    /// Keys of objects stored for `name` without a record (one HEAD per candidate, in parallel).
    async fn legacy_objects(&self, name: &str) -> Result<Vec<String>> {
        let heads: Vec<_> = futures::stream::iter(self.candidates(name))
            .map(|k| async move { (self.repo.head(&k).await, k) })
            .buffered(8)
            .collect()
            .await;
        let mut found = Vec::new();
        for (r, k) in heads {
            if r?.is_some() {
                found.push(k);
            }
        }
        Ok(found)
    }

    /// The key `name` is stored under, if it is archived: the record's object, else an
    /// object archived before records.
    pub async fn find(&self, name: &str) -> Result<Option<String>> {
        if let Some(r) = self.record(name).await? {
            let key = format!("{}{}", self.dir, r.object);
            return Ok(self.repo.head(&key).await?.map(|_| key));
        }
        Ok(self.legacy_objects(name).await?.into_iter().next())
    }

    /// Archives `path` as `name`. Ok only once the record and the object are durably
    /// stored, or when the same content is already archived. Different content under the
    /// same name is refused, without needing any key.
    pub async fn push(&self, path: &Path, name: &str, spec: &EncodeSpec, keys: &WalKeys) -> Result<PushOutcome> {
        classify(name).map_err(Error::Config)?;
        let mut data = tokio::fs::read(path)
            .await
            .map_err(|e| Error::Config(format!("cannot read WAL file {}: {e}", path.display())))?;
        let content_sha = sha_hex(&data);
        let mine = WalRecord {
            name: name.to_owned(),
            object: spec.object_name(name),
            size: data.len() as u64,
            sha256: content_sha.clone(),
            switches: match classify(name) {
                Ok(WalFileKind::History) => {
                    crate::timeline::tli_of(name).and_then(|t| render_switches(t, &String::from_utf8_lossy(&data)))
                }
                _ => None,
            },
            last_commit: match classify(name) {
                Ok(WalFileKind::Segment) => Some(crate::walscan::last_commit(&data)),
                _ => None,
            },
        };
        for _ in 0..3 {
            let record = match self.record(name).await? {
                Some(r) => r,
                None => {
                    // Archived before records existed: compare the old way, never duplicate.
                    if let Some(existing) = self.legacy_objects(name).await?.into_iter().next() {
                        return self.compare_legacy(&existing, name, &content_sha, keys).await;
                    }
                    match self.repo.put_new_durable(&self.record_key(name), Bytes::from(mine.render()), &[]).await {
                        Ok(()) => mine.clone(),
                        Err(StorageError::AlreadyExists { .. }) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            };
            if record.sha256 != content_sha || record.size != data.len() as u64 {
                return Err(Error::WalConflict { name: name.into(), key: self.record_key(name) });
            }
            // The record is ours or matches: make sure its object is there.
            let key = format!("{}{}", self.dir, record.object);
            if self.repo.head(&key).await?.is_some() {
                return Ok(PushOutcome::AlreadyArchived { key });
            }
            // A record without its object: an earlier push stopped between the two. Store
            // the object the record names, with its codec.
            let (_, compression, encrypted) =
                split_codec(&record.object).ok_or_else(|| damaged(name, &self.record_key(name), "bad object name"))?;
            if encrypted != spec.encryption.is_on() {
                return Err(Error::Config(format!(
                    "{} names {} ({}encrypted) but this wal-push is configured {}: archive with the same encryption settings",
                    self.record_key(name),
                    record.object,
                    if encrypted { "" } else { "un" },
                    if spec.encryption.is_on() { "with encryption" } else { "without encryption" }
                )));
            }
            let spec2 = EncodeSpec { compression, level: compression.default_level(), ..spec.clone() };
            // The last use of the file's bytes: no second 16 MiB copy.
            let plain = std::mem::take(&mut data);
            let stored = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
                let mut enc = Encoder::new(Vec::with_capacity(plain.len() / 2), &spec2)?;
                enc.write_all(&plain)?;
                Ok(enc.finish()?.0)
            })
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))??;
            let size = stored.len() as u64;
            return match self.repo.put_new_durable(&key, Bytes::from(stored), &[(SHA_METADATA, content_sha)]).await {
                Ok(()) => Ok(PushOutcome::Stored { key, size }),
                // A concurrent push of the same content stored it first.
                Err(StorageError::AlreadyExists { .. }) => Ok(PushOutcome::AlreadyArchived { key }),
                Err(e) => Err(e.into()),
            };
        }
        Err(Error::Restore(format!("{}: the record kept changing while wal-push read it", self.record_key(name))))
    }

    async fn compare_legacy(&self, key: &str, name: &str, content_sha: &str, keys: &WalKeys) -> Result<PushOutcome> {
        let stored_sha = match self.repo.metadata(key, SHA_METADATA).await? {
            Some(s) => s,
            None => {
                let bytes = self.repo.get(key).await?;
                match self.decode(key, bytes, keys).await {
                    Ok(plain) => sha_hex(&plain),
                    Err(Error::Pipeline(cloud_dump_pipeline::PipelineError::Decrypt { reason, .. })) => {
                        return Err(Error::WalUnverifiable { name: name.into(), key: key.into(), reason })
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        if stored_sha == content_sha {
            Ok(PushOutcome::AlreadyArchived { key: key.into() })
        } else {
            Err(Error::WalConflict { name: name.into(), key: key.into() })
        }
    }

    /// Decrypts and decompresses a stored WAL object in memory.
    async fn decode(&self, key: &str, stored: Bytes, keys: &WalKeys) -> Result<Vec<u8>> {
        use cloud_dump_pipeline::keys::{opener, Opener, Sealing};
        let (compression, encrypted) = codec_of(key);
        let sealing = match (encrypted, is_scrypt(&stored)) {
            (false, _) => Sealing::Plain,
            (true, true) => Sealing::ToPassphrase,
            (true, false) => Sealing::ToRecipients,
        };
        let dec = match (opener(sealing, keys.passphrase.is_some(), !keys.identities.is_empty()), &keys.passphrase) {
            (Opener::Passphrase, Some(p)) => Decryption::Passphrase(p.clone()),
            (Opener::Identities, _) => Decryption::Identities(keys.identities.clone()),
            (Opener::RepositoryKey, Some(p)) => match repokey::identity(self.repo, &self.dir, p).await? {
                Some(id) => Decryption::Identities(vec![id]),
                None => Decryption::None,
            },
            _ => Decryption::None,
        };
        let key = key.to_owned();
        tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
            let mut out = Vec::with_capacity(16 << 20);
            decoder(&stored[..], compression, encrypted, &dec, &key)?
                .read_to_end(&mut out)
                .map_err(|e| Error::Restore(format!("{key} is damaged: {e}")))?;
            Ok(out)
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))?
    }

    /// Downloads, decodes and verifies `name`. `None` when it is not archived. Never
    /// returns bytes that were not checked against the SHA-256 recorded at push time, and
    /// never `None` for a file whose object the store lists: a 404 for an object that
    /// exists (a flaky proxy, a lagging replica of the store) is an error, not "not found".
    pub async fn fetch(&self, name: &str, keys: &WalKeys) -> Result<Option<Vec<u8>>> {
        classify(name).map_err(Error::Config)?;
        if let Some(v) = self.fetch_once(name, keys).await? {
            return Ok(Some(v));
        }
        // Confirm "not found" with a listing (a record alone is a push still in progress).
        let prefix = format!("{}{name}", self.dir);
        let before = format!("{}{}", self.dir, &name[..name.len() - 1]);
        let objects: Vec<String> = self
            .repo
            .list_after(&prefix, &before, 16)
            .await?
            .into_iter()
            .map(|o| o.key)
            .filter(|k| split_codec(k.strip_prefix(&self.dir).unwrap_or(k)).is_some_and(|(stem, _, _)| stem == name))
            .collect();
        if objects.is_empty() {
            return Ok(None);
        }
        match self.fetch_once(name, keys).await? {
            Some(v) => Ok(Some(v)),
            None => Err(Error::Storage(StorageError::Config(format!(
                "the store lists {} but answers \"not found\" for {name}; not treating it as the end of the archive",
                objects.join(", ")
            )))),
        }
    }

    async fn fetch_once(&self, name: &str, keys: &WalKeys) -> Result<Option<Vec<u8>>> {
        let (key, want_sha, want_size) = match self.record(name).await? {
            Some(r) => (format!("{}{}", self.dir, r.object), r.sha256, Some(r.size)),
            None => {
                let found = self.legacy_objects(name).await?;
                // With keys configured, plain objects are never candidates.
                let usable: Vec<&String> = found.iter().filter(|k| !keys.any() || k.ends_with(".age")).collect();
                let Some(key) = usable.first().map(|k| (*k).clone()) else {
                    if let Some(k) = found.first() {
                        return Err(Error::WalUnverifiable {
                            name: name.into(),
                            key: k.clone(),
                            reason: "it is not encrypted although keys are configured".into(),
                        });
                    }
                    return Ok(None);
                };
                match self.repo.metadata(&key, SHA_METADATA).await? {
                    Some(sha) => (key, sha, None),
                    None => {
                        return Err(Error::WalUnverifiable {
                            name: name.into(),
                            key,
                            reason: "no checksum was recorded for it (archived by an older cloud-dump on a backend without metadata)".into(),
                        })
                    }
                }
            }
        };
        if keys.any() && !key.ends_with(".age") {
            return Err(Error::WalUnverifiable {
                name: name.into(),
                key,
                reason: "it is not encrypted although keys are configured".into(),
            });
        }
        let stored = match self.repo.get(&key).await {
            Ok(b) => b,
            // The record was written and the object not yet: not archived (yet).
            Err(StorageError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let plain = self.decode(&key, stored, keys).await.map_err(|e| match e {
            Error::Restore(reason) => damaged(name, &key, reason),
            e => e,
        })?;
        if let Some(size) = want_size {
            if plain.len() as u64 != size {
                return Err(damaged(name, &key, format!("{} bytes after decoding, {size} recorded", plain.len())));
            }
        }
        let got = sha_hex(&plain);
        if got != want_sha {
            return Err(damaged(
                name,
                &key,
                format!("its content has SHA-256 {got}, the checksum recorded at push time is {want_sha}"),
            ));
        }
        Ok(Some(plain))
    }

    /// Archived segments of `name`'s timeline that sort after it (at most `max`): one LIST
    /// from `name` on. Used to tell a hole from the end of the archive, and for prefetch;
    /// neither needs to know the segment size.
    pub async fn segments_after(&self, name: &str, max: usize) -> Result<Vec<String>> {
        if classify(name) != Ok(WalFileKind::Segment) {
            return Ok(Vec::new());
        }
        let prefix = format!("{}{}", self.dir, &name[..8]);
        let after = format!("{}{name}~", self.dir);
        let mut out: Vec<String> = Vec::new();
        // Up to three keys per segment (record, object, a legacy copy).
        for o in self.repo.list_after(&prefix, &after, max.saturating_mul(3).max(3)).await? {
            let rel = o.key.strip_prefix(&self.dir).unwrap_or(&o.key);
            let stem = rel.split('.').next().unwrap_or("");
            if stem > name && classify(stem) == Ok(WalFileKind::Segment) && out.last().map(String::as_str) != Some(stem)
            {
                out.push(stem.to_owned());
            }
        }
        out.sort();
        out.dedup();
        out.truncate(max);
        Ok(out)
    }

    /// The first archived segment of timeline `tli` (8 hex digits), if any.
    pub async fn first_segment(&self, tli: &str) -> Result<Option<String>> {
        let prefix = format!("{}{tli}", self.dir);
        for o in self.repo.list_after(&prefix, &prefix, 3).await? {
            let rel = o.key.strip_prefix(&self.dir).unwrap_or(&o.key);
            let stem = rel.split('.').next().unwrap_or("");
            if classify(stem) == Ok(WalFileKind::Segment) {
                return Ok(Some(stem.to_owned()));
            }
        }
        Ok(None)
    }

    /// True when any stored WAL object is age-encrypted (the archive is an encrypted one).
    pub async fn any_encrypted(&self) -> Result<bool> {
        Ok(self.repo.list(&self.dir).await?.iter().any(|o| o.key.ends_with(".age")))
    }

    /// The system identifier this archive records, if any.
    pub async fn recorded_system(&self) -> Result<Option<String>> {
        match self.repo.get(&format!("{}{SYSTEM_FILE}", self.dir)).await {
            Ok(b) => Ok(Some(String::from_utf8_lossy(&b).trim().to_owned())),
            Err(StorageError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Refuses WAL of another database system than the archive's (recorded by the first
    /// push, create-only). `cache` (pg_wal/.cloud-dump) remembers a match, so the check
    /// costs one GET per archive and host, not per segment.
    pub async fn check_system(&self, system: u64, cache: Option<&Path>) -> Result<()> {
        let this = system.to_string();
        let key = format!("{}{SYSTEM_FILE}", self.dir);
        let tag = hex::encode(&Sha256::digest(format!("{}\n{key}", self.repo.url()))[..8]);
        let cached = cache.map(|d| d.join(format!("system-{tag}")));
        if cached.as_ref().and_then(|f| std::fs::read_to_string(f).ok()).is_some_and(|c| c.trim() == this) {
            return Ok(());
        }
        let archived = match self.recorded_system().await? {
            Some(s) => s,
            None => match self.repo.put_new_durable(&key, Bytes::from(format!("{this}\n")), &[]).await {
                Ok(()) => this.clone(),
                // Another server wrote it first: compare with that.
                Err(StorageError::AlreadyExists { .. }) => self.recorded_system().await?.unwrap_or_default(),
                Err(e) => return Err(e.into()),
            },
        };
        if archived != this {
            return Err(Error::ForeignSystem { dir: self.repo.object_url(&self.dir), archived, this });
        }
        if let Some(f) = cached {
            if let Some(d) = f.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            let _ = write_atomically(&f, this.as_bytes());
        }
        Ok(())
    }

    /// Every archived file name (suffixes removed), sorted, with when it was first stored.
    pub async fn list_names(&self) -> Result<Vec<(String, std::time::SystemTime)>> {
        let mut v: Vec<_> = self
            .repo
            .list(&self.dir)
            .await?
            .into_iter()
            .filter_map(|o| Some((crate::repository::wal_name_of(o.key.strip_prefix(&self.dir)?)?, o.last_modified)))
            .collect();
        v.sort();
        v.dedup_by(|a, b| a.0 == b.0);
        Ok(v)
    }

    /// The text of history file `name` for the timeline graph: the switch points its
    /// record carries, else its content (records written before they carried them).
    /// `None` when neither can be read (no key for an encrypted file, damage).
    pub async fn history_text(&self, name: &str, keys: &WalKeys) -> Result<Option<String>> {
        if let Some(sw) = self.record(name).await?.and_then(|r| r.switches) {
            return Ok(Some(switches_text(&sw)));
        }
        match self.fetch(name, keys).await {
            Ok(b) => Ok(b.map(|b| String::from_utf8_lossy(&b).into_owned())),
            Err(Error::Storage(e)) if !e.is_permanent() => Err(Error::Storage(e)),
            Err(e) => {
                tracing::warn!("{name}: cannot be read for the timeline graph: {e}");
                Ok(None)
            }
        }
    }

    /// The time of the last commit (or abort) on `segments` (a restore path, in replay
    /// order), read from the records of its last segments, newest first (at most `look`
    /// of them). `None` — nothing may be concluded — when a record does not tell (written
    /// before records carried it, or a segment that could not be read to its end) before
    /// one with a commit is found: an older time would refuse targets that can be reached.
    pub async fn last_commit_on(&self, segments: &[String], look: usize) -> Result<Option<i64>> {
        use crate::walscan::LastCommit;
        for name in segments.iter().rev().take(look) {
            match self.record(name).await?.and_then(|r| r.last_commit) {
                Some(LastCommit::At(t)) => return Ok(Some(t)),
                Some(LastCommit::None) => continue,
                Some(LastCommit::Unknown) | None => return Ok(None),
            }
        }
        Ok(None)
    }

    /// The archive's timelines (one LIST, then each history file's record).
    pub async fn timeline_graph(&self, segment_size: u64, keys: &WalKeys) -> Result<crate::timeline::TimelineGraph> {
        let names = self.list_names().await?;
        self.graph_of(&names, segment_size, keys).await
    }

    /// The timeline graph of names already listed.
    pub async fn graph_of(
        &self,
        names: &[(String, std::time::SystemTime)],
        segment_size: u64,
        keys: &WalKeys,
    ) -> Result<crate::timeline::TimelineGraph> {
        let mut texts = std::collections::BTreeMap::new();
        for (n, _) in names.iter().filter(|(n, _)| classify(n) == Ok(WalFileKind::History)) {
            if let (Some(t), Some(text)) = (crate::timeline::tli_of(n), self.history_text(n, keys).await?) {
                texts.insert(t, text);
            }
        }
        let files: Vec<(String, i64)> = names.iter().map(|(n, t)| (n.clone(), system_time_us(*t))).collect();
        Ok(crate::timeline::TimelineGraph::build(&files, &texts, segment_size))
    }
}

/// Microseconds since the epoch.
pub fn system_time_us(t: std::time::SystemTime) -> i64 {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_micros() as i64,
        Err(e) => -(e.duration().as_micros() as i64),
    }
}

/// Writes `data` to `dest` atomically: a temporary file beside it, fsync, rename, fsync
/// of the folder. Either the whole file appears or nothing does.
pub fn write_atomically(dest: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp: PathBuf = dir.join(format!(
        ".{}.cloud-dump-{}.tmp",
        dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dest)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// True for names whose absence in the middle of recovery means the archive has a hole.
pub fn is_segment(name: &str) -> bool {
    classify(name) == Ok(WalFileKind::Segment)
}

#[cfg(test)]
mod system_tests {
    use super::segment_system_id;

    fn header(tli: u32, pageaddr: u64, sysid: u64, seg_size: u32) -> Vec<u8> {
        let mut h = vec![0u8; 40];
        h[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        h[2..4].copy_from_slice(&0x0002u16.to_le_bytes());
        h[4..8].copy_from_slice(&tli.to_le_bytes());
        h[8..16].copy_from_slice(&pageaddr.to_le_bytes());
        h[24..32].copy_from_slice(&sysid.to_le_bytes());
        h[32..36].copy_from_slice(&seg_size.to_le_bytes());
        h[36..40].copy_from_slice(&8192u32.to_le_bytes());
        h
    }

    #[test]
    fn the_system_identifier_of_a_real_segment_header_only() {
        let name = "000000020000000100000003";
        let addr = (0x1_0000_0000u64 / (16 << 20)) * (16 << 20) + 3 * (16 << 20);
        assert_eq!(segment_system_id(name, &header(2, addr, 7300000000000000001, 16 << 20)), Some(7300000000000000001));
        assert_eq!(segment_system_id(&format!("{name}.partial"), &header(2, addr, 42, 16 << 20)), Some(42));
        // Wrong timeline, wrong address, odd sizes, short, not a segment: no identifier.
        assert_eq!(segment_system_id(name, &header(1, addr, 42, 16 << 20)), None);
        assert_eq!(segment_system_id(name, &header(2, addr + 8192, 42, 16 << 20)), None);
        assert_eq!(segment_system_id(name, &header(2, addr, 42, 3 << 20)), None);
        assert_eq!(segment_system_id(name, &header(2, addr, 42, 16 << 20)[..30]), None);
        assert_eq!(segment_system_id("00000002.history", &header(2, addr, 42, 16 << 20)), None);
        assert_eq!(segment_system_id(name, &[0x03u8; 64]), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloud_dump_pipeline::Encryption;
    use cloud_dump_storage::StorageOptions;

    fn segment(seed: u8) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i as u8).wrapping_mul(seed) ^ (i >> 9) as u8).collect();
        f.write_all(&data).unwrap();
        f
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idempotent_push_refuses_different_content_and_never_duplicates() {
        let repo = Repo::open("memory://", &StorageOptions::default()).await.unwrap();
        let layout = Layout::new(Some("c"), None).unwrap();
        let wal = WalArchive::new(&repo, &layout);
        let name = "000000010000000000000003";
        let seg = segment(3);
        let zstd = EncodeSpec { compression: Compression::Zstd, level: 1, threads: 0, encryption: Encryption::None };
        let keys = WalKeys::default();
        let first = wal.push(seg.path(), name, &zstd, &keys).await.unwrap();
        assert!(
            matches!(first, PushOutcome::Stored { ref key, .. } if key == "c/wal_archive/000000010000000000000003.zst")
        );
        assert!(matches!(wal.push(seg.path(), name, &zstd, &keys).await.unwrap(), PushOutcome::AlreadyArchived { .. }));
        // Another compression does not create a second copy.
        let gz = EncodeSpec { compression: Compression::Gzip, ..zstd.clone() };
        assert!(matches!(wal.push(seg.path(), name, &gz, &keys).await.unwrap(), PushOutcome::AlreadyArchived { .. }));
        // One object and its record.
        assert_eq!(repo.list("c/wal_archive/").await.unwrap().len(), 2);
        // Different content under the same name is refused.
        let other = segment(5);
        let err = wal.push(other.path(), name, &zstd, &keys).await.unwrap_err();
        assert!(matches!(err, Error::WalConflict { .. }), "{err}");
        assert_eq!(wal.fetch(name, &keys).await.unwrap().unwrap(), std::fs::read(seg.path()).unwrap());
        assert!(wal.fetch("000000010000000000000009", &keys).await.unwrap().is_none());
        assert!(wal.push(seg.path(), "../../etc/passwd", &zstd, &keys).await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passphrase_wal_uses_the_repository_key() {
        let repo = Repo::open("memory://", &StorageOptions::default()).await.unwrap();
        let layout = Layout::new(None, None).unwrap();
        let wal = WalArchive::new(&repo, &layout);
        let p: SecretString = "wal-secret".to_owned().into();
        let recipient = repokey::recipient(&repo, wal.dir(), &p, None).await.unwrap();
        let spec = EncodeSpec {
            compression: Compression::Gzip,
            level: 1,
            threads: 0,
            encryption: Encryption::Recipients(vec![recipient]),
        };
        let seg = segment(7);
        let keys = WalKeys { passphrase: Some(p.clone()), identities: vec![], require_encrypted: true };
        wal.push(seg.path(), "000000010000000000000001", &spec, &keys).await.unwrap();
        let stored = repo.get("wal_archive/000000010000000000000001.gz.age").await.unwrap();
        assert!(!is_scrypt(&stored), "WAL must not pay scrypt per file");
        assert_eq!(
            wal.fetch("000000010000000000000001", &keys).await.unwrap().unwrap(),
            std::fs::read(seg.path()).unwrap()
        );
        let wrong = WalKeys { passphrase: Some("nope".to_owned().into()), identities: vec![], require_encrypted: true };
        assert!(wal.fetch("000000010000000000000001", &wrong).await.is_err());
    }

    async fn put_raw(repo: &Repo, key: &str, data: Vec<u8>) {
        let _ = repo.delete(key).await;
        repo.put_new(key, Bytes::from(data)).await.unwrap();
    }

    /// Every fetched byte is checked against the record, on a backend without metadata,
    /// for every compression: a flipped byte, a truncated or an extended object is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn damaged_wal_is_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let repo = Repo::create(&url, &StorageOptions::default()).await.unwrap();
        let layout = Layout::new(None, None).unwrap();
        let wal = WalArchive::new(&repo, &layout);
        let keys = WalKeys::default();
        let seg = segment(9);
        let plain = std::fs::read(seg.path()).unwrap();
        for (i, c) in
            [Compression::None, Compression::Lz4, Compression::Gzip, Compression::Zstd].into_iter().enumerate()
        {
            let name = format!("0000000100000000000000{:02X}", 0x10 + i);
            let spec =
                EncodeSpec { compression: c, level: c.default_level(), threads: 0, encryption: Encryption::None };
            let PushOutcome::Stored { key, .. } = wal.push(seg.path(), &name, &spec, &keys).await.unwrap() else {
                panic!("stored")
            };
            assert_eq!(wal.fetch(&name, &keys).await.unwrap().unwrap(), plain);
            let good = repo.get(&key).await.unwrap().to_vec();
            let mut flipped = good.clone();
            let mid = flipped.len() / 2;
            flipped[mid] ^= 0x40;
            let mut short = good.clone();
            short.truncate(good.len() - 100);
            let mut long = good.clone();
            long.extend_from_slice(&[0u8; 512]);
            for (what, bad) in [("flipped", flipped), ("truncated", short), ("extended", long)] {
                put_raw(&repo, &key, bad).await;
                // Refused, or (trailing bytes a decoder ignores) exactly the archived content.
                match wal.fetch(&name, &keys).await {
                    Err(_) => {}
                    Ok(Some(v)) if what == "extended" && v == plain => {}
                    Ok(other) => panic!("{c:?} {what}: served {:?}", other.map(|v| v.len())),
                }
            }
            put_raw(&repo, &key, good).await;
            assert_eq!(wal.fetch(&name, &keys).await.unwrap().unwrap(), plain);
        }
    }

    /// With keys configured, plain WAL is never served: not a planted `N` beside
    /// `N.zst.age`, not a record rewritten to point at it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn planted_plain_wal_is_refused_when_keys_are_configured() {
        let repo = Repo::open("memory://", &StorageOptions::default()).await.unwrap();
        let layout = Layout::new(None, None).unwrap();
        let wal = WalArchive::new(&repo, &layout);
        let id = age::x25519::Identity::generate();
        let spec = EncodeSpec {
            compression: Compression::Zstd,
            level: 1,
            threads: 0,
            encryption: Encryption::Recipients(vec![id.to_public()]),
        };
        let keys = WalKeys { passphrase: None, identities: vec![id], require_encrypted: true };
        let name = "000000010000000000000001";
        let seg = segment(1);
        wal.push(seg.path(), name, &spec, &WalKeys::default()).await.unwrap();
        let evil = segment(2);
        let evil_bytes = std::fs::read(evil.path()).unwrap();
        put_raw(&repo, &format!("wal_archive/{name}"), evil_bytes.clone()).await;
        assert_eq!(wal.fetch(name, &keys).await.unwrap().unwrap(), std::fs::read(seg.path()).unwrap());
        // The attacker also rewrites the record to describe the planted object.
        let forged = WalRecord {
            name: name.into(),
            object: name.into(),
            size: evil_bytes.len() as u64,
            sha256: sha_hex(&evil_bytes),
            switches: None,
            last_commit: None,
        };
        put_raw(&repo, &format!("wal_archive/{name}.sum"), forged.render().into_bytes()).await;
        let err = wal.fetch(name, &keys).await.unwrap_err();
        assert!(matches!(err, Error::WalUnverifiable { .. }), "{err}");
        // Objects without a record: only encrypted ones with a recorded checksum qualify.
        let legacy = "000000010000000000000002";
        put_raw(&repo, &format!("wal_archive/{legacy}"), evil_bytes.clone()).await;
        let err = wal.fetch(legacy, &keys).await.unwrap_err();
        assert!(matches!(err, Error::WalUnverifiable { .. }), "{err}");
        let err = wal.fetch(legacy, &WalKeys::default()).await.unwrap_err();
        assert!(err.to_string().contains("no checksum"), "{err}");
    }

    /// PostgreSQL re-pushes a segment after a crash before `.done`: with key-pair
    /// encryption and no private key on the host, identical content succeeds and
    /// different content is refused (the record is compared, nothing is decrypted).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn key_pair_repush_needs_no_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repo::create(&format!("file://{}", dir.path().display()), &StorageOptions::default()).await.unwrap();
        let wal = WalArchive::new(&repo, &Layout::new(None, None).unwrap());
        let id = age::x25519::Identity::generate();
        let spec = EncodeSpec {
            compression: Compression::Lz4,
            level: 0,
            threads: 0,
            encryption: Encryption::Recipients(vec![id.to_public()]),
        };
        let none = WalKeys::default();
        let name = "000000010000000000000007";
        let seg = segment(7);
        assert!(matches!(wal.push(seg.path(), name, &spec, &none).await.unwrap(), PushOutcome::Stored { .. }));
        assert!(matches!(wal.push(seg.path(), name, &spec, &none).await.unwrap(), PushOutcome::AlreadyArchived { .. }));
        let other = segment(8);
        assert!(matches!(wal.push(other.path(), name, &spec, &none).await.unwrap_err(), Error::WalConflict { .. }));
        // A push that stopped after its record: the retry stores the object.
        let obj = format!("wal_archive/{name}.lz4.age");
        repo.delete(&obj).await.unwrap();
        assert!(matches!(wal.push(seg.path(), name, &spec, &none).await.unwrap(), PushOutcome::Stored { .. }));
        let keys = WalKeys { passphrase: None, identities: vec![id], require_encrypted: true };
        assert_eq!(wal.fetch(name, &keys).await.unwrap().unwrap(), std::fs::read(seg.path()).unwrap());
    }

    /// A hole is any missing segment with a later segment of its timeline archived, at any
    /// distance and for any segment size; other timelines do not count.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn later_segments_are_found_at_any_distance() {
        for url in ["memory://", "file"] {
            let dir = tempfile::tempdir().unwrap();
            let url = if url == "file" { format!("file://{}", dir.path().display()) } else { url.to_owned() };
            let repo = Repo::create(&url, &StorageOptions::default()).await.unwrap();
            let wal = WalArchive::new(&repo, &Layout::new(None, None).unwrap());
            let spec = EncodeSpec::plain();
            let seg = segment(3);
            for n in ["000000010000000000000002", "0000000100000003000000F0", "000000020000000000000001"] {
                wal.push(seg.path(), n, &spec, &WalKeys::default()).await.unwrap();
            }
            let after = wal.segments_after("000000010000000000000003", 5).await.unwrap();
            assert_eq!(after, ["0000000100000003000000F0"], "{url}");
            assert_eq!(wal.segments_after("000000010000000000000001", 1).await.unwrap(), ["000000010000000000000002"]);
            assert!(wal.segments_after("0000000100000003000000F0", 5).await.unwrap().is_empty(), "{url}");
        }
    }

    #[test]
    fn records_parse_strictly() {
        let r = WalRecord {
            name: "000000010000000000000001".into(),
            object: "000000010000000000000001.zst.age".into(),
            size: 5,
            sha256: "ab".repeat(32),
            switches: None,
            last_commit: None,
        };
        assert_eq!(WalRecord::parse(&r.render()).unwrap(), r);
        let other = r.render().replace("object 000000010000000000000001", "object 000000010000000000000002");
        assert!(WalRecord::parse(&other).is_err(), "a record may only name its own file");
        assert!(
            WalRecord::parse(&r.render().replace("object 000000010000000000000001.zst.age", "object ../../x")).is_err()
        );
        assert!(WalRecord::parse("garbage").is_err());
    }

    #[test]
    fn atomic_write_and_codecs() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("RECOVERYXLOG");
        write_atomically(&dest, b"abc").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"abc");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        assert_eq!(codec_of("w/0001.zst.age"), (Compression::Zstd, true));
        assert_eq!(codec_of("w/00000002.history"), (Compression::None, false));
        assert_eq!(codec_of("w/0001.gz"), (Compression::Gzip, false));
    }
}
