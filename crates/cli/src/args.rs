//! Command-line flags. Every flag has an environment variable; the flag wins.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "cloud-dump",
    version,
    about = "Continuous, encrypted, verifiable PostgreSQL backups in object storage",
    long_about = "Streams physical base backups of PostgreSQL over the replication protocol straight into object storage \
                  (S3, GCS, Azure, Storj, local files), compressed, optionally age-encrypted, checksummed, with nothing \
                  written on the database host. Restores stream back into an empty data directory.",
    after_help = "Exit codes: 0 success, 1 failure (a one-line reason on stderr), 2 bad usage.\n\
                  Secrets: prefer environment variables or files (CLOUD_DUMP_PASSPHRASE, --passphrase-file, STORJ_ACCESS, \
                  AWS_SECRET_ACCESS_KEY) to flags, which other users can see in the process list."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub global: GlobalArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream a physical base backup of a PostgreSQL cluster into the repository.
    Backup(BackupArgs),
    /// List the complete backups in the repository, newest first.
    List(ListArgs),
    /// Restore a backup into an empty data directory.
    Restore(RestoreArgs),
    /// Archive one WAL file (PostgreSQL's archive_command: `cloud-dump wal-push %p %f`).
    WalPush(WalPushArgs),
    /// Fetch one WAL file (PostgreSQL's restore_command: `cloud-dump wal-fetch %f %p`).
    WalFetch(WalFetchArgs),
    /// Download the WAL files after NAME into the prefetch spool (started by wal-fetch).
    #[command(hide = true)]
    WalPrefetch(WalFetchArgs),
    /// Delete the backups and WAL the retention policy no longer needs (--dry-run: say why).
    Expire(ExpireArgs),
    /// Delete one backup: its manifest first (it is gone at once), then its objects.
    Delete(DeleteArgs),
    /// Keep a backup from `expire` (write-once mark), or --release it.
    Keep(KeepArgs),
    /// What the repository holds and can restore: backups, WAL per timeline, the recovery window.
    Info(InfoArgs),
    /// Prove backups restore: checksums of every object, files against backup_manifest, WAL
    /// continuity; --drill restores one and starts it.
    Verify(VerifyArgs),
    /// Create an age X25519 key pair for --recipient-key / --identity-key.
    Keygen(KeygenArgs),
    /// SQLite: continuous WAL replication and point-in-time restore (Litestream-compatible).
    Sqlite(SqliteArgs),
    /// Print the shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions(CompletionsArgs),
    /// Write the man pages (cloud-dump.1, cloud-dump-backup.1, …) into DIR.
    #[command(hide = true)]
    Manpages(ManpagesArgs),
}

#[derive(Debug, Args)]
pub struct ExpireArgs {
    #[command(flatten)]
    pub config: PgConfigArg,
    /// Keep the N newest backups (of each database system).
    #[arg(long, env = "CLOUD_DUMP_RETAIN_FULL", value_name = "N")]
    pub retain_full: Option<usize>,
    /// Keep every point of the last D days restorable (D may be fractional: 0.5 is 12 hours).
    #[arg(long, env = "CLOUD_DUMP_RETAIN_DAYS", value_name = "D")]
    pub retain_days: Option<f64>,
    /// Print every decision with its reason; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub config: PgConfigArg,
    /// The backup to delete.
    #[arg(long)]
    pub name: String,
    /// Delete an unfinished backup's folder (no manifest: a backup killed mid-way) whose
    /// claim started more than 24 hours ago.
    #[arg(long, env = "CLOUD_DUMP_DELETE_ABANDONED")]
    pub abandoned: bool,
}

