//! PostgreSQL for cloud-dump: a pure-Rust replication client, physical base backups
//! streamed to object storage, and restores.

mod backup;
mod catalog;
mod client;
mod conninfo;
mod error;
pub mod expire;
mod extract;
pub mod info;
pub mod layout;
pub mod lsn;
pub mod mac;
pub mod manifest;
pub mod old_versions;
pub mod progress;
pub mod protocol;
pub mod recovery;
mod repository;
mod restore;
pub mod timeline;
mod tls;
pub mod verify;
pub mod wal;
mod wal_archive;
pub mod walscan;

pub use backup::{run_backup, BackupRequest};
pub use catalog::{list_backups, load_manifest};
pub use client::{version_num, Connection, SystemInfo};
pub use conninfo::{ChannelBindingMode, ConnConfig, SslMode};
pub use error::{Error, Result};
pub use extract::{extract, release_control_file, ExtractStats, ExtractTarget, CONTROL_FILE};
pub use layout::Layout;
pub use lsn::Lsn;
pub use manifest::{BackupManifest, ObjectEntry, ObjectKind, TablespaceEntry};
pub use progress::{NoProgress, Progress};
pub use repository::{
    kept_by_marks, now_us, parse_time_us, time_us, wal_name_of, ExpireOutcome, Inventory, OldVersionsOutcome,
    PgRepository, StoredBackup,
};
pub use restore::{
    check_backup_key, check_decryption, check_empty_target, plan_restore, run_restore, RestorePlan, RestoreRequest,
};
pub use wal_archive::{
    is_segment, segment_system_id, write_atomically, PushOutcome, WalArchive, WalKeys, SHA_METADATA, SYSTEM_FILE,
};
