//! `Subscribe`: live notifications matching a filter, from every instance (G11),
//! optionally preceded by the recorded ones after a given notification.
//!
//! The hand-over from the record to live notifications goes by queue position, never
//! by a waiting time. Each batch on the bus says which position its run sent just
//! before it (`prev_position`), and the stream remembers, per run, the last position it
//! has covered. A resumed stream that sees a batch whose predecessor it has not covered
//! has a gap: notifications sent before it subscribed but not yet recorded when it read
//! the record. It reads them from the record by position, waiting for as long as the
//! run takes to record them (a stalled commit), then goes on live. A run that ends
//! announces its last position, which closes the gap of a run that sent nothing more.
//! The same positions drop duplicates: what a new owner re-sends after taking a run
//! over (G8) and a stream has already delivered is not delivered again.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;

use super::Engine;
use super::bus::{BusEvent, RunKey, SentBatch};
use crate::domain::{Error, Notification, NotificationFilter, NotificationId, RunStatus};
use crate::monitoring::Metrics;
use crate::store::Recorded;

/// Recorded notifications read per query.
const REPLAY_PAGE: u32 = 500;

/// Runs a stream keeps a position for, at most (G9): far more than run at once, so
/// only runs that failed or were handed over and never finished are ever forgotten
/// this way.
const MAX_COVERED_RUNS: usize = 1_024;

/// Why a stream ended on the service's side.
#[derive(Debug)]
pub enum StreamEnd {
    /// The subscriber read too slowly and its buffer overflowed.
    Lagged {
        missed: u64,
        last_delivered: Option<NotificationId>,
    },
    /// This instance's feed from the shared bus may have lost notifications (its
    /// connection to Redis was lost, or it fell behind): nothing the subscriber did.
    FeedInterrupted {
        last_delivered: Option<NotificationId>,
    },
    /// The service is stopping.
    ShuttingDown {
        last_delivered: Option<NotificationId>,
    },
    /// Reading the record failed, or `resume_after` names nothing recorded.
    Failed(Error),
}

/// A notification on its way to a subscriber.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// Read from the record (a resumed stream catching up).
    Recorded(Notification),
    /// Item `index` of a live batch, which every stream it goes to shares (with the
    /// batch's encoded form, [`SentBatch::encoded`]).
    Live { batch: Arc<SentBatch>, index: usize },
}

impl Outgoing {
    pub fn id(&self) -> NotificationId {
        match self {
            Outgoing::Recorded(n) => n.id,
            Outgoing::Live { batch, index } => NotificationId {
                product_id: batch.run.product_id,
                restock_round: batch.run.restock_round,
                user_id: batch.items[*index].user_id,
            },
        }
    }
}

pub type NotificationStream = Pin<Box<dyn Stream<Item = Result<Outgoing, StreamEnd>> + Send>>;

impl Engine {
    /// Opens a subscription. With `resume_after`, the stream first delivers the recorded
    /// notifications after that one. `UnknownNotification` if it was never recorded and
    /// its run is over; while its run is in progress it may be recorded yet (a stalled
    /// commit), and the stream waits for it.
    pub async fn subscribe(
        self: &Arc<Self>,
        filter: NotificationFilter,
        resume_after: Option<NotificationId>,
    ) -> Result<NotificationStream, Error> {
        // Where this stream starts, as a point in the record, read before it listens:
        // a stream ended before it delivered anything says to resume from here (G11),
        // which replays whatever was recorded since, a few sent just before it opened
        // included, and so misses nothing.
        let started_at = match resume_after {
            Some(id) => Some(id),
            None => self.store.last_recorded().await?.map(|r| r.notification.id),
        };
        // Whatever is sent from now on is in this buffer, and whatever was sent before
        // is, or will be, in the record.
        let live = self.listen_to_bus()?;
        let mut state = Subscription {
            open: OpenStream::new(self.metrics.clone()),
            engine: self.clone(),
            filter,
            live,
            shutdown: self.shutdown.clone(),
            resume_after,
            resume: None,
            replay_from: None,
            covered: HashMap::new(),
            ready: VecDeque::new(),
            last_delivered: started_at,
            ended: false,
        };
        if let Some(id) = resume_after {
            if let Some(recorded) = self.find_recorded(id).await? {
                state.resume_from(recorded);
            } else {
                state.resume_after = Some(id);
            }
        }
        Ok(Box::pin(futures::stream::unfold(
            state,
            |mut s| async move {
                let item = s.next().await?;
                Some((item, s))
            },
        )))
    }

