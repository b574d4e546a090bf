//! The repository key pair that makes passphrase-encrypted WAL archiving fast.
//!
//! age's passphrase mode runs scrypt (about a second of CPU) for every file it opens or
//! seals. Archiving one 16 MiB segment per second would not keep up with a busy server, so
//! with a passphrase, WAL is encrypted to an X25519 *repository key*: one object holds its
//! public half in clear and its private half encrypted with the passphrase (scrypt, once).
//! `wal-push` reads the public half (no scrypt); `restore` opens the private half once and
//! hands it to `wal-fetch` through the 0600 restore configuration inside PGDATA.

use std::io::{Read, Write};
use std::str::FromStr;

use age::secrecy::{ExposeSecret, SecretString};
use bytes::Bytes;
use cloud_dump_storage::{Repo, StorageError};

use crate::error::{PipelineError, Result};

/// scrypt work factor (log2 N) for sealed keys: 256 MiB and about a second, once per
/// backup, restore or archive.
pub const SCRYPT_LOG_N: u8 = 18;

/// Object name of the key, inside the WAL folder.
pub const KEY_OBJECT: &str = "cloud-dump-wal.key";

const HEADER: &str = "# cloud-dump repository key: WAL is encrypted to the recipient below;\n\
                      # the identity after it is age-encrypted with the repository passphrase (hex).\n";

fn bad(key: &str, reason: &str) -> PipelineError {
    PipelineError::Config(format!("repository key {key}: {reason}"))
}

fn parse(key: &str, text: &str) -> Result<(age::x25519::Recipient, Vec<u8>)> {
    let mut recipient = None;
    let mut sealed = None;
    for line in text.lines() {
        if let Some(r) = line.strip_prefix("recipient: ") {
            recipient = Some(age::x25519::Recipient::from_str(r.trim()).map_err(|_| bad(key, "damaged recipient"))?);
        } else if let Some(h) = line.strip_prefix("identity: ") {
            sealed = Some(hex::decode(h.trim()).map_err(|_| bad(key, "damaged identity"))?);
        }
    }
    match (recipient, sealed) {
        (Some(r), Some(s)) => Ok((r, s)),
        _ => Err(bad(key, "incomplete")),
    }
}

/// A fresh X25519 identity and its sealed form: age-encrypted with `passphrase` (one
/// scrypt), hex-encoded. Backups use one per backup so that each archive is encrypted to
/// it (fast) instead of running scrypt per object.
pub fn seal_new_identity(passphrase: &SecretString) -> std::io::Result<(age::x25519::Identity, String)> {
    let identity = age::x25519::Identity::generate();
    let mut sealed = Vec::new();
    // age calibrates scrypt to ~1 s of this machine, which on fast CPUs means 2^19-2^20
    // (0.5-1 GiB of memory). 2^18 is age's nominal strength at a quarter of that memory.
    let mut recipient = age::scrypt::Recipient::new(passphrase.clone());
    recipient.set_work_factor(SCRYPT_LOG_N);
    let encryptor = age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient))
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut w = encryptor.wrap_output(&mut sealed)?;
    w.write_all(identity.to_string().expose_secret().as_bytes())?;
    w.finish()?;
    Ok((identity, hex::encode(sealed)))
}

/// Opens what [`seal_new_identity`] sealed. `what` names it in errors.
pub fn open_identity(sealed_hex: &str, passphrase: &SecretString, what: &str) -> Result<age::x25519::Identity> {
    let sealed = hex::decode(sealed_hex.trim()).map_err(|_| bad(what, "damaged identity"))?;
    let decryptor = age::Decryptor::new(&sealed[..]).map_err(|_| bad(what, "damaged identity"))?;
    let mut id = age::scrypt::Identity::new(passphrase.clone());
    id.set_max_work_factor(22);
    let mut reader = decryptor
        .decrypt(std::iter::once(&id as &dyn age::Identity))
        .map_err(|_| PipelineError::Decrypt { key: what.to_owned(), reason: "wrong passphrase".into() })?;
    let mut text = String::new();
    reader.read_to_string(&mut text).map_err(|e| PipelineError::io(what, e))?;
    age::x25519::Identity::from_str(text.trim()).map_err(|_| bad(what, "damaged identity"))
}

