//! Running cloud-dump as a service: exact one-line storage errors with hints, JSON logs,
//! the config file's PostgreSQL clusters (precedence, secrets), man pages, completions.

use std::path::Path;
use std::process::Command;

use super::common::*;

fn creds() -> Vec<(String, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID".into(), cloud_dump_testkit::S3_ACCESS_KEY.into()),
        ("AWS_SECRET_ACCESS_KEY".into(), cloud_dump_testkit::S3_SECRET_KEY.into()),
    ]
}

/// The last line of stderr, which must be the only error line.
#[track_caller]
fn error_line(r: &Run) -> String {
    assert_ne!(r.code, 0, "should have failed: {}", r.stderr);
    let errors: Vec<&str> = r.stderr.lines().filter(|l| l.starts_with("cloud-dump: error: ")).collect();
    assert_eq!(errors.len(), 1, "one error line expected:\n{}", r.stderr);
    assert_eq!(r.stderr.lines().last(), Some(errors[0]), "the error is the last line:\n{}", r.stderr);
    errors[0].to_owned()
}

#[test]
fn storage_errors_name_the_object_and_say_what_to_do() {
    let s3 = S3Server::start(&["bkt"]);
    let ep = s3.endpoint.clone();
    let list = |repo: &str, endpoint: &str, env: &[(String, String)]| {
        cloud_dump(&["list", "--repo", repo, "--s3-endpoint", endpoint], env)
    };

    // Bucket missing.
    let r = list("s3://nosuch/pg", &ep, &creds());
    assert_eq!(
        error_line(&r),
        format!(
            "cloud-dump: error: cannot list backups: cannot list s3://nosuch/pg/: bucket \"nosuch\" does not exist at {ep} \
             (NoSuchBucket); create it, or correct the bucket name in the repository URL"
        )
    );

    // Access denied: a wrong secret, an unknown key id.
    let mut wrong_secret = creds();
    wrong_secret[1].1 = "not-the-secret".into();
    assert_eq!(
        error_line(&list("s3://bkt/pg", &ep, &wrong_secret)),
        format!(
            "cloud-dump: error: cannot list backups: cannot list s3://bkt/pg/: access denied by {ep} (HTTP 403 \
             SignatureDoesNotMatch); the secret key does not match the access key id (AWS_SECRET_ACCESS_KEY)"
        )
    );
    let mut unknown_id = creds();
    unknown_id[0].1 = "AKIAUNKNOWN".into();
    let line = error_line(&list("s3://bkt/pg", &ep, &unknown_id));
    assert!(
        line.starts_with(&format!(
            "cloud-dump: error: cannot list backups: cannot list s3://bkt/pg/: access denied by {ep} (HTTP 403 "
        )) && line.ends_with("); the store does not know this access key id (AWS_ACCESS_KEY_ID)"),
        "{line}"
    );

    // No credentials: none in the environment, and the metadata service does not answer.
    let imds = cloud_dump_testkit::free_port();
    let no_creds = vec![("AWS_METADATA_ENDPOINT".to_owned(), format!("http://127.0.0.1:{imds}"))];
    assert_eq!(
        error_line(&list("s3://bkt/pg", &ep, &no_creds)),
        format!(
            "cloud-dump: error: cannot list backups: cannot list s3://bkt/pg/: no S3 credentials found: \
             AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_WEB_IDENTITY_TOKEN_FILE and \
             AWS_CONTAINER_CREDENTIALS_RELATIVE_URI/FULL_URI are not set, and the instance metadata service at \
             http://127.0.0.1:{imds} gave none (connection refused); set them (in the environment or the config file), \
             or run where an instance role is attached"
        )
    );

    // Endpoint unreachable.
    let dead = cloud_dump_testkit::free_port();
    assert_eq!(
        error_line(&list("s3://bkt/pg", &format!("http://127.0.0.1:{dead}"), &creds())),
        format!(
            "cloud-dump: error: cannot list backups: cannot list s3://bkt/pg/: cannot connect to http://127.0.0.1:{dead} \
             (connection refused); check --s3-endpoint (or AWS_ENDPOINT_URL) and that the server is running"
        )
    );

    // A write names the object it was writing.
    let seg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(seg.path(), vec![1u8; 4096]).unwrap();
    let r = cloud_dump(
        &[
            "wal-push",
            seg.path().to_str().unwrap(),
            "000000010000000000000001",
            "--repo",
            "s3://bkt/pg",
            "--s3-endpoint",
            &ep,
        ],
        &wrong_secret,
    );
    let line = error_line(&r);
    assert!(line.contains("s3://bkt/pg/wal_archive/000000010000000000000001"), "{line}");
    assert!(line.contains("access denied by"), "{line}");
}

