//! Delivery to a webhook endpoint (G12): each notification is a signed POST to a real
//! HTTP server started by the test, which checks every signature; a notification
//! counts as sent only once it answered 2xx.

use std::time::Duration;

use futures::StreamExt as _;
use restock_notifier::grpc::proto::{ListRestockRunsRequest, RunStatus};

use crate::attributes::{shop_attributes, trigger_with_attributes};
use crate::helpers::*;
use crate::receiver::{Fault, Receiver, secret};

/// A server on `backend` that delivers to `receiver`, signing with `secrets`; retries
/// come fast, so that tests of failures do not wait for the production backoff.
async fn app_delivering_to(
    backend: Backend,
    receiver: &Receiver,
    secrets: &[String],
    configure: impl FnOnce(&mut Options),
) -> TestApp {
    let mut options = Options::new(backend);
    options.webhook = Some(WebhookOptions::to(&receiver.url, &secrets.join(" ")));
    configure(&mut options);
    spawn_app_with(options).await
}

fn id(product: i64, round: i64, user: i64) -> String {
    format!("{product}-{round}-{user}")
}

/// Every request the endpoint received carried `signatures` signatures and passed
/// verification, with a valid signature for each of the `known` secrets the endpoint
/// holds.
fn assert_all_signed(receiver: &Receiver, signatures: usize, known: usize) {
    let received = receiver.received();
    assert!(!received.is_empty());
    for r in &received {
        assert!(r.valid, "a request failed verification: {r:?}");
        assert_eq!(r.signatures, signatures, "{r:?}");
        assert_eq!(r.matched, known, "{r:?}");
    }
}

async fn every_notification_is_posted_once_signed_and_then_recorded_and_streamed(backend: Backend) {
    let secrets = [secret(32)];
    let receiver = Receiver::start(&secrets, Duration::from_millis(5)).await;
    // A rate low enough that a few kept-alive connections carry every request.
    let app = app_delivering_to(backend, &receiver, &secrets, |o| o.send_rate = 400).await;
    let users: Vec<i64> = (1..=300).rev().collect();
    app.set_stock(1, 10).await;
    app.register_bulk(1, &users).await;
    let mut stream = app.subscribe_to_product(1).await;

    app.trigger(1, None).await.unwrap();
    let run = app.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::Completed);
    assert_eq!(run.last_error, None);

    // Each notification once, with the Standard Webhooks body. (Requests go out in
    // registration order but on several connections at once, so they may arrive a
    // little out of it; the record and the streams are in order.)
    let received = receiver.received();
    let mut ids: Vec<String> = received.iter().map(|r| r.id.clone()).collect();
    let mut expected: Vec<String> = users.iter().map(|&u| id(1, 1, u)).collect();
    ids.sort();
    expected.sort();
    assert_eq!(ids, expected);
    let first = receiver.received_for(&id(1, 1, users[0]));
    let first = &first[0].body;
    assert_all_signed(&receiver, 1, 1);
    assert_eq!(first["type"], "restock.notification");
    assert_eq!(first["data"]["notificationId"], id(1, 1, users[0]));
    assert_eq!(first["data"]["productId"], "1");
    assert_eq!(first["data"]["userId"], users[0].to_string());
    assert_eq!(first["data"]["restockRound"], "1");
    assert!(first["data"]["sentAt"].as_str().unwrap().ends_with('Z'));
    assert!(first["timestamp"].is_string());
    assert!(
        receiver.connections() < 50,
        "connections are kept alive and reused: {} for {} requests",
        receiver.connections(),
        received.len()
    );

    assert_eq!(app.history(1, 1).await, users);
    assert_eq!(run.last_sent_user_id, users.last().copied());
    let streamed: Vec<i64> = stream
        .by_ref()
        .take(users.len())
        .map(|n| n.unwrap().user_id)
        .collect()
        .await;
    assert_eq!(streamed, users);

    let metrics = app.scrape().await;
    assert_eq!(
        metrics.get("restock_webhook_requests_total{code=\"2xx\"}"),
        Some(&300.0),
        "{metrics:#?}"
    );
    assert_eq!(metrics.get("restock_webhook_in_flight"), Some(&0.0));
}

