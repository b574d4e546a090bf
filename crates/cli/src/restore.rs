//! `restore`: plain, or point-in-time with archived WAL. Plan first (which backup, which
//! WAL, what is refused), then do it; `--dry-run` prints the plan.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cloud_dump_pipeline::{repokey, Decryption, ExposeSecret, SecretString};
use cloud_dump_postgres::recovery::{
    archiving_of, backup_point, check_restore_wal, check_time_reachable, choose_restore, disable_archiving, parse_time,
    recovery_settings, wal_reach, write_recovery, Archiving, RecoveryTarget, TimelineChoice,
};
use cloud_dump_postgres::timeline::Until;
use cloud_dump_postgres::{
    check_backup_key, list_backups, plan_restore, release_control_file, run_restore, Lsn, ObjectKind, RestoreRequest,
    WalArchive, WalKeys,
};

use crate::args::{ArchiveMode, GlobalArgs, RestoreArgs, TargetAction, TargetKind};
use crate::{mb, setup, wal};

fn target(a: &RestoreArgs) -> Result<Option<RecoveryTarget>> {
    Ok(if let Some(t) = &a.recovery_target_time {
        Some(RecoveryTarget::Time(t.clone(), parse_time(t)?))
    } else if let Some(l) = &a.recovery_target_lsn {
        let lsn: Lsn = l.parse().map_err(|e| anyhow::anyhow!("--recovery-target-lsn: {e}"))?;
        Some(RecoveryTarget::Lsn(lsn))
    } else if let Some(x) = &a.recovery_target_xid {
        if x.is_empty() || !x.bytes().all(|b| b.is_ascii_digit()) {
            bail!("--recovery-target-xid {x:?}: expected a transaction id (digits)");
        }
        Some(RecoveryTarget::Xid(x.clone()))
    } else if let Some(n) = &a.recovery_target_name {
        Some(RecoveryTarget::Name(n.clone()))
    } else {
        a.recovery_target.map(|k| match k {
            TargetKind::Immediate => RecoveryTarget::Immediate,
            TargetKind::Latest => RecoveryTarget::Latest,
        })
    })
}

/// Runs a restore; a signal (SIGINT, SIGTERM, SIGHUP from a dropped session, SIGQUIT)
/// stops it with a one-line error. Until a restore has finished, the data directory lacks
/// global/pg_control, so a restore cut short (by a signal or kill -9) never starts.
pub async fn run(g: &GlobalArgs, a: &RestoreArgs) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigs = Vec::new();
    for (kind, name) in [
        (SignalKind::interrupt(), "SIGINT"),
        (SignalKind::terminate(), "SIGTERM"),
        (SignalKind::hangup(), "SIGHUP"),
        (SignalKind::quit(), "SIGQUIT"),
    ] {
        sigs.push((signal(kind).context("cannot install signal handlers")?, name));
    }
    let stopped = async move {
        let waits = sigs.iter_mut().map(|(s, name)| {
            let name = *name;
            Box::pin(async move {
                s.recv().await;
                name
            })
        });
        futures::future::select_all(waits).await.0
    };
    tokio::select! {
        r = restore(g, a) => r,
        name = stopped => bail!(
            "restore stopped by {name}: {} holds a partial restore that PostgreSQL will not start (no global/pg_control); remove it before retrying",
            a.pgdata.display()
        ),
    }
}

