//! Backup → restore → start → the data matches, on PostgreSQL 15 and 17, to file:// and
//! to S3, plain and encrypted, flat and cluster layouts.

use std::process::Command;

use serde_json::Value;

use super::common::*;

fn manifest(repo_dir: &std::path::Path, key: &str) -> Value {
    serde_json::from_slice(&std::fs::read(repo_dir.join(key)).unwrap()).unwrap()
}

#[test]
fn pg15_file_tablespace_concurrent_writes_restore_matches() {
    let src = pg(15);
    seed(&src);
    let ts_dir = scratch_dir("ts");
    src.sql("postgres", &format!("CREATE TABLESPACE extra LOCATION '{}'", ts_dir.path().display()));
    src.sql("app", "CREATE TABLE in_ts(id int, v text) TABLESPACE extra; INSERT INTO in_ts SELECT g, md5(g::text) FROM generate_series(1, 50000) g");
    src.sql("postgres", "CREATE TABLE writes(id bigserial PRIMARY KEY, v float8)");
    let ts_oid = src.sql("postgres", "SELECT oid FROM pg_tablespace WHERE spcname = 'extra'");
    let system_id = src.sql("postgres", "SELECT system_identifier FROM pg_control_system()");

    // A single-client writer committing continuously while the backup runs: every id it
    // committed before the backup's end must be there, with no gap.
    let script = scratch_dir("pgbench");
    std::fs::write(script.path().join("w.sql"), "INSERT INTO writes(v) VALUES (random());\n").unwrap();
    let mut writer = Command::new("pgbench")
        .args(["-n", "-c", "1", "-T", "6", "-h", "127.0.0.1", "-U", "postgres", "-p", &src.port.to_string()])
        .arg("-f")
        .arg(script.path().join("w.sql"))
        .arg("postgres")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("pgbench");
    std::thread::sleep(std::time::Duration::from_millis(1500));

    let repo = tempfile::tempdir().unwrap();
    let url = file_url(repo.path());
    let run =
        cloud_dump(&["backup", "--repo", &url, "--name", "prod-2026-03-22", "--db-url", &src.repl_url()], &[]).ok();
    assert!(run.stdout.contains("prod-2026-03-22"), "{}", run.stdout);
    assert!(writer.wait().unwrap().success(), "pgbench failed");
    let written: i64 = src.sql("postgres", "SELECT count(*) FROM writes").parse().unwrap();
    assert!(written > 0);

    // Manifest fields and stored objects.
    let m = manifest(repo.path(), "prod-2026-03-22/manifest.json");
    assert_eq!(m["name"], "prod-2026-03-22");
    assert_eq!(m["system_id"], system_id.as_str());
    assert!(m["pg_version"].as_str().unwrap().starts_with("15."));
    assert_eq!(m["compression"], "zstd");
    assert_eq!(m["encrypted"], false);
    assert_eq!(m["timeline"], 1);
    assert!(m["backup_label"].as_str().unwrap().contains("START WAL LOCATION"));
    let start: cloud_dump_postgres::Lsn = m["start_lsn"].as_str().unwrap().parse().unwrap();
    let end: cloud_dump_postgres::Lsn = m["end_lsn"].as_str().unwrap().parse().unwrap();
    assert!(start <= end);
    let ts = &m["tablespaces"][0];
    assert_eq!(ts["oid"].to_string(), ts_oid);
    assert_eq!(ts["location"], ts_dir.path().to_str().unwrap());
    for o in m["objects"].as_array().unwrap() {
        let path = repo.path().join("prod-2026-03-22").join(o["key"].as_str().unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), o["size"].as_u64().unwrap());
        assert_eq!(sha256_file(&path), o["sha256"].as_str().unwrap(), "{}", path.display());
    }
    assert!(repo.path().join("prod-2026-03-22/base.tar.zst").exists());
    assert!(repo.path().join(format!("prod-2026-03-22/{ts_oid}.tar.zst")).exists());
    assert!(repo.path().join("prod-2026-03-22/backup_manifest.zst").exists());

    // list shows it.
    let list = cloud_dump(&["list", "--repo", &url], &[]).ok();
    assert!(list.stdout.contains("prod-2026-03-22") && list.stdout.contains("END LSN"), "{}", list.stdout);

    // Restore with the tablespace relocated, check the files, start, compare.
    let expected: String = src.fingerprint().lines().filter(|l| !l.contains(".writes=")).collect::<Vec<_>>().join("\n");
    let target = scratch_dir("restore15");
    let pgdata = target.path().join("data");
    let new_ts = target.path().join("ts-moved");
    let mapping = format!("{}={}", ts_dir.path().display(), new_ts.display());
    let verify_dir = pgdata.clone();
    // pg_verifybackup checks every restored file against the server's backup_manifest.
    let mut restored = restore_and_start_checked(&src, &pgdata, &url, &mapping, &new_ts, &verify_dir);
    let link = std::fs::read_link(pgdata.join("pg_tblspc").join(&ts_oid)).unwrap();
    assert_eq!(link, new_ts);
    let got: String = restored.fingerprint().lines().filter(|l| !l.contains(".writes=")).collect::<Vec<_>>().join("\n");
    assert_eq!(got, expected);
    let (n, max): (i64, i64) = {
        let r = restored.sql("postgres", "SELECT count(*) || ' ' || coalesce(max(id), 0) FROM writes");
        let mut it = r.split(' ').map(|x| x.parse::<i64>().unwrap());
        (it.next().unwrap(), it.next().unwrap())
    };
    assert!(n > 0, "no concurrent writes captured");
    assert_eq!(n, max, "committed writes are missing from the restore");
    assert!(n <= written);
    assert_eq!(restored.sql("app", "SELECT count(*) FROM in_ts"), "50000");
    assert_eq!(restored.sql("postgres", "SELECT pg_is_in_recovery()"), "f");
    restored.stop();
}

