//! The restock engine: starts, drives and resumes notification runs, and owns the
//! rules that tie the store, the stock cache, the send limiter and the bus together.
//! The gRPC layer calls into it; it knows nothing of tonic.

pub mod bus;
pub mod clock;
pub(crate) mod delivery;
pub mod erasure;
pub mod lease;
pub mod limiter;
pub mod recorder;
mod run;
pub mod stock;
pub mod subscription;
pub mod watch;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::domain::{
    Alert, AlertFilter, AlertPage, AlertPageToken, AlertStatus, Error, PageToken, Product,
    ProductId, ProductOrder, ProductPage, ProductPageToken, Run, RunFilter, RunPage,
    TriggerRequest, UserId,
};
use crate::monitoring::Metrics;
use crate::store::{ClaimedRun, Store, Triggered};
use bus::{BusEvent, NotificationBus};
use delivery::Channel;
use lease::LeaseSettings;
use limiter::SendLimiter;
use recorder::RecorderSettings;
use stock::{Offered, StockCache, StockFence, StockFigure};

/// How often caching a stock figure is tried before giving up: each try fails only
/// because a stock write came in between, so a few are plenty.
const CACHE_STOCK_ATTEMPTS: usize = 5;

/// A page cut from `listed`, read one longer than `page_size`, and whether another
/// page follows: so the last page never hands out a token that leads to an empty one.
fn one_page<T>(mut listed: Vec<T>, page_size: u32) -> (Vec<T>, bool) {
    let more = listed.len() > page_size as usize;
    listed.truncate(page_size as usize);
    (listed, more)
}

/// A product's stock as the cache holds it.
fn figure_of(product: &Product) -> StockFigure {
    StockFigure {
        stock: product.stock,
        min_stock: product.min_stock,
        version: product.stock_version,
    }
}

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
            crate::domain::Component::Service,
            false,
            anyhow::anyhow!("state change task failed: {join}"),
        )))
    })
}

/// G9: a page of registrations is read about this often at the send rate, so a
/// cancellation made after its page was read is still honoured within that time.
const PAGES_PER_SECOND: u32 = 5;

/// G9: the smallest page, at low send rates: a few reads a second whatever the rate,
/// rather than one per handful of sends.
const MIN_PAGE_SIZE: u32 = 50;

/// G9: the largest page, and the default: what a run holds in memory at once does not
/// grow with the send rate past this.
const MAX_PAGE_SIZE: u32 = 1_000;

/// Settings of the engine. The defaults suit production; tests shrink some of them.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Registrations read per keyset page: a fifth of a second's worth at the send rate,
    /// 50 to 1,000 (G9), so a cancellation is honoured within about that time.
    pub page_size: u32,
    pub recorder: RecorderSettings,
    pub lease: LeaseSettings,
    /// Bus events a subscriber may fall behind before its stream is ended (G9): 4,096
    /// batches, a few seconds of a busy run, so a reader that keeps up is never cut off
    /// by a burst, while a stalled one costs a bounded buffer.
    pub subscriber_buffer: usize,
    /// Per-user history of rounds ended longer ago is deleted (`None`: kept).
    pub history_retention: Option<std::time::Duration>,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            page_size: MAX_PAGE_SIZE,
            recorder: RecorderSettings::default(),
            lease: LeaseSettings::default(),
            subscriber_buffer: 4_096,
            history_retention: None,
        }
    }
}

impl EngineSettings {
    /// The settings `config` asks for: the defaults, with its lease and bounded by its
    /// send rate (see [`EngineSettings::with_config`]).
    pub fn from_config(config: &Config) -> Self {
        Self::default().with_config(config)
    }

    /// These settings with the lease of `config` (`RESTOCK_RUN_LEASE`), and what depends
    /// on the send rate (`RESTOCK_SEND_RATE`) bounded by it: a page is at most a fifth of
    /// a second's worth (G9), and never more than a second's worth of sends is
    /// unrecorded (G10). A setting already smaller (a test's) stays.
    pub fn with_config(mut self, config: &Config) -> Self {
        let rate = config.send_rate.get();
        self.page_size = self
            .page_size
            .min((rate / PAGES_PER_SECOND).clamp(MIN_PAGE_SIZE, MAX_PAGE_SIZE));
        self.lease = self.lease.with_lease(config.run_lease);
        self.history_retention = config.history_retention;
        self.recorder.unrecorded_bound = self.recorder.unrecorded_bound.min(rate as usize);
        self
    }
}