async fn restore(g: &GlobalArgs, a: &RestoreArgs) -> Result<()> {
    let target = target(a)?;
    if target.is_none() && (a.recovery_target_timeline.is_some()) {
        bail!("--recovery-target-timeline needs a recovery target (e.g. --recovery-target latest)");
    }
    let timeline: TimelineChoice = match &a.recovery_target_timeline {
        Some(t) => t.parse()?,
        None => TimelineChoice::Latest,
    };
    let mut mapping = Vec::new();
    for m in &a.tablespace_mapping {
        let (old, new) = m.split_once('=').with_context(|| format!("--tablespace-mapping {m:?}: expected OLD=NEW"))?;
        mapping.push((old.to_owned(), PathBuf::from(new)));
    }
    let pgdata = if a.pgdata.is_absolute() { a.pgdata.clone() } else { std::env::current_dir()?.join(&a.pgdata) };
    let layout = setup::layout(g)?;
    let repo = setup::open_repo(g).await?;
    let wal = WalArchive::new(&repo, &layout);

    // Which backup and which timeline: decided on the archive's timeline graph.
    let (name, tli, archived, tli_setting) = match (&a.name, &target) {
        (None, None) => bail!("--name is required (or give a --recovery-target-… to use the newest backup before it)"),
        (Some(n), None) => (n.clone(), None, Vec::new(), None),
        (name, Some(t)) => {
            let backups = list_backups(&repo, &layout).await?;
            let seg_size = name
                .as_ref()
                .and_then(|n| backups.iter().find(|m| &m.name == n))
                .or(backups.first())
                .map(|m| m.wal_segment_size())
                .unwrap_or(16 << 20);
            let archived = wal.list_names().await?;
            // The WAL keys open history files archived before their records carried the
            // switch points.
            let graph = wal.graph_of(&archived, seg_size, &graph_keys(a)?).await?;
            let (m, tli) = choose_restore(&graph, &backups, name.as_deref(), t, timeline)?;
            check_restore_wal(&graph, m, tli, t, wal.dir())?;
            if matches!(t, RecoveryTarget::Time(..)) {
                let path = graph
                    .needed(&backup_point(m), tli, Until::Latest)
                    .map_err(cloud_dump_postgres::Error::from)?
                    .map(|n| n.segments)
                    .unwrap_or_default();
                let m_version = m.pg_version_num;
                check_time_reachable(t, wal.last_commit_on(&path, 16).await?, tli, m_version)?;
            }
            if name.is_none() {
                tracing::info!(
                    "using backup {} (the newest on timeline {tli}'s history that ends before {})",
                    m.name,
                    t.describe()
                );
            }
            // Named as a number, PostgreSQL requires its history file; the archive's first
            // timeline may have none (archiving began on it): then it is the backup's own,
            // which PostgreSQL calls `current`.
            let setting = if tli > 1 && tli == m.timeline && graph.history_stored(tli).is_none() {
                if m.pg_version_num >= 120000 {
                    Some("current".to_owned())
                } else {
                    None // PostgreSQL 10 and 11 default to the current timeline
                }
            } else {
                Some(tli.to_string())
            };
            (m.name.clone(), Some(tli), archived, setting)
        }
    };
    let req = RestoreRequest {
        name,
        layout: layout.clone(),
        pgdata,
        tablespace_mapping: mapping,
        decryption: setup::decryption(&a.decrypt)?,
        parallel: g.parallel as usize,
    };
    let plan = plan_restore(&repo, &req).await?;
    let m = &plan.manifest;
    let seg_size = m.wal_segment_size();
    let wal_plan = match &target {
        Some(t) => Some(wal_reach(m, t, &archived, wal.dir())?),
        None => None,
    };
    // Every key and setting the real run uses is checked, dry run or not, before anything
    // is written: a wrong passphrase or a bad target name must stop us here.
    check_backup_key(&repo, &plan, &req).await?;
    let wal_config = match &target {
        Some(_) => Some(wal_settings(g, a, &req, &repo, wal.dir(), seg_size).await?),
        None => None,
    };
    let spool = plan.pgdata.join("pg_wal/.cloud-dump");
    let conf = spool.join("restore.conf");
    let settings = match &target {
        Some(t) => {
            let exe = std::env::current_exe().context("cannot find the cloud-dump binary for restore_command")?;
            let action = match a.recovery_target_action {
                TargetAction::Promote => "promote",
                TargetAction::Pause => "pause",
                TargetAction::Shutdown => "shutdown",
            };
            // The settings file holds secrets: gone once recovery ends. The timeline is
            // always named: the graph chose it, PostgreSQL must not probe for another.
            Some(recovery_settings(t, action, tli_setting.clone(), &exe, &spool, &conf)?)
        }
        None => None,
    };

    if a.dry_run {
        println!(
            "restore plan for backup {} (PostgreSQL {}, LSN {} to {}, timeline {}):",
            m.name,
            m.short_version(),
            m.start_lsn,
            m.end_lsn,
            m.timeline
        );
        for o in &m.objects {
            let to = match o.kind {
                ObjectKind::BackupManifest => plan.pgdata.join("backup_manifest"),
                _ => plan.target_of(o).unwrap_or_default(),
            }
            .display()
            .to_string();
            println!("  {}{}  {} stored, {} unpacked  ->  {to}", plan.dir, o.key, mb(o.size), mb(o.raw_size));
        }
        if let (Some(t), Some(reach), Some(tli)) = (&target, &wal_plan, tli) {
            println!(
                "  then replay WAL from {} ({} archived segments from there) in {} up to {} on timeline {tli}",
                reach.first,
                reach.segments,
                wal.dir(),
                t.describe()
            );
        }
        println!(
            "total: {} to download, {} to write; keys and settings checked; nothing was written (dry run)",
            mb(m.stored_size()),
            mb(m.raw_size())
        );
        return Ok(());
    }

    let progress: Arc<dyn cloud_dump_postgres::Progress> = crate::progress::make(g.progress).into();
    let started = std::time::Instant::now();
    run_restore(&repo, &plan, &req, progress).await?;
    let secs = started.elapsed().as_secs_f64();
    if a.archive_mode == ArchiveMode::Off {
        disable_archiving(&plan.pgdata)?;
    }

    let last = if let (Some(settings), Some(config)) = (settings, wal_config) {
        let t = settings.target.clone();
        // A new folder (never one that came from the backup: extraction refuses those).
        std::fs::create_dir(&spool).with_context(|| format!("cannot create {}", spool.display()))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&conf)
            .with_context(|| format!("cannot create {}", conf.display()))?;
        f.write_all(config.as_bytes())?;
        f.sync_all()?;
        let done = write_recovery(&plan.pgdata, m.pg_version_num, &settings)?;
        for (file, name) in &done.settings {
            tracing::warn!(
                "{file}: disabled {name} inherited from the backup (this restore sets its own recovery settings)"
            );
        }
        for file in &done.removed {
            tracing::warn!("removed {file} inherited from the backup");
        }
        for file in &done.outside {
            tracing::warn!(
                "{file} (outside PGDATA) sets recovery settings; it was left as it is: check it before starting"
            );
        }
        if !matches!(a.recovery_target_action, TargetAction::Promote) {
            crate::say(&format!(
                "note: with this recovery target action recovery does not end by itself; once done, remove {} (it holds the repository's settings and keys)",
                spool.display()
            ));
        }
        format!(
            "restored backup {} into {} ({} in {:.1} s); PostgreSQL will replay archived WAL from {} up to {} on timeline {}: pg_ctl start -D {}",
            m.name,
            plan.pgdata.display(),
            mb(m.raw_size()),
            secs,
            wal.dir(),
            t.describe(),
            tli.unwrap_or(m.timeline),
            plan.pgdata.display()
        )
    } else {
        format!(
            "restored backup {} into {} ({} in {:.1} s, {:.0} MB/s); start it with: pg_ctl start -D {}",
            m.name,
            plan.pgdata.display(),
            mb(m.raw_size()),
            secs,
            m.raw_size() as f64 / 1e6 / secs.max(0.001),
            plan.pgdata.display()
        )
    };
    // The last step: the directory becomes startable only now.
    release_control_file(&plan.pgdata)?;
    crate::say(&last);
    crate::say(&archiving_line(&plan.pgdata, a.archive_mode));
    Ok(())
}