async fn a_notification_that_keeps_failing_ends_the_run_at_the_acknowledged_prefix_and_a_resume_completes_it(
    backend: Backend,
) {
    let secrets = [secret(24)];
    let receiver = Receiver::start(&secrets, Duration::ZERO).await;
    let app = app_delivering_to(backend, &receiver, &secrets, |_| {}).await;
    let users: Vec<i64> = (1..=200).rev().collect();
    app.set_stock(1, 10).await;
    app.register_bulk(1, &users).await;
    let failing = users[120];
    receiver.fail(&id(1, 1, failing), Fault::Always(500));

    trigger_with_attributes(&app, 1, shop_attributes())
        .await
        .unwrap();
    let run = app.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::CanceledByError);
    // G5, G12: the record is exactly the prefix before the failing user.
    assert_eq!(app.history(1, 1).await, users[..120]);
    assert_eq!(run.last_sent_user_id, Some(users[119]));
    let last_error = run.last_error.clone().expect("a failed run says why");
    assert!(last_error.contains(&id(1, 1, failing)), "{last_error}");
    assert!(last_error.len() <= 512);
    // Every attempt, and no more: RESTOCK_WEBHOOK_ATTEMPTS=3.
    assert_eq!(receiver.received_for(&id(1, 1, failing)).len(), 3);
    // Shown by List as by Get.
    let listed = app
        .client
        .clone()
        .list_restock_runs(ListRestockRunsRequest {
            product_id: Some(1),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.runs[0].last_error, Some(last_error));

    receiver.heal(&id(1, 1, failing));
    let resumed = app.manual_restock(1, Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!(resumed.status(), RunStatus::InProgress);
    let run = app.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::Completed);
    assert_eq!(run.last_error, None);
    // G6: no duplicate in the history; the resume went on after the prefix.
    assert_eq!(app.history(1, 1).await, users);
    // Every notification acknowledged; the failing one again under the same id, after
    // its three failed attempts.
    let acknowledged = receiver.acknowledged();
    for &user in &users {
        assert!(acknowledged.contains_key(&id(1, 1, user)), "user {user}");
    }
    let failing_requests = receiver.received_for(&id(1, 1, failing));
    assert_eq!(failing_requests.len(), 4);
    assert_eq!(failing_requests[3].status, 200);
    // Nothing of the prefix was sent again.
    for &user in &users[..120] {
        assert_eq!(
            receiver.received_for(&id(1, 1, user)).len(),
            1,
            "user {user}"
        );
    }
    assert_all_signed(&receiver, 1, 1);
    // Every body carried the run's attributes, before the failure and after the resume.
    let attributes = serde_json::to_value(shop_attributes()).unwrap();
    for request in receiver.received() {
        assert_eq!(
            request.body["data"]["attributes"], attributes,
            "{request:?}"
        );
    }
}

async fn a_refused_notification_is_not_retried_and_ends_the_run_at_once(backend: Backend) {
    let secrets = [secret(32)];
    let receiver = Receiver::start(&secrets, Duration::ZERO).await;
    let app = app_delivering_to(backend, &receiver, &secrets, |o| {
        o.webhook.as_mut().unwrap().attempts = 6;
    })
    .await;
    let users: Vec<i64> = (1..=60).collect();
    app.set_stock(1, 10).await;
    app.register_bulk(1, &users).await;
    let refused = users[30];
    receiver.fail(&id(1, 1, refused), Fault::Always(400));

    app.trigger(1, None).await.unwrap();
    let run = app.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::CanceledByError);
    assert_eq!(receiver.received_for(&id(1, 1, refused)).len(), 1);
    assert_eq!(app.history(1, 1).await, users[..30]);
    assert_eq!(run.last_sent_user_id, Some(users[29]));
    assert!(run.last_error.is_some());
}

