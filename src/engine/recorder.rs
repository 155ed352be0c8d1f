//! The recorder of one run: what the run delivered waits here until it is committed to
//! the history together with the run's cursor, one transaction per batch (G5). Batches
//! are committed on a task of their own, one at a time and in send order, so a slow
//! commit does not hold up the sends; how much may wait uncommitted is bounded (G10);
//! every commit renews the run's lease (G8), and the recorder is the lease's one
//! owner: it says whether the run may still send, and every write of the run's row
//! goes through it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument as _;

use super::lease::{LeaseKeeper, LeaseSettings};
use crate::domain::{BackendError, Error, Registration, UserId};
use crate::monitoring::Metrics;
use crate::store::{After, Claimed, FinalStatus, RunClaim, SentNotification, Store};

/// How often `CANCELED_BY_ERROR` alone is tried when the last record failed: a failing
/// run must not stay `IN_PROGRESS` (G4), and six tries, from 100 ms doubling, span
/// a few seconds of a database coming back, well inside the shutdown grace.
const MARK_FAILED_ATTEMPTS: u32 = 6;

/// The wait before the second try of `CANCELED_BY_ERROR`, doubled for every later one.
const MARK_FAILED_FIRST_DELAY: Duration = Duration::from_millis(100);

/// Why the record of a run cannot go on. The run stops on any of them; what it does
/// then differs (G4, G8).
#[derive(Debug)]
pub(super) enum RecordError {
    /// The run is no longer this owner's: a write found its claim superseded or its
    /// lease run out, and another owner may have it (G8).
    Lost,
    /// Commits stalled until the lease could run out: the run stops sending and is left
    /// to whichever instance takes it over (G8, G10).
    LeaseRunOut,
    /// The database failed (G4).
    Failed(Error),
}

impl RecordError {
    /// What the run's `last_error` says when this ends it `CANCELED_BY_ERROR`.
    fn last_error(&self) -> Option<String> {
        match self {
            RecordError::Failed(err) => Some(err.to_string()),
            RecordError::Lost | RecordError::LeaseRunOut => None,
        }
    }
}

/// Settings of the recorder.
#[derive(Debug, Clone)]
pub struct RecorderSettings {
    /// Notifications handed to one transaction once this many wait: one statement of
    /// the store's (a multi-row INSERT, which costs little more than a single row). At the
    /// default rate a batch rarely gets that big because of `flush_interval`; when more
    /// wait (at high rates, while the previous transaction commits), a transaction
    /// takes a whole number of batches and the rest waits for the next, so every
    /// statement has the one length the connection has prepared already.
    pub batch_size: usize,
    /// A delivered notification waits about this long, at most, before it is handed to
    /// a transaction. 100 ms keeps the record (and `GetRestockRun`) close behind the
    /// sends without a transaction per notification.
    pub flush_interval: Duration,
    /// G10: sends pause while this many notifications are delivered but not committed.
    /// Never more than one second's worth at the send rate (`startup` lowers it to
    /// `RESTOCK_SEND_RATE`): a stall or a crash never re-delivers more than that. At
    /// high rates, ten batches: sends go on while a batch commits, and what piles up
    /// meanwhile goes in the next transaction, so the engine runs at the speed of its
    /// commits (larger ones when it falls behind) rather than of its commits plus its
    /// sends. A transaction of this many rows stays within both databases' limits on
    /// bound parameters.
    pub unrecorded_bound: usize,
}

impl Default for RecorderSettings {
    fn default() -> Self {
        Self {
            batch_size: crate::store::HISTORY_ROWS_PER_INSERT,
            flush_interval: Duration::from_millis(100),
            unrecorded_bound: 5_000,
        }
    }
}

/// A batch being committed on a task of its own.
struct InFlight {
    users: Vec<UserId>,
    /// When the transaction started: if it commits, the lease was renewed then.
    started: Instant,
    done: JoinHandle<Result<Claimed, Error>>,
}