/// The public half, creating the key pair on first use (create-only: concurrent first
/// pushes agree on one key).
///
/// The recipient line is stored in clear, so whoever can write to the store could replace
/// it and receive all later WAL. It is used only once proven: the sealed identity, opened
/// with the passphrase (one scrypt), must have exactly this public half; a mismatch or a
/// wrong passphrase stops archiving. The proof is remembered in `verified_dir` (a marker
/// named by a hash of the repository, the key object's whole text; no secret in it), so
/// scrypt runs once per key and host, not once per WAL file.
pub async fn recipient(
    repo: &Repo,
    wal_dir: &str,
    passphrase: &SecretString,
    verified_dir: Option<&std::path::Path>,
) -> Result<age::x25519::Recipient> {
    let key = format!("{wal_dir}{KEY_OBJECT}");
    let marker = |text: &str| -> Option<std::path::PathBuf> {
        use sha2::Digest;
        let h = sha2::Sha256::digest(format!("{}\n{key}\n{text}", repo.url()).as_bytes());
        verified_dir.map(|d| d.join(format!("wal-key-verified-{}", hex::encode(&h[..16]))))
    };
    for _ in 0..3 {
        match repo.get(&key).await {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes).into_owned();
                let (recipient, sealed) = parse(&key, &text)?;
                let mark = marker(&text);
                if mark.as_ref().is_some_and(|m| m.exists()) {
                    return Ok(recipient);
                }
                let (sealed, p, what) = (hex::encode(sealed), passphrase.clone(), key.clone());
                let identity = tokio::task::spawn_blocking(move || open_identity(&sealed, &p, &what))
                    .await
                    .map_err(|e| PipelineError::io(&key, std::io::Error::other(e)))?
                    .map_err(|e| match e {
                        PipelineError::Decrypt { key, .. } => PipelineError::Decrypt {
                            key,
                            reason: "the passphrase does not open the repository WAL key (a wrong passphrase, or the key object was replaced); archiving stopped".into(),
                        },
                        other => other,
                    })?;
                if identity.to_public().to_string() != recipient.to_string() {
                    return Err(bad(
                        &key,
                        "its recipient line does not belong to its sealed identity: the key object was tampered with; archiving stopped (WAL is never encrypted to an unproven key)",
                    ));
                }
                remember(mark);
                return Ok(recipient);
            }
            Err(StorageError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let (identity, sealed) = seal_new_identity(passphrase).map_err(|e| PipelineError::io(&key, e))?;
        let text = format!("{HEADER}recipient: {}\nidentity: {sealed}\n", identity.to_public());
        match repo.put_new_durable(&key, Bytes::from(text.clone()), &[]).await {
            Ok(()) => {
                tracing::info!("created the repository WAL key {key}");
                remember(marker(&text));
                return Ok(identity.to_public());
            }
            Err(StorageError::AlreadyExists { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(bad(&key, "could not be created or read"))
}

/// Best effort: a marker that could not be written costs one scrypt next time.
fn remember(marker: Option<std::path::PathBuf>) {
    if let Some(m) = marker {
        if let Some(d) = m.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        let _ = std::fs::write(&m, b"verified\n");
    }
}

/// The private half, opened with the passphrase (one scrypt). `None` when the archive has
/// no repository key (nothing was pushed with a passphrase yet).
pub async fn identity(repo: &Repo, wal_dir: &str, passphrase: &SecretString) -> Result<Option<age::x25519::Identity>> {
    let key = format!("{wal_dir}{KEY_OBJECT}");
    let bytes = match repo.get(&key).await {
        Ok(b) => b,
        Err(StorageError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let (recipient, sealed) = parse(&key, &String::from_utf8_lossy(&bytes))?;
    let identity = open_identity(&hex::encode(sealed), passphrase, &key).map_err(|e| match e {
        PipelineError::Decrypt { key, .. } => {
            PipelineError::Decrypt { key, reason: "wrong passphrase for the repository WAL key".into() }
        }
        other => other,
    })?;
    if identity.to_public().to_string() != recipient.to_string() {
        return Err(bad(&key, "its recipient does not match its identity: the key object was tampered with"));
    }
    Ok(Some(identity))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloud_dump_storage::StorageOptions;

    #[tokio::test]
    async fn created_once_and_opened_with_the_passphrase() {
        let repo = Repo::open("memory://", &StorageOptions::default()).await.unwrap();
        let p: SecretString = "s3cret".to_owned().into();
        let r1 = recipient(&repo, "wal/", &p, None).await.unwrap();
        let r2 = recipient(&repo, "wal/", &p, None).await.unwrap();
        assert_eq!(r1.to_string(), r2.to_string(), "a second push must reuse the key");
        let err = recipient(&repo, "wal/", &"other".to_owned().into(), None).await.unwrap_err().to_string();
        assert!(err.contains("does not open"), "{err}");
        let id = identity(&repo, "wal/", &p).await.unwrap().unwrap();
        assert_eq!(id.to_public().to_string(), r1.to_string());
        let err = identity(&repo, "wal/", &"wrong".to_owned().into()).await.err().unwrap().to_string();
        assert!(err.contains("wrong passphrase"), "{err}");
        assert!(identity(&repo, "elsewhere/", &p).await.unwrap().is_none());
    }

    /// Whoever rewrites the clear recipient line must not receive WAL: the key is refused,
    /// also after a verification was remembered for the original text.
    #[tokio::test]
    async fn a_replaced_recipient_is_refused() {
        let repo = Repo::open("memory://", &StorageOptions::default()).await.unwrap();
        let p: SecretString = "s3cret".to_owned().into();
        let cache = tempfile::tempdir().unwrap();
        let good = recipient(&repo, "wal/", &p, Some(cache.path())).await.unwrap();
        assert_eq!(recipient(&repo, "wal/", &p, Some(cache.path())).await.unwrap().to_string(), good.to_string());
        let text = String::from_utf8(repo.get("wal/cloud-dump-wal.key").await.unwrap().to_vec()).unwrap();
        let attacker = age::x25519::Identity::generate().to_public().to_string();
        let forged = text.replace(&good.to_string(), &attacker);
        assert_ne!(forged, text);
        repo.delete("wal/cloud-dump-wal.key").await.unwrap();
        repo.put_new("wal/cloud-dump-wal.key", Bytes::from(forged)).await.unwrap();
        let err = recipient(&repo, "wal/", &p, Some(cache.path())).await.unwrap_err().to_string();
        assert!(err.contains("tampered"), "{err}");
        // A whole new key sealed with another passphrase is refused too.
        repo.delete("wal/cloud-dump-wal.key").await.unwrap();
        let (id, sealed) = seal_new_identity(&"attacker".to_owned().into()).unwrap();
        let text = format!("{HEADER}recipient: {}\nidentity: {sealed}\n", id.to_public());
        repo.put_new("wal/cloud-dump-wal.key", Bytes::from(text)).await.unwrap();
        let err = recipient(&repo, "wal/", &p, Some(cache.path())).await.unwrap_err().to_string();
        assert!(err.contains("does not open"), "{err}");
    }
}
