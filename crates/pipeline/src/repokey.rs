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

/// The public half, creating the key pair on first use (create-only: concurrent first
/// pushes agree on one key).
pub async fn recipient(repo: &Repo, wal_dir: &str, passphrase: &SecretString) -> Result<age::x25519::Recipient> {
    let key = format!("{wal_dir}{KEY_OBJECT}");
    for _ in 0..3 {
        match repo.get(&key).await {
            Ok(bytes) => return Ok(parse(&key, &String::from_utf8_lossy(&bytes))?.0),
            Err(StorageError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let identity = age::x25519::Identity::generate();
        let mut sealed = Vec::new();
        let mut w = age::Encryptor::with_user_passphrase(passphrase.clone())
            .wrap_output(&mut sealed)
            .map_err(|e| PipelineError::io(&key, e))?;
        w.write_all(identity.to_string().expose_secret().as_bytes()).map_err(|e| PipelineError::io(&key, e))?;
        w.finish().map_err(|e| PipelineError::io(&key, e))?;
        let text = format!("{HEADER}recipient: {}\nidentity: {}\n", identity.to_public(), hex::encode(&sealed));
        match repo.put_new_durable(&key, Bytes::from(text), &[]).await {
            Ok(()) => {
                tracing::info!("created the repository WAL key {key}");
                return Ok(identity.to_public());
            }
            Err(StorageError::AlreadyExists { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(bad(&key, "could not be created or read"))
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
    let decryptor = age::Decryptor::new(&sealed[..]).map_err(|_| bad(&key, "damaged identity"))?;
    let mut id = age::scrypt::Identity::new(passphrase.clone());
    id.set_max_work_factor(22);
    let mut reader = decryptor.decrypt(std::iter::once(&id as &dyn age::Identity)).map_err(|_| {
        PipelineError::Decrypt { key: key.clone(), reason: "wrong passphrase for the repository WAL key".into() }
    })?;
    let mut text = String::new();
    reader.read_to_string(&mut text).map_err(|e| PipelineError::io(&key, e))?;
    let identity = age::x25519::Identity::from_str(text.trim()).map_err(|_| bad(&key, "damaged identity"))?;
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
        let r1 = recipient(&repo, "wal/", &p).await.unwrap();
        let r2 = recipient(&repo, "wal/", &"other".to_owned().into()).await.unwrap();
        assert_eq!(r1.to_string(), r2.to_string(), "a second push must reuse the key");
        let id = identity(&repo, "wal/", &p).await.unwrap().unwrap();
        assert_eq!(id.to_public().to_string(), r1.to_string());
        let err = identity(&repo, "wal/", &"wrong".to_owned().into()).await.err().unwrap().to_string();
        assert!(err.contains("wrong passphrase"), "{err}");
        assert!(identity(&repo, "elsewhere/", &p).await.unwrap().is_none());
    }
}
