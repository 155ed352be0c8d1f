//! The stream: each batch goes through the stock fence onto the bus, as one step no
//! stock write can split (G3), and from there to every subscriber of every instance
//! (G11). A batch counts as sent once the fence let it through.

mod deliveries;

use async_trait::async_trait;
use chrono::SubsecRound as _;
use tokio::time::Instant;

use super::grant::{Grant, ask_limiter, granted};
use super::{Channel, DELIVERY_ATTEMPTS, Outbox, RunCore, SENT_AT_DIGITS, Stop};
use crate::domain::{BackendError, ProductId, Registration};
use crate::engine::bus::RunKey;
use crate::engine::stock::Delivery;
use deliveries::{Answered, Deliveries};

/// Delivery to the bus only: what subscribers stream is what was sent.
pub struct StreamChannel;

#[async_trait]
impl Channel for StreamChannel {
    fn outbox(&self, _run: RunKey) -> Box<dyn Outbox> {
        Box::new(StreamOutbox::default())
    }

    /// A stock write holds the fence against deliveries while it writes: once its
    /// figure is cached, every delivery that saw the old one is on the bus.
    async fn drain_passes(&self, _product: ProductId) -> Result<(), BackendError> {
        Ok(())
    }
}

#[derive(Default)]
struct StreamOutbox {
    /// The run's call to the limiter, kept waiting from one batch to the next so that
    /// no slot falls due while the run is not asking (G2).
    grant: Option<Grant>,
    /// Batches on their way through the stock fence, in send order. The run's cursor
    /// is the last one the fence let through.
    deliveries: Deliveries,
    /// Times in a row the fence refused a batch the run could fix (a figure missing
    /// from the cache, a lost claim, a batch that overtook a refused one).
    refused_in_a_row: usize,
}

#[async_trait]
impl Outbox for StreamOutbox {
    /// The call to the limiter stays in place while the run waits for anything else,
    /// and the next one is made as soon as a grant arrives, before its batch goes out:
    /// slots that fall due while no call waits are lost (G2). The batch goes through
    /// the stock fence; its answer is taken in later ([`deliveries`]). A long wait (a
    /// low rate, many runs sharing the limiter) is cut into slices of one flush
    /// interval, between which what was sent is recorded and the lease renewed, so a
    /// waiting run is not taken for a dead one.
    async fn send(
        &mut self,
        run: &mut RunCore<'_>,
        queue: &[Registration],
    ) -> Result<Option<usize>, Stop> {
        let engine = run.engine;
        loop {
            if engine.shutdown.is_cancelled() {
                return Err(Stop::ShuttingDown);
            }
            let want = self.may_start(run, queue.len());
            if want == 0 || !run.recorder.may_send() {
                // G10 and G8: never more than a second's worth unrecorded (on its way
                // counts), and nothing sent on a lease that could have run out.
                self.grant = None;
                if let Some(answered) = self.deliveries.next().await {
                    if !self.take_answer(run, answered).await? {
                        return Ok(None);
                    }
                } else {
                    run.recorder.wait_for_room().await?;
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
                        && !self.take_answer(run, answered).await?
                    {
                        return Ok(None);
                    }
                }
                (slots, at) = granted(&mut self.grant) => {
                    self.grant = None;
                    let granted = slots? as usize;
                    if !run.recorder.may_send() {
                        // The lease could have run out while the run waited: the slots
                        // go unused (a send less, never one on a lost lease).
                        continue;
                    }
                    let count = granted.min(want);
                    let started = self.start_granted(run, &queue[..count], at).await?;
                    return Ok(started.then_some(count));
                }
                _ = tokio::time::sleep_until(slice_end) => {
                    // Commits run on tasks of their own: this only notices or starts one.
                    run.recorder.keep_up().await?;
                }
            }
        }
    }

