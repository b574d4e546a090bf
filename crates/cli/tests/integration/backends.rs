//! One conformance suite for the repository layer, run on every backend the tests can
//! start: file://, S3 (s3s-fs on loopback), Azure Blob (Azurite) and GCS (object_store's GCS
//! client against moto behind a header-renaming proxy: no emulator accepts its XML API
//! requests). Then the backup → restore and wal-push → wal-fetch round trips on each.

use std::time::Duration;

use cloud_dump_storage::Bytes;
use cloud_dump_storage::{Repo, StorageError, StorageOptions};
use futures::TryStreamExt;

use super::common::*;

/// The promises the rest of cloud-dump builds on, checked against one backend.
async fn repository_conformance(url: &str, opts: &StorageOptions) {
    let repo = Repo::create(url, opts).await.unwrap_or_else(|e| panic!("{url}: {e}"));
    // Create-only writes: the second is refused, the first stays.
    repo.put_new("c/one", Bytes::from_static(b"1")).await.unwrap();
    let again = repo.put_new("c/one", Bytes::from_static(b"2")).await.unwrap_err();
    assert!(matches!(again, StorageError::AlreadyExists { .. }), "{url}: {again}");
    assert_eq!(repo.get("c/one").await.unwrap(), Bytes::from_static(b"1"));
    repo.put_new_durable("c/meta", Bytes::from_static(b"m"), &[("cloud-dump-sha256", "abc".into())]).await.unwrap();
    // Cloud stores keep the metadata (Azure under its own spelling of the name).
    if !url.starts_with("file://") {
        assert_eq!(repo.metadata("c/meta", "cloud-dump-sha256").await.unwrap().as_deref(), Some("abc"), "{url}");
    }
    // Missing objects are typed, not errors of the store.
    assert!(repo.head("c/none").await.unwrap().is_none(), "{url}");
    assert!(matches!(repo.get("c/none").await.unwrap_err(), StorageError::NotFound { .. }), "{url}");
    // Listing: recursive, folders, and from an offset in key order.
    for k in ["w/000000010000000000000003", "w/000000010000000000000001", "w/000000010000000000000002", "w/x/y"] {
        repo.put_new(k, Bytes::from(k.as_bytes().to_vec())).await.unwrap();
    }
    let all: Vec<String> = repo.list("w/").await.unwrap().into_iter().map(|o| o.key).collect();
    assert_eq!(all.len(), 4, "{url}: {all:?}");
    let after: Vec<String> = repo
        .list_after("w/00000001", "w/000000010000000000000001", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(after, ["w/000000010000000000000002", "w/000000010000000000000003"], "{url}");
    let mut dirs = repo.list_dirs("").await.unwrap();
    dirs.sort();
    assert!(dirs.contains(&"c".to_string()) && dirs.contains(&"w".to_string()), "{url}: {dirs:?}");
    // A multipart upload is invisible until finished; ranged parallel reads reassemble it.
    let data: Vec<u8> = (0..(40u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    let mut up = repo.upload("big/obj", Some(data.len() as u64)).await.unwrap();
    up.put(Bytes::from(data[..(20 << 20)].to_vec())).await.unwrap();
    up.put(Bytes::from(data[(20 << 20)..].to_vec())).await.unwrap();
    assert!(repo.head("big/obj").await.unwrap().is_none(), "{url}: visible before finish");
    up.finish().await.unwrap();
    assert_eq!(repo.head("big/obj").await.unwrap().unwrap().size, data.len() as u64);
    let chunks: Vec<Bytes> = repo.read("big/obj", data.len() as u64, 4).await.unwrap().try_collect().await.unwrap();
    assert!(chunks.concat() == data, "{url}: ranged reads differ");
    // An aborted upload leaves nothing.
    let mut up = repo.upload("big/aborted", None).await.unwrap();
    up.put(Bytes::from(vec![1u8; 17 << 20])).await.unwrap();
    up.abort().await.unwrap();
    assert!(repo.head("big/aborted").await.unwrap().is_none(), "{url}");
    // Batched deletes; a missing key counts as deleted.
    let keys: Vec<String> =
        ["c/one", "c/meta", "w/x/y", "big/obj", "c/never-there"].iter().map(|s| s.to_string()).collect();
    let failed = repo.delete_many(&keys).await.unwrap();
    assert!(failed.is_empty(), "{url}: {failed:?}");
    assert!(repo.head("big/obj").await.unwrap().is_none());
    assert_eq!(repo.list("c/").await.unwrap().len(), 0, "{url}");
}

/// backup → restore (started and compared) and wal-push → wal-fetch, through the binary.
fn round_trips(url: &str, env: &[(String, String)]) {
    let src = pg(15);
    src.sql("postgres", "CREATE TABLE t AS SELECT g, md5(g::text) FROM generate_series(1, 30000) g");
    let mut e = env.to_vec();
    e.push(("CLOUD_DUMP_DB_URL".into(), src.repl_url()));
    cloud_dump(&["backup", "--repo", url, "--name", "rt", "--compression", "lz4"], &e).ok();
    let work = scratch_dir("backends");
    let pgdata = work.path().join("data");
    let mut restored = restore_and_start(&src.bin, &pgdata, &["--repo", url, "--name", "rt"], env);
    assert_eq!(restored.fingerprint(), src.fingerprint(), "{url}: the restore differs");
    restored.stop();
    let seg = work.path().join("000000010000000000000042");
    let bytes: Vec<u8> = (0..(16u32 << 20)).map(|i| (i % 253) as u8).collect();
    std::fs::write(&seg, &bytes).unwrap();
    cloud_dump(&["wal-push", seg.to_str().unwrap(), "000000010000000000000042", "--repo", url], env).ok();
    let back = work.path().join("fetched");
    cloud_dump(
        &["wal-fetch", "000000010000000000000042", back.to_str().unwrap(), "--repo", url, "--prefetch", "0"],
        env,
    )
    .ok();
    assert!(std::fs::read(&back).unwrap() == bytes, "{url}: wal-fetch returned other bytes");
    let r = cloud_dump(&["wal-fetch", "000000010000000000000043", back.to_str().unwrap(), "--repo", url], env);
    assert_eq!(r.code, 1, "{url}: a segment not archived is exit 1: {}", r.stderr);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap()
}

#[test]
fn backend_file() {
    let dir = tempfile::tempdir().unwrap();
    let url = file_url(&dir.path().join("repo"));
    runtime().block_on(repository_conformance(&url, &StorageOptions::default()));
    let dir2 = scratch_dir("backend-file");
    round_trips(&file_url(&dir2.path().join("repo")), &[]);
}

#[test]
fn backend_s3() {
    let s3 = S3Server::start(&["conf", "roundtrip"]);
    let opts = StorageOptions {
        s3_endpoint: Some(s3.endpoint.clone()),
        s3_region: Some("us-east-1".into()),
        s3_access_key_id: Some(cloud_dump_testkit::S3_ACCESS_KEY.into()),
        s3_secret_access_key: Some(cloud_dump_testkit::S3_SECRET_KEY.into()),
        ..Default::default()
    };
    runtime().block_on(repository_conformance("s3://conf/p", &opts));
    round_trips("s3://roundtrip/pg", &s3.env());
    // info asks the bucket about versioning with its own signed request: s3s checks the
    // signature before it answers that it does not implement the call (501, not 403).
    let r = cloud_dump(&["info", "--repo", "s3://roundtrip/pg", "--json"], &s3.env()).ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["bucket"]["error"], "GET ?versioning answered HTTP 501", "{}", r.stdout);
}

/// A store whose client reads its settings from the environment (only the test of that
/// store sets them): the suite on `<scheme>://conf/p`, the round trips on
/// `<scheme>://roundtrip/pg`; both containers exist.
fn from_environment(scheme: &str, env: &[(String, String)]) {
    for (k, v) in env {
        std::env::set_var(k, v);
    }
    runtime().block_on(repository_conformance(&format!("{scheme}://conf/p"), &StorageOptions::default()));
    round_trips(&format!("{scheme}://roundtrip/pg"), env);
}

#[test]
fn backend_azure_azurite() {
    let az = cloud_dump_testkit::Azurite::start().unwrap_or_else(|e| panic!("{e}"));
    az.create_container("conf").unwrap();
    az.create_container("roundtrip").unwrap();
    from_environment("az", &az.env());
    std::thread::sleep(Duration::from_millis(10));
}

#[test]
fn backend_gcs_stand_in() {
    let gcs = cloud_dump_testkit::GcsStandIn::start().unwrap_or_else(|e| panic!("{e}"));
    gcs.create_bucket("conf").unwrap();
    gcs.create_bucket("roundtrip").unwrap();
    from_environment("gs", &gcs.env());
}
