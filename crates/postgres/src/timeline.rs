//! Timelines as PostgreSQL relates them: one tree built from the archive's history files and
//! the WAL files listed, and every decision that depends on it. Pure: the runners list and
//! download the history files, this decides.
//!
//! PostgreSQL's rules, as this module models them:
//! - Timeline 1 has no parents. Timeline N > 1 has a history file `0000000N.history` whose
//!   lines `<parent> <switch LSN> <reason>` name every ancestor and where each one ended;
//!   timeline N begins at the last switch point.
//! - Replay from a backup on timeline B to timeline T follows T's history: B from the
//!   backup's start to where T's ancestry leaves B, then each ancestor from its begin to its
//!   switch point, then T. The segment holding a switch point is read from the child (its
//!   copy holds the parent's WAL up to the switch), so the parent is needed up to the segment
//!   before it.
//! - `recovery_target_timeline = latest` probes `0000000N.history` upward one number at a
//!   time: a missing history file hides every later timeline. So a history file is a hole
//!   when the archive proves the timeline existed here (it has WAL of its own, or a later
//!   history names it), except for the archive's first timeline (archiving may have started
//!   on it, after its history file was written).
//! - A parent that goes on archiving WAL past a child's switch point after the child was
//!   born (a restore test that kept `archive_command`) is a live branch beside the child:
//!   "latest" is then ambiguous and must be named. A parent whose WAL past the switch point
//!   was all archived before the child was born (a point-in-time "undo", a failover) is
//!   superseded by it.

use std::collections::{BTreeMap, BTreeSet};

use crate::lsn::Lsn;
use crate::wal::{classify, segment_number, WalFileKind};

/// One line of a history file: timeline `tli` ended, switching to a child, at `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch {
    pub tli: u32,
    pub end: Lsn,
}

/// Parses the history file of timeline `tli`: its ancestors, oldest first. Refuses what
/// PostgreSQL would not have written (parents not below `tli` or not increasing). Switch
/// points may go back: a recovery that stopped on an older timeline of its target's
/// history copies that history, later lines included (see [`TimelineGraph::path`]).
pub fn parse_history(tli: u32, text: &str) -> Result<Vec<Switch>, String> {
    let mut out: Vec<Switch> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let parent: u32 = fields
            .next()
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("line {line:?} does not start with a timeline number"))?;
        let end: Lsn = fields
            .next()
            .ok_or_else(|| format!("line {line:?} has no switch point"))?
            .parse()
            .map_err(|e: String| format!("line {line:?}: {e}"))?;
        if parent == 0 || parent >= tli {
            return Err(format!("it names timeline {parent} as a parent of timeline {tli}"));
        }
        if let Some(prev) = out.last() {
            if parent <= prev.tli {
                return Err(format!("its timelines go backwards at {line:?}"));
            }
        }
        out.push(Switch { tli: parent, end });
    }
    if out.is_empty() && tli > 1 {
        return Err("it names no parent timeline".into());
    }
    Ok(out)
}

/// The stretch `[begin, end)` of one timeline on a path; the last span of a path has no end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub tli: u32,
    pub begin: Lsn,
    pub end: Option<Lsn>,
}

/// A branch a restore to "latest" could end on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub tli: u32,
    /// Its newest archived segment and when it was stored.
    pub last: Option<String>,
    pub last_us: Option<i64>,
}

impl Head {
    pub fn describe(&self) -> String {
        match &self.last {
            Some(l) => {
                format!("timeline {} (last WAL {l} at {})", self.tli, crate::info::fmt_us(self.last_us.unwrap_or(0)))
            }
            None => format!("timeline {} (no WAL of its own archived)", self.tli),
        }
    }
}

/// Why a timeline question has no safe answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimelineError {
    /// The history file of `tli` is needed (`why`) and not in the archive.
    MissingHistory { tli: u32, why: String },
    /// The history file of `tli` does not parse.
    DamagedHistory { tli: u32, reason: String },
    /// More than one live branch: "latest" must be named.
    Ambiguous(Vec<Head>),
    /// The archive's names describe an impossible amount of WAL.
    Implausible(String),
}

