//! End-to-end tests of the `cloud-dump` binary against real PostgreSQL servers, a real
//! S3-compatible server on loopback and real files. One test binary for the crate.

mod integration {
    mod backends;
    mod backup_restore;
    mod backup_trust;
    mod bad_input;
    pub mod common;
    mod connect;
    mod drills;
    mod lifecycle;
    mod pitr;
    mod service;
    mod sqlite;
    mod timelines;
    mod wal;
}
