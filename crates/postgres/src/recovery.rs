//! Point-in-time recovery settings: targets, choosing the base backup, and what `restore`
//! writes into the data directory (recovery.signal and postgresql.auto.conf, quoted the
//! way PostgreSQL's configuration parser reads them).

use std::io::Write;
use std::path::Path;

use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::manifest::BackupManifest;
use crate::timeline::{BackupPoint, Needed, TimelineGraph, Until};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryTarget {
    /// The original text (for PostgreSQL) and its parsed instant (for our checks).
    Time(String, OffsetDateTime),
    Lsn(Lsn),
    Xid(String),
    Name(String),
    Immediate,
    Latest,
}

impl RecoveryTarget {
    pub fn describe(&self) -> String {
        match self {
            RecoveryTarget::Time(t, _) => format!("time {t}"),
            RecoveryTarget::Lsn(l) => format!("LSN {l}"),
            RecoveryTarget::Xid(x) => format!("transaction {x}"),
            RecoveryTarget::Name(n) => format!("restore point {n:?}"),
            RecoveryTarget::Immediate => "consistency (immediate)".into(),
            RecoveryTarget::Latest => "the end of the archived WAL (latest)".into(),
        }
    }
}

/// Accepts `2026-03-22 14:30:00 UTC`, `2026-03-22T14:30:00Z`, `2026-03-22 14:30:00+02`,
/// fractional seconds, and a bare date-time (taken as UTC).
pub fn parse_time(s: &str) -> Result<OffsetDateTime> {
    use time::format_description::well_known::Rfc3339;
    let bad = || {
        Error::Config(format!(
            "--recovery-target-time {s:?}: expected a time like \"2026-03-22 14:30:00 UTC\" or 2026-03-22T14:30:00Z"
        ))
    };
    let t = s.trim();
    if let Ok(v) = OffsetDateTime::parse(t, &Rfc3339) {
        return Ok(v);
    }
    let (body, offset) = if let Some(b) = t.strip_suffix(" UTC").or_else(|| t.strip_suffix("Z")) {
        (b.trim(), "+00:00".to_owned())
    } else if let Some(pos) = t.rfind(['+', '-']).filter(|p| *p > 10) {
        let off = &t[pos..];
        let off = match off.len() {
            3 => format!("{off}:00"),
            5 => format!("{}:{}", &off[..3], &off[3..]),
            _ => off.to_owned(),
        };
        (t[..pos].trim(), off)
    } else {
        (t, "+00:00".to_owned())
    };
    let iso = format!("{}{offset}", body.replacen(' ', "T", 1));
    OffsetDateTime::parse(&iso, &Rfc3339).map_err(|_| bad())
}

/// What PostgreSQL is told: always UTC with an explicit offset, so the server's TimeZone
/// does not change its meaning.
pub fn pg_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}+00",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// When the backup ended, never earlier than it did: manifests written before times had
/// fractions hold the second rounded down, so they count as one second later.
fn stop_time(m: &BackupManifest) -> Option<OffsetDateTime> {
    let t = OffsetDateTime::parse(&m.stop_time, &time::format_description::well_known::Rfc3339).ok()?;
    Some(if m.stop_time.contains('.') { t } else { t + time::Duration::seconds(1) })
}

/// The newest backup whose end precedes the target (`backups` newest first).
pub fn choose_backup<'a>(backups: &'a [BackupManifest], target: &RecoveryTarget) -> Option<&'a BackupManifest> {
    backups.iter().find(|m| match target {
        RecoveryTarget::Time(_, t) => stop_time(m).is_some_and(|s| s < *t),
        RecoveryTarget::Lsn(l) => m.end_lsn <= *l,
        _ => true,
    })
}

/// Refuses targets the backup cannot reach.
pub fn check_target(m: &BackupManifest, target: &RecoveryTarget) -> Result<()> {
    match target {
        RecoveryTarget::Lsn(l) if *l < m.end_lsn => Err(Error::Config(format!(
            "recovery target LSN {l} is before the end of backup {} ({}): a backup is consistent only from its end; choose an older backup",
            m.name, m.end_lsn
        ))),
        RecoveryTarget::Time(text, t) if stop_time(m).is_some_and(|s| *t <= s) => Err(Error::Config(format!(
            "recovery target time {text} is before backup {} completed ({}); choose an older backup",
            m.name, m.stop_time
        ))),
        _ => Ok(()),
    }
}

