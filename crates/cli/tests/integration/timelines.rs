//! Timelines on real PostgreSQL: a point-in-time "undo" (the dead branch must not win), a
//! restore test that kept archive_command (latest is ambiguous), a missing history file and
//! a hole before a switch (holes, not the end), forged manifests (they steer nothing), and
//! restores cut short (they never start). Each answer is compared with the rows each branch
//! committed.

use std::path::Path;
use std::time::Duration;

use super::common::*;
use super::pitr::{file_archive, restore, Archive, NO_ARCHIVE};

fn rows(s: &PgServer, phase: &str) -> String {
    s.sql("postgres", &format!("SELECT count(*) FROM t WHERE phase = '{phase}'"))
}

fn all(s: &PgServer) -> String {
    s.sql("postgres", "SELECT count(*) FROM t")
}

fn archiving(src: &mut PgServer, a: &Archive) {
    let exe = cloud_dump_testkit::public_copy(&bin());
    src.reconfigure(&format!(
        "archive_mode = on\narchive_command = '{}{} wal-push %p %f --repo {} --cluster c --log-level warn'",
        a.cmd_env,
        exe.display(),
        a.url
    ))
    .unwrap();
}

/// A PostgreSQL 15 server archiving into a new file:// archive, with the table `t`.
fn archiving_server() -> (Archive, PgServer) {
    let a = file_archive();
    let mut src = pg(15);
    archiving(&mut src, &a);
    src.sql("postgres", "CREATE TABLE t(id int, phase text)");
    (a, src)
}

fn backup(a: &Archive, src: &PgServer, name: &str) {
    let mut env = a.env.clone();
    env.push(("CLOUD_DUMP_DB_URL".into(), src.repl_url()));
    cloud_dump(&["backup", "--repo", &a.url, "--cluster", "c", "--name", name], &env).ok();
}

fn repo_args<'a>(a: &'a Archive, rest: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--repo", a.url.as_str(), "--cluster", "c"];
    v.extend_from_slice(rest);
    v
}

fn wal_dir(a: &Archive) -> std::path::PathBuf {
    Path::new(a.url.strip_prefix("file://").unwrap()).join("c/wal_archive")
}

/// Moves every object of WAL file `name` (record and data) into `aside`.
fn hide(a: &Archive, name: &str, aside: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(wal_dir(a)).unwrap().flatten() {
        let f = e.file_name().to_string_lossy().into_owned();
        if f == name || f.starts_with(&format!("{name}.")) && !f[name.len()..].starts_with(".partial") {
            std::fs::rename(e.path(), aside.join(&f)).unwrap();
            n += 1;
        }
    }
    n
}

fn unhide(a: &Archive, aside: &Path) {
    for e in std::fs::read_dir(aside).unwrap().flatten() {
        std::fs::rename(e.path(), wal_dir(a).join(e.file_name())).unwrap();
    }
}

fn info(a: &Archive) -> serde_json::Value {
    serde_json::from_str(&cloud_dump(&repo_args(a, &["info", "--json"]), &[]).ok().stdout).unwrap()
}

fn wal_fetch(a: &Archive, name: &str, dest: &Path) -> Run {
    let mut args = vec!["wal-fetch", name, dest.to_str().unwrap()];
    args.extend(repo_args(a, &[]));
    cloud_dump(&args, &[])
}

