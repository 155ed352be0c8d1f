//! Durable state behind one trait: products, alerts, runs and the notification history.
//! `sql` implements it once for any SQL `dialect`; `mysql` is the production dialect,
//! `sqlite` the embedded one, each with how it connects.

mod dialect;
pub mod mysql;
mod rows;
pub mod sql;
pub mod sqlite;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::domain::{
    Alert, AlertFilter, AlertStatus, BackendError, Component, Error, NotResumable, Notification,
    NotificationFilter, NotificationId, Product, ProductId, ProductOrder, Registration, Run,
    RunFilter, RunStatus, TriggerRequest, UserId,
};

/// History rows per INSERT statement. A batch is written in statements of this many
/// rows (and one for the rest), so each connection prepares the statement once and
/// reuses it, where batches of every length would each be prepared anew; and 500 rows
/// of five values stay far inside both databases' limits on bound parameters.
pub const HISTORY_ROWS_PER_INSERT: usize = 500;

/// Which run a task drives, and the claim that proves it still drives it: every write of
/// the engine is conditional on the claim, so a run that was taken over (its lease
/// expired, then `ManualRestock` resumed it) can never be written by two tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunClaim {
    pub run_id: i64,
    pub product_id: ProductId,
    pub restock_round: i64,
    /// The claim's fencing token: one more than the run's previous claim's, so a newer
    /// claim always has the greater token. Deliveries carry it, and the shared side
    /// refuses one older than the newest it has seen (G8).
    pub token: i64,
    /// The last queue position handed out before the round started (`None` on runs
    /// from before it was kept). Registrations up to it cannot belong to a user
    /// notified in this round already: only those after it are checked against the
    /// round's history when the queue is read.
    pub queue_end: Option<i64>,
}

/// A started or resumed run: its claim, and where the engine picks up.
#[derive(Debug, Clone)]
pub struct ClaimedRun {
    pub claim: RunClaim,
    /// Taken just before the statement that granted the lease was sent: the database
    /// counts the lease from a later moment, so the owner's idea of its deadline is
    /// never later than the database's, however long the claim waited before (G8).
    pub claimed_at: tokio::time::Instant,
    /// Queue position of the last recorded user; `None` starts at the front.
    pub cursor: Option<i64>,
    pub run: Run,
}

/// What `start_run` did.
#[derive(Debug, Clone)]
pub enum Triggered {
    /// Started the product's next round: the caller drives the run.
    Started(ClaimedRun),
    /// The request's idempotency key already started this run within its retention:
    /// the run as it is now. Nothing was written.
    Replayed(Run),
}

/// A notification that was sent and awaits recording.
#[derive(Debug, Clone, Copy)]
pub struct SentNotification {
    pub registration: Registration,
    pub sent_at: DateTime<Utc>,
}

/// The final state a run is moved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalStatus {
    Completed,
    SoldOut,
    Error,
}

impl FinalStatus {
    pub fn status(self) -> RunStatus {
        match self {
            FinalStatus::Completed => RunStatus::Completed,
            FinalStatus::SoldOut => RunStatus::CanceledBySoldOut,
            FinalStatus::Error => RunStatus::CanceledByError,
        }
    }
}

/// What a record does to the run besides recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Keeps it `IN_PROGRESS` and renews the lease.
    Renew,
    /// Keeps it `IN_PROGRESS` and lets the lease run out now, so another instance takes
    /// it over at once (shutdown, G8).
    Release,
    /// Moves it to a final state.
    Finish(FinalStatus),
    /// Ends a wave: keeps it `IN_PROGRESS`, sets `next_wave_at` this long from now and
    /// lets the lease run out then, so that whichever instance takes it over at that
    /// moment starts the next wave. Nothing holds the run meanwhile.
    WaitForWave(Duration),
}

/// Outcome of a conditional write by the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    /// Written: the task still owns the run.
    Yes,
    /// Nothing written: the run is no longer this task's (its lease ran out, and it may
    /// have been taken over). The task must stop without touching it.
    Lost,
}

impl Claimed {
    /// The outcome of a conditional `UPDATE` on the claim, by the rows it changed.
    pub fn by_rows_affected(rows: u64) -> Self {
        if rows == 0 {
            Claimed::Lost
        } else {
            Claimed::Yes
        }
    }
}

/// Where a run's record stands, for a subscriber waiting for it to catch up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunProgress {
    pub status: RunStatus,
    /// Queue position of the last recorded notification.
    pub recorded_position: Option<i64>,
    /// The per-user history of the run was deleted by the retention sweep.
    pub history_swept: bool,
}