/// What the archive offers a point-in-time restore from one backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalReach {
    /// The first segment replay reads (the one holding the backup's end).
    pub first: String,
    /// Archived segments from there on (any timeline).
    pub segments: usize,
}

/// Whether the archive can reach `target` from backup `m`: refuses a target before the
/// backup's end, an LSN past the newest archived segment, and a time past the newest
/// archived WAL file. `archived`: every WAL file name in the archive with when it was
/// stored; `dir` names the archive in messages. Pure: the runner lists, this decides.
pub fn wal_reach(
    m: &BackupManifest,
    target: &RecoveryTarget,
    archived: &[(String, std::time::SystemTime)],
    dir: &str,
) -> Result<WalReach> {
    check_target(m, target)?;
    let seg_size = m.wal_segment_size();
    let first = m.end_lsn.segment_name(m.timeline, seg_size);
    // Segments (24 hex digits) at or after the first, on any timeline: positions compare
    // by their last 16 digits.
    let segments: Vec<&str> =
        archived.iter().map(|(n, _)| n.as_str()).filter(|n| n.len() == 24 && n[8..] >= first[8..]).collect();
    let newest = segments.iter().map(|n| &n[8..]).max();
    match target {
        RecoveryTarget::Lsn(l) => {
            let need = l.segment_name(m.timeline, seg_size);
            if newest.is_none_or(|n| n < &need[8..]) {
                return Err(Error::Config(format!(
                    "recovery target LSN {l} is after the newest archived WAL in {dir} ({}); nothing can replay to it",
                    newest.map(|n| format!("…{n}")).unwrap_or_else(|| "the archive is empty".into())
                )));
            }
        }
        RecoveryTarget::Time(text, when) => {
            let newest_at = archived.iter().map(|(_, t)| *t).max().map(OffsetDateTime::from);
            if newest_at.is_none_or(|n| n < *when) {
                return Err(Error::Config(format!(
                    "recovery target time {text} is after the newest archived WAL in {dir} ({}); nothing can replay to it",
                    newest_at.map(|n| n.to_string()).unwrap_or_else(|| "the archive is empty".into())
                )));
            }
        }
        _ => {}
    }
    Ok(WalReach { first, segments: segments.len() })
}

/// The settings a point-in-time restore writes, checked: `restore_command` runs `exe`
/// with the settings file `conf`; `spool` (holding it, and secrets) is removed when
/// recovery ends.
pub fn recovery_settings(
    target: &RecoveryTarget,
    action: &str,
    timeline: Option<String>,
    exe: &Path,
    spool: &Path,
    conf: &Path,
) -> Result<RecoverySettings> {
    let s = RecoverySettings {
        target: target.clone(),
        action: action.to_owned(),
        timeline,
        restore_command: restore_command(exe, conf),
        end_command: Some(format!("rm -rf -- {}", shell_quote(&spool.to_string_lossy()).replace('%', "%%"))),
    };
    recovery_lines(&s)?;
    Ok(s)
}

/// A value in postgresql.conf syntax: single quotes, quotes doubled, backslashes escaped.
/// Control characters are refused: a newline would start a setting of its own.
pub fn quote_guc(v: &str) -> Result<String> {
    if let Some(c) = v.chars().find(|c| c.is_control()) {
        return Err(Error::Config(format!(
            "the value {:?} holds the control character {:?}; recovery settings are one line each",
            v.escape_debug().to_string(),
            c
        )));
    }
    Ok(format!("'{}'", v.replace('\\', "\\\\").replace('\'', "''")))
}

/// A word for /bin/sh.
pub fn shell_quote(v: &str) -> String {
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,".contains(&b)) {
        v.to_owned()
    } else {
        format!("'{}'", v.replace('\'', "'\\''"))
    }
}

/// `restore_command` calling this binary with a settings file; `%` in paths is doubled
/// because PostgreSQL expands `%f`/`%p` in it.
pub fn restore_command(exe: &Path, config: &Path) -> String {
    let q = |p: &Path| shell_quote(&p.to_string_lossy()).replace('%', "%%");
    format!("{} wal-fetch %f %p --config {}", q(exe), q(config))
}

