//! The fair front of a send limiter (G2: runs that wait together are served fairly).
//!
//! One task per limiter owns its [`SlotSource`] and a queue of the calls to `acquire`
//! waiting on this instance, in arrival order. When slots are due it deals them out
//! round robin from the front: one each, in queue order, until the slots run out or
//! every waiter has what it asked for. A waiter that got slots leaves the queue; when
//! its run comes back for more it queues again at the back. So with `n` runs waiting,
//! each gets a slot within `n` slots, however their timers fire; without the queue
//! every waiter would wake at the same instant and the first to take a lock would win,
//! again and again.
//!
//! A waiter that goes away (its run stopped, its `select!` took another branch) is
//! skipped: the slots meant for it go to the next in the queue, at the same instant,
//! so nothing is lost and no one stalls.

use std::collections::VecDeque;

use async_trait::async_trait;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{SendLimiter, SlotSource, Slots, Take};
use crate::domain::BackendError;

/// One call to `acquire`, waiting for its slots.
struct Waiter {
    want: u32,
    reply: oneshot::Sender<Result<Slots, BackendError>>,
}

/// A [`SendLimiter`] that serves the waiting calls of this instance in turn from one
/// slot source.
pub struct FairLimiter {
    /// Unbounded: at most one entry per waiting run, and a run waits for one call at a
    /// time.
    waiters: mpsc::UnboundedSender<Waiter>,
}

impl FairLimiter {
    /// Starts the task that deals out `source`'s slots, on a thread of its own. It ends
    /// when the limiter is dropped.
    ///
    /// Its own thread, because a slot is due every few milliseconds and may be handed
    /// out only [`super::LATE_GRANT`] late (a later one is given up, G2). On the
    /// service's runtime its timer could fire several milliseconds late while every
    /// worker was busy (encoding, committing, streaming): tokio looks at its timers when
    /// a worker goes idle or between polls. And tokio's timer itself fires up to two
    /// milliseconds late (its deadline rounded up to a millisecond, and the wait for it
    /// rounded up again), so the last stretch of each wait is slept with the operating
    /// system's precise sleep, which this thread may block on: it has nothing else to
    /// run meanwhile.
    pub fn start(source: impl SlotSource) -> std::io::Result<Self> {
        let (waiters, arrivals) = mpsc::unbounded_channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("send-limiter".into())
            .spawn(move || runtime.block_on(deal(source, arrivals, Waits::Precise)))?;
        Ok(Self { waiters })
    }

    /// Starts the task on the current runtime, whose clock it then follows (tests with
    /// paused time).
    #[cfg(test)]
    pub fn start_here(source: impl SlotSource) -> Self {
        let (waiters, arrivals) = mpsc::unbounded_channel();
        tokio::spawn(deal(source, arrivals, Waits::OnTheTimer));
        Self { waiters }
    }
}

#[async_trait]
impl SendLimiter for FairLimiter {
    async fn acquire(&self, want: u32) -> Result<Slots, BackendError> {
        let (reply, granted) = oneshot::channel();
        let stopped = || {
            BackendError::new(
                crate::domain::Component::SendLimiter,
                true,
                anyhow::anyhow!("stopped"),
            )
        };
        self.waiters
            .send(Waiter {
                want: want.max(1),
                reply,
            })
            .map_err(|_| stopped())?;
        granted.await.map_err(|_| stopped())?
    }
}

/// How the dealing task waits for the next slot.
#[derive(Clone, Copy)]
enum Waits {
    /// The last stretch slept precisely, blocking the thread (a thread of its own).
    Precise,
    /// On tokio's timer only (a shared runtime, or paused time in tests).
    #[cfg_attr(not(test), allow(dead_code))]
    OnTheTimer,
}

async fn deal(
    mut source: impl SlotSource,
    mut arrivals: mpsc::UnboundedReceiver<Waiter>,
    waits: Waits,
) {
    let mut queue: VecDeque<Waiter> = VecDeque::new();
    // The source is kept warm from the start, and whenever nobody waits.
    let mut idle_at = Some(Instant::now());
    loop {
        if queue.is_empty() {
            tokio::select! {
                biased;
                waiter = arrivals.recv() => match waiter {
                    Some(waiter) => queue.push_back(waiter),
                    None => return,
                },
                () = tokio::time::sleep_until(idle_at.unwrap_or_else(Instant::now)), if idle_at.is_some() => {
                    idle_at = source.idle().await;
                    continue;
                }
            }
        }
        while let Ok(waiter) = arrivals.try_recv() {
            queue.push_back(waiter);
        }
        queue.retain(|w| !w.reply.is_closed());
        if queue.is_empty() {
            continue;
        }
        let want = queue.iter().fold(0u32, |sum, w| sum.saturating_add(w.want));
        match source.take(want).await {
            Ok(Take::Now(slots)) => hand_out(&mut queue, slots),
            Ok(Take::Later(at)) => wait_until(at, waits).await,
            Err(error) => {
                // Every waiter was waiting on the same source: they all hear of it (G4:
                // their runs end with the error rather than wait on a broken store).
                let text = format!("{:#}", error.source);
                let (component, in_redis, unavailable) =
                    (error.component, error.in_redis, error.unavailable);
                let mut first = Some(error);
                for waiter in queue.drain(..) {
                    let error = first.take().unwrap_or_else(|| BackendError {
                        component,
                        in_redis,
                        unavailable,
                        source: anyhow::anyhow!(text.clone()),
                    });
                    let _ = waiter.reply.send(Err(error));
                }
            }
        }
    }
}

