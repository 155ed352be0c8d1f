//! The cluster on a real network: two instances on one database and Redis prefix, one
//! of them reaching MySQL or Redis through a fault proxy of the test's own that holds
//! a request on the wire or cuts the instance off mid-transaction (G3, G8).

use std::time::Duration;

use fred::prelude::{ClientLike as _, KeysInterface as _};
use fred::types::scripts::Script;
use futures::StreamExt as _;
use restock_notifier::domain::ProductId;
use restock_notifier::engine::bus::redis::RedisBus;
use restock_notifier::engine::bus::{BusEvent, NotificationBus as _, RunKey};
use restock_notifier::grpc::proto::{self, RunStatus};
use restock_notifier::redis::Keys;
use tokio::time::Instant;

use crate::helpers::*;
use crate::proxy::{FaultProxy, Way};

/// Two instances on one MySQL database and Redis prefix: the first reaches MySQL
/// (`mysql`) or Redis (`redis`) through its proxy.
async fn owner_and_survivor(
    lease: Duration,
    send_rate: u32,
    mysql: Option<&FaultProxy>,
    redis: Option<&FaultProxy>,
) -> (TestApp, TestApp) {
    let options = Options {
        run_lease: lease,
        send_rate,
        ..Options::new(Backend::MySql)
    };
    let owner = spawn_app_with(Options {
        mysql_url: mysql.map(|p| p.url(&mysql_server_url())),
        redis_url: redis.map(|p| p.url(&redis_url())),
        ..options.clone()
    })
    .await;
    let survivor = spawn_app_with(Options {
        database: Some(owner.database.clone()),
        redis_prefix: Some(owner.redis_prefix.clone()),
        ..options
    })
    .await;
    (owner, survivor)
}

async fn claim_token(app: &TestApp, product: i64) -> Option<i64> {
    sqlx::query_scalar(
        "SELECT claim_token FROM product_notification_history WHERE product_id = ? \
         AND restock_round = 1",
    )
    .bind(product)
    .fetch_one(&app.db)
    .await
    .unwrap()
}

async fn wait_until_held(proxy: &FaultProxy) {
    poll_until(
        Duration::from_secs(10),
        "a request matched the hold",
        || async move {
            match proxy.held() {
                0 => Err(0),
                held => Ok(held),
            }
        },
    )
    .await;
}

/// The notification bus of a Redis prefix, as an instance joins it.
async fn raw_bus(prefix: &str) -> RedisBus {
    join_redis_bus(&Keys::new(prefix), 100_000).await.1
}

