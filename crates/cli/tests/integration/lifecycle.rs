//! The repository's lifecycle on a live, archiving cluster: keep marks, expire (dry run and
//! real, with a backup and wal-push running meanwhile), delete, info, and WAL of another
//! database system refused. Every backup expire keeps still restores to the latest commit.

use std::path::Path;
use std::time::Duration;

use super::common::*;

fn restore_latest(url: &str, name: &str, src: &PgServer, pgdata: &Path) -> PgServer {
    let exe = cloud_dump_testkit::public_copy(&bin());
    let out = std::process::Command::new(&exe)
        .args(["restore", "--repo", url, "--cluster", "c", "--name", name, "--pgdata", pgdata.to_str().unwrap()])
        .args(["--recovery-target", "latest"])
        .env("CLOUD_DUMP_PROGRESS", "none")
        .env_remove("CLOUD_DUMP_REPO")
        .env_remove("CLOUD_DUMP_CLUSTER")
        .output()
        .unwrap();
    assert!(out.status.success(), "restore {name}: {}", String::from_utf8_lossy(&out.stderr));
    give_to_postgres(pgdata);
    let s = PgServer::start_existing_with(&src.bin, pgdata, "archive_mode = off").unwrap();
    s.wait_promoted(Duration::from_secs(120)).unwrap();
    s
}

/// A PostgreSQL 15 server archiving (cloud-dump wal-push, cluster c) into a fresh file://
/// repository; the binary copy its archive_command runs.
fn archiving_cluster(tag: &str) -> (PgServer, tempfile::TempDir, String, std::path::PathBuf) {
    let mut src = pg(15);
    let dir = scratch_dir(tag);
    std::fs::create_dir_all(dir.path().join("c/wal_archive")).unwrap();
    std::fs::write(dir.path().join(cloud_dump_storage::REPOSITORY_MARKER), "x").unwrap();
    give_to_postgres(dir.path());
    let url = file_url(dir.path());
    let exe = cloud_dump_testkit::public_copy(&bin());
    src.reconfigure(&format!(
        "archive_mode = on\narchive_command = '{} wal-push %p %f --repo {url} --cluster c --log-level warn'",
        exe.display()
    ))
    .unwrap();
    (src, dir, url, exe)
}

fn names(url: &str) -> Vec<String> {
    let r = cloud_dump(&["list", "--repo", url, "--cluster", "c", "--json"], &[]).ok();
    let v: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    let mut n: Vec<String> = v.iter().map(|m| m["name"].as_str().unwrap().to_owned()).collect();
    n.sort();
    n
}

