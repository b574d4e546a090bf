//! Backups that cannot lie: two runs with one name, a run stopped by a signal, and the
//! durability of every acknowledged write on file://.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::common::*;

fn spawn_backup(url: &str, name: &str, db_url: &str, env: &[(String, String)], extra: &[&str]) -> std::process::Child {
    let mut c = Command::new(bin());
    c.args(["backup", "--repo", url, "--name", name, "--db-url", db_url, "--progress", "none"]).args(extra);
    for (k, _) in std::env::vars() {
        if k.starts_with("CLOUD_DUMP_") || k.starts_with("PG") || k.starts_with("AWS_") {
            c.env_remove(&k);
        }
    }
    c.envs(env.iter().cloned()).stdout(Stdio::piped()).stderr(Stdio::piped());
    c.spawn().expect("start cloud-dump backup")
}

fn finish(c: std::process::Child) -> (i32, String) {
    let out = c.wait_with_output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            out.push(p.clone());
            if p.is_dir() {
                out.extend(walk(&p));
            }
        }
    }
    out
}

/// Two backups with one name started at once: exactly one succeeds, the other writes and
/// deletes nothing, and the winner restores (every object verified against its manifest).
#[test]
fn two_backups_with_one_name_never_lose_the_winner() {
    let mut src = pg(15);
    // Back-to-back backups checkpoint often: keep WAL so none is recycled mid-backup.
    src.reconfigure("wal_keep_size = '1GB'").unwrap();
    src.sql("postgres", "CREATE TABLE t AS SELECT g FROM generate_series(1, 100000) g");
    let s3 = S3Server::start(&["race"]);
    let dir = tempfile::tempdir().unwrap();
    let file = file_url(&dir.path().join("repo"));
    for (url, env) in [(file.as_str(), vec![]), ("s3://race/pg", s3.env())] {
        for round in 0..3 {
            let name = format!("same-{round}");
            let a = spawn_backup(url, &name, &src.repl_url(), &env, &[]);
            let b = spawn_backup(url, &name, &src.repl_url(), &env, &[]);
            let (ca, la) = finish(a);
            let (cb, lb) = finish(b);
            assert!(
                (ca == 0) != (cb == 0),
                "{url} round {round}: exactly one backup must win (exit {ca} and {cb}):\n{la}\n{lb}"
            );
            let loser = if ca == 0 { &lb } else { &la };
            assert!(loser.contains("already exists"), "{loser}");
            let pgdata = dir.path().join(format!("restore-{round}-{}", url.len()));
            cloud_dump(&["restore", "--repo", url, "--name", &name, "--pgdata", pgdata.to_str().unwrap()], &env).ok();
            assert!(pgdata.join("global/pg_control").exists());
        }
    }
}

/// SIGTERM in the middle of a backup to S3: non-zero exit, nothing of it visible, and no
/// multipart upload left on the server (s3s-fs keeps them as `.upload-*` files).
#[test]
fn a_backup_stopped_by_a_signal_leaves_nothing_behind() {
    let src = pg(15);
    src.sql("postgres", "CREATE TABLE t AS SELECT g, md5(g::text) h FROM generate_series(1, 300000) g");
    let s3 = S3Server::start(&["sig"]);
    let child = spawn_backup("s3://sig/pg", "stopped", &src.repl_url(), &s3.env(), &["--max-rate", "256k"]);
    let pid = child.id();
    // Wait until the upload has started on the server.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !walk(&s3.root).iter().any(|p| p.file_name().unwrap().to_string_lossy().starts_with(".upload")) {
        assert!(Instant::now() < deadline, "the backup never started an upload");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    let (code, log) = finish(child);
    assert_ne!(code, 0, "an interrupted backup must not exit 0:\n{log}");
    let left: Vec<_> = walk(&s3.root)
        .into_iter()
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.starts_with(".upload") || (p.is_file() && p.to_string_lossy().contains("/stopped"))
        })
        .collect();
    assert!(left.is_empty(), "left behind after the signal: {left:?}\n{log}");
    cloud_dump(&["restore", "--repo", "s3://sig/pg", "--name", "stopped", "--pgdata", "/tmp/never"], &s3.env())
        .fails_with("not found");
}

