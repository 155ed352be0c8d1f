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
    async fn acquire(&self, want: u32) -> Result<Slots, BackendError>;
}

/// Sends granted by a [`SendLimiter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slots {
    /// How many, at least one.
    pub count: u32,
    /// When they were handed out: the instant the limit counts them at, and the one a
    /// send is stamped with (`sent_at`), however long its run then took to wake.
    pub at: Instant,
}

/// Where an instance's send slots come from. Owned by one task (the fair front), so it
/// needs no lock of its own.
#[async_trait]
pub trait SlotSource: Send + 'static {
    /// Up to `want` slots that may be used now, or the instant at which to ask again.
    /// Slots taken are spent, whether or not anyone sends them.
    async fn take(&mut self, want: u32) -> Result<Take, BackendError>;

    /// Called while no run waits: keeps warm what the source needs to grant promptly
    /// when one comes (a clock mapping). Returns when to call it again, if ever.
    async fn idle(&mut self) -> Option<Instant> {
        None
    }
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

/// How late a slot may still be handed out; a later one is given up (the Redis
/// limiter), or makes the log hold the next one back (the local limiter). 3 ms: the
/// limiter's thread wakes within a fraction of a millisecond of a slot, but a slot
/// passes unused while no run is waiting for it (a run busy delivering, its task
/// waiting for a worker), and a run that comes back within this long still gets it.
pub const LATE_GRANT: Duration = Duration::from_millis(3);

/// How long after its grant a send may be stamped (`sent_at`) and start: 1 ms, for the
/// run's task to wake on the grant and stamp it (a webhook request, to take its pass
/// through the fence and start; a later one is not sent on that grant).
pub const STAMP_ALLOWANCE: Duration = Duration::from_millis(1);

/// The window the limiters enforce: longer than a second by [`LATE_GRANT`] and
/// [`STAMP_ALLOWANCE`], so that a window measured on `sent_at` (the history, an audit
/// of the rate) still holds no more than the rate when grants are handed out late and
/// stamped later still. It costs 0.4% of throughput.
pub const ENFORCED_WINDOW: Duration = Duration::from_micros(
    1_000_000 + LATE_GRANT.as_micros() as u64 + STAMP_ALLOWANCE.as_micros() as u64,
);

/// How much longer the window is when every send is a request to a webhook endpoint,
/// where the rate is counted (G2, as the endpoint counts): 1 ms for a request to reach
/// it after it started (a connection taken from the pool, the request written), which
/// put 501 requests in one second of the endpoint's with the plain window.
pub const WEBHOOK_ALLOWANCE: Duration = Duration::from_millis(1);

/// The window the limiters enforce for this deployment's sends.
pub fn enforced_window(to_webhook: bool) -> Duration {
    if to_webhook {
        ENFORCED_WINDOW + WEBHOOK_ALLOWANCE
    } else {
        ENFORCED_WINDOW
    }
}
