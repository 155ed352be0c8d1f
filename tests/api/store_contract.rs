//! The `Store` contract: every operation and its edge cases, run against the MySQL
//! store and the SQLite one, each on a fresh database. A run whose lease has run out is
//! made by claiming it with a lease of zero, not by waiting.

use std::time::Duration;

use chrono::Utc;
use restock_notifier::domain::{
    Error, IdempotencyKey, NotResumable, NotificationFilter, NotificationId, ProductId,
    Registration, RunFilter, RunStatus, TriggerRequest, UserId, Wave,
};
use restock_notifier::store::mysql::MySqlStore;
use restock_notifier::store::sqlite::SqliteStore;
use restock_notifier::store::{
    After, Claimed, ClaimedRun, FinalStatus, RunClaim, SentNotification, Store, Triggered,
};
use sqlx::AnyPool;

use crate::helpers::{Backend, drop_database, mysql_server_url};

const LEASE: Duration = Duration::from_secs(10);

/// A store on a database of its own, and a plain pool on that database for what the
/// contract says about the tables; the database goes when the test ends.
struct Fresh {
    store: Box<dyn Store>,
    db: AnyPool,
    backend: Backend,
    /// The MySQL database's name, or the SQLite file's path.
    database: String,
}

async fn fresh(backend: Backend) -> Fresh {
    let id = format!("{:016x}", rand::random::<u64>());
    let (database, url) = match backend {
        Backend::MySql => {
            let name = format!("restock_store_{id}");
            let url = format!("{}/{name}", mysql_server_url());
            (name, url)
        }
        Backend::Embedded => {
            let path = std::env::temp_dir()
                .join(format!("restock-store-{id}.db"))
                .to_string_lossy()
                .into_owned();
            let url = format!("sqlite://{path}");
            (path, url)
        }
    };
    let store: Box<dyn Store> = match backend {
        Backend::MySql => Box::new(MySqlStore::connect(&url, LEASE, None).await.unwrap()),
        Backend::Embedded => Box::new(SqliteStore::connect(&url).await.unwrap()),
    };
    sqlx::any::install_default_drivers();
    let db = AnyPool::connect(&url).await.unwrap();
    Fresh {
        store,
        db,
        backend,
        database,
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        drop_database(self.backend, &self.database);
    }
}

impl Fresh {
    /// Whether a takeover now finds no run whose lease ran out.
    async fn nothing_to_take_over(&self) -> bool {
        self.store
            .take_over_expired(LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    }

    /// A product with `stock` and `users` registered in this order.
    async fn product(&self, id: i64, stock: i64, users: &[i64]) -> ProductId {
        let product = ProductId::parse(id).unwrap();
        self.store.set_stock(product, stock, None).await.unwrap();
        for &u in users {
            self.store
                .register_alert(product, UserId::parse(u).unwrap(), false)
                .await
                .unwrap();
        }
        product
    }

    async fn start(&self, product: ProductId, request: TriggerRequest) -> ClaimedRun {
        self.start_with_lease(product, request, LEASE).await
    }

    /// Why `start_run` refuses `request`.
    async fn refused_start(&self, product: ProductId, request: &TriggerRequest) -> Error {
        self.store
            .start_run(product, request, LEASE)
            .await
            .expect_err("start_run refuses")
    }

    async fn start_with_lease(
        &self,
        product: ProductId,
        request: TriggerRequest,
        lease: Duration,
    ) -> ClaimedRun {
        match self.store.start_run(product, &request, lease).await {
            Ok(Triggered::Started(claimed)) => claimed,
            other => panic!("expected a started run, got {other:?}"),
        }
    }

    /// The whole queue of a claim, from the front.
    async fn queue(&self, claim: &RunClaim) -> Vec<Registration> {
        self.store
            .next_registrations(claim, None, 1_000)
            .await
            .unwrap()
    }

    async fn record(&self, claim: &RunClaim, sent: &[Registration], after: After) -> Claimed {
        self.store
            .record(claim, &sent_now(sent), after, LEASE, None)
            .await
            .unwrap()
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.db).await.unwrap()
    }

    async fn history_rows(&self, product: ProductId) -> i64 {
        self.count(&format!(
            "SELECT COUNT(*) FROM product_user_notification_history WHERE product_id = {}",
            product.get()
        ))
        .await
    }
}

