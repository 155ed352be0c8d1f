//! The send limiter in Redis, shared by every instance (G2).
//!
//! One schedule for all instances, in one hash: the next free slot (on Redis's clock),
//! the instance that reserved last, and how late that instance may send a slot. An
//! instance reserves a block of slots spaced `I = window / rate` apart with one
//! script, and sends each at its time mapped to its own clock (`clock`).
//!
//! Why no one-second window ever holds more than `rate` sends, whatever the round trip:
//! an instance sends slot `s` at `v + j`, where `v = s + λ` is the slot mapped with the
//! instance's offset (late by `λ`, between 0 and the bound `u` its samples prove) and
//! `j` in `[0, SLACK]` is how late the send itself is (a slot that could only be handed
//! out later is given up). If each slot of the schedule has its `v` at least `I` after
//! the previous slot's, whichever instances hold them, then all `v` are in order and
//! `I` apart, the sends of a one-second window have their `v` within `1 s + SLACK`,
//! and at most `floor((1 s + SLACK) / I) + 1` points that far apart fit there: `rate`,
//! as `(1 s + SLACK) / I` is below `rate` (`I` is `window / rate`, and that
//! window is longer than a second by `SLACK` and the time a run has to stamp and send).
//! Within a block one mapping is used, so its `v` are as far apart as its slots. Between blocks the script leaves room: after another
//! instance's last slot, that instance's `u` (ours is late by at least 0); after our
//! own, by how much our mapping moved earlier since (`delta`). A slow network makes
//! `u` larger and the gaps longer: it costs throughput, never a burst.
//!
//! Every block reaches at most `lead + horizon` after the script ran, and its slots are
//! sent at most `u` late: an instance's *reach*, which follows its round trip (about
//! 30 ms with Redis 6 ms away). Each reservation declares it, and the schedule keeps
//! the largest declared lately. A lost schedule (a flush, a restart, a failover)
//! restarts after the reach the instance that finds it missing knew of (its own, and
//! the schedule's as its last reply said), past any slot an instance may still hold:
//! losing the key causes no burst and only a short pause. A fresh deployment (no
//! schedule heard of, no slot held) waits for nothing, so its first send is prompt.
//! Idle instances read the schedule every [`PROBE_EVERY`], so the one case this does
//! not cover is a schedule created and lost again within that time by instances this
//! one has not heard from.
//!
//! Throughput: the next block is asked for while the reserved slots last (one request
//! in flight), and how early (`lead`) and how far ahead (`horizon`) it reserves grow
//! with the round trip, so one instance keeps the rate up to round trips near the cap.
//! An idle limiter reads Redis's clock every [`PROBE_EVERY`], so a run that starts has
//! a mapping at once. Instances that both have work take turns of several blocks: a
//! change of holder costs a gap, so a turn lasts at least `QUANTUM` times the gap, and
//! the holder ends its blocks there when another instance waits (its claim in the
//! schedule).
//! Slots given up are counted (`restock_send_limiter_dropped_total`) and a warning
//! says why, at most every few seconds; so does a limiter that has nothing to grant.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::Client;
use fred::types::scripts::Script;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::clock::{ClockMap, Estimate};
use super::fair::FairLimiter;
use super::{LATE_GRANT, SendLimiter, SlotSource, Slots, Take};
use crate::domain::BackendError;
use crate::monitoring::LimiterMetrics;
use crate::redis::{Keys, backend};

const STORE: crate::domain::Component = crate::domain::Component::SendLimiter;

/// Loaded once per Redis and then run by SHA (EVALSHA), reloaded if Redis lost it.
static RESERVE: LazyLock<Script> = LazyLock::new(|| Script::from_lua(include_str!("reserve.lua")));

/// How late a slot may still be handed out (see [`LATE_GRANT`]).
const SLACK: Duration = LATE_GRANT;