/// More segments than any path can hold (2^26 × 16 MiB = 1 PiB): names past it are refused.
const MAX_PATH_SEGMENTS: u64 = 1 << 26;

impl std::fmt::Display for TimelineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TimelineError::MissingHistory { tli, why } => {
                write!(f, "the history file {tli:08X}.history is missing from the archive although {why}")
            }
            TimelineError::DamagedHistory { tli, reason } => {
                write!(f, "the history file {tli:08X}.history is damaged: {reason}")
            }
            TimelineError::Implausible(why) => write!(f, "the WAL archive is implausible: {why}"),
            TimelineError::Ambiguous(heads) => write!(
                f,
                "\"latest\" is ambiguous: the archive holds {} live branches: {}; name one with --recovery-target-timeline N",
                heads.len(),
                heads.iter().map(Head::describe).collect::<Vec<_>>().join(", ")
            ),
        }
    }
}

impl std::error::Error for TimelineError {}

/// How far a restore replays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// To the end of the archived WAL of the target timeline.
    Latest,
    /// To this position (on whichever timeline of the path holds it).
    Lsn(Lsn),
    /// To this time (µs): at least up to the first segment on the path stored after it.
    Time(i64),
    /// Only to the backup's end (consistency).
    Consistent,
}

/// The WAL a restore needs, in replay order, and what of it the archive lacks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Needed {
    pub spans: Vec<Span>,
    /// Segment names, in replay order.
    pub segments: Vec<String>,
    /// Needed segments the archive does not hold, in replay order.
    pub missing: Vec<String>,
    /// History files on the path (timelines after the first).
    pub histories: Vec<String>,
    /// The last segment the restore reads, when the archive holds it.
    pub last: Option<String>,
    /// For a time target: no segment on the path was stored after it (the archive does not
    /// reach it).
    pub past_archive: bool,
}

/// One backup as the graph sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackupPoint {
    pub tli: u32,
    pub start: Lsn,
    pub end: Lsn,
}

/// The archive's timelines: histories, segments and when each was stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TimelineGraph {
    seg_size: u64,
    histories: BTreeMap<u32, Vec<Switch>>,
    damaged: BTreeMap<u32, String>,
    history_us: BTreeMap<u32, i64>,
    segments: BTreeMap<u32, BTreeMap<u64, i64>>,
    partials: BTreeMap<u32, BTreeSet<u64>>,
}

/// The name of segment `n` of timeline `tli`.
pub fn segment_name(tli: u32, n: u64, seg_size: u64) -> String {
    let per_log = 0x1_0000_0000u64 / seg_size.max(1);
    format!("{tli:08X}{:08X}{:08X}", n / per_log, n % per_log)
}

/// The timeline of a WAL file name (its first 8 hex digits).
pub fn tli_of(name: &str) -> Option<u32> {
    u32::from_str_radix(name.get(..8)?, 16).ok()
}

impl TimelineGraph {
    /// The graph of an archive: `files` are WAL file names (suffixes removed) with when they
    /// were stored (µs); `histories` the text of each history file, by timeline, as
    /// downloaded and verified. A history file listed without text counts as damaged.
    pub fn build(files: &[(String, i64)], histories: &BTreeMap<u32, String>, seg_size: u64) -> TimelineGraph {
        let mut g = TimelineGraph { seg_size: seg_size.max(1), ..Default::default() };
        for (name, us) in files {
            let Some(tli) = tli_of(name) else { continue };
            match classify(name) {
                Ok(WalFileKind::Segment) => {
                    if let Some(n) = segment_number(name, g.seg_size) {
                        let e = g.segments.entry(tli).or_default().entry(n).or_insert(*us);
                        *e = (*e).max(*us);
                    }
                }
                Ok(WalFileKind::Partial) => {
                    if let Some(n) = segment_number(&name[..24], g.seg_size) {
                        g.partials.entry(tli).or_default().insert(n);
                    }
                }
                Ok(WalFileKind::History) => {
                    let e = g.history_us.entry(tli).or_insert(*us);
                    *e = (*e).max(*us);
                    match histories.get(&tli) {
                        Some(text) => match parse_history(tli, text) {
                            Ok(h) => {
                                g.histories.insert(tli, h);
                            }
                            Err(reason) => {
                                g.damaged.insert(tli, reason);
                            }
                        },
                        None => {
                            g.damaged.insert(tli, "its content could not be read".into());
                        }
                    }
                }
                _ => {}
            }
        }
        g
    }

