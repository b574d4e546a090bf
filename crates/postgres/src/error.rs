//! Errors of the PostgreSQL side.
//!
//! Rules: a server's ErrorResponse keeps its SQLSTATE, message, detail and hint; the
//! connection target (host:port, never the password) is attached to connection errors;
//! anything about an object keeps the object key. `is_permanent()` drives retries.

use cloud_dump_pipeline::PipelineError;
use cloud_dump_storage::StorageError;
use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("cannot connect to PostgreSQL at {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with PostgreSQL at {target}: {reason}")]
    Tls { target: String, reason: String },
    #[error("PostgreSQL refused the login of {user:?}: {message}")]
    Auth { user: String, message: String },
    #[error("PostgreSQL: {message}{}{}", detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default(), hint.as_deref().map(|h| format!(" hint: {h}")).unwrap_or_default())]
    Server { code: String, message: String, detail: Option<String>, hint: Option<String> },
    #[error("protocol error talking to PostgreSQL: {0}")]
    Protocol(String),
    #[error("connection to PostgreSQL lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("backup {name:?} already exists in {repo}; backups are never overwritten, choose another --name")]
    BackupExists { name: String, repo: String },
    #[error("backup {name:?} not found in {repo}{}", if available.is_empty() { String::new() } else { format!(" (available: {})", available.join(", ")) })]
    BackupNotFound { name: String, repo: String, available: Vec<String> },
    #[error("manifest {key} is unreadable: {reason}")]
    BadManifest { key: String, reason: String },
    #[error("{0}")]
    Restore(String),
    #[error("unsafe entry {entry:?} in {archive}: {reason}; nothing outside the target is ever written")]
    UnsafeEntry { archive: String, entry: String, reason: String },
    #[error("WAL file {name} is already archived as {key} with DIFFERENT content; refusing to overwrite archived WAL (is another server archiving to the same place?)")]
    WalConflict { name: String, key: String },
    #[error("WAL file {name} ({key}) cannot be verified: {reason}")]
    WalUnverifiable { name: String, key: String, reason: String },
    #[error("WAL file {name} ({key}) is damaged: {reason}")]
    WalDamaged { name: String, key: String, reason: String },
    #[error("this WAL comes from database system {this}, but the archive {dir} holds WAL of system {archived} (another cluster, or this one re-created by initdb or pg_upgrade); give this cluster its own archive: another --cluster (or --wal-prefix)")]
    ForeignSystem { dir: String, archived: String, this: String },
    #[error(transparent)]
    Timeline(#[from] crate::timeline::TimelineError),
    /// A restore needs WAL (segments, history files) the archive does not hold.
    #[error("the archive {dir} lacks {} needed to restore backup {backup} to {target}: {}{}; nothing was written", if missing.len() == 1 { "a file" } else { "files" }, missing.iter().take(5).cloned().collect::<Vec<_>>().join(", "), if missing.len() > 5 { format!(" and {} more", missing.len() - 5) } else { String::new() })]
    WalMissing { dir: String, backup: String, target: String, missing: Vec<String> },
    #[error("old versions in the bucket: {0}")]
    OldVersions(String),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl Error {
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Io(_) => false,
            Error::Pipeline(e) => e.is_permanent(),
            Error::Storage(e) => e.is_permanent(),
            _ => true,
        }
    }

    /// The SQLSTATE when the server said no.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
