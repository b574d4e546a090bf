//! The `cloud-dump` binary: parses flags, assembles the libraries, maps errors to exit codes.

mod args;
mod progress;
mod setup;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use cloud_dump_pipeline::{Compression, EncodeSpec};
use cloud_dump_postgres::{
    list_backups, plan_restore, run_backup, run_restore, BackupManifest, BackupRequest, ConnConfig, RestoreRequest,
};

/// glibc's malloc keeps freed multi-megabyte buffers per thread (our parts and ranges move
/// between threads), which made peak RSS grow with the database; mimalloc returns them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use crate::args::{BackupArgs, Checkpoint, Cli, Command, GlobalArgs, KeygenArgs, ListArgs, LogLevel, RestoreArgs};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.global.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cloud-dump: error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes, outermost first.
            let msg = format!("{e:#}").replace('\n', "; ");
            eprintln!("cloud-dump: error: {msg}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(level: LogLevel) {
    let filter = match level {
        LogLevel::Error => "error",
        LogLevel::Warn => "warn",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug,hyper=info,reqwest=info,rustls=info,h2=info",
        LogLevel::Trace => "trace",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .compact()
        .init();
}

async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Backup(a) => backup(&cli.global, a).await,
        Command::List(a) => list(&cli.global, a).await,
        Command::Restore(a) => restore(&cli.global, a).await,
        Command::Keygen(a) => keygen(a),
    }
}

async fn backup(g: &GlobalArgs, a: &BackupArgs) -> Result<()> {
    let compression: Compression = a.compression.parse().map_err(anyhow::Error::msg)?;
    let level = a.compression_level.unwrap_or(compression.default_level());
    match compression {
        Compression::Zstd if !(1..=19).contains(&level) => {
            bail!("--compression-level {level}: zstd takes 1 to 19")
        }
        Compression::Gzip if !(1..=9).contains(&level) => {
            bail!("--compression-level {level}: gzip takes 1 to 9")
        }
        _ => {}
    }
    let threads = a
        .compression_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(2));
    let spec = EncodeSpec { compression, level, threads, encryption: setup::encryption(&a.encrypt)? };
    let conn = ConnConfig::parse(a.db_url.as_deref(), &|k| std::env::var(k).ok())?;
    let req = BackupRequest {
        name: a.name.clone(),
        layout: setup::layout(g)?,
        conn,
        spec: Arc::new(spec),
        fast_checkpoint: a.checkpoint == Checkpoint::Fast,
        max_rate_kb: a.max_rate.as_deref().map(setup::parse_rate).transpose()?,
        parallel: g.parallel as usize,
        label: a.label.clone(),
    };
    let repo = setup::open_repo(g).await?;
    let progress = progress::make(g.progress);
    let started = std::time::Instant::now();
    let m = run_backup(&repo, &req, progress.as_ref()).await.context("backup failed")?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "backup {} stored in {}: {} of data as {} ({}, {}), {:.1} s, {:.0} MB/s, LSN {} to {}",
        m.name,
        repo.url(),
        mb(m.raw_size()),
        mb(m.stored_size()),
        m.compression,
        if m.encrypted { format!("encrypted: {}", m.encryption) } else { "not encrypted".into() },
        secs,
        m.raw_size() as f64 / 1e6 / secs.max(0.001),
        m.start_lsn,
        m.end_lsn
    );
    Ok(())
}

fn mb(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

fn display_time(rfc3339: &str) -> String {
    match time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339) {
        Ok(t) => {
            let t = t.to_offset(time::UtcOffset::UTC);
            let f = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
            t.format(&f).unwrap_or_else(|_| rfc3339.to_owned())
        }
        Err(_) => rfc3339.to_owned(),
    }
}

