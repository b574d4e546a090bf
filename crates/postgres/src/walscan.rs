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

const XLP_FIRST_IS_OVERWRITE_CONTRECORD: u16 = 0x0008;

/// What a segment says of its last transaction end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LastCommit {
    /// The time (Unix µs) of its last commit or abort record.
    At(i64),
    /// It holds no commit or abort record.
    None,
    /// It could not be read to its end (a record cut where its header lies, or damage):
    /// nothing may be concluded from it.
    Unknown,
}

/// The segment's pages: where each one's payload lies in the logical stream of records.
struct Pages<'a> {
    seg: &'a [u8],
    block: usize,
}

impl<'a> Pages<'a> {
    fn header_len(i: usize) -> usize {
        if i == 0 {
            LONG_PAGE_HEADER
        } else {
            SHORT_PAGE_HEADER
        }
    }
    fn count(&self) -> usize {
        self.seg.len() / self.block
    }
    /// Logical offset where page `i`'s payload starts.
    fn start(&self, i: usize) -> usize {
        if i == 0 {
            0
        } else {
            (self.block - LONG_PAGE_HEADER) + (i - 1) * (self.block - SHORT_PAGE_HEADER)
        }
    }
    fn len(&self) -> usize {
        self.start(self.count())
    }
    fn page_of(&self, l: usize) -> usize {
        let first = self.block - LONG_PAGE_HEADER;
        if l < first {
            0
        } else {
            1 + (l - first) / (self.block - SHORT_PAGE_HEADER)
        }
    }
    fn info(&self, i: usize) -> Option<u16> {
        u16_at(self.seg, i * self.block + 2)
    }
    fn rem_len(&self, i: usize) -> Option<usize> {
        u32_at(self.seg, i * self.block + 16).map(|v| v as usize)
    }
    /// `n` logical bytes from `l`, across page headers; `None` past the segment's end.
    fn read(&self, l: usize, n: usize) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(n);
        let mut at = l;
        while out.len() < n {
            let i = self.page_of(at);
            if i >= self.count() {
                return None;
            }
            let within = at - self.start(i);
            let phys = i * self.block + Self::header_len(i) + within;
            let room = self.block - Self::header_len(i) - within;
            let take = room.min(n - out.len());
            out.extend_from_slice(self.seg.get(phys..phys + take)?);
            at += take;
        }
        Some(out)
    }
}

/// The last transaction commit or abort in `seg`, a whole WAL segment. The walk follows
/// PostgreSQL's page headers: a record that runs into a page not marked as its continuation
/// (or marked as overwriting an aborted one, after a crash) was aborted, and the walk goes
/// on from that page. Nothing is copied but record headers.
pub fn last_commit(seg: &[u8]) -> LastCommit {
    let Some(info0) = u16_at(seg, 2) else { return LastCommit::Unknown };
    let Some(block) = u32_at(seg, 36).map(|b| b as usize) else { return LastCommit::Unknown };
    if info0 & XLP_LONG_HEADER == 0 || !block.is_power_of_two() || !(1024..=65536).contains(&block) {
        return LastCommit::Unknown;
    }
    let pages = Pages { seg, block };
    if pages.count() == 0 {
        return LastCommit::Unknown;
    }
    let magic = u16_at(seg, 0);
    let mut pos = if info0 & XLP_FIRST_IS_CONTRECORD != 0 { align8(pages.rem_len(0).unwrap_or(0)) } else { 0 };
    let end = pages.len();
    let mut last = LastCommit::None;
    while pos + RECORD_HEADER <= end {
        let Some(h) = pages.read(pos, RECORD_HEADER) else { return LastCommit::Unknown };
        let tot = u32_at(&h, 0).unwrap_or(0) as usize;
        if tot == 0 {
            break; // the rest of the segment is unused (or follows a switch)
        }
        if tot < RECORD_HEADER {
            return LastCommit::Unknown;
        }
        // Every page the record runs into must say it continues this record.
        let first = pages.page_of(pos);
        let last_page = pages.page_of(pos + tot - 1).min(pages.count() - 1);
        let mut resume = None;
        for i in first + 1..=last_page {
            let info = pages.info(i).unwrap_or(0);
            let remaining = pos + tot - pages.start(i);
            if u16_at(seg, i * block) != magic {
                return LastCommit::Unknown;
            }
            let continues = info & XLP_FIRST_IS_CONTRECORD != 0
                && info & XLP_FIRST_IS_OVERWRITE_CONTRECORD == 0
                && pages.rem_len(i) == Some(remaining);
            if !continues {
                let skip = if info & XLP_FIRST_IS_CONTRECORD != 0 { align8(pages.rem_len(i).unwrap_or(0)) } else { 0 };
                resume = Some(pages.start(i) + skip);
                break;
            }
        }
        if let Some(r) = resume {
            pos = r; // an aborted record: what follows starts on that page
            continue;
        }
        let (info, rmid) = (h[16], h[17]);
        if rmid == RM_XACT_ID && TIMED_XACT_OPS.contains(&(info & XLOG_XACT_OPMASK)) {
            // Block headers (none for these records), origin, top-level xid, data header,
            // then xact_time: at most 48 bytes.
            match pages.read(pos, tot.min(48)).or_else(|| pages.read(pos, end - pos)).and_then(|r| xact_time(&r)) {
                Some(t) => last = LastCommit::At(t),
                None if pos + tot > end => return LastCommit::Unknown, // cut before its time
                None => {}
            }
        }
        pos += align8(tot);
    }
    if pos < end && pos + RECORD_HEADER > end && pages.read(pos, end - pos).is_some_and(|b| b.iter().any(|x| *x != 0)) {
        // A record header cut by the segment's end: it may be a commit.
        return LastCommit::Unknown;
    }
    last
}