/// The keys that may open history files for the timeline graph: the WAL passphrase (or
/// the backup's) and the identity files given.
fn graph_keys(a: &RestoreArgs) -> Result<WalKeys> {
    let pass = a.wal_passphrase.clone().map(Into::into).or(match setup::decryption(&a.decrypt)? {
        cloud_dump_pipeline::Decryption::Passphrase(p) => Some(p),
        _ => None,
    });
    let mut identities = Vec::new();
    for f in [&a.wal_identity_key, &a.decrypt.identity_key].into_iter().flatten() {
        identities.extend(setup::read_identities(f)?);
    }
    Ok(WalKeys { passphrase: pass, identities, require_encrypted: false })
}

/// The restore's last line: whether the copy will archive, and where.
fn archiving_line(pgdata: &std::path::Path, mode: ArchiveMode) -> String {
    if mode == ArchiveMode::Off {
        return "archiving: off (--archive-mode off): this copy will not archive WAL into any repository".into();
    }
    let read = |f: &str| std::fs::read_to_string(pgdata.join(f)).unwrap_or_default();
    let (conf, auto) = (read("postgresql.conf"), read("postgresql.auto.conf"));
    match archiving_of(&[&conf, &auto]) {
        Archiving::Off => "archiving: off in the backup's settings: this copy will not archive WAL".into(),
        Archiving::CloudDump => "archiving: on (archive_command runs cloud-dump wal-push): once promoted this copy archives a new timeline into the repository its settings name (this one if unchanged); use --archive-mode off for a throwaway test copy".into(),
        Archiving::Other => "archiving: on with an archive_command that is not cloud-dump wal-push: once promoted this copy archives where that command sends WAL, not into this repository".into(),
    }
}

