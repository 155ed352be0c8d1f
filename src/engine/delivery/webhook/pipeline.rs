//! The webhook requests of one run, in the order they were started (G12): which are
//! on the wire, which wait for a retry, and the contiguous prefix the endpoint has
//! acknowledged, which is what the run may publish and record (G5).
//!
//! It knows nothing of the limiter, the fence or the recorder: the run loop asks it
//! what is due, starts attempts through it once it holds a slot and a pass, and takes
//! the acknowledged prefix from it.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument as _;

use super::{Attempt, Failure, LastTransient, Outcome, WebhookClient, sign};
use crate::domain::{Attributes, Notification, NotificationId, ProductId, Registration, UserId};
use crate::engine::stock::Admission;

/// Notifications started together (one grant of the limiter), stamped with one
/// `sent_at`.
struct Chunk {
    seq: u64,
    sent_at: DateTime<Utc>,
    items: Vec<Item>,
}

struct Item {
    id: NotificationId,
    registration: Registration,
    attempt: Attempt,
    /// Attempts made so far, the one on the wire included.
    attempts: u32,
    acknowledged: bool,
}

/// What the notifications started together share: when they were sent (one stamp, the
/// same for every attempt) and their run's attributes.
pub struct Group<'a> {
    pub sent_at: DateTime<Utc>,
    pub attributes: &'a Attributes,
}

/// An attempt's end, as its task reports it.
pub struct Answered {
    seq: u64,
    index: usize,
    outcome: Outcome,
}

/// What an answer changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A notification was acknowledged: the prefix may have grown.
    Acknowledged,
    /// A notification will be tried again; with a pause every request must respect
    /// (`Retry-After`).
    Retrying { pause: Option<Duration> },
    /// A notification failed for good: the run stops delivering ([`Pipeline::failure`]).
    Failed,
    /// An answer to a notification the pipeline no longer tracks (after a failure).
    Ignored,
}

/// Acknowledged notifications ready to be published and recorded, in order.
pub struct Acknowledged {
    pub sent_at: DateTime<Utc>,
    pub registrations: Vec<Registration>,
}

pub struct Pipeline {
    client: Arc<WebhookClient>,
    product: ProductId,
    restock_round: i64,
    chunks: VecDeque<Chunk>,
    /// Notifications in `chunks`.
    len: usize,
    next_seq: u64,
    /// Attempts on the wire.
    tasks: JoinSet<Answered>,
    /// Notifications waiting for their next attempt: (due, chunk seq, index), so the
    /// earliest due, then the earliest in the queue, goes first.
    retries: BTreeSet<(Instant, u64, usize)>,
    /// Queue position of the last notification started.
    last_started: Option<i64>,
    failure: Option<Failure>,
}

impl Pipeline {
    pub fn new(client: Arc<WebhookClient>, product: ProductId, restock_round: i64) -> Self {
        Self {
            client,
            product,
            restock_round,
            chunks: VecDeque::new(),
            len: 0,
            next_seq: 0,
            tasks: JoinSet::new(),
            retries: BTreeSet::new(),
            last_started: None,
            failure: None,
        }
    }

    /// Notifications started and not yet taken as acknowledged (G10 counts them).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Attempts on the wire.
    pub fn running(&self) -> usize {
        self.tasks.len()
    }

    pub fn last_started(&self) -> Option<i64> {
        self.last_started
    }

    /// Why the run must stop delivering, once a notification failed for good.
    pub fn failure(&self) -> Option<&Failure> {
        self.failure.as_ref()
    }