    /// Where `id` was recorded; `None` if it is not yet but its run is in progress.
    async fn find_recorded(&self, id: NotificationId) -> Result<Option<Recorded>, Error> {
        if let Some(recorded) = self.store.recorded(id).await? {
            return Ok(Some(recorded));
        }
        let progress = self
            .store
            .run_progress(id.product_id, id.restock_round)
            .await?;
        match progress {
            Some(p) if p.status == RunStatus::InProgress => Ok(None),
            Some(p) if p.history_swept => Err(Error::HistoryExpired(id)),
            _ => Err(Error::UnknownNotification(id)),
        }
    }
}

/// Where a resumed stream starts in the record.
#[derive(Debug, Clone, Copy)]
struct ResumePoint {
    /// Recording sequence number of `resume_after`: "after it" means above this.
    seq: i64,
}

struct Subscription {
    /// Counts the stream in `restock_subscribers` while it exists.
    open: OpenStream,
    engine: Arc<Engine>,
    filter: NotificationFilter,
    live: broadcast::Receiver<Arc<BusEvent>>,
    shutdown: CancellationToken,
    /// Not yet looked up in the record.
    resume_after: Option<NotificationId>,
    resume: Option<ResumePoint>,
    /// While replaying the record: the sequence number to read after.
    replay_from: Option<i64>,
    /// Per run, the last queue position this stream has covered: delivered, or passed
    /// over because the filter did not match.
    covered: HashMap<RunKey, i64>,
    /// Notifications ready to go out, in order.
    ready: VecDeque<Outgoing>,
    last_delivered: Option<NotificationId>,
    ended: bool,
}

impl Subscription {
    async fn next(&mut self) -> Option<Result<Outgoing, StreamEnd>> {
        if self.ended {
            return None;
        }
        let item = self.produce().await;
        match &item {
            Ok(n) => self.last_delivered = Some(n.id()),
            Err(_) => self.ended = true,
        }
        Some(item)
    }

    async fn produce(&mut self) -> Result<Outgoing, StreamEnd> {
        loop {
            if let Some(n) = self.ready.pop_front() {
                return Ok(n);
            }
            if self.resume_after.is_some() || self.replay_from.is_some() {
                // Catching up from the record: the bus is not read meanwhile, so the
                // shutdown is looked for here.
                if self.shutdown.is_cancelled() {
                    return Err(self.shutting_down());
                }
                if let Some(id) = self.resume_after.take() {
                    self.start_resume(id).await?;
                } else if let Some(after) = self.replay_from {
                    self.replay_page(after).await?;
                }
                continue;
            }
            match self.live.recv().await {
                Ok(event) => self.on_event(&event).await?,
                Err(RecvError::Lagged(missed)) => return Err(self.lagged(missed)),
                Err(RecvError::Closed) => return Err(self.shutting_down()),
            }
        }
    }

    fn shutting_down(&self) -> StreamEnd {
        StreamEnd::ShuttingDown {
            last_delivered: self.last_delivered,
        }
    }

    fn lagged(&self, missed: u64) -> StreamEnd {
        self.open.metrics.subscribers_lagged.increment(1);
        StreamEnd::Lagged {
            missed,
            last_delivered: self.last_delivered,
        }
    }

    /// Waits for `resume_after` to be recorded: delivered just before a stalled commit,
    /// it is recorded once the commit goes through, as long as its run is in progress.
    async fn start_resume(&mut self, id: NotificationId) -> Result<(), StreamEnd> {
        let engine = self.engine.clone();
        loop {
            match engine.find_recorded(id).await.map_err(StreamEnd::Failed)? {
                Some(recorded) => {
                    self.resume_from(recorded);
                    return Ok(());
                }
                None => self.pause().await?,
            }
        }
    }

    fn resume_from(&mut self, recorded: Recorded) {
        if let Some(position) = recorded.position {
            self.covered
                .insert(run_of(&recorded.notification.id), position);
        }
        self.resume = Some(ResumePoint { seq: recorded.seq });
        self.replay_from = Some(recorded.seq);
    }

