//! Unpacking a tar stream into a directory. The property: whatever the archive holds, no
//! entry creates, modifies, links or chmods anything outside the target.
//!
//! How it holds: every path is resolved against what is on disk with no-follow semantics
//! (`symlink_metadata` for each component; a component that is a symbolic link or a file
//! refuses the entry), every file, link and directory is created new (`O_CREAT|O_EXCL`
//! never follows a link), each path appears once, and the links an archive may create can
//! only point downwards (no `..`, no absolute target except a `pg_tblspc/<oid>` link to a
//! mapped tablespace), so even PostgreSQL following them later stays inside the targets.
//! Hard links, devices and FIFOs are refused: a PostgreSQL base backup has none.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::progress::Progress;

pub struct ExtractTarget<'a> {
    pub root: &'a Path,
    /// `pg_tblspc/<oid>` links may point at these (source location → restore location).
    pub tablespaces: &'a HashMap<String, PathBuf>,
    /// The archive's object key, for error messages.
    pub archive: &'a str,
    pub progress: &'a dyn Progress,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct ExtractStats {
    pub files: u64,
    pub bytes: u64,
}

/// A relative path made only of normal components, or the reason it is not one.
fn safe_relative(p: &Path) -> std::result::Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err("it climbs out with '..'"),
            Component::RootDir | Component::Prefix(_) => return Err("it is an absolute path"),
        }
    }
    Ok(out)
}

/// What an archive put at a path (each path may appear once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placed {
    Dir,
    File,
    Link,
}

/// Makes sure `root/rel` is a real directory, creating missing components (mode 0700),
/// without following any link: a component that exists and is not a directory (a symbolic
/// link, a file) is refused. `root` itself is the operator's and may be a link.
pub fn ensure_dir_nofollow(root: &Path, rel: &Path) -> std::result::Result<(), String> {
    let mut at = root.to_path_buf();
    for c in rel.components() {
        let Component::Normal(n) = c else { return Err(format!("{} is not a plain relative path", rel.display())) };
        at.push(n);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!("{} is a symbolic link; nothing is written through links", at.display()))
            }
            Ok(_) => return Err(format!("{} exists and is not a directory", at.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&at)
                    .map_err(|e| format!("cannot create {}: {e}", at.display()))?;
            }
            Err(e) => return Err(format!("cannot inspect {}: {e}", at.display())),
        }
    }
    Ok(())
}

/// PostgreSQL's control file: without it a data directory does not start.
pub const CONTROL_FILE: &str = "global/pg_control";
const HELD_BACK_SUFFIX: &str = ".cloud-dump-restoring";

fn held_back(control: &Path) -> PathBuf {
    let mut name = control.as_os_str().to_owned();
    name.push(HELD_BACK_SUFFIX);
    PathBuf::from(name)
}

/// Puts the control file a restore held back in place (fsync of the file and of global/):
/// the last step of a restore, after its recovery settings are durable.
pub fn release_control_file(pgdata: &Path) -> Result<()> {
    let control = pgdata.join(CONTROL_FILE);
    let held = held_back(&control);
    let err = |e: io::Error| Error::Restore(format!("cannot put {} in place: {e}", control.display()));
    fs::File::open(&held).and_then(|f| f.sync_all()).map_err(err)?;
    fs::rename(&held, &control).map_err(err)?;
    fs::File::open(pgdata.join("global")).and_then(|d| d.sync_all()).map_err(err)
}

/// File writes handed from the decoding thread to the writing thread, in archive order.
enum WriteOp {
    Open(PathBuf, u32),
    Data(Vec<u8>),
}