    pub fn segment_size(&self) -> u64 {
        self.seg_size
    }

    fn seg(&self, l: Lsn) -> u64 {
        l.0 / self.seg_size
    }

    /// Every timeline the archive shows: with WAL, a history file, or named by one.
    pub fn timelines(&self) -> BTreeSet<u32> {
        let mut all: BTreeSet<u32> = self.segments.keys().copied().collect();
        all.extend(self.partials.keys());
        all.extend(self.history_us.keys());
        for h in self.histories.values() {
            all.extend(h.iter().map(|s| s.tli));
        }
        all
    }

    /// The archive's first timeline: the lowest with WAL of its own.
    pub fn root(&self) -> Option<u32> {
        self.segments.keys().chain(self.partials.keys()).copied().min()
    }

    /// Why the history file of `tli` must be in the archive, if it must.
    pub fn history_needed(&self, tli: u32) -> Option<String> {
        // Timeline 1 has none; the archive's first timeline (and older ones) may predate
        // archiving, so nothing proves its history file was ever archived here.
        if tli <= 1 || self.root().is_some_and(|r| tli <= r) {
            return None;
        }
        if let Some(segs) = self.segments.get(&tli).filter(|s| !s.is_empty()) {
            let (n, _) = segs.iter().next().expect("not empty");
            return Some(format!("timeline {tli} has WAL archived ({})", segment_name(tli, *n, self.seg_size)));
        }
        if self.partials.get(&tli).is_some_and(|p| !p.is_empty()) {
            return Some(format!("timeline {tli} has a partial segment archived"));
        }
        if let Some(later) = self.named_by_later(tli) {
            return Some(format!("{later:08X}.history names timeline {tli} as an ancestor"));
        }
        None
    }

    fn named_by_later(&self, tli: u32) -> Option<u32> {
        self.histories.iter().find(|(_, h)| h.iter().any(|s| s.tli == tli)).map(|(t, _)| *t)
    }

    /// Whether every timeline's history is known (none missing, none damaged): only then
    /// can live branches and what a backup needs be told.
    pub fn problems(&self) -> Vec<TimelineError> {
        let mut out: Vec<TimelineError> =
            self.missing_histories().into_iter().map(|(tli, why)| TimelineError::MissingHistory { tli, why }).collect();
        out.extend(self.damaged.iter().map(|(tli, r)| TimelineError::DamagedHistory { tli: *tli, reason: r.clone() }));
        out
    }

    /// History files the archive should hold and does not, with why.
    pub fn missing_histories(&self) -> Vec<(u32, String)> {
        self.timelines()
            .into_iter()
            .filter(|t| !self.history_us.contains_key(t))
            .filter_map(|t| self.history_needed(t).map(|why| (t, why)))
            .collect()
    }