fn sent_now(registrations: &[Registration]) -> Vec<SentNotification> {
    registrations
        .iter()
        .map(|&registration| SentNotification {
            registration,
            sent_at: Utc::now(),
        })
        .collect()
}

fn users(registrations: &[Registration]) -> Vec<i64> {
    registrations.iter().map(|r| r.user_id.get()).collect()
}

fn user(id: i64) -> UserId {
    UserId::parse(id).unwrap()
}

fn key(raw: &str) -> Option<IdempotencyKey> {
    Some(IdempotencyKey::parse(raw.into()).unwrap())
}

async fn set_stock_creates_the_product_and_bumps_its_version_on_every_write(backend: Backend) {
    let t = fresh(backend).await;
    let product = ProductId::parse(7).unwrap();
    assert_eq!(t.store.product(product).await.unwrap(), None);
    let created = t.store.set_stock(product, 5, None).await.unwrap();
    assert_eq!(
        (
            created.stock,
            created.min_stock,
            created.stock_version,
            created.restock_round
        ),
        (5, 1, 1, 0)
    );
    // A threshold is a write of the figure too: it bumps the version, and stays until
    // set again.
    let raised = t.store.set_stock(product, 5, Some(3)).await.unwrap();
    assert_eq!((raised.min_stock, raised.stock_version), (3, 2));
    let updated = t.store.set_stock(product, 0, None).await.unwrap();
    assert_eq!(
        (updated.stock, updated.min_stock, updated.stock_version),
        (0, 3, 3)
    );
    assert_eq!(t.store.product(product).await.unwrap(), Some(updated));
}

async fn register_alert_needs_a_known_product(backend: Backend) {
    let t = fresh(backend).await;
    let product = ProductId::parse(1).unwrap();
    let refused = t
        .store
        .register_alert(product, user(1), false)
        .await
        .unwrap_err();
    assert!(
        matches!(refused, Error::UnknownProduct(p) if p == product),
        "{refused:?}"
    );
}

async fn an_active_alert_registered_again_keeps_its_place(backend: Backend) {
    let t = fresh(backend).await;
    let product = t.product(1, 5, &[1, 2]).await;
    let again = t
        .store
        .register_alert(product, user(1), false)
        .await
        .unwrap();
    assert!(again.active);
    let run = t.start(product, TriggerRequest::default()).await;
    assert_eq!(users(&t.queue(&run.claim).await), [1, 2]);
}

async fn a_cancelled_alert_registered_again_goes_to_the_back(backend: Backend) {
    let t = fresh(backend).await;
    let product = t.product(1, 5, &[1, 2, 3]).await;
    let cancelled = t.store.cancel_alert(product, user(1)).await.unwrap();
    assert!(!cancelled.active);
    assert!(
        t.store
            .register_alert(product, user(1), false)
            .await
            .unwrap()
            .active
    );
    let run = t.start(product, TriggerRequest::default()).await;
    assert_eq!(users(&t.queue(&run.claim).await), [2, 3, 1]);
}

async fn cancelling_an_alert_never_registered_is_refused(backend: Backend) {
    let t = fresh(backend).await;
    let product = t.product(1, 5, &[1]).await;
    let refused = t.store.cancel_alert(product, user(2)).await.unwrap_err();
    assert!(matches!(refused, Error::UnknownAlert { .. }), "{refused:?}");
    // Cancelling twice is not an error: the alert exists, inactive.
    t.store.cancel_alert(product, user(1)).await.unwrap();
    assert!(!t.store.cancel_alert(product, user(1)).await.unwrap().active);
}

async fn start_run_starts_the_next_round_with_the_first_claim(backend: Backend) {
    let t = fresh(backend).await;
    let product = t.product(1, 5, &[1, 2]).await;
    let run = t.start(product, TriggerRequest::default()).await;
    assert_eq!(run.claim.restock_round, 1);
    assert_eq!(run.claim.token, 1);
    assert_eq!(run.cursor, None);
    assert_eq!(run.claim.queue_end, Some(2));
    assert_eq!(run.run.status, RunStatus::InProgress);
    assert_eq!(run.run.last_error, None);
    assert_eq!(
        t.store
            .product(product)
            .await
            .unwrap()
            .unwrap()
            .restock_round,
        1
    );
    assert!(t.store.holds_claim(&run.claim).await.unwrap());
}

