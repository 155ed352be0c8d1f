//! Restock waves (`TriggerRestock.wave`): each wave notifies per_unit x the stock read
//! at its start, then the run waits, IN_PROGRESS with `next_wave_at`, and reads the
//! stock again; waves survive a restart, a hand-over and ManualRestock.

use std::time::Duration;

use restock_notifier::grpc::proto::{self, RunStatus};
use tonic::Code;

use crate::cluster::spawn_cluster;
use crate::helpers::*;
use crate::manual_restock::{fail_recording_of, heal};

pub(crate) async fn trigger_waves(
    app: &TestApp,
    product: i64,
    per_unit: u32,
    interval_s: i64,
) -> Result<proto::RestockRun, tonic::Status> {
    app.client
        .clone()
        .trigger_restock(proto::TriggerRestockRequest {
            product_id: product,
            wave: Some(proto::Wave {
                per_unit,
                interval: Some(prost_types::Duration {
                    seconds: interval_s,
                    nanos: 0,
                }),
            }),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

/// Polls the latest run until it waits for a wave with `sent` notified.
pub(crate) async fn waiting_after(app: &TestApp, product: i64, sent: i64) -> proto::RestockRun {
    let waiting = format!("a wait after {sent} sent");
    poll_until(Duration::from_secs(30), &waiting, || async move {
        let run = app.get_run(product, None).await.expect("GetRestockRun");
        if run.next_wave_at.is_some() && run.sent_count == sent {
            return Ok(run);
        }
        assert!(
            run.status() == RunStatus::InProgress && run.sent_count <= sent,
            "expected a wait after {sent} sent: {run:?}"
        );
        Err(run)
    })
    .await
}

async fn waves_follow_the_stock_until_it_runs_out(backend: Backend) {
    let app = spawn_app(backend).await;
    let users: Vec<i64> = (101..=120).collect();
    app.set_stock(1, 3).await;
    app.register_bulk(1, &users).await;
    let run = trigger_waves(&app, 1, 2, 2).await.expect("TriggerRestock");
    let wave = run.wave.expect("the run says it notifies in waves");
    assert_eq!(wave.per_unit, 2);

    // Stock 3 x 2 per unit: exactly the first 6, then a wait.
    let run = waiting_after(&app, 1, 6).await;
    assert_eq!(run.status(), RunStatus::InProgress);
    assert_eq!(app.history(1, 1).await, users[..6]);
    // The run is in progress: another trigger is refused.
    assert_code(app.trigger(1, None).await, Code::FailedPrecondition);

    // The stock drops to 1 during the wait: the next wave notifies 2.
    app.set_stock(1, 1).await;
    waiting_after(&app, 1, 8).await;
    assert_eq!(app.history(1, 1).await, users[..8]);

    // It rises to 4: the next wave notifies 8.
    app.set_stock(1, 4).await;
    waiting_after(&app, 1, 16).await;
    assert_eq!(app.history(1, 1).await, users[..16]);

    // Sold out before the next wave: the run ends with the exact prefix.
    app.set_stock(1, 0).await;
    let run = app.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::CanceledBySoldOut);
    assert_eq!(run.next_wave_at, None);
    assert_eq!(app.history(1, 1).await, users[..16]);
}

async fn a_wave_that_reaches_everyone_completes_the_run(backend: Backend) {
    let app = spawn_app(backend).await;
    let users: Vec<i64> = (1..=7).collect();
    app.set_stock(1, 5).await;
    app.register_bulk(1, &users).await;
    trigger_waves(&app, 1, 2, 60).await.expect("TriggerRestock");
    let run = app.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::Completed);
    assert_eq!(run.next_wave_at, None);
    assert_eq!(app.history(1, 1).await, users);
}

async fn a_restart_during_the_wait_continues_at_the_next_wave(backend: Backend) {
    let app = spawn_app(backend).await;
    let users: Vec<i64> = (1..=10).collect();
    app.set_stock(1, 2).await;
    app.register_bulk(1, &users).await;
    trigger_waves(&app, 1, 2, 2).await.expect("TriggerRestock");
    waiting_after(&app, 1, 4).await;
    let (database, prefix) = app.shut_down().await;

    let app = spawn_app_with(Options {
        database: Some(database),
        redis_prefix: Some(prefix),
        ..Options::new(backend)
    })
    .await;
    let run = waiting_after(&app, 1, 8).await;
    assert_eq!(run.wave.map(|w| w.per_unit), Some(2));
    let run = app.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::Completed);
    assert_eq!(app.history(1, 1).await, users, "every user once, in order");
}

async fn manual_restock_of_a_failed_wave_run_continues_in_waves(backend: Backend) {
    let app = spawn_app(backend).await;
    let users: Vec<i64> = (1..=10).collect();
    app.set_stock(1, 2).await;
    app.register_bulk(1, &users).await;
    // The second wave (users 5 to 8) fails on user 6.
    fail_recording_of(&app, 6).await;
    trigger_waves(&app, 1, 2, 1).await.expect("TriggerRestock");
    let run = app.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::CanceledByError);
    let recorded = app.history(1, 1).await;
    assert!(recorded.len() >= 4 && recorded.len() <= 5, "{recorded:?}");
    heal(&app).await;

    app.manual_restock(1, Some(ADMIN_TOKEN))
        .await
        .expect("ManualRestock");
    // It finishes the second wave (up to 8), waits, then the third completes the run.
    waiting_after(&app, 1, 8).await;
    let run = app.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::Completed);
    assert_eq!(app.history(1, 1).await, users);
}

async fn bad_waves_are_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    app.set_stock(1, 2).await;
    for (per_unit, seconds) in [(0, 5), (1, 0), (1, -1), (1, 86_401)] {
        let refused = trigger_waves(&app, 1, per_unit, seconds).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains("wave."), "{}", refused.message());
    }
    let missing = app
        .client
        .clone()
        .trigger_restock(proto::TriggerRestockRequest {
            product_id: 1,
            wave: Some(proto::Wave {
                per_unit: 1,
                interval: None,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument, "{missing:?}");
    // Nothing was started.
    assert_code(app.get_run(1, None).await, Code::NotFound);
}

on_each_backend!(
    waves_follow_the_stock_until_it_runs_out,
    a_wave_that_reaches_everyone_completes_the_run,
    a_restart_during_the_wait_continues_at_the_next_wave,
    manual_restock_of_a_failed_wave_run_continues_in_waves,
    bad_waves_are_refused,
);

/// Two instances: the one that ran the first wave stops during the wait, and the other
/// starts the next wave at its time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instance_starts_the_next_wave_after_a_hand_over() {
    let mut apps = spawn_cluster(2, Options::new(Backend::MySql)).await;
    let users: Vec<i64> = (1..=9).collect();
    let (a, b) = (apps.remove(0), apps.remove(0));
    a.set_stock(1, 3).await;
    a.register_bulk(1, &users).await;
    trigger_waves(&a, 1, 1, 1).await.expect("TriggerRestock");
    waiting_after(&a, 1, 3).await;
    a.shut_down().await;
    let run = b.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::Completed);
    assert_eq!(b.history(1, 1).await, users, "every user once, in order");
}
