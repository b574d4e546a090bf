//! Old versions on a versioned bucket (Object Lock), as a pure plan. There a delete only
//! stacks a delete marker: the data stays, locked until its retention ends. After an
//! `expire`, [`plan`] says which old versions may now go for good; the runner tries them,
//! leaves those still locked (the store refuses them) for a later run, and removes a key's
//! delete markers only once none of its data is left (a marker removed first would bring a
//! deleted object back).
//!
//! What may go (each has a test below), all under the cluster's folders only:
//! - only keys whose newest version is a delete marker (deleted objects); a key whose
//!   newest version is data is never touched, nor are its older versions;
//! - WAL: segments (and their `.partial`/`.backup` files) below the plan's WAL cut; never
//!   history files, never with no cut;
//! - backups: a deleted folder (nothing current left in it) that the policy would delete
//!   had it still been there: at least `retain-full` (or one) kept backups ended after it
//!   was written, and with `retain-days` it was written before the window and a kept backup
//!   ended between it and the window (so it is not the window's base). A backup hidden by
//!   someone else's delete markers is thus kept while the policy needs it;
//! - nothing else (keys, system records, unfinished folders' leftovers outside these).

use std::collections::{BTreeMap, BTreeSet};

use cloud_dump_storage::ObjectVersion;

use crate::expire::{BackupFacts, ExpirePlan, Policy};
use crate::layout::Layout;
use crate::repository::{time_us, wal_name_of};
use crate::wal::{classify, segment_number, WalFileKind};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OldVersionsPlan {
    /// Data versions to delete for good: (key, version id).
    pub remove: Vec<(String, String)>,
    /// Delete markers, removed once every data version of their key is gone.
    pub markers: Vec<(String, String)>,
    /// Deleted backup folders whose old versions stay: the policy still needs them.
    pub hidden_backups_kept: Vec<String>,
}

/// The plan for `versions` (keys relative to the repository), after `expire_plan` has run
/// on `backups` under `policy`; `live_folders`: every backup folder that still holds a
/// current object (complete, unfinished or unreadable).
pub fn plan(
    versions: &[ObjectVersion],
    layout: &Layout,
    live_folders: &BTreeSet<String>,
    backups: &[BackupFacts],
    expire_plan: &ExpirePlan,
    policy: &Policy,
) -> OldVersionsPlan {
    // Keys whose newest version is a delete marker.
    let mut by_key: BTreeMap<&str, Vec<&ObjectVersion>> = BTreeMap::new();
    for v in versions {
        by_key.entry(v.key.as_str()).or_default().push(v);
    }
    let deleted: Vec<(&str, &Vec<&ObjectVersion>)> = by_key
        .iter()
        .filter(|(_, vs)| vs.iter().any(|v| v.latest) && vs.iter().all(|v| !v.latest || v.delete_marker))
        .map(|(k, vs)| (*k, vs))
        .collect();

    let root = layout.backups_root();
    let wal_dir = layout.wal_dir();
    // Deleted backup folders: the newest write among their data versions.
    let mut ghosts: BTreeMap<&str, Option<i64>> = BTreeMap::new();
    for (key, vs) in &deleted {
        let Some(folder) = folder_of(key, &root, &wal_dir) else { continue };
        if live_folders.contains(folder) {
            continue;
        }
        let newest = vs.iter().filter(|v| !v.delete_marker).filter_map(|v| time_us(&v.last_modified)).max();
        let e = ghosts.entry(folder).or_insert(Some(i64::MIN));
        // An unreadable time anywhere makes the folder's time unknown (kept).
        *e = match (*e, newest) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (Some(a), None) if vs.iter().all(|v| v.delete_marker) => Some(a),
            _ => None,
        };
    }
    let kept_stops: Vec<i64> = expire_plan
        .backups
        .iter()
        .filter(|(_, v)| !v.is_delete())
        .filter_map(|(n, _)| backups.iter().find(|b| &b.name == n).and_then(|b| b.stop_time_us))
        .collect();
    let window_start = policy.retain_days.map(|d| policy.now_us - (d * 86_400e6) as i64);
    let need = policy.retain_full.unwrap_or(1).max(1);
    let mut out = OldVersionsPlan::default();
    let mut purge_folders = BTreeSet::new();
    for (folder, written) in &ghosts {
        let goes = written.filter(|w| *w != i64::MIN).is_some_and(|w| {
            let newer = kept_stops.iter().filter(|t| **t >= w).count() >= need;
            let outside_window = window_start.is_none_or(|ws| w < ws && kept_stops.iter().any(|t| *t >= w && *t < ws));
            newer && outside_window
        });
        if goes {
            purge_folders.insert(*folder);
        } else {
            out.hidden_backups_kept.push((*folder).to_owned());
        }
    }

    for (key, vs) in deleted {
        let goes = match folder_of(key, &root, &wal_dir) {
            Some(folder) => purge_folders.contains(folder),
            None => key.strip_prefix(&wal_dir).is_some_and(|rel| below_cut(rel, expire_plan.wal_cut)),
        };
        if !goes {
            continue;
        }
        for v in vs {
            let item = (v.key.clone(), v.version_id.clone());
            if v.delete_marker {
                out.markers.push(item);
            } else {
                out.remove.push(item);
            }
        }
    }
    out
}

