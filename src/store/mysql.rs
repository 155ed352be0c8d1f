//! The MySQL store (MySQL 8.4, MariaDB 10.11). Every query below is served by an index
//! of `migrations/`; the comments name it where the choice is not obvious.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions, MySqlRow};
use sqlx::{ConnectOptions, Connection, MySql, QueryBuilder, Row, Transaction};
use tokio::time::Instant;

use super::{
    After, Claimed, ClaimedRun, FIRST_CLAIM, HISTORY_ROWS_PER_INSERT, ListedRun, Recorded,
    RunClaim, RunProgress, SentNotification, Store, Triggered, check_resumable,
};
use crate::domain::{
    Alert, BackendError, Error, IdempotencyKey, NotResumable, Notification, NotificationFilter,
    NotificationId, Product, ProductId, Registration, Run, RunFilter, RunStatus, TriggerRequest,
    UserId, Wave, WaveState,
};

const STORE: crate::domain::Component = crate::domain::Component::Database;

super::portable::portable_queries!(MySql, MySqlRow);

/// MySQL error numbers worth telling apart.
const ER_LOCK_WAIT_TIMEOUT: u16 = 1205;
const ER_LOCK_DEADLOCK: u16 = 1213;

/// How often a transaction that lost a deadlock is tried again before giving up.
const DEADLOCK_ATTEMPTS: usize = 5;

pub struct MySqlStore {
    pool: MySqlPool,
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
    pub async fn connect(url: &str, lease: Duration) -> anyhow::Result<Self> {
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
            .max_connections(16)
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
        Ok(Self { pool })
    }

    /// The pool, for tests and benchmarks that inspect the tables directly.
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    async fn begin(&self) -> Result<Transaction<'static, MySql>, Error> {
        self.pool.begin().await.map_err(backend)
    }
}

/// Maps a driver error to a backend error; connection-level failures are "unavailable".
fn backend(err: sqlx::Error) -> Error {
    let unavailable = matches!(
        err,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
    ) || refuses_writes_for_now(&err);
    Error::Backend(BackendError::new(STORE, unavailable, err))
}

