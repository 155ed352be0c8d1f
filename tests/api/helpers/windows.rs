//! Counting sends in sliding windows (G2 is a bound on any one-second window).

use std::time::Duration;

use chrono::{DateTime, Utc};

/// A point in time a send was seen at: a recorded `sent_at`, or when a test saw it.
pub trait Moment: Copy + Ord {
    /// How long after `earlier` this is (zero if it is not after it).
    fn since(self, earlier: Self) -> Duration;
}

impl Moment for tokio::time::Instant {
    fn since(self, earlier: Self) -> Duration {
        self.saturating_duration_since(earlier)
    }
}

impl Moment for DateTime<Utc> {
    fn since(self, earlier: Self) -> Duration {
        (self - earlier).to_std().unwrap_or_default()
    }
}

/// The most of `times` within any window of `width` (a window holds the moments less
/// than `width` after its first).
pub fn busiest_window<M: Moment>(times: &[M], width: Duration) -> usize {
    let mut times = times.to_vec();
    times.sort();
    let mut busiest = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end].since(times[start]) >= width {
            start += 1;
        }
        busiest = busiest.max(end - start + 1);
    }
    busiest
}

/// The most of `times` within any one second, the window of G2.
pub fn busiest_second<M: Moment>(times: &[M]) -> usize {
    busiest_window(times, Duration::from_secs(1))
}
