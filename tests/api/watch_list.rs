//! `WatchRestockRun` (a run followed to its final state, on any instance) and
//! `ListRestockRuns` (newest first, in keyset pages).

use std::time::Duration;

use futures::StreamExt as _;
use restock_notifier::grpc::proto::{
    ListRestockRunsRequest, RestockRun, RunStatus, WatchRestockRunRequest,
};
use tokio::time::Instant;
use tonic::{Code, Status};

use crate::cluster::spawn_cluster;
use crate::helpers::*;

async fn watch(
    app: &TestApp,
    product: i64,
    round: Option<i64>,
) -> Result<tonic::Streaming<RestockRun>, Status> {
    app.client
        .clone()
        .watch_restock_run(WatchRestockRunRequest {
            product_id: product,
            restock_round: round,
        })
        .await
        .map(|r| r.into_inner())
}

/// Every message of a watch, with when it arrived, and how the stream ended (`None`:
/// OK).
async fn watch_to_end(
    stream: &mut tonic::Streaming<RestockRun>,
) -> (Vec<(Instant, RestockRun)>, Option<Status>) {
    let mut got = vec![];
    loop {
        match tokio::time::timeout(Duration::from_secs(60), stream.next()).await {
            Ok(Some(Ok(run))) => got.push((Instant::now(), run)),
            Ok(Some(Err(status))) => return (got, Some(status)),
            Ok(None) => return (got, None),
            Err(_) => panic!("the watch was silent for 60 s after {got:?}"),
        }
    }
}

/// A run of `product` over `users` at a low send rate is followed to the end: updates
/// with a growing `sent_count`, at least once a second, then COMPLETED, then the end.
fn assert_followed_to_completion(got: &[(Instant, RestockRun)], product: i64, users: i64) {
    assert!(got.len() >= 3, "{got:?}");
    let runs: Vec<&RestockRun> = got.iter().map(|(_, run)| run).collect();
    let (last, before) = runs.split_last().unwrap();
    assert_eq!(last.status(), RunStatus::Completed, "{last:?}");
    assert_eq!(last.sent_count, users);
    assert!(
        before.iter().all(|r| r.status() == RunStatus::InProgress),
        "only the last message is final: {runs:?}"
    );
    assert!(
        runs.iter()
            .all(|r| r.product_id == product && r.restock_round == runs[0].restock_round)
    );
    let counts: Vec<i64> = runs.iter().map(|r| r.sent_count).collect();
    assert!(counts.is_sorted(), "sent_count never goes back: {counts:?}");
    let in_progress: Vec<i64> = before.iter().map(|r| r.sent_count).collect();
    assert!(
        in_progress.first() < in_progress.last() && *in_progress.last().unwrap() < users,
        "sent_count grows while the run is in progress: {counts:?}"
    );
    for pair in got.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        // At least once a second; the slack is for a loaded test machine.
        assert!(
            gap < Duration::from_millis(1_500),
            "{gap:?} between updates"
        );
    }
}

async fn watch_follows_a_run_to_its_final_state_and_ends(backend: Backend) {
    let app = spawn_app_with(Options {
        send_rate: 20,
        ..Options::new(backend)
    })
    .await;
    app.set_stock(1, 5).await;
    app.register_bulk(1, &(1..=50).collect::<Vec<_>>()).await;
    app.trigger(1, None).await.unwrap();

    let mut stream = watch(&app, 1, None).await.expect("WatchRestockRun");
    let (got, end) = watch_to_end(&mut stream).await;
    assert!(end.is_none(), "ends OK, got {end:?}");
    assert_followed_to_completion(&got, 1, 50);
    assert_eq!(got.last().unwrap().1, app.get_run(1, None).await.unwrap());
}

async fn watch_of_a_finished_run_yields_its_final_state_and_ends(backend: Backend) {
    let app = spawn_app(backend).await;
    app.set_stock(2, 5).await;
    app.register_bulk(2, &[4, 8, 15]).await;
    app.trigger(2, None).await.unwrap();
    let first = app.wait_until_final(2).await;
    app.trigger(2, None).await.unwrap();
    let second = app.wait_until_final(2).await;
    assert_eq!(second.restock_round, 2);

    for (round, expected) in [(None, &second), (Some(2), &second), (Some(1), &first)] {
        let mut stream = watch(&app, 2, round).await.expect("WatchRestockRun");
        let (got, end) = watch_to_end(&mut stream).await;
        assert!(end.is_none(), "ends OK, got {end:?}");
        let got: Vec<RestockRun> = got.into_iter().map(|(_, run)| run).collect();
        assert_eq!(got, vec![expected.clone()], "round {round:?}");
    }
}