/// The backup folder a key is in (none for the WAL folder and loose objects).
fn folder_of<'k>(key: &'k str, root: &str, wal_dir: &str) -> Option<&'k str> {
    if key.starts_with(wal_dir) {
        return None;
    }
    let rel = key.strip_prefix(root)?;
    let (folder, rest) = rel.split_once('/')?;
    (!folder.is_empty() && !rest.is_empty()).then_some(folder)
}

/// Whether a WAL archive object (relative to the WAL folder) is of a segment below the cut.
fn below_cut(rel: &str, cut: Option<(u64, u64)>) -> bool {
    let (Some((cut, size)), Some(name)) = (cut, wal_name_of(rel)) else { return false };
    let segment = match classify(&name) {
        Ok(WalFileKind::Segment) => name.as_str(),
        Ok(WalFileKind::Partial | WalFileKind::Backup) => &name[..24],
        Ok(WalFileKind::History) | Err(_) => return false,
    };
    segment_number(segment, size).is_some_and(|n| n < cut)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expire::Verdict;
    use crate::lsn::Lsn;

    const DAY: i64 = 86_400_000_000;
    const SEG: u64 = 16 << 20;

    fn day(d: i64) -> String {
        crate::expire::fmt_time(d * DAY)
    }

    fn v(key: &str, id: &str, latest: bool, marker: bool, d: i64) -> ObjectVersion {
        ObjectVersion { key: key.into(), version_id: id.into(), latest, delete_marker: marker, last_modified: day(d) }
    }

    /// A deleted object: its data written on `d`, deleted on `d + 1`.
    fn gone(key: &str, d: i64) -> [ObjectVersion; 2] {
        [v(key, &format!("{key}#m"), true, true, d + 1), v(key, &format!("{key}#1"), false, false, d)]
    }

    fn facts(name: &str, d: i64) -> BackupFacts {
        BackupFacts {
            name: name.into(),
            stop_time_us: Some(d * DAY),
            segment_size: SEG,
            start_lsn: Lsn(0),
            system_id: "S".into(),
            kept: false,
        }
    }

    fn expire_plan(kept: &[&str], cut: Option<u64>) -> ExpirePlan {
        ExpirePlan {
            backups: kept.iter().map(|n| ((*n).to_owned(), Verdict::Keep("x".into()))).collect(),
            wal_delete: vec![],
            wal_reason: String::new(),
            wal_cut: cut.map(|c| (c, SEG)),
        }
    }

    fn policy(full: Option<usize>, days: Option<f64>, now: i64) -> Policy {
        Policy { retain_full: full, retain_days: days, now_us: now * DAY }
    }

    fn layout() -> Layout {
        Layout::new(Some("c"), None).unwrap()
    }

    #[test]
    fn only_deleted_objects_below_the_policy_go() {
        let mut vs = Vec::new();
        vs.extend(gone("c/backup/old/manifest.json", 1));
        vs.extend(gone("c/backup/old/base.tar.zst", 1));
        vs.extend(gone("c/wal_archive/000000010000000000000003.zst", 1));
        vs.extend(gone("c/wal_archive/000000010000000000000009.zst", 1));
        vs.extend(gone("c/wal_archive/00000002.history", 1));
        vs.extend(gone("c/system-identifier", 1));
        // A live key with an older version: never touched.
        vs.push(v("c/backup/new/manifest.json", "n2", true, false, 5));
        vs.push(v("c/backup/new/manifest.json", "n1", false, false, 4));
        let backups = [facts("new", 5), facts("mid", 4)];
        let live: BTreeSet<String> = ["new".to_owned(), "mid".to_owned()].into();
        let p =
            plan(&vs, &layout(), &live, &backups, &expire_plan(&["new", "mid"], Some(5)), &policy(Some(2), None, 6));
        let removed: BTreeSet<&str> = p.remove.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            removed,
            ["c/backup/old/manifest.json", "c/backup/old/base.tar.zst", "c/wal_archive/000000010000000000000003.zst"]
                .into()
        );
        assert_eq!(p.markers.len(), 3);
        assert!(p.remove.iter().chain(&p.markers).all(|(k, _)| !k.contains("history") && !k.contains("new/")));
        // No WAL cut: no WAL goes.
        let p = plan(&vs, &layout(), &live, &backups, &expire_plan(&["new", "mid"], None), &policy(Some(2), None, 6));
        assert!(p.remove.iter().all(|(k, _)| !k.contains("wal_archive")));
    }

    #[test]
    fn a_hidden_backup_the_policy_needs_stays() {
        // Someone hid the newest backup ("hid", written day 9) with delete markers: the kept
        // backups all ended before it.
        let mut vs = Vec::new();
        vs.extend(gone("c/backup/hid/manifest.json", 9));
        vs.extend(gone("c/backup/old/manifest.json", 1));
        let backups = [facts("b5", 5), facts("b6", 6)];
        let live: BTreeSet<String> = ["b5".to_owned(), "b6".to_owned()].into();
        let p = plan(&vs, &layout(), &live, &backups, &expire_plan(&["b5", "b6"], None), &policy(Some(2), None, 10));
        assert_eq!(p.hidden_backups_kept, vec!["hid".to_owned()]);
        assert!(p.remove.iter().all(|(k, _)| k.contains("/old/")) && !p.remove.is_empty());
        // retain-full 3: two kept backups newer than "old" are not enough.
        let p = plan(&vs, &layout(), &live, &backups, &expire_plan(&["b5", "b6"], None), &policy(Some(3), None, 10));
        assert!(p.remove.is_empty());
        // A window from day 4: "old" (day 1) is before it, but no kept backup ended between
        // the two: "old" would be the window's base, so it stays.
        let p = plan(&vs, &layout(), &live, &backups, &expire_plan(&["b5", "b6"], None), &policy(None, Some(6.0), 10));
        assert!(p.remove.is_empty(), "{p:?}");
        // A window from day 5.5: b5 ended before it and after "old": old goes.
        let p = plan(&vs, &layout(), &live, &backups, &expire_plan(&["b5", "b6"], None), &policy(None, Some(4.5), 10));
        assert!(p.remove.iter().any(|(k, _)| k.contains("/old/")));
    }

    #[test]
    fn live_folders_and_unknown_times_are_kept() {
        // A folder with one current object left (e.g. a kill -9 mid-delete, or a running
        // backup) is live: none of its deleted keys' versions go.
        let mut vs = Vec::new();
        vs.extend(gone("c/backup/half/base.tar.zst", 1));
        vs.push(v("c/backup/half/pg_wal.tar.zst", "h", true, false, 1));
        let mut bad = gone("c/backup/odd/manifest.json", 1).to_vec();
        bad[1].last_modified = "yesterday".into();
        vs.extend(bad);
        let backups = [facts("b5", 5), facts("b6", 6)];
        let live: BTreeSet<String> = ["b5", "b6", "half"].iter().map(|s| s.to_string()).collect();
        let p = plan(&vs, &layout(), &live, &backups, &expire_plan(&["b5", "b6"], None), &policy(Some(1), None, 10));
        assert!(p.remove.is_empty() && p.markers.is_empty(), "{p:?}");
        assert_eq!(p.hidden_backups_kept, vec!["odd".to_owned()]);
    }

    #[test]
    fn a_key_whose_newest_version_is_data_is_never_touched() {
        // Deleted then written again (newest is data): its old versions stay.
        let vs = vec![
            v("c/wal_archive/000000010000000000000001.zst", "3", true, false, 3),
            v("c/wal_archive/000000010000000000000001.zst", "2", false, true, 2),
            v("c/wal_archive/000000010000000000000001.zst", "1", false, false, 1),
        ];
        let p = plan(&vs, &layout(), &BTreeSet::new(), &[], &expire_plan(&[], Some(9)), &policy(Some(1), None, 10));
        assert_eq!(p, OldVersionsPlan::default());
    }
}