/// When each notification reached the stream, until `stop` fires and the stream has
/// then been quiet for half a second.
async fn arrival_times(
    mut stream: tonic::Streaming<proto::Notification>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Vec<Instant> {
    let mut times = vec![];
    loop {
        tokio::select! {
            next = stream.next() => match next {
                Some(Ok(_)) => times.push(Instant::now()),
                _ => return times,
            },
            _ = &mut stop => break,
        }
    }
    while let Ok(Some(Ok(_))) =
        tokio::time::timeout(Duration::from_millis(500), stream.next()).await
    {
        times.push(Instant::now());
    }
    times
}

/// Every user once, in registration order (G5, G8).
fn assert_exact(history: &[i64], users: &[i64]) {
    assert_eq!(history, users, "history is every user once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_cut_off_from_mysql_mid_commit_does_not_hold_up_the_takeover() {
    let mysql = FaultProxy::for_url(&mysql_server_url()).await;
    let lease = Duration::from_secs(3);
    let (owner, survivor) = owner_and_survivor(lease, 200, Some(&mysql), None).await;
    let users: Vec<i64> = (1..=1_200).collect();
    survivor.set_stock(1, 10).await;
    survivor.register_bulk(1, &users).await;
    owner.trigger(1, None).await.unwrap();
    survivor.wait_for_history(1, 1, 200).await;
    let first = claim_token(&survivor, 1).await;

    // The owner sends a record's COMMIT and is cut off right then: the COMMIT never
    // arrives, its transaction stays open on the server with the run's row locked, and
    // nothing the owner sends afterwards arrives either.
    mysql.hold_next(Way::Up, b"COMMIT", Duration::from_secs(3_600));
    wait_until_held(&mysql).await;
    mysql.freeze();
    let cut = Instant::now();

    // G8: taken over once the lease has run out, with 5 s to spare.
    let app = &survivor;
    poll_until(
        lease + Duration::from_secs(5),
        "taken over after the cut",
        || async move {
            match claim_token(app, 1).await {
                now if now != first => Ok(()),
                same => Err(same),
            }
        },
    )
    .await;
    let taken_over_after = cut.elapsed();
    let run = survivor.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::Completed, "{run:?}");
    assert_exact(&survivor.history(1, 1).await, &users);
    // The claim was granted with a lease of its own that counted from the grant: one
    // takeover, not a second one after a claim that was already out of time.
    let taken = survivor.scrape().await["restock_runs_taken_over_total"];
    assert_eq!(taken, 1.0, "taken over after {taken_over_after:?}");
    mysql.cut_all();
}

/// The SHA of a script of the stock fence, as EVALSHA sends it.
fn script_sha(lua: &str) -> Vec<u8> {
    Script::from_lua(lua.to_owned()).sha1().as_bytes().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_held_on_the_wire_past_a_takeover_is_not_delivered() {
    let redis = FaultProxy::for_url(&redis_url()).await;
    // A lease shorter than the hold, and the hold shorter than the Redis command timeout
    // (2 s): the owner still waits for its delivery while the run is taken over.
    let lease = Duration::from_secs(1);
    let (owner, survivor) = owner_and_survivor(lease, 100, None, Some(&redis)).await;
    let users: Vec<i64> = (1..=400).collect();
    survivor.set_stock(1, 10).await;
    survivor.register_bulk(1, &users).await;
    // What the shared bus carries, as every instance's streams are fed from it (the
    // streams themselves drop what they have seen; the bus does not).
    let feed = raw_bus(&survivor.redis_prefix).await;
    let mut bus = feed.subscribe();
    // The test's own last word on the bus: once it arrives, whatever was published
    // before it has arrived too (Redis delivers a channel in the order it executed).
    let marker = RunKey {
        product_id: ProductId::parse(2).unwrap(),
        restock_round: 99,
    };
    let published = tokio::spawn(async move {
        let mut users = vec![];
        loop {
            match bus.recv().await.as_deref() {
                Ok(BusEvent::Sent(batch)) => {
                    users.extend(batch.items.iter().map(|i| (batch.claim, i.user_id.get())))
                }
                Ok(BusEvent::RunEnded { run, .. }) if *run == marker => return users,
                Ok(BusEvent::Gap) => panic!("the test's bus feed missed events"),
                Ok(_) => {}
                Err(err) => panic!("the test's bus feed broke: {err}"),
            }
        }
    });
    owner.trigger(1, None).await.unwrap();
    survivor.wait_for_history(1, 1, 50).await;
    let first = claim_token(&survivor, 1).await;

    redis.hold_next(
        Way::Up,
        &script_sha(restock_notifier::engine::stock::redis::DELIVER_LUA),
        Duration::from_millis(1_800),
    );
    wait_until_held(&redis).await;
    // The owner stops looking for runs to take over, so its own run goes to the other
    // instance, whose claim reaches Redis on another connection than the held one.
    let stopping = tokio::spawn(owner.shut_down());
    let run = survivor.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::Completed, "{run:?}");
    assert_ne!(claim_token(&survivor, 1).await, first, "taken over");
    stopping.await.unwrap();
    assert_exact(&survivor.history(1, 1).await, &users);

    // What the bus carried: once a batch of the new claim was delivered, none of the
    // old one follows (the held delivery arrives after the takeover and does nothing).
    // Once Redis has answered the held delivery, it has executed it, so the marker
    // published after that follows whatever it published.
    poll_until(
        Duration::from_secs(10),
        "Redis answered the held delivery",
        || async {
            match redis.answered() {
                0 => Err(0),
                answered => Ok(answered),
            }
        },
    )
    .await;
    feed.publish(BusEvent::RunEnded {
        run: marker,
        status: restock_notifier::domain::RunStatus::Completed,
        last_position: None,
    })
    .await
    .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), published)
        .await
        .expect("the marker arrived on the bus")
        .unwrap();
    assert!(seen.len() >= users.len(), "every user reached the bus");
    let mut newest = 0;
    for &(claim, user) in &seen {
        assert!(
            claim >= newest,
            "user {user} delivered under claim {claim} after claim {newest}: {seen:?}"
        );
        newest = claim;
    }
    assert!(newest > first.unwrap(), "the new owner delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_cache_never_brings_an_older_stock_back_after_set_stock_zero() {
    let redis = FaultProxy::for_url(&redis_url()).await;
    let (owner, survivor) =
        owner_and_survivor(Duration::from_secs(10), 100, None, Some(&redis)).await;
    let users: Vec<i64> = (1..=3_000).collect();
    survivor.set_stock(1, 10).await;
    survivor.register_bulk(1, &users).await;
    let stream = survivor.subscribe_to_product(1).await;
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let arrivals = tokio::spawn(arrival_times(stream, stopped));
    owner.trigger(1, None).await.unwrap();
    survivor.wait_for_history(1, 1, 100).await;

    let direct = restock_notifier::redis::connect(&redis_url())
        .await
        .unwrap();
    let key = Keys::new(survivor.redis_prefix.clone())
        .stock(restock_notifier::domain::ProductId::parse(1).unwrap());
    // The cache loses the figure; the owner reads 10 from the database and offers it
    // back, and that offer is held on the wire.
    redis.hold_next(
        Way::Up,
        &script_sha(include_str!("../../src/engine/stock/offer.lua")),
        Duration::from_millis(1_500),
    );
    direct.del::<i64, _>(&key).await.unwrap();
    wait_until_held(&redis).await;
    // Meanwhile the product sells out, and the cache loses that figure too.
    survivor.set_stock(1, 0).await;
    let sold_out = Instant::now();
    direct.del::<i64, _>(&key).await.unwrap();

    let run = survivor.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::CanceledBySoldOut, "{run:?}");
    // Nothing reaches a subscriber once SetStock(0) has returned (what was published
    // before it arrives within a few milliseconds).
    stop.send(()).ok();
    let late = arrivals
        .await
        .unwrap()
        .into_iter()
        .filter(|&at| at > sold_out + Duration::from_millis(100))
        .count();
    assert_eq!(
        late, 0,
        "notifications delivered after SetStock(0) returned"
    );
    let history = survivor.history(1, 1).await;
    assert_exact(&history, &users[..history.len()]);
    // The cache holds the database's figure, or none.
    let cached: Option<i64> = fred::prelude::HashesInterface::hget(&direct, &key, "stock")
        .await
        .unwrap();
    assert!(
        matches!(cached, None | Some(0)),
        "cache says {cached:?}, database 0"
    );
    direct.quit().await.ok();
}