async fn watch_refuses_unknown_runs_and_bad_ids(backend: Backend) {
    let app = spawn_app(backend).await;
    app.set_stock(3, 5).await;
    // Unknown product, a product never restocked, a round that never ran.
    assert_code(watch(&app, 99, None).await, Code::NotFound);
    assert_code(watch(&app, 3, None).await, Code::NotFound);
    app.trigger(3, None).await.unwrap();
    app.wait_until_final(3).await;
    assert_code(watch(&app, 3, Some(2)).await, Code::NotFound);
    assert_code(watch(&app, 0, None).await, Code::InvalidArgument);
    assert_code(watch(&app, 3, Some(0)).await, Code::InvalidArgument);
    assert_code(watch(&app, -3, Some(1)).await, Code::InvalidArgument);
}

async fn watch_ends_unavailable_when_the_service_shuts_down(backend: Backend) {
    let app = spawn_app_with(Options {
        send_rate: 20,
        ..Options::new(backend)
    })
    .await;
    app.set_stock(4, 5).await;
    app.register_bulk(4, &(1..=200).collect::<Vec<_>>()).await;
    app.trigger(4, None).await.unwrap();
    let mut stream = watch(&app, 4, None).await.expect("WatchRestockRun");
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.status(), RunStatus::InProgress);

    app.shut_down().await;
    let (got, end) = watch_to_end(&mut stream).await;
    assert!(
        got.iter().all(|(_, r)| r.status() == RunStatus::InProgress),
        "{got:?}"
    );
    let status = end.expect("the watch does not end OK while the run goes on");
    let info = stream_end_info(&status, Code::Unavailable, "SHUTTING_DOWN");
    assert_eq!(
        info.metadata.get("product_id").map(String::as_str),
        Some("4")
    );
    assert_eq!(
        info.metadata.get("restock_round").map(String::as_str),
        Some("1")
    );
}

/// `queue_size` is the active registrations when the round started, in every answer
/// (Trigger, Get, Watch, List): a cancelled alert is not counted, each round counts
/// afresh, and a run that notified everyone ends with `sent_count` at it.
async fn runs_carry_the_queue_size_their_round_started_with(backend: Backend) {
    let app = spawn_app(backend).await;
    app.set_stock(4, 10).await;
    for user in 1..=6 {
        app.register(4, user).await;
    }
    app.cancel(4, 3).await;
    let started = app.trigger(4, None).await.expect("TriggerRestock");
    assert_eq!(started.queue_size, 5);
    let done = app.wait_until_final(4).await;
    assert_eq!(done.status(), RunStatus::Completed);
    assert_eq!((done.sent_count, done.queue_size), (5, 5));

    // The next round counts again: user 3 is back, user 7 is new.
    app.register(4, 3).await;
    app.register(4, 7).await;
    let next = app.trigger(4, None).await.expect("TriggerRestock");
    assert_eq!((next.restock_round, next.queue_size), (2, 7));
    app.wait_until_final(4).await;

    let mut stream = watch(&app, 4, Some(1)).await.expect("WatchRestockRun");
    let (updates, end) = watch_to_end(&mut stream).await;
    assert!(end.is_none(), "{end:?}");
    assert_eq!(updates.last().map(|(_, run)| run.queue_size), Some(5));
    let listed = app
        .client
        .clone()
        .list_restock_runs(ListRestockRunsRequest {
            product_id: Some(4),
            ..Default::default()
        })
        .await
        .expect("ListRestockRuns")
        .into_inner();
    let sizes: Vec<_> = listed
        .runs
        .iter()
        .map(|r| (r.restock_round, r.queue_size))
        .collect();
    assert_eq!(sizes, [(2, 7), (1, 5)]);
}