/// The longest round trip a mapping may come from. A sample with a longer one is not
/// used (its instance could send that late, and every other instance would have to
/// leave that gap after it); with no usable sample the instance sends nothing and
/// says so. It also caps `lead` and `horizon`, and so every reach.
const MAX_ROUND_TRIP: Duration = Duration::from_millis(250);

/// Added to the round trip, less `SLACK`, for how early a block starts, so that the
/// reply is back before its first slot is more than a millisecond late.
const LEAD_MARGIN: Duration = Duration::from_millis(2);

/// How far ahead of the lead a block reaches: one and a half round trips plus 5 ms, at
/// least 20 ms and at most the cap. Far from Redis one request follows the other, each
/// a round trip, and each block must outlast the next request's cycle, whatever delays
/// it (the proxy's, a busy instance's): with a horizon of one round trip plus 5 ms, a
/// hundred runs 100 ms away kept 91% of the rate. The longer it is the fewer requests
/// (near Redis about a hundred a second), and the more slots a run that ends leaves
/// unused.
const HORIZON_MARGIN: Duration = Duration::from_millis(5);
const MIN_HORIZON: Duration = Duration::from_millis(20);
const MAX_HORIZON: Duration = MAX_ROUND_TRIP;

/// A turn that follows a gap (a change of holder) lasts at least this many times the
/// gap, and at least `TURN` (at most `LONGEST_TURN`), before the holder yields to an
/// instance that waits: instances taking turns lose at most 1/257 of the rate to gaps
/// (or, with a gap near the cap, a gap per `LONGEST_TURN` of slots), and each waits at
/// most one turn.
const QUANTUM: u32 = 256;

/// The shortest turn of an instance when instances take turns. On a busy machine near
/// Redis a gap is 1-3 ms (how late the last holder may send its last slot, which its
/// measured round trips bound, scheduling delays included): turns of 100 ms lost 1-2%
/// of the rate to them.
const TURN: Duration = Duration::from_millis(250);

/// The longest turn. Far from Redis a gap is about the round trip (the bound on how
/// late the last holder may send its last slot): a turn of two seconds loses one such
/// gap per two seconds (5% at 100 ms; turns of a second lost 12-14%). A run on the
/// other instance waits at most one turn for its first send. A turn is made of short
/// blocks, so it is not how far ahead anyone holds slots.
const LONGEST_TURN: Duration = Duration::from_secs(2);

/// How often an idle limiter reads Redis's clock (a probe that reserves nothing), so
/// that its mapping never runs out of samples (`SAMPLES_KEPT`) and a run that starts
/// gets a block with its first request.
const PROBE_EVERY: Duration = Duration::from_millis(900);

/// How long the clock samples are kept, and how many at most.
const SAMPLES_KEPT: Duration = Duration::from_secs(2);
const MOST_SAMPLES: usize = 32;

/// Warnings of one kind are logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(5);

/// A limiter that has granted nothing for this long while runs wait says why.
const STARVED: Duration = Duration::from_secs(2);

/// The Redis limiter of one instance: blocks reserved in Redis, dealt out fairly.
pub struct RedisLimiter {
    front: FairLimiter,
}

impl RedisLimiter {
    /// Starts the front's thread (see [`FairLimiter::start`]). Must be called within the
    /// service's runtime, which sends the reservations.
    pub fn new(
        client: Client,
        keys: &Keys,
        rate: NonZeroU32,
        window: Duration,
        metrics: LimiterMetrics,
    ) -> std::io::Result<Self> {
        let slots = RedisSlots {
            client,
            runtime: tokio::runtime::Handle::current(),
            key: keys.limiter(),
            holder: format!("{:016x}", rand::random::<u64>()),
            // Rounded up to what the script is told (a thousandth of a µs), so both space
            // slots alike.
            interval: (window.as_secs_f64() * 1e9 / f64::from(rate.get())).ceil() / 1e3,
            clock: ClockMap::new(SAMPLES_KEPT, MOST_SAMPLES, MAX_ROUND_TRIP),
            blocks: VecDeque::new(),
            last_block: None,
            pending: None,
            heard_reach: 0.0,
            last_reply: None,
            forgave_stale: false,
            not_before: None,
            why: Why::Waiting,
            waiting_since: None,
            last_take: Instant::now(),
            dropped_unreported: 0,
            warned_dropped: None,
            warned_starved: None,
            warned_lost: None,
            metrics,
        };
        Ok(Self {
            front: FairLimiter::start(slots)?,
        })
    }
}

