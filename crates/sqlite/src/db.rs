//! One replicated database: the two connections we hold on it, the shadow WAL beside it,
//! and the procedures that keep the shadow a continuous copy of everything committed.
//!
//! Connections: `reader` holds a read transaction at all times (except inside our own
//! checkpoint), so no other connection can checkpoint past it or restart the WAL under
//! frames we have not copied; `locker` takes the write lock (`BEGIN IMMEDIATE`) when the
//! WAL must stand still: at start, at a new generation, and around our checkpoints.
//!
//! Continuity: the shadow WAL of generation G, index i, is a byte copy of the database's WAL
//! (header + committed frames, each frame's salts and running checksum verified). When SQLite
//! restarts the WAL (after a complete checkpoint, ours or the application's), the new header's
//! salt-1 is the old one + 1, and the new WAL overwrites the file from its start: the old
//! WAL's frames past what we copied are still in the file until the new WAL reaches them.
//! So a restart is followed as index i+1 after copying the old WAL's remaining committed
//! frames, provided the frame header at our end still is not the new WAL's, before and after
//! that copy. Any other change of the WAL header (salt-1 not + 1: two restarts, a truncated
//! or replaced WAL), a new WAL already past our end, a shadow that does not match the WAL at
//! start, or a replaced database file starts a new generation. Our checkpoints watch the WAL
//! closely right after they complete, so the restart they cause is followed within ~2 ms.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags};
use tokio::sync::watch;

use crate::config::DbSpec;
use crate::error::{Result, SqliteError};
use crate::layout;
use crate::wal::{self, WalHeader, FRAME_HEADER_SIZE, HEADER_SIZE};

/// How long we wait for the write lock before trying again at the next tick.
const LOCK_WAIT: Duration = Duration::from_secs(1);
/// The longest our checkpoint holds the write lock retrying (the application's own
/// checkpoint may hold the checkpoint lock a moment); readers are never waited for under it.
const LOCKED_RETRY: Duration = Duration::from_millis(50);
/// After a forced checkpoint that readers kept from completing, the next one waits this
/// long, doubling up to [`FORCED_BACKOFF_MAX`].
const FORCED_BACKOFF_MIN: Duration = Duration::from_secs(1);
const FORCED_BACKOFF_MAX: Duration = Duration::from_secs(60);
const READ_CHUNK: usize = 4 << 20;

/// Where the shadow WAL stands: what replicas upload from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ShadowPos {
    pub generation: String,
    /// The generation's place in the database's history: strictly greater than the
    /// previous generation's (restores order generations by it, never by name or time).
    pub seq: u64,
    pub index: u64,
    /// Length of the shadow WAL file `index` (a WAL offset).
    pub end: u64,
    /// When the WAL was last read: every commit in the shadow happened before it.
    pub time_ms: i64,
}

#[derive(Debug, Default)]
pub struct DbMetrics {
    pub wal_bytes: AtomicU64,
    /// Bytes in the shadow directory's WAL files.
    pub shadow_bytes: AtomicU64,
    pub wal_size: AtomicU64,
    pub checkpoints: AtomicU64,
    pub checkpoint_errors: AtomicU64,
    pub generations: AtomicU64,
    pub errors: AtomicU64,
}

/// What the database thread shares with the replica tasks.
#[derive(Debug)]
pub struct Shared {
    pub path: PathBuf,
    pub meta_dir: PathBuf,
    pub pos: watch::Sender<ShadowPos>,
    /// Held (read) while a snapshot reads the database file: the reader's transaction must
    /// not be cycled meanwhile. Our checkpoint takes it for writing.
    pub gate: RwLock<()>,
    /// Each replica's upload position `(generation, index)`; shadow files behind all of
    /// them are removed.
    pub replica_pos: Mutex<Vec<Option<(String, u64)>>>,
    /// The database file, opened once and never closed while SQLite has it open: closing
    /// any descriptor of a file drops every POSIX lock the process holds on it, SQLite's
    /// included (the application would then delete the WAL under us). Snapshots read it.
    pub db_file: Mutex<Option<Arc<File>>>,
    /// The shadow directory's lock file and the database file, flocked for the life of
    /// the process.
    pub lock: Mutex<Vec<File>>,
    pub metrics: DbMetrics,
}

impl Shared {
    pub fn new(path: &Path, replicas: usize) -> Arc<Shared> {
        Arc::new(Shared {
            path: path.to_owned(),
            meta_dir: meta_dir(path),
            pos: watch::Sender::new(ShadowPos::default()),
            gate: RwLock::new(()),
            replica_pos: Mutex::new(vec![None; replicas]),
            db_file: Mutex::new(None),
            lock: Mutex::new(Vec::new()),
            metrics: DbMetrics::default(),
        })
    }

    pub fn shadow_path(&self, generation: &str, index: u64) -> PathBuf {
        shadow_path(&self.meta_dir, generation, index)
    }

    /// The database file's permission bits (read and write only): every copy of its
    /// content (shadow WAL, replica objects) gets them, never more (0600 when unreadable).
    pub fn file_mode(&self) -> u32 {
        fs::metadata(&self.path).map(|m| m.mode() & 0o666).unwrap_or(0o600)
    }
}

