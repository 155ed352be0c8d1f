//! `WatchRestockRun`: one run as it goes, read from the database, whichever instance
//! drives it (G11).
//!
//! The database is the source of truth: the stream reads the run, sends it, and reads it
//! again a little under a second later, so that an update goes out at least once a
//! second while the run is in progress. A run's end is announced on the bus by the
//! instance that recorded it, on every instance (`BusEvent::RunEnded`); a watch that
//! hears it reads the run at once, so the final state goes out without waiting for the
//! next tick. The bus only makes the end prompt: a lost announcement delays the final
//! state by one tick at most. No database connection is held between reads.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::time::Instant;

use super::Engine;
use super::bus::{BusEvent, RunKey};
use crate::domain::{Error, ProductId, Run, RunStatus};

/// How long a watched run in progress goes without an update, at most, before it is
/// read again and sent: a little under a second, so that with the time the read takes
/// the caller still hears at least once a second.
const UPDATE_EVERY: Duration = Duration::from_millis(900);

/// Why a watch ended on the service's side, before the run's final state.
#[derive(Debug)]
pub enum WatchEnd {
    /// The service is stopping; the caller watches again once it is back (or on
    /// another instance).
    ShuttingDown { product: ProductId, round: i64 },
    /// Reading the run failed.
    Failed(Error),
}

pub type RunStream = Pin<Box<dyn Stream<Item = Result<Run, WatchEnd>> + Send>>;

impl Engine {
    /// Follows a run: the given round, or the latest one (the round it is when the
    /// watch starts; a round triggered later is not followed). The stream sends the run
    /// as it is now, then updates, and ends after sending its final state.
    /// `UnknownProduct`, `NeverRestocked` or `UnknownRound` up front, as
    /// [`Engine::restock_run`].
    pub async fn watch_run(
        self: &Arc<Self>,
        product: ProductId,
        round: Option<i64>,
    ) -> Result<RunStream, Error> {
        // An end announced after the first read is heard.
        let events = self.listen_to_bus()?;
        let first = self.restock_run(product, round).await?;
        let watch = Watch {
            engine: self.clone(),
            run: RunKey {
                product_id: product,
                restock_round: first.restock_round,
            },
            events: Some(events),
            first: Some(first),
            last_sent: None,
            sent_at: Instant::now(),
            ended: false,
        };
        Ok(Box::pin(futures::stream::unfold(
            watch,
            |mut w| async move {
                let item = w.next().await?;
                Some((item, w))
            },
        )))
    }
}

struct Watch {
    engine: Arc<Engine>,
    run: RunKey,
    /// `None` once the bus has closed: ticks alone then carry the watch.
    events: Option<broadcast::Receiver<Arc<BusEvent>>>,
    /// Read when the watch started, not sent yet.
    first: Option<Run>,
    last_sent: Option<Run>,
    sent_at: Instant,
    ended: bool,
}

/// What ended a wait between two reads.
enum Woken {
    /// The next update is due.
    Due,
    /// The bus says the run left its instance: it ended, or was handed over.
    RunEnded,
}

impl Watch {
    async fn next(&mut self) -> Option<Result<Run, WatchEnd>> {
        if self.ended {
            return None;
        }
        let item = self.produce().await;
        match &item {
            Ok(run) => {
                self.ended = run.status != RunStatus::InProgress;
                self.last_sent = Some(run.clone());
                self.sent_at = Instant::now();
            }
            Err(_) => self.ended = true,
        }
        Some(item)
    }

    async fn produce(&mut self) -> Result<Run, WatchEnd> {
        if let Some(first) = self.first.take() {
            return Ok(first);
        }
        loop {
            let due = self.sent_at + UPDATE_EVERY;
            let woken = self.wait(due).await?;
            // A shutdown whose `Closing` this watch missed (its feed lagged) shows here.
            if self.engine.shutdown.is_cancelled() {
                return Err(self.shutting_down());
            }
            let run = self.read().await?;
            let changed = self.last_sent.as_ref() != Some(&run);
            if matches!(woken, Woken::Due) || changed {
                return Ok(run);
            }
            // Handed over to another instance, and unchanged: wait out the tick.
        }
    }

    /// Waits until `due`, or until the bus says the run left its instance.
    async fn wait(&mut self, due: Instant) -> Result<Woken, WatchEnd> {
        let tick = tokio::time::sleep_until(due);
        tokio::pin!(tick);
        loop {
            let Some(events) = self.events.as_mut() else {
                tick.as_mut().await;
                return Ok(Woken::Due);
            };
            tokio::select! {
                () = tick.as_mut() => return Ok(Woken::Due),
                event = events.recv() => match event {
                    Ok(event) => match &*event {
                        BusEvent::RunEnded { run, .. } if *run == self.run => {
                            return Ok(Woken::RunEnded);
                        }
                        BusEvent::Closing => return Err(self.shutting_down()),
                        _ => {}
                    },
                    // The end of the run may have been among what was missed: look now.
                    Err(RecvError::Lagged(_)) => return Ok(Woken::RunEnded),
                    Err(RecvError::Closed) => self.events = None,
                },
            }
        }
    }

    /// The run as recorded now. It was read once already, and runs are never deleted.
    async fn read(&self) -> Result<Run, WatchEnd> {
        let RunKey {
            product_id: product,
            restock_round: round,
        } = self.run;
        self.engine
            .store
            .run(product, Some(round))
            .await
            .map_err(WatchEnd::Failed)?
            .ok_or(WatchEnd::Failed(Error::UnknownRound { product, round }))
    }

    fn shutting_down(&self) -> WatchEnd {
        WatchEnd::ShuttingDown {
            product: self.run.product_id,
            round: self.run.restock_round,
        }
    }
}
