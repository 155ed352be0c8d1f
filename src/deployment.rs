//! The one place that decides how the service is deployed, and so which
//! implementation of each outside capability the engine gets: in process (embedded,
//! one instance) or shared through Redis (clustered, any number of instances on one
//! database and Redis prefix). It also picks the store and the delivery channel.
//! Nothing else branches on any of them.

use std::num::NonZeroU32;
use std::sync::Arc;

use anyhow::Context as _;
use fred::prelude::ClientLike as _;
use secrecy::ExposeSecret as _;

use crate::config::Config;
use crate::engine::Capabilities;
use crate::engine::bus::local::LocalBus;
use crate::engine::bus::redis::RedisBus;
use crate::engine::delivery::StreamChannel;
use crate::engine::delivery::webhook::pause::{EndpointPause, LocalPause, RedisPause};
use crate::engine::delivery::webhook::{WebhookChannel, WebhookClient, WebhookSettings};
use crate::engine::limiter::local::LocalLimiter;
use crate::engine::limiter::redis::RedisLimiter;
use crate::engine::stock::local::{LocalStockCache, LocalStockFence};
use crate::engine::stock::redis::{RedisStockCache, RedisStockFence};
use crate::engine::stock::{AdmissionFence, StockCache};
use crate::monitoring::Metrics;
use crate::redact::SecretUrl;
use crate::redis::Keys;
use crate::store::Store;
use crate::store::mysql::MySqlStore;
use crate::store::sqlite::SqliteStore;

/// How this instance is deployed.
pub enum Deployment {
    /// Stock cache, stock fence, send limiter and bus in this process: exactly one
    /// instance may use the database.
    Embedded,
    /// Every capability shared through Redis under one prefix (G11).
    Clustered {
        client: fred::prelude::Client,
        keys: Keys,
        url: SecretUrl,
    },
}

impl Deployment {
    /// Chosen by REDIS_URL: with it, clustered; without it, embedded.
    pub async fn from_config(config: &Config) -> anyhow::Result<Self> {
        match &config.redis_url {
            None => Ok(Deployment::Embedded),
            Some(url) => {
                let client = crate::redis::connect(url.expose_secret()).await?;
                let keys = Keys::new(config.redis_prefix.clone()).sharded(client.is_clustered());
                Ok(Deployment::Clustered {
                    client,
                    keys,
                    url: url.clone(),
                })
            }
        }
    }

    /// The engine's capabilities for this deployment, and where notifications go: to
    /// the webhook endpoint of `webhook` if one is configured, else on the stream only.
    pub(crate) async fn capabilities(
        &self,
        webhook: Option<WebhookSettings>,
        send_rate: NonZeroU32,
        subscriber_buffer: usize,
        metrics: &Metrics,
    ) -> anyhow::Result<Capabilities> {
        let window = crate::engine::limiter::enforced_window(webhook.is_some());
        let shared = match self {
            Deployment::Embedded => Shared::embedded(send_rate, window, subscriber_buffer)?,
            Deployment::Clustered { client, keys, url } => {
                let subscriber = crate::redis::connect_subscriber(url.expose_secret()).await?;
                let ends = Ends {
                    client,
                    subscriber,
                    keys,
                };
                Shared::clustered(ends, send_rate, window, subscriber_buffer, metrics).await?
            }
        };
        let mut capabilities = shared.capabilities;
        if let Some(settings) = webhook {
            capabilities.channel = Arc::new(WebhookChannel::new(
                WebhookClient::new(settings, metrics.webhook())?,
                shared.endpoint_pause,
                shared.admissions,
            ));
        }
        Ok(capabilities)
    }

