//! The bus on Redis pub/sub, shared by every instance (G11).
//!
//! Runs publish batches on one channel (through the stock fence's script, so that the
//! stock check and the delivery are one step); every instance holds one subscription to
//! it and fans what arrives out to its own streams through an in-process [`LocalBus`].
//! Redis delivers a channel's messages in the order it executed the publishes, so a
//! run's batches reach every instance in send order. Pub/sub keeps nothing: what a
//! stream misses (a reconnect, a lagging instance) it finds in the record, which is the
//! replay log (`resume_after`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use fred::clients::SubscriberClient;
use fred::prelude::{Client, EventInterface, PubsubInterface};
use prost::Message as _;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::local::LocalBus;
use super::{BusEvent, NotificationBus, RunKey, SentBatch, SentItem};
use crate::domain::{Attributes, BackendError, Component, ProductId, RunStatus, UserId};
use crate::redis::{Keys, backend};
use wire::{Event as WireEvent, Kind as WireKind, Status as WireStatus};

const STORE: Component = Component::NotificationBus;

/// The wire format of bus events, generated from `proto/restock/bus/v1/bus.proto`.
mod wire {
    include!(concat!(env!("OUT_DIR"), "/restock.bus.v1.rs"));
}

impl From<RunStatus> for WireStatus {
    fn from(status: RunStatus) -> Self {
        match status {
            RunStatus::InProgress => WireStatus::InProgress,
            RunStatus::CanceledBySoldOut => WireStatus::CanceledBySoldOut,
            RunStatus::CanceledByError => WireStatus::CanceledByError,
            RunStatus::Completed => WireStatus::Completed,
        }
    }
}

impl WireStatus {
    fn run_status(self) -> Option<RunStatus> {
        match self {
            WireStatus::Unspecified => None,
            WireStatus::InProgress => Some(RunStatus::InProgress),
            WireStatus::CanceledBySoldOut => Some(RunStatus::CanceledBySoldOut),
            WireStatus::CanceledByError => Some(RunStatus::CanceledByError),
            WireStatus::Completed => Some(RunStatus::Completed),
        }
    }
}

