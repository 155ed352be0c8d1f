//! Driving one run: keyset pages of registrations in queue order (G1), pacing by the
//! limiter (G2), delivery through the stock fence (G3), and the recorder behind it
//! (G5, G10), until the queue is done, the product sells out, or the run stops. With a
//! webhook endpoint, delivery is a pipeline of acknowledged requests instead (G12): the
//! child module `webhook`, with the reasoning in `engine::webhook`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound as _, Utc};
use tokio::time::Instant;
use tracing::Instrument as _;

use super::Engine;
use super::bus::{BusEvent, RunKey, SentBatch, SentItem};
use super::recorder::{RecordError, Recorder};
use super::stock::Fenced;
use super::webhook::Failure;
use super::webhook::pipeline::Pipeline;
use crate::domain::{BackendError, Error, ProductId, Registration, RunStatus, WaveState};
use crate::store::{After, ClaimedRun, FinalStatus, RunClaim};

mod webhook;
use webhook::{Grant, PassAhead};

/// Why a run stopped before finishing its queue.
pub(super) enum Stop {
    /// The run is no longer this task's: its lease ran out and another owner may have
    /// it (G8).
    Lost,
    /// Commits stalled until the lease could run out: the run stops sending and is left
    /// to whichever instance takes it over (G8, G10).
    LeaseRunOut,
    SoldOut,
    ShuttingDown,
    Failed(Error),
    /// The webhook refused a notification, or it failed every attempt (G12).
    Undelivered(Failure),
}

impl Stop {
    /// What the run's `last_error` says when this ends it `CANCELED_BY_ERROR`.
    pub(super) fn last_error(&self) -> Option<String> {
        match self {
            Stop::Failed(err) => Some(err.to_string()),
            Stop::Undelivered(failure) => Some(failure.to_string()),
            _ => None,
        }
    }
}

