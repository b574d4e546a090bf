//! What a WAL segment says about time: the timestamp of the last transaction commit or abort
//! it holds — the last point a `recovery_target_time` can stop at in it. Pure: walks the
//! segment's pages and record headers (PostgreSQL 10 to 18 share this layout) and reads only
//! transaction records' main data; anything it cannot read ends the walk (no timestamp is
//! made up).

/// Unix µs at PostgreSQL's epoch (2000-01-01 00:00:00 UTC).
const PG_EPOCH_UNIX_US: i64 = 946_684_800_000_000;
const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
const XLP_LONG_HEADER: u16 = 0x0002;
const SHORT_PAGE_HEADER: usize = 24;
const LONG_PAGE_HEADER: usize = 40;
const RECORD_HEADER: usize = 24;
const RM_XACT_ID: u8 = 1;
const XLOG_XACT_OPMASK: u8 = 0x70;
/// COMMIT, ABORT, COMMIT_PREPARED, ABORT_PREPARED: the records recovery stops at for a time.
const TIMED_XACT_OPS: [u8; 4] = [0x00, 0x20, 0x30, 0x40];
const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
const XLR_BLOCK_ID_ORIGIN: u8 = 253;
const XLR_BLOCK_ID_TOPLEVEL_XID: u8 = 252;

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn i64_at(b: &[u8], o: usize) -> Option<i64> {
    Some(i64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

fn align8(n: usize) -> usize {
    (n + 7) & !7
}

/// The bytes of the segment past its page headers, in order (records run across pages).
fn payload(seg: &[u8]) -> Option<(Vec<u8>, usize)> {
    if u16_at(seg, 2)? & XLP_LONG_HEADER == 0 {
        return None;
    }
    let block = u32_at(seg, 36)? as usize;
    if !block.is_power_of_two() || !(1024..=65536).contains(&block) {
        return None;
    }
    let mut out = Vec::with_capacity(seg.len());
    // The continuation of a record from the previous segment, to skip.
    let skip = if u16_at(seg, 2)? & XLP_FIRST_IS_CONTRECORD != 0 { u32_at(seg, 16)? as usize } else { 0 };
    for (i, page) in seg.chunks(block).enumerate() {
        let header = if i == 0 { LONG_PAGE_HEADER } else { SHORT_PAGE_HEADER };
        out.extend_from_slice(page.get(header..)?);
    }
    Some((out, align8(skip)))
}

/// The time (Unix µs) of the last transaction commit or abort record in `seg`, a whole WAL
/// segment; `None` when it holds none or is not a segment this can read.
pub fn last_commit_us(seg: &[u8]) -> Option<i64> {
    let (data, mut pos) = payload(seg)?;
    let mut last = None;
    while pos + RECORD_HEADER <= data.len() {
        let tot = u32_at(&data, pos)? as usize;
        if tot == 0 {
            break; // the rest of the segment is unused (or after a switch)
        }
        if tot < RECORD_HEADER {
            break;
        }
        let info = data[pos + 16];
        let rmid = data[pos + 17];
        if rmid == RM_XACT_ID && TIMED_XACT_OPS.contains(&(info & XLOG_XACT_OPMASK)) {
            if let Some(t) = xact_time(data.get(pos..(pos + tot).min(data.len()))?) {
                last = Some(t);
            }
        }
        pos += align8(tot);
    }
    last
}

/// The xact_time at the start of a transaction record's main data.
fn xact_time(rec: &[u8]) -> Option<i64> {
    let mut o = RECORD_HEADER;
    loop {
        match *rec.get(o)? {
            XLR_BLOCK_ID_ORIGIN => o += 3,
            XLR_BLOCK_ID_TOPLEVEL_XID => o += 5,
            XLR_BLOCK_ID_DATA_SHORT => {
                o += 2;
                break;
            }
            XLR_BLOCK_ID_DATA_LONG => {
                o += 5;
                break;
            }
            _ => return None, // block references: not a record this reads
        }
    }
    let pg = i64_at(rec, o)?;
    pg.checked_add(PG_EPOCH_UNIX_US)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: usize = 8192;

    /// A segment of `pages` pages whose records are `records` (xl_info, xl_rmid, main data),
    /// laid out as PostgreSQL does: MAXALIGNed records running across page headers.
    fn segment(pages: usize, cont: usize, records: &[(u8, u8, Vec<u8>)]) -> Vec<u8> {
        let mut stream = vec![0xEEu8; align8(cont)];
        for (info, rmid, main) in records {
            let mut rec = Vec::new();
            let mut body = Vec::new();
            if main.len() < 256 {
                body.extend([XLR_BLOCK_ID_DATA_SHORT, main.len() as u8]);
            } else {
                body.push(XLR_BLOCK_ID_DATA_LONG);
                body.extend((main.len() as u32).to_le_bytes());
            }
            body.extend(main);
            let tot = (RECORD_HEADER + body.len()) as u32;
            rec.extend(tot.to_le_bytes());
            rec.extend(7u32.to_le_bytes()); // xid
            rec.extend(0u64.to_le_bytes()); // prev
            rec.extend([*info, *rmid, 0, 0]);
            rec.extend(0u32.to_le_bytes()); // crc
            rec.extend(body);
            rec.resize(align8(rec.len()), 0);
            stream.extend(rec);
        }
        let mut seg = Vec::new();
        let mut at = 0;
        for i in 0..pages {
            let mut page = vec![0u8; BLOCK];
            page[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
            let mut info = if i == 0 { XLP_LONG_HEADER } else { 0 };
            if i == 0 && cont > 0 {
                info |= XLP_FIRST_IS_CONTRECORD;
                page[16..20].copy_from_slice(&(cont as u32).to_le_bytes());
            }
            page[2..4].copy_from_slice(&info.to_le_bytes());
            if i == 0 {
                page[32..36].copy_from_slice(&((pages * BLOCK) as u32).to_le_bytes());
                page[36..40].copy_from_slice(&(BLOCK as u32).to_le_bytes());
            }
            let h = if i == 0 { LONG_PAGE_HEADER } else { SHORT_PAGE_HEADER };
            let n = (BLOCK - h).min(stream.len().saturating_sub(at));
            page[h..h + n].copy_from_slice(&stream[at..at + n]);
            at += n;
            seg.extend(page);
        }
        seg
    }

    fn commit(pg_us: i64) -> Vec<u8> {
        let mut m = pg_us.to_le_bytes().to_vec();
        m.extend(0u32.to_le_bytes());
        m
    }

    #[test]
    fn finds_the_last_commit_across_pages_and_skips_other_records() {
        let filler = (0x00, 10, vec![1u8; 5000]); // a heap record (rmgr 10), no time
        let t1 = 800_000_000_000_000i64;
        let recs = vec![
            filler.clone(),
            (0x00, RM_XACT_ID, commit(t1)),
            filler.clone(),
            filler.clone(),                     // crosses into page 2
            (0x20, RM_XACT_ID, commit(t1 + 5)), // an abort: recovery stops there too
            filler.clone(),
            (0x10, RM_XACT_ID, commit(t1 + 99)), // PREPARE: no stop point
        ];
        let seg = segment(4, 0, &recs);
        assert_eq!(last_commit_us(&seg), Some(t1 + 5 + PG_EPOCH_UNIX_US));
        // A continuation from the previous segment is skipped.
        let seg = segment(4, 3000, &recs);
        assert_eq!(last_commit_us(&seg), Some(t1 + 5 + PG_EPOCH_UNIX_US));
        // A commit record whose header straddles a page boundary.
        // A first record of 8144 bytes (5-byte long data header) leaves 8 bytes of page 1.
        let mut straddle = vec![(0x00, 10, vec![2u8; BLOCK - LONG_PAGE_HEADER - 8 - RECORD_HEADER - 5])];
        straddle.push((0x00, RM_XACT_ID, commit(t1 + 7)));
        assert_eq!(last_commit_us(&segment(2, 0, &straddle)), Some(t1 + 7 + PG_EPOCH_UNIX_US));
    }

    #[test]
    fn what_it_cannot_read_gives_no_time() {
        assert_eq!(last_commit_us(&[]), None);
        assert_eq!(last_commit_us(&vec![7u8; 1 << 20]), None);
        assert_eq!(last_commit_us(&segment(2, 0, &[(0x00, 10, vec![1; 100])])), None);
    }
}