/// b1, more rows, an accident (a DELETE), b2 holding the damage, the old primary gone;
/// restore b1 to before the accident, promote (timeline 2) and archive into the same
/// repository. Then: latest follows timeline 2 from b1; info, verify and expire agree; a
/// missing history file and a hole before the switch are holes, never the end.
#[test]
fn a_point_in_time_undo_the_dead_branch_never_wins() {
    let (a, mut src) = archiving_server();
    src.sql("postgres", "INSERT INTO t SELECT g, 'good' FROM generate_series(1, 1000) g");
    backup(&a, &src, "b1");
    src.sql("postgres", "INSERT INTO t SELECT g, 'good' FROM generate_series(1001, 1500) g");
    src.switch_and_wait_archived(Duration::from_secs(60)).unwrap();
    let before_accident = src.sql("postgres", "SELECT pg_current_wal_insert_lsn()");
    src.sql("postgres", "DELETE FROM t WHERE id <= 1000");
    backup(&a, &src, "b2");
    src.sql("postgres", "INSERT INTO t SELECT g, 'after b2' FROM generate_series(1, 10) g");
    src.switch_and_wait_archived(Duration::from_secs(60)).unwrap();
    src.stop();

    let work = scratch_dir("timelines-undo");
    let mut undo =
        restore(&a, &src, &work.path().join("undo"), &["--name", "b1", "--recovery-target-lsn", &before_accident], "");
    assert_eq!(all(&undo), "1500");
    assert_eq!(undo.sql("postgres", "SELECT timeline_id FROM pg_control_checkpoint()"), "2");
    undo.sql("postgres", "INSERT INTO t SELECT g, 'timeline 2' FROM generate_series(1, 300) g");
    // A time after the last commit, before the last segment's arrival.
    std::thread::sleep(Duration::from_millis(1500));
    let after_last_commit =
        undo.sql("postgres", "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || ' UTC'");
    std::thread::sleep(Duration::from_millis(500));
    undo.switch_and_wait_archived(Duration::from_secs(60)).unwrap();

    // latest without --name: b1 (b2 lies on the dead branch), along timeline 2.
    let mut latest = restore(&a, &undo, &work.path().join("latest"), &["--recovery-target", "latest"], NO_ARCHIVE);
    assert_eq!(
        (all(&latest), rows(&latest, "timeline 2"), rows(&latest, "after b2")),
        ("1800".into(), "300".into(), "0".into())
    );
    latest.stop();
    // info's window follows timeline 2 from b1; verify checks that path.
    let i = info(&a);
    assert_eq!(i["recovery_timeline"], 2, "{i}");
    let b1_stop = i["backups"].as_array().unwrap().iter().find(|b| b["name"] == "b1").unwrap()["stop_time"].clone();
    assert_eq!(i["recovery_window"][0], b1_stop, "{i}");
    assert_eq!(i["recovery_window_end"], "last commit", "{i}");
    cloud_dump(&repo_args(&a, &["verify", "--all", "--wal"]), &[]).ok();
    // A time past the last commit is refused before anything is written (PostgreSQL would
    // end recovery before reaching it).
    let past = work.path().join("past");
    cloud_dump(
        &repo_args(&a, &["restore", "--recovery-target-time", &after_last_commit, "--pgdata", past.to_str().unwrap()]),
        &[],
    )
    .fails_with("after the last commit");
    assert!(!past.exists());
    // expire keeps the backup that restores the live data.
    let r = cloud_dump(&["expire", "--repo", &a.url, "--cluster", "c", "--retain-full", "1"], &[]).ok();
    let listed = cloud_dump(&["list", "--repo", &a.url, "--cluster", "c"], &[]).ok().stdout;
    assert!(listed.contains("b1"), "expire deleted b1:\n{}\n{listed}", r.stdout);
    // b2 lies on the dead branch: not counted (b1 is "the newest"), kept only while newer
    // than the oldest backup kept on the live line.
    assert!(r.stdout.contains("backup b1: the newest backup"), "{}", r.stdout);
    assert!(r.stdout.contains("no live timeline continues"), "{}", r.stdout);
    let mut again = restore(&a, &undo, &work.path().join("again"), &["--recovery-target", "latest"], NO_ARCHIVE);
    assert_eq!(all(&again), "1800", "after expire");
    again.stop();
    let hist = work.path().join("history");
    wal_fetch(&a, "00000002.history", &hist).ok();
    let switch: cloud_dump_postgres::Lsn =
        std::fs::read_to_string(&hist).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    undo.stop();

    // A missing history file: every command sees the hole.
    let aside = scratch_dir("timelines-aside");
    assert!(hide(&a, "00000002.history", aside.path()) >= 1);
    let v = cloud_dump(&repo_args(&a, &["verify", "--all", "--wal"]), &[]);
    assert_ne!(v.code, 0, "verify --wal passed without 00000002.history:\n{}", v.stdout);
    assert!(format!("{}{}", v.stdout, v.stderr).contains("00000002.history"), "{}", v.stdout);
    let i = info(&a);
    assert!(i["recovery_window"].is_null(), "{i}");
    assert!(i["recovery_window_problem"].as_str().unwrap_or("").contains("00000002.history"), "{i}");
    assert_eq!(wal_fetch(&a, "00000002.history", &work.path().join("h2")).code, 126);
    let target = work.path().join("refused");
    cloud_dump(&repo_args(&a, &["restore", "--recovery-target", "latest", "--pgdata", target.to_str().unwrap()]), &[])
        .fails_with("00000002.history");
    assert!(!target.exists(), "a refused restore wrote {}", target.display());
    unhide(&a, aside.path());

    // A hole before the switch: the last segment timeline 1 is needed for.
    let seg = 16u64 << 20;
    let before = cloud_dump_postgres::timeline::segment_name(1, switch.0 / seg - 1, seg);
    assert!(hide(&a, &before, aside.path()) >= 1, "{before} not archived");
    assert_eq!(wal_fetch(&a, &before, &work.path().join("s")).code, 126, "{before}: a hole, not the end");
    cloud_dump(&repo_args(&a, &["restore", "--recovery-target", "latest", "--pgdata", target.to_str().unwrap()]), &[])
        .fails_with(&before);
    let v = cloud_dump(&repo_args(&a, &["verify", "--all", "--wal"]), &[]);
    assert_ne!(v.code, 0, "verify --wal passed with {before} missing:\n{}", v.stdout);
    unhide(&a, aside.path());
}

