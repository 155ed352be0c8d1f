//! Plain types and rules of the restock domain: ids, run states, notifications and the
//! errors a caller can act on. Nothing here knows about gRPC, SQL or Redis.

mod alert_status;
mod attributes;
mod error;
mod listing;
mod trigger;

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};

pub use alert_status::{AlertOutcome, AlertStatus, RoundFacts};
pub use attributes::Attributes;
pub use error::{BackendError, Component, Error, Invalid, NotResumable};
pub use listing::{
    AlertFilter, AlertPage, AlertPageToken, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, PageToken,
    ProductOrder, ProductPage, ProductPageToken, RunFilter, RunPage, parse_page_size,
};
pub use trigger::{IdempotencyKey, TriggerRequest};

/// A product id: always positive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProductId(i64);

/// A user id: always positive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(i64);

macro_rules! positive_id {
    ($ty:ident, $field:literal) => {
        impl $ty {
            /// Validates a raw id from the outside world.
            pub fn parse(raw: i64) -> Result<Self, Error> {
                if raw > 0 {
                    Ok(Self(raw))
                } else {
                    Err(Error::InvalidArgument(Invalid::NotPositive {
                        field: $field,
                        got: raw,
                    }))
                }
            }

            /// Wraps an id read back from storage, where it was validated on the way in.
            pub fn from_stored(raw: i64) -> Self {
                Self(raw)
            }

            pub fn get(self) -> i64 {
                self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

positive_id!(ProductId, "product_id");
positive_id!(UserId, "user_id");

/// Validates a stock figure given by a caller (zero is allowed: it means sold out).
pub fn parse_stock(raw: i64) -> Result<i64, Error> {
    if raw < 0 {
        Err(Error::InvalidArgument(Invalid::NegativeStock(raw)))
    } else {
        Ok(raw)
    }
}

/// Validates a product's threshold for alerts: at least 1 (a threshold of 0 would
/// notify users of a product with nothing in stock).
pub fn parse_min_stock(raw: i64) -> Result<i64, Error> {
    if raw > 0 {
        Ok(raw)
    } else {
        Err(Error::InvalidArgument(Invalid::NotPositive {
            field: "min_stock",
            got: raw,
        }))
    }
}

/// Validates a restock round asked for by a caller.
pub fn parse_round(raw: i64) -> Result<i64, Error> {
    if raw > 0 {
        Ok(raw)
    } else {
        Err(Error::InvalidArgument(Invalid::NotPositive {
            field: "restock_round",
            got: raw,
        }))
    }
}

/// The state of a restock run (one row of `product_notification_history`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    InProgress,
    CanceledBySoldOut,
    CanceledByError,
    Completed,
}

impl RunStatus {
    /// The spelling stored in the `status` column.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::InProgress => "IN_PROGRESS",
            RunStatus::CanceledBySoldOut => "CANCELED_BY_SOLD_OUT",
            RunStatus::CanceledByError => "CANCELED_BY_ERROR",
            RunStatus::Completed => "COMPLETED",
        }
    }

    /// Whether a run in this state can be resumed by `ManualRestock` (G6).
    pub fn is_resumable(self) -> bool {
        self == RunStatus::CanceledByError
    }
}

impl FromStr for RunStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "IN_PROGRESS" => Ok(RunStatus::InProgress),
            "CANCELED_BY_SOLD_OUT" => Ok(RunStatus::CanceledBySoldOut),
            "CANCELED_BY_ERROR" => Ok(RunStatus::CanceledByError),
            "COMPLETED" => Ok(RunStatus::Completed),
            other => Err(format!("unknown run status {other:?}")),
        }
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A product's restock state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    pub id: ProductId,
    pub restock_round: i64,
    pub stock: i64,
    /// Bumped by every write of the stock, so figures read at different moments can be
    /// ordered (G3). Internal: not part of the API.
    pub stock_version: i64,
    /// The threshold for alerts: below it the product counts as sold out (G3).
    pub min_stock: i64,
    /// Users waiting: the product's active alerts, kept with every alert change.
    pub waiting: i64,
}

impl Product {
    /// Whether the stock reaches the threshold: a trigger is refused and a run stops
    /// otherwise (G3).
    pub fn in_stock(&self) -> bool {
        in_stock(self.stock, self.min_stock)
    }
}

/// The one rule of what counts as in stock: at least the product's threshold (G3).
pub fn in_stock(stock: i64, min_stock: i64) -> bool {
    stock >= min_stock
}

