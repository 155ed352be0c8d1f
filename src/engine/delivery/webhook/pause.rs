//! The pause a `Retry-After` asks for (G12): when the endpoint answers 429 or 503 with
//! `Retry-After`, no instance starts a request to it until the pause has passed. In
//! process for the embedded deployment; in Redis, a key with that expiry, for every
//! instance of a cluster. Expiries are counted by Redis's own clock, so instances whose
//! clocks differ still agree on when the pause ends.

use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::{Client, KeysInterface};
use fred::types::scripts::Script;
use tokio::time::Instant;

use crate::domain::{BackendError, Component};
use crate::redis::{Keys, backend};

/// Shared between the instances that send to one endpoint.
#[async_trait]
pub trait EndpointPause: Send + Sync + 'static {
    /// Pauses requests for `pause` from now, unless a longer pause is under way.
    async fn pause(&self, pause: Duration) -> Result<(), BackendError>;
    /// How long requests are still paused for; zero when they are not.
    async fn left(&self) -> Result<Duration, BackendError>;
}

/// The pause of one instance.
#[derive(Default)]
pub struct LocalPause {
    /// A std mutex: held for one comparison, never across an await.
    until: Mutex<Option<Instant>>,
}

#[async_trait]
impl EndpointPause for LocalPause {
    async fn pause(&self, pause: Duration) -> Result<(), BackendError> {
        let until = Instant::now() + pause;
        let mut held = self.until.lock().unwrap();
        if held.is_none_or(|held| held < until) {
            *held = Some(until);
        }
        Ok(())
    }

    async fn left(&self) -> Result<Duration, BackendError> {
        let held = *self.until.lock().unwrap();
        Ok(held.map_or(Duration::ZERO, |until| {
            until.saturating_duration_since(Instant::now())
        }))
    }
}

static PAUSE: LazyLock<Script> = LazyLock::new(|| Script::from_lua(include_str!("pause.lua")));

const STORE: Component = Component::WebhookPause;

/// The pause of every instance on one Redis prefix: a key that expires when it ends.
pub struct RedisPause {
    client: Client,
    keys: Keys,
}

impl RedisPause {
    pub fn new(client: Client, keys: Keys) -> Self {
        Self { client, keys }
    }
}

#[async_trait]
impl EndpointPause for RedisPause {
    async fn pause(&self, pause: Duration) -> Result<(), BackendError> {
        let millis = pause.as_millis().clamp(1, i64::MAX as u128) as i64;
        let _: i64 = PAUSE
            .evalsha_with_reload(
                &self.client,
                vec![self.keys.webhook_pause()],
                vec![millis.to_string()],
            )
            .await
            .map_err(|e| backend(STORE, e))?;
        Ok(())
    }

    async fn left(&self) -> Result<Duration, BackendError> {
        let left: i64 = self
            .client
            .pttl(self.keys.webhook_pause())
            .await
            .map_err(|e| backend(STORE, e))?;
        // -2: no pause; -1 (no expiry) never happens, as the script always sets one.
        Ok(Duration::from_millis(left.max(0) as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_local_pause_keeps_the_longer_of_two_and_ends() {
        let pause = LocalPause::default();
        assert_eq!(pause.left().await.unwrap(), Duration::ZERO);
        pause.pause(Duration::from_secs(5)).await.unwrap();
        pause.pause(Duration::from_secs(1)).await.unwrap();
        assert_eq!(pause.left().await.unwrap(), Duration::from_secs(5));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(pause.left().await.unwrap(), Duration::ZERO);
    }
}
