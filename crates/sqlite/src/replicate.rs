//! The `replicate` runner: per database, one thread that follows the WAL ([`Db`]) and one
//! task per replica ([`Replica`]); on stop, the threads copy what is left, then the
//! replicas upload it, then everything returns.

use std::sync::Arc;
use std::time::Duration;

use cloud_dump_storage::Repo;
use tokio::sync::watch;

use crate::config::{Config, DbSpec};
use crate::db::{Db, Shared};
use crate::error::{Result, SqliteError};
use crate::metrics::{self, Watched};
use crate::replica::Replica;

/// How often the WAL is looked at (a `stat` and a 32-byte read when nothing changed).
pub const MONITOR_INTERVAL: Duration = Duration::from_millis(100);

struct Running {
    spec: DbSpec,
    shared: Arc<Shared>,
    thread: std::thread::JoinHandle<bool>,
    /// Each replica's task; `Ok(false)` when its final sync failed.
    replicas: Vec<(String, tokio::task::JoinHandle<bool>)>,
    stop_replicas: watch::Sender<bool>,
    stop_db: watch::Sender<bool>,
    replica_metrics: Vec<(String, Arc<crate::replica::ReplicaMetrics>)>,
}

/// What a new config changes: databases to stop (removed, or changed) and to start (new,
/// or changed). A database whose settings are the same keeps running untouched.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadPlan {
    pub keep: Vec<std::path::PathBuf>,
    pub stop: Vec<std::path::PathBuf>,
    pub start: Vec<std::path::PathBuf>,
}

/// The plan from the running databases' specs to the new config's.
pub fn reload_plan(old: &[DbSpec], new: &[DbSpec]) -> ReloadPlan {
    let mut plan = ReloadPlan::default();
    for o in old {
        match new.iter().find(|n| n.path == o.path) {
            Some(n) if same_settings(o, n) => plan.keep.push(o.path.clone()),
            _ => plan.stop.push(o.path.clone()),
        }
    }
    for n in new {
        if !plan.keep.contains(&n.path) {
            plan.start.push(n.path.clone());
        }
    }
    plan
}

/// Whether two specs replicate the same way (keys compared by their public halves).
fn same_settings(a: &DbSpec, b: &DbSpec) -> bool {
    let replica = |x: &crate::config::ReplicaSpec, y: &crate::config::ReplicaSpec| {
        let keys = |r: &crate::config::ReplicaSpec| {
            (
                r.recipients.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
                r.identities.iter().map(|k| k.to_public().to_string()).collect::<Vec<_>>(),
            )
        };
        x.name == y.name
            && x.url == y.url
            && x.storage == y.storage
            && x.sync_interval == y.sync_interval
            && x.snapshot_interval == y.snapshot_interval
            && x.retention == y.retention
            && x.retention_check_interval == y.retention_check_interval
            && x.validation_interval == y.validation_interval
            && x.compression == y.compression
            && keys(x) == keys(y)
    };
    a.path == b.path
        && a.min_checkpoint_pages == b.min_checkpoint_pages
        && a.max_wal_bytes == b.max_wal_bytes
        && a.max_shadow_bytes == b.max_shadow_bytes
        && a.replicas.len() == b.replicas.len()
        && a.replicas.iter().zip(&b.replicas).all(|(x, y)| replica(x, y))
}

/// Opens every database and replica (errors here are the user's to fix), then replicates
/// until `stop` turns true.
pub async fn run(config: &Config, stop: watch::Receiver<bool>) -> Result<()> {
    let (_keep, reloads) = tokio::sync::mpsc::channel(1);
    run_reloading(config, stop, reloads).await
}

