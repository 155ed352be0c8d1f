//! The in-process bus: one instance's runs to that instance's streams.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::{BusEvent, NotificationBus};
use crate::domain::BackendError;

/// Fan-out over a tokio broadcast channel.
///
/// The channel is a fixed ring shared by all subscribers, and each subscriber keeps
/// only its own position in it: that is the bounded per-stream buffer of G9. The
/// publisher never waits for anyone; a subscriber that falls more than `capacity`
/// events behind finds out on its next read (`Lagged`) and its stream is ended.
pub struct LocalBus {
    sender: broadcast::Sender<Arc<BusEvent>>,
}

impl LocalBus {
    pub fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        Self { sender }
    }

    /// Hands an event to this instance's streams. Never fails: nobody listening is fine.
    pub fn send(&self, event: BusEvent) {
        let _ = self.sender.send(Arc::new(event));
    }
}

#[async_trait]
impl NotificationBus for LocalBus {
    async fn publish(&self, event: BusEvent) -> Result<(), BackendError> {
        self.send(event);
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<BusEvent>> {
        self.sender.subscribe()
    }

    fn close_streams(&self) {
        self.send(BusEvent::Closing);
    }
}
