//! The in-process limiter, for one instance: a local schedule of slots behind the fair
//! front.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

#[cfg(test)]
use super::ENFORCED_WINDOW;
use super::fair::FairLimiter;
use super::{SendLimiter, SlotSource, Slots, Take, WINDOW};
use crate::domain::BackendError;

/// How far behind schedule the limiter may fall and still make up for it. Timers wake a
/// little late (tokio's resolution is a millisecond) and the engine pauses to commit a
/// batch now and then; making up for that keeps the sustained rate at the limit, while
/// the log keeps every window within it. Longer pauses are not made up: idle time is
/// not saved for a burst: a run starting after a quiet spell starts at the steady pace.
/// The catch-up is sent at once, so it is kept short: at 500/s at most 25 sends, well
/// within a subscriber's buffer (and never more than the rate in any window: the log
/// sees to that).
const MAX_CATCH_UP: Duration = Duration::from_millis(50);

/// An in-process limiter for one instance: [`LocalSlots`] dealt out fairly.
pub struct LocalLimiter {
    front: FairLimiter,
}

impl LocalLimiter {
    /// Starts the front's thread (see [`FairLimiter::start`]). `window` is the one
    /// its log enforces (`limiter::enforced_window`).
    pub fn new(rate: NonZeroU32, window: Duration) -> std::io::Result<Self> {
        Ok(Self {
            front: FairLimiter::start(LocalSlots::new(rate, window))?,
        })
    }

    /// A limiter whose front runs on the current runtime and follows its clock.
    #[cfg(test)]
    fn here(rate: NonZeroU32) -> Self {
        Self {
            front: FairLimiter::start_here(LocalSlots::new(rate, ENFORCED_WINDOW)),
        }
    }
}

#[async_trait]
impl SendLimiter for LocalLimiter {
    async fn acquire(&self, want: u32) -> Result<Slots, BackendError> {
        self.front.acquire(want).await
    }
}

/// The slots of an in-process limiter.
///
/// Two rules together: sends are scheduled one `1s / rate` apart (smooth pacing, and a
/// sustained rate of exactly `rate`), and a log of the grant instants of the last
/// second refuses any grant that would put more than `rate` in a window. The schedule
/// alone is not enough: a timer that fires late followed by one that fires on time
/// would squeeze `rate + 1` sends into a second. The log makes the bound hold whatever
/// the timers do; it keeps one entry per grant (an instant and how many), so at most
/// one per slot at low rates and far fewer at high ones, where each grant is many.
pub struct LocalSlots {
    rate: u32,
    interval: Duration,
    max_catch_up: Duration,
    /// The window the log enforces: a little longer than a second.
    log_window: Duration,
    state: State,
}

struct State {
    /// When the next send is due.
    next: Instant,
    /// Grants within the last window, oldest first: when, and how many.
    log: VecDeque<(Instant, u32)>,
    /// The sum of the counts in `log`.
    logged: u32,
}

impl LocalSlots {
    pub fn new(rate: NonZeroU32, log_window: Duration) -> Self {
        let interval = WINDOW / rate.get();
        Self {
            rate: rate.get(),
            interval,
            max_catch_up: MAX_CATCH_UP,
            log_window,
            state: State {
                next: Instant::now(),
                log: VecDeque::new(),
                logged: 0,
            },
        }
    }

    /// Grants what is allowed at `now`, or says when to ask again. One task (the fair
    /// front) owns the slots, so the log is in grant order without a lock.
    fn try_grant(&mut self, want: u32, now: Instant) -> Result<u32, Instant> {
        let state = &mut self.state;
        while let Some(&(at, count)) = state.log.front() {
            if now.duration_since(at) < self.log_window {
                break;
            }
            state.log.pop_front();
            state.logged -= count;
        }
        let room = self.rate.saturating_sub(state.logged);
        if room == 0 {
            let (oldest, _) = *state.log.front().expect("a full log is not empty");
            // Move the schedule too: a send held back by the log is not "owed", or it
            // would go out together with the next one and bunch up.
            state.next = state.next.max(oldest + self.log_window);
            return Err(state.next);
        }
        if now < state.next {
            return Err(state.next);
        }
        // Behind schedule by up to max_catch_up: a pause of the engine, made up for.
        // Further behind: the limiter was idle, and idle time is not saved for a burst.
        let next = if now.duration_since(state.next) > self.max_catch_up {
            now
        } else {
            state.next
        };
        let due = (now.duration_since(next).as_nanos() / self.interval.as_nanos().max(1)) + 1;
        let granted = want.min(room).min(u32::try_from(due).unwrap_or(u32::MAX));
        state.next = next + self.interval * granted;
        state.log.push_back((now, granted));
        state.logged += granted;
        Ok(granted)
    }
}