/// Storage of the service. Every method is one transaction.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates the product if new, and sets its stock, and its threshold for alerts
    /// if `min_stock` is given (a new product's is 1; otherwise it is kept).
    async fn set_stock(
        &self,
        product: ProductId,
        stock: i64,
        min_stock: Option<i64>,
    ) -> Result<Product, Error>;

    async fn product(&self, product: ProductId) -> Result<Option<Product>, Error>;

    /// Registers an alert; re-activating a cancelled one moves it to the back of the
    /// queue, an active one keeps its place. `NotFound` for an unknown product.
    async fn register_alert(
        &self,
        product: ProductId,
        user: UserId,
        once: bool,
    ) -> Result<Alert, Error>;

    /// Deactivates an alert. `NotFound` if it was never registered.
    async fn cancel_alert(&self, product: ProductId, user: UserId) -> Result<Alert, Error>;

    /// Starts the product's next round (G7): sets `stock` first if given, then refuses
    /// with `FailedPrecondition` when the stock is <= 0 or a run is in progress, in
    /// which case nothing at all is changed.
    ///
    /// With an idempotency key already stored for the product within
    /// `IdempotencyKey::RETENTION`, changes nothing and returns the run that key
    /// started (`Replayed`), before any refusal. Otherwise the key is stored with the
    /// new run, in the same transaction, under the same serialization as G7; a refused
    /// call stores no key.
    async fn start_run(
        &self,
        product: ProductId,
        request: &TriggerRequest,
        lease: Duration,
    ) -> Result<Triggered, Error>;

    /// Deletes up to `limit` idempotency keys older than `IdempotencyKey::RETENTION`,
    /// oldest first; returns how many it deleted.
    async fn forget_expired_trigger_keys(&self, limit: u32) -> Result<u64, Error>;

    /// The products `user` has an alert for or history of.
    async fn products_of_user(&self, user: UserId) -> Result<Vec<ProductId>, Error>;

    /// Deletes `user`'s alert for `product` (the users waiting drop if it was active)
    /// and, if the product's run in progress is owned by an instance that may have read
    /// the user in a page it has not sent yet, releases the run under a newer claim
    /// epoch: the owner can then neither record nor, once the fence has the claim,
    /// deliver (G8), and whoever takes the run over reads the queue without the user.
    async fn forget_alert(&self, product: ProductId, user: UserId) -> Result<ForgotAlert, Error>;

    /// Deletes `user`'s history rows of `product`; returns how many.
    async fn forget_history(&self, product: ProductId, user: UserId) -> Result<u64, Error>;

    /// The retention sweep: deletes the per-user history of runs that ended longer
    /// than `older_than` ago, in statements of at most [`SWEEP_ROWS`] rows, for about
    /// `budget`, and marks each run whose history is gone. Runs are kept. Nothing is
    /// done while another instance is sweeping.
    async fn sweep_history(&self, older_than: Duration, budget: Duration) -> Result<Swept, Error>;

    /// Starts a wave of a wave run: it may notify `quota` more, counted from
    /// `started_count` (its `sent_count` now). Conditional on the claim, like `record`;
    /// renews the lease.
    async fn start_wave(
        &self,
        claim: &RunClaim,
        quota: i64,
        started_count: i64,
        lease: Duration,
    ) -> Result<Claimed, Error>;

    /// Puts the latest run back to `IN_PROGRESS` if it ended `CANCELED_BY_ERROR` (G6).
    async fn resume_run(&self, product: ProductId, lease: Duration) -> Result<ClaimedRun, Error>;

    /// A run: the given round, or the latest.
    async fn run(&self, product: ProductId, round: Option<i64>) -> Result<Option<Run>, Error>;

    /// Up to `limit` active registrations after `cursor` in registration order, leaving
    /// out users already recorded in this round (a user who re-registers during a run is
    /// not notified twice).
    async fn next_registrations(
        &self,
        claim: &RunClaim,
        cursor: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Registration>, Error>;

    /// Records sent notifications and moves the cursor to the last of them, in one
    /// transaction (G5), then renews, releases or ends the run as `after` says. Nothing
    /// is written, and `Lost` returned, unless the claim still holds and its lease has
    /// not run out (G8). `last_error` is kept with a `CANCELED_BY_ERROR` final state
    /// (G12: the run's error path writes it in the same statement as the status);
    /// every other write clears it.
    async fn record(
        &self,
        claim: &RunClaim,
        sent: &[SentNotification],
        after: After,
        lease: Duration,
        last_error: Option<&str>,
    ) -> Result<Claimed, Error>;

    /// The database's clock now, in UTC: the one clock every instance stamps its
    /// notifications with (G11).
    async fn clock(&self) -> Result<DateTime<Utc>, Error>;

    /// Claims up to `limit` runs in progress whose lease has run out (their instance
    /// died, or released them), each with a fresh claim and lease (G8).
    async fn take_over_expired(
        &self,
        lease: Duration,
        limit: u32,
    ) -> Result<Vec<ClaimedRun>, Error>;

    /// Whether `claim` is still the run's claim (and the run in progress): what the
    /// engine proves before it registers its claim with the shared side again, after
    /// the shared side lost it (G8).
    async fn holds_claim(&self, claim: &RunClaim) -> Result<bool, Error>;

    /// A run's status and recorded cursor.
    async fn run_progress(
        &self,
        product: ProductId,
        round: i64,
    ) -> Result<Option<RunProgress>, Error>;

    /// Recorded notifications of one run with a queue position in `(after, upto]`, in
    /// position order.
    async fn recorded_in_run(
        &self,
        product: ProductId,
        round: i64,
        after: Option<i64>,
        upto: i64,
        limit: u32,
    ) -> Result<Vec<Recorded>, Error>;

    /// Recorded notifications after `after` (in recording order) matching `filter`,
    /// each with its recording sequence number and queue position.
    async fn recorded_after(
        &self,
        after: i64,
        filter: NotificationFilter,
        limit: u32,
    ) -> Result<Vec<Recorded>, Error>;

    /// Where a notification was recorded, if it was.
    async fn recorded(&self, id: NotificationId) -> Result<Option<Recorded>, Error>;

    /// The notification recorded last, if any: where a stream that has delivered
    /// nothing yet resumes (G11).
    async fn last_recorded(&self) -> Result<Option<Recorded>, Error>;

    /// Up to `limit` runs matching `filter` with a key below `before` (all when `None`),
    /// newest first: in descending key order, which is creation order reversed.
    /// Where the alert of `user` for `product` stands, and what the product's latest
    /// round did with it (`None`: never registered), read in one snapshot. Served by
    /// the unique keys, ix_pun_queue (the users ahead) and ix_punh_product_user.
    async fn alert_status(
        &self,
        product: ProductId,
        user: UserId,
    ) -> Result<Option<AlertStatus>, Error>;

    /// Up to `limit` alerts matching `filter` after `after`, each with its key: a
    /// product's in registration order (the key is the queue position), a user's the
    /// newest first (the key is the row id). Served by ix_pun_queue (active only),
    /// ix_pun_product_position or ix_pun_user.
    async fn list_alerts(
        &self,
        filter: AlertFilter,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Vec<(i64, Alert)>, Error>;

    /// Up to `limit` products in `order`, after `after` (the previous page's last
    /// product: its users waiting and id); served by ix_product_waiting or the
    /// primary key.
    async fn list_products(
        &self,
        order: ProductOrder,
        after: Option<(i64, i64)>,
        limit: u32,
    ) -> Result<Vec<Product>, Error>;

    async fn list_runs(
        &self,
        filter: RunFilter,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<ListedRun>, Error>;
}

/// A run as listed, with the key a listing pages by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedRun {
    /// The run row's id: handed out in creation order, so the newest run has the
    /// highest.
    pub key: i64,
    pub run: Run,
}

/// A recorded notification: its place in the record and in its run's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// Recording sequence number (the history row's id).
    pub seq: i64,
    /// Queue position it was sent at; `None` for rows recorded before positions were.
    pub position: Option<i64>,
    pub notification: Notification,
}