/// Unpacks `reader` into `t.root`. Decoding and tar parsing run on the calling thread;
/// file contents are written by a second thread, so decompression and disk writes overlap.
pub fn extract(reader: &mut dyn Read, t: &ExtractTarget<'_>) -> Result<ExtractStats> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<WriteOp>(16);
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || write_files(rx, t.progress));
        let parsed = parse_entries(reader, t, &tx);
        drop(tx);
        let written = writer.join().unwrap_or_else(|_| Err(Error::Restore("the file writer panicked".into())));
        match (parsed, written) {
            (Ok(mut stats), Ok(bytes)) => {
                stats.bytes = bytes;
                Ok(stats)
            }
            // A failed write stops the parser (its channel closes): report the write error.
            (Err(_), Err(w)) | (Ok(_), Err(w)) => Err(w),
            (Err(p), Ok(_)) => Err(p),
        }
    })
}

fn write_files(rx: std::sync::mpsc::Receiver<WriteOp>, progress: &dyn Progress) -> Result<u64> {
    let io_err = |what: &Path, e: io::Error| Error::Restore(format!("writing {}: {e}", what.display()));
    let mut current: Option<(PathBuf, fs::File)> = None;
    let mut bytes = 0u64;
    for op in rx {
        match op {
            WriteOp::Open(path, mode) => {
                // create_new is O_CREAT|O_EXCL: it never follows a link and never reuses a file.
                let f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(&path)
                    .map_err(|e| io_err(&path, e))?;
                current = Some((path, f));
            }
            WriteOp::Data(d) => {
                let (path, f) = current.as_mut().ok_or_else(|| Error::Restore("data before a file".into()))?;
                f.write_all(&d).map_err(|e| io_err(path, e))?;
                bytes += d.len() as u64;
                progress.advance(d.len() as u64);
            }
        }
    }
    Ok(bytes)
}

fn parse_entries(
    reader: &mut dyn Read,
    t: &ExtractTarget<'_>,
    tx: &std::sync::mpsc::SyncSender<WriteOp>,
) -> Result<ExtractStats> {
    let stopped = || Error::Restore("the file writer stopped".into());
    let io_err = |what: &Path, e: io::Error| Error::Restore(format!("writing {}: {e}", what.display()));
    let mut archive = tar::Archive::new(reader);
    let mut stats = ExtractStats::default();
    let mut placed: HashMap<PathBuf, Placed> = HashMap::new();
    let entries = archive.entries().map_err(|e| Error::Restore(format!("{}: not a tar archive: {e}", t.archive)))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| Error::Restore(format!("{}: damaged tar stream: {e}", t.archive)))?;
        let raw_path =
            entry.path().map_err(|e| Error::Restore(format!("{}: bad entry name: {e}", t.archive)))?.into_owned();
        let refuse = |reason: String| Error::UnsafeEntry {
            archive: t.archive.to_owned(),
            entry: raw_path.display().to_string(),
            reason,
        };
        let kind = entry.header().entry_type();
        if matches!(kind, tar::EntryType::XGlobalHeader | tar::EntryType::XHeader) {
            continue;
        }
        let rel = safe_relative(&raw_path).map_err(|r| refuse(r.into()))?;
        if rel.as_os_str().is_empty() {
            if kind == tar::EntryType::Directory {
                continue;
            }
            return Err(refuse("it names the target itself".into()));
        }
        if let Err(why) = pg_wal_rule(&rel, kind) {
            return Err(refuse(why));
        }
        if placed.contains_key(&rel) {
            return Err(refuse("the path appears twice in the archive".into()));
        }
        if let Some(a) = rel.ancestors().skip(1).find(|a| matches!(placed.get(*a), Some(Placed::File | Placed::Link))) {
            return Err(refuse(format!(
                "it would be written through {}, which this archive made a file or link",
                a.display()
            )));
        }
        let parent = rel.parent().unwrap_or(Path::new(""));
        ensure_dir_nofollow(t.root, parent).map_err(refuse)?;
        let dest = t.root.join(&rel);
        // Modes as PostgreSQL uses them: never setuid/setgid/sticky, never writable by others.
        let mode = entry.header().mode().unwrap_or(0o600) & 0o750;
        match kind {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&dest) {
                    Ok(m) if m.file_type().is_dir() => {}
                    Ok(_) => return Err(refuse("it exists and is not a directory".into())),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        fs::DirBuilder::new().mode(0o700).create(&dest).map_err(|e| io_err(&dest, e))?
                    }
                    Err(e) => return Err(io_err(&dest, e)),
                }
                // A real directory (checked above without following links).
                fs::set_permissions(&dest, fs::Permissions::from_mode(mode | 0o700)).map_err(|e| io_err(&dest, e))?;
                placed.insert(rel, Placed::Dir);
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if fs::symlink_metadata(&dest).is_ok() {
                    return Err(refuse("something already exists at this path".into()));
                }
                // The control file is written under another name until the restore has
                // finished (release_control_file): a restore cut short never starts.
                let to = if rel == Path::new(CONTROL_FILE) { held_back(&dest) } else { dest.clone() };
                tx.send(WriteOp::Open(to, mode | 0o600)).map_err(|_| stopped())?;
                loop {
                    let mut chunk = vec![0u8; 1 << 20];
                    let n = read_full(&mut entry, &mut chunk)
                        .map_err(|e| Error::Restore(format!("{}: reading {}: {e}", t.archive, rel.display())))?;
                    if n == 0 {
                        break;
                    }
                    chunk.truncate(n);
                    tx.send(WriteOp::Data(chunk)).map_err(|_| stopped())?;
                }
                stats.files += 1;
                placed.insert(rel, Placed::File);
            }
            tar::EntryType::Symlink => {
                let target = link_name(&entry, t)?;
                let target = link_target(&rel, &target, t).map_err(refuse)?;
                // symlink(2) fails on an existing path: it never replaces anything.
                std::os::unix::fs::symlink(&target, &dest).map_err(|e| io_err(&dest, e))?;
                placed.insert(rel, Placed::Link);
            }
            tar::EntryType::Link => {
                return Err(refuse("hard links are not restored (a PostgreSQL base backup has none)".into()))
            }
            other => return Err(refuse(format!("entries of type {other:?} are not restored"))),
        }
    }
    Ok(stats)
}