/// A user's alert for a product.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub product_id: ProductId,
    pub user_id: UserId,
    pub active: bool,
    /// Used up by the notification that reaches it.
    pub once: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A restock run, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub product_id: ProductId,
    pub restock_round: i64,
    pub status: RunStatus,
    pub last_sent_user_id: Option<UserId>,
    pub sent_count: i64,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Set for a run that notifies in waves.
    pub wave: Option<WaveState>,
    /// Why a `CANCELED_BY_ERROR` run failed (G4, G12): at most [`Run::LAST_ERROR_MAX`]
    /// bytes, made of fixed words and ids, never a secret.
    pub last_error: Option<String>,
    /// Active registrations when the round started: what `sent_count` is measured
    /// against. Registrations made during the run are notified too (G1), so a run
    /// may send more.
    pub queue_size: i64,
    /// What the trigger said of the restock; every notification of the run carries it.
    pub attributes: Attributes,
    /// The `traceparent` of the call that triggered the run, when traces were exported.
    pub trace_parent: Option<String>,
}

impl Run {
    /// The longest `last_error` kept.
    pub const LAST_ERROR_MAX: usize = 512;

    /// `error` cut to [`Run::LAST_ERROR_MAX`] bytes, on a character boundary.
    pub fn bound_last_error(error: &str) -> &str {
        if error.len() <= Self::LAST_ERROR_MAX {
            return error;
        }
        let mut end = Self::LAST_ERROR_MAX;
        while !error.is_char_boundary(end) {
            end -= 1;
        }
        &error[..end]
    }
}

/// How a run notifies in waves (`TriggerRestock.wave`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wave {
    /// Users per unit in stock, per wave; at least 1.
    pub per_unit: u32,
    /// From the end of a wave to the start of the next.
    pub interval: std::time::Duration,
}

impl Wave {
    pub const MIN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
    pub const MAX_INTERVAL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

    /// Validates a caller's wave: `per_unit` at least 1, `interval` (seconds and
    /// nanoseconds, as `google.protobuf.Duration`) from 1 s to 24 h.
    pub fn parse(per_unit: u32, interval: Option<(i64, i32)>) -> Result<Self, Error> {
        if per_unit == 0 {
            return Err(Error::InvalidArgument(Invalid::WavePerUnitZero));
        }
        let (seconds, nanos) =
            interval.ok_or(Error::InvalidArgument(Invalid::WaveInterval(None)))?;
        let ms = seconds
            .saturating_mul(1_000)
            .saturating_add(i64::from(nanos) / 1_000_000);
        let out_of_range = || Error::InvalidArgument(Invalid::WaveInterval(Some(ms)));
        if seconds < 0 || nanos < 0 || !(0..1_000_000_000).contains(&nanos) {
            return Err(out_of_range());
        }
        let interval = std::time::Duration::new(seconds as u64, nanos as u32);
        if !(Self::MIN_INTERVAL..=Self::MAX_INTERVAL).contains(&interval) {
            return Err(out_of_range());
        }
        Ok(Self { per_unit, interval })
    }

    /// How many a wave that starts with `stock` in stock may notify: `per_unit` per
    /// unit; none when the product is sold out.
    pub fn quota(&self, stock: i64) -> i64 {
        stock.max(0).saturating_mul(i64::from(self.per_unit))
    }
}

/// A wave run's settings and where its current wave stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaveState {
    pub wave: Wave,
    /// While the run waits between waves: when the next one starts.
    pub next_wave_at: Option<DateTime<Utc>>,
    /// How many the current wave may notify; `None` before the first wave.
    pub quota: Option<i64>,
    /// The run's `sent_count` when the current wave started.
    pub started_count: Option<i64>,
}

impl WaveState {
    /// How many the current wave may still notify, for a run that has recorded
    /// `sent_count`; `None` when no wave is under way (none started yet, or the last
    /// one is done) and the next must start.
    pub fn left_in_wave(&self, sent_count: i64) -> Option<i64> {
        let (quota, started) = (self.quota?, self.started_count?);
        let left = quota - (sent_count - started);
        (left > 0).then_some(left)
    }
}

/// One active registration, as the engine reads it: who, and where in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registration {
    pub user_id: UserId,
    /// Place in the registration order; the run's resume cursor is one of these.
    pub position: i64,
}