async fn list(g: &GlobalArgs, a: &ListArgs) -> Result<()> {
    let layout = setup::layout(g)?;
    let repo = setup::open_repo(g).await?;
    let backups: Vec<BackupManifest> = list_backups(&repo, &layout).await.context("cannot list backups")?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&backups)?);
        return Ok(());
    }
    if let Some(c) = layout.cluster() {
        println!("Cluster: {c} (WAL archive: {})", layout.wal_dir());
    }
    println!(
        "{:<32} {:<24} {:<10} {:<11} {:>12} {:>18}",
        "NAME", "TIMESTAMP", "ENCRYPTED", "PG VERSION", "SIZE", "END LSN"
    );
    println!("{}", "-".repeat(112));
    for m in &backups {
        println!(
            "{:<32} {:<24} {:<10} {:<11} {:>12} {:>18}",
            m.name,
            display_time(&m.timestamp),
            if m.encrypted { "yes" } else { "no" },
            m.short_version(),
            mb(m.stored_size()),
            m.end_lsn.to_string()
        );
    }
    if backups.is_empty() {
        eprintln!("no backups in {}", repo.url());
    }
    Ok(())
}

async fn restore(g: &GlobalArgs, a: &RestoreArgs) -> Result<()> {
    let mut mapping = Vec::new();
    for m in &a.tablespace_mapping {
        let (old, new) = m.split_once('=').with_context(|| format!("--tablespace-mapping {m:?}: expected OLD=NEW"))?;
        mapping.push((old.to_owned(), std::path::PathBuf::from(new)));
    }
    let pgdata = if a.pgdata.is_absolute() { a.pgdata.clone() } else { std::env::current_dir()?.join(&a.pgdata) };
    let req = RestoreRequest {
        name: a.name.clone(),
        layout: setup::layout(g)?,
        pgdata,
        tablespace_mapping: mapping,
        decryption: setup::decryption(&a.decrypt)?,
        parallel: g.parallel as usize,
    };
    let repo = setup::open_repo(g).await?;
    let plan = plan_restore(&repo, &req).await?;
    let m = &plan.manifest;
    if a.dry_run {
        println!(
            "restore plan for backup {} (PostgreSQL {}, LSN {} to {}):",
            m.name,
            m.short_version(),
            m.start_lsn,
            m.end_lsn
        );
        for o in &m.objects {
            let target = match o.kind {
                cloud_dump_postgres::ObjectKind::Base => plan.pgdata.display().to_string(),
                cloud_dump_postgres::ObjectKind::BackupManifest => {
                    plan.pgdata.join("backup_manifest").display().to_string()
                }
                cloud_dump_postgres::ObjectKind::Tablespace => m
                    .tablespaces
                    .iter()
                    .find(|t| Some(t.oid) == o.tablespace_oid)
                    .and_then(|t| plan.tablespaces.get(&t.location))
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            };
            println!("  {}{}  {} stored, {} unpacked  ->  {}", plan.dir, o.key, mb(o.size), mb(o.raw_size), target);
        }
        println!(
            "total: {} to download, {} to write; nothing was written (dry run)",
            mb(m.stored_size()),
            mb(m.raw_size())
        );
        return Ok(());
    }
    if m.encrypted && matches!(req.decryption, cloud_dump_pipeline::Decryption::None) {
        bail!(
            "backup {} is encrypted ({}): give {}",
            m.name,
            m.encryption,
            if m.encryption == "x25519" {
                "--identity-key FILE"
            } else {
                "--passphrase-file FILE or CLOUD_DUMP_PASSPHRASE"
            }
        );
    }
    let progress: Arc<dyn cloud_dump_postgres::Progress> = progress::make(g.progress).into();
    let started = std::time::Instant::now();
    run_restore(&repo, &plan, &req, progress).await?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "restored backup {} into {} ({} in {:.1} s, {:.0} MB/s); start it with: pg_ctl start -D {}",
        m.name,
        plan.pgdata.display(),
        mb(m.raw_size()),
        secs,
        m.raw_size() as f64 / 1e6 / secs.max(0.001),
        plan.pgdata.display()
    );
    Ok(())
}

fn keygen(a: &KeygenArgs) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (file, public) = cloud_dump_pipeline::generate_identity();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&a.output)
        .with_context(|| format!("cannot create {} (it must not exist yet)", a.output.display()))?;
    f.write_all(file.as_bytes())?;
    f.sync_all()?;
    let pub_path = a.output.with_extension("pub");
    std::fs::write(&pub_path, format!("{public}\n")).with_context(|| format!("cannot write {}", pub_path.display()))?;
    println!(
        "identity (private key): {}\nrecipient (public key): {} = {public}",
        a.output.display(),
        pub_path.display()
    );
    Ok(())
}
