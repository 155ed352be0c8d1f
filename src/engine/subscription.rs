//! `Subscribe`: live notifications matching a filter, optionally preceded by a replay
//! of the recorded ones after a given notification, with no gap between the two.

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::Stream;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;

use super::Engine;
use crate::domain::{Error, Notification, NotificationFilter, NotificationId};

/// Recorded notifications read per replay query.
const REPLAY_PAGE: u32 = 500;

/// Why a stream ended on the service's side.
#[derive(Debug)]
pub enum StreamEnd {
    /// The subscriber read too slowly and its buffer overflowed.
    Lagged {
        missed: u64,
        last_delivered: Option<NotificationId>,
    },
    /// The service is stopping.
    ShuttingDown {
        last_delivered: Option<NotificationId>,
    },
    /// Reading the recorded notifications failed.
    Failed(Error),
}

pub type NotificationStream = Pin<Box<dyn Stream<Item = Result<Notification, StreamEnd>> + Send>>;

impl Engine {
    /// Opens a subscription. With `resume_after`, the notification must have been
    /// recorded (`NotFound` otherwise).
    pub async fn subscribe(
        self: &Arc<Self>,
        filter: NotificationFilter,
        resume_after: Option<NotificationId>,
    ) -> Result<NotificationStream, Error> {
        // Subscribe to live notifications before reading anything recorded, so that
        // whatever is sent from now on is either in the replay or in this buffer.
        let live = self.bus.subscribe();
        let subscribed_at = Utc::now();
        let replay_from = match resume_after {
            None => None,
            Some(id) => Some(self.recorded_seq(id).await?),
        };
        let state = Subscription {
            engine: self.clone(),
            filter,
            live,
            shutdown: self.shutdown.clone(),
            replay_from,
            replayed: VecDeque::new(),
            subscribed_at,
            settle: self.settings.flush_interval * 3,
            settled: false,
            recently_replayed: HashSet::new(),
            last_delivered: resume_after,
            ended: false,
        };
        Ok(Box::pin(futures::stream::unfold(
            state,
            |mut s| async move {
                let item = s.next().await?;
                Some((item, s))
            },
        )))
    }

    /// The recording sequence number of a notification. A notification that was just
    /// sent may take up to a flush interval to be recorded, so it is waited for briefly.
    async fn recorded_seq(&self, id: NotificationId) -> Result<i64, Error> {
        let deadline = tokio::time::Instant::now() + self.settings.flush_interval * 5;
        loop {
            if let Some(seq) = self.store.recorded_seq(id).await? {
                return Ok(seq);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::NotFound(format!(
                    "notification {id} was never recorded, so there is nothing to resume \
                     after; subscribe without resume_after, or pass the notification_id of \
                     a notification you received"
                )));
            }
            tokio::time::sleep(self.settings.flush_interval).await;
        }
    }
}

struct Subscription {
    engine: Arc<Engine>,
    filter: NotificationFilter,
    live: broadcast::Receiver<Arc<Notification>>,
    shutdown: CancellationToken,
    /// While replaying: the recording sequence number to read after.
    replay_from: Option<i64>,
    replayed: VecDeque<Notification>,
    subscribed_at: DateTime<Utc>,
    /// How long after subscribing a notification sent before the subscription may still
    /// be unrecorded (a few flush intervals). The replay starts reading only then.
    settle: Duration,
    settled: bool,
    /// Ids replayed that may also arrive live, so they are not delivered twice.
    recently_replayed: HashSet<NotificationId>,
    last_delivered: Option<NotificationId>,
    ended: bool,
}

impl Subscription {
    async fn next(&mut self) -> Option<Result<Notification, StreamEnd>> {
        if self.ended {
            return None;
        }
        let item = if self.replay_from.is_some() {
            self.next_replayed().await
        } else {
            self.next_live().await
        };
        match &item {
            Some(Ok(n)) => self.last_delivered = Some(n.id),
            Some(Err(_)) | None => self.ended = true,
        }
        item
    }

    async fn next_replayed(&mut self) -> Option<Result<Notification, StreamEnd>> {
        loop {
            if let Some(n) = self.replayed.pop_front() {
                return Some(Ok(n));
            }
            let Some(after) = self.replay_from else {
                return self.next_live().await;
            };
            if !self.settled {
                // Wait until everything sent before the subscription is recorded, then
                // read the record in one pass. Reading earlier would not do: batches of
                // concurrent runs commit out of id order, so a row committed late can
                // have an id below rows already read, and would be skipped. Anything
                // sent after the subscription is in the live buffer.
                let settled_at = self.subscribed_at
                    + chrono::Duration::from_std(self.settle).unwrap_or_default();
                let wait = (settled_at - Utc::now()).to_std().unwrap_or_default();
                tokio::select! {
                    _ = self.shutdown.cancelled() => {
                        return Some(Err(StreamEnd::ShuttingDown {
                            last_delivered: self.last_delivered,
                        }));
                    }
                    _ = tokio::time::sleep(wait) => {}
                }
                self.settled = true;
            }
            if self.shutdown.is_cancelled() {
                return Some(Err(StreamEnd::ShuttingDown {
                    last_delivered: self.last_delivered,
                }));
            }
            let page = match self
                .engine
                .store
                .recorded_after(after, self.filter, REPLAY_PAGE)
                .await
            {
                Ok(page) => page,
                Err(err) => return Some(Err(StreamEnd::Failed(err))),
            };
            if page.is_empty() {
                // Caught up: the rest is live.
                self.replay_from = None;
                continue;
            }
            // Notifications sent shortly before the subscription or since may also be
            // in the live buffer; remember those to skip them there.
            let overlap_from = self.subscribed_at - chrono::Duration::seconds(2);
            for (seq, n) in page {
                self.replay_from = Some(seq);
                if n.sent_at >= overlap_from {
                    self.recently_replayed.insert(n.id);
                }
                self.replayed.push_back(n);
            }
        }
    }

    async fn next_live(&mut self) -> Option<Result<Notification, StreamEnd>> {
        loop {
            let received = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    return Some(Err(StreamEnd::ShuttingDown {
                        last_delivered: self.last_delivered,
                    }));
                }
                received = self.live.recv() => received,
            };
            match received {
                Ok(n) => {
                    if !self.filter.matches(&n.id) {
                        continue;
                    }
                    if !self.recently_replayed.is_empty() && self.recently_replayed.remove(&n.id) {
                        continue;
                    }
                    return Some(Ok((*n).clone()));
                }
                Err(RecvError::Lagged(missed)) => {
                    return Some(Err(StreamEnd::Lagged {
                        missed,
                        last_delivered: self.last_delivered,
                    }));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}