/// What erasing a user from one product did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForgotAlert {
    /// The user's alert for the product was deleted (active or not).
    pub alert_deleted: bool,
    /// The product's run in progress whose owner may still have the user in a page it
    /// read: handed over (released under a newer claim epoch), with the claim token the
    /// fence must see before anything else of the run is delivered (G8), and the
    /// cursor its chain follows.
    pub superseded: Option<Superseded>,
}

/// A run taken from its owner by an erasure (see [`ForgotAlert`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superseded {
    pub restock_round: i64,
    pub token: i64,
    pub cursor: Option<i64>,
}

/// What one look of the retention sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Swept {
    /// History rows deleted.
    pub deleted: u64,
    /// How long each delete statement took: how long it held its locks, at most.
    pub statements: Vec<Duration>,
}

/// Rows one statement of the retention sweep deletes, at most: a few milliseconds of
/// work, so a run's inserts never wait on it for long.
pub const SWEEP_ROWS: u32 = 1_000;

/// The token of a run's first claim; every later claim of the run takes the previous
/// claim's token plus one (`claim_epoch`), so tokens of one run only grow (G8).
pub(crate) const FIRST_CLAIM: i64 = 1;

/// G6: only a `CANCELED_BY_ERROR` run of a product in stock is resumed.
pub(crate) fn check_resumable(current: &Product, status: RunStatus) -> Result<(), Error> {
    let (product, round) = (current.id, current.restock_round);
    let why = match status {
        RunStatus::CanceledByError if !current.in_stock() => {
            return Err(Error::OutOfStock {
                product,
                stock: current.stock,
                min_stock: current.min_stock,
            });
        }
        RunStatus::CanceledByError => return Ok(()),
        RunStatus::InProgress => return Err(Error::RunInProgress { product, round }),
        RunStatus::Completed => NotResumable::Completed,
        RunStatus::CanceledBySoldOut => NotResumable::SoldOut,
    };
    Err(Error::NothingToResume {
        product,
        round,
        why,
    })
}

/// The store's error for a failure of the database: the one place it is built.
/// `unavailable` when the database could not be reached or take the write at the
/// moment (retrying later may work).
pub(crate) fn backend_error(unavailable: bool, source: impl Into<anyhow::Error>) -> Error {
    Error::Backend(BackendError::new(Component::Database, unavailable, source))
}

/// The driver's error behind a store error, if that is what it is.
pub(crate) fn driver_error(err: &Error) -> Option<&sqlx::Error> {
    let Error::Backend(backend) = err else {
        return None;
    };
    backend.source.downcast_ref::<sqlx::Error>()
}