async fn a_stalled_answer_is_retried_under_the_same_id(backend: Backend) {
    let secrets = [secret(32)];
    let receiver = Receiver::start(&secrets, Duration::ZERO).await;
    let app = app_delivering_to(backend, &receiver, &secrets, |o| {
        o.webhook.as_mut().unwrap().timeout = Duration::from_millis(300);
    })
    .await;
    let users: Vec<i64> = (1..=40).collect();
    app.set_stock(1, 10).await;
    app.register_bulk(1, &users).await;
    let stalled = id(1, 1, users[10]);
    receiver.fail(&stalled, Fault::StallFirst(Duration::from_secs(3)));

    app.trigger(1, None).await.unwrap();
    let run = app.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::Completed);
    let attempts = receiver.received_for(&stalled);
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(attempts[1].status, 200);
    assert_eq!(app.history(1, 1).await, users);
    let metrics = app.scrape().await;
    assert_eq!(
        metrics.get("restock_webhook_requests_total{code=\"timeout\"}"),
        Some(&1.0),
        "{metrics:#?}"
    );
}

async fn transient_answers_are_retried_until_acknowledged(backend: Backend) {
    let secrets = [secret(32)];
    let receiver = Receiver::start(&secrets, Duration::ZERO).await;
    let app = app_delivering_to(backend, &receiver, &secrets, |_| {}).await;
    let users: Vec<i64> = (1..=30).collect();
    app.set_stock(1, 10).await;
    app.register_bulk(1, &users).await;
    receiver.fail(&id(1, 1, 3), Fault::Times(503, 2));
    receiver.fail(&id(1, 1, 7), Fault::Times(408, 1));

    app.trigger(1, None).await.unwrap();
    let run = app.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::Completed);
    assert_eq!(receiver.received_for(&id(1, 1, 3)).len(), 3);
    assert_eq!(receiver.received_for(&id(1, 1, 7)).len(), 2);
    assert_eq!(app.history(1, 1).await, users);
}

async fn every_request_is_signed_with_every_secret_while_one_rotates(backend: Backend) {
    let secrets = [secret(32), secret(64)];
    let receiver = Receiver::start(&secrets, Duration::ZERO).await;
    let app = app_delivering_to(backend, &receiver, &secrets, |_| {}).await;
    let users: Vec<i64> = (1..=20).collect();
    app.set_stock(1, 10).await;
    app.register_bulk(1, &users).await;
    app.trigger(1, None).await.unwrap();
    assert_eq!(app.wait_until_final(1).await.status(), RunStatus::Completed);
    assert_eq!(receiver.received().len(), 20);
    assert_all_signed(&receiver, 2, 2);

    // A receiver that knows only the new secret accepts them too.
    let only_new = Receiver::start(&secrets[1..], Duration::ZERO).await;
    let app = app_delivering_to(backend, &only_new, &secrets, |_| {}).await;
    app.set_stock(1, 10).await;
    app.register_bulk(1, &users).await;
    app.trigger(1, None).await.unwrap();
    assert_eq!(app.wait_until_final(1).await.status(), RunStatus::Completed);
    assert_eq!(only_new.received().len(), 20);
    assert_all_signed(&only_new, 2, 1);
}

/// Instances sharing one database and Redis prefix: two clustered, one embedded (which
/// is one instance by design).
async fn instances(backend: Backend, options: Options) -> Vec<TestApp> {
    match backend {
        Backend::MySql => crate::cluster::spawn_cluster(2, options).await,
        Backend::Embedded => vec![spawn_app_with(options).await],
    }
}

