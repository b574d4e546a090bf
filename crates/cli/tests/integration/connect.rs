//! How cloud-dump reaches PostgreSQL: TLS in every sslmode, Unix sockets, libpq variables,
//! and the pre-15 protocol (PostgreSQL 14).

use super::common::*;

fn backup_ok(url: &str, name: &str, db: &str, env: &[(String, String)]) {
    cloud_dump(&["backup", "--repo", url, "--name", name, "--db-url", db], env).ok();
}

#[test]
fn tls_modes_behave_like_libpq() {
    let src = pg(15);
    src.sql("postgres", "CREATE ROLE tlsonly LOGIN REPLICATION PASSWORD 'tls-pw'");
    let ca = src.enable_tls();
    let ca = ca.to_str().unwrap();
    let repo = tempfile::tempdir().unwrap();
    let url = file_url(repo.path());
    let db = |host: &str, extra: &str| format!("postgres://tlsonly:tls-pw@{host}:{}/postgres?{extra}", src.port);

    // pg_hba only lets `tlsonly` in over TLS: success proves the connection was encrypted.
    backup_ok(&url, "require", &db("127.0.0.1", "sslmode=require"), &[]);
    backup_ok(&url, "prefer", &db("127.0.0.1", "sslmode=prefer"), &[]);
    backup_ok(&url, "verify-ca", &db("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}")), &[]);
    backup_ok(&url, "verify-full", &db("localhost", &format!("sslmode=verify-full&sslrootcert={ca}")), &[]);
    let env = vec![("PGSSLMODE".into(), "verify-full".into()), ("PGSSLROOTCERT".into(), ca.to_owned())];
    backup_ok(&url, "from-env", &db("localhost", ""), &env);
    // SCRAM bound to the TLS connection (SCRAM-SHA-256-PLUS), as libpq's channel_binding.
    backup_ok(&url, "bound", &db("127.0.0.1", "sslmode=require&channel_binding=require"), &[]);
    let env = vec![("PGCHANNELBINDING".into(), "require".into())];
    backup_ok(&url, "bound-env", &db("127.0.0.1", "sslmode=require"), &env);

    let fail = |name: &str, db: String, needle: &str| {
        cloud_dump(&["backup", "--repo", &url, "--name", name, "--db-url", &db], &[]).fails_with(needle);
    };
    fail("disable", db("127.0.0.1", "sslmode=disable"), "pg_hba.conf rejects");
    fail("cb-no-tls", db("127.0.0.1", "sslmode=disable&channel_binding=require"), "channel_binding=require needs TLS");
    fail("cb-bad", db("127.0.0.1", "channel_binding=sometimes"), "invalid channel_binding");
    // A server that asks for an MD5 password cannot prove the channel: nothing is sent.
    src.sql("postgres", "SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN REPLICATION PASSWORD 'md5pw'");
    let md5 =
        format!("postgres://md5user:md5pw@127.0.0.1:{}/postgres?sslmode=require&channel_binding=require", src.port);
    fail("cb-md5", md5, "asked for an MD5 password");
    fail("wrong-name", db("127.0.0.1", &format!("sslmode=verify-full&sslrootcert={ca}")), "TLS");
    fail("no-root", db("localhost", "sslmode=verify-full&sslrootcert=/nonexistent/root.crt"), "sslrootcert");
    let other_ca = tempfile::tempdir().unwrap();
    let other = other_ca.path().join("other.crt");
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout"])
        .arg(other_ca.path().join("k"))
        .arg("-out")
        .arg(&other)
        .args(["-subj", "/CN=other", "-days", "1"])
        .output()
        .unwrap();
    assert!(out.status.success());
    fail("untrusted", db("localhost", &format!("sslmode=verify-ca&sslrootcert={}", other.display())), "TLS");

    let list = cloud_dump(&["list", "--repo", &url, "--json"], &[]).ok();
    let v: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 7, "{}", list.stdout);
}

#[test]
fn unix_socket_and_libpq_environment() {
    let src = pg(15);
    let repo = tempfile::tempdir().unwrap();
    let url = file_url(repo.path());
    let socket = src.socket_dir.to_str().unwrap().to_owned();
    backup_ok(&url, "kv-socket", &format!("host={socket} port={} user=repl", src.port), &[]);
    let env = vec![
        ("PGHOST".to_string(), "127.0.0.1".to_string()),
        ("PGPORT".to_string(), src.port.to_string()),
        ("PGUSER".to_string(), "repl".to_string()),
        ("PGPASSWORD".to_string(), "repl-secret".to_string()),
        ("PGSSLMODE".to_string(), "disable".to_string()),
    ];
    cloud_dump(&["backup", "--repo", &url, "--name", "env-only", "--max-rate", "1G"], &env).ok();
}

#[test]
fn pg14_legacy_protocol_with_tablespace_restores() {
    let src = pg(14);
    seed(&src);
    let ts = scratch_dir("ts14");
    src.sql("postgres", &format!("CREATE TABLESPACE t14 LOCATION '{}'", ts.path().display()));
    src.sql("app", "CREATE TABLE moved(id int) TABLESPACE t14; INSERT INTO moved SELECT generate_series(1, 5000)");
    let repo = tempfile::tempdir().unwrap();
    let url = file_url(repo.path());
    backup_ok(&url, "pg14", &src.repl_url(), &[]);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo.path().join("pg14/manifest.json")).unwrap()).unwrap();
    assert!(m["pg_version"].as_str().unwrap().starts_with("14."));
    let kinds: Vec<_> = m["objects"].as_array().unwrap().iter().map(|o| o["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["base", "tablespace", "backup_manifest"]);

    let expected = src.fingerprint();
    let target = scratch_dir("restore14");
    let pgdata = target.path().join("data");
    let new_ts = target.path().join("t14");
    let mapping = format!("{}={}", ts.path().display(), new_ts.display());
    cloud_dump(
        &[
            "restore",
            "--repo",
            &url,
            "--name",
            "pg14",
            "--pgdata",
            pgdata.to_str().unwrap(),
            "--tablespace-mapping",
            &mapping,
        ],
        &[],
    )
    .ok();
    give_to_postgres(&new_ts);
    give_to_postgres(&pgdata);
    let mut restored = PgServer::start_existing(&src.bin, &pgdata).unwrap();
    assert_eq!(restored.fingerprint(), expected);
    restored.stop();
}