    /// The path of timeline `tli` from the first timeline: its ancestors' spans, then its own.
    pub fn path(&self, tli: u32) -> Result<Vec<Span>, TimelineError> {
        if let Some(reason) = self.damaged.get(&tli) {
            return Err(TimelineError::DamagedHistory { tli, reason: reason.clone() });
        }
        let Some(history) = self.histories.get(&tli) else {
            if let Some(why) = self.history_needed(tli) {
                return Err(TimelineError::MissingHistory { tli, why });
            }
            return Ok(vec![Span { tli, begin: Lsn(0), end: None }]);
        };
        // Each ancestor ends where the path leaves it: at its switch point, or earlier when
        // a later line's is earlier (a timeline that recovery left before its own end, as
        // PostgreSQL's reading does: the newest timeline whose begin is at or before a
        // segment serves it). Such an ancestor's span is empty.
        let mut ends: Vec<Lsn> = history.iter().map(|s| s.end).collect();
        for i in (0..ends.len().saturating_sub(1)).rev() {
            ends[i] = ends[i].min(ends[i + 1]);
        }
        let mut spans = Vec::new();
        let mut begin = Lsn(0);
        for (s, end) in history.iter().zip(ends) {
            let begin_here = begin.min(end);
            spans.push(Span { tli: s.tli, begin: begin_here, end: Some(end) });
            begin = end;
        }
        spans.push(Span { tli, begin, end: None });
        Ok(spans)
    }

    /// Whether a backup lies on the ancestry of `target`: its timeline is on the path and
    /// the path leaves it at or after the backup's end.
    pub fn on_ancestry(&self, target: u32, b: &BackupPoint) -> bool {
        self.path(target)
            .is_ok_and(|p| p.iter().any(|s| s.tli == b.tli && s.begin <= b.start && s.end.is_none_or(|e| b.end <= e)))
    }

    fn last_segment(&self, tli: u32) -> Option<(u64, i64)> {
        self.segments.get(&tli).and_then(|s| s.iter().next_back()).map(|(n, us)| (*n, *us))
    }

    /// The live branches: timelines no later timeline superseded. A timeline born at B
    /// supersedes an ancestor it leaves at switch point E when all of the ancestor's
    /// segments from E's on were stored before B (a failover, a point-in-time "undo"; a
    /// parent completes the segment holding E only by writing past E), and any other
    /// timeline born before it whose WAL was all stored before B (a branch abandoned before
    /// the next one began).
    pub fn heads(&self) -> Vec<Head> {
        let mut heads = Vec::new();
        for t in self.timelines() {
            let t_born = self.history_us.get(&t).copied();
            let all_before = |from: Option<u64>, b: i64| {
                self.segments
                    .get(&t)
                    .is_none_or(|s| s.iter().filter(|(n, _)| from.is_none_or(|f| **n >= f)).all(|(_, us)| *us < b))
            };
            let superseded = self.history_us.iter().any(|(c, born)| {
                if *c == t {
                    return false;
                }
                let Ok(path) = self.path(*c) else { return false };
                match path.iter().find(|s| s.tli == t) {
                    Some(s) => s.end.is_some_and(|e| all_before(Some(self.seg(e)), *born)),
                    None => t_born.is_some_and(|tb| tb < *born) && all_before(None, *born),
                }
            });
            if !superseded {
                let last = self.last_segment(t);
                heads.push(Head {
                    tli: t,
                    last: last.map(|(n, _)| segment_name(t, n, self.seg_size)),
                    last_us: last.map(|(_, us)| us),
                });
            }
        }
        heads
    }

    /// The timeline "latest" means, among the branches `from` (a backup, when given) lies
    /// on: refused while a history file is missing or when more than one branch is live.
    pub fn latest(&self, from: Option<&BackupPoint>) -> Result<u32, TimelineError> {
        if let Some((tli, why)) = self.missing_histories().into_iter().next() {
            return Err(TimelineError::MissingHistory { tli, why });
        }
        if let Some((tli, reason)) = self.damaged.iter().next() {
            return Err(TimelineError::DamagedHistory { tli: *tli, reason: reason.clone() });
        }
        let heads: Vec<Head> =
            self.heads().into_iter().filter(|h| from.is_none_or(|b| self.on_ancestry(h.tli, b))).collect();
        match heads.len() {
            0 => Ok(from.map(|b| b.tli).or(self.root()).unwrap_or(1)),
            1 => Ok(heads[0].tli),
            _ => Err(TimelineError::Ambiguous(heads)),
        }
    }

