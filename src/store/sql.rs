//! The store written once: every flow of [`Store`] as one function generic over a
//! `Dialect`, so the rules (what is locked and when, what a claim checks, what a
//! refusal leaves unchanged) read the same for MySQL and SQLite because they are the
//! same code. `mysql.rs` and `sqlite.rs` say only what truly differs.
//!
//! Why generic functions, and not a macro expanded per backend (which compiles only
//! inside the file that expands it) or `sqlx::Any` (which decodes no timestamps and
//! converts every row on the hot path): the price is the list of sqlx bounds below,
//! written on the two `impl` blocks (Rust does not carry a trait's `where` clauses to
//! its users, so a trait bundling them would not shorten the blocks). Each dialect
//! fragment that stands for a value consumes one bind in every dialect, so a statement
//! binds the same values in the same order on both databases; statements are
//! assembled with `format!` from those fragments, and the driver's statement cache,
//! keyed by the text, prepares each once per connection all the same. The statements
//! stay next to the flow that runs them rather than in `.sql` files: each is written
//! once now, and most carry a dialect fragment that would be spliced in at run time
//! anyway. The one statement no fragment covers, deleting expired keys (`DELETE ...
//! LIMIT` has no SQLite spelling), is each dialect's own.
//!
//! Three behaviours had drifted apart between the two backends and are decided here:
//! `start_run` refuses while any run of the product is in progress (not only the
//! latest round); `record` writes the history before its conditional update, and a
//! claim that no longer holds is `Lost` even when its rows collide with the new
//! owner's; and a claim granted on a run (resume, takeover) clears its `last_error`.

use std::future::Future;
use std::marker::PhantomData;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use sqlx::{
    ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Pool, Transaction, Type,
};
use tokio::time::Instant;

use super::dialect::{Dialect, delta};
use super::rows::{
    self, AlertRow, ClaimableRow, ListedAlertRow, ListedRunRow, PRODUCT_COLUMNS, ProductRow,
    ProgressRow, RECORDED_COLUMNS, RECORDED_FROM, RUN_COLUMNS, RecordedRow, RegistrationRow,
    RunRow, status,
};
use super::{
    After, Claimed, ClaimedRun, FIRST_CLAIM, FinalStatus, ForgotAlert, HISTORY_ROWS_PER_INSERT,
    ListedRun, Recorded, RunClaim, RunProgress, SWEEP_ROWS, SentNotification, Store, Superseded,
    Swept, Triggered, check_resumable, driver_error,
};
use crate::domain::{
    Alert, AlertFilter, AlertOutcome, AlertStatus, Error, IdempotencyKey, NotResumable,
    NotificationFilter, NotificationId, Product, ProductId, ProductOrder, Registration, RoundFacts,
    Run, RunFilter, RunStatus, TriggerRequest, UserId,
};

/// How often a transaction that lost a deadlock is run in all before its error is
/// returned (only MySQL reports deadlocks: see [`Dialect::deadlocked`]).
const DEADLOCK_ATTEMPTS: usize = 5;

/// A store on one SQL database.
pub struct SqlStore<D: Dialect> {
    /// Transactions and writes.
    writer: Pool<D::DB>,
    /// Plain reads: the writer's pool, or read-only connections where reads should
    /// never wait for the writer.
    reader: Pool<D::DB>,
    dialect: PhantomData<D>,
}

impl<D: Dialect> SqlStore<D> {
    pub(super) fn new(writer: Pool<D::DB>, reader: Pool<D::DB>) -> Self {
        Self {
            writer,
            reader,
            dialect: PhantomData,
        }
    }

    /// The pool writes go through, for tests and benchmarks that inspect the tables.
    pub fn pool(&self) -> &Pool<D::DB> {
        &self.writer
    }
}

/// Runs a transaction again, from the start, while the database picked it as a
/// deadlock victim, a few times.
async fn retry_deadlocks<D: Dialect, T, F, Fut>(mut body: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let mut attempt = 1;
    loop {
        match body().await {
            Err(e)
                if attempt < DEADLOCK_ATTEMPTS && driver_error(&e).is_some_and(D::deadlocked) =>
            {
                tracing::debug!(attempt, error = %e, "transaction deadlocked; retrying");
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(5 * attempt as u64)).await;
            }
            other => return other,
        }
    }
}

fn is_unique_violation(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .is_some_and(|e| e.is_unique_violation())
}

fn as_limit(n: u32) -> i64 {
    i64::from(n)
}

/// How long ago an idempotency key stops counting.
fn key_retention() -> TimeDelta {
    -delta(IdempotencyKey::RETENTION)
}