/// strace: on file:// every object a command reports as stored was fsynced after its
/// final name appeared, and so was every folder on its path (backup and wal-push).
#[test]
fn every_acknowledged_write_on_file_is_durable() {
    assert!(
        Command::new("strace").arg("-V").output().is_ok_and(|o| o.status.success()),
        "strace is needed (scripts/test installs it)"
    );
    let src = pg(15);
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    let url = file_url(&repo_dir);
    let seg = dir.path().join("000000010000000000000042");
    std::fs::write(&seg, vec![7u8; 1 << 20]).unwrap();
    let trace = |args: &[&str], log: &Path| {
        let out = Command::new("strace")
            .args(["-f", "-y", "-qq", "-e", "trace=fsync,fdatasync,rename,renameat,renameat2,link,linkat", "-o"])
            .arg(log)
            .arg(bin())
            .args(args)
            .env("CLOUD_DUMP_PROGRESS", "none")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        std::fs::read_to_string(log).unwrap()
    };
    let backup = trace(
        &["backup", "--repo", &url, "--name", "durable", "--db-url", &src.repl_url()],
        &dir.path().join("b.trace"),
    );
    let push = trace(
        &["wal-push", seg.to_str().unwrap(), "000000010000000000000042", "--repo", &url],
        &dir.path().join("w.trace"),
    );
    let all = format!("{backup}\n{push}");
    // Last line where each path was fsynced, and where it got its final name.
    let mut synced: std::collections::HashMap<String, usize> = Default::default();
    let mut named: std::collections::HashMap<String, usize> = Default::default();
    for (i, line) in all.lines().enumerate() {
        let paths: Vec<&str> = line.split('<').skip(1).filter_map(|p| p.split('>').next()).collect();
        if line.contains("fsync(") || line.contains("fdatasync(") {
            for p in &paths {
                synced.insert(p.to_string(), i);
            }
        } else if let Some(target) =
            line.rsplit('"').nth(1).filter(|_| line.contains("rename") || line.contains("link"))
        {
            // renameat(…, "old", …, "new") / linkat: the new name is the last quoted path.
            named.insert(target.to_string(), i);
            let _ = paths;
        }
    }
    let files: Vec<PathBuf> = walk(&repo_dir).into_iter().filter(|p| p.is_file()).collect();
    assert!(files.len() >= 5, "{files:?}");
    for f in &files {
        let f = f.canonicalize().unwrap();
        let key = f.display().to_string();
        let at = synced.get(&key).unwrap_or_else(|| panic!("{key} was never fsynced"));
        if let Some(n) = named.iter().find(|(k, _)| key.ends_with(k.trim_start_matches('.'))).map(|(_, v)| *v) {
            assert!(*at > n, "{key} fsynced before it got its name");
        }
        let mut d = f.parent().unwrap().to_path_buf();
        let root = repo_dir.canonicalize().unwrap();
        loop {
            assert!(synced.contains_key(&d.display().to_string()), "folder {} never fsynced", d.display());
            if d == root {
                break;
            }
            d = d.parent().unwrap().to_path_buf();
        }
    }
}

/// A delete of the folder begun while the backup runs (here a `deleting-` mark appears, as
/// `delete --abandoned` or a planted mark would leave): the backup fails and never makes a
/// manifest visible.
#[test]
fn a_backup_whose_folder_is_being_deleted_never_reports_success() {
    let src = pg(15);
    src.sql("postgres", "CREATE TABLE t AS SELECT g, md5(g::text) h FROM generate_series(1, 300000) g");
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let url = file_url(&repo);
    // Slowed so the mark lands mid-upload (the claim is written first).
    let child = spawn_backup(&url, "marked", &src.repl_url(), &[], &["--max-rate", "8M"]);
    let claim = repo.join("marked/claim");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !claim.exists() {
        assert!(Instant::now() < deadline, "the backup never claimed its name");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(repo.join("marked/deleting-00000000000000000001"), "deleting\n").unwrap();
    let (code, log) = finish(child);
    assert_ne!(code, 0, "the backup reported success in a folder being deleted:\n{log}");
    assert!(log.contains("is being deleted"), "{log}");
    assert!(!repo.join("marked/manifest.json").exists(), "a manifest became visible:\n{log}");
    assert_eq!(cloud_dump(&["list", "--repo", &url, "--json"], &[]).ok().stdout.trim(), "[]");
}