/// A sent batch as published.
pub fn encode_sent(batch: &SentBatch) -> Bytes {
    WireEvent {
        kind: WireKind::Sent.into(),
        product_id: batch.run.product_id.get(),
        restock_round: batch.run.restock_round,
        position: batch.prev_position,
        user_ids: batch.items.iter().map(|i| i.user_id.get()).collect(),
        positions: batch.items.iter().map(|i| i.position).collect(),
        sent_at_micros: batch.sent_at.timestamp_micros(),
        status: WireStatus::Unspecified.into(),
        claim: batch.claim,
        attributes: batch
            .attributes
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
    .encode_to_vec()
    .into()
}

fn encode(event: &BusEvent) -> Option<Bytes> {
    match event {
        BusEvent::Sent(batch) => Some(encode_sent(batch)),
        BusEvent::RunEnded {
            run,
            status,
            last_position,
        } => Some(
            WireEvent {
                kind: WireKind::RunEnded.into(),
                product_id: run.product_id.get(),
                restock_round: run.restock_round,
                position: *last_position,
                status: WireStatus::from(*status).into(),
                ..WireEvent::default()
            }
            .encode_to_vec()
            .into(),
        ),
        BusEvent::Gap | BusEvent::Closing => None,
    }
}

fn decode(payload: &[u8]) -> Option<BusEvent> {
    let wire = WireEvent::decode(payload).ok()?;
    let run = RunKey {
        product_id: ProductId::parse(wire.product_id).ok()?,
        restock_round: wire.restock_round,
    };
    match WireKind::try_from(wire.kind).ok()? {
        WireKind::Sent => Some(BusEvent::Sent(Arc::new(
            SentBatch::new(
                run,
                wire.position,
                wire.user_ids
                    .iter()
                    .zip(&wire.positions)
                    .map(|(&user, &position)| SentItem {
                        user_id: UserId::from_stored(user),
                        position,
                    })
                    .collect(),
                DateTime::<Utc>::from_timestamp_micros(wire.sent_at_micros)?,
            )
            .under_claim(wire.claim)
            .with_attributes(Attributes::validated(wire.attributes)),
        ))),
        WireKind::RunEnded => Some(BusEvent::RunEnded {
            run,
            status: WireStatus::try_from(wire.status).ok()?.run_status()?,
            last_position: wire.position,
        }),
        WireKind::Unspecified | WireKind::Tick => None,
    }
}

/// Publishes on the shared channel; subscribers get what every instance published.
pub struct RedisBus {
    client: Client,
    keys: Keys,
    local: Arc<LocalBus>,
    /// Stops the ticks and the subscription's forwarding when the bus is dropped.
    _stop: DropGuard,
}

impl RedisBus {
    /// Subscribes `subscriber` to the channels and forwards what arrives to `local`
    /// (this instance's streams) until the bus is dropped.
    pub async fn start(
        client: Client,
        subscriber: SubscriberClient,
        keys: Keys,
        local: Arc<LocalBus>,
    ) -> anyhow::Result<Self> {
        let messages = subscriber.message_rx();
        let reconnects = subscriber.reconnect_rx();
        subscriber.manage_subscriptions();
        for channel in keys.bus_channels() {
            subscribe_to(&subscriber, &keys, channel).await?;
        }
        let partitions = keys.bus_channels();
        let stop = CancellationToken::new();
        tokio::spawn(
            stop.clone()
                .run_until_cancelled_owned(tick(client.clone(), keys.clone())),
        );
        tokio::spawn(
            stop.clone().run_until_cancelled_owned(forward(
                Feed {
                    subscriber,
                    keys: keys.clone(),
                    last_heard: partitions
                        .into_iter()
                        .map(|c| (c, Instant::now()))
                        .collect(),
                },
                messages,
                reconnects,
                local.clone(),
            )),
        );
        Ok(Self {
            client,
            keys,
            local,
            _stop: stop.drop_guard(),
        })
    }
}

/// Publishes `payload` on a bus channel: sharded on Redis Cluster (it stays on the
/// node that owns the channel's slot), plain on one Redis.
async fn publish_on(
    client: &Client,
    keys: &Keys,
    channel: String,
    payload: Bytes,
) -> Result<(), fred::error::Error> {
    if keys.is_sharded() {
        client.spublish::<i64, _, _>(channel, payload).await?;
    } else {
        client.publish::<i64, _, _>(channel, payload).await?;
    }
    Ok(())
}

/// Subscribes to one bus channel, as [`publish_on`] publishes on it: on Redis
/// Cluster, one SSUBSCRIBE per channel, each to the node that owns its slot.
async fn subscribe_to(
    subscriber: &SubscriberClient,
    keys: &Keys,
    channel: String,
) -> Result<(), fred::error::Error> {
    if keys.is_sharded() {
        subscriber.ssubscribe(channel).await
    } else {
        subscriber.subscribe(channel).await
    }
}

/// How often every instance says "alive" on every partition's channel.
const TICK_EVERY: Duration = Duration::from_secs(1);

/// A partition's channel silent this long has lost its subscription (a failover or a
/// resharding can end one without a word: the server's `sunsubscribe` is not passed
/// on): subscribe to it again, and end the streams, which resume from the record.
const SILENT_AFTER: Duration = Duration::from_secs(3);

/// Publishes a tick on every partition's channel every [`TICK_EVERY`], for as long as
/// the client lives: what lets every instance see that each of its subscriptions
/// still delivers.
async fn tick(client: Client, keys: Keys) {
    let payload: Bytes = WireEvent {
        kind: WireKind::Tick.into(),
        ..WireEvent::default()
    }
    .encode_to_vec()
    .into();
    let mut every = tokio::time::interval(TICK_EVERY);
    loop {
        every.tick().await;
        for channel in keys.bus_channels() {
            if let Err(e) = publish_on(&client, &keys, channel, payload.clone()).await {
                tracing::debug!(error = %e, "could not tick on the bus");
            }
        }
    }
}

/// The subscription and when each partition's channel was last heard from.
struct Feed {
    subscriber: SubscriberClient,
    keys: Keys,
    last_heard: HashMap<String, Instant>,
}

impl Feed {
    /// Subscribes again to the channels silent for [`SILENT_AFTER`]; `true` if any was.
    async fn revive_silent(&mut self) -> bool {
        let now = Instant::now();
        let silent: Vec<String> = self
            .last_heard
            .iter()
            .filter(|(_, heard)| now.duration_since(**heard) > SILENT_AFTER)
            .map(|(channel, _)| channel.clone())
            .collect();
        for channel in &silent {
            tracing::warn!(
                channel,
                "a bus channel went silent; subscribing to it again"
            );
            if let Err(e) = subscribe_to(&self.subscriber, &self.keys, channel.clone()).await {
                tracing::warn!(channel, error = %e, "could not subscribe to the bus channel again");
            }
            self.last_heard.insert(channel.clone(), now);
        }
        !silent.is_empty()
    }
}

/// Hands what arrives on the channels to this instance's streams. Anything that may
/// have lost messages (this task falling behind, a reconnect, a channel gone silent)
/// is passed on as a gap: every stream then ends with the `resume_after` to continue
/// from, and the record fills what pub/sub dropped.
async fn forward(
    mut feed: Feed,
    mut messages: broadcast::Receiver<fred::types::Message>,
    mut reconnects: broadcast::Receiver<fred::types::config::Server>,
    local: Arc<LocalBus>,
) {
    let mut check = tokio::time::interval(TICK_EVERY);
    loop {
        tokio::select! {
            message = messages.recv() => match message {
                Ok(message) => {
                    if let Some(heard) = feed.last_heard.get_mut(&*message.channel) {
                        *heard = Instant::now();
                    }
                    let Some(payload) = message.value.as_bytes() else { continue };
                    match decode(payload) {
                        Some(event) => local.send(event),
                        None if is_tick(payload) => {}
                        None => tracing::warn!("ignored a message on the bus channel that is not a bus event"),
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "this instance fell behind the bus; ending its streams");
                    local.send(BusEvent::Gap);
                }
                Err(RecvError::Closed) => return,
            },
            reconnected = reconnects.recv() => match reconnected {
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    tracing::warn!("reconnected to the bus; ending streams that may have missed notifications");
                    local.send(BusEvent::Gap);
                }
                Err(RecvError::Closed) => return,
            },
            _ = check.tick() => {
                if feed.revive_silent().await {
                    local.send(BusEvent::Gap);
                }
            }
        }
    }
}