/// A restore test kept archive_command: it promoted (timeline 2), archived 10 rows and was
/// thrown away, while production went on on timeline 1. latest is ambiguous and refused
/// (naming both branches); an explicit timeline restores production; `--archive-mode off`
/// starts a copy that archives nothing, and restore says so.
#[test]
fn a_restore_test_that_kept_archiving_never_hijacks_latest() {
    let (a, mut src) = archiving_server();
    src.sql("postgres", "INSERT INTO t SELECT g, 'prod' FROM generate_series(1, 100) g");
    backup(&a, &src, "b1");
    src.sql("postgres", "INSERT INTO t SELECT g, 'prod' FROM generate_series(101, 200) g");
    src.switch_and_wait_archived(Duration::from_secs(60)).unwrap();
    let work = scratch_dir("timelines-test-branch");
    let mut test = restore(&a, &src, &work.path().join("test"), &["--name", "b1", "--recovery-target", "latest"], "");
    test.sql("postgres", "INSERT INTO t SELECT g, 'test' FROM generate_series(1, 10) g");
    test.switch_and_wait_archived(Duration::from_secs(60)).unwrap();
    test.stop();
    src.sql("postgres", "INSERT INTO t SELECT g, 'prod' FROM generate_series(201, 500) g");
    src.switch_and_wait_archived(Duration::from_secs(60)).unwrap();

    let refused = work.path().join("refused");
    let r = cloud_dump(
        &repo_args(&a, &["restore", "--recovery-target", "latest", "--pgdata", refused.to_str().unwrap()]),
        &[],
    )
    .fails_with("ambiguous");
    assert!(r.stderr.contains("timeline 1") && r.stderr.contains("timeline 2"), "{}", r.stderr);
    assert!(!refused.exists());
    let mut prod = restore(
        &a,
        &src,
        &work.path().join("prod"),
        &["--recovery-target", "latest", "--recovery-target-timeline", "1", "--archive-mode", "off"],
        "",
    );
    assert_eq!((all(&prod), rows(&prod, "test")), ("500".into(), "0".into()));
    let auto = std::fs::read_to_string(work.path().join("prod/postgresql.auto.conf")).unwrap();
    assert!(auto.contains("archive_mode = 'off'"), "{auto}");
    assert_eq!(prod.sql("postgres", "SHOW archive_mode"), "off");
    prod.stop();
    // The last line says whether the copy archives.
    let dry = work.path().join("timeline-2");
    let d = cloud_dump(
        &repo_args(
            &a,
            &[
                "restore",
                "--recovery-target",
                "latest",
                "--recovery-target-timeline",
                "2",
                "--pgdata",
                dry.to_str().unwrap(),
            ],
        ),
        &[],
    )
    .ok();
    assert!(d.stdout.trim_end().lines().last().unwrap().contains("archiving: on"), "{}", d.stdout);
    // verify notes the branches, and finds no hole.
    let v = cloud_dump(&repo_args(&a, &["verify", "--all", "--wal"]), &[]).ok();
    assert!(v.stdout.contains("ambiguous"), "{}", v.stdout);
    src.stop();
}

