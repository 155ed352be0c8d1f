//! Subscribe: filters, slow subscribers, resume_after.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt as _;
use restock_notifier::grpc::proto::restock_service_client::RestockServiceClient;
use restock_notifier::grpc::proto::{RunStatus, SubscribeRequest};
use tonic::Code;
use tonic::transport::Channel;

use crate::helpers::*;

async fn subscribers_get_exactly_what_their_filter_matches(backend: Backend) {
    let app = spawn_app(backend).await;
    for product in [1, 2] {
        app.set_stock(product, 5).await;
        for user in [1, 2, 3] {
            app.register(product, user).await;
        }
    }
    let mut all = app.subscribe(SubscribeRequest::default()).await;
    let mut user_1 = app
        .subscribe(SubscribeRequest {
            user_id: Some(1),
            ..Default::default()
        })
        .await;
    let mut product_2 = app.subscribe_to_product(2).await;
    let mut both = app
        .subscribe(SubscribeRequest {
            user_id: Some(3),
            product_id: Some(1),
            ..Default::default()
        })
        .await;

    app.trigger(1, None).await.unwrap();
    app.wait_until_final(1).await;
    app.trigger(2, None).await.unwrap();
    app.wait_until_final(2).await;

    let ids = |ns: Vec<restock_notifier::grpc::proto::Notification>| -> Vec<String> {
        ns.into_iter().map(|n| n.notification_id).collect()
    };
    assert_eq!(
        ids(take(&mut all, 6).await),
        ["1-1-1", "1-1-2", "1-1-3", "2-1-1", "2-1-2", "2-1-3"]
    );
    assert_eq!(ids(take(&mut user_1, 2).await), ["1-1-1", "2-1-1"]);
    assert_eq!(
        ids(take(&mut product_2, 3).await),
        ["2-1-1", "2-1-2", "2-1-3"]
    );
    assert_eq!(ids(take(&mut both, 1).await), ["1-1-3"]);
    // And nothing else arrives on the filtered streams.
    for stream in [&mut user_1, &mut product_2, &mut both] {
        assert!(
            tokio::time::timeout(Duration::from_millis(200), stream.next())
                .await
                .is_err()
        );
    }
}

async fn a_stalled_subscriber_does_not_slow_a_run_and_is_ended_with_a_clear_status(
    backend: Backend,
) {
    // A small buffer (64 batches of a few notifications each), and a rate a reading
    // subscriber keeps up with.
    let mut options = Options {
        send_rate: 5_000,
        ..Options::new(backend)
    };
    options.settings.subscriber_buffer = 64;
    let app = spawn_app_with(options).await;
    let users: Vec<i64> = (1..=5_000).collect();
    app.set_stock(1, 5).await;
    app.register_bulk(1, &users).await;

    // This one never reads until the run is over. Its stream window is small (tonic's
    // client asks for megabytes), so the transport stops taking notifications early and
    // the service-side buffer is what overflows. (Smaller than h2's own budget for
    // unread small frames, or the client's h2 would drop the connection itself first.)
    let small_windows = Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .initial_stream_window_size(16 * 1024)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let mut stalled = RestockServiceClient::new(small_windows)
        .subscribe(SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    // This one keeps up.
    let mut reader = app.subscribe(SubscribeRequest::default()).await;
    let reading = tokio::spawn(async move {
        let mut n = 0;
        while n < 5_000 {
            match reader.next().await {
                Some(Ok(_)) => n += 1,
                other => panic!("reader ended after {n}: {other:?}"),
            }
        }
        n
    });

    app.trigger(1, None).await.unwrap();
    let run = app.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::Completed);
    assert_eq!(run.sent_count, 5_000);
    assert_eq!(reading.await.unwrap(), 5_000);

    // The stalled stream got what fit in its buffers, then a status saying what to do.
    let mut delivered = 0;
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), stalled.next())
            .await
            .unwrap_or_else(|_| panic!("no end after {delivered}"))
        {
            Some(Ok(_)) => delivered += 1,
            Some(Err(status)) => break status,
            None => panic!("stream ended without a status after {delivered}"),
        }
    };
    assert!(delivered < 5_000);
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("resume_after"),
        "{}",
        status.message()
    );
    // The same, for a client that resumes by itself: ErrorInfo in the details, with
    // the last notification this stream delivered.
    let info = stream_end_info(&status, Code::ResourceExhausted, "STREAM_LAGGED");
    if delivered > 0 {
        assert_eq!(
            info.metadata.get("resume_after").map(String::as_str),
            Some(format!("1-1-{delivered}").as_str()),
            "the last one delivered"
        );
    }
}

async fn resume_after_replays_the_recorded_ones_then_continues_live(backend: Backend) {
    let app = spawn_app(backend).await;
    app.set_stock(1, 5).await;
    for user in [4, 2, 6] {
        app.register(1, user).await;
    }
    app.set_stock(2, 5).await;
    app.register(2, 9).await;
    app.trigger(1, None).await.unwrap();
    app.wait_until_final(1).await;
    app.trigger(2, None).await.unwrap();
    app.wait_until_final(2).await;

    let mut stream = app
        .subscribe(SubscribeRequest {
            product_id: Some(1),
            resume_after: Some("1-1-4".into()),
            ..Default::default()
        })
        .await;
    let replayed: Vec<String> = take(&mut stream, 2)
        .await
        .into_iter()
        .map(|n| n.notification_id)
        .collect();
    assert_eq!(replayed, ["1-1-2", "1-1-6"]);

    // Then live: the next round arrives on the same stream, without duplicates.
    app.trigger(1, None).await.unwrap();
    let live: Vec<String> = take(&mut stream, 3)
        .await
        .into_iter()
        .map(|n| n.notification_id)
        .collect();
    assert_eq!(live, ["1-2-4", "1-2-2", "1-2-6"]);
    let unique: HashSet<_> = replayed.iter().chain(&live).collect();
    assert_eq!(unique.len(), 5);
}

on_each_backend!(
    subscribers_get_exactly_what_their_filter_matches,
    a_stalled_subscriber_does_not_slow_a_run_and_is_ended_with_a_clear_status,
    resume_after_replays_the_recorded_ones_then_continues_live,
);
