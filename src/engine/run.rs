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
            in_flight: None,
            renewed: Instant::now(),
        };
        let started = Instant::now();
        let outcome = run.notify_all().await;
        let status = match outcome {
            Ok(()) => FinalStatus::Completed,
            Err(Stop::Lost) => return log_lost(),
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
        run.finish(status, started).await;
    }
    .instrument(span)
    .await
}

struct RunState<'a> {
    engine: &'a Arc<Engine>,
    claim: RunClaim,
    /// Queue position of the last notification sent (recorded or pending).
    cursor: Option<i64>,
    /// Sent, not yet handed to the recorder, in send order.
    pending: Vec<SentNotification>,
    oldest_pending: Option<Instant>,
    /// The batch being recorded, if any.
    in_flight: Option<InFlight>,
    /// When the lease was last renewed (every record renews it).
    renewed: Instant,
}

/// A batch being recorded on a task of its own, so that a slow commit does not hold up
/// the sends. One at a time: batches commit in send order, and the cursor only moves
/// forward.
struct InFlight {
    users: Vec<crate::domain::UserId>,
    done: tokio::task::JoinHandle<Result<Claimed, Error>>,
}

impl RunState<'_> {
    fn product(&self) -> ProductId {
        self.claim.product_id
    }

    async fn notify_all(&mut self) -> Result<(), Stop> {
        let engine = self.engine;
        loop {
            // The page leaves out users already notified in this round: the query skips
            // recorded ones, and the filter below those sent but not yet recorded (a user
            // who cancelled and registered again after being notified is behind the
            // cursor once more). A batch committing during the query is still in
            // `in_flight` here, so it is filtered either way.
            let mut page = engine
                .store
                .next_registrations(&self.claim, self.cursor, engine.settings.page_size)
                .await?;
            if page.is_empty() {
                return Ok(());
            }
            let unrecorded: std::collections::HashSet<_> = self
                .pending
                .iter()
                .map(|s| s.registration.user_id)
                .chain(self.in_flight.iter().flat_map(|f| f.users.iter().copied()))
                .collect();
            if !unrecorded.is_empty() {
                page.retain(|r| !unrecorded.contains(&r.user_id));
                if page.is_empty() {
                    // Only unrecorded users were left: record them, and the query skips
                    // them next time.
                    self.flush().await?;
                    self.settle_in_flight().await?;
                    continue;
                }
            }
            let mut rest = &page[..];
            while !rest.is_empty() {
                let sent = self.send(rest).await?;
                rest = &rest[sent..];
                self.check_in_flight().await?;
                if self.flush_due() {
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
        self.check_in_flight().await?;
        if self.flush_due() {
            return self.flush().await;
        }
        let renew = self.renewed.elapsed() >= self.engine.settings.lease / 3;
        if renew && self.in_flight.is_none() {
            return self.record_pending().await;
        }
        Ok(())
    }

    /// Whether to hand the pending batch to the recorder now: it is full or has waited
    /// a flush interval, and the recorder is free. While a slow commit is under way the
    /// batch keeps growing instead of holding up the sends, up to four batches' worth,
    /// where the sends do wait for the recorder.
    fn flush_due(&self) -> bool {
        let settings = &self.engine.settings;
        if self.pending.len() >= settings.batch_size * 4 {
            return true;
        }
        let ready = self.pending.len() >= settings.batch_size
            || self
                .oldest_pending
                .is_some_and(|t| t.elapsed() >= settings.flush_interval);
        let recorder_free = self.in_flight.as_ref().is_none_or(|f| f.done.is_finished());
        ready && recorder_free
    }

    /// Hands pending notifications to the recorder: one transaction records them and
    /// moves the cursor to the last of them (G5). Waits for the previous batch first.
    async fn flush(&mut self) -> Result<(), Stop> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.record_pending().await
    }

    /// As `flush`, but also with nothing pending: an empty record renews the lease.
    async fn record_pending(&mut self) -> Result<(), Stop> {
        self.settle_in_flight().await?;
        let batch = std::mem::take(&mut self.pending);
        self.oldest_pending = None;
        let users = batch.iter().map(|s| s.registration.user_id).collect();
        let store = self.engine.store.clone();
        let (claim, lease) = (self.claim, self.engine.settings.lease);
        let done = tokio::spawn(async move { store.record(&claim, &batch, None, lease).await });
        self.in_flight = Some(InFlight { users, done });
        Ok(())
    }

    /// Takes note of the batch being recorded if it has finished, so that a failure
    /// stops the run at once rather than at the next record.
    async fn check_in_flight(&mut self) -> Result<(), Stop> {
        if self
            .in_flight
            .as_ref()
            .is_some_and(|f| f.done.is_finished())
        {
            self.settle_in_flight().await?;
        }
        Ok(())
    }

    /// Waits for the batch being recorded. If it failed, what was sent after it is
    /// dropped from the record too (it was delivered; a resume delivers it again under
    /// the same ids): recording it would leave a hole in the history (G5).
    async fn settle_in_flight(&mut self) -> Result<(), Stop> {
        let Some(in_flight) = self.in_flight.take() else {
            return Ok(());
        };
        let outcome = match in_flight.done.await {
            Ok(Ok(Claimed::Yes)) => {
                self.renewed = Instant::now();
                return Ok(());
            }
            Ok(Ok(Claimed::Lost)) => Stop::Lost,
            Ok(Err(err)) => Stop::Failed(err),
            Err(join) => Stop::Failed(Error::Backend(crate::domain::BackendError::new(
                "database",
                false,
                anyhow::anyhow!("recording task failed: {join}"),
            ))),
        };
        self.pending.clear();
        self.oldest_pending = None;
        Err(outcome)
    }

    /// Moves the run to its final state, recording what is pending in the same
    /// transaction, and logs the outcome. If that fails, the pending notifications are
    /// given up (they were delivered; a resume delivers them again with the same ids)
    /// and `CANCELED_BY_ERROR` alone is written, with retries: a failing run must not
    /// stay `IN_PROGRESS` (G4).
    async fn finish(&mut self, status: FinalStatus, started: Instant) {
        let engine = self.engine;
        let lease = engine.settings.lease;
        let mut status = status;
        match self.settle_in_flight().await {
            Ok(()) => {}
            Err(Stop::Lost) => return log_lost(),
            Err(_) => status = FinalStatus::Error,
        }
        let first = engine
            .store
            .record(&self.claim, &self.pending, Some(status), lease)
            .await;
        let written = match first {
            Ok(Claimed::Yes) => Some(status),
            Ok(Claimed::Lost) => return log_lost(),
            Err(err) => {
                tracing::error!(
                    error = ?err,
                    unrecorded = self.pending.len(),
                    "cannot record the last sends; marking the run CANCELED_BY_ERROR without them"
                );
                match self.mark_failed(lease).await {
                    Some(Claimed::Yes) => Some(FinalStatus::Error),
                    Some(Claimed::Lost) => return log_lost(),
                    None => None,
                }
            }
        };
        match written {
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

    /// Writes `CANCELED_BY_ERROR` alone, retrying for a few seconds; `None` if it could
    /// not be written.
    async fn mark_failed(&mut self, lease: Duration) -> Option<Claimed> {
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=6 {
            match self
                .engine
                .store
                .record(&self.claim, &[], Some(FinalStatus::Error), lease)
                .await
            {
                // Lost: possibly our own first attempt, committed after all.
                Ok(claimed) => return Some(claimed),
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

fn log_lost() {
    tracing::warn!("run was taken from this task (its lease expired); leaving it to its new owner");
}

/// The stock the engine checks before sending: from the cache, loaded from the database
/// on a miss. The caller holds the gate, so no stock write can slip in between.
async fn current_stock(engine: &Engine, product: ProductId) -> Result<i64, Error> {
    if let Some(stock) = engine.stock.get(product).await? {
        return Ok(stock);
    }
    let stock = engine.store.product(product).await?.map_or(0, |p| p.stock);
    Ok(engine.stock.fill(product, stock).await?)
}
