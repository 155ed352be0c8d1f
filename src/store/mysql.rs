//! The MySQL dialect (MySQL 8.4, MariaDB 10.11) and how the store connects to it: the
//! production store. Rows are locked (`FOR UPDATE`), the server's clock stamps every
//! moment (G11), and a transaction that lost a deadlock is run again. Every query is
//! served by an index of `migrations/`; `sql.rs` names it where the choice is not
//! obvious.

use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, TimeDelta, Utc};
use sqlx::mysql::{
    MySqlConnectOptions, MySqlDatabaseError, MySqlPool, MySqlPoolOptions, MySqlQueryResult,
};
use sqlx::{ConnectOptions, Connection, MySql};

use super::dialect::Dialect;
use super::sql::SqlStore;

/// The production store.
pub type MySqlStore = SqlStore<MySqlDialect>;

pub struct MySqlDialect;

/// A lock wait ran out (`innodb_lock_wait_timeout`).
const ER_LOCK_WAIT_TIMEOUT: i64 = 1205;
/// The transaction was chosen as a deadlock's victim.
const ER_LOCK_DEADLOCK: i64 = 1213;
/// `--read-only` (or `--super-read-only`) prevents the statement.
const ER_OPTION_PREVENTS_STATEMENT: i64 = 1290;
/// A write in a transaction started READ ONLY.
const ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION: i64 = 1792;
/// `innodb_read_only` and the like.
const ER_READ_ONLY_MODE: i64 = 1836;
/// Galera: the node is not ready ("WSREP has not yet prepared node for application use").
const ER_UNKNOWN_COM_ERROR: i64 = 1047;
/// The server is shutting down.
const ER_SERVER_SHUTDOWN: i64 = 1053;

/// A moment on the server's clock: `?` microseconds from the statement's
/// `CURRENT_TIMESTAMP(6)` (constant within a statement, so two moments of one
/// statement agree).
const AT: &str = "CURRENT_TIMESTAMP(6) + INTERVAL ? MICROSECOND";

impl Dialect for MySqlDialect {
    type DB = MySql;
    /// Microseconds from the server's now.
    type Stamp = i64;

    const LOCK: &'static str = " FOR UPDATE";
    const LOCK_SKIP_LOCKED: &'static str = " FOR UPDATE SKIP LOCKED";
    const INSTANT: &'static str = AT;
    const STAMP: &'static str = AT;
    const BEGIN: Option<&'static str> = None;
    /// ix_tik_created serves the range, in order, and the LIMIT stops the scan.
    const DELETE_EXPIRED_KEYS: &'static str = "DELETE FROM trigger_idempotency_key \
         WHERE created_at <= CURRENT_TIMESTAMP(6) + INTERVAL ? MICROSECOND \
         ORDER BY created_at LIMIT ?";

    const SWEEP_DELETE: &'static str = "DELETE FROM product_user_notification_history \
         WHERE product_id = ? AND restock_round = ? LIMIT ?";
    /// A session lock: released with the sweep's connection, also when its instance
    /// dies, so one instance sweeps at a time without a lease to renew.
    const SWEEP_LOCK: Option<&'static str> = Some("SELECT GET_LOCK('restock-history-sweep', 0)");
    const SWEEP_SESSION: &'static [&'static str] = &[
        "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
        "SET SESSION innodb_lock_wait_timeout = 1",
    ];

    fn instant(_now: DateTime<Utc>, offset: TimeDelta) -> i64 {
        offset
            .num_microseconds()
            .unwrap_or(if offset < TimeDelta::zero() {
                i64::MIN
            } else {
                i64::MAX
            })
    }

    fn stamp(now: DateTime<Utc>, offset: TimeDelta) -> i64 {
        Self::instant(now, offset)
    }

    fn on_conflict(_key: &str) -> String {
        " ON DUPLICATE KEY UPDATE ".into()
    }

    fn use_index(index: &str) -> String {
        format!(" FORCE INDEX ({index})")
    }

    fn rows_affected(done: &MySqlQueryResult) -> u64 {
        done.rows_affected()
    }

    fn last_insert_id(done: &MySqlQueryResult) -> i64 {
        done.last_insert_id() as i64
    }

    async fn clock(pool: &MySqlPool) -> Result<DateTime<Utc>, sqlx::Error> {
        let now: chrono::NaiveDateTime = sqlx::query_scalar("SELECT UTC_TIMESTAMP(6)")
            .fetch_one(pool)
            .await?;
        Ok(now.and_utc())
    }

    fn code(err: &dyn sqlx::error::DatabaseError) -> Option<i64> {
        err.try_downcast_ref::<MySqlDatabaseError>()
            .map(|err| i64::from(err.number()))
    }

    /// A server that takes no writes at the moment, as a primary does that was demoted
    /// in a failover (read-only until the new primary is found), or a Galera node out
    /// of its cluster.
    const UNAVAILABLE: &'static [i64] = &[
        ER_OPTION_PREVENTS_STATEMENT,
        ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION,
        ER_READ_ONLY_MODE,
        ER_UNKNOWN_COM_ERROR,
        ER_SERVER_SHUTDOWN,
    ];

    const DEADLOCKED: &'static [i64] = &[ER_LOCK_DEADLOCK, ER_LOCK_WAIT_TIMEOUT];
}

/// Connections of the pool when RESTOCK_DB_POOL_SIZE is not set: four per core of this
/// instance (its run tasks, streams and takeover loop wait on the database more than
/// they compute), at least the 16 the store always had and at most 64, a share of a
/// server's default 151 connections that leaves room for other instances.
fn default_pool_size() -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    cores.saturating_mul(4).clamp(16, 64)
}

