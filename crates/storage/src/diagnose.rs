//! Why a storage request failed, in words a person can act on.
//!
//! `object_store` reports failures as nested errors whose texts repeat each other (and its
//! HTTP statuses are typed only for some operations). So every HTTP client we hand it is
//! wrapped in an [`Observer`] that records, typed, what the wire said: the status and the
//! store's own error code of a refused request, or that an endpoint could not be reached.
//! [`Problem::classify`] combines that record with the typed parts of the error chain
//! (`HttpError::kind`, `io::ErrorKind`, `rustls::Error`) — never with error texts.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpService, ReqwestConnector,
};
use object_store::ClientOptions;

/// What the wire said last, for the error that follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Observed {
    /// The server answered with a non-success status.
    Refused { endpoint: String, status: u16, code: Option<String>, message: Option<String>, metadata: bool },
    /// The request did not get an answer.
    NoAnswer { endpoint: String, metadata: bool },
}

/// The last observation of one repository's HTTP clients (one slot: when a request fails,
/// the requests beside it fail the same way).
#[derive(Debug, Default)]
pub(crate) struct Watch {
    last: Mutex<Option<(Instant, Observed)>>,
    metadata_hosts: Vec<String>,
    /// Add Content-MD5 to every upload (S3 buckets with Object Lock require it).
    content_md5: bool,
}

impl Watch {
    pub(crate) fn new(metadata_hosts: Vec<String>) -> Arc<Watch> {
        Arc::new(Watch { last: Mutex::new(None), metadata_hosts, content_md5: false })
    }

    pub(crate) fn with_content_md5(metadata_hosts: Vec<String>, content_md5: bool) -> Arc<Watch> {
        Arc::new(Watch { last: Mutex::new(None), metadata_hosts, content_md5 })
    }

    fn record(&self, o: Observed) {
        *self.last.lock().expect("watch lock") = Some((Instant::now(), o));
    }

    /// An answered request: what failed before it is no longer news.
    fn clear(&self) {
        *self.last.lock().expect("watch lock") = None;
    }

    /// The observation made within the last `max_age` (the length of one call with its retries).
    pub(crate) fn recent(&self, max_age: Duration) -> Option<Observed> {
        let guard = self.last.lock().expect("watch lock");
        guard.as_ref().filter(|(at, _)| at.elapsed() <= max_age).map(|(_, o)| o.clone())
    }

    fn is_metadata(&self, host: &str) -> bool {
        self.metadata_hosts.iter().any(|h| h == host)
    }
}

/// Connects like object_store's default client and observes every exchange.
#[derive(Debug)]
pub(crate) struct ObservingConnector(pub(crate) Arc<Watch>);

impl HttpConnector for ObservingConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(Observer { inner, watch: self.0.clone() }))
    }
}

#[derive(Debug)]
struct Observer {
    inner: HttpClient,
    watch: Arc<Watch>,
}

/// The request with a Content-MD5 header over its body (collected once: uploads are in
/// memory already). Not an x-amz header, so the signature does not cover it.
async fn with_content_md5(req: HttpRequest) -> Result<HttpRequest, HttpError> {
    use base64::Engine;
    use http_body_util::BodyExt;
    use md5::Digest;
    let (mut parts, body) = req.into_parts();
    let bytes = body.collect().await?.to_bytes();
    let md5 = base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(&bytes));
    parts.headers.insert(
        http::header::HeaderName::from_static("content-md5"),
        http::HeaderValue::from_str(&md5).expect("base64 is a valid header value"),
    );
    Ok(HttpRequest::from_parts(parts, bytes.into()))
}

/// Error bodies are small; a larger one is not an error document.
const MAX_ERROR_BODY: usize = 64 << 10;

