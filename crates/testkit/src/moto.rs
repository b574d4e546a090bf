//! moto's S3 server (PyPI `moto[server]`) on a free loopback port: the test server with S3
//! Object Lock (versioning, default retention), which s3s-fs lacks. Buckets are made with
//! boto3 (installed with moto).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct MotoServer {
    pub endpoint: String,
    child: Child,
}

fn moto_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CLOUD_DUMP_MOTO_BIN") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join("moto_server")).find(|p| p.exists()))
}

impl MotoServer {
    pub fn start() -> Result<MotoServer, String> {
        let bin = moto_bin().ok_or("moto_server not found (scripts/test installs PyPI moto[server])")?;
        let port = crate::free_port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let m = MotoServer { endpoint: format!("http://127.0.0.1:{port}"), child };
        crate::wait_listening(port, "moto_server", Duration::from_secs(60))?;
        Ok(m)
    }

    /// Credentials and endpoint (moto accepts any credentials).
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), "cloud-dump-test".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "cloud-dump-test-secret".into()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("CLOUD_DUMP_S3_ENDPOINT".into(), self.endpoint.clone()),
        ]
    }

    /// Runs a boto3 snippet against this server; `s3` is the client.
    pub fn boto3(&self, code: &str) -> Result<String, String> {
        let script = format!(
            "import boto3, json\ns3 = boto3.client('s3', endpoint_url='{}', aws_access_key_id='a', aws_secret_access_key='b', region_name='us-east-1')\n{code}\n",
            self.endpoint
        );
        let out = Command::new("python3").arg("-c").arg(script).output().map_err(|e| format!("python3: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// A bucket with Object Lock and a default retention (`mode`: COMPLIANCE or
    /// GOVERNANCE, `days`).
    pub fn locked_bucket(&self, name: &str, mode: &str, days: u32) -> Result<(), String> {
        self.boto3(&format!(
            "s3.create_bucket(Bucket='{name}', ObjectLockEnabledForBucket=True)\n\
             s3.put_object_lock_configuration(Bucket='{name}', ObjectLockConfiguration={{'ObjectLockEnabled': 'Enabled', \
             'Rule': {{'DefaultRetention': {{'Mode': '{mode}', 'Days': {days}}}}}}})"
        ))
        .map(|_| ())
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
