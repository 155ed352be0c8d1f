//! Driving one run: keyset pages of registrations in queue order (G1), handed to the
//! run's outbox (`engine::delivery`: the stream or a webhook), which paces them by the
//! limiter (G2) through the stock fence (G3) to the recorder (G5, G10), until the queue
//! is done, the product sells out, or the run stops.

use std::sync::Arc;

use tokio::time::Instant;
use tracing::Instrument as _;

use super::Engine;
use super::bus::{BusEvent, RunKey};
use super::delivery::{Outbox, RunCore, Stop};
use super::recorder::{RecordError, Recorder};
use crate::domain::{Product, Registration, RunStatus, WaveState};
use crate::store::{After, ClaimedRun, FinalStatus};

/// Drives a claimed run until it reaches a final state, is handed over, or is lost:
/// start, send, wind down what is on its way, then record the outcome.
pub(super) async fn drive(engine: Arc<Engine>, claimed: ClaimedRun) {
    // A trace of its own per claim, linked to the call that triggered the run: the run
    // outlives that call, and another instance may continue it.
    let span = tracing::info_span!(
        parent: None,
        "run",
        product = %claimed.claim.product_id,
        round = claimed.claim.restock_round,
        claim = claimed.claim.token,
    );
    if let Some(trigger) = &claimed.run.trace_parent {
        crate::telemetry::link(&span, trigger);
    }
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
                    "delivery failed; resume the run with ManualRestock"
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
    core: RunCore<'a>,
    /// Where the run's notifications go (G12 with a webhook): it decides when each
    /// counts as sent and hands it to the recorder.
    outbox: Box<dyn Outbox>,
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
        let run = RunKey {
            product_id: claim.product_id,
            restock_round: claim.restock_round,
        };
        let recorder = Recorder::new(
            engine.store.clone(),
            claim,
            engine.settings.recorder.clone(),
            engine.settings.lease.clone(),
            claimed.claimed_at,
            engine.metrics.clone(),
        );
        RunState {
            core: RunCore {
                engine,
                run,
                claim,
                recorder,
                cursor: claimed.cursor,
                wave_left: None,
                attributes: claimed.run.attributes.clone(),
            },
            outbox: engine.channel.outbox(run),
        }
    }
}

impl RunState<'_> {
    /// Registers the claim with the fence, starts or continues the wave, and sends.
    async fn start(&mut self, wave: Option<WaveState>, sent_count: i64) -> Result<Done, Stop> {
        let core = &self.core;
        // G8: from here on, a delivery of an older claim of this run that is still on
        // its way does nothing.
        if !core
            .engine
            .stock_fence
            .claim(core.run, core.claim.token, core.cursor)
            .await?
        {
            return Err(Stop::Lost);
        }
        if let Some(wave) = wave {
            self.begin_wave(wave, sent_count).await?;
        }
        self.notify_all().await
    }

    /// The run stopped sending: the outbox takes in what is still on its way, and what
    /// went through is recorded with the outcome.
    async fn wind_down(&mut self, notified: Result<Done, Stop>) -> Result<Done, Stop> {
        match notified {
            Err(
                stop
                @ (Stop::SoldOut | Stop::ShuttingDown | Stop::Failed(_) | Stop::Undelivered(_)),
            ) => {
                self.outbox.wind_down(&mut self.core, &stop).await?;
                Err(stop)
            }
            other => other,
        }
    }

    /// Records the outcome, counts and logs it, and tells subscribers the run ended.
    async fn finish(&mut self, after: After, last_error: Option<String>, started: Instant) {
        let core = &mut self.core;
        let engine = core.engine;
        let written = match core.recorder.close(after, last_error).await {
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
            run: core.run,
            status,
            last_position: core.cursor,
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
    /// Starts the run's next wave, or continues the current one if it was under way
    /// (the run was taken over, released on shutdown or resumed mid-wave). A wave starts
    /// by reading the stock: below the threshold ends the run sold out (G3); otherwise the wave may notify
    /// `per_unit` x the stock, recorded with the run so that whoever drives it next knows.
    async fn begin_wave(&mut self, state: WaveState, sent_count: i64) -> Result<(), Stop> {
        let core = &mut self.core;
        if let Some(left) = state.left_in_wave(sent_count) {
            tracing::info!(left, "continuing the current wave");
            core.wave_left = Some(left);
            return Ok(());
        }
        let product = core.engine.store.product(core.product()).await?;
        let stock = product.as_ref().map_or(0, |p| p.stock);
        let quota = state.wave.quota(stock);
        if quota <= 0 || !product.as_ref().is_some_and(Product::in_stock) {
            tracing::info!(stock, "sold out at the start of a wave");
            return Err(Stop::SoldOut);
        }
        core.recorder.start_wave(quota, sent_count).await?;
        tracing::info!(stock, quota, "wave started");
        core.wave_left = Some(quota);
        Ok(())
    }

    /// Hands the queue to the outbox a page at a time until it is done, or the wave's
    /// quota is.
    async fn notify_all(&mut self) -> Result<Done, Stop> {
        loop {
            let Some(page) = self.next_page().await? else {
                continue;
            };
            if page.is_empty() || self.core.wave_left == Some(0) {
                // The queue is done, or users remain (this page) for the next wave.
                if !self.outbox.settle(&mut self.core).await? {
                    continue;
                }
                return Ok(if page.is_empty() {
                    Done::Queue
                } else {
                    Done::Wave
                });
            }
            let mut rest = &page[..];
            while !rest.is_empty() && self.core.wave_left != Some(0) {
                // None: deliveries were refused, and the queue is read again from the
                // last one that went through.
                let Some(sent) = self.outbox.send(&mut self.core, rest).await? else {
                    break;
                };
                rest = &rest[sent..];
                self.core.recorder.poll().await?;
            }
        }
    }

    /// The next page of the queue, after the last notification started. It leaves out
    /// users already notified in this round: the query skips recorded ones, and the
    /// filter below those started but not yet recorded (a user who cancelled and
    /// registered again after being notified is behind the cursor once more). `None`
    /// if only those were left: they are recorded, and the page is to be read again.
    async fn next_page(&mut self) -> Result<Option<Vec<Registration>>, Stop> {
        let core = &mut self.core;
        let engine = core.engine;
        let after = self.outbox.last_started().max(core.cursor);
        let mut page = engine
            .store
            .next_registrations(&core.claim, after, engine.settings.page_size)
            .await?;
        if page.is_empty() || (!core.recorder.has_unrecorded() && self.outbox.is_empty()) {
            return Ok(Some(page));
        }
        self.outbox.leave_out_started(&mut page);
        page.retain(|r| !core.recorder.is_unrecorded(r.user_id));
        if !page.is_empty() {
            return Ok(Some(page));
        }
        // The query skips them once they are recorded.
        self.outbox.settle(core).await?;
        core.recorder.flush().await?;
        Ok(None)
    }
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
