//! `verify --drill`: the restore test every project tells its users to script. Restores a
//! backup (or a random point of the recovery window) into a scratch directory, starts it
//! with local server binaries of the same major on a private socket (no TCP, archiving
//! off, its own pg_hba), waits for recovery to end, checks every database answers and runs
//! amcheck where it is available, stops the server and removes the directory. Prints the
//! timings; exits 1 on any problem. Made for cron.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cloud_dump_postgres::Layout;
use cloud_dump_postgres::{BackupManifest, Lsn, PgRepository};
use cloud_dump_storage::Repo;
use serde::Serialize;

use crate::args::{GlobalArgs, RestoreArgs, TargetAction, TargetKind, VerifyArgs};

#[derive(Debug, Default, Serialize)]
struct DrillReport {
    backup: String,
    target: String,
    seed: Option<u64>,
    restore_seconds: f64,
    recovery_seconds: f64,
    check_seconds: f64,
    total_seconds: f64,
    databases: Vec<String>,
    indexes_checked: u64,
    problems: Vec<String>,
}

/// Runs `cmd` as the postgres user when we are root (PostgreSQL refuses to run as root).
fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// The postgres user's uid and gid, from /etc/passwd.
fn postgres_ids() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&"postgres")).then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
    })
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<()> {
    let st = Command::new("chown").arg("-R").arg(format!("{uid}:{gid}")).arg(path).status()?;
    if !st.success() {
        bail!("cannot hand {} to the postgres user", path.display());
    }
    Ok(())
}

/// The server binaries of `major`: --pg-bin, the Debian layout, then PATH.
fn bin_dir(flag: &Option<PathBuf>, major: u32) -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = match flag {
        Some(d) => vec![d.clone()],
        None => {
            let mut v = vec![PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"))];
            if let Some(path) = std::env::var_os("PATH") {
                v.extend(std::env::split_paths(&path));
            }
            v
        }
    };
    for d in candidates {
        let postgres = d.join("postgres");
        if !postgres.exists() || !d.join("pg_ctl").exists() {
            continue;
        }
        let out = Command::new(&postgres).arg("--version").output();
        let version = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        // "postgres (PostgreSQL) 15.18 (Debian …)"
        let found = version.split_whitespace().nth(2).and_then(|v| v.split('.').next()?.parse::<u32>().ok());
        if found == Some(major) {
            return Ok(d);
        }
        if flag.is_some() {
            bail!(
                "{} is PostgreSQL {}, the backup is {major}: give the server binaries of {major}",
                d.display(),
                version.trim()
            );
        }
    }
    bail!("no PostgreSQL {major} server binaries (postgres, pg_ctl) found: give --pg-bin DIR (or CLOUD_DUMP_PG_BIN)")
}

fn psql_path(bin: &Path) -> Result<PathBuf> {
    if bin.join("psql").exists() {
        return Ok(bin.join("psql"));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if d.join("psql").exists() {
                return Ok(d.join("psql"));
            }
        }
    }
    bail!("psql not found beside {} or on PATH: the drill needs it to check the databases", bin.display())
}

struct Server {
    bin: PathBuf,
    psql: PathBuf,
    data: PathBuf,
    socket: PathBuf,
    port: u16,
    user: String,
}

