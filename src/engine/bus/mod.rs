//! The notification bus: how what a run sends reaches every `Subscribe` stream, on
//! every instance (G11), and how instances hear that a run ended.

pub mod local;
pub mod redis;

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::broadcast;

use crate::domain::{
    Attributes, BackendError, Notification, NotificationId, ProductId, RunStatus, UserId,
};

/// A run, as the bus names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RunKey {
    pub product_id: ProductId,
    pub restock_round: i64,
}

#[cfg(test)]
impl RunKey {
    /// Round `round` of product `product`: the tests' short way to name a run.
    pub(crate) fn of(product: i64, round: i64) -> Self {
        Self {
            product_id: ProductId::parse(product).unwrap(),
            restock_round: round,
        }
    }
}

/// One notification of a batch: who, and where in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentItem {
    pub user_id: UserId,
    pub position: i64,
}

/// Notifications a run sent together, in send order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentBatch {
    pub run: RunKey,
    /// Queue position of the notification the run sent just before this batch (`None`
    /// at the start of the run). A subscriber that has not seen that one knows it has a
    /// gap to fill from the record (G11), whatever the time it takes to be recorded.
    pub prev_position: Option<i64>,
    pub items: Vec<SentItem>,
    pub sent_at: DateTime<Utc>,
    /// The token of the claim the run was sent under (0 when unknown): it travels with
    /// the batch, so the shared side can refuse a batch of a superseded claim (G8).
    pub claim: i64,
    /// The run's attributes, carried once per batch and shared by its notifications.
    pub attributes: Attributes,
    /// The notifications as the API sends them, encoded once for every stream.
    pub encoded: Encoded,
}

impl SentBatch {
    pub fn new(
        run: RunKey,
        prev_position: Option<i64>,
        items: Vec<SentItem>,
        sent_at: DateTime<Utc>,
    ) -> Self {
        Self {
            run,
            prev_position,
            items,
            sent_at,
            claim: 0,
            attributes: Attributes::default(),
            encoded: Encoded::default(),
        }
    }

    /// The batch, carrying its run's attributes.
    pub fn with_attributes(mut self, attributes: Attributes) -> Self {
        self.attributes = attributes;
        self
    }

    /// A batch of `run` of `(user, position)` items: the tests' short way to write one.
    #[cfg(test)]
    pub(crate) fn of(
        run: RunKey,
        prev_position: Option<i64>,
        items: &[(i64, i64)],
        sent_at: DateTime<Utc>,
    ) -> Self {
        let items = items
            .iter()
            .map(|&(user, position)| SentItem {
                user_id: UserId::from_stored(user),
                position,
            })
            .collect();
        Self::new(run, prev_position, items, sent_at)
    }

    /// The batch, sent under the claim with this token.
    pub fn under_claim(mut self, token: i64) -> Self {
        self.claim = token;
        self
    }

    /// The notification of item `index`.
    pub fn notification(&self, index: usize) -> Notification {
        Notification {
            id: NotificationId {
                product_id: self.run.product_id,
                restock_round: self.run.restock_round,
                user_id: self.items[index].user_id,
            },
            sent_at: self.sent_at,
            attributes: self.attributes.clone(),
        }
    }

    /// The notifications, in send order.
    pub fn notifications(&self) -> impl Iterator<Item = Notification> + '_ {
        (0..self.items.len()).map(|index| self.notification(index))
    }
}

/// What travels on the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusEvent {
    /// A run delivered these notifications.
    Sent(Arc<SentBatch>),
    /// A run left this instance: it reached a final state, or was handed over. What it
    /// sent up to `last_position` is recorded.
    RunEnded {
        run: RunKey,
        status: RunStatus,
        last_position: Option<i64>,
    },
    /// This instance's feed from the shared bus lost events (it fell behind): every
    /// stream must end and resume from the record.
    Gap,
    /// This instance is shutting down: every stream ends. Never leaves the instance.
    Closing,
}

impl BusEvent {
    /// The product the event is about: its partition's channel carries it, after the
    /// run's batches (G11: in send order). None for events that stay on this instance.
    pub fn product(&self) -> Option<ProductId> {
        match self {
            BusEvent::Sent(batch) => Some(batch.run.product_id),
            BusEvent::RunEnded { run, .. } => Some(run.product_id),
            BusEvent::Gap | BusEvent::Closing => None,
        }
    }
}

/// A batch's notifications in the form the API sends them, made by the first stream
/// that sends the batch and shared by every other: with a thousand streams, a
/// notification is encoded once, and each stream only writes the bytes into its frame.
/// It is a cache: a clone starts empty, and two batches compare equal whatever it holds.
#[derive(Debug, Default)]
pub struct Encoded(OnceLock<Box<[Bytes]>>);

impl Encoded {
    /// The encoded notifications, in batch order; `encode` makes them the first time.
    pub fn get_or_init(&self, encode: impl FnOnce() -> Box<[Bytes]>) -> &[Bytes] {
        self.0.get_or_init(encode)
    }
}

impl Clone for Encoded {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for Encoded {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Encoded {}

/// Carries events to every subscriber of every instance.
#[async_trait]
pub trait NotificationBus: Send + Sync + 'static {
    /// Delivers an event to every instance. An error means it may not have been
    /// delivered; a run then ends `CANCELED_BY_ERROR` (G4).
    async fn publish(&self, event: BusEvent) -> Result<(), BackendError>;

    /// Everything published from now on, by any instance, in publish order.
    fn subscribe(&self) -> broadcast::Receiver<Arc<BusEvent>>;

    /// Sends [`BusEvent::Closing`] to this instance's subscribers. Streams learn of a
    /// shutdown this way, in the one place they wait anyway, rather than each also
    /// watching a shared token (with a thousand streams, that alone cost a tenth of the
    /// fan-out's CPU).
    fn close_streams(&self);
}