#[async_trait]
impl SendLimiter for RedisLimiter {
    async fn acquire(&self, want: u32) -> Result<Slots, BackendError> {
        self.front.acquire(want).await
    }
}

/// Reserved slots, in local µs.
struct Block {
    /// When the next slot of the block is due.
    due: f64,
    left: u32,
}

/// A reservation on its way.
struct Pending {
    /// When it was sent.
    sent: Instant,
    reply: JoinHandle<Result<Reply, BackendError>>,
    /// The mapping its slots are to be read with (`None`: a probe of the clocks only).
    estimate: Option<Estimate>,
}

struct Reply {
    asked: Instant,
    replied: Instant,
    /// Redis's clock in the script, the first slot (µs), the count, a lost schedule.
    now: f64,
    first: f64,
    count: u32,
    lost: bool,
    /// When to ask again, if the count is 0.
    again: f64,
    /// The largest reach instances declared lately, µs.
    reach: f64,
}

/// Why nothing can be granted, for the warning.
#[derive(Debug, Clone, Copy)]
enum Why {
    Waiting,
    RoundTrip,
    Taken,
    Lost,
}

impl Why {
    fn text(self) -> &'static str {
        match self {
            Why::Waiting => "waiting for a reservation",
            Why::RoundTrip => "the round trip to Redis is above the limiter's cap",
            Why::Taken => "other instances hold the schedule",
            Why::Lost => "the schedule in Redis was lost and restarts after the slots still held",
        }
    }
}

struct RedisSlots {
    client: Client,
    /// The service's runtime, where reservations are sent and their replies taken in:
    /// the limiter's own thread sleeps through the last stretch of each wait for a
    /// slot, and a reply that waited for it would be stamped late.
    runtime: tokio::runtime::Handle,
    key: String,
    /// This limiter's name in the schedule, random per process.
    holder: String,
    /// Slot spacing, µs.
    interval: f64,
    clock: ClockMap,
    /// Reserved and not yet used, in order.
    blocks: VecDeque<Block>,
    /// The offset the last block received was mapped with, and how late that may be.
    last_block: Option<(f64, f64)>,
    pending: Option<Pending>,
    /// The schedule's reach as its last reply said, µs: where a lost schedule must
    /// restart, at least.
    heard_reach: f64,
    /// When the last reply came back: an idle limiter probes only if none came for
    /// [`PROBE_EVERY`] (a probe on the wire holds up the next reservation).
    last_reply: Option<Instant>,
    /// A reservation that failed after [`STALE_FAILURE`] was let go without failing the
    /// runs waiting now; the next failure in a row is theirs.
    forgave_stale: bool,
    /// No reservation before this (the schedule is full that far).
    not_before: Option<Instant>,
    why: Why,
    waiting_since: Option<Instant>,
    last_take: Instant,
    dropped_unreported: u64,
    warned_dropped: Option<Instant>,
    warned_starved: Option<Instant>,
    warned_lost: Option<Instant>,
    metrics: LimiterMetrics,
}

/// A reservation that fails this long after it was sent (a command timeout, a
/// connection lost meanwhile) is not held against the runs waiting when it fails.
const STALE_FAILURE: Duration = Duration::from_secs(1);

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// True (and `last` moved to `now`) if a warning of this kind is due.
fn warn_due(last: &mut Option<Instant>, now: Instant) -> bool {
    let due = last.is_none_or(|at| now.saturating_duration_since(at) >= WARN_EVERY);
    if due {
        *last = Some(now);
    }
    due
}

