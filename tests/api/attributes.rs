//! `TriggerRestock.attributes`: stored with the run, returned in `RestockRun`, and
//! carried by every notification of the run, live, replayed, after a resume and on
//! another instance. The webhook body is checked in `webhook.rs`.

use std::collections::HashMap;

use futures::StreamExt as _;
use restock_notifier::grpc::proto::{self, ListRestockRunsRequest, RunStatus, SubscribeRequest};
use tonic::Code;

use crate::cluster::spawn_cluster;
use crate::helpers::*;
use crate::manual_restock::{fail_recording_of, heal};

/// What a shop sends with a restock.
pub(crate) fn shop_attributes() -> HashMap<String, String> {
    HashMap::from([
        ("name".to_string(), "Blue mug, 350 ml".to_string()),
        (
            "link".to_string(),
            "https://shop.example/p/42?utm_source=restock".to_string(),
        ),
        ("price".to_string(), "9.90 EUR".to_string()),
    ])
}

pub(crate) async fn trigger_with_attributes(
    app: &TestApp,
    product: i64,
    attributes: HashMap<String, String>,
) -> Result<proto::RestockRun, tonic::Status> {
    app.client
        .clone()
        .trigger_restock(proto::TriggerRestockRequest {
            product_id: product,
            attributes,
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn attributes_travel_with_the_run_and_every_notification(backend: Backend) {
    let app = spawn_app(backend).await;
    let users: Vec<i64> = (1..=30).collect();
    app.set_stock(1, 5).await;
    app.register_bulk(1, &users).await;
    let mut live = app.subscribe_to_product(1).await;
    let run = trigger_with_attributes(&app, 1, shop_attributes())
        .await
        .unwrap();
    assert_eq!(run.attributes, shop_attributes());
    let got = take(&mut live, users.len()).await;
    assert!(got.iter().all(|n| n.attributes == shop_attributes()));
    let run = app.wait_until_final(1).await;
    assert_eq!(run.attributes, shop_attributes(), "GetRestockRun");
    let listed = app
        .client
        .clone()
        .list_restock_runs(ListRestockRunsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.runs[0].attributes, shop_attributes());
    // Replayed from the record.
    let mut replay = app
        .subscribe(SubscribeRequest {
            product_id: Some(1),
            resume_after: Some("1-1-10".into()),
            ..Default::default()
        })
        .await;
    let replayed = take(&mut replay, 20).await;
    assert_eq!(replayed[0].user_id, 11);
    assert!(replayed.iter().all(|n| n.attributes == shop_attributes()));
    // A run without attributes carries none, next to one that has them.
    app.trigger(1, None).await.unwrap();
    let got = take(&mut live, users.len()).await;
    assert!(got.iter().all(|n| n.attributes.is_empty()));
    assert!(app.wait_until_final(1).await.attributes.is_empty());
}

async fn attributes_over_the_limits_are_refused_and_change_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    app.set_stock(1, 5).await;
    app.register(1, 7).await;
    let many: HashMap<String, String> = (0..33).map(|i| (format!("k{i}"), "v".into())).collect();
    let long_key = HashMap::from([("k".repeat(65), "v".to_string())]);
    let empty_key = HashMap::from([(String::new(), "v".to_string())]);
    let large = HashMap::from([
        ("a".to_string(), "x".repeat(4_000)),
        ("b".to_string(), "x".repeat(95)),
    ]);
    for bad in [many, long_key, empty_key, large] {
        let refused = trigger_with_attributes(&app, 1, bad.clone())
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{:?}", bad.keys());
        assert!(refused.message().len() < 300, "{}", refused.message());
    }
    assert_eq!(app.product_round(1).await, 0, "no round started");
    // At the limits exactly: accepted.
    let full: HashMap<String, String> = (0..32)
        .map(|i| (format!("{i:0>64}"), "v".repeat(63)))
        .collect();
    let run = trigger_with_attributes(&app, 1, full.clone())
        .await
        .unwrap();
    assert_eq!(run.attributes, full);
}

async fn a_resumed_run_carries_its_attributes_on(backend: Backend) {
    let app = spawn_app(backend).await;
    let users: Vec<i64> = (1..=40).collect();
    app.set_stock(1, 5).await;
    app.register_bulk(1, &users).await;
    fail_recording_of(&app, 25).await;
    trigger_with_attributes(&app, 1, shop_attributes())
        .await
        .unwrap();
    let failed = app.wait_until_final(1).await;
    assert_eq!(failed.status(), RunStatus::CanceledByError);
    heal(&app).await;
    let recorded = app.history(1, 1).await.len();
    let mut live = app.subscribe_to_product(1).await;
    let resumed = app.manual_restock(1, Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!(resumed.attributes, shop_attributes());
    let rest = take(&mut live, users.len() - recorded).await;
    assert_eq!(rest.last().map(|n| n.user_id), Some(40));
    assert!(rest.iter().all(|n| n.attributes == shop_attributes()));
    assert_eq!(app.wait_until_final(1).await.status(), RunStatus::Completed);
}

on_each_backend!(
    attributes_travel_with_the_run_and_every_notification,
    attributes_over_the_limits_are_refused_and_change_nothing,
    a_resumed_run_carries_its_attributes_on,
);

/// Through the shared bus: a subscriber on one instance gets the attributes of a run
/// on another, in every notification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_on_another_instance_gets_the_attributes() {
    let apps = spawn_cluster(2, Options::new(Backend::MySql)).await;
    let users: Vec<i64> = (1..=200).collect();
    apps[0].set_stock(1, 10).await;
    apps[0].register_bulk(1, &users).await;
    let mut on_b = apps[1].subscribe_to_product(1).await;
    trigger_with_attributes(&apps[0], 1, shop_attributes())
        .await
        .unwrap();
    let got = on_b
        .by_ref()
        .take(users.len())
        .map(|n| n.expect("a notification"))
        .collect::<Vec<_>>()
        .await;
    assert_eq!(got.len(), users.len());
    assert!(got.iter().all(|n| n.attributes == shop_attributes()));
}
