//! The stock cache and fence in Redis, shared by every instance (G3, G8, G11).
//!
//! A product's figure is a hash (`stock`, `min`, `version`, `nonce`, `confirmed`) written only
//! by the scripts beside this file: `offer.lua` never replaces a newer version,
//! `confirm.lua` makes an offer trusted once the database still held it. The fence is
//! `deliver.lua`: the claim check, the stock check and the publish in one step. The
//! claim check is `claim_check.lua`, put in front of every script that acts for a run.

use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fred::prelude::{Client, HashesInterface, KeysInterface, SortedSetsInterface};
use fred::types::Value;
use fred::types::scripts::Script;

use super::{
    AdmissionFence, Admitted, Delivery, Offered, StockCache, StockFence, StockFigure, WriteGuard,
};
use crate::domain::{BackendError, ProductId};
use crate::engine::bus::redis::encode_sent;
use crate::engine::bus::{RunKey, SentBatch};
use crate::redis::{Keys, backend};

const STORE: crate::domain::Component = crate::domain::Component::StockCache;

/// A cached stock figure lives this long without a write. The database is the source of
/// truth; the expiry bounds how long an unused figure takes memory.
const STOCK_TTL_SECS: i64 = 300;

/// A run's newest claim is remembered this long after it was last raised: longer than
/// any run is driven by one claim (a run waiting between waves has no claim, and a
/// later one raises it again).
const CLAIM_TTL_SECS: i64 = 7 * 24 * 3600;

/// The text of a script that acts for a run, with the claim check (`claim_check.lua`,
/// G8) in front of it: Redis scripts cannot include one another, so the check is
/// written once and put in front of each of them here.
macro_rules! with_claim_check {
    ($script:literal) => {
        concat!(include_str!("claim_check.lua"), include_str!($script))
    };
}

static OFFER: LazyLock<Script> = LazyLock::new(|| Script::from_lua(include_str!("offer.lua")));
static CONFIRM: LazyLock<Script> = LazyLock::new(|| Script::from_lua(include_str!("confirm.lua")));
static DELIVER: LazyLock<Script> = LazyLock::new(|| Script::from_lua(DELIVER_LUA));
static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::from_lua(include_str!("claim.lua")));
static ADMIT: LazyLock<Script> = LazyLock::new(|| Script::from_lua(with_claim_check!("admit.lua")));
static ADMISSIONS: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(include_str!("admissions.lua")));
static PUBLISH: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(with_claim_check!("publish.lua")));

/// The fence's script as Redis receives it (G3, G8): what EVALSHA names by its SHA.
pub const DELIVER_LUA: &str = with_claim_check!("deliver.lua");

/// How often a stock write below the threshold looks again for passes still held (G3): a pass is held
/// for about the time a request takes to be written, so a few milliseconds.
const ADMISSIONS_POLL: Duration = Duration::from_millis(2);

/// The stock cache in Redis: one hash per product.
pub struct RedisStockCache {
    client: Client,
    keys: Keys,
}

impl RedisStockCache {
    pub fn new(client: Client, keys: Keys) -> Self {
        Self { client, keys }
    }
}

#[async_trait]
impl StockCache for RedisStockCache {
    async fn get(&self, product: ProductId) -> Result<Option<StockFigure>, BackendError> {
        type Held = (Option<i64>, Option<i64>, Option<i64>, Option<String>);
        let (stock, min_stock, version, confirmed): Held = self
            .client
            .hmget(
                self.keys.stock(product),
                vec!["stock", "min", "version", "confirmed"],
            )
            .await
            .map_err(|e| backend(STORE, e))?;
        Ok(match (stock, min_stock, version, confirmed.as_deref()) {
            (Some(stock), Some(min_stock), Some(version), Some("1")) => Some(StockFigure {
                stock,
                min_stock,
                version,
            }),
            _ => None,
        })
    }

    async fn offer(
        &self,
        product: ProductId,
        figure: StockFigure,
    ) -> Result<Offered, BackendError> {
        let nonce = rand::random::<u64>() >> 1;
        let (outcome, held): (i64, String) = OFFER
            .evalsha_with_reload(
                &self.client,
                vec![self.keys.stock(product)],
                vec![
                    figure.stock.to_string(),
                    figure.version.to_string(),
                    nonce.to_string(),
                    STOCK_TTL_SECS.to_string(),
                    figure.min_stock.to_string(),
                ],
            )
            .await
            .map_err(|e| backend(STORE, e))?;
        Ok(match outcome {
            // The nonce of the entry to confirm: this offer's, or that of an offer of
            // the same figure already waiting for its confirmation.
            1 => Offered::Pending {
                nonce: held.parse().map_err(|e| {
                    BackendError::on_redis(
                        STORE,
                        false,
                        anyhow::anyhow!("bad nonce {held:?} from the offer script: {e}"),
                    )
                })?,
            },
            0 => Offered::Newer,
            _ => Offered::Stale,
        })
    }

    async fn confirm(
        &self,
        product: ProductId,
        figure: StockFigure,
        nonce: u64,
    ) -> Result<bool, BackendError> {
        let outcome: i64 = CONFIRM
            .evalsha_with_reload(
                &self.client,
                vec![self.keys.stock(product)],
                vec![figure.version.to_string(), nonce.to_string()],
            )
            .await
            .map_err(|e| backend(STORE, e))?;
        Ok(outcome == 1)
    }

    async fn invalidate(&self, product: ProductId) -> Result<(), BackendError> {
        self.client
            .del::<i64, _>(self.keys.stock(product))
            .await
            .map(|_| ())
            .map_err(|e| backend(STORE, e))
    }
}

