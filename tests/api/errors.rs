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

on_each_backend!(
    invalid_arguments_are_refused,
    unknown_products_rounds_and_alerts_are_not_found,
);
