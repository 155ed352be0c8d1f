//! The stock figure the engine checks before every send, and the gate that makes
//! "once `SetStock(0)` has returned, nothing more is sent" exact (G3).

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::domain::{BackendError, ProductId};

/// Where the current stock of a product is cached (Redis in production).
#[async_trait]
pub trait StockCache: Send + Sync + 'static {
    /// The cached stock, or `None` on a miss.
    async fn get(&self, product: ProductId) -> Result<Option<i64>, BackendError>;
    /// Caches the stock.
    async fn set(&self, product: ProductId, stock: i64) -> Result<(), BackendError>;
    /// Caches a figure just read from the database, unless the cache already holds one
    /// (written meanwhile by a stock change, which is newer); returns the figure the
    /// cache holds afterwards.
    async fn fill(&self, product: ProductId, stock: i64) -> Result<i64, BackendError>;
    /// Drops the cached figure so the next read goes to the database.
    async fn invalidate(&self, product: ProductId) -> Result<(), BackendError>;
}

/// Number of lock stripes. Products hash onto stripes, so unrelated products rarely
/// wait for each other, and memory stays fixed however many products there are.
const STRIPES: usize = 256;

/// Orders stock writes against sends of the same product, within this process.
///
/// A send holds a stripe's read lock from the stock check until the notification is
/// handed to the bus; a stock write holds the write lock from before it writes until
/// the cache is updated. So when a write of 0 returns, every send that saw the old
/// stock is already out, and every later check sees 0. A tokio lock, not a std one,
/// because the holder awaits Redis and the bus while holding it.
pub struct StockGate {
    stripes: Vec<RwLock<()>>,
}

impl Default for StockGate {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
        }
    }
}

impl StockGate {
    fn stripe(&self, product: ProductId) -> &RwLock<()> {
        &self.stripes[product.get().unsigned_abs() as usize % STRIPES]
    }

    /// Held while checking the stock and sending.
    pub async fn send(&self, product: ProductId) -> RwLockReadGuard<'_, ()> {
        self.stripe(product).read().await
    }

    /// Held while writing the stock.
    pub async fn write(&self, product: ProductId) -> RwLockWriteGuard<'_, ()> {
        self.stripe(product).write().await
    }
}

/// In-process stock cache: a map, for tests and single-instance use without Redis.
#[derive(Default)]
pub struct LocalStockCache {
    stock: std::sync::Mutex<std::collections::HashMap<ProductId, i64>>,
}

#[async_trait]
impl StockCache for LocalStockCache {
    async fn get(&self, product: ProductId) -> Result<Option<i64>, BackendError> {
        Ok(self.stock.lock().unwrap().get(&product).copied())
    }

    async fn set(&self, product: ProductId, stock: i64) -> Result<(), BackendError> {
        self.stock.lock().unwrap().insert(product, stock);
        Ok(())
    }

    async fn fill(&self, product: ProductId, stock: i64) -> Result<i64, BackendError> {
        Ok(*self.stock.lock().unwrap().entry(product).or_insert(stock))
    }

    async fn invalidate(&self, product: ProductId) -> Result<(), BackendError> {
        self.stock.lock().unwrap().remove(&product);
        Ok(())
    }
}

/// Shared handle type used by the engine.
pub type SharedStockCache = Arc<dyn StockCache>;
