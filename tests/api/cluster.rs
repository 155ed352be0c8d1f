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

/// The most sends within any one-second window.
fn busiest_window(mut times: Vec<DateTime<Utc>>) -> usize {
    times.sort();
    let mut best = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end] - times[start] >= chrono::Duration::seconds(1) {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

/// `sent_at` of every recorded notification of `round` (all rounds when `None`).
async fn sent_times(app: &TestApp, round: Option<i64>) -> Vec<DateTime<Utc>> {
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
    // instance sent them.
    let busiest = busiest_window(sent_times(&apps[0], None).await);
    assert!(busiest <= 200, "busiest 1 s window held {busiest} sends");
    assert!(busiest >= 150, "the rate was barely used: {busiest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_on_one_instance_gets_every_notification_of_a_run_on_another() {
    let apps = spawn_cluster(2, Options::new(Backend::MySql)).await;
    let users: Vec<i64> = (1..=300).rev().collect();
    apps[0].set_stock(1, 10).await;
    apps[0].register_bulk(1, &users).await;
    let mut on_b = apps[1]
        .subscribe(SubscribeRequest {
            product_id: Some(1),
            ..Default::default()
        })
        .await;
    apps[0].trigger(1, None).await.unwrap();
    let got: Vec<i64> = take(&mut on_b, users.len())
        .await
        .iter()
        .map(|n| n.user_id)
        .collect();
    assert_eq!(got, users, "in send order, nothing missing, nothing twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_stock_zero_on_one_instance_stops_a_run_on_another_at_once() {
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
    // Stopped at several moments of a run: early, and a little later each time.
    for (round, after) in [(1, 5usize), (2, 60), (3, 150)] {
        let mut watch = apps[0]
            .subscribe(SubscribeRequest {
                product_id: Some(1),
                ..Default::default()
            })
            .await;
        apps[0].trigger(1, Some(10)).await.unwrap();
        take(&mut watch, after).await;
        apps[1].set_stock(1, 0).await;
        let returned = Utc::now();
        let run = apps[0].wait_until_final(1).await;
        assert_eq!(run.restock_round, round);
        assert_eq!(run.status(), RunStatus::CanceledBySoldOut);
        let sent = sent_times(&apps[0], Some(round)).await;
        let late = sent.iter().filter(|&&t| t > returned).count();
        assert_eq!(
            late, 0,
            "round {round}: {late} sent after SetStock(0) returned"
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
    while received.load(std::sync::atomic::Ordering::SeqCst) < 500 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
    // During the stall, a subscriber resumes after the last recorded notification.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let last_recorded: i64 = sqlx::query_scalar(
        "SELECT user_id FROM product_user_notification_history ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&apps[0].db)
    .await
    .unwrap();
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
