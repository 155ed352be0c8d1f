//! `TriggerRestock` with an `idempotency_key`: a retry returns the run the key started
//! and changes nothing; a refused call does not use up its key; keys expire.

use std::time::Duration;

use restock_notifier::grpc::proto::{self, RunStatus};
use tonic::{Code, Status};

use crate::helpers::*;

async fn trigger_with_key(
    app: &TestApp,
    product: i64,
    stock: Option<i64>,
    key: &str,
) -> Result<proto::RestockRun, Status> {
    app.client
        .clone()
        .trigger_restock(proto::TriggerRestockRequest {
            product_id: product,
            stock,
            idempotency_key: Some(key.to_string()),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

async fn stock(app: &TestApp, product: i64) -> i64 {
    sqlx::query_scalar("SELECT stock FROM product WHERE id = ?")
        .bind(product)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

/// The round a stored key points at, if the key is stored.
async fn stored_key(app: &TestApp, product: i64, key: &str) -> Option<i64> {
    sqlx::query_scalar(
        "SELECT restock_round FROM trigger_idempotency_key \
         WHERE product_id = ? AND idempotency_key = ?",
    )
    .bind(product)
    .bind(key)
    .fetch_optional(&app.db)
    .await
    .unwrap()
}

/// Moves a stored key's creation 25 hours back, past its 24 hours.
async fn age_key(app: &TestApp, product: i64, key: &str) {
    let sql = match app.backend {
        Backend::MySql => {
            "UPDATE trigger_idempotency_key SET created_at = created_at - INTERVAL 25 HOUR \
             WHERE product_id = ? AND idempotency_key = ?"
        }
        // Unix microseconds.
        Backend::Embedded => {
            "UPDATE trigger_idempotency_key SET created_at = created_at - 90000000000 \
             WHERE product_id = ? AND idempotency_key = ?"
        }
    };
    let done = sqlx::query(sql)
        .bind(product)
        .bind(key)
        .execute(&app.db)
        .await
        .unwrap();
    assert_eq!(done.rows_affected(), 1, "key {key:?} of product {product}");
}

async fn a_retry_during_the_run_returns_its_round_and_starts_nothing(backend: Backend) {
    // Slow enough that the run is in progress throughout.
    let app = spawn_app_with(Options {
        send_rate: 20,
        ..Options::new(backend)
    })
    .await;
    app.set_stock(1, 5).await;
    app.register_bulk(1, &(1..=100).collect::<Vec<_>>()).await;

    let first = trigger_with_key(&app, 1, None, "order-1").await.unwrap();
    assert_eq!(
        (first.restock_round, first.status()),
        (1, RunStatus::InProgress)
    );
    let retry = trigger_with_key(&app, 1, None, "order-1").await.unwrap();
    assert_eq!(
        (retry.restock_round, retry.status(), retry.started_at),
        (1, RunStatus::InProgress, first.started_at)
    );
    // A retry that carries `stock: 0` neither writes it nor stops the run.
    let retry = trigger_with_key(&app, 1, Some(0), "order-1").await.unwrap();
    assert_eq!(
        (retry.restock_round, retry.status()),
        (1, RunStatus::InProgress)
    );
    assert_eq!(stock(&app, 1).await, 5);

    assert_eq!(app.product_round(1).await, 1);
    assert_eq!(app.run_count(1).await, 1);
    assert_eq!(stored_key(&app, 1, "order-1").await, Some(1));
    let run = app.get_run(1, None).await.unwrap();
    assert_eq!(
        (run.restock_round, run.status()),
        (1, RunStatus::InProgress)
    );
}

async fn a_retry_after_the_run_ended_returns_the_finished_run_and_changes_nothing(
    backend: Backend,
) {
    let app = spawn_app(backend).await;
    app.set_stock(2, 5).await;
    for user in [4, 8, 6] {
        app.register(2, user).await;
    }
    let first = trigger_with_key(&app, 2, None, "restock-2-a")
        .await
        .unwrap();
    assert_eq!(first.restock_round, 1);
    let finished = app.wait_until_final(2).await;
    assert_eq!(
        (finished.status(), finished.sent_count),
        (RunStatus::Completed, 3)
    );

    // The finished run, as it is, whatever the retry carries.
    for retry_stock in [None, Some(0), Some(9)] {
        let retry = trigger_with_key(&app, 2, retry_stock, "restock-2-a")
            .await
            .unwrap();
        assert_eq!(retry, finished, "retry with stock {retry_stock:?}");
        assert_eq!(stock(&app, 2).await, 5, "retry with stock {retry_stock:?}");
    }

    // Sold out since: the retry still gets its run, and the stock stays 0.
    app.set_stock(2, 0).await;
    let retry = trigger_with_key(&app, 2, None, "restock-2-a")
        .await
        .unwrap();
    assert_eq!(retry, finished);
    assert_eq!(stock(&app, 2).await, 0);
    assert_eq!(app.product_round(2).await, 1);
    assert_eq!(app.run_count(2).await, 1);
    assert_eq!(app.history(2, 1).await, vec![4, 8, 6]);
    // Without the key, the call is a new one, refused as ever.
    assert_code(app.trigger(2, None).await, Code::FailedPrecondition);

    // A key belongs to one product: the same key starts another product's run.
    app.set_stock(3, 1).await;
    let other = trigger_with_key(&app, 3, None, "restock-2-a")
        .await
        .unwrap();
    assert_eq!((other.product_id, other.restock_round), (3, 1));
    assert_eq!(app.run_count(3).await, 1);
}

async fn a_refused_call_does_not_use_up_its_key(backend: Backend) {
    let app = spawn_app_with(Options {
        send_rate: 20,
        ..Options::new(backend)
    })
    .await;
    app.set_stock(4, 5).await;
    app.register_bulk(4, &(1..=20).collect::<Vec<_>>()).await;

    trigger_with_key(&app, 4, None, "first").await.unwrap();
    // Another key during the run is refused as without a key, and not stored.
    assert_code(
        trigger_with_key(&app, 4, None, "second").await,
        Code::FailedPrecondition,
    );
    assert_eq!(stored_key(&app, 4, "second").await, None);
    assert_eq!(app.wait_until_final(4).await.status(), RunStatus::Completed);

    // So once the run is over, that key starts the next round.
    let second = trigger_with_key(&app, 4, None, "second").await.unwrap();
    assert_eq!(second.restock_round, 2);
    assert_eq!(stored_key(&app, 4, "second").await, Some(2));
    app.wait_until_final(4).await;

    // Refused for want of stock: the key is still free.
    assert_code(
        trigger_with_key(&app, 4, Some(0), "third").await,
        Code::FailedPrecondition,
    );
    assert_eq!(stored_key(&app, 4, "third").await, None);
    let third = trigger_with_key(&app, 4, Some(3), "third").await.unwrap();
    assert_eq!(third.restock_round, 3);
    assert_eq!(app.product_round(4).await, 3);
    assert_eq!(app.run_count(4).await, 3);
}

async fn concurrent_calls_with_one_key_start_one_run_and_all_get_it(backend: Backend) {
    let app = spawn_app_with(Options {
        send_rate: 20,
        ..Options::new(backend)
    })
    .await;
    app.set_stock(5, 5).await;
    app.register_bulk(5, &(1..=100).collect::<Vec<_>>()).await;

    // A product that exists, and one the calls create with their stock.
    for product in [5, 6] {
        let calls = (0..10).map(|_| trigger_with_key(&app, product, Some(5), "burst"));
        let results = futures::future::join_all(calls).await;
        for result in &results {
            let run = result.as_ref().expect("every call answers OK");
            assert_eq!((run.product_id, run.restock_round), (product, 1));
        }
        assert_eq!(app.product_round(product).await, 1);
        assert_eq!(app.run_count(product).await, 1);
        assert_eq!(stored_key(&app, product, "burst").await, Some(1));
    }
    assert_eq!(
        app.get_run(5, None).await.unwrap().status(),
        RunStatus::InProgress
    );
}

async fn a_key_that_is_empty_or_longer_than_255_bytes_is_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    app.set_stock(7, 5).await;

    let long = "x".repeat(300);
    // 128 two-byte characters: 128 characters, 256 bytes.
    let long_in_bytes = "é".repeat(128);
    for key in [long.as_str(), long_in_bytes.as_str(), ""] {
        let status = trigger_with_key(&app, 7, Some(9), key).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        // Never more than 64 bytes of the key quoted back.
        assert!(!status.message().contains(&"x".repeat(65)), "{status:?}");
        assert!(!status.message().contains(&"é".repeat(33)), "{status:?}");
        assert!(status.message().len() < 400, "{status:?}");
    }
    assert_eq!(app.product_round(7).await, 0);
    assert_eq!(stock(&app, 7).await, 5);

    // 255 bytes is the most.
    let longest = "é".repeat(127) + "a";
    let run = trigger_with_key(&app, 7, None, &longest).await.unwrap();
    assert_eq!(run.restock_round, 1);
    assert_eq!(stored_key(&app, 7, &longest).await, Some(1));
}

async fn an_expired_key_is_new_and_expired_keys_are_deleted(backend: Backend) {
    let app = spawn_app(backend).await;
    app.set_stock(8, 5).await;
    app.register(8, 1).await;
    app.register(8, 2).await;

    trigger_with_key(&app, 8, None, "daily").await.unwrap();
    app.wait_until_final(8).await;
    age_key(&app, 8, "daily").await;
    // More than 24 hours old: a new call, which starts round 2 and keeps the key for it.
    let again = trigger_with_key(&app, 8, None, "daily").await.unwrap();
    assert_eq!(again.restock_round, 2);
    assert_eq!(stored_key(&app, 8, "daily").await, Some(2));
    let finished = app.wait_until_final(8).await;
    assert_eq!(
        trigger_with_key(&app, 8, None, "daily").await.unwrap(),
        finished
    );

    // The sweep deletes expired keys and keeps live ones.
    trigger_with_key(&app, 8, None, "fresh").await.unwrap();
    app.wait_until_final(8).await;
    age_key(&app, 8, "daily").await;
    let swept = &app;
    poll_until(
        Duration::from_secs(15),
        "the expired key is deleted",
        || async move {
            match stored_key(swept, 8, "daily").await {
                None => Ok(()),
                Some(round) => Err(round),
            }
        },
    )
    .await;
    assert_eq!(stored_key(&app, 8, "fresh").await, Some(3));
    assert_eq!(app.run_count(8).await, 3);
}

on_each_backend!(
    a_retry_during_the_run_returns_its_round_and_starts_nothing,
    a_retry_after_the_run_ended_returns_the_finished_run_and_changes_nothing,
    a_refused_call_does_not_use_up_its_key,
    concurrent_calls_with_one_key_start_one_run_and_all_get_it,
    a_key_that_is_empty_or_longer_than_255_bytes_is_refused,
    an_expired_key_is_new_and_expired_keys_are_deleted,
);

/// Retries of one call land on different instances (a load balancer): one run, and
/// every instance answers with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_with_one_key_on_two_instances_start_one_run() {
    let apps = crate::cluster::spawn_cluster(
        2,
        Options {
            send_rate: 20,
            ..Options::new(Backend::MySql)
        },
    )
    .await;
    apps[0].set_stock(5, 5).await;
    apps[0]
        .register_bulk(5, &(1..=100).collect::<Vec<_>>())
        .await;
    let calls = (0..10).map(|i| trigger_with_key(&apps[i % 2], 5, None, "across"));
    for result in futures::future::join_all(calls).await {
        let run = result.expect("every call answers OK");
        assert_eq!((run.product_id, run.restock_round), (5, 1));
    }
    assert_eq!(apps[1].product_round(5).await, 1);
    assert_eq!(apps[1].run_count(5).await, 1);
    // A retry after the run ended, on the other instance, still gets round 1.
    apps[1].set_stock(5, 0).await;
    apps[0].wait_until_final(5).await;
    let retried = trigger_with_key(&apps[1], 5, None, "across").await.unwrap();
    assert_eq!(retried.restock_round, 1);
    assert_eq!(retried.status(), RunStatus::CanceledBySoldOut);
}
