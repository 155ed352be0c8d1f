//! Contract tests of the engine's capabilities: each suite runs against the in-process
//! implementation, the Redis one (two handles on one prefix standing for two
//! instances) and the same on a Redis Cluster.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use chrono::{SubsecRound as _, Utc};
use fred::prelude::KeysInterface as _;
use restock_notifier::domain::{ProductId, UserId};
use restock_notifier::engine::bus::local::LocalBus;
use restock_notifier::engine::bus::{BusEvent, NotificationBus, RunKey, SentBatch, SentItem};
use restock_notifier::engine::limiter::local::LocalLimiter;
use restock_notifier::engine::limiter::redis::RedisLimiter;
use restock_notifier::engine::limiter::{ENFORCED_WINDOW, SendLimiter};
use restock_notifier::engine::stock::local::{LocalStockCache, LocalStockFence};
use restock_notifier::engine::stock::redis::{RedisStockCache, RedisStockFence};
use restock_notifier::engine::stock::{
    AdmissionFence, Delivery, Offered, StockCache, StockFence, StockFigure,
};
use restock_notifier::monitoring::LimiterMetrics;
use restock_notifier::redis::Keys;
use tokio::time::Instant;

use crate::helpers::{
    Implementation, busiest_second, join_redis_bus, join_redis_bus_at, redis_of, redis_url,
};
use crate::proxy::FaultProxy;

crate::on_each_implementation!(
    limiter_never_exceeds_the_rate,
    limiter_serves_waiting_runs_in_turn,
    fence_delivers_only_in_stock_and_onto_the_bus,
);

fn prefix() -> Keys {
    Keys::new(format!("restock-test:{:016x}:", rand::random::<u64>()))
}

/// Two limiters that stand for two instances: in process, one limiter shared; in
/// Redis, two on one prefix. Each has granted once already, so that both have a clock
/// mapping and the schedule exists.
async fn limiters(implementation: Implementation, rate: u32) -> [Arc<dyn SendLimiter>; 2] {
    if implementation == Implementation::InProcess {
        let rate = NonZeroU32::new(rate).unwrap();
        let shared: Arc<dyn SendLimiter> =
            Arc::new(LocalLimiter::new(rate, ENFORCED_WINDOW).unwrap());
        return [shared.clone(), shared];
    }
    let (url, keys) = redis_of(implementation).await;
    redis_limiters(&url, &keys, rate).await
}

/// Two Redis limiters on `keys`, each with its own connection to `url`, warmed up.
async fn redis_limiters(url: &str, keys: &Keys, rate: u32) -> [Arc<dyn SendLimiter>; 2] {
    let rate = NonZeroU32::new(rate).unwrap();
    let mut out = vec![];
    for _ in 0..2 {
        let client = restock_notifier::redis::connect(url).await.unwrap();
        let limiter =
            RedisLimiter::new(client, keys, rate, ENFORCED_WINDOW, LimiterMetrics::off()).unwrap();
        limiter.acquire(1).await.unwrap();
        out.push(Arc::new(limiter) as Arc<dyn SendLimiter>);
    }
    [out[0].clone(), out[1].clone()]
}

/// The instants at which `acquire(want)` returned, each repeated by its grant, over
/// `span`, on every limiter, sorted.
async fn grants(limiters: &[Arc<dyn SendLimiter>], want: u32, span: Duration) -> Vec<Instant> {
    let end = Instant::now() + span;
    let tasks: Vec<_> = limiters
        .iter()
        .cloned()
        .map(|limiter| {
            tokio::spawn(async move {
                let mut grants = vec![];
                while Instant::now() < end {
                    // The instant the limiter counts them at: when this task then woke
                    // is the machine's business, not the limiter's.
                    let slots = limiter.acquire(want).await.unwrap();
                    grants.extend(std::iter::repeat_n(slots.at, slots.count as usize));
                }
                grants
            })
        })
        .collect();
    let mut all = vec![];
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort();
    all
}

/// 2.5 s of grants at 100/s, asked for 7 at a time by two instances: never above the
/// rate in any second (G2). How much of the rate is used is not a figure for a test on
/// a busy machine: the limiter's own tests measure it in paused time, and the
/// benchmark (`bench -- limiter`) against Redis.
async fn limiter_never_exceeds_the_rate(implementation: Implementation) {
    let rate = 100;
    let span = Duration::from_millis(2_500);
    let all = grants(&limiters(implementation, rate).await, 7, span).await;
    let busiest = busiest_second(&all);
    assert!(busiest <= rate as usize, "{busiest} grants in one second");
    assert!(!all.is_empty(), "nothing granted in {span:?}");
}