/// What a base backup may hold under `pg_wal/`: the directory itself, WAL and timeline
/// files, `archive_status/*.done|.ready` and `summaries/` (PostgreSQL 17) — no links, no
/// other names. cloud-dump keeps its own state in `pg_wal/.cloud-dump` (restore settings,
/// prefetched WAL, key proofs), so an archive must never be able to plant anything there;
/// nor anywhere else under a `.cloud-dump` name.
fn pg_wal_rule(rel: &Path, kind: tar::EntryType) -> std::result::Result<(), String> {
    let parts: Vec<&str> = rel.components().filter_map(|c| c.as_os_str().to_str()).collect();
    if rel.components().any(|c| c.as_os_str() == ".cloud-dump") {
        return Err("cloud-dump's own state folder may not come from an archive".into());
    }
    if parts.first() != Some(&"pg_wal") {
        return Ok(());
    }
    let dir = kind == tar::EntryType::Directory;
    let file = matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous);
    let wal_name = |n: &str| {
        let (stem, rest) = n.split_once('.').unwrap_or((n, ""));
        stem.len() >= 8 && stem.bytes().all(|b| b.is_ascii_hexdigit()) && matches!(rest, "" | "history" | "partial")
            || (rest.ends_with(".backup") && stem.len() == 24)
    };
    let ok = match parts.as_slice() {
        ["pg_wal"] => dir,
        ["pg_wal", "archive_status" | "summaries"] => dir,
        ["pg_wal", n] => file && wal_name(n),
        ["pg_wal", "archive_status", n] => file && (n.ends_with(".done") || n.ends_with(".ready")),
        ["pg_wal", "summaries", n] => file && n.ends_with(".summary"),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err("a base backup holds only WAL files, archive_status and summaries in pg_wal".into())
    }
}