    async fn settle(&mut self, run: &mut RunCore<'_>) -> Result<bool, Stop> {
        while let Some(answered) = self.deliveries.next().await {
            if !self.fence_answered(run, answered).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// What is still on its way to the bus is recorded if it got there.
    async fn wind_down(&mut self, run: &mut RunCore<'_>, _stop: &Stop) -> Result<(), Stop> {
        if run.recorder.gave_up() {
            // A failed commit gave up what was not recorded (a resume delivers it again
            // under the same ids): what follows it is not recorded either, or the
            // record would have a gap (G5).
            while self.deliveries.next().await.is_some() {}
        } else {
            self.drain(run, None).await;
        }
        Ok(())
    }

    fn last_started(&self) -> Option<i64> {
        self.deliveries.last_started()
    }

    fn leave_out_started(&self, page: &mut Vec<Registration>) {
        if !self.deliveries.is_empty() {
            page.retain(|r| !self.deliveries.contains(r.user_id));
        }
    }

    fn is_empty(&self) -> bool {
        self.deliveries.is_empty()
    }
}

impl StreamOutbox {
    /// How many of `queued` the run may start now: what the recorder has room for, less
    /// what is on its way (G10), and what the wave has left.
    fn may_start(&self, run: &RunCore<'_>, queued: usize) -> usize {
        let room = run.recorder.room().saturating_sub(self.deliveries.len());
        queued.min(room).min(run.wave_room())
    }

    /// Starts `chunk` on slots granted at `at`, after asking the limiter for the next
    /// ones (slots that fall due while no call waits are lost, G2). `false`: a delivery
    /// was refused, and the queue is to be read again from the cursor.
    async fn start_granted(
        &mut self,
        run: &mut RunCore<'_>,
        chunk: &[Registration],
        at: Instant,
    ) -> Result<bool, Stop> {
        let next = self.may_start(run, usize::MAX).saturating_sub(chunk.len());
        if next > 0 {
            self.grant = Some(ask_limiter(&run.engine.limiter, next));
        }
        self.start_delivery(run, chunk, at);
        // The request is made now, not when the run next waits (a page read may come
        // first): the set makes it when polled.
        let ready = {
            let next = std::pin::pin!(self.deliveries.next());
            futures::poll!(next)
        };
        match ready {
            std::task::Poll::Ready(Some(answered)) => self.take_answer(run, answered).await,
            _ => Ok(true),
        }
    }

    /// Sends a chunk to the fence, stamped with its grant.
    fn start_delivery(&mut self, run: &mut RunCore<'_>, chunk: &[Registration], at: Instant) {
        // Stamped with the instant the limiter handed the slots out, which is what it
        // counts (G2): a window of `sent_at` then holds what a window of grants holds,
        // however long this task took to wake on the grant.
        let sent_at = run.engine.clock.at(at).trunc_subsecs(SENT_AT_DIGITS);
        let after = self.deliveries.last_started().or(run.cursor);
        let batch = run.batch(chunk, after, sent_at);
        let fence = run.engine.stock_fence.clone();
        self.deliveries.start(fence, batch, chunk.to_vec(), sent_at);
        run.started(chunk.len());
    }

    /// Takes in an answer of the fence and commits what went through in batches as it
    /// comes (G5). `false` as for [`Self::fence_answered`].
    async fn take_answer(
        &mut self,
        run: &mut RunCore<'_>,
        answered: Answered,
    ) -> Result<bool, Stop> {
        if !self.fence_answered(run, answered).await? {
            return Ok(false);
        }
        run.recorder.poll().await?;
        Ok(true)
    }

    /// Takes in the fence's answer to the oldest delivery on its way. `false`: it was
    /// refused for a reason the run fixed, and the run sends again from its cursor.
    async fn fence_answered(
        &mut self,
        run: &mut RunCore<'_>,
        answered: Answered,
    ) -> Result<bool, Stop> {
        if let Ok(Delivery::Through(())) = answered.outcome {
            self.refused_in_a_row = 0;
            run.delivered(&answered.chunk, answered.sent_at);
            return Ok(true);
        }
        let refused = self.drain(run, Some(answered)).await;
        if let Some(Ok(Delivery::ClaimUnknown | Delivery::NotCached | Delivery::OutOfOrder)) =
            refused
        {
            self.refused_in_a_row += 1;
            if self.refused_in_a_row >= DELIVERY_ATTEMPTS {
                return Err(Stop::Failed(super::stock_keeps_disappearing()));
            }
        }
        match refused {
            Some(Err(error)) => return Err(error.into()),
            Some(Ok(Delivery::SoldOut)) => return Err(Stop::SoldOut),
            Some(Ok(Delivery::Superseded)) => return Err(Stop::Lost),
            // A lost chain, or one the shared side holds at another point (a failover
            // to a replica behind it): proved against the database and started again
            // from the cursor, with nothing on its way any more.
            Some(Ok(Delivery::ClaimUnknown | Delivery::OutOfOrder)) => {
                run.reclaim(run.cursor).await?;
            }
            Some(Ok(Delivery::NotCached)) => {
                run.engine.cache_stock(run.product(), None).await?;
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
    async fn drain(
        &mut self,
        run: &mut RunCore<'_>,
        first: Option<Answered>,
    ) -> Option<Result<Delivery, BackendError>> {
        let mut refused = None;
        let mut unproven: Vec<(Vec<Registration>, chrono::DateTime<chrono::Utc>)> = Vec::new();
        let mut next = first;
        loop {
            let answered = match next.take() {
                Some(answered) => answered,
                None => match self.deliveries.next().await {
                    Some(answered) => answered,
                    None => break,
                },
            };
            let Answered {
                chunk,
                sent_at,
                outcome,
            } = answered;
            match outcome {
                Ok(Delivery::Through(())) => {
                    for (proven, at) in std::mem::take(&mut unproven) {
                        run.delivered(&proven, at);
                    }
                    run.delivered(&chunk, sent_at);
                }
                Err(error) => {
                    refused.get_or_insert(Err(error));
                    unproven.push((chunk, sent_at));
                }
                Ok(outcome) => {
                    refused.get_or_insert(Ok(outcome));
                    run.unsent(chunk.len());
                }
            }
        }
        for (lost, _) in unproven {
            run.unsent(lost.len());
        }
        refused
    }
}
