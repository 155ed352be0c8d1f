//! Driving one run: keyset pages of registrations in queue order (G1), pacing by the
//! limiter (G2), delivery through the stock fence (G3), and the recorder behind it
//! (G5, G10), until the queue is done, the product sells out, or the run stops. With a
//! webhook endpoint, delivery is a pipeline of acknowledged requests instead (G12): the
//! child module `webhook`, with the reasoning in `engine::webhook`.

use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, SubsecRound as _, Utc};
use tokio::time::Instant;
use tracing::Instrument as _;

use super::Engine;
use super::bus::{BusEvent, RunKey, SentBatch, SentItem};
use super::recorder::{RecordError, Recorder};
use super::stock::{Delivery, Fenced};
use super::webhook::Failure;
use super::webhook::pipeline::Pipeline;
use crate::domain::{BackendError, Error, ProductId, Registration, RunStatus, WaveState};
use crate::store::{After, ClaimedRun, FinalStatus, RunClaim};

mod deliveries;
mod grant;
mod webhook;
use deliveries::{Answered, Deliveries};
use grant::{Grant, ask_limiter};
use webhook::PassAhead;

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

/// Refusals of the fence in a row that the run fixes before it fails: between tries a
/// figure missing from the cache is loaded from the database, and a lost claim or a
/// chain held elsewhere is proved and registered again; twice is plenty (a figure only
/// goes missing when it expires or a stock write is under way, a chain when Redis lost
/// or rolled back keys).
const DELIVERY_ATTEMPTS: usize = 3;

/// Digits of a second kept in `sent_at`: microseconds, what the history and the bus
/// keep, so a notification reads the same live, replayed, or from another instance.
const SENT_AT_DIGITS: u16 = 6;

/// Drives a claimed run until it reaches a final state, is handed over, or is lost:
/// start, send, wind down what is on its way, then record the outcome.
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
        let started = Instant::now();
        let wave = claimed.run.wave;
        let mut run = RunState::new(&engine, &claimed);
        let notified = run.start(wave, claimed.run.sent_count).await;
        let notified = run.wind_down(notified).await;
        if let Some((after, last_error)) = outcome(notified, wave) {
            run.finish(after, last_error, started).await;
        }
    }
    .instrument(span)
    .await
}

/// What a run's record says once it stopped sending, and why it failed if it did;
/// `None` if the run is no longer this instance's to record (G8).
fn outcome(
    notified: Result<Done, Stop>,
    wave: Option<WaveState>,
) -> Option<(After, Option<String>)> {
    let after = match notified {
        Ok(Done::Queue) => After::Finish(FinalStatus::Completed),
        Ok(Done::Wave) => {
            After::WaitForWave(wave.map_or(crate::domain::Wave::MIN_INTERVAL, |w| w.wave.interval))
        }
        Err(Stop::SoldOut) => After::Finish(FinalStatus::SoldOut),
        Err(Stop::ShuttingDown) => After::Release,
        Err(stop @ (Stop::Failed(_) | Stop::Undelivered(_))) => {
            let last_error = stop.last_error();
            match &stop {
                Stop::Failed(err) => {
                    tracing::error!(error = ?err, "run failed; resume it with ManualRestock")
                }
                _ => tracing::error!(
                    error = last_error.as_deref().unwrap_or_default(),
                    "webhook delivery failed; resume the run with ManualRestock"
                ),
            }
            return Some((After::Finish(FinalStatus::Error), last_error));
        }
        Err(Stop::Lost) => {
            log_lost();
            return None;
        }
        Err(Stop::LeaseRunOut) => {
            log_lease_run_out();
            return None;
        }
    };
    Some((after, None))
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
    /// The run's call to the limiter, kept waiting from one batch to the next so that
    /// no slot falls due while the run is not asking (G2).
    grant: Option<Grant>,
    /// A webhook run's next pass through the stock fence, asked for before the grant
    /// that will use it, so that the grant's requests start at once.
    pass_ahead: Option<PassAhead>,
    /// Without a webhook: batches on their way through the stock fence, in send order.
    /// `cursor` is then the last one the fence let through.
    deliveries: Deliveries,
    /// Times in a row the fence refused a batch the run could fix (a figure missing
    /// from the cache, a lost claim, a batch that overtook a refused one).
    refused_in_a_row: usize,
}

