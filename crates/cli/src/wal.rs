//! `wal-push`, `wal-fetch` and the background `wal-prefetch`: the archive_command and
//! restore_command contracts, exit codes included.
//!
//! wal-push:  0 archived (or the identical file already was); 1 anything else.
//! wal-fetch: 0 fetched and verified; 1 not in the archive; 126 any other failure (after
//!            retries), which makes PostgreSQL abort recovery instead of promoting early.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use cloud_dump_pipeline::{parse_recipients, repokey, Compression, EncodeSpec, Encryption};
use cloud_dump_postgres::wal::{next_segments, WalFileKind};
use cloud_dump_postgres::{is_segment, segment_system_id, write_atomically, PushOutcome, WalArchive, WalKeys};
use futures::StreamExt;

use crate::args::{GlobalArgs, WalFetchArgs, WalPushArgs};
use crate::setup;

/// Exit code that makes PostgreSQL treat a restore_command failure as fatal.
pub const FETCH_FATAL: u8 = 126;
/// Identities (AGE-SECRET-KEY-…, comma-separated) handed to wal-fetch by `restore`.
pub const IDENTITY_ENV: &str = "CLOUD_DUMP_WAL_IDENTITY";

/// WAL passphrase: --passphrase / WAL_PASSPHRASE, else CLOUD_DUMP_PASSPHRASE, else the file.
fn passphrase(flag: &Option<String>, file: &Option<PathBuf>) -> Result<Option<cloud_dump_pipeline::SecretString>> {
    let value = flag.clone().or_else(|| std::env::var("CLOUD_DUMP_PASSPHRASE").ok()).filter(|p| !p.is_empty());
    setup::passphrase(&value, file)
}

fn keys(pass: Option<cloud_dump_pipeline::SecretString>, identity_file: &Option<PathBuf>) -> Result<WalKeys> {
    let mut identities = Vec::new();
    if let Some(f) = identity_file {
        identities.extend(setup::read_identities(f)?);
    }
    if let Ok(list) = std::env::var(IDENTITY_ENV) {
        for k in list.split(',').filter(|k| !k.trim().is_empty()) {
            identities.push(
                age::x25519::Identity::from_str(k.trim())
                    .map_err(|_| anyhow::anyhow!("{IDENTITY_ENV} holds a damaged identity"))?,
            );
        }
    }
    // Keys configured means an encrypted archive: plain WAL is refused. `restore` states it
    // explicitly (it may carry a backup key to an archive whose WAL is not encrypted).
    let require_encrypted = match std::env::var(REQUIRE_ENCRYPTED_ENV) {
        Ok(v) => v == "true",
        Err(_) => pass.is_some() || !identities.is_empty(),
    };
    Ok(WalKeys { passphrase: pass, identities, require_encrypted })
}

/// `true`/`false`: whether wal-fetch refuses unencrypted WAL (written by `restore`).
pub const REQUIRE_ENCRYPTED_ENV: &str = "CLOUD_DUMP_WAL_REQUIRE_ENCRYPTED";