#[async_trait::async_trait]
impl HttpService for Observer {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let req = if self.watch.content_md5 && req.method() == http::Method::PUT && req.body().content_length() > 0 {
            with_content_md5(req).await?
        } else {
            req
        };
        let uri = req.uri();
        let host = uri.host().unwrap_or("").to_owned();
        let endpoint = match (uri.scheme_str(), uri.authority()) {
            (Some(s), Some(a)) => format!("{s}://{a}"),
            _ => host.clone(),
        };
        let metadata = self.watch.is_metadata(&host);
        let resp = match self.inner.execute(req).await {
            Ok(r) => r,
            Err(e) => {
                self.watch.record(Observed::NoAnswer { endpoint, metadata });
                return Err(e);
            }
        };
        let status = resp.status();
        if status.is_success() || status.is_redirection() || status.is_informational() {
            self.watch.clear();
            return Ok(resp);
        }
        let small =
            resp.headers().get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        if small.is_some_and(|n| n > MAX_ERROR_BODY) {
            self.watch.record(Observed::Refused {
                endpoint,
                status: status.as_u16(),
                code: None,
                message: None,
                metadata,
            });
            return Ok(resp);
        }
        let (parts, body) = resp.into_parts();
        let bytes = body.bytes().await?;
        let (code, message) = error_document(&bytes);
        self.watch.record(Observed::Refused { endpoint, status: status.as_u16(), code, message, metadata });
        Ok(HttpResponse::from_parts(parts, bytes.into()))
    }
}

/// The store's error code and message from an error body: S3 and Azure send XML
/// (`<Code>`, `<Message>`), GCS sends JSON (`{"error": {"message", "errors": [{"reason"}]}}`).
pub(crate) fn error_document(body: &[u8]) -> (Option<String>, Option<String>) {
    let text = String::from_utf8_lossy(body);
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
        let e = &v["error"];
        let reason = e["errors"][0]["reason"].as_str().or(e["status"].as_str()).map(str::to_owned);
        let message = e["message"].as_str().map(str::to_owned);
        return (reason, message);
    }
    let element = |name: &str| -> Option<String> {
        let value = crate::signed::field(&text, name)?;
        let value = value.trim();
        (!value.is_empty()).then(|| value.chars().take(300).collect())
    };
    (element("Code"), element("Message").map(|m| m.lines().next().unwrap_or("").to_owned()))
}

/// Which store a repository is on, and how it finds credentials (for the hints).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Service {
    S3 { bucket: String, credentials_from_metadata: bool },
    Gcs { bucket: String, credentials_from_metadata: bool },
    Azure { container: String, credentials_from_metadata: bool },
    Local,
}

/// The cause of a failed storage call, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// No credentials in the environment, and the instance metadata service gave none.
    NoCredentials {
        store: &'static str,
        looked_at: &'static str,
        metadata: String,
        answer: String,
    },
    BucketMissing {
        what: &'static str,
        bucket: String,
        endpoint: String,
        code: String,
    },
    AccessDenied {
        endpoint: String,
        status: u16,
        code: Option<String>,
        message: Option<String>,
        hint: String,
    },
    Unreachable {
        endpoint: String,
        cause: String,
        hint: &'static str,
    },
    TlsName {
        endpoint: String,
        detail: String,
    },
    TlsOther {
        endpoint: String,
        detail: String,
    },
    Timeout {
        endpoint: String,
    },
    Refused {
        endpoint: String,
        status: u16,
        code: Option<String>,
        message: Option<String>,
    },
    /// The bucket has Object Lock and uploads lack the checksum it requires.
    ObjectLock {
        endpoint: String,
        bucket: String,
    },
    /// The store cannot do this (an operation or a path it does not support).
    Unsupported(String),
    Other(String),
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let code_msg = |code: &Option<String>, message: &Option<String>| -> String {
            match (code, message) {
                (Some(c), Some(m)) => format!(" {c}: {m}"),
                (Some(c), None) => format!(" {c}"),
                (None, Some(m)) => format!(": {m}"),
                (None, None) => String::new(),
            }
        };
        match self {
            Problem::NoCredentials { store, looked_at, metadata, answer } => write!(
                f,
                "no {store} credentials found: {looked_at} are not set, and the instance metadata service at {metadata} \
                 gave none ({answer}); set them (in the environment or the config file), or run where an instance role is attached"
            ),
            Problem::BucketMissing { what, bucket, endpoint, code } => write!(
                f,
                "{what} {bucket:?} does not exist at {endpoint} ({code}); create it, or correct the {what} name in the repository URL"
            ),
            Problem::AccessDenied { endpoint, status, code, message, hint } => {
                write!(f, "access denied by {endpoint} (HTTP {status}{}); {hint}", code_msg(code, message))
            }
            Problem::Unreachable { endpoint, cause, hint } => write!(f, "cannot connect to {endpoint} ({cause}); {hint}"),
            Problem::TlsName { endpoint, detail } => write!(
                f,
                "the TLS certificate of {endpoint} is not valid for that host name ({detail}); use the host name the \
                 certificate names in the endpoint URL (--s3-skip-verify only for a test server)"
            ),
            Problem::TlsOther { endpoint, detail } => {
                write!(
                    f,
                    "TLS with {endpoint} failed ({detail}); check the endpoint URL and that its CA is trusted (the system's CA certificates, or SSL_CERT_FILE)"
                )
            }
            Problem::Timeout { endpoint } => {
                write!(f, "{endpoint} did not answer in time (see --io-timeout); is the endpoint reachable from here?")
            }
            Problem::Refused { endpoint, status, code, message } => {
                write!(f, "{endpoint} answered HTTP {status}{}", code_msg(code, message))
            }
            Problem::ObjectLock { endpoint, bucket } => write!(
                f,
                "bucket {bucket:?} at {endpoint} has Object Lock and requires a Content-MD5 on every upload; give \
                 --s3-object-lock (CLOUD_DUMP_S3_OBJECT_LOCK=true, or s3-object-lock: true in the config file)"
            ),
            Problem::Unsupported(text) | Problem::Other(text) => f.write_str(text),
        }
    }
}

