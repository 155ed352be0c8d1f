//! The shared Redis the tests use, and joining a prefix's bus on it as an instance does.

use std::sync::Arc;

use restock_notifier::engine::bus::local::LocalBus;
use restock_notifier::engine::bus::redis::RedisBus;
use restock_notifier::redis::Keys;

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The Redis of a shared implementation and keys under a fresh prefix on it, as the
/// service builds them there: sharded on a cluster.
pub async fn redis_of(implementation: super::Implementation) -> (String, Keys) {
    let keys = Keys::new(format!("restock-test:{:016x}:", rand::random::<u64>()));
    match implementation {
        super::Implementation::RedisCluster => {
            (super::shared_cluster().await.url(), keys.sharded(true))
        }
        _ => (redis_url(), keys),
    }
}

/// A client of the shared Redis and the notification bus of `keys`' prefix on it, as an
/// instance joins it (its streams fed through a local bus of `buffer` events).
pub async fn join_redis_bus(keys: &Keys, buffer: usize) -> (fred::prelude::Client, RedisBus) {
    join_redis_bus_at(&redis_url(), keys, buffer).await
}

/// As [`join_redis_bus`], on the Redis (or Redis Cluster) at `url`.
pub async fn join_redis_bus_at(
    url: &str,
    keys: &Keys,
    buffer: usize,
) -> (fred::prelude::Client, RedisBus) {
    let client = restock_notifier::redis::connect(url).await.unwrap();
    let subscriber = restock_notifier::redis::connect_subscriber(url)
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
