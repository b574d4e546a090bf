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
//! - backups: a deleted folder (nothing current left in it, and none listed) whose hidden
//!   manifest versions all read as backups of this layout that the expire policy would
//!   delete were they still there: [`crate::expire::plan`] runs over the live backups plus
//!   that one, with its system and any keep mark it ever had. A folder with an unreadable
//!   manifest, or one the policy would keep (hidden by someone else's delete markers),
//!   stays; one that never had a manifest (a backup cut short) goes. The manifest's
//!   versions go last, once nothing else of the folder is left;
//! - WAL: segments (and their `.partial`/`.backup` files) below the plan's WAL cut, and only
//!   while no hidden backup is kept (it may need them); never history files;
//! - nothing else (keys, system records, loose objects, other folders).

use std::collections::{BTreeMap, BTreeSet};

use cloud_dump_storage::ObjectVersion;

use crate::expire::{self, BackupFacts, ExpirePlan, Policy};
use crate::layout::{self, Layout};
use crate::repository::wal_name_of;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OldVersionsPlan {
    /// Data versions to delete for good: (key, version id).
    pub remove: Vec<(String, String)>,
    /// The manifests' data versions of folders that go: deleted only once nothing else of
    /// their folder is left (a manifest gone first would leave the rest unjudgeable).
    pub remove_last: Vec<(String, String)>,
    /// Delete markers, removed once every data version of their key is gone.
    pub markers: Vec<(String, String)>,
    /// Deleted backup folders whose old versions stay, with why.
    pub hidden_backups_kept: Vec<(String, String)>,
}

/// What a deleted backup folder was, as the runner could tell from its old versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hidden {
    /// Every old version of its manifest, read (with keep marks it ever had).
    Backup(Vec<BackupFacts>),
    /// A manifest version that cannot be read, or is not of this layout: kept, and the
    /// WAL with it.
    Unreadable(String),
    /// No manifest version at all, only files directly in the folder: never a complete
    /// backup (one cut short, or abandoned), or one purged up to its manifest already.
    NeverABackup,
}

/// Deleted keys (newest version a delete marker) with all their versions.
pub fn deleted_keys(versions: &[ObjectVersion]) -> BTreeMap<&str, Vec<&ObjectVersion>> {
    let mut by_key: BTreeMap<&str, Vec<&ObjectVersion>> = BTreeMap::new();
    for v in versions {
        by_key.entry(v.key.as_str()).or_default().push(v);
    }
    by_key.retain(|_, vs| vs.iter().any(|v| v.latest) && vs.iter().all(|v| !v.latest || v.delete_marker));
    by_key
}

/// Deleted backup folders (not in `live_folders`, holding only files directly inside), each
/// with every data version of its manifest: what the runner reads to learn what the backup
/// was. Folders with deeper keys and no manifest are no backup folder (another cluster's
/// tree beside a flat layout): they are not returned, and nothing of them goes.
pub fn hidden_folders<'v>(
    versions: &'v [ObjectVersion],
    layout: &Layout,
    live_folders: &BTreeSet<String>,
) -> BTreeMap<String, Vec<&'v ObjectVersion>> {
    let root = layout.backups_root();
    let wal_dir = layout.wal_dir();
    let mut out: BTreeMap<String, Vec<&ObjectVersion>> = BTreeMap::new();
    let mut nested = BTreeSet::new();
    for (key, vs) in deleted_keys(versions) {
        let Some((folder, rest)) = folder_of(key, &root, &wal_dir) else { continue };
        if live_folders.contains(folder) {
            continue;
        }
        if rest.contains('/') {
            nested.insert(folder.to_owned());
        }
        let e = out.entry(folder.to_owned()).or_default();
        if rest == layout::MANIFEST_FILE {
            e.extend(vs.iter().copied().filter(|v| !v.delete_marker));
        }
    }
    out.retain(|f, manifests| !manifests.is_empty() || !nested.contains(f));
    out
}

