//! The queries and row mappings that read the same on MySQL and SQLite, written once.
//!
//! `portable_queries!(Database, Row)` expands, inside a backend module, to free
//! functions over that backend's pool and transaction type. It calls the module's own
//! `backend` error mapping, so errors are reported the backend's way. (A macro rather
//! than functions generic over `sqlx::Database`: the decode bounds those would need are
//! longer than the code they would share.)

macro_rules! portable_queries {
    ($db:ty, $row:ty) => {
        /// Columns of `product_notification_history` that make a [`Run`], in this order.
        const RUN_COLUMNS: &str = "product_id, restock_round, status, last_sent_user_id, \
                                   sent_count, started_at, updated_at, wave_per_unit, \
                                   wave_interval_ms, wave_quota, wave_started_count, \
                                   next_wave_at, last_error";

        fn run_from_row(row: &$row) -> Result<Run, Error> {
            let status: String = row.try_get("status").map_err(backend)?;
            let status = RunStatus::from_str(&status)
                .map_err(|e| Error::Backend(BackendError::new(STORE, false, anyhow::anyhow!(e))))?;
            Ok(Run {
                product_id: ProductId::from_stored(row.try_get("product_id").map_err(backend)?),
                restock_round: row.try_get("restock_round").map_err(backend)?,
                status,
                last_sent_user_id: row
                    .try_get::<Option<i64>, _>("last_sent_user_id")
                    .map_err(backend)?
                    .map(UserId::from_stored),
                sent_count: row.try_get("sent_count").map_err(backend)?,
                started_at: row.try_get("started_at").map_err(backend)?,
                updated_at: row.try_get("updated_at").map_err(backend)?,
                wave: wave_from_row(row)?,
                last_error: row.try_get("last_error").map_err(backend)?,
            })
        }

        fn wave_from_row(row: &$row) -> Result<Option<WaveState>, Error> {
            let per_unit: Option<i64> = row.try_get("wave_per_unit").map_err(backend)?;
            let interval_ms: Option<i64> = row.try_get("wave_interval_ms").map_err(backend)?;
            let (Some(per_unit), Some(interval_ms)) = (per_unit, interval_ms) else {
                return Ok(None);
            };
            Ok(Some(WaveState {
                wave: Wave {
                    per_unit: u32::try_from(per_unit).unwrap_or(u32::MAX),
                    interval: std::time::Duration::from_millis(interval_ms.max(0) as u64),
                },
                next_wave_at: row.try_get("next_wave_at").map_err(backend)?,
                quota: row.try_get("wave_quota").map_err(backend)?,
                started_count: row.try_get("wave_started_count").map_err(backend)?,
            }))
        }

        fn product_from_row(row: &$row) -> Result<Product, Error> {
            Ok(Product {
                id: ProductId::from_stored(row.try_get("id").map_err(backend)?),
                restock_round: row.try_get("restock_round").map_err(backend)?,
                stock: row.try_get("stock").map_err(backend)?,
                stock_version: row.try_get("stock_version").map_err(backend)?,
            })
        }

        /// The token of a run's next claim: one more than its last claim's (G8). The
        /// caller holds the run's row (its lock, or the database's single writer).
        async fn next_claim_token(
            tx: &mut sqlx::Transaction<'static, $db>,
            run_id: i64,
        ) -> Result<i64, Error> {
            let epoch: i64 = sqlx::query_scalar(
                "SELECT claim_epoch FROM product_notification_history WHERE id = ?",
            )
            .bind(run_id)
            .fetch_one(&mut **tx)
            .await
            .map_err(backend)?;
            Ok(epoch + 1)
        }

        async fn read_holds_claim(
            pool: &sqlx::Pool<$db>,
            claim: &RunClaim,
        ) -> Result<bool, Error> {
            let held: Option<i64> = sqlx::query_scalar(
                "SELECT id FROM product_notification_history \
                 WHERE id = ? AND claim_token = ? AND status = 'IN_PROGRESS'",
            )
            .bind(claim.run_id)
            .bind(claim.token)
            .fetch_optional(pool)
            .await
            .map_err(backend)?;
            Ok(held.is_some())
        }

        /// Where the run's queue ended when its round started (see [`RunClaim`]).
        async fn select_queue_end(
            tx: &mut sqlx::Transaction<'static, $db>,
            run_id: i64,
        ) -> Result<Option<i64>, Error> {
            sqlx::query_scalar(
                "SELECT queue_end_position FROM product_notification_history WHERE id = ?",
            )
            .bind(run_id)
            .fetch_one(&mut **tx)
            .await
            .map_err(backend)
        }

        async fn select_run_by_id(
            tx: &mut sqlx::Transaction<'static, $db>,
            run_id: i64,
        ) -> Result<Run, Error> {
            let row = sqlx::query(&format!(
                "SELECT {RUN_COLUMNS} FROM product_notification_history WHERE id = ?"
            ))
            .bind(run_id)
            .fetch_one(&mut **tx)
            .await
            .map_err(backend)?;
            run_from_row(&row)
        }

        /// Served by uq_pnh_product_round.
        async fn select_run_by_round(
            tx: &mut sqlx::Transaction<'static, $db>,
            product: ProductId,
            round: i64,
        ) -> Result<Option<Run>, Error> {
            let row = sqlx::query(&format!(
                "SELECT {RUN_COLUMNS} FROM product_notification_history \
                 WHERE product_id = ? AND restock_round = ?"
            ))
            .bind(product.get())
            .bind(round)
            .fetch_optional(&mut **tx)
            .await
            .map_err(backend)?;
            row.as_ref().map(run_from_row).transpose()
        }

        async fn select_alert(
            tx: &mut sqlx::Transaction<'static, $db>,
            product: ProductId,
            user: UserId,
        ) -> Result<Option<Alert>, Error> {
            let row = sqlx::query(
                "SELECT product_id, user_id, is_active, created_at, updated_at \
                 FROM product_user_notification WHERE product_id = ? AND user_id = ?",
            )
            .bind(product.get())
            .bind(user.get())
            .fetch_optional(&mut **tx)
            .await
            .map_err(backend)?;
            row.map(|row| {
                Ok(Alert {
                    product_id: ProductId::from_stored(row.try_get("product_id").map_err(backend)?),
                    user_id: UserId::from_stored(row.try_get("user_id").map_err(backend)?),
                    active: row.try_get("is_active").map_err(backend)?,
                    created_at: row.try_get("created_at").map_err(backend)?,
                    updated_at: row.try_get("updated_at").map_err(backend)?,
                })
            })
            .transpose()
        }

        async fn read_product(
            pool: &sqlx::Pool<$db>,
            product: ProductId,
        ) -> Result<Option<Product>, Error> {
            let row = sqlx::query("SELECT id, restock_round, stock, stock_version FROM product WHERE id = ?")
                .bind(product.get())
                .fetch_optional(pool)
                .await
                .map_err(backend)?;
            row.as_ref().map(product_from_row).transpose()
        }

        async fn read_run(
            pool: &sqlx::Pool<$db>,
            product: ProductId,
            round: Option<i64>,
        ) -> Result<Option<Run>, Error> {
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
                Some(round) => sqlx::query(&by_round).bind(product.get()).bind(round),
                None => sqlx::query(&latest).bind(product.get()),
            };
            let row = query.fetch_optional(pool).await.map_err(backend)?;
            row.as_ref().map(run_from_row).transpose()
        }

        /// A keyset page read from ix_pun_queue. Up to where the queue ended when the
        /// round started, that alone: no user there was notified in this round unless
        /// behind the cursor. After it (users who registered again during the round),
        /// anti-joined with a probe of the history's unique key per row, so users
        /// recorded in this round are left out. (MariaDB runs the equivalent NOT EXISTS
        /// as a dependent subquery, several times slower.) The probe costs about as
        /// much as writing the row, so most of the queue is read without it.
        async fn read_next_registrations(
            pool: &sqlx::Pool<$db>,
            claim: &RunClaim,
            cursor: Option<i64>,
            limit: u32,
        ) -> Result<Vec<Registration>, Error> {
            let mut from = cursor.unwrap_or(0);
            if let Some(end) = claim.queue_end.filter(|&end| from < end) {
                let rows = sqlx::query(
                    "SELECT user_id, position FROM product_user_notification \
                     WHERE product_id = ? AND is_active = TRUE AND position > ? \
                       AND position <= ? \
                     ORDER BY position LIMIT ?",
                )
                .bind(claim.product_id.get())
                .bind(from)
                .bind(end)
                .bind(limit)
                .fetch_all(pool)
                .await
                .map_err(backend)?;
                if !rows.is_empty() {
                    return registrations_from_rows(&rows);
                }
                from = end;
            }
            let rows = sqlx::query(
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
            .bind(limit)
            .fetch_all(pool)
            .await
            .map_err(backend)?;
            registrations_from_rows(&rows)
        }

        fn registrations_from_rows(rows: &[$row]) -> Result<Vec<Registration>, Error> {
            rows.iter()
                .map(|row| {
                    Ok(Registration {
                        user_id: UserId::from_stored(row.try_get("user_id").map_err(backend)?),
                        position: row.try_get("position").map_err(backend)?,
                    })
                })
                .collect()
        }

        /// Columns of `product_user_notification_history` that make a [`Recorded`].
        const RECORDED_COLUMNS: &str = "id, product_id, user_id, restock_round, sent_at, position";

        fn recorded_from_row(row: &$row) -> Result<Recorded, Error> {
            let id = NotificationId {
                product_id: ProductId::from_stored(row.try_get("product_id").map_err(backend)?),
                restock_round: row.try_get("restock_round").map_err(backend)?,
                user_id: UserId::from_stored(row.try_get("user_id").map_err(backend)?),
            };
            Ok(Recorded {
                seq: row.try_get("id").map_err(backend)?,
                position: row.try_get("position").map_err(backend)?,
                notification: Notification {
                    id,
                    sent_at: row.try_get("sent_at").map_err(backend)?,
                },
            })
        }

        /// Served by the primary key, ix_punh_product or ix_punh_user.
        async fn read_recorded_after(
            pool: &sqlx::Pool<$db>,
            after: i64,
            filter: NotificationFilter,
            limit: u32,
        ) -> Result<Vec<Recorded>, Error> {
            let mut query = sqlx::QueryBuilder::<$db>::new(format!(
                "SELECT {RECORDED_COLUMNS} FROM product_user_notification_history WHERE id > "
            ));
            query.push_bind(after);
            if let Some(product) = filter.product_id {
                query.push(" AND product_id = ").push_bind(product.get());
            }
            if let Some(user) = filter.user_id {
                query.push(" AND user_id = ").push_bind(user.get());
            }
            query.push(" ORDER BY id LIMIT ").push_bind(limit);
            let rows = query.build().fetch_all(pool).await.map_err(backend)?;
            rows.iter().map(recorded_from_row).collect()
        }

        /// Served by uq_punh_product_round_user.
        async fn read_recorded(
            pool: &sqlx::Pool<$db>,
            id: NotificationId,
        ) -> Result<Option<Recorded>, Error> {
            let row = sqlx::query(&format!(
                "SELECT {RECORDED_COLUMNS} FROM product_user_notification_history \
                 WHERE product_id = ? AND restock_round = ? AND user_id = ?"
            ))
            .bind(id.product_id.get())
            .bind(id.restock_round)
            .bind(id.user_id.get())
            .fetch_optional(pool)
            .await
            .map_err(backend)?;
            row.as_ref().map(recorded_from_row).transpose()
        }

        /// Served by ix_punh_run_position.
        async fn read_recorded_in_run(
            pool: &sqlx::Pool<$db>,
            product: ProductId,
            round: i64,
            after: Option<i64>,
            upto: i64,
            limit: u32,
        ) -> Result<Vec<Recorded>, Error> {
            let rows = sqlx::query(&format!(
                "SELECT {RECORDED_COLUMNS} FROM product_user_notification_history \
                 WHERE product_id = ? AND restock_round = ? AND position > ? AND position <= ? \
                 ORDER BY position LIMIT ?"
            ))
            .bind(product.get())
            .bind(round)
            .bind(after.unwrap_or(i64::MIN))
            .bind(upto)
            .bind(limit)
            .fetch_all(pool)
            .await
            .map_err(backend)?;
            rows.iter().map(recorded_from_row).collect()
        }

        /// Newest first, by key. Each filter has an index that yields its rows in key
        /// order (migrations `*_run_listing.sql`), so a page is read from it backwards and
        /// the `LIMIT` stops the scan: the primary key with no filter, and the index
        /// named below otherwise. The index is named to the database (`use_index`):
        /// left to itself, MariaDB reads a product's runs through uq_pnh_product_round
        /// and sorts them once the page is larger than its estimate of their number, and
        /// a frequent status through the primary key, filtering as it goes.
        async fn read_runs(
            pool: &sqlx::Pool<$db>,
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
            let mut query = sqlx::QueryBuilder::<$db>::new(format!(
                "SELECT id, {RUN_COLUMNS} FROM product_notification_history{}",
                index.map(use_index).unwrap_or_default()
            ));
            let mut clause = " WHERE ";
            if let Some(status) = filter.status {
                query.push(clause).push("status = ").push_bind(status.as_str());
                clause = " AND ";
            }
            if let Some(product) = filter.product_id {
                query.push(clause).push("product_id = ").push_bind(product.get());
                clause = " AND ";
            }
            if let Some(before) = before {
                query.push(clause).push("id < ").push_bind(before);
            }
            query.push(" ORDER BY id DESC LIMIT ").push_bind(limit);
            let rows = query.build().fetch_all(pool).await.map_err(backend)?;
            rows.iter()
                .map(|row| {
                    Ok(ListedRun {
                        key: row.try_get("id").map_err(backend)?,
                        run: run_from_row(row)?,
                    })
                })
                .collect()
        }

        /// Served by uq_pnh_product_round.
        async fn read_run_progress(
            pool: &sqlx::Pool<$db>,
            product: ProductId,
            round: i64,
        ) -> Result<Option<RunProgress>, Error> {
            let row = sqlx::query(
                "SELECT status, last_sent_position FROM product_notification_history \
                 WHERE product_id = ? AND restock_round = ?",
            )
            .bind(product.get())
            .bind(round)
            .fetch_optional(pool)
            .await
            .map_err(backend)?;
            row.map(|row| {
                let status: String = row.try_get("status").map_err(backend)?;
                Ok(RunProgress {
                    status: RunStatus::from_str(&status).map_err(|e| {
                        Error::Backend(BackendError::new(STORE, false, anyhow::anyhow!(e)))
                    })?,
                    recorded_position: row.try_get("last_sent_position").map_err(backend)?,
                })
            })
            .transpose()
        }
    };
}

pub(crate) use portable_queries;
