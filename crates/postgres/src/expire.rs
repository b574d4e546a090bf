//! Retention as a pure function: which backups and which WAL files an `expire` run deletes,
//! each decision with its reason. The runner (repository.rs) lists, calls [`plan`], and
//! deletes; nothing here does I/O.
//!
//! Rules (each has a test below):
//! - Backups are grouped by system identifier: one system's retention never deletes another
//!   system's backups (a cluster re-created by initdb or pg_upgrade archiving into the same
//!   prefix).
//! - Within a system, backups are ordered by stop time, newest first (never by LSN). The newest
//!   backup and backups with a keep mark are never deleted.
//! - `retain_full N` keeps the N newest; `retain_days D` keeps every backup that ended inside
//!   the window plus the newest one that ended before it (the base from which the window's
//!   first moments are reached). With both, a backup either rule keeps is kept.
//! - WAL: nothing at or after the start of the oldest backup kept (of the archive's system)
//!   is deleted, on any timeline: segment numbers grow with the LSN across timelines, so a
//!   retained backup's replay to the newest point of its timeline and of the timelines that
//!   branch from it only reads segments at or after its own start. History files are never
//!   deleted. With no kept backup of the archive's system, or when the archive's system
//!   cannot be told, no WAL is deleted.
//! - Backups still being written have no manifest and are not backups here: a concurrent
//!   backup and concurrent wal-push only add objects above the cut.

use std::collections::BTreeMap;

use crate::lsn::Lsn;
use crate::wal::{classify, segment_number, WalFileKind};

/// What the plan needs to know of one complete backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupFacts {
    pub name: String,
    /// Unix time in microseconds; `None` when the manifest's time cannot be read (such a
    /// backup is kept: its place in time is unknown).
    pub stop_time_us: Option<i64>,
    /// The WAL segment size of its cluster (from its backup_label).
    pub segment_size: u64,
    pub start_lsn: Lsn,
    pub system_id: String,
    pub kept: bool,
}

/// A WAL archive object: its key and the WAL file name it belongs to (`.sum` records and
/// stored objects of one segment share the name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalObject {
    pub key: String,
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub retain_full: Option<usize>,
    pub retain_days: Option<f64>,
    /// Unix time in microseconds.
    pub now_us: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Keep(String),
    Delete(String),
}