#[async_trait]
impl SlotSource for LocalSlots {
    async fn take(&mut self, want: u32) -> Result<Take, BackendError> {
        Ok(match self.try_grant(want.max(1), Instant::now()) {
            Ok(granted) => Take::Now(granted),
            Err(at) => Take::Later(at),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Acquires `total` sends one or more at a time and returns each send's instant.
    async fn drive(limiter: &LocalLimiter, total: usize, want: u32) -> Vec<Instant> {
        let mut sends = Vec::with_capacity(total);
        while sends.len() < total {
            let n = limiter.acquire(want).await.unwrap().count;
            let now = Instant::now();
            sends.extend(std::iter::repeat_n(now, n as usize));
        }
        sends.truncate(total);
        sends
    }

    fn max_in_any_window(sends: &[Instant]) -> usize {
        let mut best = 0;
        let mut start = 0;
        for end in 0..sends.len() {
            while sends[end].duration_since(sends[start]) >= WINDOW {
                start += 1;
            }
            best = best.max(end - start + 1);
        }
        best
    }

    #[tokio::test(start_paused = true)]
    async fn never_exceeds_the_rate_in_any_window_and_sustains_it() {
        let limiter = LocalLimiter::here(NonZeroU32::new(500).unwrap());
        let begin = Instant::now();
        let sends = drive(&limiter, 5_000, 64).await;
        let elapsed = sends.last().unwrap().duration_since(begin);
        assert!(max_in_any_window(&sends) <= 500);
        // 5,000 sends at 500/s take 10 s of (virtual) time, plus the log's margin of
        // a few milliseconds a second.
        assert!(elapsed >= Duration::from_millis(9_990), "{elapsed:?}");
        assert!(elapsed <= Duration::from_millis(10_060), "{elapsed:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_pause_is_made_up_within_the_window() {
        let limiter = LocalLimiter::here(NonZeroU32::new(100).unwrap());
        drive(&limiter, 10, 1).await;
        // The engine stalls 40 ms: four slots are owed and granted.
        tokio::time::advance(Duration::from_millis(40)).await;
        assert_eq!(limiter.acquire(1_000).await.unwrap().count, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_caller_does_not_get_a_burst() {
        let limiter = LocalLimiter::here(NonZeroU32::new(100).unwrap());
        drive(&limiter, 10, 1).await;
        // The caller goes away for a while; on return it gets a small catch-up only.
        tokio::time::advance(Duration::from_secs(5)).await;
        let granted = limiter.acquire(1_000).await.unwrap().count;
        assert_eq!(granted, 1, "a quiet spell is not saved up for a burst");
        // At a low rate, a fresh start sends one, not a second's worth.
        let slow = LocalLimiter::here(NonZeroU32::new(5).unwrap());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(slow.acquire(5).await.unwrap().count, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_log_holds_the_bound_when_the_schedule_would_not() {
        let mut limiter = LocalSlots::new(NonZeroU32::new(10).unwrap(), ENFORCED_WINDOW);
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // The first timer fires 8 ms late (within the catch-up allowance, so the
        // schedule keeps its slots), the next nine on time.
        assert_eq!(limiter.try_grant(1, ms(8)), Ok(1));
        for slot in 1..10 {
            assert_eq!(limiter.try_grant(1, ms(slot * 100)), Ok(1));
        }
        // The schedule says slot 10 is due at 1,000 ms, but that would put 11 sends in
        // [8 ms, 1,008 ms): the log holds it back until the late send has left the
        // window, with the log's safety margin.
        assert_eq!(
            limiter.try_grant(1, ms(1_000)),
            Err(ms(8) + ENFORCED_WINDOW)
        );
        assert_eq!(limiter.try_grant(1, ms(8) + ENFORCED_WINDOW), Ok(1));
    }
}
