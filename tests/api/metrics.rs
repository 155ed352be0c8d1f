//! `/metrics`: the names the README's Operations section lists, and that they count
//! what happens.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt as _;
use restock_notifier::grpc::proto::{RunStatus, SubscribeRequest};
use tonic::Code;

use crate::helpers::{Backend, Options, TestApp, assert_code, poll_until, spawn_app_with};

fn value(m: &HashMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

fn delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, key: &str) -> f64 {
    value(after, key) - value(before, key)
}

const TRIGGER_OK: &str = r#"grpc_server_handled_total{grpc_service="restock.v1.RestockService",grpc_method="TriggerRestock",grpc_code="OK"}"#;
const GET_NOT_FOUND: &str = r#"grpc_server_handled_total{grpc_service="restock.v1.RestockService",grpc_method="GetRestockRun",grpc_code="NotFound"}"#;
const SUBSCRIBE_CANCELED: &str = r#"grpc_server_handled_total{grpc_service="restock.v1.RestockService",grpc_method="Subscribe",grpc_code="Canceled"}"#;
const COMPLETED: &str = r#"restock_runs_finished_total{status="completed"}"#;
const SOLD_OUT: &str = r#"restock_runs_finished_total{status="canceled_by_sold_out"}"#;

/// Polls `/metrics` until `check` holds, for at most 10 s.
async fn eventually(app: &TestApp, what: &str, check: impl Fn(&HashMap<String, f64>) -> bool) {
    let check = &check;
    poll_until(Duration::from_secs(10), what, || async move {
        let m = app.scrape().await;
        if check(&m) { Ok(()) } else { Err(m) }
    })
    .await;
}

async fn a_run_shows_in_the_metrics(backend: Backend) {
    let app = spawn_app_with(Options {
        send_rate: 200,
        ..Options::new(backend)
    })
    .await;
    app.set_stock(1, 5).await;
    let users: Vec<i64> = (1..=60).collect();
    app.register_bulk(1, &users).await;
    let before = app.scrape().await;
    assert_eq!(value(&before, "restock_send_rate_limit"), 200.0);
    assert_eq!(value(&before, "restock_subscribers"), 0.0);

    let mut stream = app.subscribe(SubscribeRequest::default()).await;
    eventually(&app, "the open stream counted", |m| {
        value(m, "restock_subscribers") == 1.0
    })
    .await;
    assert_code(app.get_run(1, None).await, Code::NotFound);
    app.trigger(1, None).await.expect("TriggerRestock");
    eventually(&app, "the run counted as in progress", |m| {
        value(m, "restock_runs_in_progress") == 1.0
    })
    .await;
    for _ in 0..60 {
        stream.next().await.expect("a notification").unwrap();
    }
    let run = app.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::Completed);
    drop(stream);

    eventually(&app, "the run and the stream gone", |m| {
        value(m, "restock_runs_in_progress") == 0.0 && value(m, "restock_subscribers") == 0.0
    })
    .await;
    let after = app.scrape().await;
    assert_eq!(
        delta(&before, &after, "restock_notifications_sent_total"),
        60.0
    );
    assert_eq!(delta(&before, &after, COMPLETED), 1.0);
    assert_eq!(delta(&before, &after, SOLD_OUT), 0.0);
    assert_eq!(delta(&before, &after, TRIGGER_OK), 1.0);
    assert_eq!(delta(&before, &after, GET_NOT_FOUND), 1.0);
    assert_eq!(delta(&before, &after, SUBSCRIBE_CANCELED), 1.0);
    assert_eq!(value(&after, "restock_unrecorded_sends"), 0.0);
    assert!(value(&after, "restock_record_batch_seconds_count") >= 1.0);
    assert!(
        value(
            &after,
            r#"grpc_server_handling_seconds_count{grpc_service="restock.v1.RestockService",grpc_method="TriggerRestock"}"#
        ) >= 1.0
    );
}

async fn a_sold_out_run_and_the_endpoint(backend: Backend) {
    let app = spawn_app_with(Options {
        send_rate: 20,
        ..Options::new(backend)
    })
    .await;
    app.set_stock(1, 5).await;
    let users: Vec<i64> = (1..=200).collect();
    app.register_bulk(1, &users).await;
    let before = app.scrape().await;
    app.trigger(1, None).await.expect("TriggerRestock");
    eventually(&app, "some sent", |m| {
        value(m, "restock_notifications_sent_total") >= 3.0
    })
    .await;
    app.set_stock(1, 0).await;
    assert_eq!(
        app.wait_until_final(1).await.status(),
        RunStatus::CanceledBySoldOut
    );
    eventually(&app, "the sold-out run counted", |m| {
        delta(&before, m, SOLD_OUT) == 1.0 && value(m, "restock_runs_in_progress") == 0.0
    })
    .await;

    let (head, _) = app.get_metrics_page("/metrics").await;
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let (head, _) = app.get_metrics_page("/elsewhere").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    // A method nobody serves counts under `unknown`, never under a name the caller made up.
    let mut grpc = tonic::client::Grpc::new(app.channel.clone());
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/restock.v1.RestockService/MadeUp");
    let answer: Result<tonic::Response<()>, _> = grpc
        .unary(
            tonic::Request::new(()),
            path,
            tonic_prost::ProstCodec::<(), ()>::default(),
        )
        .await;
    assert_code(answer, Code::Unimplemented);
    let m = app.scrape().await;
    assert!(!m.keys().any(|k| k.contains("MadeUp")), "{m:#?}");
    assert_eq!(
        value(
            &m,
            r#"grpc_server_handled_total{grpc_service="unknown",grpc_method="unknown",grpc_code="Unimplemented"}"#
        ),
        1.0
    );
}

on_each_backend!(a_run_shows_in_the_metrics, a_sold_out_run_and_the_endpoint);