/// The KEY=VALUE settings wal-fetch needs during recovery, written 0600 into
/// pg_wal/.cloud-dump/ (pg_wal's contents are never part of a base backup).
async fn wal_settings(
    g: &GlobalArgs,
    a: &RestoreArgs,
    req: &RestoreRequest,
    repo: &cloud_dump_storage::Repo,
    wal_dir: &str,
    req_segment_size: u64,
) -> Result<String> {
    let mut out = String::from("# cloud-dump settings for restore_command (wal-fetch); secrets: keep 0600\n");
    // One line per setting: a value with a line break cannot be carried (the file would
    // not read back as it was written).
    let mut multi_line = Vec::new();
    let mut put = |k: &str, v: &str| {
        if v.contains(['\n', '\r']) {
            multi_line.push(k.to_owned());
        } else {
            out.push_str(&format!("{k}={v}\n"));
        }
    };
    put("CLOUD_DUMP_REPO", &setup::repo_url(g)?);
    if let Some(c) = &g.cluster {
        put("CLOUD_DUMP_CLUSTER", c);
    }
    put("CLOUD_DUMP_WAL_PREFIX", &g.wal_prefix);
    put("CLOUD_DUMP_LOG_LEVEL", "warn");
    for (k, v) in [
        ("CLOUD_DUMP_S3_ENDPOINT", g.s3_endpoint.clone()),
        ("CLOUD_DUMP_S3_REGION", g.s3_region.clone()),
        ("STORJ_ACCESS", g.storj_access.clone()),
        ("STORJ_AUTH_SERVICE", g.storj_auth_service.clone()),
        ("STORJ_GATEWAY", g.storj_gateway.clone()),
    ] {
        if let Some(v) = v {
            put(k, &v);
        }
    }
    for (flag, k) in [
        (g.s3_virtual_hosted_style, "CLOUD_DUMP_S3_VIRTUAL_HOSTED_STYLE"),
        (g.s3_allow_http, "CLOUD_DUMP_S3_ALLOW_HTTP"),
        (g.s3_skip_verify, "CLOUD_DUMP_S3_SKIP_VERIFY"),
    ] {
        if flag {
            put(k, "true");
        }
    }
    for (k, v) in std::env::vars() {
        if copied_credential(&k, |n| std::env::var_os(n).is_some()) {
            put(&k, &v);
        }
    }
    // WAL keys: the WAL passphrase (or the backup's) opens the repository key once, here.
    let pass: Option<SecretString> = a.wal_passphrase.clone().map(Into::into).or(match &req.decryption {
        Decryption::Passphrase(p) => Some(p.clone()),
        _ => None,
    });
    let mut identities = Vec::new();
    if let Some(p) = &pass {
        if let Some(id) = repokey::identity(repo, wal_dir, p).await? {
            identities.push(id.to_string().expose_secret().to_owned());
        }
        put("WAL_PASSPHRASE", p.expose_secret());
    }
    let id_file = a.wal_identity_key.clone().or_else(|| a.decrypt.identity_key.clone());
    if let Some(f) = id_file {
        for id in setup::read_identities(&f)? {
            identities.push(id.to_string().expose_secret().to_owned());
        }
    }
    if !identities.is_empty() {
        put(wal::IDENTITY_ENV, &identities.join(","));
    }
    // Plain WAL is refused when the operator gave WAL keys or the archive is encrypted;
    // a backup key alone does not make an unencrypted archive unreadable.
    let strict = a.wal_passphrase.is_some()
        || a.wal_identity_key.is_some()
        || repo.head(&format!("{wal_dir}{}", repokey::KEY_OBJECT)).await?.is_some()
        || cloud_dump_postgres::WalArchive::new(repo, &req.layout).any_encrypted().await?;
    put(wal::REQUIRE_ENCRYPTED_ENV, if strict { "true" } else { "false" });
    put(wal::SEGMENT_SIZE_ENV, &req_segment_size.to_string());
    if !multi_line.is_empty() {
        bail!(
            "cannot carry {} into the restore settings file: the value spans several lines; give it as a file \
             (e.g. GOOGLE_SERVICE_ACCOUNT=/path/key.json) or on one line",
            multi_line.join(", ")
        );
    }
    Ok(out)
}

