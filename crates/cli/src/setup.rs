//! Turning flags into the library's settings: the repository, the layout, encryption.

use std::path::Path;

use anyhow::{bail, Context, Result};
use cloud_dump_pipeline::{parse_identities, parse_recipients, Decryption, Encryption, SecretString};
use cloud_dump_postgres::Layout;
use cloud_dump_storage::{Repo, StorageOptions};

use crate::args::{DecryptArgs, EncryptArgs, GlobalArgs, StorageKind};

/// Variables that say where the store is and how to talk to it, not who we are: the
/// restore settings file carries them, and for wal-fetch it decides them.
pub const STORE_SETTINGS: &[&str] = &[
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ALLOW_HTTP",
    "AWS_VIRTUAL_HOSTED_STYLE_REQUEST",
    "AWS_S3_EXPRESS",
    "GOOGLE_BUCKET",
    "GOOGLE_ALLOW_HTTP",
    "AZURE_STORAGE_ENDPOINT",
    "AZURE_STORAGE_USE_EMULATOR",
    "AZURE_ALLOW_HTTP",
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURITE_BLOB_STORAGE_URL",
];

pub fn repo_url(g: &GlobalArgs) -> Result<String> {
    if let Some(r) = &g.repo {
        return Ok(r.clone());
    }
    match (g.storage, &g.storj_bucket) {
        (Some(StorageKind::Storj) | None, Some(b)) => Ok(format!("storj://{b}")),
        (Some(StorageKind::Storj), None) => bail!("--storage storj needs --storj-bucket (or STORJ_BUCKET), or give --repo storj://bucket/prefix"),
        _ => bail!("no repository: give --repo URL (or CLOUD_DUMP_REPO, or a cluster in the config file), e.g. --repo s3://bucket/pg or --repo file:///var/backups/pg"),
    }
}

/// An existing repository (a missing file:// directory is an error).
pub async fn open_repo(g: &GlobalArgs) -> Result<Repo> {
    let url = repo_url(g)?;
    Ok(Repo::open(&url, &storage_options(g)).await?)
}

/// The repository a backup writes to, created on first use.
pub async fn create_repo(g: &GlobalArgs) -> Result<Repo> {
    let url = repo_url(g)?;
    Ok(Repo::create(&url, &storage_options(g)).await?)
}

/// How to reach the store, from the global flags (credentials come from the environment).
pub fn storage_options(g: &GlobalArgs) -> StorageOptions {
    StorageOptions {
        s3_endpoint: g.s3_endpoint.clone(),
        s3_region: g.s3_region.clone(),
        s3_virtual_hosted_style: g.s3_virtual_hosted_style,
        s3_allow_http: g.s3_allow_http,
        s3_skip_verify: g.s3_skip_verify,
        s3_object_lock: g.s3_object_lock,
        s3_access_key_id: None,
        s3_secret_access_key: None,
        storj_access: g.storj_access.clone(),
        storj_auth_service: g.storj_auth_service.clone(),
        storj_gateway: g.storj_gateway.clone(),
        parts_in_flight: 4,
        read_timeout: Some(std::time::Duration::from_secs(g.io_timeout)),
    }
}

pub fn layout(g: &GlobalArgs) -> Result<Layout> {
    Layout::new(g.cluster.as_deref(), Some(&g.wal_prefix)).map_err(anyhow::Error::msg)
}

fn read_passphrase_file(p: &Path) -> Result<SecretString> {
    let text = std::fs::read_to_string(p).with_context(|| format!("cannot read passphrase file {}", p.display()))?;
    let line = text.lines().next().unwrap_or("").to_owned();
    if line.is_empty() {
        bail!("passphrase file {} is empty", p.display());
    }
    Ok(line.into())
}

/// The passphrase from a flag/environment value or the first line of a file.
pub fn passphrase(flag: &Option<String>, file: &Option<std::path::PathBuf>) -> Result<Option<SecretString>> {
    match (flag, file) {
        (Some(p), _) if p.is_empty() => bail!("the passphrase is empty"),
        (Some(p), _) => Ok(Some(p.clone().into())),
        (None, Some(f)) => Ok(Some(read_passphrase_file(f)?)),
        (None, None) => Ok(None),
    }
}

pub fn encryption(a: &EncryptArgs) -> Result<Encryption> {
    let pass = passphrase(&a.passphrase, &a.passphrase_file)?;
    match (a.encrypt, pass, &a.recipient_key) {
        (false, None, None) => Ok(Encryption::None),
        (false, _, _) => bail!(
            "a passphrase or recipient key was given without --encrypt: add --encrypt (or CLOUD_DUMP_ENCRYPT=true) to encrypt, or remove the key"
        ),
        (true, Some(p), None) => Ok(Encryption::Passphrase(p)),
        (true, None, Some(f)) => {
            let text = std::fs::read_to_string(f).with_context(|| format!("cannot read recipient key file {}", f.display()))?;
            Ok(Encryption::Recipients(parse_recipients(&text, &f.display().to_string())?))
        }
        (true, None, None) => bail!("--encrypt needs --passphrase, --passphrase-file or --recipient-key"),
        (true, Some(_), Some(_)) => bail!("give either a passphrase or --recipient-key, not both"),
    }
}

/// The age identities in an identity file; errors name the file, never a key.
pub fn read_identities(f: &Path) -> Result<Vec<age::x25519::Identity>> {
    let text = std::fs::read_to_string(f).with_context(|| format!("cannot read identity file {}", f.display()))?;
    Ok(parse_identities(&text, &f.display().to_string())?)
}

pub fn decryption(a: &DecryptArgs) -> Result<Decryption> {
    if let Some(f) = &a.identity_key {
        return Ok(Decryption::Identities(read_identities(f)?));
    }
    Ok(match passphrase(&a.passphrase, &a.passphrase_file)? {
        Some(p) => Decryption::Passphrase(p),
        None => Decryption::None,
    })
}

/// "50M" → kB/s for MAX_RATE.
pub fn parse_rate(s: &str) -> Result<u32> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.trim().parse().with_context(|| format!("--max-rate {s:?}: expected a number like 50M or 800k"))?;
    let kb = n * mult / 1024;
    if !(32..=1_048_576).contains(&kb) {
        bail!("--max-rate {s}: must be between 32k and 1G per second");
    }
    Ok(kb as u32)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rates() {
        assert_eq!(super::parse_rate("50M").unwrap(), 51200);
        assert_eq!(super::parse_rate("32k").unwrap(), 32);
        assert!(super::parse_rate("1k").is_err());
        assert!(super::parse_rate("fast").is_err());
    }
}