/// The time (Unix µs) of the last transaction commit or abort record in `seg`, when it
/// holds one and was read to its end.
pub fn last_commit_us(seg: &[u8]) -> Option<i64> {
    match last_commit(seg) {
        LastCommit::At(t) => Some(t),
        _ => None,
    }
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
        // (start, length) of each record in the stream, for the continuation flags.
        let mut spans: Vec<(usize, usize)> = Vec::new();
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
            spans.push((stream.len(), rec.len()));
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
            if i > 0 {
                if let Some((st, len)) = spans.iter().find(|(st, len)| *st < at && at < st + len) {
                    info |= XLP_FIRST_IS_CONTRECORD;
                    page[16..20].copy_from_slice(&((st + len - at) as u32).to_le_bytes());
                }
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
    fn an_aborted_record_is_skipped_and_a_cut_header_is_unknown() {
        let t1 = 800_000_000_000_000i64;
        // A commit, then a record that runs into page 2, but page 2 says it overwrites an
        // aborted record and begins with a commit of its own.
        let mut seg = segment(3, 0, &[(0x00, RM_XACT_ID, commit(t1)), (0x00, 10, vec![3u8; BLOCK])]);
        let p2 = BLOCK;
        seg[p2 + 2..p2 + 4].copy_from_slice(&XLP_FIRST_IS_OVERWRITE_CONTRECORD.to_le_bytes());
        let own = segment(1, 0, &[(0x00, RM_XACT_ID, commit(t1 + 9))]);
        let rec = &own[LONG_PAGE_HEADER..LONG_PAGE_HEADER + 64];
        seg[p2 + SHORT_PAGE_HEADER..p2 + SHORT_PAGE_HEADER + 64].copy_from_slice(rec);
        assert_eq!(last_commit(&seg), LastCommit::At(t1 + 9 + PG_EPOCH_UNIX_US));
        // A header cut by the segment's end: unknown, never an older time.
        let mut filler = vec![(0x00, RM_XACT_ID, commit(t1))];
        filler.push((0x00, 10, vec![1u8; BLOCK - LONG_PAGE_HEADER - 40 - RECORD_HEADER - 5 - 8]));
        filler.push((0x00, RM_XACT_ID, commit(t1 + 1)));
        let cut = segment(1, 0, &filler);
        assert_eq!(last_commit(&cut), LastCommit::Unknown);
        assert_eq!(last_commit(&segment(2, 0, &[(0x00, 10, vec![1; 100])])), LastCommit::None);
    }

    #[test]
    fn what_it_cannot_read_gives_no_time() {
        assert_eq!(last_commit_us(&[]), None);
        assert_eq!(last_commit_us(&vec![7u8; 1 << 20]), None);
        assert_eq!(last_commit_us(&segment(2, 0, &[(0x00, 10, vec![1; 100])])), None);
    }
}
