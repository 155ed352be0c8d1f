//! The errors of the service, as outcomes a caller can act on. Each variant carries the
//! facts; the words a caller reads are written once, where the gRPC layer maps variants
//! to status codes (`grpc::status`).

use std::fmt;

use super::{NotificationId, ProductId, UserId};

/// What went wrong, as far as the caller is concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A field of the request is malformed.
    #[error("invalid {0}")]
    InvalidArgument(Invalid),
    /// The product was never created (`SetStock` creates it).
    #[error("product {0} does not exist")]
    UnknownProduct(ProductId),
    /// The product exists but has never been restocked.
    #[error("product {0} has never been restocked")]
    NeverRestocked(ProductId),
    /// The product has no run for this round.
    #[error("product {product} has no round {round}")]
    UnknownRound { product: ProductId, round: i64 },
    /// The user never registered an alert for the product.
    #[error("user {user} has no alert for product {product}")]
    UnknownAlert { product: ProductId, user: UserId },
    /// `resume_after` names a notification that was never recorded.
    #[error("notification {0} was never recorded")]
    UnknownNotification(NotificationId),
    /// `resume_after` names a notification whose run's history the retention sweep
    /// deleted.
    #[error("notification {0} is older than the history kept")]
    HistoryExpired(NotificationId),
    /// A run of the product is in progress (G7).
    #[error("product {product} has a run in progress (round {round})")]
    RunInProgress { product: ProductId, round: i64 },
    /// The product's restock round is at its largest value: it cannot start another.
    #[error("product {0} has used every restock round")]
    RoundsExhausted(ProductId),
    /// The product's stock is below its threshold (`min_stock`, 1 unless set).
    #[error("product {product} is out of stock ({stock}, threshold {min_stock})")]
    OutOfStock {
        product: ProductId,
        stock: i64,
        min_stock: i64,
    },
    /// The latest run cannot be resumed (G6): it completed or sold out.
    #[error("round {round} of product {product} cannot be resumed ({why:?})")]
    NothingToResume {
        product: ProductId,
        round: i64,
        why: NotResumable,
    },
    /// The service is stopping and takes no new work.
    #[error("the service is shutting down")]
    ShuttingDown,
    /// A backing store failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Why a field of a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    /// An id that must be positive was not.
    NotPositive { field: &'static str, got: i64 },
    /// A stock below zero.
    NegativeStock(i64),
    /// `resume_after` is not a notification id. Holds at most [`Invalid::QUOTE_MAX`]
    /// bytes of what was sent, so a huge input is never echoed back.
    NotANotificationId(String),
    /// `status` of a listing is not a run status (RUN_STATUS_UNSPECIFIED, or a number
    /// this build does not know).
    NotARunStatus(i32),
    /// A page size below zero.
    NegativePageSize(i32),
    /// `page_token` is not one this service made. Holds at most
    /// [`Invalid::QUOTE_MAX`] bytes of what was sent.
    NotAPageToken(String),
    /// `page_token` was made for a listing with another filter.
    PageTokenOfAnotherFilter,
    /// A ListProducts page token made for the other order.
    PageTokenOfAnotherOrder,
    /// ListAlerts without a product_id or a user_id.
    NoAlertFilter,
    /// An order_by that is not a ProductOrder.
    UnknownProductOrder(i32),
    /// `wave.per_unit` is 0.
    WavePerUnitZero,
    /// `wave.interval` is missing, negative or out of its range; in milliseconds when
    /// given (saturated).
    WaveInterval(Option<i64>),
    /// `idempotency_key` was given but empty.
    EmptyIdempotencyKey,
    /// `idempotency_key` is longer than `IdempotencyKey::MAX_LEN` bytes. Holds at most
    /// [`Invalid::QUOTE_MAX`] bytes of it.
    IdempotencyKeyTooLong { len: usize, quoted: String },
    /// More attributes than `Attributes::MAX_ENTRIES`.
    TooManyAttributes(usize),
    /// An attribute key empty or longer than `Attributes::MAX_KEY_LEN` bytes. Holds at
    /// most [`Invalid::QUOTE_MAX`] bytes of it.
    AttributeKey { len: usize, quoted: String },
    /// Attributes of more than `Attributes::MAX_TOTAL` bytes, keys and values together.
    AttributesTooLarge(usize),
}

impl Invalid {
    /// How much of a caller's malformed input is quoted back, at most.
    pub const QUOTE_MAX: usize = 64;