/// Server-side limits on every session of the service, set when a pooled connection
/// opens. Without them the server keeps a cut-off client's transaction open (and its
/// row locks held) until the connection times out at the TCP level, many seconds
/// later, and any session waits on a lock for 50 s by default: a dead owner could hold
/// a takeover far past lease + 5 s (G8). Each limit is a quarter of the lease (at
/// least a second, the servers' unit), so a session that went silent has been rolled
/// back well before its lease runs out; statements get half the lease.
#[derive(Debug, Clone, Copy)]
struct SessionLimits {
    /// `innodb_lock_wait_timeout`, `net_read_timeout`, `net_write_timeout` and, on
    /// MariaDB, `idle_transaction_timeout` (MySQL has none: there a session idle in a
    /// transaction is only ended by `wait_timeout`, which also ends idle pooled ones).
    seconds: u64,
    /// `max_statement_time` (MariaDB, seconds) or `max_execution_time` (MySQL, reads
    /// only, milliseconds).
    statement: Duration,
}

impl SessionLimits {
    fn for_lease(lease: Duration) -> Self {
        Self {
            seconds: (lease / 4).as_secs().max(1),
            statement: (lease / 2).max(Duration::from_secs(1)),
        }
    }

    fn sql(&self, mariadb: bool) -> String {
        let s = self.seconds;
        if mariadb {
            format!(
                "SET SESSION innodb_lock_wait_timeout = {s}, net_read_timeout = {s}, \
                 net_write_timeout = {s}, idle_transaction_timeout = {s}, \
                 max_statement_time = {:.3}",
                self.statement.as_secs_f64()
            )
        } else {
            format!(
                "SET SESSION innodb_lock_wait_timeout = {s}, net_read_timeout = {s}, \
                 net_write_timeout = {s}, max_execution_time = {}",
                self.statement.as_millis()
            )
        }
    }
}

impl MySqlStore {
    /// Connects, creating the database if it does not exist, and applies migrations.
    /// `lease` is the run lease (G8): the sessions' server-side limits derive from it.
    /// `pool_size` connections at most (`None`: a default from the instance's cores).
    pub async fn connect(
        url: &str,
        lease: Duration,
        pool_size: Option<NonZeroU32>,
    ) -> anyhow::Result<Self> {
        let options = MySqlConnectOptions::from_str(url)
            .context("DATABASE_URL is not a valid mysql:// URL")?;
        if let Some(database) = options.get_database() {
            // Connect without selecting the database, which may not exist yet.
            let server = options.clone().database("");
            let mut conn = MySqlConnectOptions::connect(&server)
                .await
                .with_context(|| {
                    format!(
                        "cannot connect to the MySQL server of DATABASE_URL at {}:{}",
                        options.get_host(),
                        options.get_port()
                    )
                })?;
            let quoted = database.replace('`', "``");
            sqlx::raw_sql(&format!("CREATE DATABASE IF NOT EXISTS `{quoted}`"))
                .execute(&mut conn)
                .await
                .with_context(|| format!("cannot create database {database:?} of DATABASE_URL"))?;
            conn.close().await.ok();
        }
        // Migrations run on a connection of their own, without the sessions' limits: a
        // migration of a large table may take longer than any statement of the engine.
        let mut conn = MySqlConnectOptions::connect(&options)
            .await
            .context("cannot connect to DATABASE_URL")?;
        sqlx::migrate!("./migrations/mysql")
            .run(&mut conn)
            .await
            .context("cannot apply the database migrations")?;
        let version: String = sqlx::query_scalar("SELECT VERSION()")
            .fetch_one(&mut conn)
            .await
            .context("cannot read the server version of DATABASE_URL")?;
        conn.close().await.ok();
        // 'static, as the pool's connect hook needs; one short string per store.
        let limits: &'static str = SessionLimits::for_lease(lease)
            .sql(version.contains("MariaDB"))
            .leak();
        let pool = MySqlPoolOptions::new()
            .max_connections(pool_size.map_or_else(default_pool_size, NonZeroU32::get))
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    sqlx::Executor::execute(conn, limits).await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .context("cannot connect to DATABASE_URL")?;
        Ok(Self::new(pool.clone(), pool))
    }
}

#[cfg(test)]
mod tests {
    use sqlx::{Connection as _, Executor as _, MySqlConnection};

    use super::*;
    use crate::domain::Error;

    /// A server that takes no writes answers with an error a caller may retry
    /// (UNAVAILABLE). A demoted primary's `--read-only` cannot be switched on for one
    /// test without stopping every other test's writes, so the same refusal comes from
    /// a read-only transaction, on the real server.
    #[tokio::test]
    async fn writes_refused_by_a_read_only_server_are_unavailable() {
        let server = std::env::var("TEST_DATABASE_URL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into());
        let database = format!("restock_unit_{:016x}", rand::random::<u64>());
        let mut conn = MySqlConnection::connect(&server).await.unwrap();
        conn.execute(format!("CREATE DATABASE {database}").as_str())
            .await
            .unwrap();
        conn.execute(format!("CREATE TABLE {database}.t (x INT)").as_str())
            .await
            .unwrap();
        conn.execute("SET SESSION TRANSACTION READ ONLY")
            .await
            .unwrap();
        conn.execute("START TRANSACTION").await.unwrap();
        let refused = conn
            .execute(format!("INSERT INTO {database}.t VALUES (1)").as_str())
            .await
            .unwrap_err();
        conn.execute("ROLLBACK").await.unwrap();
        conn.execute("SET SESSION TRANSACTION READ WRITE")
            .await
            .unwrap();
        conn.execute(format!("DROP DATABASE {database}").as_str())
            .await
            .unwrap();
        let Error::Backend(err) = MySqlDialect::error(refused) else {
            panic!("a backend error")
        };
        assert!(err.unavailable, "{:?}", err.source);
    }
}