async fn start_run_refuses_unknown_and_out_of_stock_products_and_changes_nothing(backend: Backend) {
    let t = fresh(backend).await;
    let unknown = ProductId::parse(9).unwrap();
    let refused = t.refused_start(unknown, &TriggerRequest::default()).await;
    assert!(matches!(refused, Error::UnknownProduct(_)), "{refused:?}");

    let product = t.product(1, 5, &[1]).await;
    let request = TriggerRequest {
        stock: Some(0),
        idempotency_key: key("first"),
        ..Default::default()
    };
    let refused = t.refused_start(product, &request).await;
    assert!(
        matches!(refused, Error::OutOfStock { stock: 0, .. }),
        "{refused:?}"
    );
    let unchanged = t.store.product(product).await.unwrap().unwrap();
    assert_eq!((unchanged.stock, unchanged.stock_version), (5, 1));
    assert_eq!(unchanged.restock_round, 0);
    // A refused call stores no key: the same key starts a run once there is stock.
    let request = TriggerRequest {
        stock: Some(3),
        idempotency_key: key("first"),
        ..Default::default()
    };
    t.start(product, request).await;
}

async fn start_run_refuses_while_a_run_is_in_progress_and_changes_nothing(backend: Backend) {
    let t = fresh(backend).await;
    let product = t.product(1, 5, &[1]).await;
    t.start(product, TriggerRequest::default()).await;
    let request = TriggerRequest {
        stock: Some(0),
        ..Default::default()
    };
    let refused = t.refused_start(product, &request).await;
    assert!(
        matches!(refused, Error::RunInProgress { round: 1, .. }),
        "{refused:?}"
    );
    assert_eq!(t.store.product(product).await.unwrap().unwrap().stock, 5);
}

/// Decided once for both databases: any run of the product in progress refuses a new
/// one, whichever its round (the one the unique index on in-progress runs would name).
async fn start_run_refuses_while_any_round_of_the_product_is_in_progress(backend: Backend) {
    let t = fresh(backend).await;
    let product = t.product(1, 5, &[1]).await;
    for _ in 0..2 {
        let run = t.start(product, TriggerRequest::default()).await;
        let done = t.record(&run.claim, &[], After::Finish(FinalStatus::Completed));
        assert_eq!(done.await, Claimed::Yes);
    }
    sqlx::query(&format!(
        "UPDATE product_notification_history SET status = 'IN_PROGRESS' \
         WHERE product_id = {} AND restock_round = 1",
        product.get()
    ))
    .execute(&t.db)
    .await
    .unwrap();
    let refused = t.refused_start(product, &TriggerRequest::default()).await;
    assert!(
        matches!(refused, Error::RunInProgress { round: 1, .. }),
        "{refused:?}"
    );
    assert_eq!(
        t.store
            .product(product)
            .await
            .unwrap()
            .unwrap()
            .restock_round,
        2
    );
}

async fn a_key_already_used_replays_its_run_before_any_refusal(backend: Backend) {
    let t = fresh(backend).await;
    let product = t.product(1, 5, &[1]).await;
    let request = TriggerRequest {
        idempotency_key: key("order-17"),
        ..Default::default()
    };
    let first = t.start(product, request.clone()).await;
    // In progress, and with a stock that would refuse it: still the same run.
    let retry = TriggerRequest {
        stock: Some(0),
        ..request.clone()
    };
    match t.store.start_run(product, &retry, LEASE).await.unwrap() {
        Triggered::Replayed(run) => assert_eq!(run, first.run),
        other => panic!("expected a replay, got {other:?}"),
    }
    assert_eq!(t.store.product(product).await.unwrap().unwrap().stock, 5);
    // Keys compare byte for byte: another case is another key.
    t.record(&first.claim, &[], After::Finish(FinalStatus::Completed))
        .await;
    let other = TriggerRequest {
        idempotency_key: key("ORDER-17"),
        ..Default::default()
    };
    assert_eq!(t.start(product, other).await.claim.restock_round, 2);
}

