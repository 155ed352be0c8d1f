//! Real failures mid-run, and resuming with ManualRestock.

use std::collections::HashSet;

use restock_notifier::grpc::proto::RunStatus;
use tonic::Code;

use crate::helpers::*;

/// Makes MySQL itself refuse to record `user`: a trigger that raises on insert.
pub(crate) async fn fail_recording_of(app: &TestApp, user: i64) {
    let trigger = match app.backend {
        Backend::MySql => format!(
            "CREATE TRIGGER fail_on_user BEFORE INSERT ON product_user_notification_history \
             FOR EACH ROW BEGIN \
               IF NEW.user_id = {user} THEN \
                 SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'injected failure'; \
               END IF; \
             END"
        ),
        Backend::Embedded => format!(
            "CREATE TRIGGER fail_on_user BEFORE INSERT ON product_user_notification_history \
             FOR EACH ROW WHEN NEW.user_id = {user} BEGIN \
               SELECT RAISE(ABORT, 'injected failure'); \
             END"
        ),
    };
    sqlx::raw_sql(&trigger).execute(&app.db).await.unwrap();
}

pub(crate) async fn heal(app: &TestApp) {
    sqlx::raw_sql("DROP TRIGGER fail_on_user")
        .execute(&app.db)
        .await
        .unwrap();
}

async fn a_database_failure_cancels_the_run_and_manual_restock_finishes_it_exactly_once(
    backend: Backend,
) {
    let mut options = Options::new(backend);
    // The stream is read only at the end: let it hold everything.
    options.settings.subscriber_buffer = 20_000;
    let app = spawn_app_with(options).await;
    // Registration order is the reverse of id order.
    let users: Vec<i64> = (1..=3_000).rev().collect();
    app.set_stock(1, 10).await;
    app.register_bulk(1, &users).await;
    let failing_user = users[1_700];
    fail_recording_of(&app, failing_user).await;

    let mut stream = app.subscribe_to_product(1).await;
    app.trigger(1, None).await.unwrap();
    let run = app.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::CanceledByError);

    // G5: the record is an exact prefix that stops before the failing user, and the
    // cursor is its last user.
    let history = app.history(1, 1).await;
    assert!(
        !history.is_empty() && history.len() <= 1_700,
        "{}",
        history.len()
    );
    assert_eq!(history, users[..history.len()]);
    assert_eq!(run.last_sent_user_id, history.last().copied());
    assert_eq!(
        app.run_row(1, 1).await,
        (
            "CANCELED_BY_ERROR".into(),
            history.last().copied(),
            history.len() as i64
        )
    );

    heal(&app).await;
    assert_code(app.manual_restock(1, None).await, Code::Unauthenticated);
    assert_code(
        app.manual_restock(1, Some("wrong")).await,
        Code::Unauthenticated,
    );
    assert_eq!(
        app.get_run(1, None).await.unwrap().status(),
        RunStatus::CanceledByError
    );

    let resumed = app.manual_restock(1, Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!(
        resumed.restock_round, 1,
        "resuming does not start a new round"
    );
    assert_eq!(resumed.status(), RunStatus::InProgress);
    let run = app.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::Completed);
    assert_eq!(run.restock_round, 1);
    assert_eq!(app.product_round(1).await, 1);

    let history = app.history(1, 1).await;
    assert_eq!(
        history, users,
        "every user recorded once, in registration order"
    );
    assert_eq!(run.sent_count, users.len() as i64);
    assert_eq!(run.last_sent_user_id, Some(*users.last().unwrap()));

    // The stream saw everyone; a user may be delivered again after the failure, always
    // under the same notification_id.
    let mut seen = HashSet::new();
    while seen.len() < users.len() {
        let n = take(&mut stream, 1).await.remove(0);
        assert_eq!(n.notification_id, format!("1-1-{}", n.user_id));
        seen.insert(n.user_id);
    }
}

