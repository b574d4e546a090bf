//! End-to-end tests of the `cloud-dump` binary against real PostgreSQL servers, a real
//! S3-compatible server on loopback and real files. One test binary for the crate.

mod integration {
    pub mod common;
    mod backup_restore;
    mod bad_input;
}