impl From<Error> for Stop {
    fn from(err: Error) -> Self {
        Stop::Failed(err)
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

/// Deliveries of one batch tried before the run fails: a figure missing from the cache
/// is loaded from the database, and a lost claim registered again, between tries; twice
/// is plenty (the figure only goes missing when it expires or a stock write is under
/// way).
const DELIVERY_ATTEMPTS: usize = 3;

/// Digits of a second kept in `sent_at`: microseconds, what the history and the bus
/// keep, so a notification reads the same live, replayed, or from another instance.
const SENT_AT_DIGITS: u16 = 6;

/// Drives a claimed run until it reaches a final state, is handed over, or is lost.
pub(super) async fn drive(engine: Arc<Engine>, claimed: ClaimedRun) {
    let span = tracing::info_span!(
        "run",
        product = %claimed.claim.product_id,
        round = claimed.claim.restock_round,
    );
    async move {
        tracing::info!(resume_cursor = ?claimed.cursor, "run started");
        engine.metrics.runs_in_progress.increment(1.0);
        let _running = DecrementOnDrop(engine.metrics.runs_in_progress.clone());
        let claim = claimed.claim;
        let wave = claimed.run.wave;
        let mut run = RunState {
            run: RunKey {
                product_id: claim.product_id,
                restock_round: claim.restock_round,
            },
            recorder: Recorder::new(
                engine.store.clone(),
                claim,
                engine.settings.recorder.clone(),
                engine.settings.lease.clone(),
                claimed.claimed_at,
                engine.metrics.clone(),
            ),
            claim,
            cursor: claimed.cursor,
            wave_left: None,
            pipeline: engine
                .webhook
                .clone()
                .map(|client| Pipeline::new(client, claim.product_id, claim.restock_round)),
            paused_until: None,
            grant: None,
            pass_ahead: None,
            engine: &engine,
        };
        let started = Instant::now();
        let notified = async {
            // G8: from here on, a delivery of an older claim of this run that is still
            // on its way does nothing.
            if !engine
                .stock_fence
                .claim(run.run, claim.token)
                .await
                .map_err(Error::from)?
            {
                return Err(Stop::Lost);
            }
            if let Some(wave) = wave {
                run.begin_wave(wave, claimed.run.sent_count).await?;
            }
            run.notify_all().await
        };
        let notified = notified.await;
        // G12: what is on the wire is waited for, and what was acknowledged recorded.
        let notified = match notified {
            Err(
                stop
                @ (Stop::SoldOut | Stop::ShuttingDown | Stop::Failed(_) | Stop::Undelivered(_)),
            ) if run.pipeline.is_some() => {
                let wait = match (&stop, &engine.webhook) {
                    (Stop::ShuttingDown, Some(webhook)) => webhook.settings().shutdown_wait,
                    (_, Some(webhook)) => webhook.settings().timeout,
                    (_, None) => Duration::ZERO,
                };
                match run.wind_down(wait).await {
                    Ok(()) => Err(stop),
                    Err(lost @ (Stop::Lost | Stop::LeaseRunOut)) => Err(lost),
                    Err(
                        other @ (Stop::SoldOut
                        | Stop::ShuttingDown
                        | Stop::Failed(_)
                        | Stop::Undelivered(_)),
                    ) => {
                        tracing::warn!(
                            error = other.last_error().unwrap_or_default(),
                            "cannot publish the last acknowledged notifications; a resume \
                             sends them again under the same ids"
                        );
                        Err(stop)
                    }
                }
            }
            other => other,
        };
        let mut last_error = None;
        let after = match notified {
            Ok(Done::Queue) => After::Finish(FinalStatus::Completed),
            Ok(Done::Wave) => After::WaitForWave(
                wave.map_or(crate::domain::Wave::MIN_INTERVAL, |w| w.wave.interval),
            ),
            Err(Stop::SoldOut) => After::Finish(FinalStatus::SoldOut),
            Err(Stop::ShuttingDown) => After::Release,
            Err(stop @ (Stop::Failed(_) | Stop::Undelivered(_))) => {
                last_error = stop.last_error();
                match &stop {
                    Stop::Failed(err) => {
                        tracing::error!(error = ?err, "run failed; resume it with ManualRestock")
                    }
                    _ => tracing::error!(
                        error = last_error.as_deref().unwrap_or_default(),
                        "webhook delivery failed; resume the run with ManualRestock"
                    ),
                }
                After::Finish(FinalStatus::Error)
            }
            Err(Stop::Lost) => return log_lost(),
            Err(Stop::LeaseRunOut) => return log_lease_run_out(),
        };
        let written = match run.recorder.close(after, last_error).await {
            Ok(written) => written,
            Err(RecordError::Lost) => return log_lost(),
            Err(RecordError::LeaseRunOut) => return log_lease_run_out(),
            Err(RecordError::Failed(err)) => {
                return tracing::error!(
                    error = ?err,
                    "run left IN_PROGRESS: once its lease runs out another instance takes it over"
                );
            }
        };
        let status = match written {
            After::Finish(status) => {
                engine.metrics.run_finished(status);
                status.status()
            }
            _ => RunStatus::InProgress,
        };
        match written {
            After::Release => tracing::info!(
                "run released on shutdown: another instance, or this one after a restart, \
                 continues it"
            ),
            After::WaitForWave(interval) => tracing::info!(
                next_wave_in_ms = interval.as_millis() as u64,
                "wave done; the run waits for its next wave (whichever instance is alive \
                 then starts it)"
            ),
            _ => tracing::info!(
                %status,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "run ended"
            ),
        }
        // Subscribers waiting for this run's record to catch up learn that it has
        // (G11). Losing this event only delays them, so a failure is just logged.
        let ended = BusEvent::RunEnded {
            run: run.run,
            status,
            last_position: run.cursor,
        };
        if let Err(err) = engine.bus.publish(ended).await {
            tracing::warn!(error = ?err, "cannot announce the end of the run");
        }
    }
    .instrument(span)
    .await
}

struct RunState<'a> {
    engine: &'a Arc<Engine>,
    run: RunKey,
    claim: RunClaim,
    recorder: Recorder,
    /// Queue position of the last notification delivered (recorded or not).
    cursor: Option<i64>,
    /// A wave run: how many the current wave may still notify.
    wave_left: Option<i64>,
    /// With a webhook endpoint: the requests started and not yet published (G12).
    /// `cursor` is then the last *acknowledged and published* notification.
    pipeline: Option<Pipeline>,
    /// No request starts before this: the endpoint asked for a pause (`Retry-After`).
    paused_until: Option<Instant>,
    /// A webhook run's call to the limiter, kept waiting from one batch of requests to
    /// the next so that no slot falls due while the run is not asking (G2).
    grant: Option<Grant>,
    /// A webhook run's next pass through the stock fence, asked for before the grant
    /// that will use it, so that the grant's requests start at once.
    pass_ahead: Option<PassAhead>,
}

/// Why a run stopped sending, when it did not stop early.
pub(super) enum Done {
    /// Every user in the queue was notified.
    Queue,
    /// The current wave notified its quota, and users remain for the next.
    Wave,
}

impl RunState<'_> {
    fn product(&self) -> ProductId {
        self.run.product_id
    }