    /// The store DATABASE_URL names, by its scheme: MySQL (or MariaDB), or an SQLite
    /// file.
    pub async fn store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
        let (url, pool_size) = (&config.database_url, config.db_pool_size);
        let raw = url.expose_secret();
        if raw.starts_with("mysql://") || raw.starts_with("mariadb://") {
            Ok(Arc::new(
                MySqlStore::connect(raw, config.run_lease, pool_size).await?,
            ))
        } else if raw.starts_with("sqlite:") {
            Ok(Arc::new(
                SqliteStore::connect_with_readers(raw, pool_size).await?,
            ))
        } else {
            anyhow::bail!(
                "DATABASE_URL {url:?} has an unsupported scheme: use \
                 mysql://user:pass@host:port/db or sqlite://path/to/file.db"
            )
        }
    }

    /// Says at start how the service is deployed, and warns when the settings given
    /// only make sense for the other deployment.
    pub fn log(&self, config: &Config) {
        let sqlite = config.database_url.expose_secret().starts_with("sqlite:");
        match self {
            Deployment::Embedded if sqlite => tracing::warn!(
                deployment = "embedded",
                database = "SQLite file",
                "single-instance mode: stock cache, send limiter and notification bus in \
                 this process; run exactly one instance on this file; set \
                 DATABASE_URL=mysql://... and REDIS_URL=redis://... for production"
            ),
            Deployment::Embedded => tracing::warn!(
                deployment = "embedded",
                database = "MySQL",
                "MySQL without REDIS_URL: single instance only (the send limit, stock fence \
                 and Subscribe fan-out are in this process); set REDIS_URL=redis://... to \
                 run several instances"
            ),
            Deployment::Clustered { keys, .. } if sqlite => tracing::warn!(
                deployment = "clustered",
                redis_prefix = keys.prefix(),
                "REDIS_URL with an SQLite DATABASE_URL: instances share Redis but the \
                 database is a file on this host; use DATABASE_URL=mysql://... for several \
                 hosts"
            ),
            Deployment::Clustered { keys, url, .. } => tracing::info!(
                deployment = "clustered",
                database = "MySQL",
                redis = %url,
                redis_prefix = keys.prefix(),
                "instances on this database and Redis prefix behave as one service"
            ),
        }
    }
}

/// The connections a clustered deployment's capabilities share.
struct Ends<'a> {
    client: &'a fred::prelude::Client,
    subscriber: fred::clients::SubscriberClient,
    keys: &'a Keys,
}

/// The capabilities one deployment provides, delivering on the stream until a channel
/// is chosen, and what a webhook channel would share through it.
struct Shared {
    capabilities: Capabilities,
    /// The capabilities' stock fence, as a webhook channel uses it.
    admissions: Arc<dyn AdmissionFence>,
    /// Where a `Retry-After` of a webhook endpoint is shared (G12).
    endpoint_pause: Arc<dyn EndpointPause>,
}

impl Shared {
    fn embedded(
        send_rate: NonZeroU32,
        window: std::time::Duration,
        subscriber_buffer: usize,
    ) -> anyhow::Result<Self> {
        let bus = Arc::new(LocalBus::new(subscriber_buffer));
        let stock_cache: Arc<dyn StockCache> = Arc::new(LocalStockCache::default());
        let fence = Arc::new(LocalStockFence::new(stock_cache.clone(), bus.clone()));
        let limiter =
            LocalLimiter::new(send_rate, window).context("cannot start the send limiter")?;
        Ok(Shared {
            capabilities: Capabilities {
                stock_cache,
                stock_fence: fence.clone(),
                limiter: Arc::new(limiter),
                bus,
                channel: Arc::new(StreamChannel),
            },
            admissions: fence,
            endpoint_pause: Arc::new(LocalPause::default()),
        })
    }

    async fn clustered(
        ends: Ends<'_>,
        send_rate: NonZeroU32,
        window: std::time::Duration,
        subscriber_buffer: usize,
        metrics: &Metrics,
    ) -> anyhow::Result<Self> {
        let Ends {
            client,
            subscriber,
            keys,
        } = ends;
        // This instance's streams are fed by an in-process bus, filled from Redis.
        let local_bus = Arc::new(LocalBus::new(subscriber_buffer));
        let bus = RedisBus::start(client.clone(), subscriber, keys.clone(), local_bus)
            .await
            .context("cannot subscribe to the notification bus on REDIS_URL")?;
        let fence = Arc::new(RedisStockFence::new(client.clone(), keys.clone()));
        let limiter = RedisLimiter::new(client.clone(), keys, send_rate, window, metrics.limiter())
            .context("cannot start the send limiter")?;
        Ok(Shared {
            capabilities: Capabilities {
                stock_cache: Arc::new(RedisStockCache::new(client.clone(), keys.clone())),
                stock_fence: fence.clone(),
                limiter: Arc::new(limiter),
                bus: Arc::new(bus),
                channel: Arc::new(StreamChannel),
            },
            admissions: fence,
            endpoint_pause: Arc::new(RedisPause::new(client.clone(), keys.clone())),
        })
    }
}