/// How long one call with its retries can take: an observation older than this belongs to
/// another call.
pub(crate) const OBSERVATION_AGE: Duration = Duration::from_secs(120);

impl Problem {
    /// Classifies `err` from the typed parts of its chain and what the wire said.
    pub(crate) fn classify(err: &object_store::Error, service: &Service, seen: Option<Observed>) -> Problem {
        let transport = transport_failure(err);
        // A refusal explains only an error that carries no transport failure of its own (a
        // body cut off after a good status is not what an earlier 404 said).
        let untransported = !has_http_error(err);
        let seen = seen.filter(|o| match o {
            Observed::Refused { .. } => untransported,
            Observed::NoAnswer { .. } => transport.is_some(),
        });
        let metadata_creds = match service {
            Service::S3 { credentials_from_metadata, .. }
            | Service::Gcs { credentials_from_metadata, .. }
            | Service::Azure { credentials_from_metadata, .. } => *credentials_from_metadata,
            Service::Local => false,
        };
        // Credentials were to come from the metadata service, and it is what failed.
        if metadata_creds {
            let answer = match &seen {
                Some(Observed::NoAnswer { metadata: true, .. }) => Some(match &transport {
                    Some(t) => t.cause.clone(),
                    None => "no answer".to_owned(),
                }),
                Some(Observed::Refused { metadata: true, status, .. }) => Some(format!("HTTP {status}")),
                _ => None,
            };
            if let Some(answer) = answer {
                let endpoint = match &seen {
                    Some(Observed::NoAnswer { endpoint, .. } | Observed::Refused { endpoint, .. }) => endpoint.clone(),
                    None => String::new(),
                };
                let (store, looked_at) = match service {
                    Service::Gcs { .. } => ("GCS", "GOOGLE_SERVICE_ACCOUNT, GOOGLE_SERVICE_ACCOUNT_KEY and GOOGLE_APPLICATION_CREDENTIALS"),
                    Service::Azure { .. } => ("Azure", "AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_KEY and AZURE_CLIENT_ID/AZURE_CLIENT_SECRET"),
                    _ => ("S3", "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_WEB_IDENTITY_TOKEN_FILE and AWS_CONTAINER_CREDENTIALS_RELATIVE_URI/FULL_URI"),
                };
                return Problem::NoCredentials { store, looked_at, metadata: endpoint, answer };
            }
        }
        if let Some(t) = transport {
            let endpoint = match &seen {
                Some(Observed::NoAnswer { endpoint, .. }) => endpoint.clone(),
                _ => "the endpoint".to_owned(),
            };
            return match t.kind {
                TransportKind::TlsName => Problem::TlsName { endpoint, detail: t.cause },
                TransportKind::Tls => Problem::TlsOther { endpoint, detail: t.cause },
                TransportKind::Timeout => Problem::Timeout { endpoint },
                TransportKind::Connect => Problem::Unreachable {
                    endpoint,
                    cause: t.cause,
                    hint: match service {
                        Service::S3 { .. } => {
                            "check --s3-endpoint (or AWS_ENDPOINT_URL) and that the server is running"
                        }
                        _ => "check the endpoint and the network",
                    },
                },
            };
        }
        if let Some(Observed::Refused { endpoint, status, code, message, metadata: false }) = seen {
            let (what, bucket) = match service {
                Service::S3 { bucket, .. } | Service::Gcs { bucket, .. } => ("bucket", bucket.clone()),
                Service::Azure { container, .. } => ("container", container.clone()),
                Service::Local => ("bucket", String::new()),
            };
            let missing_code = matches!(code.as_deref(), Some("NoSuchBucket" | "ContainerNotFound"))
                || (status == 404
                    && matches!(service, Service::Gcs { .. })
                    && matches!(err, object_store::Error::Generic { .. }));
            if missing_code {
                let code = code.unwrap_or_else(|| "HTTP 404".to_owned());
                return Problem::BucketMissing { what, bucket, endpoint, code };
            }
            if code.as_deref() == Some("MissingUploadObjectWithObjectLockHeaders") {
                return Problem::ObjectLock { endpoint, bucket };
            }
            if status == 401 || status == 403 {
                let hint = match (service, code.as_deref()) {
                    (Service::S3 { .. }, Some("SignatureDoesNotMatch")) => {
                        "the secret key does not match the access key id (AWS_SECRET_ACCESS_KEY)".to_owned()
                    }
                    (Service::S3 { .. }, Some("InvalidAccessKeyId" | "NotSignedUp")) => {
                        "the store does not know this access key id (AWS_ACCESS_KEY_ID)".to_owned()
                    }
                    _ => format!("check the credentials and that they may read and write {what} {bucket:?}"),
                };
                return Problem::AccessDenied { endpoint, status, code, message, hint };
            }
            if matches!(err, object_store::Error::Generic { .. }) {
                return Problem::Refused { endpoint, status, code, message };
            }
        }
        match err {
            object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
                Problem::AccessDenied {
                    endpoint: "the store".into(),
                    status: if matches!(err, object_store::Error::Unauthenticated { .. }) { 401 } else { 403 },
                    code: None,
                    message: None,
                    hint: "check the credentials and their permissions".into(),
                }
            }
            object_store::Error::NotSupported { .. }
            | object_store::Error::NotImplemented { .. }
            | object_store::Error::InvalidPath { .. } => Problem::Unsupported(one_line(err)),
            _ => Problem::Other(one_line(err)),
        }
    }

    /// Whether repeating the call can help.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Problem::NoCredentials { .. }
                | Problem::BucketMissing { .. }
                | Problem::AccessDenied { .. }
                | Problem::TlsName { .. }
                | Problem::TlsOther { .. }
                | Problem::Unsupported(_)
                | Problem::ObjectLock { .. }
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TransportKind {
    Connect,
    Timeout,
    TlsName,
    Tls,
}

