//! The notification bus: how what a run sends reaches every `Subscribe` stream, on
//! every instance (G11), and how instances hear that a run ended.

pub mod local;
pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::broadcast;

use crate::domain::{BackendError, Notification, NotificationId, ProductId, RunStatus, UserId};

/// A run, as the bus names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RunKey {
    pub product_id: ProductId,
    pub restock_round: i64,
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
}

impl SentBatch {
    /// The notifications, in send order.
    pub fn notifications(&self) -> impl Iterator<Item = (i64, Notification)> + '_ {
        self.items.iter().map(|item| {
            (
                item.position,
                Notification {
                    id: NotificationId {
                        product_id: self.run.product_id,
                        restock_round: self.run.restock_round,
                        user_id: item.user_id,
                    },
                    sent_at: self.sent_at,
                },
            )
        })
    }
}

/// What travels on the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusEvent {
    /// A run delivered these notifications.
    Sent(SentBatch),
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
}

/// Carries events to every subscriber of every instance.
#[async_trait]
pub trait NotificationBus: Send + Sync + 'static {
    /// Delivers an event to every instance. An error means it may not have been
    /// delivered; a run then ends `CANCELED_BY_ERROR` (G4).
    async fn publish(&self, event: BusEvent) -> Result<(), BackendError>;

    /// Everything published from now on, by any instance, in publish order.
    fn subscribe(&self) -> broadcast::Receiver<Arc<BusEvent>>;
}