    /// Keeps the first [`Invalid::QUOTE_MAX`] bytes (on a character boundary).
    pub fn quote(input: &str) -> String {
        if input.len() <= Self::QUOTE_MAX {
            return input.to_string();
        }
        let mut end = Self::QUOTE_MAX;
        while !input.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &input[..end])
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Invalid::NotPositive { field, got } => write!(f, "{field} {got}"),
            Invalid::NegativeStock(got) => write!(f, "stock {got}"),
            Invalid::NotANotificationId(s) => write!(f, "resume_after {s:?}"),
            Invalid::NotARunStatus(got) => write!(f, "status {got}"),
            Invalid::NegativePageSize(got) => write!(f, "page_size {got}"),
            Invalid::NotAPageToken(s) => write!(f, "page_token {s:?}"),
            Invalid::PageTokenOfAnotherFilter => write!(f, "page_token for another filter"),
            Invalid::PageTokenOfAnotherOrder => write!(f, "page_token for another order"),
            Invalid::UnknownProductOrder(got) => write!(f, "order_by {got}"),
            Invalid::NoAlertFilter => write!(f, "no product_id or user_id"),
            Invalid::WavePerUnitZero => write!(f, "wave.per_unit 0"),
            Invalid::WaveInterval(ms) => write!(f, "wave.interval {ms:?} ms"),
            Invalid::EmptyIdempotencyKey => write!(f, "idempotency_key (empty)"),
            Invalid::IdempotencyKeyTooLong { len, .. } => {
                write!(f, "idempotency_key of {len} bytes")
            }
            Invalid::TooManyAttributes(n) => write!(f, "{n} attributes"),
            Invalid::AttributeKey { len, .. } => write!(f, "attribute key of {len} bytes"),
            Invalid::AttributesTooLarge(n) => write!(f, "attributes of {n} bytes"),
        }
    }
}

/// Why the latest run of a product is not resumable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotResumable {
    /// The product has no run at all.
    NeverRestocked,
    Completed,
    SoldOut,
}

/// The part of the service whose backing store failed, as a caller is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// MySQL or SQLite.
    Database,
    /// The cached stock figure each send checks (G3).
    StockCache,
    /// The global send rate (G2).
    SendLimiter,
    /// What carries notifications to every instance's streams (G11).
    NotificationBus,
    /// Delivery to the webhook endpoint (G12).
    Webhook,
    /// The pause every instance keeps after an endpoint's `Retry-After` (G12).
    WebhookPause,
    /// A task of the service itself.
    Service,
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Component::Database => "database",
            Component::StockCache => "stock cache",
            Component::SendLimiter => "send limiter",
            Component::NotificationBus => "notification bus",
            Component::Webhook => "webhook",
            Component::WebhookPause => "webhook pause",
            Component::Service => "service",
        })
    }
}

/// A failure of MySQL, Redis or another store the service depends on.
#[derive(Debug, thiserror::Error)]
pub struct BackendError {
    pub component: Component,
    /// True when it is the component's Redis implementation (clustered) that failed:
    /// the message says so, to point an operator at Redis.
    pub in_redis: bool,
    /// True when the store could not be reached at all (the caller may retry later);
    /// false for an unexpected error from a reachable store.
    pub unavailable: bool,
    #[source]
    pub source: anyhow::Error,
}

impl BackendError {
    pub fn new(component: Component, unavailable: bool, source: impl Into<anyhow::Error>) -> Self {
        Self {
            component,
            in_redis: false,
            unavailable,
            source: source.into(),
        }
    }

    /// A failure of the component's Redis implementation.
    pub fn on_redis(
        component: Component,
        unavailable: bool,
        source: impl Into<anyhow::Error>,
    ) -> Self {
        Self {
            in_redis: true,
            ..Self::new(component, unavailable, source)
        }
    }

    /// The store that failed, as messages and logs name it: "database", "stock cache
    /// (Redis)".
    pub fn store(&self) -> String {
        if self.in_redis {
            format!("{} (Redis)", self.component)
        } else {
            self.component.to_string()
        }
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.unavailable {
            write!(f, "the {} is unavailable", self.store())
        } else {
            write!(f, "the {} failed", self.store())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_error_names_its_component_as_before() {
        let error = |e: BackendError| e.to_string();
        let cause = || anyhow::anyhow!("cause");
        assert_eq!(
            error(BackendError::new(Component::Database, true, cause())),
            "the database is unavailable"
        );
        assert_eq!(
            error(BackendError::on_redis(
                Component::StockCache,
                false,
                cause()
            )),
            "the stock cache (Redis) failed"
        );
        assert_eq!(
            error(BackendError::on_redis(
                Component::NotificationBus,
                true,
                cause()
            )),
            "the notification bus (Redis) is unavailable"
        );
        assert_eq!(
            error(BackendError::new(Component::SendLimiter, true, cause())),
            "the send limiter is unavailable"
        );
    }
}
