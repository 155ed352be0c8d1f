//! What one SQL database says differently: the words the shared flows of `sql.rs` leave
//! to it (row locks, the clock, upserts, index hints), its transactions, and which of
//! its errors mean "try later" or "try again".

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use sqlx::{Database, Encode, Type};

use super::backend_error;
use crate::domain::Error;

/// One database's dialect. Every statement is written once, in `sql.rs`, with these
/// fragments in it; a fragment that stands for a value consumes exactly one bind in
/// every dialect, so a statement binds the same values in the same order on both.
pub trait Dialect: Send + Sync + 'static {
    type DB: Database;

    /// What a timestamp column (`updated_at`, `next_wave_at`, ...) is bound as: see
    /// [`Dialect::STAMP`].
    type Stamp: for<'q> Encode<'q, Self::DB> + Type<Self::DB> + Send + 'static;

    /// Appended to a `SELECT` in a transaction to lock the rows it reads until the
    /// transaction ends; empty where the transaction holds the whole database already.
    const LOCK: &'static str;

    /// Like [`Dialect::LOCK`], but a row another session holds locked is left out
    /// rather than waited for (G8: a takeover is never held up by a cut-off session).
    const LOCK_SKIP_LOCKED: &'static str;

    /// A moment for a column compared as an instant (`lease_until`, the keys'
    /// `created_at`): one bind, made by [`Dialect::instant`].
    const INSTANT: &'static str;

    /// A moment for a timestamp column: one bind, made by [`Dialect::stamp`].
    const STAMP: &'static str;

    /// The statement that opens a write transaction (`None`: the driver's own).
    const BEGIN: Option<&'static str>;

    /// Deletes up to `LIMIT ?` idempotency keys created at or before an
    /// [`Dialect::INSTANT`], oldest first; binds the instant, then the limit.
    const DELETE_EXPIRED_KEYS: &'static str;

    /// Deletes up to `LIMIT ?` history rows of one run; binds the product, the round,
    /// then the limit. Served by the unique key's prefix (product, round).
    const SWEEP_DELETE: &'static str;

    /// Taken by the retention sweep on its connection first: `1` if this instance may
    /// sweep now (`None`: one instance by design, nothing to take).
    const SWEEP_LOCK: Option<&'static str>;

    /// Session settings of the sweep's connection, which is closed after it: short
    /// lock waits, and no gap locks that an insert of a run in progress could wait on.
    const SWEEP_SESSION: &'static [&'static str];

    /// The bind of an [`Dialect::INSTANT`]: `offset` from `now` on the database's clock.
    /// `now` is the process's clock at the statement, which a dialect whose server
    /// keeps the clock ignores.
    fn instant(now: DateTime<Utc>, offset: TimeDelta) -> i64;

    /// The bind of a [`Dialect::STAMP`], as [`Dialect::instant`].
    fn stamp(now: DateTime<Utc>, offset: TimeDelta) -> Self::Stamp;

    /// `ON ... UPDATE` of an upsert on `key` (the columns of a unique key), followed by
    /// the assignments; they assign bound values, never the inserted row's.
    fn on_conflict(key: &str) -> String;

    /// Names to the database the index a listing must read (see `list_runs`).
    fn use_index(index: &str) -> String;

    fn rows_affected(done: &<Self::DB as Database>::QueryResult) -> u64;

    fn last_insert_id(done: &<Self::DB as Database>::QueryResult) -> i64;

    /// The database's clock now (G11).
    fn clock(
        pool: &sqlx::Pool<Self::DB>,
    ) -> impl Future<Output = Result<DateTime<Utc>, sqlx::Error>> + Send;

    /// The database's own code of an error it answered with (an error number, a result
    /// code), as [`Dialect::UNAVAILABLE`] and [`Dialect::DEADLOCKED`] list them; `None`
    /// for an error of the driver or the connection.
    fn code(err: &dyn sqlx::error::DatabaseError) -> Option<i64>;

    /// Codes of a database that cannot take writes at the moment: retrying later, on a
    /// new connection, may work (UNAVAILABLE, not INTERNAL).
    const UNAVAILABLE: &'static [i64];

    /// Codes of a transaction that failed only because it lost a deadlock or a lock
    /// wait, so that running it again from the start may succeed.
    const DEADLOCKED: &'static [i64];

    /// Whether an error means the database cannot be reached or take writes at the
    /// moment (UNAVAILABLE: retrying later may work), rather than a failure (INTERNAL):
    /// the connection or the pool failed, or the database answered with one of
    /// [`Dialect::UNAVAILABLE`].
    fn unavailable(err: &sqlx::Error) -> bool {
        matches!(
            err,
            sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
        ) || Self::answered(err, Self::UNAVAILABLE)
    }

    /// Whether a transaction may be run again from the start: it lost a deadlock or a
    /// lock wait ([`Dialect::DEADLOCKED`]).
    fn deadlocked(err: &sqlx::Error) -> bool {
        Self::answered(err, Self::DEADLOCKED)
    }

    /// Whether the database answered with one of `codes`.
    fn answered(err: &sqlx::Error, codes: &[i64]) -> bool {
        err.as_database_error()
            .and_then(Self::code)
            .is_some_and(|code| codes.contains(&code))
    }

    /// The store's error for a driver error.
    fn error(err: sqlx::Error) -> Error {
        backend_error(Self::unavailable(&err), err)
    }
}

/// A signed offset from a standard duration, saturating.
pub fn delta(d: Duration) -> TimeDelta {
    TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX)
}
