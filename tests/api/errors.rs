//! Every invalid input and unknown thing gets its status code.

use restock_notifier::grpc::proto::{self, SubscribeRequest};
use tonic::Code;

use crate::helpers::*;

async fn invalid_arguments_are_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut c = app.client.clone();
    for (product, stock) in [(0, 1), (-1, 1), (1, -1)] {
        assert_code(
            c.set_stock(proto::SetStockRequest {
                product_id: product,
                stock,
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
        );
    }
    for (product, user) in [(0, 1), (1, 0), (-5, -5)] {
        assert_code(
            c.register_alert(proto::RegisterAlertRequest {
                product_id: product,
                user_id: user,
                once: false,
            })
            .await,
            Code::InvalidArgument,
        );
        assert_code(
            c.cancel_alert(proto::CancelAlertRequest {
                product_id: product,
                user_id: user,
            })
            .await,
            Code::InvalidArgument,
        );
    }
    assert_code(app.trigger(0, None).await, Code::InvalidArgument);
    assert_code(app.trigger(1, Some(-3)).await, Code::InvalidArgument);
    assert_code(app.get_run(0, None).await, Code::InvalidArgument);
    assert_code(app.get_run(1, Some(0)).await, Code::InvalidArgument);
    for bad in [
        SubscribeRequest {
            user_id: Some(0),
            ..Default::default()
        },
        SubscribeRequest {
            product_id: Some(-1),
            ..Default::default()
        },
        SubscribeRequest {
            resume_after: Some("not-an-id".into()),
            ..Default::default()
        },
    ] {
        assert_code(c.subscribe(bad).await, Code::InvalidArgument);
    }
    // Nothing was created by the refused calls.
    let products: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM product")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(products, 0);
}

async fn unknown_products_rounds_and_alerts_are_not_found(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut c = app.client.clone();
    assert_code(
        c.register_alert(proto::RegisterAlertRequest {
            product_id: 9,
            user_id: 1,
            once: false,
        })
        .await,
        Code::NotFound,
    );
    assert_code(
        c.cancel_alert(proto::CancelAlertRequest {
            product_id: 9,
            user_id: 1,
        })
        .await,
        Code::NotFound,
    );
    assert_code(app.trigger(9, None).await, Code::NotFound);
    assert_code(app.get_run(9, None).await, Code::NotFound);
    app.set_stock(9, 1).await;
    assert_code(app.get_run(9, None).await, Code::NotFound);
    assert_code(
        c.cancel_alert(proto::CancelAlertRequest {
            product_id: 9,
            user_id: 1,
        })
        .await,
        Code::NotFound,
    );
    app.trigger(9, None).await.unwrap();
    app.wait_until_final(9).await;
    assert_code(app.get_run(9, Some(2)).await, Code::NotFound);
    assert_code(
        c.subscribe(SubscribeRequest {
            resume_after: Some("9-1-12345".into()),
            ..Default::default()
        })
        .await,
        Code::NotFound,
    );
}

async fn trigger_with_stock_zero_during_a_run_says_the_run_is_in_progress(backend: Backend) {
    let app = spawn_app_with(Options {
        send_rate: 20,
        ..Options::new(backend)
    })
    .await;
    app.set_stock(1, 5).await;
    let users: Vec<i64> = (1..=10).collect();
    app.register_bulk(1, &users).await;
    app.trigger(1, None).await.unwrap();
    let refused = app.trigger(1, Some(0)).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("run in progress"),
        "{}",
        refused.message()
    );
    // Nothing changed: the stock is still 5 and the run goes on to the end.
    let run = app.wait_until_final(1).await;
    assert_eq!(run.status(), proto::RunStatus::Completed);
    assert_eq!(run.sent_count, 10);
    let stock: i64 = sqlx::query_scalar("SELECT stock FROM product WHERE id = 1")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(stock, 5);
}

async fn the_restock_round_refuses_to_wrap(backend: Backend) {
    let app = spawn_app(backend).await;
    app.set_stock(1, 5).await;
    sqlx::query("UPDATE product SET restock_round = ? WHERE id = 1")
        .bind(i64::MAX)
        .execute(&app.db)
        .await
        .unwrap();
    let refused = app.trigger(1, None).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("every restock round"),
        "{}",
        refused.message()
    );
    let (round, runs): (i64, i64) = sqlx::query_as(
        "SELECT restock_round, (SELECT COUNT(*) FROM product_notification_history) \
         FROM product WHERE id = 1",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!((round, runs), (i64::MAX, 0));
}

/// A 200 kB `resume_after` is refused with a message of bounded size.
async fn an_oversized_input_gets_a_short_message(backend: Backend) {
    let app = spawn_app(backend).await;
    let huge = "9".repeat(200_000);
    let refused = app
        .client
        .clone()
        .subscribe(SubscribeRequest {
            resume_after: Some(huge),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().len() < 400, "{}", refused.message().len());
}

on_each_backend!(
    invalid_arguments_are_refused,
    unknown_products_rounds_and_alerts_are_not_found,
    trigger_with_stock_zero_during_a_run_says_the_run_is_in_progress,
    the_restock_round_refuses_to_wrap,
    an_oversized_input_gets_a_short_message,
);

/// A call with a 16 kB header is answered on its own; the other calls on the same
/// HTTP/2 connection go on (the library default closed the connection for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_header_does_not_drop_the_connection_it_came_on() {
    let app = spawn_app(Backend::Embedded).await;
    app.set_stock(1, 5).await;
    app.register(1, 7).await;
    // A stream held open on the connection the large call will use.
    let mut stream = app.subscribe_to_product(1).await;
    let mut large = tonic::Request::new(proto::GetRestockRunRequest {
        product_id: 1,
        restock_round: None,
    });
    large
        .metadata_mut()
        .insert("x-large", "a".repeat(16_384).parse().unwrap());
    let answer = app.client.clone().get_restock_run(large).await;
    assert_code(answer, Code::NotFound);
    app.trigger(1, None).await.unwrap();
    let got = take(&mut stream, 1).await;
    assert_eq!(got[0].user_id, 7, "the stream on that connection goes on");
}
