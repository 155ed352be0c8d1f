//! Graceful shutdown mid-run, then a restart that continues the run by itself (G8);
//! health turning NOT_SERVING first, so load balancers drain the instance.

use std::time::Duration;

use futures::StreamExt as _;
use restock_notifier::grpc::proto::{RunStatus, SubscribeRequest};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::*;

async fn shutdown_mid_run_releases_the_run_and_the_next_start_continues_it(backend: Backend) {
    let app = spawn_app_with(Options {
        send_rate: 500,
        ..Options::new(backend)
    })
    .await;
    let users: Vec<i64> = (1..=2_000).collect();
    app.set_stock(1, 3).await;
    app.register_bulk(1, &users).await;
    let mut stream = app.subscribe(SubscribeRequest::default()).await;
    app.trigger(1, None).await.unwrap();
    take(&mut stream, 100).await;

    let db = app.db.clone();
    let (database, prefix) = app.shut_down().await;

    // The stream was ended by the server, with a status that says how to continue.
    let end = loop {
        match stream.next().await {
            Some(Ok(_)) => continue,
            other => break other,
        }
    };
    match end {
        Some(Err(status)) => {
            let info = stream_end_info(&status, Code::Unavailable, "SHUTTING_DOWN");
            // The last one this stream delivered: the 100 read, and maybe more.
            let resume_after = info.metadata.get("resume_after").expect("resume_after");
            let user: i64 = resume_after
                .strip_prefix("1-1-")
                .expect("a notification of product 1, round 1")
                .parse()
                .unwrap();
            assert!(user >= 100, "{resume_after}");
        }
        // The connection may close before the status is read; either way it ended.
        None => {}
        other => panic!("unexpected end {other:?}"),
    }

    // The run was released, still IN_PROGRESS, with a consistent record.
    let (status, last, count): (String, Option<i64>, i64) = sqlx::query_as(
        "SELECT status, last_sent_user_id, sent_count FROM product_notification_history",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(status, "IN_PROGRESS");
    let recorded: Vec<i64> =
        sqlx::query_scalar("SELECT user_id FROM product_user_notification_history ORDER BY id")
            .fetch_all(&db)
            .await
            .unwrap();
    assert!(recorded.len() >= 100 && recorded.len() < users.len());
    assert_eq!(recorded, users[..recorded.len()]);
    assert_eq!(last, recorded.last().copied());
    assert_eq!(count, recorded.len() as i64);

    // A new process on the same database takes it over at start, with no operator
    // action, and finishes it without recording anyone twice.
    let app = spawn_app_with(Options {
        database: Some(database),
        redis_prefix: Some(prefix),
        ..Options::new(backend)
    })
    .await;
    let run = app.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::Completed);
    assert_eq!(app.history(1, 1).await, users);
}

/// The whole server ("") and each service, as a load balancer would ask.
const HEALTH_SERVICES: [&str; 3] = [
    "",
    "restock.v1.RestockService",
    "restock.v1.RestockAdminService",
];

async fn health_is_serving_while_running_and_not_serving_on_shutdown(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut health = HealthClient::new(app.channel.clone());
    let mut watches = Vec::new();
    for service in HEALTH_SERVICES {
        let request = HealthCheckRequest {
            service: service.into(),
        };
        let now = health.check(request.clone()).await.expect("health Check");
        assert_eq!(
            now.into_inner().status(),
            ServingStatus::Serving,
            "{service:?}"
        );
        let mut watch = health
            .watch(request)
            .await
            .expect("health Watch")
            .into_inner();
        let first = watch.message().await.expect("a status").expect("a status");
        assert_eq!(first.status(), ServingStatus::Serving, "{service:?}");
        watches.push((service, watch));
    }

    let stopping = tokio::spawn(app.shut_down());
    for (service, mut watch) in watches {
        let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .unwrap_or_else(|_| panic!("no new status for {service:?} within 10 s"));
        match next {
            Ok(Some(status)) => {
                assert_eq!(status.status(), ServingStatus::NotServing, "{service:?}")
            }
            other => panic!("{service:?}: the watch ended without NOT_SERVING: {other:?}"),
        }
    }
    tokio::time::timeout(Duration::from_secs(30), stopping)
        .await
        .expect("the server stops with health watches open")
        .unwrap();
}

/// With RESTOCK_SHUTDOWN_DRAIN, health says NOT_SERVING first and calls are still
/// answered, on new connections too, until the drain is over.
async fn during_the_drain_health_is_not_serving_and_calls_are_still_served(backend: Backend) {
    let app = spawn_app_with(Options {
        shutdown_drain: Duration::from_secs(2),
        ..Options::new(backend)
    })
    .await;
    let addr = app.addr;
    let mut watch = HealthClient::new(app.channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health Watch")
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);

    let stopping = tokio::spawn(app.shut_down());
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("a new status within 10 s")
        .unwrap()
        .unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);

    // A load balancer's next check, on a connection of its own: answered, NOT_SERVING.
    let fresh = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("the listener is still open during the drain");
    let checked = HealthClient::new(fresh.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("Check answered during the drain");
    assert_eq!(checked.into_inner().status(), ServingStatus::NotServing);
    // And calls are served meanwhile.
    let product =
        restock_notifier::grpc::proto::restock_service_client::RestockServiceClient::new(fresh)
            .set_stock(restock_notifier::grpc::proto::SetStockRequest {
                product_id: 3,
                stock: 1,
                ..Default::default()
            })
            .await
            .expect("SetStock served during the drain");
    assert_eq!(product.into_inner().stock, 1);
    assert!(!stopping.is_finished(), "still draining");

    // The health Watch is still open, as a load balancer would keep it: the server
    // stops all the same, a few seconds after the drain.
    tokio::time::timeout(Duration::from_secs(30), stopping)
        .await
        .expect("the server stops after the drain, health Watch open or not")
        .unwrap();
    drop(watch);
}

on_each_backend!(
    shutdown_mid_run_releases_the_run_and_the_next_start_continues_it,
    health_is_serving_while_running_and_not_serving_on_shutdown,
    during_the_drain_health_is_not_serving_and_calls_are_still_served,
);
