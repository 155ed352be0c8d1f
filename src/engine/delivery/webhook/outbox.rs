//! A run's delivery to a webhook endpoint (G12): requests started in order through
//! the limiter and the stock fence, their answers taken in, and the acknowledged prefix
//! published and handed to the recorder. How the guarantees hold is told in the parent
//! module.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::SubsecRound as _;
use tokio::time::Instant;

use super::pipeline::{Event, Group, Pipeline};
use super::{WebhookChannel, WebhookSettings};
use crate::domain::{Error, Registration};
use crate::engine::bus::RunKey;
use crate::engine::delivery::grant::{Grant, ask_limiter, granted};
use crate::engine::delivery::{Outbox, RunCore, SENT_AT_DIGITS, Stop, leave_out, through_fence};
use crate::engine::stock::{Admission, Delivery};

/// One run's requests to the endpoint.
pub(super) struct WebhookOutbox {
    channel: WebhookChannel,
    /// The requests started and not yet published (G12). The run's cursor is the last
    /// *acknowledged and published* notification.
    pipeline: Pipeline,
    /// No request starts before this: the endpoint asked for a pause (`Retry-After`).
    paused_until: Option<Instant>,
    /// The run's call to the limiter, kept waiting from one grant to the next.
    grant: Option<Grant>,
    /// The next pass through the stock fence, asked for before the grant that will use
    /// it, so that the grant's requests start at once.
    pass_ahead: Option<PassAhead>,
}

impl WebhookOutbox {
    pub(super) fn new(channel: WebhookChannel, run: RunKey) -> Self {
        WebhookOutbox {
            pipeline: Pipeline::new(channel.client.clone(), run.product_id, run.restock_round),
            channel,
            paused_until: None,
            grant: None,
            pass_ahead: None,
        }
    }

    fn settings(&self) -> &WebhookSettings {
        self.channel.client.settings()
    }
}

#[async_trait]
impl Outbox for WebhookOutbox {
    async fn send(
        &mut self,
        run: &mut RunCore<'_>,
        queue: &[Registration],
    ) -> Result<Option<usize>, Stop> {
        self.send_to_webhook(run, queue).await.map(Some)
    }

    /// Waits until every request started was acknowledged (retrying as needed) and
    /// handed to the recorder.
    async fn settle(&mut self, run: &mut RunCore<'_>) -> Result<bool, Stop> {
        if !self.pipeline.is_empty() {
            self.send_to_webhook(run, &[]).await?;
        }
        Ok(true)
    }

