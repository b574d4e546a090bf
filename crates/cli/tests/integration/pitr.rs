//! The seed's point-in-time-recovery scenario end to end, with archive_command calling the
//! built binary: 10 rows, a noted time, 5 more rows; restore to the time, to the LSN, to
//! latest; then a promotion and a restore that follows the new timeline.

use std::time::Duration;

use super::common::*;

pub(super) const NO_ARCHIVE: &str = "archive_mode = off";

fn count(s: &PgServer) -> String {
    s.sql("postgres", "SELECT count(*) FROM pitr")
}

pub(super) struct Archive {
    pub(super) url: String,
    pub(super) env: Vec<(String, String)>,
    /// The archive_command's prefix: environment for the store.
    pub(super) cmd_env: String,
    _dir: Option<tempfile::TempDir>,
    _s3: Option<S3Server>,
}

pub(super) fn file_archive() -> Archive {
    let dir = scratch_dir("pitr-repo");
    std::fs::create_dir_all(dir.path().join("c/wal_archive")).unwrap();
    give_to_postgres(dir.path());
    Archive { url: file_url(dir.path()), env: vec![], cmd_env: String::new(), _dir: Some(dir), _s3: None }
}

fn s3_archive() -> Archive {
    let s3 = S3Server::start(&["pitr"]);
    let env = s3.env();
    let cmd_env = env.iter().map(|(k, v)| format!("{k}={v} ")).collect();
    Archive { url: "s3://pitr/pg".into(), env, cmd_env, _dir: None, _s3: Some(s3) }
}