/// The plan for `versions` (keys relative to the repository), after `expire_plan` has run
/// on the live `backups` under `policy`. `hidden`: what each deleted folder of
/// [`hidden_folders`] was. `graph`: the archive's timelines, for the policy's judgement.
#[allow(clippy::too_many_arguments)]
pub fn plan(
    versions: &[ObjectVersion],
    layout: &Layout,
    hidden: &BTreeMap<String, Hidden>,
    backups: &[BackupFacts],
    archive_system: Option<&str>,
    expire_plan: &ExpirePlan,
    policy: &Policy,
    graph: &crate::timeline::TimelineGraph,
) -> OldVersionsPlan {
    let root = layout.backups_root();
    let wal_dir = layout.wal_dir();
    let mut out = OldVersionsPlan::default();
    let mut purge_folders = BTreeSet::new();
    let mut wal_blocked = false;
    for (folder, what) in hidden {
        let why = match what {
            Hidden::NeverABackup => None,
            Hidden::Unreadable(w) => Some(w.clone()),
            // Every version the manifest ever had must be one the policy deletes: a later
            // version written by someone else decides nothing alone.
            Hidden::Backup(all) => all.iter().find_map(|f| {
                if f.name != *folder {
                    return Some(format!("an old manifest names another backup ({})", f.name));
                }
                let mut with = backups.to_vec();
                with.push(f.clone());
                match expire::plan(&with, &[], archive_system, policy, 0, graph) {
                    Ok(p) => match p.backups.iter().find(|(n, _)| n == folder).map(|(_, v)| v) {
                        Some(v) if v.is_delete() => None,
                        Some(v) => Some(format!("the policy would keep it: {}", v.reason())),
                        None => Some("not planned".into()),
                    },
                    Err(e) => Some(e),
                }
            }),
        };
        match why {
            None => {
                purge_folders.insert(folder.as_str());
            }
            Some(w) => {
                wal_blocked = true;
                out.hidden_backups_kept.push((folder.clone(), w));
            }
        }
    }
    let wal_rule = if wal_blocked { None } else { expire_plan.wal_rule.as_ref() };

    for (key, vs) in deleted_keys(versions) {
        let (goes, last) = match folder_of(key, &root, &wal_dir) {
            Some((folder, rest)) => (purge_folders.contains(folder), rest == layout::MANIFEST_FILE),
            None => (key.strip_prefix(&wal_dir).is_some_and(|rel| below_cut(rel, wal_rule)), false),
        };
        if !goes {
            continue;
        }
        for v in vs {
            let item = (v.key.clone(), v.version_id.clone());
            if v.delete_marker {
                out.markers.push(item);
            } else if last {
                out.remove_last.push(item);
            } else {
                out.remove.push(item);
            }
        }
    }
    out
}

/// The backup folder a key is in and the rest of the key (none for the WAL folder, loose
/// objects, and names no backup can have).
fn folder_of<'k>(key: &'k str, root: &str, wal_dir: &str) -> Option<(&'k str, &'k str)> {
    if key.starts_with(wal_dir) {
        return None;
    }
    let rel = key.strip_prefix(root)?;
    let (folder, rest) = rel.split_once('/')?;
    (layout::validate_component("backup name", folder).is_ok() && !rest.is_empty()).then_some((folder, rest))
}

/// Whether a WAL archive object (relative to the WAL folder) is of a segment below the cut.
fn below_cut(rel: &str, rule: Option<&expire::WalRule>) -> bool {
    rule.zip(wal_name_of(rel)).is_some_and(|(rule, name)| rule.drops(&name))
}

#[cfg(test)]
mod tests {
    use super::*;
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

    fn facts(name: &str, d: i64, system: &str) -> BackupFacts {
        BackupFacts {
            name: name.into(),
            stop_time_us: Some(d * DAY),
            segment_size: SEG,
            start_lsn: Lsn(d as u64 * SEG),
            system_id: system.into(),
            kept: false,
            point: crate::timeline::BackupPoint { tli: 1, start: Lsn(d as u64 * SEG), end: Lsn(d as u64 * SEG + 100) },
            doubt: None,
        }
    }

    fn policy(full: Option<usize>, days: Option<f64>, now: i64) -> Policy {
        Policy { retain_full: full, retain_days: days, now_us: now * DAY }
    }

    fn layout() -> Layout {
        Layout::new(Some("c"), None).unwrap()
    }