/// Two forged manifests (copies of a real one, stop time 2099, no objects behind them)
/// never take the place of the real backups, and expire cuts no WAL for them.
#[test]
fn forged_manifests_do_not_steer_expire() {
    let (a, mut src) = archiving_server();
    backup(&a, &src, "b1");
    src.sql("postgres", "INSERT INTO t SELECT g, 'x' FROM generate_series(1, 100) g");
    backup(&a, &src, "b2");
    src.sql("postgres", "INSERT INTO t SELECT g, 'y' FROM generate_series(1, 100) g");
    src.switch_and_wait_archived(Duration::from_secs(60)).unwrap();
    let root = Path::new(a.url.strip_prefix("file://").unwrap()).join("c/backup");
    let real: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("b2/manifest.json")).unwrap()).unwrap();
    for f in ["f1", "f2"] {
        let mut m = real.clone();
        m["name"] = serde_json::json!(f);
        m["stop_time"] = serde_json::json!("2099-01-01T00:00:00Z");
        std::fs::create_dir_all(root.join(f)).unwrap();
        std::fs::write(root.join(f).join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    }
    let files = |a: &Archive| -> std::collections::BTreeSet<String> {
        std::fs::read_dir(wal_dir(a)).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
    };
    let before = files(&a);
    let i = info(&a);
    let b1 = i["backups"].as_array().unwrap().iter().find(|b| b["name"] == "b1").unwrap();
    let start: cloud_dump_postgres::Lsn = b1["start_lsn"].as_str().unwrap().parse().unwrap();
    let first = cloud_dump_postgres::timeline::segment_name(1, start.0 / (16 << 20), 16 << 20);
    let r = cloud_dump(&["expire", "--repo", &a.url, "--cluster", "c", "--retain-full", "2"], &[]).ok();
    let listed = cloud_dump(&["list", "--repo", &a.url, "--cluster", "c"], &[]).ok().stdout;
    assert!(listed.contains("b1") && listed.contains("b2"), "a real backup was deleted:\n{}\n{listed}", r.stdout);
    assert!(r.stdout.contains("not counted"), "{}", r.stdout);
    // WAL from b1's start on stays.
    let after = files(&a);
    for f in before.iter().filter(|f| f.len() >= 24 && f[..24] >= *first.as_str()) {
        assert!(after.contains(f), "{f} deleted:\n{}", r.stdout);
    }
    let work = scratch_dir("timelines-forged");
    let mut back =
        restore(&a, &src, &work.path().join("b1"), &["--name", "b1", "--recovery-target", "latest"], NO_ARCHIVE);
    assert_eq!(all(&back), "200");
    back.stop();
    src.stop();
}