#[test]
fn lifecycle_keep_expire_delete_info() {
    let (src, dir, url, _exe) = archiving_cluster("lifecycle-repo");
    let env = vec![("CLOUD_DUMP_DB_URL".to_owned(), src.repl_url())];
    src.sql("postgres", "CREATE TABLE t(id serial PRIMARY KEY, pad text)");
    let backup = |name: &str, extra: &[&str]| {
        src.sql("postgres", "INSERT INTO t(pad) SELECT repeat('x', 100) FROM generate_series(1, 1000)");
        let mut a = vec!["backup", "--repo", &url, "--cluster", "c", "--name", name];
        a.extend_from_slice(extra);
        cloud_dump(&a, &env).ok();
        src.switch_and_wait_archived(Duration::from_secs(60)).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    };
    backup("b1", &[]);
    backup("b2", &["--keep"]);
    backup("b3", &[]);
    backup("b4", &[]);
    cloud_dump(&["keep", "--repo", &url, "--cluster", "c", "--name", "b1"], &[]).ok();
    cloud_dump(&["keep", "--repo", &url, "--cluster", "c", "--name", "nope"], &[])
        .fails_with("backup \"nope\" not found");

    // info: four backups, one timeline without holes, a recovery window from b1's end.
    let r = cloud_dump(&["info", "--repo", &url, "--cluster", "c", "--json"], &[]).ok();
    let i: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(i["backups"].as_array().unwrap().len(), 4);
    assert_eq!(i["backups"][0]["name"], "b4");
    assert_eq!(i["backups"][2]["kept"], true);
    assert_eq!(i["timelines"][0]["holes"], 0, "{}", r.stdout);
    let b1_stop = i["backups"][3]["stop_time"].as_str().unwrap().to_owned();
    assert_eq!(i["recovery_window"][0].as_str(), Some(b1_stop.as_str()), "{}", r.stdout);
    assert!(i["newest_wal_age_seconds"].as_f64().unwrap() < 600.0);
    let prom = dir.path().join("cloud-dump.prom");
    cloud_dump(&["info", "--repo", &url, "--cluster", "c", &format!("--prometheus={}", prom.display())], &[]).ok();
    let text = std::fs::read_to_string(&prom).unwrap();
    assert!(text.contains("cloud_dump_backups{cluster=\"c\","), "{text}");
    assert!(text.contains("} 4\n"), "{text}");
    let r = cloud_dump(&["info", "--repo", &url, "--cluster", "c"], &[]).ok();
    assert!(r.stdout.contains("Recovery window: any point from"), "{}", r.stdout);

    // A dry run says why, and deletes nothing.
    let wal_before = std::fs::read_dir(dir.path().join("c/wal_archive")).unwrap().count();
    assert!(wal_before > 8, "{wal_before} WAL objects archived");
    let r = cloud_dump(&["expire", "--repo", &url, "--cluster", "c", "--retain-full", "1", "--dry-run"], &[]).ok();
    for line in [
        "kept backup b4: the newest backup",
        "would delete backup b3: older than the 1 newest",
        "kept backup b2: keep mark",
        "kept backup b1: keep mark",
        "dry run: nothing was deleted",
    ] {
        assert!(r.stdout.contains(line), "{line:?} missing:\n{}", r.stdout);
    }
    assert_eq!(names(&url), ["b1", "b2", "b3", "b4"]);
    assert_eq!(std::fs::read_dir(dir.path().join("c/wal_archive")).unwrap().count(), wal_before);
    cloud_dump(&["expire", "--repo", &url, "--cluster", "c"], &[]).fails_with("--retain-full N and/or --retain-days D");

    // Release b1, then expire for real while a backup runs (slowed down) and the server keeps
    // archiving: b1 and b3 go, with the WAL before b2's start; the running backup is left alone.
    cloud_dump(&["keep", "--repo", &url, "--cluster", "c", "--name", "b1", "--release"], &[]).ok();
    src.sql("postgres", "CREATE TABLE filler AS SELECT g, md5(g::text) AS h FROM generate_series(1, 200000) g");
    let mut running = std::process::Command::new(bin())
        .args(["backup", "--repo", &url, "--cluster", "c", "--name", "b5", "--max-rate", "4M", "--progress", "none"])
        .env("CLOUD_DUMP_DB_URL", src.repl_url())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    src.sql("postgres", "INSERT INTO t(pad) SELECT 'during' FROM generate_series(1, 100)");
    src.sql("postgres", "SELECT pg_switch_wal()");
    let r = cloud_dump(&["expire", "--repo", &url, "--cluster", "c", "--retain-full", "2"], &[]).ok();
    assert!(r.stdout.contains("deleting backup b1") && r.stdout.contains("left alone b5"), "{}", r.stdout);
    let status = running.wait().unwrap();
    assert!(status.success(), "the backup running during expire failed");
    assert_eq!(names(&url), ["b2", "b3", "b4", "b5"], "retain-full 2 counted before b5 existed: b3, b4 kept");
    src.sql("postgres", "INSERT INTO t(pad) SELECT 'after' FROM generate_series(1, 10)");
    src.switch_and_wait_archived(Duration::from_secs(60)).unwrap();
    let r = cloud_dump(&["expire", "--repo", &url, "--cluster", "c", "--retain-full", "2"], &[]).ok();
    assert!(r.stdout.contains("deleting backup b3"), "{}", r.stdout);
    assert_eq!(names(&url), ["b2", "b4", "b5"]);
    // The archive now begins exactly at b2's start segment (the oldest backup kept).
    let r = cloud_dump(&["list", "--repo", &url, "--cluster", "c", "--json"], &[]).ok();
    let v: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    let b2 = v.iter().find(|m| m["name"] == "b2").unwrap();
    let (hi, lo) = b2["start_lsn"].as_str().unwrap().split_once('/').unwrap();
    let (hi, lo) = (u64::from_str_radix(hi, 16).unwrap(), u64::from_str_radix(lo, 16).unwrap());
    let b2_start = format!("{:08X}{hi:08X}{:08X}", b2["timeline"].as_u64().unwrap(), lo / (16 << 20));
    let r = cloud_dump(&["info", "--repo", &url, "--cluster", "c", "--json"], &[]).ok();
    let i: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(i["timelines"][0]["first"].as_str(), Some(b2_start.as_str()), "{}", r.stdout);
    assert_eq!(i["timelines"][0]["holes"], 0);

    // Every backup kept still restores to the latest commit.
    let want = src.sql("postgres", "SELECT count(*) FROM t");
    let work = scratch_dir("lifecycle-restores");
    for name in ["b2", "b4", "b5"] {
        let mut r = restore_latest(&url, name, &src, &work.path().join(name));
        assert_eq!(r.sql("postgres", "SELECT count(*) FROM t"), want, "{name} to latest after expire");
        r.stop();
    }

    // delete: a kept backup is refused; released, it goes, manifest first.
    cloud_dump(&["delete", "--repo", &url, "--cluster", "c", "--name", "b2"], &[]).fails_with("has a keep mark");
    cloud_dump(&["keep", "--repo", &url, "--cluster", "c", "--name", "b2", "--release"], &[]).ok();
    cloud_dump(&["delete", "--repo", &url, "--cluster", "c", "--name", "b2"], &[]).ok();
    assert_eq!(names(&url), ["b4", "b5"]);
    assert!(!dir.path().join("c/backup/b2").exists());
    cloud_dump(&["delete", "--repo", &url, "--cluster", "c", "--name", "b2"], &[]).fails_with("not found");

    // A delete stopped before the manifest went (here every delete the store gets fails):
    // the mark alone deletes nothing, the backup stays whole and listed.
    let broken = vec![("CLOUD_DUMP_FAULTS".to_owned(), "seed=1,rate=1,kinds=error,ops=delete".to_owned())];
    cloud_dump(&["delete", "--repo", &url, "--cluster", "c", "--name", "b4"], &broken)
        .fails_with("cannot delete backup b4");
    assert_eq!(names(&url), ["b4", "b5"]);
    // A mark planted by someone who can only write (b5 is the newest): nothing changes.
    std::fs::write(dir.path().join("c/backup/b5/deleting-00000000000000000001"), "x").unwrap();
    let r = cloud_dump(&["expire", "--repo", &url, "--cluster", "c", "--retain-full", "5"], &[]).ok();
    assert!(!r.stdout.contains("deleting backup") && !r.stdout.contains("finishing"), "{}", r.stdout);
    assert_eq!(names(&url), ["b4", "b5"]);
    std::fs::remove_file(dir.path().join("c/backup/b5/deleting-00000000000000000001")).unwrap();
    // Cut short after the manifest went (kill -9 there): gone for list at once, and the next
    // expire finishes the delete.
    std::fs::remove_file(dir.path().join("c/backup/b4/manifest.json")).unwrap();
    assert_eq!(names(&url), ["b5"]);
    let r = cloud_dump(&["expire", "--repo", &url, "--cluster", "c", "--retain-full", "5", "--dry-run"], &[]).ok();
    assert!(r.stdout.contains("would finish deleting backup b4"), "{}", r.stdout);
    cloud_dump(&["expire", "--repo", &url, "--cluster", "c", "--retain-full", "5"], &[]).ok();
    assert!(!dir.path().join("c/backup/b4").exists());

    // A backup cut short (a claim, no manifest): expire leaves it alone; delete wants
    // --abandoned, and refuses while its claim is younger than a day.
    let claim = |name: &str, started: &str| {
        let d = dir.path().join("c/backup").join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("claim"),
            format!("cloud-dump backup claim\nname {name}\npid 1\nstarted {started}\ntoken 00\n"),
        )
        .unwrap();
        std::fs::write(d.join("base.tar.zst"), b"partial").unwrap();
    };
    let now = time::OffsetDateTime::now_utc();
    let fmt = |t: time::OffsetDateTime| t.format(&time::format_description::well_known::Rfc3339).unwrap();
    claim("cut", &fmt(now));
    claim("old-cut", &fmt(now - time::Duration::days(2)));
    // Its objects were last written two days ago too (a running backup keeps them young).
    for f in ["claim", "base.tar.zst"] {
        let p = dir.path().join("c/backup/old-cut").join(f);
        assert!(std::process::Command::new("touch").args(["-d", "2 days ago"]).arg(&p).status().unwrap().success());
    }
    let r = cloud_dump(&["expire", "--repo", &url, "--cluster", "c", "--retain-full", "5"], &[]).ok();
    assert!(r.stdout.contains("left alone cut") && r.stdout.contains("left alone old-cut"), "{}", r.stdout);
    cloud_dump(&["delete", "--repo", &url, "--cluster", "c", "--name", "cut"], &[]).fails_with("--abandoned");
    cloud_dump(&["delete", "--repo", &url, "--cluster", "c", "--name", "cut", "--abandoned"], &[])
        .fails_with("may still be running");
    assert!(dir.path().join("c/backup/cut/claim").exists());
    // An old claim, but an object written just now: still running.
    claim("busy", &fmt(now - time::Duration::days(2)));
    let claim_file = dir.path().join("c/backup/busy/claim");
    assert!(std::process::Command::new("touch")
        .args(["-d", "2 days ago"])
        .arg(&claim_file)
        .status()
        .unwrap()
        .success());
    cloud_dump(&["delete", "--repo", &url, "--cluster", "c", "--name", "busy", "--abandoned"], &[])
        .fails_with("may still be running");
    std::fs::remove_dir_all(dir.path().join("c/backup/busy")).unwrap();
    cloud_dump(&["delete", "--repo", &url, "--cluster", "c", "--name", "old-cut", "--abandoned"], &[]).ok();
    assert!(!dir.path().join("c/backup/old-cut").exists());
    std::fs::remove_dir_all(dir.path().join("c/backup/cut")).unwrap();

    // WAL of another database system (a new initdb) is refused before anything is stored.
    let other = pg(15);
    let seg = other.sql("postgres", "SELECT pg_walfile_name(pg_current_wal_lsn())");
    let file = other.data.join("pg_wal").join(&seg);
    let copy = work.path().join(&seg);
    std::fs::copy(&file, &copy).unwrap();
    let r = cloud_dump(&["wal-push", copy.to_str().unwrap(), &seg, "--repo", &url, "--cluster", "c"], &[]);
    let r = r.fails_with("comes from database system");
    assert!(r.stderr.contains("give this cluster its own archive"), "{}", r.stderr);
    let stored = std::fs::read_dir(dir.path().join("c/wal_archive"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(&seg))
        .count();
    let mine = src.sql("postgres", "SELECT pg_walfile_name(pg_current_wal_lsn())");
    assert!(stored == 0 || seg <= mine, "the foreign segment was stored");
}