/// A run whose claim key is lost from Redis mid-run (a flush, a failover) proves its
/// claim against the database, registers it again and finishes: every user once, in
/// order (G8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_claim_key_is_lost_registers_it_again_and_finishes() {
    let app = spawn_app_with(Options {
        send_rate: 200,
        ..Options::new(Backend::MySql)
    })
    .await;
    let users: Vec<i64> = (1..=400).collect();
    app.set_stock(1, 10).await;
    app.register_bulk(1, &users).await;
    app.trigger(1, None).await.unwrap();
    app.wait_for_history(1, 1, 50).await;
    let keys = Keys::new(app.redis_prefix.clone());
    let (client, _bus) = join_redis_bus(&keys, 64).await;
    let claim = keys.run_claim(restock_notifier::domain::ProductId::parse(1).unwrap(), 1);
    let removed: i64 = client.del(&claim).await.unwrap();
    assert_eq!(removed, 1, "the run's claim key was there");
    let run = app.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::Completed, "{run:?}");
    assert_eq!(app.history(1, 1).await, users);
    let registered: Option<i64> = client.get(&claim).await.unwrap();
    assert_eq!(registered, Some(1), "the claim was registered again");
}

/// One run alone (one product restocked, the common case) with Redis `each_way` away
/// through the test's proxy: it keeps the rate, never above it in any second, and on a
/// fresh Redis prefix it sends its first notification promptly (G2). The floors are
/// loose for a shared test machine; the figures belong to `bench limiter`. Before a run
/// kept asking the limiter while its batches were on their way, one run kept 30% of
/// the rate with 3 ms each way, and a fresh prefix waited 1.5 s.
async fn one_run_far_from_redis_keeps_the_rate(each_way: Duration) {
    let proxy = FaultProxy::for_url(&redis_url()).await;
    proxy.set_delay(each_way);
    let rate = 200;
    let app = spawn_app_with(Options {
        send_rate: rate,
        redis_url: Some(proxy.url(&redis_url())),
        ..Options::new(Backend::MySql)
    })
    .await;
    let users: Vec<i64> = (1..=600).collect();
    app.set_stock(1, 5).await;
    app.register_bulk(1, &users).await;
    app.trigger(1, None).await.unwrap();
    let returned = chrono::Utc::now();
    assert_eq!(app.wait_until_final(1).await.status(), RunStatus::Completed);
    let mut sent = crate::cluster::sent_times(&app, Some(1)).await;
    sent.sort();
    assert_eq!(sent.len(), users.len());
    let first_wait = (sent[0] - returned).as_seconds_f64();
    assert!(
        first_wait < 0.5 + 4.0 * each_way.as_secs_f64(),
        "first send {first_wait:.3} s after the trigger returned"
    );
    let span = (sent[sent.len() - 1] - sent[0]).as_seconds_f64();
    let used = (sent.len() - 1) as f64 / span / f64::from(rate);
    assert!(used > 0.8, "one run kept {:.1}% of the rate", used * 100.0);
    assert!(busiest_second(&sent) <= rate as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_run_one_ms_from_redis_keeps_the_rate() {
    one_run_far_from_redis_keeps_the_rate(Duration::from_millis(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_run_three_ms_from_redis_keeps_the_rate() {
    one_run_far_from_redis_keeps_the_rate(Duration::from_millis(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_run_fifty_ms_from_redis_keeps_the_rate() {
    one_run_far_from_redis_keeps_the_rate(Duration::from_millis(50)).await;
}
