//! SigV4-signed S3 requests that object_store does not offer: the bucket's versioning and
//! Object Lock settings, listing every version under a prefix, and deleting chosen versions.
//! Needs static credentials (the variables or the options).

use bytes::Bytes;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::repo::StorageOptions;

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key");
    m.update(data.as_bytes());
    m.finalize().into_bytes().to_vec()
}

/// RFC 3986 encoding as SigV4 wants it: unreserved characters stay, everything else is
/// `%XX`; `/` stays in paths.
pub(crate) fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The canonical query string: pairs encoded and sorted; a bare sub-resource has an empty
/// value (`versions=`).
pub(crate) fn canonical_query(query: &[(&str, &str)]) -> String {
    let mut pairs: Vec<(String, String)> =
        query.iter().map(|(k, v)| (uri_encode(k, false), uri_encode(v, false))).collect();
    pairs.sort();
    pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")
}

/// One request to sign.
pub(crate) struct Request<'a> {
    pub method: &'a str,
    pub host: &'a str,
    /// Already URI-encoded, starting with `/`.
    pub path: &'a str,
    pub query: &'a [(&'a str, &'a str)],
    pub payload_sha256: &'a str,
    /// Further headers to sign (lower-case names).
    pub headers: &'a [(&'a str, String)],
}

/// SigV4 headers (without `host`) for `req`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sign(
    req: &Request<'_>,
    region: &str,
    key_id: &str,
    secret: &str,
    token: Option<&str>,
    now: time::OffsetDateTime,
) -> Vec<(String, String)> {
    let date = format!("{:04}{:02}{:02}", now.year(), now.month() as u8, now.day());
    let stamp = format!("{date}T{:02}{:02}{:02}Z", now.hour(), now.minute(), now.second());
    let mut headers = vec![
        ("host".to_owned(), req.host.to_owned()),
        ("x-amz-content-sha256".to_owned(), req.payload_sha256.to_owned()),
        ("x-amz-date".to_owned(), stamp.clone()),
    ];
    if let Some(t) = token {
        headers.push(("x-amz-security-token".to_owned(), t.to_owned()));
    }
    headers.extend(req.headers.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    headers.sort();
    let signed: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{}\n", v.trim())).collect();
    let canonical = format!(
        "{}\n{}\n{}\n{canonical_headers}\n{}\n{}",
        req.method,
        req.path,
        canonical_query(req.query),
        signed.join(";"),
        req.payload_sha256
    );
    let scope = format!("{date}/{region}/s3/aws4_request");
    let to_sign = format!("AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{}", hex::encode(Sha256::digest(canonical.as_bytes())));
    let k = hmac(format!("AWS4{secret}").as_bytes(), &date);
    let k = hmac(&k, region);
    let k = hmac(&k, "s3");
    let k = hmac(&k, "aws4_request");
    let signature = hex::encode(hmac(&k, &to_sign));
    let authorization = format!(
        "AWS4-HMAC-SHA256 Credential={key_id}/{scope}, SignedHeaders={}, Signature={signature}",
        signed.join(";")
    );
    headers.push(("authorization".to_owned(), authorization));
    headers.retain(|(k, _)| k != "host");
    headers
}

/// A bucket spoken to with signed requests.
pub(crate) struct SignedBucket {
    client: reqwest::Client,
    scheme: String,
    host: String,
    /// `/bucket` (path style) or empty (virtual-hosted style).
    base: String,
    region: String,
    key_id: String,
    secret: String,
    token: Option<String>,
}

impl SignedBucket {
    /// `Ok(None)`: no static credentials to sign with.
    pub(crate) fn new(bucket: &str, opts: &StorageOptions) -> Result<Option<SignedBucket>, String> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let (Some(key_id), Some(secret)) = (
            opts.s3_access_key_id.clone().or_else(|| env("AWS_ACCESS_KEY_ID")),
            opts.s3_secret_access_key.clone().or_else(|| env("AWS_SECRET_ACCESS_KEY")),
        ) else {
            return Ok(None);
        };
        let region = crate::repo::s3_region(opts);
        let endpoint = crate::repo::s3_endpoint(opts).unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        let url = url::Url::parse(&endpoint).map_err(|e| format!("endpoint {endpoint}: {e}"))?;
        let authority = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            _ => return Err(format!("endpoint {endpoint} has no host")),
        };
        let (host, base) = if opts.s3_virtual_hosted_style {
            (format!("{bucket}.{authority}"), String::new())
        } else {
            (authority, format!("/{}", uri_encode(bucket, false)))
        };
        let client = reqwest::Client::builder()
            .danger_accept_invalid_certs(opts.s3_skip_verify)
            .timeout(std::time::Duration::from_secs(120))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Some(SignedBucket {
            client,
            scheme: url.scheme().to_owned(),
            host,
            base,
            region,
            key_id,
            secret,
            token: env("AWS_SESSION_TOKEN"),
        }))
    }

    /// Sends one signed request to the bucket (`key`: an object, or empty for the bucket);
    /// answers status and body.
    pub(crate) async fn send(
        &self,
        method: &str,
        key: &str,
        query: &[(&str, &str)],
        body: Bytes,
        headers: &[(&str, String)],
    ) -> Result<(u16, String), String> {
        let path = if key.is_empty() {
            if self.base.is_empty() {
                "/".to_owned()
            } else {
                self.base.clone()
            }
        } else {
            format!("{}/{}", self.base, uri_encode(key, true))
        };
        let payload = hex::encode(Sha256::digest(&body));
        let req = Request { method, host: &self.host, path: &path, query, payload_sha256: &payload, headers };
        let signed = sign(
            &req,
            &self.region,
            &self.key_id,
            &self.secret,
            self.token.as_deref(),
            time::OffsetDateTime::now_utc(),
        );
        let q = canonical_query(query);
        let url = format!("{}://{}{path}{}{q}", self.scheme, self.host, if q.is_empty() { "" } else { "?" });
        let method = http::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
        let mut r = self.client.request(method.clone(), url).body(body);
        for (k, v) in signed {
            r = r.header(k, v);
        }
        let resp = r.send().await.map_err(|e| format!("{method} {path}: {}", crate::diagnose::one_line(&e)))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| format!("{method} {path}: {e}"))?;
        Ok((status, text))
    }
}

