//! The stock cache and fence in Redis, shared by every instance (G3, G11).

use async_trait::async_trait;
use bytes::Bytes;
use fred::prelude::{Client, Expiration, KeysInterface, LuaInterface, SetOptions};

use super::{Delivery, StockCache, StockFence, WriteGuard};
use crate::domain::{BackendError, ProductId};
use crate::engine::bus::SentBatch;
use crate::engine::bus::redis::encode_sent;
use crate::redis::{Keys, backend};

const STORE: &str = "stock cache (Redis)";

/// A cached stock figure lives this long without a write. The database is the source of
/// truth; the expiry bounds how long a figure could stay stale if a write to Redis was
/// lost while Redis was failing.
const STOCK_TTL_SECS: i64 = 300;

/// The stock cache in Redis: one string key per product.
pub struct RedisStockCache {
    client: Client,
    keys: Keys,
}

impl RedisStockCache {
    pub fn new(client: Client, keys: Keys) -> Self {
        Self { client, keys }
    }
}

#[async_trait]
impl StockCache for RedisStockCache {
    async fn get(&self, product: ProductId) -> Result<Option<i64>, BackendError> {
        self.client
            .get::<Option<i64>, _>(self.keys.stock(product))
            .await
            .map_err(|e| backend(STORE, e))
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
            .map_err(|e| backend(STORE, e))
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
            .map_err(|e| backend(STORE, e))?;
        if written.is_some() {
            return Ok(stock);
        }
        // Someone cached a figure first: theirs is at least as new as ours.
        let cached: Option<i64> = self.client.get(&key).await.map_err(|e| backend(STORE, e))?;
        Ok(cached.unwrap_or(stock))
    }

    async fn invalidate(&self, product: ProductId) -> Result<(), BackendError> {
        self.client
            .del::<i64, _>(self.keys.stock(product))
            .await
            .map(|_| ())
            .map_err(|e| backend(STORE, e))
    }
}

/// Checks the cached figure and publishes the batch on the bus channel in one script.
/// Redis runs a script as one step, so a stock write from any instance comes either
/// before it (the script sees the new figure and publishes nothing) or after it (the
/// batch is already on the bus): once `SetStock(0)` has returned anywhere, no instance
/// publishes another notification of that product (G3). Returns 1 delivered, 0 sold
/// out, -1 not cached.
const DELIVER_IF_IN_STOCK: &str = r#"
local stock = redis.call('GET', KEYS[1])
if not stock then return -1 end
if tonumber(stock) <= 0 then return 0 end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"#;

/// The fence of every instance: the check and the delivery are one Redis script.
pub struct RedisStockFence {
    client: Client,
    keys: Keys,
}

impl RedisStockFence {
    pub fn new(client: Client, keys: Keys) -> Self {
        Self { client, keys }
    }
}

#[async_trait]
impl StockFence for RedisStockFence {
    /// Nothing to hold: the script is atomic against the writer's `SET`, which is the
    /// last step of a stock write, on whichever instance.
    async fn lock_for_write(&self, _product: ProductId) -> WriteGuard {
        Box::new(())
    }

    async fn deliver(&self, batch: &SentBatch) -> Result<Delivery, BackendError> {
        let payload: Bytes = encode_sent(batch);
        let outcome: i64 = self
            .client
            .eval(
                DELIVER_IF_IN_STOCK,
                vec![self.keys.stock(batch.run.product_id)],
                vec![
                    fred::types::Value::from(self.keys.bus_channel()),
                    fred::types::Value::Bytes(payload),
                ],
            )
            .await
            .map_err(|e| backend("notification bus (Redis)", e))?;
        Ok(match outcome {
            1 => Delivery::Delivered,
            0 => Delivery::SoldOut,
            _ => Delivery::NotCached,
        })
    }
}
