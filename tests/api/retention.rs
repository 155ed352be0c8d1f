//! `RESTOCK_HISTORY_RETENTION`: a background sweep deletes the per-user history of
//! rounds that ended longer ago, keeps the runs, counts what it deleted, and a
//! `resume_after` into a swept round is answered OUT_OF_RANGE. Rounds are made old by
//! the test, which moves their end back two days.

use std::time::Duration;

use futures::StreamExt as _;
use restock_notifier::grpc::proto::{RunStatus, SubscribeRequest};
use tonic::Code;

use crate::cluster::sent_times;
use crate::helpers::*;

/// Moves the end of `product`'s round `round` two days back.
async fn age(app: &TestApp, product: i64, round: i64) {
    let sql = match app.backend {
        Backend::MySql => {
            "UPDATE product_notification_history SET updated_at = updated_at - INTERVAL 2 DAY \
             WHERE product_id = ? AND restock_round = ?"
        }
        Backend::Embedded => {
            "UPDATE product_notification_history SET updated_at = datetime(updated_at, '-2 days') \
             WHERE product_id = ? AND restock_round = ?"
        }
    };
    sqlx::query(sql)
        .bind(product)
        .bind(round)
        .execute(&app.db)
        .await
        .unwrap();
}

async fn history_rows(app: &TestApp, product: i64, round: i64) -> i64 {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM product_user_notification_history \
         WHERE product_id = ? AND restock_round = ?",
    )
    .bind(product)
    .bind(round)
    .fetch_one(&app.db)
    .await
    .unwrap()
}

async fn wait_until_swept(app: &TestApp, product: i64, round: i64) {
    poll_until(
        Duration::from_secs(30),
        "the round's history swept",
        || async move {
            match history_rows(app, product, round).await {
                0 => Ok(()),
                left => Err(left),
            }
        },
    )
    .await;
}

async fn the_sweep_deletes_old_rounds_history_and_keeps_the_runs(backend: Backend) {
    let app = spawn_app_with(Options {
        send_rate: 20_000,
        history_retention: Some(Duration::from_secs(3_600)),
        ..Options::new(backend)
    })
    .await;
    // More than one statement's worth (1,000 rows) in the old round.
    let users: Vec<i64> = (1..=2_500).collect();
    app.set_stock(1, 10).await;
    app.register_bulk(1, &users).await;
    for round in [1, 2] {
        app.trigger(1, None).await.unwrap();
        assert_eq!(app.wait_until_final(1).await.status(), RunStatus::Completed);
        assert_eq!(app.history(1, round).await.len(), users.len());
    }
    age(&app, 1, 1).await;
    wait_until_swept(&app, 1, 1).await;
    assert_eq!(
        app.history(1, 2).await,
        users,
        "a round that ended now is kept"
    );
    let run = app.get_run(1, Some(1)).await.expect("the run is kept");
    assert_eq!(run.sent_count, users.len() as i64);
    assert_eq!(run.last_sent_user_id, Some(2_500));
    let metrics = app.scrape().await;
    assert_eq!(
        metrics.get("restock_history_deleted_total"),
        Some(&2_500.0),
        "{metrics:#?}"
    );
    // Resuming after a notification of the swept round: OUT_OF_RANGE, saying what to do.
    let resumed = app
        .client
        .clone()
        .subscribe(SubscribeRequest {
            resume_after: Some("1-1-5".into()),
            ..Default::default()
        })
        .await;
    let status = match resumed {
        Err(status) => status,
        Ok(stream) => match stream.into_inner().next().await {
            Some(Err(status)) => status,
            other => panic!("a resume into swept history went on: {other:?}"),
        },
    };
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("resume_after"), "{status:?}");
}

crate::on_each_backend!(the_sweep_deletes_old_rounds_history_and_keeps_the_runs);

/// A run at 500/s beside a sweep of 20,000 old rows: the run keeps its exact history
/// and never goes above the limit, and the sweep finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_at_full_rate_beside_a_sweep_of_many_rows_keeps_its_pace() {
    // The old round, made fast by an instance without a rate worth the name.
    let fast = spawn_app_with(Options {
        send_rate: 100_000,
        ..Options::new(Backend::MySql)
    })
    .await;
    let old: Vec<i64> = (1..=20_000).collect();
    fast.set_stock(1, 10).await;
    fast.register_bulk(1, &old).await;
    fast.trigger(1, None).await.unwrap();
    assert_eq!(
        fast.wait_until_final(1).await.status(),
        RunStatus::Completed
    );
    age(&fast, 1, 1).await;
    let (database, prefix) = fast.shut_down().await;

    let app = spawn_app_with(Options {
        send_rate: 500,
        history_retention: Some(Duration::from_secs(3_600)),
        database: Some(database),
        redis_prefix: Some(prefix),
        ..Options::new(Backend::MySql)
    })
    .await;
    let users: Vec<i64> = (1..=1_500).collect();
    app.set_stock(2, 10).await;
    app.register_bulk(2, &users).await;
    app.trigger(2, None).await.unwrap();
    assert_eq!(app.wait_until_final(2).await.status(), RunStatus::Completed);
    assert_eq!(app.history(2, 1).await, users);
    wait_until_swept(&app, 1, 1).await;
    // Product 1's old round is gone: round 1's sends are product 2's.
    let busiest = busiest_second(&sent_times(&app, Some(1)).await);
    assert!(busiest <= 500, "busiest 1 s window held {busiest} sends");
}