    /// One page of the record after `after`, in recording order.
    async fn replay_page(&mut self, after: i64) -> Result<(), StreamEnd> {
        let page = self
            .engine
            .store
            .recorded_after(after, self.filter, REPLAY_PAGE)
            .await
            .map_err(StreamEnd::Failed)?;
        if page.is_empty() {
            // Caught up with the record; the rest is live, and any gap left by commits
            // that land after this read is filled by position.
            self.replay_from = None;
            return Ok(());
        }
        self.replay_from = page.last().map(|r| r.seq);
        for recorded in page {
            let run = run_of(&recorded.notification.id);
            let Some(position) = recorded.position else {
                self.ready
                    .push_back(Outgoing::Recorded(recorded.notification));
                continue;
            };
            if self.covered.get(&run).is_some_and(|&c| position <= c) {
                continue;
            }
            self.covered.insert(run, position);
            self.ready
                .push_back(Outgoing::Recorded(recorded.notification));
        }
        Ok(())
    }

    async fn on_event(&mut self, event: &BusEvent) -> Result<(), StreamEnd> {
        match event {
            BusEvent::Sent(batch) => {
                if self
                    .filter
                    .product_id
                    .is_some_and(|p| p != batch.run.product_id)
                {
                    return Ok(());
                }
                if let Some(prev) = batch.prev_position {
                    self.fill_gap(batch.run, prev).await?;
                }
                self.take_live(batch);
            }
            BusEvent::RunEnded {
                run,
                status,
                last_position,
            } => {
                if let Some(last) = last_position
                    && self.filter.product_id.is_none_or(|p| p == run.product_id)
                {
                    self.fill_gap(*run, *last).await?;
                }
                self.forget_if_over(*run, *status);
            }
            BusEvent::Gap => {
                return Err(StreamEnd::FeedInterrupted {
                    last_delivered: self.last_delivered,
                });
            }
            BusEvent::Closing => return Err(self.shutting_down()),
        }
        Ok(())
    }

    /// Forgets a run that can send nothing more (G9): a stream that lives for months
    /// sees runs without end, and keeps a position only for those that may still send.
    /// A run ended `CANCELED_BY_ERROR` may be resumed (its new sends repeat none of what
    /// the stream has covered), and one handed over goes on elsewhere: both are kept,
    /// up to [`MAX_COVERED_RUNS`].
    fn forget_if_over(&mut self, run: RunKey, status: RunStatus) {
        if matches!(status, RunStatus::Completed | RunStatus::CanceledBySoldOut) {
            self.covered.remove(&run);
        }
    }

    /// Delivers the items of a live batch this stream has not covered yet.
    fn take_live(&mut self, batch: &Arc<SentBatch>) {
        let covered = self.covered.get(&batch.run).copied();
        let mut last = covered;
        for (index, item) in batch.items.iter().enumerate() {
            if covered.is_some_and(|c| item.position <= c) {
                continue;
            }
            last = Some(item.position);
            if self.filter.matches(&batch.notification(index).id) {
                self.ready.push_back(Outgoing::Live {
                    batch: batch.clone(),
                    index,
                });
            }
        }
        if let Some(last) = last {
            if self.covered.len() >= MAX_COVERED_RUNS && !self.covered.contains_key(&batch.run) {
                // The oldest is not known; any will do: forgetting a run only means its
                // re-sends after a hand-over or resume reach this stream again (same ids).
                let some = *self.covered.keys().next().expect("the map is full");
                self.covered.remove(&some);
            }
            self.covered.insert(batch.run, last);
        }
    }

    /// A resumed stream must have covered `run` up to `upto` before going on: reads the
    /// missing notifications from the record, waiting while the run is in progress and
    /// its record has not reached `upto` yet (G11). A stream that did not resume started
    /// live, and has no gap to fill.
    async fn fill_gap(&mut self, run: RunKey, upto: i64) -> Result<(), StreamEnd> {
        let Some(resume) = self.resume else {
            return Ok(());
        };
        let engine = self.engine.clone();
        loop {
            let covered = self.covered.get(&run).copied();
            if covered.is_some_and(|c| c >= upto) {
                return Ok(());
            }
            let progress = engine
                .store
                .run_progress(run.product_id, run.restock_round)
                .await
                .map_err(StreamEnd::Failed)?;
            let complete = progress.is_none_or(|p| {
                p.status != RunStatus::InProgress || p.recorded_position.is_some_and(|r| r >= upto)
            });
            let rows = engine
                .store
                .recorded_in_run(
                    run.product_id,
                    run.restock_round,
                    covered,
                    upto,
                    REPLAY_PAGE,
                )
                .await
                .map_err(StreamEnd::Failed)?;
            let full_page = rows.len() == REPLAY_PAGE as usize;
            for recorded in rows {
                self.covered.insert(run, recorded.position.unwrap_or(upto));
                // Recorded before the resume point: the subscriber had it already.
                let n = recorded.notification;
                if recorded.seq > resume.seq && self.filter.matches(&n.id) {
                    self.ready.push_back(Outgoing::Recorded(n));
                }
            }
            if full_page {
                continue;
            }
            if complete {
                // Whatever is still missing was delivered and then lost with a failed
                // commit: the run is re-sent from its record on resume, under the same
                // ids, and those arrive live.
                self.covered
                    .entry(run)
                    .and_modify(|c| *c = (*c).max(upto))
                    .or_insert(upto);
                return Ok(());
            }
            self.pause().await?;
        }
    }

