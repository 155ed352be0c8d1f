//! Runs from trigger to final state: order, stock, concurrency.

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt as _;
use restock_notifier::grpc::proto::RunStatus;
use tonic::Code;

use crate::helpers::*;

async fn users_are_notified_in_registration_order_and_round_two_notifies_them_again(
    backend: Backend,
) {
    let app = spawn_app(backend).await;
    app.set_stock(1, 10).await;
    // Registration order differs from id order on purpose.
    for user in [50, 20, 90, 10, 70] {
        app.register(1, user).await;
    }
    app.cancel(1, 90).await;
    // Registering again while active keeps the place; cancel + register goes to the back.
    app.register(1, 50).await;
    app.cancel(1, 20).await;
    app.register(1, 20).await;
    let expected = vec![50, 10, 70, 20];

    let mut stream = app.subscribe_to_product(1).await;
    let run = app.trigger(1, None).await.unwrap();
    assert_eq!(run.restock_round, 1);
    assert_eq!(run.status(), RunStatus::InProgress);

    let received = take(&mut stream, expected.len()).await;
    let run = app.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::Completed);
    assert_eq!(run.sent_count, 4);
    assert_eq!(run.last_sent_user_id, Some(20));
    assert_eq!(app.history(1, 1).await, expected);
    assert_eq!(app.run_row(1, 1).await, ("COMPLETED".into(), Some(20), 4));
    assert_eq!(
        received.iter().map(|n| n.user_id).collect::<Vec<_>>(),
        expected
    );
    assert_eq!(received[0].notification_id, "1-1-50");
    assert!(
        received
            .iter()
            .all(|n| n.product_id == 1 && n.restock_round == 1)
    );

    let run = app.trigger(1, None).await.unwrap();
    assert_eq!(run.restock_round, 2);
    let received = take(&mut stream, expected.len()).await;
    let run = app.wait_until_final(1).await;
    assert_eq!(
        (run.status(), run.restock_round, run.sent_count),
        (RunStatus::Completed, 2, 4)
    );
    assert_eq!(app.history(1, 2).await, expected);
    assert_eq!(
        received.iter().map(|n| n.user_id).collect::<Vec<_>>(),
        expected
    );
    assert_eq!(received[3].notification_id, "1-2-20");
    // Round 1 is still readable by number.
    assert_eq!(app.get_run(1, Some(1)).await.unwrap().restock_round, 1);
}

async fn trigger_with_no_stock_is_refused_and_changes_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    app.set_stock(3, 0).await;
    app.register(3, 1).await;

    assert_code(app.trigger(3, None).await, Code::FailedPrecondition);
    assert_code(app.trigger(3, Some(0)).await, Code::FailedPrecondition);
    assert_eq!(app.product_round(3).await, 0);
    assert_eq!(app.run_count(3).await, 0);
    assert_code(app.get_run(3, None).await, Code::NotFound);

    // `stock` in the request is written first, then checked.
    let run = app.trigger(3, Some(7)).await.unwrap();
    assert_eq!(run.restock_round, 1);
    assert_eq!(app.wait_until_final(3).await.status(), RunStatus::Completed);
    assert_eq!(app.set_stock(3, 7).await.restock_round, 1);

    // A refused trigger with a stock leaves the stock as it was.
    app.set_stock(3, 0).await;
    assert_code(app.trigger(3, Some(0)).await, Code::FailedPrecondition);
    let stock: i64 = sqlx::query_scalar("SELECT stock FROM product WHERE id = 3")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(stock, 0);
    assert_eq!(app.product_round(3).await, 1);
}

async fn trigger_with_stock_creates_an_unknown_product(backend: Backend) {
    let app = spawn_app(backend).await;
    let run = app.trigger(8, Some(2)).await.unwrap();
    assert_eq!(run.restock_round, 1);
    let run = app.wait_until_final(8).await;
    assert_eq!(
        (run.status(), run.sent_count, run.last_sent_user_id),
        (RunStatus::Completed, 0, None)
    );
}

async fn an_empty_alert_list_completes_with_nothing_sent(backend: Backend) {
    let app = spawn_app(backend).await;
    app.set_stock(4, 1).await;
    app.register(4, 1).await;
    app.cancel(4, 1).await;
    app.trigger(4, None).await.unwrap();
    let run = app.wait_until_final(4).await;
    assert_eq!(run.status(), RunStatus::Completed);
    assert_eq!(run.sent_count, 0);
    assert_eq!(run.last_sent_user_id, None);
    assert!(app.history(4, 1).await.is_empty());
}

