//! Redis through fred: the client with the service's timeouts, and every key and
//! channel name, built by `Keys` under the configured prefix so several deployments
//! (or tests) can share one Redis. The capabilities that use it live with the engine
//! (`engine/*/redis.rs`).

use std::time::Duration;

use anyhow::Context as _;
use fred::clients::SubscriberClient;
use fred::prelude::{Builder, ClientLike, Config, Error as RedisError, ErrorKind, ReconnectPolicy};

use crate::domain::{BackendError, Component, ProductId};

/// How many partitions the products' keys and the bus are spread over. Every key of a
/// product, and the bus channel its batches go to, carry the hash tag of its partition
/// (`{p7}`), so on Redis Cluster each lands in one hash slot: a script that checks a
/// product's stock and claim and publishes its batch touches one slot, and the
/// partitions' slots spread over the masters, so no node carries all the traffic. A
/// product's partition is fixed by its id. Part of the key layout: changing it moves
/// every key (the cache refills, claims are proved again against the database).
pub const PARTITIONS: i64 = 16;

/// Builds every Redis key and channel name of the service.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    /// On Redis Cluster: the bus is sharded pub/sub (`SPUBLISH`, `SSUBSCRIBE`), which
    /// stays on the node that owns the channel's slot, where plain `PUBLISH` would be
    /// copied to every node of the cluster.
    sharded: bool,
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            sharded: false,
        }
    }

    /// These keys, for Redis Cluster when `sharded` (see [`Keys::publish_command`]).
    pub fn sharded(mut self, sharded: bool) -> Self {
        self.sharded = sharded;
        self
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A key of `product`'s partition: `<prefix>{p<partition>}:<rest>`.
    fn of_product(&self, product: ProductId, rest: std::fmt::Arguments<'_>) -> String {
        format!("{}{{p{}}}:{}", self.prefix, partition(product), rest)
    }

    /// A product's cached stock (a hash: stock, min, version, nonce, confirmed).
    pub fn stock(&self, product: ProductId) -> String {
        self.of_product(product, format_args!("stock-figure:{product}"))
    }

    /// The newest claim token a run's deliveries have shown (G8).
    pub fn run_claim(&self, product: ProductId, round: i64) -> String {
        self.of_product(product, format_args!("claim:{product}:{round}"))
    }

    /// The claim and queue position of the last batch a run delivered: the next must
    /// follow it (G1, with several deliveries on their way).
    pub fn run_chain(&self, product: ProductId, round: i64) -> String {
        self.of_product(product, format_args!("chain:{product}:{round}"))
    }

    /// Requests of a product admitted through the stock fence and not yet sent (a
    /// sorted set scored by expiry, G3, G12).
    pub fn admissions(&self, product: ProductId) -> String {
        self.of_product(product, format_args!("admissions:{product}"))
    }

    /// The send limiter's schedule, shared by every instance (G2): one key, a hash of
    /// the next free slot and who reserved last, with no TTL, so that its absence
    /// means it was lost.
    pub fn limiter(&self) -> String {
        format!("{}limiter:schedule", self.prefix)
    }

    /// The pause of the webhook endpoint after a `Retry-After`: present while it lasts
    /// (G12).
    pub fn webhook_pause(&self) -> String {
        format!("{}webhook:pause", self.prefix)
    }

    /// The bus channel of `product`'s partition (G11): in the slot of the product's
    /// keys, so the fence's script publishes to it in the same step.
    pub fn bus_channel(&self, product: ProductId) -> String {
        self.of_product(product, format_args!("bus"))
    }

    /// Every partition's bus channel: what an instance subscribes to.
    pub fn bus_channels(&self) -> Vec<String> {
        (0..PARTITIONS)
            .map(|p| format!("{}{{p{p}}}:bus", self.prefix))
            .collect()
    }

    /// The command that publishes on the bus: `SPUBLISH` on Redis Cluster, `PUBLISH`
    /// on one Redis (which any version since 2 has).
    pub fn publish_command(&self) -> &'static str {
        if self.sharded { "SPUBLISH" } else { "PUBLISH" }
    }

    pub fn is_sharded(&self) -> bool {
        self.sharded
    }
}

