//! Every bad input: a clear one-line error, a non-zero exit, nothing half-written.

use super::common::*;

#[test]
fn connection_problems_are_named() {
    let src = pg(15);
    let repo = tempfile::tempdir().unwrap();
    let url = file_url(repo.path());
    let backup = |db: &str| cloud_dump(&["backup", "--repo", &url, "--name", "x", "--db-url", db], &[]);

    let dead = cloud_dump_testkit::free_port();
    backup(&format!("postgres://repl:pw@127.0.0.1:{dead}/postgres?sslmode=disable"))
        .fails_with(&format!("cannot connect to PostgreSQL at 127.0.0.1:{dead}"));

    let r = backup(&format!("postgres://repl:wrong-pw@127.0.0.1:{}/postgres?sslmode=disable", src.port))
        .fails_with("password authentication failed");
    assert!(!r.stderr.contains("wrong-pw"), "password printed: {}", r.stderr);

    src.sql("postgres", "CREATE ROLE plain LOGIN PASSWORD 'pw'");
    backup(&format!("postgres://plain:pw@127.0.0.1:{}/postgres?sslmode=disable", src.port)).fails_with("replication");

    // md5 and cleartext-over-TCP logins work too (SCRAM is covered everywhere else).
    src.sql("postgres", "SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN REPLICATION PASSWORD 'md5pw'");
    cloud_dump(
        &[
            "backup",
            "--repo",
            &url,
            "--name",
            "md5",
            "--db-url",
            &format!("postgres://md5user:md5pw@127.0.0.1:{}/postgres?sslmode=disable", src.port),
        ],
        &[],
    )
    .ok();

    backup("postgres://u@h/db?sslmode=sometimes").fails_with("sslmode");
    // Nothing of the failed attempts is visible.
    let list = cloud_dump(&["list", "--repo", &url, "--json"], &[]).ok();
    let v: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1, "{}", list.stdout);
    assert!(!repo.path().join("x").exists(), "a failed backup left objects");
}

#[test]
fn restore_refusals_and_corruption() {
    let src = pg(15);
    let repo = tempfile::tempdir().unwrap();
    let url = file_url(repo.path());
    cloud_dump(&["backup", "--repo", &url, "--name", "b1", "--db-url", &src.repl_url()], &[]).ok();

    let target = scratch_dir("refuse");
    let pgdata = target.path().join("data");
    std::fs::create_dir_all(&pgdata).unwrap();
    std::fs::write(pgdata.join("keep.txt"), b"precious").unwrap();
    cloud_dump(&["restore", "--repo", &url, "--name", "b1", "--pgdata", pgdata.to_str().unwrap()], &[])
        .fails_with("not empty");
    assert_eq!(std::fs::read(pgdata.join("keep.txt")).unwrap(), b"precious");

    let empty = target.path().join("empty");
    cloud_dump(&["restore", "--repo", &url, "--name", "nope", "--pgdata", empty.to_str().unwrap()], &[])
        .fails_with("backup \"nope\" not found")
        .fails_with("available: b1");
    assert!(!empty.exists(), "an unknown backup created the target");

    // Dry run prints the plan and writes nothing.
    let dry =
        cloud_dump(&["restore", "--repo", &url, "--name", "b1", "--pgdata", empty.to_str().unwrap(), "--dry-run"], &[])
            .ok();
    assert!(dry.stdout.contains("base.tar.zst") && dry.stdout.contains("nothing was written"), "{}", dry.stdout);
    assert!(!empty.exists());

    // A setting restore would carry into its one-line-per-setting file, spanning lines:
    // refused before anything is written.
    cloud_dump(
        &[
            "restore",
            "--repo",
            &url,
            "--name",
            "b1",
            "--pgdata",
            empty.to_str().unwrap(),
            "--recovery-target",
            "immediate",
        ],
        &[("GOOGLE_SERVICE_ACCOUNT_KEY".into(), "{\n \"type\": \"service_account\"\n}".into())],
    )
    .fails_with("cannot carry GOOGLE_SERVICE_ACCOUNT_KEY into the restore settings file");
    assert!(!empty.exists(), "a refused restore wrote its target");

    // One flipped byte in the middle of the base archive.
    let obj = repo.path().join("b1/base.tar.zst");
    let mut bytes = std::fs::read(&obj).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&obj, &bytes).unwrap();
    let r = cloud_dump(&["restore", "--repo", &url, "--name", "b1", "--pgdata", empty.to_str().unwrap()], &[])
        .fails_with("corrupt");
    assert!(r.stderr.contains("partial restore"), "{}", r.stderr);

    // A missing object.
    std::fs::remove_file(&obj).unwrap();
    let again = target.path().join("again");
    cloud_dump(&["restore", "--repo", &url, "--name", "b1", "--pgdata", again.to_str().unwrap()], &[])
        .fails_with("not found");
}

#[test]
fn usage_errors() {
    cloud_dump(&["list", "--repo", "ftp://x/y"], &[]).fails_with("unknown scheme");
    cloud_dump(&["list"], &[]).fails_with("no repository");
    let repo = tempfile::tempdir().unwrap();
    let url = file_url(repo.path());
    cloud_dump(&["backup", "--repo", &url, "--name", "a/b", "--db-url", "postgres://u@127.0.0.1/x"], &[])
        .fails_with("backup name");
    cloud_dump(
        &["backup", "--repo", &url, "--name", "a", "--passphrase", "p", "--db-url", "postgres://u@127.0.0.1/x"],
        &[],
    )
    .fails_with("without --encrypt");
    cloud_dump(&["backup", "--repo", &url, "--name", "a", "--encrypt", "--db-url", "postgres://u@127.0.0.1/x"], &[])
        .fails_with("--encrypt needs");
    cloud_dump(
        &["backup", "--repo", &url, "--name", "a", "--max-rate", "1k", "--db-url", "postgres://u@127.0.0.1/x"],
        &[],
    )
    .fails_with("--max-rate");
    let r = cloud_dump(&["backup", "--repo", &url, "--name", "a", "--compression", "brotli"], &[]);
    assert_eq!(r.code, 2, "usage errors exit 2: {}", r.stderr);
    let help = cloud_dump(&["backup", "--help"], &[]).ok();
    for flag in ["--db-url", "--compression", "--encrypt", "--recipient-key", "--checkpoint", "--max-rate", "--cluster"]
    {
        assert!(help.stdout.contains(flag), "--help lacks {flag}");
    }
}