async fn a_retry_after_pauses_every_request_to_the_endpoint_from_every_instance(backend: Backend) {
    let secrets = [secret(32)];
    let receiver = Receiver::start(&secrets, Duration::ZERO).await;
    let mut options = Options::new(backend);
    options.send_rate = 100;
    options.webhook = Some(WebhookOptions::to(&receiver.url, &secrets[0]));
    let apps = instances(backend, options).await;
    let users: Vec<i64> = (1..=150).collect();
    for product in [1, 2] {
        apps[0].set_stock(product, 10).await;
        apps[0].register_bulk(product, &users).await;
    }
    let paused = id(1, 1, 40);
    receiver.fail(&paused, Fault::RetryAfter { secs: 2, times: 1 });
    // One run on each instance.
    apps[0].trigger(1, None).await.unwrap();
    apps[apps.len() - 1].trigger(2, None).await.unwrap();
    for (product, app) in [(1, &apps[0]), (2, &apps[apps.len() - 1])] {
        let run = app.wait_until_final(product).await;
        assert_eq!(run.status(), RunStatus::Completed, "product {product}");
        assert_eq!(app.history(product, 1).await, users);
    }

    let received = receiver.received();
    let answered_429 = received
        .iter()
        .find(|r| r.id == paused && r.status == 429)
        .expect("the endpoint answered 429")
        .at;
    // Requests already on the wire when the 429 came back may still arrive just
    // after it; then nothing, from either instance, until the pause has passed.
    let quiet_from = answered_429 + Duration::from_millis(200);
    let quiet_until = answered_429 + Duration::from_millis(1_900);
    let during: Vec<_> = received
        .iter()
        .filter(|r| r.at > quiet_from && r.at < quiet_until)
        .map(|r| r.id.clone())
        .collect();
    assert!(during.is_empty(), "requests during the pause: {during:?}");
    // Both runs were still going when the pause began, and went on after it.
    for product in [1, 2] {
        assert!(
            received
                .iter()
                .any(|r| r.at >= quiet_until && r.id.starts_with(&format!("{product}-"))),
            "product {product} resumed after the pause"
        );
    }
    let retried = receiver.received_for(&paused);
    assert_eq!(retried.len(), 2);
    assert!(retried[1].at >= answered_429 + Duration::from_millis(1_900));
    assert!(retried[1].timestamp >= retried[0].timestamp);
}

async fn no_request_starts_once_a_sold_out_stock_write_has_returned_on_another_instance(
    backend: Backend,
) {
    let secrets = [secret(32)];
    // An endpoint slow to answer: many requests are in flight when the stock drops.
    let receiver = Receiver::start(&secrets, Duration::from_millis(50)).await;
    let mut options = Options::new(backend);
    options.send_rate = 500;
    options.webhook = Some(WebhookOptions::to(&receiver.url, &secrets[0]));
    let apps = instances(backend, options).await;
    let users: Vec<i64> = (1..=2_000).collect();
    apps[0].set_stock(1, 10).await;
    apps[0].register_bulk(1, &users).await;
    apps[0].trigger(1, None).await.unwrap();
    let endpoint = &receiver;
    poll_until(
        Duration::from_secs(20),
        "200 requests received",
        || async move {
            match endpoint.received().len() {
                n if n >= 200 => Ok(()),
                fewer => Err(fewer),
            }
        },
    )
    .await;

    let other = &apps[apps.len() - 1];
    other.set_stock(1, 0).await;
    let returned = tokio::time::Instant::now();
    let run = apps[0].wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::CanceledBySoldOut);

    // G3: every request arrived before the write returned (give the loopback, and
    // this process's own scheduling on a busy machine, a moment to carry the last ones
    // written just before).
    let received = receiver.received();
    let late: Vec<_> = received
        .iter()
        .filter(|r| r.at > returned + Duration::from_millis(200))
        .map(|r| r.id.clone())
        .collect();
    assert!(
        late.is_empty(),
        "requests after SetStock(0) returned: {late:?}"
    );
    assert!(received.len() < users.len());
    // The record is a prefix of what the endpoint acknowledged.
    let history = apps[0].history(1, 1).await;
    assert_eq!(history, users[..history.len()]);
    let acknowledged = receiver.acknowledged();
    assert!(
        history
            .iter()
            .all(|u| acknowledged.contains_key(&id(1, 1, *u)))
    );
}

