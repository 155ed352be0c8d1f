//! Driving one run: keyset pages of registrations in queue order, a stock check before
//! every send, pacing by the limiter, and batched recording of what was sent.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::time::Instant;
use tracing::Instrument as _;

use super::Engine;
use crate::domain::{Error, Notification, NotificationId, ProductId};
use crate::store::{Claimed, ClaimedRun, FinalStatus, RunClaim, SentNotification};

/// Why a run stopped before finishing its queue.
enum Stop {
    /// The run is no longer ours (its lease expired and it was marked or taken over).
    Lost,
    SoldOut,
    ShuttingDown,
    Failed(Error),
}

impl From<Error> for Stop {
    fn from(err: Error) -> Self {
        Stop::Failed(err)
    }
}

/// Drives a claimed run to a final state. Never returns with the run left
/// `IN_PROGRESS` by choice: if even marking it failed, its lease expires and it is
/// marked by the reaper.
pub(super) async fn drive(engine: Arc<Engine>, claimed: ClaimedRun) {
    let span = tracing::info_span!(
        "run",
        product = %claimed.claim.product_id,
        round = claimed.claim.restock_round,
    );
    async move {
        tracing::info!(resume_cursor = ?claimed.cursor, "run started");
        let mut run = RunState {
            engine: &engine,
            claim: claimed.claim,
            cursor: claimed.cursor,
            pending: Vec::with_capacity(engine.settings.batch_size),
            oldest_pending: None,
            renewed: Instant::now(),
        };
        let started = Instant::now();
        let outcome = run.notify_all().await;
        let status = match outcome {
            Ok(()) => FinalStatus::Completed,
            Err(Stop::Lost) => {
                tracing::warn!("run was taken from this task; stopping without writing");
                return;
            }
            Err(Stop::SoldOut) => FinalStatus::SoldOut,
            Err(Stop::ShuttingDown) => {
                tracing::warn!("run interrupted by shutdown; resume it with ManualRestock");
                FinalStatus::Error
            }
            Err(Stop::Failed(err)) => {
                tracing::error!(error = ?err, "run failed; resume it with ManualRestock");
                FinalStatus::Error
            }
        };
        match run.finish(status).await {
            Some(written) => tracing::info!(
                status = %written.status(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "run ended"
            ),
            None => tracing::error!(
                "run left IN_PROGRESS: once its lease expires it is marked CANCELED_BY_ERROR"
            ),
        }
    }
    .instrument(span)
    .await
}

struct RunState<'a> {
    engine: &'a Arc<Engine>,
    claim: RunClaim,
    /// Queue position of the last notification sent (recorded or pending).
    cursor: Option<i64>,
    /// Sent, not yet recorded, in send order.
    pending: Vec<SentNotification>,
    oldest_pending: Option<Instant>,
    /// When the lease was last renewed (every record renews it).
    renewed: Instant,
}

