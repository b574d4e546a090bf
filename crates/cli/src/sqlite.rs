//! `cloud-dump sqlite …`: turns flags and the YAML config into the sqlite crate's settings.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use cloud_dump_pipeline::{parse_recipients, Compression, Decryption};
use cloud_dump_sqlite::config::{parse_duration, Config, DbSpec, ReplicaSpec};
use cloud_dump_sqlite::layout::Kind;
use cloud_dump_sqlite::restore::{self, format_ms, Target};
use cloud_dump_sqlite::stored::{self, StoredReplica};
use cloud_dump_sqlite::SqliteError;
use cloud_dump_storage::Repo;
use serde::Serialize;
use tokio::sync::watch;

use crate::args::{
    GlobalArgs, SqliteCommand, SqliteConfigArg, SqliteDatabasesArgs, SqliteListArgs, SqliteReplicateArgs,
    SqliteRestoreArgs,
};
use crate::setup;

const DEFAULT_CONFIG: &str = "/etc/cloud-dump.yml";

/// Litestream's Go-style single-dash long flags (`-config`, `-timestamp=…`) become
/// `--config`, `--timestamp=…` after `sqlite`; `-o` and other one-letter flags stay.
pub fn litestream_flags(args: Vec<String>) -> Vec<String> {
    let Some(at) = args.iter().position(|a| a == "sqlite") else { return args };
    args.into_iter()
        .enumerate()
        .map(|(i, a)| {
            let name = a.strip_prefix('-').filter(|r| !r.starts_with('-'));
            match name {
                Some(n)
                    if i > at
                        && n.split('=')
                            .next()
                            .is_some_and(|f| f.len() > 1 && f.chars().all(|c| c.is_ascii_lowercase() || c == '-')) =>
                {
                    format!("-{a}")
                }
                _ => a,
            }
        })
        .collect()
}

pub async fn run(g: &GlobalArgs, cmd: &SqliteCommand) -> Result<ExitCode> {
    match cmd {
        SqliteCommand::Replicate(a) => replicate(g, a).await,
        SqliteCommand::Restore(a) => restore(g, a).await,
        SqliteCommand::Generations(a) => list(g, a, Listing::Generations).await,
        SqliteCommand::Snapshots(a) => list(g, a, Listing::Snapshots).await,
        SqliteCommand::Wal(a) => list(g, a, Listing::Wal).await,
        SqliteCommand::Databases(a) => databases(a),
        SqliteCommand::Verify(a) => verify(g, a).await,
        SqliteCommand::Info(a) => info(g, a).await,
    }
}

fn config_path(c: &SqliteConfigArg) -> PathBuf {
    c.config.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG))
}

