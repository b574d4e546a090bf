//! The `cloud-dump` binary: parses flags, assembles the libraries, maps errors to exit codes.

mod args;
mod config;
mod docs;
mod drill;
mod lifecycle;
mod progress;
mod restore;
mod setup;
mod sqlite;
mod wal;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use cloud_dump_pipeline::{Compression, EncodeSpec};
use cloud_dump_postgres::{list_backups, run_backup, BackupManifest, BackupRequest, ConnConfig};

/// glibc's malloc keeps freed multi-megabyte buffers per thread (our parts and ranges move
/// between threads), which made peak RSS grow with the database; mimalloc returns them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use crate::args::{BackupArgs, Checkpoint, Cli, Command, GlobalArgs, KeygenArgs, ListArgs, LogFormat, LogLevel};

/// Set once from `--log-format`: whether errors and progress are JSON lines.
static JSON_LOGS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

pub(crate) fn json_logs() -> bool {
    JSON_LOGS.get().copied().unwrap_or(false)
}

/// Set when stdout carries one JSON document (verify --drill --json): result lines of the
/// steps go to stderr instead.
pub(crate) static STDOUT_IS_JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A result line of a step: stdout, unless stdout is kept for JSON.
pub(crate) fn say(line: &str) {
    if STDOUT_IS_JSON.load(std::sync::atomic::Ordering::Relaxed) {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

/// A command's failure, on one line: each cause once, outermost first.
pub(crate) fn report_error(prefix: &str, e: &anyhow::Error) {
    let msg = cloud_dump_storage::one_line(e.as_ref());
    if json_logs() {
        tracing::error!("{prefix}{msg}");
    } else {
        eprintln!("cloud-dump: error: {prefix}{msg}");
    }
}

/// The value of `--flag VALUE` or `--flag=VALUE` on the command line.
fn flag_value(args: &[String], flag: &str) -> Option<String> {
    let eq = format!("{flag}=");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == flag {
            return it.next().cloned();
        }
        if let Some(v) = a.strip_prefix(&eq) {
            return Some(v.to_owned());
        }
    }
    None
}

fn flag_given(args: &[String], flag: &str) -> bool {
    let eq = format!("{flag}=");
    args.iter().any(|a| a == flag || a.starts_with(&eq))
}

fn env_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty())
}

/// The PostgreSQL commands read the config file before their flags are parsed: its values
/// become the environment variables the flags read (flag > environment > file). Two kinds
/// of file: the YAML config (`postgres: clusters:`, default /etc/cloud-dump.yml), and the
/// KEY=VALUE settings file `restore` writes for `wal-fetch --config`.
fn load_config_file() -> std::result::Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    const PG_COMMANDS: &[&str] = &[
        "backup",
        "list",
        "restore",
        "wal-push",
        "wal-fetch",
        "wal-prefetch",
        "expire",
        "delete",
        "keep",
        "info",
        "verify",
    ];
    // The first word that is a command (global flags with values may come before it).
    let Some(command) = args.iter().skip(1).find(|a| PG_COMMANDS.contains(&a.as_str()) || *a == "sqlite") else {
        return Ok(());
    };
    // `sqlite …` reads the same file itself.
    if command == "sqlite" {
        return Ok(());
    }
    let explicit =
        flag_value(&args, "--config").or_else(|| std::env::var("CLOUD_DUMP_CONFIG").ok().filter(|v| !v.is_empty()));
    let path = match &explicit {
        Some(p) => std::path::PathBuf::from(p),
        None if std::path::Path::new(config::DEFAULT_CONFIG).exists() => config::DEFAULT_CONFIG.into(),
        None => return Ok(()),
    };
    // An unreadable file is an error even when it is the default one: what it says (a key
    // to encrypt with, say) must not be dropped silently.
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "cannot read config file {}: {e}{}",
            path.display(),
            if explicit.is_none() {
                " (let this user read it, e.g. root:postgres mode 0640, or set CLOUD_DUMP_CONFIG=/dev/null to use none)"
            } else {
                ""
            }
        )
    })?;
    if is_settings_file(&text) {
        return load_settings_file(&path, &text);
    }
    check_file_permissions(&path, &text)?;
    let section = config::parse(&text, &path.display().to_string())?;
    let named =
        flag_value(&args, "--cluster").or_else(|| std::env::var("CLOUD_DUMP_CLUSTER").ok().filter(|v| !v.is_empty()));
    let cwd = match command.as_str() {
        "wal-push" | "wal-fetch" | "wal-prefetch" => std::env::current_dir().ok(),
        _ => None,
    };
    let repo_given = flag_given(&args, "--repo")
        || env_set("CLOUD_DUMP_REPO")
        || flag_given(&args, "--storj-bucket")
        || env_set("STORJ_BUCKET");
    let how = config::Selector { named: named.as_deref(), cwd: cwd.as_deref(), repo_given };
    let Some((name, cluster)) = config::select(&section, &how).map_err(|e| format!("{}: {e}", path.display()))? else {
        return Ok(());
    };
    for (k, v) in config::env_settings(name, cluster, &env_set, &|f| flag_given(&args, f)) {
        std::env::set_var(k, v);
    }
    Ok(())
}

/// A file that holds secrets must be the owner's alone (see config::check_permissions).
fn check_file_permissions(path: &std::path::Path, text: &str) -> std::result::Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let secrets = config::file_secrets(text);
    if secrets.is_empty() {
        return Ok(());
    }
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    config::check_permissions(path, meta.mode(), meta.uid(), &secrets)
}