pub(super) fn restore(a: &Archive, src: &PgServer, pgdata: &std::path::Path, target: &[&str], conf: &str) -> PgServer {
    let bin = cloud_dump_testkit::public_copy(&bin());
    let mut args = vec!["restore", "--repo", &a.url, "--cluster", "c", "--pgdata", pgdata.to_str().unwrap()];
    args.extend_from_slice(target);
    let mut c = std::process::Command::new(&bin);
    c.args(&args).env("CLOUD_DUMP_PROGRESS", "none");
    for (k, v) in &a.env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    assert!(out.status.success(), "restore {target:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(pgdata.join("recovery.signal").exists(), "PITR restore must write recovery.signal");
    let conf_file = pgdata.join("pg_wal/.cloud-dump/restore.conf");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&conf_file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let auto = std::fs::read_to_string(pgdata.join("postgresql.auto.conf")).unwrap();
    assert!(auto.contains("restore_command = '") && auto.contains("wal-fetch %f %p --config"), "{auto}");
    for secret in ["repl-secret", "cloud-dump-test-secret"] {
        assert!(!auto.contains(secret), "secret in postgresql.auto.conf");
    }
    give_to_postgres(pgdata);
    let s = PgServer::start_existing_with(&src.bin, pgdata, conf).unwrap_or_else(|e| panic!("restored server: {e}"));
    s.wait_promoted(Duration::from_secs(120)).unwrap();
    // The settings file held the repository's secrets: recovery_end_command removed it.
    assert!(!conf_file.exists(), "restore.conf (secrets) left in PGDATA after recovery");
    s
}

fn scenario(major: u32, archive: Archive, timelines: bool) {
    let mut src = pg(major);
    let exe = cloud_dump_testkit::public_copy(&bin());
    src.reconfigure(&format!(
        "archive_mode = on\narchive_command = '{}{} wal-push %p %f --repo {} --cluster c --log-level warn'",
        archive.cmd_env,
        exe.display(),
        archive.url
    ))
    .unwrap();
    let mut env = archive.env.clone();
    env.push(("CLOUD_DUMP_DB_URL".into(), src.repl_url()));
    cloud_dump(&["backup", "--repo", &archive.url, "--cluster", "c", "--name", "base1"], &env).ok();

    src.sql("postgres", "CREATE TABLE pitr(id int PRIMARY KEY, phase text)");
    src.sql("postgres", "INSERT INTO pitr SELECT g, 'before' FROM generate_series(1, 10) g");
    src.switch_and_wait_archived(Duration::from_secs(60)).unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    let noted = src.sql("postgres", "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || ' UTC'");
    std::thread::sleep(Duration::from_millis(1200));
    src.sql("postgres", "INSERT INTO pitr SELECT g, 'after' FROM generate_series(11, 15) g");
    let lsn = src.sql("postgres", "SELECT pg_current_wal_insert_lsn()");
    src.switch_and_wait_archived(Duration::from_secs(60)).unwrap();

    let work = scratch_dir("pitr-restores");
    let mut at_time =
        restore(&archive, &src, &work.path().join("time"), &["--recovery-target-time", &noted], NO_ARCHIVE);
    assert_eq!(count(&at_time), "10", "restore to {noted}");
    at_time.stop();
    let mut at_lsn = restore(&archive, &src, &work.path().join("lsn"), &["--recovery-target-lsn", &lsn], NO_ARCHIVE);
    assert_eq!(count(&at_lsn), "15", "restore to {lsn}");
    at_lsn.stop();
    let mut latest = restore(&archive, &src, &work.path().join("latest"), &["--recovery-target", "latest"], NO_ARCHIVE);
    assert_eq!(count(&latest), "15");
    latest.stop();

    if timelines {
        // Promote a copy at the noted time (timeline 2), keep archiving from it, write more.
        let mut fork = restore(&archive, &src, &work.path().join("fork"), &["--recovery-target-time", &noted], "");
        assert_eq!(fork.sql("postgres", "SELECT timeline_id FROM pg_control_checkpoint()"), "2");
        fork.sql("postgres", "INSERT INTO pitr SELECT g, 'timeline 2' FROM generate_series(100, 106) g");
        fork.switch_and_wait_archived(Duration::from_secs(60)).unwrap();
        let mut follow = restore(
            &archive,
            &src,
            &work.path().join("follow"),
            &["--name", "base1", "--recovery-target", "latest", "--recovery-target-timeline", "latest"],
            NO_ARCHIVE,
        );
        assert_eq!(count(&follow), "17", "timeline 2 not followed");
        assert_eq!(follow.sql("postgres", "SELECT count(*) FROM pitr WHERE phase = 'after'"), "0");
        follow.stop();
        // A backup of the fork carries the fork's own recovery_target_time. Restoring it to
        // `latest` must replay everything, not stop at the inherited target.
        let mut env2 = archive.env.clone();
        env2.push(("CLOUD_DUMP_DB_URL".into(), fork.repl_url()));
        cloud_dump(&["backup", "--repo", &archive.url, "--cluster", "c", "--name", "base2"], &env2).ok();
        fork.sql("postgres", "INSERT INTO pitr SELECT g, 'after base2' FROM generate_series(200, 203) g");
        fork.switch_and_wait_archived(Duration::from_secs(60)).unwrap();
        fork.stop();
        let inherited = work.path().join("inherited");
        let mut again = restore(
            &archive,
            &src,
            &inherited,
            &["--name", "base2", "--recovery-target", "latest", "--recovery-target-timeline", "latest"],
            NO_ARCHIVE,
        );
        assert_eq!(count(&again), "21", "commits after the inherited recovery target were dropped");
        let auto = std::fs::read_to_string(inherited.join("postgresql.auto.conf")).unwrap();
        assert!(auto.contains("# disabled by cloud-dump restore: recovery_target_time"), "{auto}");
        again.stop();
    }
}

#[test]
fn pitr_pg15_file_with_timelines() {
    scenario(15, file_archive(), true);
}

#[test]
fn pitr_pg17_s3() {
    scenario(17, s3_archive(), false);
}

/// Archiving into a file:// archive (cluster `c`), backup `b`, then `n` rows each in its own
/// archived segment. Returns the archive, the binary PostgreSQL runs, the segment names.
fn archived_segments(src: &mut PgServer, n: usize) -> (Archive, std::path::PathBuf, Vec<String>) {
    let archive = file_archive();
    let exe = cloud_dump_testkit::public_copy(&bin());
    src.reconfigure(&format!(
        "archive_mode = on\narchive_command = '{} wal-push %p %f --repo {} --cluster c --compression none'",
        exe.display(),
        archive.url
    ))
    .unwrap();
    let env = vec![("CLOUD_DUMP_DB_URL".to_string(), src.repl_url())];
    cloud_dump(&["backup", "--repo", &archive.url, "--cluster", "c", "--name", "b"], &env).ok();
    src.sql("postgres", "CREATE TABLE pitr(id int)");
    let segs = (0..n)
        .map(|i| {
            src.sql("postgres", &format!("INSERT INTO pitr VALUES ({i})"));
            src.switch_and_wait_archived(Duration::from_secs(60)).unwrap()
        })
        .collect();
    (archive, exe, segs)
}

#[test]
fn pitr_refusals_and_a_hole_in_the_archive() {
    let mut src = pg(15);
    let (archive, exe, segs) = archived_segments(&mut src, 3);
    let work = scratch_dir("pitr-bad");
    let pgdata = work.path().join("d");
    let base = ["restore", "--repo", &archive.url, "--cluster", "c", "--pgdata", pgdata.to_str().unwrap()];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        cloud_dump(&a, &[])
    };
    with(&["--recovery-target-time", "next tuesday"]).fails_with("recovery-target-time");
    with(&["--recovery-target-lsn", "banana"]).fails_with("invalid LSN");
    with(&["--name", "b", "--recovery-target-lsn", "0/1"]).fails_with("before the end of backup");
    with(&["--name", "b", "--recovery-target-time", "2001-01-01 00:00:00 UTC"]).fails_with("before backup b completed");
    with(&["--recovery-target-time", "2001-01-01 00:00:00 UTC"]).fails_with("no backup");
    with(&["--name", "b", "--recovery-target-lsn", "FF/0"]).fails_with("after the newest archived WAL");
    with(&["--name", "b", "--recovery-target-time", "2999-01-01 00:00:00 UTC"])
        .fails_with("after the newest archived WAL");
    assert!(!pgdata.exists(), "a refused restore wrote something");
    let dry = with(&["--recovery-target", "latest", "--dry-run"]).ok();
    assert!(dry.stdout.contains("replay WAL from"), "{}", dry.stdout);

    // Remove a segment in the middle: recovery must stop with an error, never promote.
    let middle = archive._dir.as_ref().unwrap().path().join("c/wal_archive").join(&segs[1]);
    std::fs::remove_file(&middle).unwrap();
    restore_latest_never_promotes(&exe, &archive, &src, &pgdata);
}

