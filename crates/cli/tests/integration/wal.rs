//! `wal-push` / `wal-fetch` as PostgreSQL calls them: exit codes, layout, idempotence,
//! encryption, prefetch, and failures that must stop recovery.

use std::path::Path;

use super::common::*;

fn segment(dir: &Path, name: &str, seed: u32) -> std::path::PathBuf {
    let data: Vec<u8> = (0..(16u32 << 20) / 4).flat_map(|i| (i.wrapping_mul(seed) >> 7).to_le_bytes()).collect();
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

fn push(repo: &str, path: &Path, name: &str, extra: &[&str], env: &[(String, String)]) -> Run {
    let mut a = vec!["wal-push", path.to_str().unwrap(), name, "--repo", repo];
    a.extend_from_slice(extra);
    cloud_dump(&a, env)
}

fn fetch(repo: &str, name: &str, dest: &Path, extra: &[&str], env: &[(String, String)]) -> Run {
    let mut a = vec!["wal-fetch", name, dest.to_str().unwrap(), "--repo", repo, "--prefetch", "0"];
    a.extend_from_slice(extra);
    cloud_dump(&a, env)
}

#[test]
fn push_and_fetch_every_mode_with_the_seed_layout() {
    let work = tempfile::tempdir().unwrap();
    let repo_dir = work.path().join("repo");
    let repo = file_url(&repo_dir);
    let wal = repo_dir.join("wal_archive");
    let s1 = segment(work.path(), "000000010000000000000001", 3);
    let original = std::fs::read(&s1).unwrap();

    // A repository whose directory is missing (an unmounted volume) is never created by
    // wal-push or wal-fetch: push fails (PostgreSQL keeps the segment), fetch is fatal.
    push(&repo, &s1, "000000010000000000000001", &[], &[]).fails_with("does not exist");
    let r = fetch(&repo, "000000010000000000000001", &work.path().join("x"), &[], &[]);
    assert!(r.code > 125 && r.stderr.contains("does not exist"), "exit {}: {}", r.code, r.stderr);
    assert!(!repo_dir.exists());
    // The empty mount point of an unmounted volume is no repository either.
    std::fs::create_dir(&repo_dir).unwrap();
    push(&repo, &s1, "000000010000000000000001", &[], &[]).fails_with("does not exist");
    assert_eq!(std::fs::read_dir(&repo_dir).unwrap().count(), 0);
    // The first backup writes this marker; here it stands in for one.
    std::fs::write(repo_dir.join(cloud_dump_storage::REPOSITORY_MARKER), "cloud-dump repository\n").unwrap();

    // Uncompressed: stored bytes identical, no suffix.
    push(&repo, &s1, "000000010000000000000001", &["--compress", "false"], &[]).ok();
    assert_eq!(std::fs::read(wal.join("000000010000000000000001")).unwrap(), original);
    // gzip: the seed's .gz and magic.
    let s2 = segment(work.path(), "000000010000000000000002", 5);
    push(&repo, &s2, "000000010000000000000002", &["--compression", "gzip"], &[]).ok();
    assert_eq!(&std::fs::read(wal.join("000000010000000000000002.gz")).unwrap()[..2], &[0x1f, 0x8b]);
    // Passphrase: .gz.age, not readable as gzip, through the repository key.
    let pass = vec![("WAL_PASSPHRASE".to_string(), "wal-secret".to_string())];
    let s3 = segment(work.path(), "000000010000000000000003", 7);
    push(&repo, &s3, "000000010000000000000003", &["--compression", "gzip", "--encrypt"], &pass).ok();
    let enc = std::fs::read(wal.join("000000010000000000000003.gz.age")).unwrap();
    assert!(enc.starts_with(b"age-encryption.org/v1") && enc[..2] != [0x1f, 0x8b]);
    assert!(wal.join("cloud-dump-wal.key").exists());
    // Key pair.
    let key = work.path().join("id.key");
    cloud_dump(&["keygen", "-o", key.to_str().unwrap()], &[]).ok();
    let public = work.path().join("id.pub");
    let s4 = segment(work.path(), "000000010000000000000004", 11);
    push(&repo, &s4, "000000010000000000000004", &["--encrypt", "--recipient-key", public.to_str().unwrap()], &[]).ok();
    assert!(wal.join("000000010000000000000004.zst.age").exists());

    // Fetch each back, byte for byte.
    let dest = work.path().join("RECOVERYXLOG");
    for (name, src, extra, env) in [
        ("000000010000000000000001", &s1, vec![], vec![]),
        ("000000010000000000000002", &s2, vec![], vec![]),
        ("000000010000000000000003", &s3, vec![], pass.clone()),
        ("000000010000000000000004", &s4, vec!["--identity-key", key.to_str().unwrap()], vec![]),
    ] {
        fetch(&repo, name, &dest, &extra, &env).ok();
        assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(src).unwrap(), "{name}");
        std::fs::remove_file(&dest).unwrap();
    }

    // Idempotent: same content, any compression → exit 0, still one object, unchanged.
    let before = sha256_file(&wal.join("000000010000000000000002.gz"));
    push(&repo, &s2, "000000010000000000000002", &["--compression", "gzip"], &[]).ok();
    push(&repo, &s2, "000000010000000000000002", &["--compression", "zstd"], &[]).ok();
    assert_eq!(sha256_file(&wal.join("000000010000000000000002.gz")), before);
    let copies = std::fs::read_dir(&wal).unwrap().filter(|e| {
        let n = e.as_ref().unwrap().file_name().to_string_lossy().into_owned();
        n.starts_with("000000010000000000000002") && !n.ends_with(".sum")
    });
    assert_eq!(copies.count(), 1, "a second copy was created");
    // Key pair: an identical re-push (PostgreSQL retrying after a crash) needs no private
    // key; different content is refused, also without it.
    let rk = ["--encrypt", "--recipient-key", public.to_str().unwrap()];
    push(&repo, &s4, "000000010000000000000004", &rk, &[]).ok();
    push(&repo, &s1, "000000010000000000000004", &rk, &[]).fails_with("different content");
    // Encrypted re-push is verified through the repository key.
    push(&repo, &s3, "000000010000000000000003", &["--compression", "gzip", "--encrypt"], &pass).ok();
    // Same name, different content: refused loudly, nothing overwritten.
    push(&repo, &s1, "000000010000000000000002", &[], &[]).fails_with("different content");
    assert_eq!(sha256_file(&wal.join("000000010000000000000002.gz")), before);

    // Not found: exit 1, nothing written.
    let r = fetch(&repo, "000000010000000000000009", &dest, &[], &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(!dest.exists());
    // Wrong passphrase: a failure PostgreSQL must not take for "end of archive".
    let wrong = vec![("WAL_PASSPHRASE".to_string(), "nope".to_string())];
    let r = fetch(&repo, "000000010000000000000003", &dest, &[], &wrong);
    assert!(r.code > 125, "exit {}: {}", r.code, r.stderr);
    assert!(r.stderr.contains("wrong passphrase"), "{}", r.stderr);
    assert!(!dest.exists());
    // A hole: 5 missing while 6 exists; 0A missing while 0B is missing too and 0C exists.
    let s6 = segment(work.path(), "000000010000000000000006", 13);
    push(&repo, &s6, "000000010000000000000006", &[], &[]).ok();
    let r = fetch(&repo, "000000010000000000000005", &dest, &[], &[]);
    assert!(r.code > 125 && r.stderr.contains("hole"), "exit {}: {}", r.code, r.stderr);
    push(&repo, &s6, "00000001000000000000000C", &[], &[]).ok();
    let r = fetch(&repo, "00000001000000000000000A", &dest, &[], &[]);
    assert!(r.code > 125 && r.stderr.contains("hole"), "exit {}: {}", r.code, r.stderr);
    assert!(!dest.exists());
    // Damage: one flipped byte in an uncompressed object (no codec checksum, no metadata
    // on file://) is refused, never served.
    let obj = wal.join("000000010000000000000001");
    let mut bytes = std::fs::read(&obj).unwrap();
    bytes[4_000_000] ^= 1;
    std::fs::write(&obj, &bytes).unwrap();
    let r = fetch(&repo, "000000010000000000000001", &dest, &[], &[]);
    assert!(r.code > 125 && r.stderr.contains("checksum"), "exit {}: {}", r.code, r.stderr);
    assert!(!dest.exists());
    bytes.truncate(1 << 20);
    std::fs::write(&obj, &bytes).unwrap();
    let r = fetch(&repo, "000000010000000000000001", &dest, &[], &[]);
    assert!(r.code > 125, "exit {}: {}", r.code, r.stderr);
    assert!(!dest.exists());
    // restore_command's settings file wins over a server environment that archives
    // elsewhere (CLOUD_DUMP_* for archive_command).
    let conf = work.path().join("restore.conf");
    std::fs::write(&conf, format!("CLOUD_DUMP_REPO={repo}\nCLOUD_DUMP_WAL_PREFIX=wal_archive\n")).unwrap();
    let server_env = vec![
        ("CLOUD_DUMP_REPO".to_string(), file_url(&work.path().join("elsewhere"))),
        ("CLOUD_DUMP_CLUSTER".to_string(), "other".to_string()),
    ];
    let r = cloud_dump(
        &[
            "wal-fetch",
            "000000010000000000000002",
            dest.to_str().unwrap(),
            "--prefetch",
            "0",
            "--config",
            conf.to_str().unwrap(),
        ],
        &server_env,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(&s2).unwrap());
    std::fs::remove_file(&dest).unwrap();
    // A store that does not answer.
    let dead = format!("http://127.0.0.1:{}", cloud_dump_testkit::free_port());
    let env = vec![
        ("AWS_ACCESS_KEY_ID".to_string(), "x".to_string()),
        ("AWS_SECRET_ACCESS_KEY".to_string(), "y".to_string()),
    ];
    let r = fetch("s3://nowhere/wal", "000000010000000000000001", &dest, &["--s3-endpoint", &dead], &env);
    assert!(r.code > 125, "exit {}: {}", r.code, r.stderr);
    assert!(!dest.exists());
    // wal-push to a dead store fails (PostgreSQL retries) and never claims success.
    let r = push("s3://nowhere/wal", &s1, "000000010000000000000001", &["--s3-endpoint", &dead], &env);
    assert_eq!(r.code, 1, "{}", r.stderr);
    push(&repo, &s1, "RECOVERYXLOG", &[], &[]).fails_with("not a WAL file name");
}

#[test]
fn prefetch_downloads_ahead_into_the_spool() {
    let s3 = S3Server::start(&["wal"]);
    let work = tempfile::tempdir().unwrap();
    let names: Vec<String> = (1..=5).map(|i| format!("0000000100000000000000{i:02X}")).collect();
    for (i, n) in names.iter().enumerate() {
        let p = segment(work.path(), n, i as u32 + 2);
        push("s3://wal/p", &p, n, &[], &s3.env()).ok();
    }
    let pg_wal = work.path().join("pg_wal");
    std::fs::create_dir_all(&pg_wal).unwrap();
    let dest = pg_wal.join("RECOVERYXLOG");
    let mut a = vec!["wal-fetch", &names[0], dest.to_str().unwrap(), "--repo", "s3://wal/p", "--prefetch", "3"];
    let r = cloud_dump(&a, &s3.env());
    assert_eq!(r.code, 0, "{}", r.stderr);
    let spool = pg_wal.join(".cloud-dump/prefetch");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !spool.join(&names[3]).exists() || spool.join(".lock").exists() {
        assert!(std::time::Instant::now() < deadline, "prefetch did not fill the spool");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(spool.join(&names[1]).exists() && spool.join(&names[2]).exists());
    // The next request is served from the spool: the file moves out of it.
    std::fs::remove_file(&dest).unwrap();
    a[1] = &names[1];
    let r = cloud_dump(&a, &s3.env());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!spool.join(&names[1]).exists());
    assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(work.path().join(&names[1])).unwrap());
}
