//! A run's deliveries through the stock fence that are on their way, in send order.
//!
//! Why several at once (G2): a delivery is a round trip to the fence (to Redis, when
//! clustered). A run that waited for each answer before it asked the limiter again was
//! away for that round trip, and the slots that fell due meanwhile went to no one (the
//! limiter never saves them up): one run alone kept 30% of the rate with Redis 6 ms
//! away. So each grant's batch is delivered at once, the next grant is asked for at
//! once, and the answers are taken in as they come. The fence keeps them in order on
//! the bus (G1): each batch must follow the last one delivered under its claim, so a
//! batch whose predecessor was refused is refused too, and nothing later overtakes an
//! earlier one.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;

use crate::domain::{BackendError, Registration, UserId};
use crate::engine::bus::SentBatch;
use crate::engine::stock::{Delivery, StockFence};

/// A batch's answer from the fence.
pub(super) struct Answered {
    pub chunk: Vec<Registration>,
    pub sent_at: DateTime<Utc>,
    pub outcome: Result<Delivery, BackendError>,
}

/// Deliveries asked for and not answered yet.
#[derive(Default)]
pub(super) struct Deliveries {
    on_the_way: FuturesOrdered<BoxFuture<'static, Answered>>,
    /// Notifications on their way: they count with the unrecorded ones (G10).
    count: usize,
    /// Their users, which a page read meanwhile still lists.
    users: HashSet<UserId>,
    /// Queue position of the last notification asked for.
    last_started: Option<i64>,
}

impl Deliveries {
    /// Asks `fence` to deliver `batch` (the notifications of `chunk`, stamped `sent_at`).
    /// The request is made when the set is next polled, after those asked for before
    /// it.
    pub(super) fn start(
        &mut self,
        fence: Arc<dyn StockFence>,
        batch: SentBatch,
        chunk: Vec<Registration>,
        sent_at: DateTime<Utc>,
    ) {
        self.count += chunk.len();
        self.users.extend(chunk.iter().map(|r| r.user_id));
        self.last_started = chunk.last().map(|r| r.position).or(self.last_started);
        self.on_the_way.push_back(Box::pin(async move {
            let outcome = fence.deliver(&batch).await;
            Answered {
                chunk,
                sent_at,
                outcome,
            }
        }));
    }

    /// The next answer, in send order; `None` when nothing is on its way.
    pub(super) async fn next(&mut self) -> Option<Answered> {
        let answered = self.on_the_way.next().await?;
        self.count -= answered.chunk.len();
        for registration in &answered.chunk {
            self.users.remove(&registration.user_id);
        }
        if self.on_the_way.is_empty() {
            self.last_started = None;
        }
        Some(answered)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.on_the_way.is_empty()
    }

    /// Notifications on their way.
    pub(super) fn len(&self) -> usize {
        self.count
    }

    pub(super) fn contains(&self, user: UserId) -> bool {
        self.users.contains(&user)
    }

    /// Queue position of the last notification on its way, if any.
    pub(super) fn last_started(&self) -> Option<i64> {
        self.last_started
    }
}
