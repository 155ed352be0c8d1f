//! A run's delivery to a webhook endpoint (G12): requests started in order through
//! the limiter and the stock fence, their answers taken in, and the acknowledged prefix
//! published and handed to the recorder. How the guarantees hold is told in
//! `engine::webhook`.

use std::sync::Arc;
use std::time::Duration;

use chrono::SubsecRound as _;
use tokio::time::Instant;

use super::grant::ask_limiter;
use super::{RunState, SENT_AT_DIGITS, Stop, reclaim, through_fence};
use crate::domain::{Error, Registration};
use crate::engine::Engine;
use crate::engine::bus::RunKey;
use crate::engine::stock::Delivery;
use crate::engine::webhook::pipeline::{Event, Pipeline};
use crate::store::RunClaim;

/// Delivery to a webhook endpoint (G12): see `webhook` for how the guarantees hold.
impl RunState<'_> {
    /// Where the next page of registrations starts: after the last notification
    /// started, acknowledged or not.
    pub(super) fn read_cursor(&self) -> Option<i64> {
        self.pipeline
            .as_ref()
            .and_then(Pipeline::last_started)
            .max(self.deliveries.last_started())
            .max(self.cursor)
    }

    /// Waits until every request started was acknowledged (retrying as needed) and
    /// handed to the recorder. Nothing to do without a webhook.
    pub(super) async fn settle_pipeline(&mut self) -> Result<(), Stop> {
        if self.pipeline.as_ref().is_some_and(|p| !p.is_empty()) {
            self.send_to_webhook(&[]).await?;
        }
        Ok(())
    }

    /// Starts requests for the next few of `queue` (as many as the limiter grants at
    /// once, retries first) and returns how many of `queue` it started. Meanwhile it
    /// takes in the answers: the acknowledged prefix goes to the bus and the recorder,
    /// failed requests wait for their retry, and a failure for good stops the run. With
    /// an empty `queue`, returns 0 once every request started was acknowledged.
    pub(super) async fn send_to_webhook(&mut self, queue: &[Registration]) -> Result<usize, Stop> {
        let engine = self.engine;
        let limiter = engine.limiter.clone();
        let bound = engine.settings.recorder.unrecorded_bound;
        loop {
            if engine.shutdown.is_cancelled() {
                return Err(Stop::ShuttingDown);
            }
            self.recorder.poll().await?;
            let pipeline = self
                .pipeline
                .as_mut()
                .expect("a webhook run has a pipeline");
            if let Some(failure) = pipeline.failure() {
                return Err(Stop::Undelivered(failure.clone()));
            }
            if queue.is_empty() && pipeline.is_empty() {
                return Ok(0);
            }
            if self.pass_ahead.as_ref().is_some_and(PassAhead::stale) {
                // Held unused, it would hold up a stock write to 0 (G3).
                self.pass_ahead = None;
            }
            if !self.recorder.may_send() || (pipeline.is_empty() && self.recorder.room() == 0) {
                // G10 and G8, as for sends without a webhook: a lease that cannot be
                // renewed in time stops the run even with requests waiting for a retry.
                self.recorder.wait_for_room().await?;
                continue;
            }
            let pipeline = self
                .pipeline
                .as_mut()
                .expect("a webhook run has a pipeline");
            let now = Instant::now();
            let paused = self.paused_until.is_some_and(|until| until > now);
            // G10: requests on the wire or waiting count with the unrecorded ones.
            let room = bound.saturating_sub(self.recorder.unrecorded() + pipeline.len());
            let mut fresh = queue.len().min(room);
            if let Some(left) = self.wave_left {
                fresh = fresh.min(usize::try_from(left).unwrap_or(usize::MAX));
            }
            let want = fresh + pipeline.due_retries(now);
            if self.grant.is_none() && want > 0 && !paused && self.recorder.may_send() {
                self.grant = Some(ask_limiter(&limiter, want));
            }
            let mut wake = now + engine.settings.recorder.flush_interval;
            if let Some(at) = pipeline.next_retry_at() {
                wake = wake.min(at.max(now));
            }
            if let Some(until) = self.paused_until.filter(|_| paused) {
                wake = wake.min(until);
            }
            let running = pipeline.running() > 0;
            // A grant first: its slots are to be used now (G2), answers can wait.
            tokio::select! {
                biased;
                _ = engine.shutdown.cancelled() => return Err(Stop::ShuttingDown),
                (granted, granted_at) = async { self.grant.as_mut().expect("checked").await }, if self.grant.is_some() => {
                    self.grant = None;
                    let granted = granted.map_err(Error::from)?;
                    // The next slots are asked for at once, before this grant's work:
                    // slots that fall due while no call waits are lost to the run (the
                    // limiter never saves them up, G2).
                    if want > granted as usize && !paused {
                        self.grant = Some(ask_limiter(&limiter, want - granted as usize));
                    }
                    let started = self
                        .start_requests(queue, granted as usize, granted_at)
                        .await?;
                    if started > 0 {
                        return Ok(started);
                    }
                }
                answered = pipeline.next_answer(), if running => {
                    match answered {
                        Some(answered) => self.answered(answered).await?,
                        None => return Err(Stop::Failed(webhook_task_failed())),
                    }
                }
                () = tokio::time::sleep_until(wake) => self.recorder.keep_up().await?,
            }
        }
    }

    /// Spends `slots` of the limiter: due retries first, then the next of `queue`, all
    /// under one pass through the stock fence. Returns how many of `queue` it started.
    async fn start_requests(
        &mut self,
        queue: &[Registration],
        slots: usize,
        granted_at: Instant,
    ) -> Result<usize, Stop> {
        if !self.recorder.may_send() {
            // The lease could have run out while the run waited: the slots go unused.
            return Ok(0);
        }
        let engine = self.engine;
        let webhook = engine.webhook.clone().expect("a webhook run has a client");
        let settings = webhook.settings();
        if granted_at.elapsed() > settings.grant_tolerance {
            // G2: slots that waited for the run could crowd a later second at the
            // endpoint; they go unused.
            return Ok(0);
        }
        let ahead = match self.pass_ahead.take() {
            Some(ahead) if !ahead.stale() => ahead,
            _ => ask_pass(engine, self.run, self.claim, settings.admission_ttl),
        };
        let asked = ahead.asked;
        let (pass, left) = ahead.ready().await?;
        // The next grant's pass is on its way while this grant's requests start.
        self.pass_ahead = Some(ask_pass(
            engine,
            self.run,
            self.claim,
            settings.admission_ttl,
        ));
        if granted_at.elapsed() > settings.grant_tolerance {
            // The pass came too late for these slots (G2): both go unused.
            return Ok(0);
        }
        if !left.is_zero() {
            // The pass is dropped unused, and the slots go unused.
            self.paused_until = Some(Instant::now() + left);
            return Ok(0);
        }

        let pass = Arc::new(pass);
        let send_by = asked + settings.send_deadline;
        let pipeline = self
            .pipeline
            .as_mut()
            .expect("a webhook run has a pipeline");
        let retried = pipeline.start_retries(slots, &pass, send_by);
        let room = engine
            .settings
            .recorder
            .unrecorded_bound
            .saturating_sub(self.recorder.unrecorded() + pipeline.len());
        let mut fresh = (slots - retried).min(queue.len()).min(room);
        if let Some(left) = self.wave_left {
            fresh = fresh.min(usize::try_from(left).unwrap_or(usize::MAX));
        }
        if fresh > 0 {
            // Microseconds, as without a webhook; one stamp per group, the same for
            // every attempt of its notifications.
            let sent_at = engine.clock.now().trunc_subsecs(SENT_AT_DIGITS);
            pipeline.start(&queue[..fresh], sent_at, &pass, send_by);
            if let Some(left) = &mut self.wave_left {
                *left -= fresh as i64;
            }
        }
        Ok(fresh)
    }

    /// Takes an attempt's answer in, with every other already there: a `Retry-After`
    /// pauses every instance, and a grown prefix is published and recorded (once for
    /// all of them).
    async fn answered(
        &mut self,
        answered: crate::engine::webhook::pipeline::Answered,
    ) -> Result<(), Stop> {
        let pipeline = self
            .pipeline
            .as_mut()
            .expect("a webhook run has a pipeline");
        let (mut acknowledged, mut pause) = (false, None::<Duration>);
        let mut next = Some(answered);
        while let Some(answered) = next {
            match pipeline.answered(answered) {
                Event::Acknowledged => acknowledged = true,
                Event::Retrying { pause: Some(asked) } => {
                    pause = Some(pause.map_or(asked, |held| held.max(asked)));
                }
                Event::Retrying { pause: None } | Event::Failed | Event::Ignored => {}
            }
            next = pipeline.ready_answer();
        }
        if let Some(pause) = pause {
            let until = Instant::now() + pause;
            self.paused_until = Some(self.paused_until.map_or(until, |held| held.max(until)));
            self.engine
                .endpoint_pause
                .pause(pause)
                .await
                .map_err(|e| Stop::Failed(e.into()))?;
        }
        if acknowledged {
            self.publish_acknowledged(false).await?;
        }
        Ok(())
    }

    /// Publishes the acknowledged prefix to the bus, under the claim (G8), and hands it
    /// to the recorder (G5). With `partial`, also the acknowledged beginning of a group
    /// that will not complete.
    async fn publish_acknowledged(&mut self, partial: bool) -> Result<(), Stop> {
        let pipeline = self
            .pipeline
            .as_mut()
            .expect("a webhook run has a pipeline");
        for acknowledged in pipeline.take_acknowledged(partial) {
            let chunk = acknowledged.registrations;
            let batch = self.batch(&chunk, acknowledged.sent_at);
            let mut published = self
                .engine
                .stock_fence
                .publish(&batch)
                .await
                .map_err(Error::from)?;
            if published == Delivery::ClaimUnknown {
                reclaim(self.engine, self.run, &self.claim, self.cursor).await?;
                published = self
                    .engine
                    .stock_fence
                    .publish(&batch)
                    .await
                    .map_err(Error::from)?;
            }
            match published {
                Delivery::Superseded | Delivery::ClaimUnknown => return Err(Stop::Lost),
                _ => {
                    self.engine
                        .metrics
                        .notifications_sent
                        .increment(chunk.len() as u64);
                    self.recorder.delivered(&chunk, acknowledged.sent_at);
                    self.cursor = chunk.last().map(|r| r.position).or(self.cursor);
                }
            }
        }
        Ok(())
    }

    /// The run stopped (`stop`): the requests on the wire are waited for (longer on
    /// shutdown) and the acknowledged prefix is recorded (G12). Only a run lost
    /// meanwhile changes the outcome; any other failure is logged, and a resume sends
    /// what was not recorded again under the same ids.
    pub(super) async fn wind_down_webhook(&mut self, stop: &Stop) -> Result<(), Stop> {
        let settings = self
            .engine
            .webhook
            .as_ref()
            .map(|webhook| webhook.settings());
        let wait = match (stop, settings) {
            (Stop::ShuttingDown, Some(settings)) => settings.shutdown_wait,
            (_, Some(settings)) => settings.timeout,
            (_, None) => Duration::ZERO,
        };
        match self.wind_down_requests(wait).await {
            Ok(()) => Ok(()),
            Err(lost @ (Stop::Lost | Stop::LeaseRunOut)) => Err(lost),
            Err(other) => {
                tracing::warn!(
                    error = other.last_error().unwrap_or_default(),
                    "cannot publish the last acknowledged notifications; a resume \
                     sends them again under the same ids"
                );
                Ok(())
            }
        }
    }

    /// The run is stopping: no request or retry starts any more; the answers to those
    /// on the wire are awaited (up to `wait`), and the acknowledged prefix is published
    /// and handed to the recorder. The rest is given up: a resume or the next owner
    /// sends it again, under the same ids.
    async fn wind_down_requests(&mut self, wait: Duration) -> Result<(), Stop> {
        let deadline = Instant::now() + wait;
        let pipeline = self
            .pipeline
            .as_mut()
            .expect("a webhook run has a pipeline");
        pipeline.stop_retries();
        while pipeline.running() > 0 {
            tokio::select! {
                answered = pipeline.next_answer() => match answered {
                    Some(answered) => {
                        pipeline.answered(answered);
                    }
                    None => break,
                },
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        pipeline.stop_retries();
        let published = self.publish_acknowledged(true).await;
        if let Some(pipeline) = &mut self.pipeline {
            pipeline.abandon();
        }
        published
    }
}

/// How long a pass asked for ahead of its grant may wait for it. At a steady rate the
/// next grant comes within milliseconds; a pass older than this is dropped (it holds
/// up a stock write to 0 while held) and the grant asks for a fresh one.
const PASS_AHEAD_FRESH: Duration = Duration::from_millis(100);

/// A pass through the stock fence, and how long the endpoint still asks every request
/// to wait (`Retry-After`, from whichever instance heard it), asked for on a task of
/// its own before the grant that will use them.
///
/// Why ahead (G2): the requests of a grant must start when its slots are due. Asked
/// for after the grant, the pass put a round trip to Redis between the two, and
/// round trips vary: requests of one grant came late and crowded those of the next,
/// and an endpoint saw more than the rate in a second. Asked for ahead, a pass waits
/// at most [`PASS_AHEAD_FRESH`] for its grant, and a stock write to 0 waits at most
/// that much longer for it (G3 holds: the requests it lets start start before the
/// write returns).
///
/// Dropping one never cancels its task: a pass being registered in Redis is released
/// as soon as it is there, rather than left to expire.
pub(super) struct PassAhead {
    asked: Instant,
    ready: tokio::task::JoinHandle<Result<(crate::engine::stock::Admission, Duration), Stop>>,
}

impl PassAhead {
    /// Held, and too old to use: drop it. One still on its way is not stale yet.
    fn stale(&self) -> bool {
        self.ready.is_finished() && self.asked.elapsed() > PASS_AHEAD_FRESH
    }

    async fn ready(self) -> Result<(crate::engine::stock::Admission, Duration), Stop> {
        match self.ready.await {
            Ok(ready) => ready,
            Err(_) => Err(Stop::Failed(webhook_task_failed())),
        }
    }
}

fn ask_pass(engine: &Arc<Engine>, run: RunKey, claim: RunClaim, ttl: Duration) -> PassAhead {
    let engine = engine.clone();
    let asked = Instant::now();
    let ready = tokio::spawn(async move {
        let (pass, left) = tokio::join!(
            admit(&engine, run, claim, ttl),
            engine.endpoint_pause.left()
        );
        Ok((pass?, left.map_err(Error::from)?))
    });
    PassAhead { asked, ready }
}

/// A pass through the stock fence for webhook requests of `run` (G3, G8).
async fn admit(
    engine: &Engine,
    run: RunKey,
    claim: RunClaim,
    ttl: Duration,
) -> Result<crate::engine::stock::Admission, Stop> {
    through_fence(engine, run, &claim, || {
        engine.stock_fence.admit(run, claim.token, ttl)
    })
    .await
}

fn webhook_task_failed() -> Error {
    Error::Backend(crate::domain::BackendError::new(
        crate::domain::Component::Webhook,
        false,
        anyhow::anyhow!("a webhook attempt's task failed"),
    ))
}