fn restore_and_start_checked(
    src: &PgServer,
    pgdata: &std::path::Path,
    url: &str,
    mapping: &str,
    new_ts: &std::path::Path,
    verify_dir: &std::path::Path,
) -> PgServer {
    cloud_dump(
        &[
            "restore",
            "--repo",
            url,
            "--name",
            "prod-2026-03-22",
            "--pgdata",
            pgdata.to_str().unwrap(),
            "--tablespace-mapping",
            mapping,
        ],
        &[],
    )
    .ok();
    assert!(!pgdata.join("recovery.signal").exists());
    // tablespace_map is rewritten on purpose to point at the mapped location.
    let verify =
        Command::new(src.bin.join("pg_verifybackup")).args(["-i", "tablespace_map"]).arg(verify_dir).output().unwrap();
    assert!(verify.status.success(), "pg_verifybackup: {}", String::from_utf8_lossy(&verify.stderr));
    give_to_postgres(pgdata);
    give_to_postgres(new_ts);
    PgServer::start_existing(&src.bin, pgdata).unwrap()
}

#[test]
fn pg17_s3_passphrase_encrypted_restore_matches() {
    let src = pg(17);
    seed(&src);
    let s3 = S3Server::start(&["backups"]);
    let mut env = s3.env();
    env.push(("CLOUD_DUMP_PASSPHRASE".into(), "correct horse battery staple".into()));
    env.push(("CLOUD_DUMP_DB_URL".into(), src.repl_url()));
    cloud_dump(&["backup", "--repo", "s3://backups/pg", "--name", "n17", "--encrypt"], &env).ok();
    let stored = s3.root.join("backups/pg/n17/base.tar.zst.age");
    let head = std::fs::read(&stored).unwrap();
    assert!(head.starts_with(b"age-encryption.org/v1"), "not an age file");
    // A cleartext zstd stream would show its frame magic right after the age header; four
    // random bytes match it by chance about once per 4 GiB, so only the start is looked at
    // (the whole object made this test fail about once in 300 runs).
    let body = &head[..head.len().min(64 << 10)];
    assert!(!body.windows(4).any(|w| w == [0x28, 0xb5, 0x2f, 0xfd]), "zstd magic visible through encryption");

    let list = cloud_dump(&["list", "--repo", "s3://backups/pg", "--json"], &s3.env()).ok();
    let v: Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(v[0]["name"], "n17");
    assert_eq!(v[0]["encrypted"], true);
    assert_eq!(v[0]["encryption"], "passphrase");
    assert!(v[0]["pg_version"].as_str().unwrap().starts_with("17."));

    // Wrong passphrase: clear error, and no data left claiming to be a restore.
    let target = scratch_dir("restore17");
    let pgdata = target.path().join("data");
    let mut wrong = s3.env();
    wrong.push(("CLOUD_DUMP_PASSPHRASE".into(), "wrong".into()));
    cloud_dump(
        &["restore", "--repo", "s3://backups/pg", "--name", "n17", "--pgdata", pgdata.to_str().unwrap()],
        &wrong,
    )
    .fails_with("wrong passphrase");
    std::fs::remove_dir_all(&pgdata).ok();
    // No passphrase at all.
    cloud_dump(
        &["restore", "--repo", "s3://backups/pg", "--name", "n17", "--pgdata", pgdata.to_str().unwrap()],
        &s3.env(),
    )
    .fails_with("encrypted");

    let expected = src.fingerprint();
    let mut restored = restore_and_start(&src.bin, &pgdata, &["--repo", "s3://backups/pg", "--name", "n17"], &env);
    assert_eq!(restored.fingerprint(), expected);
    restored.stop();
}

