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

/// Reads one HTTP/1.1 response with a `content-length` off `conn`, leaving the
/// connection open, and returns its head.
async fn read_response(conn: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt as _;
    let mut received = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&received[..end]).into_owned();
            let length: usize = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().expect("a length"))
                })
                .expect("a content-length");
            if received.len() >= end + 4 + length {
                return head;
            }
        }
        let read = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut chunk))
            .await
            .expect("an answer within 10 s")
            .expect("reads");
        assert!(read > 0, "closed mid-answer: {received:?}");
        received.extend_from_slice(&chunk[..read]);
    }
}

/// A scraper keeps its connection alive between scrapes; stopping the service closes
/// it, rather than leaving it open for as long as the process lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_metrics_connection_is_closed_when_the_service_stops() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let app = spawn_app_with(Options::new(Backend::Embedded)).await;
    let mut conn = tokio::net::TcpStream::connect(app.metrics_addr)
        .await
        .expect("connects to /metrics");
    // Two scrapes on one connection: it is really kept alive.
    for _ in 0..2 {
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        let head = read_response(&mut conn).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }

    app.shut_down().await;
    // Closed by the server: the next read sees the end of the stream. The deadline only
    // bounds a failure; a closed connection answers at once.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest))
        .await
        .expect("the connection is closed once the service stopped");
    assert!(read.is_ok(), "{read:?}");
    assert!(rest.is_empty(), "{rest:?}");
}