impl<D: Dialect> SqlStore<D>
where
    for<'c> &'c mut <D::DB as Database>::Connection: Executor<'c, Database = D::DB>,
    for<'q> <D::DB as Database>::Arguments<'q>: IntoArguments<'q, D::DB>,
    for<'r> &'r str: ColumnIndex<<D::DB as Database>::Row>,
    usize: ColumnIndex<<D::DB as Database>::Row>,
    for<'q> i64: Encode<'q, D::DB> + Decode<'q, D::DB> + Type<D::DB>,
    for<'q> bool: Encode<'q, D::DB> + Decode<'q, D::DB> + Type<D::DB>,
    for<'q> &'q str: Encode<'q, D::DB> + Type<D::DB>,
    for<'q> Option<i64>: Encode<'q, D::DB>,
    for<'q> Option<&'q str>: Encode<'q, D::DB>,
    for<'q> String: Decode<'q, D::DB> + Type<D::DB>,
    for<'q> DateTime<Utc>: Encode<'q, D::DB> + Decode<'q, D::DB> + Type<D::DB>,
{
    async fn begin(&self) -> Result<Transaction<'static, D::DB>, Error> {
        match D::BEGIN {
            Some(statement) => self.writer.begin_with(statement).await,
            None => self.writer.begin().await,
        }
        .map_err(D::error)
    }

    /// Creates the product if new and sets its stock, and its threshold if given (a
    /// new product's is 1). Every write of either bumps the version (G3).
    async fn upsert_stock(
        tx: &mut Transaction<'static, D::DB>,
        product: ProductId,
        stock: i64,
        min_stock: Option<i64>,
    ) -> Result<(), Error> {
        let now = Utc::now();
        let sql = format!(
            "INSERT INTO product (id, stock, min_stock, stock_version, created_at, updated_at) \
             VALUES (?, ?, COALESCE(?, 1), 1, {stamp}, {stamp}){upsert}stock = ?, \
             min_stock = COALESCE(?, min_stock), stock_version = stock_version + 1, \
             updated_at = {stamp}",
            stamp = D::STAMP,
            upsert = D::on_conflict("id"),
        );
        sqlx::query(&sql)
            .bind(product.get())
            .bind(stock)
            .bind(min_stock)
            .bind(D::stamp(now, TimeDelta::zero()))
            .bind(D::stamp(now, TimeDelta::zero()))
            .bind(stock)
            .bind(min_stock)
            .bind(D::stamp(now, TimeDelta::zero()))
            .execute(&mut **tx)
            .await
            .map_err(D::error)?;
        Ok(())
    }

    /// The sweep on `conn`: takes the sweep's lock, then deletes run by run, oldest
    /// ended first, until `budget` is spent or nothing is left.
    async fn sweep_on(
        conn: &mut <D::DB as Database>::Connection,
        older_than: Duration,
        budget: Duration,
    ) -> Result<Swept, Error> {
        if let Some(lock) = D::SWEEP_LOCK {
            let got: Option<i64> = sqlx::query_scalar(lock)
                .fetch_one(&mut *conn)
                .await
                .map_err(D::error)?;
            if got != Some(1) {
                return Ok(Swept::default());
            }
        }
        for setting in D::SWEEP_SESSION {
            sqlx::query(setting)
                .execute(&mut *conn)
                .await
                .map_err(D::error)?;
        }
        let next = format!(
            "SELECT product_id, restock_round FROM product_notification_history \
             WHERE history_swept = FALSE AND updated_at < {} AND status <> 'IN_PROGRESS' \
             ORDER BY updated_at LIMIT 1",
            D::STAMP
        );
        let started = Instant::now();
        let mut swept = Swept::default();
        while started.elapsed() < budget {
            let run: Option<(i64, i64)> = sqlx::query_as(&next)
                .bind(D::stamp(Utc::now(), -delta(older_than)))
                .fetch_optional(&mut *conn)
                .await
                .map_err(D::error)?;
            let Some((product, round)) = run else { break };
            let statement = Instant::now();
            let done = sqlx::query(D::SWEEP_DELETE)
                .bind(product)
                .bind(round)
                .bind(i64::from(SWEEP_ROWS))
                .execute(&mut *conn)
                .await
                .map_err(D::error)?;
            swept.statements.push(statement.elapsed());
            let rows = D::rows_affected(&done);
            swept.deleted += rows;
            if rows < u64::from(SWEEP_ROWS) {
                sqlx::query(
                    "UPDATE product_notification_history SET history_swept = TRUE \
                     WHERE product_id = ? AND restock_round = ? AND status <> 'IN_PROGRESS'",
                )
                .bind(product)
                .bind(round)
                .execute(&mut *conn)
                .await
                .map_err(D::error)?;
            }
        }
        Ok(swept)
    }

    /// Reads the product in a write transaction, locking its row where the database
    /// locks rows: every state change of a product's runs and queue goes through this
    /// read, which is what makes "one run per product" hold under concurrency (G7).
    async fn lock_product(
        tx: &mut Transaction<'static, D::DB>,
        product: ProductId,
    ) -> Result<Option<Product>, Error> {
        let sql = format!(
            "SELECT {PRODUCT_COLUMNS} FROM product WHERE id = ?{}",
            D::LOCK
        );
        let row: Option<ProductRow> = sqlx::query_as(&sql)
            .bind(product.get())
            .fetch_optional(&mut **tx)
            .await
            .map_err(D::error)?;
        Ok(row.map(Product::from))
    }

    /// Gives a run (its row held by the caller: locked, or under the single writer) a
    /// fresh claim and lease, in progress, with no `last_error`: resumed by an operator
    /// (G6) or taken over from an instance whose lease ran out (G8). Returns the run as
    /// claimed; the caller commits.
    async fn claim(
        tx: &mut Transaction<'static, D::DB>,
        row: ClaimableRow,
        lease: Duration,
    ) -> Result<ClaimedRun, Error> {
        let epoch: i64 =
            sqlx::query_scalar("SELECT claim_epoch FROM product_notification_history WHERE id = ?")
                .bind(row.id)
                .fetch_one(&mut **tx)
                .await
                .map_err(D::error)?;
        // G8: one more than the last claim's, so a newer claim always has the greater token.
        let token = epoch + 1;
        let claimed_at = Instant::now();
        let now = Utc::now();
        let sql = format!(
            "UPDATE product_notification_history SET status = 'IN_PROGRESS', claim_token = ?, \
             claim_epoch = ?, lease_until = {}, updated_at = {}, last_error = NULL \
             WHERE id = ?",
            D::INSTANT,
            D::STAMP
        );
        sqlx::query(&sql)
            .bind(token)
            .bind(token)
            .bind(D::instant(now, delta(lease)))
            .bind(D::stamp(now, TimeDelta::zero()))
            .bind(row.id)
            .execute(&mut **tx)
            .await
            .map_err(D::error)?;
        Ok(ClaimedRun {
            claim: RunClaim {
                run_id: row.id,
                product_id: ProductId::from_stored(row.product_id),
                restock_round: row.restock_round,
                token,
                queue_end: Self::queue_end(tx, row.id).await?,
            },
            claimed_at,
            cursor: row.last_sent_position,
            run: Self::run_by_id(tx, row.id).await?,
        })
    }

    /// Where the run's queue ended when its round started (see [`RunClaim`]).
    async fn queue_end(
        tx: &mut Transaction<'static, D::DB>,
        run_id: i64,
    ) -> Result<Option<i64>, Error> {
        sqlx::query_scalar(
            "SELECT queue_end_position FROM product_notification_history WHERE id = ?",
        )
        .bind(run_id)
        .fetch_one(&mut **tx)
        .await
        .map_err(D::error)
    }

    async fn run_by_id(tx: &mut Transaction<'static, D::DB>, run_id: i64) -> Result<Run, Error> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM product_notification_history WHERE id = ?");
        let row: RunRow = sqlx::query_as(&sql)
            .bind(run_id)
            .fetch_one(&mut **tx)
            .await
            .map_err(D::error)?;
        row.into_run()
    }

    /// Served by uq_pnh_product_round.
    async fn run_by_round(
        tx: &mut Transaction<'static, D::DB>,
        product: ProductId,
        round: i64,
    ) -> Result<Option<Run>, Error> {
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM product_notification_history \
             WHERE product_id = ? AND restock_round = ?"
        );
        let row: Option<RunRow> = sqlx::query_as(&sql)
            .bind(product.get())
            .bind(round)
            .fetch_optional(&mut **tx)
            .await
            .map_err(D::error)?;
        row.map(RunRow::into_run).transpose()
    }

    async fn alert(
        tx: &mut Transaction<'static, D::DB>,
        product: ProductId,
        user: UserId,
    ) -> Result<Option<Alert>, Error> {
        let row: Option<AlertRow> = sqlx::query_as(
            "SELECT product_id, user_id, is_active, once, created_at, updated_at \
             FROM product_user_notification WHERE product_id = ? AND user_id = ?",
        )
        .bind(product.get())
        .bind(user.get())
        .fetch_optional(&mut **tx)
        .await
        .map_err(D::error)?;
        Ok(row.map(Alert::from))
    }

    /// The run `key` started for the product, if the key was stored within its
    /// retention. Called with the product read by [`Self::lock_product`]: keys of a
    /// product are only stored after that read, so this one sees every key committed
    /// before (on MySQL it is the transaction's first consistent read, the ones before
    /// it write or lock, so its snapshot is taken after the lock was granted). Served by
    /// uq_tik_product_key.
    async fn run_started_by(
        tx: &mut Transaction<'static, D::DB>,
        product: ProductId,
        key: &IdempotencyKey,
    ) -> Result<Option<Run>, Error> {
        let sql = format!(
            "SELECT restock_round FROM trigger_idempotency_key \
             WHERE product_id = ? AND idempotency_key = ? AND created_at > {}",
            D::INSTANT
        );
        let round: Option<i64> = sqlx::query_scalar(&sql)
            .bind(product.get())
            .bind(key.as_str())
            .bind(D::instant(Utc::now(), key_retention()))
            .fetch_optional(&mut **tx)
            .await
            .map_err(D::error)?;
        match round {
            Some(round) => Self::run_by_round(tx, product, round).await,
            None => Ok(None),
        }
    }

    /// Stores the key with the round it started. A row already there for the key is an
    /// expired one (a live one makes the call a replay), so it is replaced: an expired
    /// key is a new key.
    async fn store_key(
        tx: &mut Transaction<'static, D::DB>,
        product: ProductId,
        key: &IdempotencyKey,
        round: i64,
    ) -> Result<(), Error> {
        let now = Utc::now();
        let sql = format!(
            "INSERT INTO trigger_idempotency_key \
             (product_id, idempotency_key, restock_round, created_at) VALUES (?, ?, ?, {at})\
             {upsert}restock_round = ?, created_at = {at}",
            at = D::INSTANT,
            upsert = D::on_conflict("product_id, idempotency_key"),
        );
        sqlx::query(&sql)
            .bind(product.get())
            .bind(key.as_str())
            .bind(round)
            .bind(D::instant(now, TimeDelta::zero()))
            .bind(round)
            .bind(D::instant(now, TimeDelta::zero()))
            .execute(&mut **tx)
            .await
            .map_err(D::error)?;
        Ok(())
    }

    /// Whether the claim still holds inside `tx`: its token, in progress, lease not run
    /// out.
    async fn claim_holds(
        tx: &mut Transaction<'static, D::DB>,
        claim: &RunClaim,
    ) -> Result<bool, Error> {
        let sql = format!(
            "SELECT id FROM product_notification_history \
             WHERE id = ? AND claim_token = ? AND status = 'IN_PROGRESS' AND lease_until > {}",
            D::INSTANT
        );
        let held: Option<i64> = sqlx::query_scalar(&sql)
            .bind(claim.run_id)
            .bind(claim.token)
            .bind(D::instant(Utc::now(), TimeDelta::zero()))
            .fetch_optional(&mut **tx)
            .await
            .map_err(D::error)?;
        Ok(held.is_some())
    }

    async fn try_set_stock(
        &self,
        product: ProductId,
        stock: i64,
        min_stock: Option<i64>,
    ) -> Result<Product, Error> {
        let mut tx = self.begin().await?;
        Self::upsert_stock(&mut tx, product, stock, min_stock).await?;
        let sql = format!("SELECT {PRODUCT_COLUMNS} FROM product WHERE id = ?");
        let row: ProductRow = sqlx::query_as(&sql)
            .bind(product.get())
            .fetch_one(&mut *tx)
            .await
            .map_err(D::error)?;
        tx.commit().await.map_err(D::error)?;
        Ok(row.into())
    }

    /// The product's row first (the order registrations take), then its run in
    /// progress, then the alert. A recording of the run's owner in flight holds the
    /// history rows it inserts and then waits for the run's row, which this holds: it
    /// then finds its claim gone and rolls back, inserts included.
    async fn try_forget_alert(
        &self,
        product: ProductId,
        user: UserId,
    ) -> Result<ForgotAlert, Error> {
        let mut tx = self.begin().await?;
        if Self::lock_product(&mut tx, product).await?.is_none() {
            return Ok(ForgotAlert::default());
        }
        let alert: Option<(bool, i64)> = sqlx::query_as(
            "SELECT is_active, position FROM product_user_notification \
             WHERE product_id = ? AND user_id = ?",
        )
        .bind(product.get())
        .bind(user.get())
        .fetch_optional(&mut *tx)
        .await
        .map_err(D::error)?;
        let Some((active, position)) = alert else {
            return Ok(ForgotAlert::default());
        };
        let superseded = Self::supersede_owner_before(&mut tx, product, position).await?;
        sqlx::query("DELETE FROM product_user_notification WHERE product_id = ? AND user_id = ?")
            .bind(product.get())
            .bind(user.get())
            .execute(&mut *tx)
            .await
            .map_err(D::error)?;
        if active {
            sqlx::query("UPDATE product SET waiting = waiting - 1 WHERE id = ?")
                .bind(product.get())
                .execute(&mut *tx)
                .await
                .map_err(D::error)?;
        }
        tx.commit().await.map_err(D::error)?;
        Ok(ForgotAlert {
            alert_deleted: true,
            superseded,
        })
    }

    /// Releases the product's run in progress under a newer claim epoch if an instance
    /// owns it and has not recorded past `position` yet (a run waiting for its next
    /// wave has no owner, and reads its queue again when the wave starts).
    async fn supersede_owner_before(
        tx: &mut Transaction<'static, D::DB>,
        product: ProductId,
        position: i64,
    ) -> Result<Option<Superseded>, Error> {
        let sql = format!(
            "SELECT id, restock_round, claim_epoch, last_sent_position \
             FROM product_notification_history \
             WHERE product_id = ? AND status = 'IN_PROGRESS' AND claim_token IS NOT NULL{}",
            D::LOCK
        );
        let run: Option<(i64, i64, i64, Option<i64>)> = sqlx::query_as(&sql)
            .bind(product.get())
            .fetch_optional(&mut **tx)
            .await
            .map_err(D::error)?;
        let Some((id, restock_round, epoch, cursor)) = run else {
            return Ok(None);
        };
        if cursor.is_some_and(|recorded| recorded >= position) {
            return Ok(None);
        }
        let token = epoch + 1;
        let sql = format!(
            "UPDATE product_notification_history SET claim_token = NULL, claim_epoch = ?, \
             lease_until = {} WHERE id = ?",
            D::INSTANT
        );
        sqlx::query(&sql)
            .bind(token)
            .bind(D::instant(Utc::now(), TimeDelta::zero()))
            .bind(id)
            .execute(&mut **tx)
            .await
            .map_err(D::error)?;
        Ok(Some(Superseded {
            restock_round,
            token,
            cursor,
        }))
    }

    /// Cancels an active alert, with one user fewer waiting, under the product's lock
    /// (the lock registrations take first too, so the two never wait on each other).
    async fn try_cancel_alert(&self, product: ProductId, user: UserId) -> Result<Alert, Error> {
        let mut tx = self.begin().await?;
        if Self::lock_product(&mut tx, product).await?.is_none() {
            return Err(Error::UnknownAlert { product, user });
        }
        let sql = format!(
            "UPDATE product_user_notification SET is_active = FALSE, updated_at = {} \
             WHERE product_id = ? AND user_id = ? AND is_active = TRUE",
            D::STAMP
        );
        let cancelled = sqlx::query(&sql)
            .bind(D::stamp(Utc::now(), TimeDelta::zero()))
            .bind(product.get())
            .bind(user.get())
            .execute(&mut *tx)
            .await
            .map_err(D::error)?;
        if D::rows_affected(&cancelled) == 1 {
            sqlx::query("UPDATE product SET waiting = waiting - 1 WHERE id = ?")
                .bind(product.get())
                .execute(&mut *tx)
                .await
                .map_err(D::error)?;
        }
        let alert = Self::alert(&mut tx, product, user).await?;
        tx.commit().await.map_err(D::error)?;
        alert.ok_or(Error::UnknownAlert { product, user })
    }

    async fn try_register_alert(
        &self,
        product: ProductId,
        user: UserId,
        once: bool,
    ) -> Result<Alert, Error> {
        let mut tx = self.begin().await?;
        Self::lock_product(&mut tx, product)
            .await?
            .ok_or(Error::UnknownProduct(product))?;
        let sql = format!(
            "SELECT is_active FROM product_user_notification \
             WHERE product_id = ? AND user_id = ?{}",
            D::LOCK
        );
        let active: Option<bool> = sqlx::query_scalar(&sql)
            .bind(product.get())
            .bind(user.get())
            .fetch_optional(&mut *tx)
            .await
            .map_err(D::error)?;
        if active != Some(true) {
            // G1: a new position behind every earlier registration, the back of the queue;
            // and one more user waiting, under the product's lock.
            sqlx::query(
                "UPDATE product SET alert_seq = alert_seq + 1, waiting = waiting + 1 WHERE id = ?",
            )
            .bind(product.get())
            .execute(&mut *tx)
            .await
            .map_err(D::error)?;
            let position: i64 = sqlx::query_scalar("SELECT alert_seq FROM product WHERE id = ?")
                .bind(product.get())
                .fetch_one(&mut *tx)
                .await
                .map_err(D::error)?;
            let now = Utc::now();
            let reactivate = format!(
                "UPDATE product_user_notification SET is_active = TRUE, position = ?, \
                 once = ?, updated_at = {} WHERE product_id = ? AND user_id = ?",
                D::STAMP
            );
            let insert = format!(
                "INSERT INTO product_user_notification \
                 (position, once, created_at, updated_at, product_id, user_id) \
                 VALUES (?, ?, {stamp}, {stamp}, ?, ?)",
                stamp = D::STAMP
            );
            let query = if active.is_some() {
                sqlx::query(&reactivate)
                    .bind(position)
                    .bind(once)
                    .bind(D::stamp(now, TimeDelta::zero()))
            } else {
                sqlx::query(&insert)
                    .bind(position)
                    .bind(once)
                    .bind(D::stamp(now, TimeDelta::zero()))
                    .bind(D::stamp(now, TimeDelta::zero()))
            };
            query
                .bind(product.get())
                .bind(user.get())
                .execute(&mut *tx)
                .await
                .map_err(D::error)?;
        }
        let alert = Self::alert(&mut tx, product, user).await?;
        tx.commit().await.map_err(D::error)?;
        Ok(alert.expect("the alert was just written in this transaction"))
    }

    async fn try_start_run(
        &self,
        product: ProductId,
        request: &TriggerRequest,
        lease: Duration,
    ) -> Result<Triggered, Error> {
        let mut tx = self.begin().await?;
        if let Some(stock) = request.stock {
            Self::upsert_stock(&mut tx, product, stock, None).await?;
        }
        let current = Self::lock_product(&mut tx, product)
            .await?
            .ok_or(Error::UnknownProduct(product))?;
        // A retry is answered before any refusal, with its run as it is now; the
        // rollback undoes the stock written above, so it changes nothing.
        if let Some(key) = &request.idempotency_key
            && let Some(run) = Self::run_started_by(&mut tx, product, key).await?
        {
            tx.rollback().await.map_err(D::error)?;
            return Ok(Triggered::Replayed(run));
        }
        let round = Self::next_round(&mut tx, product, &current).await?;
        let claimed_at = Instant::now();
        let run_id = Self::insert_run(&mut tx, product, round, request, lease).await?;
        if let Some(key) = &request.idempotency_key {
            Self::store_key(&mut tx, product, key, round).await?;
        }
        let queue_end = Self::queue_end(&mut tx, run_id).await?;
        let run = Self::run_by_id(&mut tx, run_id).await?;
        tx.commit().await.map_err(D::error)?;
        Ok(Triggered::Started(ClaimedRun {
            claim: RunClaim {
                run_id,
                product_id: product,
                restock_round: round,
                token: FIRST_CLAIM,
                queue_end,
            },
            claimed_at,
            cursor: None,
            run,
        }))
    }

    /// The round a new run of `product` takes, with the product's round moved on to it;
    /// refused while a run of the product is in progress, or while it is out of stock.
    async fn next_round(
        tx: &mut Transaction<'static, D::DB>,
        product: ProductId,
        current: &Product,
    ) -> Result<i64, Error> {
        // A run in progress is the first thing to tell: with `stock: 0` during a run,
        // the caller learns the run goes on, not merely that the stock is out. Any run
        // of the product in progress refuses, whichever its round: the question G7
        // asks, and the one the unique index on in-progress runs answers (served by
        // it on SQLite, by ix_pnh_list_product_status on MySQL).
        let in_progress: Option<i64> = sqlx::query_scalar(
            "SELECT restock_round FROM product_notification_history \
             WHERE product_id = ? AND status = 'IN_PROGRESS'",
        )
        .bind(product.get())
        .fetch_optional(&mut **tx)
        .await
        .map_err(D::error)?;
        if let Some(round) = in_progress {
            return Err(Error::RunInProgress { product, round });
        }
        if !current.in_stock() {
            return Err(Error::OutOfStock {
                product,
                stock: current.stock,
                min_stock: current.min_stock,
            });
        }
        let round = current
            .restock_round
            .checked_add(1)
            .ok_or(Error::RoundsExhausted(product))?;
        let sql = format!(
            "UPDATE product SET restock_round = ?, updated_at = {} WHERE id = ?",
            D::STAMP
        );
        sqlx::query(&sql)
            .bind(round)
            .bind(D::stamp(Utc::now(), TimeDelta::zero()))
            .bind(product.get())
            .execute(&mut **tx)
            .await
            .map_err(D::error)?;
        Ok(round)
    }

    /// Inserts the run of `round`, claimed by this caller with the first claim token;
    /// returns its id.
    async fn insert_run(
        tx: &mut Transaction<'static, D::DB>,
        product: ProductId,
        round: i64,
        request: &TriggerRequest,
        lease: Duration,
    ) -> Result<i64, Error> {
        let now = Utc::now();
        // queue_size is counted from ix_pun_queue alone (product_id, is_active, ...),
        // under the product's lock, the one registrations take: none slips between
        // the count and the queue's end position.
        let sql = format!(
            "INSERT INTO product_notification_history \
             (product_id, restock_round, status, claim_token, claim_epoch, lease_until, \
              started_at, updated_at, wave_per_unit, wave_interval_ms, attributes, \
              trace_parent, queue_end_position, queue_size) \
             VALUES (?, ?, 'IN_PROGRESS', ?, ?, {at}, {stamp}, {stamp}, ?, ?, ?, ?, \
              (SELECT alert_seq FROM product WHERE id = ?), \
              (SELECT COUNT(*) FROM product_user_notification \
               WHERE product_id = ? AND is_active = TRUE))",
            at = D::INSTANT,
            stamp = D::STAMP
        );
        let attributes = request.attributes.to_stored();
        let inserted = sqlx::query(&sql)
            .bind(product.get())
            .bind(round)
            .bind(FIRST_CLAIM)
            .bind(FIRST_CLAIM)
            .bind(D::instant(now, delta(lease)))
            .bind(D::stamp(now, TimeDelta::zero()))
            .bind(D::stamp(now, TimeDelta::zero()))
            .bind(request.wave.map(|w| i64::from(w.per_unit)))
            .bind(request.wave.map(|w| w.interval.as_millis() as i64))
            .bind(attributes.as_deref())
            .bind(request.trace_parent.as_deref())
            .bind(product.get())
            .bind(product.get())
            .execute(&mut **tx)
            .await;
        match inserted {
            Ok(done) => Ok(D::last_insert_id(&done)),
            // G7: the unique index on in-progress runs is the last line of defence.
            Err(e) if is_unique_violation(&e) => Err(Error::RunInProgress { product, round }),
            Err(e) => Err(D::error(e)),
        }
    }

    async fn try_resume_run(
        &self,
        product: ProductId,
        lease: Duration,
    ) -> Result<ClaimedRun, Error> {
        let mut tx = self.begin().await?;
        let current = Self::lock_product(&mut tx, product)
            .await?
            .ok_or(Error::UnknownProduct(product))?;
        let sql = format!(
            "SELECT id, product_id, restock_round, status, last_sent_position \
             FROM product_notification_history WHERE product_id = ? AND restock_round = ?{}",
            D::LOCK
        );
        let row: Option<ClaimableRow> = sqlx::query_as(&sql)
            .bind(product.get())
            .bind(current.restock_round)
            .fetch_optional(&mut *tx)
            .await
            .map_err(D::error)?;
        let Some(row) = row else {
            return Err(Error::NothingToResume {
                product,
                round: 0,
                why: NotResumable::NeverRestocked,
            });
        };
        check_resumable(&current, status(&row.status)?)?;
        let claimed = Self::claim(&mut tx, row, lease).await?;
        tx.commit().await.map_err(D::error)?;
        Ok(claimed)
    }

    /// Claims one run if its lease has still run out once its row is held: of several
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
        let sql = format!(
            "SELECT id, product_id, restock_round, status, last_sent_position \
             FROM product_notification_history \
             WHERE id = ? AND status = 'IN_PROGRESS' AND lease_until < {}{}",
            D::INSTANT,
            D::LOCK_SKIP_LOCKED
        );
        let row: Option<ClaimableRow> = sqlx::query_as(&sql)
            .bind(run_id)
            .bind(D::instant(Utc::now(), TimeDelta::zero()))
            .fetch_optional(&mut *tx)
            .await
            .map_err(D::error)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let claimed = Self::claim(&mut tx, row, lease).await?;
        tx.commit().await.map_err(D::error)?;
        Ok(Some(claimed))
    }

    /// The conditional update of G5 and G8: the run's cursor moved past `sent`, its
    /// count, status and lease as `after` says, if `claim` still holds an unexpired
    /// lease. Nothing updated means the claim was lost.
    async fn move_run_on(
        tx: &mut Transaction<'static, D::DB>,
        claim: &RunClaim,
        sent: &[SentNotification],
        after: After,
        lease: Duration,
        last_error: Option<&str>,
    ) -> Result<<D::DB as sqlx::Database>::QueryResult, Error> {
        let last = sent.last().map(|s| s.registration);
        // The lease runs `lease_for` from now, or ends (NULL) with a final state.
        let (status, lease_for, next_wave_in, keep_claim) = match after {
            After::Renew => (RunStatus::InProgress, Some(lease), None, true),
            After::Release => (RunStatus::InProgress, Some(Duration::ZERO), None, false),
            After::Finish(status) => (status.status(), None, None, false),
            After::WaitForWave(interval) => {
                (RunStatus::InProgress, Some(interval), Some(interval), false)
            }
        };
        let now = Utc::now();
        let sql = format!(
            "UPDATE product_notification_history SET \
             last_sent_user_id = COALESCE(?, last_sent_user_id), \
             last_sent_position = COALESCE(?, last_sent_position), \
             sent_count = sent_count + ?, status = ?, \
             lease_until = CASE WHEN ? THEN {at} ELSE NULL END, \
             next_wave_at = CASE WHEN ? THEN {stamp} ELSE NULL END, \
             claim_token = CASE WHEN ? THEN claim_token ELSE NULL END, \
             updated_at = {stamp}, last_error = ? \
             WHERE id = ? AND claim_token = ? AND status = 'IN_PROGRESS' \
               AND lease_until > {at}",
            at = D::INSTANT,
            stamp = D::STAMP
        );
        sqlx::query(&sql)
            .bind(last.map(|r| r.user_id.get()))
            .bind(last.map(|r| r.position))
            .bind(sent.len() as i64)
            .bind(status.as_str())
            .bind(lease_for.is_some())
            .bind(D::instant(now, delta(lease_for.unwrap_or_default())))
            .bind(next_wave_in.is_some())
            .bind(D::stamp(now, delta(next_wave_in.unwrap_or_default())))
            .bind(keep_claim)
            .bind(D::stamp(now, TimeDelta::zero()))
            .bind(last_error)
            .bind(claim.run_id)
            .bind(claim.token)
            .bind(D::instant(now, TimeDelta::zero()))
            .execute(&mut **tx)
            .await
            .map_err(D::error)
    }

    /// Inserts one statement of history rows.
    /// One-shot alerts (G5): those of `sent` are used up in the transaction that
    /// records their notifications, so no later round, resume or new owner of the run
    /// notifies them again, and the users waiting drop by as many. The product's row is
    /// locked first, the order registrations take, and only when the batch holds one.
    async fn use_up_once(
        tx: &mut Transaction<'static, D::DB>,
        claim: &RunClaim,
        sent: &[SentNotification],
    ) -> Result<(), sqlx::Error> {
        let users = vec!["?"; sent.len()].join(", ");
        let which =
            format!("product_id = ? AND once = TRUE AND is_active = TRUE AND user_id IN ({users})");
        let check = format!("SELECT COUNT(*) FROM product_user_notification WHERE {which}");
        let mut count = sqlx::query_scalar::<_, i64>(&check).bind(claim.product_id.get());
        for s in sent {
            count = count.bind(s.registration.user_id.get());
        }
        if count.fetch_one(&mut **tx).await? == 0 {
            return Ok(());
        }
        let lock = format!("SELECT id FROM product WHERE id = ?{}", D::LOCK);
        sqlx::query(&lock)
            .bind(claim.product_id.get())
            .execute(&mut **tx)
            .await?;
        let update = format!(
            "UPDATE product_user_notification SET is_active = FALSE, updated_at = {} \
             WHERE {which}",
            D::STAMP
        );
        let mut used = sqlx::query(&update)
            .bind(D::stamp(Utc::now(), TimeDelta::zero()))
            .bind(claim.product_id.get());
        for s in sent {
            used = used.bind(s.registration.user_id.get());
        }
        let used = D::rows_affected(&used.execute(&mut **tx).await?) as i64;
        sqlx::query("UPDATE product SET waiting = waiting - ? WHERE id = ?")
            .bind(used)
            .bind(claim.product_id.get())
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn insert_history(
        tx: &mut Transaction<'static, D::DB>,
        claim: &RunClaim,
        rows: &[SentNotification],
    ) -> Result<(), sqlx::Error> {
        let sql = format!(
            "INSERT INTO product_user_notification_history \
             (product_id, user_id, restock_round, sent_at, position) VALUES {}",
            vec!["(?, ?, ?, ?, ?)"; rows.len()].join(", ")
        );
        let mut insert = sqlx::query(&sql);
        for s in rows {
            insert = insert
                .bind(claim.product_id.get())
                .bind(s.registration.user_id.get())
                .bind(claim.restock_round)
                .bind(s.sent_at)
                .bind(s.registration.position);
        }
        insert.execute(&mut **tx).await?;
        Ok(())
    }
}