/// A restore killed (kill -9) at seeded moments, or stopped by SIGHUP (a dropped SSH
/// session), leaves a directory PostgreSQL refuses to start: the control file is put in
/// place last, after the recovery settings are durable.
#[test]
fn restores_cut_short_never_start() {
    let a = file_archive();
    let mut src = pg(15);
    archiving(&mut src, &a);
    seed(&src);
    src.sql("postgres", "CREATE TABLE t(id int, phase text)");
    backup(&a, &src, "b1");
    src.switch_and_wait_archived(Duration::from_secs(60)).unwrap();
    let work = scratch_dir("timelines-cut-short");
    let exe = bin();
    let mut started_extracting = 0;
    // Each signal comes a seeded moment after the restore wrote its first file.
    for (round, (delay_ms, sig)) in [(0u64, "KILL"), (150, "KILL"), (400, "KILL"), (100, "HUP")].iter().enumerate() {
        let dir = work.path().join(format!("r{round}"));
        let mut c = std::process::Command::new(&exe);
        c.args(["restore", "--repo", &a.url, "--cluster", "c", "--name", "b1", "--recovery-target", "latest"])
            .args(["--pgdata", dir.to_str().unwrap(), "--progress", "none"])
            .env("CLOUD_DUMP_FAULTS", "seed=1,rate=1,kinds=stall,ops=get,stall-ms=300")
            .env("CLOUD_DUMP_PARALLEL", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0) == 0
            && child.try_wait().unwrap().is_none()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(*delay_ms));
        // Signal only a child not yet reaped: a reaped one's PID may belong to another
        // test's process by now.
        if child.try_wait().unwrap().is_none() {
            let pid = child.id().to_string();
            let _ = std::process::Command::new("kill").args([&format!("-{sig}"), &pid]).status();
        }
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            continue; // finished before the signal: a complete restore
        }
        started_extracting += 1;
        assert!(!dir.join("global/pg_control").exists(), "round {round}: a restore cut short left global/pg_control");
        if *sig == "HUP" {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("SIGHUP") && err.contains("will not start"), "{err}");
        }
        if dir.join("PG_VERSION").exists() {
            give_to_postgres(&dir);
            assert!(PgServer::start_existing(&src.bin, &dir).is_err(), "round {round}: a half restore started");
        }
    }
    assert!(started_extracting >= 2, "the signals came before the restores wrote anything ({started_extracting})");
    src.stop();
}