pub async fn push(g: &GlobalArgs, a: &WalPushArgs) -> Result<()> {
    let compression = if a.compress == Some(false) {
        Compression::None
    } else {
        Compression::from_str(&a.compression).map_err(anyhow::Error::msg)?
    };
    let layout = setup::layout(g)?;
    let repo = setup::open_repo(g).await?;
    let wal = WalArchive::new(&repo, &layout);
    let pass = passphrase(&a.passphrase, &a.passphrase_file)?;
    let encryption = match (a.encrypt, &pass, &a.recipient_key) {
        (false, None, None) => Encryption::None,
        (false, Some(_), None) => bail!(
            "a passphrase was given without --encrypt (or WAL_ENCRYPT=true): add it to encrypt the WAL, or remove the passphrase; nothing was archived"
        ),
        (false, _, Some(_)) => bail!("--recipient-key given without --encrypt (or WAL_ENCRYPT=true)"),
        (true, _, Some(f)) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read recipient key file {}", f.display()))?;
            Encryption::Recipients(parse_recipients(&text, &f.display().to_string())?)
        }
        (true, Some(p), None) => {
            // Proofs of the repository key are remembered beside pg_wal's files (never in a
            // base backup), so scrypt runs once per key, not once per segment.
            let verified = a.path.parent().map(|d| d.join(".cloud-dump"));
            Encryption::Recipients(vec![repokey::recipient(&repo, wal.dir(), p, verified.as_deref()).await?])
        }
        (true, None, None) => {
            bail!("--encrypt needs --passphrase (WAL_PASSPHRASE), --passphrase-file or --recipient-key")
        }
    };
    let spec = EncodeSpec { compression, level: compression.default_level(), threads: 0, encryption };
    let keys = keys(pass, &a.identity_key)?;
    // WAL of another database system (a new initdb, pg_upgrade) must not enter this archive.
    // Every file is tied to a system: a segment by its long header, anything else (history
    // files, backup history files) by the data directory's pg_control.
    let mut head = [0u8; 40];
    let read = std::fs::File::open(&a.path).and_then(|mut f| std::io::Read::read(&mut f, &mut head));
    // (A segment without a valid long header is no segment PostgreSQL wrote; the header
    // check cannot tie it and it is archived as before.)
    let system = match read.ok().and_then(|n| segment_system_id(&a.name, &head[..n])) {
        Some(s) => Some(s),
        None if matches!(
            cloud_dump_postgres::wal::classify(&a.name),
            Ok(WalFileKind::History) | Ok(WalFileKind::Backup)
        ) =>
        {
            Some(control_system_id(&a.path).with_context(|| format!("wal-push {} refused", a.name))?)
        }
        None => None,
    };
    if let Some(system) = system {
        let cache = a.path.parent().map(|d| d.join(".cloud-dump"));
        wal.check_system(system, cache.as_deref()).await.with_context(|| format!("wal-push {} refused", a.name))?;
    }
    match wal.push(&a.path, &a.name, &spec, &keys).await.with_context(|| format!("wal-push {} failed", a.name))? {
        PushOutcome::Stored { key, size } => tracing::info!("archived {} as {key} ({size} bytes)", a.name),
        PushOutcome::AlreadyArchived { key } => {
            tracing::info!("{} is already archived as {key} with identical content; nothing to do", a.name)
        }
    }
    Ok(())
}

/// The system identifier of the data directory `wal_file` belongs to: the first 8 bytes of
/// global/pg_control, found in the working directory (PostgreSQL runs archive_command in
/// the data directory) or two levels above the file (`<PGDATA>/pg_wal/<name>`, lexically:
/// pg_wal may be a link to another volume).
fn control_system_id(wal_file: &Path) -> Result<u64> {
    let mut places = vec![PathBuf::from("global/pg_control")];
    if let Some(pgdata) = wal_file.parent().and_then(Path::parent) {
        places.push(pgdata.join("global/pg_control"));
    }
    for p in &places {
        if let Ok(b) = std::fs::read(p) {
            if let Some(id) = b.get(..8).map(|h| u64::from_le_bytes(h.try_into().expect("8 bytes"))).filter(|i| *i != 0)
            {
                return Ok(id);
            }
        }
    }
    bail!(
        "cannot tell which database system it belongs to: no global/pg_control in the working directory or beside {} (run wal-push from the data directory, as archive_command does)",
        wal_file.display()
    )
}

fn spool_dir(dest: &Path) -> PathBuf {
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    parent.join(".cloud-dump").join("prefetch")
}

pub async fn fetch(g: &GlobalArgs, a: &WalFetchArgs) -> ExitCode {
    match fetch_inner(g, a).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            tracing::info!("{} is not in the archive", a.name);
            ExitCode::from(1)
        }
        Err(e) => {
            crate::report_error(&format!("wal-fetch {}: ", a.name), &e);
            ExitCode::from(FETCH_FATAL)
        }
    }
}

async fn fetch_inner(g: &GlobalArgs, a: &WalFetchArgs) -> Result<bool> {
    cloud_dump_postgres::wal::classify(&a.name).map_err(anyhow::Error::msg)?;
    let spool = spool_dir(&a.dest);
    let spooled = spool.join(&a.name);
    if spooled.exists() {
        std::fs::rename(&spooled, &a.dest)
            .with_context(|| format!("cannot move {} to {}", spooled.display(), a.dest.display()))?;
        tracing::debug!("{} served from the prefetch spool", a.name);
        start_prefetch(a, &spool);
        return Ok(true);
    }
    let layout = setup::layout(g)?;
    let repo = setup::open_repo(g).await?;
    let wal = WalArchive::new(&repo, &layout);
    let keys = keys(passphrase(&a.passphrase, &a.passphrase_file)?, &a.identity_key)?;
    match wal.fetch(&a.name, &keys).await? {
        Some(data) => {
            write_atomically(&a.dest, &data).with_context(|| format!("cannot write {}", a.dest.display()))?;
            start_prefetch(a, &spool);
            Ok(true)
        }
        None => {
            // Missing: the end of the archive, or a hole that some later WAL proves (a later
            // segment of the timeline, a history file that leaves the timeline after it, a
            // timeline's WAL without its history file). The timeline graph decides.
            if matches!(
                cloud_dump_postgres::wal::classify(&a.name),
                Ok(WalFileKind::Segment) | Ok(WalFileKind::History)
            ) {
                let names = wal.list_names().await?;
                let size = match std::env::var(SEGMENT_SIZE_ENV) {
                    Ok(_) => segment_size(),
                    // A restore_command written by hand: the size from an archived segment's
                    // own long page header (segment numbers depend on it).
                    Err(_) => learned_segment_size(&wal, &names, &keys).await?,
                };
                let graph = wal.graph_of(&names, size, &keys).await?;
                if let Some(why) = graph.hole(&a.name) {
                    // A primary archiving into this repository may have pushed it meanwhile.
                    if let Some(data) = wal.fetch(&a.name, &keys).await? {
                        write_atomically(&a.dest, &data)
                            .with_context(|| format!("cannot write {}", a.dest.display()))?;
                        return Ok(true);
                    }
                    bail!(
                        "{} is missing from the archive {} although {why}: the archive has a hole; recovery must not continue past it",
                        a.name,
                        wal.dir()
                    );
                }
            }
            Ok(false)
        }
    }
}