/// verify: every object's checksum, every file against PostgreSQL's backup_manifest (with
/// the key for an encrypted backup; without it, what could not be checked is said), WAL
/// continuity and each segment; damage anywhere is a problem and exit 1.
#[test]
fn verify_finds_damage_in_backups_and_wal() {
    let (src, dir, url, _exe) = archiving_cluster("verify-repo");
    src.sql("postgres", "CREATE TABLE t AS SELECT g, md5(g::text) FROM generate_series(1, 50000) g");
    let env = vec![("CLOUD_DUMP_DB_URL".to_owned(), src.repl_url())];
    let mut enc = env.clone();
    enc.push(("CLOUD_DUMP_PASSPHRASE".into(), "verify me".into()));
    cloud_dump(&["backup", "--repo", &url, "--cluster", "c", "--name", "enc", "--encrypt"], &enc).ok();
    src.switch_and_wait_archived(Duration::from_secs(60)).unwrap();
    cloud_dump(&["backup", "--repo", &url, "--cluster", "c", "--name", "plain"], &env).ok();
    for _ in 0..3 {
        src.sql("postgres", "INSERT INTO t SELECT g, 'more' FROM generate_series(1, 1000) g");
        src.switch_and_wait_archived(Duration::from_secs(60)).unwrap();
    }
    let verify = |args: &[&str], env: &[(String, String)]| {
        let mut a = vec!["verify", "--repo", url.as_str(), "--cluster", "c"];
        a.extend_from_slice(args);
        cloud_dump(&a, env)
    };
    // Without the key: the plain backup fully, the encrypted one by its stored checksums.
    let r = verify(&["--all"], &[]).ok();
    assert!(
        r.stdout.contains("backup plain: ok") && r.stdout.contains("files against backup_manifest"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("backup enc: ok") && r.stdout.contains("not checked: files against backup_manifest"),
        "{}",
        r.stdout
    );
    // With it: both down to the files, and the WAL.
    let pass = vec![("CLOUD_DUMP_PASSPHRASE".to_owned(), "verify me".to_owned())];
    let r = verify(&["--all", "--wal", "--json"], &pass).ok();
    let rep: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    for b in rep["backups"].as_array().unwrap() {
        assert!(b["files_checked"].as_u64().unwrap() > 500, "{b}");
        assert!(b["problems"].as_array().unwrap().is_empty(), "{b}");
    }
    assert!(rep["wal"]["segments_checked"].as_u64().unwrap() >= 4, "{}", r.stdout);
    assert!(rep["wal"]["problems"].as_array().unwrap().is_empty(), "{}", r.stdout);
    // Without --name: the newest only.
    let r = verify(&[], &[]).ok();
    assert!(r.stdout.contains("backup plain") && !r.stdout.contains("backup enc"), "{}", r.stdout);

    // One flipped byte in the plain backup's base archive.
    let obj = dir.path().join("c/backup/plain/base.tar.zst");
    let good = std::fs::read(&obj).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x01;
    std::fs::write(&obj, &bad).unwrap();
    let r = verify(&["--name", "plain"], &[]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("backup plain: FAILED"), "{}", r.stdout);
    assert!(r.stderr.lines().last().unwrap().starts_with("cloud-dump: error: verify found"), "{}", r.stderr);
    std::fs::write(&obj, &good).unwrap();

    // A hole in the WAL, and a damaged segment.
    let wal_dir = dir.path().join("c/wal_archive");
    let mut segs: Vec<String> = std::fs::read_dir(&wal_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() > 24 && n.ends_with(".zst") && !n.contains("history"))
        .collect();
    segs.sort();
    let hole = &segs[segs.len() - 2];
    std::fs::rename(wal_dir.join(hole), dir.path().join("hole")).unwrap();
    let sum = format!("{}.sum", &hole[..24]);
    std::fs::rename(wal_dir.join(&sum), dir.path().join("hole.sum")).unwrap();
    let damaged = wal_dir.join(&segs[segs.len() - 3]);
    let mut d = std::fs::read(&damaged).unwrap();
    let at = d.len() / 2;
    d[at] ^= 0x10;
    std::fs::write(&damaged, &d).unwrap();
    let r = verify(&["--all", "--wal"], &pass);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stdout.contains(&format!("segment {} is missing", &hole[..24])), "{}", r.stdout);
    assert!(r.stdout.contains(&segs[segs.len() - 3][..24]), "the damaged segment is named: {}", r.stdout);

    // A PostgreSQL 15 backup whose manifest no longer lists backup_manifest, and a folder
    // whose manifest is unreadable: both are problems, and expire then keeps every WAL file.
    let mpath = dir.path().join("c/backup/plain/manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    m["objects"].as_array_mut().unwrap().retain(|o| o["kind"] != "backup_manifest");
    std::fs::write(&mpath, serde_json::to_vec(&m).unwrap()).unwrap();
    std::fs::create_dir_all(dir.path().join("c/backup/junk")).unwrap();
    std::fs::write(dir.path().join("c/backup/junk/manifest.json"), b"{ not json").unwrap();
    let r = verify(&["--all"], &pass);
    assert_eq!(r.code, 1);
    assert!(r.stdout.contains("backup_manifest is missing (PostgreSQL 13 and later always send one)"), "{}", r.stdout);
    assert!(r.stdout.contains("backup junk: FAILED"), "{}", r.stdout);
    let r = verify(&["--all", "--wal"], &pass);
    assert!(r.stdout.contains("backup junk: FAILED"), "{}", r.stdout);
    let r = cloud_dump(&["expire", "--repo", &url, "--cluster", "c", "--retain-full", "1", "--dry-run"], &[]).ok();
    assert!(
        r.stdout.contains("left alone junk") && r.stdout.contains("unreadable manifest: all WAL kept"),
        "{}",
        r.stdout
    );
}

/// verify --drill: restore into a scratch directory, start on a private socket, check every
/// database (amcheck), stop, remove; also at a seeded random point of the recovery window.
#[test]
fn drill_restores_starts_checks_and_cleans_up() {
    let (src, _dir, url, exe) = archiving_cluster("drill-repo");
    src.sql("postgres", "CREATE DATABASE app");
    src.sql("app", "CREATE TABLE t(id int PRIMARY KEY, v text); INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 20000) g");
    cloud_dump(
        &["backup", "--repo", &url, "--cluster", "c", "--name", "d1"],
        &[("CLOUD_DUMP_DB_URL".into(), src.repl_url())],
    )
    .ok();
    for _ in 0..2 {
        src.sql("app", "INSERT INTO t SELECT g, 'x' FROM generate_series(20001, 20100) g ON CONFLICT DO NOTHING");
        src.switch_and_wait_archived(Duration::from_secs(60)).unwrap();
        std::thread::sleep(Duration::from_millis(500));
    }
    let scratch = scratch_dir("drills");
    let drill = |extra: &[&str]| {
        let mut c = std::process::Command::new(&exe);
        c.args(["verify", "--repo", &url, "--cluster", "c", "--drill", "--scratch", scratch.path().to_str().unwrap()])
            .args(["--pg-bin", src.bin.to_str().unwrap(), "--progress", "none"])
            .args(extra);
        let out = c.output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = drill(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("drill: backup d1") && out.contains("3 databases") && out.contains("drill: ok"), "{out}");
    let indexes: u64 = out.split(" indexes by amcheck").next().unwrap().rsplit(' ').next().unwrap().parse().unwrap();
    assert!(indexes > 10, "amcheck ran: {out}");
    assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0, "the scratch directory was not removed");
    let (code, out, err) = drill(&["--random-point", "--seed", "7", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(r["seed"], 7);
    assert!(r["target"].as_str().unwrap().starts_with("LSN "), "{r}");
    assert!(r["problems"].as_array().unwrap().is_empty());
    assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0);
    // A backup whose server cannot start (a preload library this host lacks): the drill says
    // so at once, exits 1, and leaves nothing behind.
    src.sql("postgres", "ALTER SYSTEM SET shared_preload_libraries = 'no_such_library'");
    cloud_dump(
        &["backup", "--repo", &url, "--cluster", "c", "--name", "d2"],
        &[("CLOUD_DUMP_DB_URL".into(), src.repl_url())],
    )
    .ok();
    src.sql("postgres", "ALTER SYSTEM RESET shared_preload_libraries");
    let t = std::time::Instant::now();
    let (code, out, err) = drill(&["--name", "d2"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("the restored server exited"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(60), "the drill waited for a dead server");
    assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0, "a failed drill left its directory");
    // Server binaries of another major: refused before anything is written.
    if let Some(pg17) = cloud_dump_testkit::pg_bin_dir(17) {
        let mut c = std::process::Command::new(&exe);
        let out = c
            .args(["verify", "--repo", &url, "--cluster", "c", "--drill", "--pg-bin", pg17.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("the backup is 15"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// An S3 bucket with Object Lock (versioning + COMPLIANCE default retention, moto's server):
/// nothing is ever rewritten, so backups, keep marks, WAL records and the system record are
/// all written once; expire hides what it deletes behind delete markers while the locked
/// versions stay; every backup kept restores; verify passes.
#[test]
fn object_lock_bucket_lifecycle() {
    let moto = cloud_dump_testkit::MotoServer::start().unwrap_or_else(|e| panic!("{e}"));
    moto.locked_bucket("locked", "GOVERNANCE", 1).unwrap();
    let mut env = moto.env();
    env.push(("CLOUD_DUMP_S3_OBJECT_LOCK".into(), "true".into()));
    let url = "s3://locked/pg";
    let mut src = pg(15);
    let exe = cloud_dump_testkit::public_copy(&bin());
    let prefix: String = env.iter().map(|(k, v)| format!("{k}={v} ")).collect();
    src.reconfigure(&format!(
        "archive_mode = on\narchive_command = '{prefix}{} wal-push %p %f --repo {url} --cluster c --log-level warn'",
        exe.display()
    ))
    .unwrap();
    src.sql("postgres", "CREATE TABLE t(id serial PRIMARY KEY, pad text)");
    let mut e = env.clone();
    e.push(("CLOUD_DUMP_DB_URL".into(), src.repl_url()));
    for name in ["l1", "l2", "l3"] {
        src.sql("postgres", "INSERT INTO t(pad) SELECT repeat('y', 200) FROM generate_series(1, 2000)");
        cloud_dump(&["backup", "--repo", url, "--cluster", "c", "--name", name], &e).ok();
        src.switch_and_wait_archived(Duration::from_secs(60)).unwrap();
    }
    cloud_dump(&["keep", "--repo", url, "--cluster", "c", "--name", "l1"], &env).ok();
    // Without the setting the bucket's requirement is named, with the fix.
    let no_lock: Vec<(String, String)> =
        env.iter().filter(|(k, _)| k != "CLOUD_DUMP_S3_OBJECT_LOCK").cloned().collect();
    cloud_dump(&["keep", "--repo", url, "--cluster", "c", "--name", "l2"], &no_lock).fails_with("--s3-object-lock");

    let expired = cloud_dump(&["expire", "--repo", url, "--cluster", "c", "--retain-full", "1"], &env).ok();
    let r = &expired;
    assert!(r.stdout.contains("deleting backup l2") && r.stdout.contains("kept backup l1: keep mark"), "{}", r.stdout);
    let r = cloud_dump(&["list", "--repo", url, "--cluster", "c", "--json"], &env).ok();
    let names: Vec<String> = serde_json::from_str::<Vec<serde_json::Value>>(&r.stdout)
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    // The deleted backup's data is still there, locked: only a delete marker hides it.
    let versions = moto
        .boto3(
            "v = s3.list_object_versions(Bucket='locked', Prefix='pg/c/backup/l2/')\n\
             print(len(v.get('Versions', [])), len(v.get('DeleteMarkers', [])))",
        )
        .unwrap();
    let counts: Vec<usize> = versions.split_whitespace().map(|n| n.parse().unwrap()).collect();
    assert!(counts[0] >= 2 && counts[1] >= 2, "versions/delete markers of l2: {versions}");
    // A locked version cannot be removed before its retention ends.
    let forced = moto.boto3(
        "v = s3.list_object_versions(Bucket='locked', Prefix='pg/c/backup/l2/manifest.json')['Versions'][0]\n\
         s3.delete_object(Bucket='locked', Key=v['Key'], VersionId=v['VersionId'])",
    );
    assert!(forced.is_err(), "a locked version was deleted");
    // The expire reported them as locked, left for a later run.
    assert!(expired.stdout.contains("refused as still locked"), "{}", expired.stdout);
    // The locks pass (shortened here: GOVERNANCE lets the test bypass them): the next
    // expire deletes the old versions and then their delete markers, and nothing else.
    moto.boto3(
        "import datetime\n\
         until = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=2)\n\
         for page in s3.get_paginator('list_object_versions').paginate(Bucket='locked', Prefix='pg/'):\n    \
             for v in page.get('Versions', []):\n        \
                 s3.put_object_retention(Bucket='locked', Key=v['Key'], VersionId=v['VersionId'], \
                 BypassGovernanceRetention=True, Retention={'Mode': 'GOVERNANCE', 'RetainUntilDate': until})",
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let dry = cloud_dump(&["expire", "--repo", url, "--cluster", "c", "--retain-full", "1", "--dry-run"], &env).ok();
    assert!(dry.stdout.contains("old versions: would delete"), "{}", dry.stdout);
    let r = cloud_dump(&["expire", "--repo", url, "--cluster", "c", "--retain-full", "1"], &env).ok();
    assert!(!r.stdout.contains("refused as still locked"), "{}", r.stdout);
    let removed: usize = r
        .stdout
        .split("old versions: deleted ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{}", r.stdout));
    assert!(removed >= 4, "the expired backup's objects: {}", r.stdout);
    let versions = moto
        .boto3(
            "v = s3.list_object_versions(Bucket='locked', Prefix='pg/c/backup/l2/')\n\
             print(len(v.get('Versions', [])), len(v.get('DeleteMarkers', [])))",
        )
        .unwrap();
    assert_eq!(versions.trim(), "0 0", "old versions of the expired backup l2 after the locks passed");
    let live = moto
        .boto3(
            "v = s3.list_object_versions(Bucket='locked', Prefix='pg/c/backup/')\n\
             print(sorted(set(x['Key'].split('/')[3] for x in v.get('Versions', []))))",
        )
        .unwrap();
    assert_eq!(live.trim(), "['l1', 'l3']", "the kept backups' objects");

    let r = cloud_dump(&["verify", "--repo", url, "--cluster", "c", "--all", "--wal"], &env).ok();
    assert!(r.stdout.contains("backup l3: ok") && r.stdout.contains("backup l1: ok"), "{}", r.stdout);
    // info tells whether the bucket keeps what is written, and for how long.
    let mut week = env.clone();
    week.push(("CLOUD_DUMP_RETAIN_DAYS".into(), "7".into()));
    let r = cloud_dump(&["info", "--repo", url, "--cluster", "c", "--json"], &week).ok();
    let i: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(i["bucket"]["versioning"], "Enabled", "{}", r.stdout);
    assert_eq!(i["bucket"]["object_lock"], true);
    assert_eq!(i["bucket"]["retention_mode"], "GOVERNANCE");
    assert_eq!(i["bucket"]["retention_days"], 1);
    assert_eq!(i["bucket"]["covers_retain_days"], false);
    let r = cloud_dump(&["info", "--repo", url, "--cluster", "c"], &week).ok();
    assert!(r.stdout.contains("does NOT cover the 7-day recovery window"), "{}", r.stdout);
    let want = src.sql("postgres", "SELECT count(*) FROM t");
    let work = scratch_dir("lock-restores");
    let pgdata = work.path().join("l1");
    let mut args =
        vec!["restore", "--repo", url, "--cluster", "c", "--name", "l1", "--pgdata", pgdata.to_str().unwrap()];
    args.extend(["--recovery-target", "latest"]);
    let out = std::process::Command::new(&exe).args(&args).envs(env.iter().cloned()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    give_to_postgres(&pgdata);
    let mut s = PgServer::start_existing_with(&src.bin, &pgdata, "archive_mode = off").unwrap();
    s.wait_promoted(Duration::from_secs(120)).unwrap();
    assert_eq!(s.sql("postgres", "SELECT count(*) FROM t"), want, "the kept backup restores to latest");
    s.stop();
}

/// Drill: expire under storage faults on every delete, list and get, and expire killed with
/// kill -9 at random moments, until a clean run. Whatever happened in between, the end state
/// is what the policy says: exactly the backups it keeps, each verified with the WAL from
/// its start (`verify --all --wal`), no half-deleted folder, and the newest restores.
#[test]
fn drill_expire_under_faults_and_kill_9() {
    use rand::{Rng, SeedableRng};
    let (src, dir, url, _exe) = archiving_cluster("expire-drill");
    src.sql("postgres", "CREATE TABLE t(id serial PRIMARY KEY, pad text)");
    let env = vec![("CLOUD_DUMP_DB_URL".to_owned(), src.repl_url())];
    let backup = |name: &str| {
        src.sql("postgres", "INSERT INTO t(pad) SELECT repeat('z', 300) FROM generate_series(1, 3000)");
        cloud_dump(&["backup", "--repo", &url, "--cluster", "c", "--name", name], &env).ok();
        src.switch_and_wait_archived(Duration::from_secs(60)).unwrap();
    };
    for i in 0..4 {
        backup(&format!("d{i}"));
    }
    let expire = ["expire", "--repo", url.as_str(), "--cluster", "c", "--retain-full", "2"];
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let (mut failed_runs, mut killed, mut interrupted) = (0, 0, 0);
    let marked = || {
        std::fs::read_dir(dir.path().join("c/backup"))
            .unwrap()
            .flatten()
            .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
            .filter(|e| e.file_name().to_string_lossy().starts_with("deleting-"))
            .count()
    };
    // Each round adds a backup, so there is always something to expire; even rounds run
    // under delete faults (each may fail part-way), odd ones are slowed and killed with
    // kill -9. No round may leave a state the next cannot finish.
    for round in 0..8u64 {
        backup(&format!("d{}", round + 4));
        if round % 2 == 0 {
            let faults =
                vec![("CLOUD_DUMP_FAULTS".to_owned(), format!("seed={round},rate=0.3,kinds=error+lost,ops=delete"))];
            if cloud_dump(&expire, &faults).code != 0 {
                failed_runs += 1;
            }
        } else {
            let mut c = std::process::Command::new(bin());
            c.args(expire).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
            c.env("CLOUD_DUMP_FAULTS", format!("seed={round},rate=1,kinds=stall,ops=delete,stall-ms=40"));
            let mut child = c.spawn().unwrap();
            std::thread::sleep(Duration::from_millis(rng.gen_range(30..400)));
            if child.try_wait().unwrap().is_none() {
                killed += 1;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        interrupted += marked();
    }
    let r = cloud_dump(&expire, &[]).ok();
    assert!(!r.stdout.contains("left alone"), "{}", r.stdout);
    assert!(killed > 0 && interrupted > 0, "the drill never cut a delete short ({killed} killed)");
    assert_eq!(names(&url), ["d10", "d11"], "the policy keeps the two newest");
    let folders: Vec<String> = std::fs::read_dir(dir.path().join("c/backup"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut folders = folders;
    folders.sort();
    assert_eq!(folders, ["d10", "d11"], "no half-deleted folder is left");
    let v = cloud_dump(&["verify", "--repo", &url, "--cluster", "c", "--all", "--wal"], &[]).ok();
    assert!(v.stdout.contains("backup d10: ok") && v.stdout.contains("backup d11: ok"), "{}", v.stdout);
    let want = src.sql("postgres", "SELECT count(*) FROM t");
    let work = scratch_dir("expire-drill-restore");
    let mut s = restore_latest(&url, "d10", &src, &work.path().join("d10"));
    assert_eq!(s.sql("postgres", "SELECT count(*) FROM t"), want, "the older kept backup to latest");
    s.stop();
    println!(
        "drill expire: 4 runs under delete faults ({failed_runs} failed part-way), {killed} of 4 killed with kill -9 mid-run, \
         {interrupted} half-deleted folder(s) seen between runs; a clean run then left exactly the kept backups, verified \
         with their WAL, and d10 restored to latest"
    );
}