/// A product's partition: fixed by its id.
fn partition(product: ProductId) -> i64 {
    product.get().rem_euclid(PARTITIONS)
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
    // `rediss://` is TLS, verified against the system's root certificates; the
    // `-cluster` forms connect to Redis Cluster through any of the nodes named.
    const SCHEMES: [&str; 4] = [
        "redis://",
        "rediss://",
        "redis-cluster://",
        "rediss-cluster://",
    ];
    if !SCHEMES.iter().any(|scheme| url.starts_with(scheme)) {
        anyhow::bail!(
            "REDIS_URL has an unsupported scheme: use redis://host:port (rediss:// for TLS), \
             or redis-cluster://host:port[?node=host:port...] for Redis Cluster \
             (rediss-cluster:// for TLS)"
        );
    }
    let config = Config::from_url(url).context(
        "REDIS_URL is not a valid redis://, rediss://, redis-cluster:// or rediss-cluster:// URL",
    )?;
    let clustered = config.server.is_clustered();
    let mut builder = Builder::from_config(config);
    builder
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(2);
            c.internal_command_timeout = Duration::from_secs(2);
            // On Redis Cluster a command met by ASK during a resharding takes more
            // attempts (ASKING, then the command again); with too few, the client's
            // connection to the slot's new owner was left answering nothing, command
            // after command, until a restart (a test moves a slot mid-run).
            c.max_command_attempts = if clustered { 6 } else { 2 };
        })
        .with_performance_config(|p| {
            // Fail a command instead of queueing it forever while Redis is down: the
            // engine turns the error into CANCELED_BY_ERROR, the API into UNAVAILABLE.
            p.default_command_timeout = Duration::from_secs(2);
        })
        .set_policy(ReconnectPolicy::new_constant(0, 500));
    Ok(builder)
}

#[cfg(test)]
mod slots {
    use std::collections::BTreeMap;

    use fred::util::redis_keyslot;

    use super::*;

    /// Every key a script of one product touches, and the channel it publishes to, are
    /// in one hash slot (Redis Cluster refuses a script otherwise: CROSSSLOT), whatever
    /// the prefix.
    #[test]
    fn every_script_s_keys_and_channel_are_in_one_slot() {
        for prefix in ["restock:", "shop-7:", ""] {
            let keys = Keys::new(prefix).sharded(true);
            for id in (1..=2_000).chain([i64::MAX, i64::MAX - 1]) {
                let product = ProductId::parse(id).unwrap();
                let slot = redis_keyslot(keys.stock(product).as_bytes());
                // deliver.lua, admit.lua, claim.lua, publish.lua, admissions.lua, the
                // offer and confirm scripts: their keys and the bus channel.
                for key in [
                    keys.run_claim(product, 3),
                    keys.run_chain(product, 3),
                    keys.run_claim(product, i64::MAX),
                    keys.admissions(product),
                    keys.bus_channel(product),
                ] {
                    assert_eq!(redis_keyslot(key.as_bytes()), slot, "{key} of product {id}");
                }
            }
        }
    }

    /// The partitions' slots spread over the masters of a cluster created by
    /// `redis-cli --cluster create` with three masters (slots split in three even
    /// ranges), so each master carries some of the bus.
    #[test]
    fn partitions_spread_over_three_masters() {
        let keys = Keys::new("restock:");
        let mut per_master = BTreeMap::new();
        for channel in keys.bus_channels() {
            let master = redis_keyslot(channel.as_bytes()) / 5_462;
            *per_master.entry(master).or_insert(0) += 1;
        }
        assert_eq!(per_master.len(), 3, "{per_master:?}");
        assert!(per_master.values().all(|&n| n >= 3), "{per_master:?}");
    }
}