fn link_name<R: Read>(entry: &tar::Entry<'_, R>, t: &ExtractTarget<'_>) -> Result<PathBuf> {
    Ok(entry
        .link_name()
        .map_err(|e| Error::Restore(format!("{}: bad link: {e}", t.archive)))?
        .ok_or_else(|| Error::Restore(format!("{}: link without a target", t.archive)))?
        .into_owned())
}

/// Fills `buf` as far as the reader allows (tar entries hand out short reads).
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The links a restore creates: `pg_tblspc/<oid>` pointing at a known tablespace (mapped
/// to its restore location), or a relative link that only goes down (no `..`), so that
/// whatever other links exist, following it never leaves the targets.
fn link_target(rel: &Path, target: &Path, t: &ExtractTarget<'_>) -> std::result::Result<PathBuf, String> {
    if target.is_absolute() {
        let in_tblspc = rel.parent() == Some(Path::new("pg_tblspc"))
            && rel.file_name().is_some_and(|n| n.to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())));
        return match t.tablespaces.get(&target.to_string_lossy().into_owned()) {
            Some(mapped) if in_tblspc => Ok(mapped.clone()),
            _ => Err(format!("its link points out of the target, to {}", target.display())),
        };
    }
    let mut normal = 0;
    for c in target.components() {
        match c {
            Component::Normal(_) => normal += 1,
            Component::CurDir => {}
            _ => return Err(format!("its link {} points out of the target ('..')", target.display())),
        }
    }
    if normal == 0 {
        return Err(format!("its link {:?} points at its own directory", target.display().to_string()));
    }
    Ok(target.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;

    fn tar_with(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o600);
        h.set_entry_type(tar::EntryType::Regular);
        // Write the raw name so the builder does not clean it for us.
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn link(b: &mut tar::Builder<Vec<u8>>, name: &str, target: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o777);
        h.set_entry_type(tar::EntryType::Symlink);
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_gnu_mut().unwrap().linkname[..target.len()].copy_from_slice(target.as_bytes());
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
    }

    fn run(bytes: &[u8], maps: &HashMap<String, PathBuf>) -> (tempfile::TempDir, Result<ExtractStats>) {
        let dir = tempfile::tempdir().unwrap();
        let t = ExtractTarget { root: dir.path(), tablespaces: maps, archive: "base.tar", progress: &NoProgress };
        let r = extract(&mut &bytes[..], &t);
        (dir, r)
    }

    #[test]
    fn extracts_files_and_modes() {
        let bytes = tar_with(|b| {
            file(b, "PG_VERSION", b"17\n");
            file(b, "base/1/1259", &[1u8; 10_000]);
        });
        let (dir, r) = run(&bytes, &HashMap::new());
        let s = r.unwrap();
        assert_eq!((s.files, s.bytes), (2, 10_003));
        assert_eq!(fs::read(dir.path().join("PG_VERSION")).unwrap(), b"17\n");
        let mode = fs::metadata(dir.path().join("base/1/1259")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    fn entry(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, name: &str, link: &str, mode: u32, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_entry_type(kind);
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_gnu_mut().unwrap().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn pax_path(b: &mut tar::Builder<Vec<u8>>, path: &str) {
        let rec = format!("path={path}\n");
        let mut len = rec.len() + 3;
        if format!("{len} {rec}").len() != len {
            len += 1;
        }
        let body = format!("{len} {rec}");
        entry(b, tar::EntryType::XHeader, "PaxHeader", "", 0o644, body.as_bytes());
    }

    /// Every path below `dir` with its kind, mode, link target and content.
    fn snapshot(dir: &Path, skip: &Path, out: &mut Vec<String>) {
        let mut names: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        names.sort();
        for p in names {
            if p == skip {
                continue;
            }
            let m = fs::symlink_metadata(&p).unwrap();
            let detail = if m.file_type().is_symlink() {
                format!("-> {}", fs::read_link(&p).unwrap().display())
            } else if m.is_file() {
                format!("{:?}", fs::read(&p).unwrap())
            } else {
                String::new()
            };
            out.push(format!("{} {:o} {detail}", p.display(), m.permissions().mode()));
            if m.is_dir() {
                snapshot(&p, skip, out);
            }
        }
    }

    /// The malicious-archive corpus: each archive is refused, and nothing outside the
    /// target (its parent, a sibling folder with a file, the parent's mode) changes.
    #[test]
    fn malicious_archives_are_refused_and_change_nothing_outside() {
        use tar::EntryType::*;
        type Build = Box<dyn Fn(&mut tar::Builder<Vec<u8>>)>;
        let corpus: Vec<(&str, Build)> = vec![
            (
                "link chain climbing out",
                Box::new(|b| {
                    entry(b, Symlink, "a/up", "..", 0o777, b"");
                    entry(b, Symlink, "a/esc", "up/../pwned", 0o777, b"");
                    entry(b, Regular, "a/esc", "", 0o600, b"x");
                }),
            ),
            (
                "directory entry at a link (chmod through it)",
                Box::new(|b| {
                    entry(b, Symlink, "up", "..", 0o777, b"");
                    entry(b, Directory, "up", "", 0o777, b"");
                }),
            ),
            (
                "link to . then a write below it",
                Box::new(|b| {
                    entry(b, Symlink, "self", ".", 0o777, b"");
                    entry(b, Regular, "self/x", "", 0o600, b"x");
                }),
            ),
            (
                "down-only link then a write through it",
                Box::new(|b| {
                    entry(b, Directory, "d", "", 0o700, b"");
                    entry(b, Symlink, "l", "d", 0o777, b"");
                    entry(b, Regular, "l/x", "", 0o600, b"x");
                }),
            ),
            ("hard link out", Box::new(|b| entry(b, Link, "h", "../outside/canary", 0o600, b""))),
            (
                "hard link through a link",
                Box::new(|b| {
                    entry(b, Symlink, "u", "..", 0o777, b"");
                    entry(b, Link, "h", "u/outside/canary", 0o600, b"");
                }),
            ),
            (
                "hard link inside",
                Box::new(|b| {
                    entry(b, Regular, "f", "", 0o600, b"x");
                    entry(b, Link, "h", "f", 0o600, b"");
                }),
            ),
            (
                "repeated file",
                Box::new(|b| {
                    entry(b, Regular, "f", "", 0o600, b"x");
                    entry(b, Regular, "f", "", 0o600, b"y");
                }),
            ),
            (
                "file then a link at the same path",
                Box::new(|b| {
                    entry(b, Regular, "f", "", 0o600, b"x");
                    entry(b, Symlink, "f", "g", 0o777, b"");
                }),
            ),
            (
                "link then a file at the same path",
                Box::new(|b| {
                    entry(b, Symlink, "f", "g", 0o777, b"");
                    entry(b, Regular, "f", "", 0o600, b"y");
                }),
            ),
            (
                "file then a directory at the same path",
                Box::new(|b| {
                    entry(b, Regular, "f", "", 0o600, b"x");
                    entry(b, Directory, "f", "", 0o700, b"");
                }),
            ),
            (
                "file used as a parent",
                Box::new(|b| {
                    entry(b, Regular, "f", "", 0o600, b"x");
                    entry(b, Regular, "f/g", "", 0o600, b"x");
                }),
            ),
            ("FIFO", Box::new(|b| entry(b, Fifo, "fifo", "", 0o600, b""))),
            ("character device", Box::new(|b| entry(b, Char, "null", "", 0o600, b""))),
            ("block device", Box::new(|b| entry(b, Block, "sda", "", 0o600, b""))),
            (
                "PAX name with ..",
                Box::new(|b| {
                    pax_path(b, "../outside/canary");
                    entry(b, Regular, "innocent", "", 0o600, b"x");
                }),
            ),
            (
                "PAX absolute name",
                Box::new(|b| {
                    pax_path(b, "/tmp/cloud-dump-pwned");
                    entry(b, Regular, "innocent", "", 0o600, b"x");
                }),
            ),
            (
                "GNU long name with ..",
                Box::new(|b| {
                    let long = format!("{}/../../outside/canary\0", "d".repeat(120));
                    entry(b, GNULongName, "././@LongLink", "", 0o644, long.as_bytes());
                    entry(b, Regular, "innocent", "", 0o600, b"x");
                }),
            ),
            ("absolute file", Box::new(|b| entry(b, Regular, "/tmp/cloud-dump-pwned", "", 0o600, b"x"))),
            ("dot-dot file", Box::new(|b| entry(b, Regular, "../outside/canary", "", 0o600, b"x"))),
            ("dot-dot directory", Box::new(|b| entry(b, Directory, "..", "", 0o777, b""))),
            ("absolute link", Box::new(|b| entry(b, Symlink, "pg_wal", "/etc", 0o777, b""))),
            ("unmapped tablespace link", Box::new(|b| entry(b, Symlink, "pg_tblspc/16384", "/srv/ts1", 0o777, b""))),
            (
                "mapped tablespace path linked outside pg_tblspc",
                Box::new(|b| entry(b, Symlink, "x", "/srv/mapped", 0o777, b"")),
            ),
            (
                "relative link with .. deep inside",
                Box::new(|b| entry(b, Symlink, "a/b/c", "../../../outside", 0o777, b"")),
            ),
            ("relative link with a harmless-looking ..", Box::new(|b| entry(b, Symlink, "a/b/c", "../d", 0o777, b""))),
            ("write through a link that was on disk", Box::new(|b| entry(b, Regular, "planted/x", "", 0o600, b"x"))),
            (
                "planted restore settings",
                Box::new(|b| {
                    entry(b, Directory, "pg_wal", "", 0o700, b"");
                    entry(b, Regular, "pg_wal/.cloud-dump/restore.conf", "", 0o600, b"CLOUD_DUMP_REPO=file:///evil\n");
                }),
            ),
            (
                "planted prefetched WAL",
                Box::new(|b| {
                    entry(b, Regular, "pg_wal/.cloud-dump/prefetch/000000010000000000000005", "", 0o600, b"x");
                }),
            ),
            (
                "pg_wal state folder as a link",
                Box::new(|b| {
                    entry(b, Directory, "pg_wal/archive_status", "", 0o700, b"");
                    entry(b, Symlink, "pg_wal/.cloud-dump", "archive_status", 0o777, b"");
                }),
            ),
            (
                "pg_wal itself a link",
                Box::new(|b| {
                    entry(b, Directory, "base", "", 0o700, b"");
                    entry(b, Symlink, "pg_wal", "base", 0o777, b"");
                }),
            ),
            ("a key-proof marker elsewhere", Box::new(|b| entry(b, Regular, "base/.cloud-dump/x", "", 0o600, b"x"))),
            ("other files in pg_wal", Box::new(|b| entry(b, Regular, "pg_wal/notes.txt", "", 0o600, b"x"))),
            ("directory at a link that was on disk", Box::new(|b| entry(b, Directory, "planted", "", 0o777, b""))),
        ];
        let mut maps = HashMap::new();
        maps.insert("/srv/mapped".to_owned(), PathBuf::from("/restore/mapped"));
        for (what, build) in corpus {
            let outer = tempfile::tempdir().unwrap();
            fs::set_permissions(outer.path(), fs::Permissions::from_mode(0o755)).unwrap();
            let outside = outer.path().join("outside");
            fs::create_dir(&outside).unwrap();
            fs::write(outside.join("canary"), b"canary").unwrap();
            let root = outer.path().join("root");
            fs::create_dir(&root).unwrap();
            std::os::unix::fs::symlink(&outside, root.join("planted")).unwrap();
            let mut before = vec![format!("{:o}", fs::metadata(outer.path()).unwrap().permissions().mode())];
            snapshot(outer.path(), &root, &mut before);
            let bytes = tar_with(|b| build(b));
            let t = ExtractTarget { root: &root, tablespaces: &maps, archive: "base.tar", progress: &NoProgress };
            let r = extract(&mut &bytes[..], &t);
            let mut after = vec![format!("{:o}", fs::metadata(outer.path()).unwrap().permissions().mode())];
            snapshot(outer.path(), &root, &mut after);
            assert_eq!(before, after, "{what}: something outside the target changed");
            assert!(!Path::new("/tmp/cloud-dump-pwned").exists(), "{what}");
            let err = r.expect_err(what);
            assert!(matches!(err, Error::UnsafeEntry { .. }), "{what}: {err}");
            assert!(!err.to_string().contains('\n'), "{what}: one line");
        }
    }

    #[test]
    fn refuses_escapes() {
        let outside = |b: &mut tar::Builder<Vec<u8>>| file(b, "../evil", b"x");
        let (_, r) = run(&tar_with(outside), &HashMap::new());
        assert!(matches!(r, Err(Error::UnsafeEntry { .. })), "{r:?}");
        let absolute = |b: &mut tar::Builder<Vec<u8>>| file(b, "/tmp/evil", b"x");
        let (_, r) = run(&tar_with(absolute), &HashMap::new());
        assert!(r.unwrap_err().to_string().contains("absolute"));
        let link_out = |b: &mut tar::Builder<Vec<u8>>| link(b, "x", "/etc");
        let (_, r) = run(&tar_with(link_out), &HashMap::new());
        assert!(r.unwrap_err().to_string().contains("points out"));
        let through = |b: &mut tar::Builder<Vec<u8>>| {
            link(b, "l", "d");
            file(b, "l/x", b"x");
        };
        let (_, r) = run(&tar_with(through), &HashMap::new());
        assert!(r.unwrap_err().to_string().contains("made a file or link"));
    }

    #[test]
    fn pg_wal_as_base_backups_have_it() {
        let bytes = tar_with(|b| {
            entry(b, tar::EntryType::Directory, "pg_wal", "", 0o700, b"");
            entry(b, tar::EntryType::Directory, "pg_wal/archive_status", "", 0o700, b"");
            entry(b, tar::EntryType::Regular, "pg_wal/000000010000000000000002", "", 0o600, b"w");
            entry(b, tar::EntryType::Regular, "pg_wal/00000002.history", "", 0o600, b"h");
            entry(b, tar::EntryType::Regular, "pg_wal/archive_status/000000010000000000000002.done", "", 0o600, b"");
            entry(b, tar::EntryType::Directory, "pg_wal/summaries", "", 0o700, b"");
        });
        let (_, r) = run(&bytes, &HashMap::new());
        r.unwrap();
    }

    #[test]
    fn harmless_links_and_modes_are_kept() {
        let bytes = tar_with(|b| {
            entry(b, tar::EntryType::Directory, "d", "", 0o4777, b"");
            entry(b, tar::EntryType::Regular, "d/f", "", 0o6777, b"x");
            entry(b, tar::EntryType::Symlink, "l", "d/f", 0o777, b"");
        });
        let (dir, r) = run(&bytes, &HashMap::new());
        r.unwrap();
        assert_eq!(fs::read_link(dir.path().join("l")).unwrap(), PathBuf::from("d/f"));
        assert_eq!(fs::metadata(dir.path().join("d/f")).unwrap().permissions().mode() & 0o7777, 0o750);
        assert_eq!(fs::metadata(dir.path().join("d")).unwrap().permissions().mode() & 0o7777, 0o750);
    }

    #[test]
    fn tablespace_links_are_mapped() {
        let bytes = tar_with(|b| link(b, "pg_tblspc/16384", "/srv/ts1"));
        let mut maps = HashMap::new();
        maps.insert("/srv/ts1".to_owned(), PathBuf::from("/restore/ts1"));
        let (dir, r) = run(&bytes, &maps);
        r.unwrap();
        assert_eq!(fs::read_link(dir.path().join("pg_tblspc/16384")).unwrap(), PathBuf::from("/restore/ts1"));
    }
}