/// Waits until `at`. Tokio's timer fires on whole milliseconds, never early, and up to
/// two late; a wait that short is slept precisely instead (a thread of its own), and a
/// longer one on the timer until that close. On a shared runtime, a slot due in a few
/// microseconds (at high rates, one is due every few) would wait out the rest of a
/// millisecond for nothing, so so short a wait yields to other tasks until it is over.
async fn wait_until(at: Instant, waits: Waits) {
    let left = at.saturating_duration_since(Instant::now());
    match waits {
        Waits::Precise => {
            if left > TIMER_LATENESS {
                tokio::time::sleep_until(at - TIMER_LATENESS).await;
            }
            // A few milliseconds at most, during which this thread has nothing else
            // to do: a reservation's reply waits in its channel meanwhile.
            let left = at.saturating_duration_since(Instant::now());
            if !left.is_zero() {
                std::thread::sleep(left);
            }
        }
        Waits::OnTheTimer if left > SPIN_AT_MOST => tokio::time::sleep_until(at).await,
        Waits::OnTheTimer => {
            while Instant::now() < at {
                tokio::task::yield_now().await;
            }
        }
    }
}

/// How late tokio's timer may fire: its deadline is rounded up to a millisecond, and
/// the wait for that deadline is rounded up to a millisecond again.
const TIMER_LATENESS: Duration = Duration::from_millis(2);

/// The longest wait [`wait_until`] spends yielding rather than on the timer.
const SPIN_AT_MOST: Duration = Duration::from_micros(200);

/// Deals `slots` round robin from the front of `queue`; waiters served leave it, the
/// others keep their place. Slots of a waiter that went away go to the next ones (a
/// slot left with no one to take it is spent: a send the run did not make).
fn hand_out(queue: &mut VecDeque<Waiter>, mut slots: u32) {
    loop {
        queue.retain(|w| !w.reply.is_closed());
        if slots == 0 || queue.is_empty() {
            return;
        }
        let shares = shares(queue.iter().map(|w| w.want), slots);
        slots -= shares.iter().sum::<u32>();
        for (waiter, share) in queue.drain(..shares.len()).zip(shares) {
            let at = Instant::now();
            if let Err(Ok(share)) = waiter.reply.send(Ok(Slots { count: share, at })) {
                slots += share.count;
            }
        }
    }
}

/// How many of `slots` each waiter gets, dealt one at a time in queue order. Only a
/// prefix of the queue gets any: dealing stops where the slots run out.
fn shares(wants: impl Iterator<Item = u32> + Clone, slots: u32) -> Vec<u32> {
    let count = wants.clone().count();
    let mut shares = vec![0u32; count];
    let mut left = slots;
    while left > 0 {
        let mut dealt = false;
        for (share, want) in shares.iter_mut().zip(wants.clone()) {
            if left == 0 {
                break;
            }
            if *share < want {
                *share += 1;
                left -= 1;
                dealt = true;
            }
        }
        if !dealt {
            break;
        }
    }
    let served = shares.iter().take_while(|&&n| n > 0).count();
    shares.truncate(served);
    shares
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_dealt_one_each_in_queue_order() {
        assert_eq!(shares([5, 5, 5].into_iter(), 2), vec![1, 1]);
        assert_eq!(shares([5, 1, 5].into_iter(), 7), vec![3, 1, 3]);
        assert_eq!(shares([2, 2].into_iter(), 9), vec![2, 2]);
    }

    #[tokio::test]
    async fn a_waiter_that_went_away_passes_its_slots_on() {
        let (gone, dropped) = oneshot::channel();
        drop(dropped);
        let (next, granted) = oneshot::channel();
        let mut queue = VecDeque::from([
            Waiter {
                want: 3,
                reply: gone,
            },
            Waiter {
                want: 3,
                reply: next,
            },
        ]);
        hand_out(&mut queue, 2);
        assert_eq!(granted.await.unwrap().unwrap().count, 2);
        assert!(queue.is_empty());
    }
}
