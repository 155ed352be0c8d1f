//! Where a run's notifications go, behind one trait like the stock cache, the limiter
//! and the bus: the stream (each batch through the stock fence onto the bus, for
//! subscribers), or a webhook endpoint that must acknowledge each notification before
//! it counts as sent (G12).
//!
//! `Deployment` picks one [`Channel`] at start. For each run the channel opens an
//! [`Outbox`], and the run loop (`engine::run`) hands it the queue a page at a time;
//! it never asks which channel it has. What every channel shares with its run (the
//! claim, the recorder, the cursor, the wave's quota) is the run's [`RunCore`].
//!
//! A new channel (a queue, a push gateway) is one module here implementing both traits,
//! and one line in `deployment.rs`.

mod grant;
pub mod stream;
pub mod webhook;

pub use stream::StreamChannel;

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::Engine;
use super::bus::{RunKey, SentBatch, SentItem};
use super::recorder::{RecordError, Recorder};
use super::stock::Fenced;
use crate::domain::{Attributes, BackendError, Error, ProductId, Registration, UserId};
use crate::store::RunClaim;

/// Where notifications go: one for the whole service, chosen by `Deployment`.
#[async_trait]
pub trait Channel: Send + Sync + 'static {
    /// The way out for one claim of `run`.
    fn outbox(&self, run: RunKey) -> Box<dyn Outbox>;

    /// Returns when nothing this channel let through the fence for `product` before can
    /// still start: called by a stock write that brought the stock below its threshold,
    /// once the new figure is cached (G3), and by an erasure that took a run from its
    /// owner, once the fence has the newer claim (G8). A channel whose sends happen
    /// inside the fence's own step has nothing to wait for.
    async fn drain_passes(&self, product: ProductId) -> Result<(), BackendError>;
}

/// One run's notifications on their way through its channel, in registration order.
///
/// What went through reaches the recorder through [`RunCore::delivered`], in order and
/// never twice; what was started and did not go through goes back with
/// [`RunCore::unsent`], and is sent again from the cursor.
#[async_trait]
pub(crate) trait Outbox: Send {
    /// Starts the next few of `queue` (as many as the limiter grants at once) and
    /// returns how many; `None` if something was refused meanwhile, and the queue is to
    /// be read again from the run's cursor.
    async fn send(
        &mut self,
        run: &mut RunCore<'_>,
        queue: &[Registration],
    ) -> Result<Option<usize>, Stop>;

    /// Waits until everything started went through (or was refused) and was handed to
    /// the recorder. `false`: something was refused, and the queue is to be read again
    /// from the cursor.
    async fn settle(&mut self, run: &mut RunCore<'_>) -> Result<bool, Stop>;

    /// The run stopped sending (`stop`, which is not a lost run): nothing more starts,
    /// what is on its way is waited for as the channel sees fit, and what went through
    /// is handed to the recorder. `Err` only when that changes the outcome (the run was
    /// lost meanwhile).
    async fn wind_down(&mut self, run: &mut RunCore<'_>, stop: &Stop) -> Result<(), Stop>;

    /// Queue position of the last notification started and not yet through, if any:
    /// the next page is read after it.
    fn last_started(&self) -> Option<i64>;

    /// Removes from `page` the users started and not yet through: a page read meanwhile
    /// still lists them.
    fn leave_out_started(&self, page: &mut Vec<Registration>);

    /// Nothing is on its way.
    fn is_empty(&self) -> bool;
}

/// Why a run stopped before finishing its queue.
pub(crate) enum Stop {
    /// The run is no longer this task's: its lease ran out and another owner may have
    /// it (G8).
    Lost,
    /// Commits stalled until the lease could run out: the run stops sending and is left
    /// to whichever instance takes it over (G8, G10).
    LeaseRunOut,
    SoldOut,
    ShuttingDown,
    Failed(Error),
    /// The channel refused a notification, or it failed every attempt (G12): why, as
    /// the run's `last_error` says it.
    Undelivered(String),
}

impl Stop {
    /// What the run's `last_error` says when this ends it `CANCELED_BY_ERROR`.
    pub(crate) fn last_error(&self) -> Option<String> {
        match self {
            Stop::Failed(err) => Some(err.to_string()),
            Stop::Undelivered(why) => Some(why.clone()),
            _ => None,
        }
    }
}

impl From<Error> for Stop {
    fn from(err: Error) -> Self {
        Stop::Failed(err)
    }
}

impl From<BackendError> for Stop {
    fn from(err: BackendError) -> Self {
        Stop::Failed(err.into())
    }
}

impl From<RecordError> for Stop {
    fn from(err: RecordError) -> Self {
        match err {
            RecordError::Lost => Stop::Lost,
            RecordError::LeaseRunOut => Stop::LeaseRunOut,
            RecordError::Failed(err) => Stop::Failed(err),
        }
    }
}

/// Refusals of the fence in a row that the run fixes before it fails: between tries a
/// figure missing from the cache is loaded from the database, and a lost claim or a
/// chain held elsewhere is proved and registered again; twice is plenty (a figure only
/// goes missing when it expires or a stock write is under way, a chain when Redis lost
/// or rolled back keys).
const DELIVERY_ATTEMPTS: usize = 3;

/// Digits of a second kept in `sent_at`: microseconds, what the history and the bus
/// keep, so a notification reads the same live, replayed, or from another instance.
const SENT_AT_DIGITS: u16 = 6;

/// What every channel shares with the run it sends for: the claim it sends under, the
/// recorder behind it, how far the run got, and what its wave has left.
pub(crate) struct RunCore<'a> {
    pub(in crate::engine) engine: &'a Arc<Engine>,
    pub(in crate::engine) run: RunKey,
    pub(in crate::engine) claim: RunClaim,
    pub(in crate::engine) recorder: Recorder,
    /// Queue position of the last notification that went through (recorded or not).
    pub(in crate::engine) cursor: Option<i64>,
    /// A wave run: how many the current wave may still notify.
    pub(in crate::engine) wave_left: Option<i64>,
    /// What the trigger said of the restock: every batch carries it.
    pub(in crate::engine) attributes: Attributes,
}

impl RunCore<'_> {
    pub fn product(&self) -> ProductId {
        self.run.product_id
    }

