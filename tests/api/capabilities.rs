//! Contract tests of the engine's capabilities: each suite runs against the in-process
//! implementation and the Redis one (two handles on one prefix standing for two
//! instances).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use chrono::{SubsecRound as _, Utc};
use restock_notifier::domain::{ProductId, UserId};
use restock_notifier::engine::bus::local::LocalBus;
use restock_notifier::engine::bus::redis::RedisBus;
use restock_notifier::engine::bus::{BusEvent, NotificationBus, RunKey, SentBatch, SentItem};
use restock_notifier::engine::limiter::SendLimiter;
use restock_notifier::engine::limiter::local::LocalLimiter;
use restock_notifier::engine::limiter::redis::RedisLimiter;
use restock_notifier::engine::stock::local::{LocalStockCache, LocalStockFence};
use restock_notifier::engine::stock::redis::{RedisStockCache, RedisStockFence};
use restock_notifier::engine::stock::{Delivery, Offered, StockCache, StockFence, StockFigure};
use restock_notifier::redis::Keys;
use tokio::time::Instant;

use crate::helpers::redis_url;

fn prefix() -> Keys {
    Keys::new(format!("restock-test:{:016x}:", rand::random::<u64>()))
}

/// Two limiters that stand for two instances: in process, one limiter shared; in
/// Redis, two on one prefix.
async fn limiters(redis: bool, rate: u32) -> [Arc<dyn SendLimiter>; 2] {
    let rate = NonZeroU32::new(rate).unwrap();
    if !redis {
        let shared: Arc<dyn SendLimiter> = Arc::new(LocalLimiter::new(rate));
        return [shared.clone(), shared];
    }
    let keys = prefix();
    let mut out = vec![];
    for _ in 0..2 {
        let client = restock_notifier::redis::connect(&redis_url())
            .await
            .unwrap();
        out.push(Arc::new(RedisLimiter::new(client, &keys, rate)) as Arc<dyn SendLimiter>);
    }
    [out[0].clone(), out[1].clone()]
}