#[async_trait]
impl<D: Dialect> Store for SqlStore<D>
where
    for<'c> &'c mut <D::DB as Database>::Connection: Executor<'c, Database = D::DB>,
    for<'q> <D::DB as Database>::Arguments<'q>: IntoArguments<'q, D::DB>,
    for<'r> &'r str: ColumnIndex<<D::DB as Database>::Row>,
    usize: ColumnIndex<<D::DB as Database>::Row>,
    for<'q> i64: Encode<'q, D::DB> + Decode<'q, D::DB> + Type<D::DB>,
    for<'q> bool: Encode<'q, D::DB> + Decode<'q, D::DB> + Type<D::DB>,
    for<'q> &'q str: Encode<'q, D::DB> + Type<D::DB>,
    for<'q> Option<i64>: Encode<'q, D::DB>,
    for<'q> Option<&'q str>: Encode<'q, D::DB>,
    for<'q> String: Decode<'q, D::DB> + Type<D::DB>,
    for<'q> DateTime<Utc>: Encode<'q, D::DB> + Decode<'q, D::DB> + Type<D::DB>,
{
    async fn set_stock(
        &self,
        product: ProductId,
        stock: i64,
        min_stock: Option<i64>,
    ) -> Result<Product, Error> {
        retry_deadlocks::<D, _, _, _>(|| self.try_set_stock(product, stock, min_stock)).await
    }

    async fn product(&self, product: ProductId) -> Result<Option<Product>, Error> {
        let sql = format!("SELECT {PRODUCT_COLUMNS} FROM product WHERE id = ?");
        let row: Option<ProductRow> = sqlx::query_as(&sql)
            .bind(product.get())
            .fetch_optional(&self.reader)
            .await
            .map_err(D::error)?;
        Ok(row.map(Product::from))
    }

    async fn register_alert(
        &self,
        product: ProductId,
        user: UserId,
        once: bool,
    ) -> Result<Alert, Error> {
        retry_deadlocks::<D, _, _, _>(|| self.try_register_alert(product, user, once)).await
    }

    async fn cancel_alert(&self, product: ProductId, user: UserId) -> Result<Alert, Error> {
        retry_deadlocks::<D, _, _, _>(|| self.try_cancel_alert(product, user)).await
    }

    async fn start_run(
        &self,
        product: ProductId,
        request: &TriggerRequest,
        lease: Duration,
    ) -> Result<Triggered, Error> {
        retry_deadlocks::<D, _, _, _>(|| self.try_start_run(product, request, lease)).await
    }

    /// Served by ix_pun_user and ix_punh_user.
    async fn products_of_user(&self, user: UserId) -> Result<Vec<ProductId>, Error> {
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT product_id FROM product_user_notification WHERE user_id = ? \
             UNION SELECT product_id FROM product_user_notification_history WHERE user_id = ? \
             ORDER BY product_id",
        )
        .bind(user.get())
        .bind(user.get())
        .fetch_all(&self.writer)
        .await
        .map_err(D::error)?;
        Ok(ids.into_iter().map(ProductId::from_stored).collect())
    }

    async fn forget_alert(&self, product: ProductId, user: UserId) -> Result<ForgotAlert, Error> {
        retry_deadlocks::<D, _, _, _>(|| self.try_forget_alert(product, user)).await
    }

    /// Served by ix_punh_user. No owner can record the user any more (its run was
    /// handed over, and the alert is gone from the queue), so what this deletes stays
    /// deleted.
    async fn forget_history(&self, product: ProductId, user: UserId) -> Result<u64, Error> {
        let done = sqlx::query(
            "DELETE FROM product_user_notification_history WHERE user_id = ? AND product_id = ?",
        )
        .bind(user.get())
        .bind(product.get())
        .execute(&self.writer)
        .await
        .map_err(D::error)?;
        Ok(D::rows_affected(&done))
    }

    /// Runs are found by ix_pnh_sweep, their rows deleted by the unique key's prefix.
    async fn sweep_history(&self, older_than: Duration, budget: Duration) -> Result<Swept, Error> {
        let mut conn = self.writer.acquire().await.map_err(D::error)?;
        let swept = Self::sweep_on(&mut conn, older_than, budget).await;
        // Its session was changed for the sweep and holds the sweep's lock: closed,
        // never handed back to the pool.
        let _ = conn.close().await;
        swept
    }

    async fn forget_expired_trigger_keys(&self, limit: u32) -> Result<u64, Error> {
        let done = sqlx::query(D::DELETE_EXPIRED_KEYS)
            .bind(D::instant(Utc::now(), key_retention()))
            .bind(as_limit(limit))
            .execute(&self.writer)
            .await
            .map_err(D::error)?;
        Ok(D::rows_affected(&done))
    }

    async fn start_wave(
        &self,
        claim: &RunClaim,
        quota: i64,
        started_count: i64,
        lease: Duration,
    ) -> Result<Claimed, Error> {
        let now = Utc::now();
        let sql = format!(
            "UPDATE product_notification_history SET wave_quota = ?, wave_started_count = ?, \
             next_wave_at = NULL, lease_until = {at}, updated_at = {stamp} \
             WHERE id = ? AND claim_token = ? AND status = 'IN_PROGRESS' AND lease_until > {at}",
            at = D::INSTANT,
            stamp = D::STAMP
        );
        let updated = sqlx::query(&sql)
            .bind(quota)
            .bind(started_count)
            .bind(D::instant(now, delta(lease)))
            .bind(D::stamp(now, TimeDelta::zero()))
            .bind(claim.run_id)
            .bind(claim.token)
            .bind(D::instant(now, TimeDelta::zero()))
            .execute(&self.writer)
            .await
            .map_err(D::error)?;
        Ok(Claimed::by_rows_affected(D::rows_affected(&updated)))
    }

    async fn resume_run(&self, product: ProductId, lease: Duration) -> Result<ClaimedRun, Error> {
        retry_deadlocks::<D, _, _, _>(|| self.try_resume_run(product, lease)).await
    }

    async fn run(&self, product: ProductId, round: Option<i64>) -> Result<Option<Run>, Error> {
        // uq_pnh_product_round serves both: the point lookup and the descending scan.
        let by_round = format!(
            "SELECT {RUN_COLUMNS} FROM product_notification_history \
             WHERE product_id = ? AND restock_round = ?"
        );
        let latest = format!(
            "SELECT {RUN_COLUMNS} FROM product_notification_history \
             WHERE product_id = ? ORDER BY restock_round DESC LIMIT 1"
        );
        let query = match round {
            Some(round) => sqlx::query_as(&by_round).bind(product.get()).bind(round),
            None => sqlx::query_as(&latest).bind(product.get()),
        };
        let row: Option<RunRow> = query.fetch_optional(&self.reader).await.map_err(D::error)?;
        row.map(RunRow::into_run).transpose()
    }

    /// A keyset page read from ix_pun_queue. Up to where the queue ended when the round
    /// started, that alone: no user there was notified in this round unless behind the
    /// cursor. After it (users who registered again during the round), anti-joined with
    /// a probe of the history's unique key per row, so users recorded in this round are
    /// left out. (MariaDB runs the equivalent NOT EXISTS as a dependent subquery,
    /// several times slower.) The probe costs about as much as writing the row, so most
    /// of the queue is read without it.
    async fn next_registrations(
        &self,
        claim: &RunClaim,
        cursor: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Registration>, Error> {
        let mut from = cursor.unwrap_or(0);
        if let Some(end) = claim.queue_end.filter(|&end| from < end) {
            let rows: Vec<RegistrationRow> = sqlx::query_as(
                "SELECT user_id, position FROM product_user_notification \
                 WHERE product_id = ? AND is_active = TRUE AND position > ? \
                   AND position <= ? \
                 ORDER BY position LIMIT ?",
            )
            .bind(claim.product_id.get())
            .bind(from)
            .bind(end)
            .bind(as_limit(limit))
            .fetch_all(&self.reader)
            .await
            .map_err(D::error)?;
            if !rows.is_empty() {
                return Ok(rows.into_iter().map(Registration::from).collect());
            }
            from = end;
        }
        let rows: Vec<RegistrationRow> = sqlx::query_as(
            "SELECT q.user_id, q.position FROM product_user_notification q \
             LEFT JOIN product_user_notification_history h \
               ON h.product_id = q.product_id AND h.restock_round = ? \
               AND h.user_id = q.user_id \
             WHERE q.product_id = ? AND q.is_active = TRUE AND q.position > ? \
               AND h.id IS NULL \
             ORDER BY q.position LIMIT ?",
        )
        .bind(claim.restock_round)
        .bind(claim.product_id.get())
        .bind(from)
        .bind(as_limit(limit))
        .fetch_all(&self.reader)
        .await
        .map_err(D::error)?;
        Ok(rows.into_iter().map(Registration::from).collect())
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
            After::Finish(FinalStatus::Error) => last_error.map(Run::bound_last_error),
            _ => None,
        };
        let mut tx = self.begin().await?;
        // The history rows first, the conditional update last: if a stall holds the
        // insert up past the lease (G10), the update then finds the lease run out, or
        // the run taken over, and the whole transaction is rolled back (G8).
        // Statements of a fixed number of rows: each length is prepared once per
        // connection and then reused, as a batch of any length would not be.
        for rows in sent.chunks(HISTORY_ROWS_PER_INSERT) {
            let inserted = match Self::insert_history(&mut tx, claim, rows).await {
                Ok(()) => Self::use_up_once(&mut tx, claim, rows).await,
                Err(e) => Err(e),
            };
            match inserted {
                Ok(()) => {}
                // A user already recorded in this round: a new owner of the run
                // recorded it (G6's unique key). Then this claim is the one that lost,
                // and says so like any other write of a lost claim.
                Err(e) if is_unique_violation(&e) && !Self::claim_holds(&mut tx, claim).await? => {
                    tx.rollback().await.ok();
                    return Ok(Claimed::Lost);
                }
                Err(e) => return Err(D::error(e)),
            }
        }
        let updated = Self::move_run_on(&mut tx, claim, sent, after, lease, last_error).await?;
        if D::rows_affected(&updated) == 0 {
            tx.rollback().await.ok();
            return Ok(Claimed::Lost);
        }
        tx.commit().await.map_err(D::error)?;
        Ok(Claimed::Yes)
    }

    async fn clock(&self) -> Result<DateTime<Utc>, Error> {
        D::clock(&self.reader).await.map_err(D::error)
    }

    async fn take_over_expired(
        &self,
        lease: Duration,
        limit: u32,
    ) -> Result<Vec<ClaimedRun>, Error> {
        // ix_pnh_status_lease serves the range.
        let sql = format!(
            "SELECT id FROM product_notification_history \
             WHERE status = 'IN_PROGRESS' AND lease_until < {} \
             ORDER BY lease_until LIMIT ?",
            D::INSTANT
        );
        let expired: Vec<i64> = sqlx::query_scalar(&sql)
            .bind(D::instant(Utc::now(), TimeDelta::zero()))
            .bind(as_limit(limit))
            .fetch_all(&self.reader)
            .await
            .map_err(D::error)?;
        let mut taken = Vec::with_capacity(expired.len());
        for run_id in expired {
            if let Some(claimed) =
                retry_deadlocks::<D, _, _, _>(|| self.try_take_over(run_id, lease)).await?
            {
                taken.push(claimed);
            }
        }
        Ok(taken)
    }

    async fn holds_claim(&self, claim: &RunClaim) -> Result<bool, Error> {
        let held: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM product_notification_history \
             WHERE id = ? AND claim_token = ? AND status = 'IN_PROGRESS'",
        )
        .bind(claim.run_id)
        .bind(claim.token)
        .fetch_optional(&self.reader)
        .await
        .map_err(D::error)?;
        Ok(held.is_some())
    }

    /// Served by uq_pnh_product_round.
    async fn run_progress(
        &self,
        product: ProductId,
        round: i64,
    ) -> Result<Option<RunProgress>, Error> {
        let row: Option<ProgressRow> = sqlx::query_as(
            "SELECT status, last_sent_position, history_swept FROM product_notification_history \
             WHERE product_id = ? AND restock_round = ?",
        )
        .bind(product.get())
        .bind(round)
        .fetch_optional(&self.reader)
        .await
        .map_err(D::error)?;
        row.map(ProgressRow::into_progress).transpose()
    }

    /// Served by ix_punh_run_position.
    async fn recorded_in_run(
        &self,
        product: ProductId,
        round: i64,
        after: Option<i64>,
        upto: i64,
        limit: u32,
    ) -> Result<Vec<Recorded>, Error> {
        let sql = format!(
            "SELECT {RECORDED_COLUMNS} FROM {RECORDED_FROM} \
             WHERE h.product_id = ? AND h.restock_round = ? AND h.position > ? \
             AND h.position <= ? ORDER BY h.position LIMIT ?"
        );
        let rows: Vec<RecordedRow> = sqlx::query_as(&sql)
            .bind(product.get())
            .bind(round)
            .bind(after.unwrap_or(i64::MIN))
            .bind(upto)
            .bind(as_limit(limit))
            .fetch_all(&self.reader)
            .await
            .map_err(D::error)?;
        rows::recorded(rows)
    }

    /// Served by the primary key, ix_punh_product or ix_punh_user.
    async fn recorded_after(
        &self,
        after: i64,
        filter: NotificationFilter,
        limit: u32,
    ) -> Result<Vec<Recorded>, Error> {
        let mut sql = format!("SELECT {RECORDED_COLUMNS} FROM {RECORDED_FROM} WHERE h.id > ?");
        if filter.product_id.is_some() {
            sql.push_str(" AND h.product_id = ?");
        }
        if filter.user_id.is_some() {
            sql.push_str(" AND h.user_id = ?");
        }
        sql.push_str(" ORDER BY h.id LIMIT ?");
        let mut query = sqlx::query_as(&sql).bind(after);
        if let Some(product) = filter.product_id {
            query = query.bind(product.get());
        }
        if let Some(user) = filter.user_id {
            query = query.bind(user.get());
        }
        let rows: Vec<RecordedRow> = query
            .bind(as_limit(limit))
            .fetch_all(&self.reader)
            .await
            .map_err(D::error)?;
        rows::recorded(rows)
    }

    /// Served by the primary key, read backwards.
    async fn last_recorded(&self) -> Result<Option<Recorded>, Error> {
        let sql =
            format!("SELECT {RECORDED_COLUMNS} FROM {RECORDED_FROM} ORDER BY h.id DESC LIMIT 1");
        let row: Option<RecordedRow> = sqlx::query_as(&sql)
            .fetch_optional(&self.reader)
            .await
            .map_err(D::error)?;
        Ok(row
            .map(|row| rows::recorded(vec![row]))
            .transpose()?
            .and_then(|mut one| one.pop()))
    }

    /// Served by uq_punh_product_round_user.
    async fn recorded(&self, id: NotificationId) -> Result<Option<Recorded>, Error> {
        let sql = format!(
            "SELECT {RECORDED_COLUMNS} FROM {RECORDED_FROM} \
             WHERE h.product_id = ? AND h.restock_round = ? AND h.user_id = ?"
        );
        let row: Option<RecordedRow> = sqlx::query_as(&sql)
            .bind(id.product_id.get())
            .bind(id.restock_round)
            .bind(id.user_id.get())
            .fetch_optional(&self.reader)
            .await
            .map_err(D::error)?;
        Ok(row
            .map(|row| rows::recorded(vec![row]))
            .transpose()?
            .and_then(|mut one| one.pop()))
    }

    /// Newest first, by key. Each filter has an index that yields its rows in key
    /// order (migrations `*_run_listing.sql`), so a page is read from it backwards and
    /// the `LIMIT` stops the scan: the primary key with no filter, and the index named
    /// below otherwise. The index is named to the database (`use_index`): left to
    /// itself, MariaDB reads a product's runs through uq_pnh_product_round and sorts
    /// them once the page is larger than its estimate of their number, and a frequent
    /// status through the primary key, filtering as it goes.
    async fn alert_status(
        &self,
        product: ProductId,
        user: UserId,
    ) -> Result<Option<AlertStatus>, Error> {
        let mut tx = self.reader.begin().await.map_err(D::error)?;
        let row: Option<ListedAlertRow> = sqlx::query_as(
            "SELECT position AS listed_key, product_id, user_id, is_active, once, \
             created_at, updated_at FROM product_user_notification \
             WHERE product_id = ? AND user_id = ?",
        )
        .bind(product.get())
        .bind(user.get())
        .fetch_optional(&mut *tx)
        .await
        .map_err(D::error)?;
        let Some((position, alert)) = row.map(ListedAlertRow::into_listed) else {
            return Ok(None);
        };
        let users_ahead: i64 = if alert.active {
            let sql = format!(
                "SELECT COUNT(*) FROM product_user_notification{} \
                 WHERE product_id = ? AND is_active = TRUE AND position < ?",
                D::use_index("ix_pun_queue")
            );
            sqlx::query_scalar(&sql)
                .bind(product.get())
                .bind(position)
                .fetch_one(&mut *tx)
                .await
                .map_err(D::error)?
        } else {
            0
        };
        let last_notified: Option<(i64, DateTime<Utc>)> = sqlx::query_as(
            "SELECT restock_round, sent_at FROM product_user_notification_history \
             WHERE product_id = ? AND user_id = ? ORDER BY restock_round DESC LIMIT 1",
        )
        .bind(product.get())
        .bind(user.get())
        .fetch_optional(&mut *tx)
        .await
        .map_err(D::error)?;
        let latest: Option<(i64, String, Option<i64>)> = sqlx::query_as(
            "SELECT restock_round, status, queue_end_position \
             FROM product_notification_history WHERE product_id = ? \
             ORDER BY restock_round DESC LIMIT 1",
        )
        .bind(product.get())
        .fetch_optional(&mut *tx)
        .await
        .map_err(D::error)?;
        tx.commit().await.map_err(D::error)?;
        let latest_round = match latest {
            Some((round, status, queue_end)) => {
                let facts = RoundFacts {
                    notified_in_round: last_notified.is_some_and(|(r, _)| r == round),
                    alert_active: alert.active,
                    alert_position: position,
                    round_queue_end: queue_end,
                    round_status: super::rows::status(&status)?,
                };
                Some((round, AlertOutcome::of(facts)))
            }
            None => None,
        };
        Ok(Some(AlertStatus {
            position: if alert.active { users_ahead + 1 } else { 0 },
            users_ahead,
            alert,
            last_notified,
            latest_round,
        }))
    }

    async fn list_alerts(
        &self,
        filter: AlertFilter,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Vec<(i64, Alert)>, Error> {
        let (index, key, order) = match (filter.product_id, filter.user_id) {
            (Some(_), None) if filter.active_only => ("ix_pun_queue", "position", "ASC"),
            (Some(_), None) => ("ix_pun_product_position", "position", "ASC"),
            // A user's alerts (with a product: the one of them, among the user's few).
            (None, _) | (Some(_), Some(_)) => ("ix_pun_user", "id", "DESC"),
        };
        let mut conditions = vec![];
        if filter.product_id.is_some() {
            conditions.push("product_id = ?".to_string());
        }
        if filter.user_id.is_some() {
            conditions.push("user_id = ?".to_string());
        }
        if filter.active_only {
            conditions.push("is_active = TRUE".to_string());
        }
        if after.is_some() {
            let compare = if order == "ASC" { ">" } else { "<" };
            conditions.push(format!("{key} {compare} ?"));
        }
        let sql = format!(
            "SELECT {key} AS listed_key, product_id, user_id, is_active, once, created_at, \
             updated_at \
             FROM product_user_notification{} WHERE {} ORDER BY {key} {order} LIMIT ?",
            D::use_index(index),
            conditions.join(" AND ")
        );
        let mut query = sqlx::query_as::<_, ListedAlertRow>(&sql);
        if let Some(product) = filter.product_id {
            query = query.bind(product.get());
        }
        if let Some(user) = filter.user_id {
            query = query.bind(user.get());
        }
        if let Some(after) = after {
            query = query.bind(after);
        }
        let rows = query
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await
            .map_err(D::error)?;
        Ok(rows.into_iter().map(ListedAlertRow::into_listed).collect())
    }

    async fn list_products(
        &self,
        order: ProductOrder,
        after: Option<(i64, i64)>,
        limit: u32,
    ) -> Result<Vec<Product>, Error> {
        let (index, after_sql, order_sql) = match order {
            // Read backwards along (waiting, id): the most users waiting first.
            ProductOrder::WaitingDesc => (
                Some("ix_product_waiting"),
                " WHERE waiting < ? OR (waiting = ? AND id < ?)",
                " ORDER BY waiting DESC, id DESC",
            ),
            // The primary key.
            ProductOrder::Id => (None, " WHERE id > ?", " ORDER BY id"),
        };
        let mut sql = format!(
            "SELECT {PRODUCT_COLUMNS} FROM product{}",
            index.map(D::use_index).unwrap_or_default()
        );
        if after.is_some() {
            sql.push_str(after_sql);
        }
        sql.push_str(order_sql);
        sql.push_str(" LIMIT ?");
        let mut query = sqlx::query_as::<_, ProductRow>(&sql);
        match (order, after) {
            (ProductOrder::WaitingDesc, Some((waiting, id))) => {
                query = query.bind(waiting).bind(waiting).bind(id);
            }
            (ProductOrder::Id, Some((_, id))) => query = query.bind(id),
            (_, None) => {}
        }
        let rows = query
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await
            .map_err(D::error)?;
        Ok(rows.into_iter().map(Product::from).collect())
    }

    async fn list_runs(
        &self,
        filter: RunFilter,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<ListedRun>, Error> {
        let index = match (filter.status, filter.product_id) {
            (None, None) => None,
            (Some(_), None) => Some("ix_pnh_list_status"),
            (None, Some(_)) => Some("ix_pnh_list_product"),
            (Some(_), Some(_)) => Some("ix_pnh_list_product_status"),
        };
        let mut conditions = vec![];
        if filter.status.is_some() {
            conditions.push("status = ?");
        }
        if filter.product_id.is_some() {
            conditions.push("product_id = ?");
        }
        if before.is_some() {
            conditions.push("id < ?");
        }
        let mut sql = format!(
            "SELECT id, {RUN_COLUMNS} FROM product_notification_history{}",
            index.map(D::use_index).unwrap_or_default()
        );
        if !conditions.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conditions.join(" AND "));
        }
        sql.push_str(" ORDER BY id DESC LIMIT ?");
        let mut query = sqlx::query_as(&sql);
        if let Some(status) = filter.status {
            query = query.bind(status.as_str());
        }
        if let Some(product) = filter.product_id {
            query = query.bind(product.get());
        }
        if let Some(before) = before {
            query = query.bind(before);
        }
        let rows: Vec<ListedRunRow> = query
            .bind(as_limit(limit))
            .fetch_all(&self.reader)
            .await
            .map_err(D::error)?;
        rows.into_iter().map(ListedRunRow::into_listed).collect()
    }
}
