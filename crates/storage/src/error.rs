//! Errors of the storage layer.
//!
//! Rules: every variant names the object key or URL it is about; `is_permanent()` says
//! whether repeating the same call could succeed, and callers retry only what is not
//! permanent (object_store already retries transient HTTP failures inside one call).

use thiserror::Error;

pub use crate::diagnose::Problem;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StorageError {
    #[error("repository URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("storage configuration: {0}")]
    Config(String),
    #[error("object {key} not found")]
    NotFound { key: String },
    #[error("object {key} already exists; refusing to overwrite it")]
    AlreadyExists { key: String },
    /// A call the store did not complete, with its classified cause (one line, each
    /// cause once, with a hint where one can be given).
    #[error("cannot {op} {object}: {problem}")]
    Backend { op: &'static str, object: String, problem: Box<Problem> },
    #[error("Storj auth service {service}: {reason}")]
    StorjAuth { service: String, reason: String },
    #[error("repository {url} does not exist or is empty (is its volume mounted?); the first backup creates it")]
    MissingRepository { url: String },
    #[error("upload of {key} was abandoned before it completed")]
    Abandoned { key: String },
}

impl StorageError {
    /// True when repeating the call cannot help (bad configuration, missing object, …).
    pub fn is_permanent(&self) -> bool {
        match self {
            StorageError::Backend { problem, .. } => problem.is_permanent(),
            StorageError::StorjAuth { .. } => false,
            _ => true,
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, StorageError::NotFound { .. })
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;