fn load_config(c: &SqliteConfigArg) -> Result<Config> {
    let path = config_path(c);
    if c.config.is_none() && !path.exists() {
        bail!("no config file at {DEFAULT_CONFIG}: give --config FILE (or CLOUD_DUMP_CONFIG), or a database path and replica URL");
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read config file {}", path.display()))?;
    crate::check_file_permissions(&path, &text).map_err(anyhow::Error::msg)?;
    let cfg = Config::parse(&text, &path.display().to_string())?;
    for k in &cfg.ignored {
        tracing::warn!(config = %path.display(), key = %k, "unknown config key ignored");
    }
    Ok(cfg)
}

async fn replicate(g: &GlobalArgs, a: &SqliteReplicateArgs) -> Result<ExitCode> {
    let mut cfg = match &a.db {
        Some(db) => {
            if a.config.config.is_some() {
                bail!("give either --config or a database path and replica URL, not both");
            }
            if a.replicas.is_empty() {
                bail!("replicate {}: give at least one replica URL after the database path", db.display());
            }
            let mut replicas = Vec::new();
            for url in &a.replicas {
                let mut r = ReplicaSpec::from_url(url, setup::storage_options(g))?;
                if let Some(s) = &a.sync_interval {
                    r.sync_interval = parse_duration(s).map_err(anyhow::Error::msg).context("--sync-interval")?;
                    if r.sync_interval.is_zero() {
                        bail!("--sync-interval must be more than 0");
                    }
                }
                if let Some(c) = &a.compression {
                    r.compression = Compression::from_str(c).map_err(anyhow::Error::msg).context("--compression")?;
                }
                if let Some(f) = &a.age_recipient_file {
                    let text = std::fs::read_to_string(f)
                        .with_context(|| format!("cannot read recipient file {}", f.display()))?;
                    r.recipients = parse_recipients(&text, &f.display().to_string())?;
                }
                replicas.push(r);
            }
            if replicas.len() > 1 {
                for (i, r) in replicas.iter_mut().enumerate() {
                    r.name = format!("{}{}", r.name, i + 1);
                }
            }
            let path = std::path::absolute(db).unwrap_or_else(|_| db.clone());
            Config { addr: None, dbs: vec![DbSpec::new(path, replicas)], ignored: Vec::new() }
        }
        None => load_config(&a.config)?,
    };
    if let Some(addr) = &a.addr {
        cfg.addr = Some(addr.clone());
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    // The application runs in its own process group, so a signal reaches all of it (a
    // compound `sh -c` command included), not just the shell.
    // A simple command is exec'd by the shell (dash would otherwise keep itself as the
    // parent, die at once on SIGTERM and report 143 while the application still writes).
    let mut child = match &a.exec {
        Some(cmd) => Some(
            tokio::process::Command::new("sh")
                .arg("-c")
                .arg(if is_simple_command(cmd) { format!("exec {cmd}") } else { cmd.clone() })
                .process_group(0)
                .spawn()
                .with_context(|| format!("cannot start --exec command {cmd:?}"))?,
        ),
        None => None,
    };
    let group = child.as_ref().and_then(|c| c.id());
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
    let replication = tokio::spawn({
        let cfg = cfg.clone();
        async move { cloud_dump_sqlite::replicate::run_reloading(&cfg, stop_rx, reload_rx).await }
    });
    tokio::pin!(replication);
    // With --exec, replication goes on until the application has exited (its last writes
    // are replicated), a final sync follows, and the application's status is ours.
    let mut exit = ExitCode::SUCCESS;
    loop {
        let child_wait = async {
            match child.as_mut() {
                Some(c) => c.wait().await.ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = &mut replication => {
                // Replication ended by itself: only a startup error does that.
                if let Some(c) = child.as_mut() {
                    forward(c, Signal::SIGTERM);
                    let _ = c.wait().await;
                }
                r.context("replication task")??;
                return Ok(ExitCode::from(1));
            }
            _ = sigint.recv() => {
                tracing::info!("SIGINT received");
                match child.as_ref() {
                    Some(c) => forward(c, Signal::SIGINT),
                    None => break,
                }
            }
            _ = sigterm.recv() => {
                tracing::info!("SIGTERM received");
                match child.as_ref() {
                    Some(c) => forward(c, Signal::SIGTERM),
                    None => break,
                }
            }
            _ = sighup.recv() => {
                if a.db.is_some() {
                    tracing::warn!("SIGHUP: the database and replicas come from the command line; nothing to reload");
                    continue;
                }
                match load_config(&a.config) {
                    Ok(mut new) => {
                        if let Some(addr) = &a.addr {
                            new.addr = Some(addr.clone());
                        }
                        tracing::info!(config = %config_path(&a.config).display(), "SIGHUP: reloading the config");
                        if reload_tx.try_send(new).is_err() {
                            tracing::warn!("SIGHUP: a reload is already under way; send it again when it is done");
                        }
                    }
                    Err(e) => tracing::error!(
                        "SIGHUP: the config file is not usable, replication goes on as before: {}",
                        cloud_dump_storage::one_line(e.as_ref())
                    ),
                }
            }
            status = child_wait => {
                exit = ExitCode::from(exit_status_code(status));
                // The shell is gone; the application (a compound command's processes) may
                // not be: replication goes on until its whole process group has exited.
                if let Some(pgid) = group {
                    let mut told = false;
                    while group_alive(pgid) {
                        if !told {
                            tracing::info!("the --exec shell exited; waiting for the rest of its process group");
                            told = true;
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
                            _ = sigint.recv() => { let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid as i32), Signal::SIGINT); }
                            _ = sigterm.recv() => { let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid as i32), Signal::SIGTERM); }
                        }
                    }
                }
                tracing::info!("the --exec command exited; stopping replication after a final sync");
                break;
            }
        }
    }
    let _ = stop_tx.send(true);
    replication.await.context("replication task")??;
    Ok(exit)
}