impl Server {
    fn sql(&self, db: &str, q: &str) -> std::result::Result<String, String> {
        let out = as_server_user(&self.psql)
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.socket)
            .args(["-p", &self.port.to_string(), "-U", &self.user, "-d", db, "-c", q])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().replace('\n', "; "))
        }
    }

    fn pg_ctl_stop(&self, mode: &str) -> bool {
        as_server_user(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", mode, "-w", "-t", "60", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Stops the server: fast, else immediate; says which.
    fn try_stop(&self) -> std::result::Result<(), String> {
        if !self.data.join("postmaster.pid").exists() || self.pg_ctl_stop("fast") {
            return Ok(());
        }
        if self.pg_ctl_stop("immediate") {
            return Err("the server did not stop in fast mode; it was stopped in immediate mode".into());
        }
        Err(format!("the server in {} could not be stopped", self.data.display()))
    }

    fn stop(&self) {
        let _ = self.try_stop();
    }
}

/// Removes the scratch directory however the drill ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The status line of postmaster.pid (PostgreSQL 10+: starting, ready, standby, stopping);
/// `None` when the file is gone (the server is not running).
fn postmaster_status(data: &Path) -> Option<String> {
    let text = std::fs::read_to_string(data.join("postmaster.pid")).ok()?;
    Some(text.lines().nth(7).unwrap_or("").trim().to_owned())
}

/// Set on SIGINT/SIGTERM, so the drill stops its server and removes its directory.
fn cancel_flag() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f = flag.clone();
    if let (Ok(mut term), Ok(mut int)) = (
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()),
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()),
    ) {
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            f.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }
    flag
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A random point of the recovery window, as an LSN (always reachable: between the end of
/// the window's first backup and the start of the newest archived segment, where a time
/// might fall after the last commit), the backup restore will choose for it, and the seed.
async fn random_point(repo: &Repo, layout: &Layout, seed: Option<u64>) -> Result<(Lsn, BackupManifest, u64, u32)> {
    use rand::{Rng, SeedableRng};
    let pg = PgRepository::new(repo, layout);
    let (inv, s) = pg.summary(0).await?;
    let Some((from_time, _)) = s.recovery_window else {
        bail!("--random-point: the repository has no recovery window (no backup whose WAL runs to the newest segment without a hole)")
    };
    let first = inv
        .backups
        .iter()
        .find(|b| b.manifest.stop_time == from_time)
        .context("the window's first backup disappeared")?;
    let seg = first.manifest.wal_segment_size();
    let tli = s.recovery_timeline.context("no recovery timeline")?;
    let newest = s.recovery_window_last.context("no WAL archived")?;
    let per_log = 0x1_0000_0000u64 / seg;
    let number = cloud_dump_postgres::wal::segment_number(&newest, seg).context("bad newest segment")?;
    let to = Lsn((number / per_log) << 32 | ((number % per_log) * seg));
    let from = first.manifest.end_lsn;
    if to <= from {
        bail!("--random-point: no archived WAL after the end of backup {}", first.name());
    }
    let seed = seed.unwrap_or_else(rand::random);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let at = Lsn(rng.gen_range(from.0..=to.0));
    // The backup restore picks: the newest on the timeline's history that ends before it.
    let graph = cloud_dump_postgres::WalArchive::new(repo, layout)
        .timeline_graph(seg, &cloud_dump_postgres::WalKeys::default())
        .await?;
    let manifests: Vec<BackupManifest> = inv.backups.iter().map(|b| b.manifest.clone()).collect();
    let (m, _) = cloud_dump_postgres::recovery::choose_restore(
        &graph,
        &manifests,
        None,
        &cloud_dump_postgres::recovery::RecoveryTarget::Lsn(at),
        cloud_dump_postgres::recovery::TimelineChoice::Id(tli),
    )?;
    Ok((at, m.clone(), seed, tli))
}

/// Stops the drill's server however the drill ends (fast, then immediate).
struct Running<'a>(&'a Server);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