impl RedisSlots {
    /// Asks for the next block if none is on its way and the reserved slots run out
    /// soon, so the reply is back before they do.
    fn maybe_reserve(&mut self, now: Instant, want: u32) {
        if self.pending.is_some() || self.not_before.is_some_and(|at| now < at) {
            return;
        }
        let Some(estimate) = self.clock.estimate(now) else {
            // No mapping yet (or none recent): a probe of the clocks, no slots.
            self.send(None, 0, 0.0, 0.0);
            return;
        };
        // A slot handed out within `SLACK` of its time still counts, so the block may
        // start that much before the reply is back: near Redis, at once (waiting out a
        // lead there would cost every block a few milliseconds at high rates).
        let lead = (estimate.round_trip + micros(LEAD_MARGIN) - micros(SLACK)).max(0.0);
        let horizon = (1.5 * estimate.round_trip + micros(HORIZON_MARGIN))
            .clamp(micros(MIN_HORIZON), micros(MAX_HORIZON));
        let reserved_until = self
            .blocks
            .back()
            .map(|b| b.due + f64::from(b.left - 1) * self.interval);
        // The script starts a block no earlier than `lead` after it runs, which is up
        // to a round trip after now on this clock (half of it on the way there, the
        // mapping late by up to the other half): asked any later, the slots in between
        // would be lost. Then half a horizon, so that near Redis a block is not asked
        // for per slot; far from it, replies arrive with less than that left, and one
        // request follows the other, each reserving a round trip's worth.
        let ahead = estimate.round_trip + lead + horizon / 2.0;
        if reserved_until.is_none_or(|end| end - self.clock.local(now) <= ahead) {
            self.send(Some(estimate), want, lead, horizon);
        }
    }

    /// Where a schedule found missing restarts, after now, µs: past every slot any
    /// instance may still hold, as far as this one knows: the reach the schedule's last
    /// reply to it said, and its own if it holds slots (`reach`). An instance that
    /// heard of no schedule and holds nothing (a fresh deployment) waits for nothing.
    fn cold(&self, reach: f64) -> f64 {
        let own = if self.blocks.is_empty() { 0.0 } else { reach };
        own.max(self.heard_reach)
    }

    fn send(&mut self, estimate: Option<Estimate>, want: u32, lead: f64, horizon: f64) {
        // How far after the script runs this instance may send a slot of this block.
        let reach = lead + horizon + estimate.map_or(0.0, |e| e.lateness) + self.interval;
        // How late this instance may send its last slot once this block is taken: this
        // mapping's bound, or the last block's if this reply never comes back (the
        // script may still have run). Rounded up, never down.
        let (lateness, delta) = match (estimate, self.last_block) {
            (Some(e), Some((offset, lateness))) => {
                (e.lateness.max(lateness), (offset - e.offset).max(0.0))
            }
            (Some(e), None) => (e.lateness, 0.0),
            (None, _) => (0.0, 0.0),
        };
        let (lateness, delta) = (lateness.ceil(), delta.ceil());
        let args = vec![
            format!("{:.3}", self.interval),
            want.to_string(),
            format!("{horizon:.0}"),
            format!("{lead:.0}"),
            self.holder.clone(),
            format!("{lateness:.0}"),
            format!("{delta:.0}"),
            format!("{:.0}", self.cold(reach).ceil()),
            QUANTUM.to_string(),
            format!("{:.0}", micros(TURN)),
            format!("{:.0}", micros(LONGEST_TURN)),
            format!("{:.0}", reach.ceil()),
        ];
        // A task of its own, so the slots already reserved are dealt out while the
        // request is on the wire.
        let reply = self
            .runtime
            .spawn(reserve(self.client.clone(), self.key.clone(), args));
        self.pending = Some(Pending {
            sent: Instant::now(),
            reply,
            estimate,
        });
    }

