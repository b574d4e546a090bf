//! Retention as a pure function: which backups and which WAL files an `expire` run deletes,
//! each decision with its reason. The runner (repository.rs) lists, calls [`plan`], and
//! deletes; nothing here does I/O.
//!
//! Rules (each has a test below):
//! - Backups are grouped by system identifier: one system's retention never deletes another
//!   system's backups (a cluster re-created by initdb or pg_upgrade archiving into the same
//!   prefix).
//! - Within a system, backups are ordered by stop time, newest first (never by LSN). Only
//!   *counted* backups are ranked: credible ones (every object listed at its recorded size,
//!   a stop time the store's clock allows, WAL the archive holds) that lie on the history of
//!   a live timeline (timeline.rs). A manifest that is not credible is never counted, never
//!   deleted and protects no WAL: planted manifests cannot push real backups out. A backup
//!   on a dead branch (the damaged line a point-in-time "undo" left) is not counted either.
//! - The newest counted backup and backups with a keep mark are never deleted.
//!   `retain_full N` keeps the N newest counted; `retain_days D` keeps every backup that
//!   ended inside the window plus the newest counted one that ended before it (the base from
//!   which the window's first moments are reached). With both, a backup either rule keeps
//!   is kept.
//! - WAL: a WAL file goes only when no kept backup's restore to any timeline reads its
//!   segment (the timeline graph decides, per path: never by segment number across
//!   timelines). History files are never deleted. With no kept backup of the archive's
//!   system, when the archive's system cannot be told, or when a history file is missing,
//!   no WAL is deleted.
//! - Backups still being written have no manifest and are not backups here: a concurrent
//!   backup and concurrent wal-push only add WAL that kept backups' paths read.

use std::collections::BTreeMap;

