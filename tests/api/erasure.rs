//! `ForgetUser`: every alert and history row of one user, idempotent, admin only; and
//! once it has returned, no run in progress notifies the user, on any instance.

use std::collections::HashSet;

use futures::StreamExt as _;
use restock_notifier::grpc::proto::{self, RunStatus};
use tonic::{Code, Request};

use crate::cluster::spawn_cluster;
use crate::helpers::*;

async fn forget(
    app: &TestApp,
    user: i64,
    token: Option<&str>,
) -> Result<(i64, i64), tonic::Status> {
    let mut request = Request::new(proto::ForgetUserRequest { user_id: user });
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let answer = app.admin.clone().forget_user(request).await?.into_inner();
    Ok((answer.alerts_deleted, answer.notifications_deleted))
}

async fn rows_of(app: &TestApp, table: &str, user: i64) -> i64 {
    sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table} WHERE user_id = ?"))
        .bind(user)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

async fn waiting(app: &TestApp, product: i64) -> i64 {
    app.client
        .clone()
        .get_product(proto::GetProductRequest {
            product_id: product,
        })
        .await
        .unwrap()
        .into_inner()
        .waiting
}

async fn forget_user_deletes_every_alert_and_history_row_once(backend: Backend) {
    let app = spawn_app(backend).await;
    app.set_stock(1, 5).await;
    app.set_stock(2, 5).await;
    for user in [7, 8] {
        app.register(1, user).await;
    }
    app.trigger(1, None).await.unwrap();
    assert_eq!(app.wait_until_final(1).await.status(), RunStatus::Completed);
    app.register(2, 7).await;
    app.cancel(2, 7).await;
    assert_eq!((waiting(&app, 1).await, waiting(&app, 2).await), (2, 0));

    assert_code(forget(&app, 7, None).await, Code::Unauthenticated);
    assert_code(
        forget(&app, 0, Some(ADMIN_TOKEN)).await,
        Code::InvalidArgument,
    );
    assert_eq!(
        rows_of(&app, "product_user_notification", 7).await,
        2,
        "nothing changed"
    );

    assert_eq!(forget(&app, 7, Some(ADMIN_TOKEN)).await.unwrap(), (2, 1));
    assert_eq!(rows_of(&app, "product_user_notification", 7).await, 0);
    assert_eq!(
        rows_of(&app, "product_user_notification_history", 7).await,
        0
    );
    assert_eq!(
        (waiting(&app, 1).await, waiting(&app, 2).await),
        (1, 0),
        "one user fewer waiting where the alert was active"
    );
    // Another user is untouched, and a second call deletes nothing.
    assert_eq!(app.history(1, 1).await, vec![8]);
    assert_eq!(forget(&app, 7, Some(ADMIN_TOKEN)).await.unwrap(), (0, 0));
    assert_eq!(forget(&app, 99, Some(ADMIN_TOKEN)).await.unwrap(), (0, 0));
}

/// Two users forgotten mid-run (on another instance than the run's, when clustered):
/// one just notified, and one a few sends ahead, in the page of the queue the run
/// already read. Neither is notified after the call returns, on any stream, and the
/// record ends up as every other user once, in order.
async fn forgetting_users_mid_run_stops_their_notifications(backend: Backend) {
    let options = Options {
        send_rate: 300,
        ..Options::new(backend)
    };
    let apps = match backend {
        Backend::MySql => spawn_cluster(2, options).await,
        Backend::Embedded => vec![spawn_app_with(options).await],
    };
    let (runner, eraser) = (&apps[0], apps.last().unwrap());
    let users: Vec<i64> = (1..=1_500).collect();
    runner.set_stock(1, 10).await;
    runner.register_bulk(1, &users).await;
    let mut stream = eraser.subscribe_to_product(1).await;
    runner.trigger(1, None).await.unwrap();
    // Users are their own positions: once 300 was streamed, 345 is 150 ms of sends
    // ahead, in a page the run has read (a fifth of a second's worth each).
    let head = 300;
    while take(&mut stream, 1).await[0].user_id < head {}
    let (notified, ahead) = (head, head + 45);
    for user in [ahead, notified] {
        let (alerts, _) = forget(eraser, user, Some(ADMIN_TOKEN)).await.unwrap();
        assert_eq!(alerts, 1);
    }
    // Everything the stream gets from here on was streamed after the calls returned.
    let mut seen_after = HashSet::new();
    while let Ok(Some(Ok(n))) =
        tokio::time::timeout(std::time::Duration::from_secs(3), stream.next()).await
    {
        seen_after.insert(n.user_id);
        if n.user_id == *users.last().unwrap() {
            break;
        }
    }
    assert!(
        !seen_after.contains(&ahead),
        "user {ahead} was notified after ForgetUser returned"
    );
    let run = runner.wait_until_final(1).await;
    assert_eq!(
        run.status(),
        RunStatus::Completed,
        "a hand-over is not a failure"
    );
    let expected: Vec<i64> = users
        .iter()
        .copied()
        .filter(|&u| u != notified && u != ahead)
        .collect();
    assert_eq!(runner.history(1, 1).await, expected);
    for user in [notified, ahead] {
        assert_eq!(
            rows_of(runner, "product_user_notification_history", user).await,
            0
        );
    }
}

crate::on_each_backend!(
    forget_user_deletes_every_alert_and_history_row_once,
    forgetting_users_mid_run_stops_their_notifications,
);