/// Like [`run`]; each config received on `reloads` is applied without a restart: removed
/// and changed databases stop cleanly (final sync), new and changed ones start, the others
/// go on untouched. A restarted database continues its generation from its shadow WAL.
pub async fn run_reloading(
    config: &Config,
    mut stop: watch::Receiver<bool>,
    mut reloads: tokio::sync::mpsc::Receiver<Config>,
) -> Result<()> {
    if config.dbs.is_empty() {
        return Err(SqliteError::Config("no databases to replicate: the config has no `dbs`".into()));
    }
    let watched = Arc::new(std::sync::RwLock::new(Vec::new()));
    let mut running = Vec::new();
    for spec in &config.dbs {
        match start(spec, &mut stop).await? {
            Some(r) => running.push(r),
            // Stopped while waiting for this database: stop the ones already running, properly.
            None => break,
        }
    }
    publish(&watched, &running);
    let server = match &config.addr {
        Some(addr) if !addr.is_empty() => {
            let bind = metrics::bind_address(addr);
            let l = tokio::net::TcpListener::bind(&bind)
                .await
                .map_err(|e| SqliteError::Config(format!("cannot listen on {addr} for metrics: {e}")))?;
            tracing::info!(addr = %bind, "metrics at http://{bind}/metrics");
            Some(tokio::spawn(metrics::serve(l, watched.clone())))
        }
        _ => None,
    };
    let mut unsynced = Vec::new();
    let mut reloads_open = true;
    // The databases the config asks for; those of them not running, and why.
    let mut wanted: Vec<DbSpec> = config.dbs.clone();
    let mut not_running: std::collections::BTreeMap<std::path::PathBuf, String> = Default::default();
    // Databases added by a reload that do not exist yet come back here once they do.
    let (appeared_tx, mut appeared) = tokio::sync::mpsc::channel::<DbSpec>(16);
    while !*stop.borrow() {
        tokio::select! {
            changed = stop.changed() => if changed.is_err() { break },
            spec = appeared.recv() => {
                let Some(spec) = spec else { continue };
                let still_wanted = wanted.iter().any(|w| same_settings(w, &spec));
                if !still_wanted || running.iter().any(|r| r.spec.path == spec.path) {
                    continue;
                }
                match prepare(&spec).await {
                    Ok(repos) => match launch(&spec, repos, &mut stop).await {
                        Ok(Some(r)) => {
                            not_running.remove(&spec.path);
                            running.push(r);
                        }
                        Ok(None) => {}
                        Err(e) => { not_running.insert(spec.path.clone(), e.to_string()); }
                    },
                    Err(e) => { not_running.insert(spec.path.clone(), e.to_string()); }
                }
                publish(&watched, &running);
            }
            new = reloads.recv(), if reloads_open => {
                let Some(new) = new else { reloads_open = false; continue };
                if new.dbs.is_empty() {
                    tracing::error!("reload refused: the config names no databases; replication goes on as before");
                    continue;
                }
                if new.addr != config.addr {
                    tracing::warn!("the metrics address changed in the config; it takes effect at the next start");
                }
                let old: Vec<DbSpec> = running.iter().map(|r| r.spec.clone()).collect();
                let mut plan = reload_plan(&old, &new.dbs);
                // Everything a database to start needs is made ready before anything stops: a
                // changed database whose new settings do not work goes on with its old ones.
                let mut ready = Vec::new();
                let mut later = Vec::new();
                for spec in new.dbs.iter().filter(|d| plan.start.contains(&d.path)) {
                    if !spec.path.exists() {
                        later.push(spec.clone());
                        continue;
                    }
                    match prepare(spec).await {
                        Ok(repos) => ready.push((spec.clone(), repos)),
                        Err(e) => {
                            tracing::error!(db = %spec.path.display(), error = %e, "the new settings do not work; this database goes on as it was");
                            plan.stop.retain(|p| p != &spec.path);
                            if !old.iter().any(|o| o.path == spec.path) {
                                not_running.insert(spec.path.clone(), e.to_string());
                            }
                        }
                    }
                }
                tracing::info!(kept = plan.keep.len(), stopped = plan.stop.len(), started = ready.len() + later.len(), "config reloaded");
                let (stopping, kept): (Vec<Running>, Vec<Running>) =
                    running.into_iter().partition(|r| plan.stop.contains(&r.spec.path));
                running = kept;
                publish(&watched, &running);
                for r in stopping {
                    tracing::info!(db = %r.spec.path.display(), "stopping (removed or changed in the config)");
                    unsynced.extend(finish(r).await);
                }
                for (spec, repos) in ready {
                    match launch(&spec, repos, &mut stop).await {
                        Ok(Some(r)) => {
                            not_running.remove(&spec.path);
                            running.push(r);
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::error!(db = %spec.path.display(), error = %e, "cannot start replicating it");
                            not_running.insert(spec.path.clone(), e.to_string());
                        }
                    }
                }
                for spec in later {
                    tracing::warn!(db = %spec.path.display(), "the database does not exist yet; waiting for it to be created");
                    not_running.insert(spec.path.clone(), "it did not exist yet".into());
                    let tx = appeared_tx.clone();
                    let mut stop = stop.clone();
                    tokio::spawn(async move {
                        while !spec.path.exists() {
                            tokio::select! {
                                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                                r = stop.changed() => if r.is_err() || *stop.borrow() { return },
                            }
                        }
                        let _ = tx.send(spec).await;
                    });
                }
                // What the config now asks for: the new specs, except changed databases
                // that went on with their old settings.
                wanted = new.dbs.iter().map(|d| {
                    running.iter().find(|r| r.spec.path == d.path).map(|r| r.spec.clone()).unwrap_or_else(|| d.clone())
                }).collect();
                not_running.retain(|p, _| wanted.iter().any(|w| &w.path == p) && !running.iter().any(|r| &r.spec.path == p));
                publish(&watched, &running);
            }
        }
    }
    tracing::info!("stopping: copying and uploading what is left");
    for r in running {
        unsynced.extend(finish(r).await);
    }
    if let Some(s) = server {
        s.abort();
    }
    if !unsynced.is_empty() {
        return Err(SqliteError::Replica(format!(
            "the final sync failed for replica(s) {}: the last writes are not in the replica",
            unsynced.join(", ")
        )));
    }
    if !not_running.is_empty() {
        let list: Vec<String> = not_running.iter().map(|(p, why)| format!("{} ({why})", p.display())).collect();
        return Err(SqliteError::Replica(format!(
            "the config asked for database(s) that were not replicated: {}",
            list.join(", ")
        )));
    }
    tracing::info!("replication stopped cleanly");
    Ok(())
}

