//! A product's threshold for alerts (`SetStock.min_stock`): below it the product counts
//! as sold out, for triggers and for runs under way (G3). The same rule on another
//! instance is in `cluster.rs`.

use restock_notifier::grpc::proto::{self, RunStatus};
use tonic::Code;

use crate::helpers::*;
use crate::waves::{trigger_waves, waiting_after};

async fn get_product(app: &TestApp, id: i64) -> proto::Product {
    app.client
        .clone()
        .get_product(proto::GetProductRequest { product_id: id })
        .await
        .expect("GetProduct")
        .into_inner()
}

async fn min_stock_is_kept_until_set_again_and_bad_values_change_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    assert_eq!(app.set_stock(1, 5).await.min_stock, 1, "a new product's");
    let set = app.set_stock_with(1, 5, Some(3)).await.unwrap();
    assert_eq!((set.stock, set.min_stock), (5, 3));
    let kept = app.set_stock(1, 2).await;
    assert_eq!((kept.stock, kept.min_stock), (2, 3), "unset keeps it");
    for bad in [0, -1, i64::MIN] {
        let refused = app.set_stock_with(1, 9, Some(bad)).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "min_stock {bad}");
    }
    let product = get_product(&app, 1).await;
    assert_eq!((product.stock, product.min_stock), (2, 3));
    let created = app.set_stock_with(2, 0, Some(10)).await.unwrap();
    assert_eq!(
        (created.stock, created.min_stock),
        (0, 10),
        "set on creation"
    );
}

async fn a_trigger_below_min_stock_is_refused_and_changes_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    app.set_stock_with(1, 4, Some(5)).await.unwrap();
    app.register(1, 7).await;
    let refused = app.trigger(1, None).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let refused = app.trigger(1, Some(3)).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let product = get_product(&app, 1).await;
    assert_eq!(
        (product.stock, product.restock_round),
        (4, 0),
        "neither the stock nor the round moved"
    );
    // At the threshold, the product is in stock.
    let run = app.trigger(1, Some(5)).await.unwrap();
    assert_eq!(run.restock_round, 1);
    assert_eq!(app.wait_until_final(1).await.status(), RunStatus::Completed);
    assert_eq!(app.history(1, 1).await, vec![7]);
}

async fn a_run_stops_sold_out_once_the_stock_drops_below_min_stock(backend: Backend) {
    let app = spawn_app_with(Options {
        send_rate: 400,
        ..Options::new(backend)
    })
    .await;
    let users: Vec<i64> = (1..=2_000).collect();
    app.set_stock_with(1, 10, Some(5)).await.unwrap();
    app.register_bulk(1, &users).await;
    let mut watch = app.subscribe_to_product(1).await;
    app.trigger(1, None).await.unwrap();
    take(&mut watch, 20).await;
    // Stock left, but below the threshold.
    app.set_stock(1, 4).await;
    let run = app.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::CanceledBySoldOut);
    let history = app.history(1, 1).await;
    assert!(history.len() >= 20 && history.len() < users.len());
    assert_eq!(history, users[..history.len()]);
    // A trigger is refused until the stock reaches the threshold again.
    let refused = app.trigger(1, None).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
}

async fn a_wave_that_starts_below_min_stock_ends_the_run(backend: Backend) {
    let app = spawn_app(backend).await;
    let users: Vec<i64> = (1..=10).collect();
    app.set_stock_with(1, 2, Some(2)).await.unwrap();
    app.register_bulk(1, &users).await;
    trigger_waves(&app, 1, 1, 1).await.expect("TriggerRestock");
    waiting_after(&app, 1, 2).await;
    // One unit left during the wait: stock, but below the threshold.
    app.set_stock(1, 1).await;
    let run = app.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::CanceledBySoldOut);
    assert_eq!(app.history(1, 1).await, users[..2]);
}

on_each_backend!(
    min_stock_is_kept_until_set_again_and_bad_values_change_nothing,
    a_trigger_below_min_stock_is_refused_and_changes_nothing,
    a_run_stops_sold_out_once_the_stock_drops_below_min_stock,
    a_wave_that_starts_below_min_stock_ends_the_run,
);