async fn manual_restock_refuses_what_cannot_be_resumed(backend: Backend) {
    let app = spawn_app(backend).await;
    // Unknown product.
    assert_code(
        app.manual_restock(1, Some(ADMIN_TOKEN)).await,
        Code::NotFound,
    );
    // A product never restocked.
    app.set_stock(1, 5).await;
    assert_code(
        app.manual_restock(1, Some(ADMIN_TOKEN)).await,
        Code::FailedPrecondition,
    );
    // A completed run.
    app.register(1, 1).await;
    app.trigger(1, None).await.unwrap();
    assert_eq!(app.wait_until_final(1).await.status(), RunStatus::Completed);
    assert_code(
        app.manual_restock(1, Some(ADMIN_TOKEN)).await,
        Code::FailedPrecondition,
    );
    assert_eq!(app.product_round(1).await, 1);
    assert_eq!(app.history(1, 1).await, vec![1]);
    // Bad input is still checked after the token.
    assert_code(
        app.manual_restock(0, Some(ADMIN_TOKEN)).await,
        Code::InvalidArgument,
    );
    assert_code(app.manual_restock(0, None).await, Code::Unauthenticated);
}

async fn a_failed_run_out_of_stock_is_not_resumed_until_restocked(backend: Backend) {
    let app = spawn_app(backend).await;
    app.set_stock(2, 5).await;
    app.register_bulk(2, &[3, 1, 2]).await;
    fail_recording_of(&app, 1).await;
    app.trigger(2, None).await.unwrap();
    assert_eq!(
        app.wait_until_final(2).await.status(),
        RunStatus::CanceledByError
    );
    heal(&app).await;
    app.set_stock(2, 0).await;
    assert_code(
        app.manual_restock(2, Some(ADMIN_TOKEN)).await,
        Code::FailedPrecondition,
    );
    app.set_stock(2, 1).await;
    app.manual_restock(2, Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!(app.wait_until_final(2).await.status(), RunStatus::Completed);
    assert_eq!(app.history(2, 1).await, vec![3, 1, 2]);
}

async fn a_run_abandoned_by_a_dead_process_is_taken_over_and_finished(backend: Backend) {
    let mut options = Options::new(backend);
    options.settings.lease.takeover_interval = std::time::Duration::from_millis(50);
    let app = spawn_app_with(options).await;
    app.set_stock(3, 5).await;
    app.register_bulk(3, &[30, 10, 20]).await;
    // What a process that died mid-run leaves behind: round 1 in progress, user 30
    // recorded, and a lease nobody renews any more.
    let (expired, now) = match app.backend {
        Backend::MySql => (
            "CURRENT_TIMESTAMP(6) - INTERVAL 1 SECOND",
            "CURRENT_TIMESTAMP(6)",
        ),
        // Unix microseconds, as the embedded schema keeps leases.
        Backend::Embedded => ("1000000", "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"),
    };
    sqlx::raw_sql(&format!(
        "UPDATE product SET restock_round = 1 WHERE id = 3; \
         INSERT INTO product_notification_history \
           (product_id, restock_round, status, last_sent_user_id, last_sent_position, \
            sent_count, claim_token, lease_until) \
         VALUES (3, 1, 'IN_PROGRESS', 30, 1, 1, 12345, {expired}); \
         INSERT INTO product_user_notification_history \
           (product_id, user_id, restock_round, sent_at, position) \
         VALUES (3, 30, 1, {now}, 1);"
    ))
    .execute(&app.db)
    .await
    .unwrap();

    // G8: no operator action; the live instance takes it over from the record.
    let run = app.wait_until_final(3).await;
    assert_eq!(run.status(), RunStatus::Completed);
    assert_eq!(run.restock_round, 1);
    assert_eq!(app.history(3, 1).await, vec![30, 10, 20]);
}

on_each_backend!(
    a_database_failure_cancels_the_run_and_manual_restock_finishes_it_exactly_once,
    manual_restock_refuses_what_cannot_be_resumed,
    a_failed_run_out_of_stock_is_not_resumed_until_restocked,
    a_run_abandoned_by_a_dead_process_is_taken_over_and_finished,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_the_admin_token_is_shut_out_after_ten_failures() {
    let app = spawn_app(Backend::Embedded).await;
    app.set_stock(1, 5).await;
    for attempt in 1..=10 {
        let guess = format!("guess-{attempt}");
        assert_code(
            app.manual_restock(1, Some(&guess)).await,
            Code::Unauthenticated,
        );
    }
    assert_code(
        app.manual_restock(1, Some("guess-11")).await,
        Code::ResourceExhausted,
    );
    // Shut out, the right token is refused too: the answer tells a guesser nothing.
    assert_code(
        app.manual_restock(1, Some(ADMIN_TOKEN)).await,
        Code::ResourceExhausted,
    );
    // The rest of the API is not affected.
    app.get_run(1, None).await.unwrap_err();
    app.set_stock(1, 6).await;
}