/// Which of the restoring shell's cloud variables the settings file keeps for wal-fetch.
/// Static settings and long-lived keys are copied; what the standard credential chains
/// supply on the server itself (instance metadata, web identity, profiles) and short-lived
/// session credentials are not: a frozen copy would expire during a long recovery.
fn copied_credential(name: &str, is_set: impl Fn(&str) -> bool) -> bool {
    // Settings, plus credentials that are files or long-lived keys.
    const LONG_LIVED: &[&str] = &[
        "AWS_CA_BUNDLE",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "GOOGLE_SERVICE_ACCOUNT",
        "GOOGLE_SERVICE_ACCOUNT_PATH",
        "GOOGLE_SERVICE_ACCOUNT_KEY",
        "AZURE_STORAGE_ACCOUNT_KEY",
        "AZURE_STORAGE_ACCESS_KEY",
    ];
    match name {
        // Long-lived keys, unless they come with a session token (then they expire).
        "AWS_ACCESS_KEY_ID" | "AWS_SECRET_ACCESS_KEY" => !is_set("AWS_SESSION_TOKEN"),
        n => setup::STORE_SETTINGS.contains(&n) || LONG_LIVED.contains(&n),
    }
}

#[cfg(test)]
mod tests {
    use super::copied_credential;

    #[test]
    fn only_long_lived_credentials_are_copied() {
        let none = |_: &str| false;
        let session = |n: &str| n == "AWS_SESSION_TOKEN";
        assert!(copied_credential("AWS_ACCESS_KEY_ID", none));
        assert!(!copied_credential("AWS_ACCESS_KEY_ID", session));
        assert!(!copied_credential("AWS_SECRET_ACCESS_KEY", session));
        for chain in [
            "AWS_SESSION_TOKEN",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_ROLE_ARN",
            "AWS_PROFILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AZURE_FEDERATED_TOKEN_FILE",
            "AZURE_CLIENT_SECRET",
        ] {
            assert!(!copied_credential(chain, none), "{chain}");
        }
        assert!(copied_credential("AWS_REGION", none));
    }
}
