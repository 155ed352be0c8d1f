//! The SQLite dialect and how the store opens its file: the embedded store, the same
//! contract as the MySQL one, for a single instance with no infrastructure.
//!
//! SQLite has no row locks, so "one run per product" (G7) and the ordering of
//! registrations rest on its single writer: every transaction starts with
//! `BEGIN IMMEDIATE` (the dialect's `BEGIN`: it takes the write lock before reading),
//! on a pool of one connection, so read-check-write sequences cannot interleave — not
//! between tasks, and not with another process opening the same file. The partial unique index on
//! in-progress runs backs it. Reads that need no transaction go to a separate pool: in
//! WAL mode they never wait for the writer.

use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, TimeDelta, Utc};
use libsqlite3_sys::{
    SQLITE_BUSY, SQLITE_CANTOPEN, SQLITE_FULL, SQLITE_IOERR, SQLITE_LOCKED, SQLITE_READONLY,
};
use sqlx::Sqlite;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteQueryResult,
};

use super::dialect::Dialect;
use super::sql::SqlStore;

/// The embedded store.
pub type SqliteStore = SqlStore<SqliteDialect>;

pub struct SqliteDialect;

impl Dialect for SqliteDialect {
    type DB = Sqlite;
    /// Timestamps are RFC 3339 text in UTC.
    type Stamp = DateTime<Utc>;

    /// The transaction holds the write lock of the whole database already.
    const LOCK: &'static str = "";
    const LOCK_SKIP_LOCKED: &'static str = "";
    /// Unix microseconds, so that lease deadlines compare as numbers.
    const INSTANT: &'static str = "?";
    const STAMP: &'static str = "?";
    /// Takes the write lock before the first read.
    const BEGIN: Option<&'static str> = Some("BEGIN IMMEDIATE");
    /// SQLite has no DELETE ... LIMIT (unless built for it): the oldest keys are picked
    /// through ix_tik_created and deleted by primary key.
    const DELETE_EXPIRED_KEYS: &'static str = "DELETE FROM trigger_idempotency_key WHERE id IN \
         (SELECT id FROM trigger_idempotency_key INDEXED BY ix_tik_created \
          WHERE created_at <= ? ORDER BY created_at LIMIT ?)";

    const SWEEP_DELETE: &'static str = "DELETE FROM product_user_notification_history \
         WHERE id IN (SELECT id FROM product_user_notification_history \
         WHERE product_id = ? AND restock_round = ? LIMIT ?)";
    const SWEEP_LOCK: Option<&'static str> = None;
    /// One writer at a time already; a statement waits for the writer lock as any.
    const SWEEP_SESSION: &'static [&'static str] = &[];

    fn instant(now: DateTime<Utc>, offset: TimeDelta) -> i64 {
        Self::stamp(now, offset).timestamp_micros()
    }

    fn stamp(now: DateTime<Utc>, offset: TimeDelta) -> DateTime<Utc> {
        now.checked_add_signed(offset)
            .unwrap_or(if offset < TimeDelta::zero() {
                DateTime::<Utc>::MIN_UTC
            } else {
                DateTime::<Utc>::MAX_UTC
            })
    }

    fn on_conflict(key: &str) -> String {
        format!(" ON CONFLICT ({key}) DO UPDATE SET ")
    }

    /// SQLite refuses the query, rather than scan, should the index not serve it.
    fn use_index(index: &str) -> String {
        format!(" INDEXED BY {index}")
    }

    fn rows_affected(done: &SqliteQueryResult) -> u64 {
        done.rows_affected()
    }

    fn last_insert_id(done: &SqliteQueryResult) -> i64 {
        done.last_insert_rowid()
    }

    /// One instance on one host: its own clock is the clock.
    async fn clock(_pool: &SqlitePool) -> Result<DateTime<Utc>, sqlx::Error> {
        Ok(Utc::now())
    }

    /// The primary result code, the low byte of an extended one.
    fn code(err: &dyn sqlx::error::DatabaseError) -> Option<i64> {
        err.code()?.parse::<i64>().ok().map(|code| code & 0xff)
    }

    /// A file that cannot be written at the moment: busy or locked past the timeout,
    /// read-only (a read-only mount or file, a standby copy), an I/O error, a full disk,
    /// a file that cannot be opened.
    const UNAVAILABLE: &'static [i64] = &[
        SQLITE_BUSY as i64,
        SQLITE_LOCKED as i64,
        SQLITE_READONLY as i64,
        SQLITE_IOERR as i64,
        SQLITE_FULL as i64,
        SQLITE_CANTOPEN as i64,
    ];

    /// None: the single writer orders transactions instead; one waits for the write
    /// lock (up to the busy timeout), it never deadlocks.
    const DEADLOCKED: &'static [i64] = &[];
}

/// Read-only connections when RESTOCK_DB_POOL_SIZE is not set: one per core of this
/// instance (WAL readers run in parallel and never wait for the writer), at least the 4
/// the store always had and at most 16. The writer is always one connection.
fn default_readers() -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    cores.clamp(4, 16)
}

impl SqliteStore {
    /// Opens (creating if needed) the database file of a `sqlite://path` URL and applies
    /// migrations.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        Self::connect_with_readers(url, None).await
    }

    /// As [`SqliteStore::connect`], with `readers` read-only connections at most
    /// (`None`: a default from the instance's cores).
    pub async fn connect_with_readers(
        url: &str,
        readers: Option<NonZeroU32>,
    ) -> anyhow::Result<Self> {
        let options = SqliteConnectOptions::from_str(url)
            .with_context(|| format!("DATABASE_URL {url:?} is not a valid sqlite:// URL"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(5));
        let in_memory = options.get_filename().as_os_str() == ":memory:";
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await
            .with_context(|| format!("cannot open the SQLite database of DATABASE_URL {url:?}"))?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&writer)
            .await
            .context("cannot apply the SQLite migrations")?;
        // An in-memory database exists once per connection: readers must share it.
        let reader = if in_memory {
            writer.clone()
        } else {
            SqlitePoolOptions::new()
                .max_connections(readers.map_or_else(default_readers, NonZeroU32::get))
                .connect_with(options.read_only(true))
                .await
                .with_context(|| format!("cannot open DATABASE_URL {url:?} for reading"))?
        };
        Ok(Self::new(writer, reader))
    }
}