    /// Starts the run's next wave, or continues the current one if it was under way
    /// (the run was taken over, released on shutdown or resumed mid-wave). A wave starts
    /// by reading the stock: 0 ends the run sold out (G3); otherwise the wave may notify
    /// `per_unit` x the stock, recorded with the run so that whoever drives it next knows.
    async fn begin_wave(&mut self, state: WaveState, sent_count: i64) -> Result<(), Stop> {
        if let Some(left) = state.left_in_wave(sent_count) {
            tracing::info!(left, "continuing the current wave");
            self.wave_left = Some(left);
            return Ok(());
        }
        let engine = self.engine;
        let stock = engine
            .store
            .product(self.product())
            .await?
            .map_or(0, |p| p.stock);
        let quota = state.wave.quota(stock);
        if quota <= 0 {
            tracing::info!(stock, "sold out at the start of a wave");
            return Err(Stop::SoldOut);
        }
        self.recorder.start_wave(quota, sent_count).await?;
        tracing::info!(stock, quota, "wave started");
        self.wave_left = Some(quota);
        Ok(())
    }

    async fn notify_all(&mut self) -> Result<Done, Stop> {
        let engine = self.engine;
        loop {
            // The page leaves out users already notified in this round: the query skips
            // recorded ones, and the filter below those delivered but not yet recorded
            // (a user who cancelled and registered again after being notified is behind
            // the cursor once more).
            let mut page = engine
                .store
                .next_registrations(&self.claim, self.read_cursor(), engine.settings.page_size)
                .await?;
            if page.is_empty() {
                self.settle_pipeline().await?;
                return Ok(Done::Queue);
            }
            // Requests on the wire or waiting for a retry are not recorded yet either.
            let in_pipeline: std::collections::HashSet<_> = self
                .pipeline
                .as_ref()
                .map(|pipeline| pipeline.users().collect())
                .unwrap_or_default();
            if self.recorder.has_unrecorded() || !in_pipeline.is_empty() {
                page.retain(|r| {
                    !self.recorder.is_unrecorded(r.user_id) && !in_pipeline.contains(&r.user_id)
                });
                if page.is_empty() {
                    // Only unrecorded users were left: record them, and the query skips
                    // them next time.
                    self.settle_pipeline().await?;
                    self.recorder.flush().await?;
                    continue;
                }
            }
            if self.wave_left == Some(0) {
                // Users remain (this page), for the next wave.
                self.settle_pipeline().await?;
                return Ok(Done::Wave);
            }
            let mut rest = &page[..];
            while !rest.is_empty() && self.wave_left != Some(0) {
                let sent = match self.pipeline {
                    Some(_) => self.send_to_webhook(rest).await?,
                    None => self.send(rest).await?,
                };
                rest = &rest[sent..];
                self.recorder.poll().await?;
            }
        }
    }