async fn expired_keys_are_forgotten_oldest_first_up_to_the_limit(backend: Backend) {
    let t = fresh(backend).await;
    let product = t.product(1, 5, &[1]).await;
    for (i, k) in ["a", "b", "c"].into_iter().enumerate() {
        let run = t
            .start(
                product,
                TriggerRequest {
                    idempotency_key: key(k),
                    ..Default::default()
                },
            )
            .await;
        t.record(&run.claim, &[], After::Finish(FinalStatus::Completed))
            .await;
        // Keys "a" and "b" are aged past the retention, "a" the older.
        let age_days = 3 - i as i64;
        if k != "c" {
            let aged = match t.backend {
                Backend::MySql => format!(
                    "UPDATE trigger_idempotency_key \
                     SET created_at = created_at - INTERVAL {age_days} DAY WHERE idempotency_key = '{k}'"
                ),
                Backend::Embedded => format!(
                    "UPDATE trigger_idempotency_key \
                     SET created_at = created_at - {} WHERE idempotency_key = '{k}'",
                    age_days * 86_400_000_000
                ),
            };
            sqlx::query(&aged).execute(&t.db).await.unwrap();
        }
    }
    assert_eq!(t.store.forget_expired_trigger_keys(1).await.unwrap(), 1);
    let left = "SELECT COUNT(*) FROM trigger_idempotency_key WHERE idempotency_key = 'a'";
    assert_eq!(t.count(left).await, 0, "the oldest goes first");
    assert_eq!(t.store.forget_expired_trigger_keys(10).await.unwrap(), 1);
    assert_eq!(t.store.forget_expired_trigger_keys(10).await.unwrap(), 0);
    assert_eq!(
        t.count("SELECT COUNT(*) FROM trigger_idempotency_key")
            .await,
        1
    );
}

async fn resume_run_refuses_what_is_not_a_failed_run_in_stock(backend: Backend) {
    let t = fresh(backend).await;
    let unknown = ProductId::parse(9).unwrap();
    let refused = t.store.resume_run(unknown, LEASE).await.unwrap_err();
    assert!(matches!(refused, Error::UnknownProduct(_)), "{refused:?}");

    let product = t.product(1, 5, &[1]).await;
    let refused = t.store.resume_run(product, LEASE).await.unwrap_err();
    assert!(
        matches!(
            refused,
            Error::NothingToResume {
                round: 0,
                why: NotResumable::NeverRestocked,
                ..
            }
        ),
        "{refused:?}"
    );
    let run = t.start(product, TriggerRequest::default()).await;
    let refused = t.store.resume_run(product, LEASE).await.unwrap_err();
    assert!(
        matches!(refused, Error::RunInProgress { round: 1, .. }),
        "{refused:?}"
    );

    for (end, why) in [
        (FinalStatus::Completed, NotResumable::Completed),
        (FinalStatus::SoldOut, NotResumable::SoldOut),
    ] {
        let run = match end {
            FinalStatus::Completed => run.clone(),
            _ => t.start(product, TriggerRequest::default()).await,
        };
        t.record(&run.claim, &[], After::Finish(end)).await;
        let refused = t.store.resume_run(product, LEASE).await.unwrap_err();
        assert!(
            matches!(refused, Error::NothingToResume { why: w, .. } if w == why),
            "{refused:?}"
        );
    }

    let run = t.start(product, TriggerRequest::default()).await;
    t.record(&run.claim, &[], After::Finish(FinalStatus::Error))
        .await;
    t.store.set_stock(product, 0, None).await.unwrap();
    let refused = t.store.resume_run(product, LEASE).await.unwrap_err();
    assert!(
        matches!(refused, Error::OutOfStock { stock: 0, .. }),
        "{refused:?}"
    );
}

async fn resume_run_continues_a_failed_run_after_its_cursor_with_a_newer_claim(backend: Backend) {
    let t = fresh(backend).await;
    let product = t.product(1, 5, &[1, 2, 3]).await;
    let run = t.start(product, TriggerRequest::default()).await;
    let queue = t.queue(&run.claim).await;
    let failed = t
        .store
        .record(
            &run.claim,
            &sent_now(&queue[..2]),
            After::Finish(FinalStatus::Error),
            LEASE,
            Some("webhook answered 500"),
        )
        .await
        .unwrap();
    assert_eq!(failed, Claimed::Yes);
    let stored = t.store.run(product, None).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::CanceledByError);
    assert_eq!(stored.last_error.as_deref(), Some("webhook answered 500"));

    let resumed = t.store.resume_run(product, LEASE).await.unwrap();
    assert_eq!(resumed.claim.restock_round, 1);
    assert_eq!(resumed.claim.token, 2);
    assert_eq!(resumed.cursor, Some(queue[1].position));
    assert_eq!(resumed.run.status, RunStatus::InProgress);
    assert!(!t.store.holds_claim(&run.claim).await.unwrap());
    let rest = t
        .store
        .next_registrations(&resumed.claim, resumed.cursor, 10)
        .await
        .unwrap();
    assert_eq!(users(&rest), [3]);
}

