//! Registering and cancelling alerts.

use restock_notifier::grpc::proto;

use crate::helpers::*;

async fn register_is_idempotent_and_cancel_then_register_moves_to_the_back(backend: Backend) {
    let app = spawn_app(backend).await;
    app.set_stock(1, 1).await;
    let first = app.register(1, 7).await;
    assert!(first.active);
    app.register(1, 8).await;
    let again = app.register(1, 7).await;
    assert_eq!(again.created_at, first.created_at);

    let position = |user: i64| {
        let db = app.db.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT position FROM product_user_notification WHERE product_id = 1 AND user_id = ?",
            )
            .bind(user)
            .fetch_one(&db)
            .await
            .unwrap()
        }
    };
    assert!(
        position(7).await < position(8).await,
        "an active alert keeps its place"
    );

    let cancelled = app.cancel(1, 7).await;
    assert!(!cancelled.active);
    let twice = app.cancel(1, 7).await;
    assert!(!twice.active, "cancel is idempotent");
    let back = app.register(1, 7).await;
    assert!(back.active);
    assert!(
        position(7).await > position(8).await,
        "re-registration goes to the back"
    );
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM product_user_notification")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(rows, 2);
}

async fn list_alerts(
    app: &TestApp,
    product: Option<i64>,
    user: Option<i64>,
    active_only: bool,
    page_size: i32,
    token: &str,
) -> Result<proto::ListAlertsResponse, tonic::Status> {
    app.client
        .clone()
        .list_alerts(proto::ListAlertsRequest {
            product_id: product,
            user_id: user,
            active_only,
            page_size,
            page_token: token.to_string(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Every page of a listing, as (product, user) pairs.
async fn every_alert(
    app: &TestApp,
    product: Option<i64>,
    user: Option<i64>,
    active_only: bool,
) -> Vec<Vec<(i64, i64)>> {
    let (mut pages, mut token) = (vec![], String::new());
    loop {
        let page = list_alerts(app, product, user, active_only, 2, &token)
            .await
            .unwrap();
        pages.push(
            page.alerts
                .iter()
                .map(|a| (a.product_id, a.user_id))
                .collect(),
        );
        if page.next_page_token.is_empty() {
            return pages;
        }
        token = page.next_page_token;
    }
}

async fn alerts_are_listed_by_product_in_queue_order_and_by_user_newest_first(backend: Backend) {
    let app = spawn_app(backend).await;
    for product in [1, 2, 3] {
        app.set_stock(product, 1).await;
    }
    for user in [7, 8, 9] {
        app.register(1, user).await;
    }
    app.cancel(1, 7).await;
    app.register(1, 7).await;
    app.cancel(1, 8).await;
    // User 9's alerts, registered for 1, then 3, then 2.
    app.register(3, 9).await;
    app.register(2, 9).await;

    // Product 1: 8 (cancelled) keeps its place, 7 went to the back.
    let every = every_alert(&app, Some(1), None, false).await;
    assert_eq!(every, vec![vec![(1, 8), (1, 9)], vec![(1, 7)]]);
    let waiting = every_alert(&app, Some(1), None, true).await;
    assert_eq!(waiting, vec![vec![(1, 9), (1, 7)]]);
    // User 9: the newest first.
    let theirs = every_alert(&app, None, Some(9), false).await;
    assert_eq!(theirs, vec![vec![(2, 9), (3, 9)], vec![(1, 9)]]);
    let one = every_alert(&app, Some(1), Some(8), true).await;
    assert_eq!(
        one,
        vec![Vec::<(i64, i64)>::new()],
        "cancelled, and only active asked"
    );
    let one = every_alert(&app, Some(1), Some(8), false).await;
    assert_eq!(one, vec![vec![(1, 8)]]);

    let first = list_alerts(&app, Some(1), None, false, 2, "")
        .await
        .unwrap();
    let refused = [
        list_alerts(&app, None, None, false, 2, "").await,
        list_alerts(&app, Some(1), None, true, 2, &first.next_page_token).await,
        list_alerts(&app, Some(2), None, false, 2, &first.next_page_token).await,
        list_alerts(&app, Some(0), None, false, 2, "").await,
        list_alerts(&app, None, Some(-1), false, 2, "").await,
        list_alerts(&app, Some(1), None, false, -5, "").await,
        list_alerts(&app, Some(1), None, false, 2, "AQ").await,
    ];
    for (i, answer) in refused.into_iter().enumerate() {
        assert_eq!(
            answer.unwrap_err().code(),
            tonic::Code::InvalidArgument,
            "case {i}"
        );
    }
}

async fn alert_status(app: &TestApp, product: i64, user: i64) -> proto::AlertStatus {
    app.client
        .clone()
        .get_alert(proto::GetAlertRequest {
            product_id: product,
            user_id: user,
        })
        .await
        .expect("GetAlert")
        .into_inner()
}

fn outcome(status: &proto::AlertStatus) -> Option<(i64, proto::AlertOutcome)> {
    status
        .latest_round
        .as_ref()
        .map(|r| (r.restock_round, r.outcome()))
}

async fn get_alert_tells_why_a_user_was_or_was_not_notified(backend: Backend) {
    use proto::AlertOutcome::*;
    let app = spawn_app(backend).await;
    app.set_stock(1, 5).await;
    for user in 1..=5 {
        app.register(1, user).await;
    }
    let before = alert_status(&app, 1, 3).await;
    assert_eq!((before.position, before.users_ahead), (3, 2));
    assert_eq!(
        (before.latest_round, before.last_notified_round),
        (None, None)
    );

    // Round 1 notifies everyone; user 6 registers after it started.
    app.trigger(1, None).await.unwrap();
    app.wait_until_final(1).await;
    app.register(1, 6).await;
    let three = alert_status(&app, 1, 3).await;
    assert_eq!(outcome(&three), Some((1, Notified)));
    assert_eq!(three.last_notified_round, Some(1));
    assert!(three.last_notified_at.is_some());
    assert_eq!(
        outcome(&alert_status(&app, 1, 6).await),
        Some((1, RegisteredAfter))
    );

    // Round 2 fails at user 4 (the database refuses to record it), after user 5
    // cancelled: the users its record holds were notified, the other active ones were
    // not reached (a failed commit may take a few before user 4 with it).
    crate::manual_restock::fail_recording_of(&app, 4).await;
    app.cancel(1, 5).await;
    app.trigger(1, None).await.unwrap();
    app.wait_until_final(1).await;
    let recorded = app.history(1, 2).await;
    assert!(!recorded.contains(&4), "{recorded:?}");
    for user in 1..=4 {
        let expected = if recorded.contains(&user) {
            Notified
        } else {
            NotReached
        };
        assert_eq!(
            outcome(&alert_status(&app, 1, user).await),
            Some((2, expected)),
            "user {user}"
        );
    }
    let five = alert_status(&app, 1, 5).await;
    assert_eq!(outcome(&five), Some((2, Inactive)));
    assert_eq!((five.position, five.users_ahead), (0, 0));
    assert_eq!(five.last_notified_round, Some(1), "notified in round 1");
    let six = alert_status(&app, 1, 6).await;
    assert_eq!(outcome(&six), Some((2, NotReached)));
    assert_eq!((six.position, six.users_ahead), (5, 4));

    let mut client = app.client.clone();
    let ask = |product, user| proto::GetAlertRequest {
        product_id: product,
        user_id: user,
    };
    let code = |answer: Result<tonic::Response<proto::AlertStatus>, tonic::Status>| {
        answer.unwrap_err().code()
    };
    assert_eq!(
        code(client.get_alert(ask(1, 99)).await),
        tonic::Code::NotFound
    );
    assert_eq!(
        code(client.get_alert(ask(0, 1)).await),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        code(client.get_alert(ask(1, -1)).await),
        tonic::Code::InvalidArgument
    );
}

async fn a_one_shot_alert_is_used_up_by_its_notification_even_across_a_resume(backend: Backend) {
    use proto::AlertOutcome::*;
    let app = spawn_app(backend).await;
    app.set_stock(1, 5).await;
    assert!(app.register_with(1, 1, true).await.once);
    app.register(1, 2).await;
    app.register_with(1, 3, true).await;
    app.register(1, 4).await;

    // Round 1 fails at user 4: users 1-3 may be recorded (and 1 and 3 used up in the
    // same transaction), then ManualRestock finishes the round.
    crate::manual_restock::fail_recording_of(&app, 4).await;
    app.trigger(1, None).await.unwrap();
    app.wait_until_final(1).await;
    crate::manual_restock::heal(&app).await;
    let recorded = app.history(1, 1).await;
    for user in [1, 3] {
        let status = alert_status(&app, 1, user).await;
        let used = recorded.contains(&user);
        assert_eq!(status.alert.unwrap().active, !used, "user {user}");
    }
    app.manual_restock(1, Some(ADMIN_TOKEN)).await.unwrap();
    app.wait_until_final(1).await;
    assert_eq!(
        app.history(1, 1).await,
        vec![1, 2, 3, 4],
        "each once, in order"
    );
    for user in [1, 3] {
        let status = alert_status(&app, 1, user).await;
        assert!(
            !status.alert.as_ref().unwrap().active,
            "user {user} used up"
        );
        assert_eq!(status.position, 0);
    }
    let product = app
        .client
        .clone()
        .get_product(proto::GetProductRequest { product_id: 1 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(product.waiting, 2, "the two one-shot alerts no longer wait");

    // Round 2 tells the other two only; the one-shot alerts were used before it.
    app.trigger(1, None).await.unwrap();
    app.wait_until_final(1).await;
    assert_eq!(app.history(1, 2).await, vec![2, 4]);
    assert_eq!(
        outcome(&alert_status(&app, 1, 1).await),
        Some((2, Inactive))
    );
    // Registering again makes it wait once more, at the back.
    let again = app.register_with(1, 1, true).await;
    assert!(again.active && again.once);
    assert_eq!(alert_status(&app, 1, 1).await.position, 3);
}

on_each_backend!(
    register_is_idempotent_and_cancel_then_register_moves_to_the_back,
    a_one_shot_alert_is_used_up_by_its_notification_even_across_a_resume,
    get_alert_tells_why_a_user_was_or_was_not_notified,
    alerts_are_listed_by_product_in_queue_order_and_by_user_newest_first,
);
