//! Unpacking a tar stream into a directory, refusing anything that would write outside
//! it: absolute paths, `..`, links pointing out, writes through a link, device files.

use std::collections::{HashMap, HashSet};
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
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

/// A relative path made only of normal components, or an error naming the entry.
fn safe_relative(p: &Path, t: &ExtractTarget<'_>) -> Result<PathBuf> {
    let unsafe_entry = |reason: &str| Error::UnsafeEntry {
        archive: t.archive.to_owned(),
        entry: p.display().to_string(),
        reason: reason.to_owned(),
    };
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err(unsafe_entry("it climbs out with '..'")),
            Component::RootDir | Component::Prefix(_) => return Err(unsafe_entry("it is an absolute path")),
        }
    }
    Ok(out)
}

/// File writes handed from the decoding thread to the writing thread, in archive order.
enum WriteOp {
    Open(PathBuf, u32),
    Data(Vec<u8>),
    HardLink(PathBuf, PathBuf),
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
                let f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(mode | 0o600)
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
            WriteOp::HardLink(src, dst) => {
                current = None;
                fs::hard_link(&src, &dst).map_err(|e| io_err(&dst, e))?;
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
    let mut links: HashSet<PathBuf> = HashSet::new();
    let entries = archive.entries().map_err(|e| Error::Restore(format!("{}: not a tar archive: {e}", t.archive)))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| Error::Restore(format!("{}: damaged tar stream: {e}", t.archive)))?;
        let raw_path =
            entry.path().map_err(|e| Error::Restore(format!("{}: bad entry name: {e}", t.archive)))?.into_owned();
        let rel = safe_relative(&raw_path, t)?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        // Never write through a link this archive created.
        if rel.ancestors().skip(1).any(|a| links.contains(a)) {
            return Err(Error::UnsafeEntry {
                archive: t.archive.into(),
                entry: raw_path.display().to_string(),
                reason: "it would be written through a symbolic link".into(),
            });
        }
        let dest = t.root.join(&rel);
        let mode = entry.header().mode().unwrap_or(0o600) & 0o7777;
        let kind = entry.header().entry_type();
        if let Some(parent) = dest.parent() {
            if !parent.exists() {
                fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
                fs::set_permissions(parent, fs::Permissions::from_mode(0o700)).map_err(|e| io_err(parent, e))?;
            }
        }
        match kind {
            tar::EntryType::Directory => {
                fs::create_dir_all(&dest).map_err(|e| io_err(&dest, e))?;
                fs::set_permissions(&dest, fs::Permissions::from_mode(mode | 0o700)).map_err(|e| io_err(&dest, e))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                tx.send(WriteOp::Open(dest.clone(), mode)).map_err(|_| stopped())?;
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
            }
            tar::EntryType::Symlink => {
                let target = link_name(&entry, t)?;
                let target = link_target(&rel, &target, t, &raw_path)?;
                std::os::unix::fs::symlink(&target, &dest).map_err(|e| io_err(&dest, e))?;
                links.insert(rel);
            }
            tar::EntryType::Link => {
                let target = link_name(&entry, t)?;
                let target_rel = safe_relative(&target, t)?;
                tx.send(WriteOp::HardLink(t.root.join(target_rel), dest.clone())).map_err(|_| stopped())?;
                stats.files += 1;
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
            other => {
                return Err(Error::UnsafeEntry {
                    archive: t.archive.into(),
                    entry: raw_path.display().to_string(),
                    reason: format!("entries of type {other:?} are not restored"),
                })
            }
        }
    }
    Ok(stats)
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

/// Links inside a data directory: `pg_tblspc/<oid>` pointing at a known tablespace (mapped
/// to its restore location), or a relative link that stays inside the target.
fn link_target(rel: &Path, target: &Path, t: &ExtractTarget<'_>, raw: &Path) -> Result<PathBuf> {
    let refuse =
        |reason: String| Error::UnsafeEntry { archive: t.archive.into(), entry: raw.display().to_string(), reason };
    if target.is_absolute() {
        let in_tblspc = rel.parent() == Some(Path::new("pg_tblspc"));
        return match t.tablespaces.get(&target.to_string_lossy().into_owned()) {
            Some(mapped) if in_tblspc => Ok(mapped.clone()),
            _ => Err(refuse(format!("its link points out of the target, to {}", target.display()))),
        };
    }
    let mut depth: i64 = rel.components().count() as i64 - 1;
    for c in target.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 {
            return Err(refuse(format!("its link {} points out of the target", target.display())));
        }
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

    #[test]
    fn refuses_escapes() {
        let outside = |b: &mut tar::Builder<Vec<u8>>| file(b, "../evil", b"x");
        let (_, r) = run(&tar_with(outside), &HashMap::new());
        assert!(matches!(r, Err(Error::UnsafeEntry { .. })), "{r:?}");
        let absolute = |b: &mut tar::Builder<Vec<u8>>| file(b, "/tmp/evil", b"x");
        let (_, r) = run(&tar_with(absolute), &HashMap::new());
        assert!(r.unwrap_err().to_string().contains("absolute"));
        let link_out = |b: &mut tar::Builder<Vec<u8>>| link(b, "pg_wal", "/etc");
        let (_, r) = run(&tar_with(link_out), &HashMap::new());
        assert!(r.unwrap_err().to_string().contains("points out"));
        let relative_out = |b: &mut tar::Builder<Vec<u8>>| link(b, "a/b", "../../x");
        let (_, r) = run(&tar_with(relative_out), &HashMap::new());
        assert!(r.is_err());
        let through = |b: &mut tar::Builder<Vec<u8>>| {
            link(b, "l", "d");
            file(b, "l/x", b"x");
        };
        let (_, r) = run(&tar_with(through), &HashMap::new());
        assert!(r.unwrap_err().to_string().contains("through a symbolic link"));
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
