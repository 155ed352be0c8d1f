//! Rows as the tables hold them, decoded by `sqlx::FromRow` from either database, and
//! their conversion into domain types.

use std::str::FromStr;

use chrono::{DateTime, Utc};

use super::{ListedRun, Recorded, RunProgress, backend_error};
use crate::domain::{
    Alert, Attributes, Error, Notification, NotificationId, Product, ProductId, Registration, Run,
    RunStatus, UserId, Wave, WaveState,
};

/// Columns of `product_notification_history` that make a [`RunRow`], in this order.
pub const RUN_COLUMNS: &str = "product_id, restock_round, status, last_sent_user_id, \
                               sent_count, started_at, updated_at, wave_per_unit, \
                               wave_interval_ms, wave_quota, wave_started_count, \
                               next_wave_at, last_error, queue_size, attributes, \
                               trace_parent";

/// Columns of [`RECORDED_FROM`] that make a [`RecordedRow`]: a history row (`h`) and
/// its run's attributes (`r`).
pub const RECORDED_COLUMNS: &str =
    "h.id, h.product_id, h.user_id, h.restock_round, h.sent_at, h.position, r.attributes";

/// Recorded notifications joined to their run (by its unique key) for its attributes.
/// Conditions on the history name it `h`.
pub const RECORDED_FROM: &str = "product_user_notification_history h \
     JOIN product_notification_history r \
     ON r.product_id = h.product_id AND r.restock_round = h.restock_round";

/// Columns of `product` that make a [`ProductRow`].
pub const PRODUCT_COLUMNS: &str = "id, restock_round, stock, stock_version, min_stock, waiting";

/// A stored status; a value outside the table's CHECK is a failure of the store.
pub fn status(raw: &str) -> Result<RunStatus, Error> {
    RunStatus::from_str(raw).map_err(|e| backend_error(false, anyhow::anyhow!(e)))
}

#[derive(sqlx::FromRow)]
pub struct ProductRow {
    id: i64,
    restock_round: i64,
    stock: i64,
    stock_version: i64,
    min_stock: i64,
    waiting: i64,
}

impl From<ProductRow> for Product {
    fn from(row: ProductRow) -> Self {
        Product {
            id: ProductId::from_stored(row.id),
            restock_round: row.restock_round,
            stock: row.stock,
            stock_version: row.stock_version,
            min_stock: row.min_stock,
            waiting: row.waiting,
        }
    }
}