    /// Takes in a reply: its slots, mapped with the estimate it was asked with, then
    /// its sample of the clocks.
    fn fold(&mut self, pending: Pending, reply: Reply) {
        let sample = self.clock.sample(reply.asked, reply.replied, reply.now);
        self.metrics
            .round_trip_seconds
            .record(sample.round_trip / 1e6);
        if pending.estimate.is_some() || reply.reach > 0.0 {
            // A probe of a missing schedule hears of no reach: what was heard before
            // still bounds the slots instances may hold.
            self.heard_reach = reply.reach;
        }
        self.last_reply = Some(reply.replied);
        if reply.lost {
            self.why = Why::Lost;
            if warn_due(&mut self.warned_lost, reply.replied) {
                tracing::warn!(
                    key = %self.key,
                    restart_after_ms = (reply.first - reply.now) / 1e3,
                    "send limiter: the schedule was missing in Redis (a flush, a restart or \
                     a failover); it restarts after the slots instances may still hold, \
                     so there is no burst (G2)"
                );
            }
        }
        match pending.estimate {
            Some(e) if reply.count > 0 => {
                self.blocks.push_back(Block {
                    due: reply.first + e.offset,
                    left: reply.count,
                });
                self.last_block = Some((e.offset, e.lateness));
                self.why = Why::Waiting;
            }
            Some(e) => {
                // Nothing within reach, or the turn of another instance.
                if !reply.lost {
                    self.why = Why::Taken;
                }
                // Sent a round trip early, so that the script runs about then (were
                // it earlier still, the reply would say how much longer to wait).
                let again = self.clock.instant(reply.again + e.offset - e.round_trip);
                self.not_before = Some(again.max(reply.replied + Duration::from_micros(500)));
            }
            None => {}
        }
        self.clock.add(sample);
        if self.clock.estimate(reply.replied).is_none() {
            self.why = Why::RoundTrip;
            self.not_before = Some(reply.replied + Duration::from_millis(100));
        }
    }

    fn report_dropped(&mut self, now: Instant, dropped: u32) {
        self.metrics.dropped.increment(u64::from(dropped));
        self.dropped_unreported += u64::from(dropped);
        if warn_due(&mut self.warned_dropped, now) {
            let round_trip_ms = self
                .clock
                .estimate(now)
                .map(|e| e.round_trip / 1e3)
                .unwrap_or(f64::NAN);
            tracing::warn!(
                dropped = self.dropped_unreported,
                round_trip_ms,
                "send limiter: gave up slots it could not hand out in time (a late timer, \
                 a busy instance, a reservation that came back late); slots are never sent \
                 late or saved up (G2), so this costs throughput"
            );
            self.dropped_unreported = 0;
        }
    }

    fn report_waiting(&mut self, now: Instant) {
        let since = *self.waiting_since.get_or_insert(now);
        let waited = now.saturating_duration_since(since);
        if waited >= STARVED && warn_due(&mut self.warned_starved, now) {
            tracing::warn!(
                waited_ms = waited.as_millis() as u64,
                round_trip_ms = self.clock.estimate(now).map(|e| e.round_trip / 1e3),
                why = self.why.text(),
                "send limiter: no slot to grant"
            );
        }
    }
}

#[async_trait]
impl SlotSource for RedisSlots {
    async fn idle(&mut self) -> Option<Instant> {
        if self.pending.as_ref().is_some_and(|p| p.reply.is_finished())
            && let Err(error) = self.settle().await
        {
            // Nobody waits to hear of it; the next run's request finds out afresh.
            tracing::debug!(error = ?error, "send limiter: a clock probe failed");
        }
        let now = Instant::now();
        if self.pending.is_some() {
            // Its reply is taken in soon, so the mapping is ready.
            return Some(now + Duration::from_millis(20));
        }
        if let Some(at) = self.last_reply
            && now.saturating_duration_since(at) < PROBE_EVERY
        {
            // Runs are reserving (or just were): their replies keep the mapping fresh.
            return Some(at + PROBE_EVERY);
        }
        self.send(None, 0, 0.0, 0.0);
        Some(now + PROBE_EVERY)
    }