/// The outside capabilities the engine needs, each behind its trait; `Deployment`
/// picks the implementations (in process, or shared through Redis), and the channel.
pub(crate) struct Capabilities {
    pub stock_cache: Arc<dyn StockCache>,
    pub stock_fence: Arc<dyn StockFence>,
    pub limiter: Arc<dyn SendLimiter>,
    pub bus: Arc<dyn NotificationBus>,
    /// Where notifications go: the stream, or a webhook endpoint (G12).
    pub channel: Arc<dyn Channel>,
}

pub struct Engine {
    store: Arc<dyn Store>,
    stock_cache: Arc<dyn StockCache>,
    stock_fence: Arc<dyn StockFence>,
    limiter: Arc<dyn SendLimiter>,
    bus: Arc<dyn NotificationBus>,
    channel: Arc<dyn Channel>,
    settings: EngineSettings,
    metrics: Arc<Metrics>,
    /// Cancelled when the service shuts down: runs stop and streams end.
    shutdown: CancellationToken,
    /// Every run task, so shutdown can wait until each has released its run.
    runs: TaskTracker,
    /// What notifications are stamped with: the database's clock (G11).
    clock: Arc<clock::SharedClock>,
}

impl Engine {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        capabilities: Capabilities,
        settings: EngineSettings,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            stock_cache: capabilities.stock_cache,
            stock_fence: capabilities.stock_fence,
            limiter: capabilities.limiter,
            bus: capabilities.bus,
            channel: capabilities.channel,
            settings,
            metrics,
            shutdown: CancellationToken::new(),
            runs: TaskTracker::new(),
            clock: Arc::default(),
        })
    }

    /// Measures this host's clock against the database's before the first run, then
    /// keeps measuring in the background until shutdown (G11).
    pub async fn start_clock(&self) -> Result<(), Error> {
        self.clock.sync(self.store.as_ref()).await?;
        self.clock
            .spawn_sync(self.store.clone(), self.shutdown.clone());
        Ok(())
    }

    /// Sets a product's stock, and its threshold if `min_stock` is given. Once this
    /// returns, every later delivery of any instance sees the new figure (G3).
    pub async fn set_stock(
        self: &Arc<Self>,
        product: ProductId,
        stock: i64,
        min_stock: Option<i64>,
    ) -> Result<Product, Error> {
        let engine = self.clone();
        run_to_completion(async move {
            let _exclusive = engine.stock_fence.lock_for_write(product).await;
            engine.uncache_stock(product).await?;
            let saved = engine.store.set_stock(product, stock, min_stock).await?;
            engine.cache_stock(product, Some(figure_of(&saved))).await?;
            if !saved.in_stock() {
                // G3: what the channel let through before the figure was cached has
                // started before this returns.
                engine.channel.drain_passes(product).await?;
            }
            Ok(saved)
        })
        .await
    }

    /// Drops the cached figure before the database is written: if the cache cannot be
    /// reached, nothing is written and the caller hears so; if it can, no stale figure
    /// can outlive the write, whatever happens next.
    async fn uncache_stock(&self, product: ProductId) -> Result<(), Error> {
        self.stock_cache
            .invalidate(product)
            .await
            .map_err(Error::from)
    }

    /// Caches the database's figure: after a stock write (if that fails the caller
    /// hears so; the figure is saved and a retry is harmless), and after a miss. The
    /// figure is offered with its version and confirmed only if the database, read
    /// again, still holds that version; otherwise a stock write came in between and
    /// its figure is cached instead. So whatever reaches the cache late, and whatever
    /// the cache loses meanwhile, a figure older than a returned write is never trusted
    /// again (G3).
    /// `known` is a figure just read from the database (by the write itself), offered
    /// first instead of reading it again. A write whose figure a later write overtook
    /// is done: caching the newer figure is that write's own task (and until one is
    /// confirmed, deliveries trust none and fill the cache from the database). Without
    /// that, writes racing each other could each find the figure moved on every attempt
    /// and all fail.
    async fn cache_stock(
        &self,
        product: ProductId,
        known: Option<StockFigure>,
    ) -> Result<(), Error> {
        let written = known.map(|figure| figure.version);
        let mut known = known;
        for _ in 0..CACHE_STOCK_ATTEMPTS {
            let figure = match known.take() {
                Some(figure) => figure,
                None => self.stock_figure(product).await?,
            };
            let nonce = match self.stock_cache.offer(product, figure).await? {
                Offered::Newer => return Ok(()),
                Offered::Stale => continue,
                Offered::Pending { nonce } => nonce,
            };
            let now = self.stock_figure(product).await?.version;
            if now != figure.version {
                if written.is_some_and(|ours| now > ours) {
                    return Ok(());
                }
                continue;
            }
            if self.stock_cache.confirm(product, figure, nonce).await? {
                return Ok(());
            }
        }
        Err(Error::Backend(crate::domain::BackendError::new(
            crate::domain::Component::StockCache,
            true,
            anyhow::anyhow!(
                "the stock figure changed on every one of {CACHE_STOCK_ATTEMPTS} attempts to cache it"
            ),
        )))
    }

    /// The database's figure; an unknown product has none in stock.
    async fn stock_figure(&self, product: ProductId) -> Result<StockFigure, Error> {
        Ok(self.store.product(product).await?.map_or(
            StockFigure {
                stock: 0,
                min_stock: 1,
                version: 0,
            },
            |p| figure_of(&p),
        ))
    }

    pub async fn register_alert(
        &self,
        product: ProductId,
        user: UserId,
        once: bool,
    ) -> Result<Alert, Error> {
        self.store.register_alert(product, user, once).await
    }

    pub async fn cancel_alert(&self, product: ProductId, user: UserId) -> Result<Alert, Error> {
        self.store.cancel_alert(product, user).await
    }

    /// Starts the product's next round and returns at once; the run goes on in the
    /// background. A retry with the idempotency key of an earlier call returns that
    /// call's run as it is now, and changes nothing.
    pub async fn trigger_restock(
        self: &Arc<Self>,
        product: ProductId,
        request: TriggerRequest,
    ) -> Result<Run, Error> {
        self.refuse_if_shutting_down()?;
        let engine = self.clone();
        run_to_completion(async move {
            let lease = engine.settings.lease.lease;
            let triggered = match request.stock {
                Some(_) => {
                    let _exclusive = engine.stock_fence.lock_for_write(product).await;
                    engine.uncache_stock(product).await?;
                    let triggered = engine.store.start_run(product, &request, lease).await?;
                    match triggered {
                        Triggered::Started(_) => engine.cache_stock(product, None).await?,
                        Triggered::Replayed(_) => engine.recache_unchanged_stock(product).await,
                    }
                    triggered
                }
                None => engine.store.start_run(product, &request, lease).await?,
            };
            Ok(match triggered {
                Triggered::Started(claimed) => engine.spawn_run(claimed),
                Triggered::Replayed(run) => {
                    tracing::debug!(
                        %product,
                        round = run.restock_round,
                        "idempotency key seen before; returning its run"
                    );
                    run
                }
            })
        })
        .await
    }

    /// After a replayed trigger that carried a stock: the figure was dropped from the
    /// cache before the database was asked, and the database kept its own (the retry
    /// wrote nothing). The database's figure goes back, never the request's, still
    /// under the fence (G3), so the run in progress does not meet a miss for a call
    /// that changed nothing. If that fails the cache stays empty, which is safe: the
    /// next delivery loads the figure itself.
    async fn recache_unchanged_stock(&self, product: ProductId) {
        if let Err(err) = self.cache_stock(product, None).await {
            tracing::warn!(%product, error = ?err, "cannot cache the stock again after a replayed trigger");
        }
    }

    /// Resumes a `CANCELED_BY_ERROR` run from the user after its last recorded one (G6).
    pub async fn manual_restock(self: &Arc<Self>, product: ProductId) -> Result<Run, Error> {
        self.refuse_if_shutting_down()?;
        let engine = self.clone();
        run_to_completion(async move {
            let claimed = engine
                .store
                .resume_run(product, engine.settings.lease.lease)
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
            return Err(Error::UnknownProduct(product));
        }
        Err(match round {
            Some(round) => Error::UnknownRound { product, round },
            None => Error::NeverRestocked(product),
        })
    }

    /// One page of runs matching `filter`, newest first, starting after `from` (the
    /// token of the previous page; the first page when `None`).
    pub async fn list_runs(
        &self,
        filter: RunFilter,
        page_size: u32,
        from: Option<PageToken>,
    ) -> Result<RunPage, Error> {
        let listed = self
            .store
            .list_runs(filter, from.map(|t| t.after()), page_size + 1)
            .await?;
        let (listed, more) = one_page(listed, page_size);
        let next = listed
            .last()
            .filter(|_| more)
            .map(|last| PageToken::new(filter, last.key));
        Ok(RunPage {
            runs: listed.into_iter().map(|l| l.run).collect(),
            next,
        })
    }

    /// Where the alert of `user` for `product` stands and what became of it.
    pub async fn alert_status(
        &self,
        product: ProductId,
        user: UserId,
    ) -> Result<AlertStatus, Error> {
        self.store
            .alert_status(product, user)
            .await?
            .ok_or(Error::UnknownAlert { product, user })
    }

    /// One page of alerts matching `filter`, starting after `from` (the token of the
    /// previous page; the first page when `None`).
    pub async fn list_alerts(
        &self,
        filter: AlertFilter,
        page_size: u32,
        from: Option<AlertPageToken>,
    ) -> Result<AlertPage, Error> {
        let listed = self
            .store
            .list_alerts(filter, from.map(|t| t.after()), page_size + 1)
            .await?;
        let (listed, more) = one_page(listed, page_size);
        let next = listed
            .last()
            .filter(|_| more)
            .map(|(key, _)| AlertPageToken::new(filter, *key));
        Ok(AlertPage {
            alerts: listed.into_iter().map(|(_, alert)| alert).collect(),
            next,
        })
    }

    /// A product, with its users waiting.
    pub async fn product(&self, product: ProductId) -> Result<Product, Error> {
        self.store
            .product(product)
            .await?
            .ok_or(Error::UnknownProduct(product))
    }

    /// One page of the demand report in `order`, starting after `from` (the token of
    /// the previous page; the first page when `None`).
    pub async fn list_products(
        &self,
        order: ProductOrder,
        page_size: u32,
        from: Option<ProductPageToken>,
    ) -> Result<ProductPage, Error> {
        let products = self
            .store
            .list_products(order, from.map(|t| t.after()), page_size + 1)
            .await?;
        let (products, more) = one_page(products, page_size);
        let next = products
            .last()
            .filter(|_| more)
            .map(|last| ProductPageToken::new(order, last.waiting, last.id.get()));
        Ok(ProductPage { products, next })
    }

    /// The bus, for a stream: subscribed to before the stream reads anything, so that
    /// nothing sent after that read is missed. Streams learn of a shutdown from the bus
    /// (`Closing`); one that starts after it was sent learns of it here.
    fn listen_to_bus(&self) -> Result<broadcast::Receiver<Arc<BusEvent>>, Error> {
        let events = self.bus.subscribe();
        self.refuse_if_shutting_down()?;
        Ok(events)
    }

    fn refuse_if_shutting_down(&self) -> Result<(), Error> {
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        Ok(())
    }

    /// Drives a run this instance has just claimed, on a task of its own.
    fn spawn_run(self: &Arc<Self>, claimed: ClaimedRun) -> Run {
        let run = claimed.run.clone();
        self.runs.spawn(run::drive(self.clone(), claimed));
        run
    }

    /// Refuses new work, ends every stream and tells every run to stop; does not wait.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
        self.bus.close_streams();
    }

    /// Stops every run and waits (up to `grace`) until each has recorded what it sent
    /// and released the run for another instance to continue (G8).
    pub async fn shutdown(&self, grace: Duration) {
        self.begin_shutdown();
        self.runs.close();
        if tokio::time::timeout(grace, self.runs.wait()).await.is_err() {
            tracing::warn!(
                "some runs did not stop in time; another instance takes them over once \
                 their leases run out"
            );
        }
    }
}