// XML of S3's answers: enough for the few elements read here.

/// The text between `<tag>` and `</tag>` in `xml`, unescaped.
pub(crate) fn field(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{tag}>"))? + start;
    Some(unescape(&xml[start..end]))
}

/// Every `<tag>…</tag>` block of `xml`, in order.
pub(crate) fn blocks<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let body = &rest[i + open.len()..];
        let Some(j) = body.find(&close) else { break };
        out.push(&body[..j]);
        rest = &body[j + close.len()..];
    }
    out
}

/// XML character data → text (the five named entities and numeric references).
pub(crate) fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let Some(end) = tail.find(';') else {
            out.push_str(tail);
            return out;
        };
        let entity = &tail[1..end];
        let ch = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            e if e.starts_with("#x") => u32::from_str_radix(&e[2..], 16).ok().and_then(char::from_u32),
            e if e.starts_with('#') => e[1..].parse().ok().and_then(char::from_u32),
            _ => None,
        };
        match ch {
            Some(c) => out.push(c),
            None => out.push_str(&tail[..=end]),
        }
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    out
}

pub(crate) fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&apos;")
}

/// The versions and delete markers of one ListObjectVersions page, and the markers of the
/// next page when it is truncated. A body that is not a whole ListVersionsResult, or a
/// truncated page without the next marker, is an error: a partial listing must never be
/// taken for the whole.
#[cfg(test)]
mod tests {
    use super::*;

    /// AWS's published example "GET Object" (SigV4 documentation, examplebucket, 20130524):
    /// the signature computed here matches the published one.
    #[test]
    fn matches_the_published_example() {
        let now = time::macros::datetime!(2013-05-24 00:00:00 UTC);
        let empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let req = Request {
            method: "GET",
            host: "examplebucket.s3.amazonaws.com",
            path: "/test.txt",
            query: &[],
            payload_sha256: empty,
            headers: &[("range", "bytes=0-9".to_owned())],
        };
        let h = sign(&req, "us-east-1", "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", None, now);
        let auth = &h.iter().find(|(k, _)| k == "authorization").unwrap().1;
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    #[test]
    fn queries_are_encoded_and_sorted() {
        assert_eq!(
            canonical_query(&[("versions", ""), ("prefix", "a b/c"), ("key-marker", "k")]),
            "key-marker=k&prefix=a%20b%2Fc&versions="
        );
        assert_eq!(uri_encode("pg/c/backup/x y", true), "pg/c/backup/x%20y");
        assert_eq!(canonical_query(&[]), "");
    }
}
