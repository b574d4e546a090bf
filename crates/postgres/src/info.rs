//! What a repository can restore, at a glance: a pure summary of the backups and the WAL
//! archive (per timeline: first, last, holes), the recovery window and the archive's age.
//! `cloud-dump info` prints it as text, JSON or Prometheus textfile metrics.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::wal::{classify, segment_number, WalFileKind};

/// One backup as the summary sees it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BackupLine {
    pub name: String,
    pub start_time: String,
    pub stop_time: String,
    pub duration_seconds: f64,
    pub stored_bytes: u64,
    pub raw_bytes: u64,
    pub kept: bool,
    pub timeline: u32,
    pub start_lsn: String,
    pub end_lsn: String,
    pub system_id: String,
    /// Its first WAL segment (the one holding its start), for the window computation.
    #[serde(skip)]
    pub start_segment: String,
    #[serde(skip)]
    pub stop_time_us: i64,
    #[serde(skip)]
    pub point: crate::timeline::BackupPoint,
}

impl BackupLine {
    /// The line of a backup, from its manifest.
    pub fn of(m: &crate::manifest::BackupManifest, kept: bool) -> BackupLine {
        let us = |t: &str| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .map(|t| (t.unix_timestamp_nanos() / 1000) as i64)
                .unwrap_or(0)
        };
        let (start, stop) = (us(&m.start_time), us(&m.stop_time));
        BackupLine {
            name: m.name.clone(),
            start_time: m.start_time.clone(),
            stop_time: m.stop_time.clone(),
            duration_seconds: (stop - start) as f64 / 1e6,
            stored_bytes: m.stored_size(),
            raw_bytes: m.raw_size(),
            kept,
            timeline: m.timeline,
            start_lsn: m.start_lsn.to_string(),
            end_lsn: m.end_lsn.to_string(),
            system_id: m.system_id.clone(),
            start_segment: m.start_lsn.segment_name(m.timeline, m.wal_segment_size()),
            stop_time_us: stop,
            point: crate::recovery::backup_point(m),
        }
    }
}

