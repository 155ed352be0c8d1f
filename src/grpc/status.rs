//! The one place where errors become gRPC status codes, and where the words a caller
//! reads are written: each message says what to do next.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::domain::{
    Attributes, BackendError, DEFAULT_PAGE_SIZE, Error, IdempotencyKey, Invalid, MAX_PAGE_SIZE,
    NotResumable, NotificationId,
};
use crate::engine::subscription::StreamEnd;
use crate::engine::watch::WatchEnd;

impl From<Error> for Status {
    /// One arm per domain outcome, each with the code and the words a caller reads:
    /// the one place they are decided, so it is as long as the list of outcomes.
    fn from(err: Error) -> Self {
        match err {
            Error::InvalidArgument(invalid) => Status::invalid_argument(invalid_message(&invalid)),
            Error::UnknownProduct(product) => Status::not_found(format!(
                "product {product} does not exist; create it with SetStock first"
            )),
            Error::NeverRestocked(product) => Status::not_found(format!(
                "product {product} has never been restocked; start a run with TriggerRestock"
            )),
            Error::UnknownRound { product, round } => Status::not_found(format!(
                "product {product} has no restock round {round}; omit restock_round for the \
                 latest run"
            )),
            Error::UnknownAlert { product, user } => Status::not_found(format!(
                "user {user} never registered an alert for product {product}; nothing to cancel"
            )),
            Error::HistoryExpired(id) => Status::out_of_range(format!(
                "notification {id} is older than the history this service keeps \
                 (RESTOCK_HISTORY_RETENTION), so the stream cannot resume after it; \
                 subscribe without resume_after to continue live, or pass the \
                 notification_id of a newer notification"
            )),
            Error::UnknownNotification(id) => Status::not_found(format!(
                "notification {id} was never recorded, so there is nothing to resume after; \
                 subscribe without resume_after, or pass the notification_id of a \
                 notification you received"
            )),
            Error::RunInProgress { product, round } => Status::failed_precondition(format!(
                "product {product} already has a run in progress (round {round}); wait for it \
                 to finish (GetRestockRun shows its status)"
            )),
            Error::RoundsExhausted(product) => Status::failed_precondition(format!(
                "product {product} has used every restock round (the round counter is at its \
                 largest value) and cannot be restocked again; use a new product id"
            )),
            Error::OutOfStock {
                product,
                stock,
                min_stock: 1,
            } => Status::failed_precondition(format!(
                "product {product} is out of stock (stock {stock}); set a positive stock with \
                 SetStock, or with the `stock` field of TriggerRestock"
            )),
            Error::OutOfStock {
                product,
                stock,
                min_stock,
            } => Status::failed_precondition(format!(
                "product {product} has stock {stock}, below its min_stock of {min_stock}, so it \
                 counts as sold out; set a stock of at least {min_stock} with SetStock (or the \
                 `stock` field of TriggerRestock), or lower min_stock with SetStock"
            )),
            Error::NothingToResume {
                product,
                why: NotResumable::NeverRestocked,
                ..
            } => Status::failed_precondition(format!(
                "product {product} has never been restocked, so there is no run to resume; \
                 start one with TriggerRestock"
            )),
            Error::NothingToResume {
                product,
                round,
                why: NotResumable::Completed,
            } => Status::failed_precondition(format!(
                "round {round} of product {product} completed; nothing to resume \
                 (TriggerRestock starts the next round)"
            )),
            Error::NothingToResume {
                product,
                round,
                why: NotResumable::SoldOut,
            } => Status::failed_precondition(format!(
                "round {round} of product {product} ended because the product sold out; a \
                 sold-out run is not resumed (TriggerRestock starts the next round)"
            )),
            Error::ShuttingDown => {
                Status::unavailable("the service is shutting down; retry on another instance")
            }
            Error::Backend(err) => backend_status(err),
        }
    }
}

/// `google.rpc.ErrorInfo` domain of the stream ends below.
pub const ERROR_DOMAIN: &str = "restock.v1";

/// `google.rpc.ErrorInfo { reason, domain: "restock.v1", metadata }` in a status's
/// details, for clients that act on a stream's end without parsing its message.
fn with_error_info(
    code: Code,
    message: String,
    reason: &str,
    metadata: &[(&str, String)],
) -> Status {
    let metadata: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata),
    )
}

/// A `Subscribe` stream the service ends: in words, and as ErrorInfo with the
/// `resume_after` to subscribe again with: the last notification delivered, or, before
/// the first, the point in the record the stream started at (absent only if nothing
/// had been recorded then).
impl From<StreamEnd> for Status {
    fn from(end: StreamEnd) -> Self {
        let resume = |last: Option<NotificationId>| match last {
            Some(id) => format!("subscribe again with resume_after = \"{id}\""),
            None => "subscribe again".to_string(),
        };
        let metadata = |last: Option<NotificationId>| -> Vec<(&str, String)> {
            last.map(|id| ("resume_after", id.to_string()))
                .into_iter()
                .collect()
        };
        match end {
            StreamEnd::Lagged {
                missed,
                last_delivered,
            } => with_error_info(
                Code::ResourceExhausted,
                format!(
                    "this stream fell {missed} notifications behind and its buffer overflowed; \
                     read faster and {} to continue without a gap",
                    resume(last_delivered)
                ),
                "STREAM_LAGGED",
                &metadata(last_delivered),
            ),
            StreamEnd::FeedInterrupted { last_delivered } => with_error_info(
                Code::Unavailable,
                format!(
                    "this instance's feed of notifications was interrupted (its connection \
                     to the shared bus was lost, or it fell behind) and may have missed some; \
                     {} to continue without a gap",
                    resume(last_delivered)
                ),
                "FEED_INTERRUPTED",
                &metadata(last_delivered),
            ),
            StreamEnd::ShuttingDown { last_delivered } => with_error_info(
                Code::Unavailable,
                format!(
                    "the service is shutting down; {} once it is back",
                    resume(last_delivered)
                ),
                "SHUTTING_DOWN",
                &metadata(last_delivered),
            ),
            StreamEnd::Failed(err) => err.into(),
        }
    }
}

