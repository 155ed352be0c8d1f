//! How the Redis limiter maps Redis's clock to this instance's (G2).
//!
//! Every reservation is a sample. Redis read its clock (`TIME`, in the script) at some
//! local instant between sending the request and reading the reply, so
//! `offset = reply instant - Redis time` is the true offset plus somewhere between 0 and
//! the round trip. The smallest offset of the recent samples is therefore never below
//! the true one (a slot mapped with it is never early), and the samples also bound how
//! far above it may be: that is how late this instance may send any slot, the
//! `lateness` the schedule in Redis leaves room for when another instance follows.
//!
//! Times are microseconds as `f64`: local ones from an epoch of this map, Redis ones
//! from the Unix epoch (about 2^51, so still exact to a quarter of a microsecond).

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// One reservation's reading of the two clocks.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// The local instant the reply came back.
    pub at: Instant,
    /// Local time at the reply less Redis's `TIME` in the script, µs.
    pub offset: f64,
    /// From sending the request to reading the reply, µs.
    pub round_trip: f64,
}

/// The mapping to use for the next reservation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Local µs = Redis µs + `offset`: never early.
    pub offset: f64,
    /// How late the mapping may be (how far `offset` may be above the true one), µs.
    pub lateness: f64,
    /// The shortest recent round trip, µs.
    pub round_trip: f64,
}

/// The samples of the last few seconds.
pub struct ClockMap {
    epoch: Instant,
    samples: VecDeque<Sample>,
    /// Samples older than this are dropped: the two clocks drift apart (by some parts
    /// per million), so an old sample says less and less.
    keep: Duration,
    /// At most this many samples, the newest (a search over them per reservation).
    most: usize,
    /// A sample with a longer round trip is not used for the mapping: it could be that
    /// late, and the schedule must leave that much room at every change of instance.
    max_round_trip: f64,
}

/// How far a new sample may contradict the mapping before it is taken for a jump of
/// Redis's clock (a failover to another server, a clock stepped back) rather than
/// drift, µs.
const JUMP: f64 = 1_000.0;

impl ClockMap {
    pub fn new(keep: Duration, most: usize, max_round_trip: Duration) -> Self {
        Self {
            epoch: Instant::now(),
            samples: VecDeque::with_capacity(most),
            keep,
            most,
            max_round_trip: max_round_trip.as_secs_f64() * 1e6,
        }
    }

    /// `at` in local µs.
    pub fn local(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.epoch).as_secs_f64() * 1e6
    }

    /// Local µs as an instant (never before the epoch).
    pub fn instant(&self, local: f64) -> Instant {
        self.epoch + Duration::from_secs_f64(local.max(0.0) / 1e6)
    }

    /// A reading taken between `asked` and `replied`, when Redis's clock said `redis`.
    pub fn sample(&self, asked: Instant, replied: Instant, redis: f64) -> Sample {
        Sample {
            at: replied,
            offset: self.local(replied) - redis,
            round_trip: (replied - asked).as_secs_f64() * 1e6,
        }
    }

    pub fn add(&mut self, sample: Sample) {
        self.expire(sample.at);
        // The true offset is at least `offset - round_trip`; if that is above the
        // mapping, which is never below the true offset, Redis's clock went back: the
        // old samples no longer describe it.
        if let Some(current) = self.estimate(sample.at)
            && sample.offset - sample.round_trip > current.offset + JUMP
        {
            self.samples.clear();
        }
        if self.samples.len() == self.most {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    fn expire(&mut self, now: Instant) {
        while self
            .samples
            .front()
            .is_some_and(|s| now.saturating_duration_since(s.at) > self.keep)
        {
            self.samples.pop_front();
        }
    }

    /// The mapping as of `now`, or `None` without a usable recent sample.
    pub fn estimate(&self, now: Instant) -> Option<Estimate> {
        let usable = self.samples.iter().filter(|s| {
            now.saturating_duration_since(s.at) <= self.keep && s.round_trip <= self.max_round_trip
        });
        let offset = usable.clone().map(|s| s.offset).reduce(f64::min)?;
        // The true offset is at least every `offset - round_trip`: the tightest of
        // them bounds how late the mapping is (at most the round trip of the sample
        // that gave the offset).
        let floor = usable
            .clone()
            .map(|s| s.offset - s.round_trip)
            .reduce(f64::max)?;
        let round_trip = usable.map(|s| s.round_trip).reduce(f64::min)?;
        Some(Estimate {
            offset,
            lateness: (offset - floor).max(0.0),
            round_trip,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> ClockMap {
        ClockMap::new(Duration::from_secs(2), 32, Duration::from_millis(250))
    }

    #[tokio::test(start_paused = true)]
    async fn the_mapping_is_the_smallest_offset_and_bounds_its_lateness() {
        let mut map = map();
        let t0 = Instant::now();
        // Redis is 1,000 s "ahead"; replies come back 0.1 ms to 3 ms after TIME ran.
        let redis_at = |local: f64| local + 1e9;
        for (late, rtt) in [(3_000.0, 4_000.0), (100.0, 200.0), (900.0, 1_000.0)] {
            tokio::time::advance(Duration::from_millis(10)).await;
            let replied = Instant::now();
            let asked = replied - Duration::from_secs_f64(rtt / 1e6);
            let redis = redis_at(map.local(replied) - late);
            map.add(map.sample(asked, replied, redis));
        }
        let e = map.estimate(Instant::now()).unwrap();
        // The true offset is -1e9: the mapping is 100 µs late, and the samples prove
        // the true offset no more than 200 µs below it.
        assert!((e.offset - (-1e9 + 100.0)).abs() < 1.0, "{e:?}");
        assert!(e.lateness >= 100.0 && e.lateness <= 200.0 + 1.0, "{e:?}");
        assert!((e.round_trip - 200.0).abs() < 1.0, "{e:?}");
        assert!(t0 < Instant::now());
    }

    #[tokio::test(start_paused = true)]
    async fn old_and_slow_samples_are_not_used() {
        let mut map = map();
        let replied = Instant::now();
        map.add(map.sample(replied - Duration::from_millis(300), replied, 0.0));
        assert_eq!(
            map.estimate(replied),
            None,
            "a 300 ms round trip is over the cap"
        );
        let replied = Instant::now();
        map.add(map.sample(replied - Duration::from_millis(1), replied, 0.0));
        assert!(map.estimate(replied).is_some());
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(map.estimate(Instant::now()), None, "too old");
    }

    #[tokio::test(start_paused = true)]
    async fn a_clock_that_went_back_replaces_the_mapping() {
        let mut map = map();
        let replied = Instant::now();
        let local = map.local(replied);
        map.add(map.sample(replied - Duration::from_millis(1), replied, local));
        // Redis's clock is now 5 s behind what it was: every slot it hands out would
        // map 5 s early with the old samples.
        tokio::time::advance(Duration::from_millis(10)).await;
        let replied = Instant::now();
        let local = map.local(replied);
        map.add(map.sample(replied - Duration::from_millis(1), replied, local - 5e6));
        let e = map.estimate(replied).unwrap();
        assert!((e.offset - 5e6).abs() < 1.0, "{e:?}");
    }
}