fn is_tick(payload: &[u8]) -> bool {
    WireEvent::decode(payload).is_ok_and(|wire| wire.kind == i32::from(WireKind::Tick))
}

#[async_trait]
impl NotificationBus for RedisBus {
    async fn publish(&self, event: BusEvent) -> Result<(), BackendError> {
        let (Some(payload), Some(product)) = (encode(&event), event.product()) else {
            self.local.send(event);
            return Ok(());
        };
        publish_on(
            &self.client,
            &self.keys,
            self.keys.bus_channel(product),
            payload,
        )
        .await
        .map_err(|e| backend(STORE, e))
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<BusEvent>> {
        self.local.subscribe()
    }

    fn close_streams(&self) {
        self.local.close_streams();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// When the tests' batches were sent: a whole number of microseconds, as the wire
    /// carries it.
    fn sent_at() -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp_micros(1_764_000_000_123_456).unwrap()
    }

    #[test]
    fn events_survive_the_wire() {
        let run = RunKey::of(7, 3);
        let sent = BusEvent::Sent(Arc::new(
            SentBatch::of(run, Some(41), &[(9, 42), (2, 45)], sent_at()).under_claim(4),
        ));
        let ended = BusEvent::RunEnded {
            run,
            status: RunStatus::CanceledBySoldOut,
            last_position: None,
        };
        for event in [sent, ended] {
            assert_eq!(decode(&encode(&event).unwrap()), Some(event));
        }
    }

    /// A sent batch as the layout before the kind and the status were enumerations
    /// encoded it (kind 1 on tag 1 as an int32, then product 7, round 3, position 41,
    /// user 9 at position 42, the stamp, and claim 4; an empty text status on tag 8 is
    /// not written): instances of either version read each other's batches.
    const EARLIER_SENT_BATCH: [u8; 25] = [
        0x08, 0x01, 0x10, 0x07, 0x18, 0x03, 0x20, 0x29, 0x2a, 0x01, 0x09, 0x32, 0x01, 0x2a, 0x38,
        0xc0, 0xc4, 0x90, 0x8b, 0x94, 0x8b, 0x91, 0x03, 0x48, 0x04,
    ];

    #[test]
    fn a_sent_batch_is_the_same_bytes_as_in_the_earlier_layout() {
        let batch = SentBatch::of(RunKey::of(7, 3), Some(41), &[(9, 42)], sent_at()).under_claim(4);
        assert_eq!(encode_sent(&batch).as_ref(), EARLIER_SENT_BATCH.as_slice());
    }

    #[test]
    fn an_event_of_an_unknown_kind_or_status_is_ignored() {
        let event = |kind: i32, status: i32| {
            WireEvent {
                kind,
                product_id: 7,
                restock_round: 3,
                status,
                ..WireEvent::default()
            }
            .encode_to_vec()
        };
        assert!(
            decode(&event(
                WireKind::RunEnded.into(),
                WireStatus::Completed.into()
            ))
            .is_some()
        );
        assert_eq!(decode(&event(3, WireStatus::Completed.into())), None);
        assert_eq!(decode(&event(WireKind::RunEnded.into(), 0)), None);
        assert_eq!(decode(&event(WireKind::RunEnded.into(), 5)), None);
    }
}
