//! Redis failing for real mid-run: a redis-server of the test's own, killed.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::StreamExt as _;

use restock_notifier::grpc::proto::{self, RunStatus, SubscribeRequest};
use tonic::Code;

use crate::helpers::*;

/// A redis-server child process on a free port, killed when dropped.
struct OwnRedis {
    child: Child,
    port: u16,
}

impl OwnRedis {
    async fn start(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (.ci/run installs it)");
        wait_until_listening(port, "redis-server").await;
        Self { child, port }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The service on MySQL and `redis`, at 400 sends a second.
async fn app_on(redis: &OwnRedis) -> TestApp {
    spawn_app_with(Options {
        send_rate: 400,
        redis_url: Some(redis.url()),
        ..Options::new(Backend::MySql)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dying_mid_run_cancels_it_and_manual_restock_finishes_once_redis_is_back() {
    let port = free_port();
    let redis = OwnRedis::start(port).await;
    let app = app_on(&redis).await;
    let users: Vec<i64> = (1..=1_000).collect();
    app.set_stock(1, 5).await;
    app.register_bulk(1, &users).await;
    let mut stream = app.subscribe(SubscribeRequest::default()).await;
    app.trigger(1, None).await.unwrap();
    let mut delivered = take(&mut stream, 50).await;

    redis.kill();
    let run = app.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::CanceledByError);
    let history = app.history(1, 1).await;
    assert!(history.len() >= 50 && history.len() < users.len());
    assert_eq!(history, users[..history.len()]);
    assert_eq!(run.last_sent_user_id, history.last().copied());

    // With Redis down, a stock write cannot be confirmed: UNAVAILABLE, not success.
    let status = app
        .client
        .clone()
        .set_stock(proto::SetStockRequest {
            product_id: 1,
            stock: 6,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    // Redis comes back (empty: the stock is reloaded from MySQL on the first check).
    let _redis = OwnRedis::start(port).await;
    // The stream opened before Redis died may have missed notifications while the bus
    // was away: it ends saying so, with where to resume, not as a slow reader.
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
            Ok(Some(Ok(n))) => delivered.push(n),
            Ok(Some(Err(status))) => break status,
            other => panic!("the stream did not end with a status: {other:?}"),
        }
    };
    let info = stream_end_info(&status, Code::Unavailable, "FEED_INTERRUPTED");
    assert_eq!(
        info.metadata.get("resume_after"),
        delivered.last().map(|n| &n.notification_id),
        "resume after the last one the stream delivered"
    );
    app.set_stock(1, 6).await;
    app.manual_restock(1, Some(ADMIN_TOKEN)).await.unwrap();
    let run = app.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::Completed);
    assert_eq!(app.history(1, 1).await, users);
}

/// A stream that the service ends before it delivered anything says where to resume
/// all the same (G11): the point in the record it started at. Subscribing again from
/// there replays what was recorded meanwhile, so nothing is missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ended_before_its_first_notification_says_where_to_resume() {
    let port = free_port();
    let redis = OwnRedis::start(port).await;
    let app = app_on(&redis).await;
    // Something recorded before the stream opens: product 1's run.
    app.set_stock(1, 5).await;
    app.register_bulk(1, &[7, 8]).await;
    app.trigger(1, None).await.unwrap();
    assert_eq!(app.wait_until_final(1).await.status(), RunStatus::Completed);
    let mut stream = app.subscribe_to_product(2).await;

    // The bus goes away before product 2 sends anything.
    redis.kill();
    let _redis = OwnRedis::start(port).await;
    let status = match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
        Ok(Some(Err(status))) => status,
        other => panic!("the stream did not end with a status: {other:?}"),
    };
    let info = stream_end_info(&status, Code::Unavailable, "FEED_INTERRUPTED");
    let resume_after = info
        .metadata
        .get("resume_after")
        .expect("a resume point although nothing was delivered")
        .clone();
    assert_eq!(
        resume_after, "1-1-8",
        "where the record stood when it opened"
    );

    // Product 2 is restocked before the subscriber is back: it misses none of it.
    let users: Vec<i64> = (1..=30).collect();
    app.set_stock(2, 5).await;
    app.register_bulk(2, &users).await;
    app.trigger(2, None).await.unwrap();
    assert_eq!(app.wait_until_final(2).await.status(), RunStatus::Completed);
    let mut again = app
        .subscribe(SubscribeRequest {
            product_id: Some(2),
            resume_after: Some(resume_after),
            ..Default::default()
        })
        .await;
    let replayed: Vec<i64> = take(&mut again, users.len())
        .await
        .iter()
        .map(|n| n.user_id)
        .collect();
    assert_eq!(replayed, users);
}

/// The bus subscription of an instance goes silent with no error: the connection stays
/// open and carries nothing (a partition here; on Redis Cluster, a channel unsubscribed
/// by a failover or a resharding without a word to the client). Within seconds the
/// instance's streams end with their resume point, instead of waiting for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_subscription_gone_silent_ends_streams_with_their_resume_point() {
    let proxy = crate::proxy::FaultProxy::for_url(&redis_url()).await;
    let runner = spawn_app(Backend::MySql).await;
    let watcher = spawn_app_with(Options {
        database: Some(runner.database.clone()),
        redis_prefix: Some(runner.redis_prefix.clone()),
        redis_url: Some(proxy.url(&redis_url())),
        ..Options::new(Backend::MySql)
    })
    .await;
    let users: Vec<i64> = (1..=5_000).collect();
    runner.set_stock(1, 10).await;
    runner.register_bulk(1, &users).await;
    let mut stream = watcher.subscribe_to_product(1).await;
    runner.trigger(1, None).await.unwrap();
    take(&mut stream, 20).await;
    proxy.freeze();
    let frozen = tokio::time::Instant::now();
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(20), stream.next()).await {
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(status))) => break status,
            other => panic!("the stream neither ended nor went on: {other:?}"),
        }
    };
    let after = frozen.elapsed();
    let info = stream_end_info(&ended, Code::Unavailable, "FEED_INTERRUPTED");
    assert!(info.metadata.contains_key("resume_after"), "{info:?}");
    assert!(
        after < Duration::from_secs(10),
        "ended {after:?} after the bus went silent"
    );
    proxy.thaw();
}
