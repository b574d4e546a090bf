//! SQLite for cloud-dump. So far: the pure parts the replicator will stand on — the WAL file
//! format (header, frames, salts, cumulative checksums, the committed prefix) and
//! replication positions. Replication, snapshots and restore (issue 4) are not built yet.

pub mod pos;
pub mod wal;