    /// Sends the next few of `queue` (as many as the limiter grants at once) and returns
    /// how many.
    ///
    /// The limiter is waited for first; then the batch goes through the stock fence,
    /// which delivers it only if the product is in stock, as one step no stock write can
    /// split (G3). A long wait for the limiter (a low rate, many runs sharing it) is cut
    /// into slices of one flush interval, between which what was sent is recorded and
    /// the lease renewed, so a waiting run is not taken for a dead one. The call to the
    /// limiter stays in place across the slices: the limiter serves waiting runs in
    /// turn (G2), and a run that asked again would go to the back of the queue.
    async fn send(&mut self, queue: &[Registration]) -> Result<usize, Stop> {
        let engine = self.engine;
        'ask: loop {
            if engine.shutdown.is_cancelled() {
                return Err(Stop::ShuttingDown);
            }
            // G10 and G8: never more than a second's worth unrecorded, and nothing sent
            // on a lease that could have run out.
            self.recorder.wait_for_room().await?;
            let mut want = queue.len().min(self.recorder.room());
            if let Some(left) = self.wave_left {
                want = want.min(usize::try_from(left).unwrap_or(usize::MAX));
            }
            let acquire = engine
                .limiter
                .acquire(u32::try_from(want).unwrap_or(u32::MAX));
            tokio::pin!(acquire);
            let granted = loop {
                let slice_end = Instant::now() + engine.settings.recorder.flush_interval;
                tokio::select! {
                    biased;
                    _ = engine.shutdown.cancelled() => return Err(Stop::ShuttingDown),
                    granted = &mut acquire => break granted.map_err(Error::from)?,
                    _ = tokio::time::sleep_until(slice_end) => {
                        // Commits run on tasks of their own: this only notices or starts one.
                        self.recorder.keep_up().await?;
                        if !self.recorder.may_send() {
                            continue 'ask;
                        }
                    }
                }
            };
            if !self.recorder.may_send() {
                // The lease could have run out while the run waited: the slots go
                // unused (a send less, never one on a lost lease).
                continue 'ask;
            }
            let chunk = &queue[..(granted.count as usize).min(want)];
            self.deliver(chunk, granted.at).await?;
            return Ok(chunk.len());
        }
    }

    /// `chunk` as a batch of this run, after its cursor and under its claim (G8).
    fn batch(&self, chunk: &[Registration], sent_at: DateTime<Utc>) -> SentBatch {
        SentBatch::new(
            self.run,
            self.cursor,
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
    }

    /// Delivers a chunk through the fence, stamped with its grant, and hands it to the
    /// recorder.
    async fn deliver(&mut self, chunk: &[Registration], granted_at: Instant) -> Result<(), Stop> {
        // Stamped with the instant the limiter handed the slots out, which is what it
        // counts (G2): a window of `sent_at` then holds what a window of grants holds,
        // however long this task took to wake on the grant.
        let sent_at = self
            .engine
            .clock
            .at(granted_at)
            .trunc_subsecs(SENT_AT_DIGITS);
        let batch = self.batch(chunk, sent_at);
        let fence = &self.engine.stock_fence;
        through_fence(self.engine, self.run, &self.claim, || fence.deliver(&batch)).await?;
        self.engine
            .metrics
            .notifications_sent
            .increment(chunk.len() as u64);
        self.recorder.delivered(chunk, sent_at);
        if let Some(left) = &mut self.wave_left {
            *left -= chunk.len() as i64;
        }
        self.cursor = chunk.last().map(|r| r.position).or(self.cursor);
        Ok(())
    }
}

/// Asks the fence (`ask`: a delivery or an admission of `run`) until it lets the run
/// through, doing what each refusal asks: a sold-out product stops the run (G3), a
/// newer claim means the run is lost (G8), an unknown claim is proved and registered
/// again, an uncached figure is cached; a figure that keeps disappearing fails the run
/// (G4).
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
        match ask().await.map_err(Error::from)? {
            Fenced::Through(through) => return Ok(through),
            Fenced::SoldOut => return Err(Stop::SoldOut),
            Fenced::Superseded => return Err(Stop::Lost),
            Fenced::ClaimUnknown => reclaim(engine, run, claim).await?,
            Fenced::NotCached => engine.cache_stock(run.product_id, None).await?,
        }
    }
    Err(Stop::Failed(stock_keeps_disappearing()))
}

fn stock_keeps_disappearing() -> Error {
    Error::Backend(crate::domain::BackendError::new(
        crate::domain::Component::StockCache,
        true,
        anyhow::anyhow!("the stock figure keeps disappearing from the cache"),
    ))
}

/// The shared side lost the run's newest claim (a flush, a failover, its key expired):
/// this task registers its claim again, but only once the database shows it still
/// holds the run; otherwise it no longer owns it (G8).
async fn reclaim(engine: &Engine, run: RunKey, claim: &RunClaim) -> Result<(), Stop> {
    tracing::warn!("the run's claim is gone from Redis; proving it against the database");
    if !engine.store.holds_claim(claim).await? {
        return Err(Stop::Lost);
    }
    if !engine
        .stock_fence
        .claim(run, claim.token)
        .await
        .map_err(Error::from)?
    {
        return Err(Stop::Lost);
    }
    Ok(())
}

fn log_lost() {
    tracing::warn!(
        "run was taken from this instance (its lease ran out); leaving it to its new owner"
    );
}

fn log_lease_run_out() {
    tracing::warn!(
        "commits stalled until the lease could run out: stopped sending; the run is taken \
         over once its lease has run out"
    );
}

/// Takes one off a gauge when dropped: a run counts as in progress for as long as its
/// task drives it, however it stops.
struct DecrementOnDrop(metrics::Gauge);

impl Drop for DecrementOnDrop {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