/// Creates `dir` (and its parents inside `meta`) with the directory mode for `mode`.
fn make_private_dir(dir: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(cloud_dump_storage::dir_mode_for(mode)))
}

/// `/var/lib/app.db` → `/var/lib/.app.db-cloud-dump`.
pub fn meta_dir(db: &Path) -> PathBuf {
    let name = db.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    db.with_file_name(format!(".{name}-cloud-dump"))
}

pub fn shadow_path(meta: &Path, generation: &str, index: u64) -> PathBuf {
    meta.join("generations").join(generation).join("wal").join(format!("{index:08x}.wal"))
}

/// Takes the advisory lock of the database's shadow directory for the life of the process
/// (kept in `shared`): a second replicator of the same database stops here with an error
/// naming the holder.
/// The database files (device, inode) this process replicates, with the path each was
/// configured by. Closing any descriptor of a file drops every POSIX lock the process holds
/// on it (SQLite's included), so a second entry for one of them is refused by device and
/// inode before anything is opened.
static REPLICATED: Mutex<Vec<(u64, u64, PathBuf)>> = Mutex::new(Vec::new());

/// Forgets a database this process no longer replicates (its connections are closed).
pub fn forget_replicated(path: &Path) {
    REPLICATED.lock().unwrap_or_else(|e| e.into_inner()).retain(|(_, _, p)| p != path);
}

pub fn lock_shadow_dir(shared: &Shared) -> Result<()> {
    let db = shared.path.display().to_string();
    if let Ok(m) = fs::metadata(&shared.path) {
        let running = REPLICATED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, other)) =
            running.iter().find(|(d, i, p)| *d == m.dev() && *i == m.ino() && *p != shared.path)
        {
            return Err(SqliteError::db(
                &db,
                format!("is the database file this process already replicates as {} (a link to it); refused, nothing opened", other.display()),
            ));
        }
    }
    make_private_dir(&shared.meta_dir, shared.file_mode()).map_err(|e| {
        SqliteError::db(&db, format!("cannot create the shadow directory {}: {e}", shared.meta_dir.display()))
    })?;
    let path = shared.meta_dir.join("lock");
    let file = std::os::unix::fs::OpenOptionsExt::mode(
        OpenOptions::new().read(true).write(true).create(true).truncate(false),
        shared.file_mode(),
    )
    .open(&path)
    .map_err(|e| SqliteError::io(path.display(), e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            return Err(SqliteError::db(
                &db,
                format!(
                    "another replicator is replicating it ({}; lock {}); run one `cloud-dump sqlite replicate` per database",
                    if holder.is_empty() { "holder unknown" } else { holder },
                    path.display()
                ),
            ));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(SqliteError::io(path.display(), e)),
    }
    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let me = format!("pid {} on {} since {}\n", std::process::id(), host.trim(), crate::restore::format_ms(now_ms()));
    file.set_len(0).and_then(|_| (&file).write_all(me.as_bytes())).map_err(|e| SqliteError::io(path.display(), e))?;
    let mut held = vec![file];
    // The same database reached through another path (a symlink, a hard link) has another
    // shadow directory: lock the database file itself too (flock; SQLite's own locks are
    // POSIX record locks, which flock does not touch). Kept open for the life of the
    // process, like every descriptor of the database file (see `db_file`).
    if let Ok(f) = File::open(&shared.path) {
        match f.try_lock() {
            Ok(()) => held.push(f),
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(SqliteError::db(
                    &db,
                    "another replicator is replicating this database file (through another path); run one `cloud-dump sqlite replicate` per database",
                ))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(SqliteError::io(&db, e)),
        }
    }
    if let Some(Ok(m)) = held.get(1).map(|f| f.metadata()) {
        REPLICATED.lock().unwrap_or_else(|e| e.into_inner()).push((m.dev(), m.ino(), shared.path.clone()));
    }
    *shared.lock.lock().unwrap_or_else(|e| e.into_inner()) = held;
    Ok(())
}

/// The current generation and its sequence number from the shadow directory
/// (`<generation> <seq>`; files written before sequences existed hold the name only).
fn read_generation_file(meta: &Path) -> Option<(String, u64)> {
    let text = fs::read_to_string(meta.join("generation")).ok()?;
    let mut it = text.split_whitespace();
    let g = it.next().filter(|g| layout::is_generation(g))?.to_owned();
    let seq = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    Some((g, seq))
}

pub fn now_ms() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64 / 1_000_000
}

struct Shadow {
    generation: String,
    seq: u64,
    index: u64,
    raw_header: [u8; HEADER_SIZE],
    header: WalHeader,
    end: u64,
    checksum: (u32, u32),
    file: File,
}

