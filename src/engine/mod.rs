//! The restock engine: starts, drives and resumes notification runs, and owns the
//! rules that tie the store, the stock cache, the send limiter and the bus together.
//! The gRPC layer calls into it; it knows nothing of tonic.

pub mod bus;
pub mod limiter;
mod run;
pub mod stock;
pub mod subscription;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::domain::{Alert, Error, Product, ProductId, Run, UserId};
use crate::store::{ClaimedRun, Store};
use bus::NotificationBus;
use limiter::SendLimiter;
use stock::{StockCache, StockGate};

/// Runs a state change to its end even if the caller goes away.
///
/// A gRPC handler's future is dropped when the client cancels or its deadline passes.
/// Dropped between "run committed" and "run task spawned", a trigger would leave a run
/// `IN_PROGRESS` with nobody driving it; dropped between the database write and the
/// cache write, a stock change would be half done. On a task of its own, the sequence
/// always completes; only the answer may go unheard.
async fn run_to_completion<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, Error>> + Send + 'static,
) -> Result<T, Error> {
    tokio::spawn(work).await.unwrap_or_else(|join| {
        Err(Error::Backend(crate::domain::BackendError::new(
            "service",
            false,
            anyhow::anyhow!("state change task failed: {join}"),
        )))
    })
}

/// Tunables of the engine. The defaults suit production; tests shrink some of them.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Registrations read per keyset page.
    pub page_size: u32,
    /// Sent notifications recorded per transaction, at most.
    pub batch_size: usize,
    /// A sent notification waits at most about this long to be recorded.
    pub flush_interval: Duration,
    /// How long a run stays claimed without being renewed. A run whose process died
    /// is marked `CANCELED_BY_ERROR` once its lease has expired.
    pub lease: Duration,
    /// How often abandoned runs are looked for.
    pub reap_interval: Duration,
    /// Notifications a subscriber may fall behind before its stream is ended.
    pub subscriber_buffer: usize,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            page_size: 1_000,
            batch_size: 500,
            flush_interval: Duration::from_millis(100),
            lease: Duration::from_secs(10),
            reap_interval: Duration::from_secs(5),
            subscriber_buffer: 4_096,
        }
    }
}

/// The backing parts of the engine, each behind its trait.
pub struct Backends {
    pub store: Arc<dyn Store>,
    pub stock: Arc<dyn StockCache>,
    pub limiter: Arc<dyn SendLimiter>,
    pub bus: Arc<dyn NotificationBus>,
}

pub struct Engine {
    store: Arc<dyn Store>,
    stock: Arc<dyn StockCache>,
    limiter: Arc<dyn SendLimiter>,
    bus: Arc<dyn NotificationBus>,
    gate: StockGate,
    settings: EngineSettings,
    /// Cancelled when the service shuts down: runs stop and streams end.
    shutdown: CancellationToken,
    /// Every run task, so shutdown can wait until each has left a resumable state.
    runs: TaskTracker,
}

impl Engine {
    pub fn new(backends: Backends, settings: EngineSettings) -> Arc<Self> {
        Arc::new(Self {
            store: backends.store,
            stock: backends.stock,
            limiter: backends.limiter,
            bus: backends.bus,
            gate: StockGate::default(),
            settings,
            shutdown: CancellationToken::new(),
            runs: TaskTracker::new(),
        })
    }

    /// Cancelled when the service is shutting down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Sets a product's stock. Once this returns, every later stock check sees the new
    /// figure (G3).
    pub async fn set_stock(
        self: &Arc<Self>,
        product: ProductId,
        stock: i64,
    ) -> Result<Product, Error> {
        let engine = self.clone();
        run_to_completion(async move {
            let _exclusive = engine.gate.write(product).await;
            engine.uncache_stock(product).await?;
            let saved = engine.store.set_stock(product, stock).await?;
            engine.cache_stock(product, stock).await;
            Ok(saved)
        })
        .await
    }

    /// Drops the cached figure before the database is written: if the cache cannot be
    /// reached, nothing is written and the caller hears so; if it can, no stale figure
    /// can outlive the write, whatever happens next.
    async fn uncache_stock(&self, product: ProductId) -> Result<(), Error> {
        self.stock.invalidate(product).await.map_err(Error::from)
    }

