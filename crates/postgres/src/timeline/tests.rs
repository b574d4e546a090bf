use super::*;

const SEG: u64 = 16 << 20;

fn lsn(seg: u64, off: u64) -> Lsn {
    Lsn(seg * SEG + off)
}

fn history_text(lines: &[(u32, Lsn)]) -> String {
    lines.iter().map(|(t, l)| format!("{t}\t{l}\tno recovery target specified\n\n")).collect()
}

/// An archive by hand: segments `(tli, from..=to, stored_us_start)`, histories `(tli, lines, stored)`.
/// A history file by hand: timeline, its lines, when it was stored.
type Hist<'a> = (u32, &'a [(u32, Lsn)], i64);

fn graph(segs: &[(u32, u64, u64, i64)], hist: &[Hist<'_>]) -> TimelineGraph {
    let mut files = Vec::new();
    for (tli, from, to, t0) in segs {
        for n in *from..=*to {
            files.push((segment_name(*tli, n, SEG), t0 + n as i64));
        }
    }
    let mut texts = BTreeMap::new();
    for (tli, lines, at) in hist {
        files.push((format!("{tli:08X}.history"), *at));
        texts.insert(*tli, history_text(lines));
    }
    TimelineGraph::build(&files, &texts, SEG)
}

fn point(tli: u32, seg: u64) -> BackupPoint {
    BackupPoint { tli, start: lsn(seg, 40), end: lsn(seg, 4000) }
}

#[test]
fn parses_history_files_and_refuses_impossible_ones() {
    let h =
        parse_history(3, "1\t0/3000000\tno recovery target specified\n\n2\t0/50000A8\tbefore 2000-01-01\n").unwrap();
    assert_eq!(h, [Switch { tli: 1, end: Lsn(0x3000000) }, Switch { tli: 2, end: Lsn(0x50000A8) }]);
    for bad in ["", "# only a comment\n", "3\t0/1\tx\n", "2\t0/5\tx\n1\t0/6\tx\n", "x\t0/1\n", "1\n"] {
        assert!(parse_history(3, bad).is_err(), "{bad:?}");
    }
    assert_eq!(parse_history(1, ""), Ok(vec![]));
    // Switch points may go back: PostgreSQL copies the target's history when recovery
    // stopped on an older timeline of it.
    assert!(parse_history(3, "1\t0/6\tx\n2\t0/5\tx\n").is_ok());
}

#[test]
fn a_recovery_that_stopped_on_an_older_timeline_is_followed() {
    // 1 → 2 at seg 9; a restore with target 2 stopped on timeline 1 at seg 5 and
    // promoted timeline 3, whose history copies 2's: "1 X, 2 Y" with Y < X.
    let g = graph(
        &[(1, 0, 9, 0), (2, 9, 12, 100), (3, 5, 8, 500)],
        &[(2, &[(1, lsn(9, 0x28))], 50), (3, &[(1, lsn(9, 0x28)), (2, lsn(5, 0x100))], 400)],
    );
    let b = point(1, 2);
    let n = g.needed(&b, 3, Until::Latest).unwrap().unwrap();
    assert!(n.missing.is_empty(), "{:?}", n.missing);
    assert!(n.segments.contains(&segment_name(1, 4, SEG)) && n.segments.contains(&segment_name(3, 5, SEG)));
    assert!(!n.segments.iter().any(|s| s.starts_with("00000002")), "{:?}", n.segments);
    assert!(!g.on_ancestry(3, &point(2, 10)));
    assert_eq!(g.latest(None), Ok(3));
}

#[test]
fn a_child_whose_first_segment_is_not_archived_is_a_hole_when_the_parent_went_on() {
    // Timeline 2 left 1 inside segment 7; 1's full segment 7 is archived (it went on), 2's
    // is not: PostgreSQL would read 1's copy past the switch.
    let g = graph(&[(1, 0, 9, 0)], &[(2, &[(1, lsn(7, 0x28))], 50)]);
    assert!(g.hole(&segment_name(2, 7, SEG)).is_some());
    let n = g.needed(&point(1, 2), 2, Until::Latest).unwrap().unwrap();
    assert_eq!(n.missing, [segment_name(2, 7, SEG)]);
    // A planted name far ahead is refused, not walked.
    let g = graph(&[(1, 0, 3, 0)], &[]);
    let mut files: Vec<(String, i64)> = (0..3).map(|n| (segment_name(1, n, SEG), 0)).collect();
    files.push(("00000001FFFFFFFF000000FF".into(), 0));
    let planted = TimelineGraph::build(&files, &BTreeMap::new(), SEG);
    assert!(matches!(planted.needed(&point(1, 1), 1, Until::Latest), Err(TimelineError::Implausible(_))));
    assert!(g.needed(&point(1, 1), 1, Until::Latest).is_ok());
}

#[test]
fn a_failover_is_followed_and_latest_is_the_new_timeline() {
    // tl1 0..=6, switch inside segment 7; tl2 from 7 on, born after tl1's last segment.
    let g = graph(&[(1, 0, 6, 0), (1, 7, 7, 0), (2, 7, 12, 100)], &[(2, &[(1, lsn(7, 0x28))], 50)]);
    assert_eq!(g.latest(None), Ok(2));
    let n = g.needed(&point(1, 2), 2, Until::Latest).unwrap().unwrap();
    assert!(n.missing.is_empty(), "{:?}", n.missing);
    assert_eq!(n.segments.first().unwrap(), &segment_name(1, 2, SEG));
    // The switch segment comes from the child, the parent's copy is not on the path.
    assert!(n.segments.contains(&segment_name(1, 6, SEG)));
    assert!(!n.segments.contains(&segment_name(1, 7, SEG)));
    assert!(n.segments.contains(&segment_name(2, 7, SEG)));
    assert_eq!(n.last.as_deref(), Some(segment_name(2, 12, SEG).as_str()));
    assert_eq!(n.histories, ["00000002.history"]);
}

#[test]
fn a_missing_history_file_is_a_hole_not_an_older_timeline() {
    let g = graph(&[(1, 0, 6, 0), (2, 7, 12, 100)], &[]);
    assert!(matches!(g.latest(None), Err(TimelineError::MissingHistory { tli: 2, .. })));
    assert!(g.hole("00000002.history").is_some());
    assert!(g.needed(&point(1, 2), 2, Until::Latest).is_err());
    assert!(g.segment_needed(1, 3, &[point(1, 2)]).is_err(), "expire cannot tell what is needed");
    // A later history naming a timeline proves the earlier one too.
    let g = graph(&[(1, 0, 6, 0), (3, 9, 12, 100)], &[(3, &[(1, lsn(7, 0)), (2, lsn(9, 0))], 90)]);
    assert!(g.hole("00000002.history").is_some());
    assert!(g.latest(None).is_err());
    // Nothing proves 0000000N.history for the archive's first timeline, or one never seen.
    let g = graph(&[(2, 7, 12, 100)], &[]);
    assert_eq!(g.hole("00000002.history"), None);
    assert_eq!(g.hole("00000003.history"), None);
    assert_eq!(g.latest(None), Ok(2));
}

#[test]
fn a_point_in_time_undo_supersedes_the_dead_branch() {
    // b1 at seg 2 on tl1; tl1 goes on to seg 20 (accident at 10, b2 at 15); all of it stored
    // before tl2 is born from seg 8.
    let g = graph(&[(1, 0, 20, 0), (2, 8, 14, 1000)], &[(2, &[(1, lsn(8, 0x100))], 900)]);
    assert_eq!(g.latest(None), Ok(2));
    let b1 = point(1, 2);
    let b2 = point(1, 15);
    assert!(g.on_ancestry(2, &b1));
    assert!(!g.on_ancestry(2, &b2), "b2 is on the dead branch");
    assert_eq!(g.needed(&b2, 2, Until::Latest), Ok(None));
    assert!(g.needed(&b1, 2, Until::Latest).unwrap().unwrap().missing.is_empty());
    // With b1 kept, tl2's first segments are needed (the cut is per path).
    assert_eq!(g.segment_needed(2, 8, &[b1]), Ok(true));
    assert_eq!(g.segment_needed(1, 5, &[b1]), Ok(true));
    // With only b2 kept, b2 needs its own branch but nothing on tl2.
    assert_eq!(g.segment_needed(2, 8, &[b2]), Ok(false));
    assert_eq!(g.segment_needed(1, 16, &[b2]), Ok(true));
    assert_eq!(g.segment_needed(1, 14, &[b2]), Ok(false));
}

#[test]
fn a_restore_test_that_kept_archiving_makes_latest_ambiguous() {
    // tl2 born at t=500 from seg 8; tl1 keeps archiving 9..=20 afterwards.
    let g = graph(&[(1, 0, 8, 0), (1, 9, 20, 600), (2, 8, 9, 510)], &[(2, &[(1, lsn(8, 0x100))], 500)]);
    match g.latest(None) {
        Err(TimelineError::Ambiguous(heads)) => {
            assert_eq!(heads.iter().map(|h| h.tli).collect::<Vec<_>>(), [1, 2]);
            let text = TimelineError::Ambiguous(heads).to_string();
            assert!(text.contains("timeline 1") && text.contains(&segment_name(1, 20, SEG)), "{text}");
        }
        other => panic!("{other:?}"),
    }
    // A backup taken on tl1 after the branch lies only on tl1's line.
    let late = point(1, 15);
    assert_eq!(g.latest(Some(&late)), Ok(1));
    assert!(g.needed(&late, 1, Until::Latest).unwrap().unwrap().missing.is_empty());
}

#[test]
fn a_hole_before_a_switch_is_a_hole() {
    // tl1 needed up to seg 6 (tl2 leaves it inside 7); 6 and the partial of 7 are missing.
    let g = graph(&[(1, 0, 5, 0), (2, 7, 12, 100)], &[(2, &[(1, lsn(7, 0x28))], 50)]);
    assert!(g.hole(&segment_name(1, 6, SEG)).unwrap().contains("00000002.history"));
    assert_eq!(g.hole(&segment_name(1, 7, SEG)), None, "the child's copy of the switch segment is read");
    let n = g.needed(&point(1, 2), 2, Until::Latest).unwrap().unwrap();
    assert_eq!(n.missing, [segment_name(1, 6, SEG)]);
    // The end of the newest timeline is the end, and a newer timeline is not asked for
    // WAL from before it began.
    assert_eq!(g.hole(&segment_name(2, 13, SEG)), None);
    assert_eq!(g.hole(&segment_name(2, 3, SEG)), None);
    let g = graph(&[(1, 0, 5, 0), (2, 7, 8, 100), (2, 10, 12, 100)], &[(2, &[(1, lsn(7, 0x28))], 50)]);
    assert!(g.hole(&segment_name(2, 9, SEG)).is_some());
}

#[test]
fn targets_bound_what_is_needed() {
    let g = graph(&[(1, 0, 6, 0), (2, 7, 12, 1000)], &[(2, &[(1, lsn(7, 0x28))], 50)]);
    let b = point(1, 2);
    let to_lsn = g.needed(&b, 2, Until::Lsn(lsn(9, 5))).unwrap().unwrap();
    assert_eq!(to_lsn.segments.last().unwrap(), &segment_name(2, 9, SEG));
    let consistent = g.needed(&b, 2, Until::Consistent).unwrap().unwrap();
    assert_eq!(consistent.segments, [segment_name(1, 2, SEG)]);
    let at = g.needed(&b, 2, Until::Time(1009)).unwrap().unwrap();
    assert_eq!(at.segments.last().unwrap(), &segment_name(2, 9, SEG));
    assert!(!at.past_archive);
    assert!(g.needed(&b, 2, Until::Time(99_999)).unwrap().unwrap().past_archive);
    // The backup's own WAL is needed even before it is archived.
    let fresh = BackupPoint { tli: 2, start: lsn(14, 0), end: lsn(14, 90) };
    assert_eq!(g.needed(&fresh, 2, Until::Latest).unwrap().unwrap().missing, [segment_name(2, 14, SEG)]);
}

// ---- the drill: random histories against PostgreSQL's own rules ----

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What the generator knows: every timeline's parent and switch point, what was archived.
struct World {
    /// tli → (parent, switch, born)
    parents: BTreeMap<u32, (u32, Lsn, i64)>,
    /// (tli, seg) → stored
    segments: BTreeMap<(u32, u64), i64>,
    histories: BTreeMap<u32, i64>,
    backups: Vec<BackupPoint>,
    active: u32,
    /// Restore-test branches (thrown away while production went on).
    tests: Vec<u32>,
    /// The position the active primary has reached.
    pos: Lsn,
}

impl World {
    /// PostgreSQL's expectedTLEs for `target`: (tli, begin), newest first.
    fn expected(&self, target: u32) -> Vec<(u32, Lsn)> {
        let mut out = Vec::new();
        let mut t = target;
        loop {
            match self.parents.get(&t) {
                Some((p, switch, _)) => {
                    out.push((t, *switch));
                    t = *p;
                }
                None => {
                    out.push((t, Lsn(0)));
                    return out;
                }
            }
        }
    }

    /// The segments PostgreSQL reads replaying backup `b` to the end of `target`:
    /// XLogFileReadAnyTLI's rule, the newest timeline whose begin segment is at or before
    /// the segment (a timeline's end is not checked: newer ones were tried first).
    fn replay(&self, b: &BackupPoint, target: u32) -> Option<Vec<(u32, u64)>> {
        let tles = self.expected(target);
        tles.iter().find(|(t, _)| *t == b.tli)?;
        // b must precede where its timeline ends on this path.
        let pos = tles.iter().position(|(t, _)| *t == b.tli)?;
        if pos > 0 && b.end > tles[pos - 1].1 {
            return None;
        }
        let last_written = self.segments.keys().filter(|(t, _)| *t == target).map(|(_, n)| *n).max();
        let mut out = Vec::new();
        let mut n = b.start.0 / SEG;
        let end = last_written.unwrap_or(0).max(b.end.0 / SEG);
        while n <= end {
            let tli = tles[..=pos].iter().find(|(_, begin)| begin.0 / SEG <= n).map(|(t, _)| *t)?;
            out.push((tli, n));
            n += 1;
        }
        Some(out)
    }
}

/// The active primary archives `segs` segments on `tli`.
fn write(w: &mut World, reach: &mut BTreeMap<u32, Lsn>, tli: u32, segs: u64, now: &mut i64) {
    for _ in 0..segs {
        let seg = reach[&tli].0 / SEG;
        *now += 1;
        w.segments.insert((tli, seg), *now);
        reach.insert(tli, lsn(seg + 1, 0));
    }
}

/// A promotion: a new timeline leaves `parent` at `switch` and becomes the active one.
fn branch(w: &mut World, reach: &mut BTreeMap<u32, Lsn>, parent: u32, switch: Lsn, now: &mut i64, next: &mut u32) {
    *now += 1;
    w.parents.insert(*next, (parent, switch, *now));
    w.histories.insert(*next, *now);
    reach.insert(*next, switch);
    w.active = *next;
    *next += 1;
}

fn generate(seed: u64) -> World {
    let mut r = Rng(seed | 1);
    let mut w = World {
        parents: BTreeMap::new(),
        segments: BTreeMap::new(),
        histories: BTreeMap::new(),
        backups: Vec::new(),
        active: 1,
        tests: Vec::new(),
        pos: lsn(1, 0),
    };
    let mut now: i64 = 0;
    // Where each timeline has reached.
    let mut reach: BTreeMap<u32, Lsn> = BTreeMap::from([(1, lsn(1, 0))]);
    let mut next_tli = 2;
    let events = 3 + r.below(6);
    for _ in 0..events {
        match r.below(10) {
            0..=3 => {
                let k = 1 + r.below(4);
                {
                    let a = w.active;
                    write(&mut w, &mut reach, a, k, &mut now);
                }
            }
            4 | 5 => {
                let at = reach[&w.active];
                let start = Lsn(at.0 + 40);
                w.backups.push(BackupPoint { tli: w.active, start, end: Lsn(start.0 + 1000) });
                {
                    let a = w.active;
                    write(&mut w, &mut reach, a, 1 + r.below(2), &mut now);
                }
            }
            6 => {
                // Failover: the primary stops, a standby promotes where it stopped (mid-segment).
                let at = reach[&w.active];
                let switch = Lsn(at.0 + 0x28);
                let parent = w.active;
                branch(&mut w, &mut reach, parent, switch, &mut now, &mut next_tli);
                let (a, segs) = (w.active, 1 + r.below(3));
                write(&mut w, &mut reach, a, segs, &mut now);
            }
            7 => {
                // Point-in-time undo: back to a point after a backup on the active line.
                let on_line: Vec<BackupPoint> =
                    w.backups.iter().copied().filter(|b| w.replay(b, w.active).is_some()).collect();
                let Some(b) = on_line.get(r.below(on_line.len() as u64) as usize).copied() else { continue };
                let switch = Lsn(b.end.0 + 0x100);
                let parent_tli = w.expected(w.active).into_iter().find(|(_, begin)| *begin <= switch).map(|(t, _)| t);
                let Some(parent) = parent_tli else { continue };
                if switch >= reach[&parent] {
                    continue;
                }
                branch(&mut w, &mut reach, parent, switch, &mut now, &mut next_tli);
                let (a, segs) = (w.active, 1 + r.below(3));
                write(&mut w, &mut reach, a, segs, &mut now);
            }
            _ => {
                // A restore test that kept archive_command: a branch off the active line that
                // archives a little and is thrown away; production goes on.
                let at = reach[&w.active];
                let switch = Lsn(at.0.saturating_sub(0x100));
                now += 1;
                let test = next_tli;
                next_tli += 1;
                w.parents.insert(test, (w.active, switch, now));
                w.histories.insert(test, now);
                reach.insert(test, switch);
                write(&mut w, &mut reach, test, 1 + r.below(2), &mut now);
                let k = 1 + r.below(3);
                {
                    let a = w.active;
                    write(&mut w, &mut reach, a, k, &mut now);
                }
                w.tests.push(test);
            }
        }
    }
    w.pos = reach[&w.active];
    w
}

impl World {
    /// "latest" is ambiguous while a thrown-away test branch is recent: no timeline was
    /// born after its last WAL.
    fn split(&self) -> bool {
        self.tests.iter().any(|t| {
            let last = self.segments.iter().filter(|((tl, _), _)| tl == t).map(|(_, us)| *us).max();
            let last = last.unwrap_or(0).max(self.histories[t]);
            !self.histories.iter().any(|(c, born)| c != t && *born > last)
        })
    }
}

fn graph_of(w: &World, drop_history: Option<u32>, drop_segment: Option<(u32, u64)>) -> TimelineGraph {
    let mut files: Vec<(String, i64)> = w
        .segments
        .iter()
        .filter(|(k, _)| Some(**k) != drop_segment)
        .map(|((t, n), us)| (segment_name(*t, *n, SEG), *us))
        .collect();
    let mut texts = BTreeMap::new();
    for (t, at) in &w.histories {
        if Some(*t) == drop_history {
            continue;
        }
        files.push((format!("{t:08X}.history"), *at));
        let lines: Vec<(u32, Lsn)> = w.expected(*t).into_iter().skip(1).collect::<Vec<_>>().into_iter().rev().collect();
        // expected() lists (tli, begin); the history file lists (tli, end): the child's begin.
        let tles = w.expected(*t);
        let mut hist = Vec::new();
        for i in (1..tles.len()).rev() {
            hist.push((tles[i].0, tles[i - 1].1));
        }
        assert_eq!(hist.len(), lines.len());
        texts.insert(*t, history_text(&hist));
    }
    TimelineGraph::build(&files, &texts, SEG)
}

#[test]
fn drill_random_timeline_histories_against_postgresql_rules() {
    let mut checked = 0;
    let mut splits = 0;
    let mut branches = 0;
    for seed in 1..=400u64 {
        let w = generate(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        branches += w.parents.len();
        let g = graph_of(&w, None, None);
        // latest: the active timeline, or a refusal that names it when a test branch split.
        match g.latest(None) {
            Ok(t) => {
                assert!(!w.split(), "seed {seed}: a split archive must refuse latest, got {t}");
                assert_eq!(t, w.active, "seed {seed}");
            }
            Err(TimelineError::Ambiguous(heads)) => {
                assert!(w.split(), "seed {seed}: ambiguous without a split: {heads:?}");
                assert!(heads.iter().any(|h| h.tli == w.active), "seed {seed}: {heads:?}");
                splits += 1;
            }
            Err(e) => panic!("seed {seed}: {e}"),
        }
        for b in &w.backups {
            for target in w.parents.keys().copied().chain([1]) {
                let truth = w.replay(b, target);
                assert_eq!(g.on_ancestry(target, b), truth.is_some(), "seed {seed} {b:?} → {target}");
                let got = g.needed(b, target, Until::Latest).unwrap();
                match (truth, got) {
                    (None, None) => {}
                    (Some(t), Some(n)) => {
                        let names: Vec<String> = t.iter().map(|(tl, s)| segment_name(*tl, *s, SEG)).collect();
                        assert_eq!(n.segments, names, "seed {seed} {b:?} → {target}");
                        assert!(n.missing.is_empty(), "seed {seed}: {:?}", n.missing);
                        // Expire keeping b keeps everything its restores read.
                        for (tl, s) in &t {
                            assert_eq!(g.segment_needed(*tl, *s, &[*b]), Ok(true), "seed {seed} {b:?} ({tl},{s})");
                        }
                        // Every segment on the path but the last missing is a hole.
                        if t.len() > 1 {
                            let victim = t[r_index(seed, t.len() - 1)];
                            if w.segments.contains_key(&victim) {
                                let g2 = graph_of(&w, None, Some(victim));
                                let name = segment_name(victim.0, victim.1, SEG);
                                assert!(g2.hole(&name).is_some(), "seed {seed}: {name} not seen as a hole");
                                let n2 = g2.needed(b, target, Until::Latest).unwrap().unwrap();
                                assert_eq!(n2.missing, std::slice::from_ref(&name), "seed {seed}");
                            }
                        }
                        checked += 1;
                    }
                    (t, n) => panic!("seed {seed} {b:?} → {target}: truth {t:?}, model {n:?}"),
                }
            }
        }
        // Segments no kept backup reads are not needed.
        if let Some(newest) = w.backups.last() {
            for &(tl, s) in w.segments.keys() {
                let read = w
                    .parents
                    .keys()
                    .copied()
                    .chain([1])
                    .any(|target| w.replay(newest, target).is_some_and(|p| p.contains(&(tl, s))));
                assert_eq!(g.segment_needed(tl, s, &[*newest]), Ok(read), "seed {seed}: ({tl},{s}) kept {newest:?}");
            }
        }
        // A deleted history file of a timeline with WAL: no latest, and a hole.
        // (The archive's first timeline is exempt: archiving may have begun on it.)
        let first = w.segments.keys().map(|(t, _)| *t).min().unwrap_or(1);
        if let Some((&t, _)) = w.parents.iter().find(|(t, _)| **t > first && w.segments.keys().any(|(tl, _)| tl == *t))
        {
            let g3 = graph_of(&w, Some(t), None);
            assert!(g3.hole(&format!("{t:08X}.history")).is_some(), "seed {seed}");
            assert!(matches!(g3.latest(None), Err(TimelineError::MissingHistory { .. })), "seed {seed}");
        }
    }
    println!("drill timelines: {checked} restores checked over 400 histories ({branches} branches, {splits} split)");
    assert!(checked > 400 && splits > 20 && branches > 200, "{checked} {splits} {branches}");
}

fn r_index(seed: u64, len: usize) -> usize {
    (seed.wrapping_mul(31) as usize) % len.max(1)
}