async fn a_run_shut_down_mid_delivery_is_continued_by_the_next_instance_without_a_gap_or_a_duplicate(
    backend: Backend,
) {
    let secrets = [secret(32)];
    // Answers take a while: requests are on the wire when the instance stops.
    let receiver = Receiver::start(&secrets, Duration::from_millis(30)).await;
    let options = |o: &mut Options| o.send_rate = 300;
    let app = app_delivering_to(backend, &receiver, &secrets, options).await;
    let users: Vec<i64> = (1..=600).collect();
    app.set_stock(1, 10).await;
    app.register_bulk(1, &users).await;
    app.trigger(1, None).await.unwrap();
    let endpoint = &receiver;
    poll_until(
        Duration::from_secs(20),
        "100 requests acknowledged",
        || async move {
            match endpoint.acknowledged().len() {
                n if n >= 100 => Ok(()),
                fewer => Err(fewer),
            }
        },
    )
    .await;
    let (database, prefix) = app.shut_down().await;

    // G8: the next instance takes the run over at start and finishes it.
    let app = app_delivering_to(backend, &receiver, &secrets, |o| {
        options(o);
        o.database = Some(database);
        o.redis_prefix = Some(prefix);
    })
    .await;
    let run = app.wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::Completed);
    assert_eq!(run.last_error, None);
    // G5, G12: every user recorded once, each acknowledged by the endpoint; what was
    // sent again went under the same id.
    assert_eq!(app.history(1, 1).await, users);
    let acknowledged = receiver.acknowledged();
    assert_eq!(acknowledged.len(), users.len());
    let again: usize = acknowledged.values().map(|n| n - 1).sum();
    assert!(
        again <= 300,
        "{again} sent again: more than a second's worth"
    );
    assert_all_signed(&receiver, 1, 1);
}

async fn a_wave_counts_the_notifications_the_endpoint_acknowledged(backend: Backend) {
    let secrets = [secret(32)];
    let receiver = Receiver::start(&secrets, Duration::from_millis(5)).await;
    let app = app_delivering_to(backend, &receiver, &secrets, |_| {}).await;
    let users: Vec<i64> = (1..=25).collect();
    app.set_stock(1, 2).await;
    app.register_bulk(1, &users).await;
    // 5 per unit in stock: 10 in the first wave.
    crate::waves::trigger_waves(&app, 1, 5, 1).await.unwrap();
    crate::waves::waiting_after(&app, 1, 10).await;
    assert_eq!(app.history(1, 1).await, users[..10]);
    assert_eq!(receiver.acknowledged().len(), 10);
    // The next wave reads the stock again: 1 unit, 5 more.
    app.set_stock(1, 1).await;
    crate::waves::waiting_after(&app, 1, 15).await;
    assert_eq!(app.history(1, 1).await, users[..15]);
    assert_eq!(receiver.received().len(), 15);
}

on_each_backend!(
    a_wave_counts_the_notifications_the_endpoint_acknowledged,
    a_run_shut_down_mid_delivery_is_continued_by_the_next_instance_without_a_gap_or_a_duplicate,
    a_retry_after_pauses_every_request_to_the_endpoint_from_every_instance,
    no_request_starts_once_a_sold_out_stock_write_has_returned_on_another_instance,
    every_notification_is_posted_once_signed_and_then_recorded_and_streamed,
    a_notification_that_keeps_failing_ends_the_run_at_the_acknowledged_prefix_and_a_resume_completes_it,
    a_refused_notification_is_not_retried_and_ends_the_run_at_once,
    a_stalled_answer_is_retried_under_the_same_id,
    transient_answers_are_retried_until_acknowledged,
    every_request_is_signed_with_every_secret_while_one_rotates,
);

