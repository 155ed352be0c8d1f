//! The stock figure the engine checks before every send, and the fence that makes
//! "once `SetStock(0)` has returned, nothing more is sent" exact (G3).
//!
//! Two capabilities: the [`StockCache`] holds the figure (the database is the source of
//! truth, and orders its figures by version), and the [`StockFence`] delivers a batch
//! only if the cached figure reaches the product's threshold (`min_stock`, 1 unless
//! set) and the batch's claim is the newest of its
//! run, as one step that no stock write can split (G3, G8). In process the fence is a
//! lock per product; in Redis it is one script that checks both and publishes.

pub mod local;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;

use super::bus::{RunKey, SentBatch};
use crate::domain::{BackendError, ProductId};

/// A stock figure as the database held it when it was read: `version` orders the
/// figures of a product (every stock write bumps it), so the cache can refuse an older
/// one whatever order the writes reach it in (G3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StockFigure {
    pub stock: i64,
    /// The product's threshold: below it, the product counts as sold out. Cached with
    /// the stock and under the same version, so a fence never compares a figure with
    /// a threshold of another moment.
    pub min_stock: i64,
    pub version: i64,
}

impl StockFigure {
    /// Whether a delivery may go through on this figure (G3).
    pub fn in_stock(&self) -> bool {
        crate::domain::in_stock(self.stock, self.min_stock)
    }
}

/// What the cache did with an offered figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// Written, not yet trusted: read the database again and, if it still holds this
    /// version, confirm it with this nonce.
    Pending { nonce: u64 },
    /// The cache already holds a confirmed figure at least as new: nothing to do.
    Newer,
    /// The cache holds a newer figure, not yet confirmed: read the database again.
    Stale,
}

/// Where the current stock of a product is cached.
///
/// A figure only reaches the cache through [`offer`](StockCache::offer) and
/// [`confirm`](StockCache::confirm): offered with the version read from the database,
/// confirmed only once the database, read again, still holds that version. A write that
/// arrives late (held on the wire, after the cache lost a newer figure) is either
/// older than what the cache holds, and refused, or never confirmed, because the
/// database moved on meanwhile: a lost or restarted cache never brings an older figure
/// back (G3). Deliveries trust confirmed figures only.
#[async_trait]
pub trait StockCache: Send + Sync + 'static {
    /// The confirmed cached figure, or `None` on a miss.
    async fn get(&self, product: ProductId) -> Result<Option<StockFigure>, BackendError>;
    /// Offers a figure just read from the database.
    async fn offer(&self, product: ProductId, figure: StockFigure)
    -> Result<Offered, BackendError>;
    /// Confirms an offer after the database still held its version. `false`: the offer
    /// is gone (replaced, or lost with the cache); offer again.
    async fn confirm(
        &self,
        product: ProductId,
        figure: StockFigure,
        nonce: u64,
    ) -> Result<bool, BackendError>;
    /// Drops the cached figure so the next read goes to the database.
    async fn invalidate(&self, product: ProductId) -> Result<(), BackendError>;
}

/// What the fence answered a run, whether it was asked to deliver a batch or to admit
/// webhook requests: it let the run through, or why not. The refusals mean the same
/// to the run either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fenced<T> {
    /// The stock reached the threshold and the claim was the newest: what the fence
    /// gave.
    Through(T),
    /// The stock is below the product's threshold: nothing went through.
    SoldOut,
    /// The cache holds no confirmed figure: nothing went through; fill it and try
    /// again.
    NotCached,
    /// A newer claim of the run was seen: nothing went through, and the sender no
    /// longer owns the run (G8).
    Superseded,
    /// The shared side no longer knows the run's newest claim (its key was lost with
    /// the cache, or expired): nothing went through. The sender proves its claim
    /// against the database and registers it again ([`StockFence::claim`]) before it
    /// delivers anything (G8): a delivery of an older claim held on the wire meanwhile
    /// is refused, not let through for want of a newer one to compare with.
    ClaimUnknown,
    /// The batch does not follow the last one delivered under its claim: one sent
    /// before it was refused, or has not arrived yet. Nothing went through; the sender
    /// delivers again from the last batch that went through (G1: a run that has several
    /// deliveries on their way never puts a later one on the bus before an earlier one).
    OutOfOrder,
}

/// What the fence did with a batch: `Through(())`, the batch is on the bus.
pub type Delivery = Fenced<()>;

/// Held by a stock write from before the cached figure is dropped until the new one
/// is cached.
pub type WriteGuard = Box<dyn Send + Sync>;

/// A pass through the fence for webhook requests about to start (G3, G12): held until
/// the requests are on the wire, and dropped then. A stock write that brings the stock
/// below the threshold does not return while a pass of its product is held (or, in Redis,
/// has not expired), so no request starts after it returned.
pub type Admission = Box<dyn Send + Sync>;

/// What the fence did when asked to admit webhook requests: `Through(pass)`, send,
/// then drop the pass.
pub type Admitted = Fenced<Admission>;

/// Orders stock writes against deliveries of the same product (G3).
#[async_trait]
pub trait StockFence: Send + Sync + 'static {
    /// Taken by every stock write. When the write's guard is dropped, every delivery
    /// that saw the old figure is on the bus, and every later one sees the new figure.
    async fn lock_for_write(&self, product: ProductId) -> WriteGuard;

    /// Makes `claim` (a run's fencing token) the newest its run has seen, before the
    /// claim's first delivery: from then on a delivery of an older claim does nothing.
    /// `at` is the queue position of the last notification the run delivered (the
    /// first batch of the claim follows it). `false`: a newer claim was seen already;
    /// the caller no longer owns the run.
    async fn claim(&self, run: RunKey, claim: i64, at: Option<i64>) -> Result<bool, BackendError>;

    /// Delivers `batch` to the bus if no claim of its run newer than the batch's was
    /// seen, the cached stock of its product reaches its threshold, and the batch follows the
    /// last one delivered under its claim (its `prev_position`). Several deliveries of
    /// a run may be on their way at once, asked for in send order.
    async fn deliver(&self, batch: &SentBatch) -> Result<Delivery, BackendError>;
}

/// The fence for channels whose sends leave the service before they are streamed (a
/// webhook, G12): a pass that holds back stock writes below the threshold while
/// requests start, and
/// the publication of what the receiver acknowledged. The same implementations as
/// [`StockFence`], so a pass and a delivery see one figure and one claim.
#[async_trait]
pub trait AdmissionFence: Send + Sync + 'static {
    /// Admits webhook requests of `run` if no newer claim than `claim` was seen and the
    /// cached stock of its product reaches its threshold, as one step no stock write
    /// can split.
    /// The pass expires after `ttl` even if never dropped (an instance that died holding
    /// it), so the sender must not start a request later than that.
    async fn admit(&self, run: RunKey, claim: i64, ttl: Duration)
    -> Result<Admitted, BackendError>;

    /// Delivers `batch` to the bus if no claim of its run newer than the batch's was
    /// seen, whatever the stock: for notifications the webhook already acknowledged,
    /// which were sent, and so are streamed and recorded even if the product sold out
    /// since (G12).
    async fn publish(&self, batch: &SentBatch) -> Result<Delivery, BackendError>;

    /// Called by a stock write that brought the stock below the threshold, after the figure
    /// is cached: returns once no pass of `product` is held or unexpired (G3).
    async fn wait_for_admissions(&self, product: ProductId) -> Result<(), BackendError>;
}