/// A `WatchRestockRun` stream the service ends before the run's final state.
impl From<WatchEnd> for Status {
    fn from(end: WatchEnd) -> Self {
        match end {
            WatchEnd::ShuttingDown { product, round } => with_error_info(
                Code::Unavailable,
                format!(
                    "the service is shutting down; call WatchRestockRun again (product_id \
                     {product}, restock_round {round}) once it is back, or on another instance"
                ),
                "SHUTTING_DOWN",
                &[
                    ("product_id", product.to_string()),
                    ("restock_round", round.to_string()),
                ],
            ),
            WatchEnd::Failed(err) => err.into(),
        }
    }
}

fn invalid_message(invalid: &Invalid) -> String {
    match invalid {
        Invalid::NotPositive {
            field: "restock_round",
            got,
        } => format!(
            "restock_round must be a positive integer (rounds start at 1), got {got}; omit it \
             for the latest run"
        ),
        Invalid::NotPositive { field, got } => {
            format!("{field} must be a positive integer, got {got}")
        }
        Invalid::NegativeStock(got) => format!("stock must be zero or more, got {got}"),
        Invalid::NotANotificationId(quoted) => format!(
            "resume_after {quoted:?} is not a notification_id; pass the notification_id of a \
             notification you received (<product_id>-<restock_round>-<user_id>)"
        ),
        Invalid::NotARunStatus(got) => format!(
            "status {got} is not a run status; pass one of RUN_STATUS_IN_PROGRESS, \
             RUN_STATUS_CANCELED_BY_SOLD_OUT, RUN_STATUS_CANCELED_BY_ERROR, \
             RUN_STATUS_COMPLETED, or leave status unset for runs of every status"
        ),
        Invalid::NegativePageSize(got) => format!(
            "page_size must be zero or more, got {got}; 0 means {DEFAULT_PAGE_SIZE}, and \
             more than {MAX_PAGE_SIZE} means {MAX_PAGE_SIZE}"
        ),
        Invalid::NotAPageToken(quoted) => format!(
            "page_token {quoted:?} is not a page token of this service; pass the \
             next_page_token of the previous page as it was, or start again without \
             page_token"
        ),
        Invalid::WavePerUnitZero => "wave.per_unit must be at least 1: how many users each \
                                     unit in stock lets a wave notify"
            .to_string(),
        Invalid::WaveInterval(None) => {
            "wave.interval is required: the time between waves, from 1s to 24h".to_string()
        }
        Invalid::WaveInterval(Some(ms)) => {
            format!("wave.interval must be from 1s to 24h, got {ms} ms")
        }
        Invalid::PageTokenOfAnotherFilter => "page_token belongs to a listing with another \
             status or product_id; send the same filter as for the previous page, or start \
             again without page_token"
            .to_string(),
        Invalid::PageTokenOfAnotherOrder => "page_token belongs to a listing in another \
             order_by; send the same order_by as for the previous page, or start again \
             without page_token"
            .to_string(),
        Invalid::NoAlertFilter => "ListAlerts needs a product_id (its alerts in \
             registration order), a user_id (their alerts, the newest first), or both"
            .to_string(),
        Invalid::UnknownProductOrder(got) => format!(
            "order_by {got} is not a product order; use PRODUCT_ORDER_WAITING_DESC (the \
             default: most users waiting first) or PRODUCT_ORDER_ID"
        ),
        Invalid::EmptyIdempotencyKey => "idempotency_key is empty; leave it unset, or pass \
             a key that names this restock (a UUID, say) and send the same key with every \
             retry"
            .to_string(),
        Invalid::IdempotencyKeyTooLong { len, quoted } => format!(
            "idempotency_key {quoted:?} is {len} bytes, more than {max}; pass a shorter key \
             that names this restock (a UUID, say) and send the same key with every retry",
            max = IdempotencyKey::MAX_LEN
        ),
        Invalid::TooManyAttributes(got) => format!(
            "attributes has {got} entries, more than {max}; keep what a message to the user \
             needs (name, link, price) and look the rest up from the product id",
            max = Attributes::MAX_ENTRIES
        ),
        Invalid::AttributeKey { len: 0, .. } => {
            "attributes has an empty key; give every attribute a name".to_string()
        }
        Invalid::AttributeKey { len, quoted } => format!(
            "attribute key {quoted:?} is {len} bytes, more than {max}; use a shorter name",
            max = Attributes::MAX_KEY_LEN
        ),
        Invalid::AttributesTooLarge(got) => format!(
            "attributes are {got} bytes (keys and values together), more than {max}; send \
             shorter values, or a link to the rest",
            max = Attributes::MAX_TOTAL
        ),
    }
}

/// Backend failures are logged with their whole cause chain and answered without
/// internals (no SQL, no addresses).
fn backend_status(err: BackendError) -> Status {
    tracing::error!(store = %err.store(), error = ?err.source, "backend failure");
    if err.unavailable {
        Status::unavailable(format!("{err}; retry later"))
    } else {
        Status::internal(format!(
            "{err} unexpectedly; the service logs have the details"
        ))
    }
}
