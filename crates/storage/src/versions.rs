//! Old versions on a versioned S3 bucket (Object Lock): a delete there only stacks a delete
//! marker on the data, which stays, locked, until its retention ends. [`Versions`] lists
//! every version under the repository's prefix and removes chosen versions; deciding which
//! is the caller's (a pure plan). Keys here are relative to the repository, like [`Repo`]'s.
//!
//! [`Repo`]: crate::Repo

use base64::Engine;
use bytes::Bytes;
use md5::{Digest, Md5};

use crate::repo::StorageOptions;
use crate::signed::{blocks, escape, field, SignedBucket};
use crate::Location;

/// One version of one object, or a delete marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectVersion {
    pub key: String,
    pub version_id: String,
    /// The newest version of its key.
    pub latest: bool,
    pub delete_marker: bool,
    /// As the store gives it (RFC 3339).
    pub last_modified: String,
}

/// A version the store would not delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRefused {
    pub key: String,
    pub version_id: String,
    /// The store's code (`AccessDenied` for a version still under its lock).
    pub code: String,
    pub message: String,
}

/// Signed access to the versions under a repository's prefix.
pub struct Versions {
    bucket: SignedBucket,
    prefix: String,
}

/// Version access for `url`: `Ok(None)` where there is none (not S3, or no static
/// credentials to sign with).
pub fn versions(url: &str, opts: &StorageOptions) -> Result<Option<Versions>, String> {
    match Location::parse(url).map_err(|e| e.to_string())? {
        Location::S3 { bucket, prefix } => {
            Ok(SignedBucket::new(&bucket, opts)?.map(|bucket| Versions { bucket, prefix }))
        }
        _ => Ok(None),
    }
}

/// One page of a version listing, and where the next one starts (key and version markers).
pub(crate) type Page = (Vec<ObjectVersion>, Option<(String, String)>);

pub(crate) fn parse_list_page(xml: &str) -> Result<Page, String> {
    if !xml.contains("<ListVersionsResult") || !xml.contains("</ListVersionsResult>") {
        return Err("the store's answer is not a complete ListVersionsResult".into());
    }
    let mut out = Vec::new();
    // Versions and delete markers interleave in key order; each block is read on its own.
    let mut rest = xml;
    loop {
        let v = rest.find("<Version>");
        let d = rest.find("<DeleteMarker>");
        let (at, tag, marker) = match (v, d) {
            (Some(v), Some(d)) if d < v => (d, "DeleteMarker", true),
            (Some(v), _) => (v, "Version", false),
            (None, Some(d)) => (d, "DeleteMarker", true),
            (None, None) => break,
        };
        let Some(block) = blocks(&rest[at..], tag).into_iter().next() else { break };
        let (Some(key), Some(version_id)) = (field(block, "Key"), field(block, "VersionId")) else {
            return Err(format!("a {tag} without its key or version id"));
        };
        out.push(ObjectVersion {
            key,
            version_id,
            latest: field(block, "IsLatest").as_deref() == Some("true"),
            delete_marker: marker,
            last_modified: field(block, "LastModified").unwrap_or_default(),
        });
        let close = format!("</{tag}>");
        rest = &rest[at + rest[at..].find(&close).map_or(rest.len() - at, |j| j + close.len())..];
    }
    // Only the result's own IsTruncated (blocks have none).
    let truncated = field(xml, "IsTruncated").as_deref() == Some("true");
    let next = match (truncated, field(xml, "NextKeyMarker")) {
        (true, Some(k)) if !k.is_empty() => Some((k, field(xml, "NextVersionIdMarker").unwrap_or_default())),
        (true, _) => return Err("the store says the listing goes on but gives no marker to go on from".into()),
        (false, _) => None,
    };
    Ok((out, next))
}

/// The refusals in a DeleteObjects answer (quiet mode lists only those). An answer that is
/// not a DeleteResult, or a refusal without its key, is an error.
pub(crate) fn parse_delete_result(xml: &str) -> Result<Vec<VersionRefused>, String> {
    if !xml.contains("<DeleteResult") {
        return Err(format!(
            "the store's answer to DeleteObjects is not a DeleteResult: {}",
            xml.chars().take(200).collect::<String>()
        ));
    }
    let refused: Vec<VersionRefused> = blocks(xml, "Error")
        .into_iter()
        .map(|b| VersionRefused {
            key: field(b, "Key").unwrap_or_default(),
            version_id: field(b, "VersionId").unwrap_or_default(),
            code: field(b, "Code").unwrap_or_default(),
            message: field(b, "Message").unwrap_or_default(),
        })
        .collect();
    if refused.iter().any(|r| r.key.is_empty()) {
        return Err("the store refused a delete without saying which object".into());
    }
    Ok(refused)
}

/// A DeleteObjects body for `(key, version)` pairs, quiet.
pub(crate) fn delete_body(items: &[(String, String)]) -> String {
    let mut body = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Delete><Quiet>true</Quiet>");
    for (k, v) in items {
        body.push_str(&format!("<Object><Key>{}</Key><VersionId>{}</VersionId></Object>", escape(k), escape(v)));
    }
    body.push_str("</Delete>");
    body
}

