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
    db: std::path::PathBuf,
    thread: std::thread::JoinHandle<bool>,
    /// Each replica's task; `Ok(false)` when its final sync failed.
    replicas: Vec<(String, tokio::task::JoinHandle<bool>)>,
    stop_replicas: watch::Sender<bool>,
}

/// Opens every database and replica (errors here are the user's to fix), then replicates
/// until `stop` turns true.
pub async fn run(config: &Config, mut stop: watch::Receiver<bool>) -> Result<()> {
    if config.dbs.is_empty() {
        return Err(SqliteError::Config("no databases to replicate: the config has no `dbs`".into()));
    }
    let mut watched = Vec::new();
    let mut running = Vec::new();
    for spec in &config.dbs {
        let shared = Shared::new(&spec.path, spec.replicas.len());
        // One replicator per database: two would truncate each other's shadow WAL.
        crate::db::lock_shadow_dir(&shared)?;
        let mut repos = Vec::new();
        for r in &spec.replicas {
            repos.push(Repo::create(&r.url, &r.storage).await?);
        }
        // Open now, so a bad database fails the command instead of a background thread.
        let db = open_when_present(spec, shared.clone(), &mut stop).await?;
        // Stopped while waiting for this database: stop the ones already running, properly.
        let Some(db) = db else { break };
        let (stop_replicas, stop_rx) = watch::channel(false);
        let mut w = Watched { db: shared.clone(), replicas: Vec::new() };
        let mut tasks = Vec::new();
        for (slot, (r, repo)) in spec.replicas.iter().zip(repos).enumerate() {
            if r.validation_interval.is_some() && !r.recipients.is_empty() && r.identities.is_empty() {
                tracing::warn!(replica = %r.name, "validation-interval needs age identities to decrypt the replica; validations will fail");
            }
            let rep = Replica::new(r.clone(), repo, shared.clone(), slot);
            w.replicas.push((r.name.clone(), rep.metrics.clone()));
            tasks.push((r.name.clone(), tokio::spawn(rep.run(stop_rx.clone()))));
        }
        watched.push(w);
        let thread = spawn_db_thread(db, spec.clone(), stop.clone());
        running.push(Running { db: spec.path.clone(), thread, replicas: tasks, stop_replicas });
        tracing::info!(db = %spec.path.display(), replicas = spec.replicas.len(), "replicating");
    }
    let server = match &config.addr {
        Some(addr) if !addr.is_empty() => {
            let bind = metrics::bind_address(addr);
            let l = tokio::net::TcpListener::bind(&bind)
                .await
                .map_err(|e| SqliteError::Config(format!("cannot listen on {addr} for metrics: {e}")))?;
            tracing::info!(addr = %bind, "metrics at http://{bind}/metrics");
            Some(tokio::spawn(metrics::serve(l, watched)))
        }
        _ => None,
    };
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            break;
        }
    }
    tracing::info!("stopping: copying and uploading what is left");
    let mut unsynced = Vec::new();
    for r in running {
        let copied = matches!(tokio::task::spawn_blocking(move || r.thread.join()).await, Ok(Ok(true)));
        if !copied {
            unsynced.push(format!("{} (final copy of its WAL)", r.db.display()));
        }
        let _ = r.stop_replicas.send(true);
        for (name, t) in r.replicas {
            if !t.await.unwrap_or(false) {
                unsynced.push(name);
            }
        }
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
    tracing::info!("replication stopped cleanly");
    Ok(())
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
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.changed() => if *stop.borrow() { return Ok(None) },
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
