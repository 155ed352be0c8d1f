//! The shared Redis the tests use, and joining a prefix's bus on it as an instance does.

use std::sync::Arc;

use restock_notifier::engine::bus::local::LocalBus;
use restock_notifier::engine::bus::redis::RedisBus;
use restock_notifier::redis::Keys;

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A client of the shared Redis and the notification bus of `keys`' prefix on it, as an
/// instance joins it (its streams fed through a local bus of `buffer` events).
pub async fn join_redis_bus(keys: &Keys, buffer: usize) -> (fred::prelude::Client, RedisBus) {
    let client = restock_notifier::redis::connect(&redis_url())
        .await
        .unwrap();
    let subscriber = restock_notifier::redis::connect_subscriber(&redis_url())
        .await
        .unwrap();
    let bus = RedisBus::start(
        client.clone(),
        subscriber,
        keys.clone(),
        Arc::new(LocalBus::new(buffer)),
    )
    .await
    .unwrap();
    (client, bus)
}
