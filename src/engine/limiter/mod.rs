//! The send limiter: at most `RESTOCK_SEND_RATE` notifications in any one-second window
//! (G2), paced evenly so that subscribers see a steady stream rather than bursts. In
//! process for one instance; in Redis for all instances that share it.
//!
//! Both are a [`SlotSource`] (where send slots come from: a local schedule, or blocks
//! reserved in Redis) behind one [`fair::FairLimiter`], which hands the slots to the
//! runs waiting on this instance in turn, so that runs waiting together are served
//! fairly (G2).

mod clock;
pub mod fair;
pub mod local;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::domain::BackendError;

/// Grants permission to send notifications.
#[async_trait]
pub trait SendLimiter: Send + Sync + 'static {
    /// Waits until at least one send is allowed, then grants between 1 and `want`
    /// sends, to be made now. `want` must be at least 1.
    async fn acquire(&self, want: u32) -> Result<u32, BackendError>;
}

/// Where an instance's send slots come from. Owned by one task (the fair front), so it
/// needs no lock of its own.
#[async_trait]
pub trait SlotSource: Send + 'static {
    /// Up to `want` slots that may be used now, or the instant at which to ask again.
    /// Slots taken are spent, whether or not anyone sends them.
    async fn take(&mut self, want: u32) -> Result<Take, BackendError>;
}

/// What a [`SlotSource`] has now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// This many slots (at least one), to be used now.
    Now(u32),
    /// None now; ask again at this instant.
    Later(Instant),
}

/// The window the limit applies to.
pub const WINDOW: Duration = Duration::from_secs(1);

/// The window the limiters enforce: a little longer than a second. The instant a send
/// is stamped (`sent_at`, wall clock) and the instant it was granted differ by
/// microseconds to a few milliseconds (a timer firing late, a Redis round trip), and a
/// window measured on `sent_at`, or on arrival times at a subscriber whose reads jitter
/// by a few milliseconds, must still hold no more than the rate. It costs 0.5% of
/// throughput.
pub const ENFORCED_WINDOW: Duration = Duration::from_millis(1_005);