async fn selling_out_mid_run_stops_at_an_exact_prefix(backend: Backend) {
    // Slow enough that the run is still going when the stock drops.
    let app = spawn_app_with(Options {
        send_rate: 400,
        ..Options::new(backend)
    })
    .await;
    let users: Vec<i64> = (1..=2_000).rev().collect();
    app.set_stock(5, 100).await;
    app.register_bulk(5, &users).await;

    let mut stream = app.subscribe_to_product(5).await;
    app.trigger(5, None).await.unwrap();
    let before = take(&mut stream, 50).await;
    app.set_stock(5, 0).await;
    let sold_out_at = Utc::now();

    let run = app.wait_until_final(5).await;
    assert_eq!(run.status(), RunStatus::CanceledBySoldOut);
    let history = app.history(5, 1).await;
    assert!(history.len() >= before.len() && history.len() < users.len());
    assert_eq!(
        history,
        users[..history.len()],
        "history is the registration-order prefix"
    );
    assert_eq!(run.last_sent_user_id, history.last().copied());
    assert_eq!(run.sent_count, history.len() as i64);

    // The stream saw exactly the recorded prefix, every one sent before SetStock(0)
    // returned, and nothing after.
    let mut streamed = before;
    while streamed.len() < history.len() {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        streamed.push(n);
    }
    let streamed_users: Vec<i64> = streamed.iter().map(|n| n.user_id).collect();
    assert_eq!(streamed_users, history);
    for n in &streamed {
        let at = n.sent_at.unwrap();
        let at = chrono::DateTime::from_timestamp(at.seconds, at.nanos as u32).unwrap();
        assert!(
            at <= sold_out_at,
            "{} sent after SetStock(0) returned",
            n.notification_id
        );
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream.next())
            .await
            .is_err()
    );

    assert_code(
        app.manual_restock(5, Some(ADMIN_TOKEN)).await,
        Code::FailedPrecondition,
    );
}

async fn of_twenty_concurrent_triggers_exactly_one_wins(backend: Backend) {
    let app = spawn_app_with(Options {
        send_rate: 50,
        ..Options::new(backend)
    })
    .await;
    app.set_stock(6, 5).await;
    app.register_bulk(6, &(1..=500).collect::<Vec<_>>()).await;

    let calls = (0..20).map(|_| {
        let app = &app;
        async move { app.trigger(6, None).await }
    });
    let results = futures::future::join_all(calls).await;
    let wins: Vec<_> = results.iter().filter(|r| r.is_ok()).collect();
    assert_eq!(wins.len(), 1, "{results:?}");
    for result in &results {
        if let Err(status) = result {
            assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        }
    }
    assert_eq!(app.product_round(6).await, 1);
    assert_eq!(app.run_count(6).await, 1);
    // And while it runs, a further trigger is refused too.
    assert_code(app.trigger(6, None).await, Code::FailedPrecondition);
    assert_code(
        app.manual_restock(6, Some(ADMIN_TOKEN)).await,
        Code::FailedPrecondition,
    );
}

async fn a_user_who_re_registers_during_a_run_is_not_notified_twice(backend: Backend) {
    let app = spawn_app_with(Options {
        send_rate: 200,
        ..Options::new(backend)
    })
    .await;
    app.set_stock(7, 5).await;
    app.register_bulk(7, &(1..=100).collect::<Vec<_>>()).await;
    let mut stream = app.subscribe_to_product(7).await;
    app.trigger(7, None).await.unwrap();
    take(&mut stream, 10).await;
    // User 1 was notified; moving to the back must not notify them again this round.
    app.cancel(7, 1).await;
    app.register(7, 1).await;
    let run = app.wait_until_final(7).await;
    assert_eq!(run.status(), RunStatus::Completed);
    let history = app.history(7, 1).await;
    assert_eq!(history.len(), 100);
    assert_eq!(history.iter().collect::<HashSet<_>>().len(), 100);
}

/// At a high rate the sends run ahead of the commits (up to ten batches unrecorded),
/// transactions take whole batches, and the queue up to where it ended at the start
/// of the round is read without the history probe: still every user once, in order,
/// including one who registered during the run, and not the one who registered again.
async fn a_fast_run_records_every_user_once_in_registration_order(backend: Backend) {
    let app = spawn_app_with(Options {
        send_rate: 50_000,
        ..Options::new(backend)
    })
    .await;
    // Not a whole number of pages: the page that reaches the end of the queue as it
    // was would reach past it too.
    let users: Vec<i64> = (1..=50_500).collect();
    app.set_stock(8, 5).await;
    app.register_bulk(8, &users).await;
    let mut stream = app.subscribe_to_product(8).await;
    app.trigger(8, None).await.unwrap();
    take(&mut stream, 100).await;
    app.cancel(8, 1).await;
    app.register(8, 1).await;
    app.register(8, 60_000).await;
    let run = app.wait_until_final(8).await;
    assert_eq!(run.status(), RunStatus::Completed);
    let mut expected = users.clone();
    expected.push(60_000);
    assert_eq!(app.history(8, 1).await, expected);
    assert_eq!(run.sent_count, 50_501);
    assert_eq!(run.last_sent_user_id, Some(60_000));
}

on_each_backend!(
    a_fast_run_records_every_user_once_in_registration_order,
    users_are_notified_in_registration_order_and_round_two_notifies_them_again,
    trigger_with_no_stock_is_refused_and_changes_nothing,
    trigger_with_stock_creates_an_unknown_product,
    an_empty_alert_list_completes_with_nothing_sent,
    selling_out_mid_run_stops_at_an_exact_prefix,
    of_twenty_concurrent_triggers_exactly_one_wins,
    a_user_who_re_registers_during_a_run_is_not_notified_twice,
);