pub struct RecoverySettings {
    pub target: RecoveryTarget,
    pub action: String,
    pub timeline: Option<String>,
    pub restore_command: String,
    /// Run by PostgreSQL when recovery ends (removes the restore's settings and secrets).
    pub end_command: Option<String>,
}

/// The settings that steer recovery or standby mode. A backup of a cluster that was itself
/// restored (or was a standby) carries them; each is neutralised before a restore writes
/// its own, so the server recovers with exactly what this restore asked for.
const RECOVERY_GUCS: &[&str] = &[
    "restore_command",
    "recovery_end_command",
    "archive_cleanup_command",
    "recovery_target",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
    "recovery_target_lsn",
    "recovery_target_inclusive",
    "recovery_target_timeline",
    "recovery_target_action",
    "recovery_min_apply_delay",
    "primary_conninfo",
    "primary_slot_name",
    "promote_trigger_file",
    "trigger_file",
    "standby_mode",
    "pause_at_recovery_target",
];

/// The setting a postgresql.conf line assigns, lower-cased: PostgreSQL's configuration
/// lexer reads a name (letters, digits, `_`, `.`, bytes ≥ 0x80), then optional space and
/// `=`, then the value — `name = v`, `name v` and `name'v'` all assign.
fn setting_of(line: &str) -> Option<String> {
    let t = line.trim_start();
    let first = t.chars().next()?;
    if !(first.is_alphabetic() || first == '_' || !first.is_ascii()) {
        return None;
    }
    let end = t
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.' || c == '$' || !c.is_ascii()))
        .unwrap_or(t.len());
    Some(t[..end].to_ascii_lowercase())
}

/// Comments out every line of `text` that sets a recovery setting. Returns the new text and
/// the names it disabled.
pub fn neutralise_recovery_settings(text: &str) -> (String, Vec<String>) {
    let mut out = String::with_capacity(text.len() + 64);
    let mut disabled = Vec::new();
    for line in text.split_inclusive('\n') {
        match setting_of(line) {
            Some(name) if RECOVERY_GUCS.contains(&name.as_str()) => {
                out.push_str("# disabled by cloud-dump restore: ");
                out.push_str(line);
                disabled.push(name);
            }
            _ => out.push_str(line),
        }
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    (out, disabled)
}

/// The files `include`, `include_if_exists` and `include_dir` name in `text` (relative
/// names are relative to `dir`).
fn included_files(text: &str, dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(name) = setting_of(line) else { continue };
        if !matches!(name.as_str(), "include" | "include_if_exists" | "include_dir") {
            continue;
        }
        let rest = line.trim_start()[name.len()..].trim_start().trim_start_matches('=').trim();
        let Some(v) = rest.strip_prefix('\'').and_then(|r| r.split('\'').next()) else { continue };
        let p = dir.join(v);
        if name == "include_dir" {
            if let Ok(rd) = std::fs::read_dir(&p) {
                let mut files: Vec<_> =
                    rd.flatten().map(|e| e.path()).filter(|f| f.extension().is_some_and(|x| x == "conf")).collect();
                files.sort();
                out.extend(files);
            }
        } else {
            out.push(p);
        }
    }
    out
}

/// What `write_recovery` changed besides adding its own settings, for the operator.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Neutralised {
    /// (file, setting) pairs commented out.
    pub settings: Vec<(String, String)>,
    /// Files removed (standby.signal, an old recovery.conf).
    pub removed: Vec<String>,
    /// Included files outside PGDATA that set recovery settings (left alone; the operator
    /// is told).
    pub outside: Vec<String>,
}

/// The settings lines a restore writes; an error (a control character) before anything
/// is written.
pub fn recovery_lines(s: &RecoverySettings) -> Result<Vec<String>> {
    let mut lines = vec![format!("restore_command = {}", quote_guc(&s.restore_command)?)];
    match &s.target {
        RecoveryTarget::Time(_, t) => lines.push(format!("recovery_target_time = {}", quote_guc(&pg_time(*t))?)),
        RecoveryTarget::Lsn(l) => lines.push(format!("recovery_target_lsn = {}", quote_guc(&l.to_string())?)),
        RecoveryTarget::Xid(x) => lines.push(format!("recovery_target_xid = {}", quote_guc(x)?)),
        RecoveryTarget::Name(n) => lines.push(format!("recovery_target_name = {}", quote_guc(n)?)),
        RecoveryTarget::Immediate => lines.push("recovery_target = 'immediate'".into()),
        RecoveryTarget::Latest => {}
    }
    if s.target != RecoveryTarget::Latest {
        lines.push(format!("recovery_target_action = {}", quote_guc(&s.action)?));
    }
    if let Some(t) = &s.timeline {
        lines.push(format!("recovery_target_timeline = {}", quote_guc(t)?));
    }
    if let Some(c) = &s.end_command {
        lines.push(format!("recovery_end_command = {}", quote_guc(c)?));
    }
    Ok(lines)
}