/// Identifies one notification: the same (product, round, user) always gives the same
/// id, so a notification delivered again after a failure can be recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NotificationId {
    pub product_id: ProductId,
    pub restock_round: i64,
    pub user_id: UserId,
}

impl fmt::Display for NotificationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}-{}-{}",
            self.product_id, self.restock_round, self.user_id
        )
    }
}

impl FromStr for NotificationId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || Error::InvalidArgument(Invalid::NotANotificationId(Invalid::quote(s)));
        let mut parts = s.split('-').map(|p| p.parse::<i64>().map_err(|_| bad()));
        let (Some(p), Some(r), Some(u), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let (product, round, user) = (p?, r?, u?);
        if product <= 0 || round <= 0 || user <= 0 {
            return Err(bad());
        }
        Ok(NotificationId {
            product_id: ProductId(product),
            restock_round: round,
            user_id: UserId(user),
        })
    }
}

/// A notification sent to a user: a product they asked about is back in stock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub id: NotificationId,
    pub sent_at: DateTime<Utc>,
    /// Its run's attributes, shared with every other notification of the run.
    pub attributes: Attributes,
}

impl Notification {
    /// The human-readable text carried with the notification.
    pub fn message(&self) -> String {
        format!(
            "Product {} is back in stock (restock round {}).",
            self.id.product_id, self.id.restock_round
        )
    }
}

/// Which notifications a subscriber wants; `None` matches everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NotificationFilter {
    pub user_id: Option<UserId>,
    pub product_id: Option<ProductId>,
}

impl NotificationFilter {
    pub fn matches(&self, id: &NotificationId) -> bool {
        self.user_id.is_none_or(|u| u == id.user_id)
            && self.product_id.is_none_or(|p| p == id.product_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wave_quota_follows_the_stock_and_the_current_wave_is_counted_from_its_start() {
        let wave = Wave {
            per_unit: 2,
            interval: std::time::Duration::from_secs(5),
        };
        assert_eq!(wave.quota(3), 6);
        assert_eq!(wave.quota(0), 0);
        assert_eq!(wave.quota(-4), 0);
        assert_eq!(wave.quota(i64::MAX), i64::MAX);
        let mut state = WaveState {
            wave,
            next_wave_at: None,
            quota: None,
            started_count: None,
        };
        // No wave yet: the first must start.
        assert_eq!(state.left_in_wave(0), None);
        state.quota = Some(6);
        state.started_count = Some(10);
        assert_eq!(state.left_in_wave(10), Some(6));
        assert_eq!(state.left_in_wave(14), Some(2));
        // Done: the next must start.
        assert_eq!(state.left_in_wave(16), None);
    }

    #[test]
    fn waves_need_a_unit_and_an_interval_from_1s_to_24h() {
        assert!(Wave::parse(1, Some((1, 0))).is_ok());
        assert!(Wave::parse(3, Some((86_400, 0))).is_ok());
        assert!(Wave::parse(0, Some((5, 0))).is_err());
        assert!(Wave::parse(1, None).is_err());
        for (s, n) in [
            (0, 999_999_999),
            (86_400, 1),
            (-1, 0),
            (5, -1),
            (i64::MAX, 0),
        ] {
            assert!(Wave::parse(1, Some((s, n))).is_err(), "{s}s {n}ns");
        }
    }

    #[test]
    fn ids_must_be_positive() {
        assert!(ProductId::parse(0).is_err());
        assert!(UserId::parse(-3).is_err());
        assert_eq!(ProductId::parse(7).unwrap().get(), 7);
    }

    #[test]
    fn notification_id_round_trips_and_rejects_garbage() {
        let id = NotificationId {
            product_id: ProductId(4),
            restock_round: 2,
            user_id: UserId(99),
        };
        assert_eq!(id.to_string(), "4-2-99");
        assert_eq!("4-2-99".parse::<NotificationId>().unwrap(), id);
        for bad in ["", "4-2", "4-2-99-1", "a-b-c", "0-1-1", "4--2-99"] {
            assert!(bad.parse::<NotificationId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn run_status_round_trips() {
        for s in [
            RunStatus::InProgress,
            RunStatus::CanceledBySoldOut,
            RunStatus::CanceledByError,
            RunStatus::Completed,
        ] {
            assert_eq!(s.as_str().parse::<RunStatus>().unwrap(), s);
        }
        assert!(RunStatus::CanceledByError.is_resumable());
        assert!(!RunStatus::Completed.is_resumable());
    }
}