    /// Users started and not yet acknowledged in order.
    pub fn users(&self) -> impl Iterator<Item = UserId> + '_ {
        self.chunks
            .iter()
            .flat_map(|c| c.items.iter().map(|i| i.registration.user_id))
    }

    /// Retries due now.
    pub fn due_retries(&self, now: Instant) -> usize {
        self.retries.iter().take_while(|r| r.0 <= now).count()
    }

    /// When the next retry is due, if one waits.
    pub fn next_retry_at(&self) -> Option<Instant> {
        self.retries.first().map(|r| r.0)
    }

    /// Starts the first attempt of each of `registrations`, in order.
    pub fn start(
        &mut self,
        registrations: &[Registration],
        Group {
            sent_at,
            attributes,
        }: Group<'_>,
        pass: &Arc<Admission>,
        send_by: Instant,
    ) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let items = registrations
            .iter()
            .map(|&registration| {
                let notification = Notification {
                    id: NotificationId {
                        product_id: self.product,
                        restock_round: self.restock_round,
                        user_id: registration.user_id,
                    },
                    sent_at,
                    attributes: attributes.clone(),
                };
                Item {
                    id: notification.id,
                    registration,
                    attempt: Attempt {
                        id: notification.id.to_string(),
                        body: sign::body(&notification),
                    },
                    attempts: 0,
                    acknowledged: false,
                }
            })
            .collect();
        self.chunks.push_back(Chunk {
            seq,
            sent_at,
            items,
        });
        self.len += registrations.len();
        self.last_started = registrations
            .last()
            .map(|r| r.position)
            .or(self.last_started);
        for index in 0..registrations.len() {
            self.spawn(seq, index, pass, send_by);
        }
    }

    /// Starts up to `slots` due retries; returns how many.
    pub fn start_retries(
        &mut self,
        slots: usize,
        pass: &Arc<Admission>,
        send_by: Instant,
    ) -> usize {
        let now = Instant::now();
        let mut started = 0;
        while started < slots {
            match self.retries.first() {
                Some(&(due, seq, index)) if due <= now => {
                    self.retries.pop_first();
                    self.spawn(seq, index, pass, send_by);
                    started += 1;
                }
                _ => break,
            }
        }
        started
    }

    fn item_mut(&mut self, seq: u64, index: usize) -> Option<&mut Item> {
        let front = self.chunks.front()?.seq;
        let chunk = self.chunks.get_mut(seq.checked_sub(front)? as usize)?;
        chunk.items.get_mut(index)
    }

    fn spawn(&mut self, seq: u64, index: usize, pass: &Arc<Admission>, send_by: Instant) {
        let client = self.client.clone();
        let pass = pass.clone();
        let Some(item) = self.item_mut(seq, index) else {
            return;
        };
        item.attempts += 1;
        let attempt = item.attempt.clone();
        // In the run's span, so each request's span is a child of the run's.
        let run = tracing::Span::current();
        self.tasks.spawn(async move {
            let outcome = client.send(&attempt, pass, send_by).instrument(run).await;
            Answered {
                seq,
                index,
                outcome,
            }
        });
    }

    /// The next attempt to end. `None` when none is on the wire, or when an attempt's
    /// task panicked (it never does: it only awaits the client).
    pub async fn next_answer(&mut self) -> Option<Answered> {
        self.tasks.join_next().await?.ok()
    }

    /// An attempt that has ended already, if any, without waiting.
    pub fn ready_answer(&mut self) -> Option<Answered> {
        self.tasks.try_join_next()?.ok()
    }

    /// Takes an attempt's end into account.
    pub fn answered(&mut self, answered: Answered) -> Event {
        let attempts_allowed = self.client.settings().attempts;
        let stopped = self.failure.is_some();
        let Some(item) = self.item_mut(answered.seq, answered.index) else {
            return Event::Ignored;
        };
        let id = item.id;
        match answered.outcome {
            Outcome::Delivered => {
                item.acknowledged = true;
                Event::Acknowledged
            }
            _ if stopped => Event::Ignored,
            Outcome::Permanent { status } => {
                self.failure = Some(Failure::Refused { status, id });
                Event::Failed
            }
            Outcome::Transient { why, retry_after } => {
                let attempts = item.attempts;
                if attempts >= attempts_allowed {
                    self.failure = Some(Failure::Exhausted {
                        last: LastTransient(why),
                        id,
                        attempts,
                    });
                    return Event::Failed;
                }
                let settings = self.client.settings();
                let pause = retry_after.map(|p| p.min(settings.max_retry_after));
                let delay = settings
                    .retry_delay(attempts + 1)
                    .max(pause.unwrap_or_default());
                self.retries
                    .insert((Instant::now() + delay, answered.seq, answered.index));
                Event::Retrying { pause }
            }
        }
    }

    /// Takes the acknowledged prefix: every chunk at the front whose notifications were
    /// all acknowledged, and with `partial` (the run is stopping) the acknowledged
    /// beginning of the first chunk that was not.
    pub fn take_acknowledged(&mut self, partial: bool) -> Vec<Acknowledged> {
        let mut taken = Vec::new();
        while let Some(front) = self.chunks.front_mut() {
            let done = front.items.iter().take_while(|i| i.acknowledged).count();
            if done == front.items.len() {
                let chunk = self.chunks.pop_front().expect("there is a front");
                self.len -= chunk.items.len();
                taken.push(Acknowledged {
                    sent_at: chunk.sent_at,
                    registrations: chunk.items.iter().map(|i| i.registration).collect(),
                });
                continue;
            }
            if partial && done > 0 {
                let registrations: Vec<_> =
                    front.items.drain(..done).map(|i| i.registration).collect();
                self.len -= done;
                // The chunk's remaining items keep their indices relative to the start:
                // they are given up with it, as nothing more is started after this.
                taken.push(Acknowledged {
                    sent_at: front.sent_at,
                    registrations,
                });
            }
            break;
        }
        taken
    }

    /// Stops the pipeline: no retry is started from now on.
    pub fn stop_retries(&mut self) {
        self.retries.clear();
    }

    /// Gives up every attempt still on the wire, and forgets what was not acknowledged:
    /// the next owner of the run, or a resume, sends it again under the same ids.
    pub fn abandon(&mut self) {
        self.tasks.abort_all();
        self.retries.clear();
        self.chunks.clear();
        self.len = 0;
    }
}