    /// The WAL a restore of backup `b` to timeline `target` needs, up to `until`. The
    /// backup must lie on the target's ancestry (else `None`).
    pub fn needed(&self, b: &BackupPoint, target: u32, until: Until) -> Result<Option<Needed>, TimelineError> {
        let spans = self.path(target)?;
        let Some(first) = spans.iter().position(|s| s.tli == b.tli && s.end.is_none_or(|e| b.end <= e)) else {
            return Ok(None);
        };
        let spans: Vec<Span> = spans[first..].to_vec();
        let mut out = Needed { spans: spans.clone(), ..Default::default() };
        for s in &spans {
            if s.tli > 1 && (self.history_us.contains_key(&s.tli) || self.history_needed(s.tli).is_some()) {
                let name = format!("{:08X}.history", s.tli);
                if !self.history_us.contains_key(&s.tli) {
                    out.missing.push(name.clone());
                }
                out.histories.push(name);
            }
        }
        let end_seg = self.seg(b.end);
        // Every segment of the path, in replay order, with where it stands.
        let mut path: Vec<(u32, u64)> = Vec::new();
        for (i, s) in spans.iter().enumerate() {
            let lo = if i == 0 { self.seg(b.start) } else { self.seg(s.begin) };
            let hi = match s.end {
                Some(e) => match self.seg(e).checked_sub(1) {
                    Some(h) => h,
                    None => continue,
                },
                None => {
                    let archived = self.last_segment(s.tli).map(|(n, _)| n);
                    // The backup's own WAL up to its end is needed whatever is archived; a
                    // later timeline's first segment too (without it PostgreSQL would read
                    // the parent's copy of that segment, past the switch point).
                    let floor = if i == 0 { Some(end_seg) } else { Some(self.seg(s.begin)) };
                    match archived.max(floor) {
                        Some(h) => h,
                        None => continue,
                    }
                }
            };
            if hi.saturating_sub(lo) > MAX_PATH_SEGMENTS {
                return Err(TimelineError::Implausible(format!(
                    "timeline {} would need {} segments from {} (a planted or damaged name?)",
                    s.tli,
                    hi - lo,
                    segment_name(s.tli, lo, self.seg_size)
                )));
            }
            path.extend((lo..=hi).map(|n| (s.tli, n)));
        }
        // Where replay stops.
        let stop = match until {
            Until::Latest => path.len(),
            Until::Consistent => {
                path.iter().position(|(t, n)| *t == b.tli && *n == end_seg).map(|i| i + 1).unwrap_or(path.len())
            }
            // Segment numbers never go down along a path.
            Until::Lsn(l) => path.iter().position(|(_, n)| *n > self.seg(l)).unwrap_or(path.len()),
            Until::Time(us) => {
                match path
                    .iter()
                    .position(|(t, n)| self.segments.get(t).and_then(|s| s.get(n)).is_some_and(|at| *at >= us))
                {
                    Some(i) => i + 1,
                    None => {
                        out.past_archive = true;
                        path.len()
                    }
                }
            }
        };
        // Never less than the backup's own WAL.
        let own = path.iter().position(|(t, n)| *t == b.tli && *n == end_seg).map(|i| i + 1).unwrap_or(0);
        path.truncate(stop.max(own));
        for (t, n) in path {
            let name = segment_name(t, n, self.seg_size);
            if self.segments.get(&t).is_some_and(|s| s.contains_key(&n)) {
                out.last = Some(name.clone());
            } else {
                out.missing.push(name.clone());
            }
            out.segments.push(name);
        }
        Ok(Some(out))
    }