#[test]
fn key_pair_gzip_cluster_layout_no_collisions_and_duplicates_refused() {
    let src = pg(15);
    src.sql("postgres", "CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g");
    let repo = tempfile::tempdir().unwrap();
    let url = file_url(repo.path());
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("age.key");
    cloud_dump(&["keygen", "-o", key.to_str().unwrap()], &[]).ok();
    let public = keys.path().join("age.pub");
    assert!(std::fs::read_to_string(&public).unwrap().starts_with("age1"));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    let repl = src.repl_url();
    let common = ["--repo", url.as_str(), "--cluster", "prod-pg15", "--db-url", repl.as_str()];
    for name in ["2026-03-21", "2026-03-22"] {
        let mut a = vec!["backup"];
        a.extend_from_slice(&common);
        a.extend_from_slice(&[
            "--name",
            name,
            "--compression",
            "gzip",
            "--encrypt",
            "--recipient-key",
            public.to_str().unwrap(),
        ]);
        cloud_dump(&a, &[]).ok();
    }
    let first = repo.path().join("prod-pg15/backup/2026-03-21");
    assert!(first.join("manifest.json").exists());
    assert!(first.join("base.tar.gz.age").exists());
    assert!(!repo.path().join("2026-03-21").exists(), "objects leaked to the flat layout");
    let m = manifest(repo.path(), "prod-pg15/backup/2026-03-21/manifest.json");
    assert_eq!(m["encryption"], "x25519");
    assert_eq!(m["cluster"], "prod-pg15");
    let m2 = manifest(repo.path(), "prod-pg15/backup/2026-03-22/manifest.json");
    let keys1: Vec<_> = m["objects"].as_array().unwrap().iter().map(|o| format!("2026-03-21/{}", o["key"])).collect();
    let keys2: Vec<_> = m2["objects"].as_array().unwrap().iter().map(|o| format!("2026-03-22/{}", o["key"])).collect();
    assert!(keys1.iter().all(|k| !keys2.contains(k)));

    // The same name again is refused and the first backup is untouched.
    let before = sha256_file(&first.join("manifest.json"));
    let mut a = vec!["backup"];
    a.extend_from_slice(&common);
    a.extend_from_slice(&["--name", "2026-03-21"]);
    cloud_dump(&a, &[]).fails_with("already exists");
    assert_eq!(sha256_file(&first.join("manifest.json")), before);

    let list = cloud_dump(&["list", "--repo", &url, "--cluster", "prod-pg15"], &[]).ok();
    assert!(list.stdout.starts_with("Cluster: prod-pg15 (WAL archive: prod-pg15/wal_archive/)"), "{}", list.stdout);
    let p21 = list.stdout.find("2026-03-21").unwrap();
    let p22 = list.stdout.find("2026-03-22").unwrap();
    assert!(p22 < p21, "newest first:\n{}", list.stdout);

    // A wrong identity is refused; the right one restores a verifiable data directory.
    let target = scratch_dir("restore-kp");
    let pgdata = target.path().join("data");
    let other = keys.path().join("other.key");
    cloud_dump(&["keygen", "-o", other.to_str().unwrap()], &[]).ok();
    cloud_dump(
        &[
            "restore",
            "--repo",
            &url,
            "--cluster",
            "prod-pg15",
            "--name",
            "2026-03-22",
            "--pgdata",
            pgdata.to_str().unwrap(),
            "--identity-key",
            other.to_str().unwrap(),
        ],
        &[],
    )
    .fails_with("wrong key");
    std::fs::remove_dir_all(&pgdata).ok();
    let mut restored = restore_and_start(
        &src.bin,
        &pgdata,
        &["--repo", &url, "--cluster", "prod-pg15", "--name", "2026-03-22", "--identity-key", key.to_str().unwrap()],
        &[],
    );
    assert_eq!(restored.sql("postgres", "SELECT count(*) FROM t"), "1000");
    restored.stop();
}

#[test]
fn storj_access_grant_is_exchanged_for_gateway_credentials() {
    let src = pg(15);
    let s3 = S3Server::start(&["sj-bucket"]);
    let auth = cloud_dump_testkit::FakeStorjAuth::start(
        "grant-123",
        "cloud-dump-test",
        "cloud-dump-test-secret",
        &s3.endpoint,
    );
    let env = vec![
        ("STORJ_ACCESS".to_string(), "grant-123".to_string()),
        ("STORJ_BUCKET".to_string(), "sj-bucket".to_string()),
        ("STORJ_AUTH_SERVICE".to_string(), auth.url.clone()),
    ];
    let run = cloud_dump(
        &["backup", "--storage", "storj", "--name", "sj1", "--db-url", &src.repl_url(), "--compression", "lz4"],
        &env,
    )
    .ok();
    assert!(!run.stderr.contains("grant-123") && !run.stdout.contains("grant-123"), "secret printed");
    assert!(s3.root.join("sj-bucket/sj1/base.tar.lz4").exists());
    let list = cloud_dump(&["list", "--repo", "storj://sj-bucket"], &env).ok();
    assert!(list.stdout.contains("sj1"));
    assert!(auth.exchanges.load(std::sync::atomic::Ordering::Relaxed) >= 2);

    let mut bad = env.clone();
    bad[0].1 = "not-a-grant".into();
    let r = cloud_dump(&["list", "--storage", "storj"], &bad).fails_with("refused the access grant");
    assert!(!r.stderr.contains("not-a-grant"), "grant echoed in the error");
}
