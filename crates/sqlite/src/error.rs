//! Errors of SQLite replication and restore.
//!
//! Rules: every variant names the file, database or object it is about; a problem with the
//! user's input (config, database, arguments) is `Config`/`Database` and is permanent; storage
//! and pipeline errors keep their own `is_permanent`, so the replicate loop retries transient
//! ones at the next sync and reports the rest.

use cloud_dump_pipeline::PipelineError;
use cloud_dump_storage::StorageError;
use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SqliteError {
    /// A bad config file, flag or replica description.
    #[error("{0}")]
    Config(String),
    /// The database cannot be replicated or restored as asked (not SQLite, cannot switch to WAL, …).
    #[error("{path}: {reason}")]
    Database { path: String, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Sql {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    /// Stored objects that do not fit together (missing WAL, broken checksum chain, …).
    #[error("{0}")]
    Replica(String),
    /// The replica holds nothing (no generation at all): the only failure that
    /// `restore --if-replica-exists` turns into "nothing to do".
    #[error("{0}")]
    EmptyReplica(String),
    /// The database file at the path is another file than the one opened (replaced):
    /// the caller reopens it.
    #[error("{path}: the database file was replaced")]
    Replaced { path: String },
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl SqliteError {
    pub fn io(path: impl std::fmt::Display, source: std::io::Error) -> Self {
        SqliteError::Io { path: path.to_string(), source }
    }

    pub fn sql(path: impl std::fmt::Display, source: rusqlite::Error) -> Self {
        SqliteError::Sql { path: path.to_string(), source }
    }

    pub fn db(path: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        SqliteError::Database { path: path.to_string(), reason: reason.into() }
    }

    /// True when trying again later cannot help.
    pub fn is_permanent(&self) -> bool {
        match self {
            SqliteError::Pipeline(e) => e.is_permanent(),
            SqliteError::Storage(e) => e.is_permanent(),
            SqliteError::Io { .. } | SqliteError::Sql { .. } => false,
            _ => true,
        }
    }
}

pub type Result<T, E = SqliteError> = std::result::Result<T, E>;
