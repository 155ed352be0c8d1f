//! Plain types and rules of the restock domain: ids, run states, notifications and the
//! errors a caller can act on. Nothing here knows about gRPC, SQL or Redis.

mod error;
mod listing;
mod trigger;

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};

pub use error::{BackendError, Error, Invalid, NotResumable};
pub use listing::{
    DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, PageToken, RunFilter, RunPage, parse_page_size,
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
}

/// A user's alert for a product.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub product_id: ProductId,
    pub user_id: UserId,
    pub active: bool,
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