#[derive(Debug, Args)]
pub struct KeepArgs {
    #[command(flatten)]
    pub config: PgConfigArg,
    /// The backup to keep (or release).
    #[arg(long)]
    pub name: String,
    /// Release the backup: expire may delete it again.
    #[arg(long)]
    pub release: bool,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub config: PgConfigArg,
    /// Print JSON.
    #[arg(long, conflicts_with = "prometheus")]
    pub json: bool,
    /// Print node_exporter textfile metrics; with =FILE, write them there atomically.
    #[arg(long, value_name = "FILE", num_args = 0..=1, require_equals = true, default_missing_value = "-")]
    pub prometheus: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub config: PgConfigArg,
    /// Verify this backup (repeatable) [default: the newest].
    #[arg(long, conflicts_with = "all")]
    pub name: Vec<String>,
    /// Verify every backup.
    #[arg(long)]
    pub all: bool,
    /// Also verify the WAL archive: continuity from each backup's start, every segment's checksum.
    #[arg(long)]
    pub wal: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Restore the backup into a scratch directory, start it with local server binaries,
    /// check every database answers (amcheck where available), stop it, remove it.
    #[arg(long)]
    pub drill: bool,
    /// With --drill: restore to a random point of the recovery window (PITR) instead.
    #[arg(long, requires = "drill")]
    pub random_point: bool,
    /// With --random-point: the seed, to repeat a drill.
    #[arg(long, requires = "random_point")]
    pub seed: Option<u64>,
    /// With --drill: the server binaries (postgres, pg_ctl, psql) of the backup's major
    /// version [default: /usr/lib/postgresql/MAJOR/bin, then PATH].
    #[arg(long, env = "CLOUD_DUMP_PG_BIN", value_name = "DIR")]
    pub pg_bin: Option<PathBuf>,
    /// With --drill: where the scratch directory is made [default: the system's temp dir].
    #[arg(long, value_name = "DIR")]
    pub scratch: Option<PathBuf>,
    /// With --drill: seconds to wait for recovery to finish.
    #[arg(long, default_value_t = 3600, value_name = "SECONDS")]
    pub drill_timeout: u64,
    #[command(flatten)]
    pub decrypt: DecryptArgs,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManpagesArgs {
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

impl Command {
    /// The config file a PostgreSQL command was given (already applied before parsing).
    pub fn config_file(&self) -> Option<&std::path::Path> {
        match self {
            Command::Backup(a) => a.config.config.as_deref(),
            Command::List(a) => a.config.config.as_deref(),
            Command::Restore(a) => a.config.config.as_deref(),
            Command::WalPush(a) => a.config.config.as_deref(),
            Command::WalFetch(a) | Command::WalPrefetch(a) => a.config.as_deref(),
            Command::Expire(a) => a.config.config.as_deref(),
            Command::Delete(a) => a.config.config.as_deref(),
            Command::Keep(a) => a.config.config.as_deref(),
            Command::Info(a) => a.config.config.as_deref(),
            Command::Verify(a) => a.config.config.as_deref(),
            _ => None,
        }
    }
}

#[derive(Debug, Args)]
pub struct SqliteArgs {
    #[command(subcommand)]
    pub command: SqliteCommand,
}

#[derive(Debug, Subcommand)]
pub enum SqliteCommand {
    /// Replicate databases until SIGINT/SIGTERM: `replicate DB URL…`, or every database of the config.
    Replicate(SqliteReplicateArgs),
    /// Restore a database from a replica: `restore -o OUT DB_PATH|URL`.
    Restore(SqliteRestoreArgs),
    /// List the generations of a database's replicas (or of one replica URL).
    Generations(SqliteListArgs),
    /// List the snapshots of a database's replicas (or of one replica URL).
    Snapshots(SqliteListArgs),
    /// List the WAL objects of a database's replicas (or of one replica URL).
    Wal(SqliteListArgs),
    /// List the databases and replicas in the config file.
    Databases(SqliteDatabasesArgs),
    /// Verify every generation of a database's replicas: the chain, and (with the keys) a
    /// restore into a scratch file that passes integrity_check.
    Verify(SqliteVerifyArgs),
    /// What a database's replicas can restore: generations, the restorable span, the lag.
    Info(SqliteInfoArgs),
}

#[derive(Debug, Args)]
pub struct SqliteConfigArg {
    /// YAML config (Litestream's format) [default: /etc/cloud-dump.yml].
    #[arg(long, env = "CLOUD_DUMP_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SqliteAgeArgs {
    /// age identity file (AGE-SECRET-KEY-… lines) for encrypted replicas; adds to the config's `age.identities`.
    #[arg(long, env = "CLOUD_DUMP_AGE_IDENTITY_FILE", value_name = "FILE")]
    pub age_identity_file: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SqliteReplicateArgs {
    #[command(flatten)]
    pub config: SqliteConfigArg,
    /// Run this command (through `sh -c`) and replicate while it runs; exit with its status.
    #[arg(long, value_name = "CMD")]
    pub exec: Option<String>,
    /// Listen address for Prometheus metrics at /metrics (e.g. :9090); overrides the config's `addr`.
    #[arg(long, value_name = "ADDR")]
    pub addr: Option<String>,
    /// For DB URL on the command line: how often to upload new WAL (e.g. 1s, 500ms).
    #[arg(long, value_name = "DURATION")]
    pub sync_interval: Option<String>,
    /// For DB URL on the command line: compression (zstd, lz4, gzip, none).
    #[arg(long, value_name = "ALGO")]
    pub compression: Option<String>,
    /// For DB URL on the command line: file of age recipients (age1… lines) to encrypt to.
    #[arg(long, env = "CLOUD_DUMP_AGE_RECIPIENT_FILE", value_name = "FILE")]
    pub age_recipient_file: Option<PathBuf>,
    /// Database path, then one or more replica URLs (instead of a config file).
    #[arg(value_name = "DB_PATH")]
    pub db: Option<PathBuf>,
    #[arg(value_name = "REPLICA_URL")]
    pub replicas: Vec<String>,
}

#[derive(Debug, Args)]
pub struct SqliteRestoreArgs {
    #[command(flatten)]
    pub config: SqliteConfigArg,
    #[command(flatten)]
    pub age: SqliteAgeArgs,
    /// Where to write the restored database (must not exist) [default: the database's own path].
    #[arg(short = 'o', long = "output", value_name = "PATH")]
    pub output: Option<PathBuf>,
    /// Restore from this replica (its `name`, or its type when unnamed) of the database.
    #[arg(long)]
    pub replica: Option<String>,
    /// Restore from this generation (16 hex digits).
    #[arg(long)]
    pub generation: Option<String>,
    /// Replay WAL up to this index (inclusive): decimal, 0x… or the 8 hex digits `wal` lists.
    #[arg(long)]
    pub index: Option<String>,
    /// Point in time (RFC 3339, e.g. 2026-11-20T10:00:00Z): the state as of the last sync at or before it.
    #[arg(long)]
    pub timestamp: Option<String>,
    /// Objects downloaded at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub parallelism: u16,
    /// Exit 0 without restoring when the output database already exists.
    #[arg(long)]
    pub if_db_not_exists: bool,
    /// Exit 0 without restoring when no replica holds a backup.
    #[arg(long)]
    pub if_replica_exists: bool,
    /// Print the plan (generation, snapshot, WAL objects, position) and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Database path (looked up in the config) or replica URL.
    #[arg(value_name = "DB_PATH|REPLICA_URL")]
    pub target: String,
}

#[derive(Debug, Args)]
pub struct SqliteListArgs {
    #[command(flatten)]
    pub config: SqliteConfigArg,
    /// Only this replica of the database.
    #[arg(long)]
    pub replica: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Database path (looked up in the config) or replica URL.
    #[arg(value_name = "DB_PATH|REPLICA_URL")]
    pub target: String,
}

#[derive(Debug, Args)]
pub struct SqliteVerifyArgs {
    #[command(flatten)]
    pub config: SqliteConfigArg,
    #[command(flatten)]
    pub age: SqliteAgeArgs,
    /// Only this replica of the database.
    #[arg(long)]
    pub replica: Option<String>,
    /// Print JSON instead of lines.
    #[arg(long)]
    pub json: bool,
    /// Objects downloaded at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub parallelism: u16,
    /// Database path (looked up in the config) or replica URL.
    #[arg(value_name = "DB_PATH|REPLICA_URL")]
    pub target: String,
}

#[derive(Debug, Args)]
pub struct SqliteInfoArgs {
    #[command(flatten)]
    pub config: SqliteConfigArg,
    /// Only this replica of the database.
    #[arg(long)]
    pub replica: Option<String>,
    /// Print JSON.
    #[arg(long, conflicts_with = "prometheus")]
    pub json: bool,
    /// Print node_exporter textfile metrics; with =FILE, write them there atomically.
    #[arg(long, value_name = "FILE", num_args = 0..=1, require_equals = true, default_missing_value = "-")]
    pub prometheus: Option<PathBuf>,
    /// Database path (looked up in the config) or replica URL.
    #[arg(value_name = "DB_PATH|REPLICA_URL")]
    pub target: String,
}

#[derive(Debug, Args)]
pub struct SqliteDatabasesArgs {
    #[command(flatten)]
    pub config: SqliteConfigArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The PostgreSQL commands' config file (read before the flags; see README "Config file").
#[derive(Debug, Clone, Args)]
pub struct PgConfigArg {
    /// YAML config whose `postgres: clusters:` section supplies settings the flags and
    /// environment leave out [default: /etc/cloud-dump.yml when it exists].
    #[arg(long, env = "CLOUD_DUMP_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct WalPushArgs {
    #[command(flatten)]
    pub config: PgConfigArg,
    /// Path of the WAL file (%p).
    pub path: PathBuf,
    /// Its name (%f).
    pub name: String,
    #[arg(long, env = "CLOUD_DUMP_WAL_COMPRESSION", default_value = "zstd", value_parser = ["zstd", "gzip", "lz4", "none"])]
    pub compression: String,
    /// The seed's switch: `--compress false` stores WAL uncompressed.
    #[arg(long, env = "WAL_COMPRESS", value_name = "BOOL")]
    pub compress: Option<bool>,
    /// Encrypt with age (also WAL_ENCRYPT=true).
    #[arg(long, env = "WAL_ENCRYPT")]
    pub encrypt: bool,
    /// Passphrase: WAL is encrypted to the repository key it protects (see README). Prefer
    /// WAL_PASSPHRASE / CLOUD_DUMP_PASSPHRASE or --passphrase-file.
    #[arg(long, env = "WAL_PASSPHRASE", hide_env_values = true, conflicts_with = "passphrase_file")]
    pub passphrase: Option<String>,
    #[arg(long, env = "CLOUD_DUMP_PASSPHRASE_FILE", value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// File of age X25519 recipients.
    #[arg(long, env = "WAL_RECIPIENT_KEY", value_name = "FILE")]
    pub recipient_key: Option<PathBuf>,
    /// Identity that can open already-archived key-pair-encrypted WAL (to verify re-pushes).
    #[arg(long, env = "WAL_IDENTITY_KEY", value_name = "FILE")]
    pub identity_key: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct WalFetchArgs {
    /// Name of the WAL file (%f).
    pub name: String,
    /// Where to put it (%p).
    pub dest: PathBuf,
    /// The settings file `restore` wrote (KEY=VALUE lines: the whole truth for this
    /// command), or the YAML config as for the other commands.
    #[arg(long, env = "CLOUD_DUMP_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Segments to download ahead, in parallel, into pg_wal/.cloud-dump/prefetch (0: off).
    #[arg(long, env = "CLOUD_DUMP_PREFETCH", default_value_t = 8)]
    pub prefetch: usize,
    #[arg(long, env = "WAL_PASSPHRASE", hide_env_values = true, conflicts_with = "passphrase_file")]
    pub passphrase: Option<String>,
    #[arg(long, env = "CLOUD_DUMP_PASSPHRASE_FILE", value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// age identity file for key-pair-encrypted WAL.
    #[arg(long, env = "WAL_IDENTITY_KEY", value_name = "FILE")]
    pub identity_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ProgressMode {
    Auto,
    Bar,
    Log,
    None,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum StorageKind {
    Storj,
    S3,
    Gs,
    Az,
    File,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Repository URL: s3://bucket/prefix, gs://bucket/prefix, az://container/prefix,
    /// storj://bucket/prefix, file:///path (or /path), memory:// (tests).
    #[arg(long, env = "CLOUD_DUMP_REPO", global = true, value_name = "URL")]
    pub repo: Option<String>,
    /// Seed-compatible way to name the backend (with --storj-bucket); --repo is the general form.
    #[arg(long, env = "CLOUD_DUMP_STORAGE", global = true, value_enum)]
    pub storage: Option<StorageKind>,
    /// Group backups under <cluster>/backup/<name>/ and WAL under <cluster>/wal_archive/.
    #[arg(long, env = "CLOUD_DUMP_CLUSTER", global = true)]
    pub cluster: Option<String>,
    /// WAL folder in the flat layout.
    #[arg(long, env = "CLOUD_DUMP_WAL_PREFIX", global = true, default_value = "wal_archive")]
    pub wal_prefix: String,
    /// Archives transferred at once (tablespaces), and ranged reads per archive on restore.
    #[arg(long, env = "CLOUD_DUMP_PARALLEL", global = true, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub parallel: u16,
    #[arg(long, env = "CLOUD_DUMP_LOG_LEVEL", global = true, value_enum, default_value = "info")]
    pub log_level: LogLevel,
    /// `json`: one JSON object per log line on stderr (progress and the final error too).
    #[arg(long, env = "CLOUD_DUMP_LOG_FORMAT", global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Progress display: a bar on a terminal, periodic log lines otherwise.
    #[arg(long, env = "CLOUD_DUMP_PROGRESS", global = true, value_enum, default_value = "auto")]
    pub progress: ProgressMode,

    /// S3 endpoint for S3-compatible stores (MinIO, Ceph, R2, …); http:// is allowed.
    #[arg(long, env = "CLOUD_DUMP_S3_ENDPOINT", global = true, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    #[arg(long, env = "CLOUD_DUMP_S3_REGION", global = true)]
    pub s3_region: Option<String>,
    /// Address buckets as <bucket>.<endpoint> instead of <endpoint>/<bucket>.
    #[arg(long, env = "CLOUD_DUMP_S3_VIRTUAL_HOSTED_STYLE", global = true)]
    pub s3_virtual_hosted_style: bool,
    /// Allow plain http:// to the endpoint (implied by an http:// endpoint).
    #[arg(long, env = "CLOUD_DUMP_S3_ALLOW_HTTP", global = true)]
    pub s3_allow_http: bool,
    /// Do not verify the endpoint's TLS certificate.
    #[arg(long, env = "CLOUD_DUMP_S3_SKIP_VERIFY", global = true)]
    pub s3_skip_verify: bool,
    /// The bucket has S3 Object Lock: send Content-MD5 with every upload (it requires one).
    #[arg(long, env = "CLOUD_DUMP_S3_OBJECT_LOCK", global = true)]
    pub s3_object_lock: bool,
    /// Seconds a connection to the object store may stay silent while a request streams
    /// (S3, GCS, Azure); a whole transfer has no time limit.
    #[arg(long, env = "CLOUD_DUMP_IO_TIMEOUT", global = true, default_value_t = 300, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub io_timeout: u64,

    /// Storj access grant, exchanged once for gateway credentials.
    #[arg(long, env = "STORJ_ACCESS", global = true, hide_env_values = true, value_name = "GRANT")]
    pub storj_access: Option<String>,
    /// Storj bucket, with --storage storj (the seed's flags).
    #[arg(long, env = "STORJ_BUCKET", global = true)]
    pub storj_bucket: Option<String>,
    /// Storj auth service that turns an access grant into S3 credentials.
    #[arg(long, env = "STORJ_AUTH_SERVICE", global = true, value_name = "URL")]
    pub storj_auth_service: Option<String>,
    /// Storj S3-compatible gateway.
    #[arg(long, env = "STORJ_GATEWAY", global = true, value_name = "URL")]
    pub storj_gateway: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Checkpoint {
    Fast,
    Spread,
}

#[derive(Debug, Args)]
pub struct EncryptArgs {
    /// Encrypt with age, to --passphrase / --passphrase-file or --recipient-key.
    #[arg(long, env = "CLOUD_DUMP_ENCRYPT")]
    pub encrypt: bool,
    /// Encryption passphrase (prefer CLOUD_DUMP_PASSPHRASE or --passphrase-file).
    #[arg(long, env = "CLOUD_DUMP_PASSPHRASE", hide_env_values = true, conflicts_with = "passphrase_file")]
    pub passphrase: Option<String>,
    /// File whose first line is the passphrase.
    #[arg(long, env = "CLOUD_DUMP_PASSPHRASE_FILE", value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// File with age X25519 recipients (age1…), one per line.
    #[arg(long, env = "CLOUD_DUMP_RECIPIENT_KEY", value_name = "FILE", conflicts_with_all = ["passphrase", "passphrase_file"])]
    pub recipient_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct DecryptArgs {
    /// Decryption passphrase (prefer CLOUD_DUMP_PASSPHRASE or --passphrase-file).
    #[arg(long, env = "CLOUD_DUMP_PASSPHRASE", hide_env_values = true, conflicts_with = "passphrase_file")]
    pub passphrase: Option<String>,
    /// File whose first line is the passphrase.
    #[arg(long, env = "CLOUD_DUMP_PASSPHRASE_FILE", value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// age identity file (AGE-SECRET-KEY-…), as written by `cloud-dump keygen` or age-keygen.
    #[arg(long, env = "CLOUD_DUMP_IDENTITY_KEY", value_name = "FILE", conflicts_with_all = ["passphrase", "passphrase_file"])]
    pub identity_key: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub config: PgConfigArg,
    /// Unique name of this backup (letters, digits, - _ . : +).
    #[arg(long, env = "CLOUD_DUMP_BACKUP_NAME")]
    pub name: String,
    /// postgres://user:password@host:port/db?replication=yes (or key=value pairs); the PG*
    /// environment variables fill what it leaves out.
    #[arg(long, env = "CLOUD_DUMP_DB_URL", hide_env_values = true, value_name = "URL")]
    pub db_url: Option<String>,
    #[arg(long, env = "CLOUD_DUMP_COMPRESSION", default_value = "zstd", value_parser = ["zstd", "gzip", "lz4", "none"])]
    pub compression: String,
    /// Compression level (zstd 1-19, gzip 1-9); defaults favour speed (1).
    #[arg(long, env = "CLOUD_DUMP_COMPRESSION_LEVEL")]
    pub compression_level: Option<i32>,
    /// Compression threads (zstd); default: the number of CPUs.
    #[arg(long, env = "CLOUD_DUMP_COMPRESSION_THREADS")]
    pub compression_threads: Option<u32>,
    /// `fast` asks for an immediate checkpoint; `spread` waits for the next one.
    #[arg(long, env = "CLOUD_DUMP_CHECKPOINT", value_enum, default_value = "fast")]
    pub checkpoint: Checkpoint,
    /// Limit the server's transfer rate, e.g. 50M or 800k (bytes per second, 32k to 1G).
    #[arg(long, env = "CLOUD_DUMP_MAX_RATE", value_name = "RATE")]
    pub max_rate: Option<String>,
    /// Backup label recorded by PostgreSQL (default: "cloud-dump <name>").
    #[arg(long)]
    pub label: Option<String>,
    /// Keep this backup from `expire` (a write-once keep mark; `keep --release` undoes it).
    #[arg(long)]
    pub keep: bool,
    #[command(flatten)]
    pub encrypt: EncryptArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub config: PgConfigArg,
    /// Print JSON (one array of manifests) for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum TargetKind {
    /// Stop as soon as the backup is consistent.
    Immediate,
    /// Replay all archived WAL.
    Latest,
}

/// Whether the restored copy keeps the backup's archive settings.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ArchiveMode {
    /// Keep them: a copy that becomes the new primary goes on archiving (the default).
    Preserve,
    /// Start the copy with archive_mode = off (restore tests, throwaway copies).
    Off,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum TargetAction {
    Promote,
    Pause,
    Shutdown,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub config: PgConfigArg,
    /// Name of the backup to restore; with a recovery target, the default is the newest
    /// backup that ends before the target.
    #[arg(long, env = "CLOUD_DUMP_BACKUP_NAME")]
    pub name: Option<String>,
    /// PITR: replay archived WAL up to this time, e.g. "2026-03-22 14:30:00 UTC".
    #[arg(long, value_name = "TIME", group = "target")]
    pub recovery_target_time: Option<String>,
    /// PITR: replay up to this LSN, e.g. 0/5200000.
    #[arg(long, value_name = "LSN", group = "target")]
    pub recovery_target_lsn: Option<String>,
    /// PITR: replay up to this transaction id.
    #[arg(long, value_name = "XID", group = "target")]
    pub recovery_target_xid: Option<String>,
    /// PITR: replay up to this named restore point (pg_create_restore_point).
    #[arg(long, value_name = "NAME", group = "target")]
    pub recovery_target_name: Option<String>,
    /// `latest` replays all archived WAL; `immediate` stops at consistency.
    #[arg(long, value_enum, group = "target")]
    pub recovery_target: Option<TargetKind>,
    #[arg(long, value_enum, default_value = "promote")]
    pub recovery_target_action: TargetAction,
    /// `latest` (the one live branch; refused when the archive holds several), `current`
    /// (the backup's), or a timeline number.
    #[arg(long, value_name = "TLI")]
    pub recovery_target_timeline: Option<String>,
    /// `preserve` keeps the backup's archive settings (a copy that becomes the new primary
    /// goes on archiving); `off` starts the copy with archive_mode = off (restore tests).
    #[arg(long, value_enum, env = "CLOUD_DUMP_RESTORE_ARCHIVE_MODE", default_value = "preserve")]
    pub archive_mode: ArchiveMode,
    /// Passphrase for encrypted WAL when it differs from the backup's.
    #[arg(long, env = "WAL_PASSPHRASE", hide_env_values = true)]
    pub wal_passphrase: Option<String>,
    /// age identity for key-pair-encrypted WAL when it differs from the backup's.
    #[arg(long, env = "WAL_IDENTITY_KEY", value_name = "FILE")]
    pub wal_identity_key: Option<PathBuf>,
    /// Target data directory; must not exist or be empty.
    #[arg(long, env = "CLOUD_DUMP_PGDATA", value_name = "DIR")]
    pub pgdata: PathBuf,
    /// Restore the tablespace recorded at OLD into NEW instead (repeatable).
    #[arg(long = "tablespace-mapping", value_name = "OLD=NEW")]
    pub tablespace_mapping: Vec<String>,
    /// Print what would be restored, where, and how many bytes; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub decrypt: DecryptArgs,
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Where to write the identity (private key) file; created with mode 0600, never overwritten.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: PathBuf,
}