/// The fence of every instance: the claim check, the stock check and the publish are one
/// Redis script. Redis runs a script as one step, so a stock write from any instance
/// comes either before it (the script sees the new figure and publishes nothing) or
/// after it (the batch is already on the bus): once `SetStock(0)` has returned
/// anywhere, no instance publishes another notification of that product (G3). And a
/// delivery that reaches Redis after a newer claim of its run did (held on the wire
/// while the run was taken over) publishes nothing (G8).
pub struct RedisStockFence {
    client: Client,
    keys: Keys,
}

impl RedisStockFence {
    pub fn new(client: Client, keys: Keys) -> Self {
        Self { client, keys }
    }
}

const BUS: crate::domain::Component = crate::domain::Component::NotificationBus;

#[async_trait]
impl StockFence for RedisStockFence {
    /// Nothing to hold: the script is atomic against the writer's offer and confirm,
    /// which are the last steps of a stock write, on whichever instance.
    async fn lock_for_write(&self, _product: ProductId) -> WriteGuard {
        Box::new(())
    }

    async fn claim(&self, run: RunKey, claim: i64, at: Option<i64>) -> Result<bool, BackendError> {
        let outcome: i64 = CLAIM
            .evalsha_with_reload(
                &self.client,
                vec![
                    self.keys.run_claim(run.product_id, run.restock_round),
                    self.keys.run_chain(run.product_id, run.restock_round),
                ],
                vec![claim.to_string(), CLAIM_TTL_SECS.to_string(), position(at)],
            )
            .await
            .map_err(|e| backend(BUS, e))?;
        Ok(outcome == 1)
    }

    async fn deliver(&self, batch: &SentBatch) -> Result<Delivery, BackendError> {
        self.put_on_bus(&DELIVER, true, batch).await
    }
}

#[async_trait]
impl AdmissionFence for RedisStockFence {
    async fn admit(
        &self,
        run: RunKey,
        claim: i64,
        ttl: Duration,
    ) -> Result<Admitted, BackendError> {
        let key = self.keys.admissions(run.product_id);
        let name = format!("{:016x}", rand::random::<u64>());
        let outcome: i64 = ADMIT
            .evalsha_with_reload(
                &self.client,
                vec![
                    self.keys.stock(run.product_id),
                    self.keys.run_claim(run.product_id, run.restock_round),
                    key.clone(),
                ],
                vec![
                    Value::from(claim),
                    Value::from(CLAIM_TTL_SECS),
                    Value::from(name.clone()),
                    Value::from(ttl.as_millis().max(1) as i64),
                ],
            )
            .await
            .map_err(|e| backend(BUS, e))?;
        Ok(match outcome {
            1 => Admitted::Through(Box::new(RedisPass {
                client: self.client.clone(),
                key,
                name,
            })),
            0 => Admitted::SoldOut,
            -2 => Admitted::Superseded,
            -3 => Admitted::ClaimUnknown,
            _ => Admitted::NotCached,
        })
    }

    async fn publish(&self, batch: &SentBatch) -> Result<Delivery, BackendError> {
        self.put_on_bus(&PUBLISH, false, batch).await
    }

    async fn wait_for_admissions(&self, product: ProductId) -> Result<(), BackendError> {
        loop {
            let held: i64 = ADMISSIONS
                .evalsha_with_reload(&self.client, vec![self.keys.admissions(product)], ())
                .await
                .map_err(|e| backend(STORE, e))?;
            if held == 0 {
                return Ok(());
            }
            tokio::time::sleep(ADMISSIONS_POLL).await;
        }
    }
}

/// A queue position as the chain key writes it: `-` for none.
fn position(at: Option<i64>) -> String {
    at.map_or_else(|| "-".to_owned(), |p| p.to_string())
}

impl RedisStockFence {
    /// Publishes `batch` through `script`: `deliver.lua` (`fenced`), which also checks
    /// the stock and the chain, or `publish.lua`, which takes only the claim key and
    /// the first four arguments. Both answer alike (`publish.lua` only 1, -2 or -3).
    async fn put_on_bus(
        &self,
        script: &Script,
        fenced: bool,
        batch: &SentBatch,
    ) -> Result<Delivery, BackendError> {
        let run = batch.run;
        let claim_key = self.keys.run_claim(run.product_id, run.restock_round);
        let payload: Bytes = encode_sent(batch);
        let mut args = vec![
            Value::from(self.keys.bus_channel(run.product_id)),
            Value::Bytes(payload),
            Value::from(batch.claim),
            Value::from(CLAIM_TTL_SECS),
        ];
        let keys = if fenced {
            let last = batch.items.last().map(|item| item.position);
            args.push(Value::from(position(batch.prev_position)));
            args.push(Value::from(position(last.or(batch.prev_position))));
            vec![
                self.keys.stock(run.product_id),
                claim_key,
                self.keys.run_chain(run.product_id, run.restock_round),
            ]
        } else {
            vec![claim_key]
        };
        args.push(Value::from(self.keys.publish_command()));
        let outcome: i64 = script
            .evalsha_with_reload(&self.client, keys, args)
            .await
            .map_err(|e| backend(BUS, e))?;
        Ok(match outcome {
            1 => Delivery::Through(()),
            0 => Delivery::SoldOut,
            -2 => Delivery::Superseded,
            -3 => Delivery::ClaimUnknown,
            -4 => Delivery::OutOfOrder,
            _ => Delivery::NotCached,
        })
    }
}

/// A pass in a product's admissions: dropped, it is taken out at once (in the
/// background; if that fails, it expires on its own).
struct RedisPass {
    client: Client,
    key: String,
    name: String,
}

impl Drop for RedisPass {
    fn drop(&mut self) {
        let (client, key, name) = (
            self.client.clone(),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.name),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _: Result<i64, _> = client.zrem(key, name).await;
            });
        }
    }
}
