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
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| err(e.to_string()))?;
    let resp = client
        .post(format!("{service}/v1/access"))
        .json(&serde_json::json!({ "access_grant": access_grant, "public": false }))
        .send()
        .await
        .map_err(|e| err(format!("cannot reach it: {}", e.without_url())))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        let body: String = body.chars().take(200).collect();
        return Err(err(format!("refused the access grant ({status}): {body}")));
    }
    let parsed: AccessResponse =
        resp.json().await.map_err(|e| err(format!("unexpected answer: {}", e.without_url())))?;
    Ok(S3Credentials {
        access_key_id: parsed.access_key_id,
        secret_access_key: parsed.secret_key,
        endpoint: parsed.endpoint.filter(|e| !e.is_empty()),
    })
}