/// Decided once for both databases: a claim granted on a run (a resume, a takeover)
/// clears the error it failed with, as the migration that added `last_error` says.
async fn a_resumed_run_has_no_last_error(backend: Backend) {
    let t = fresh(backend).await;
    let product = t.product(1, 5, &[1]).await;
    let run = t.start(product, TriggerRequest::default()).await;
    t.store
        .record(
            &run.claim,
            &[],
            After::Finish(FinalStatus::Error),
            LEASE,
            Some("redis unavailable"),
        )
        .await
        .unwrap();
    let resumed = t.store.resume_run(product, LEASE).await.unwrap();
    assert_eq!(resumed.run.last_error, None);
    let stored = t.store.run(product, None).await.unwrap().unwrap();
    assert_eq!(stored.last_error, None);
}

async fn record_writes_the_history_and_moves_the_cursor_together(backend: Backend) {
    let t = fresh(backend).await;
    let product = t.product(1, 5, &[1, 2, 3]).await;
    let run = t.start(product, TriggerRequest::default()).await;
    let queue = t.queue(&run.claim).await;
    assert_eq!(
        t.record(&run.claim, &queue[..2], After::Renew).await,
        Claimed::Yes
    );
    let stored = t.store.run(product, Some(1)).await.unwrap().unwrap();
    assert_eq!(stored.sent_count, 2);
    assert_eq!(stored.last_sent_user_id, Some(user(2)));
    let progress = t.store.run_progress(product, 1).await.unwrap().unwrap();
    assert_eq!(progress.status, RunStatus::InProgress);
    assert_eq!(progress.recorded_position, Some(queue[1].position));
    assert_eq!(t.history_rows(product).await, 2);
    // The claim still holds after a renewal, and an empty record changes no cursor.
    assert_eq!(t.record(&run.claim, &[], After::Renew).await, Claimed::Yes);
    let progress = t.store.run_progress(product, 1).await.unwrap().unwrap();
    assert_eq!(progress.recorded_position, Some(queue[1].position));
    assert_eq!(t.store.run_progress(product, 2).await.unwrap(), None);
}

async fn record_keeps_last_error_only_with_canceled_by_error(backend: Backend) {
    let t = fresh(backend).await;
    let product = t.product(1, 5, &[1]).await;
    let run = t.start(product, TriggerRequest::default()).await;
    let done = t
        .store
        .record(
            &run.claim,
            &[],
            After::Finish(FinalStatus::Completed),
            LEASE,
            Some("ignored"),
        )
        .await
        .unwrap();
    assert_eq!(done, Claimed::Yes);
    let stored = t.store.run(product, None).await.unwrap().unwrap();
    assert_eq!(
        (stored.status, stored.last_error),
        (RunStatus::Completed, None)
    );
    assert!(!t.store.holds_claim(&run.claim).await.unwrap());
    // A final run takes no more writes of its claim.
    assert_eq!(t.record(&run.claim, &[], After::Renew).await, Claimed::Lost);
}

async fn record_by_a_claim_whose_lease_ran_out_is_lost_and_writes_nothing(backend: Backend) {
    let t = fresh(backend).await;
    let product = t.product(1, 5, &[1, 2]).await;
    let run = t
        .start_with_lease(product, TriggerRequest::default(), Duration::ZERO)
        .await;
    let queue = t.queue(&run.claim).await;
    assert_eq!(
        t.record(&run.claim, &queue, After::Renew).await,
        Claimed::Lost
    );
    assert_eq!(t.history_rows(product).await, 0);
    assert_eq!(
        t.store
            .run(product, None)
            .await
            .unwrap()
            .unwrap()
            .sent_count,
        0
    );
    let wave = t.store.start_wave(&run.claim, 4, 0, LEASE).await.unwrap();
    assert_eq!(wave, Claimed::Lost);
}