impl Shadow {
    /// A new shadow WAL file holding just the WAL header (replacing a leftover of a crash).
    fn create(
        meta: &Path,
        generation: String,
        seq: u64,
        index: u64,
        raw: [u8; HEADER_SIZE],
        header: WalHeader,
        mode: u32,
    ) -> Result<Shadow> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let path = shadow_path(meta, &generation, index);
        let dir = path.parent().expect("shadow path has a parent");
        let mut d = Some(dir);
        let mut dirs = Vec::new();
        while let Some(x) = d.filter(|x| x.starts_with(meta)) {
            dirs.push(x);
            d = x.parent();
        }
        for x in dirs.into_iter().rev() {
            make_private_dir(x, mode).map_err(|e| SqliteError::io(x.display(), e))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .map_err(|e| SqliteError::io(path.display(), e))?;
        // A leftover keeps its old mode: set it.
        file.set_permissions(fs::Permissions::from_mode(mode)).map_err(|e| SqliteError::io(path.display(), e))?;
        (&file).write_all(&raw).map_err(|e| SqliteError::io(path.display(), e))?;
        Ok(Shadow {
            generation,
            seq,
            index,
            raw_header: raw,
            header,
            end: HEADER_SIZE as u64,
            checksum: header.checksum,
            file,
        })
    }
}

enum Copied {
    Bytes(u64),
    Discontinuity(String),
}

pub struct Db {
    shared: Arc<Shared>,
    wal_path: PathBuf,
    reader: Connection,
    locker: Connection,
    ino: u64,
    shadow: Option<Shadow>,
    min_checkpoint_pages: u64,
    max_wal_bytes: u64,
    max_shadow_bytes: u64,
    /// Reused read buffer for the WAL.
    buf: Vec<u8>,
    /// The shadow end at our last complete checkpoint, while the read transaction begun
    /// right after it is still open: until that transaction ends nobody can checkpoint, so
    /// the only possible WAL restart is at the very next write, with nothing appended after
    /// this position — a restart that also truncated the file lost nothing.
    clean_end: std::cell::Cell<Option<u64>>,
    /// No forced checkpoint before this (after one that readers kept from completing).
    forced_after: Option<Instant>,
    forced_backoff: Duration,
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked))
}

/// Opens the database file for our own reads and checks its first bytes: a database, not
/// something else with the same name. Keep the handle (see [`Shared::db_file`]).
pub fn open_sqlite_file(path: &Path) -> Result<File> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).map_err(|e| SqliteError::io(path.display(), e))?;
    let mut head = [0u8; 16];
    let n = f.read_at(&mut head, 0).map_err(|e| SqliteError::io(path.display(), e))?;
    if n > 0 && (n < 16 || &head != b"SQLite format 3\0") {
        return Err(SqliteError::db(
            path.display(),
            "not a SQLite database (its first bytes are not \"SQLite format 3\")",
        ));
    }
    Ok(f)
}

fn open_connection(path: &Path) -> Result<Connection> {
    let p = path.display();
    let c = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| SqliteError::db(&p, format!("cannot open: {e}")))?;
    c.busy_timeout(LOCK_WAIT).map_err(|e| SqliteError::sql(&p, e))?;
    // Closing our connections must not checkpoint: the WAL is the application's and ours.
    c.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true).map_err(|e| SqliteError::sql(&p, e))?;
    c.execute_batch("PRAGMA wal_autocheckpoint = 0").map_err(|e| SqliteError::sql(&p, e))?;
    Ok(c)
}