/// Why a run stopped sending, when it did not stop early.
pub(super) enum Done {
    /// Every user in the queue was notified.
    Queue,
    /// The current wave notified its quota, and users remain for the next.
    Wave,
}

impl<'a> RunState<'a> {
    fn new(engine: &'a Arc<Engine>, claimed: &ClaimedRun) -> Self {
        let claim = claimed.claim;
        RunState {
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
            deliveries: Deliveries::default(),
            refused_in_a_row: 0,
            engine,
        }
    }
}

impl RunState<'_> {
    /// Registers the claim with the fence, starts or continues the wave, and sends.
    async fn start(&mut self, wave: Option<WaveState>, sent_count: i64) -> Result<Done, Stop> {
        // G8: from here on, a delivery of an older claim of this run that is still on
        // its way does nothing.
        if !self
            .engine
            .stock_fence
            .claim(self.run, self.claim.token, self.cursor)
            .await
            .map_err(Error::from)?
        {
            return Err(Stop::Lost);
        }
        if let Some(wave) = wave {
            self.begin_wave(wave, sent_count).await?;
        }
        self.notify_all().await
    }

    /// The run stopped sending: what is still on its way is waited for, and what got
    /// through (or, with a webhook, was acknowledged, G12) is recorded with the outcome.
    async fn wind_down(&mut self, notified: Result<Done, Stop>) -> Result<Done, Stop> {
        match notified {
            Err(
                stop
                @ (Stop::SoldOut | Stop::ShuttingDown | Stop::Failed(_) | Stop::Undelivered(_)),
            ) if self.pipeline.is_some() => {
                self.wind_down_webhook(&stop).await?;
                Err(stop)
            }
            Err(stop @ (Stop::SoldOut | Stop::ShuttingDown | Stop::Failed(_))) => {
                if self.recorder.gave_up() {
                    // A failed commit gave up what was not recorded (a resume delivers
                    // it again under the same ids): what follows it is not recorded
                    // either, or the record would have a gap (G5).
                    while self.deliveries.next().await.is_some() {}
                } else {
                    // What is still on its way to the bus is recorded if it got there.
                    self.drain(None).await;
                }
                Err(stop)
            }
            other => other,
        }
    }

    /// Records the outcome, counts and logs it, and tells subscribers the run ended.
    async fn finish(&mut self, after: After, last_error: Option<String>, started: Instant) {
        let engine = self.engine;
        let written = match self.recorder.close(after, last_error).await {
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
        log_written(written, status, started);
        // Subscribers waiting for this run's record to catch up learn that it has
        // (G11). Losing this event only delays them, so a failure is just logged.
        let ended = BusEvent::RunEnded {
            run: self.run,
            status,
            last_position: self.cursor,
        };
        if let Err(err) = engine.bus.publish(ended).await {
            tracing::warn!(error = ?err, "cannot announce the end of the run");
        }
    }
}

