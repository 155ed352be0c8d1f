//! The embedded SQLite store: the same contract as the MySQL one, for a single instance
//! with no infrastructure.
//!
//! SQLite has no row locks, so "one run per product" (G7) and the ordering of
//! registrations rest on its single writer: every transaction here starts with
//! `BEGIN IMMEDIATE` (it takes the write lock before reading), on a pool of one
//! connection, so read-check-write sequences cannot interleave — not between tasks, and
//! not with another process opening the same file. The partial unique index on
//! in-progress runs backs it. Reads that need no transaction go to a separate pool: in
//! WAL mode they never wait for the writer.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
};
use sqlx::{QueryBuilder, Row, Sqlite, Transaction};
use tokio::time::Instant;

use super::{
    After, Claimed, ClaimedRun, FIRST_CLAIM, ListedRun, Recorded, RunClaim, RunProgress,
    SentNotification, Store, Triggered, check_resumable,
};
use crate::domain::{
    Alert, BackendError, Error, IdempotencyKey, NotResumable, Notification, NotificationFilter,
    NotificationId, Product, ProductId, Registration, Run, RunFilter, RunStatus, TriggerRequest,
    UserId, Wave, WaveState,
};

const STORE: crate::domain::Component = crate::domain::Component::Database;

super::portable::portable_queries!(Sqlite, SqliteRow);

pub struct SqliteStore {
    /// One connection: the single writer.
    writer: SqlitePool,
    /// Plain reads.
    reader: SqlitePool,
}

fn backend(err: sqlx::Error) -> Error {
    let unavailable = matches!(
        err,
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
    ) || refuses_writes_for_now(&err);
    Error::Backend(BackendError::new(STORE, unavailable, err))
}

/// SQLite result codes (the primary code, the low byte of an extended one) of a file
/// that cannot be written at the moment: read-only (a read-only mount or file, a
/// standby copy), busy or locked past the timeout, an I/O error, a full disk, a file
/// that cannot be opened. Retrying later may work: UNAVAILABLE, not INTERNAL.
fn refuses_writes_for_now(err: &sqlx::Error) -> bool {
    const BUSY: i64 = 5;
    const LOCKED: i64 = 6;
    const READONLY: i64 = 8;
    const IOERR: i64 = 10;
    const FULL: i64 = 13;
    const CANTOPEN: i64 = 14;
    err.as_database_error()
        .and_then(|db| db.code())
        .and_then(|code| code.parse::<i64>().ok())
        .is_some_and(|code| {
            matches!(
                code & 0xff,
                BUSY | LOCKED | READONLY | IOERR | FULL | CANTOPEN
            )
        })
}

fn is_unique_violation(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .is_some_and(|e| e.is_unique_violation())
}

/// Names the index a query reads (see `read_runs`); SQLite refuses the query, rather
/// than scan, should the index not serve it.
fn use_index(index: &str) -> String {
    format!(" INDEXED BY {index}")
}

/// Lease deadlines are Unix microseconds, so they compare as numbers.
fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

fn lease_deadline(lease: Duration) -> i64 {
    micros(Utc::now() + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX))
}

impl SqliteStore {
    /// Opens (creating if needed) the database file of a `sqlite://path` URL and applies
    /// migrations.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
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
                .max_connections(4)
                .connect_with(options.read_only(true))
                .await
                .with_context(|| format!("cannot open DATABASE_URL {url:?} for reading"))?
        };
        Ok(Self { writer, reader })
    }

    async fn begin(&self) -> Result<Transaction<'static, Sqlite>, Error> {
        self.writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)
    }
}

/// Reads the product inside a write transaction. No row lock is needed: the
/// transaction already holds SQLite's write lock, which orders every state change.
async fn select_product(
    tx: &mut Transaction<'static, Sqlite>,
    product: ProductId,
) -> Result<Option<Product>, Error> {
    let row =
        sqlx::query("SELECT id, restock_round, stock, stock_version FROM product WHERE id = ?")
            .bind(product.get())
            .fetch_optional(&mut **tx)
            .await
            .map_err(backend)?;
    row.as_ref().map(product_from_row).transpose()
}

/// Gives a run a fresh claim and lease, in progress: resumed by an operator (G6) or
/// taken over after its lease ran out (G8). Returns the new token, one more than the
/// last claim's, and when the lease started.
async fn grant_claim(
    tx: &mut Transaction<'static, Sqlite>,
    run_id: i64,
    lease: Duration,
) -> Result<(i64, Instant), Error> {
    let token = next_claim_token(tx, run_id).await?;
    let granted = Instant::now();
    sqlx::query(
        "UPDATE product_notification_history SET status = 'IN_PROGRESS', claim_token = ?, \
         claim_epoch = ?, lease_until = ?, updated_at = ?, last_error = NULL WHERE id = ?",
    )
    .bind(token)
    .bind(token)
    .bind(lease_deadline(lease))
    .bind(Utc::now())
    .bind(run_id)
    .execute(&mut **tx)
    .await
    .map_err(backend)?;
    Ok((token, granted))
}