    /// The requests on the wire are waited for (longer on shutdown) and the
    /// acknowledged prefix is recorded (G12). Only a run lost meanwhile changes the
    /// outcome; any other failure is logged, and a resume sends what was not recorded
    /// again under the same ids.
    async fn wind_down(&mut self, run: &mut RunCore<'_>, stop: &Stop) -> Result<(), Stop> {
        let wait = match stop {
            Stop::ShuttingDown => self.settings().shutdown_wait,
            _ => self.settings().timeout,
        };
        match self.wind_down_requests(run, wait).await {
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

    fn last_started(&self) -> Option<i64> {
        self.pipeline.last_started()
    }

    /// Requests on the wire or waiting for a retry are not recorded yet either.
    fn leave_out_started(&self, page: &mut Vec<Registration>) {
        leave_out(page, &self.pipeline.users().collect());
    }

    fn is_empty(&self) -> bool {
        self.pipeline.is_empty()
    }
}

impl WebhookOutbox {
    /// Starts requests for the next few of `queue` (as many as the limiter grants at
    /// once, retries first) and returns how many of `queue` it started. Meanwhile it
    /// takes in the answers: the acknowledged prefix goes to the bus and the recorder,
    /// failed requests wait for their retry, and a failure for good stops the run. With
    /// an empty `queue`, returns 0 once every request started was acknowledged.
    async fn send_to_webhook(
        &mut self,
        run: &mut RunCore<'_>,
        queue: &[Registration],
    ) -> Result<usize, Stop> {
        let engine = run.engine;
        loop {
            if engine.shutdown.is_cancelled() {
                return Err(Stop::ShuttingDown);
            }
            run.recorder.poll().await?;
            if let Some(failure) = self.pipeline.failure() {
                return Err(Stop::Undelivered(failure.to_string()));
            }
            if queue.is_empty() && self.pipeline.is_empty() {
                return Ok(0);
            }
            if self.pass_ahead.as_ref().is_some_and(PassAhead::stale) {
                // Held unused, it would hold up a stock write to 0 (G3).
                self.pass_ahead = None;
            }
            if !run.recorder.may_send() || (self.pipeline.is_empty() && run.recorder.room() == 0) {
                // G10 and G8, as for the stream: a lease that cannot be renewed in time
                // stops the run even with requests waiting for a retry.
                run.recorder.wait_for_room().await?;
                continue;
            }
            let now = Instant::now();
            let paused = self.paused_until.is_some_and(|until| until > now);
            let want = self.fresh_room(run, queue.len()) + self.pipeline.due_retries(now);
            if self.grant.is_none() && want > 0 && !paused {
                self.grant = Some(ask_limiter(&engine.limiter, want));
            }
            let wake = self.wake_at(run, now, paused);
            let running = self.pipeline.running() > 0;
            // A grant first: its slots are to be used now (G2), answers can wait.
            tokio::select! {
                biased;
                _ = engine.shutdown.cancelled() => return Err(Stop::ShuttingDown),
                (granted, granted_at) = granted(&mut self.grant) => {
                    self.grant = None;
                    let granted = granted? as usize;
                    // The next slots are asked for at once, before this grant's work:
                    // slots that fall due while no call waits are lost to the run (the
                    // limiter never saves them up, G2).
                    if want > granted && !paused {
                        self.grant = Some(ask_limiter(&engine.limiter, want - granted));
                    }
                    let started = self.start_requests(run, queue, granted, granted_at).await?;
                    if started > 0 {
                        return Ok(started);
                    }
                }
                answered = self.pipeline.next_answer(), if running => match answered {
                    Some(answered) => self.answered(run, answered).await?,
                    None => return Err(Stop::Failed(webhook_task_failed())),
                },
                () = tokio::time::sleep_until(wake) => run.recorder.keep_up().await?,
            }
        }
    }

    /// How many new notifications of `queued` may start: requests on the wire or
    /// waiting count with the unrecorded ones (G10), and the wave's quota.
    fn fresh_room(&self, run: &RunCore<'_>, queued: usize) -> usize {
        let bound = run.engine.settings.recorder.unrecorded_bound;
        let room = bound.saturating_sub(run.recorder.unrecorded() + self.pipeline.len());
        queued.min(room).min(run.wave_room())
    }

    /// When the loop looks again without an answer or a grant: to record what was
    /// sent, for a retry that falls due, or at the end of a pause.
    fn wake_at(&self, run: &RunCore<'_>, now: Instant, paused: bool) -> Instant {
        let mut wake = now + run.engine.settings.recorder.flush_interval;
        if let Some(at) = self.pipeline.next_retry_at() {
            wake = wake.min(at.max(now));
        }
        if let Some(until) = self.paused_until.filter(|_| paused) {
            wake = wake.min(until);
        }
        wake
    }

    /// Spends `slots` of the limiter: due retries first, then the next of `queue`, all
    /// under one pass through the stock fence. Returns how many of `queue` it started.
    async fn start_requests(
        &mut self,
        run: &mut RunCore<'_>,
        queue: &[Registration],
        slots: usize,
        granted_at: Instant,
    ) -> Result<usize, Stop> {
        let channel = self.channel.clone();
        let settings = channel.client.settings();
        // G2: slots that waited for the run could crowd a later second at the
        // endpoint; they go unused, as do slots on a lease that could have run out.
        if !run.recorder.may_send() || granted_at.elapsed() > settings.grant_tolerance {
            return Ok(0);
        }
        let ahead = match self.pass_ahead.take() {
            Some(ahead) if !ahead.stale() => ahead,
            _ => self.ask_pass(run),
        };
        let asked = ahead.asked;
        let (pass, left) = ahead.ready().await?;
        // The next grant's pass is on its way while this grant's requests start.
        self.pass_ahead = Some(self.ask_pass(run));
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
        let retried = self.pipeline.start_retries(slots, &pass, send_by);
        let fresh = self.fresh_room(run, slots - retried).min(queue.len());
        if fresh > 0 {
            // Microseconds, as on the stream; one stamp per group, the same for every
            // attempt of its notifications.
            let sent_at = run.engine.clock.now().trunc_subsecs(SENT_AT_DIGITS);
            let group = Group {
                sent_at,
                attributes: &run.attributes,
            };
            self.pipeline.start(&queue[..fresh], group, &pass, send_by);
            run.started(fresh);
        }
        Ok(fresh)
    }

    /// Takes an attempt's answer in, with every other already there: a `Retry-After`
    /// pauses every instance, and a grown prefix is published and recorded (once for
    /// all of them).
    async fn answered(
        &mut self,
        run: &mut RunCore<'_>,
        answered: super::pipeline::Answered,
    ) -> Result<(), Stop> {
        let (mut acknowledged, mut pause) = (false, None::<Duration>);
        let mut next = Some(answered);
        while let Some(answered) = next {
            match self.pipeline.answered(answered) {
                Event::Acknowledged => acknowledged = true,
                Event::Retrying { pause: Some(asked) } => {
                    pause = Some(pause.map_or(asked, |held| held.max(asked)));
                }
                Event::Retrying { pause: None } | Event::Failed | Event::Ignored => {}
            }
            next = self.pipeline.ready_answer();
        }
        if let Some(pause) = pause {
            let until = Instant::now() + pause;
            self.paused_until = Some(self.paused_until.map_or(until, |held| held.max(until)));
            self.channel.pause.pause(pause).await?;
        }
        if acknowledged {
            self.publish_acknowledged(run, false).await?;
        }
        Ok(())
    }

    /// Publishes the acknowledged prefix to the bus, under the claim (G8), and hands it
    /// to the recorder (G5). With `partial`, also the acknowledged beginning of a group
    /// that will not complete.
    async fn publish_acknowledged(
        &mut self,
        run: &mut RunCore<'_>,
        partial: bool,
    ) -> Result<(), Stop> {
        for acknowledged in self.pipeline.take_acknowledged(partial) {
            let chunk = acknowledged.registrations;
            let batch = run.batch(&chunk, run.cursor, acknowledged.sent_at);
            let mut published = self.channel.fence.publish(&batch).await?;
            if published == Delivery::ClaimUnknown {
                run.reclaim(run.cursor).await?;
                published = self.channel.fence.publish(&batch).await?;
            }
            match published {
                Delivery::Superseded | Delivery::ClaimUnknown => return Err(Stop::Lost),
                _ => run.delivered(&chunk, acknowledged.sent_at),
            }
        }
        Ok(())
    }

    /// The run is stopping: no request or retry starts any more; the answers to those
    /// on the wire are awaited (up to `wait`), and the acknowledged prefix is published
    /// and handed to the recorder. The rest is given up: a resume or the next owner
    /// sends it again, under the same ids.
    async fn wind_down_requests(
        &mut self,
        run: &mut RunCore<'_>,
        wait: Duration,
    ) -> Result<(), Stop> {
        let deadline = Instant::now() + wait;
        self.pipeline.stop_retries();
        while self.pipeline.running() > 0 {
            tokio::select! {
                answered = self.pipeline.next_answer() => match answered {
                    Some(answered) => {
                        self.pipeline.answered(answered);
                    }
                    None => break,
                },
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        self.pipeline.stop_retries();
        let published = self.publish_acknowledged(run, true).await;
        self.pipeline.abandon();
        published
    }

    /// Asks for a pass through the stock fence for this run's requests (G3, G8), with
    /// how long the endpoint still asks every request to wait, on a task of its own.
    fn ask_pass(&self, run: &RunCore<'_>) -> PassAhead {
        let (engine, channel) = (run.engine.clone(), self.channel.clone());
        let (key, claim) = (run.run, run.claim);
        let ttl = channel.client.settings().admission_ttl;
        let asked = Instant::now();
        let ready = tokio::spawn(async move {
            let admit = through_fence(&engine, key, &claim, || {
                channel.fence.admit(key, claim.token, ttl)
            });
            let (pass, left) = tokio::join!(admit, channel.pause.left());
            Ok((pass?, left?))
        });
        PassAhead { asked, ready }
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
struct PassAhead {
    asked: Instant,
    ready: tokio::task::JoinHandle<Result<(Admission, Duration), Stop>>,
}

impl PassAhead {
    /// Held, and too old to use: drop it. One still on its way is not stale yet.
    fn stale(&self) -> bool {
        self.ready.is_finished() && self.asked.elapsed() > PASS_AHEAD_FRESH
    }

    async fn ready(self) -> Result<(Admission, Duration), Stop> {
        match self.ready.await {
            Ok(ready) => ready,
            Err(_) => Err(Stop::Failed(webhook_task_failed())),
        }
    }
}

fn webhook_task_failed() -> Error {
    Error::Backend(crate::domain::BackendError::new(
        crate::domain::Component::Webhook,
        false,
        anyhow::anyhow!("a webhook attempt's task failed"),
    ))
}
