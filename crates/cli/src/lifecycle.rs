//! `expire`, `delete`, `keep` and `info`: flags in, plans and summaries from the postgres
//! crate, printing and exit codes out.

use anyhow::{bail, Context, Result};
use cloud_dump_postgres::expire::Policy;
use cloud_dump_postgres::info;
use cloud_dump_postgres::{now_us, PgRepository};

use crate::args::{DeleteArgs, ExpireArgs, GlobalArgs, InfoArgs, KeepArgs, VerifyArgs};
use crate::{mb, setup};

/// The repository passphrase for the lifecycle commands (`CLOUD_DUMP_PASSPHRASE` or
/// `CLOUD_DUMP_PASSPHRASE_FILE`): with it, manifests and keep/release marks of
/// passphrase-encrypted backups are authenticated, and `keep` writes authenticated marks.
fn lifecycle_passphrase() -> Result<Option<cloud_dump_pipeline::SecretString>> {
    let value = std::env::var("CLOUD_DUMP_PASSPHRASE").ok().filter(|v| !v.is_empty());
    let file = std::env::var_os("CLOUD_DUMP_PASSPHRASE_FILE").filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
    setup::passphrase(&value, &file)
}

pub async fn expire(g: &GlobalArgs, a: &ExpireArgs) -> Result<()> {
    let policy = Policy { retain_full: a.retain_full, retain_days: a.retain_days, now_us: now_us() };
    cloud_dump_postgres::expire::check_policy(&policy).map_err(anyhow::Error::msg)?;
    let layout = setup::layout(g)?;
    let repo = setup::open_repo(g).await?;
    let pg = PgRepository::new(&repo, &layout).with_passphrase(lifecycle_passphrase()?);
    let (inv, plan) = pg.plan_expire(&policy).await.context("cannot plan the expiry")?;
    let verb = if a.dry_run { "would delete" } else { "deleting" };
    for (name, v) in &plan.backups {
        if v.is_delete() {
            println!("{verb} backup {name}: {}", v.reason());
        } else {
            println!("kept backup {name}: {}", v.reason());
        }
    }
    for (name, _) in &inv.interrupted {
        println!(
            "{} backup {name}: an earlier delete of it was cut short",
            if a.dry_run { "would finish deleting" } else { "finishing the delete of" }
        );
    }
    for u in &inv.unfinished {
        println!("left alone {u}: no manifest (a backup running now, or one cut short: `delete --name {u} --abandoned` once it is a day old)");
    }
    for (u, why) in &inv.unreadable {
        println!("left alone {u}: {why}");
    }
    println!(
        "WAL: {} object(s) {}; {}",
        plan.wal_delete.len(),
        if a.dry_run { "would be deleted" } else { "to delete" },
        plan.wal_reason
    );
    if a.dry_run {
        for k in &plan.wal_delete {
            println!("  {k}");
        }
        old_versions(g, &pg, &policy, &plan, true).await?;
        println!("dry run: nothing was deleted");
        return Ok(());
    }
    let out = pg.execute_expire(&inv, &plan).await.context("expire failed")?;
    old_versions(g, &pg, &policy, &plan, false).await?;
    if !inv.unreadable.is_empty() {
        bail!(
            "{} backup folder(s) have an unreadable manifest ({}): they were left alone and no WAL was deleted; \
             repair or remove them",
            inv.unreadable.len(),
            inv.unreadable.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    println!(
        "deleted {} backup(s) and {} WAL object(s) from {}",
        out.backups_deleted.len() + out.interrupted_finished.len(),
        out.wal_deleted,
        repo.url()
    );
    if !out.failed.is_empty() {
        for (k, why) in &out.failed {
            eprintln!("not deleted (left for the next run): {k}: {why}");
        }
        bail!("{} object(s) could not be deleted (locked or refused); the next expire tries again", out.failed.len());
    }
    Ok(())
}

/// On a versioned bucket (Object Lock): deletes for good the old versions of what expire
/// deleted, once their lock allows; those still locked are reported and left for a later
/// run. A refusal other than a lock fails the run.
async fn old_versions(
    g: &GlobalArgs,
    pg: &PgRepository<'_>,
    policy: &Policy,
    plan: &cloud_dump_postgres::expire::ExpirePlan,
    dry_run: bool,
) -> Result<()> {
    let opts = setup::storage_options(g);
    let url = pg.repo().url();
    let Some(versions) = cloud_dump_storage::versions(url, &opts).map_err(anyhow::Error::msg)? else {
        return Ok(());
    };
    // Only on a bucket with Object Lock: on one with versioning alone, old versions are
    // the owner's undo window (a lifecycle rule ends it).
    let retention_days = match cloud_dump_storage::bucket_protection(url, &opts).await {
        Ok(Some(p)) if p.object_lock => p.retention_days,
        Ok(_) => return Ok(()),
        Err(e) => {
            eprintln!("warning: cannot tell whether the bucket has Object Lock ({e}): old versions are left alone");
            return Ok(());
        }
    };
    let out = pg.expire_old_versions(&versions, policy, plan, retention_days, dry_run).await.context("old versions")?;
    for (f, why) in &out.hidden_backups_kept {
        println!("old versions of deleted backup folder {f}: kept ({why})");
    }
    let verb = if dry_run { "would delete" } else { "deleted" };
    println!(
        "old versions: {verb} {} data version(s) and {} delete marker(s) of deleted objects for good",
        out.removed, out.markers_removed
    );
    let locked = out.locked;
    if locked > 0 {
        println!(
            "old versions: {locked} refused as still locked (Object Lock retention): left in place; a later expire \
             removes them"
        );
    }
    let other: Vec<String> = out.refused.iter().map(|(c, n)| format!("{n} ({c})")).collect();
    if !other.is_empty() {
        bail!("old versions the store refused to delete: {}", other.join(", "));
    }
    Ok(())
}

/// How long after its start an unfinished backup may be deleted with `--abandoned`.
const ABANDONED_AFTER_US: i64 = 24 * 3600 * 1_000_000;

pub async fn delete(g: &GlobalArgs, a: &DeleteArgs) -> Result<()> {
    let layout = setup::layout(g)?;
    let repo = setup::open_repo(g).await?;
    let pg = PgRepository::new(&repo, &layout).with_passphrase(lifecycle_passphrase()?);
    cloud_dump_postgres::layout::validate_component("backup name", &a.name).map_err(anyhow::Error::msg)?;
    let inv = pg.inventory().await?;
    if let Some((_, objects)) = inv.interrupted.iter().find(|(n, _)| *n == a.name) {
        let failed = pg.delete_folder(&a.name, objects).await?;
        if let Some((k, e)) = failed.first() {
            bail!(
                "the delete of backup {} is still not finished: {} object(s) left, e.g. {k}: {e}",
                a.name,
                failed.len()
            );
        }
        println!("finished the interrupted delete of backup {} ({} objects) in {}", a.name, objects.len(), repo.url());
        return Ok(());
    }
    if inv.unfinished.contains(&a.name) {
        if !a.abandoned {
            bail!(
                "backup {} has no manifest: it is being written now, or was cut short; if no backup of that name is running, \
                 delete it with --abandoned",
                a.name
            );
        }
        let n = pg.delete_abandoned(&a.name, ABANDONED_AFTER_US).await?;
        println!("deleted the unfinished backup folder {} ({n} objects) from {}", a.name, repo.url());
        return Ok(());
    }
    let Some(b) = inv.backups.iter().find(|b| b.name() == a.name) else {
        // Refuses an unknown or unreadable name with the list of names.
        cloud_dump_postgres::load_manifest(&repo, &layout, &a.name).await?;
        bail!("backup {:?} disappeared while being deleted", a.name)
    };
    if b.kept {
        bail!("backup {} has a keep mark; release it first: cloud-dump keep --name {} --release", a.name, a.name);
    }
    let failed = pg.delete_backup(b).await.with_context(|| format!("cannot delete backup {}", a.name))?;
    if !failed.is_empty() {
        let list = failed.iter().map(|(k, w)| format!("{k} ({w})")).collect::<Vec<_>>().join(", ");
        let manifest = format!("{}{}", layout.backup_dir(&a.name), cloud_dump_postgres::layout::MANIFEST_FILE);
        if failed.iter().any(|(k, _)| *k == manifest) {
            bail!("backup {} was not deleted: {list}", a.name);
        }
        bail!(
            "backup {} is gone (its manifest is deleted), but {} of its objects are left (the next expire or delete finishes it): {list}",
            a.name,
            failed.len()
        );
    }
    println!("deleted backup {} ({} objects) from {}", a.name, b.objects.len(), repo.url());
    Ok(())
}

pub async fn keep(g: &GlobalArgs, a: &KeepArgs) -> Result<()> {
    let layout = setup::layout(g)?;
    let repo = setup::open_repo(g).await?;
    PgRepository::new(&repo, &layout).with_passphrase(lifecycle_passphrase()?).set_keep(&a.name, !a.release).await?;
    if a.release {
        println!("released backup {}: expire may delete it", a.name);
    } else {
        println!("kept backup {}: expire leaves it alone until `keep --release`", a.name);
    }
    Ok(())
}

pub async fn info(g: &GlobalArgs, a: &InfoArgs) -> Result<()> {
    let layout = setup::layout(g)?;
    let repo = setup::open_repo(g).await?;
    let (_, s) = PgRepository::new(&repo, &layout).summary(now_us()).await?;
    // Whether the bucket keeps what is written (S3 with static credentials only).
    let protection = cloud_dump_storage::bucket_protection(repo.url(), &setup::storage_options(g)).await;
    let window_days = std::env::var("CLOUD_DUMP_RETAIN_DAYS").ok().and_then(|d| d.parse::<f64>().ok());
    if a.json {
        let mut v = serde_json::to_value(&s)?;
        v["bucket"] = match &protection {
            Ok(Some(p)) => {
                let mut b = serde_json::to_value(p)?;
                if let Some(d) = window_days {
                    b["covers_retain_days"] = serde_json::json!(p.covers_days(d));
                }
                b
            }
            Ok(None) => serde_json::json!("unknown"),
            Err(e) => serde_json::json!({ "error": e }),
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if let Some(p) = &a.prometheus {
        let text = info::prometheus(&s, protection.as_ref().ok().and_then(Option::as_ref));
        if p.as_os_str() == "-" {
            print!("{text}");
        } else {
            cloud_dump_postgres::write_atomically(p, text.as_bytes())
                .with_context(|| format!("cannot write {}", p.display()))?;
        }
        return Ok(());
    }
    print_text(&s);
    match &protection {
        Ok(Some(b)) => println!(
            "Bucket: versioning {}, Object Lock {}{}",
            b.versioning,
            match (&b.retention_mode, b.retention_days) {
                (Some(m), Some(d)) => format!("{m}, default retention {d} day(s)"),
                _ if b.object_lock => "on, no default retention".to_owned(),
                _ => "off".to_owned(),
            },
            match window_days {
                Some(d) if b.covers_days(d) => format!("; covers the {d}-day recovery window"),
                Some(d) => format!("; does NOT cover the {d}-day recovery window (CLOUD_DUMP_RETAIN_DAYS)"),
                None => String::new(),
            }
        ),
        Ok(None) => {}
        Err(e) => println!("Bucket: versioning and Object Lock unknown ({e})"),
    }
    Ok(())
}

fn print_text(s: &info::Summary) {
    println!(
        "Repository: {}{}",
        s.repository,
        s.cluster.as_ref().map(|c| format!(" (cluster {c})")).unwrap_or_default()
    );
    match &s.recovery_window {
        Some((from, to)) => println!(
            "Recovery window: any point from {from} to {to} ({}{})",
            s.recovery_window_end.as_deref().unwrap_or("newest segment"),
            s.recovery_timeline.map(|t| format!(", timeline {t}")).unwrap_or_default()
        ),
        None => println!(
            "Recovery window: none ({})",
            s.recovery_window_problem
                .as_deref()
                .unwrap_or("no backup whose WAL reaches the newest archived segment without a hole")
        ),
    }
    match (&s.newest_wal, &s.newest_wal_time, s.newest_wal_age_seconds) {
        (Some(n), Some(t), Some(age)) => println!("Newest WAL: {n}, archived {t} ({age:.0} s ago)"),
        _ => println!("Newest WAL: none archived"),
    }
    println!("Size: {} in all, {} of WAL", mb(s.repository_bytes), mb(s.wal_bytes));
    println!();
    println!("{:<32} {:<28} {:>10} {:>12} {:>5} {:>4}", "BACKUP", "ENDED", "DURATION", "STORED", "KEEP", "TLI");
    for b in &s.backups {
        println!(
            "{:<32} {:<28} {:>9.1}s {:>12} {:>5} {:>4}",
            b.name,
            b.stop_time,
            b.duration_seconds,
            mb(b.stored_bytes),
            if b.kept { "yes" } else { "" },
            b.timeline
        );
    }
    for u in &s.unfinished {
        println!("{u:<32} (no manifest: running now, or abandoned)");
    }
    for (u, why) in &s.unreadable {
        println!("{u:<32} UNREADABLE: {why}");
    }
    println!();
    println!("{:<9} {:<26} {:<26} {:>9} {:>6} {:>12}", "TIMELINE", "FIRST", "LAST", "SEGMENTS", "HOLES", "SIZE");
    for t in &s.timelines {
        println!(
            "{:<9} {:<26} {:<26} {:>9} {:>6} {:>12}{}",
            t.timeline,
            t.first,
            t.last,
            t.segments,
            t.holes,
            mb(t.bytes),
            t.first_hole.as_ref().map(|h| format!("  first hole: {h}")).unwrap_or_default()
        );
    }
}

pub async fn verify(g: &GlobalArgs, a: &VerifyArgs) -> Result<std::process::ExitCode> {
    use cloud_dump_pipeline::Decryption;
    use cloud_dump_postgres::verify::{verify, VerifyRequest};
    use cloud_dump_postgres::WalKeys;
    let layout = setup::layout(g)?;
    let repo = setup::open_repo(g).await?;
    let decryption = setup::decryption(&a.decrypt)?;
    let wal_keys = match &decryption {
        Decryption::Passphrase(p) => {
            WalKeys { passphrase: Some(p.clone()), identities: vec![], require_encrypted: false }
        }
        Decryption::Identities(ids) => WalKeys { passphrase: None, identities: ids.clone(), require_encrypted: false },
        _ => WalKeys { passphrase: None, identities: vec![], require_encrypted: false },
    };
    let names = if a.all {
        None
    } else if !a.name.is_empty() {
        Some(a.name.clone())
    } else {
        let inv = PgRepository::new(&repo, &layout).inventory().await?;
        match inv.backups.first() {
            Some(b) => Some(vec![b.name().to_owned()]),
            None => bail!("no backups in {} to verify", repo.url()),
        }
    };
    if a.drill {
        return crate::drill::run(g, a, &repo, &layout, names.as_deref().and_then(|n| n.first().cloned())).await;
    }
    let req = VerifyRequest { names, decryption, wal: a.wal, wal_keys, parallel: g.parallel as usize };
    let report = verify(&repo, &layout, &req).await.context("verify failed")?;
    let problems = report.problems();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for b in &report.backups {
            let files = b.files_checked.map(|n| format!(", {n} files against backup_manifest")).unwrap_or_default();
            let verdict = if b.problems.is_empty() { "ok" } else { "FAILED" };
            println!("backup {}: {verdict} ({} objects, {}{files})", b.name, b.objects, mb(b.stored_bytes));
            for p in &b.problems {
                println!("  problem: {p}");
            }
            for n in &b.not_checked {
                println!("  not checked: {n}");
            }
        }
        if let Some(w) = &report.wal {
            let verdict = if w.problems.is_empty() { "ok" } else { "FAILED" };
            println!("WAL: {verdict} ({} segments checked, {})", w.segments_checked, mb(w.bytes));
            for p in &w.problems {
                println!("  problem: {p}");
            }
            for n in &w.not_checked {
                println!("  not checked: {n}");
            }
        }
        let bytes: u64 = report.backups.iter().map(|b| b.stored_bytes).sum();
        println!("{:.1} s, {:.0} MB/s", report.seconds, bytes as f64 / 1e6 / report.seconds.max(0.001));
    }
    if problems.is_empty() {
        return Ok(std::process::ExitCode::SUCCESS);
    }
    crate::report_error("", &anyhow::anyhow!("verify found {} problem(s): {}", problems.len(), problems.join("; ")));
    Ok(std::process::ExitCode::from(1))
}