async fn upsert_stock(
    tx: &mut Transaction<'static, Sqlite>,
    product: ProductId,
    stock: i64,
) -> Result<(), Error> {
    let now = Utc::now();
    sqlx::query(
        "INSERT INTO product (id, stock, stock_version, created_at, updated_at) \
         VALUES (?, ?, 1, ?, ?) \
         ON CONFLICT (id) DO UPDATE SET stock = excluded.stock, \
         stock_version = product.stock_version + 1, updated_at = excluded.updated_at",
    )
    .bind(product.get())
    .bind(stock)
    .bind(now)
    .bind(now)
    .execute(&mut **tx)
    .await
    .map_err(backend)?;
    Ok(())
}

/// Idempotency keys stored at or before this moment (Unix microseconds) have expired.
fn keys_expired_at_or_before() -> i64 {
    micros(Utc::now() - chrono::Duration::from_std(IdempotencyKey::RETENTION).unwrap_or_default())
}

/// The run `key` started for the product, if the key was stored within its retention.
/// The write transaction orders this read against every key stored. Served by
/// uq_tik_product_key.
async fn run_started_by(
    tx: &mut Transaction<'static, Sqlite>,
    product: ProductId,
    key: &IdempotencyKey,
) -> Result<Option<Run>, Error> {
    let round: Option<i64> = sqlx::query_scalar(
        "SELECT restock_round FROM trigger_idempotency_key \
         WHERE product_id = ? AND idempotency_key = ? AND created_at > ?",
    )
    .bind(product.get())
    .bind(key.as_str())
    .bind(keys_expired_at_or_before())
    .fetch_optional(&mut **tx)
    .await
    .map_err(backend)?;
    match round {
        Some(round) => select_run_by_round(tx, product, round).await,
        None => Ok(None),
    }
}