/// Errors of a server that takes no writes at the moment, as a primary does that was
/// demoted in a failover (read-only until the new primary is found), or a Galera node
/// out of its cluster. Retrying later, through a new connection, may work:
/// UNAVAILABLE, not INTERNAL.
fn refuses_writes_for_now(err: &sqlx::Error) -> bool {
    /// `--read-only` (or `--super-read-only`) prevents the statement.
    const ER_OPTION_PREVENTS_STATEMENT: u16 = 1290;
    /// A write in a transaction started READ ONLY.
    const ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION: u16 = 1792;
    /// `innodb_read_only` and the like.
    const ER_READ_ONLY_MODE: u16 = 1836;
    /// Galera: the node is not ready ("WSREP has not yet prepared node for application use").
    const ER_UNKNOWN_COM_ERROR: u16 = 1047;
    /// The server is shutting down.
    const ER_SERVER_SHUTDOWN: u16 = 1053;
    err.as_database_error()
        .and_then(|db| db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
        .is_some_and(|db| {
            matches!(
                db.number(),
                ER_OPTION_PREVENTS_STATEMENT
                    | ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION
                    | ER_READ_ONLY_MODE
                    | ER_UNKNOWN_COM_ERROR
                    | ER_SERVER_SHUTDOWN
            )
        })
}

fn mysql_error_number(err: &Error) -> Option<u16> {
    let Error::Backend(b) = err else { return None };
    let sqlx_err = b.source.downcast_ref::<sqlx::Error>()?;
    let db = sqlx_err.as_database_error()?;
    Some(
        db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()?
            .number(),
    )
}

fn is_retryable(err: &Error) -> bool {
    matches!(
        mysql_error_number(err),
        Some(ER_LOCK_DEADLOCK | ER_LOCK_WAIT_TIMEOUT)
    )
}

fn is_unique_violation(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .is_some_and(|e| e.is_unique_violation())
}

/// Names the index a query reads (see `read_runs`).
fn use_index(index: &str) -> String {
    format!(" FORCE INDEX ({index})")
}

fn lease_micros(lease: Duration) -> i64 {
    i64::try_from(lease.as_micros()).unwrap_or(i64::MAX)
}

/// Locks the product row: every state change of a product's runs and queue goes
/// through this lock, which is what makes "one run per product" hold under concurrency.
async fn lock_product(
    tx: &mut Transaction<'static, MySql>,
    product: ProductId,
) -> Result<Option<Product>, Error> {
    let row = sqlx::query(
        "SELECT id, restock_round, stock, stock_version FROM product WHERE id = ? FOR UPDATE",
    )
    .bind(product.get())
    .fetch_optional(&mut **tx)
    .await
    .map_err(backend)?;
    row.as_ref().map(product_from_row).transpose()
}

/// Gives a run (its row locked by the caller) a fresh claim and lease, in progress:
/// resumed by an operator (G6) or taken over from an instance whose lease ran out (G8).
/// Returns the new token, one more than the last claim's, and when the lease started.
async fn grant_claim(
    tx: &mut Transaction<'static, MySql>,
    run_id: i64,
    lease: Duration,
) -> Result<(i64, Instant), Error> {
    let token = next_claim_token(tx, run_id).await?;
    let granted = Instant::now();
    sqlx::query(
        "UPDATE product_notification_history SET status = 'IN_PROGRESS', claim_token = ?, \
         claim_epoch = ?, lease_until = CURRENT_TIMESTAMP(6) + INTERVAL ? MICROSECOND, \
         updated_at = CURRENT_TIMESTAMP(6) WHERE id = ?",
    )
    .bind(token)
    .bind(token)
    .bind(lease_micros(lease))
    .bind(run_id)
    .execute(&mut **tx)
    .await
    .map_err(backend)?;
    Ok((token, granted))
}

/// How far back an idempotency key counts, in microseconds.
fn key_retention_micros() -> i64 {
    i64::try_from(IdempotencyKey::RETENTION.as_micros()).unwrap_or(i64::MAX)
}

/// The run `key` started for the product, if the key was stored within its retention.
/// Called with the product row locked: keys of a product are only stored under that
/// lock, and this plain read is the transaction's first consistent read (the ones
/// before it write or lock), so its snapshot is taken after the lock was granted and
/// holds every key committed before. Served by uq_tik_product_key.
async fn run_started_by(
    tx: &mut Transaction<'static, MySql>,
    product: ProductId,
    key: &IdempotencyKey,
) -> Result<Option<Run>, Error> {
    let round: Option<i64> = sqlx::query_scalar(
        "SELECT restock_round FROM trigger_idempotency_key \
         WHERE product_id = ? AND idempotency_key = ? \
           AND created_at > CURRENT_TIMESTAMP(6) - INTERVAL ? MICROSECOND",
    )
    .bind(product.get())
    .bind(key.as_str().as_bytes())
    .bind(key_retention_micros())
    .fetch_optional(&mut **tx)
    .await
    .map_err(backend)?;
    match round {
        Some(round) => select_run_by_round(tx, product, round).await,
        None => Ok(None),
    }
}

/// Stores the key with the round it started. A row already there for the key is an
/// expired one (a live one makes the call a replay), so it is replaced: an expired key
/// is a new key.
async fn store_key(
    tx: &mut Transaction<'static, MySql>,
    product: ProductId,
    key: &IdempotencyKey,
    round: i64,
) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO trigger_idempotency_key (product_id, idempotency_key, restock_round) \
         VALUES (?, ?, ?) \
         ON DUPLICATE KEY UPDATE restock_round = ?, created_at = CURRENT_TIMESTAMP(6)",
    )
    .bind(product.get())
    .bind(key.as_str().as_bytes())
    .bind(round)
    .bind(round)
    .execute(&mut **tx)
    .await
    .map_err(backend)?;
    Ok(())
}