    /// Waits one flush interval before looking at the record again, unless the service
    /// stops meanwhile.
    async fn pause(&self) -> Result<(), StreamEnd> {
        tokio::select! {
            _ = self.shutdown.cancelled() => Err(self.shutting_down()),
            _ = tokio::time::sleep(self.engine.settings.recorder.flush_interval) => Ok(()),
        }
    }
}

struct OpenStream {
    metrics: Arc<Metrics>,
}

impl OpenStream {
    fn new(metrics: Arc<Metrics>) -> Self {
        metrics.subscribers.increment(1.0);
        Self { metrics }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.metrics.subscribers.decrement(1.0);
    }
}

fn run_of(id: &NotificationId) -> RunKey {
    RunKey {
        product_id: id.product_id,
        restock_round: id.restock_round,
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::deployment::Deployment;
    use crate::domain::ProductId;
    use crate::engine::EngineSettings;
    use crate::store::sqlite::SqliteStore;

    /// A stream as `Engine::subscribe` opens it, on an embedded engine of its own.
    async fn subscription() -> Subscription {
        let file =
            std::env::temp_dir().join(format!("restock-unit-{:016x}.db", rand::random::<u64>()));
        let store = SqliteStore::connect(&format!("sqlite://{}", file.display()))
            .await
            .unwrap();
        let metrics = Metrics::new(500);
        let capabilities = Deployment::Embedded
            .capabilities(None, std::num::NonZeroU32::new(500).unwrap(), 16, &metrics)
            .await
            .unwrap();
        let engine = Engine::new(
            Arc::new(store),
            capabilities,
            EngineSettings::default(),
            metrics.clone(),
        );
        Subscription {
            open: OpenStream::new(metrics),
            live: engine.bus.subscribe(),
            shutdown: engine.shutdown.clone(),
            engine,
            filter: NotificationFilter::default(),
            resume_after: None,
            resume: None,
            replay_from: None,
            covered: HashMap::new(),
            ready: VecDeque::new(),
            last_delivered: None,
            ended: false,
        }
    }

    fn sent(run: RunKey, position: i64) -> BusEvent {
        BusEvent::Sent(Arc::new(SentBatch::of(
            run,
            (position > 1).then_some(position - 1),
            &[(position, position)],
            Utc::now(),
        )))
    }

    #[tokio::test]
    async fn a_stream_forgets_runs_that_ended_and_stays_bounded() {
        let mut stream = subscription().await;
        let product = ProductId::parse(1).unwrap();
        for round in 1..=10_000 {
            let run = RunKey {
                product_id: product,
                restock_round: round,
            };
            for position in 1..=2 {
                stream.on_event(&sent(run, position)).await.unwrap();
            }
            let status = if round % 2 == 0 {
                RunStatus::Completed
            } else {
                RunStatus::CanceledBySoldOut
            };
            let ended = BusEvent::RunEnded {
                run,
                status,
                last_position: Some(2),
            };
            stream.on_event(&ended).await.unwrap();
            stream.ready.clear();
            assert!(stream.covered.is_empty(), "round {round} is remembered");
        }
        // Runs that may go on (failed, or handed over) are kept, up to a bound.
        for round in 10_001..=12_000 {
            let run = RunKey {
                product_id: product,
                restock_round: round,
            };
            stream.on_event(&sent(run, 1)).await.unwrap();
            let ended = BusEvent::RunEnded {
                run,
                status: RunStatus::CanceledByError,
                last_position: Some(1),
            };
            stream.on_event(&ended).await.unwrap();
            stream.ready.clear();
        }
        assert_eq!(stream.covered.len(), MAX_COVERED_RUNS);
        // A run handed over is still covered: its new owner's re-sends are dropped.
        let last = RunKey {
            product_id: product,
            restock_round: 12_000,
        };
        stream.on_event(&sent(last, 1)).await.unwrap();
        assert!(
            stream.ready.is_empty(),
            "a re-send reached the stream again"
        );
    }
}