struct Transport {
    kind: TransportKind,
    cause: String,
}

fn has_http_error(err: &object_store::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if e.downcast_ref::<HttpError>().is_some() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// A request that got no answer: from the typed `HttpError` in the chain and what lies
/// below it (the socket's `io::ErrorKind`, a `rustls::Error`).
fn transport_failure(err: &object_store::Error) -> Option<Transport> {
    let mut http: Option<HttpErrorKind> = None;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    let mut io_kind = None;
    let mut innermost = String::new();
    while let Some(e) = cur {
        if let Some(h) = e.downcast_ref::<HttpError>() {
            http = Some(h.kind());
        }
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls_transport(tls));
        }
        innermost = e.to_string();
        // An io::Error's `source()` skips the error it wraps: step into it instead.
        cur = match e.downcast_ref::<std::io::Error>() {
            Some(io) => {
                if !matches!(io.kind(), std::io::ErrorKind::Other | std::io::ErrorKind::InvalidData) {
                    io_kind.get_or_insert(io.kind());
                }
                match io.get_ref() {
                    Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
                    None => e.source(),
                }
            }
            None => e.source(),
        };
    }
    let kind = match http? {
        HttpErrorKind::Connect => TransportKind::Connect,
        HttpErrorKind::Timeout => TransportKind::Timeout,
        _ => return None,
    };
    let cause = match io_kind {
        Some(std::io::ErrorKind::ConnectionRefused) => "connection refused".to_owned(),
        Some(std::io::ErrorKind::TimedOut) => "timed out".to_owned(),
        Some(std::io::ErrorKind::HostUnreachable | std::io::ErrorKind::NetworkUnreachable) => {
            "no route to it".to_owned()
        }
        _ => strip_os_error(&innermost),
    };
    Some(Transport { kind, cause })
}

