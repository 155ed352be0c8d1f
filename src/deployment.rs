//! The one place that decides how the service is deployed, and so which
//! implementation of each outside capability the engine gets: in process (embedded,
//! one instance) or shared through Redis (clustered, any number of instances on one
//! database and Redis prefix). Nothing else branches on it.

use std::num::NonZeroU32;
use std::sync::Arc;

use anyhow::Context as _;
use secrecy::ExposeSecret as _;

use crate::config::Config;
use crate::engine::Capabilities;
use crate::engine::bus::local::LocalBus;
use crate::engine::bus::redis::RedisBus;
use crate::engine::limiter::local::LocalLimiter;
use crate::engine::limiter::redis::RedisLimiter;
use crate::engine::stock::StockCache;
use crate::engine::stock::local::{LocalStockCache, LocalStockFence};
use crate::engine::stock::redis::{RedisStockCache, RedisStockFence};
use crate::engine::webhook::pause::{LocalPause, RedisPause};
use crate::monitoring::Metrics;
use crate::redact::SecretUrl;
use crate::redis::Keys;

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
            Some(url) => Ok(Deployment::Clustered {
                client: crate::redis::connect(url.expose_secret()).await?,
                keys: Keys::new(config.redis_prefix.clone()),
                url: url.clone(),
            }),
        }
    }

    /// The engine's capabilities for this deployment (the webhook, which is the same in
    /// both, is added by the caller).
    pub async fn capabilities(
        &self,
        send_rate: NonZeroU32,
        send_window: std::time::Duration,
        subscriber_buffer: usize,
        metrics: &Metrics,
    ) -> anyhow::Result<Capabilities> {
        // This instance's streams are always fed by an in-process bus; clustered, it is
        // filled from Redis instead of by this instance's runs directly.
        let local_bus = Arc::new(LocalBus::new(subscriber_buffer));
        Ok(match self {
            Deployment::Embedded => {
                let stock_cache: Arc<dyn StockCache> = Arc::new(LocalStockCache::default());
                Capabilities {
                    stock_fence: Arc::new(LocalStockFence::new(
                        stock_cache.clone(),
                        local_bus.clone(),
                    )),
                    stock_cache,
                    limiter: Arc::new(
                        LocalLimiter::new(send_rate, send_window)
                            .context("cannot start the send limiter")?,
                    ),
                    bus: local_bus,
                    endpoint_pause: Arc::new(LocalPause::default()),
                    webhook: None,
                }
            }
            Deployment::Clustered { client, keys, url } => {
                let subscriber = crate::redis::connect_subscriber(url.expose_secret()).await?;
                let bus = RedisBus::start(client.clone(), subscriber, keys.clone(), local_bus)
                    .await
                    .context("cannot subscribe to the notification bus on REDIS_URL")?;
                Capabilities {
                    stock_cache: Arc::new(RedisStockCache::new(client.clone(), keys.clone())),
                    stock_fence: Arc::new(RedisStockFence::new(client.clone(), keys.clone())),
                    limiter: Arc::new(
                        RedisLimiter::new(
                            client.clone(),
                            keys,
                            send_rate,
                            send_window,
                            metrics.limiter(),
                        )
                        .context("cannot start the send limiter")?,
                    ),
                    bus: Arc::new(bus),
                    endpoint_pause: Arc::new(RedisPause::new(client.clone(), keys.clone())),
                    webhook: None,
                }
            }
        })
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
