//! Storj through its S3-compatible gateway: an access grant is exchanged once at the Storj
//! auth service for S3 credentials (the same exchange `uplink share --register` makes).

use crate::error::{Result, StorageError};
use serde::Deserialize;

pub const DEFAULT_AUTH_SERVICE: &str = "https://auth.storjshare.io";
pub const DEFAULT_GATEWAY: &str = "https://gateway.storjshare.io";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    /// The gateway the auth service says to use, if it says one.
    pub endpoint: Option<String>,
}

#[derive(Deserialize)]
struct AccessResponse {
    access_key_id: String,
    secret_key: String,
    #[serde(default)]
    endpoint: Option<String>,
}

/// Registers `access_grant` at `auth_service` and returns S3 credentials for the gateway.
/// The grant itself never appears in an error message.
pub async fn exchange_access_grant(auth_service: &str, access_grant: &str) -> Result<S3Credentials> {
    let service = auth_service.trim_end_matches('/').to_owned();
    let err = |reason: String| StorageError::StorjAuth { service: service.clone(), reason };
    // The grant is a secret: never follow a redirect that would send it elsewhere.
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| err(e.to_string()))?;
    let resp = client
        .post(format!("{service}/v1/access"))
        .json(&serde_json::json!({ "access_grant": access_grant, "public": false }))
        .send()
        .await
        .map_err(|e| err(format!("cannot reach it: {}", e.without_url())))?;
    let status = resp.status();
    if status.is_redirection() {
        return Err(err(format!("answered with a redirect ({status}); the access grant is not sent on")));
    }
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        let body: String = body.chars().take(200).collect();
        return Err(err(format!("refused the access grant ({status}): {body}")));
    }
    let parsed: AccessResponse =
        resp.json().await.map_err(|e| err(format!("unexpected answer: {}", e.without_url())))?;
    let endpoint = parsed.endpoint.filter(|e| !e.is_empty());
    // An https auth service may not send the credentials' user to a plain-http gateway.
    if let Some(e) = &endpoint {
        if service.starts_with("https://") && !e.starts_with("https://") {
            return Err(err(format!(
                "named the gateway {e:?}, which is not https; refusing to send credentials there"
            )));
        }
    }
    Ok(S3Credentials { access_key_id: parsed.access_key_id, secret_access_key: parsed.secret_key, endpoint })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An auth service answering with a redirect: the grant is not sent on.
    #[tokio::test]
    async fn redirects_are_not_followed() {
        let elsewhere = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = elsewhere.local_addr().unwrap();
        let auth = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let auth_addr = auth.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = auth.accept().await.unwrap();
            let mut buf = vec![0u8; 8192];
            let _ = s.read(&mut buf).await;
            let resp = format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://{target}/v1/access\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = s.write_all(resp.as_bytes()).await;
        });
        let err = exchange_access_grant(&format!("http://{auth_addr}"), "secret-grant").await.unwrap_err();
        assert!(err.to_string().contains("redirect"), "{err}");
        assert!(!err.to_string().contains("secret-grant"));
        let followed = tokio::time::timeout(std::time::Duration::from_millis(300), elsewhere.accept()).await;
        assert!(followed.is_err(), "the redirect was followed");
    }
}