/// A cluster made with 64 MiB WAL segments: the restore's checks, hole detection and
/// prefetch take the segment size from the cluster, not a 16 MiB constant.
#[test]
fn pitr_with_64_mib_wal_segments_and_a_two_segment_hole() {
    let mut src =
        PgServer::start_with_initdb(15, &["--wal-segsize", "64"]).expect("PostgreSQL 15 with 64 MiB segments");
    assert_eq!(src.sql("postgres", "SHOW wal_segment_size"), "64MB");
    let (archive, exe, mut segs) = archived_segments(&mut src, 4);
    let lsn = src.sql("postgres", "SELECT pg_current_wal_insert_lsn()");
    src.sql("postgres", "INSERT INTO pitr VALUES (99)");
    segs.push(src.switch_and_wait_archived(Duration::from_secs(60)).unwrap());
    // (synchronous_commit is off here: wait until the segment holding the target is archived.)
    let need = src.sql("postgres", &format!("SELECT pg_walfile_name('{lsn}')"));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while src.sql("postgres", "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver") < need {
        assert!(std::time::Instant::now() < deadline, "{need} was not archived");
        std::thread::sleep(Duration::from_millis(100));
    }
    let work = scratch_dir("pitr-64");
    // An LSN target inside the archive passes the restore's check (with 16 MiB arithmetic
    // it would name a segment that does not exist and be refused as "after the newest").
    let mut at_lsn = restore(&archive, &src, &work.path().join("lsn"), &["--recovery-target-lsn", &lsn], NO_ARCHIVE);
    assert_eq!(count(&at_lsn), "4");
    at_lsn.stop();
    let mut latest = restore(&archive, &src, &work.path().join("latest"), &["--recovery-target", "latest"], NO_ARCHIVE);
    assert_eq!(count(&latest), "5");
    latest.stop();
    // Two consecutive segments missing: a hole (not the end of the archive), fatal.
    let wal = archive._dir.as_ref().unwrap().path().join("c/wal_archive");
    let mut archived: Vec<String> = std::fs::read_dir(&wal)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24)
        .collect();
    archived.sort();
    assert!(archived.len() >= 4, "{archived:?} ({segs:?})");
    let holed = &archived[archived.len() - 3..archived.len() - 1];
    for s in holed {
        std::fs::remove_file(wal.join(s)).unwrap();
    }
    let dest = work.path().join("RECOVERYXLOG");
    let r = cloud_dump(
        &["wal-fetch", &holed[0], dest.to_str().unwrap(), "--repo", &archive.url, "--cluster", "c", "--prefetch", "0"],
        &[],
    );
    assert!(r.code > 125 && r.stderr.contains("hole"), "exit {}: {}", r.code, r.stderr);
    restore_latest_never_promotes(&exe, &archive, &src, &work.path().join("holed"));
}

/// Restores to `latest` over an archive with a hole: PostgreSQL must stop on wal-fetch's
/// fatal exit, never promote.
fn restore_latest_never_promotes(exe: &std::path::Path, archive: &Archive, src: &PgServer, pgdata: &std::path::Path) {
    let out = std::process::Command::new(exe)
        .args(["restore", "--repo", &archive.url, "--cluster", "c", "--pgdata", pgdata.to_str().unwrap()])
        .args(["--recovery-target", "latest", "--progress", "none"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    give_to_postgres(pgdata);
    match PgServer::start_existing_with(&src.bin, pgdata, NO_ARCHIVE) {
        Ok(s) => {
            assert!(s.wait_promoted(Duration::from_secs(20)).is_err(), "promoted past a hole in the archive");
            assert!(s.log_text().contains("hole"), "{}", s.log_text());
        }
        Err(e) => assert!(e.contains("hole"), "the server log should name the hole: {e}"),
    }
}