/// Writes recovery.signal and the settings (PostgreSQL 12+), or recovery.conf (10, 11),
/// after neutralising any recovery settings the backup carried.
pub fn write_recovery(pgdata: &Path, version_num: u32, s: &RecoverySettings) -> Result<Neutralised> {
    let io = |p: &Path, e: std::io::Error| Error::Restore(format!("writing {}: {e}", p.display()));
    // Every value is checked before anything is written.
    let lines = recovery_lines(s)?;
    let mut done = Neutralised::default();
    // postgresql.conf, postgresql.auto.conf and what they include, inside PGDATA.
    let mut queue: Vec<std::path::PathBuf> = vec![pgdata.join("postgresql.auto.conf"), pgdata.join("postgresql.conf")];
    let mut seen = Vec::new();
    while let Some(p) = queue.pop() {
        if seen.contains(&p) || seen.len() > 64 {
            continue;
        }
        seen.push(p.clone());
        let shown = p.strip_prefix(pgdata).unwrap_or(&p).display().to_string();
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(&p, e)),
        };
        queue.extend(included_files(&text, p.parent().unwrap_or(pgdata)));
        let (new, disabled) = neutralise_recovery_settings(&text);
        if disabled.is_empty() {
            continue;
        }
        if !p.starts_with(pgdata) {
            done.outside.push(shown);
            continue;
        }
        crate::wal_archive::write_atomically(&p, new.as_bytes()).map_err(|e| io(&p, e))?;
        done.settings.extend(disabled.into_iter().map(|d| (shown.clone(), d)));
    }
    for name in ["standby.signal", "recovery.signal", "recovery.conf"] {
        let p = pgdata.join(name);
        match std::fs::remove_file(&p) {
            Ok(()) => done.removed.push(name.to_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&p, e)),
        }
    }
    let text = format!("\n# written by cloud-dump restore\n{}\n", lines.join("\n"));
    if version_num >= 120000 {
        let conf = pgdata.join("postgresql.auto.conf");
        let mut f = std::fs::OpenOptions::new().append(true).create(true).open(&conf).map_err(|e| io(&conf, e))?;
        f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).map_err(|e| io(&conf, e))?;
        let signal = pgdata.join("recovery.signal");
        std::fs::File::create(&signal).and_then(|f| f.sync_all()).map_err(|e| io(&signal, e))?;
    } else {
        let conf = pgdata.join("recovery.conf");
        std::fs::File::create(&conf)
            .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|_| f.sync_all()))
            .map_err(|e| io(&conf, e))?;
    }
    std::fs::File::open(pgdata).and_then(|d| d.sync_all()).map_err(|e| io(pgdata, e))?;
    Ok(done)
}

/// Makes the restored copy start without archiving (`--archive-mode off`): a line in
/// postgresql.auto.conf, read after postgresql.conf, fsynced.
pub fn disable_archiving(pgdata: &Path) -> Result<()> {
    let conf = pgdata.join("postgresql.auto.conf");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&conf)
        .map_err(|e| Error::Restore(format!("writing {}: {e}", conf.display())))?;
    f.write_all(b"\n# written by cloud-dump restore --archive-mode off\narchive_mode = 'off'\n")
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::Restore(format!("writing {}: {e}", conf.display())))
}

/// What a restored copy will do with its WAL once it runs, from its configuration files
/// (postgresql.conf then postgresql.auto.conf, the last assignment wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Archiving {
    /// archive_mode is off (or unset).
    Off,
    /// archive_command runs `cloud-dump wal-push`.
    CloudDump,
    /// archive_mode is on with another (or no) archive_command.
    Other,
}