pub async fn run(
    g: &GlobalArgs,
    a: &VerifyArgs,
    repo: &Repo,
    layout: &Layout,
    name: Option<String>,
) -> Result<ExitCode> {
    let started = Instant::now();
    crate::STDOUT_IS_JSON.store(a.json, std::sync::atomic::Ordering::Relaxed);
    // From here on SIGINT/SIGTERM only set this flag: each step checks it, and the guards
    // stop the server and remove the directory.
    let cancelled = cancel_flag();
    let interrupted = |what: &str| -> Result<()> {
        if cancelled.load(std::sync::atomic::Ordering::Relaxed) {
            bail!("drill: interrupted during {what}; the scratch directory is removed");
        }
        Ok(())
    };
    let mut report = DrillReport::default();
    let (target_lsn, manifest, tli): (Option<Lsn>, BackupManifest, Option<u32>) = if a.random_point {
        let (at, m, seed, tli) = random_point(repo, layout, a.seed).await?;
        report.seed = Some(seed);
        (Some(at), m, Some(tli))
    } else {
        let n = name.context("no backup to drill")?;
        (None, cloud_dump_postgres::load_manifest(repo, layout, &n).await?, None)
    };
    let major = manifest.pg_version_num / 10000;
    let bin = bin_dir(&a.pg_bin, major)?;
    let psql = psql_path(&bin)?;
    let parent = a.scratch.clone().unwrap_or_else(std::env::temp_dir);
    let scratch = tempfile::Builder::new()
        .prefix("cloud-dump-drill-")
        .tempdir_in(&parent)
        .with_context(|| format!("cannot make a scratch directory in {}", parent.display()))?
        .keep();
    let _cleanup = Scratch(scratch.clone());
    let data = scratch.join("data");
    let mut mapping = Vec::new();
    for t in &manifest.tablespaces {
        mapping.push(format!("{}={}", t.location, scratch.join(format!("tablespace-{}", t.oid)).display()));
    }
    report.backup = manifest.name.clone();
    report.target = match &target_lsn {
        Some(l) => format!("LSN {l}"),
        None if manifest.wal_included => "the backup's end (consistency)".into(),
        None => "immediate (consistency, WAL from the archive)".into(),
    };
    crate::say(&format!("drill: restoring backup {} ({}) into {}", manifest.name, report.target, data.display()));

    // Restore, as `cloud-dump restore` does.
    let ra = RestoreArgs {
        config: crate::args::PgConfigArg { config: None },
        name: Some(manifest.name.clone()),
        recovery_target_time: None,
        recovery_target_lsn: target_lsn.map(|l| l.to_string()),
        recovery_target_xid: None,
        recovery_target_name: None,
        recovery_target: match (&target_lsn, manifest.wal_included) {
            (None, false) => Some(TargetKind::Immediate),
            _ => None,
        },
        recovery_target_action: TargetAction::Promote,
        // A random point is drawn on the window's timeline.
        recovery_target_timeline: tli.map(|t| t.to_string()),
        archive_mode: crate::args::ArchiveMode::Off,
        wal_passphrase: None,
        wal_identity_key: None,
        pgdata: data.clone(),
        tablespace_mapping: mapping,
        dry_run: false,
        decrypt: a.decrypt.clone(),
    };
    let t0 = Instant::now();
    crate::restore::run(g, &ra).await.context("drill: the restore failed")?;
    report.restore_seconds = t0.elapsed().as_secs_f64();
    interrupted("the restore")?;

    // A private server: no TCP, archiving off (it must never archive into the source's
    // archive), its own pg_hba (the source's may not let us in over the socket).
    let port = free_port()?;
    let hba = scratch.join("drill_hba.conf");
    std::fs::write(&hba, "local all all trust\n")?;
    let ident = scratch.join("drill_ident.conf");
    std::fs::write(&ident, "")?;
    // Debian keeps postgresql.conf in /etc: a restored data directory may have none.
    if !data.join("postgresql.conf").exists() {
        std::fs::write(data.join("postgresql.conf"), "# written by cloud-dump verify --drill\n")?;
    }
    let mut conf = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.auto.conf"))?;
    std::io::Write::write_all(
        &mut conf,
        format!(
            "\n# cloud-dump verify --drill\nport = {port}\nlisten_addresses = ''\nunix_socket_directories = '{}'\n\
             archive_mode = off\nhba_file = '{}'\nident_file = '{}'\nlogging_collector = off\n",
            scratch.display(),
            hba.display(),
            ident.display()
        )
        .as_bytes(),
    )?;
    drop(conf);
    if is_root() {
        let (uid, gid) =
            postgres_ids().context("running as root, the drill needs a postgres user to run the server")?;
        chown_tree(&scratch, uid, gid)?;
    }
    let log = scratch.join("server.log");
    let server = Server {
        bin: bin.clone(),
        psql,
        data: data.clone(),
        socket: scratch.clone(),
        port,
        user: std::env::var("CLOUD_DUMP_DRILL_USER").unwrap_or_else(|_| "postgres".into()),
    };
    let t1 = Instant::now();
    let st = as_server_user(&bin.join("pg_ctl"))
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(&log)
        .args(["-W", "start"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        bail!("drill: the restored server did not start: {}", tail.lines().last().unwrap_or(""));
    }
    let _running = Running(&server);
    let deadline = Instant::now() + Duration::from_secs(a.drill_timeout);
    let log_tail = || {
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        tail.lines().rev().take(3).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" | ")
    };
    let mut refused_while_ready = 0;
    let mut seen_pid = false;
    loop {
        let last = match server.sql("postgres", "SELECT pg_is_in_recovery()") {
            Ok(v) if v == "f" => break,
            Ok(v) => format!("still in recovery ({v})"),
            Err(e) => e,
        };
        // postmaster.pid's status line: gone means the server exited; "ready" with
        // connections refused is not going to get better by waiting.
        let status = postmaster_status(&data);
        seen_pid |= status.is_some();
        match status {
            // Gone after it was there, or not there 10 s after the start (the postmaster
            // writes it first thing): the server exited.
            None if seen_pid || t1.elapsed() > Duration::from_secs(10) => {
                bail!("drill: the restored server exited: {}", log_tail())
            }
            None => {}
            Some(st) if st == "ready" && !last.starts_with("still in recovery") => {
                refused_while_ready += 1;
                if refused_while_ready > 40 {
                    bail!("drill: the server is up but does not let the drill in: {last}");
                }
            }
            _ => refused_while_ready = 0,
        }
        interrupted("recovery")?;
        if Instant::now() > deadline {
            bail!("drill: recovery did not finish within {} s ({last}); server log: {}", a.drill_timeout, log_tail());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    report.recovery_seconds = t1.elapsed().as_secs_f64();

    let t2 = Instant::now();
    match server.sql("postgres", "SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1") {
        Ok(list) => report.databases = list.lines().map(str::to_owned).collect(),
        Err(e) => report.problems.push(format!("cannot list databases: {e}")),
    }
    for db in report.databases.clone() {
        if let Err(e) = server.sql(&db, "SELECT count(*) FROM pg_class") {
            report.problems.push(format!("database {db} does not answer: {e}"));
            continue;
        }
        let has_amcheck = server.sql(&db, "SELECT count(*) FROM pg_available_extensions WHERE name = 'amcheck'");
        if has_amcheck.as_deref() != Ok("1") {
            continue;
        }
        let check = "CREATE EXTENSION IF NOT EXISTS amcheck; \
                     SELECT count(bt_index_check(c.oid)) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                     JOIN pg_am am ON am.oid = c.relam WHERE am.amname = 'btree' AND c.relpersistence <> 't' AND i.indisvalid";
        match server.sql(&db, check) {
            Ok(n) => report.indexes_checked += n.lines().last().and_then(|l| l.trim().parse::<u64>().ok()).unwrap_or(0),
            Err(e) => report.problems.push(format!("amcheck in database {db}: {e}")),
        }
    }
    report.check_seconds = t2.elapsed().as_secs_f64();
    interrupted("the checks")?;
    if let Err(e) = server.try_stop() {
        report.problems.push(e);
    }
    report.total_seconds = started.elapsed().as_secs_f64();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "drill: backup {} → {}: restore {:.1} s, recovery {:.1} s, checks {:.1} s ({} databases, {} indexes by amcheck), total {:.1} s{}",
            report.backup,
            report.target,
            report.restore_seconds,
            report.recovery_seconds,
            report.check_seconds,
            report.databases.len(),
            report.indexes_checked,
            report.total_seconds,
            report.seed.map(|s| format!(", seed {s}")).unwrap_or_default()
        );
        for p in &report.problems {
            println!("  problem: {p}");
        }
    }
    if report.problems.is_empty() {
        if !a.json {
            println!("drill: ok; {} removed", scratch.display());
        }
        return Ok(ExitCode::SUCCESS);
    }
    crate::report_error(
        "",
        &anyhow::anyhow!("drill found {} problem(s): {}", report.problems.len(), report.problems.join("; ")),
    );
    Ok(ExitCode::from(1))
}
