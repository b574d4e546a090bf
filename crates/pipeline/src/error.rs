//! Errors of the stream stages.
//!
//! Rules: a wrong key/passphrase, a checksum mismatch and a size mismatch are distinct
//! variants because callers act differently on them (wal-fetch exit codes, restore
//! messages); everything else is I/O or storage with the object key attached.

use cloud_dump_storage::StorageError;
use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PipelineError {
    #[error("{0}")]
    Config(String),
    #[error("cannot decrypt {key}: {reason}")]
    Decrypt { key: String, reason: String },
    #[error("{key} is corrupt: SHA-256 of the stored bytes is {actual}, the manifest says {expected}")]
    Checksum { key: String, expected: String, actual: String },
    #[error("{key} is truncated or padded: {actual} bytes stored, the manifest says {expected}")]
    Size { key: String, expected: u64, actual: u64 },
    #[error("{key}: {source}")]
    Io {
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("upload of {key} was cancelled")]
    Cancelled { key: String },
}

impl PipelineError {
    pub fn io(key: &str, source: std::io::Error) -> Self {
        PipelineError::Io { key: key.into(), source }
    }

    /// True when retrying the same operation cannot succeed.
    pub fn is_permanent(&self) -> bool {
        match self {
            PipelineError::Storage(e) => e.is_permanent(),
            PipelineError::Io { .. } => false,
            _ => true,
        }
    }
}

pub type Result<T, E = PipelineError> = std::result::Result<T, E>;