/// A TLS server whose certificate names another host, signed by a CA we trust for the run.
#[test]
fn tls_name_mismatch_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    cloud_dump_testkit::test_certificates(d, "other.example");
    let port = cloud_dump_testkit::free_port();
    let mut server = Command::new("openssl")
        .args([
            "s_server",
            "-accept",
            &format!("127.0.0.1:{port}"),
            "-cert",
            "server.crt",
            "-key",
            "server.key",
            "-quiet",
        ])
        .current_dir(d)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port);
    let mut env = creds();
    env.push(("SSL_CERT_FILE".into(), d.join("ca.crt").display().to_string()));
    let r = cloud_dump(&["list", "--repo", "s3://bkt/pg", "--s3-endpoint", &format!("https://127.0.0.1:{port}")], &env);
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(
        error_line(&r),
        format!(
            "cloud-dump: error: cannot list backups: cannot list s3://bkt/pg/: the TLS certificate of https://127.0.0.1:{port} \
             is not valid for that host name (invalid peer certificate: certificate not valid for name \"127.0.0.1\"; \
             certificate is only valid for DnsName(\"other.example\")); use the host name the certificate names in the \
             endpoint URL (--s3-skip-verify only for a test server)"
        )
    );
}

fn wait_for_port(port: u16) {
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("nothing listens on port {port}");
}

#[test]
fn connection_errors_name_their_cause_once() {
    let dead = cloud_dump_testkit::free_port();
    let repo = tempfile::tempdir().unwrap();
    let r = cloud_dump(
        &[
            "backup",
            "--repo",
            &file_url(repo.path()),
            "--name",
            "x",
            "--db-url",
            &format!("postgres://u@127.0.0.1:{dead}/db?sslmode=disable"),
        ],
        &[],
    );
    assert_eq!(
        error_line(&r),
        format!("cloud-dump: error: backup failed: cannot connect to PostgreSQL at 127.0.0.1:{dead}: Connection refused (os error 111)")
    );
}

/// Every line on stderr is a JSON object; the failure is the last one, at level ERROR.
#[test]
fn json_logs_are_json_to_the_last_line() {
    let repo = tempfile::tempdir().unwrap();
    let url = file_url(repo.path());
    let seg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(seg.path(), vec![7u8; 16 << 20]).unwrap();
    let push = |name: &str, repo: &str| {
        cloud_dump(&["--log-format", "json", "wal-push", seg.path().to_str().unwrap(), name, "--repo", repo], &[])
    };
    std::fs::create_dir_all(repo.path()).unwrap();
    std::fs::write(repo.path().join(cloud_dump_storage::REPOSITORY_MARKER), "x").unwrap();
    let ok = push("000000010000000000000001", &url).ok();
    let parse = |line: &str| -> serde_json::Value {
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    };
    let lines: Vec<serde_json::Value> = ok.stderr.lines().map(parse).collect();
    assert!(
        lines.iter().any(|l| l["message"].as_str().is_some_and(|m| m.starts_with("archived 000000010000000000000001"))),
        "{}",
        ok.stderr
    );

    let missing = tempfile::tempdir().unwrap();
    let bad = push("000000010000000000000002", &missing.path().join("none").display().to_string());
    assert_ne!(bad.code, 0);
    let last = parse(bad.stderr.lines().last().expect("an error line"));
    assert_eq!(last["level"], "ERROR", "{}", bad.stderr);
    assert!(last["message"].as_str().unwrap().contains("does not exist"), "{}", bad.stderr);
    for l in bad.stderr.lines() {
        parse(l);
    }
    // An error in the config file, found before logging starts, is JSON too, and exit 1
    // (126 is wal-fetch's alone).
    let cfg = missing.path().join("bad.yml");
    std::fs::write(&cfg, "postgres:\n  clusters:\n    a:\n      repo: [\n").unwrap();
    let r = cloud_dump(&["--log-format", "json", "list", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let last = parse(r.stderr.lines().last().expect("an error line"));
    assert_eq!(last["level"], "ERROR");
    assert!(last["message"].as_str().unwrap().contains("bad.yml"), "{}", r.stderr);
}

#[test]
fn man_pages_and_completions_come_from_the_flags() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin()).args(["manpages", dir.path().to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let top = std::fs::read_to_string(dir.path().join("cloud-dump.1")).unwrap();
    assert!(top.contains(".TH cloud-dump 1"), "{top}");
    let backup = std::fs::read_to_string(dir.path().join("cloud-dump-backup.1")).unwrap();
    assert!(backup.contains("\\-\\-retain") || backup.contains("\\-\\-name"), "backup page lists its flags");
    assert!(Path::new(&dir.path().join("cloud-dump-sqlite-replicate.1")).exists());
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(bin()).args(["completions", shell]).output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("wal-push") && text.contains("recovery-target-time"), "{shell} completion lacks flags");
    }
    let out = Command::new(bin()).args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "an unknown shell is a usage error");
}