/// One archived WAL file: its name, the bytes it takes, when it was stored.
#[derive(Debug, Clone, PartialEq)]
pub struct WalLine {
    pub name: String,
    pub bytes: u64,
    pub stored_us: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TimelineSummary {
    pub timeline: u32,
    pub first: String,
    pub last: String,
    pub segments: u64,
    /// Segments missing between first and last.
    pub holes: u64,
    /// The first missing segment, if any.
    pub first_hole: Option<String>,
    pub bytes: u64,
    pub history: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub cluster: Option<String>,
    pub repository: String,
    pub backups: Vec<BackupLine>,
    /// Folders with a claim but no manifest: backups running now, or abandoned.
    pub unfinished: Vec<String>,
    /// Folders whose manifest cannot be read, with why.
    pub unreadable: Vec<(String, String)>,
    pub timelines: Vec<TimelineSummary>,
    pub wal_bytes: u64,
    pub newest_wal: Option<String>,
    /// When the newest WAL file was stored (RFC 3339) and how long ago.
    pub newest_wal_time: Option<String>,
    pub newest_wal_age_seconds: Option<f64>,
    /// Any point from `start` to `end` can be restored: the oldest backup whose WAL runs
    /// without a hole to the newest archived segment of its timeline, and that segment's
    /// time.
    pub recovery_window: Option<(String, String)>,
    /// The timeline the window follows (the one live branch), and the last segment on its
    /// path from the window's first backup.
    pub recovery_timeline: Option<u32>,
    pub recovery_window_last: Option<String>,
    /// Why there is no window, when the timelines say (a missing history file, branches).
    pub recovery_window_problem: Option<String>,
    /// What the window's end is: "last commit" (the last transaction end the archive
    /// holds on the path, where a time target can still stop) or "newest segment" (its
    /// arrival, when no record tells the commit time).
    pub recovery_window_end: Option<String>,
    /// The window's path (segments in replay order), for the runner to date its end.
    #[serde(skip)]
    pub recovery_window_path: Vec<String>,
    pub repository_bytes: u64,
}

/// Builds the summary. `segment_size` turns names into positions; `now_us` dates the age.
#[allow(clippy::too_many_arguments)]
pub fn summarize(
    cluster: Option<String>,
    repository: String,
    mut backups: Vec<BackupLine>,
    unfinished: Vec<String>,
    wal: &[WalLine],
    repository_bytes: u64,
    segment_size: u64,
    now_us: i64,
    graph: &crate::timeline::TimelineGraph,
) -> Summary {
    backups.sort_by(|a, b| b.stop_time_us.cmp(&a.stop_time_us).then(b.name.cmp(&a.name)));
    let mut per_tli: BTreeMap<u32, (BTreeMap<u64, String>, u64, bool)> = BTreeMap::new();
    let mut wal_bytes = 0;
    // Each WAL file's objects (record + data) add up; its time is the latest of them.
    let mut files: BTreeMap<&str, (u64, i64)> = BTreeMap::new();
    for w in wal {
        let e = files.entry(w.name.as_str()).or_insert((0, 0));
        e.0 += w.bytes;
        e.1 = e.1.max(w.stored_us);
        wal_bytes += w.bytes;
    }
    for w in wal {
        match classify(&w.name) {
            Ok(WalFileKind::Segment) => {
                let tli = u32::from_str_radix(&w.name[..8], 16).unwrap_or(0);
                let entry = per_tli.entry(tli).or_default();
                if let Some(n) = segment_number(&w.name, segment_size) {
                    entry.0.insert(n, w.name.clone());
                }
                entry.1 += w.bytes;
            }
            Ok(WalFileKind::History) => {
                let tli = u32::from_str_radix(&w.name[..8], 16).unwrap_or(0);
                per_tli.entry(tli).or_default().2 = true;
            }
            _ => {}
        }
    }
    let mut timelines = Vec::new();
    for (tli, (segs, bytes, history)) in &per_tli {
        let (Some((&lo, first)), Some((&hi, last))) = (segs.iter().next(), segs.iter().next_back()) else {
            timelines.push(TimelineSummary {
                timeline: *tli,
                first: String::new(),
                last: String::new(),
                segments: 0,
                holes: 0,
                first_hole: None,
                bytes: *bytes,
                history: *history,
            });
            continue;
        };
        let count = segs.len() as u64;
        let holes = hi - lo + 1 - count;
        let first_hole = (holes > 0).then(|| (lo..=hi).find(|n| !segs.contains_key(n))).flatten().map(|n| {
            let per_log = 0x1_0000_0000u64 / segment_size.max(1);
            format!("{tli:08X}{:08X}{:08X}", n / per_log, n % per_log)
        });
        timelines.push(TimelineSummary {
            timeline: *tli,
            first: first.clone(),
            last: last.clone(),
            segments: count,
            holes,
            first_hole,
            bytes: *bytes,
            history: *history,
        });
    }
    // The newest archived segment by position (highest segment number; the highest timeline
    // breaks a tie), and when it was stored.
    let newest_seg = per_tli
        .iter()
        .filter_map(|(tli, (segs, _, _))| segs.iter().next_back().map(|(n, name)| (*n, *tli, name.clone())))
        .max();
    let newest_name = newest_seg.as_ref().map(|(_, _, n)| n.clone());
    let newest_time = newest_name.as_ref().and_then(|n| files.get(n.as_str()).map(|f| f.1));
    // The recovery window: on the one live timeline, from the oldest backup on its history
    // whose WAL runs without a hole (history files included) to the newest segment on it.
    let (mut window, mut window_tli, mut window_last, mut window_problem) = (None, None, None, None);
    let mut window_path = Vec::new();
    match graph.latest(None) {
        Err(e) => window_problem = Some(e.to_string()),
        Ok(t) => {
            window_tli = Some(t);
            let found =
                backups.iter().rev().find_map(|b| match graph.needed(&b.point, t, crate::timeline::Until::Latest) {
                    Ok(Some(n)) if n.missing.is_empty() => n.last.clone().map(|l| (b, l, n.segments)),
                    _ => None,
                });
            match found {
                Some((b, last, path)) => {
                    window_path = path;
                    let end_us = graph.stored(&last).unwrap_or(0);
                    window = Some((b.stop_time.clone(), fmt_us(end_us)));
                    window_last = Some(last);
                }
                None if !backups.is_empty() => {
                    window_problem = Some(format!(
                        "no backup on timeline {t}'s history has WAL without a hole up to the newest segment on it"
                    ))
                }
                None => {}
            }
        }
    }
    let window_end = window.as_ref().map(|_| "newest segment".to_owned());
    Summary {
        cluster,
        repository,
        backups,
        unfinished,
        unreadable: Vec::new(),
        timelines,
        wal_bytes,
        newest_wal: newest_name,
        newest_wal_time: newest_time.map(fmt_us),
        newest_wal_age_seconds: newest_time.map(|t| ((now_us - t) as f64 / 1e6).max(0.0)),
        recovery_window: window,
        recovery_timeline: window_tli,
        recovery_window_last: window_last,
        recovery_window_end: window_end,
        recovery_window_problem: window_problem,
        recovery_window_path: window_path,
        repository_bytes,
    }
}

pub fn fmt_us(us: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(us as i128 * 1000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

fn seconds(rfc3339: &str) -> Option<f64> {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp_nanos() as f64 / 1e9)
}

/// Prometheus textfile-collector format (node_exporter): gauges an operator alerts on —
/// a stale archive, a hole, no recent backup.
/// node-exporter textfile lines for `s`, and the bucket's Object Lock and default
/// retention when they are known.
pub fn prometheus(s: &Summary, bucket: Option<&cloud_dump_storage::BucketProtection>) -> String {
    let cluster = s.cluster.clone().unwrap_or_default().replace('\\', "\\\\").replace('"', "\\\"");
    let repo = s.repository.replace('\\', "\\\\").replace('"', "\\\"");
    let labels = format!("cluster=\"{cluster}\",repository=\"{repo}\"");
    let mut o = String::new();
    let mut gauge = |name: &str, help: &str, rows: Vec<(String, f64)>| {
        o.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
        for (extra, v) in rows {
            let l = if extra.is_empty() { labels.clone() } else { format!("{labels},{extra}") };
            o.push_str(&format!("{name}{{{l}}} {v}\n"));
        }
    };
    gauge("cloud_dump_backups", "Complete backups in the repository.", vec![(String::new(), s.backups.len() as f64)]);
    gauge(
        "cloud_dump_backups_unfinished",
        "Backup folders without a manifest (running or abandoned).",
        vec![(String::new(), s.unfinished.len() as f64)],
    );
    if let Some(b) = s.backups.first() {
        gauge(
            "cloud_dump_backup_newest_timestamp_seconds",
            "When the newest backup ended.",
            vec![(String::new(), seconds(&b.stop_time).unwrap_or(0.0))],
        );
        gauge(
            "cloud_dump_backup_newest_bytes",
            "Stored size of the newest backup.",
            vec![(String::new(), b.stored_bytes as f64)],
        );
        gauge(
            "cloud_dump_backup_newest_duration_seconds",
            "How long the newest backup took.",
            vec![(String::new(), b.duration_seconds)],
        );
    }
    if let (Some(t), Some(age)) = (&s.newest_wal_time, s.newest_wal_age_seconds) {
        gauge(
            "cloud_dump_wal_newest_timestamp_seconds",
            "When the newest WAL segment was archived.",
            vec![(String::new(), seconds(t).unwrap_or(0.0))],
        );
        gauge(
            "cloud_dump_wal_newest_age_seconds",
            "Age of the newest archived WAL segment.",
            vec![(String::new(), age)],
        );
    }
    let per_tli = |f: &dyn Fn(&TimelineSummary) -> f64| -> Vec<(String, f64)> {
        s.timelines.iter().map(|t| (format!("timeline=\"{}\"", t.timeline), f(t))).collect()
    };
    gauge("cloud_dump_wal_segments", "Archived WAL segments per timeline.", per_tli(&|t| t.segments as f64));
    gauge(
        "cloud_dump_wal_holes",
        "Segments missing between the first and last of a timeline.",
        per_tli(&|t| t.holes as f64),
    );
    gauge("cloud_dump_wal_bytes", "Bytes of the WAL archive.", vec![(String::new(), s.wal_bytes as f64)]);
    if let Some((from, to)) = &s.recovery_window {
        gauge(
            "cloud_dump_recovery_window_start_timestamp_seconds",
            "The oldest point that can be restored.",
            vec![(String::new(), seconds(from).unwrap_or(0.0))],
        );
        gauge(
            "cloud_dump_recovery_window_end_timestamp_seconds",
            "The newest point that can be restored.",
            vec![(String::new(), seconds(to).unwrap_or(0.0))],
        );
    }
    gauge(
        "cloud_dump_repository_bytes",
        "Bytes stored in the repository.",
        vec![(String::new(), s.repository_bytes as f64)],
    );
    if let Some(b) = bucket {
        gauge(
            "cloud_dump_bucket_object_lock",
            "Whether the bucket has Object Lock.",
            vec![(String::new(), f64::from(u8::from(b.object_lock)))],
        );
        gauge(
            "cloud_dump_bucket_retention_days",
            "The bucket's default retention.",
            vec![(String::new(), f64::from(b.retention_days.unwrap_or(0)))],
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;

    fn seg(tli: u32, n: u64) -> String {
        format!("{tli:08X}{:08X}{:08X}", n / 256, n % 256)
    }

    fn backup(name: &str, start: &str, stop_us: i64) -> BackupLine {
        BackupLine {
            name: name.into(),
            start_time: fmt_us(stop_us - 1_000_000),
            stop_time: fmt_us(stop_us),
            duration_seconds: 1.0,
            stored_bytes: 100,
            raw_bytes: 200,
            kept: false,
            timeline: 1,
            start_lsn: "0/0".into(),
            end_lsn: "0/0".into(),
            system_id: "S".into(),
            start_segment: start.into(),
            stop_time_us: stop_us,
            point: {
                let n = crate::wal::segment_number(start, SEG).unwrap();
                crate::timeline::BackupPoint { tli: 1, start: crate::Lsn(n * SEG + 40), end: crate::Lsn(n * SEG + 400) }
            },
        }
    }

    /// The graph of `wal`, where timeline 2 left timeline 1 at segment 8.
    fn g(wal: &[WalLine]) -> crate::timeline::TimelineGraph {
        let files: Vec<(String, i64)> = wal.iter().map(|w| (w.name.clone(), w.stored_us)).collect();
        let texts = std::collections::BTreeMap::from([(2, "1\t0/8000000\tx\n".to_string())]);
        crate::timeline::TimelineGraph::build(&files, &texts, SEG)
    }

    fn w(name: &str, at: i64) -> WalLine {
        WalLine { name: name.into(), bytes: 10, stored_us: at }
    }

    #[test]
    fn timelines_holes_and_the_window() {
        let t0 = 1_800_000_000_000_000i64;
        let mut wal: Vec<WalLine> =
            (2..10).filter(|n| *n != 5).map(|n| w(&seg(1, n), t0 + n as i64 * 1_000_000)).collect();
        wal.extend((8..12).map(|n| w(&seg(2, n), t0 + 100_000_000 + n as i64)));
        wal.push(w("00000002.history", t0 + 90_000_000));
        let backups = vec![backup("old", &seg(1, 2), t0 + 2_000_000), backup("new", &seg(1, 6), t0 + 7_000_000)];
        let s = summarize(
            Some("c".into()),
            "file:///r".into(),
            backups,
            vec!["running".into()],
            &wal,
            1234,
            SEG,
            t0 + 200_000_000,
            &g(&wal),
        );
        assert_eq!(s.backups[0].name, "new");
        let t1 = &s.timelines[0];
        assert_eq!((t1.first.as_str(), t1.last.as_str(), t1.segments, t1.holes), (&*seg(1, 2), &*seg(1, 9), 7, 1));
        assert_eq!(t1.first_hole.as_deref(), Some(&*seg(1, 5)));
        assert!(s.timelines[1].history);
        assert_eq!(s.newest_wal.as_deref(), Some(&*seg(2, 11)));
        // "old" starts before the hole: the window starts at "new".
        assert_eq!(s.recovery_window.as_ref().unwrap().0, fmt_us(t0 + 7_000_000));
        assert!((s.newest_wal_age_seconds.unwrap() - (100.0 - 0.000011)).abs() < 0.01);
        // A hole on a later timeline closes the window for every backup before it.
        let mut holed = wal.clone();
        holed.retain(|w| w.name != seg(2, 9));
        let s2 = summarize(None, "r".into(), s.backups.clone(), vec![], &holed, 0, SEG, t0, &g(&holed));
        assert!(s2.recovery_window.is_none(), "{:?}", s2.recovery_window);
        // A gap between one timeline's end and the next one's start closes it too.
        let gap: Vec<WalLine> =
            (2..8).map(|n| w(&seg(1, n), t0)).chain((12..15).map(|n| w(&seg(2, n), t0 + 1))).collect();
        let mut gap = gap;
        gap.push(w("00000002.history", t0));
        let s3 = summarize(None, "r".into(), s.backups.clone(), vec![], &gap, 0, SEG, t0, &g(&gap));
        assert!(s3.recovery_window.is_none(), "{:?}", s3.recovery_window);
        let prom = prometheus(&s, None);
        assert!(!prom.contains("cloud_dump_bucket"), "{prom}");
        let locked = cloud_dump_storage::BucketProtection {
            versioning: "Enabled".into(),
            object_lock: true,
            retention_mode: Some("COMPLIANCE".into()),
            retention_days: Some(30),
        };
        let with_bucket = prometheus(&s, Some(&locked));
        assert!(
            with_bucket.contains("cloud_dump_bucket_retention_days{cluster=\"c\",repository=\"file:///r\"} 30")
                && with_bucket.contains("cloud_dump_bucket_object_lock{cluster=\"c\",repository=\"file:///r\"} 1"),
            "{with_bucket}"
        );
        assert!(
            prom.contains("cloud_dump_wal_holes{cluster=\"c\",repository=\"file:///r\",timeline=\"1\"} 1"),
            "{prom}"
        );
        assert!(prom.contains("cloud_dump_backups_unfinished{cluster=\"c\",repository=\"file:///r\"} 1"), "{prom}");
        assert!(prom.contains("# TYPE cloud_dump_wal_newest_age_seconds gauge"));
    }

    #[test]
    fn an_empty_repository() {
        let s = summarize(None, "file:///r".into(), vec![], vec![], &[], 0, SEG, 0, &g(&[]));
        assert!(s.recovery_window.is_none() && s.newest_wal.is_none() && s.timelines.is_empty());
        assert!(prometheus(&s, None).contains("cloud_dump_backups{cluster=\"\",repository=\"file:///r\"} 0"));
    }
}