async fn limiter_never_exceeds_the_rate_and_uses_it(redis: bool) {
    let rate = 100;
    let span = Duration::from_millis(2_500);
    let tasks = limiters(redis, rate).await.map(|limiter| {
        tokio::spawn(async move {
            let end = Instant::now() + span;
            let mut grants = vec![];
            while Instant::now() < end {
                let n = limiter.acquire(7).await.unwrap();
                grants.extend(std::iter::repeat_n(Instant::now(), n as usize));
            }
            grants
        })
    });
    let mut all = vec![];
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort();
    let mut busiest = 0;
    let mut start = 0;
    for end in 0..all.len() {
        while all[end].duration_since(all[start]) >= Duration::from_secs(1) {
            start += 1;
        }
        busiest = busiest.max(end - start + 1);
    }
    assert!(busiest <= rate as usize, "{busiest} grants in one second");
    // 2.5 s at 100/s: 250, less the log's 0.5% and a slot or two at the edges.
    assert!(all.len() >= 235, "only {} grants in {span:?}", all.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_limiter_never_exceeds_the_rate_and_uses_it() {
    limiter_never_exceeds_the_rate_and_uses_it(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_limiter_shared_by_two_instances_never_exceeds_the_rate_and_uses_it() {
    limiter_never_exceeds_the_rate_and_uses_it(true).await;
}

/// A stock cache, a fence and a bus that belong together.
async fn fence(
    redis: bool,
) -> (
    Arc<dyn StockCache>,
    Arc<dyn StockFence>,
    Arc<dyn NotificationBus>,
) {
    if !redis {
        let bus = Arc::new(LocalBus::new(64));
        let cache: Arc<dyn StockCache> = Arc::new(LocalStockCache::default());
        let fence = Arc::new(LocalStockFence::new(cache.clone(), bus.clone()));
        return (cache, fence, bus);
    }
    let keys = prefix();
    let client = restock_notifier::redis::connect(&redis_url())
        .await
        .unwrap();
    let subscriber = restock_notifier::redis::connect_subscriber(&redis_url())
        .await
        .unwrap();
    let bus = RedisBus::start(
        client.clone(),
        subscriber,
        keys.clone(),
        Arc::new(LocalBus::new(64)),
    )
    .await
    .unwrap();
    (
        Arc::new(RedisStockCache::new(client.clone(), keys.clone())),
        Arc::new(RedisStockFence::new(client, keys)),
        Arc::new(bus),
    )
}

async fn fence_delivers_only_in_stock_and_onto_the_bus(redis: bool) {
    let (cache, fence, bus) = fence(redis).await;
    let mut events = bus.subscribe();
    let product = ProductId::parse(5).unwrap();
    let batch = SentBatch::new(
        RunKey {
            product_id: product,
            restock_round: 1,
        },
        None,
        vec![SentItem {
            user_id: UserId::parse(9).unwrap(),
            position: 1,
        }],
        // The engine stamps sends to the microsecond, as the history keeps them.
        Utc::now().trunc_subsecs(6),
    )
    .under_claim(1);
    let claim = batch.claim;
    assert!(fence.claim(batch.run, claim).await.unwrap());
    assert_eq!(fence.deliver(&batch).await.unwrap(), Delivery::NotCached);
    let offered = |stock, version| cache.offer(product, StockFigure { stock, version });
    let confirmed = |figure: StockFigure, offered: Offered| {
        let cache = cache.clone();
        async move {
            match offered {
                Offered::Pending { nonce } => cache.confirm(product, figure, nonce).await.unwrap(),
                Offered::Newer => true,
                Offered::Stale => false,
            }
        }
    };
    let three = StockFigure {
        stock: 3,
        version: 1,
    };
    let offer = offered(3, 1).await.unwrap();
    if redis {
        // Offered but not confirmed: not trusted yet.
        assert_eq!(fence.deliver(&batch).await.unwrap(), Delivery::NotCached);
    }
    assert!(confirmed(three, offer).await);
    assert_eq!(cache.get(product).await.unwrap(), Some(3));
    assert_eq!(fence.deliver(&batch).await.unwrap(), Delivery::Delivered);
    let got = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*got, BusEvent::Sent(Arc::new(batch.clone())));
    let zero = StockFigure {
        stock: 0,
        version: 2,
    };
    {
        let _write = fence.lock_for_write(product).await;
        cache.invalidate(product).await.unwrap();
        let offer = offered(0, 2).await.unwrap();
        assert!(confirmed(zero, offer).await);
    }
    assert_eq!(fence.deliver(&batch).await.unwrap(), Delivery::SoldOut);
    // An older figure never replaces a newer one, confirmed or not.
    assert_eq!(offered(7, 1).await.unwrap(), Offered::Newer);
    assert_eq!(cache.get(product).await.unwrap(), Some(0));
    if redis {
        // After the cache lost the figure, an older one arriving late is written but
        // never confirmed: its offer is replaced by the newer one read again.
        cache.invalidate(product).await.unwrap();
        let late = offered(7, 1).await.unwrap();
        assert!(matches!(late, Offered::Pending { .. }));
        assert_eq!(fence.deliver(&batch).await.unwrap(), Delivery::NotCached);
        let again = offered(0, 2).await.unwrap();
        assert!(confirmed(zero, again).await);
        let seven = StockFigure {
            stock: 7,
            version: 1,
        };
        assert!(
            confirmed(seven, late).await,
            "a stale confirm finds a newer confirmed figure and changes nothing"
        );
        assert_eq!(cache.get(product).await.unwrap(), Some(0));
        // A delivery of an older claim does nothing once a newer one was seen.
        cache.invalidate(product).await.unwrap();
        let four = StockFigure {
            stock: 4,
            version: 3,
        };
        let offer = offered(4, 3).await.unwrap();
        assert!(confirmed(four, offer).await);
        assert!(fence.claim(batch.run, claim + 1).await.unwrap());
        assert_eq!(fence.deliver(&batch).await.unwrap(), Delivery::Superseded);
        assert!(!fence.claim(batch.run, claim).await.unwrap());
    }
    let nothing = tokio::time::timeout(Duration::from_millis(200), events.recv()).await;
    assert!(nothing.is_err(), "nothing more on the bus: {nothing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_fence_delivers_only_in_stock_and_onto_the_bus() {
    fence_delivers_only_in_stock_and_onto_the_bus(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_fence_delivers_only_in_stock_and_onto_the_bus() {
    fence_delivers_only_in_stock_and_onto_the_bus(true).await;
}