/// Reads `archive_mode` and `archive_command` from configuration texts, in the order
/// PostgreSQL reads them.
pub fn archiving_of(texts: &[&str]) -> Archiving {
    let (mut mode, mut command) = (String::from("off"), String::new());
    for text in texts {
        for line in text.lines() {
            let Some(name) = setting_of(line) else { continue };
            if name != "archive_mode" && name != "archive_command" {
                continue;
            }
            let rest = line.trim_start()[name.len()..].trim_start().trim_start_matches('=').trim();
            let value = match rest.strip_prefix('\'') {
                Some(r) => r.rsplit_once('\'').map(|(v, _)| v).unwrap_or(r).replace("''", "'"),
                None => rest.split(|c: char| c.is_whitespace() || c == '#').next().unwrap_or("").to_owned(),
            };
            if name == "archive_mode" {
                mode = value.to_ascii_lowercase();
            } else {
                command = value;
            }
        }
    }
    match mode.as_str() {
        "on" | "always" | "true" | "yes" | "1" => {
            if command.contains("cloud-dump") && command.contains("wal-push") {
                Archiving::CloudDump
            } else {
                Archiving::Other
            }
        }
        _ => Archiving::Off,
    }
}

/// `--recovery-target-timeline`: PostgreSQL's `latest`, `current` or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimelineChoice {
    Latest,
    Current,
    Id(u32),
}

impl std::str::FromStr for TimelineChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<TimelineChoice> {
        match s.trim() {
            "latest" => Ok(TimelineChoice::Latest),
            "current" => Ok(TimelineChoice::Current),
            n => match n.parse::<u32>() {
                Ok(t) if t >= 1 => Ok(TimelineChoice::Id(t)),
                _ => Err(Error::Config(format!(
                    "--recovery-target-timeline {s:?}: expected latest, current or a timeline number (1 or more)"
                ))),
            },
        }
    }
}

/// A backup as the timeline graph sees it.
pub fn backup_point(m: &BackupManifest) -> BackupPoint {
    BackupPoint { tli: m.timeline, start: m.start_lsn, end: m.end_lsn }
}

/// Whether backup `m` ends before `target` (a backup restores only to points after its end).
fn ends_before(m: &BackupManifest, target: &RecoveryTarget) -> bool {
    match target {
        RecoveryTarget::Time(_, t) => stop_time(m).is_some_and(|s| s < *t),
        RecoveryTarget::Lsn(l) => m.end_lsn <= *l,
        _ => true,
    }
}

/// Which backup a point-in-time restore uses and which timeline it follows, decided on the
/// timeline graph: `latest` is the one live branch (refused when a history file is missing
/// or the archive holds more than one live branch); a backup is chosen, or accepted when
/// named, only when it lies on the ancestry of that timeline. `backups`: newest first.
pub fn choose_restore<'a>(
    graph: &TimelineGraph,
    backups: &'a [BackupManifest],
    name: Option<&str>,
    target: &RecoveryTarget,
    timeline: TimelineChoice,
) -> Result<(&'a BackupManifest, u32)> {
    if let Some(n) = name {
        let m = backups.iter().find(|m| m.name == n).ok_or_else(|| {
            Error::Config(format!("backup {n:?} is not among the complete backups of this repository"))
        })?;
        let tli = match timeline {
            TimelineChoice::Id(t) => t,
            TimelineChoice::Current => m.timeline,
            TimelineChoice::Latest => graph.latest(Some(&backup_point(m)))?,
        };
        if !graph.on_ancestry(tli, &backup_point(m)) {
            graph.path(tli)?;
            return Err(Error::Config(format!(
                "backup {n} (timeline {}, consistent at {}) is not on the history of timeline {tli}: PostgreSQL cannot replay from it to that timeline; choose a backup taken before timeline {tli} branched off",
                m.timeline, m.end_lsn
            )));
        }
        check_target(m, target)?;
        return Ok((m, tli));
    }
    let tli = match timeline {
        TimelineChoice::Id(t) => Some(t),
        TimelineChoice::Latest => Some(graph.latest(None)?),
        TimelineChoice::Current => None,
    };
    if let Some(t) = tli {
        graph.path(t)?;
    }
    let fits =
        |m: &&BackupManifest| ends_before(m, target) && tli.is_none_or(|t| graph.on_ancestry(t, &backup_point(m)));
    match backups.iter().find(fits) {
        Some(m) => Ok((m, tli.unwrap_or(m.timeline))),
        None => Err(Error::Config(match tli {
            Some(t) => format!("no backup on the history of timeline {t} ends before {}", target.describe()),
            None => format!("no backup ends before {}", target.describe()),
        })),
    }
}