use crate::lsn::Lsn;
use crate::timeline::{BackupPoint, TimelineGraph};
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
    /// Where it lies on the timelines.
    pub point: BackupPoint,
    /// Why it is not believed to be a restorable backup (objects missing or of other sizes,
    /// a stop time after the store wrote its manifest, WAL the archive never held); such a
    /// manifest is never counted, ranked or deleted, and protects no WAL.
    pub doubt: Option<String>,
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
    /// Why WAL goes, or why none does.
    pub wal_reason: String,
    /// What decides which WAL files go, when any does.
    pub wal_rule: Option<WalRule>,
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
/// deleted, and while any exists no WAL is (what they need cannot be told). `graph` is the
/// archive's timeline graph: a WAL file goes only when no kept backup's restore to any
/// timeline reads it.
pub fn plan(
    backups: &[BackupFacts],
    wal: &[WalObject],
    archive_system: Option<&str>,
    policy: &Policy,
    unreadable: usize,
    graph: &TimelineGraph,
) -> Result<ExpirePlan, String> {
    check_policy(policy)?;
    let window_start = policy.retain_days.map(|d| policy.now_us - (d * US_PER_DAY) as i64);
    let mut by_system: BTreeMap<&str, Vec<&BackupFacts>> = BTreeMap::new();
    for b in backups {
        by_system.entry(b.system_id.as_str()).or_default().push(b);
    }
    // Backups on the history of a live timeline restore the live data; with the graph
    // incomplete every backup counts as live (the WAL is then kept whole anyway).
    let heads = graph.heads();
    let graph_known = graph.problems().is_empty();
    // Which system the WAL archive (and so the timeline graph) belongs to.
    let system = match archive_system {
        Some(s) => Some(s.to_owned()),
        None if by_system.len() == 1 => by_system.keys().next().map(|s| s.to_string()),
        None => None,
    };
    // Liveness is told only for the archive's system, and only when the graph is whole:
    // otherwise every backup counts as live (and the WAL is then kept whole anyway).
    let live = |b: &BackupFacts| {
        !graph_known
            || system.as_deref() != Some(b.system_id.as_str())
            || heads.is_empty()
            || heads.iter().any(|h| graph.on_ancestry(h.tli, &b.point))
    };
    let mut verdicts = Vec::new();
    let mut kept_points: BTreeMap<&str, Vec<&BackupFacts>> = BTreeMap::new();
    for (system_id, list) in by_system.iter_mut() {
        let system_id: &str = system_id;
        let mut verdicts_here: Vec<(&BackupFacts, Verdict)> = Vec::new();
        // Unreadable times first: treated as newest, never deleted.
        list.sort_by(|a, b| {
            let key = |x: &BackupFacts| x.stop_time_us.unwrap_or(i64::MAX);
            key(b).cmp(&key(a)).then(b.name.cmp(&a.name))
        });
        // Only credible backups on a live timeline's history are counted, ranked and chosen
        // as the window's base: a planted manifest, or a backup of a dead branch, never
        // takes the place of one that restores the live data.
        let counted = |b: &BackupFacts| b.stop_time_us.is_some() && b.doubt.is_none() && live(b);
        // The newest backup that ended before the window: the base for its first moments.
        let window_base =
            window_start.and_then(|w| list.iter().position(|b| counted(b) && b.stop_time_us.is_some_and(|t| t < w)));
        let newest = list.iter().position(|b| counted(b));
        let mut rank = 0usize;
        for (i, b) in list.iter().enumerate() {
            let this_rank = rank;
            if counted(b) {
                rank += 1;
            }
            let verdict = if b.stop_time_us.is_none() {
                Verdict::Keep("its stop time cannot be read".into())
            } else if let Some(doubt) = &b.doubt {
                Verdict::Keep(format!("not counted as a backup: {doubt}"))
            } else if Some(i) == newest {
                Verdict::Keep("the newest backup".into())
            } else if b.kept {
                Verdict::Keep("keep mark".into())
            } else if counted(b) && policy.retain_full.is_some_and(|n| this_rank < n) {
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
                if !live(b) {
                    why.push(format!("on timeline {}'s branch, which no live timeline continues", b.point.tli));
                }
                if let Some(n) = policy.retain_full {
                    why.push(format!("older than the {n} newest"));
                }
                if policy.retain_days.is_some() {
                    why.push(format!("not needed for the {}-day window", fmt_days(policy.retain_days)));
                }
                Verdict::Delete(why.join(", "))
            };
            verdicts_here.push((*b, verdict));
        }
        // A credible backup off the live line is never deleted only for that while it is
        // newer than the oldest backup kept on the live line: "live" is told from when WAL
        // arrived, and a quiet primary beside a restore test that kept archiving looks
        // superseded until it archives again.
        let oldest_kept_live = verdicts_here
            .iter()
            .filter(|(b, v)| !v.is_delete() && counted(b))
            .filter_map(|(b, _)| b.stop_time_us)
            .min();
        for (b, v) in verdicts_here.iter_mut() {
            let off_line = b.doubt.is_none() && !live(b);
            if v.is_delete() && off_line && b.stop_time_us.zip(oldest_kept_live).is_some_and(|(t, o)| t >= o) {
                *v = Verdict::Keep(format!(
                    "on timeline {}'s branch, which no live timeline continues; kept while newer than the oldest backup kept on the live line",
                    b.point.tli
                ));
            }
            if !v.is_delete() && b.doubt.is_none() && b.stop_time_us.is_some() {
                kept_points.entry(system_id).or_default().push(*b);
            }
            verdicts.push((b.name.clone(), v.clone()));
        }
    }

    let sizes: std::collections::BTreeSet<u64> = match &system {
        Some(sys) => backups.iter().filter(|b| &b.system_id == sys).map(|b| b.segment_size).collect(),
        None => Default::default(),
    };
    let rule = match &system {
        _ if unreadable > 0 => Err(format!("{unreadable} backup(s) have an unreadable manifest: all WAL kept")),
        None if by_system.is_empty() => Err("no backups: all WAL kept".to_owned()),
        None => Err(format!(
            "the archive does not record its system and the backups belong to {} systems: all WAL kept",
            by_system.len()
        )),
        Some(_) if sizes.len() > 1 => {
            Err("the archive's backups disagree on the WAL segment size: all WAL kept".to_owned())
        }
        Some(_) if sizes.iter().next().is_some_and(|s| *s != graph.segment_size()) => {
            Err("the timeline graph was read with another WAL segment size: all WAL kept".to_owned())
        }
        Some(_) if !graph_known => Err(format!(
            "the timelines cannot be told ({}): all WAL kept",
            graph.problems().iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")
        )),
        Some(s) => match kept_points.get(s.as_str()) {
            None => Err(format!("no kept backup of system {s} (the archive's): all WAL kept")),
            Some(kept) => {
                let points: Vec<BackupPoint> = kept.iter().map(|b| b.point).collect();
                // Every path the kept backups can restore along must be known.
                match graph.timelines().into_iter().map(|t| graph.path(t)).find_map(|p| p.err()) {
                    Some(e) => Err(format!("the timelines cannot be told ({e}): all WAL kept")),
                    None => Ok(WalRule {
                        graph: graph.clone(),
                        kept: points,
                        oldest: kept.iter().min_by_key(|b| b.start_lsn).map(|b| b.name.clone()).unwrap_or_default(),
                    }),
                }
            }
        },
    };
    let (wal_rule, wal_reason) = match rule {
        Ok(r) => {
            let reason = format!(
                "WAL no kept backup reads (on any timeline's path from {} on, the oldest kept) is not needed",
                r.oldest
            );
            (Some(r), reason)
        }
        Err(why) => (None, why),
    };
    let mut wal_delete = Vec::new();
    if let Some(rule) = &wal_rule {
        let mut memo: BTreeMap<&str, bool> = BTreeMap::new();
        for o in wal {
            let drop = *memo.entry(o.name.as_str()).or_insert_with(|| rule.drops(&o.name));
            if drop {
                wal_delete.push(o.key.clone());
            }
        }
        wal_delete.sort();
    }
    Ok(ExpirePlan { backups: verdicts, wal_delete, wal_reason, wal_rule })
}