/// Bad webhook settings stop the binary at start, naming the setting, and never show
/// the secret.
#[test]
fn bad_webhook_settings_are_refused_at_start_naming_the_setting() {
    let sqlite = temp_sqlite_url();
    let good_secret = secret(32);
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (
            vec![("RESTOCK_WEBHOOK_URL", "ftp://hooks.example/in".into())],
            "RESTOCK_WEBHOOK_URL",
        ),
        (
            vec![("RESTOCK_WEBHOOK_URL", "http://127.0.0.1:9/in".into())],
            "RESTOCK_WEBHOOK_SECRET",
        ),
        (
            vec![("RESTOCK_WEBHOOK_SECRET", good_secret.clone())],
            "RESTOCK_WEBHOOK_URL",
        ),
        (
            vec![
                ("RESTOCK_WEBHOOK_URL", "http://127.0.0.1:9/in".into()),
                ("RESTOCK_WEBHOOK_SECRET", "whsec_hunter2hunter2".into()),
            ],
            "RESTOCK_WEBHOOK_SECRET",
        ),
        (
            vec![
                ("RESTOCK_WEBHOOK_URL", "http://127.0.0.1:9/in".into()),
                ("RESTOCK_WEBHOOK_SECRET", "hunter2".into()),
            ],
            "RESTOCK_WEBHOOK_SECRET",
        ),
        (
            vec![
                ("RESTOCK_WEBHOOK_URL", "http://127.0.0.1:9/in".into()),
                ("RESTOCK_WEBHOOK_SECRET", good_secret.clone()),
                ("RESTOCK_WEBHOOK_TIMEOUT", "50ms".into()),
            ],
            "RESTOCK_WEBHOOK_TIMEOUT",
        ),
        (
            vec![
                ("RESTOCK_WEBHOOK_URL", "http://127.0.0.1:9/in".into()),
                ("RESTOCK_WEBHOOK_SECRET", good_secret.clone()),
                ("RESTOCK_WEBHOOK_ATTEMPTS", "21".into()),
            ],
            "RESTOCK_WEBHOOK_ATTEMPTS",
        ),
        (
            vec![
                ("RESTOCK_WEBHOOK_URL", "http://127.0.0.1:9/in".into()),
                ("RESTOCK_WEBHOOK_SECRET", good_secret.clone()),
                ("RESTOCK_WEBHOOK_BACKOFF", "2m".into()),
            ],
            "RESTOCK_WEBHOOK_BACKOFF",
        ),
    ];
    for (settings, named) in cases {
        let mut env: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
        env.push(("DATABASE_URL", &sqlite));
        env.push(("RESTOCK_LISTEN", "127.0.0.1:0"));
        let output = run_binary(&env, &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "started with {settings:?}");
        assert!(stderr.contains(named), "{settings:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!stderr.contains("hunter2"), "the secret leaked: {stderr}");
        assert!(
            !stderr.contains(&good_secret),
            "the secret leaked: {stderr}"
        );
    }
    let _ = std::fs::remove_file(sqlite.trim_start_matches("sqlite://"));
}

/// The webhook secret is not in `--help`, whatever the environment holds.
#[test]
fn help_does_not_show_the_webhook_secret() {
    let good_secret = secret(32);
    let output = run_binary(
        &[
            ("RESTOCK_WEBHOOK_SECRET", good_secret.as_str()),
            (
                "RESTOCK_WEBHOOK_URL",
                "https://user:hunter2@hooks.example/in?token=hunter2",
            ),
        ],
        &["--help"],
    );
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("RESTOCK_WEBHOOK_SECRET"), "{help}");
    assert!(!help.contains(&good_secret), "{help}");
    assert!(!help.contains("hunter2"), "{help}");

    // Nor in Debug of the settings, which shows the URL without credentials or query.
    let config = <restock_notifier::config::Config as clap::Parser>::try_parse_from([
        "restock-notifier",
        "--webhook-url",
        "https://user:hunter2@hooks.example/in?token=hunter2",
        "--webhook-secret",
        &good_secret,
    ])
    .unwrap();
    let debug = format!("{config:?}");
    assert!(debug.contains("hooks.example/in"), "{debug}");
    assert!(!debug.contains(&good_secret), "{debug}");
    assert!(!debug.contains("hunter2"), "{debug}");
}
