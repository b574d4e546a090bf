//! Helpers: run the binary, start servers, seed data.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use cloud_dump_testkit::{give_to_postgres, scratch_dir, PgServer, S3Server};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cloud-dump"))
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    #[track_caller]
    pub fn ok(self) -> Run {
        assert_eq!(self.code, 0, "cloud-dump failed:\nstdout: {}\nstderr: {}", self.stdout, self.stderr);
        self
    }
    #[track_caller]
    pub fn fails_with(self, needle: &str) -> Run {
        assert_ne!(self.code, 0, "cloud-dump should have failed:\nstdout: {}\nstderr: {}", self.stdout, self.stderr);
        assert!(
            self.stderr.to_lowercase().contains(&needle.to_lowercase()),
            "stderr does not mention {needle:?}:\n{}",
            self.stderr
        );
        let last = self.stderr.lines().last().unwrap_or("");
        assert!(last.starts_with("cloud-dump: error: "), "error is not one final line: {}", self.stderr);
        self
    }
}

/// Runs cloud-dump with a clean environment (no inherited CLOUD_DUMP_*/PG*/AWS_*).
pub fn cloud_dump(args: &[&str], env: &[(String, String)]) -> Run {
    let mut c = Command::new(bin());
    c.args(args).arg("--progress").arg("log");
    for (k, _) in std::env::vars() {
        if k.starts_with("CLOUD_DUMP_") || k.starts_with("PG") || k.starts_with("AWS_") || k.starts_with("STORJ_") {
            c.env_remove(&k);
        }
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let out: Output = c.output().expect("run cloud-dump");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A server of `major`, or a loud failure naming what to install.
pub fn pg(major: u32) -> PgServer {
    PgServer::start(major).unwrap_or_else(|e| {
        panic!("cannot start PostgreSQL {major}: {e}\n(scripts/test installs PostgreSQL 17 from npm)")
    })
}

/// Databases, roles, a sequence, a function, a trigger, and enough rows to span files.
pub fn seed(s: &PgServer) {
    s.sql("postgres", "CREATE DATABASE app");
    s.sql("postgres", "CREATE ROLE app_owner LOGIN PASSWORD 'x'; CREATE ROLE app_reader NOLOGIN");
    s.sql(
        "app",
        "CREATE TABLE accounts(id bigserial PRIMARY KEY, name text NOT NULL, balance numeric, note text);
         INSERT INTO accounts(name, balance, note)
           SELECT 'user' || g, g * 1.5, repeat(md5(g::text), 8) FROM generate_series(1, 60000) g;
         CREATE TABLE audit(id bigserial PRIMARY KEY, account bigint, at timestamptz DEFAULT now());
         CREATE FUNCTION log_account() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO audit(account) VALUES (NEW.id); RETURN NEW; END $$;
         CREATE TRIGGER accounts_audit AFTER INSERT ON accounts FOR EACH ROW EXECUTE FUNCTION log_account();
         INSERT INTO accounts(name, balance) VALUES ('triggered', 1);
         GRANT SELECT ON accounts TO app_reader;
         CREATE INDEX accounts_name ON accounts(name);",
    );
    s.sql("postgres", "CREATE TABLE big AS SELECT g AS id, md5(g::text) AS h FROM generate_series(1, 200000) g");
}

pub fn file_url(p: &Path) -> String {
    format!("file://{}", p.display())
}

/// Restores `name`, hands the files to postgres, starts the copy.
pub fn restore_and_start(bin_dir: &Path, pgdata: &Path, args: &[&str], env: &[(String, String)]) -> PgServer {
    let mut a = vec!["restore", "--pgdata", pgdata.to_str().unwrap()];
    a.extend_from_slice(args);
    cloud_dump(&a, env).ok();
    assert!(!pgdata.join("recovery.signal").exists(), "a plain restore must not write recovery.signal");
    assert!(pgdata.join("backup_label").exists(), "backup_label must be restored");
    for p in ["PG_VERSION", "global/pg_control", "base", "pg_wal"] {
        assert!(pgdata.join(p).exists(), "{p} missing from the restore");
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(pgdata).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700, "PGDATA must be 0700");
    give_to_postgres(pgdata);
    PgServer::start_existing(bin_dir, pgdata).unwrap_or_else(|e| panic!("restored server does not start: {e}"))
}

pub fn sha256_file(p: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap()))
}
