//! One clock for every instance (G11): notifications are stamped (`sent_at`) with the
//! database's clock, not the host's, so the history of a run sent by several instances
//! holds one timeline, whatever each host's clock says. Each instance measures how far
//! its own clock is from the database's and adds that to its readings.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// How often the offset is measured again: often enough that a host clock stepped by
/// its time daemon is followed within seconds, rarely enough to cost nothing.
const SYNC_EVERY: Duration = Duration::from_secs(10);

/// Readings per measurement; the one with the shortest round trip is kept, as its
/// midpoint is the closest to the moment the database read its clock.
const SAMPLES: usize = 3;

/// The service's clock: this host's wall clock, corrected by the measured offset to the
/// database's.
#[derive(Debug, Default)]
pub struct SharedClock {
    /// Database clock minus this host's, in microseconds.
    offset_micros: AtomicI64,
}

impl SharedClock {
    /// Now, on the database's clock (to within half a round trip to it).
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + chrono::Duration::microseconds(self.offset_micros.load(Ordering::Relaxed))
    }

    /// An instant of this process (a moment already past), on the database's clock.
    pub fn at(&self, instant: tokio::time::Instant) -> DateTime<Utc> {
        let ago = chrono::Duration::from_std(instant.elapsed()).unwrap_or_default();
        self.now() - ago
    }

    /// Measures the offset once: the reading with the shortest round trip wins.
    pub async fn sync(&self, store: &dyn Store) -> Result<(), crate::domain::Error> {
        let mut best: Option<(Duration, i64)> = None;
        for _ in 0..SAMPLES {
            let (asked, local) = (Instant::now(), Utc::now());
            let database = store.clock().await?;
            let round_trip = asked.elapsed();
            let midpoint = local + chrono::Duration::from_std(round_trip / 2).unwrap_or_default();
            let offset = (database - midpoint).num_microseconds().unwrap_or(0);
            if best.is_none_or(|(rtt, _)| round_trip < rtt) {
                best = Some((round_trip, offset));
            }
        }
        if let Some((round_trip, offset)) = best {
            // A reading is only as good as half its round trip. One that agrees with
            // the offset in use to within that leaves it as it is: stamps that moved
            // by a reading's noise every few seconds would crowd a window of `sent_at`
            // now and then (G2). A real change (a clock stepped) is larger, and taken.
            let uncertainty = i64::try_from(round_trip.as_micros() / 2).unwrap_or(i64::MAX);
            let current = self.offset_micros.load(Ordering::Relaxed);
            if (offset - current).abs() > uncertainty {
                self.offset_micros.store(offset, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Measures the offset now and then every `SYNC_EVERY` until `stop`.
    pub fn spawn_sync(self: &Arc<Self>, store: Arc<dyn Store>, stop: CancellationToken) {
        let clock = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SYNC_EVERY);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if let Err(err) = clock.sync(store.as_ref()).await {
                    tracing::warn!(error = ?err, "cannot read the database's clock; keeping the last offset");
                }
            }
        });
    }
}
