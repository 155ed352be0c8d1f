//! The send limiter in Redis, shared by every instance (G2).
//!
//! One schedule for all instances: a key holds the instant (Redis's clock) at which the
//! next send may go out. An instance reserves a block of send slots with one script,
//! spaced `ENFORCED_WINDOW / rate` apart and no further ahead than `HORIZON`, and the
//! key moves past them; the next reservation, from any instance, starts after them.
//! So slots are never closer than that spacing, whoever holds them, and an instance
//! pays one round trip per block, not per send.
//!
//! An instance sends each slot at its time, measured on its own clock from the moment
//! the reservation came back (so a slot is never sent early), and gives up a slot it
//! could only send more than `ENFORCED_WINDOW - WINDOW` late. Then every send happens
//! in [slot, slot + 5 ms), and a one-second window of sends holds the sends of at most
//! 1.005 s of slots: `rate` of them. Nothing is saved up: a slot not used in time is
//! lost, never sent in a burst later.

use std::num::NonZeroU32;
use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::{Client, LuaInterface};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{ENFORCED_WINDOW, SendLimiter, WINDOW};
use crate::domain::BackendError;
use crate::redis::{Keys, backend};

const STORE: &str = "send limiter (Redis)";

/// How far ahead a reservation reaches. 20 ms: ten slots at 500/s, so an instance goes
/// to Redis about fifty times a second while it sends, and a run that ends leaves at
/// most 20 ms of slots unused.
const HORIZON: Duration = Duration::from_millis(20);

/// Reserves up to ARGV[2] slots spaced ARGV[1] microseconds apart, from the later of
/// the schedule and now, no further than ARGV[3] microseconds ahead of now. Returns
/// now, the first slot and the count, as strings (Lua numbers would be truncated).
const RESERVE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local want = tonumber(ARGV[2])
local horizon = tonumber(ARGV[3])
local first = tonumber(redis.call('GET', KEYS[1]) or '0')
if first < now then first = now end
local count = 0
if first <= now + horizon then
  count = math.min(want, math.floor((now + horizon - first) / interval) + 1)
  redis.call('SET', KEYS[1], string.format('%.3f', first + count * interval), 'PX', 60000)
end
return {string.format('%.3f', now), string.format('%.3f', first), tostring(count)}
"#;

/// Slots reserved and not yet used.
struct Reservation {
    /// This instance's clock when the reservation came back; Redis's clock read `now`
    /// a little before that, so slot times mapped from here are never early.
    base: Instant,
    /// Slot `i` is due at `base + first + i * interval`, in microseconds from `base`.
    first: f64,
    interval: f64,
    count: u32,
    used: u32,
    /// How late a slot may still be sent: the margin, less the round trip of the
    /// reservation (how far the mapping may be off).
    max_late: Duration,
}

impl Reservation {
    fn due_at(&self, i: u32) -> Instant {
        self.base + Duration::from_secs_f64((self.first + f64::from(i) * self.interval) / 1e6)
    }
}

pub struct RedisLimiter {
    client: Client,
    key: String,
    /// Slot spacing in microseconds.
    interval: f64,
    /// A tokio mutex: the runs of this instance share one reservation, and the one
    /// that refills it holds the lock across the round trip.
    reservation: Mutex<Option<Reservation>>,
}

impl RedisLimiter {
    pub fn new(client: Client, keys: &Keys, rate: NonZeroU32) -> Self {
        Self {
            client,
            key: keys.limiter(),
            interval: ENFORCED_WINDOW.as_secs_f64() * 1e6 / f64::from(rate.get()),
            reservation: Mutex::new(None),
        }
    }

    async fn reserve(&self, want: u32) -> Result<Reservation, BackendError> {
        let asked = Instant::now();
        let (now, first, count): (String, String, String) = self
            .client
            .eval(
                RESERVE,
                vec![self.key.clone()],
                vec![
                    format!("{:.3}", self.interval),
                    want.to_string(),
                    HORIZON.as_micros().to_string(),
                ],
            )
            .await
            .map_err(|e| backend(STORE, e))?;
        let base = Instant::now();
        let parse = |s: &str| {
            s.parse::<f64>().map_err(|e| {
                BackendError::new(STORE, false, anyhow::anyhow!("bad reply {s:?}: {e}"))
            })
        };
        let (now, first) = (parse(&now)?, parse(&first)?);
        let margin = ENFORCED_WINDOW - WINDOW;
        Ok(Reservation {
            base,
            first: first - now,
            interval: self.interval,
            count: count.parse().unwrap_or(0),
            used: 0,
            max_late: margin.saturating_sub(base - asked),
        })
    }
}

#[async_trait]
impl SendLimiter for RedisLimiter {
    async fn acquire(&self, want: u32) -> Result<u32, BackendError> {
        let want = want.max(1);
        loop {
            let mut held = self.reservation.lock().await;
            let now = Instant::now();
            if let Some(r) = held.as_mut() {
                // Slots that can no longer be sent in time are given up, never bunched.
                while r.used < r.count && r.due_at(r.used) + r.max_late < now {
                    r.used += 1;
                }
                let mut due = 0;
                while r.used + due < r.count && due < want && r.due_at(r.used + due) <= now {
                    due += 1;
                }
                if due > 0 {
                    r.used += due;
                    return Ok(due);
                }
                if r.used < r.count {
                    let at = r.due_at(r.used);
                    drop(held);
                    tokio::time::sleep_until(at).await;
                    continue;
                }
            }
            let fresh = self.reserve(want).await?;
            let wait_until = (fresh.count == 0).then(|| {
                // All slots within the horizon are taken: ask again when the first
                // free one comes within reach.
                fresh.base
                    + Duration::from_secs_f64(
                        ((fresh.first - HORIZON.as_micros() as f64).max(0.0)) / 1e6,
                    )
            });
            *held = Some(fresh);
            if let Some(at) = wait_until {
                drop(held);
                tokio::time::sleep_until(at.max(now + Duration::from_micros(500))).await;
            }
        }
    }
}
