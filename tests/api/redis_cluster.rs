//! The clustered deployment on Redis Cluster (three masters, three replicas, started by
//! the tests): instances on one database and prefix behave as one service (G2, G3,
//! G11), and a master killed mid-run (its replica promoted), or a product's slot moved
//! to another master, loses nothing and repeats nothing (G5, G8).

use chrono::Utc;
use futures::StreamExt as _;
use restock_notifier::domain::ProductId;
use restock_notifier::grpc::proto::{RunStatus, SubscribeRequest};
use restock_notifier::redis::Keys;

use crate::cluster::{sent_times, spawn_cluster};
use crate::helpers::*;

fn on(cluster: &RedisCluster, send_rate: u32) -> Options {
    Options {
        send_rate,
        redis_url: Some(cluster.url()),
        ..Options::new(Backend::MySql)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_on_a_redis_cluster_share_the_rate_and_the_bus() {
    let apps = spawn_cluster(2, on(shared_cluster().await, 300)).await;
    let users: Vec<i64> = (1..=600).rev().collect();
    // Products in different partitions, so on different masters.
    for (product, app) in [(1, &apps[0]), (2, &apps[1])] {
        app.set_stock(product, 10).await;
        app.register_bulk(product, &users).await;
    }
    let mut on_b = apps[1].subscribe_to_product(1).await;
    apps[0].trigger(1, None).await.unwrap();
    apps[1].trigger(2, None).await.unwrap();
    let got: Vec<i64> = take(&mut on_b, users.len())
        .await
        .iter()
        .map(|n| n.user_id)
        .collect();
    assert_eq!(got, users, "in send order, nothing missing, nothing twice");
    for (product, app) in [(1, &apps[0]), (2, &apps[1])] {
        assert_eq!(
            app.wait_until_final(product).await.status(),
            RunStatus::Completed
        );
        assert_eq!(app.history(product, 1).await, users);
    }
    let busiest = busiest_second(&sent_times(&apps[0], None).await);
    assert!(busiest <= 300, "busiest 1 s window held {busiest} sends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sold_out_stock_write_on_one_instance_stops_a_run_on_another_on_a_redis_cluster() {
    let apps = spawn_cluster(2, on(shared_cluster().await, 400)).await;
    let users: Vec<i64> = (1..=2_000).collect();
    apps[0].set_stock(1, 10).await;
    apps[0].register_bulk(1, &users).await;
    let mut watch = apps[0].subscribe_to_product(1).await;
    apps[0].trigger(1, None).await.unwrap();
    take(&mut watch, 50).await;
    apps[1].set_stock_with(1, 2, Some(3)).await.unwrap();
    let returned = Utc::now();
    let run = apps[0].wait_until_final(1).await;
    assert_eq!(run.status(), RunStatus::CanceledBySoldOut);
    let late = sent_times(&apps[0], Some(1))
        .await
        .into_iter()
        .filter(|&t| t > returned)
        .count();
    assert_eq!(late, 0, "{late} sent after the stock write returned");
    let history = apps[0].history(1, 1).await;
    assert_eq!(history, users[..history.len()]);
}

/// Reads `product`'s notifications on `app` from `stream` until `count` arrived,
/// subscribing again with the `resume_after` a stream ends with, as a client is told.
async fn read_all_resuming(
    app: &TestApp,
    product: i64,
    count: usize,
    mut stream: tonic::Streaming<restock_notifier::grpc::proto::Notification>,
) -> Vec<i64> {
    use tonic_types::StatusExt as _;
    let mut got: Vec<i64> = vec![];
    let mut resume_after = None;
    loop {
        while got.len() < count {
            match stream.next().await {
                Some(Ok(n)) => {
                    got.push(n.user_id);
                    resume_after = Some(n.notification_id);
                }
                Some(Err(status)) => {
                    let info = status
                        .get_details_error_info()
                        .unwrap_or_else(|| panic!("a stream end says where to resume: {status:?}"));
                    resume_after = info.metadata.get("resume_after").cloned();
                    assert!(resume_after.is_some(), "{status:?}");
                    break;
                }
                None => break,
            }
        }
        if got.len() >= count {
            return got;
        }
        stream = app
            .subscribe(SubscribeRequest {
                product_id: Some(product),
                resume_after: resume_after.clone(),
                ..Default::default()
            })
            .await;
    }
}

/// What happens to the cluster in the middle of a run.
enum Change {
    /// The master of the product's slot is killed; its replica takes over.
    KillProductMaster,
    /// The master of the limiter's slot is killed; its replica takes over.
    KillLimiterMaster,
    /// The product's slot moves to another master (a resharding).
    MoveProductSlot,
}

/// `change` in the middle of a run: no 1 s window above the limit, no duplicate in the
/// record or on a stream that resumes as told, and the run finishes (or ends
/// CANCELED_BY_ERROR and a ManualRestock finishes it exactly).
async fn a_cluster_change_mid_run(change: Change) {
    let mut cluster = RedisCluster::start().await;
    let apps = spawn_cluster(2, on(&cluster, 300)).await;
    let users: Vec<i64> = (1..=1_500).collect();
    apps[0].set_stock(1, 10).await;
    apps[0].register_bulk(1, &users).await;
    let keys = Keys::new(apps[0].redis_prefix.clone()).sharded(true);
    let key = match change {
        Change::KillLimiterMaster => keys.limiter(),
        _ => keys.stock(ProductId::parse(1).unwrap()),
    };
    let first = apps[1].subscribe_to_product(1).await;
    let reader = read_all_resuming(&apps[1], 1, users.len(), first);
    apps[0].trigger(1, None).await.unwrap();
    let killing = async {
        apps[0].wait_for_history(1, 1, 300).await;
        match change {
            Change::MoveProductSlot => cluster.move_slot_of(&key).await,
            _ => cluster.kill_master_of(&key).await,
        }
    };
    let (streamed, ()) = tokio::join!(
        async {
            tokio::time::timeout(std::time::Duration::from_secs(60), reader)
                .await
                .ok()
        },
        async {
            killing.await;
            let run = apps[0].wait_until_final(1).await;
            if run.status() == RunStatus::CanceledByError {
                apps[0].manual_restock(1, Some(ADMIN_TOKEN)).await.unwrap();
                let resumed = apps[0].wait_until_final(1).await;
                assert_eq!(
                    resumed.status(),
                    RunStatus::Completed,
                    "after {run:?}: {resumed:?}"
                );
            } else {
                assert_eq!(run.status(), RunStatus::Completed);
            }
        }
    );
    assert_eq!(
        apps[0].history(1, 1).await,
        users,
        "every user once, in order"
    );
    let busiest = busiest_second(&sent_times(&apps[0], Some(1)).await);
    assert!(busiest <= 300, "busiest 1 s window held {busiest} sends");
    let streamed = streamed.expect("the stream on the other instance got every notification");
    assert_eq!(streamed, users, "streamed with no gap and no duplicate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_of_a_product_s_slot_killed_mid_run_loses_and_repeats_nothing() {
    a_cluster_change_mid_run(Change::KillProductMaster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_of_the_limiter_killed_mid_run_loses_and_repeats_nothing() {
    a_cluster_change_mid_run(Change::KillLimiterMaster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_product_s_slot_moved_to_another_master_mid_run_loses_and_repeats_nothing() {
    a_cluster_change_mid_run(Change::MoveProductSlot).await;
}