/// Decided once for both databases: the history is written before the conditional
/// update (G8, G10), and a claim that lost the run is `Lost` even when its rows collide
/// with those its new owner recorded, rather than failing on the unique key.
async fn record_by_a_claim_taken_over_is_lost_even_for_users_the_new_owner_recorded(
    backend: Backend,
) {
    let t = fresh(backend).await;
    let product = t.product(1, 5, &[1, 2]).await;
    let old = t
        .start_with_lease(product, TriggerRequest::default(), Duration::ZERO)
        .await;
    let taken = t.store.take_over_expired(LEASE, 10).await.unwrap();
    assert_eq!(taken.len(), 1);
    let new = &taken[0];
    assert_eq!(new.claim.token, old.claim.token + 1);
    let queue = t.queue(&new.claim).await;
    assert_eq!(
        t.record(&new.claim, &queue[..1], After::Renew).await,
        Claimed::Yes
    );
    assert_eq!(
        t.record(&old.claim, &queue, After::Renew).await,
        Claimed::Lost
    );
    assert_eq!(t.history_rows(product).await, 1);
    assert!(t.store.holds_claim(&new.claim).await.unwrap());
    assert!(!t.store.holds_claim(&old.claim).await.unwrap());
}

async fn a_released_run_is_taken_over_at_once_from_its_cursor(backend: Backend) {
    let t = fresh(backend).await;
    let product = t.product(1, 5, &[1, 2]).await;
    let run = t.start(product, TriggerRequest::default()).await;
    let queue = t.queue(&run.claim).await;
    assert_eq!(
        t.record(&run.claim, &queue[..1], After::Release).await,
        Claimed::Yes
    );
    assert!(!t.store.holds_claim(&run.claim).await.unwrap());
    assert_eq!(
        t.store.run(product, None).await.unwrap().unwrap().status,
        RunStatus::InProgress
    );
    let taken = t.store.take_over_expired(LEASE, 10).await.unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].claim.token, 2);
    assert_eq!(taken[0].cursor, Some(queue[0].position));
    assert_eq!(taken[0].claim.queue_end, run.claim.queue_end);
    // Taken: its new lease is running.
    assert!(t.nothing_to_take_over().await);
}

async fn take_over_expired_claims_each_expired_run_once_up_to_the_limit(backend: Backend) {
    let t = fresh(backend).await;
    for id in 1..=3 {
        let product = t.product(id, 5, &[1]).await;
        let lease = if id == 3 { LEASE } else { Duration::ZERO };
        t.start_with_lease(product, TriggerRequest::default(), lease)
            .await;
    }
    let first = t.store.take_over_expired(LEASE, 1).await.unwrap();
    let second = t.store.take_over_expired(LEASE, 10).await.unwrap();
    assert_eq!((first.len(), second.len()), (1, 1));
    let mut products = [first[0].claim.product_id, second[0].claim.product_id].map(|p| p.get());
    products.sort();
    assert_eq!(products, [1, 2], "the run with a live lease stays");
    assert!(t.nothing_to_take_over().await);
}

async fn a_wave_waits_with_its_claim_released_until_its_next_wave(backend: Backend) {
    let t = fresh(backend).await;
    let product = t.product(1, 5, &[1, 2]).await;
    let wave = Wave {
        per_unit: 2,
        interval: Duration::from_secs(60),
    };
    let request = TriggerRequest {
        wave: Some(wave),
        ..Default::default()
    };
    let run = t.start(product, request).await;
    let state = run.run.wave.expect("a wave run");
    assert_eq!((state.wave, state.quota), (wave, None));
    let started = t.store.start_wave(&run.claim, 4, 0, LEASE).await.unwrap();
    assert_eq!(started, Claimed::Yes);
    let state = t
        .store
        .run(product, None)
        .await
        .unwrap()
        .unwrap()
        .wave
        .unwrap();
    assert_eq!((state.quota, state.started_count), (Some(4), Some(0)));
    let waiting = t
        .record(&run.claim, &[], After::WaitForWave(wave.interval))
        .await;
    assert_eq!(waiting, Claimed::Yes);
    let state = t
        .store
        .run(product, None)
        .await
        .unwrap()
        .unwrap()
        .wave
        .unwrap();
    let next = state.next_wave_at.expect("the next wave is set");
    assert!(next > Utc::now() + chrono::Duration::seconds(50), "{next}");
    assert!(!t.store.holds_claim(&run.claim).await.unwrap());
    assert!(t.nothing_to_take_over().await);
}