    /// Caches the figure just written. Failing is harmless (the next check misses and
    /// reads the database), so it is only logged.
    async fn cache_stock(&self, product: ProductId, stock: i64) {
        if let Err(err) = self.stock.set(product, stock).await {
            tracing::warn!(%product, error = ?err, "stock saved; the cache reloads it on the next check");
        }
    }

    pub async fn register_alert(&self, product: ProductId, user: UserId) -> Result<Alert, Error> {
        self.store.register_alert(product, user).await
    }

    pub async fn cancel_alert(&self, product: ProductId, user: UserId) -> Result<Alert, Error> {
        self.store.cancel_alert(product, user).await
    }

    /// Starts the product's next round and returns at once; the run goes on in the
    /// background.
    pub async fn trigger_restock(
        self: &Arc<Self>,
        product: ProductId,
        stock: Option<i64>,
    ) -> Result<Run, Error> {
        self.refuse_if_shutting_down()?;
        let engine = self.clone();
        run_to_completion(async move {
            let lease = engine.settings.lease;
            let claimed = match stock {
                Some(stock) => {
                    let _exclusive = engine.gate.write(product).await;
                    engine.uncache_stock(product).await?;
                    let claimed = engine.store.start_run(product, Some(stock), lease).await?;
                    engine.cache_stock(product, stock).await;
                    claimed
                }
                None => engine.store.start_run(product, None, lease).await?,
            };
            Ok(engine.spawn_run(claimed))
        })
        .await
    }

    /// Resumes a `CANCELED_BY_ERROR` run from the user after its last recorded one (G6).
    pub async fn manual_restock(self: &Arc<Self>, product: ProductId) -> Result<Run, Error> {
        self.refuse_if_shutting_down()?;
        let engine = self.clone();
        run_to_completion(async move {
            let claimed = engine
                .store
                .resume_run(product, engine.settings.lease)
                .await?;
            Ok(engine.spawn_run(claimed))
        })
        .await
    }

    pub async fn restock_run(&self, product: ProductId, round: Option<i64>) -> Result<Run, Error> {
        if let Some(run) = self.store.run(product, round).await? {
            return Ok(run);
        }
        if self.store.product(product).await?.is_none() {
            return Err(Error::NotFound(format!(
                "product {product} does not exist; create it with SetStock first"
            )));
        }
        Err(Error::NotFound(match round {
            Some(round) => format!(
                "product {product} has no restock round {round}; omit restock_round for the \
                 latest run"
            ),
            None => format!(
                "product {product} has never been restocked; start a run with TriggerRestock"
            ),
        }))
    }

    fn refuse_if_shutting_down(&self) -> Result<(), Error> {
        if self.shutdown.is_cancelled() {
            return Err(Error::Backend(crate::domain::BackendError::new(
                "service",
                true,
                anyhow::anyhow!("shutting down"),
            )));
        }
        Ok(())
    }

    fn spawn_run(self: &Arc<Self>, claimed: ClaimedRun) -> Run {
        let run = claimed.run.clone();
        self.runs.spawn(run::drive(self.clone(), claimed));
        run
    }

    /// Marks abandoned runs now and then, until shutdown. Runs in the background.
    pub fn spawn_reaper(self: &Arc<Self>) {
        let engine = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(engine.settings.reap_interval);
            loop {
                tokio::select! {
                    _ = engine.shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                match engine.store.expire_abandoned_runs().await {
                    Ok(0) => {}
                    Ok(n) => tracing::warn!(
                        runs = n,
                        "runs abandoned by a dead process marked CANCELED_BY_ERROR; \
                         resume them with ManualRestock"
                    ),
                    Err(err) => tracing::warn!(error = ?err, "cannot look for abandoned runs"),
                }
            }
        });
    }

    /// Stops every run and waits (up to `grace`) until each has recorded what it sent
    /// and left a resumable state.
    pub async fn shutdown(&self, grace: Duration) {
        self.shutdown.cancel();
        self.runs.close();
        if tokio::time::timeout(grace, self.runs.wait()).await.is_err() {
            tracing::warn!(
                "some runs did not stop in time; their leases expire and they are marked \
                 CANCELED_BY_ERROR at the next start"
            );
        }
    }
}