/// Stores the key with the round it started, replacing an expired row of the same key
/// (a live one makes the call a replay): an expired key is a new key.
async fn store_key(
    tx: &mut Transaction<'static, Sqlite>,
    product: ProductId,
    key: &IdempotencyKey,
    round: i64,
) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO trigger_idempotency_key \
         (product_id, idempotency_key, restock_round, created_at) VALUES (?, ?, ?, ?) \
         ON CONFLICT (product_id, idempotency_key) DO UPDATE SET \
         restock_round = excluded.restock_round, created_at = excluded.created_at",
    )
    .bind(product.get())
    .bind(key.as_str())
    .bind(round)
    .bind(micros(Utc::now()))
    .execute(&mut **tx)
    .await
    .map_err(backend)?;
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn set_stock(&self, product: ProductId, stock: i64) -> Result<Product, Error> {
        let mut tx = self.begin().await?;
        upsert_stock(&mut tx, product, stock).await?;
        let saved = select_product(&mut tx, product).await?;
        tx.commit().await.map_err(backend)?;
        Ok(saved.expect("the product was just written in this transaction"))
    }

    async fn product(&self, product: ProductId) -> Result<Option<Product>, Error> {
        read_product(&self.reader, product).await
    }

    async fn register_alert(&self, product: ProductId, user: UserId) -> Result<Alert, Error> {
        let mut tx = self.begin().await?;
        select_product(&mut tx, product)
            .await?
            .ok_or_else(|| Error::UnknownProduct(product))?;
        let active: Option<bool> = sqlx::query_scalar(
            "SELECT is_active FROM product_user_notification WHERE product_id = ? AND user_id = ?",
        )
        .bind(product.get())
        .bind(user.get())
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend)?;
        if active != Some(true) {
            let now = Utc::now();
            let position: i64 = sqlx::query_scalar(
                "UPDATE product SET alert_seq = alert_seq + 1 WHERE id = ? RETURNING alert_seq",
            )
            .bind(product.get())
            .fetch_one(&mut *tx)
            .await
            .map_err(backend)?;
            let query = if active.is_some() {
                sqlx::query(
                    "UPDATE product_user_notification SET is_active = TRUE, position = ?, \
                     updated_at = ? WHERE product_id = ? AND user_id = ?",
                )
                .bind(position)
                .bind(now)
            } else {
                sqlx::query(
                    "INSERT INTO product_user_notification \
                     (position, created_at, updated_at, product_id, user_id) \
                     VALUES (?, ?, ?, ?, ?)",
                )
                .bind(position)
                .bind(now)
                .bind(now)
            };
            query
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

    async fn cancel_alert(&self, product: ProductId, user: UserId) -> Result<Alert, Error> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE product_user_notification SET is_active = FALSE, updated_at = ? \
             WHERE product_id = ? AND user_id = ? AND is_active = TRUE",
        )
        .bind(Utc::now())
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
        let mut tx = self.begin().await?;
        if let Some(stock) = request.stock {
            upsert_stock(&mut tx, product, stock).await?;
        }
        let current = select_product(&mut tx, product)
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
        let in_progress: Option<i64> = sqlx::query_scalar(
            "SELECT restock_round FROM product_notification_history \
             WHERE product_id = ? AND status = 'IN_PROGRESS'",
        )
        .bind(product.get())
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend)?;
        if let Some(round) = in_progress {
            return Err(Error::RunInProgress { product, round });
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
        let now = Utc::now();
        sqlx::query("UPDATE product SET restock_round = ?, updated_at = ? WHERE id = ?")
            .bind(round)
            .bind(now)
            .bind(product.get())
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        let token = FIRST_CLAIM;
        let claimed_at = Instant::now();
        let inserted = sqlx::query(
            "INSERT INTO product_notification_history \
             (product_id, restock_round, status, claim_token, claim_epoch, lease_until, \
              started_at, updated_at, wave_per_unit, wave_interval_ms, queue_end_position) \
             VALUES (?, ?, 'IN_PROGRESS', ?, ?, ?, ?, ?, ?, ?, \
              (SELECT alert_seq FROM product WHERE id = ?))",
        )
        .bind(product.get())
        .bind(round)
        .bind(token)
        .bind(token)
        .bind(lease_deadline(lease))
        .bind(now)
        .bind(now)
        .bind(request.wave.map(|w| i64::from(w.per_unit)))
        .bind(request.wave.map(|w| w.interval.as_millis() as i64))
        .bind(product.get())
        .execute(&mut *tx)
        .await;
        let run_id = match inserted {
            Ok(done) => done.last_insert_rowid(),
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

    async fn forget_expired_trigger_keys(&self, limit: u32) -> Result<u64, Error> {
        // SQLite has no DELETE ... LIMIT (unless built for it): the oldest keys are
        // picked through ix_tik_created and deleted by primary key.
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "DELETE FROM trigger_idempotency_key WHERE id IN \
             (SELECT id FROM trigger_idempotency_key INDEXED BY ix_tik_created \
              WHERE created_at <= ? ORDER BY created_at LIMIT ?)",
        )
        .bind(keys_expired_at_or_before())
        .bind(limit)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        Ok(done.rows_affected())
    }

    async fn resume_run(&self, product: ProductId, lease: Duration) -> Result<ClaimedRun, Error> {
        let mut tx = self.begin().await?;
        let current = select_product(&mut tx, product)
            .await?
            .ok_or_else(|| Error::UnknownProduct(product))?;
        let row = sqlx::query(
            "SELECT id, status, last_sent_position FROM product_notification_history \
             WHERE product_id = ? AND restock_round = ?",
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
        let (token, claimed_at) = grant_claim(&mut tx, run_id, lease).await?;
        let queue_end = select_queue_end(&mut tx, run_id).await?;
        let run = select_run_by_id(&mut tx, run_id).await?;
        tx.commit().await.map_err(backend)?;
        Ok(ClaimedRun {
            claimed_at,
            claim: RunClaim {
                run_id,
                product_id: product,
                restock_round: current.restock_round,
                token,
                queue_end,
            },
            cursor,
            run,
        })
    }

    async fn run(&self, product: ProductId, round: Option<i64>) -> Result<Option<Run>, Error> {
        read_run(&self.reader, product, round).await
    }

    async fn next_registrations(
        &self,
        claim: &RunClaim,
        cursor: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Registration>, Error> {
        read_next_registrations(&self.reader, claim, cursor, limit).await
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
        let now = Utc::now();
        let last = sent.last().map(|s| s.registration);
        let (status, lease_until, keep_claim, next_wave_at) = match after {
            After::Renew => (
                RunStatus::InProgress,
                Some(lease_deadline(lease)),
                true,
                None,
            ),
            After::Release => (RunStatus::InProgress, Some(micros(now)), false, None),
            After::Finish(status) => (status.status(), None, false, None),
            After::WaitForWave(interval) => {
                let at =
                    now + chrono::Duration::from_std(interval).unwrap_or(chrono::Duration::MAX);
                (RunStatus::InProgress, Some(micros(at)), false, Some(at))
            }
        };
        let updated = sqlx::query(
            "UPDATE product_notification_history SET \
             last_sent_user_id = COALESCE(?, last_sent_user_id), \
             last_sent_position = COALESCE(?, last_sent_position), \
             sent_count = sent_count + ?, status = ?, lease_until = ?, next_wave_at = ?, \
             claim_token = CASE WHEN ? THEN claim_token ELSE NULL END, updated_at = ?, \
             last_error = ? \
             WHERE id = ? AND claim_token = ? AND status = 'IN_PROGRESS' AND lease_until > ?",
        )
        .bind(last.map(|r| r.user_id.get()))
        .bind(last.map(|r| r.position))
        .bind(sent.len() as i64)
        .bind(status.as_str())
        .bind(lease_until)
        .bind(next_wave_at)
        .bind(keep_claim)
        .bind(now)
        .bind(last_error)
        .bind(claim.run_id)
        .bind(claim.token)
        .bind(micros(now))
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        if updated.rows_affected() == 0 {
            tx.rollback().await.ok();
            return Ok(Claimed::Lost);
        }
        for rows in sent.chunks(super::HISTORY_ROWS_PER_INSERT) {
            let mut insert = QueryBuilder::<Sqlite>::new(
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
        let now = Utc::now();
        let updated = sqlx::query(
            "UPDATE product_notification_history SET wave_quota = ?, wave_started_count = ?, \
             next_wave_at = NULL, lease_until = ?, updated_at = ? \
             WHERE id = ? AND claim_token = ? AND status = 'IN_PROGRESS' AND lease_until > ?",
        )
        .bind(quota)
        .bind(started_count)
        .bind(lease_deadline(lease))
        .bind(now)
        .bind(claim.run_id)
        .bind(claim.token)
        .bind(micros(now))
        .execute(&self.writer)
        .await
        .map_err(backend)?;
        Ok(Claimed::by_rows_affected(updated.rows_affected()))
    }

    /// One instance on one host: its own clock is the clock.
    async fn clock(&self) -> Result<DateTime<Utc>, Error> {
        Ok(Utc::now())
    }

    async fn take_over_expired(
        &self,
        lease: Duration,
        limit: u32,
    ) -> Result<Vec<ClaimedRun>, Error> {
        // One write transaction for all: SQLite's single writer already orders it
        // against every other claim.
        let mut tx = self.begin().await?;
        let now = Utc::now();
        let rows = sqlx::query(
            "SELECT id, product_id, restock_round, last_sent_position \
             FROM product_notification_history \
             WHERE status = 'IN_PROGRESS' AND lease_until < ? ORDER BY lease_until LIMIT ?",
        )
        .bind(micros(now))
        .bind(limit)
        .fetch_all(&mut *tx)
        .await
        .map_err(backend)?;
        let mut taken = Vec::with_capacity(rows.len());
        for row in rows {
            let run_id: i64 = row.try_get("id").map_err(backend)?;
            let (token, claimed_at) = grant_claim(&mut tx, run_id, lease).await?;
            let queue_end = select_queue_end(&mut tx, run_id).await?;
            let run = select_run_by_id(&mut tx, run_id).await?;
            taken.push(ClaimedRun {
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
            });
        }
        tx.commit().await.map_err(backend)?;
        Ok(taken)
    }

    async fn holds_claim(&self, claim: &RunClaim) -> Result<bool, Error> {
        read_holds_claim(&self.reader, claim).await
    }

    async fn run_progress(
        &self,
        product: ProductId,
        round: i64,
    ) -> Result<Option<RunProgress>, Error> {
        read_run_progress(&self.reader, product, round).await
    }

    async fn recorded_in_run(
        &self,
        product: ProductId,
        round: i64,
        after: Option<i64>,
        upto: i64,
        limit: u32,
    ) -> Result<Vec<Recorded>, Error> {
        read_recorded_in_run(&self.reader, product, round, after, upto, limit).await
    }

    async fn recorded_after(
        &self,
        after: i64,
        filter: NotificationFilter,
        limit: u32,
    ) -> Result<Vec<Recorded>, Error> {
        read_recorded_after(&self.reader, after, filter, limit).await
    }

    async fn recorded(&self, id: NotificationId) -> Result<Option<Recorded>, Error> {
        read_recorded(&self.reader, id).await
    }

    async fn list_runs(
        &self,
        filter: RunFilter,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<ListedRun>, Error> {
        read_runs(&self.reader, filter, before, limit).await
    }
}
