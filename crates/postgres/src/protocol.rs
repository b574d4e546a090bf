//! Pure functions for the base-backup protocol: the `BASE_BACKUP` command in both
//! grammars, the PostgreSQL 15+ CopyData sub-messages, `backup_label`, and finding a file
//! at the start of a tar stream. No I/O here, so all of it is unit-tested.

use crate::lsn::Lsn;

/// First version with the parenthesised grammar and one CopyOut with sub-messages.
pub const PG15: u32 = 150000;

#[derive(Debug, Clone)]
pub struct BaseBackupOptions {
    pub label: String,
    pub fast_checkpoint: bool,
    /// Include the WAL needed to make the backup consistent.
    pub wal: bool,
    /// Ask for the server's `backup_manifest` (PostgreSQL 13+).
    pub manifest: bool,
    pub tablespace_map: bool,
    pub progress: bool,
    /// kB/s, 32..=1048576.
    pub max_rate_kb: Option<u32>,
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

pub fn base_backup_command(o: &BaseBackupOptions, version_num: u32) -> String {
    if version_num >= PG15 {
        let mut opts = vec![format!("LABEL {}", quote(&o.label))];
        if o.progress {
            opts.push("PROGRESS".into());
        }
        opts.push(format!("CHECKPOINT '{}'", if o.fast_checkpoint { "fast" } else { "spread" }));
        if o.wal {
            opts.push("WAL".into());
            // The WAL is inside the backup: never hang on a slow or broken archive_command.
            opts.push("WAIT false".into());
        }
        if o.manifest {
            opts.push("MANIFEST 'yes'".into());
            opts.push("MANIFEST_CHECKSUMS 'CRC32C'".into());
        }
        if o.tablespace_map {
            opts.push("TABLESPACE_MAP".into());
        }
        if let Some(r) = o.max_rate_kb {
            opts.push(format!("MAX_RATE {r}"));
        }
        format!("BASE_BACKUP ({})", opts.join(", "))
    } else {
        let mut s = format!("BASE_BACKUP LABEL {}", quote(&o.label));
        if o.progress {
            s.push_str(" PROGRESS");
        }
        if o.fast_checkpoint {
            s.push_str(" FAST");
        }
        if o.wal {
            s.push_str(" WAL NOWAIT");
        }
        if let Some(r) = o.max_rate_kb {
            s.push_str(&format!(" MAX_RATE {r}"));
        }
        if o.tablespace_map {
            s.push_str(" TABLESPACE_MAP");
        }
        if o.manifest && version_num >= 130000 {
            s.push_str(" MANIFEST 'yes' MANIFEST_CHECKSUMS 'CRC32C'");
        }
        s
    }
}

/// One CopyData message of a PostgreSQL 15+ base backup.
#[derive(Debug, PartialEq, Eq)]
pub enum CopyEvent<'a> {
    NewArchive { name: String, location: String },
    Data(&'a [u8]),
    Progress(u64),
    Manifest,
}

pub fn parse_copy_event(msg: &[u8]) -> Result<CopyEvent<'_>, String> {
    let (&kind, rest) = msg.split_first().ok_or("empty CopyData message")?;
    match kind {
        b'n' => {
            let mut parts = rest.split(|b| *b == 0);
            let name = parts.next().ok_or("archive message without a name")?;
            let location = parts.next().ok_or("archive message without a location")?;
            Ok(CopyEvent::NewArchive {
                name: String::from_utf8_lossy(name).into_owned(),
                location: String::from_utf8_lossy(location).into_owned(),
            })
        }
        b'd' => Ok(CopyEvent::Data(rest)),
        b'p' => {
            let b: [u8; 8] = rest.get(..8).and_then(|s| s.try_into().ok()).ok_or("short progress message")?;
            Ok(CopyEvent::Progress(u64::from_be_bytes(b)))
        }
        b'm' => Ok(CopyEvent::Manifest),
        other => Err(format!("unknown base backup message type {:?}", other as char)),
    }
}

/// What `backup_label` says. Fields a version does not write stay empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackupLabel {
    pub start_lsn: Lsn,
    pub start_wal_file: String,
    pub checkpoint_lsn: Lsn,
    pub start_time: String,
    pub label: String,
    pub start_timeline: u32,
}

pub fn parse_backup_label(text: &str) -> Result<BackupLabel, String> {
    let mut l = BackupLabel::default();
    let mut have_start = false;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(": ") else {
            continue;
        };
        match key {
            "START WAL LOCATION" => {
                // "0/2000028 (file 000000010000000000000002)"
                let mut it = value.split_whitespace();
                l.start_lsn = it.next().unwrap_or("").parse()?;
                l.start_wal_file =
                    value.split("(file ").nth(1).map(|s| s.trim_end_matches(')').to_owned()).unwrap_or_default();
                have_start = true;
            }
            "CHECKPOINT LOCATION" => l.checkpoint_lsn = value.trim().parse()?,
            "START TIME" => l.start_time = value.trim().to_owned(),
            "LABEL" => l.label = value.to_owned(),
            "START TIMELINE" => l.start_timeline = value.trim().parse().map_err(|_| "bad START TIMELINE")?,
            _ => {}
        }
    }
    if !have_start {
        return Err("backup_label has no START WAL LOCATION".into());
    }
    if l.start_timeline == 0 && l.start_wal_file.len() >= 8 {
        l.start_timeline = u32::from_str_radix(&l.start_wal_file[..8], 16).unwrap_or(0);
    }
    Ok(l)
}