async fn next_registrations_pages_after_the_cursor_and_skips_users_recorded_in_the_round(
    backend: Backend,
) {
    let t = fresh(backend).await;
    let product = t.product(1, 5, &[1, 2, 3, 4]).await;
    let run = t.start(product, TriggerRequest::default()).await;
    let page = t
        .store
        .next_registrations(&run.claim, None, 2)
        .await
        .unwrap();
    assert_eq!(users(&page), [1, 2]);
    let next = t
        .store
        .next_registrations(&run.claim, Some(page[1].position), 2)
        .await
        .unwrap();
    assert_eq!(users(&next), [3, 4]);
    // User 1, recorded, registers again during the round: at the back, and left out.
    t.record(&run.claim, &page[..1], After::Renew).await;
    t.store.cancel_alert(product, user(1)).await.unwrap();
    t.store
        .register_alert(product, user(1), false)
        .await
        .unwrap();
    t.store
        .register_alert(product, user(5), false)
        .await
        .unwrap();
    let mut rest = vec![];
    let mut cursor = Some(page[0].position);
    loop {
        let page = t
            .store
            .next_registrations(&run.claim, cursor, 10)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        cursor = Some(last.position);
        rest.extend(users(&page));
    }
    assert_eq!(rest, [2, 3, 4, 5]);
}

async fn recorded_notifications_are_read_by_id_by_run_position_and_in_recording_order(
    backend: Backend,
) {
    let t = fresh(backend).await;
    let a = t.product(1, 5, &[1, 2]).await;
    let b = t.product(2, 5, &[1]).await;
    let run_a = t.start(a, TriggerRequest::default()).await;
    let run_b = t.start(b, TriggerRequest::default()).await;
    let queue_a = t.queue(&run_a.claim).await;
    let queue_b = t.queue(&run_b.claim).await;
    t.record(&run_a.claim, &queue_a, After::Renew).await;
    t.record(&run_b.claim, &queue_b, After::Renew).await;

    let all = t
        .store
        .recorded_after(0, NotificationFilter::default(), 10)
        .await
        .unwrap();
    let ids: Vec<_> = all
        .iter()
        .map(|r| {
            (
                r.notification.id.product_id.get(),
                r.notification.id.user_id.get(),
            )
        })
        .collect();
    assert_eq!(ids, [(1, 1), (1, 2), (2, 1)]);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    let of_b = NotificationFilter {
        product_id: Some(b),
        ..Default::default()
    };
    assert_eq!(t.store.recorded_after(0, of_b, 10).await.unwrap().len(), 1);
    let of_user_1 = NotificationFilter {
        user_id: Some(user(1)),
        ..Default::default()
    };
    assert_eq!(
        t.store
            .recorded_after(0, of_user_1, 10)
            .await
            .unwrap()
            .len(),
        2
    );
    let after_first = t
        .store
        .recorded_after(all[0].seq, NotificationFilter::default(), 1)
        .await
        .unwrap();
    assert_eq!(after_first, all[1..2]);

    let in_run = t
        .store
        .recorded_in_run(a, 1, Some(queue_a[0].position), queue_a[1].position, 10)
        .await
        .unwrap();
    assert_eq!(in_run, all[1..2]);
    let whole_run = t
        .store
        .recorded_in_run(a, 1, None, queue_a[1].position, 10)
        .await
        .unwrap();
    assert_eq!(whole_run, all[..2]);

    let id = all[2].notification.id;
    assert_eq!(t.store.recorded(id).await.unwrap().as_ref(), Some(&all[2]));
    assert_eq!(all[2].position, Some(queue_b[0].position));
    let never = NotificationId {
        restock_round: 2,
        ..id
    };
    assert_eq!(t.store.recorded(never).await.unwrap(), None);
}

