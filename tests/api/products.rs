//! Products and the demand report: `Product.waiting` kept with every alert change,
//! `GetProduct`, and `ListProducts` with the most users waiting first.

use restock_notifier::grpc::proto;
use tonic::Code;

use crate::helpers::*;

async fn product(app: &TestApp, id: i64) -> Result<proto::Product, tonic::Status> {
    app.client
        .clone()
        .get_product(proto::GetProductRequest { product_id: id })
        .await
        .map(tonic::Response::into_inner)
}

async fn waiting(app: &TestApp, id: i64) -> i64 {
    product(app, id).await.expect("GetProduct").waiting
}

/// What the alerts table holds: the count `waiting` stands for.
async fn active_alerts(app: &TestApp, id: i64) -> i64 {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM product_user_notification WHERE product_id = ? AND is_active = TRUE",
    )
    .bind(id)
    .fetch_one(&app.db)
    .await
    .unwrap()
}

async fn waiting_follows_every_alert_change(backend: Backend) {
    let app = spawn_app(backend).await;
    assert_eq!(app.set_stock(1, 5).await.waiting, 0);
    for user in [7, 8, 9] {
        app.register(1, user).await;
    }
    assert_eq!(waiting(&app, 1).await, 3);
    app.register(1, 7).await;
    assert_eq!(
        waiting(&app, 1).await,
        3,
        "registering again an active alert"
    );
    app.cancel(1, 8).await;
    app.cancel(1, 8).await;
    assert_eq!(waiting(&app, 1).await, 2, "cancelling twice counts once");
    app.register(1, 8).await;
    assert_eq!(
        waiting(&app, 1).await,
        3,
        "re-registering a cancelled alert"
    );
    assert_eq!(
        app.set_stock(1, 6).await.waiting,
        3,
        "SetStock answers it too"
    );
}

