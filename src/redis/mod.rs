//! Redis through fred: the client with the service's timeouts, and every key and
//! channel name, built by `Keys` under the configured prefix so several deployments
//! (or tests) can share one Redis. The capabilities that use it live with the engine
//! (`engine/*/redis.rs`).

use std::time::Duration;

use anyhow::Context as _;
use fred::clients::SubscriberClient;
use fred::prelude::{Builder, ClientLike, Config, Error as RedisError, ErrorKind, ReconnectPolicy};

use crate::domain::{BackendError, Component, ProductId};

/// Builds every Redis key of the service.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A product's cached stock (a hash: stock, version, nonce, confirmed). Not the
    /// `stock:` string of earlier versions, so an upgrade never reads one as the other.
    pub fn stock(&self, product: ProductId) -> String {
        format!("{}stock-figure:{}", self.prefix, product)
    }

    /// The newest claim token a run's deliveries have shown (G8).
    pub fn run_claim(&self, product: ProductId, round: i64) -> String {
        format!("{}claim:{}:{}", self.prefix, product, round)
    }

    /// The claim and queue position of the last batch a run delivered: the next must
    /// follow it (G1, with several deliveries on their way).
    pub fn run_chain(&self, product: ProductId, round: i64) -> String {
        format!("{}chain:{}:{}", self.prefix, product, round)
    }

    /// The send limiter's schedule, shared by every instance (G2): a hash of the next
    /// free slot and who reserved last, with no TTL, so that its absence means it was
    /// lost.
    pub fn limiter(&self) -> String {
        format!("{}limiter:schedule", self.prefix)
    }

    /// Requests of a product admitted through the stock fence and not yet sent (a
    /// sorted set scored by expiry, G3, G12).
    pub fn admissions(&self, product: ProductId) -> String {
        format!("{}admissions:{}", self.prefix, product)
    }

    /// The pause of the webhook endpoint after a `Retry-After`: present while it lasts
    /// (G12).
    pub fn webhook_pause(&self) -> String {
        format!("{}webhook:pause", self.prefix)
    }

    /// The pub/sub channel of the notification bus (G11).
    pub fn bus_channel(&self) -> String {
        format!("{}bus", self.prefix)
    }
}

/// Maps a fred error to a backend error of `component` in Redis; connection-level
/// failures are "unavailable".
pub fn backend(component: Component, err: RedisError) -> BackendError {
    let unavailable = matches!(
        err.kind(),
        ErrorKind::IO | ErrorKind::Timeout | ErrorKind::Canceled
    );
    BackendError::on_redis(component, unavailable, err)
}

/// Pub/sub messages a subscriber connection may hold before the forwarding task reads
/// them; the forwarder reads continuously, so this only absorbs scheduling hiccups: 4,096
/// is eight seconds of batches at 500 sends per second, one send a batch. tokio's
/// broadcast channel allocates every slot up front, so this figure is resident memory
/// whether it is used or not (65,536 slots cost tens of megabytes idle).
const SUBSCRIBER_BUFFER: usize = 1 << 12;

/// A connected fred client with the service's timeouts.
pub async fn connect(url: &str) -> anyhow::Result<fred::prelude::Client> {
    let client = builder(url)?
        .build()
        .context("cannot build the Redis client for REDIS_URL")?;
    let reachable = async {
        client.init().await?;
        // With a reconnect policy, init() can succeed before any connection exists;
        // a round trip proves the server answers.
        client.ping::<String>(None).await
    };
    tokio::time::timeout(Duration::from_secs(5), reachable)
        .await
        .context("timed out connecting to REDIS_URL")?
        .context("cannot connect to REDIS_URL")?;
    Ok(client)
}

/// A connection for the bus's subscription: it re-subscribes after a reconnect.
pub async fn connect_subscriber(url: &str) -> anyhow::Result<SubscriberClient> {
    let client = builder(url)?
        .with_performance_config(|p| {
            p.default_command_timeout = Duration::from_secs(2);
            p.broadcast_channel_capacity = SUBSCRIBER_BUFFER;
        })
        .build_subscriber_client()
        .context("cannot build the Redis subscriber for REDIS_URL")?;
    tokio::time::timeout(Duration::from_secs(5), client.init())
        .await
        .context("timed out connecting to REDIS_URL")?
        .context("cannot connect to REDIS_URL")?;
    Ok(client)
}

fn builder(url: &str) -> anyhow::Result<Builder> {
    // fred reads any scheme it does not know as a plain server address; refuse early.
    // `rediss://` is TLS, verified against the system's root certificates.
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        anyhow::bail!(
            "REDIS_URL has an unsupported scheme: use redis://host:port, or rediss://host:port \
             for TLS"
        );
    }
    let config =
        Config::from_url(url).context("REDIS_URL is not a valid redis:// or rediss:// URL")?;
    let mut builder = Builder::from_config(config);
    builder
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(2);
            c.internal_command_timeout = Duration::from_secs(2);
            c.max_command_attempts = 2;
        })
        .with_performance_config(|p| {
            // Fail a command instead of queueing it forever while Redis is down: the
            // engine turns the error into CANCELED_BY_ERROR, the API into UNAVAILABLE.
            p.default_command_timeout = Duration::from_secs(2);
        })
        .set_policy(ReconnectPolicy::new_constant(0, 500));
    Ok(builder)
}