/// `postgres: clusters:` in the config file: a backup and wal-push need nothing else;
/// flag > environment > file; the data directory picks the cluster for WAL commands; a
/// secret in a file others can read is refused; every bad file gets one line.
#[test]
fn config_file_describes_postgres_clusters() {
    let src = pg(15);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    let other = d.join("other-repo");
    std::fs::write(d.join("pass"), "correct horse battery staple\n").unwrap();
    let cfg = d.join("cloud-dump.yml");
    let text = format!(
        "# Litestream's keys stay untouched\ndbs:\n  - path: {db}\n    replicas:\n      - path: {db}-replica\n\
         postgres:\n  clusters:\n    prod:\n      repo: file://{repo}\n      pgdata: {pgdata}\n      db-url: {url}\n\
         \x20     compression: lz4\n      wal-compression: none\n      encrypt: true\n      passphrase-file: {pass}\n\
         \x20   other:\n      repo: file://{other}\n",
        db = d.join("app.db").display(),
        repo = repo.display(),
        pgdata = src.data.display(),
        url = src.repl_url(),
        pass = d.join("pass").display(),
        other = other.display(),
    );
    std::fs::write(&cfg, &text).unwrap();
    // The connection URL holds a password: the file is the owner's alone.
    std::fs::set_permissions(&cfg, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let c = cfg.to_str().unwrap().to_owned();
    let with_cfg = |extra: &[(&str, &str)]| {
        let mut env = vec![("CLOUD_DUMP_CONFIG".to_owned(), c.clone())];
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        env
    };
    let list = |extra: &[(&str, &str)]| -> Vec<serde_json::Value> {
        let r = cloud_dump(&["list", "--cluster", "prod", "--json"], &with_cfg(extra)).ok();
        serde_json::from_str(&r.stdout).unwrap()
    };

    // Nothing but the cluster's name: repository, connection, compression, key from the file.
    cloud_dump(&["backup", "--cluster", "prod", "--name", "from-file"], &with_cfg(&[])).ok();
    let b = list(&[]);
    assert_eq!(b.len(), 1);
    assert_eq!(b[0]["compression"], "lz4");
    assert_eq!(b[0]["encrypted"], true);
    assert!(repo.join("prod/backup/from-file").is_dir(), "the cluster's name is its folder");

    // The environment beats the file; a flag beats both.
    cloud_dump(&["backup", "--cluster", "prod", "--name", "env"], &with_cfg(&[("CLOUD_DUMP_COMPRESSION", "gzip")]))
        .ok();
    cloud_dump(
        &["backup", "--cluster", "prod", "--name", "flag", "--compression", "none"],
        &with_cfg(&[("CLOUD_DUMP_COMPRESSION", "gzip")]),
    )
    .ok();
    let by_name = |name: &str| list(&[]).into_iter().find(|m| m["name"] == name).unwrap();
    assert_eq!(by_name("env")["compression"], "gzip");
    assert_eq!(by_name("flag")["compression"], "none");
    // A passphrase from the environment replaces the file's key file (no "both given").
    cloud_dump(
        &["backup", "--cluster", "prod", "--name", "env-pass", "--compression", "none"],
        &with_cfg(&[("CLOUD_DUMP_PASSPHRASE", "another passphrase")]),
    )
    .ok();
    // The repository from a flag: the file's other settings still apply.
    let elsewhere = d.join("elsewhere");
    cloud_dump(
        &["backup", "--cluster", "prod", "--name", "flag-repo", "--repo", elsewhere.to_str().unwrap()],
        &with_cfg(&[]),
    )
    .ok();
    assert!(elsewhere.join("prod/backup/flag-repo").is_dir());

    // wal-push as archive_command runs it: in PGDATA, no flags; two clusters, pgdata picks.
    let seg = d.join("000000010000000000000042");
    std::fs::write(&seg, vec![3u8; 16 << 20]).unwrap();
    let out = Command::new(bin())
        .args(["wal-push", seg.to_str().unwrap(), "000000010000000000000042"])
        .current_dir(&src.data)
        .env("CLOUD_DUMP_CONFIG", &c)
        .env_remove("CLOUD_DUMP_REPO")
        .env_remove("CLOUD_DUMP_CLUSTER")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        repo.join("prod/wal_archive/000000010000000000000042.age").exists()
            || repo.join("prod/wal_archive/000000010000000000000042").exists(),
        "uncompressed (wal-compression: none) and encrypted WAL in prod's archive: {:?}",
        std::fs::read_dir(repo.join("prod/wal_archive")).map(|d| d.map(|e| e.unwrap().file_name()).collect::<Vec<_>>())
    );
    // Elsewhere, with two clusters and nothing to choose by, the command says what to do.
    let r = cloud_dump(&["list"], &with_cfg(&[]));
    assert_eq!(
        error_line(&r),
        format!("cloud-dump: error: {c}: the config file describes clusters other, prod: choose one with --cluster (or CLOUD_DUMP_CLUSTER), or set its pgdata")
    );

    // A secret in the file: only its owner may read it.
    let secret_cfg = d.join("secret.yml");
    std::fs::write(
        &secret_cfg,
        format!("postgres:\n  clusters:\n    s:\n      repo: file://{}\n      passphrase: hunter2\n", repo.display()),
    )
    .unwrap();
    let s = secret_cfg.to_str().unwrap();
    std::fs::set_permissions(&secret_cfg, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let r = cloud_dump(&["list", "--config", s], &[]);
    assert_eq!(
        error_line(&r),
        format!("cloud-dump: error: config file {s} holds a secret (postgres.clusters.s.passphrase) but its mode 0644 lets others read it; run chmod 600 {s} (or chown root:GROUP and chmod 640)")
    );
    assert!(!r.stderr.contains("hunter2"));
    std::fs::set_permissions(&secret_cfg, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    cloud_dump(&["list", "--config", s], &[]).ok();
    // The same value through a variable is not a secret in the file.
    std::fs::write(
        &secret_cfg,
        format!(
            "postgres:\n  clusters:\n    s:\n      repo: file://{}\n      passphrase: $TEST_PASS\n",
            repo.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&secret_cfg, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    cloud_dump(&["list", "--config", s], &[("TEST_PASS".into(), "x".into())]).ok();

    // Bad files: one line each, naming the file and the key.
    let bad = d.join("bad.yml");
    let b = bad.to_str().unwrap();
    std::fs::write(&bad, "postgres:\n  clusters:\n    p:\n      repo: file:///x\n      retain-ful: 3\n").unwrap();
    let line = error_line(&cloud_dump(&["list", "--config", b], &[]));
    assert!(
        line.starts_with(&format!("cloud-dump: error: {b}: postgres.clusters.p: unknown field `retain-ful`")),
        "{line}"
    );
    let r = cloud_dump(&["list", "--config", d.join("missing.yml").to_str().unwrap()], &[]);
    assert!(error_line(&r).contains("cannot read config file"), "{}", r.stderr);
    // The sqlite commands read the same file and ignore the postgres section.
    let r = cloud_dump(&["sqlite", "databases", "--config", &c], &[]).ok();
    assert!(r.stdout.contains("app.db") && !r.stderr.contains("unknown config key"), "{}{}", r.stdout, r.stderr);
}
