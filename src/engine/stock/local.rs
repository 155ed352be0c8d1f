//! The in-process stock cache and fence, for one instance.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::RwLock;

use super::{
    AdmissionFence, Admitted, Delivery, Offered, StockCache, StockFence, StockFigure, WriteGuard,
};
use crate::domain::{BackendError, ProductId};
use crate::engine::bus::local::LocalBus;
use crate::engine::bus::{BusEvent, RunKey, SentBatch};

/// A map, for a single instance without Redis. Nothing is lost or arrives late in one
/// process, so an offer of a figure at least as new is trusted at once.
#[derive(Default)]
pub struct LocalStockCache {
    /// A std mutex: never held across an await, and held for one map operation.
    stock: Mutex<HashMap<ProductId, StockFigure>>,
}

#[async_trait]
impl StockCache for LocalStockCache {
    async fn get(&self, product: ProductId) -> Result<Option<StockFigure>, BackendError> {
        Ok(self.stock.lock().unwrap().get(&product).copied())
    }

    async fn offer(
        &self,
        product: ProductId,
        figure: StockFigure,
    ) -> Result<Offered, BackendError> {
        let mut stock = self.stock.lock().unwrap();
        match stock.get(&product) {
            Some(held) if held.version >= figure.version => Ok(Offered::Newer),
            _ => {
                stock.insert(product, figure);
                Ok(Offered::Newer)
            }
        }
    }

    async fn confirm(&self, _: ProductId, _: StockFigure, _: u64) -> Result<bool, BackendError> {
        Ok(true)
    }

    async fn invalidate(&self, product: ProductId) -> Result<(), BackendError> {
        self.stock.lock().unwrap().remove(&product);
        Ok(())
    }
}

/// Number of lock stripes. Products hash onto stripes, so unrelated products rarely
/// wait for each other, and memory stays fixed however many products there are.
const STRIPES: usize = 256;

/// The fence within one process: a read-write lock per stripe of products.
///
/// A delivery holds the read lock from the stock check until the batch is on the bus;
/// a stock write holds the write lock from before it drops the cached figure until the
/// new one is cached. So when a write below the threshold returns, every delivery that
/// saw the old stock is out, and every later check sees the new one. A tokio lock, not a std one: a writer
/// holds it across the database write.
pub struct LocalStockFence {
    stripes: Vec<Arc<RwLock<()>>>,
    cache: Arc<dyn StockCache>,
    bus: Arc<LocalBus>,
    /// Per run, the claim and queue position of the last batch delivered (G1): a run
    /// sends a batch before the one before it was answered, and a batch refused (sold
    /// out, say) must not be overtaken by the next one if the stock came back between.
    /// A std mutex, held for one map operation. At most [`CHAINS_KEPT`] runs: past
    /// that the map starts afresh, and a run whose chain is gone registers its claim
    /// again, as in Redis.
    chains: Mutex<HashMap<RunKey, (i64, Option<i64>)>>,
}

/// Runs whose chain the in-process fence keeps, at most: far more than run at once.
const CHAINS_KEPT: usize = 4_096;

impl LocalStockFence {
    pub fn new(cache: Arc<dyn StockCache>, bus: Arc<LocalBus>) -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Arc::new(RwLock::new(()))).collect(),
            cache,
            bus,
            chains: Mutex::new(HashMap::new()),
        }
    }

    fn stripe(&self, product: ProductId) -> &Arc<RwLock<()>> {
        &self.stripes[product.get().unsigned_abs() as usize % STRIPES]
    }
}

#[async_trait]
impl StockFence for LocalStockFence {
    async fn lock_for_write(&self, product: ProductId) -> WriteGuard {
        Box::new(self.stripe(product).clone().write_owned().await)
    }

    /// In one process a claim never travels: a run task only delivers while its lease
    /// keeper says its claim may still be the newest (G8), and nothing it sent can
    /// arrive after it stopped. So this only starts the run's chain at `at`.
    async fn claim(&self, run: RunKey, claim: i64, at: Option<i64>) -> Result<bool, BackendError> {
        let mut chains = self.chains.lock().unwrap();
        if chains.len() >= CHAINS_KEPT && !chains.contains_key(&run) {
            chains.clear();
        }
        chains.insert(run, (claim, at));
        Ok(true)
    }

    async fn deliver(&self, batch: &SentBatch) -> Result<Delivery, BackendError> {
        let _no_stock_write = self.stripe(batch.run.product_id).read().await;
        match self.cache.get(batch.run.product_id).await? {
            None => Ok(Delivery::NotCached),
            Some(figure) if !figure.in_stock() => Ok(Delivery::SoldOut),
            Some(_) => {
                let mut chains = self.chains.lock().unwrap();
                let Some(chain) = chains.get_mut(&batch.run) else {
                    return Ok(Delivery::ClaimUnknown);
                };
                if *chain != (batch.claim, batch.prev_position) {
                    return Ok(Delivery::OutOfOrder);
                }
                chain.1 = batch.items.last().map(|item| item.position).or(chain.1);
                self.bus.send(BusEvent::Sent(Arc::new(batch.clone())));
                Ok(Delivery::Through(()))
            }
        }
    }
}

#[async_trait]
impl AdmissionFence for LocalStockFence {
    /// The pass is the stripe's read lock, held until the requests are sent: a stock
    /// write waits for it before it writes anything. In one process a pass cannot be
    /// lost, so `ttl` is the sender's promise alone. A claim older than the newest
    /// registered for the run (an erasure took the run from its owner) is refused.
    async fn admit(
        &self,
        run: RunKey,
        claim: i64,
        _ttl: Duration,
    ) -> Result<Admitted, BackendError> {
        let pass = self.stripe(run.product_id).clone().read_owned().await;
        let newest = self.chains.lock().unwrap().get(&run).map(|chain| chain.0);
        if newest.is_some_and(|newest| newest > claim) {
            return Ok(Admitted::Superseded);
        }
        Ok(match self.cache.get(run.product_id).await? {
            None => Admitted::NotCached,
            Some(figure) if !figure.in_stock() => Admitted::SoldOut,
            Some(_) => Admitted::Through(Box::new(pass)),
        })
    }

    async fn publish(&self, batch: &SentBatch) -> Result<Delivery, BackendError> {
        self.bus.send(BusEvent::Sent(Arc::new(batch.clone())));
        Ok(Delivery::Through(()))
    }

    /// The write held the stripe's write lock, so every pass was dropped before it.
    async fn wait_for_admissions(&self, _product: ProductId) -> Result<(), BackendError> {
        Ok(())
    }
}