impl RunState<'_> {
    fn product(&self) -> ProductId {
        self.claim.product_id
    }

    async fn notify_all(&mut self) -> Result<(), Stop> {
        let engine = self.engine;
        loop {
            // Record before reading the next page, so that the page leaves out every
            // user already notified in this round (the query skips recorded users).
            self.flush().await?;
            let page = engine
                .store
                .next_registrations(&self.claim, self.cursor, engine.settings.page_size)
                .await?;
            if page.is_empty() {
                return Ok(());
            }
            let mut rest = &page[..];
            while !rest.is_empty() {
                let sent = self.send(rest).await?;
                rest = &rest[sent..];
                let due = self
                    .oldest_pending
                    .is_some_and(|t| t.elapsed() >= engine.settings.flush_interval);
                if self.pending.len() >= engine.settings.batch_size || due {
                    self.flush().await?;
                }
            }
        }
    }

    /// Sends the next few of `queue` (as many as the limiter grants at once) and returns
    /// how many.
    ///
    /// The stock is checked first, then the limiter is waited for, then the
    /// notifications go out, all under the gate: no stock write can come between the
    /// check and the send (G3), and the send happens at the instant the limiter granted
    /// it, so the limit holds on actual send times (G2), not on grant times that a
    /// Redis round trip could shift.
    ///
    /// A long wait for the limiter (a low rate, many runs sharing it) is cut into
    /// slices of one flush interval: between slices the gate is let go, so a stock write
    /// never waits longer than that; what was sent is recorded, so it is never long
    /// unrecorded (Subscribe's replay relies on it); and the lease is renewed, so a
    /// waiting run is not taken for a dead one.
    async fn send(&mut self, queue: &[crate::domain::Registration]) -> Result<usize, Stop> {
        let engine = self.engine;
        let product = self.product();
        let want = u32::try_from(queue.len()).unwrap_or(u32::MAX);
        loop {
            let no_stock_write = engine.gate.send(product).await;
            if current_stock(engine, product).await? <= 0 {
                return Err(Stop::SoldOut);
            }
            let slice_end = Instant::now() + engine.settings.flush_interval;
            let granted = tokio::select! {
                biased;
                _ = engine.shutdown.cancelled() => return Err(Stop::ShuttingDown),
                granted = engine.limiter.acquire(want) => granted.map_err(Error::from)?,
                _ = tokio::time::sleep_until(slice_end) => {
                    drop(no_stock_write);
                    self.keep_up().await?;
                    continue;
                }
            };
            let chunk = &queue[..(granted as usize).min(queue.len())];
            self.publish(chunk).await?;
            return Ok(chunk.len());
        }
    }

    /// Hands a chunk to the bus, stamped now, and queues it for recording.
    async fn publish(&mut self, chunk: &[crate::domain::Registration]) -> Result<(), Stop> {
        let sent_at = Utc::now();
        let notifications: Vec<Notification> = chunk
            .iter()
            .map(|r| Notification {
                id: NotificationId {
                    product_id: self.product(),
                    restock_round: self.claim.restock_round,
                    user_id: r.user_id,
                },
                sent_at,
            })
            .collect();
        self.engine
            .bus
            .publish(&notifications)
            .await
            .map_err(Error::from)?;
        self.pending
            .extend(chunk.iter().map(|&registration| SentNotification {
                registration,
                sent_at,
            }));
        self.oldest_pending.get_or_insert_with(Instant::now);
        self.cursor = chunk.last().map(|r| r.position).or(self.cursor);
        Ok(())
    }

    /// While waiting: records what is pending, or renews the lease if it is a third
    /// used up.
    async fn keep_up(&mut self) -> Result<(), Stop> {
        let renew = self.renewed.elapsed() >= self.engine.settings.lease / 3;
        if self.pending.is_empty() && !renew {
            return Ok(());
        }
        self.record_pending().await
    }

    /// Records pending notifications and moves the cursor, in one transaction.
    async fn flush(&mut self) -> Result<(), Stop> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.record_pending().await
    }

    /// Records what is pending (possibly nothing) and renews the lease.
    async fn record_pending(&mut self) -> Result<(), Stop> {
        let engine = self.engine;
        match engine
            .store
            .record(&self.claim, &self.pending, None, engine.settings.lease)
            .await?
        {
            Claimed::Yes => {
                self.pending.clear();
                self.oldest_pending = None;
                self.renewed = Instant::now();
                Ok(())
            }
            Claimed::Lost => Err(Stop::Lost),
        }
    }

    /// Moves the run to its final state, recording what is pending in the same
    /// transaction, and returns the status written. If that fails, the pending
    /// notifications are given up (they were delivered; a resume delivers them again with
    /// the same ids) and `CANCELED_BY_ERROR` alone is written, with retries: a failing
    /// run must not stay `IN_PROGRESS` (G4). `None` if nothing could be written.
    async fn finish(&mut self, status: FinalStatus) -> Option<FinalStatus> {
        let engine = self.engine;
        let lease = engine.settings.lease;
        match engine
            .store
            .record(&self.claim, &self.pending, Some(status), lease)
            .await
        {
            Ok(_) => return Some(status),
            Err(err) => tracing::error!(
                error = ?err,
                unrecorded = self.pending.len(),
                "cannot record the last sends; marking the run CANCELED_BY_ERROR without them"
            ),
        }
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=6 {
            match engine
                .store
                .record(&self.claim, &[], Some(FinalStatus::Error), lease)
                .await
            {
                Ok(_) => return Some(FinalStatus::Error),
                Err(err) => {
                    tracing::warn!(attempt, error = ?err, "cannot mark the run CANCELED_BY_ERROR");
                }
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
        None
    }
}

/// The stock the engine checks before sending: from the cache, loaded from the database
/// on a miss. The caller holds the gate, so no stock write can slip in between.
async fn current_stock(engine: &Engine, product: ProductId) -> Result<i64, Error> {
    if let Some(stock) = engine.stock.get(product).await? {
        return Ok(stock);
    }
    let stock = engine.store.product(product).await?.map_or(0, |p| p.stock);
    engine.stock.set(product, stock).await?;
    Ok(stock)
}
