//! `restore`: plain, or point-in-time with archived WAL. Plan first (which backup, which
//! WAL, what is refused), then do it; `--dry-run` prints the plan.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cloud_dump_pipeline::{repokey, Decryption, ExposeSecret, SecretString};
use cloud_dump_postgres::recovery::{
    choose_backup, parse_time, recovery_settings, wal_reach, write_recovery, RecoveryTarget,
};
use cloud_dump_postgres::{
    check_decryption, list_backups, plan_restore, run_restore, Lsn, ObjectKind, RestoreRequest, WalArchive,
};

use crate::args::{GlobalArgs, RestoreArgs, TargetAction, TargetKind};
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

pub async fn run(g: &GlobalArgs, a: &RestoreArgs) -> Result<()> {
    let target = target(a)?;
    if target.is_none() && (a.recovery_target_timeline.is_some()) {
        bail!("--recovery-target-timeline needs a recovery target (e.g. --recovery-target latest)");
    }
    let mut mapping = Vec::new();
    for m in &a.tablespace_mapping {
        let (old, new) = m.split_once('=').with_context(|| format!("--tablespace-mapping {m:?}: expected OLD=NEW"))?;
        mapping.push((old.to_owned(), PathBuf::from(new)));
    }
    let pgdata = if a.pgdata.is_absolute() { a.pgdata.clone() } else { std::env::current_dir()?.join(&a.pgdata) };
    let layout = setup::layout(g)?;
    let repo = setup::open_repo(g).await?;
    let name = match (&a.name, &target) {
        (Some(n), _) => n.clone(),
        (None, Some(t)) => {
            let backups = list_backups(&repo, &layout).await?;
            match choose_backup(&backups, t) {
                Some(m) => {
                    tracing::info!("using backup {} (the newest that ends before {})", m.name, t.describe());
                    m.name.clone()
                }
                None => bail!("no backup in {} ends before {}", repo.url(), t.describe()),
            }
        }
        (None, None) => bail!("--name is required (or give a --recovery-target-… to use the newest backup before it)"),
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
    check_decryption(m, &req.decryption, false)?;
    let seg_size = m.wal_segment_size();

    // WAL the target needs, and whether the archive can reach it.
    let wal = WalArchive::new(&repo, &layout);
    let wal_plan = match &target {
        Some(t) => Some(wal_reach(m, t, &wal.list_names().await?, wal.dir())?),
        None => None,
    };

    if a.dry_run {
        println!(
            "restore plan for backup {} (PostgreSQL {}, LSN {} to {}):",
            m.name,
            m.short_version(),
            m.start_lsn,
            m.end_lsn
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
        if let (Some(t), Some(reach)) = (&target, &wal_plan) {
            println!(
                "  then replay WAL from {} ({} archived segments from there) in {} up to {}",
                reach.first,
                reach.segments,
                wal.dir(),
                t.describe()
            );
        }
        println!(
            "total: {} to download, {} to write; nothing was written (dry run)",
            mb(m.stored_size()),
            mb(m.raw_size())
        );
        return Ok(());
    }
    check_decryption(m, &req.decryption, true)?;
    // Open the WAL keys and check every setting before writing anything: a wrong
    // passphrase or a bad target name must stop us here.
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
            // The settings file holds secrets: gone once recovery ends.
            Some(recovery_settings(t, action, a.recovery_target_timeline.clone(), &exe, &spool, &conf)?)
        }
        None => None,
    };

    let progress: Arc<dyn cloud_dump_postgres::Progress> = crate::progress::make(g.progress).into();
    let started = std::time::Instant::now();
    run_restore(&repo, &plan, &req, progress).await?;
    let secs = started.elapsed().as_secs_f64();

    if let (Some(settings), Some(config)) = (settings, wal_config) {
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
        crate::say(&format!(
            "restored backup {} into {} ({} in {:.1} s); PostgreSQL will replay archived WAL from {} up to {}: pg_ctl start -D {}",
            m.name,
            plan.pgdata.display(),
            mb(m.raw_size()),
            secs,
            wal.dir(),
            t.describe(),
            plan.pgdata.display()
        ));
    } else {
        crate::say(&format!(
            "restored backup {} into {} ({} in {:.1} s, {:.0} MB/s); start it with: pg_ctl start -D {}",
            m.name,
            plan.pgdata.display(),
            mb(m.raw_size()),
            secs,
            m.raw_size() as f64 / 1e6 / secs.max(0.001),
            plan.pgdata.display()
        ));
    }
    Ok(())
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
