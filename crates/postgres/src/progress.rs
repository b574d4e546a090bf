//! How long-running work reports progress. The CLI draws a bar on a terminal and logs
//! periodic lines otherwise; library code only counts.

pub trait Progress: Send + Sync {
    /// A new phase begins; `total` bytes when known.
    fn begin(&self, phase: &str, total: Option<u64>);
    fn advance(&self, bytes: u64);
    fn end(&self);
}

pub struct NoProgress;

impl Progress for NoProgress {
    fn begin(&self, _: &str, _: Option<u64>) {}
    fn advance(&self, _: u64) {}
    fn end(&self) {}
}