use nix::sys::signal::Signal;

/// Whether any process of process group `pgid` is still alive (signal 0 reaches it).
fn group_alive(pgid: u32) -> bool {
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid as i32), None).is_ok()
}

/// A command the shell can `exec`: one program with plain arguments (no operators,
/// redirections, expansions, quotes or assignments), not a shell keyword or builtin.
fn is_simple_command(cmd: &str) -> bool {
    const SPECIAL: &[char] = &[
        ';', '&', '|', '<', '>', '(', ')', '$', '`', '\\', '"', '\'', '*', '?', '[', ']', '{', '}', '~', '!', '#',
        '\n', '=',
    ];
    const BUILTINS: &[&str] = &[
        "cd", "exec", "exit", "export", "set", "unset", "eval", ".", "source", "if", "for", "while", "until", "case",
        "trap", "wait", "ulimit", "umask", "read", "shift", "alias", "command", "time",
    ];
    let first = cmd.split_whitespace().next().unwrap_or("");
    !first.is_empty() && !cmd.contains(SPECIAL) && !BUILTINS.contains(&first)
}

/// Sends `sig` to the application's process group, as received.
fn forward(child: &tokio::process::Child, sig: Signal) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), sig);
    }
}

/// The shell's convention: the exit code, or 128 + the signal that ended the process.
fn exit_status_code(status: Option<std::process::ExitStatus>) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Some(s) => match (s.code(), s.signal()) {
            (Some(c), _) => c.clamp(0, 255) as u8,
            (None, Some(sig)) => (128 + sig).clamp(0, 255) as u8,
            _ => 1,
        },
        None => 1,
    }
}

/// The replicas to read from: those of a configured database, or one URL.
fn resolve(
    g: &GlobalArgs,
    config: &SqliteConfigArg,
    target: &str,
    replica: Option<&str>,
) -> Result<(Option<PathBuf>, Vec<ReplicaSpec>)> {
    if target.contains("://") {
        if replica.is_some() {
            bail!("--replica picks among a database's configured replicas; with a replica URL it is not needed");
        }
        return Ok((None, vec![ReplicaSpec::from_url(target, setup::storage_options(g))?]));
    }
    let cfg = load_config(config)?;
    let path = Path::new(target);
    let Some(db) = cfg.db(path) else {
        let known: Vec<String> = cfg.dbs.iter().map(|d| d.path.display().to_string()).collect();
        bail!(
            "database {target} is not in {} (it has: {}); give a replica URL instead",
            config_path(config).display(),
            if known.is_empty() { "none".to_owned() } else { known.join(", ") }
        );
    };
    let reps: Vec<ReplicaSpec> = db.replicas.iter().filter(|r| replica.is_none_or(|n| r.name == n)).cloned().collect();
    if reps.is_empty() {
        let names: Vec<&str> = db.replicas.iter().map(|r| r.name.as_str()).collect();
        bail!("database {target} has no replica named {:?} (it has: {})", replica.unwrap_or(""), names.join(", "));
    }
    Ok((Some(db.path.clone()), reps))
}

fn decryption_for(r: &ReplicaSpec, files: &[PathBuf]) -> Result<Decryption> {
    let mut ids = r.identities.clone();
    for f in files {
        ids.extend(setup::read_identities(f)?);
    }
    Ok(if ids.is_empty() { Decryption::None } else { Decryption::Identities(ids) })
}

/// A WAL index: decimal, or hex written `0x…` or with hex letters as `wal` lists it
/// (`0000000a`). Eight digits with leading zeros that read differently as decimal and hex
/// (`00000010`) are refused as ambiguous rather than guessed.
fn parse_index(s: &str) -> Result<u64> {
    let bad = || anyhow::anyhow!("invalid --index {s:?}: a WAL index, decimal or 0x-prefixed hex");
    if let Some(h) = s.strip_prefix("0x") {
        return u64::from_str_radix(h, 16).map_err(|_| bad());
    }
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit()) && !s.bytes().all(|b| b.is_ascii_digit()) {
        return u64::from_str_radix(s, 16).map_err(|_| bad());
    }
    let dec: u64 = s.parse().map_err(|_| bad())?;
    if s.len() > 1 && s.starts_with('0') && u64::from_str_radix(s, 16).ok() != Some(dec) {
        bail!("--index {s:?} is ambiguous (decimal {dec} or hex 0x{s}): write it without leading zeros for decimal or with 0x for hex");
    }
    Ok(dec)
}

