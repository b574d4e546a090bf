//! Parsing repository URLs (`s3://`, `gs://`, `az://`, `file://`, `memory://`, `storj://`,
//! or a plain absolute path) into a [`Location`], without touching the network.

use crate::error::{Result, StorageError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    S3 { bucket: String, prefix: String },
    Gcs { bucket: String, prefix: String },
    Azure { container: String, prefix: String },
    File { path: std::path::PathBuf },
    Memory { prefix: String },
    Storj { bucket: String, prefix: String },
}

impl Location {
    pub fn parse(input: &str) -> Result<Location> {
        let bad = |reason: &str| StorageError::BadUrl { url: input.into(), reason: reason.into() };
        if input.starts_with('/') {
            return Ok(Location::File { path: input.into() });
        }
        let (scheme, rest) = input
            .split_once("://")
            .ok_or_else(|| bad("expected SCHEME://… (s3, gs, az, file, storj, memory) or an absolute path"))?;
        let split = |rest: &str| -> (String, String) {
            let rest = rest.trim_end_matches('/');
            match rest.split_once('/') {
                Some((b, p)) => (b.to_owned(), normalize_prefix(p)),
                None => (rest.to_owned(), String::new()),
            }
        };
        let need_bucket = |b: &str, what: &str| -> Result<()> {
            if b.is_empty() {
                Err(bad(&format!("missing {what} name")))
            } else {
                Ok(())
            }
        };
        match scheme {
            "s3" | "s3a" => {
                let (bucket, prefix) = split(rest);
                need_bucket(&bucket, "bucket")?;
                Ok(Location::S3 { bucket, prefix })
            }
            "gs" | "gcs" => {
                let (bucket, prefix) = split(rest);
                need_bucket(&bucket, "bucket")?;
                Ok(Location::Gcs { bucket, prefix })
            }
            "az" | "azure" | "abfs" => {
                let (container, prefix) = split(rest);
                need_bucket(&container, "container")?;
                Ok(Location::Azure { container, prefix })
            }
            "storj" | "sj" => {
                let (bucket, prefix) = split(rest);
                need_bucket(&bucket, "bucket")?;
                Ok(Location::Storj { bucket, prefix })
            }
            "file" => {
                // file:///abs/path (empty host) or file://localhost/abs/path.
                let path = rest.strip_prefix("localhost").unwrap_or(rest);
                if !path.starts_with('/') {
                    return Err(bad("file URLs need an absolute path: file:///path/to/repo"));
                }
                Ok(Location::File { path: path.into() })
            }
            "memory" | "mem" => Ok(Location::Memory { prefix: normalize_prefix(rest) }),
            other => {
                Err(bad(&format!("unknown scheme {other:?}; use s3://, gs://, az://, file://, storj:// or memory://")))
            }
        }
    }
}

/// "a//b/" -> "a/b/": a prefix is empty or ends with exactly one slash.
pub fn normalize_prefix(p: &str) -> String {
    let parts: Vec<&str> = p.split('/').filter(|s| !s.is_empty()).collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("{}/", parts.join("/"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_scheme() {
        assert_eq!(
            Location::parse("s3://bkt/pg/prod").unwrap(),
            Location::S3 { bucket: "bkt".into(), prefix: "pg/prod/".into() }
        );
        assert_eq!(Location::parse("s3://bkt").unwrap(), Location::S3 { bucket: "bkt".into(), prefix: "".into() });
        assert_eq!(Location::parse("gs://b/x/").unwrap(), Location::Gcs { bucket: "b".into(), prefix: "x/".into() });
        assert_eq!(
            Location::parse("az://c/p").unwrap(),
            Location::Azure { container: "c".into(), prefix: "p/".into() }
        );
        assert_eq!(
            Location::parse("storj://b/p").unwrap(),
            Location::Storj { bucket: "b".into(), prefix: "p/".into() }
        );
        assert_eq!(Location::parse("file:///var/backups").unwrap(), Location::File { path: "/var/backups".into() });
        assert_eq!(Location::parse("/var/backups").unwrap(), Location::File { path: "/var/backups".into() });
        assert_eq!(Location::parse("memory://t").unwrap(), Location::Memory { prefix: "t/".into() });
    }

    #[test]
    fn rejects_bad_urls_with_a_reason() {
        for bad in ["ftp://x/y", "s3://", "file://relative/path", "bucket/prefix"] {
            let err = Location::parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }
}