/// Two instances, each `each_way` from Redis: never above the rate (G2). How much of
/// the rate they use at each distance is the benchmark's to measure (`bench --
/// limiter`), not a test's on a busy machine.
async fn redis_limiters_far_from_redis(each_way: Duration) {
    let rate = 200;
    let proxy = FaultProxy::for_url(&redis_url()).await;
    proxy.set_delay(each_way);
    let limiters = redis_limiters(&proxy.url(&redis_url()), &prefix(), rate).await;
    let span = Duration::from_secs(3);
    // A run asks for as many as it has room to record (up to the rate).
    let all = grants(&limiters, 100, span).await;
    let busiest = busiest_second(&all);
    assert!(busiest <= rate as usize, "{busiest} grants in one second");
    assert!(!all.is_empty(), "nothing granted in {span:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_limiters_two_ms_from_redis_never_exceed_the_rate() {
    redis_limiters_far_from_redis(Duration::from_millis(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_limiters_twenty_five_ms_from_redis_never_exceed_the_rate() {
    redis_limiters_far_from_redis(Duration::from_millis(25)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_limiters_fifty_ms_from_redis_never_exceed_the_rate() {
    redis_limiters_far_from_redis(Duration::from_millis(50)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_limiter_schedule_lost_mid_run_causes_no_burst() {
    let rate = 100;
    let keys = prefix();
    let limiters = redis_limiters(&redis_url(), &keys, rate).await;
    let deleting = tokio::spawn(async move {
        let client = restock_notifier::redis::connect(&redis_url())
            .await
            .unwrap();
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(900)).await;
            let deleted: i64 = client.del(keys.limiter()).await.unwrap();
            assert_eq!(deleted, 1, "the schedule was there to lose");
        }
        Instant::now()
    });
    let all = grants(&limiters, 7, Duration::from_secs(4)).await;
    let last_loss = deleting.await.unwrap();
    let busiest = busiest_second(&all);
    assert!(busiest <= rate as usize, "{busiest} grants in one second");
    let after = all.iter().filter(|&&t| t > last_loss).count();
    assert!(
        after > 0,
        "the limiter grants again after the schedule was lost"
    );
}

/// 200 runs waiting on one instance at 500/s are served in turn, however their timers
/// fire: between the moment a run starts waiting and its first slot, no other run is
/// granted more than twice (its turn, and one it was already queued for).
async fn limiter_serves_waiting_runs_in_turn(implementation: Implementation) {
    let [limiter, _] = limiters(implementation, 500).await;
    let end = Instant::now() + Duration::from_millis(2_500);
    let runs: Vec<_> = (0..200)
        .map(|_| {
            let limiter = limiter.clone();
            tokio::spawn(async move {
                let waiting_since = Instant::now();
                let mut grants = vec![];
                while Instant::now() < end {
                    grants.push(limiter.acquire(50).await.unwrap().at);
                }
                (waiting_since, grants)
            })
        })
        .collect();
    let mut served = vec![];
    for run in runs {
        served.push(run.await.unwrap());
    }
    for (run, (waiting_since, grants)) in served.iter().enumerate() {
        let first = *grants.first().expect("every run was granted a slot");
        for (other, (_, theirs)) in served.iter().enumerate() {
            let meanwhile = theirs
                .iter()
                .filter(|&&at| at > *waiting_since && at < first)
                .count();
            assert!(
                meanwhile <= 2,
                "run {other} was granted {meanwhile} times while run {run} waited for its first"
            );
        }
    }
}

/// A stock cache, a fence and a bus that belong together.
async fn fence(
    implementation: Implementation,
) -> (
    Arc<dyn StockCache>,
    Arc<dyn StockFence>,
    Arc<dyn NotificationBus>,
) {
    if implementation == Implementation::InProcess {
        let bus = Arc::new(LocalBus::new(64));
        let cache: Arc<dyn StockCache> = Arc::new(LocalStockCache::default());
        let fence = Arc::new(LocalStockFence::new(cache.clone(), bus.clone()));
        return (cache, fence, bus);
    }
    let (url, keys) = redis_of(implementation).await;
    let (client, bus) = join_redis_bus_at(&url, &keys, 64).await;
    (
        Arc::new(RedisStockCache::new(client.clone(), keys.clone())),
        Arc::new(RedisStockFence::new(client, keys)),
        Arc::new(bus),
    )
}

async fn fence_delivers_only_in_stock_and_onto_the_bus(implementation: Implementation) {
    let (cache, fence, bus) = fence(implementation).await;
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
    assert!(fence.claim(batch.run, claim, None).await.unwrap());
    assert_eq!(fence.deliver(&batch).await.unwrap(), Delivery::NotCached);
    let figure = |stock, min_stock, version| StockFigure {
        stock,
        min_stock,
        version,
    };
    let offered = |figure: StockFigure| cache.offer(product, figure);
    let stock_held = || async { cache.get(product).await.unwrap().map(|f| f.stock) };
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
    let write = |written: StockFigure| {
        let (fence, cache) = (fence.clone(), cache.clone());
        async move {
            let _write = fence.lock_for_write(product).await;
            cache.invalidate(product).await.unwrap();
            let offer = cache.offer(product, written).await.unwrap();
            assert!(confirmed(written, offer).await);
        }
    };
    let three = figure(3, 1, 1);
    let offer = offered(three).await.unwrap();
    if implementation != Implementation::InProcess {
        // Offered but not confirmed: not trusted yet.
        assert_eq!(fence.deliver(&batch).await.unwrap(), Delivery::NotCached);
    }
    assert!(confirmed(three, offer).await);
    assert_eq!(stock_held().await, Some(3));
    assert_eq!(fence.deliver(&batch).await.unwrap(), Delivery::Through(()));
    let got = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*got, BusEvent::Sent(Arc::new(batch.clone())));
    // Stock left, but below the product's threshold: sold out all the same.
    write(figure(4, 5, 2)).await;
    assert_eq!(fence.deliver(&batch).await.unwrap(), Delivery::SoldOut);
    let zero = figure(0, 1, 3);
    write(zero).await;
    assert_eq!(fence.deliver(&batch).await.unwrap(), Delivery::SoldOut);
    // An older figure never replaces a newer one, confirmed or not.
    assert_eq!(offered(figure(7, 1, 1)).await.unwrap(), Offered::Newer);
    assert_eq!(stock_held().await, Some(0));
    if implementation != Implementation::InProcess {
        // After the cache lost the figure, an older one arriving late is written but
        // never confirmed: its offer is replaced by the newer one read again.
        cache.invalidate(product).await.unwrap();
        let seven = figure(7, 1, 1);
        let late = offered(seven).await.unwrap();
        assert!(matches!(late, Offered::Pending { .. }));
        assert_eq!(fence.deliver(&batch).await.unwrap(), Delivery::NotCached);
        let again = offered(zero).await.unwrap();
        assert!(confirmed(zero, again).await);
        assert!(
            confirmed(seven, late).await,
            "a stale confirm finds a newer confirmed figure and changes nothing"
        );
        assert_eq!(stock_held().await, Some(0));
        // A delivery of an older claim does nothing once a newer one was seen.
        write(figure(4, 1, 4)).await;
        assert!(fence.claim(batch.run, claim + 1, None).await.unwrap());
        assert_eq!(fence.deliver(&batch).await.unwrap(), Delivery::Superseded);
        assert!(!fence.claim(batch.run, claim, None).await.unwrap());
    }
    let nothing = tokio::time::timeout(Duration::from_millis(200), events.recv()).await;
    assert!(nothing.is_err(), "nothing more on the bus: {nothing:?}");
}

/// Caches a confirmed stock of 5 for `product` in Redis, as a stock write would.
async fn in_stock(client: &fred::prelude::Client, keys: &Keys, product: ProductId) {
    let cache = RedisStockCache::new(client.clone(), keys.clone());
    let figure = StockFigure {
        stock: 5,
        min_stock: 1,
        version: 1,
    };
    let Offered::Pending { nonce } = cache.offer(product, figure).await.unwrap() else {
        panic!("a fresh cache takes the offer");
    };
    assert!(cache.confirm(product, figure, nonce).await.unwrap());
}

/// A lost claim key (a flush, a failover, an expiry) is not "no claim yet" (G8): a
/// delivery or a publish of an older claim still on the wire is refused, not let
/// through for want of a newer claim to compare with, and so is the newest claim's own
/// until it is registered again (after the engine proved it against the database).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_fence_refuses_deliveries_once_the_claim_key_is_lost() {
    let keys = prefix();
    let (client, _bus) = join_redis_bus(&keys, 64).await;
    let fence = RedisStockFence::new(client.clone(), keys.clone());
    let product = ProductId::parse(6).unwrap();
    in_stock(&client, &keys, product).await;
    let batch = |claim| {
        SentBatch::new(
            RunKey {
                product_id: product,
                restock_round: 1,
            },
            None,
            vec![SentItem {
                user_id: UserId::parse(3).unwrap(),
                position: 1,
            }],
            Utc::now().trunc_subsecs(6),
        )
        .under_claim(claim)
    };
    let (old, new) = (batch(1), batch(2));
    assert!(fence.claim(new.run, 2, None).await.unwrap());
    assert_eq!(fence.deliver(&new).await.unwrap(), Delivery::Through(()));
    assert_eq!(fence.deliver(&old).await.unwrap(), Delivery::Superseded);

    let _: i64 = client.del(keys.run_claim(product, 1)).await.unwrap();
    assert_eq!(fence.deliver(&old).await.unwrap(), Delivery::ClaimUnknown);
    assert_eq!(fence.publish(&old).await.unwrap(), Delivery::ClaimUnknown);
    assert_eq!(fence.deliver(&new).await.unwrap(), Delivery::ClaimUnknown);
    assert!(fence.claim(new.run, 2, None).await.unwrap());
    assert_eq!(fence.deliver(&new).await.unwrap(), Delivery::Through(()));
    assert_eq!(fence.deliver(&old).await.unwrap(), Delivery::Superseded);
}

/// A run sends a batch before the fence answered the one before it (G2), so the fence
/// keeps them in order (G1): a batch that does not follow the last one delivered under
/// its claim (the one before it was refused, or has not arrived) is refused, a batch
/// delivered again is answered as delivered but not put on the bus twice, and a claim
/// starts its chain where the run's record ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_fence_lets_a_run_s_batches_through_only_in_order() {
    let keys = prefix();
    let (client, bus) = join_redis_bus(&keys, 64).await;
    let mut events = bus.subscribe();
    let fence = RedisStockFence::new(client.clone(), keys.clone());
    let product = ProductId::parse(7).unwrap();
    in_stock(&client, &keys, product).await;
    let run = RunKey {
        product_id: product,
        restock_round: 1,
    };
    let batch = |prev: Option<i64>, position: i64, claim: i64| {
        SentBatch::new(
            run,
            prev,
            vec![SentItem {
                user_id: UserId::parse(position).unwrap(),
                position,
            }],
            Utc::now().trunc_subsecs(6),
        )
        .under_claim(claim)
    };
    let (first, second, third) = (
        batch(None, 1, 1),
        batch(Some(1), 2, 1),
        batch(Some(2), 3, 2),
    );
    assert!(fence.claim(run, 1, None).await.unwrap());
    assert_eq!(fence.deliver(&second).await.unwrap(), Delivery::OutOfOrder);
    assert_eq!(fence.deliver(&first).await.unwrap(), Delivery::Through(()));
    assert_eq!(fence.deliver(&second).await.unwrap(), Delivery::Through(()));
    // Sent again (a client retrying after a lost connection): answered as delivered,
    // and not put on the bus twice.
    assert_eq!(fence.deliver(&second).await.unwrap(), Delivery::Through(()));
    assert_eq!(fence.deliver(&first).await.unwrap(), Delivery::OutOfOrder);
    // The next owner follows what the record holds (here, both).
    assert_eq!(fence.deliver(&third).await.unwrap(), Delivery::OutOfOrder);
    assert!(fence.claim(run, 2, Some(2)).await.unwrap());
    assert_eq!(fence.deliver(&third).await.unwrap(), Delivery::Through(()));
    // A chain lost with the cache is a claim to prove again.
    let _: i64 = client.del(keys.run_chain(product, 1)).await.unwrap();
    let fourth = batch(Some(3), 4, 2);
    assert_eq!(
        fence.deliver(&fourth).await.unwrap(),
        Delivery::ClaimUnknown
    );
    for expected in [&first, &second, &third] {
        let got = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(*got, BusEvent::Sent(Arc::new((*expected).clone())));
    }
    let nothing = tokio::time::timeout(Duration::from_millis(200), events.recv()).await;
    assert!(nothing.is_err(), "nothing more on the bus: {nothing:?}");
}