fn publish(watched: &std::sync::RwLock<Vec<Watched>>, running: &[Running]) {
    let now: Vec<Watched> =
        running.iter().map(|r| Watched { db: r.shared.clone(), replicas: r.replica_metrics.clone() }).collect();
    *watched.write().unwrap_or_else(|e| e.into_inner()) = now;
}

/// Starts one database: its lock, replicas and thread. `None` if stopped while waiting
/// for the database to exist.
async fn start(spec: &DbSpec, stop: &mut watch::Receiver<bool>) -> Result<Option<Running>> {
    let repos = prepare(spec).await?;
    launch(spec, repos, stop).await
}

/// What can be checked before a database is (re)started: its replicas' stores.
async fn prepare(spec: &DbSpec) -> Result<Vec<Repo>> {
    let mut repos = Vec::new();
    for r in &spec.replicas {
        let repo = Repo::create(&r.url, &r.storage).await?;
        // Another database's replica: refused before anything starts.
        crate::replica::check_owner(&repo, &spec.path).await?;
        repos.push(repo);
    }
    Ok(repos)
}

async fn launch(spec: &DbSpec, repos: Vec<Repo>, stop: &mut watch::Receiver<bool>) -> Result<Option<Running>> {
    let shared = Shared::new(&spec.path, spec.replicas.len());
    // One replicator per database: two would truncate each other's shadow WAL.
    crate::db::lock_shadow_dir(&shared)?;
    // Open now, so a bad database fails the command instead of a background thread.
    let db = match open_when_present(spec, shared.clone(), stop).await {
        Ok(Some(db)) => db,
        Ok(None) => {
            release(&shared);
            return Ok(None);
        }
        Err(e) => {
            release(&shared);
            return Err(e);
        }
    };
    // The database opened: its replicas are claimed for it (create-only owner records).
    for repo in &repos {
        if let Err(e) = crate::replica::claim_owner(repo, &spec.path).await {
            // SQLite's connections close before the descriptor (closing it first would drop
            // their POSIX locks).
            drop(db);
            release(&shared);
            return Err(e);
        }
    }
    let (stop_replicas, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut metrics = Vec::new();
    for (slot, (r, repo)) in spec.replicas.iter().zip(repos).enumerate() {
        if r.validation_interval.is_some() && !r.recipients.is_empty() && r.identities.is_empty() {
            tracing::warn!(replica = %r.name, "validation-interval needs age identities to decrypt the replica; validations will fail");
        }
        let rep = Replica::new(r.clone(), repo, shared.clone(), slot);
        metrics.push((r.name.clone(), rep.metrics.clone()));
        tasks.push((r.name.clone(), tokio::spawn(rep.run(stop_rx.clone()))));
    }
    let (stop_db, stop_db_rx) = watch::channel(*stop.borrow());
    // The database thread follows the process's stop too.
    let mut global = stop.clone();
    let forward = stop_db.clone();
    tokio::spawn(async move {
        while !*global.borrow() {
            if global.changed().await.is_err() {
                return;
            }
        }
        let _ = forward.send(true);
    });
    let thread = spawn_db_thread(db, spec.clone(), stop_db_rx);
    tracing::info!(db = %spec.path.display(), replicas = spec.replicas.len(), "replicating");
    Ok(Some(Running {
        spec: spec.clone(),
        shared,
        thread,
        replicas: tasks,
        stop_replicas,
        stop_db,
        replica_metrics: metrics,
    }))
}

/// Stops one database: its thread copies what is left, then its replicas upload it. The
/// names of replicas whose final sync failed come back.
async fn finish(r: Running) -> Vec<String> {
    let mut unsynced = Vec::new();
    let _ = r.stop_db.send(true);
    let db = r.spec.path.clone();
    let copied = matches!(tokio::task::spawn_blocking(move || r.thread.join()).await, Ok(Ok(true)));
    if !copied {
        unsynced.push(format!("{} (final copy of its WAL)", db.display()));
    }
    let _ = r.stop_replicas.send(true);
    for (name, t) in r.replicas {
        if !t.await.unwrap_or(false) {
            unsynced.push(name);
        }
    }
    // SQLite has closed the database: its descriptors and locks can go, so that a
    // restart in this process (a reload) can take them again.
    release(&r.shared);
    unsynced
}

fn release(shared: &Shared) {
    *shared.db_file.lock().unwrap_or_else(|e| e.into_inner()) = None;
    shared.lock.lock().unwrap_or_else(|e| e.into_inner()).clear();
    crate::db::forget_replicated(&shared.path);
}

/// Waits (logging once) for a database that does not exist yet; `None` if stopped first.
async fn open_when_present(spec: &DbSpec, shared: Arc<Shared>, stop: &mut watch::Receiver<bool>) -> Result<Option<Db>> {
    let mut told = false;
    while !spec.path.exists() {
        if !told {
            tracing::warn!(db = %spec.path.display(), "the database does not exist yet; waiting for it to be created");
            told = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.changed() => if *stop.borrow() {
                // Created just before the stop (an application that made its database and
                // exited at once): replicated once, by the final sync.
                if spec.path.exists() {
                    break;
                }
                return Ok(None);
            },
        }
    }
    let s = spec.clone();
    tokio::task::spawn_blocking(move || Db::open(&s, shared).map(Some))
        .await
        .map_err(|e| SqliteError::Replica(format!("database thread: {e}")))?
}

/// The database thread; it returns true when its final copy of the WAL succeeded.
fn spawn_db_thread(mut db: Db, spec: DbSpec, stop: watch::Receiver<bool>) -> std::thread::JoinHandle<bool> {
    std::thread::Builder::new()
        .name("cloud-dump-db".into())
        .spawn(move || {
            let mut failing = false;
            loop {
                if *stop.borrow() {
                    let shared = db.shared().clone();
                    if let Err(e) = db.close() {
                        shared.metrics.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::error!(db = %spec.path.display(), error = %e, "final copy of the WAL failed");
                        return false;
                    }
                    return true;
                }
                match db.tick() {
                    Ok(()) => {
                        if failing {
                            tracing::info!(db = %spec.path.display(), "following the WAL again");
                            failing = false;
                        }
                    }
                    Err(SqliteError::Replaced { .. }) => {
                        tracing::warn!(db = %spec.path.display(), "the database file was replaced; reopening it");
                        let shared = db.shared().clone();
                        drop(db);
                        loop {
                            match Db::open(&spec, shared.clone()) {
                                Ok(d) => break db = d,
                                Err(e) => {
                                    tracing::error!(db = %spec.path.display(), error = %e, "cannot reopen the database; retrying");
                                    std::thread::sleep(Duration::from_secs(1));
                                    if *stop.borrow() {
                                        return false;
                                    }
                                }
                            }
                        }
                    }
                    Err(e) => {
                        db.shared().metrics.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if !failing {
                            tracing::error!(db = %spec.path.display(), error = %e, "cannot follow the WAL; retrying");
                            failing = true;
                        }
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
                std::thread::sleep(MONITOR_INTERVAL);
            }
        })
        .expect("spawn the database thread")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ReplicaSpec;

    fn spec(path: &str, url: &str) -> DbSpec {
        DbSpec::new(path.into(), vec![ReplicaSpec::from_url(url, Default::default()).unwrap()])
    }

    #[test]
    fn reload_keeps_what_did_not_change() {
        let old = vec![spec("/a", "file:///ra"), spec("/b", "file:///rb"), spec("/c", "file:///rc")];
        let mut b2 = spec("/b", "file:///rb");
        b2.replicas[0].sync_interval = Duration::from_secs(5);
        let new = vec![spec("/a", "file:///ra"), b2, spec("/d", "file:///rd")];
        let plan = reload_plan(&old, &new);
        assert_eq!(plan.keep, vec![std::path::PathBuf::from("/a")]);
        assert_eq!(plan.stop, vec![std::path::PathBuf::from("/b"), "/c".into()]);
        assert_eq!(plan.start, vec![std::path::PathBuf::from("/b"), "/d".into()]);
        assert_eq!(reload_plan(&old, &old).keep.len(), 3);
        // Credentials count as settings even though they never print.
        let mut secret = spec("/a", "s3://bkt/a");
        secret.replicas[0].storage.s3_secret_access_key = Some("one".into());
        let mut other = secret.clone();
        other.replicas[0].storage.s3_secret_access_key = Some("two".into());
        assert_eq!(reload_plan(&[secret], &[other]).stop.len(), 1);
    }
}