/// The restore settings file: every line `NAME=VALUE` with an upper-case name.
fn is_settings_file(text: &str) -> bool {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).peekable();
    lines.peek().is_some()
        && lines.all(|l| {
            l.split_once('=').is_some_and(|(k, _)| {
                !k.is_empty() && k.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            })
        })
}

/// `wal-fetch --config FILE`: the settings file `restore` wrote. It is the whole truth for
/// that command: its KEY=VALUE lines override the environment, and cloud-dump's own
/// settings the file does not hold are removed from it (a server environment with
/// `CLOUD_DUMP_*` for archive_command must not send wal-fetch to another repository).
/// Credentials the file does not hold stay (the server's own credential chain).
fn load_settings_file(path: &std::path::Path, text: &str) -> std::result::Result<(), String> {
    let mut pairs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!("--config {}: bad line (expected KEY=VALUE)", path.display()));
        };
        pairs.push((k.trim().to_owned(), v.to_owned()));
    }
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if is_setting(&k) {
            std::env::remove_var(&*k);
        }
    }
    for (k, v) in pairs {
        std::env::set_var(k, v);
    }
    Ok(())
}

/// A variable that is one of cloud-dump's settings or says where the store is (not a
/// credential): the settings file decides these.
fn is_setting(name: &str) -> bool {
    name.starts_with("CLOUD_DUMP_")
        || name.starts_with("WAL_")
        || name.starts_with("STORJ_")
        || setup::STORE_SETTINGS.contains(&name)
}

/// An error before logging starts, in the format `--log-format` asks for.
fn early_error(msg: &str) {
    if json_logs() {
        let now =
            time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        eprintln!("{}", serde_json::json!({"timestamp": now, "level": "ERROR", "message": msg}));
    } else {
        eprintln!("cloud-dump: error: {msg}");
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let json = flag_value(&args, "--log-format").or_else(|| std::env::var("CLOUD_DUMP_LOG_FORMAT").ok());
    let _ = JSON_LOGS.set(json.as_deref() == Some("json"));
    if let Err(e) = load_config_file() {
        early_error(&e);
        // wal-fetch's "stop recovery" code; a plain failure elsewhere.
        let fetch = args.iter().any(|a| a == "wal-fetch" || a == "wal-prefetch");
        return ExitCode::from(if fetch { wal::FETCH_FATAL } else { 1 });
    }
    let cli = match Cli::try_parse_from(sqlite::litestream_flags(args.clone())) {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            let fetch = args.iter().skip(1).any(|a| a == "wal-fetch" || a == "wal-prefetch");
            if fetch && !matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                // PostgreSQL reads any exit code below 126 as "not in the archive" and ends
                // recovery there: a usage error (a typo in restore_command or the server's
                // environment) must stop recovery instead.
                let text = e.render().to_string();
                let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("bad arguments");
                early_error(&format!("wal-fetch: {}", first.trim_start_matches("error: ")));
                return ExitCode::from(wal::FETCH_FATAL);
            }
            e.exit()
        }
    };
    init_logging(cli.global.log_level, cli.global.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            early_error(&format!("cannot start the async runtime: {e}"));
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            report_error("", &e);
            ExitCode::from(1)
        }
    }
}

fn init_logging(level: LogLevel, format: LogFormat) {
    let filter = match level {
        LogLevel::Error => "error",
        LogLevel::Warn => "warn",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug,hyper=info,reqwest=info,rustls=info,h2=info",
        LogLevel::Trace => "trace",
    };
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_target(false);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
        LogFormat::Text => builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).compact().init(),
    }
}

/// Turns true on SIGINT or SIGTERM, so a long command stops through its failure path
/// (uploads aborted, partial objects removed) instead of dying mid-way.
fn cancel_on_signal() -> Result<tokio::sync::watch::Receiver<bool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("signal received: stopping the backup and removing what it stored");
        let _ = tx.send(true);
    });
    Ok(rx)
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let g = &cli.global;
    if let Some(f) = cli.command.config_file() {
        tracing::debug!(config = %f.display(), "settings from the config file");
    }
    match &cli.command {
        Command::Backup(a) => backup(g, a).await?,
        Command::List(a) => list(g, a).await?,
        Command::Restore(a) => restore::run(g, a).await?,
        Command::WalPush(a) => wal::push(g, a).await?,
        Command::WalFetch(a) => return Ok(wal::fetch(g, a).await),
        Command::WalPrefetch(a) => wal::prefetch(g, a).await?,
        Command::Keygen(a) => keygen(a)?,
        Command::Expire(a) => lifecycle::expire(g, a).await?,
        Command::Delete(a) => lifecycle::delete(g, a).await?,
        Command::Keep(a) => lifecycle::keep(g, a).await?,
        Command::Info(a) => lifecycle::info(g, a).await?,
        Command::Verify(a) => return lifecycle::verify(g, a).await,
        Command::Sqlite(a) => return sqlite::run(g, &a.command).await,
        Command::Completions(a) => docs::completions(a.shell),
        Command::Manpages(a) => {
            let pages = docs::man_pages(&a.dir)?;
            println!("{} man pages written to {}", pages.len(), a.dir.display());
        }
    }
    Ok(ExitCode::SUCCESS)
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
        cancel: Some(cancel_on_signal()?),
        keep: a.keep,
    };
    let repo = setup::create_repo(g).await?;
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

pub(crate) fn mb(b: u64) -> String {
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