impl Versions {
    /// Every version and delete marker whose key starts with `prefix` (relative to the
    /// repository), in key order, newest first within a key.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectVersion>, String> {
        let full = format!("{}{prefix}", self.prefix);
        let mut out = Vec::new();
        let mut marker: Option<(String, String)> = None;
        loop {
            let mut query: Vec<(&str, &str)> = vec![("versions", ""), ("prefix", &full)];
            if let Some((k, v)) = &marker {
                query.push(("key-marker", k));
                if !v.is_empty() {
                    query.push(("version-id-marker", v));
                }
            }
            let (status, body) = self.bucket.send("GET", "", &query, Bytes::new(), &[]).await?;
            if status != 200 {
                return Err(format!("listing the versions under {full} answered HTTP {status}"));
            }
            let (page, next) = parse_list_page(&body).map_err(|e| format!("listing the versions under {full}: {e}"))?;
            for mut v in page {
                let Some(rel) = v.key.strip_prefix(&self.prefix) else { continue };
                v.key = rel.to_owned();
                out.push(v);
            }
            match next {
                Some(n) if Some(&n) != marker.as_ref() => marker = Some(n),
                Some(_) => return Err(format!("listing the versions under {full}: the store repeated a page")),
                None => return Ok(out),
            }
        }
    }

    /// One version of an object (relative key), e.g. the manifest of a deleted backup.
    pub async fn get(&self, key: &str, version_id: &str) -> Result<Bytes, String> {
        let full = format!("{}{key}", self.prefix);
        let (status, body) = self.bucket.send("GET", &full, &[("versionId", version_id)], Bytes::new(), &[]).await?;
        if status != 200 {
            return Err(format!("GET {full} version {version_id} answered HTTP {status}"));
        }
        Ok(Bytes::from(body))
    }

    /// Deletes the given versions for good, 1000 per request; answers those the store
    /// refused (a version still under its lock is refused with `AccessDenied`).
    pub async fn delete(&self, items: &[(String, String)]) -> Result<Vec<VersionRefused>, String> {
        let mut refused = Vec::new();
        for chunk in items.chunks(1000) {
            let full: Vec<(String, String)> =
                chunk.iter().map(|(k, v)| (format!("{}{k}", self.prefix), v.clone())).collect();
            let body = Bytes::from(delete_body(&full));
            let md5 = base64::engine::general_purpose::STANDARD.encode(Md5::digest(&body));
            let (status, text) = self.bucket.send("POST", "", &[("delete", "")], body, &[("content-md5", md5)]).await?;
            if status != 200 {
                return Err(format!("deleting old versions answered HTTP {status}"));
            }
            for mut r in parse_delete_result(&text)? {
                if let Some(rel) = r.key.strip_prefix(&self.prefix) {
                    r.key = rel.to_owned();
                }
                refused.push(r);
            }
        }
        Ok(refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_of_versions_reads() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListVersionsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name><Prefix>pg/</Prefix>
<KeyMarker></KeyMarker><VersionIdMarker></VersionIdMarker><NextKeyMarker>pg/b&amp;c</NextKeyMarker>
<NextVersionIdMarker>v9</NextVersionIdMarker><MaxKeys>1000</MaxKeys><IsTruncated>true</IsTruncated>
<DeleteMarker><Key>pg/a</Key><VersionId>v2</VersionId><IsLatest>true</IsLatest><LastModified>2026-11-23T08:00:01.000Z</LastModified></DeleteMarker>
<Version><Key>pg/a</Key><VersionId>v1</VersionId><IsLatest>false</IsLatest><LastModified>2026-11-23T08:00:00.000Z</LastModified><ETag>"x"</ETag><Size>3</Size></Version>
<Version><Key>pg/b&amp;c</Key><VersionId>v9</VersionId><IsLatest>true</IsLatest><LastModified>2026-11-23T08:00:02.000Z</LastModified></Version>
</ListVersionsResult>"#;
        let (page, next) = parse_list_page(xml).unwrap();
        assert_eq!(next, Some(("pg/b&c".to_owned(), "v9".to_owned())));
        assert_eq!(page.len(), 3);
        assert!(page[0].delete_marker && page[0].latest && page[0].version_id == "v2");
        assert!(!page[1].delete_marker && !page[1].latest && page[1].key == "pg/a");
        assert_eq!(page[2].key, "pg/b&c");
        let (_, none) =
            parse_list_page("<ListVersionsResult><IsTruncated>false</IsTruncated></ListVersionsResult>").unwrap();
        assert_eq!(none, None);
        // Cut short, or truncated without a marker: never taken for the whole listing.
        assert!(parse_list_page(&xml[..xml.len() / 2]).is_err());
        assert!(parse_list_page("<ListVersionsResult><IsTruncated>true</IsTruncated></ListVersionsResult>").is_err());
    }

    #[test]
    fn delete_bodies_and_answers() {
        let body = delete_body(&[("a<b".into(), "1".into())]);
        assert!(body.contains("<Key>a&lt;b</Key><VersionId>1</VersionId>"), "{body}");
        let r = parse_delete_result(
            "<DeleteResult><Error><Key>pg/x</Key><VersionId>7</VersionId><Code>AccessDenied</Code><Message>locked</Message></Error></DeleteResult>",
        )
        .unwrap();
        assert!(parse_delete_result("<Error><Code>InternalError</Code></Error>").is_err());
        assert!(parse_delete_result("<DeleteResult><Error><Code>AccessDenied</Code></Error></DeleteResult>").is_err());
        assert_eq!(
            r,
            vec![VersionRefused {
                key: "pg/x".into(),
                version_id: "7".into(),
                code: "AccessDenied".into(),
                message: "locked".into()
            }]
        );
        assert_eq!(crate::signed::unescape("&#65;&#x42;&amp;&bogus;"), "AB&&bogus;");
    }
}