/// The WAL segment size restore wrote into the settings file (16 MiB when absent).
pub const SEGMENT_SIZE_ENV: &str = "CLOUD_DUMP_WAL_SEGMENT_SIZE";

fn segment_size() -> u64 {
    std::env::var(SEGMENT_SIZE_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|s: &u64| s.is_power_of_two())
        .unwrap_or(16 << 20)
}

/// The segment size of the archive's first listed segment, read from its long page
/// header (16 MiB when no segment is archived).
async fn learned_segment_size(
    wal: &WalArchive<'_>,
    names: &[(String, std::time::SystemTime)],
    keys: &WalKeys,
) -> Result<u64> {
    let Some((first, _)) = names.iter().find(|(n, _)| is_segment(n)) else { return Ok(16 << 20) };
    let Some(data) = wal.fetch(first, keys).await? else { return Ok(16 << 20) };
    let size = data.get(32..36).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as u64);
    match size {
        Some(s) if s.is_power_of_two() && ((1 << 20)..=(1 << 30)).contains(&s) => Ok(s),
        _ => {
            tracing::warn!(
                "{first} has no valid long page header: taking 16 MiB WAL segments (set {SEGMENT_SIZE_ENV})"
            );
            Ok(16 << 20)
        }
    }
}

fn start_prefetch(a: &WalFetchArgs, spool: &Path) {
    if a.prefetch == 0 || !is_segment(&a.name) {
        return;
    }
    let lock = spool.join(".lock");
    if let Ok(pid) = std::fs::read_to_string(&lock) {
        if Path::new(&format!("/proc/{}", pid.trim())).exists() {
            return;
        }
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if let Some(pos) = args.iter().position(|x| x == "wal-fetch") {
        args[pos] = "wal-prefetch".into();
    } else {
        return;
    }
    let _ = std::process::Command::new(exe)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
}

/// Downloads the `--prefetch` segments after NAME into the spool, in parallel.
pub async fn prefetch(g: &GlobalArgs, a: &WalFetchArgs) -> Result<()> {
    let spool = spool_dir(&a.dest);
    std::fs::create_dir_all(&spool)?;
    let lock = spool.join(".lock");
    std::fs::write(&lock, std::process::id().to_string())?;
    let result = async {
        // Whatever is older than the file just requested will not be asked for again.
        for e in std::fs::read_dir(&spool)?.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if !n.starts_with('.') && n.as_str() <= a.name.as_str() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let layout = setup::layout(g)?;
        let repo = setup::open_repo(g).await?;
        let wal = WalArchive::new(&repo, &layout);
        let keys = keys(passphrase(&a.passphrase, &a.passphrase_file)?, &a.identity_key)?;
        let wanted: Vec<String> = match std::env::var(SEGMENT_SIZE_ENV) {
            // restore told us the cluster's segment size: the next names, no listing.
            Ok(_) => next_segments(&a.name, a.prefetch, segment_size()),
            Err(_) => wal.segments_after(&a.name, a.prefetch).await?,
        }
        .into_iter()
        .filter(|n| !spool.join(n).exists())
        .collect();
        let wal = &wal;
        let keys = &keys;
        let spool = &spool;
        futures::stream::iter(wanted)
            .map(|n| async move {
                if let Ok(Some(data)) = wal.fetch(&n, keys).await {
                    let _ = write_atomically(&spool.join(&n), &data);
                }
            })
            .buffer_unordered(a.prefetch.max(1))
            .collect::<Vec<_>>()
            .await;
        anyhow::Ok(())
    }
    .await;
    let _ = std::fs::remove_file(&lock);
    result
}