impl MySqlStore {
    async fn try_start_run(
        &self,
        product: ProductId,
        request: &TriggerRequest,
        lease: Duration,
    ) -> Result<Triggered, Error> {
        let mut tx = self.begin().await?;
        if let Some(stock) = request.stock {
            sqlx::query(
                "INSERT INTO product (id, stock, stock_version) VALUES (?, ?, 1) \
                 ON DUPLICATE KEY UPDATE stock = ?, stock_version = stock_version + 1, \
                 updated_at = CURRENT_TIMESTAMP(6)",
            )
            .bind(product.get())
            .bind(stock)
            .bind(stock)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        }
        let current = lock_product(&mut tx, product)
            .await?
            .ok_or_else(|| Error::UnknownProduct(product))?;
        // A retry is answered before any refusal, with its run as it is now; the
        // rollback undoes the stock written above, so it changes nothing.
        if let Some(key) = &request.idempotency_key
            && let Some(run) = run_started_by(&mut tx, product, key).await?
        {
            tx.rollback().await.map_err(backend)?;
            return Ok(Triggered::Replayed(run));
        }
        // A run in progress is the first thing to tell: with `stock: 0` during a run,
        // the caller learns the run goes on, not merely that the stock is out.
        if current.restock_round > 0 {
            let status: Option<String> = sqlx::query_scalar(
                "SELECT status FROM product_notification_history \
                 WHERE product_id = ? AND restock_round = ?",
            )
            .bind(product.get())
            .bind(current.restock_round)
            .fetch_optional(&mut *tx)
            .await
            .map_err(backend)?;
            if status.as_deref() == Some(RunStatus::InProgress.as_str()) {
                return Err(Error::RunInProgress {
                    product,
                    round: current.restock_round,
                });
            }
        }
        if current.stock <= 0 {
            return Err(Error::OutOfStock {
                product,
                stock: current.stock,
            });
        }
        let round = current
            .restock_round
            .checked_add(1)
            .ok_or(Error::RoundsExhausted(product))?;
        sqlx::query(
            "UPDATE product SET restock_round = ?, updated_at = CURRENT_TIMESTAMP(6) WHERE id = ?",
        )
        .bind(round)
        .bind(product.get())
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        let token = FIRST_CLAIM;
        let claimed_at = Instant::now();
        let inserted = sqlx::query(
            "INSERT INTO product_notification_history \
             (product_id, restock_round, status, claim_token, claim_epoch, lease_until, \
              wave_per_unit, wave_interval_ms, queue_end_position) \
             VALUES (?, ?, 'IN_PROGRESS', ?, ?, CURRENT_TIMESTAMP(6) + INTERVAL ? MICROSECOND, \
              ?, ?, (SELECT alert_seq FROM product WHERE id = ?))",
        )
        .bind(product.get())
        .bind(round)
        .bind(token)
        .bind(token)
        .bind(lease_micros(lease))
        .bind(request.wave.map(|w| i64::from(w.per_unit)))
        .bind(request.wave.map(|w| w.interval.as_millis() as i64))
        .bind(product.get())
        .execute(&mut *tx)
        .await;
        let run_id = match inserted {
            Ok(done) => done.last_insert_id() as i64,
            // The unique key on in-progress runs is the last line of defence for G7.
            Err(e) if is_unique_violation(&e) => {
                return Err(Error::RunInProgress { product, round });
            }
            Err(e) => return Err(backend(e)),
        };
        if let Some(key) = &request.idempotency_key {
            store_key(&mut tx, product, key, round).await?;
        }
        let queue_end = select_queue_end(&mut tx, run_id).await?;
        let run = select_run_by_id(&mut tx, run_id).await?;
        tx.commit().await.map_err(backend)?;
        Ok(Triggered::Started(ClaimedRun {
            claim: RunClaim {
                run_id,
                product_id: product,
                restock_round: round,
                token,
                queue_end,
            },
            claimed_at,
            cursor: None,
            run,
        }))
    }