pub(super) struct Recorder {
    store: Arc<dyn Store>,
    claim: RunClaim,
    settings: RecorderSettings,
    /// The run's lease, renewed by every commit and by nothing else (G8).
    lease: LeaseKeeper,
    /// Delivered, not yet handed to a transaction, in send order.
    pending: Vec<SentNotification>,
    oldest_pending: Option<Instant>,
    in_flight: Option<InFlight>,
    /// The users of `pending` and `in_flight`, kept as they change: every page read
    /// is checked against it.
    unrecorded_users: HashSet<UserId>,
    metrics: Arc<Metrics>,
    /// What this recorder last added to `restock_unrecorded_sends`.
    reported: usize,
    /// A commit failed, and what was delivered after it was given up with it.
    gave_up: bool,
}

impl Recorder {
    /// The recorder of a run claimed by a write that started at `claimed_at`: the
    /// lease counts from then (G8).
    pub(super) fn new(
        store: Arc<dyn Store>,
        claim: RunClaim,
        settings: RecorderSettings,
        lease: LeaseSettings,
        claimed_at: Instant,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            claim,
            pending: Vec::with_capacity(settings.batch_size),
            settings,
            lease: LeaseKeeper::new(lease, claimed_at),
            oldest_pending: None,
            in_flight: None,
            unrecorded_users: HashSet::new(),
            metrics,
            reported: 0,
            gave_up: false,
        }
    }

    /// Brings `restock_unrecorded_sends` up to date with this run's share.
    fn report(&mut self) {
        let now = self.unrecorded();
        let gauge = &self.metrics.unrecorded_sends;
        if now > self.reported {
            gauge.increment((now - self.reported) as f64);
        } else if now < self.reported {
            gauge.decrement((self.reported - now) as f64);
        }
        self.reported = now;
    }

    /// Takes note of notifications just delivered.
    pub(super) fn delivered(&mut self, chunk: &[Registration], sent_at: DateTime<Utc>) {
        self.pending
            .extend(chunk.iter().map(|&registration| SentNotification {
                registration,
                sent_at,
            }));
        self.unrecorded_users
            .extend(chunk.iter().map(|registration| registration.user_id));
        self.oldest_pending.get_or_insert_with(Instant::now);
        self.report();
    }

    /// Delivered but not committed (G10).
    pub(super) fn unrecorded(&self) -> usize {
        self.pending.len() + self.in_flight.as_ref().map_or(0, |f| f.users.len())
    }

    /// How many more may be delivered before the sends must wait for a commit (G10).
    pub(super) fn room(&self) -> usize {
        self.settings
            .unrecorded_bound
            .saturating_sub(self.unrecorded())
    }

    /// Whether `user` was delivered and is not committed yet: a page read meanwhile
    /// may still list them.
    pub(super) fn is_unrecorded(&self, user: UserId) -> bool {
        self.unrecorded_users.contains(&user)
    }

    /// Whether a commit failed and gave up what was delivered after it: nothing
    /// delivered since may be recorded either, or the record would have a gap (G5).
    pub(super) fn gave_up(&self) -> bool {
        self.gave_up
    }

    /// Whether anything delivered is not committed yet.
    pub(super) fn has_unrecorded(&self) -> bool {
        !self.unrecorded_users.is_empty()
    }

    /// Whether the lease leaves time to send (G8): past this, sends stop until a commit
    /// renews it.
    pub(super) fn may_send(&self) -> bool {
        self.lease.may_send()
    }

    /// Starts a wave of `quota` notifications, recorded with the run (it renews the
    /// lease like any record of the run's).
    pub(super) async fn start_wave(
        &mut self,
        quota: i64,
        sent_count: i64,
    ) -> Result<(), RecordError> {
        let asked = Instant::now();
        let started = self
            .store
            .start_wave(&self.claim, quota, sent_count, self.lease.lease())
            .await
            .map_err(RecordError::Failed)?;
        if started == Claimed::Lost {
            return Err(RecordError::Lost);
        }
        self.lease.renewed(asked);
        Ok(())
    }

    /// Between sends: notices a finished batch (a failure stops the run at once), and
    /// hands the pending notifications over when a batch is due.
    pub(super) async fn poll(&mut self) -> Result<(), RecordError> {
        if self
            .in_flight
            .as_ref()
            .is_some_and(|f| f.done.is_finished())
        {
            self.settle().await?;
        }
        if self.in_flight.is_none() && self.batch_due() {
            self.hand_over_pending();
        }
        Ok(())
    }

    /// While the run waits (for the limiter, say): as `poll`, and renews the lease with
    /// an empty record when nothing else has renewed it for a while.
    pub(super) async fn keep_up(&mut self) -> Result<(), RecordError> {
        self.poll().await?;
        if self.in_flight.is_none() && self.lease.renewal_due() {
            self.hand_over_pending();
        }
        Ok(())
    }

    /// Waits until at least one more notification may be delivered (G10): commits
    /// what is pending and waits for the commit, but never past the moment the lease
    /// could run out; then the run must stop and leave itself to the next owner (G8).
    pub(super) async fn wait_for_room(&mut self) -> Result<(), RecordError> {
        while self.room() == 0 || !self.lease.may_send() {
            if self.in_flight.is_none() {
                if self.pending.is_empty() {
                    // Nothing to commit and no lease to send on: it ran out.
                    return Err(RecordError::LeaseRunOut);
                }
                self.hand_over_pending();
            }
            let deadline = self.lease.send_deadline();
            match tokio::time::timeout_at(deadline, self.settle()).await {
                Ok(settled) => settled?,
                // The commit goes on without us; it fails on its own once it finds the
                // lease run out or the run taken over (G8).
                Err(_) => return Err(RecordError::LeaseRunOut),
            }
        }
        Ok(())
    }

    /// Commits everything delivered so far and waits for it.
    pub(super) async fn flush(&mut self) -> Result<(), RecordError> {
        self.settle().await?;
        while !self.pending.is_empty() {
            self.hand_over_pending();
            self.settle().await?;
        }
        Ok(())
    }

    /// Whether the pending notifications should go to a transaction now: a batch is
    /// full, or the oldest has waited a flush interval.
    fn batch_due(&self) -> bool {
        self.pending.len() >= self.settings.batch_size
            || self
                .oldest_pending
                .is_some_and(|t| t.elapsed() >= self.settings.flush_interval)
    }

    /// Starts a transaction with the pending notifications (possibly none: that only
    /// renews the lease). The previous one must be settled.
    fn hand_over_pending(&mut self) {
        debug_assert!(self.in_flight.is_none());
        let whole = self.pending.len() / self.settings.batch_size * self.settings.batch_size;
        let batch = if whole == 0 || whole == self.pending.len() {
            self.oldest_pending = None;
            std::mem::take(&mut self.pending)
        } else {
            // The rest stays pending, as if delivered now: the next transaction, due
            // once this one commits, takes it.
            self.oldest_pending = Some(Instant::now());
            let rest = self.pending.split_off(whole);
            std::mem::replace(&mut self.pending, rest)
        };
        let users = batch.iter().map(|s| s.registration.user_id).collect();
        let store = self.store.clone();
        let (claim, lease) = (self.claim, self.lease.lease());
        let took = self.metrics.record_batch_seconds.clone();
        let span = tracing::info_span!("record_batch", rows = batch.len());
        let done = tokio::spawn(
            async move {
                let started = Instant::now();
                let recorded = store
                    .record(&claim, &batch, After::Renew, lease, None)
                    .await;
                took.record(started.elapsed().as_secs_f64());
                recorded
            }
            .instrument(span),
        );
        self.in_flight = Some(InFlight {
            users,
            started: Instant::now(),
            done,
        });
    }

    /// Waits for the batch being committed. If it failed, what was delivered after it is
    /// dropped from the record too (a resume delivers it again under the same ids):
    /// recording it would leave a hole in the history (G5).
    async fn settle(&mut self) -> Result<(), RecordError> {
        let settled = self.settle_in_flight().await;
        self.report();
        settled
    }

    async fn settle_in_flight(&mut self) -> Result<(), RecordError> {
        let Some(in_flight) = self.in_flight.take() else {
            return Ok(());
        };
        let outcome = match in_flight.done.await {
            Ok(Ok(Claimed::Yes)) => {
                self.lease.renewed(in_flight.started);
                for user in &in_flight.users {
                    self.unrecorded_users.remove(user);
                }
                return Ok(());
            }
            Ok(Ok(Claimed::Lost)) => RecordError::Lost,
            Ok(Err(err)) => RecordError::Failed(err),
            Err(join) => RecordError::Failed(Error::Backend(BackendError::new(
                crate::domain::Component::Database,
                false,
                anyhow::anyhow!("recording task failed: {join}"),
            ))),
        };
        self.pending.clear();
        self.oldest_pending = None;
        self.unrecorded_users.clear();
        self.gave_up = true;
        Err(outcome)
    }

    /// Commits what is pending together with `after` (a final state, or the release of
    /// the run on shutdown). Returns what was written, `None` if nothing could be.
    ///
    /// If the pending notifications cannot be recorded they are given up (they were
    /// delivered; a resume delivers them again with the same ids) and a final state
    /// alone is written, with retries: a failing run must not stay `IN_PROGRESS` (G4).
    /// `last_error` (why a run ends `CANCELED_BY_ERROR`) goes in the same write as the
    /// final state (G12).
    pub(super) async fn close(
        &mut self,
        after: After,
        last_error: Option<String>,
    ) -> Result<After, RecordError> {
        let (mut after, mut last_error) = (after, last_error);
        match self.settle().await {
            Ok(()) => {}
            Err(stop @ (RecordError::Lost | RecordError::LeaseRunOut)) => return Err(stop),
            Err(failed @ RecordError::Failed(_)) => {
                after = After::Finish(FinalStatus::Error);
                last_error = last_error.or_else(|| failed.last_error());
            }
        }
        let lease = self.lease.lease();
        let started = Instant::now();
        let span = tracing::info_span!("record_batch", rows = self.pending.len(), last = true);
        let first = self
            .store
            .record(
                &self.claim,
                &self.pending,
                after,
                lease,
                last_error.as_deref(),
            )
            .instrument(span)
            .await;
        self.metrics
            .record_batch_seconds
            .record(started.elapsed().as_secs_f64());
        match first {
            Ok(Claimed::Yes) => {
                self.pending.clear();
                self.unrecorded_users.clear();
                self.report();
                Ok(after)
            }
            Ok(Claimed::Lost) => Err(RecordError::Lost),
            Err(err) => {
                tracing::error!(
                    error = ?err,
                    unrecorded = self.pending.len(),
                    "cannot record the last sends; marking the run CANCELED_BY_ERROR without them"
                );
                self.pending.clear();
                self.unrecorded_users.clear();
                let last_error = last_error.or_else(|| RecordError::Failed(err).last_error());
                self.mark_failed(last_error.as_deref()).await
            }
        }
    }

    /// Writes `CANCELED_BY_ERROR` alone, retrying for a few seconds.
    async fn mark_failed(&mut self, last_error: Option<&str>) -> Result<After, RecordError> {
        let failed = After::Finish(FinalStatus::Error);
        let mut delay = MARK_FAILED_FIRST_DELAY;
        let mut failed_with = None;
        for attempt in 1..=MARK_FAILED_ATTEMPTS {
            match self
                .store
                .record(&self.claim, &[], failed, self.lease.lease(), last_error)
                .await
            {
                Ok(Claimed::Yes) => return Ok(failed),
                // Possibly our own earlier attempt, committed after all.
                Ok(Claimed::Lost) => return Err(RecordError::Lost),
                Err(err) => {
                    tracing::warn!(attempt, error = ?err, "cannot mark the run CANCELED_BY_ERROR");
                    failed_with = Some(err);
                }
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
        Err(RecordError::Failed(
            failed_with.expect("at least one attempt failed"),
        ))
    }
}

impl Drop for Recorder {
    /// A run that stops takes its share out of `restock_unrecorded_sends`, whatever
    /// became of it.
    fn drop(&mut self) {
        self.metrics
            .unrecorded_sends
            .decrement(self.reported as f64);
    }
}