#[cfg(test)]
mod tests {
    use super::parse_index;

    #[test]
    fn indexes_are_decimal_unless_marked_hex() {
        assert_eq!(parse_index("12345678").unwrap(), 12_345_678);
        assert_eq!(parse_index("10").unwrap(), 10);
        assert_eq!(parse_index("0x10").unwrap(), 16);
        assert_eq!(parse_index("0000000a").unwrap(), 10);
        assert_eq!(parse_index("00000000").unwrap(), 0);
        assert_eq!(parse_index("00000007").unwrap(), 7);
        assert!(parse_index("00000010").unwrap_err().to_string().contains("ambiguous"));
        assert!(parse_index("ten").is_err());
    }
}

pub fn parse_timestamp(s: &str) -> Result<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|_| anyhow::anyhow!("invalid --timestamp {s:?}: use RFC 3339, e.g. 2026-11-20T10:00:00Z"))?;
    Ok((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

async fn restore(g: &GlobalArgs, a: &SqliteRestoreArgs) -> Result<ExitCode> {
    let (db_path, replicas) = resolve(g, &a.config, &a.target, a.replica.as_deref())?;
    let out = match (&a.output, &db_path) {
        (Some(o), _) => o.clone(),
        (None, Some(p)) => p.clone(),
        (None, None) => bail!("restoring from a replica URL needs -o PATH for the restored database"),
    };
    if out.exists() {
        if a.if_db_not_exists {
            println!("{} already exists; nothing to do (--if-db-not-exists)", out.display());
            return Ok(ExitCode::SUCCESS);
        }
        bail!("{} already exists; restore never overwrites (remove it or give another -o)", out.display());
    }
    let index = match &a.index {
        Some(s) => Some(parse_index(s)?),
        None => None,
    };
    if let Some(gen) = &a.generation {
        if !cloud_dump_sqlite::layout::is_generation(gen) {
            bail!("invalid --generation {gen:?}: 16 lowercase hex digits, as `generations` shows");
        }
    }
    let target = Target {
        generation: a.generation.clone(),
        index,
        timestamp_ms: a.timestamp.as_deref().map(parse_timestamp).transpose()?,
    };
    // Plan on every candidate replica (one LIST each); restore from the newest. A replica
    // that cannot be read or planned is an error, never skipped: restoring from another,
    // lagging replica would return an older state as if it were the newest.
    let mut best: Option<(ReplicaSpec, Repo, restore::Plan)> = None;
    let (mut empty, mut errors) = (Vec::new(), Vec::new());
    for r in replicas {
        let planned = match Repo::open(&r.url, &r.storage).await {
            Ok(repo) => {
                let keys = !matches!(decryption_for(&r, &a.age.age_identity_file)?, Decryption::None)
                    || !r.recipients.is_empty();
                // A replica that belongs to another database is never restored as this one.
                if let Some(db) = &db_path {
                    cloud_dump_sqlite::replica::check_owner(&repo, db).await?;
                }
                StoredReplica::new(&repo).plan_restore(&target, keys).await.map(|p| (repo, p))
            }
            Err(e) => Err(e.into()),
        };
        match planned {
            Ok((repo, p)) => {
                if best.as_ref().is_none_or(|(_, _, b)| p.time_ms > b.time_ms) {
                    best = Some((r, repo, p));
                }
            }
            Err(SqliteError::EmptyReplica(why)) => empty.push(format!("{}: {why}", r.url)),
            // A file:// replica whose directory does not exist at all was never written; an
            // empty directory without the marker is an unmounted volume: an error.
            Err(SqliteError::Storage(cloud_dump_storage::StorageError::MissingRepository { url: why }))
                if cloud_dump_storage::Location::parse(&r.url)
                    .is_ok_and(|l| matches!(l, cloud_dump_storage::Location::File { ref path } if !path.exists())) =>
            {
                empty.push(format!("{}: {why}", r.url))
            }
            Err(e) => errors.push(format!("{}: {e}", r.url)),
        }
    }
    if !errors.is_empty() {
        bail!(
            "cannot restore: {}{}",
            errors.join("; "),
            if best.is_some() { " (give --replica NAME to restore from another replica)" } else { "" }
        );
    }
    let Some((spec, repo, plan)) = best else {
        if a.if_replica_exists {
            println!("no backup found; nothing to do (--if-replica-exists): {}", empty.join("; "));
            return Ok(ExitCode::SUCCESS);
        }
        bail!("nothing to restore: {}", empty.join("; "));
    };
    let wal_bytes: u64 = plan.wal.iter().map(|w| w.size).sum();
    println!(
        "restore plan: replica {} ({}), generation {}, snapshot {} ({} bytes), {} WAL objects ({} bytes), up to index {:08x} offset {:08x}, data as of {}",
        spec.name,
        spec.url,
        plan.generation,
        plan.snapshot.key,
        plan.snapshot.size,
        plan.wal.len(),
        wal_bytes,
        plan.index,
        plan.offset,
        format_ms(plan.time_ms)
    );
    if a.dry_run {
        for w in &plan.wal {
            println!("  wal {} ({} bytes)", w.key, w.size);
        }
        println!("dry run: nothing written");
        return Ok(ExitCode::SUCCESS);
    }
    let dec = decryption_for(&spec, &a.age.age_identity_file)?;
    let started = std::time::Instant::now();
    let done = restore::execute(&repo, &plan, dec, &out, a.parallelism as usize).await?;
    println!(
        "restored {} ({} bytes, {} WAL frames replayed, integrity_check ok) in {:.1} s",
        done.path.display(),
        done.bytes,
        done.frames,
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Clone, Copy, PartialEq)]
enum Listing {
    Generations,
    Snapshots,
    Wal,
}

#[derive(Serialize)]
struct GenerationRow {
    replica: String,
    generation: String,
    snapshots: usize,
    wal_objects: usize,
    bytes: u64,
    start: String,
    end: String,
    lag_seconds: f64,
}

#[derive(Serialize)]
struct ObjectRow {
    replica: String,
    generation: String,
    index: String,
    offset: Option<String>,
    start: Option<String>,
    end: Option<String>,
    size: u64,
    created: String,
    key: String,
}

async fn list(g: &GlobalArgs, a: &SqliteListArgs, what: Listing) -> Result<ExitCode> {
    let (_, replicas) = resolve(g, &a.config, &a.target, a.replica.as_deref())?;
    let mut gens = Vec::new();
    let mut objects = Vec::new();
    for r in &replicas {
        let repo = Repo::open(&r.url, &r.storage).await?;
        let entries = StoredReplica::new(&repo).entries().await?;
        let now = cloud_dump_sqlite::db::now_ms();
        for gen in stored::generations(&entries) {
            gens.push(GenerationRow {
                replica: r.name.clone(),
                generation: gen.generation,
                snapshots: gen.snapshots,
                wal_objects: gen.wal_objects,
                bytes: gen.bytes,
                start: format_ms(gen.first_ms),
                end: format_ms(gen.last_ms),
                lag_seconds: (now - gen.last_ms) as f64 / 1000.0,
            });
        }
        for e in &entries {
            let keep = match what {
                Listing::Snapshots => e.is_snapshot(),
                Listing::Wal => e.is_wal(),
                Listing::Generations => false,
            };
            if !keep {
                continue;
            }
            let (offset, start, end) = match e.kind {
                Kind::Snapshot { offset } => (Some(format!("{offset:08x}")), None, None),
                Kind::Wal { start, end } => (None, Some(format!("{start:08x}")), Some(format!("{end:08x}"))),
                Kind::IndexEnd { .. } => continue,
            };
            objects.push(ObjectRow {
                replica: r.name.clone(),
                generation: e.generation.clone(),
                index: format!("{:08x}", e.index),
                offset,
                start,
                end,
                size: e.size,
                created: format_ms(e.time_ms),
                key: e.key.clone(),
            });
        }
    }
    if what == Listing::Generations {
        if a.json {
            println!("{}", serde_json::to_string_pretty(&gens)?);
        } else {
            println!(
                "{:<10} {:<16} {:>9} {:>6} {:>12} {:<24} {:<24} {:>10}",
                "replica", "generation", "snapshots", "wal", "bytes", "start", "end", "lag"
            );
            for r in &gens {
                println!(
                    "{:<10} {:<16} {:>9} {:>6} {:>12} {:<24} {:<24} {:>9.1}s",
                    r.replica, r.generation, r.snapshots, r.wal_objects, r.bytes, r.start, r.end, r.lag_seconds
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&objects)?);
    } else if what == Listing::Snapshots {
        println!(
            "{:<10} {:<16} {:<8} {:<8} {:>12} {:<24}",
            "replica", "generation", "index", "offset", "size", "created"
        );
        for o in &objects {
            println!(
                "{:<10} {:<16} {:<8} {:<8} {:>12} {:<24}",
                o.replica,
                o.generation,
                o.index,
                o.offset.as_deref().unwrap_or(""),
                o.size,
                o.created
            );
        }
    } else {
        println!(
            "{:<10} {:<16} {:<8} {:<8} {:<8} {:>10} {:<24}",
            "replica", "generation", "index", "start", "end", "size", "created"
        );
        for o in &objects {
            println!(
                "{:<10} {:<16} {:<8} {:<8} {:<8} {:>10} {:<24}",
                o.replica,
                o.generation,
                o.index,
                o.start.as_deref().unwrap_or(""),
                o.end.as_deref().unwrap_or(""),
                o.size,
                o.created
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct DatabaseRow {
    path: String,
    replicas: Vec<ReplicaRow>,
}

#[derive(Serialize)]
struct ReplicaRow {
    name: String,
    url: String,
    sync_interval: String,
    retention: String,
    compression: String,
    encrypted: bool,
}

fn databases(a: &SqliteDatabasesArgs) -> Result<ExitCode> {
    let cfg = load_config(&a.config)?;
    let rows: Vec<DatabaseRow> = cfg
        .dbs
        .iter()
        .map(|d| DatabaseRow {
            path: d.path.display().to_string(),
            replicas: d
                .replicas
                .iter()
                .map(|r| ReplicaRow {
                    name: r.name.clone(),
                    url: r.url.clone(),
                    sync_interval: format!("{:?}", r.sync_interval),
                    retention: format!("{:?}", r.retention),
                    compression: r.compression.to_string(),
                    encrypted: !r.recipients.is_empty(),
                })
                .collect(),
        })
        .collect();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<40} {:<10} {:<40} {:>8} {:>10} {:<6} age", "path", "replica", "url", "sync", "retention", "codec");
    for d in &rows {
        for r in &d.replicas {
            println!(
                "{:<40} {:<10} {:<40} {:>8} {:>10} {:<6} {}",
                d.path,
                r.name,
                r.url,
                r.sync_interval,
                r.retention,
                r.compression,
                if r.encrypted { "yes" } else { "no" }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct ReplicaVerify {
    replica: String,
    url: String,
    generations: Vec<cloud_dump_sqlite::verify::GenerationCheck>,
}

async fn verify(g: &GlobalArgs, a: &crate::args::SqliteVerifyArgs) -> Result<ExitCode> {
    let (_, replicas) = resolve(g, &a.config, &a.target, a.replica.as_deref())?;
    let scratch = tempfile::Builder::new().prefix("cloud-dump-sqlite-verify-").tempdir()?;
    let mut reports = Vec::new();
    let mut problems = Vec::new();
    for r in &replicas {
        let repo = Repo::open(&r.url, &r.storage).await?;
        let dec = decryption_for(r, &a.age.age_identity_file)?;
        let can = !matches!(dec, Decryption::None);
        let checks = StoredReplica::new(&repo).verify(&dec, can, scratch.path(), a.parallelism as usize).await?;
        if checks.is_empty() {
            problems.push(format!("replica {} ({}): holds no generation", r.name, r.url));
        }
        for c in checks.iter().filter(|c| !c.ok) {
            problems.push(format!("replica {} generation {}: {}", r.name, c.generation, c.detail));
        }
        reports.push(ReplicaVerify { replica: r.name.clone(), url: r.url.clone(), generations: checks });
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for rep in &reports {
            for c in &rep.generations {
                println!(
                    "replica {} generation {}: {} — {}{}",
                    rep.replica,
                    c.generation,
                    if c.ok { "ok" } else { "FAILED" },
                    c.detail,
                    c.data_time.as_ref().map(|t| format!(" (data as of {t})")).unwrap_or_default()
                );
            }
        }
    }
    if problems.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    crate::report_error("", &anyhow::anyhow!("verify found {} problem(s): {}", problems.len(), problems.join("; ")));
    Ok(ExitCode::from(1))
}

#[derive(Serialize)]
struct ReplicaInfo {
    replica: String,
    url: String,
    generations: usize,
    bytes: u64,
    /// The newest generation's span: from its first snapshot to its newest upload.
    restorable_from: Option<String>,
    restorable_to: Option<String>,
    lag_seconds: Option<f64>,
    #[serde(skip)]
    to_ms: Option<i64>,
}

async fn info(g: &GlobalArgs, a: &crate::args::SqliteInfoArgs) -> Result<ExitCode> {
    let (_, replicas) = resolve(g, &a.config, &a.target, a.replica.as_deref())?;
    let now = cloud_dump_sqlite::db::now_ms();
    let mut rows = Vec::new();
    for r in &replicas {
        let repo = Repo::open(&r.url, &r.storage).await?;
        let entries = StoredReplica::new(&repo).entries().await?;
        let gens = stored::generations(&entries);
        // The newest generation's span: from its first complete snapshot to its newest upload.
        let newest = stored::newest(&entries).and_then(|n| gens.iter().find(|g| g.generation == n));
        let (from, to) = newest.map_or((None, None), |g| (g.restorable_from_ms, Some(g.last_ms)));
        rows.push(ReplicaInfo {
            replica: r.name.clone(),
            url: r.url.clone(),
            generations: gens.len(),
            bytes: gens.iter().map(|g| g.bytes).sum(),
            restorable_from: from.map(format_ms),
            restorable_to: to.map(format_ms),
            lag_seconds: to.map(|t| ((now - t) as f64 / 1000.0).max(0.0)),
            to_ms: to,
        });
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(p) = &a.prometheus {
        let mut o = String::new();
        let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        let db = esc(&a.target);
        for (name, help) in [
            ("cloud_dump_sqlite_generations", "Generations stored in the replica."),
            ("cloud_dump_sqlite_replica_bytes", "Bytes stored in the replica."),
            ("cloud_dump_sqlite_restorable_to_timestamp_seconds", "The newest state the replica restores."),
            ("cloud_dump_sqlite_lag_seconds", "Age of the newest state in the replica."),
        ] {
            o.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
            for r in &rows {
                let v = match name {
                    "cloud_dump_sqlite_generations" => Some(r.generations as f64),
                    "cloud_dump_sqlite_replica_bytes" => Some(r.bytes as f64),
                    "cloud_dump_sqlite_restorable_to_timestamp_seconds" => r.to_ms.map(|t| t as f64 / 1000.0),
                    _ => r.lag_seconds,
                };
                if let Some(v) = v {
                    o.push_str(&format!("{name}{{db=\"{db}\",replica=\"{}\"}} {v}\n", esc(&r.replica)));
                }
            }
        }
        if p.as_os_str() == "-" {
            print!("{o}");
        } else {
            // The textfile collector reads whole files: written beside, then renamed.
            cloud_dump_postgres::write_atomically(p, o.as_bytes())
                .with_context(|| format!("cannot write {}", p.display()))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    for r in &rows {
        println!("replica {} ({}): {} generation(s), {} bytes", r.replica, r.url, r.generations, r.bytes);
        match (&r.restorable_from, &r.restorable_to, r.lag_seconds) {
            (Some(f), Some(t), Some(l)) => println!("  restorable: any sync from {f} to {t} ({l:.0} s ago)"),
            _ => println!("  restorable: nothing (no complete snapshot)"),
        }
    }
    Ok(ExitCode::SUCCESS)
}
