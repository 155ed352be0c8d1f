//! Registering and cancelling alerts.

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

on_each_backend!(register_is_idempotent_and_cancel_then_register_moves_to_the_back,);
