//! Object storage for cloud-dump: repository URLs, create-only puts
//! and bounded multipart uploads, over `object_store`.

mod diagnose;
mod error;
pub mod faults;
mod location;
mod protection;
mod repo;
mod signed;
pub mod storj;
mod versions;

pub use bytes::Bytes;
pub use diagnose::one_line;
pub use error::{Problem, Result, StorageError};
pub use location::Location;
pub use protection::BucketProtection;
pub use versions::{versions, ObjectVersion, VersionRefused, Versions};

/// Versioning and Object Lock of the repository's bucket: `Ok(None)` where that cannot be
/// told (not S3, or no static credentials to ask with).
pub async fn bucket_protection(
    url: &str,
    opts: &StorageOptions,
) -> std::result::Result<Option<BucketProtection>, String> {
    match Location::parse(url).map_err(|e| e.to_string())? {
        Location::S3 { bucket, .. } => protection::s3_bucket_protection(&bucket, opts).await,
        _ => Ok(None),
    }
}
pub use repo::{dir_mode_for, part_size_for, ObjectInfo, Repo, StorageOptions, Upload, REPOSITORY_MARKER};
