//! Object storage for cloud-dump: repository URLs, the backup/WAL layout, create-only puts
//! and bounded multipart uploads, over `object_store`.

mod diagnose;
mod error;
pub mod faults;
pub mod layout;
mod location;
mod repo;
pub mod storj;

pub use bytes::Bytes;
pub use diagnose::one_line;
pub use error::{Problem, Result, StorageError};
pub use layout::Layout;
pub use location::Location;
pub use repo::{part_size_for, ObjectInfo, Repo, StorageOptions, Upload, REPOSITORY_MARKER};
