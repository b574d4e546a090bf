//! Prometheus text exposition of replication state, served at `addr` under `/metrics`.

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::db::{now_ms, Shared};
use crate::replica::ReplicaMetrics;

/// One database and its replicas' counters.
#[derive(Clone)]
pub struct Watched {
    pub db: Arc<Shared>,
    pub replicas: Vec<(String, Arc<ReplicaMetrics>)>,
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

pub fn render(all: &[Watched]) -> String {
    let mut o = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(o, "{name}{{{labels}}} {v}");
        }
    };
    let db_rows = |f: &dyn Fn(&Shared) -> f64| -> Vec<(String, f64)> {
        all.iter().map(|w| (format!("db=\"{}\"", esc(&w.db.path.display().to_string())), f(&w.db))).collect()
    };
    let m = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    family(
        "cloud_dump_sqlite_wal_bytes_total",
        "counter",
        "WAL bytes copied into the shadow WAL.",
        db_rows(&|d| m(&d.metrics.wal_bytes)),
    );
    family(
        "cloud_dump_sqlite_wal_size_bytes",
        "gauge",
        "Size of the database's WAL file.",
        db_rows(&|d| m(&d.metrics.wal_size)),
    );
    family(
        "cloud_dump_sqlite_shadow_bytes",
        "gauge",
        "Bytes of WAL kept in the shadow directory for replicas not yet caught up.",
        db_rows(&|d| m(&d.metrics.shadow_bytes)),
    );
    family(
        "cloud_dump_sqlite_checkpoints_total",
        "counter",
        "Checkpoints run by cloud-dump.",
        db_rows(&|d| m(&d.metrics.checkpoints)),
    );
    family(
        "cloud_dump_sqlite_checkpoint_errors_total",
        "counter",
        "Checkpoints that failed.",
        db_rows(&|d| m(&d.metrics.checkpoint_errors)),
    );
    family(
        "cloud_dump_sqlite_generations_total",
        "counter",
        "Generations started (each needs a full snapshot).",
        db_rows(&|d| m(&d.metrics.generations)),
    );
    family(
        "cloud_dump_sqlite_errors_total",
        "counter",
        "Errors while following the database's WAL.",
        db_rows(&|d| m(&d.metrics.errors)),
    );
    let gen_rows: Vec<(String, f64)> = all
        .iter()
        .map(|w| {
            let p = w.db.pos.borrow().clone();
            (
                format!("db=\"{}\",generation=\"{}\"", esc(&w.db.path.display().to_string()), p.generation),
                p.index as f64,
            )
        })
        .collect();
    family(
        "cloud_dump_sqlite_wal_index",
        "gauge",
        "Current generation (label) and WAL index of the shadow WAL.",
        gen_rows,
    );
    let rep_rows = |f: &dyn Fn(&Shared, &ReplicaMetrics) -> f64| -> Vec<(String, f64)> {
        all.iter()
            .flat_map(|w| {
                w.replicas.iter().map(move |(name, r)| {
                    (format!("db=\"{}\",replica=\"{}\"", esc(&w.db.path.display().to_string()), esc(name)), f(&w.db, r))
                })
            })
            .collect()
    };
    family("cloud_dump_sqlite_replica_syncs_total", "counter", "WAL uploads.", rep_rows(&|_, r| m(&r.syncs)));
    family(
        "cloud_dump_sqlite_replica_sync_errors_total",
        "counter",
        "Failed syncs (retried at the next interval).",
        rep_rows(&|_, r| m(&r.sync_errors)),
    );
    family(
        "cloud_dump_sqlite_replica_snapshots_total",
        "counter",
        "Snapshots uploaded.",
        rep_rows(&|_, r| m(&r.snapshots)),
    );
    family(
        "cloud_dump_sqlite_replica_bytes_total",
        "counter",
        "Bytes stored (compressed, encrypted).",
        rep_rows(&|_, r| m(&r.bytes)),
    );
    family(
        "cloud_dump_sqlite_replica_lag_seconds",
        "gauge",
        "How far the replica is behind the shadow WAL: now minus the time of the oldest data not yet uploaded (0 when caught up).",
        rep_rows(&|d, r| {
            let shadow = d.pos.borrow().time_ms;
            let at = r.position_time_ms.load(Ordering::Relaxed);
            if at >= shadow { 0.0 } else { (now_ms() - at.max(0)).max(0) as f64 / 1000.0 }
        }),
    );
    family(
        "cloud_dump_sqlite_replica_last_sync_lag_seconds",
        "gauge",
        "Read-from-WAL to durable-in-replica time of the last upload.",
        rep_rows(&|_, r| r.lag_ms.load(Ordering::Relaxed) as f64 / 1000.0),
    );
    o
}

/// Connections served at once; more are closed at once (a scraper needs one).
pub const MAX_CONNECTIONS: usize = 16;
/// A connection that has not sent its request, or not taken the answer, by then is closed.
pub const CONNECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves `GET /metrics` until the task is dropped. Bounded so it cannot starve
/// replication: at most [`MAX_CONNECTIONS`] at once, each closed after
/// [`CONNECTION_TIMEOUT`], and accept errors (out of descriptors) back off instead of
/// spinning.
pub async fn serve(listener: TcpListener, all: Arc<std::sync::RwLock<Vec<Watched>>>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let mut sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: accept failed; pausing");
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(sock);
            continue;
        };
        let all = all.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, answer(&mut sock, &all)).await;
        });
    }
}

async fn answer(sock: &mut tokio::net::TcpStream, all: &std::sync::RwLock<Vec<Watched>>) {
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    while n < buf.len() {
        match sock.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => return,
            Ok(k) => n += k,
        }
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let (status, body) = if head.starts_with("GET /metrics ") || head.starts_with("GET /metrics?") {
        ("200 OK", render(&all.read().unwrap_or_else(|e| e.into_inner())))
    } else {
        ("404 Not Found", "not found; metrics are at /metrics\n".to_owned())
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
}

/// Where `addr` listens: `:PORT` is loopback only (127.0.0.1:PORT); give an address
/// (`0.0.0.0:9090`, `[::]:9090`) to listen beyond this host.
pub fn bind_address(addr: &str) -> String {
    match addr.strip_prefix(':') {
        Some(port) => format!("127.0.0.1:{port}"),
        None => addr.to_owned(),
    }
}