async fn waiting_stays_exact_under_concurrent_registrations_and_cancels(backend: Backend) {
    let app = spawn_app(backend).await;
    app.set_stock(1, 5).await;
    for user in 1..=20 {
        app.register(1, user).await;
    }
    let mut tasks = vec![];
    for user in 1..=40 {
        let client = app.client.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = client;
            for _ in 0..3 {
                // Users 1-20 cancel and come back, 21-40 register and may cancel.
                if user % 2 == 0 {
                    let cancel = proto::CancelAlertRequest {
                        product_id: 1,
                        user_id: user,
                    };
                    let _ = client.cancel_alert(cancel).await;
                }
                let register = proto::RegisterAlertRequest {
                    product_id: 1,
                    user_id: user,
                    once: false,
                };
                client.register_alert(register).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(active_alerts(&app, 1).await, 40);
    assert_eq!(waiting(&app, 1).await, 40);
    for user in (1..=40).step_by(3) {
        app.cancel(1, user).await;
    }
    assert_eq!(waiting(&app, 1).await, active_alerts(&app, 1).await);
}

async fn list(
    app: &TestApp,
    order: proto::ProductOrder,
    page_size: i32,
    token: &str,
) -> Result<proto::ListProductsResponse, tonic::Status> {
    app.client
        .clone()
        .list_products(proto::ListProductsRequest {
            order_by: order as i32,
            page_size,
            page_token: token.to_string(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Every page of the report, in `order`, `page_size` at a time.
async fn every_page(app: &TestApp, order: proto::ProductOrder, page_size: i32) -> Vec<Vec<i64>> {
    let mut pages = vec![];
    let mut token = String::new();
    loop {
        let page = list(app, order, page_size, &token).await.unwrap();
        pages.push(page.products.iter().map(|p| p.product_id).collect());
        if page.next_page_token.is_empty() {
            return pages;
        }
        token = page.next_page_token;
    }
}

async fn the_demand_report_lists_the_most_users_waiting_first(backend: Backend) {
    let app = spawn_app(backend).await;
    // Product -> users waiting: 1 -> 3, 2 -> 1, 3 -> 2, 4 -> 0, 5 -> 2.
    for (id, users) in [(1, 3), (2, 1), (3, 2), (4, 0), (5, 2)] {
        app.set_stock(id, 1).await;
        for user in 0..users {
            app.register(id, 100 + user).await;
        }
    }
    let by_waiting = every_page(&app, proto::ProductOrder::WaitingDesc, 2).await;
    assert_eq!(by_waiting, vec![vec![1, 5], vec![3, 2], vec![4]]);
    let default = every_page(&app, proto::ProductOrder::Unspecified, 10).await;
    assert_eq!(default, vec![vec![1, 5, 3, 2, 4]], "the default order");
    let by_id = every_page(&app, proto::ProductOrder::Id, 3).await;
    assert_eq!(by_id, vec![vec![1, 2, 3], vec![4, 5]]);
    let first = list(&app, proto::ProductOrder::WaitingDesc, 1, "")
        .await
        .unwrap();
    assert_eq!(first.products[0].waiting, 3);

    // A change between pages: the next page goes on from where the last one ended
    // (product 5, 2 waiting), and shows product 4 where it now belongs (1 waiting, a
    // higher id than product 2).
    let page = list(&app, proto::ProductOrder::WaitingDesc, 2, "")
        .await
        .unwrap();
    app.register(4, 100).await;
    let rest = list(
        &app,
        proto::ProductOrder::WaitingDesc,
        10,
        &page.next_page_token,
    )
    .await
    .unwrap();
    let rest: Vec<i64> = rest.products.iter().map(|p| p.product_id).collect();
    assert_eq!(rest, vec![3, 4, 2]);

    let refused = |answer: Result<proto::ListProductsResponse, tonic::Status>| {
        assert_eq!(answer.unwrap_err().code(), Code::InvalidArgument);
    };
    refused(list(&app, proto::ProductOrder::Id, 2, &page.next_page_token).await);
    refused(list(&app, proto::ProductOrder::Id, -1, "").await);
    refused(list(&app, proto::ProductOrder::Id, 2, "not-a-token").await);
    let mut client = app.client.clone();
    let unknown_order = client
        .list_products(proto::ListProductsRequest {
            order_by: 9,
            ..Default::default()
        })
        .await;
    refused(unknown_order.map(tonic::Response::into_inner));
}

async fn get_product_answers_unknown_and_bad_ids(backend: Backend) {
    let app = spawn_app(backend).await;
    assert_eq!(product(&app, 42).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(
        product(&app, 0).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    app.set_stock(42, 3).await;
    let found = product(&app, 42).await.unwrap();
    assert_eq!((found.product_id, found.stock, found.waiting), (42, 3, 0));
}

on_each_backend!(
    waiting_follows_every_alert_change,
    waiting_stays_exact_under_concurrent_registrations_and_cancels,
    the_demand_report_lists_the_most_users_waiting_first,
    get_product_answers_unknown_and_bad_ids,
    an_existing_database_is_upgraded_with_waiting_backfilled,
);

/// The migration that added `waiting`, on a database that already held alerts: the
/// count is backfilled from them.
async fn an_existing_database_is_upgraded_with_waiting_backfilled(backend: Backend) {
    const ADDS_WAITING: i64 = 20261207000001;
    sqlx::any::install_default_drivers();
    let database = backend.fresh_database();
    let url = match backend {
        Backend::MySql => {
            let server = sqlx::AnyPool::connect(&mysql_server_url()).await.unwrap();
            sqlx::query(&format!("CREATE DATABASE {database}"))
                .execute(&server)
                .await
                .unwrap();
            backend.database_url(&database)
        }
        Backend::Embedded => format!("{}?mode=rwc", backend.database_url(&database)),
    };
    let db = sqlx::AnyPool::connect(&url).await.unwrap();
    let migrator = || match backend {
        Backend::MySql => sqlx::migrate!("./migrations/mysql"),
        Backend::Embedded => sqlx::migrate!("./migrations/sqlite"),
    };
    let mut before = migrator();
    before.migrations = before
        .migrations
        .iter()
        .filter(|m| m.version < ADDS_WAITING)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    before.run(&db).await.unwrap();
    for (product, users, cancelled) in [(1, 4, 1), (2, 0, 0), (3, 2, 2)] {
        sqlx::query("INSERT INTO product (id, stock, alert_seq) VALUES (?, 1, ?)")
            .bind(product)
            .bind(users)
            .execute(&db)
            .await
            .unwrap();
        for user in 1..=users {
            sqlx::query(
                "INSERT INTO product_user_notification (product_id, user_id, is_active, position) \
                 VALUES (?, ?, ?, ?)",
            )
            .bind(product)
            .bind(user)
            .bind(user > cancelled)
            .bind(user)
            .execute(&db)
            .await
            .unwrap();
        }
    }
    migrator().run(&db).await.unwrap();
    let waiting: Vec<(i64, i64)> = sqlx::query_as("SELECT id, waiting FROM product ORDER BY id")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(waiting, vec![(1, 3), (2, 0), (3, 0)]);
    db.close().await;
    drop_database(backend, &database);
}
