//! Real servers for cloud-dump's tests, quickstart and benchmarks: PostgreSQL clusters
//! made with `initdb`/`pg_ctl` in temporary directories on free loopback ports (as the
//! `postgres` user when running as root), and an S3-compatible server (s3s-fs) on loopback.

mod pg;
mod s3;
mod storj;

pub use pg::{give_to_postgres, pg_bin_dir, psql, run_as_postgres, scratch_dir, PgServer};
pub use s3::S3Server;
pub use storj::FakeStorjAuth;

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0").local_addr().expect("addr").port()
}