/// Looks for `name` among the entries that start within `prefix` (the first bytes of a tar
/// stream). `None` when it is not there or not complete within `prefix`.
pub fn tar_find_file(prefix: &[u8], name: &str) -> Option<Vec<u8>> {
    let mut off = 0usize;
    while off + 512 <= prefix.len() {
        let h = &prefix[off..off + 512];
        if h.iter().all(|b| *b == 0) {
            return None;
        }
        let cstr = |b: &[u8]| String::from_utf8_lossy(b.split(|c| *c == 0).next().unwrap_or(b)).into_owned();
        let mut entry = cstr(&h[0..100]);
        if &h[257..262] == b"ustar" {
            let pre = cstr(&h[345..500]);
            if !pre.is_empty() {
                entry = format!("{pre}/{entry}");
            }
        }
        let size_field = cstr(&h[124..136]);
        let size = u64::from_str_radix(size_field.trim(), 8).ok()? as usize;
        let start = off + 512;
        if entry.trim_start_matches("./") == name && h[156] != b'5' {
            return prefix.get(start..start + size).map(<[u8]>::to_vec);
        }
        off = start + size.div_ceil(512) * 512;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> BaseBackupOptions {
        BaseBackupOptions {
            label: "it's".into(),
            fast_checkpoint: true,
            wal: true,
            manifest: true,
            tablespace_map: true,
            progress: true,
            max_rate_kb: Some(1024),
        }
    }

    #[test]
    fn both_grammars() {
        assert_eq!(
            base_backup_command(&opts(), 170002),
            "BASE_BACKUP (LABEL 'it''s', PROGRESS, CHECKPOINT 'fast', WAL, WAIT false, MANIFEST 'yes', MANIFEST_CHECKSUMS 'CRC32C', TABLESPACE_MAP, MAX_RATE 1024)"
        );
        assert_eq!(
            base_backup_command(&opts(), 140005),
            "BASE_BACKUP LABEL 'it''s' PROGRESS FAST WAL NOWAIT MAX_RATE 1024 TABLESPACE_MAP MANIFEST 'yes' MANIFEST_CHECKSUMS 'CRC32C'"
        );
        let mut o = opts();
        o.fast_checkpoint = false;
        assert!(!base_backup_command(&o, 120000).contains("MANIFEST"));
        assert!(base_backup_command(&o, 150000).contains("CHECKPOINT 'spread'"));
    }

    #[test]
    fn copy_events() {
        assert_eq!(
            parse_copy_event(b"nbase.tar\0\0").unwrap(),
            CopyEvent::NewArchive { name: "base.tar".into(), location: "".into() }
        );
        assert_eq!(parse_copy_event(b"dabc").unwrap(), CopyEvent::Data(b"abc"));
        let mut p = vec![b'p'];
        p.extend_from_slice(&4096u64.to_be_bytes());
        assert_eq!(parse_copy_event(&p).unwrap(), CopyEvent::Progress(4096));
        assert_eq!(parse_copy_event(b"m").unwrap(), CopyEvent::Manifest);
        assert!(parse_copy_event(b"z").is_err());
        assert!(parse_copy_event(b"").is_err());
    }

    #[test]
    fn backup_label_both_lsn_formats() {
        let text = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\nSTART TIME: 2026-03-22 02:00:00 UTC\nLABEL: cloud-dump prod\nSTART TIMELINE: 1\n";
        let l = parse_backup_label(text).unwrap();
        assert_eq!(l.start_lsn.to_string(), "0/2000028");
        assert_eq!(l.checkpoint_lsn.to_string(), "0/2000060");
        assert_eq!(l.start_wal_file, "000000010000000000000002");
        assert_eq!((l.label.as_str(), l.start_timeline), ("cloud-dump prod", 1));
        let padded = text.replace("0/2000028", "0/02000028");
        assert_eq!(parse_backup_label(&padded).unwrap().start_lsn, l.start_lsn);
        assert!(parse_backup_label("LABEL: x\n").is_err());
    }

    #[test]
    fn finds_backup_label_in_a_tar_prefix() {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |name: &str, data: &[u8]| {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        };
        add("PG_VERSION", b"17\n");
        add("backup_label", b"START WAL LOCATION: 0/1 (file x)\n");
        let bytes = b.into_inner().unwrap();
        assert_eq!(tar_find_file(&bytes, "backup_label").unwrap(), b"START WAL LOCATION: 0/1 (file x)\n");
        assert!(tar_find_file(&bytes, "nope").is_none());
        assert!(tar_find_file(&bytes[..700], "backup_label").is_none());
    }
}
