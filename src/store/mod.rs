//! Durable state behind one trait: products, alerts, runs and the notification history.
//! `mysql` is the production implementation, `sqlite` the embedded one; the refusals
//! both give, word for word, are at the bottom of this file.

pub mod mysql;
mod portable;
pub mod sqlite;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::domain::{
    Alert, Error, Notification, NotificationFilter, NotificationId, Product, ProductId,
    Registration, Run, RunStatus, UserId,
};

/// Which run a task drives, and the claim that proves it still drives it: every write of
/// the engine is conditional on the claim, so a run that was taken over (its lease
/// expired, then `ManualRestock` resumed it) can never be written by two tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunClaim {
    pub run_id: i64,
    pub product_id: ProductId,
    pub restock_round: i64,
    pub token: i64,
}

/// A started or resumed run: its claim, and where the engine picks up.
#[derive(Debug, Clone)]
pub struct ClaimedRun {
    pub claim: RunClaim,
    /// Queue position of the last recorded user; `None` starts at the front.
    pub cursor: Option<i64>,
    pub run: Run,
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

/// Outcome of a conditional write by the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    /// Written: the task still owns the run.
    Yes,
    /// Nothing written: the run is no longer this task's (its lease expired and it was
    /// marked or taken over). The task must stop without touching it.
    Lost,
}

/// Storage of the service. Every method is one transaction.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates the product if new, and sets its stock.
    async fn set_stock(&self, product: ProductId, stock: i64) -> Result<Product, Error>;

    async fn product(&self, product: ProductId) -> Result<Option<Product>, Error>;

    /// Registers an alert; re-activating a cancelled one moves it to the back of the
    /// queue, an active one keeps its place. `NotFound` for an unknown product.
    async fn register_alert(&self, product: ProductId, user: UserId) -> Result<Alert, Error>;

    /// Deactivates an alert. `NotFound` if it was never registered.
    async fn cancel_alert(&self, product: ProductId, user: UserId) -> Result<Alert, Error>;

    /// Starts the product's next round (G7): sets `stock` first if given, then refuses
    /// with `FailedPrecondition` when the stock is <= 0 or a run is in progress, in
    /// which case nothing at all is changed.
    async fn start_run(
        &self,
        product: ProductId,
        stock: Option<i64>,
        lease: Duration,
    ) -> Result<ClaimedRun, Error>;

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

    /// Records sent notifications, moves the cursor to the last of them and renews the
    /// lease, in one transaction (G5); with `finish`, also ends the run.
    async fn record(
        &self,
        claim: &RunClaim,
        sent: &[SentNotification],
        finish: Option<FinalStatus>,
        lease: Duration,
    ) -> Result<Claimed, Error>;

    /// Marks `CANCELED_BY_ERROR` every run in progress whose lease has expired: its
    /// process died. Returns how many were marked.
    async fn expire_abandoned_runs(&self) -> Result<u64, Error>;

    /// Recorded notifications after `after` (in recording order) matching `filter`.
    async fn recorded_after(
        &self,
        after: i64,
        filter: NotificationFilter,
        limit: u32,
    ) -> Result<Vec<(i64, Notification)>, Error>;

    /// The recording sequence number of a notification, if it was recorded.
    async fn recorded_seq(&self, id: NotificationId) -> Result<Option<i64>, Error>;
}

/// A fresh claim token: positive, so it never looks like an unclaimed run.
pub(crate) fn claim_token() -> i64 {
    rand::random::<i64>().wrapping_abs().max(1)
}

pub(crate) fn unknown_product(product: ProductId) -> Error {
    Error::NotFound(format!(
        "product {product} does not exist; create it with SetStock first"
    ))
}

pub(crate) fn never_registered(product: ProductId, user: UserId) -> Error {
    Error::NotFound(format!(
        "user {user} never registered an alert for product {product}; nothing to cancel"
    ))
}

pub(crate) fn run_in_progress(product: ProductId, round: i64) -> Error {
    Error::FailedPrecondition(format!(
        "product {product} already has a run in progress (round {round}); wait for it to \
         finish (GetRestockRun shows its status)"
    ))
}

pub(crate) fn out_of_stock(product: ProductId, stock: i64) -> Error {
    Error::FailedPrecondition(format!(
        "product {product} is out of stock (stock {stock}); set a positive stock with \
         SetStock, or with the `stock` field of TriggerRestock"
    ))
}

pub(crate) fn never_restocked(product: ProductId) -> Error {
    Error::FailedPrecondition(format!(
        "product {product} has never been restocked, so there is no run to resume; start \
         one with TriggerRestock"
    ))
}

/// G6: only a `CANCELED_BY_ERROR` run of a product in stock is resumed.
pub(crate) fn check_resumable(
    product: ProductId,
    round: i64,
    status: RunStatus,
    stock: i64,
) -> Result<(), Error> {
    match status {
        RunStatus::CanceledByError => {}
        RunStatus::InProgress => return Err(run_in_progress(product, round)),
        RunStatus::Completed => {
            return Err(Error::FailedPrecondition(format!(
                "round {round} of product {product} completed; nothing to resume \
                 (TriggerRestock starts the next round)"
            )));
        }
        RunStatus::CanceledBySoldOut => {
            return Err(Error::FailedPrecondition(format!(
                "round {round} of product {product} ended because the product sold out; a \
                 sold-out run is not resumed (TriggerRestock starts the next round)"
            )));
        }
    }
    if stock <= 0 {
        return Err(out_of_stock(product, stock));
    }
    Ok(())
}