/// Refuses a time target after the last commit (or abort) the archive holds on the path:
/// PostgreSQL stops a time target only at a transaction's end, and without one after the
/// target it ends recovery with "recovery ended before configured recovery target was
/// reached". `last_commit_us`: the newest such time on the path, when records tell it.
/// PostgreSQL before 13 promotes at the end of WAL instead: nothing is refused for them.
pub fn check_time_reachable(
    target: &RecoveryTarget,
    last_commit_us: Option<i64>,
    tli: u32,
    version_num: u32,
) -> Result<()> {
    if version_num < 130000 {
        return Ok(());
    }
    if let (RecoveryTarget::Time(text, t), Some(last)) = (target, last_commit_us) {
        let want = (t.unix_timestamp_nanos() / 1000) as i64;
        if want > last {
            return Err(Error::Config(format!(
                "recovery target time {text} is after the last commit the archive holds on timeline {tli}'s history ({}): PostgreSQL would end recovery before reaching it; choose a time up to then, or --recovery-target latest",
                crate::info::fmt_us(last)
            )));
        }
    }
    Ok(())
}

/// The segments a backup carries itself when its WAL is included (start to end, its
/// timeline).
pub fn own_segments(m: &BackupManifest, seg_size: u64) -> Vec<String> {
    (m.start_lsn.0 / seg_size..=m.end_lsn.0 / seg_size)
        .map(|n| crate::timeline::segment_name(m.timeline, n, seg_size))
        .collect()
}

