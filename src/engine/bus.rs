//! The notification bus: how sent notifications reach `Subscribe` streams.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::domain::{BackendError, Notification};

/// Delivers notifications to every live subscriber.
#[async_trait]
pub trait NotificationBus: Send + Sync + 'static {
    /// Delivers a batch, in order. An error means the batch may not have been delivered;
    /// the run then ends `CANCELED_BY_ERROR` (G4).
    async fn publish(&self, batch: &[Notification]) -> Result<(), BackendError>;

    /// A new subscription to everything published from now on.
    fn subscribe(&self) -> broadcast::Receiver<Arc<Notification>>;
}

/// In-process fan-out over a tokio broadcast channel.
///
/// The channel is a fixed ring shared by all subscribers, and each subscriber keeps
/// only its own position in it: that is the bounded per-stream buffer of G9. The
/// publisher never waits for anyone; a subscriber that falls more than `capacity`
/// behind finds out on its next read (`Lagged`) and its stream is ended.
pub struct LocalBus {
    sender: broadcast::Sender<Arc<Notification>>,
}

impl LocalBus {
    pub fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        Self { sender }
    }
}

#[async_trait]
impl NotificationBus for LocalBus {
    async fn publish(&self, batch: &[Notification]) -> Result<(), BackendError> {
        for notification in batch {
            // An error only means nobody is subscribed right now, which is fine.
            let _ = self.sender.send(Arc::new(notification.clone()));
        }
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<Notification>> {
        self.sender.subscribe()
    }
}