impl Verdict {
    pub fn is_delete(&self) -> bool {
        matches!(self, Verdict::Delete(_))
    }
    pub fn reason(&self) -> &str {
        match self {
            Verdict::Keep(r) | Verdict::Delete(r) => r,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpirePlan {
    /// Every backup, newest first within its system, with its verdict.
    pub backups: Vec<(String, Verdict)>,
    /// WAL objects to delete, in key order.
    pub wal_delete: Vec<String>,
    /// Why WAL below that point goes, or why none does.
    pub wal_reason: String,
    /// The first segment kept (segment number) and the segment size, when WAL is cut.
    pub wal_cut: Option<(u64, u64)>,
}

const US_PER_DAY: f64 = 86_400.0 * 1e6;

/// Checks a policy: at least one rule, each of a usable size.
pub fn check_policy(p: &Policy) -> Result<(), String> {
    match (p.retain_full, p.retain_days) {
        (None, None) => Err("give --retain-full N and/or --retain-days D: expire deletes nothing unasked".into()),
        (Some(0), _) => Err("--retain-full must be at least 1 (the newest backup is always kept)".into()),
        (_, Some(d)) if !(d.is_finite() && d > 0.0) => Err(format!("--retain-days {d}: must be more than 0")),
        _ => Ok(()),
    }
}

/// The plan for `backups` and the WAL archive's objects. `archive_system` is the system
/// identifier the archive records (None for an archive from before that record).
/// `unreadable` counts backup folders whose manifest could not be read: they are never
/// deleted, and while any exists no WAL is (what they need cannot be told).
pub fn plan(
    backups: &[BackupFacts],
    wal: &[WalObject],
    archive_system: Option<&str>,
    policy: &Policy,
    unreadable: usize,
) -> Result<ExpirePlan, String> {
    check_policy(policy)?;
    let window_start = policy.retain_days.map(|d| policy.now_us - (d * US_PER_DAY) as i64);
    let mut by_system: BTreeMap<&str, Vec<&BackupFacts>> = BTreeMap::new();
    for b in backups {
        by_system.entry(b.system_id.as_str()).or_default().push(b);
    }
    let mut verdicts = Vec::new();
    let mut kept_starts: BTreeMap<&str, Vec<Lsn>> = BTreeMap::new();
    for (system, list) in by_system.iter_mut() {
        // Unreadable times first: treated as newest, never deleted.
        list.sort_by(|a, b| {
            let key = |x: &BackupFacts| x.stop_time_us.unwrap_or(i64::MAX);
            key(b).cmp(&key(a)).then(b.name.cmp(&a.name))
        });
        // The newest backup that ended before the window: the base for its first moments.
        let window_base = window_start.and_then(|w| list.iter().position(|b| b.stop_time_us.is_some_and(|t| t < w)));
        let newest = list.iter().position(|b| b.stop_time_us.is_some());
        // Ranks for retain-full count readable backups only.
        let mut rank = 0usize;
        for (i, b) in list.iter().enumerate() {
            let readable_rank = rank;
            if b.stop_time_us.is_some() {
                rank += 1;
            }
            let verdict = if b.stop_time_us.is_none() {
                Verdict::Keep("its stop time cannot be read".into())
            } else if Some(i) == newest {
                Verdict::Keep("the newest backup".into())
            } else if b.kept {
                Verdict::Keep("keep mark".into())
            } else if policy.retain_full.is_some_and(|n| readable_rank < n) {
                Verdict::Keep(format!("one of the {} newest", policy.retain_full.unwrap_or(0)))
            } else if window_start.is_some_and(|w| b.stop_time_us.is_some_and(|t| t >= w)) {
                Verdict::Keep(format!("inside the {}-day recovery window", fmt_days(policy.retain_days)))
            } else if window_base == Some(i) {
                Verdict::Keep(format!(
                    "needed to reach any point after {} (the window's start)",
                    fmt_time(window_start.unwrap_or(0))
                ))
            } else {
                let mut why = Vec::new();
                if let Some(n) = policy.retain_full {
                    why.push(format!("older than the {n} newest"));
                }
                if policy.retain_days.is_some() {
                    why.push(format!("not needed for the {}-day window", fmt_days(policy.retain_days)));
                }
                Verdict::Delete(why.join(", "))
            };
            if !verdict.is_delete() {
                kept_starts.entry(system).or_default().push(b.start_lsn);
            }
            verdicts.push((b.name.clone(), verdict));
        }
    }

    // Which system the WAL archive belongs to.
    let system = match archive_system {
        Some(s) => Some(s.to_owned()),
        None if by_system.len() == 1 => by_system.keys().next().map(|s| s.to_string()),
        None => None,
    };
    let sizes: std::collections::BTreeSet<u64> = match &system {
        Some(sys) => backups.iter().filter(|b| &b.system_id == sys).map(|b| b.segment_size).collect(),
        None => Default::default(),
    };
    let (wal_cut, wal_reason) = match &system {
        _ if unreadable > 0 => (None, format!("{unreadable} backup(s) have an unreadable manifest: all WAL kept")),
        None if by_system.is_empty() => (None, "no backups: all WAL kept".to_owned()),
        None => (
            None,
            format!(
                "the archive does not record its system and the backups belong to {} systems: all WAL kept",
                by_system.len()
            ),
        ),
        Some(_) if sizes.len() > 1 => {
            (None, "the archive's backups disagree on the WAL segment size: all WAL kept".to_owned())
        }
        Some(s) => match kept_starts.get(s.as_str()).and_then(|v| v.iter().min().copied()) {
            None => (None, format!("no kept backup of system {s} (the archive's): all WAL kept")),
            Some(start) => {
                let segment_size = sizes.iter().next().copied().unwrap_or(16 << 20);
                let cut = start.0 / segment_size.max(1);
                let oldest = verdicts
                    .iter()
                    .filter(|(_, v)| !v.is_delete())
                    .filter_map(|(n, _)| backups.iter().find(|b| &b.name == n && b.system_id == *s))
                    .min_by_key(|b| b.start_lsn)
                    .map(|b| b.name.clone())
                    .unwrap_or_default();
                (
                    Some((cut, segment_size)),
                    format!("WAL before {start} (the start of {oldest}, the oldest backup kept) is not needed"),
                )
            }
        },
    };
    let mut wal_delete = Vec::new();
    if let Some(cut) = wal_cut {
        wal_delete.extend(wal.iter().filter(|o| below_cut(&o.name, cut)).map(|o| o.key.clone()));
        wal_delete.sort();
    }
    Ok(ExpirePlan { backups: verdicts, wal_delete, wal_reason, wal_cut })
}

/// Whether WAL file `name` (a segment, or its `.partial` / `.backup` file) lies below the
/// cut `(first segment kept, segment size)`. History files never do.
pub(crate) fn below_cut(name: &str, (cut, segment_size): (u64, u64)) -> bool {
    let segment = match classify(name) {
        Ok(WalFileKind::Segment) => name,
        Ok(WalFileKind::Partial | WalFileKind::Backup) => &name[..24],
        Ok(WalFileKind::History) | Err(_) => return false,
    };
    segment_number(segment, segment_size).is_some_and(|n| n < cut)
}

fn fmt_days(d: Option<f64>) -> String {
    let d = d.unwrap_or(0.0);
    if d.fract() == 0.0 {
        format!("{d:.0}")
    } else {
        format!("{d}")
    }
}

pub(crate) fn fmt_time(us: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(us as i128 * 1000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| us.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000_000;
    const SEG: u64 = 16 << 20;

    fn b(name: &str, day: i64, start_seg: u64, system: &str) -> BackupFacts {
        BackupFacts {
            name: name.into(),
            stop_time_us: Some(day * DAY),
            segment_size: SEG,
            start_lsn: Lsn(start_seg * SEG + 40),
            system_id: system.into(),
            kept: false,
        }
    }

    fn seg(tli: u32, n: u64) -> String {
        format!("{tli:08X}{:08X}{:08X}", n / 256, n % 256)
    }

    fn wal(names: &[String]) -> Vec<WalObject> {
        names
            .iter()
            .flat_map(|n| {
                [
                    WalObject { key: format!("wal_archive/{n}.sum"), name: n.clone() },
                    WalObject { key: format!("wal_archive/{n}.zst"), name: n.clone() },
                ]
            })
            .collect()
    }

    fn verdict<'a>(p: &'a ExpirePlan, name: &str) -> &'a Verdict {
        &p.backups.iter().find(|(n, _)| n == name).unwrap().1
    }

    fn policy(full: Option<usize>, days: Option<f64>, now_day: i64) -> Policy {
        Policy { retain_full: full, retain_days: days, now_us: now_day * DAY }
    }

    #[test]
    fn retain_full_keeps_the_newest_and_cuts_wal_at_the_oldest_kept_start() {
        let backups = vec![b("b1", 1, 2, "S"), b("b2", 2, 10, "S"), b("b3", 3, 20, "S")];
        let names: Vec<String> = (0..30).map(|n| seg(1, n)).collect();
        let p = plan(&backups, &wal(&names), Some("S"), &policy(Some(2), None, 4), 0).unwrap();
        assert!(verdict(&p, "b1").is_delete());
        assert_eq!(verdict(&p, "b3"), &Verdict::Keep("the newest backup".into()));
        assert_eq!(verdict(&p, "b2"), &Verdict::Keep("one of the 2 newest".into()));
        assert_eq!(p.wal_cut, Some((10, SEG)));
        // Segments 0..10, both the record and the object of each.
        assert_eq!(p.wal_delete.len(), 20);
        assert!(!p.wal_delete.iter().any(|k| k.contains(&seg(1, 10))));
        assert!(p.wal_delete.iter().any(|k| k.contains(&seg(1, 9))));
    }

    #[test]
    fn the_newest_and_kept_backups_stay_whatever_the_policy() {
        let mut backups = vec![b("old", 1, 2, "S"), b("mid", 2, 10, "S"), b("new", 3, 20, "S")];
        backups[0].kept = true;
        let p = plan(&backups, &[], Some("S"), &policy(Some(1), None, 10), 0).unwrap();
        assert_eq!(verdict(&p, "new"), &Verdict::Keep("the newest backup".into()));
        assert_eq!(verdict(&p, "old"), &Verdict::Keep("keep mark".into()));
        assert!(verdict(&p, "mid").is_delete());
        // The kept backup holds the WAL from its own start.
        assert_eq!(p.wal_cut, Some((2, SEG)));
        // Even a window long past keeps the newest.
        let p = plan(&backups[1..], &[], Some("S"), &policy(None, Some(1.0), 100), 0).unwrap();
        assert!(!verdict(&p, "new").is_delete());
        assert!(verdict(&p, "mid").is_delete());
    }

    #[test]
    fn a_recovery_window_keeps_the_base_before_it() {
        // Window: the last 2 days before day 10 → from day 8.
        let backups = vec![b("d3", 3, 3, "S"), b("d5", 5, 5, "S"), b("d7", 7, 7, "S"), b("d9", 9, 9, "S")];
        let p = plan(&backups, &[], Some("S"), &policy(None, Some(2.0), 10), 0).unwrap();
        assert_eq!(verdict(&p, "d9"), &Verdict::Keep("the newest backup".into()));
        assert!(verdict(&p, "d7").reason().starts_with("needed to reach any point after"), "{:?}", verdict(&p, "d7"));
        assert!(verdict(&p, "d5").is_delete());
        assert!(verdict(&p, "d3").is_delete());
        assert_eq!(p.wal_cut, Some((7, SEG)));
        // Both rules: either one keeps.
        let p = plan(&backups, &[], Some("S"), &policy(Some(3), Some(2.0), 10), 0).unwrap();
        assert!(!verdict(&p, "d5").is_delete());
        assert!(verdict(&p, "d3").is_delete());
    }

    #[test]
    fn order_is_by_time_not_lsn() {
        // After pg_upgrade-like resets LSNs can go down while time goes up: "new" ended
        // last, with the lowest LSN. It is the newest.
        let backups = vec![b("old", 1, 500, "S"), b("new", 2, 3, "S")];
        let p = plan(&backups, &[], Some("S"), &policy(Some(1), None, 3), 0).unwrap();
        assert_eq!(verdict(&p, "new"), &Verdict::Keep("the newest backup".into()));
        assert!(verdict(&p, "old").is_delete());
    }

    #[test]
    fn systems_are_never_mixed() {
        // System A archived here, then a new initdb (B) archives into the same prefix.
        let backups = vec![b("a1", 1, 50, "A"), b("a2", 2, 60, "A"), b("b1", 3, 2, "B"), b("b2", 4, 4, "B")];
        let names: Vec<String> = (0..70).map(|n| seg(1, n)).collect();
        let p = plan(&backups, &wal(&names), Some("B"), &policy(Some(1), None, 5), 0).unwrap();
        // Each system keeps its newest.
        assert!(!verdict(&p, "a2").is_delete());
        assert!(!verdict(&p, "b2").is_delete());
        assert!(verdict(&p, "a1").is_delete());
        // WAL is cut for the archive's system only.
        assert_eq!(p.wal_cut, Some((4, SEG)));
        // The archive's system unknown and two systems: no WAL is deleted.
        let p = plan(&backups, &wal(&names), None, &policy(Some(1), None, 5), 0).unwrap();
        assert!(p.wal_delete.is_empty());
        assert!(p.wal_reason.contains("2 systems"), "{}", p.wal_reason);
        // The archive's system has no backup: nothing of it goes.
        let p = plan(&backups[..2], &wal(&names), Some("B"), &policy(Some(1), None, 5), 0).unwrap();
        assert!(p.wal_delete.is_empty());
    }

    #[test]
    fn history_files_stay_and_timelines_are_cut_by_position() {
        let backups = vec![b("b1", 1, 5, "S"), b("b2", 2, 20, "S")];
        let mut names: Vec<String> = (0..30).map(|n| seg(1, n)).collect();
        names.extend((15..40).map(|n| seg(2, n)));
        names.push("00000002.history".into());
        names.push(format!("{}.partial", seg(1, 16)));
        names.push(format!("{}.00000028.backup", seg(1, 4)));
        let p = plan(&backups, &wal(&names), Some("S"), &policy(Some(1), None, 3), 0).unwrap();
        assert_eq!(p.wal_cut, Some((20, SEG)));
        assert!(!p.wal_delete.iter().any(|k| k.contains(".history")));
        // Timeline 2's segments below the cut go too; at and after it they stay.
        assert!(p.wal_delete.iter().any(|k| k.contains(&seg(2, 19))));
        assert!(!p.wal_delete.iter().any(|k| k.contains(&seg(2, 20))));
        assert!(p.wal_delete.iter().any(|k| k.contains(".partial")));
        assert!(p.wal_delete.iter().any(|k| k.contains(".backup")));
        // Nothing at or after the kept backup's start is in the plan, on any timeline.
        for k in &p.wal_delete {
            let name = &k["wal_archive/".len().."wal_archive/".len() + 24];
            assert!(segment_number(name, SEG).unwrap() < 20, "{k}");
        }
    }

    #[test]
    fn what_cannot_be_told_is_kept() {
        // A 64 MiB-segment system whose archive this is, and a newer 16 MiB system: the cut
        // uses the archive's own size.
        let mut a1 = b("a1", 1, 0, "A");
        a1.segment_size = 64 << 20;
        a1.start_lsn = Lsn(0x1_8000_0028);
        let b1 = b("b1", 2, 3, "B");
        let names: Vec<String> = (0..300).map(|n| seg(1, n)).collect();
        let p = plan(&[a1.clone(), b1], &wal(&names), Some("A"), &policy(Some(1), None, 3), 0).unwrap();
        // 0x1_8000_0028 with 64 MiB segments is segment number 0x60 = 96 (log 1, seg 0x20).
        assert_eq!(p.wal_cut, Some((0x1_8000_0028 / (64 << 20), 64 << 20)));
        let start = "000000010000000100000020";
        assert!(!p.wal_delete.iter().any(|k| k.contains(start)));
        // Backups of the archive's system that disagree on the size: no WAL goes.
        let mut a2 = b("a2", 3, 5, "A");
        a2.segment_size = 16 << 20;
        let p = plan(&[a1, a2], &wal(&names), Some("A"), &policy(Some(1), None, 4), 0).unwrap();
        assert!(p.wal_delete.is_empty(), "{}", p.wal_reason);
        // An unreadable time: kept, and not taken for the newest.
        let mut odd = b("odd", 0, 1, "S");
        odd.stop_time_us = None;
        let p =
            plan(&[odd, b("x", 5, 10, "S"), b("y", 6, 20, "S")], &[], Some("S"), &policy(Some(1), None, 7), 0).unwrap();
        assert_eq!(verdict(&p, "odd"), &Verdict::Keep("its stop time cannot be read".into()));
        assert!(verdict(&p, "x").is_delete());
        assert_eq!(verdict(&p, "y"), &Verdict::Keep("the newest backup".into()));
        // With two to keep, the unreadable one does not take a place.
        let mut odd2 = b("odd", 0, 1, "S");
        odd2.stop_time_us = None;
        let p = plan(&[odd2, b("x", 5, 10, "S"), b("y", 6, 20, "S")], &[], Some("S"), &policy(Some(2), None, 7), 0)
            .unwrap();
        assert!(!verdict(&p, "x").is_delete(), "{:?}", p.backups);
        // An unreadable manifest somewhere: no WAL goes.
        let p = plan(&[b("x", 5, 10, "S"), b("y", 6, 20, "S")], &wal(&names), Some("S"), &policy(Some(1), None, 7), 1)
            .unwrap();
        assert!(p.wal_delete.is_empty() && p.wal_reason.contains("unreadable"));
    }

    #[test]
    fn policies_are_checked() {
        assert!(plan(&[], &[], None, &policy(None, None, 1), 0).is_err());
        assert!(plan(&[], &[], None, &policy(Some(0), None, 1), 0).is_err());
        assert!(plan(&[], &[], None, &policy(None, Some(-1.0), 1), 0).is_err());
        let p = plan(&[], &wal(&[seg(1, 1)]), None, &policy(Some(1), None, 1), 0).unwrap();
        assert!(p.wal_delete.is_empty());
    }

    /// Random histories: the plan never deletes the newest or a kept backup of any system,
    /// never a WAL file at or after a kept backup's start, never a history file.
    #[test]
    fn random_histories_keep_their_promises() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for _ in 0..300 {
            let n = rng.gen_range(1..12);
            let mut backups = Vec::new();
            for i in 0..n {
                let sys = if rng.gen_bool(0.2) { "B" } else { "A" };
                let mut f = b(&format!("b{i}"), rng.gen_range(0..30), rng.gen_range(0..200), sys);
                f.kept = rng.gen_bool(0.15);
                backups.push(f);
            }
            let names: Vec<String> =
                (0..220).map(|k| seg(rng.gen_range(1..4), k)).chain(["00000002.history".to_string()]).collect();
            let pol = policy(
                if rng.gen_bool(0.6) { Some(rng.gen_range(1..4)) } else { None },
                if rng.gen_bool(0.5) { Some(rng.gen_range(1..20) as f64) } else { Some(3.0) },
                30,
            );
            let archive = if rng.gen_bool(0.8) { Some("A") } else { None };
            let p = plan(&backups, &wal(&names), archive, &pol, 0).unwrap();
            for sys in ["A", "B"] {
                let newest = backups
                    .iter()
                    .filter(|x| x.system_id == sys)
                    .max_by(|x, y| x.stop_time_us.cmp(&y.stop_time_us).then(x.name.cmp(&y.name)));
                if let Some(nb) = newest {
                    assert!(!verdict(&p, &nb.name).is_delete());
                }
            }
            for x in backups.iter().filter(|x| x.kept) {
                assert!(!verdict(&p, &x.name).is_delete());
            }
            let systems: std::collections::BTreeSet<&str> = backups.iter().map(|x| x.system_id.as_str()).collect();
            let used = archive.or(if systems.len() == 1 { systems.iter().next().copied() } else { None });
            let kept_min = backups
                .iter()
                .filter(|x| Some(x.system_id.as_str()) == used && !verdict(&p, &x.name).is_delete())
                .map(|x| x.start_lsn.0 / SEG)
                .min();
            for k in &p.wal_delete {
                assert!(!k.contains(".history"));
                let name = &k["wal_archive/".len().."wal_archive/".len() + 24];
                let num = segment_number(name, SEG).unwrap();
                assert!(kept_min.is_some_and(|m| num < m), "{k} deleted, kept from {kept_min:?}");
            }
        }
    }
}