    /// How many more the wave lets the run start (no limit outside waves).
    pub fn wave_room(&self) -> usize {
        self.wave_left
            .map_or(usize::MAX, |left| usize::try_from(left).unwrap_or(0))
    }

    /// `count` notifications started: taken from the wave's quota.
    pub fn started(&mut self, count: usize) {
        if let Some(left) = &mut self.wave_left {
            *left -= count as i64;
        }
    }

    /// Notifications started and not delivered go back to the wave's quota.
    pub fn unsent(&mut self, count: usize) {
        if let Some(left) = &mut self.wave_left {
            *left += count as i64;
        }
    }

    /// A chunk that went through: counted, handed to the recorder, and the cursor moved
    /// past it.
    pub fn delivered(&mut self, chunk: &[Registration], sent_at: DateTime<Utc>) {
        self.engine
            .metrics
            .notifications_sent
            .increment(chunk.len() as u64);
        self.recorder.delivered(chunk, sent_at);
        self.cursor = chunk.last().map(|r| r.position).or(self.cursor);
    }

    /// `chunk` as a batch of this run following queue position `after`, under its claim
    /// (G8).
    pub fn batch(
        &self,
        chunk: &[Registration],
        after: Option<i64>,
        sent_at: DateTime<Utc>,
    ) -> SentBatch {
        SentBatch::new(
            self.run,
            after,
            chunk
                .iter()
                .map(|r| SentItem {
                    user_id: r.user_id,
                    position: r.position,
                })
                .collect(),
            sent_at,
        )
        .under_claim(self.claim.token)
        .with_attributes(self.attributes.clone())
    }

    /// The shared side lost the run's newest claim (a flush, a failover, its key
    /// expired): registers the claim again, but only once the database shows it still
    /// holds the run; otherwise it no longer owns it (G8). Its deliveries follow
    /// `after`, the last one that went through.
    pub async fn reclaim(&self, after: Option<i64>) -> Result<(), Stop> {
        reclaim(self.engine, self.run, &self.claim, after).await
    }
}

/// See [`RunCore::reclaim`]; for tasks that outlive the borrow of the run.
async fn reclaim(
    engine: &Engine,
    run: RunKey,
    claim: &RunClaim,
    after: Option<i64>,
) -> Result<(), Stop> {
    tracing::warn!("the run's claim is gone from Redis; proving it against the database");
    if !engine.store.holds_claim(claim).await? {
        return Err(Stop::Lost);
    }
    if !engine.stock_fence.claim(run, claim.token, after).await? {
        return Err(Stop::Lost);
    }
    Ok(())
}

/// Asks the fence (`ask`: an admission of `run`) until it lets the run through, doing
/// what each refusal asks: a sold-out product stops the run (G3), a newer claim means
/// the run is lost (G8), an unknown claim is proved and registered again, an uncached
/// figure is cached; a figure that keeps disappearing fails the run (G4).
async fn through_fence<T, Fut>(
    engine: &Engine,
    run: RunKey,
    claim: &RunClaim,
    mut ask: impl FnMut() -> Fut,
) -> Result<T, Stop>
where
    Fut: Future<Output = Result<Fenced<T>, BackendError>>,
{
    for _ in 0..DELIVERY_ATTEMPTS {
        match ask().await? {
            Fenced::Through(through) => return Ok(through),
            Fenced::SoldOut => return Err(Stop::SoldOut),
            Fenced::Superseded => return Err(Stop::Lost),
            Fenced::ClaimUnknown => reclaim(engine, run, claim, None).await?,
            Fenced::NotCached => engine.cache_stock(run.product_id, None).await?,
            Fenced::OutOfOrder => {}
        }
    }
    Err(Stop::Failed(stock_keeps_disappearing()))
}

fn stock_keeps_disappearing() -> Error {
    Error::Backend(BackendError::new(
        crate::domain::Component::StockCache,
        true,
        anyhow::anyhow!(
            "the fence keeps refusing the run: its stock figure or claim keeps disappearing \
             from the cache"
        ),
    ))
}

/// The users of `started`, to leave out of a page read while they are on their way.
fn leave_out(page: &mut Vec<Registration>, started: &std::collections::HashSet<UserId>) {
    if !started.is_empty() {
        page.retain(|r| !started.contains(&r.user_id));
    }
}