/// What the run's record now says, in the log.
fn log_written(written: After, status: RunStatus, started: Instant) {
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
                if !self.settle_deliveries().await? {
                    continue;
                }
                return Ok(Done::Queue);
            }
            // Requests on the wire or waiting for a retry are not recorded yet either.
            let in_pipeline: std::collections::HashSet<_> = self
                .pipeline
                .as_ref()
                .map(|pipeline| pipeline.users().collect())
                .unwrap_or_default();
            if self.recorder.has_unrecorded()
                || !in_pipeline.is_empty()
                || !self.deliveries.is_empty()
            {
                page.retain(|r| {
                    !self.recorder.is_unrecorded(r.user_id)
                        && !in_pipeline.contains(&r.user_id)
                        && !self.deliveries.contains(r.user_id)
                });
                if page.is_empty() {
                    // Only unrecorded users were left: record them, and the query skips
                    // them next time.
                    self.settle_pipeline().await?;
                    self.settle_deliveries().await?;
                    self.recorder.flush().await?;
                    continue;
                }
            }
            if self.wave_left == Some(0) {
                // Users remain (this page), for the next wave.
                self.settle_pipeline().await?;
                if !self.settle_deliveries().await? {
                    continue;
                }
                return Ok(Done::Wave);
            }
            let mut rest = &page[..];
            while !rest.is_empty() && self.wave_left != Some(0) {
                let sent = match self.pipeline {
                    Some(_) => Some(self.send_to_webhook(rest).await?),
                    None => self.send(rest).await?,
                };
                // None: deliveries were refused, and the queue is read again from the
                // last one that went through.
                let Some(sent) = sent else { break };
                rest = &rest[sent..];
                self.recorder.poll().await?;
            }
        }
    }

    /// Starts delivering the next few of `queue` (as many as the limiter grants at once)
    /// and returns how many; `None` if deliveries were refused meanwhile, and the queue
    /// is to be read again from the last one that went through.
    ///
    /// The call to the limiter stays in place while the run waits for anything else,
    /// and the next one is made as soon as a grant arrives, before its batch goes out:
    /// slots that fall due while no call waits are lost (G2). The batch goes through
    /// the stock fence, which delivers it only if the product is in stock, as one step
    /// no stock write can split (G3); its answer is taken in later (`deliveries`). A
    /// long wait (a low rate, many runs sharing the limiter) is cut into slices of one
    /// flush interval, between which what was sent is recorded and the lease renewed,
    /// so a waiting run is not taken for a dead one.
    async fn send(&mut self, queue: &[Registration]) -> Result<Option<usize>, Stop> {
        let engine = self.engine;
        loop {
            if engine.shutdown.is_cancelled() {
                return Err(Stop::ShuttingDown);
            }
            let want = self.may_start(queue.len());
            if want == 0 || !self.recorder.may_send() {
                // G10 and G8: never more than a second's worth unrecorded (on its way
                // counts), and nothing sent on a lease that could have run out.
                self.grant = None;
                if let Some(answered) = self.deliveries.next().await {
                    if !self.take_answer(answered).await? {
                        return Ok(None);
                    }
                } else {
                    self.recorder.wait_for_room().await?;
                }
                continue;
            }
            if self.grant.is_none() {
                self.grant = Some(ask_limiter(&engine.limiter, want));
            }
            let slice_end = Instant::now() + engine.settings.recorder.flush_interval;
            let on_the_way = !self.deliveries.is_empty();
            tokio::select! {
                biased;
                _ = engine.shutdown.cancelled() => return Err(Stop::ShuttingDown),
                // Answers first: taking one in is quick, and what went through
                // reaches the recorder in send order, batch by batch.
                answered = self.deliveries.next(), if on_the_way => {
                    if let Some(answered) = answered
                        && !self.take_answer(answered).await?
                    {
                        return Ok(None);
                    }
                }
                (granted, at) = async { self.grant.as_mut().expect("asked above").await } => {
                    self.grant = None;
                    let granted = granted.map_err(Error::from)? as usize;
                    if !self.recorder.may_send() {
                        // The lease could have run out while the run waited: the slots
                        // go unused (a send less, never one on a lost lease).
                        continue;
                    }
                    let count = granted.min(want);
                    return Ok(self.start_granted(&queue[..count], at).await?.then_some(count));
                }
                _ = tokio::time::sleep_until(slice_end) => {
                    // Commits run on tasks of their own: this only notices or starts one.
                    self.recorder.keep_up().await?;
                }
            }
        }
    }

    /// Starts `chunk` on slots granted at `at`, after asking the limiter for the next
    /// ones (slots that fall due while no call waits are lost, G2). `false`: a delivery
    /// was refused, and the queue is to be read again from the cursor.
    async fn start_granted(&mut self, chunk: &[Registration], at: Instant) -> Result<bool, Stop> {
        let next = self.may_start(usize::MAX).saturating_sub(chunk.len());
        if next > 0 {
            self.grant = Some(ask_limiter(&self.engine.limiter, next));
        }
        self.start_delivery(chunk, at);
        // The request is made now, not when the run next waits (a page read may come
        // first): the set makes it when polled.
        let ready = {
            let next = std::pin::pin!(self.deliveries.next());
            futures::poll!(next)
        };
        match ready {
            std::task::Poll::Ready(Some(answered)) => self.take_answer(answered).await,
            _ => Ok(true),
        }
    }

    /// Takes in an answer of the fence and commits what went through in batches as it
    /// comes (G5). `false` as for [`Self::fence_answered`].
    async fn take_answer(&mut self, answered: Answered) -> Result<bool, Stop> {
        if !self.fence_answered(answered).await? {
            return Ok(false);
        }
        self.recorder.poll().await?;
        Ok(true)
    }

    /// How many of `queued` the run may start now: what the recorder has room for, less
    /// what is on its way (G10), and what the wave has left.
    fn may_start(&self, queued: usize) -> usize {
        let room = self.recorder.room().saturating_sub(self.deliveries.len());
        let left = self
            .wave_left
            .map_or(usize::MAX, |left| usize::try_from(left).unwrap_or(0));
        queued.min(room).min(left)
    }

    /// `chunk` as a batch of this run, after the last notification it started and
    /// under its claim (G8).
    fn batch(&self, chunk: &[Registration], sent_at: DateTime<Utc>) -> SentBatch {
        SentBatch::new(
            self.run,
            self.deliveries.last_started().or(self.cursor),
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

    /// Sends a chunk to the fence, stamped with its grant.
    fn start_delivery(&mut self, chunk: &[Registration], granted_at: Instant) {
        // Stamped with the instant the limiter handed the slots out, which is what it
        // counts (G2): a window of `sent_at` then holds what a window of grants holds,
        // however long this task took to wake on the grant.
        let sent_at = self
            .engine
            .clock
            .at(granted_at)
            .trunc_subsecs(SENT_AT_DIGITS);
        let batch = self.batch(chunk, sent_at);
        let fence = self.engine.stock_fence.clone();
        self.deliveries.start(fence, batch, chunk.to_vec(), sent_at);
        if let Some(left) = &mut self.wave_left {
            *left -= chunk.len() as i64;
        }
    }

    /// A chunk the fence let through: counted, handed to the recorder, and the cursor
    /// moved past it.
    fn delivered(&mut self, chunk: &[Registration], sent_at: DateTime<Utc>) {
        self.engine
            .metrics
            .notifications_sent
            .increment(chunk.len() as u64);
        self.recorder.delivered(chunk, sent_at);
        self.cursor = chunk.last().map(|r| r.position).or(self.cursor);
    }

    /// Takes in the fence's answer to the oldest delivery on its way. `false`: it was
    /// refused for a reason the run fixed, and the run sends again from its cursor.
    async fn fence_answered(&mut self, answered: Answered) -> Result<bool, Stop> {
        if let Ok(Delivery::Through(())) = answered.outcome {
            self.refused_in_a_row = 0;
            self.delivered(&answered.chunk, answered.sent_at);
            return Ok(true);
        }
        let refused = self.drain(Some(answered)).await;
        if let Some(Ok(Delivery::ClaimUnknown | Delivery::NotCached | Delivery::OutOfOrder)) =
            refused
        {
            self.refused_in_a_row += 1;
            if self.refused_in_a_row >= DELIVERY_ATTEMPTS {
                return Err(Stop::Failed(stock_keeps_disappearing()));
            }
        }
        match refused {
            Some(Err(error)) => return Err(Stop::Failed(error.into())),
            Some(Ok(Delivery::SoldOut)) => return Err(Stop::SoldOut),
            Some(Ok(Delivery::Superseded)) => return Err(Stop::Lost),
            // A lost chain, or one the shared side holds at another point (a failover
            // to a replica behind it): proved against the database and started again
            // from the cursor, with nothing on its way any more.
            Some(Ok(Delivery::ClaimUnknown | Delivery::OutOfOrder)) => {
                reclaim(self.engine, self.run, &self.claim, self.cursor).await?;
            }
            Some(Ok(Delivery::NotCached)) => {
                self.engine.cache_stock(self.run.product_id, None).await?;
            }
            Some(Ok(Delivery::Through(()))) | None => {}
        }
        Ok(false)
    }

    /// Takes in every answer still to come, after `first` if given. What went through
    /// is handed to the recorder, with any batch whose answer was lost (an error) but
    /// which a later one proves delivered (the fence lets a batch through only after
    /// the one before it); the rest goes back to the wave. Returns the first answer
    /// that was not "through", if any.
    async fn drain(&mut self, first: Option<Answered>) -> Option<Result<Delivery, BackendError>> {
        let mut refused = None;
        let mut unproven: Vec<(Vec<Registration>, DateTime<Utc>)> = Vec::new();
        let mut answers = first;
        loop {
            let Some(Answered {
                chunk,
                sent_at,
                outcome,
            }) = answers.take()
            else {
                match self.deliveries.next().await {
                    Some(next) => {
                        answers = Some(next);
                        continue;
                    }
                    None => break,
                }
            };
            match outcome {
                Ok(Delivery::Through(())) => {
                    for (proven, at) in std::mem::take(&mut unproven) {
                        self.delivered(&proven, at);
                    }
                    self.delivered(&chunk, sent_at);
                }
                Err(error) => {
                    refused.get_or_insert(Err(error));
                    unproven.push((chunk, sent_at));
                }
                Ok(outcome) => {
                    refused.get_or_insert(Ok(outcome));
                    self.unsent(chunk.len());
                }
            }
        }
        for (lost, _) in unproven {
            self.unsent(lost.len());
        }
        refused
    }

    /// Takes every answer still to come; `false` if a batch was refused and the queue
    /// is to be read again from the cursor.
    async fn settle_deliveries(&mut self) -> Result<bool, Stop> {
        while let Some(answered) = self.deliveries.next().await {
            if !self.fence_answered(answered).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Notifications started and not delivered go back to the wave's quota.
    fn unsent(&mut self, count: usize) {
        if let Some(left) = &mut self.wave_left {
            *left += count as i64;
        }
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
            Fenced::ClaimUnknown => reclaim(engine, run, claim, None).await?,
            Fenced::NotCached => engine.cache_stock(run.product_id, None).await?,
            Fenced::OutOfOrder => {}
        }
    }
    Err(Stop::Failed(stock_keeps_disappearing()))
}

fn stock_keeps_disappearing() -> Error {
    Error::Backend(crate::domain::BackendError::new(
        crate::domain::Component::StockCache,
        true,
        anyhow::anyhow!(
            "the fence keeps refusing the run: its stock figure or claim keeps disappearing \
             from the cache"
        ),
    ))
}

/// The shared side lost the run's newest claim (a flush, a failover, its key expired):
/// this task registers its claim again, but only once the database shows it still
/// holds the run; otherwise it no longer owns it (G8). Its deliveries follow `after`,
/// the last one that went through.
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
    if !engine
        .stock_fence
        .claim(run, claim.token, after)
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