fn tls_transport(e: &rustls::Error) -> Transport {
    use rustls::CertificateError as C;
    let kind = match e {
        rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            TransportKind::TlsName
        }
        _ => TransportKind::Tls,
    };
    Transport { kind, cause: e.to_string() }
}

/// "Connection refused (os error 111)" → "connection refused".
fn strip_os_error(s: &str) -> String {
    let s = match s.rfind(" (os error ") {
        Some(i) => &s[..i],
        None => s,
    };
    let mut c = s.chars();
    match c.next() {
        Some(first) => first.to_lowercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// The causes of an error on one line, each once: a layer whose text already contains the
/// next one's is not repeated.
pub fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        let text = e.to_string().replace('\n', "; ");
        let text = text.trim();
        if !text.is_empty() && !out.contains(text) {
            // A layer that repeats what we have plus more replaces it.
            if !out.is_empty() && text.contains(out.as_str()) {
                out = text.to_owned();
            } else if out.is_empty() {
                out.push_str(text);
            } else {
                out.push_str(": ");
                out.push_str(text);
            }
        }
        cur = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_documents_of_each_store() {
        let s3 = br#"<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message></Error>"#;
        assert_eq!(
            error_document(s3),
            (Some("NoSuchBucket".into()), Some("The specified bucket does not exist".into()))
        );
        let gcs = br#"{"error":{"code":404,"message":"The specified bucket does not exist.","errors":[{"reason":"notFound"}]}}"#;
        assert_eq!(error_document(gcs), (Some("notFound".into()), Some("The specified bucket does not exist.".into())));
        assert_eq!(error_document(b"<html>oops</html>"), (None, None));
        assert_eq!(error_document(b"<Error><Code></Code></Error>"), (None, None));
    }

    #[test]
    fn one_line_names_each_cause_once() {
        #[derive(Debug)]
        struct E(String, Option<Box<E>>);
        impl std::fmt::Display for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl std::error::Error for E {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let inner = E("refused".into(), None);
        let mid = E("connect: refused".into(), Some(Box::new(inner)));
        let outer = E("request failed: connect: refused".into(), Some(Box::new(mid)));
        assert_eq!(one_line(&outer), "request failed: connect: refused");
        let a = E("a".into(), Some(Box::new(E("b".into(), Some(Box::new(E("b".into(), None)))))));
        assert_eq!(one_line(&a), "a: b");
        assert_eq!(strip_os_error("Connection refused (os error 111)"), "connection refused");
    }

    #[test]
    fn refusals_become_problems_with_hints() {
        let err = object_store::Error::Generic { store: "S3", source: "list failed".into() };
        let s3 = Service::S3 { bucket: "bkt".into(), credentials_from_metadata: false };
        let refused = |status, code: &str| Observed::Refused {
            endpoint: "http://h:1".into(),
            status,
            code: Some(code.into()),
            message: None,
            metadata: false,
        };
        assert_eq!(
            Problem::classify(&err, &s3, Some(refused(404, "NoSuchBucket"))).to_string(),
            "bucket \"bkt\" does not exist at http://h:1 (NoSuchBucket); create it, or correct the bucket name in the repository URL"
        );
        let p = Problem::classify(&err, &s3, Some(refused(403, "SignatureDoesNotMatch")));
        assert!(p.is_permanent());
        assert_eq!(
            p.to_string(),
            "access denied by http://h:1 (HTTP 403 SignatureDoesNotMatch); the secret key does not match the access key id (AWS_SECRET_ACCESS_KEY)"
        );
        // An observation from the metadata service means no credentials only when that is
        // where they were to come from.
        let imds = Observed::Refused {
            endpoint: "http://169.254.169.254".into(),
            status: 403,
            code: None,
            message: None,
            metadata: true,
        };
        let from_imds = Service::S3 { bucket: "bkt".into(), credentials_from_metadata: true };
        assert!(matches!(Problem::classify(&err, &from_imds, Some(imds.clone())), Problem::NoCredentials { .. }));
        assert!(matches!(Problem::classify(&err, &s3, Some(imds)), Problem::Other(_)));
        assert_eq!(Problem::classify(&err, &s3, None).to_string(), "Generic S3 error: list failed");
        // An observation of no answer does not explain an error that was answered.
        let no_answer = Observed::NoAnswer { endpoint: "http://h:1".into(), metadata: false };
        assert!(matches!(Problem::classify(&err, &s3, Some(no_answer)), Problem::Other(_)));
    }
}
