//! Azurite (the Azure Storage emulator, npm `azurite`) on a free loopback port, with the
//! emulator's well-known account, and a container made with a SharedKey-signed request.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};

pub const ACCOUNT: &str = "devstoreaccount1";
/// The emulator's documented development key.
pub const KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

pub struct Azurite {
    pub endpoint: String,
    child: Child,
    _dir: tempfile::TempDir,
}

fn azurite_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CLOUD_DUMP_AZURITE_BIN") {
        return Some(PathBuf::from(p));
    }
    let npm = PathBuf::from("/opt/cloud-dump-test/azurite/node_modules/.bin/azurite-blob");
    if npm.exists() {
        return Some(npm);
    }
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("azurite-blob")).find(|p| p.exists()))
}

impl Azurite {
    /// Starts the blob service; an error names what to install.
    pub fn start() -> Result<Azurite, String> {
        let bin = azurite_bin()
            .ok_or("azurite-blob not found (scripts/test installs npm azurite into /opt/cloud-dump-test/azurite)")?;
        let dir = tempfile::Builder::new().prefix("cloud-dump-azurite-").tempdir().map_err(|e| e.to_string())?;
        let port = crate::free_port();
        let child = Command::new(&bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string(), "--location"])
            .arg(dir.path())
            .args(["--skipApiVersionCheck", "--silent"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let a = Azurite { endpoint: format!("http://127.0.0.1:{port}"), child, _dir: dir };
        crate::wait_listening(port, "azurite", Duration::from_secs(30))?;
        Ok(a)
    }

    /// The variables object_store reads to use the emulator.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AZURE_STORAGE_USE_EMULATOR".into(), "true".into()),
            ("AZURITE_BLOB_STORAGE_URL".into(), self.endpoint.clone()),
            ("AZURE_STORAGE_ACCOUNT_NAME".into(), ACCOUNT.into()),
            ("AZURE_STORAGE_ACCOUNT_KEY".into(), KEY.into()),
        ]
    }

    /// Creates a container (PUT ?restype=container, SharedKey-signed).
    pub fn create_container(&self, name: &str) -> Result<(), String> {
        let date = time::OffsetDateTime::now_utc()
            .format(&time::macros::format_description!(
                "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
            ))
            .map_err(|e| e.to_string())?;
        let version = "2021-08-06";
        let to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container"
        );
        let key = base64::engine::general_purpose::STANDARD.decode(KEY).map_err(|e| e.to_string())?;
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).map_err(|e| e.to_string())?;
        mac.update(to_sign.as_bytes());
        let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        let host = self.endpoint.trim_start_matches("http://");
        let req = format!(
            "PUT /{ACCOUNT}/{name}?restype=container HTTP/1.1\r\nHost: {host}\r\nx-ms-date: {date}\r\nx-ms-version: {version}\r\n\
             Authorization: SharedKey {ACCOUNT}:{sig}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let mut s = std::net::TcpStream::connect(host).map_err(|e| e.to_string())?;
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        let status = resp.split_whitespace().nth(1).unwrap_or("");
        if status == "201" {
            Ok(())
        } else {
            Err(format!("creating container {name}: {}", resp.lines().next().unwrap_or("no answer")))
        }
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
