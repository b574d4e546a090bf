//! SQLite for cloud-dump: continuous replication of a database's WAL to object storage, in
//! the manner of Litestream, and point-in-time restore.
//!
//! Data flow: [`db::Db`] (one thread per database) holds a read transaction, copies
//! committed WAL frames into the shadow WAL beside the database ([`wal`] checks salts and
//! checksums) and runs the checkpoints; [`replica::Replica`] (one task per replica) uploads
//! the shadow WAL per sync interval and snapshots through the pipeline's encoder to a
//! storage `Repo`, under the names of [`layout`]; [`restore`] plans from one LIST and
//! replays snapshot + WAL into a temporary file checked with `PRAGMA integrity_check`.
//! [`config`] reads Litestream-shaped YAML; [`replicate`] runs it all; [`metrics`] serves
//! Prometheus text.

pub mod config;
pub mod db;
pub mod error;
pub mod layout;
pub mod metrics;
pub mod pos;
pub mod replica;
pub mod replicate;
pub mod restore;
pub mod stored;
pub mod verify;
pub mod wal;

pub use error::{Result, SqliteError};
