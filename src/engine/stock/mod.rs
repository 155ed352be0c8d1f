//! The stock figure the engine checks before every send, and the fence that makes
//! "once `SetStock(0)` has returned, nothing more is sent" exact (G3).
//!
//! Two capabilities: the [`StockCache`] holds the figure (the database is the source of
//! truth), and the [`StockFence`] delivers a batch only if the cached figure is above
//! zero, as one step that no stock write can split. In process the fence is a lock
//! per product; in Redis it is one script that checks the figure and publishes.

pub mod local;
pub mod redis;

use async_trait::async_trait;

use super::bus::SentBatch;
use crate::domain::{BackendError, ProductId};

/// Where the current stock of a product is cached.
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

/// What the fence did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The stock was above zero and the batch is on the bus.
    Delivered,
    /// The stock is zero or less: nothing was delivered.
    SoldOut,
    /// The cache holds no figure: nothing was delivered; fill it and try again.
    NotCached,
}

/// Held by a stock write from before the cached figure is dropped until the new one
/// is cached.
pub type WriteGuard = Box<dyn Send + Sync>;

/// Orders stock writes against deliveries of the same product (G3).
#[async_trait]
pub trait StockFence: Send + Sync + 'static {
    /// Taken by every stock write. When the write's guard is dropped, every delivery
    /// that saw the old figure is on the bus, and every later one sees the new figure.
    async fn lock_for_write(&self, product: ProductId) -> WriteGuard;

    /// Delivers `batch` to the bus if the cached stock of its product is above zero.
    async fn deliver(&self, batch: &SentBatch) -> Result<Delivery, BackendError>;
}