    async fn try_resume_run(
        &self,
        product: ProductId,
        lease: Duration,
    ) -> Result<ClaimedRun, Error> {
        let mut tx = self.begin().await?;
        let current = lock_product(&mut tx, product)
            .await?
            .ok_or_else(|| Error::UnknownProduct(product))?;
        let row = sqlx::query(
            "SELECT id, status, last_sent_position FROM product_notification_history \
             WHERE product_id = ? AND restock_round = ? FOR UPDATE",
        )
        .bind(product.get())
        .bind(current.restock_round)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend)?;
        let Some(row) = row else {
            return Err(Error::NothingToResume {
                product,
                round: 0,
                why: NotResumable::NeverRestocked,
            });
        };
        let run_id: i64 = row.try_get("id").map_err(backend)?;
        let cursor: Option<i64> = row.try_get("last_sent_position").map_err(backend)?;
        let status: String = row.try_get("status").map_err(backend)?;
        let status = RunStatus::from_str(&status)
            .map_err(|e| Error::Backend(BackendError::new(STORE, false, anyhow::anyhow!(e))))?;
        check_resumable(product, current.restock_round, status, current.stock)?;
        let round = current.restock_round;
        let (token, claimed_at) = grant_claim(&mut tx, run_id, lease).await?;
        let queue_end = select_queue_end(&mut tx, run_id).await?;
        let run = select_run_by_id(&mut tx, run_id).await?;
        tx.commit().await.map_err(backend)?;
        Ok(ClaimedRun {
            claim: RunClaim {
                run_id,
                product_id: product,
                restock_round: round,
                token,
                queue_end,
            },
            claimed_at,
            cursor,
            run,
        })
    }

    /// Claims one run if its lease has still run out once its row is locked: of several
    /// instances racing for it, exactly one gets it. A row locked by another session (a
    /// cut-off owner's transaction the server has not rolled back yet, or another
    /// instance claiming it now) is skipped, not waited for, so one such run never
    /// holds up the takeover of the others; the next look tries it again (G8).
    async fn try_take_over(
        &self,
        run_id: i64,
        lease: Duration,
    ) -> Result<Option<ClaimedRun>, Error> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(
            "SELECT product_id, restock_round, last_sent_position \
             FROM product_notification_history \
             WHERE id = ? AND status = 'IN_PROGRESS' AND lease_until < CURRENT_TIMESTAMP(6) \
             FOR UPDATE SKIP LOCKED",
        )
        .bind(run_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let (token, claimed_at) = grant_claim(&mut tx, run_id, lease).await?;
        let queue_end = select_queue_end(&mut tx, run_id).await?;
        let run = select_run_by_id(&mut tx, run_id).await?;
        tx.commit().await.map_err(backend)?;
        Ok(Some(ClaimedRun {
            claimed_at,
            claim: RunClaim {
                run_id,
                product_id: ProductId::from_stored(row.try_get("product_id").map_err(backend)?),
                restock_round: row.try_get("restock_round").map_err(backend)?,
                token,
                queue_end,
            },
            cursor: row.try_get("last_sent_position").map_err(backend)?,
            run,
        }))
    }

    async fn try_register_alert(&self, product: ProductId, user: UserId) -> Result<Alert, Error> {
        let mut tx = self.begin().await?;
        lock_product(&mut tx, product)
            .await?
            .ok_or_else(|| Error::UnknownProduct(product))?;
        let active: Option<bool> = sqlx::query_scalar(
            "SELECT is_active FROM product_user_notification \
             WHERE product_id = ? AND user_id = ? FOR UPDATE",
        )
        .bind(product.get())
        .bind(user.get())
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend)?;
        if active != Some(true) {
            // A new position behind every earlier registration: the back of the queue.
            sqlx::query("UPDATE product SET alert_seq = alert_seq + 1 WHERE id = ?")
                .bind(product.get())
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
            let position: i64 = sqlx::query_scalar("SELECT alert_seq FROM product WHERE id = ?")
                .bind(product.get())
                .fetch_one(&mut *tx)
                .await
                .map_err(backend)?;
            let sql = if active.is_some() {
                "UPDATE product_user_notification SET is_active = TRUE, position = ?, \
                 updated_at = CURRENT_TIMESTAMP(6) WHERE product_id = ? AND user_id = ?"
            } else {
                "INSERT INTO product_user_notification (position, product_id, user_id) \
                 VALUES (?, ?, ?)"
            };
            sqlx::query(sql)
                .bind(position)
                .bind(product.get())
                .bind(user.get())
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        }
        let alert = select_alert(&mut tx, product, user).await?;
        tx.commit().await.map_err(backend)?;
        Ok(alert.expect("the alert was just written in this transaction"))
    }
}

/// Runs a transaction body again when MySQL picked it as a deadlock victim.
macro_rules! retry_deadlocks {
    ($body:expr) => {{
        let mut attempt = 1;
        loop {
            match $body.await {
                Err(e) if attempt < DEADLOCK_ATTEMPTS && is_retryable(&e) => {
                    tracing::debug!(attempt, error = %e, "transaction deadlocked; retrying");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(5 * attempt as u64)).await;
                }
                other => break other,
            }
        }
    }};
}

#[async_trait]
impl Store for MySqlStore {
    async fn set_stock(&self, product: ProductId, stock: i64) -> Result<Product, Error> {
        retry_deadlocks!(async {
            let mut tx = self.begin().await?;
            sqlx::query(
                "INSERT INTO product (id, stock, stock_version) VALUES (?, ?, 1) \
                 ON DUPLICATE KEY UPDATE stock = ?, stock_version = stock_version + 1, \
                 updated_at = CURRENT_TIMESTAMP(6)",
            )
            .bind(product.get())
            .bind(stock)
            .bind(stock)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
            let row = sqlx::query(
                "SELECT id, restock_round, stock, stock_version FROM product WHERE id = ?",
            )
            .bind(product.get())
            .fetch_one(&mut *tx)
            .await
            .map_err(backend)?;
            tx.commit().await.map_err(backend)?;
            product_from_row(&row)
        })
    }