    /// The plan as the runner makes it: expire over the live backups, then old versions.
    fn run(vs: &[ObjectVersion], hidden: &[(&str, Hidden)], live: &[BackupFacts], p: &Policy) -> OldVersionsPlan {
        let names: Vec<String> = (0..40).map(|n| format!("{:08X}{:08X}{:08X}", 1, 0, n)).collect();
        let wal: Vec<expire::WalObject> = names
            .iter()
            .map(|n| expire::WalObject { key: format!("c/wal_archive/{n}.zst"), name: n.clone() })
            .collect();
        let files: Vec<(String, i64)> = names.iter().map(|n| (n.clone(), 0)).collect();
        let graph = crate::timeline::TimelineGraph::build(&files, &BTreeMap::new(), SEG);
        let ep = expire::plan(live, &wal, Some("S"), p, 0, &graph).unwrap();
        let hidden: BTreeMap<String, Hidden> = hidden.iter().map(|(n, f)| ((*n).to_owned(), f.clone())).collect();
        plan(vs, &layout(), &hidden, live, Some("S"), &ep, p, &graph)
    }

    #[test]
    fn only_deleted_objects_the_policy_would_delete_go() {
        let mut vs = Vec::new();
        vs.extend(gone("c/backup/old/manifest.json", 1));
        vs.extend(gone("c/backup/old/base.tar.zst", 1));
        // Its deleting mark, written when expire deleted it (long after the backup).
        vs.extend(gone("c/backup/old/deleting-00000000000000000009", 9));
        vs.extend(gone("c/wal_archive/000000010000000000000003.zst", 1));
        vs.extend(gone("c/wal_archive/000000010000000000000009.zst", 1));
        vs.extend(gone("c/wal_archive/00000002.history", 1));
        vs.extend(gone("c/system-identifier", 1));
        // A live key with an older version: never touched.
        vs.push(v("c/backup/new/manifest.json", "n2", true, false, 5));
        vs.push(v("c/backup/new/manifest.json", "n1", false, false, 4));
        let live = [facts("new", 5, "S"), facts("mid", 4, "S")];
        let p = run(&vs, &[("old", Hidden::Backup(vec![facts("old", 1, "S")]))], &live, &policy(Some(2), None, 10));
        let removed: BTreeSet<&str> = p.remove.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            removed,
            [
                "c/backup/old/base.tar.zst",
                "c/backup/old/deleting-00000000000000000009",
                "c/wal_archive/000000010000000000000003.zst"
            ]
            .into()
        );
        // The manifest last, once the rest of its folder is gone.
        assert_eq!(
            p.remove_last,
            vec![("c/backup/old/manifest.json".to_owned(), "c/backup/old/manifest.json#1".to_owned())]
        );
        assert_eq!(p.markers.len(), 4);
        assert!(p.remove.iter().chain(&p.markers).all(|(k, _)| !k.contains("history") && !k.contains("new/")));
    }

    #[test]
    fn a_hidden_backup_the_policy_needs_stays_and_keeps_its_wal() {
        let mut vs = Vec::new();
        vs.extend(gone("c/backup/hid/manifest.json", 9));
        vs.extend(gone("c/backup/old/manifest.json", 1));
        vs.extend(gone("c/wal_archive/000000010000000000000002.zst", 1));
        let live = [facts("b5", 5, "S"), facts("b6", 6, "S")];
        // Someone hid the newest backup: the policy keeps it, so it stays, and no WAL goes.
        let hidden =
            [("hid", Hidden::Backup(vec![facts("hid", 9, "S")])), ("old", Hidden::Backup(vec![facts("old", 1, "S")]))];
        let p = run(&vs, &hidden, &live, &policy(Some(2), None, 10));
        assert_eq!(p.hidden_backups_kept.len(), 1);
        assert_eq!(p.hidden_backups_kept[0].0, "hid");
        assert!(p.remove_last.iter().all(|(k, _)| k.contains("/old/")) && !p.remove_last.is_empty(), "{p:?}");
        assert!(p.remove.iter().all(|(k, _)| !k.contains("/hid/")), "{p:?}");
        // retain-full 3: "old" would be kept too.
        let p = run(&vs, &hidden[1..], &live, &policy(Some(3), None, 10));
        assert!(p.remove_last.is_empty(), "{p:?}");
        // A window from day 4: "old" (day 1) would be the window's base: it stays.
        let p = run(&vs, &hidden[1..], &live, &policy(None, Some(6.0), 10));
        assert!(p.remove_last.is_empty(), "{p:?}");
        // A window from day 5.5: b5 is the base; "old" and the WAL below b5 go.
        let p = run(&vs, &hidden[1..], &live, &policy(None, Some(4.5), 10));
        assert!(p.remove_last.iter().any(|(k, _)| k.contains("/old/")), "{p:?}");
        assert!(p.remove.iter().any(|(k, _)| k.contains("wal_archive")), "{p:?}");
    }

    #[test]
    fn keep_marks_systems_and_unreadable_manifests_are_respected() {
        let mut vs = Vec::new();
        vs.extend(gone("c/backup/k/manifest.json", 1));
        vs.extend(gone("c/backup/x/manifest.json", 1));
        vs.extend(gone("c/backup/odd/base.tar.zst", 1));
        let live = [facts("b5", 5, "S"), facts("b6", 6, "S")];
        let mut kept = facts("k", 1, "S");
        kept.kept = true;
        // The last backup of another system (before a pg_upgrade): that system's newest.
        let other = facts("x", 1, "OLD");
        let p = run(
            &vs,
            &[
                ("k", Hidden::Backup(vec![kept])),
                ("x", Hidden::Backup(vec![other])),
                ("odd", Hidden::Unreadable("no".into())),
            ],
            &live,
            &policy(Some(1), None, 10),
        );
        assert!(p.remove.is_empty() && p.remove_last.is_empty() && p.markers.is_empty(), "{p:?}");
        let why: BTreeMap<&str, &str> = p.hidden_backups_kept.iter().map(|(f, w)| (f.as_str(), w.as_str())).collect();
        assert!(why["k"].contains("keep mark"), "{why:?}");
        assert!(why["x"].contains("newest"), "{why:?}");
        assert_eq!(why["odd"], "no");
        // A manifest naming another backup is not believed.
        let p = run(&vs, &[("x", Hidden::Backup(vec![facts("b6", 1, "S")]))], &live, &policy(Some(1), None, 10));
        assert!(p.remove_last.is_empty(), "{p:?}");
        // Every manifest version must be one the policy deletes: an old one it deletes and
        // a newer one (written by someone else) that it keeps keeps the folder.
        let newer = facts("x", 9, "S");
        let p = run(&vs, &[("x", Hidden::Backup(vec![facts("x", 1, "S"), newer]))], &live, &policy(Some(1), None, 10));
        assert!(p.remove_last.is_empty() && p.remove.is_empty(), "{p:?}");
        // A folder that never had a manifest (a backup cut short) goes, and holds no WAL.
        let p = run(&vs, &[("odd", Hidden::NeverABackup)], &live, &policy(Some(1), None, 10));
        assert!(p.remove.iter().any(|(k, _)| k.contains("/odd/")) && p.hidden_backups_kept.is_empty(), "{p:?}");
    }

    #[test]
    fn live_folders_and_keys_whose_newest_version_is_data_are_never_touched() {
        // Deleted then written again (newest is data): its old versions stay.
        let mut vs = vec![
            v("c/wal_archive/000000010000000000000001.zst", "3", true, false, 3),
            v("c/wal_archive/000000010000000000000001.zst", "2", false, true, 2),
            v("c/wal_archive/000000010000000000000001.zst", "1", false, false, 1),
        ];
        // A folder with a current object (a kill -9 mid-delete, or a running backup).
        vs.extend(gone("c/backup/half/base.tar.zst", 1));
        vs.push(v("c/backup/half/pg_wal.tar.zst", "h", true, false, 1));
        let live_names: BTreeSet<String> = ["half".to_owned()].into();
        assert!(hidden_folders(&vs, &layout(), &live_names).is_empty());
        let p = run(&vs, &[], &[facts("b9", 9, "S")], &policy(Some(1), None, 10));
        assert_eq!(p, OldVersionsPlan::default());
    }

    #[test]
    fn flat_layouts_see_only_backup_folders() {
        let flat = Layout::new(None, None).unwrap();
        let mut vs = Vec::new();
        vs.extend(gone("old/manifest.json", 1));
        vs.extend(gone("c2/backup/y/manifest.json", 1));
        vs.extend(gone("wal_archive/000000010000000000000001.zst", 1));
        vs.extend(gone(".key", 1));
        let h = hidden_folders(&vs, &flat, &BTreeSet::new());
        // "c2" (another cluster's tree) is no backup folder: not even looked at.
        let names: Vec<&str> = h.keys().map(String::as_str).collect();
        assert_eq!(names, ["old"]);
        assert_eq!(h["old"].len(), 1);
    }
}