async fn runs_are_read_by_round_and_listed_newest_first_by_filter(backend: Backend) {
    let t = fresh(backend).await;
    let a = t.product(1, 5, &[1]).await;
    let b = t.product(2, 5, &[1]).await;
    let first = t.start(a, TriggerRequest::default()).await;
    t.record(&first.claim, &[], After::Finish(FinalStatus::Completed))
        .await;
    t.start(a, TriggerRequest::default()).await;
    t.start(b, TriggerRequest::default()).await;

    assert_eq!(
        t.store
            .run(a, Some(1))
            .await
            .unwrap()
            .unwrap()
            .restock_round,
        1
    );
    assert_eq!(
        t.store.run(a, None).await.unwrap().unwrap().restock_round,
        2
    );
    assert_eq!(t.store.run(a, Some(3)).await.unwrap(), None);

    let list = |filter, before, limit| t.store.list_runs(filter, before, limit);
    let all = list(RunFilter::default(), None, 10).await.unwrap();
    let order: Vec<_> = all
        .iter()
        .map(|r| (r.run.product_id.get(), r.run.restock_round))
        .collect();
    assert_eq!(order, [(2, 1), (1, 2), (1, 1)]);
    assert!(all.windows(2).all(|w| w[0].key > w[1].key));
    let page = list(RunFilter::default(), Some(all[0].key), 1)
        .await
        .unwrap();
    assert_eq!(page, all[1..2]);
    let of_a = RunFilter {
        product_id: Some(a),
        ..Default::default()
    };
    assert_eq!(list(of_a, None, 10).await.unwrap(), all[1..]);
    let in_progress = RunFilter {
        status: Some(RunStatus::InProgress),
        ..Default::default()
    };
    assert_eq!(list(in_progress, None, 10).await.unwrap(), all[..2]);
    let of_a_in_progress = RunFilter {
        status: Some(RunStatus::InProgress),
        product_id: Some(a),
    };
    assert_eq!(list(of_a_in_progress, None, 10).await.unwrap(), all[1..2]);
}

async fn the_clock_is_the_databases_and_close_to_this_hosts(backend: Backend) {
    let t = fresh(backend).await;
    let skew = t.store.clock().await.unwrap() - Utc::now();
    assert!(skew.num_seconds().abs() < 5, "{skew}");
}

on_each_backend!(
    set_stock_creates_the_product_and_bumps_its_version_on_every_write,
    register_alert_needs_a_known_product,
    an_active_alert_registered_again_keeps_its_place,
    a_cancelled_alert_registered_again_goes_to_the_back,
    cancelling_an_alert_never_registered_is_refused,
    start_run_starts_the_next_round_with_the_first_claim,
    start_run_refuses_unknown_and_out_of_stock_products_and_changes_nothing,
    start_run_refuses_while_a_run_is_in_progress_and_changes_nothing,
    start_run_refuses_while_any_round_of_the_product_is_in_progress,
    a_key_already_used_replays_its_run_before_any_refusal,
    expired_keys_are_forgotten_oldest_first_up_to_the_limit,
    resume_run_refuses_what_is_not_a_failed_run_in_stock,
    resume_run_continues_a_failed_run_after_its_cursor_with_a_newer_claim,
    a_resumed_run_has_no_last_error,
    record_writes_the_history_and_moves_the_cursor_together,
    record_keeps_last_error_only_with_canceled_by_error,
    record_by_a_claim_whose_lease_ran_out_is_lost_and_writes_nothing,
    record_by_a_claim_taken_over_is_lost_even_for_users_the_new_owner_recorded,
    a_released_run_is_taken_over_at_once_from_its_cursor,
    take_over_expired_claims_each_expired_run_once_up_to_the_limit,
    a_wave_waits_with_its_claim_released_until_its_next_wave,
    next_registrations_pages_after_the_cursor_and_skips_users_recorded_in_the_round,
    recorded_notifications_are_read_by_id_by_run_position_and_in_recording_order,
    runs_are_read_by_round_and_listed_newest_first_by_filter,
    the_clock_is_the_databases_and_close_to_this_hosts,
);

/// RESTOCK_DB_POOL_SIZE reaches the pool; unset, the default from the cores keeps at
/// least the 16 connections the store always had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mysql_pool_holds_the_connections_it_is_given() {
    let t = fresh(Backend::MySql).await;
    let url = format!("{}/{}", mysql_server_url(), t.database);
    let sized = MySqlStore::connect(&url, LEASE, std::num::NonZeroU32::new(3))
        .await
        .unwrap();
    assert_eq!(sized.pool().options().get_max_connections(), 3);
    let default = MySqlStore::connect(&url, LEASE, None).await.unwrap();
    assert!(default.pool().options().get_max_connections() >= 16);
}