/// The WAL a restore of `m` to `target` on timeline `tli` needs, refused before anything is
/// written when the archive lacks any of it (a hole, a missing history file) or when a
/// time target lies past every segment on the path.
pub fn check_restore_wal(
    graph: &TimelineGraph,
    m: &BackupManifest,
    tli: u32,
    target: &RecoveryTarget,
    dir: &str,
) -> Result<Needed> {
    let until = match target {
        RecoveryTarget::Time(_, t) => Until::Time((t.unix_timestamp_nanos() / 1000) as i64),
        RecoveryTarget::Lsn(l) => Until::Lsn(*l),
        RecoveryTarget::Immediate => Until::Consistent,
        _ => Until::Latest,
    };
    let mut needed = graph
        .needed(&backup_point(m), tli, until)?
        .ok_or_else(|| Error::Config(format!("backup {} is not on the history of timeline {tli}", m.name)))?;
    if m.wal_included {
        let own = own_segments(m, graph.segment_size());
        needed.missing.retain(|s| !own.contains(s));
    }
    if !needed.missing.is_empty() {
        return Err(Error::WalMissing {
            dir: dir.to_owned(),
            backup: m.name.clone(),
            target: format!("{} on timeline {tli}", target.describe()),
            missing: needed.missing.clone(),
        });
    }
    if needed.past_archive {
        let newest = needed.segments.iter().filter_map(|s| graph.stored(s).map(|t| (t, s))).max();
        return Err(Error::Config(format!(
            "{} is after the newest archived WAL on timeline {tli}'s history in {dir} ({}); nothing can replay to it",
            target.describe(),
            match newest {
                Some((t, s)) => format!("{s}, stored {}", crate::info::fmt_us(t)),
                None => "none archived".into(),
            }
        )));
    }
    Ok(needed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(target: RecoveryTarget) -> RecoverySettings {
        RecoverySettings {
            target,
            action: "promote".into(),
            timeline: None,
            restore_command: "cloud-dump wal-fetch %f %p".into(),
            end_command: Some("rm -rf x".into()),
        }
    }

    #[test]
    fn inherited_recovery_settings_are_neutralised() {
        let d = tempfile::tempdir().unwrap();
        let auto = "# Do not edit this file manually!\nwork_mem = '4MB'\nrestore_command = 'old'\n  Recovery_Target_Time='2020-01-01'\nrecovery_target_action = 'shutdown'\nprimary_conninfo = 'host=src'\n";
        std::fs::write(d.path().join("postgresql.auto.conf"), auto).unwrap();
        std::fs::write(
            d.path().join("postgresql.conf"),
            "shared_buffers = 128MB\nrecovery_target_xid 77 # old\ninclude_dir 'conf.d'\n",
        )
        .unwrap();
        std::fs::create_dir(d.path().join("conf.d")).unwrap();
        std::fs::write(d.path().join("conf.d/10-recovery.conf"), "recovery_min_apply_delay'1d'\n").unwrap();
        std::fs::write(d.path().join("standby.signal"), "").unwrap();
        let done = write_recovery(d.path(), 150000, &settings(RecoveryTarget::Latest)).unwrap();
        assert_eq!(done.removed, vec!["standby.signal".to_owned()]);
        let names: Vec<_> = done.settings.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "recovery_target_xid",
                "recovery_min_apply_delay",
                "restore_command",
                "recovery_target_time",
                "recovery_target_action",
                "primary_conninfo",
            ]
        );
        let text = std::fs::read_to_string(d.path().join("postgresql.auto.conf")).unwrap()
            + &std::fs::read_to_string(d.path().join("postgresql.conf")).unwrap()
            + &std::fs::read_to_string(d.path().join("conf.d/10-recovery.conf")).unwrap();
        // What is still in force is exactly what this restore asked for.
        let active: Vec<_> = text.lines().filter_map(setting_of).collect();
        assert_eq!(active, ["work_mem", "restore_command", "recovery_end_command", "shared_buffers", "include_dir"]);
        assert!(d.path().join("recovery.signal").exists() && !d.path().join("standby.signal").exists());
        // A value with a newline writes nothing at all.
        let d2 = tempfile::tempdir().unwrap();
        let bad = settings(RecoveryTarget::Name("x\nrestore_command='evil'".into()));
        assert!(write_recovery(d2.path(), 150000, &bad).is_err());
        assert_eq!(std::fs::read_dir(d2.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_backup_ending_after_the_target_is_never_chosen() {
        let mut old = crate::manifest::BackupManifest::example();
        old.name = "old".into();
        old.stop_time = "2026-03-22T02:00:00Z".into();
        let mut precise = old.clone();
        precise.name = "precise".into();
        precise.stop_time = "2026-03-22T03:00:00.250000Z".into();
        let backups = vec![precise.clone(), old.clone()];
        let at = |s: &str| RecoveryTarget::Time(s.into(), parse_time(s).unwrap());
        // Rounded-down second: 02:00:00 may have been 02:00:00.9.
        assert!(choose_backup(&[old.clone()], &at("2026-03-22 02:00:00.5 UTC")).is_none());
        assert_eq!(choose_backup(&backups, &at("2026-03-22 02:00:01.5 UTC")).unwrap().name, "old");
        assert_eq!(choose_backup(&backups, &at("2026-03-22 03:00:00.2 UTC")).unwrap().name, "old");
        assert_eq!(choose_backup(&backups, &at("2026-03-22 03:00:00.3 UTC")).unwrap().name, "precise");
        assert!(check_target(&old, &at("2026-03-22 02:00:00.5 UTC")).is_err());
    }

    #[test]
    fn times() {
        let a = parse_time("2026-03-22 14:30:00 UTC").unwrap();
        assert_eq!(parse_time("2026-03-22T14:30:00Z").unwrap(), a);
        assert_eq!(parse_time("2026-03-22 16:30:00+02").unwrap(), a);
        assert_eq!(parse_time("2026-03-22 14:30:00").unwrap(), a);
        assert_eq!(pg_time(a), "2026-03-22 14:30:00.000000+00");
        let frac = parse_time("2026-03-22 14:30:00.123456 UTC").unwrap();
        assert_eq!(pg_time(frac), "2026-03-22 14:30:00.123456+00");
        for bad in ["yesterday", "2026-13-01 00:00:00", "14:30"] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn quoting_postgres_accepts() {
        assert_eq!(quote_guc("it's").unwrap(), "'it''s'");
        assert_eq!(quote_guc("a\\b").unwrap(), "'a\\\\b'");
        for bad in ["x\nrestore_command = 'sh -c evil'", "x\r", "\u{0}", "tab\there", "\u{7f}", "\u{85}"] {
            assert!(quote_guc(bad).is_err(), "{bad:?}");
        }
        assert_eq!(shell_quote("/usr/bin/cloud-dump"), "/usr/bin/cloud-dump");
        assert_eq!(shell_quote("/my dir/it's"), "'/my dir/it'\\''s'");
        let cmd =
            restore_command(Path::new("/opt/cd 100%/cloud-dump"), Path::new("/data/pg_wal/.cloud-dump/restore.conf"));
        assert_eq!(cmd, "'/opt/cd 100%%/cloud-dump' wal-fetch %f %p --config /data/pg_wal/.cloud-dump/restore.conf");
    }

    fn backup_ending_at(end: u64) -> BackupManifest {
        let mut m = BackupManifest::example();
        m.name = "b".into();
        m.stop_time = "2026-11-23T08:00:00Z".into();
        m.end_lsn = Lsn(end);
        m.objects.clear();
        m
    }

    #[test]
    fn the_archive_must_reach_the_target() {
        let m = backup_ending_at(0x0400_0100);
        let at = |secs: u64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        let t0 = OffsetDateTime::parse("2026-11-23T08:00:00Z", &time::format_description::well_known::Rfc3339)
            .unwrap()
            .unix_timestamp() as u64;
        let archived = vec![
            ("000000010000000000000002".to_owned(), at(t0 - 600)),
            ("000000010000000000000004".to_owned(), at(t0 + 10)),
            ("000000020000000000000005".to_owned(), at(t0 + 20)),
            ("00000002.history".to_owned(), at(t0 + 15)),
        ];
        // From the backup's end on any timeline: segments 4 and 5.
        let r = wal_reach(&m, &RecoveryTarget::Latest, &archived, "w/").unwrap();
        assert_eq!(r, WalReach { first: "000000010000000000000004".into(), segments: 2 });
        assert!(wal_reach(&m, &RecoveryTarget::Lsn(Lsn(0x0500_0000)), &archived, "w/").is_ok());
        let e = wal_reach(&m, &RecoveryTarget::Lsn(Lsn(0x0600_0000)), &archived, "w/").unwrap_err().to_string();
        assert!(e.contains("after the newest archived WAL in w/ (…0000000000000005)"), "{e}");
        // Before the backup's end: choose an older backup.
        let e = wal_reach(&m, &RecoveryTarget::Lsn(Lsn(0x0400_0000)), &archived, "w/").unwrap_err().to_string();
        assert!(e.contains("before the end of backup b"), "{e}");
        let time = |text: &str| {
            RecoveryTarget::Time(
                text.into(),
                OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).unwrap(),
            )
        };
        assert!(wal_reach(&m, &time("2026-11-23T08:00:15Z"), &archived, "w/").is_ok());
        let e = wal_reach(&m, &time("2026-11-23T08:00:21Z"), &archived, "w/").unwrap_err().to_string();
        assert!(e.contains("recovery target time 2026-11-23T08:00:21Z is after the newest archived WAL"), "{e}");
        let e = wal_reach(&m, &RecoveryTarget::Lsn(Lsn(0x0500_0000)), &[], "w/").unwrap_err().to_string();
        assert!(e.contains("the archive is empty"), "{e}");
    }

    #[test]
    fn recovery_settings_are_checked_and_clean_up_after_themselves() {
        let s = recovery_settings(
            &RecoveryTarget::Latest,
            "promote",
            Some("latest".into()),
            Path::new("/usr/bin/cloud-dump"),
            Path::new("/data/pg_wal/.cloud-dump"),
            Path::new("/data/pg_wal/.cloud-dump/restore.conf"),
        )
        .unwrap();
        assert_eq!(
            s.restore_command,
            "/usr/bin/cloud-dump wal-fetch %f %p --config /data/pg_wal/.cloud-dump/restore.conf"
        );
        assert_eq!(s.end_command.as_deref(), Some("rm -rf -- /data/pg_wal/.cloud-dump"));
        let bad = recovery_settings(
            &RecoveryTarget::Name("a\nrestore_command = 'evil'".into()),
            "promote",
            None,
            Path::new("/x"),
            Path::new("/s"),
            Path::new("/s/c"),
        );
        assert!(bad.is_err());
    }
}
