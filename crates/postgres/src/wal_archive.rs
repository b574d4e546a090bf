//! The WAL archive: `wal-push` (the archive_command contract) and `wal-fetch` (the
//! restore_command contract), with prefetch into a spool folder.
//!
//! A WAL file `N` is stored once, as `<wal-dir>/N[.gz|.zst|.lz4][.age]`, with the SHA-256 of
//! its original content as object metadata where the backend keeps metadata. Whatever
//! compression or encryption a later push uses, it finds the stored copy first.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use cloud_dump_pipeline::{decoder, repokey, Compression, Decryption, EncodeSpec, Encoder, SecretString};
use cloud_dump_storage::{Layout, Repo, StorageError};
use futures::StreamExt;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::wal::{classify, WalFileKind};

pub const SHA_METADATA: &str = "cloud-dump-sha256";

/// What may open encrypted WAL: a passphrase (scrypt files, or the repository key), and
/// X25519 identities (key-pair files, or the repository key already opened by `restore`).
#[derive(Clone, Default)]
pub struct WalKeys {
    pub passphrase: Option<SecretString>,
    pub identities: Vec<age::x25519::Identity>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum PushOutcome {
    Stored { key: String, size: u64 },
    AlreadyArchived { key: String },
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

/// (compression, encrypted) from an object name's suffixes.
fn codec_of(key: &str) -> (Compression, bool) {
    let (base, encrypted) = match key.strip_suffix(".age") {
        Some(b) => (b, true),
        None => (key, false),
    };
    let compression =
        base.rsplit_once('.').and_then(|(_, ext)| Compression::from_ext(ext)).unwrap_or(Compression::None);
    (compression, encrypted)
}

impl<'a> WalArchive<'a> {
    pub fn new(repo: &'a Repo, layout: &Layout) -> WalArchive<'a> {
        WalArchive { repo, dir: layout.wal_dir() }
    }

    pub fn dir(&self) -> &str {
        &self.dir
    }

    /// Every key a file called `name` may be stored under.
    fn candidates(&self, name: &str) -> Vec<String> {
        let mut v = Vec::new();
        for ext in ["", ".zst", ".gz", ".lz4"] {
            for age in ["", ".age"] {
                v.push(format!("{}{name}{ext}{age}", self.dir));
            }
        }
        v
    }

    /// The key `name` is stored under, if it is archived (one HEAD per candidate, in parallel).
    pub async fn find(&self, name: &str) -> Result<Option<String>> {
        let heads: Vec<_> = futures::stream::iter(self.candidates(name))
            .map(|k| async move { (self.repo.head(&k).await, k) })
            .buffered(8)
            .collect()
            .await;
        let mut found = None;
        for (r, k) in heads {
            if r?.is_some() && found.is_none() {
                found = Some(k);
            }
        }
        Ok(found)
    }

    /// Archives `path` as `name`. Ok only once the object is durably stored, or when the
    /// same content is already archived. Different content under the same name is refused.
    pub async fn push(&self, path: &Path, name: &str, spec: &EncodeSpec, keys: &WalKeys) -> Result<PushOutcome> {
        classify(name).map_err(Error::Config)?;
        let data = tokio::fs::read(path)
            .await
            .map_err(|e| Error::Config(format!("cannot read WAL file {}: {e}", path.display())))?;
        let content_sha = sha_hex(&data);
        if let Some(existing) = self.find(name).await? {
            return self.compare(&existing, name, &content_sha, keys).await;
        }
        let key = format!("{}{}", self.dir, spec.object_name(name));
        let spec2 = spec.clone();
        let stored = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            let mut enc = Encoder::new(Vec::with_capacity(data.len() / 2), &spec2)?;
            enc.write_all(&data)?;
            Ok(enc.finish()?.0)
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))??;
        let size = stored.len() as u64;
        match self.repo.put_new_durable(&key, Bytes::from(stored), &[(SHA_METADATA, content_sha.clone())]).await {
            Ok(()) => Ok(PushOutcome::Stored { key, size }),
            Err(StorageError::AlreadyExists { .. }) => self.compare(&key, name, &content_sha, keys).await,
            Err(e) => Err(e.into()),
        }
    }

    async fn compare(&self, key: &str, name: &str, content_sha: &str, keys: &WalKeys) -> Result<PushOutcome> {
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
        let (compression, encrypted) = codec_of(key);
        let dec = if !encrypted {
            Decryption::None
        } else if is_scrypt(&stored) {
            match &keys.passphrase {
                Some(p) => Decryption::Passphrase(p.clone()),
                None => Decryption::None,
            }
        } else if !keys.identities.is_empty() {
            Decryption::Identities(keys.identities.clone())
        } else if let Some(p) = &keys.passphrase {
            match repokey::identity(self.repo, &self.dir, p).await? {
                Some(id) => Decryption::Identities(vec![id]),
                None => Decryption::None,
            }
        } else {
            Decryption::None
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

    /// Downloads, decodes and verifies `name`. `None` when it is not archived.
    pub async fn fetch(&self, name: &str, keys: &WalKeys) -> Result<Option<Vec<u8>>> {
        classify(name).map_err(Error::Config)?;
        let Some(key) = self.find(name).await? else { return Ok(None) };
        let stored = match self.repo.get(&key).await {
            Ok(b) => b,
            Err(StorageError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let expected = self.repo.metadata(&key, SHA_METADATA).await.ok().flatten();
        let plain = self.decode(&key, stored, keys).await?;
        if let Some(want) = expected {
            let got = sha_hex(&plain);
            if got != want {
                return Err(Error::Pipeline(cloud_dump_pipeline::PipelineError::Checksum {
                    key,
                    expected: want,
                    actual: got,
                }));
            }
        }
        Ok(Some(plain))
    }

    /// Every archived file name (suffixes removed), sorted.
    pub async fn list_names(&self) -> Result<Vec<(String, std::time::SystemTime)>> {
        let mut v: Vec<_> = self
            .repo
            .list(&self.dir)
            .await?
            .into_iter()
            .filter_map(|o| {
                let rel = o.key.strip_prefix(&self.dir)?.to_owned();
                let name = rel.split('.').next()?.to_owned();
                let name = if rel.contains(".history") { format!("{name}.history") } else { name };
                classify(&name).ok()?;
                Some((name, o.last_modified))
            })
            .collect();
        v.sort();
        v.dedup_by(|a, b| a.0 == b.0);
        Ok(v)
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
        assert_eq!(repo.list("c/wal_archive/").await.unwrap().len(), 1);
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
        let recipient = repokey::recipient(&repo, wal.dir(), &p).await.unwrap();
        let spec = EncodeSpec {
            compression: Compression::Gzip,
            level: 1,
            threads: 0,
            encryption: Encryption::Recipients(vec![recipient]),
        };
        let seg = segment(7);
        let keys = WalKeys { passphrase: Some(p.clone()), identities: vec![] };
        wal.push(seg.path(), "000000010000000000000001", &spec, &keys).await.unwrap();
        let stored = repo.get("wal_archive/000000010000000000000001.gz.age").await.unwrap();
        assert!(!is_scrypt(&stored), "WAL must not pay scrypt per file");
        assert_eq!(
            wal.fetch("000000010000000000000001", &keys).await.unwrap().unwrap(),
            std::fs::read(seg.path()).unwrap()
        );
        let wrong = WalKeys { passphrase: Some("nope".to_owned().into()), identities: vec![] };
        assert!(wal.fetch("000000010000000000000001", &wrong).await.is_err());
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
