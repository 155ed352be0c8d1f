//! Redis through fred: the stock cache. Every key is built by [`Keys`], under the
//! configured prefix, so several deployments (or tests) can share one Redis.

use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use fred::prelude::{
    Builder, ClientLike, Config, Error as RedisError, ErrorKind, Expiration, KeysInterface,
    ReconnectPolicy, SetOptions,
};

use crate::domain::{BackendError, ProductId};
use crate::engine::stock::StockCache;

const STORE: &str = "stock cache (Redis)";

/// A cached stock figure lives this long without a write. The database is the source of
/// truth; the expiry bounds how long a figure could stay stale if a write to Redis was
/// lost while Redis was failing.
const STOCK_TTL_SECS: i64 = 300;

/// Builds every Redis key of the service.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn stock(&self, product: ProductId) -> String {
        format!("{}stock:{}", self.prefix, product)
    }
}

/// A connected fred client with the service's timeouts.
pub async fn connect(url: &str) -> anyhow::Result<fred::prelude::Client> {
    // fred reads any scheme it does not know as a plain server address; refuse early.
    if !url.starts_with("redis://") {
        anyhow::bail!("REDIS_URL has an unsupported scheme: use redis://host:port");
    }
    let config = Config::from_url(url).context("REDIS_URL is not a valid redis:// URL")?;
    let client = Builder::from_config(config)
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(2);
            c.internal_command_timeout = Duration::from_secs(2);
            c.max_command_attempts = 2;
        })
        .with_performance_config(|p| {
            // Fail a command instead of queueing it forever while Redis is down: the
            // engine turns the error into CANCELED_BY_ERROR, the API into UNAVAILABLE.
            p.default_command_timeout = Duration::from_secs(2);
        })
        .set_policy(ReconnectPolicy::new_constant(0, 500))
        .build()
        .context("cannot build the Redis client for REDIS_URL")?;
    let reachable = async {
        client.init().await?;
        // With a reconnect policy, init() can succeed before any connection exists;
        // a round trip proves the server answers.
        client.ping::<String>(None).await
    };
    tokio::time::timeout(Duration::from_secs(5), reachable)
        .await
        .context("timed out connecting to REDIS_URL")?
        .context("cannot connect to REDIS_URL")?;
    Ok(client)
}

fn backend(err: RedisError) -> BackendError {
    let unavailable = matches!(
        err.kind(),
        ErrorKind::IO | ErrorKind::Timeout | ErrorKind::Canceled
    );
    BackendError::new(STORE, unavailable, err)
}

/// The stock cache in Redis: one string key per product.
pub struct RedisStockCache {
    client: fred::prelude::Client,
    keys: Keys,
}

impl RedisStockCache {
    pub fn new(client: fred::prelude::Client, keys: Keys) -> Self {
        Self { client, keys }
    }
}

#[async_trait]
impl StockCache for RedisStockCache {
    async fn get(&self, product: ProductId) -> Result<Option<i64>, BackendError> {
        self.client
            .get::<Option<i64>, _>(self.keys.stock(product))
            .await
            .map_err(backend)
    }

    async fn set(&self, product: ProductId, stock: i64) -> Result<(), BackendError> {
        self.client
            .set::<(), _, _>(
                self.keys.stock(product),
                stock,
                Some(Expiration::EX(STOCK_TTL_SECS)),
                None,
                false,
            )
            .await
            .map_err(backend)
    }

    async fn fill(&self, product: ProductId, stock: i64) -> Result<i64, BackendError> {
        let key = self.keys.stock(product);
        let written: Option<String> = self
            .client
            .set(
                &key,
                stock,
                Some(Expiration::EX(STOCK_TTL_SECS)),
                Some(SetOptions::NX),
                false,
            )
            .await
            .map_err(backend)?;
        if written.is_some() {
            return Ok(stock);
        }
        // Someone cached a figure first: theirs is at least as new as ours.
        let cached: Option<i64> = self.client.get(&key).await.map_err(backend)?;
        Ok(cached.unwrap_or(stock))
    }

    async fn invalidate(&self, product: ProductId) -> Result<(), BackendError> {
        self.client
            .del::<i64, _>(self.keys.stock(product))
            .await
            .map(|_| ())
            .map_err(backend)
    }
}