/// Which WAL files no kept backup needs: the timeline graph and the kept backups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalRule {
    pub graph: TimelineGraph,
    pub kept: Vec<BackupPoint>,
    /// The oldest kept backup (for the reason shown).
    pub oldest: String,
}

impl WalRule {
    /// Whether WAL file `name` (a segment, its `.partial` or `.backup` file) may go: no kept
    /// backup's restore to any timeline reads its segment. History files never go, nor does
    /// anything the graph cannot place.
    pub fn drops(&self, name: &str) -> bool {
        let segment = match classify(name) {
            Ok(WalFileKind::Segment) => name,
            Ok(WalFileKind::Partial | WalFileKind::Backup) => &name[..24],
            Ok(WalFileKind::History) | Err(_) => return false,
        };
        let (Some(tli), Some(n)) =
            (crate::timeline::tli_of(segment), segment_number(segment, self.graph.segment_size()))
        else {
            return false;
        };
        self.graph.segment_needed(tli, n, &self.kept) == Ok(false)
    }
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
            point: BackupPoint { tli: 1, start: Lsn(start_seg * SEG + 40), end: Lsn(start_seg * SEG + 4000) },
            doubt: None,
        }
    }

    /// The graph of `names`: each `0000000N.history` says N branched from N-1 where N's
    /// first segment begins; every file stored at time 0.
    fn graph(names: &[String]) -> TimelineGraph {
        graph_sized(names, SEG)
    }

    fn graph_sized(names: &[String], size: u64) -> TimelineGraph {
        let files: Vec<(String, i64)> = names.iter().map(|n| (n.clone(), 0)).collect();
        let mut texts = BTreeMap::new();
        for n in names.iter().filter(|n| n.ends_with(".history")) {
            let tli = u32::from_str_radix(&n[..8], 16).unwrap();
            let first = names
                .iter()
                .filter(|x| x.len() == 24 && x.starts_with(&n[..8]))
                .filter_map(|x| segment_number(x, size))
                .min()
                .unwrap_or(0);
            texts.insert(tli, format!("{}\t{}\tx\n", tli - 1, Lsn(first * size)));
        }
        TimelineGraph::build(&files, &texts, size)
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
        let p = plan(&backups, &wal(&names), Some("S"), &policy(Some(2), None, 4), 0, &graph(&names)).unwrap();
        assert!(verdict(&p, "b1").is_delete());
        assert_eq!(verdict(&p, "b3"), &Verdict::Keep("the newest backup".into()));
        assert_eq!(verdict(&p, "b2"), &Verdict::Keep("one of the 2 newest".into()));
        assert!(p.wal_rule.is_some(), "{}", p.wal_reason);
        // Segments 0..10, both the record and the object of each.
        assert_eq!(p.wal_delete.len(), 20);
        assert!(!p.wal_delete.iter().any(|k| k.contains(&seg(1, 10))));
        assert!(p.wal_delete.iter().any(|k| k.contains(&seg(1, 9))));
    }

    #[test]
    fn the_newest_and_kept_backups_stay_whatever_the_policy() {
        let mut backups = vec![b("old", 1, 2, "S"), b("mid", 2, 10, "S"), b("new", 3, 20, "S")];
        backups[0].kept = true;
        let p = plan(&backups, &[], Some("S"), &policy(Some(1), None, 10), 0, &graph(&[])).unwrap();
        assert_eq!(verdict(&p, "new"), &Verdict::Keep("the newest backup".into()));
        assert_eq!(verdict(&p, "old"), &Verdict::Keep("keep mark".into()));
        assert!(verdict(&p, "mid").is_delete());
        // The kept backup holds the WAL from its own start.
        let rule = p.wal_rule.as_ref().unwrap();
        assert!(rule.drops(&seg(1, 2 - 1)) && !rule.drops(&seg(1, 2)), "{}", p.wal_reason);
        // Even a window long past keeps the newest.
        let p = plan(&backups[1..], &[], Some("S"), &policy(None, Some(1.0), 100), 0, &graph(&[])).unwrap();
        assert!(!verdict(&p, "new").is_delete());
        assert!(verdict(&p, "mid").is_delete());
    }

    #[test]
    fn a_recovery_window_keeps_the_base_before_it() {
        // Window: the last 2 days before day 10 → from day 8.
        let backups = vec![b("d3", 3, 3, "S"), b("d5", 5, 5, "S"), b("d7", 7, 7, "S"), b("d9", 9, 9, "S")];
        let p = plan(&backups, &[], Some("S"), &policy(None, Some(2.0), 10), 0, &graph(&[])).unwrap();
        assert_eq!(verdict(&p, "d9"), &Verdict::Keep("the newest backup".into()));
        assert!(verdict(&p, "d7").reason().starts_with("needed to reach any point after"), "{:?}", verdict(&p, "d7"));
        assert!(verdict(&p, "d5").is_delete());
        assert!(verdict(&p, "d3").is_delete());
        let rule = p.wal_rule.as_ref().unwrap();
        assert!(rule.drops(&seg(1, 7 - 1)) && !rule.drops(&seg(1, 7)), "{}", p.wal_reason);
        // Both rules: either one keeps.
        let p = plan(&backups, &[], Some("S"), &policy(Some(3), Some(2.0), 10), 0, &graph(&[])).unwrap();
        assert!(!verdict(&p, "d5").is_delete());
        assert!(verdict(&p, "d3").is_delete());
    }

    #[test]
    fn order_is_by_time_not_lsn() {
        // After pg_upgrade-like resets LSNs can go down while time goes up: "new" ended
        // last, with the lowest LSN. It is the newest.
        let backups = vec![b("old", 1, 500, "S"), b("new", 2, 3, "S")];
        let p = plan(&backups, &[], Some("S"), &policy(Some(1), None, 3), 0, &graph(&[])).unwrap();
        assert_eq!(verdict(&p, "new"), &Verdict::Keep("the newest backup".into()));
        assert!(verdict(&p, "old").is_delete());
    }

    #[test]
    fn systems_are_never_mixed() {
        // System A archived here, then a new initdb (B) archives into the same prefix.
        let backups = vec![b("a1", 1, 50, "A"), b("a2", 2, 60, "A"), b("b1", 3, 2, "B"), b("b2", 4, 4, "B")];
        let names: Vec<String> = (0..70).map(|n| seg(1, n)).collect();
        let p = plan(&backups, &wal(&names), Some("B"), &policy(Some(1), None, 5), 0, &graph(&names)).unwrap();
        // Each system keeps its newest.
        assert!(!verdict(&p, "a2").is_delete());
        assert!(!verdict(&p, "b2").is_delete());
        assert!(verdict(&p, "a1").is_delete());
        // WAL is cut for the archive's system only.
        let rule = p.wal_rule.as_ref().unwrap();
        assert!(rule.drops(&seg(1, 4 - 1)) && !rule.drops(&seg(1, 4)), "{}", p.wal_reason);
        // The archive's system unknown and two systems: no WAL is deleted.
        let p = plan(&backups, &wal(&names), None, &policy(Some(1), None, 5), 0, &graph(&names)).unwrap();
        assert!(p.wal_delete.is_empty());
        assert!(p.wal_reason.contains("2 systems"), "{}", p.wal_reason);
        // The archive's system has no backup: nothing of it goes.
        let p = plan(&backups[..2], &wal(&names), Some("B"), &policy(Some(1), None, 5), 0, &graph(&names)).unwrap();
        assert!(p.wal_delete.is_empty());
    }

    #[test]
    fn history_files_stay_and_wal_is_cut_per_timeline_path() {
        // b1 on timeline 1; b2 on timeline 2, which left timeline 1 at segment 15.
        let mut b2 = b("b2", 2, 20, "S");
        b2.point.tli = 2;
        let backups = vec![b("b1", 1, 5, "S"), b2];
        let mut names: Vec<String> = (0..30).map(|n| seg(1, n)).collect();
        names.extend((15..40).map(|n| seg(2, n)));
        names.push("00000002.history".into());
        names.push(format!("{}.partial", seg(1, 16)));
        names.push(format!("{}.00000028.backup", seg(1, 4)));
        let p = plan(&backups, &wal(&names), Some("S"), &policy(Some(1), None, 3), 0, &graph(&names)).unwrap();
        assert!(verdict(&p, "b1").is_delete());
        assert!(!p.wal_delete.iter().any(|k| k.contains(".history")));
        // Timeline 2 before b2's start goes, from it on stays.
        assert!(p.wal_delete.iter().any(|k| k.contains(&seg(2, 19))));
        assert!(!p.wal_delete.iter().any(|k| k.contains(&seg(2, 20))));
        // Timeline 1 is read by no kept backup: all of it goes, its tail past the switch too
        // (by segment number it would have been kept).
        assert!(p.wal_delete.iter().any(|k| k.contains(&seg(1, 25))));
        assert!(p.wal_delete.iter().any(|k| k.contains(".partial")));
        assert!(p.wal_delete.iter().any(|k| k.contains(".backup")));
        // With b1 kept too, timeline 1 from b1's start and timeline 2 from its switch stay.
        let p = plan(&backups, &wal(&names), Some("S"), &policy(Some(2), None, 3), 0, &graph(&names)).unwrap();
        assert!(!p
            .wal_delete
            .iter()
            .any(|k| k.contains(&seg(1, 5)) || k.contains(&seg(1, 25)) || k.contains(&seg(2, 15))));
        assert!(p.wal_delete.iter().any(|k| k.contains(&seg(1, 4))));
        // A missing history file: nothing can be told, nothing goes.
        let without: Vec<String> = names.iter().filter(|n| !n.ends_with(".history")).cloned().collect();
        let p = plan(&backups, &wal(&without), Some("S"), &policy(Some(1), None, 3), 0, &graph(&without)).unwrap();
        assert!(p.wal_delete.is_empty() && p.wal_reason.contains("00000002.history"), "{}", p.wal_reason);
    }

    #[test]
    fn liveness_never_costs_a_backup_it_should_not() {
        // Timeline 2 left 1 at segment 10 (all of 1 stored before 2 was born: superseded).
        let mut names: Vec<String> = (0..20).map(|n| seg(1, n)).collect();
        names.extend((10..30).map(|n| seg(2, n)));
        names.push("00000002.history".into());
        let files: Vec<(String, i64)> =
            names.iter().map(|n| (n.clone(), if n.starts_with("00000002") { 100 } else { 1 })).collect();
        let text = BTreeMap::from([(2u32, format!("1\t{}\tx\n", Lsn(10 * SEG)))]);
        let g = TimelineGraph::build(&files, &text, SEG);
        let mut on2 = b("on2", 5, 25, "S");
        on2.point.tli = 2;
        // b("dead", …) on timeline 1 after the switch: off the live line, but newer than the
        // oldest kept live backup ("base", before the switch): kept.
        let backups = vec![b("base", 1, 2, "S"), b("dead", 3, 15, "S"), on2.clone()];
        let p = plan(&backups, &wal(&names), Some("S"), &policy(Some(2), None, 9), 0, &g).unwrap();
        assert!(!verdict(&p, "base").is_delete(), "{:?}", p.backups);
        assert!(verdict(&p, "dead").reason().contains("no live timeline continues"), "{:?}", p.backups);
        assert!(!verdict(&p, "dead").is_delete());
        // Older than every kept live backup: it goes.
        let backups = vec![b("dead-old", 1, 15, "S"), b("base", 2, 2, "S"), on2.clone()];
        let p = plan(&backups, &wal(&names), Some("S"), &policy(Some(1), None, 9), 0, &g).unwrap();
        assert!(verdict(&p, "dead-old").is_delete(), "{:?}", p.backups);
        // A damaged history: liveness cannot be told, every backup counts, no WAL goes.
        let broken = TimelineGraph::build(&files, &BTreeMap::from([(2u32, "garbage".to_string())]), SEG);
        let p =
            plan(&[b("x", 1, 15, "S"), on2.clone()], &wal(&names), Some("S"), &policy(Some(2), None, 9), 0, &broken)
                .unwrap();
        assert!(
            p.backups.iter().all(|(_, v)| !v.is_delete()) && p.wal_delete.is_empty(),
            "{:?} {}",
            p.backups,
            p.wal_reason
        );
        // Another system's backups are never judged on this archive's timelines.
        let other = vec![b("o1", 1, 15, "O"), b("o2", 2, 16, "O"), on2];
        let p = plan(&other, &wal(&names), Some("S"), &policy(Some(2), None, 9), 0, &g).unwrap();
        assert!(!verdict(&p, "o1").is_delete() && !verdict(&p, "o2").is_delete(), "{:?}", p.backups);
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
        a1.point.start = a1.start_lsn;
        a1.point.end = Lsn(a1.start_lsn.0 + 1000);
        let big = graph_sized(&names, 64 << 20);
        let p = plan(&[a1.clone(), b1], &wal(&names), Some("A"), &policy(Some(1), None, 3), 0, &big).unwrap();
        // 0x1_8000_0028 with 64 MiB segments is segment 000000010000000100000020.
        assert!(p.wal_delete.iter().any(|k| k.contains("00000001000000010000001F")), "{}", p.wal_reason);
        let start = "000000010000000100000020";
        assert!(!p.wal_delete.iter().any(|k| k.contains(start)));
        // Backups of the archive's system that disagree on the size: no WAL goes.
        let mut a2 = b("a2", 3, 5, "A");
        a2.segment_size = 16 << 20;
        let p = plan(&[a1, a2], &wal(&names), Some("A"), &policy(Some(1), None, 4), 0, &big).unwrap();
        assert!(p.wal_delete.is_empty(), "{}", p.wal_reason);
        // An unreadable time: kept, and not taken for the newest.
        let mut odd = b("odd", 0, 1, "S");
        odd.stop_time_us = None;
        let p = plan(
            &[odd, b("x", 5, 10, "S"), b("y", 6, 20, "S")],
            &[],
            Some("S"),
            &policy(Some(1), None, 7),
            0,
            &graph(&[]),
        )
        .unwrap();
        assert_eq!(verdict(&p, "odd"), &Verdict::Keep("its stop time cannot be read".into()));
        assert!(verdict(&p, "x").is_delete());
        assert_eq!(verdict(&p, "y"), &Verdict::Keep("the newest backup".into()));
        // With two to keep, the unreadable one does not take a place.
        let mut odd2 = b("odd", 0, 1, "S");
        odd2.stop_time_us = None;
        let p = plan(
            &[odd2, b("x", 5, 10, "S"), b("y", 6, 20, "S")],
            &[],
            Some("S"),
            &policy(Some(2), None, 7),
            0,
            &graph(&[]),
        )
        .unwrap();
        assert!(!verdict(&p, "x").is_delete(), "{:?}", p.backups);
        // An unreadable manifest somewhere: no WAL goes.
        let p = plan(
            &[b("x", 5, 10, "S"), b("y", 6, 20, "S")],
            &wal(&names),
            Some("S"),
            &policy(Some(1), None, 7),
            1,
            &graph(&names),
        )
        .unwrap();
        assert!(p.wal_delete.is_empty() && p.wal_reason.contains("unreadable"));
    }

    #[test]
    fn policies_are_checked() {
        assert!(plan(&[], &[], None, &policy(None, None, 1), 0, &graph(&[])).is_err());
        assert!(plan(&[], &[], None, &policy(Some(0), None, 1), 0, &graph(&[])).is_err());
        assert!(plan(&[], &[], None, &policy(None, Some(-1.0), 1), 0, &graph(&[])).is_err());
        let p = plan(&[], &wal(&[seg(1, 1)]), None, &policy(Some(1), None, 1), 0, &graph(&[seg(1, 1)])).unwrap();
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
            let names: Vec<String> = (0..220)
                .map(|k| seg(rng.gen_range(1..4), k))
                .chain(["00000002.history".to_string(), "00000003.history".to_string()])
                .collect();
            let pol = policy(
                if rng.gen_bool(0.6) { Some(rng.gen_range(1..4)) } else { None },
                if rng.gen_bool(0.5) { Some(rng.gen_range(1..20) as f64) } else { Some(3.0) },
                30,
            );
            let archive = if rng.gen_bool(0.8) { Some("A") } else { None };
            let p = plan(&backups, &wal(&names), archive, &pol, 0, &graph(&names)).unwrap();
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
            // No deleted file is read by a kept backup's restore to any timeline.
            let g = graph(&names);
            let kept: Vec<&BackupFacts> = backups
                .iter()
                .filter(|x| Some(x.system_id.as_str()) == used && !verdict(&p, &x.name).is_delete())
                .collect();
            for k in &p.wal_delete {
                assert!(!k.contains(".history"));
                let name = &k["wal_archive/".len().."wal_archive/".len() + 24];
                for x in &kept {
                    for t in 1..4 {
                        if let Ok(Some(n)) = g.needed(&x.point, t, crate::timeline::Until::Latest) {
                            assert!(!n.segments.iter().any(|s| s == name), "{k} deleted, read by {} to {t}", x.name);
                        }
                    }
                }
            }
        }
    }
}