#[derive(sqlx::FromRow)]
pub struct AlertRow {
    product_id: i64,
    user_id: i64,
    is_active: bool,
    once: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// An alert as `list_alerts` reads it, with the key its page is ordered by.
#[derive(sqlx::FromRow)]
pub struct ListedAlertRow {
    listed_key: i64,
    #[sqlx(flatten)]
    alert: AlertRow,
}

impl ListedAlertRow {
    pub fn into_listed(self) -> (i64, Alert) {
        (self.listed_key, self.alert.into())
    }
}

impl From<AlertRow> for Alert {
    fn from(row: AlertRow) -> Self {
        Alert {
            product_id: ProductId::from_stored(row.product_id),
            user_id: UserId::from_stored(row.user_id),
            active: row.is_active,
            once: row.once,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

#[derive(sqlx::FromRow)]
pub struct RunRow {
    product_id: i64,
    restock_round: i64,
    status: String,
    last_sent_user_id: Option<i64>,
    sent_count: i64,
    started_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    wave_per_unit: Option<i64>,
    wave_interval_ms: Option<i64>,
    wave_quota: Option<i64>,
    wave_started_count: Option<i64>,
    next_wave_at: Option<DateTime<Utc>>,
    last_error: Option<String>,
    queue_size: i64,
    attributes: Option<String>,
    trace_parent: Option<String>,
}

impl RunRow {
    pub fn into_run(self) -> Result<Run, Error> {
        let wave = match (self.wave_per_unit, self.wave_interval_ms) {
            (Some(per_unit), Some(interval_ms)) => Some(WaveState {
                wave: Wave {
                    per_unit: u32::try_from(per_unit).unwrap_or(u32::MAX),
                    interval: std::time::Duration::from_millis(interval_ms.max(0) as u64),
                },
                next_wave_at: self.next_wave_at,
                quota: self.wave_quota,
                started_count: self.wave_started_count,
            }),
            _ => None,
        };
        Ok(Run {
            product_id: ProductId::from_stored(self.product_id),
            restock_round: self.restock_round,
            status: status(&self.status)?,
            last_sent_user_id: self.last_sent_user_id.map(UserId::from_stored),
            sent_count: self.sent_count,
            started_at: self.started_at,
            updated_at: self.updated_at,
            wave,
            last_error: self.last_error,
            queue_size: self.queue_size,
            attributes: stored_attributes(self.attributes.as_deref())?,
            trace_parent: self.trace_parent,
        })
    }
}

#[derive(sqlx::FromRow)]
pub struct ListedRunRow {
    id: i64,
    #[sqlx(flatten)]
    run: RunRow,
}

impl ListedRunRow {
    pub fn into_listed(self) -> Result<ListedRun, Error> {
        Ok(ListedRun {
            key: self.id,
            run: self.run.into_run()?,
        })
    }
}

/// The run a claim is granted on: what a resume or a takeover reads first.
#[derive(sqlx::FromRow)]
pub struct ClaimableRow {
    pub id: i64,
    pub product_id: i64,
    pub restock_round: i64,
    pub status: String,
    /// The resume cursor.
    pub last_sent_position: Option<i64>,
}

#[derive(sqlx::FromRow)]
pub struct ProgressRow {
    status: String,
    last_sent_position: Option<i64>,
    history_swept: bool,
}

impl ProgressRow {
    pub fn into_progress(self) -> Result<RunProgress, Error> {
        Ok(RunProgress {
            status: status(&self.status)?,
            recorded_position: self.last_sent_position,
            history_swept: self.history_swept,
        })
    }
}

#[derive(sqlx::FromRow)]
pub struct RegistrationRow {
    user_id: i64,
    position: i64,
}

impl From<RegistrationRow> for Registration {
    fn from(row: RegistrationRow) -> Self {
        Registration {
            user_id: UserId::from_stored(row.user_id),
            position: row.position,
        }
    }
}

#[derive(sqlx::FromRow)]
pub struct RecordedRow {
    id: i64,
    product_id: i64,
    user_id: i64,
    restock_round: i64,
    sent_at: DateTime<Utc>,
    position: Option<i64>,
    attributes: Option<String>,
}

/// A run's attributes as stored: written by the service after validation, so one that
/// does not parse is a failure of the store.
fn stored_attributes(stored: Option<&str>) -> Result<Attributes, Error> {
    Attributes::from_stored(stored).map_err(|e| {
        backend_error(
            false,
            anyhow::Error::new(e).context("a run's stored attributes are not a JSON object"),
        )
    })
}

/// Recorded notifications from their rows. Rows of one run follow each other, and share
/// one parsed copy of the run's attributes.
pub fn recorded(rows: Vec<RecordedRow>) -> Result<Vec<Recorded>, Error> {
    let mut last: Option<((i64, i64), Attributes)> = None;
    rows.into_iter()
        .map(|row| {
            let run = (row.product_id, row.restock_round);
            let attributes = match &last {
                Some((seen, attributes)) if *seen == run => attributes.clone(),
                _ => {
                    let parsed = stored_attributes(row.attributes.as_deref())?;
                    last = Some((run, parsed.clone()));
                    parsed
                }
            };
            Ok(Recorded {
                seq: row.id,
                position: row.position,
                notification: Notification {
                    id: NotificationId {
                        product_id: ProductId::from_stored(row.product_id),
                        restock_round: row.restock_round,
                        user_id: UserId::from_stored(row.user_id),
                    },
                    sent_at: row.sent_at,
                    attributes,
                },
            })
        })
        .collect()
}
