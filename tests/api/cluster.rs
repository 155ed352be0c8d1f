//! Several instances on one database and Redis prefix behave as one service (G2, G3,
//! G8, G10, G11): each test starts two or three `Application`s sharing both, or the
//! real binary as a child process where a process must die.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use restock_notifier::grpc::proto::{RunStatus, SubscribeRequest};
use sqlx::{Connection, MySqlConnection};

use crate::helpers::*;

/// `n` instances on one fresh MySQL database and Redis prefix.
pub async fn spawn_cluster(n: usize, options: Options) -> Vec<TestApp> {
    let first = spawn_app_with(options.clone()).await;
    let mut apps = vec![];
    for _ in 1..n {
        apps.push(
            spawn_app_with(Options {
                database: Some(first.database.clone()),
                redis_prefix: Some(first.redis_prefix.clone()),
                ..options.clone()
            })
            .await,
        );
    }
    apps.insert(0, first);
    apps
}

/// `sent_at` of every recorded notification of `round` (all rounds when `None`).
pub(crate) async fn sent_times(app: &TestApp, round: Option<i64>) -> Vec<DateTime<Utc>> {
    sqlx::query_scalar(
        "SELECT CAST(UNIX_TIMESTAMP(sent_at) * 1000000 AS SIGNED) \
         FROM product_user_notification_history WHERE restock_round = ? OR ? IS NULL",
    )
    .bind(round)
    .bind(round)
    .fetch_all(&app.db)
    .await
    .unwrap()
    .into_iter()
    .map(|micros: i64| DateTime::<Utc>::from_timestamp_micros(micros).unwrap())
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_send_rate() {
    let apps = spawn_cluster(
        2,
        Options {
            send_rate: 200,
            ..Options::new(Backend::MySql)
        },
    )
    .await;
    let users: Vec<i64> = (1..=500).collect();
    for (product, app) in [(1, &apps[0]), (2, &apps[1])] {
        app.set_stock(product, 10).await;
        app.register_bulk(product, &users).await;
    }
    // One run on each instance, at the same time.
    apps[0].trigger(1, None).await.unwrap();
    apps[1].trigger(2, None).await.unwrap();
    for (product, app) in [(1, &apps[0]), (2, &apps[1])] {
        assert_eq!(
            app.wait_until_final(product).await.status(),
            RunStatus::Completed
        );
        assert_eq!(app.history(product, 1).await, users);
    }
    // 1,000 sends at 200/s in all: never more than 200 in any second, whichever
    // instance sent them (G2). How close to the rate they come is the benchmark's
    // figure (`bench -- cluster`), not a test's on a busy machine.
    let busiest = busiest_second(&sent_times(&apps[0], None).await);
    assert!(busiest <= 200, "busiest 1 s window held {busiest} sends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_on_one_instance_gets_every_notification_of_a_run_on_another() {
    let apps = spawn_cluster(2, Options::new(Backend::MySql)).await;
    let users: Vec<i64> = (1..=300).rev().collect();
    apps[0].set_stock(1, 10).await;
    apps[0].register_bulk(1, &users).await;
    let mut on_b = apps[1].subscribe_to_product(1).await;
    apps[0].trigger(1, None).await.unwrap();
    let got: Vec<i64> = take(&mut on_b, users.len())
        .await
        .iter()
        .map(|n| n.user_id)
        .collect();
    assert_eq!(got, users, "in send order, nothing missing, nothing twice");
}

/// G3 across instances: a stock write that leaves the product sold out (0, stock below
/// its threshold, or a threshold raised above the stock), made on one instance, stops a
/// run on another before it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sold_out_stock_write_on_one_instance_stops_a_run_on_another_at_once() {
    let apps = spawn_cluster(
        2,
        Options {
            send_rate: 400,
            ..Options::new(Backend::MySql)
        },
    )
    .await;
    let users: Vec<i64> = (1..=2_000).collect();
    apps[0].set_stock(1, 10).await;
    apps[0].register_bulk(1, &users).await;
    // Stopped at several moments of a run, early and a little later each time, by
    // each kind of write: (round, notifications seen first, stock, min_stock).
    for (round, after, stock, min_stock) in [
        (1, 5usize, 0, None),
        (2, 60, 0, None),
        (3, 150, 4, Some(5)),
        (4, 40, 10, Some(11)),
    ] {
        let mut watch = apps[0].subscribe_to_product(1).await;
        apps[0].trigger(1, Some(10)).await.unwrap();
        take(&mut watch, after).await;
        apps[1]
            .set_stock_with(1, stock, min_stock)
            .await
            .expect("SetStock");
        let returned = Utc::now();
        let run = apps[0].wait_until_final(1).await;
        assert_eq!(run.restock_round, round);
        assert_eq!(run.status(), RunStatus::CanceledBySoldOut);
        let sent = sent_times(&apps[0], Some(round)).await;
        let late = sent.iter().filter(|&&t| t > returned).count();
        assert_eq!(
            late, 0,
            "round {round}: {late} sent after SetStock({stock}, {min_stock:?}) returned"
        );
        let history = apps[0].history(1, round).await;
        assert!(history.len() >= after);
        assert_eq!(history, users[..history.len()]);
    }
}

/// Delivered on `stream` so far minus recorded, sampled until `until`.
async fn max_unrecorded_while(
    app: &TestApp,
    received: &std::sync::atomic::AtomicUsize,
    until: tokio::time::Instant,
) -> usize {
    let mut max = 0;
    while tokio::time::Instant::now() < until {
        let delivered = received.load(std::sync::atomic::Ordering::SeqCst);
        let recorded: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM product_user_notification_history")
                .fetch_one(&app.db)
                .await
                .unwrap();
        max = max.max(delivered.saturating_sub(recorded as usize));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    max
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_stall_pauses_sends_within_a_second_and_loses_or_repeats_nothing() {
    let apps = spawn_cluster(
        2,
        Options {
            send_rate: 500,
            ..Options::new(Backend::MySql)
        },
    )
    .await;
    let users: Vec<i64> = (1..=4_000).collect();
    apps[0].set_stock(1, 10).await;
    apps[0].register_bulk(1, &users).await;
    // A live subscriber on the other instance counts what is delivered.
    let mut live = apps[1].subscribe(SubscribeRequest::default()).await;
    let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = received.clone();
    let reader = tokio::spawn(async move {
        let mut ids = vec![];
        while ids.len() < 4_000 {
            match tokio::time::timeout(Duration::from_secs(30), live.next()).await {
                Ok(Some(Ok(n))) => {
                    ids.push(n.user_id);
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                other => panic!("live stream ended after {}: {other:?}", ids.len()),
            }
        }
        ids
    });
    apps[0].trigger(1, None).await.unwrap();
    let delivered = &received;
    poll_until(Duration::from_secs(30), "500 delivered", || async move {
        match delivered.load(std::sync::atomic::Ordering::SeqCst) {
            n if n >= 500 => Ok(()),
            fewer => Err(fewer),
        }
    })
    .await;
    // Commits stall: the history table is locked from another connection for 4 s,
    // while reads still work.
    let mut locker =
        MySqlConnection::connect(&format!("{}/{}", mysql_server_url(), apps[0].database))
            .await
            .unwrap();
    sqlx::raw_sql("LOCK TABLES product_user_notification_history READ")
        .execute(&mut locker)
        .await
        .unwrap();
    let stall_end = tokio::time::Instant::now() + Duration::from_secs(4);
    // During the stall, once it holds notifications delivered but unrecorded, a
    // subscriber resumes after the last recorded one.
    let db = &apps[0].db;
    let last_recorded: i64 = poll_until(
        Duration::from_secs(3),
        "notifications delivered but not recorded",
        || async move {
            let (recorded, last): (i64, Option<i64>) = sqlx::query_as(
                "SELECT COUNT(*), MAX(user_id) FROM product_user_notification_history",
            )
            .fetch_one(db)
            .await
            .unwrap();
            match delivered.load(std::sync::atomic::Ordering::SeqCst) as i64 - recorded {
                unrecorded if unrecorded >= 100 => Ok(last.unwrap()),
                unrecorded => Err(unrecorded),
            }
        },
    )
    .await;
    let mut resumed = apps[1]
        .subscribe(SubscribeRequest {
            resume_after: Some(format!("1-1-{last_recorded}")),
            ..Default::default()
        })
        .await;
    let max = max_unrecorded_while(&apps[0], &received, stall_end).await;
    sqlx::raw_sql("UNLOCK TABLES")
        .execute(&mut locker)
        .await
        .unwrap();
    eprintln!("at most {max} delivered but unrecorded during the 4 s stall");
    assert!(
        max <= 500,
        "{max} delivered but unrecorded during the stall"
    );
    assert!(max >= 100, "the stall did not hold anything up ({max})");

    let run = apps[0].wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::Completed);
    assert_eq!(
        apps[0].history(1, 1).await,
        users,
        "recorded once each, in order"
    );
    let seen = reader.await.unwrap();
    assert_eq!(
        seen, users,
        "the live stream saw each notification once, in order"
    );
    let rest = users.len() - last_recorded as usize;
    let got: Vec<i64> = take(&mut resumed, rest)
        .await
        .iter()
        .map(|n| n.user_id)
        .collect();
    assert_eq!(
        got,
        users[last_recorded as usize..],
        "resumed: no gap, no duplicate"
    );
    let extra = tokio::time::timeout(Duration::from_millis(300), resumed.next()).await;
    assert!(extra.is_err(), "nothing more after the end: {extra:?}");
    let unique: HashSet<_> = got.iter().collect();
    assert_eq!(unique.len(), got.len());
}

/// The real binary, as a separate process on the given database and Redis prefix.
pub(crate) struct Instance {
    pub(crate) service: ServiceProcess,
    pub(crate) client: restock_notifier::grpc::proto::restock_service_client::RestockServiceClient<
        tonic::transport::Channel,
    >,
}

impl Instance {
    /// The real binary as another instance of `app`: its database, Redis and prefix.
    async fn start(app: &TestApp, send_rate: u32, lease: &str) -> Self {
        Self::start_with_clock(app, send_rate, lease, None).await
    }

    /// As `start`, with the process's wall clock moved by `skew` (libfaketime's
    /// `FAKETIME`, e.g. `+30s`) when given.
    async fn start_with_clock(
        app: &TestApp,
        send_rate: u32,
        lease: &str,
        skew: Option<&str>,
    ) -> Self {
        let faketime = skew.map(|skew| (libfaketime(), skew));
        let mut extra = vec![];
        if let Some((library, skew)) = &faketime {
            // libfaketime preloaded into the service process itself (the `faketime`
            // command would fork it, and killing the command would leave it running).
            extra.extend([
                ("LD_PRELOAD", library.as_str()),
                ("FAKETIME", *skew),
                ("DONT_FAKE_MONOTONIC", "1"),
            ]);
        }
        Self::start_with_env(app, send_rate, lease, &extra).await
    }

    /// As `start`, with `extra` settings in the process's environment.
    pub(crate) async fn start_with_env(
        app: &TestApp,
        send_rate: u32,
        lease: &str,
        extra: &[(&str, &str)],
    ) -> Self {
        let (database, prefix) = (&app.database, app.redis_prefix.as_str());
        let database_url = format!("{}/{database}", mysql_server_url());
        let redis = app
            .redis_url
            .clone()
            .expect("an instance on MySQL and Redis");
        let send_rate = send_rate.to_string();
        let mut env = vec![
            ("DATABASE_URL", database_url.as_str()),
            ("REDIS_URL", redis.as_str()),
            ("RESTOCK_REDIS_PREFIX", prefix),
            ("RESTOCK_SEND_RATE", send_rate.as_str()),
            ("RESTOCK_RUN_LEASE", lease),
            ("RESTOCK_ADMIN_TOKEN", ADMIN_TOKEN),
        ];
        env.extend_from_slice(extra);
        let mut command = binary_command(&env);
        command.stderr(if std::env::var_os("TEST_LOG").is_none() {
            std::process::Stdio::null()
        } else {
            std::process::Stdio::inherit()
        });
        // It binds its own port and says which: connecting cannot race its start.
        let service = start_service(command).await;
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", service.addr))
            .unwrap()
            .connect()
            .await
            .expect("connects to the instance");
        Self {
            service,
            client:
                restock_notifier::grpc::proto::restock_service_client::RestockServiceClient::new(
                    channel,
                ),
        }
    }

    /// `TriggerRestock` of `product` on this instance, no stock given.
    async fn trigger(&self, product: i64) {
        self.client
            .clone()
            .trigger_restock(restock_notifier::grpc::proto::TriggerRestockRequest {
                product_id: product,
                stock: None,
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

/// Where Debian's `faketime` package put its library (.ci/run installs it).
fn libfaketime() -> String {
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|dir| dir.path().join("faketime/libfaketime.so.1"))
        .chain([std::path::PathBuf::from(
            "/usr/lib/faketime/libfaketime.so.1",
        )])
        .find(|path| path.is_file());
    found
        .expect("libfaketime is installed (Debian's faketime package; .ci/run installs it)")
        .to_string_lossy()
        .into_owned()
}

async fn claim_token(app: &TestApp) -> Option<i64> {
    sqlx::query_scalar("SELECT claim_token FROM product_notification_history WHERE product_id = 1")
        .fetch_one(&app.db)
        .await
        .unwrap()
}

/// The instance that survives a kill: 200/s and a 2 s lease, on MySQL and the shared
/// Redis.
async fn survivor() -> TestApp {
    survivor_on(None, Duration::from_secs(2)).await
}

/// A survivor with a lease of `lease`, on `redis` (a Redis Cluster's URL), or the
/// shared Redis when `None`.
async fn survivor_on(redis: Option<String>, lease: Duration) -> TestApp {
    spawn_app_with(Options {
        send_rate: 200,
        run_lease: lease,
        redis_url: redis,
        ..Options::new(Backend::MySql)
    })
    .await
}

/// Starts a run of 1,500 users on a separate process at 200/s and returns once it has
/// recorded a few hundred; `survivor` shares its database and Redis prefix. With
/// `one_shot`, every alert is one-shot (as RegisterAlert with once makes it, written
/// in bulk as the registrations are).
async fn run_on_a_separate_instance(survivor: &TestApp, users: &[i64], one_shot: bool) -> Instance {
    survivor.set_stock(1, 10).await;
    survivor.register_bulk(1, users).await;
    if one_shot {
        sqlx::query("UPDATE product_user_notification SET once = TRUE WHERE product_id = 1")
            .execute(&survivor.db)
            .await
            .unwrap();
    }
    let owner = Instance::start(survivor, 200, "2s").await;
    owner.trigger(1).await;
    survivor.wait_for_history(1, 1, 300).await;
    owner
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_s_run_is_taken_over_and_finished_with_exact_history() {
    a_killed_instance_s_run_is_taken_over(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_s_run_is_taken_over_on_a_redis_cluster() {
    a_killed_instance_s_run_is_taken_over(Some(shared_cluster().await.url())).await;
}

async fn a_killed_instance_s_run_is_taken_over(redis: Option<String>) {
    let survivor = survivor_on(redis, Duration::from_secs(2)).await;
    let users: Vec<i64> = (1..=1_500).collect();
    let mut owner = run_on_a_separate_instance(&survivor, &users, false).await;
    let token = claim_token(&survivor).await;
    owner.service.signal("KILL");
    owner.service.wait();
    let killed = tokio::time::Instant::now();
    // G8: taken over once the 2 s lease has run out, with 5 s to spare.
    let survivor = &survivor;
    poll_until(Duration::from_secs(7), "taken over", || async move {
        match claim_token(survivor).await {
            now if now != token => Ok(()),
            same => Err(same),
        }
    })
    .await;
    let taken_over_after = killed.elapsed();
    let run = survivor.wait_until_final(1).await;
    assert_eq!(
        run.status(),
        RunStatus::Completed,
        "a hand-over is not a failure"
    );
    assert_eq!(run.restock_round, 1);
    assert_eq!(
        survivor.history(1, 1).await,
        users,
        "each user recorded once, in order"
    );
    assert_eq!(run.sent_count, users.len() as i64);
    eprintln!("taken over {taken_over_after:?} after kill -9");
}

/// One-shot alerts across a takeover: every alert is used up by the one notification
/// recorded for it, whichever instance recorded it, and none is notified twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_alerts_are_used_up_exactly_once_across_a_takeover() {
    let survivor = survivor().await;
    let users: Vec<i64> = (1..=1_500).collect();
    let mut owner = run_on_a_separate_instance(&survivor, &users, true).await;
    owner.service.signal("KILL");
    owner.service.wait();
    let run = survivor.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::Completed);
    assert_eq!(
        survivor.history(1, 1).await,
        users,
        "each user once, in order"
    );
    let still_active: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM product_user_notification WHERE product_id = 1 AND is_active = TRUE",
    )
    .fetch_one(&survivor.db)
    .await
    .unwrap();
    assert_eq!(still_active, 0, "every one-shot alert used up");
    let product = survivor
        .client
        .clone()
        .get_product(restock_notifier::grpc::proto::GetProductRequest { product_id: 1 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(product.waiting, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_a_run_over_to_a_live_instance_within_two_seconds() {
    sigterm_hands_a_run_over(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_a_run_over_within_two_seconds_on_a_redis_cluster() {
    sigterm_hands_a_run_over(Some(shared_cluster().await.url())).await;
}

async fn sigterm_hands_a_run_over(redis: Option<String>) {
    let survivor = survivor_on(redis, Duration::from_secs(10)).await;
    let users: Vec<i64> = (1..=1_500).collect();
    let mut owner = run_on_a_separate_instance(&survivor, &users, false).await;
    owner.service.signal("TERM");
    let exit = owner.service.wait();
    assert!(exit.success(), "a clean exit on SIGTERM: {exit:?}");
    let stopped = tokio::time::Instant::now();
    // Released: still in progress, nobody's claim.
    assert_eq!(survivor.run_row(1, 1).await.0, "IN_PROGRESS");
    // G8: the survivor's next look, a second at most, continues it.
    let survivor = &survivor;
    poll_until(
        Duration::from_secs(2),
        "continued after the SIGTERM'd instance exited",
        || async move { claim_token(survivor).await.ok_or("no claim") },
    )
    .await;
    eprintln!(
        "continued {:?} after the SIGTERM'd instance exited",
        stopped.elapsed()
    );
    let run = survivor.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::Completed);
    assert_eq!(survivor.history(1, 1).await, users);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_carry_the_database_s_clock_even_from_a_host_whose_clock_is_off() {
    let other = spawn_app(Backend::MySql).await;
    let users: Vec<i64> = (1..=300).collect();
    other.set_stock(1, 10).await;
    other.register_bulk(1, &users).await;
    // libfaketime (Debian's faketime package; .ci/run installs it) runs the binary
    // with its wall clock 30 s ahead.
    let skewed = Instance::start_with_clock(&other, 1_000, "10s", Some("+30s")).await;
    skewed.trigger(1).await;
    let run = other.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::Completed);
    // How far each stamp is behind the database's clock now: the run took about a
    // third of a second, so every stamp is a little in the past; 30 s ahead, with the
    // skewed host's own clock, they would be in the future.
    let (newest, oldest): (i64, i64) = sqlx::query_as(
        "SELECT TIMESTAMPDIFF(MICROSECOND, MAX(sent_at), UTC_TIMESTAMP(6)), \
                TIMESTAMPDIFF(MICROSECOND, MIN(sent_at), UTC_TIMESTAMP(6)) \
         FROM product_user_notification_history WHERE product_id = 1",
    )
    .fetch_one(&other.db)
    .await
    .unwrap();
    assert!(
        newest >= 0 && oldest < 20_000_000,
        "sent_at is {newest} to {oldest} us behind the database's clock"
    );
    assert_eq!(other.history(1, 1).await, users);
}