impl Db {
    /// Opens the database, switches it to WAL mode and resumes or starts a generation.
    pub fn open(spec: &DbSpec, shared: Arc<Shared>) -> Result<Db> {
        let path = &spec.path;
        let p = path.display().to_string();
        let file = open_sqlite_file(path)?;
        let ino = file.metadata().map_err(|e| SqliteError::io(&p, e))?.ino();
        *shared.db_file.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(file));
        let reader = open_connection(path)?;
        let mode: String = reader.query_row("PRAGMA journal_mode", [], |r| r.get(0)).map_err(|e| {
            if is_busy(&e) {
                SqliteError::db(&p, format!("cannot switch it to WAL mode: {e} (another process holds a lock on it, e.g. a rollback-journal transaction)"))
            } else {
                SqliteError::db(&p, format!("cannot read it as a SQLite database: {e}"))
            }
        })?;
        if !mode.eq_ignore_ascii_case("wal") {
            let switched: std::result::Result<String, _> =
                reader.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0));
            match switched {
                Ok(m) if m.eq_ignore_ascii_case("wal") => {
                    tracing::info!(db = %p, from = %mode, "switched the database to WAL mode")
                }
                Ok(m) => {
                    return Err(SqliteError::db(
                        &p,
                        format!("cannot switch from journal_mode={mode} to WAL (SQLite answered {m}); replication needs WAL mode"),
                    ))
                }
                Err(e) => {
                    return Err(SqliteError::db(
                        &p,
                        format!("cannot switch from journal_mode={mode} to WAL: {e} (is another process holding it open in rollback-journal mode, or is its directory read-only?)"),
                    ))
                }
            }
        }
        let locker = open_connection(path)?;
        fs::create_dir_all(&shared.meta_dir).map_err(|e| {
            SqliteError::db(&p, format!("cannot create the shadow directory {}: {e}", shared.meta_dir.display()))
        })?;
        let mut db = Db {
            wal_path: PathBuf::from(format!("{p}-wal")),
            shared,
            reader,
            locker,
            ino,
            shadow: None,
            min_checkpoint_pages: spec.min_checkpoint_pages,
            max_wal_bytes: spec.max_wal_bytes,
            max_shadow_bytes: spec.max_shadow_bytes,
            buf: Vec::new(),
            clean_end: std::cell::Cell::new(None),
            forced_after: None,
            forced_backoff: FORCED_BACKOFF_MIN,
        };
        db.start()?;
        Ok(db)
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    fn p(&self) -> String {
        self.shared.path.display().to_string()
    }

    fn sql<T>(&self, r: rusqlite::Result<T>) -> Result<T> {
        r.map_err(|e| SqliteError::sql(self.p(), e))
    }

    /// `BEGIN IMMEDIATE` on the locker: false when the application held the lock too long.
    /// SQLite's busy handler sleeps for growing intervals and loses to a writer in a tight
    /// loop; trying again every 100 µs takes the lock in the gap between two transactions.
    fn lock(&self, wait: Duration) -> Result<bool> {
        self.sql(self.locker.busy_timeout(Duration::ZERO))?;
        let deadline = Instant::now() + wait;
        loop {
            match self.locker.execute_batch("BEGIN IMMEDIATE") {
                Ok(()) => return Ok(true),
                Err(e) if is_busy(&e) => {
                    if !self.locker.is_autocommit() {
                        let _ = self.locker.execute_batch("ROLLBACK");
                    }
                    if Instant::now() >= deadline {
                        return Ok(false);
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
                Err(e) => return Err(SqliteError::sql(self.p(), e)),
            }
        }
    }

    fn unlock(&self) -> Result<()> {
        self.sql(self.locker.execute_batch("ROLLBACK"))
    }

    fn begin_read(&self) -> Result<()> {
        self.sql(self.reader.execute_batch("BEGIN DEFERRED"))?;
        self.sql(self.reader.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0)))?;
        Ok(())
    }

    fn end_read(&self) -> Result<()> {
        self.clean_end.set(None);
        if !self.reader.is_autocommit() {
            self.sql(self.reader.execute_batch("ROLLBACK"))?;
        }
        Ok(())
    }

    fn read_wal_header(&self) -> Result<Option<([u8; HEADER_SIZE], WalHeader)>> {
        let mut f = match File::open(&self.wal_path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(SqliteError::io(self.wal_path.display(), e)),
        };
        let mut raw = [0u8; HEADER_SIZE];
        match f.read_exact(&mut raw) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(SqliteError::io(self.wal_path.display(), e)),
        }
        match wal::parse_header(&raw) {
            Ok(h) => Ok(Some((raw, h))),
            // Half-written by a restart in progress: look again at the next tick.
            Err(_) => Ok(None),
        }
    }

    /// Takes the write lock, makes sure a WAL exists, resumes the shadow or starts a new
    /// generation, and begins the read transaction.
    fn start(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.lock(LOCK_WAIT)? {
            if Instant::now() > deadline {
                return Err(SqliteError::db(self.p(), "the write lock has been held by another connection for 30 s"));
            }
        }
        let r = self.start_locked();
        let u = self.unlock();
        r?;
        u
    }

    fn start_locked(&mut self) -> Result<()> {
        if self.read_wal_header()?.is_none() {
            // No WAL yet: rewrite the user version with its own value so SQLite writes one.
            let v: i64 = self.sql(self.locker.query_row("PRAGMA user_version", [], |r| r.get(0)))?;
            self.sql(self.locker.execute_batch(&format!("PRAGMA user_version = {v}; COMMIT")))?;
            if !self.lock(Duration::from_secs(30))? {
                return Err(SqliteError::db(self.p(), "the write lock has been held by another connection for 30 s"));
            }
        }
        match self.resume()? {
            Ok(()) => tracing::info!(db = %self.p(), generation = %self.generation(), "resuming replication"),
            Err(why) => self.new_generation_locked(&why)?,
        }
        self.copy_locked()?;
        self.end_read()?;
        self.begin_read()?;
        Ok(())
    }

    pub fn generation(&self) -> String {
        self.shadow.as_ref().map(|s| s.generation.clone()).unwrap_or_default()
    }

    /// Loads the shadow WAL left by a previous run and checks that the database's WAL still
    /// continues it. `Ok(Err(reason))` when it does not.
    fn resume(&mut self) -> Result<std::result::Result<(), String>> {
        let meta = &self.shared.meta_dir;
        let (generation, seq) = match read_generation_file(meta) {
            Some(g) => g,
            None => return Ok(Err("no previous replication state".into())),
        };
        let dir = meta.join("generations").join(&generation).join("wal");
        let index = match fs::read_dir(&dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    u64::from_str_radix(n.strip_suffix(".wal")?, 16).ok()
                })
                .max(),
            Err(_) => None,
        };
        let Some(index) = index else {
            return Ok(Err(format!("the shadow WAL of generation {generation} is missing")));
        };
        let path = shadow_path(meta, &generation, index);
        let bytes = fs::read(&path).map_err(|e| SqliteError::io(path.display(), e))?;
        let Ok(c) = wal::committed_prefix(&bytes) else {
            return Ok(Err(format!("the shadow WAL {} is damaged", path.display())));
        };
        let Some((raw, header)) = self.read_wal_header()? else {
            return Ok(Err("the database has no WAL".into()));
        };
        if raw[..] != bytes[..HEADER_SIZE] {
            return Ok(Err("the database's WAL does not continue the shadow WAL (restarted, truncated or replaced while cloud-dump was not following it)".into()));
        }
        if c.end > HEADER_SIZE as u64 {
            // The last copied frame must still be in the WAL, with the same running checksum.
            let frame = (FRAME_HEADER_SIZE + header.page_size as usize) as u64;
            let mut f = File::open(&self.wal_path).map_err(|e| SqliteError::io(self.wal_path.display(), e))?;
            let mut fh = [0u8; FRAME_HEADER_SIZE];
            let ok = f.seek(SeekFrom::Start(c.end - frame)).is_ok() && f.read_exact(&mut fh).is_ok() && {
                let h = wal::parse_frame_header(&fh);
                h.checksum == c.checksum && h.salt1 == header.salt1 && h.salt2 == header.salt2
            };
            if !ok {
                return Ok(Err("the database's WAL no longer holds the frames cloud-dump copied last".into()));
            }
        }
        let file =
            OpenOptions::new().read(true).write(true).open(&path).map_err(|e| SqliteError::io(path.display(), e))?;
        // Drop a half-appended tail left by a crash.
        file.set_len(c.end).map_err(|e| SqliteError::io(path.display(), e))?;
        self.shadow =
            Some(Shadow { generation, seq, index, raw_header: raw, header, end: c.end, checksum: c.checksum, file });
        self.publish();
        Ok(Ok(()))
    }

    /// Starts a generation from the WAL as it is now. The caller holds the write lock.
    fn new_generation_locked(&mut self, why: &str) -> Result<()> {
        let generation = layout::new_generation();
        // Strictly after the previous generation, whatever the clock says.
        let prev = self
            .shadow
            .as_ref()
            .map(|s| s.seq)
            .or_else(|| read_generation_file(&self.shared.meta_dir).map(|g| g.1))
            .unwrap_or(0);
        let seq = (prev + 1).max(now_ms().max(0) as u64);
        let Some((raw, header)) = self.read_wal_header()? else {
            return Err(SqliteError::db(self.p(), "the database has no WAL to start a generation from"));
        };
        self.shadow = Some(Shadow::create(
            &self.shared.meta_dir,
            generation.clone(),
            seq,
            0,
            raw,
            header,
            self.shared.file_mode(),
        )?);
        self.copy_frames()?;
        let meta = &self.shared.meta_dir;
        let tmp = meta.join("generation.tmp");
        {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            let mode = self.shared.file_mode();
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&tmp)
                .map_err(|e| SqliteError::io(tmp.display(), e))?;
            f.set_permissions(fs::Permissions::from_mode(mode))
                .and_then(|_| f.write_all(format!("{generation} {seq}\n").as_bytes()))
                .and_then(|_| f.sync_all())
                .map_err(|e| SqliteError::io(tmp.display(), e))?;
        }
        fs::rename(&tmp, meta.join("generation")).map_err(|e| SqliteError::io(meta.display(), e))?;
        File::open(meta).and_then(|f| f.sync_all()).map_err(|e| SqliteError::io(meta.display(), e))?;
        self.shared.metrics.generations.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(db = %self.p(), %generation, reason = why, "starting a new generation (a full snapshot will be uploaded)");
        self.publish();
        Ok(())
    }

    fn publish(&self) {
        if let Some(s) = &self.shadow {
            let pos = ShadowPos {
                generation: s.generation.clone(),
                seq: s.seq,
                index: s.index,
                end: s.end,
                time_ms: now_ms(),
            };
            self.shared.pos.send_if_modified(|old| {
                if old.generation != pos.generation || old.index != pos.index || old.end != pos.end {
                    *old = pos;
                    true
                } else {
                    false
                }
            });
        }
    }

    /// Copies committed frames after the shadow's end into the shadow file.
    fn copy_frames(&mut self) -> Result<u64> {
        let f = match File::open(&self.wal_path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(SqliteError::io(self.wal_path.display(), e)),
        };
        let mut buf = std::mem::take(&mut self.buf);
        let r = self.copy_chunks(&f, &mut buf);
        // A buffer grown for one large transaction is not kept for the life of the process.
        if buf.capacity() > 2 * READ_CHUNK {
            buf = Vec::new();
        }
        self.buf = buf;
        let copied = r?;
        if copied > 0 {
            let sh = self.shadow.as_mut().expect("a shadow WAL");
            sh.file.sync_data().map_err(|e| SqliteError::io("shadow WAL", e))?;
            self.shared.metrics.wal_bytes.fetch_add(copied, Ordering::Relaxed);
        }
        Ok(copied)
    }

    fn copy_chunks(&mut self, f: &File, buf: &mut Vec<u8>) -> Result<u64> {
        let sh = self.shadow.as_mut().expect("a shadow WAL");
        let frame = FRAME_HEADER_SIZE + sh.header.page_size as usize;
        // Start small: past the frames just committed the file usually holds stale frames of
        // an earlier WAL, not worth reading. Grow while the chain of valid frames goes on.
        let max_chunk = (READ_CHUNK / frame).max(1) * frame;
        let mut chunk = frame * 16;
        let mut copied = 0u64;
        loop {
            buf.resize(chunk, 0);
            let mut n = 0;
            while n < chunk {
                match f.read_at(&mut buf[n..chunk], sh.end + n as u64) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) => return Err(SqliteError::io(self.wal_path.display(), e)),
                }
            }
            let whole = n - n % frame;
            let s = wal::scan(&sh.header, &buf[..whole], sh.checksum);
            if s.len > 0 {
                let sp = shadow_path(&self.shared.meta_dir, &sh.generation, sh.index);
                sh.file.write_all_at(&buf[..s.len], sh.end).map_err(|e| SqliteError::io(sp.display(), e))?;
                sh.end += s.len as u64;
                sh.checksum = s.checksum;
                copied += s.len as u64;
            }
            // Stop where the chain of valid frames ends (or the file does); read on, with a
            // larger chunk, when it runs past this one (one transaction may be larger still).
            if s.valid < whole || n < chunk {
                return Ok(copied);
            }
            if s.len == 0 {
                chunk *= 2;
            } else {
                chunk = (chunk * 2).min(max_chunk);
            }
        }
    }

    /// Follows the WAL: new frames, or a restart that continues the WAL we copied.
    fn copy_inner(&mut self) -> Result<Copied> {
        let Some((raw, header)) = self.read_wal_header()? else {
            return Ok(Copied::Bytes(0));
        };
        let sh = self.shadow.as_ref().expect("a shadow WAL");
        if raw != sh.raw_header {
            // SQLite restarted the WAL: the new header must be the next one (salt-1 + 1; the
            // checkpoint sequence is kept per connection, so it proves nothing), and every
            // frame the old WAL committed must be ours.
            if header.salt1 != sh.header.salt1.wrapping_add(1) {
                return Ok(Copied::Discontinuity(format!(
                    "the WAL was replaced by one that does not follow the WAL cloud-dump copied (salt {:08x} after {:08x})",
                    header.salt1, sh.header.salt1
                )));
            }
            // The new WAL overwrites the file from the start. While it has not reached our
            // end, frames the old WAL committed after our last copy are still there: copy
            // them. Looking at the frame header at our end before and after tells whether
            // the new WAL got there (a frame's header is written before its page).
            let old_end = sh.end;
            // A WAL shorter than what we copied was truncated (wal_checkpoint(TRUNCATE),
            // journal_size_limit): frames the old WAL committed after our copy may be gone
            // with it. Nothing proves otherwise, so the chain is not continued.
            let len = fs::metadata(&self.wal_path).map(|m| m.len()).unwrap_or(0);
            if len < old_end && self.clean_end.get() != Some(old_end) {
                return Ok(Copied::Discontinuity(format!(
                    "the WAL was truncated to {len} bytes (wal_checkpoint(TRUNCATE) or journal_size_limit) before cloud-dump could prove it had copied all of it (it had {old_end})"
                )));
            }
            let new_salts = (header.salt1, header.salt2);
            let untouched_before = self.frame_salts_at(old_end)? != Some(new_salts);
            let recovered = if untouched_before { self.copy_frames()? } else { 0 };
            let untouched_after = self.frame_salts_at(old_end)? != Some(new_salts);
            if !(untouched_before && untouched_after) {
                return Ok(Copied::Discontinuity(
                    "the WAL restarted and was overwritten past the last frame cloud-dump had copied".into(),
                ));
            }
            if recovered > 0 {
                tracing::debug!(db = %self.p(), bytes = recovered, "copied the end of the previous WAL after its restart");
            }
            let sh = self.shadow.as_ref().expect("a shadow WAL");
            let (generation, seq, index) = (sh.generation.clone(), sh.seq, sh.index + 1);
            self.shadow = Some(Shadow::create(
                &self.shared.meta_dir,
                generation,
                seq,
                index,
                raw,
                header,
                self.shared.file_mode(),
            )?);
            self.clean_end.set(None);
            tracing::debug!(db = %self.p(), index, "the WAL restarted after our checkpoint; next shadow WAL");
        }
        Ok(Copied::Bytes(self.copy_frames()?))
    }

    /// The salts of the frame at `off` in the WAL file (`None` past its end).
    fn frame_salts_at(&self, off: u64) -> Result<Option<(u32, u32)>> {
        use std::os::unix::fs::FileExt;
        let f = match File::open(&self.wal_path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(SqliteError::io(self.wal_path.display(), e)),
        };
        let mut fh = [0u8; FRAME_HEADER_SIZE];
        match f.read_exact_at(&mut fh, off) {
            Ok(()) => {
                let h = wal::parse_frame_header(&fh);
                Ok(Some((h.salt1, h.salt2)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(SqliteError::io(self.wal_path.display(), e)),
        }
    }

    /// [`Db::copy`] with the write lock already held.
    fn copy_locked(&mut self) -> Result<()> {
        if let Copied::Discontinuity(why) = self.copy_inner()? {
            self.new_generation_locked(&why)?;
        }
        self.publish();
        Ok(())
    }

    fn copy(&mut self) -> Result<u64> {
        match self.copy_inner()? {
            Copied::Bytes(n) => {
                self.publish();
                Ok(n)
            }
            Copied::Discontinuity(why) => {
                // Stand the WAL still, then start over from what is there.
                let shared = self.shared.clone();
                let _gate = shared.gate.write().unwrap_or_else(|e| e.into_inner());
                while !self.lock(LOCK_WAIT)? {}
                let r = (|| {
                    self.new_generation_locked(&why)?;
                    self.end_read()?;
                    self.begin_read()?;
                    Ok(0)
                })();
                self.unlock()?;
                r
            }
        }
    }

    /// One monitoring step: copy what is new, checkpoint when the WAL is large.
    /// `Err(`[`SqliteError::Replaced`]`)` means the caller must reopen.
    pub fn tick(&mut self) -> Result<()> {
        match fs::metadata(&self.shared.path) {
            Ok(m) if m.ino() == self.ino => {}
            Ok(_) => return Err(SqliteError::Replaced { path: self.p() }),
            Err(e) => return Err(SqliteError::io(self.p(), e)),
        }
        self.copy()?;
        let wal_file = fs::metadata(&self.wal_path).map(|m| m.len()).unwrap_or(0);
        self.shared.metrics.wal_size.store(wal_file, Ordering::Relaxed);
        // The WAL file keeps its largest size (SQLite overwrites it from the start after a
        // restart); what we bound is the WAL in use: the frames since the last restart.
        let sh = self.shadow.as_ref().expect("a shadow WAL");
        let frame = (FRAME_HEADER_SIZE + sh.header.page_size as usize) as u64;
        let pages = (sh.end - HEADER_SIZE as u64) / frame;
        let forced_due = self.forced_after.is_none_or(|t| Instant::now() >= t);
        if sh.end >= self.max_wal_bytes && forced_due {
            // Past max-wal-size. Readers on old snapshots can keep any checkpoint from
            // completing; then back off (1 s, doubling to 60 s) instead of retrying at every
            // tick: the application must never wait on us.
            if self.checkpoint(true)? {
                self.forced_after = None;
                self.forced_backoff = FORCED_BACKOFF_MIN;
            } else {
                self.forced_after = Some(Instant::now() + self.forced_backoff);
                self.forced_backoff = (self.forced_backoff * 2).min(FORCED_BACKOFF_MAX);
            }
        } else if pages >= self.min_checkpoint_pages && sh.end < self.max_wal_bytes {
            self.checkpoint(false)?;
        }
        self.prune_shadow();
        Ok(())
    }

    /// Our checkpoint, in two steps so the application is held back as briefly as possible.
    /// First, without any lock: end our read transaction, `wal_checkpoint(PASSIVE)` (the
    /// bulk of the page copying and the fsync), begin it again. Then with the write lock:
    /// copy to the end of the WAL, checkpoint the few frames written meanwhile (retrying for
    /// up to 50 ms if the application's own autocheckpoint is busy), begin the read
    /// transaction again, release. The next write restarts the WAL; we look at it every
    /// 2 ms (for up to 100 ms) so the restart is followed, and any tail of the old WAL
    /// copied, long before the new WAL could overwrite it. Forced (the WAL in use reached
    /// `max-wal-size`): the locked step retries for up to 5 s while readers finish.
    pub fn checkpoint(&mut self, forced: bool) -> Result<bool> {
        let shared = self.shared.clone();
        // Never wait for the gate: a snapshot holding it may be stalled on a slow or hung
        // store, and the database thread must go on copying (the next tick tries again).
        let gate = match shared.gate.try_write() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                tracing::debug!(db = %self.p(), forced, "checkpoint postponed: a snapshot is reading the database");
                return Ok(false);
            }
        };
        let salt = self.shadow.as_ref().map(|s| s.header.salt1);
        let r = self.checkpoint_gated(forced);
        drop(gate);
        if r.is_err() {
            self.shared.metrics.checkpoint_errors.fetch_add(1, Ordering::Relaxed);
        }
        let full = r?;
        if full {
            // Only the 32-byte header is read while waiting; the copy runs once it changed.
            let until = Instant::now() + Duration::from_millis(100);
            while Instant::now() < until {
                std::thread::sleep(Duration::from_millis(2));
                if self.read_wal_header()?.map(|(_, h)| h.salt1) != salt {
                    self.copy()?;
                    break;
                }
            }
        }
        Ok(full)
    }

    fn checkpoint_gated(&mut self, forced: bool) -> Result<bool> {
        {
            // A read transaction on the locker, begun before the copy, keeps the passive
            // step from checkpointing frames we have not copied: the WAL cannot be fully
            // checkpointed — so not restarted and truncated by the application — meanwhile.
            self.sql(self.locker.execute_batch("BEGIN DEFERRED"))?;
            self.sql(self.locker.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0)))?;
            let copied = self.copy_inner();
            let discontinuity = matches!(copied, Ok(Copied::Discontinuity(_)));
            let step = match copied {
                Ok(Copied::Bytes(_)) => {
                    self.publish();
                    // The bulk of the work, writers going on.
                    self.end_read().and_then(|_| {
                        let first = self.passive();
                        self.begin_read()?;
                        first
                    })
                }
                Ok(Copied::Discontinuity(_)) => Ok(false),
                Err(e) => Err(e),
            };
            let _ = self.locker.execute_batch("ROLLBACK");
            step?;
            if discontinuity {
                // The next tick starts the new generation (it needs the gate we hold).
                return Ok(false);
            }
        }
        if !self.lock(LOCK_WAIT)? {
            tracing::debug!(db = %self.p(), forced, "checkpoint postponed: the application held the write lock");
            // The passive step may have moved frames past our position into the database
            // file: copy up to the WAL's end first, so a snapshot waiting on the gate is
            // labelled with a position at least that far.
            if let Copied::Bytes(_) = self.copy_inner()? {
                self.publish();
            }
            return Ok(false);
        }
        let r = self.checkpoint_locked(forced);
        let u = self.unlock();
        let full = r?;
        u?;
        Ok(full)
    }

    /// One `wal_checkpoint(PASSIVE)`: true when every frame of the WAL is in the database.
    fn passive(&self) -> Result<bool> {
        let (busy, log, done): (i64, i64, i64) =
            self.sql(
                self.reader.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))),
            )?;
        Ok(busy == 0 && log == done)
    }

    fn checkpoint_locked(&mut self, forced: bool) -> Result<bool> {
        self.copy_locked()?;
        self.end_read()?;
        // The application's own autocheckpoint may hold the checkpoint lock for a moment.
        // Under the write lock only briefly: readers on old snapshots are never waited for.
        let deadline = Instant::now() + LOCKED_RETRY;
        let full = loop {
            let full = self.passive();
            if !matches!(full, Ok(false)) || Instant::now() > deadline {
                if matches!(full, Ok(false)) && forced {
                    tracing::warn!(db = %self.p(), "forced checkpoint incomplete: other readers hold old snapshots; trying again later (the WAL grows until they finish)");
                }
                break full;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        self.begin_read()?;
        let full = full?;
        if full {
            // Everything is copied (under the lock) and checkpointed; our new read
            // transaction pins this state (see `clean_end`).
            self.clean_end.set(self.shadow.as_ref().map(|s| s.end));
        }
        self.shared.metrics.checkpoints.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(db = %self.p(), full, forced, "checkpoint");
        Ok(full)
    }

    /// Keeps the shadow directory within `max-shadow-size`: past it, every shadow file but
    /// the current one goes, whatever the replicas have uploaded. A replica that was behind
    /// (its store down) then finds its next shadow file missing and takes a new snapshot.
    fn bound_shadow(&self, sh: &Shadow) {
        let gens = self.shared.meta_dir.join("generations");
        let size = |dir: &Path| -> u64 {
            let mut total = 0;
            for g in fs::read_dir(dir).into_iter().flatten().flatten() {
                for f in fs::read_dir(g.path().join("wal")).into_iter().flatten().flatten() {
                    total += f.metadata().map(|m| m.len()).unwrap_or(0);
                }
            }
            total
        };
        let mut total = size(&gens);
        if total > self.max_shadow_bytes {
            for g in fs::read_dir(&gens).into_iter().flatten().flatten() {
                if g.file_name().to_string_lossy() != sh.generation {
                    let _ = fs::remove_dir_all(g.path());
                    continue;
                }
                for f in fs::read_dir(g.path().join("wal")).into_iter().flatten().flatten() {
                    let n = f.file_name().to_string_lossy().into_owned();
                    if n.strip_suffix(".wal")
                        .and_then(|s| u64::from_str_radix(s, 16).ok())
                        .is_some_and(|i| i < sh.index)
                    {
                        let _ = fs::remove_file(f.path());
                    }
                }
            }
            let after = size(&gens);
            if after == total {
                // Only the current shadow file: nothing more can go (it is the WAL since its
                // last restart, bounded by max-wal-size while checkpoints complete).
                self.shared.metrics.shadow_bytes.store(total, Ordering::Relaxed);
                return;
            }
            tracing::warn!(
                db = %self.p(),
                bytes = total,
                limit = self.max_shadow_bytes,
                kept = after,
                "the shadow WAL passed max-shadow-size: a replica is too far behind (its store down?); it resumes from a new snapshot"
            );
            total = after;
        }
        self.shared.metrics.shadow_bytes.store(total, Ordering::Relaxed);
    }

    /// Removes shadow files every replica has uploaded.
    fn prune_shadow(&self) {
        let Some(sh) = &self.shadow else { return };
        self.bound_shadow(sh);
        let positions = self.shared.replica_pos.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if positions.iter().any(|p| p.is_none()) {
            return;
        }
        let min_index = positions.iter().flatten().filter(|(g, _)| *g == sh.generation).map(|(_, i)| *i).min();
        let all_current = positions.iter().flatten().all(|(g, _)| *g == sh.generation);
        let gens = self.shared.meta_dir.join("generations");
        let Ok(rd) = fs::read_dir(&gens) else { return };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name != sh.generation {
                if all_current {
                    let _ = fs::remove_dir_all(e.path());
                }
                continue;
            }
            let Some(min_index) = min_index else { continue };
            let Ok(files) = fs::read_dir(e.path().join("wal")) else { continue };
            for f in files.flatten() {
                let n = f.file_name().to_string_lossy().into_owned();
                if let Some(i) = n.strip_suffix(".wal").and_then(|s| u64::from_str_radix(s, 16).ok()) {
                    if i < min_index {
                        let _ = fs::remove_file(f.path());
                    }
                }
            }
        }
    }

    /// Last copy before exit. The connections close without checkpointing.
    pub fn close(mut self) -> Result<()> {
        let r = self.copy();
        self.end_read()?;
        r.map(|_| ())
    }
}