/// wal-fetch stops recovery (126) on usage errors; wal-push refuses a passphrase without
/// --encrypt and a history file of another database system.
#[test]
fn wal_commands_refuse_what_would_lie() {
    let a = file_archive();
    let work = scratch_dir("timelines-wal");
    let dest = work.path().join("x");
    let mut args = vec!["wal-fetch", "000000010000000000000001", dest.to_str().unwrap(), "--no-such-flag"];
    args.extend(repo_args(&a, &[]));
    let r = cloud_dump(&args, &[]);
    assert_eq!(r.code, 126, "{}", r.stderr);
    let r = cloud_dump(
        &["wal-fetch", "000000010000000000000001", dest.to_str().unwrap(), "--repo", &a.url],
        &[("CLOUD_DUMP_LOG_LEVEL".into(), "warning".into())],
    );
    assert_eq!(r.code, 126, "{}", r.stderr);

    let seg = work.path().join("000000010000000000000042");
    std::fs::write(&seg, vec![7u8; 1 << 20]).unwrap();
    cloud_dump(
        &[
            "wal-push",
            seg.to_str().unwrap(),
            "000000010000000000000042",
            "--repo",
            &a.url,
            "--cluster",
            "c",
            "--passphrase",
            "pw",
        ],
        &[],
    )
    .fails_with("without --encrypt");
    assert_eq!(std::fs::read_dir(wal_dir(&a)).unwrap().count(), 0, "something was archived");

    // Two clusters: the archive belongs to the first; the second's history file is refused.
    let mut one = pg(15);
    archiving(&mut one, &a);
    one.sql("postgres", "CREATE TABLE t(id int)");
    one.switch_and_wait_archived(Duration::from_secs(60)).unwrap();
    let other = pg(15);
    // wal-push of a history file from a data directory, as archive_command runs it.
    let push_history = |data: &Path| {
        std::fs::write(data.join("pg_wal/00000002.history"), "1\t0/3000000\tno recovery target specified\n").unwrap();
        std::process::Command::new(bin())
            .current_dir(data)
            .args(["wal-push", "pg_wal/00000002.history", "00000002.history", "--repo", &a.url, "--cluster", "c"])
            .output()
            .unwrap()
    };
    let out = push_history(&other.data);
    assert!(!out.status.success(), "a foreign history file was archived");
    assert!(String::from_utf8_lossy(&out.stderr).contains("system"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!wal_dir(&a).join("00000002.history.sum").exists());
    // The archive's own cluster archives its history file.
    let out = push_history(&one.data);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    one.stop();
}

/// Lifecycle commands that judge backups by the store's facts, not by what a writer says:
/// a keep mark from a host whose clock is a day ahead still keeps (marks are ordered by the
/// store's time); a cluster's tree beside a flat layout is never "an abandoned backup"; a
/// dry run refuses a wrong passphrase as the real restore does.
#[test]
fn marks_layouts_and_dry_runs_judged_by_the_store() {
    let (a, mut src) = archiving_server();
    backup(&a, &src, "b1");
    backup(&a, &src, "b2");
    src.switch_and_wait_archived(Duration::from_secs(60)).unwrap();
    // keep from a host 25 hours ahead.
    let out = std::process::Command::new("faketime")
        .args(["-f", "+25h"])
        .arg(bin())
        .args(["keep", "--repo", &a.url, "--cluster", "c", "--name", "b1"])
        .output()
        .expect("faketime (scripts/test installs it)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = cloud_dump(&["expire", "--repo", &a.url, "--cluster", "c", "--retain-full", "1"], &[]).ok();
    let listed = cloud_dump(&["list", "--repo", &a.url, "--cluster", "c"], &[]).ok().stdout;
    assert!(listed.contains("b1"), "the kept backup was deleted:\n{}", r.stdout);

    // The repository root read as a flat layout: the cluster's folder is no backup.
    let r = cloud_dump(&["expire", "--repo", &a.url, "--retain-full", "1", "--dry-run"], &[]).ok();
    assert!(!r.stdout.contains("delete --name c"), "{}", r.stdout);
    cloud_dump(&["delete", "--repo", &a.url, "--name", "c", "--abandoned"], &[]).fails_with("not found");
    let listed = cloud_dump(&["list", "--repo", &a.url, "--cluster", "c"], &[]).ok().stdout;
    assert!(listed.contains("b1") && listed.contains("b2"), "{listed}");
    assert!(wal_dir(&a).read_dir().unwrap().count() > 0, "the WAL archive was deleted");

    // A dry run checks the keys the real run would use.
    let enc = scratch_dir("timelines-enc");
    let url = file_url(enc.path());
    let env = vec![
        ("CLOUD_DUMP_DB_URL".to_owned(), src.repl_url()),
        ("CLOUD_DUMP_ENCRYPT".to_owned(), "true".to_owned()),
        ("CLOUD_DUMP_PASSPHRASE".to_owned(), "right".to_owned()),
    ];
    cloud_dump(&["backup", "--repo", &url, "--name", "e1"], &env).ok();
    let target = scratch_dir("timelines-dry").path().join("x");
    cloud_dump(
        &["restore", "--repo", &url, "--name", "e1", "--pgdata", target.to_str().unwrap(), "--dry-run"],
        &[("CLOUD_DUMP_PASSPHRASE".to_owned(), "wrong".to_owned())],
    )
    .fails_with("passphrase");
    let ok = cloud_dump(
        &["restore", "--repo", &url, "--name", "e1", "--pgdata", target.to_str().unwrap(), "--dry-run"],
        &[("CLOUD_DUMP_PASSPHRASE".to_owned(), "right".to_owned())],
    )
    .ok();
    assert!(ok.stdout.contains("keys and settings checked"), "{}", ok.stdout);
    assert!(!target.exists());
    src.stop();
}

/// Restores to seeded random points on every branch of a history with a point-in-time
/// "undo": each answer is compared with the rows that branch had committed at that point.
#[test]
fn drill_random_points_on_every_branch() {
    let (a, mut src) = archiving_server();
    backup(&a, &src, "b1");
    // Batches on timeline 1, each noted as (LSN after it, rows then).
    let batches = |s: &PgServer, tag: &str, n: usize| -> Vec<(String, String)> {
        (0..n)
            .map(|i| {
                s.sql(
                    "postgres",
                    &format!("INSERT INTO t SELECT g, '{tag}{i}' FROM generate_series(1, {}) g", 50 + i * 7),
                );
                (s.sql("postgres", "SELECT pg_current_wal_insert_lsn()"), all(s))
            })
            .collect()
    };
    let tl1 = batches(&src, "one", 5);
    src.switch_and_wait_archived(Duration::from_secs(60)).unwrap();
    src.stop();
    let work = scratch_dir("timelines-random");
    // The undo: back to the third batch, then more on timeline 2.
    let mut undo =
        restore(&a, &src, &work.path().join("undo"), &["--name", "b1", "--recovery-target-lsn", &tl1[2].0], "");
    assert_eq!(all(&undo), tl1[2].1);
    let tl2 = batches(&undo, "two", 4);
    undo.switch_and_wait_archived(Duration::from_secs(60)).unwrap();
    undo.stop();
    let mut seed: u64 = 0x5eed_7111;
    let mut pick = |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let mut checked = 0;
    for (tli, points) in [("1", &tl1), ("2", &tl2)] {
        for round in 0..2 {
            let (lsn, want) = &points[pick(points.len())];
            let dir = work.path().join(format!("tl{tli}-{round}"));
            let mut r = restore(
                &a,
                &undo,
                &dir,
                &["--recovery-target-lsn", lsn, "--recovery-target-timeline", tli, "--archive-mode", "off"],
                NO_ARCHIVE,
            );
            assert_eq!(&all(&r), want, "timeline {tli} at {lsn}");
            r.stop();
            checked += 1;
        }
    }
    let mut latest = restore(&a, &undo, &work.path().join("latest"), &["--recovery-target", "latest"], NO_ARCHIVE);
    assert_eq!(all(&latest), tl2[3].1);
    latest.stop();
    println!("drill random points on every branch: {checked}/4 restores matched");
}

/// On a passphrase-encrypted repository the manifest and the keep/release marks carry a MAC
/// under the backup's own key: with the passphrase, expire ignores a planted release mark
/// (the kept backup stays) and does not count a forged manifest (a copy of a real backup's
/// folder, objects included, with a newer stop time).
#[test]
fn planted_marks_and_manifests_fail_their_mac() {
    let (a, mut src) = archiving_server();
    let pass = ("CLOUD_DUMP_PASSPHRASE".to_owned(), "mac me".to_owned());
    for name in ["e1", "e2", "e3"] {
        let env = vec![
            ("CLOUD_DUMP_DB_URL".to_owned(), src.repl_url()),
            ("CLOUD_DUMP_ENCRYPT".to_owned(), "true".to_owned()),
            pass.clone(),
        ];
        cloud_dump(&["backup", "--repo", &a.url, "--cluster", "c", "--name", name], &env).ok();
        src.sql("postgres", "INSERT INTO t SELECT g, 'x' FROM generate_series(1, 10) g");
    }
    src.switch_and_wait_archived(Duration::from_secs(60)).unwrap();
    cloud_dump(&["keep", "--repo", &a.url, "--cluster", "c", "--name", "e1"], std::slice::from_ref(&pass)).ok();
    let root = Path::new(a.url.strip_prefix("file://").unwrap()).join("c/backup");
    // A planted release, newer than the keep, without a MAC.
    let stamp = cloud_dump_postgres::now_us() + 1_000_000;
    std::fs::write(root.join("e1").join(format!("release-{stamp:020}")), "release\n").unwrap();
    // A forged copy of e3, objects and all, claiming to be newer.
    std::fs::create_dir_all(root.join("f1")).unwrap();
    for e in std::fs::read_dir(root.join("e3")).unwrap().flatten() {
        std::fs::copy(e.path(), root.join("f1").join(e.file_name())).unwrap();
    }
    let mpath = root.join("f1/manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    m["name"] = serde_json::json!("f1");
    std::fs::write(&mpath, serde_json::to_vec(&m).unwrap()).unwrap();
    let r =
        cloud_dump(&["expire", "--repo", &a.url, "--cluster", "c", "--retain-full", "1"], std::slice::from_ref(&pass))
            .ok();
    assert!(r.stdout.contains("MAC does not verify"), "{}", r.stdout);
    let listed = cloud_dump(&["list", "--repo", &a.url, "--cluster", "c"], &[]).ok().stdout;
    assert!(listed.contains("e1"), "the kept backup was deleted by a planted release:\n{}\n{listed}", r.stdout);
    assert!(listed.contains("e3"), "the newest real backup was deleted:\n{}\n{listed}", r.stdout);
    assert!(!listed.contains("e2"), "e2 should have expired:\n{}\n{listed}", r.stdout);
    src.stop();
}