    async fn take(&mut self, want: u32) -> Result<Take, BackendError> {
        let now = Instant::now();
        if now.saturating_duration_since(self.last_take) > STARVED {
            // Idle since: nobody was waiting.
            self.waiting_since = None;
        }
        self.last_take = now;
        loop {
            if self.pending.as_ref().is_some_and(|p| p.reply.is_finished()) {
                self.settle().await?;
            }
            let now = Instant::now();
            let local = self.clock.local(now);
            let slack = micros(SLACK);
            let mut dropped = 0;
            let mut granted = 0;
            while let Some(block) = self.blocks.front_mut() {
                if block.due + slack < local {
                    dropped += 1;
                } else if block.due <= local && granted < want {
                    granted += 1;
                } else {
                    break;
                }
                block.due += self.interval;
                block.left -= 1;
                if block.left == 0 {
                    self.blocks.pop_front();
                }
            }
            if dropped > 0 {
                self.report_dropped(now, dropped);
            }
            self.maybe_reserve(now, want);
            if granted > 0 {
                self.waiting_since = None;
                return Ok(Take::Now(granted));
            }
            if let Some(block) = self.blocks.front() {
                return Ok(Take::Later(self.clock.instant(block.due)));
            }
            if self.pending.is_some() {
                self.settle().await?;
                continue;
            }
            self.report_waiting(now);
            let again = self.not_before.unwrap_or(now + Duration::from_millis(1));
            return Ok(Take::Later(again.max(now + Duration::from_micros(100))));
        }
    }
}

impl RedisSlots {
    /// Waits for the reservation on its way and takes it in.
    async fn settle(&mut self) -> Result<(), BackendError> {
        let Some(mut pending) = self.pending.take() else {
            return Ok(());
        };
        let reply = (&mut pending.reply).await.map_err(|e| {
            BackendError::on_redis(
                STORE,
                false,
                anyhow::anyhow!("reservation task failed: {e}"),
            )
        })?;
        match reply {
            Ok(reply) => {
                self.forgave_stale = false;
                self.fold(pending, reply);
                Ok(())
            }
            // A request sent long ago, while Redis was away (it timed out, say), tells
            // nothing of Redis now: the runs waiting now may have come since it came
            // back. One such failure is let go and the next request decides (G4: a
            // Redis that stays away still fails them, one command timeout later).
            Err(error) if pending.sent.elapsed() > STALE_FAILURE && !self.forgave_stale => {
                tracing::debug!(error = ?error, "a reservation sent long ago failed; asking again");
                self.forgave_stale = true;
                Ok(())
            }
            Err(error) => Err(error),
        }
    }
}

/// Runs the reservation script with `args` on `key`, and parses its reply.
async fn reserve(client: Client, key: String, args: Vec<String>) -> Result<Reply, BackendError> {
    let asked = Instant::now();
    let (now, first, count, lost, again, reach): (String, String, String, String, String, String) =
        RESERVE
            .evalsha_with_reload(&client, vec![key], args)
            .await
            .map_err(|e| backend(STORE, e))?;
    let replied = Instant::now();
    let parse = |s: &str| {
        s.parse::<f64>().map_err(|e| {
            BackendError::on_redis(STORE, false, anyhow::anyhow!("bad reply {s:?}: {e}"))
        })
    };
    Ok(Reply {
        asked,
        replied,
        now: parse(&now)?,
        first: parse(&first)?,
        count: count.parse().unwrap_or(0),
        lost: lost == "1",
        again: parse(&again)?,
        reach: parse(&reach)?,
    })
}
