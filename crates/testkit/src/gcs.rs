//! A GCS stand-in: moto's S3 server behind a loopback proxy (gcs_proxy.py) that renames the
//! XML API's x-goog-* headers to S3's. object_store's GCS client, our GCS configuration
//! (service-account file, `gcs_base_url`, `GOOGLE_ALLOW_HTTP`) and metadata spelling run
//! unchanged against it. Why not an emulator: see the proxy's header.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::MotoServer;

pub struct GcsStandIn {
    moto: MotoServer,
    proxy: Child,
    /// The service-account file's folder (removed on drop).
    dir: tempfile::TempDir,
    pub endpoint: String,
}

impl GcsStandIn {
    pub fn start() -> Result<GcsStandIn, String> {
        let moto = MotoServer::start()?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let script = dir.path().join("gcs_proxy.py");
        std::fs::write(&script, include_str!("gcs_proxy.py")).map_err(|e| e.to_string())?;
        let port = crate::free_port();
        let upstream_port = moto.endpoint.rsplit(':').next().unwrap_or_default().to_owned();
        let proxy = Command::new("python3")
            .arg(&script)
            .args([&port.to_string(), "127.0.0.1", &upstream_port])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start the GCS proxy: {e}"))?;
        let endpoint = format!("http://127.0.0.1:{port}");
        let sa = format!(
            r#"{{"private_key":"unused","private_key_id":"unused","client_email":"test@cloud-dump.invalid","disable_oauth":true,"gcs_base_url":"{endpoint}"}}"#
        );
        std::fs::write(dir.path().join("service-account.json"), sa).map_err(|e| e.to_string())?;
        let g = GcsStandIn { moto, proxy, dir, endpoint };
        crate::wait_listening(port, "the GCS proxy", Duration::from_secs(30))?;
        Ok(g)
    }

    pub fn create_bucket(&self, name: &str) -> Result<(), String> {
        self.moto.boto3(&format!("s3.create_bucket(Bucket='{name}')")).map(|_| ())
    }

    /// What object_store's GCS client reads: the service-account file naming the endpoint.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "GOOGLE_SERVICE_ACCOUNT".into(),
                self.dir.path().join("service-account.json").to_string_lossy().into_owned(),
            ),
            ("GOOGLE_ALLOW_HTTP".into(), "true".into()),
        ]
    }
}

impl Drop for GcsStandIn {
    fn drop(&mut self) {
        let _ = self.proxy.kill();
        let _ = self.proxy.wait();
    }
}