    async fn product(&self, product: ProductId) -> Result<Option<Product>, Error> {
        read_product(&self.pool, product).await
    }

    async fn register_alert(&self, product: ProductId, user: UserId) -> Result<Alert, Error> {
        retry_deadlocks!(self.try_register_alert(product, user))
    }

    async fn cancel_alert(&self, product: ProductId, user: UserId) -> Result<Alert, Error> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE product_user_notification SET is_active = FALSE, \
             updated_at = CURRENT_TIMESTAMP(6) \
             WHERE product_id = ? AND user_id = ? AND is_active = TRUE",
        )
        .bind(product.get())
        .bind(user.get())
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        let alert = select_alert(&mut tx, product, user).await?;
        tx.commit().await.map_err(backend)?;
        alert.ok_or_else(|| Error::UnknownAlert { product, user })
    }

    async fn start_run(
        &self,
        product: ProductId,
        request: &TriggerRequest,
        lease: Duration,
    ) -> Result<Triggered, Error> {
        retry_deadlocks!(self.try_start_run(product, request, lease))
    }

    async fn forget_expired_trigger_keys(&self, limit: u32) -> Result<u64, Error> {
        // ix_tik_created serves the range, in order, and the LIMIT stops the scan.
        let done = sqlx::query(
            "DELETE FROM trigger_idempotency_key \
             WHERE created_at <= CURRENT_TIMESTAMP(6) - INTERVAL ? MICROSECOND \
             ORDER BY created_at LIMIT ?",
        )
        .bind(key_retention_micros())
        .bind(limit)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(done.rows_affected())
    }

    async fn resume_run(&self, product: ProductId, lease: Duration) -> Result<ClaimedRun, Error> {
        retry_deadlocks!(self.try_resume_run(product, lease))
    }

    async fn run(&self, product: ProductId, round: Option<i64>) -> Result<Option<Run>, Error> {
        read_run(&self.pool, product, round).await
    }

    async fn next_registrations(
        &self,
        claim: &RunClaim,
        cursor: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Registration>, Error> {
        read_next_registrations(&self.pool, claim, cursor, limit).await
    }

    async fn record(
        &self,
        claim: &RunClaim,
        sent: &[SentNotification],
        after: After,
        lease: Duration,
        last_error: Option<&str>,
    ) -> Result<Claimed, Error> {
        let last_error = match after {
            After::Finish(super::FinalStatus::Error) => last_error.map(Run::bound_last_error),
            _ => None,
        };
        let mut tx = self.begin().await?;
        // The history rows first, the conditional update last: if a stall holds the
        // insert up past the lease (G10), the update then finds the lease run out, or
        // the run taken over, and the whole transaction is rolled back (G8).
        // Statements of a fixed number of rows: each length is prepared once per
        // connection and then reused, as a batch of any length would not be.
        for rows in sent.chunks(HISTORY_ROWS_PER_INSERT) {
            let mut insert = QueryBuilder::<MySql>::new(
                "INSERT INTO product_user_notification_history \
                 (product_id, user_id, restock_round, sent_at, position) ",
            );
            insert.push_values(rows, |mut row, s| {
                row.push_bind(claim.product_id.get())
                    .push_bind(s.registration.user_id.get())
                    .push_bind(claim.restock_round)
                    .push_bind(s.sent_at)
                    .push_bind(s.registration.position);
            });
            insert.build().execute(&mut *tx).await.map_err(backend)?;
        }
        let last = sent.last().map(|s| s.registration);
        let (status, renew, release, wait) = match after {
            After::Renew => (RunStatus::InProgress, true, false, None),
            After::Release => (RunStatus::InProgress, false, true, None),
            After::Finish(status) => (status.status(), false, false, None),
            After::WaitForWave(interval) => (RunStatus::InProgress, false, false, Some(interval)),
        };
        let updated = sqlx::query(
            "UPDATE product_notification_history SET \
             last_sent_user_id = COALESCE(?, last_sent_user_id), \
             last_sent_position = COALESCE(?, last_sent_position), \
             sent_count = sent_count + ?, status = ?, \
             lease_until = CASE WHEN ? THEN CURRENT_TIMESTAMP(6) + INTERVAL ? MICROSECOND \
                                WHEN ? THEN CURRENT_TIMESTAMP(6) \
                                WHEN ? THEN CURRENT_TIMESTAMP(6) + INTERVAL ? MICROSECOND \
                                ELSE NULL END, \
             next_wave_at = IF(?, CURRENT_TIMESTAMP(6) + INTERVAL ? MICROSECOND, NULL), \
             claim_token = IF(?, claim_token, NULL), \
             updated_at = CURRENT_TIMESTAMP(6), last_error = ? \
             WHERE id = ? AND claim_token = ? AND status = 'IN_PROGRESS' \
               AND lease_until > CURRENT_TIMESTAMP(6)",
        )
        .bind(last.map(|r| r.user_id.get()))
        .bind(last.map(|r| r.position))
        .bind(sent.len() as i64)
        .bind(status.as_str())
        .bind(renew)
        .bind(lease_micros(lease))
        .bind(release)
        .bind(wait.is_some())
        .bind(wait.map_or(0, lease_micros))
        .bind(wait.is_some())
        .bind(wait.map_or(0, lease_micros))
        .bind(renew)
        .bind(last_error)
        .bind(claim.run_id)
        .bind(claim.token)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        if updated.rows_affected() == 0 {
            tx.rollback().await.ok();
            return Ok(Claimed::Lost);
        }
        tx.commit().await.map_err(backend)?;
        Ok(Claimed::Yes)
    }

    async fn start_wave(
        &self,
        claim: &RunClaim,
        quota: i64,
        started_count: i64,
        lease: Duration,
    ) -> Result<Claimed, Error> {
        let updated = sqlx::query(
            "UPDATE product_notification_history SET wave_quota = ?, wave_started_count = ?, \
             next_wave_at = NULL, \
             lease_until = CURRENT_TIMESTAMP(6) + INTERVAL ? MICROSECOND, \
             updated_at = CURRENT_TIMESTAMP(6) \
             WHERE id = ? AND claim_token = ? AND status = 'IN_PROGRESS' \
               AND lease_until > CURRENT_TIMESTAMP(6)",
        )
        .bind(quota)
        .bind(started_count)
        .bind(lease_micros(lease))
        .bind(claim.run_id)
        .bind(claim.token)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(Claimed::by_rows_affected(updated.rows_affected()))
    }

    async fn clock(&self) -> Result<DateTime<Utc>, Error> {
        let now: chrono::NaiveDateTime = sqlx::query_scalar("SELECT UTC_TIMESTAMP(6)")
            .fetch_one(&self.pool)
            .await
            .map_err(backend)?;
        Ok(now.and_utc())
    }

    async fn take_over_expired(
        &self,
        lease: Duration,
        limit: u32,
    ) -> Result<Vec<ClaimedRun>, Error> {
        // ix_pnh_status_lease serves the range.
        let expired: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM product_notification_history \
             WHERE status = 'IN_PROGRESS' AND lease_until < CURRENT_TIMESTAMP(6) \
             ORDER BY lease_until LIMIT ?",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?;
        let mut taken = Vec::with_capacity(expired.len());
        for run_id in expired {
            if let Some(claimed) = retry_deadlocks!(self.try_take_over(run_id, lease))? {
                taken.push(claimed);
            }
        }
        Ok(taken)
    }

    async fn holds_claim(&self, claim: &RunClaim) -> Result<bool, Error> {
        read_holds_claim(&self.pool, claim).await
    }

    async fn run_progress(
        &self,
        product: ProductId,
        round: i64,
    ) -> Result<Option<RunProgress>, Error> {
        read_run_progress(&self.pool, product, round).await
    }

    async fn recorded_in_run(
        &self,
        product: ProductId,
        round: i64,
        after: Option<i64>,
        upto: i64,
        limit: u32,
    ) -> Result<Vec<Recorded>, Error> {
        read_recorded_in_run(&self.pool, product, round, after, upto, limit).await
    }

    async fn recorded_after(
        &self,
        after: i64,
        filter: NotificationFilter,
        limit: u32,
    ) -> Result<Vec<Recorded>, Error> {
        read_recorded_after(&self.pool, after, filter, limit).await
    }

    async fn recorded(&self, id: NotificationId) -> Result<Option<Recorded>, Error> {
        read_recorded(&self.pool, id).await
    }

    async fn list_runs(
        &self,
        filter: RunFilter,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<ListedRun>, Error> {
        read_runs(&self.pool, filter, before, limit).await
    }
}

#[cfg(test)]
mod tests {
    use sqlx::{Connection as _, Executor as _, MySqlConnection};

    use super::*;

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
        let Error::Backend(err) = backend(refused) else {
            panic!("a backend error")
        };
        assert!(err.unavailable, "{:?}", err.source);
    }
}
