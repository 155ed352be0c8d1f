//! Where SQLite differs from MySQL: locking for "one run per product" without row
//! locks, the database-level guard, and timestamps stored as text.

use std::time::Duration;

use futures::StreamExt as _;
use restock_notifier::domain::{ProductId, TriggerRequest};
use restock_notifier::grpc::proto::SubscribeRequest;
use restock_notifier::store::Store;
use restock_notifier::store::sqlite::SqliteStore;
use tonic::Code;

use crate::helpers::*;

/// Removes an SQLite file and its WAL companions when dropped.
struct TempDb(String);

impl Drop for TempDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.0));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_sqlite_file_cannot_both_start_a_run() {
    let path = std::env::temp_dir().join(format!("restock-two-{:016x}.db", rand::random::<u64>()));
    let file = TempDb(path.to_string_lossy().into_owned());
    let url = format!("sqlite://{}", file.0);
    // Two stores on one file: two writers that only SQLite's own lock keeps apart.
    let a = SqliteStore::connect(&url).await.unwrap();
    let b = SqliteStore::connect(&url).await.unwrap();
    let product = ProductId::parse(1).unwrap();
    a.set_stock(product, 5, None).await.unwrap();

    let lease = Duration::from_secs(10);
    let attempts = (0..20).map(|i| {
        let store = if i % 2 == 0 { &a } else { &b };
        async move {
            store
                .start_run(product, &TriggerRequest::default(), lease)
                .await
        }
    });
    let results = futures::future::join_all(attempts).await;
    let wins = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1, "{results:?}");
    for result in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(
            matches!(
                result,
                restock_notifier::domain::Error::RunInProgress { .. }
            ),
            "{result:?}"
        );
    }
    assert_eq!(a.product(product).await.unwrap().unwrap().restock_round, 1);
}

async fn the_database_itself_refuses_a_second_run_in_progress(backend: Backend) {
    let app = spawn_app(backend).await;
    app.set_stock(1, 5).await;
    let insert = |round: i64| {
        sqlx::query(
            "INSERT INTO product_notification_history (product_id, restock_round, status) \
             VALUES (1, ?, 'IN_PROGRESS')",
        )
        .bind(round)
        .execute(&app.db)
    };
    insert(1).await.unwrap();
    let second = insert(2).await.unwrap_err();
    assert!(
        second
            .as_database_error()
            .is_some_and(|e| e.is_unique_violation()),
        "{second:?}"
    );
    // And the API agrees: the hand-made run is in progress.
    assert_code(app.trigger(1, None).await, Code::FailedPrecondition);
}

async fn replayed_notifications_carry_the_sent_at_they_were_sent_with(backend: Backend) {
    let app = spawn_app(backend).await;
    app.set_stock(1, 5).await;
    for user in [5, 6, 7] {
        app.register(1, user).await;
    }
    let mut live = app.subscribe(SubscribeRequest::default()).await;
    app.trigger(1, None).await.unwrap();
    let sent = take(&mut live, 3).await;
    app.wait_until_final(1).await;

    let mut replay = app
        .subscribe(SubscribeRequest {
            resume_after: Some(sent[0].notification_id.clone()),
            ..Default::default()
        })
        .await;
    let replayed = take(&mut replay, 2).await;
    for (live, replayed) in sent[1..].iter().zip(&replayed) {
        assert_eq!(live.notification_id, replayed.notification_id);
        let (l, r) = (live.sent_at.unwrap(), replayed.sent_at.unwrap());
        // Stored with microsecond precision on both backends.
        assert_eq!((l.seconds, l.nanos / 1_000), (r.seconds, r.nanos / 1_000));
    }
    let run = app.get_run(1, None).await.unwrap();
    let (started, updated) = (run.started_at.unwrap(), run.updated_at.unwrap());
    assert!((updated.seconds, updated.nanos) >= (started.seconds, started.nanos));
    assert!(
        tokio::time::timeout(Duration::from_millis(200), replay.next())
            .await
            .is_err()
    );
}

on_each_backend!(
    the_database_itself_refuses_a_second_run_in_progress,
    replayed_notifications_carry_the_sent_at_they_were_sent_with,
);

/// A database that takes no writes (here a file opened read-only, as a read-only mount
/// or a standby copy would be) answers UNAVAILABLE, which says to retry, not INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_database_is_unavailable_not_internal() {
    let app = spawn_app(Backend::Embedded).await;
    app.set_stock(1, 5).await;
    let (path, _) = app.shut_down().await;
    let _file = TempDb(path.clone());
    let app = spawn_app_with(Options {
        database: Some(format!("{path}?mode=ro")),
        ..Options::new(Backend::Embedded)
    })
    .await;
    // Reads work; writes are refused with a code that says to retry.
    assert_eq!(
        app.get_run(1, None).await.unwrap_err().code(),
        Code::NotFound
    );
    let refused = app
        .client
        .clone()
        .set_stock(restock_notifier::grpc::proto::SetStockRequest {
            product_id: 1,
            stock: 7,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_code(app.trigger(1, None).await, Code::Unavailable);
}
