//! Whether an S3 bucket keeps what is written: versioning and Object Lock (mode and default
//! retention), read with two signed GETs (`?versioning`, `?object-lock`) that object_store
//! does not offer. Needs static credentials (the variables or the options); with others
//! the answer is "unknown".

use bytes::Bytes;
use serde::Serialize;

use crate::repo::StorageOptions;
use crate::signed::{field, SignedBucket};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BucketProtection {
    /// `Enabled`, `Suspended`, or `off`.
    pub versioning: String,
    pub object_lock: bool,
    /// `COMPLIANCE` or `GOVERNANCE`, when a default retention is set.
    pub retention_mode: Option<String>,
    pub retention_days: Option<u32>,
}

impl BucketProtection {
    /// Whether every object stays locked at least `days` days after it is written.
    pub fn covers_days(&self, days: f64) -> bool {
        self.object_lock && self.retention_days.is_some_and(|d| d as f64 >= days)
    }
}

/// Reads the bucket's versioning and Object Lock settings. `Ok(None)`: no static
/// credentials to sign with.
pub async fn s3_bucket_protection(bucket: &str, opts: &StorageOptions) -> Result<Option<BucketProtection>, String> {
    let Some(b) = SignedBucket::new(bucket, opts)? else {
        return Ok(None);
    };
    let (status, body) = b.send("GET", "", &[("versioning", "")], Bytes::new(), &[]).await?;
    if status != 200 {
        return Err(format!("GET ?versioning answered HTTP {status}"));
    }
    let text = |tag: &str| field(&body, tag).map(|t| t.trim().to_owned());
    let versioning = text("Status").unwrap_or_else(|| "off".to_owned());
    let (status, body) = b.send("GET", "", &[("object-lock", "")], Bytes::new(), &[]).await?;
    let (object_lock, mode, days) = match status {
        200 => {
            let text = |tag: &str| field(&body, tag).map(|t| t.trim().to_owned());
            let enabled = text("ObjectLockEnabled").as_deref() == Some("Enabled");
            let mode = text("Mode");
            let days = text("Days")
                .and_then(|d| d.parse::<u32>().ok())
                .or_else(|| text("Years").and_then(|y| y.parse::<u32>().ok()).map(|y| y * 365));
            (enabled, mode, days)
        }
        404 => (false, None, None),
        s => return Err(format!("GET ?object-lock answered HTTP {s}")),
    };
    Ok(Some(BucketProtection { versioning, object_lock, retention_mode: mode, retention_days: days }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_covers_a_window() {
        let p = BucketProtection {
            versioning: "Enabled".into(),
            object_lock: true,
            retention_mode: Some("COMPLIANCE".into()),
            retention_days: Some(7),
        };
        assert!(p.covers_days(7.0));
        assert!(!p.covers_days(7.5));
        assert_eq!(field("<a><Status>Enabled</Status></a>", "Status").as_deref(), Some("Enabled"));
    }
}
