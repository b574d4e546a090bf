//! Real servers for cloud-dump's tests, quickstart and benchmarks: PostgreSQL clusters
//! made with `initdb`/`pg_ctl` in temporary directories on free loopback ports (as the
//! `postgres` user when running as root), and an S3-compatible server (s3s-fs) on loopback.

mod azurite;
mod gcs;
mod moto;
mod pg;
mod s3;
mod storj;

pub use azurite::Azurite;
pub use gcs::GcsStandIn;
pub use moto::MotoServer;
pub use pg::{give_to_postgres, pg_bin_dir, psql, run_as_postgres, running_as_root, scratch_dir, PgServer};
pub use s3::{S3Server, ACCESS_KEY as S3_ACCESS_KEY, SECRET_KEY as S3_SECRET_KEY};
pub use storj::FakeStorjAuth;

/// A test CA (`ca.crt`) and a server certificate for DNS name `name` signed by it
/// (`server.crt`, `server.key`), made with openssl in `dir`.
pub fn test_certificates(dir: &std::path::Path, name: &str) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=cloud-dump test CA",
        "-days",
        "2",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        &format!("/CN={name}"),
    ]);
    std::fs::write(
        dir.join("ext"),
        format!(
            "subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        ),
    )
    .expect("ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext",
    ]);
}

/// Waits until something listens on 127.0.0.1:`port`.
pub fn wait_listening(port: u16, what: &str, limit: std::time::Duration) -> Result<(), String> {
    let deadline = std::time::Instant::now() + limit;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if std::time::Instant::now() > deadline {
            return Err(format!("{what} did not listen within {} s", limit.as_secs()));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Ok(())
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0").local_addr().expect("addr").port()
}

/// A copy of `bin` that the `postgres` user can execute (archive_command and
/// restore_command run as postgres, which cannot reach a build tree under /root).
pub fn public_copy(bin: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    // One copy per build of the binary (keyed by its size and mtime), shared by test runs.
    let meta = std::fs::metadata(bin).expect("binary metadata");
    let stamp = meta.modified().ok().and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_nanos());
    let dir = std::path::PathBuf::from(format!("/tmp/cloud-dump-bin-{}-{}", meta.len(), stamp.unwrap_or(0)));
    let dest = dir.join("cloud-dump");
    if !dest.exists() {
        std::fs::create_dir_all(&dir).expect("bin dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let tmp = dir.join(format!("cloud-dump.{:?}", std::thread::current().id()));
        std::fs::copy(bin, &tmp).expect("copy binary");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::rename(&tmp, &dest).expect("rename binary");
    }
    dest
}