on_each_backend!(
    runs_carry_the_queue_size_their_round_started_with,
    watch_follows_a_run_to_its_final_state_and_ends,
    watch_of_a_finished_run_yields_its_final_state_and_ends,
    watch_refuses_unknown_runs_and_bad_ids,
    watch_ends_unavailable_when_the_service_shuts_down,
    list_pages_newest_first_with_and_without_filters,
    list_refuses_bad_tokens_sizes_and_statuses,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_on_one_instance_follows_a_run_on_another() {
    let apps = spawn_cluster(
        2,
        Options {
            send_rate: 20,
            ..Options::new(Backend::MySql)
        },
    )
    .await;
    apps[0].set_stock(1, 5).await;
    apps[0]
        .register_bulk(1, &(1..=50).collect::<Vec<_>>())
        .await;
    apps[0].trigger(1, None).await.unwrap();

    let mut stream = watch(&apps[1], 1, Some(1)).await.expect("WatchRestockRun");
    let (got, end) = watch_to_end(&mut stream).await;
    assert!(end.is_none(), "ends OK, got {end:?}");
    assert_followed_to_completion(&got, 1, 50);
    assert_eq!(
        got.last().unwrap().1,
        apps[0].get_run(1, None).await.unwrap()
    );
}

async fn list(
    app: &TestApp,
    request: ListRestockRunsRequest,
) -> Result<(Vec<(i64, i64)>, String), Status> {
    let page = app
        .client
        .clone()
        .list_restock_runs(request)
        .await?
        .into_inner();
    let runs = page
        .runs
        .iter()
        .map(|r| (r.product_id, r.restock_round))
        .collect();
    Ok((runs, page.next_page_token))
}

/// Pages through a listing to its end: every page but the last is full, the last
/// one ends it (an empty token), and the pages together are returned in order.
async fn list_all(app: &TestApp, request: ListRestockRunsRequest) -> Vec<(i64, i64)> {
    let page_size = request.page_size as usize;
    let mut all = vec![];
    let mut request = request;
    for _ in 0..100 {
        let (runs, next) = list(app, request.clone()).await.expect("ListRestockRuns");
        assert!(runs.len() <= page_size, "{runs:?}");
        all.extend(runs.iter().copied());
        if next.is_empty() {
            return all;
        }
        assert_eq!(runs.len(), page_size, "only the last page is short");
        request.page_token = next;
    }
    panic!("more than 100 pages: {all:?}");
}

async fn list_pages_newest_first_with_and_without_filters(backend: Backend) {
    let app = spawn_app_with(Options {
        send_rate: 20,
        ..Options::new(backend)
    })
    .await;
    // Seven finished runs over three products, created interleaved, then one run still
    // going: the newest.
    let mut created = vec![];
    for product in [1, 2, 3, 1, 2, 1, 3] {
        let run = app.trigger(product, Some(5)).await.unwrap();
        app.wait_until_final(product).await;
        created.push((product, run.restock_round));
    }
    sqlx::query(
        "UPDATE product_notification_history SET status = 'CANCELED_BY_ERROR' \
         WHERE (product_id = 2 AND restock_round = 1) OR (product_id = 1 AND restock_round = 3)",
    )
    .execute(&app.db)
    .await
    .unwrap();
    app.set_stock(4, 5).await;
    app.register_bulk(4, &(1..=500).collect::<Vec<_>>()).await;
    app.trigger(4, None).await.unwrap();
    created.push((4, 1));
    let status_of = |run: &(i64, i64)| match run {
        (4, 1) => RunStatus::InProgress,
        (2, 1) | (1, 3) => RunStatus::CanceledByError,
        _ => RunStatus::Completed,
    };
    let newest_first: Vec<(i64, i64)> = created.iter().rev().copied().collect();
    let expect = |keep: &dyn Fn(&(i64, i64)) -> bool| -> Vec<(i64, i64)> {
        newest_first.iter().copied().filter(|r| keep(r)).collect()
    };

    let request =
        |status: Option<RunStatus>, product: Option<i64>, page_size: i32| ListRestockRunsRequest {
            status: status.map(Into::into),
            product_id: product,
            page_size,
            page_token: String::new(),
        };
    assert_eq!(
        list_all(&app, request(None, None, 3)).await,
        newest_first,
        "every run, three pages"
    );
    for product in 1..=4 {
        assert_eq!(
            list_all(&app, request(None, Some(product), 2)).await,
            expect(&|r| r.0 == product),
            "product {product}"
        );
    }
    for status in [
        RunStatus::Completed,
        RunStatus::CanceledByError,
        RunStatus::InProgress,
        RunStatus::CanceledBySoldOut,
    ] {
        assert_eq!(
            list_all(&app, request(Some(status), None, 2)).await,
            expect(&|r| status_of(r) == status),
            "{status:?}"
        );
    }
    assert_eq!(
        list_all(&app, request(Some(RunStatus::Completed), Some(1), 1)).await,
        vec![(1, 2), (1, 1)]
    );
    // Exactly one page's worth: one page, and no token to an empty one.
    assert_eq!(
        list(&app, request(None, Some(1), 3)).await.unwrap(),
        (vec![(1, 3), (1, 2), (1, 1)], String::new())
    );
    // 0 is the default size (50), and a size above 1000 is read as 1000.
    for size in [0, 5_000] {
        let (runs, next) = list(&app, request(None, None, size)).await.unwrap();
        assert_eq!((runs, next), (newest_first.clone(), String::new()));
    }
    assert_eq!(list_all(&app, request(None, Some(77), 3)).await, vec![]);

    // A run started between two pages does not shift the listing: it is newer than
    // every run the next pages hold.
    let (first_page, token) = list(&app, request(None, None, 3)).await.unwrap();
    app.trigger(3, Some(5)).await.unwrap();
    let rest = list_all(
        &app,
        ListRestockRunsRequest {
            page_token: token,
            ..request(None, None, 3)
        },
    )
    .await;
    assert_eq!([first_page, rest].concat(), newest_first);
}

async fn list_refuses_bad_tokens_sizes_and_statuses(backend: Backend) {
    let app = spawn_app(backend).await;
    for product in [1, 2, 1, 2] {
        app.trigger(product, Some(5)).await.unwrap();
        app.wait_until_final(product).await;
    }
    let request =
        |product: Option<i64>, status: Option<RunStatus>, token: &str| ListRestockRunsRequest {
            status: status.map(Into::into),
            product_id: product,
            page_size: 1,
            page_token: token.to_string(),
        };
    let (_, any_token) = list(&app, request(None, None, "")).await.unwrap();
    let (_, product_token) = list(&app, request(Some(1), None, "")).await.unwrap();
    assert!(!any_token.is_empty() && !product_token.is_empty());
    // The tokens work with the filter they were made for...
    list(&app, request(None, None, &any_token)).await.unwrap();
    list(&app, request(Some(1), None, &product_token))
        .await
        .unwrap();
    // ...and with no other.
    for bad in [
        request(Some(2), None, &product_token),
        request(None, None, &product_token),
        request(Some(1), None, &any_token),
        request(None, Some(RunStatus::Completed), &any_token),
    ] {
        assert_code(list(&app, bad).await, Code::InvalidArgument);
    }
    // Not a token at all, or one with a byte changed.
    let mut tampered = any_token.clone().into_bytes();
    tampered[0] = if tampered[0] == b'B' { b'C' } else { b'B' };
    let tampered = String::from_utf8(tampered).unwrap();
    let huge = "A".repeat(100_000);
    for token in ["garbage!", "AAAA", &any_token[1..], &tampered, &huge] {
        match list(&app, request(None, None, token)).await {
            Err(status) => {
                assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
                assert!(status.message().len() < 400, "input echoed: {status:?}");
            }
            Ok(page) => panic!("token {token:.80} accepted: {page:?}"),
        }
    }
    let with = |f: &dyn Fn(&mut ListRestockRunsRequest)| {
        let mut req = request(None, None, "");
        f(&mut req);
        req
    };
    for bad in [
        with(&|r| r.page_size = -1),
        with(&|r| r.status = Some(RunStatus::Unspecified.into())),
        with(&|r| r.status = Some(99)),
        with(&|r| r.product_id = Some(0)),
    ] {
        assert_code(list(&app, bad).await, Code::InvalidArgument);
    }
}