    /// Whether a WAL file PostgreSQL asked for and the archive lacks is a hole (some later
    /// WAL proves it existed: recovery must stop, not end there) — `Some(why)` — or the end
    /// of what is archived (`None`).
    pub fn hole(&self, name: &str) -> Option<String> {
        let tli = tli_of(name)?;
        match classify(name).ok()? {
            WalFileKind::History => self.history_needed(tli),
            WalFileKind::Segment => {
                let n = segment_number(name, self.seg_size)?;
                let begin = match self.path(tli) {
                    Ok(p) => p.last().map(|s| s.begin).unwrap_or_default(),
                    Err(e) => {
                        // Its begin cannot be told: any later WAL of it proves a hole.
                        return self
                            .segments
                            .get(&tli)
                            .and_then(|s| s.range(n + 1..).next())
                            .map(|(m, _)| format!("{} is archived ({e})", segment_name(tli, *m, self.seg_size)));
                    }
                };
                if n < self.seg(begin) {
                    return None; // asked of a timeline for WAL from before it began
                }
                // A timeline's first segment missing while its parent holds its own copy:
                // PostgreSQL would read the parent's WAL past the switch point.
                if tli > 1 && n == self.seg(begin) {
                    if let Ok(p) = self.path(tli) {
                        if let Some(parent) = p.len().checked_sub(2).map(|i| p[i].tli) {
                            if self.segments.get(&parent).is_some_and(|s| s.contains_key(&n)) {
                                return Some(format!(
                                    "timeline {tli} begins in it and timeline {parent}'s copy (past the switch point) is archived"
                                ));
                            }
                        }
                    }
                }
                if let Some((m, _)) = self.segments.get(&tli).and_then(|s| s.range(n + 1..).next()) {
                    return Some(format!("{} is archived", segment_name(tli, *m, self.seg_size)));
                }
                for h in self.histories.keys() {
                    let Ok(path) = self.path(*h) else { continue };
                    if let Some(end) = path.iter().find(|s| s.tli == tli).and_then(|s| s.end) {
                        if self.seg(end).checked_sub(1).is_some_and(|last| n <= last) {
                            return Some(format!(
                                "{h:08X}.history says timeline {h} leaves timeline {tli} at {end}, after this segment"
                            ));
                        }
                    }
                }
                None
            }
            _ => None,
        }
    }

    /// Whether segment `n` of `tli` (or its partial or backup-history file) is needed by
    /// any of `kept` for a restore to any branch; `Err` when a history is missing or damaged
    /// (then nothing can be told).
    pub fn segment_needed(&self, tli: u32, n: u64, kept: &[BackupPoint]) -> Result<bool, TimelineError> {
        let mut targets: BTreeSet<u32> = self.timelines();
        targets.insert(tli);
        let paths = targets.into_iter().map(|h| self.path(h)).collect::<Result<Vec<_>, _>>()?;
        for path in paths {
            let Some(j) = path.iter().position(|s| s.tli == tli) else { continue };
            let span = path[j];
            // The parent is read up to the segment before the switch; the switch segment
            // comes from the child (a restore that stays on the parent is the path of the
            // parent itself, whose last span has no end).
            if span.end.is_some_and(|e| n >= self.seg(e)) {
                continue;
            }
            for b in kept {
                let Some(i) = path.iter().position(|s| s.tli == b.tli && s.end.is_none_or(|e| b.end <= e)) else {
                    continue;
                };
                if i > j {
                    continue;
                }
                let lo = if i == j { self.seg(b.start) } else { self.seg(span.begin) };
                if n >= lo {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Every segment of every timeline, with when it was stored.
    pub fn segments_of(&self, tli: u32) -> impl Iterator<Item = (u64, i64)> + '_ {
        self.segments.get(&tli).into_iter().flat_map(|s| s.iter().map(|(n, us)| (*n, *us)))
    }

    /// When the WAL file `name` was stored (segments and history files).
    pub fn stored(&self, name: &str) -> Option<i64> {
        let tli = tli_of(name)?;
        match classify(name).ok()? {
            WalFileKind::Segment => self.segments.get(&tli)?.get(&segment_number(name, self.seg_size)?).copied(),
            WalFileKind::History => self.history_us.get(&tli).copied(),
            _ => None,
        }
    }

    /// When the history file of `tli` was stored.
    pub fn history_stored(&self, tli: u32) -> Option<i64> {
        self.history_us.get(&tli).copied()
    }
}

#[cfg(test)]
mod tests;
