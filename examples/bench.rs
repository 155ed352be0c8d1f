//! Benchmarks of the targets in the README, against a real MySQL and Redis (a fresh database per run).
//! Every mode measures the release binary as its own process, as users run it: build
//! it first (`cargo build --release`; running an example does not build it).
//!
//! ```text
//! cargo build --release
//! cargo run --release --example bench -- pacing  [--users 10000] [--rate 500]
//! cargo run --release --example bench -- ceiling [--users 200000]
//! cargo run --release --example bench -- memory  [--users 1000000] [--waves]
//! cargo run --release --example bench -- memory  --runs 10000
//! cargo run --release --example bench -- memory  --streams 5000
//! cargo run --release --example bench -- fanout  [--streams 1000] [--users 5000] [--rate 500] [--across] [--attributes BYTES]
//! cargo run --release --example bench -- cluster [--users 30000] [--rate 500] [--instances 3]
//! cargo run --release --example bench -- limiter [--rate 500] [--seconds 10] [--runs N] [--instances N]
//! cargo run --release --example bench -- webhook [--rate 500] [--seconds 20]
//! cargo run --release --example bench -- auth    [--calls 20000] [--concurrency 16]
//! cargo run --release --example bench -- demand  [--products 100000]
//! cargo run --release --example bench -- traces [--users 10000] [--rate 2000]
//! cargo run --release --example bench -- retention [--rows 1000000] [--seconds 60] [--no-sweep]
//! cargo run --release --example bench -- redis-cluster [--rate 500] [--seconds 10] [--streams 1000] [--users 3000]
//! ```
//!
//! `pacing` measures the sustained send rate and the busiest one-second window, both
//! from the recorded `sent_at` and from the arrival times at a live subscriber, plus
//! the send-to-receive latency. `ceiling` runs the service at the highest send rate it
//! accepts and compares it with a plain batched INSERT of the same rows into the same
//! MySQL, in turns over three rounds, and a second process with metrics off.
//! `memory` reports the process's RSS idle and its peak during one run at the highest
//! send rate (the peak is reset after seeding); `--waves` samples it while a run waits
//! between waves; `--runs N` holds one `Subscribe` stream open while N runs go by and
//! reports how much the process grew; `--streams N` opens N idle `Subscribe` streams and
//! reports what each costs the process. `fanout` runs the real binary as its own process (two with
//! `--across`: the run on one, the streams on the other), opens the streams from this
//! process, checks that every stream gets every notification in order, and reports
//! the send-to-receive p50/p99 over all of them and each server's CPU time per
//! delivered notification; `--attributes BYTES` triggers the run with attributes of about
//! that size (a name, a link, a price, and padding), as a shop sends them. `cluster` starts several processes of the real binary (built by `cargo build
//! --release`, next to this example) on one database and Redis prefix, runs one product
//! on each at once, kills the owner of the last one with SIGKILL after 40% of all sends,
//! and reports the busiest one-second window over all instances against the shared
//! limit, the utilisation of the limit, the time to take the killed run over and to
//! finish it, duplicates, and whether each history is in registration order
//! (`BENCH_LOG=1` shows the instances' warnings).
//! `limiter` measures the send limiter on a real network: for each added round trip to
//! Redis (0, 1, 2, 6 and 100 ms, half each way, through the test suite's fault proxy)
//! it starts the real binary (one instance, then two, or `--instances` of them) on a
//! fresh Redis prefix through the proxy, triggers one run alone (the common case: one
//! product restocked) and then 100 runs together (or `--runs` runs), with
//! `rate x seconds` users between them, and reports the utilisation of the limit while
//! every run still had work, the busiest one-second window of `sent_at`, the slots the
//! limiters gave up (`restock_send_limiter_dropped_total`), and the longest any run
//! waited from its `TriggerRestock` returning to its first send (for the first run on a
//! fresh prefix, the cold start). Then, with one run alone, it deletes the limiter's
//! schedule mid-run (a flush, a failover) and reports the longest pause in `sent_at`
//! after it and the busiest window.
//! `webhook` delivers `rate x seconds` notifications to an endpoint in the bench that
//! answers after 0, 50 and 200 ms, and reports the rate and the busiest one-second
//! window at the endpoint (every request, retries included) and the server's CPU per
//! delivery.
//! `auth` measures what the authorization layer costs a call: two processes of the
//! binary, one without a caller policy and one with RESTOCK_CALLERS (a reader by its
//! token), answer `--calls` GetRestockRun calls each, `--concurrency` at a time, in
//! turns over three rounds; it reports calls per second, p50/p99 latency and server CPU
//! per call for each, and their ratio.
//! `demand` fills a database with `--products` products whose users waiting are spread
//! from 0 to 10,000, then walks the whole demand report (`ListProducts`, 50 a page,
//! following the page tokens) and reports the latency of each page (p50, p99, the
//! deepest page) and MySQL's plan of the query; then GetAlert for the user at position
//! 900,000 of a product with a million users waiting.
//! `BENCH_MYSQL_URL` (server, no database) and `BENCH_REDIS_URL` override the local
//! defaults.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use clap::Parser;
use futures::StreamExt as _;
use restock_notifier::engine::EngineSettings;
use restock_notifier::grpc::proto::restock_service_client::RestockServiceClient;
use restock_notifier::grpc::proto::{self, RunStatus};
use sqlx::{Connection, MySqlConnection, MySqlPool};
use tonic::transport::Channel;

#[path = "../tests/support/proxy.rs"]
mod proxy;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

// The tests' Redis Cluster of three masters and three replicas on free loopback ports.
#[allow(dead_code)]
#[path = "../tests/support/redis_cluster.rs"]
mod redis_cluster;
use proxy::FaultProxy;

/// TriggerRestock of `product`, no stock given.
async fn trigger(client: &RestockServiceClient<Channel>, product: i64) -> anyhow::Result<()> {
    client
        .clone()
        .trigger_restock(proto::TriggerRestockRequest {
            product_id: product,
            ..Default::default()
        })
        .await
        .with_context(|| format!("TriggerRestock of product {product}"))?;
    Ok(())
}

/// Creates `product` with `stock` (SetStock), then registers `users` in that order
/// straight into the table (position = place in `users`).
async fn seed_product(
    client: &RestockServiceClient<Channel>,
    db: &MySqlPool,
    product: i64,
    stock: i64,
    users: &[i64],
) -> anyhow::Result<()> {
    client
        .clone()
        .set_stock(proto::SetStockRequest {
            product_id: product,
            stock,
            ..Default::default()
        })
        .await
        .with_context(|| format!("SetStock of product {product}"))?;
    let rows: Vec<(i64, i64)> = (1..).zip(users.iter().copied()).collect();
    for chunk in rows.chunks(5_000) {
        let mut q = sqlx::QueryBuilder::new(
            "INSERT INTO product_user_notification (product_id, user_id, position) ",
        );
        q.push_values(chunk, |mut row, (position, user)| {
            row.push_bind(product).push_bind(*user).push_bind(*position);
        });
        q.build()
            .execute(db)
            .await
            .with_context(|| format!("registrations of product {product}"))?;
    }
    sqlx::query("UPDATE product SET alert_seq = ?, waiting = ? WHERE id = ?")
        .bind(users.len() as i64)
        .bind(users.len() as i64)
        .bind(product)
        .execute(db)
        .await?;
    Ok(())
}

/// Milliseconds from a notification's `sent_at` to now (its arrival).
fn latency_ms(n: &proto::Notification) -> anyhow::Result<f64> {
    let sent_at = n.sent_at.as_ref().context("sent_at")?;
    let sent_at = DateTime::from_timestamp(sent_at.seconds, sent_at.nanos as u32)
        .context("sent_at out of range")?;
    Ok((Utc::now() - sent_at).as_seconds_f64() * 1_000.0)
}

/// The `q`th percentile of sorted values.
fn percentile(sorted: &[f64], q: usize) -> f64 {
    sorted[(sorted.len() * q / 100).min(sorted.len() - 1)]
}

/// The most events in any half-open window `[t, t + 1 s)`, over sorted times.
fn busiest_second(times: &[DateTime<Utc>]) -> usize {
    let mut best = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end] - times[start] >= chrono::Duration::seconds(1) {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

fn rate(times: &[DateTime<Utc>]) -> f64 {
    let span = (times[times.len() - 1] - times[0]).as_seconds_f64();
    (times.len() - 1) as f64 / span
}

async fn pacing(users: u32, limit: u32) -> anyhow::Result<()> {
    on_one_instance(limit, async |cluster| {
        pacing_on(cluster, users, limit).await
    })
    .await
}

/// `pacing` on the release binary as its own process (clustered): what its users see.
async fn pacing_on(cluster: &Cluster, users: u32, limit: u32) -> anyhow::Result<()> {
    let server = &cluster.instances[0];
    let ids: Vec<i64> = (1..=i64::from(users)).collect();
    seed_product(&server.client, &cluster.db, 1, 1_000, &ids).await?;
    let mut stream = server
        .client
        .clone()
        .subscribe(proto::SubscribeRequest::default())
        .await?
        .into_inner();
    let receiving = tokio::spawn(async move {
        let mut arrivals = Vec::with_capacity(users as usize);
        while arrivals.len() < users as usize {
            let n = stream.next().await.context("stream ended")??;
            arrivals.push((Utc::now(), latency_ms(&n)?));
        }
        anyhow::Ok(arrivals)
    });
    let began = Instant::now();
    trigger(&server.client, 1).await?;
    let arrivals = receiving.await??;
    let run = wait_final(&server.client, 1, Duration::from_millis(50)).await?;
    let elapsed = began.elapsed();
    let dropped = server.metric("restock_send_limiter_dropped_total").await?;

    let mut sent: Vec<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT sent_at FROM product_user_notification_history ORDER BY sent_at",
    )
    .fetch_all(&cluster.db)
    .await?;
    sent.sort();
    let received: Vec<DateTime<Utc>> = arrivals.iter().map(|(at, _)| *at).collect();
    let mut latencies: Vec<f64> = arrivals.iter().map(|(_, ms)| *ms).collect();
    latencies.sort_by(f64::total_cmp);
    let p99 = percentile(&latencies, 99);

    println!(
        "pacing (the service as its own process): {users} users, limit {limit}/s, run {:?}, \
         wall {elapsed:.2?}, limiter slots given up (handed out too late) {dropped}",
        run.status()
    );
    let longest_gap = sent
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    println!(
        "  recorded sent_at: {} rows, sustained {:.1}/s ({:.2}% of limit), busiest 1 s window {}, \
         longest pause between sends {:.1} ms",
        sent.len(),
        rate(&sent),
        100.0 * rate(&sent) / f64::from(limit),
        busiest_second(&sent),
        longest_gap.as_seconds_f64() * 1_000.0
    );
    println!(
        "  subscriber arrivals: sustained {:.1}/s ({:.2}% of limit), busiest 1 s window {}, \
         send-to-receive p99 {p99:.2} ms",
        rate(&received),
        100.0 * rate(&received) / f64::from(limit),
        busiest_second(&received)
    );
    Ok(())
}

/// Rounds of `ceiling`: the engine and the plain INSERT take turns, so that a noisy
/// spell of the machine weighs on both alike.
const CEILING_ROUNDS: i64 = 3;

/// `ceiling`: the release binary as its own process at the highest send rate, against a
/// plain batched INSERT of the same rows into the same MySQL, in turns; and a second
/// process with metrics off, for what recording them costs.
async fn ceiling(users: u32) -> anyhow::Result<()> {
    let metered = Cluster::start(1, MAX_RATE).await?;
    let unmetered = match Cluster::start_unmetered(1, MAX_RATE).await {
        Ok(cluster) => cluster,
        Err(e) => {
            metered.tear_down().await?;
            return Err(e);
        }
    };
    let outcome = ceiling_on(&metered, &unmetered, users).await;
    let torn_down = (metered.tear_down().await, unmetered.tear_down().await);
    outcome?;
    torn_down.0?;
    torn_down.1
}

async fn ceiling_on(metered: &Cluster, unmetered: &Cluster, users: u32) -> anyhow::Result<()> {
    let ids: Vec<i64> = (1..=i64::from(users)).collect();
    for cluster in [metered, unmetered] {
        seed_product(&cluster.instances[0].client, &cluster.db, 1, 1_000, &ids).await?;
        // A run of one user first: the limiter's schedule on a fresh Redis prefix
        // starts cold (as after a lost key, G2), which a service in use has long
        // behind it, and the first round would count that wait.
        seed_product(&cluster.instances[0].client, &cluster.db, 2, 1_000, &[1]).await?;
        let client = &cluster.instances[0].client;
        trigger(client, 2).await?;
        wait_final(client, 2, Duration::from_millis(10)).await?;
    }
    sqlx::query("CREATE TABLE baseline LIKE product_user_notification_history")
        .execute(&metered.db)
        .await?;
    let per_s = |d: Duration| f64::from(users) / d.as_secs_f64();
    println!("ceiling: {users} users, the service as its own process, {CEILING_ROUNDS} rounds");
    let (mut ratios, mut costs) = (vec![], vec![]);
    for round in 1..=CEILING_ROUNDS {
        // Baseline: the same rows, batched the same way, into a copy of the history table.
        let now = Utc::now();
        let began = Instant::now();
        for chunk in ids.chunks(EngineSettings::default().recorder.batch_size) {
            let mut q = sqlx::QueryBuilder::new(
                "INSERT INTO baseline (product_id, user_id, restock_round, sent_at) ",
            );
            q.push_values(chunk, |mut row, id| {
                row.push_bind(1)
                    .push_bind(*id)
                    .push_bind(round)
                    .push_bind(now);
            });
            q.build().execute(&metered.db).await?;
        }
        let baseline = began.elapsed();
        let engine = timed_run(metered, users).await?;
        let engine_unmetered = timed_run(unmetered, users).await?;
        let ratio = 100.0 * per_s(engine) / per_s(baseline);
        let cost = 100.0 * per_s(engine) / per_s(engine_unmetered);
        println!(
            "  round {round}: plain INSERT {:.0} rows/s, engine {:.0}/s, metrics off {:.0}/s: \
             engine / INSERT = {ratio:.1}%, with metrics / without = {cost:.1}%",
            per_s(baseline),
            per_s(engine),
            per_s(engine_unmetered)
        );
        ratios.push(ratio);
        costs.push(cost);
    }
    ratios.sort_by(f64::total_cmp);
    costs.sort_by(f64::total_cmp);
    println!(
        "  median: engine / INSERT = {:.1}%; with metrics / without = {:.1}%",
        ratios[ratios.len() / 2],
        costs[costs.len() / 2]
    );
    Ok(())
}

/// Triggers the next round of product 1 and waits for it: how long it took.
async fn timed_run(cluster: &Cluster, users: u32) -> anyhow::Result<Duration> {
    let client = &cluster.instances[0].client;
    let began = Instant::now();
    trigger(client, 1).await?;
    let run = wait_final(client, 1, Duration::from_millis(10)).await?;
    anyhow::ensure!(
        run.status() == RunStatus::Completed && run.sent_count == i64::from(users),
        "run: {run:?}"
    );
    Ok(began.elapsed())
}

/// A field of `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`), in kB.
fn proc_status_kb(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("malformed status line")?
        .parse()?)
}

/// Resets the peak RSS (`VmHWM`) of a process, so it measures what follows.
fn reset_peak(pid: u32) -> anyhow::Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").context("cannot reset the peak RSS")
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// The highest send rate the service accepts: as good as unlimited for these runs.
const MAX_RATE: u32 = 1_000_000;

/// Waits until the latest run of `product` has left `IN_PROGRESS`, looking every `poll`.
async fn wait_final(
    client: &RestockServiceClient<Channel>,
    product: i64,
    poll: Duration,
) -> anyhow::Result<proto::RestockRun> {
    loop {
        let run = run_now(client, product).await?;
        if run.status() != RunStatus::InProgress {
            return Ok(run);
        }
        tokio::time::sleep(poll).await;
    }
}

/// The latest run of `product`, as it is now.
async fn run_now(
    client: &RestockServiceClient<Channel>,
    product: i64,
) -> anyhow::Result<proto::RestockRun> {
    Ok(client
        .clone()
        .get_restock_run(proto::GetRestockRunRequest {
            product_id: product,
            restock_round: None,
        })
        .await?
        .into_inner())
}

/// Runs `work` against one process of the release binary at send rate `rate`, on a
/// fresh database and Redis prefix that are torn down afterwards, whatever happened.
async fn on_one_instance(
    rate: u32,
    work: impl AsyncFnOnce(&Cluster) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let cluster = Cluster::start(1, rate).await?;
    let outcome = work(&cluster).await;
    let torn_down = cluster.tear_down().await;
    outcome?;
    torn_down
}

/// `memory`: the release binary as its own process, clustered on MySQL + Redis; its RSS
/// idle (started, migrated, `users` registrations seeded, nothing running) and its peak
/// during one run over all of them at the highest send rate.
async fn memory(users: u32) -> anyhow::Result<()> {
    on_one_instance(MAX_RATE, async |cluster| memory_run(cluster, users).await).await
}

async fn memory_run(cluster: &Cluster, users: u32) -> anyhow::Result<()> {
    let server = &cluster.instances[0];
    let pid = server.process.id();
    let ids: Vec<i64> = (1..=i64::from(users)).collect();
    seed_product(&server.client, &cluster.db, 1, 1_000, &ids).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = proc_status_kb(pid, "VmRSS:")?;
    reset_peak(pid)?;
    let began = Instant::now();
    trigger(&server.client, 1).await?;
    let run = wait_final(&server.client, 1, Duration::from_millis(100)).await?;
    anyhow::ensure!(run.sent_count == i64::from(users), "run: {run:?}");
    let peak = proc_status_kb(pid, "VmHWM:")?;
    println!(
        "memory of the service process (clustered): idle {:.1} MB; {users} users in {:.2?}, \
         peak during the run {:.1} MB",
        mb(idle),
        began.elapsed(),
        mb(peak)
    );
    Ok(())
}

/// `memory --runs N`: one `Subscribe` stream held open on the service process while `N`
/// runs of one user each go by; the process's RSS before and after.
async fn memory_runs(runs: u32) -> anyhow::Result<()> {
    on_one_instance(MAX_RATE, async |cluster| {
        memory_runs_on(cluster, runs).await
    })
    .await
}

async fn memory_runs_on(cluster: &Cluster, runs: u32) -> anyhow::Result<()> {
    let server = &cluster.instances[0];
    let pid = server.process.id();
    seed_product(&server.client, &cluster.db, 1, 1_000, &[1]).await?;
    let mut stream = server
        .client
        .clone()
        .subscribe(proto::SubscribeRequest::default())
        .await?
        .into_inner();
    // A few runs first, so what is allocated once (pools, buffers) is in the baseline.
    let mut round = 0;
    let mut run_one = async |round: &mut u32| -> anyhow::Result<()> {
        trigger(&server.client, 1).await?;
        *round += 1;
        let got = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .context("no notification within 10 s")?
            .context("the stream ended")??;
        anyhow::ensure!(got.restock_round == i64::from(*round), "got {got:?}");
        wait_final(&server.client, 1, Duration::from_millis(1)).await?;
        Ok(())
    };
    for _ in 0..100 {
        run_one(&mut round).await?;
    }
    let before = proc_status_kb(pid, "VmRSS:")?;
    let began = Instant::now();
    for _ in 0..runs {
        run_one(&mut round).await?;
    }
    let after = proc_status_kb(pid, "VmRSS:")?;
    println!(
        "memory, one stream over {runs} runs (in {:.1?}): RSS of the service process \
         {:.2} MB before, {:.2} MB after: {:+.2} MB",
        began.elapsed(),
        mb(before),
        mb(after),
        mb(after) - mb(before)
    );
    Ok(())
}

/// `memory --streams N`: `N` idle `Subscribe` streams (on a product that never runs),
/// opened from this process over HTTP/2 connections of 100 streams each; the service
/// process's RSS before and after, per stream. The connections are opened first, so
/// what a stream costs is told apart from what a connection costs.
async fn memory_streams(streams: u32) -> anyhow::Result<()> {
    on_one_instance(MAX_RATE, async |cluster| {
        memory_streams_on(cluster, streams).await
    })
    .await
}

async fn memory_streams_on(cluster: &Cluster, streams: u32) -> anyhow::Result<()> {
    let server = &cluster.instances[0];
    let pid = server.process.id();
    seed_product(&server.client, &cluster.db, 1, 1_000, &[1]).await?;
    let connections = streams.div_ceil(STREAMS_PER_CONNECTION);
    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(server.connect().await?);
    }
    // One stream per connection first: what a connection costs is in the baseline.
    let mut open = Vec::with_capacity(streams as usize);
    let subscribe = async |channel: &Channel| -> anyhow::Result<_> {
        let request = proto::SubscribeRequest {
            product_id: Some(2),
            ..Default::default()
        };
        Ok(RestockServiceClient::new(channel.clone())
            .subscribe(request)
            .await?
            .into_inner())
    };
    for channel in &channels {
        open.push(subscribe(channel).await?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = proc_status_kb(pid, "VmRSS:")?;
    for i in connections..streams {
        open.push(subscribe(&channels[(i % connections) as usize]).await?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = proc_status_kb(pid, "VmRSS:")?;
    let subscribers = server.metric("restock_subscribers").await?;
    anyhow::ensure!(
        subscribers == f64::from(streams),
        "the service counts {subscribers} subscribers, not {streams}"
    );
    let added = streams - connections;
    println!(
        "memory, {streams} idle streams over {connections} connections: RSS of the service \
         process {:.2} MB with one stream per connection, {:.2} MB with all: {:.2} KiB per \
         stream",
        mb(before),
        mb(after),
        (after as f64 - before as f64) / f64::from(added)
    );
    drop(open);
    Ok(())
}

/// `memory --waves`: the same users notified in waves of 100 per unit of a stock of
/// 1,000 (ten waves of 100,000, a second apart), with the service process's RSS sampled
/// during the waits.
async fn memory_waves(users: u32) -> anyhow::Result<()> {
    on_one_instance(MAX_RATE, async |cluster| {
        memory_waves_on(cluster, users).await
    })
    .await
}

async fn memory_waves_on(cluster: &Cluster, users: u32) -> anyhow::Result<()> {
    let server = &cluster.instances[0];
    let pid = server.process.id();
    let ids: Vec<i64> = (1..=i64::from(users)).collect();
    seed_product(&server.client, &cluster.db, 1, 1_000, &ids).await?;
    reset_peak(pid)?;
    let before = proc_status_kb(pid, "VmRSS:")?;
    let began = Instant::now();
    server
        .client
        .clone()
        .trigger_restock(proto::TriggerRestockRequest {
            product_id: 1,
            wave: Some(proto::Wave {
                per_unit: 100,
                interval: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
            }),
            ..Default::default()
        })
        .await?;
    let (mut waits, mut waiting_max, mut waiting_min) = (0, 0u64, u64::MAX);
    let mut was_waiting = false;
    let run = loop {
        let run = run_now(&server.client, 1).await?;
        if run.status() != RunStatus::InProgress {
            break run;
        }
        let waiting = run.next_wave_at.is_some();
        if waiting {
            let rss = proc_status_kb(pid, "VmRSS:")?;
            waiting_max = waiting_max.max(rss);
            waiting_min = waiting_min.min(rss);
            waits += usize::from(!was_waiting);
        }
        was_waiting = waiting;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    anyhow::ensure!(run.sent_count == i64::from(users), "run: {run:?}");
    let peak = proc_status_kb(pid, "VmHWM:")?;
    println!(
        "memory of the service process, waves: {users} users in {:.2?}, {waits} waits seen; \
         RSS before the run {:.1} MB, peak {:.1} MB, while waiting {:.1} to {:.1} MB",
        began.elapsed(),
        mb(before),
        mb(peak),
        mb(waiting_min.min(waiting_max)),
        mb(waiting_max)
    );
    Ok(())
}

/// Streams per HTTP/2 connection of the `fanout` subscribers: below the server's
/// default limit of concurrent streams per connection.
const STREAMS_PER_CONNECTION: u32 = 100;

/// `fanout`: the server runs as its own process (two with `across`: the run on the first,
/// the streams on the second), and this process holds the subscribers.
async fn fanout(
    streams: u32,
    users: u32,
    limit: u32,
    across: bool,
    attributes: usize,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        streams > 0 && users > 0,
        "--streams and --users must be positive"
    );
    let cluster = Cluster::start(if across { 2 } else { 1 }, limit).await?;
    let outcome = fanout_run(&cluster, streams, users, limit, attributes_of(attributes)).await;
    let torn_down = cluster.tear_down().await;
    outcome?;
    torn_down
}

/// Attributes of about `bytes` bytes (keys and values): what a shop sends with a
/// restock, padded with a `note`. None for 0.
fn attributes_of(bytes: usize) -> HashMap<String, String> {
    if bytes == 0 {
        return HashMap::new();
    }
    let mut attributes = HashMap::from([
        ("name".to_string(), "Blue mug, 350 ml".to_string()),
        ("link".to_string(), "https://shop.example/p/1".to_string()),
        ("price".to_string(), "9.90 EUR".to_string()),
    ]);
    let used: usize = attributes.iter().map(|(k, v)| k.len() + v.len()).sum();
    attributes.insert("note".into(), "x".repeat(bytes.saturating_sub(used + 4)));
    attributes
}

async fn fanout_run(
    cluster: &Cluster,
    streams: u32,
    users: u32,
    limit: u32,
    attributes: HashMap<String, String>,
) -> anyhow::Result<()> {
    let attribute_bytes: usize = attributes.iter().map(|(k, v)| k.len() + v.len()).sum();
    let runner = &cluster.instances[0];
    let serving = cluster.instances.last().context("no instance")?;
    let order: Vec<i64> = (1..=i64::from(users)).collect();
    seed_product(&runner.client, &cluster.db, 1, 1_000_000, &order).await?;

    let connections = streams.div_ceil(STREAMS_PER_CONNECTION);
    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(serving.connect().await?);
    }
    let mut readers = Vec::new();
    for i in 0..streams {
        let mut client = RestockServiceClient::new(channels[(i % connections) as usize].clone());
        let mut stream = client
            .subscribe(proto::SubscribeRequest::default())
            .await
            .with_context(|| format!("Subscribe #{i}"))?
            .into_inner();
        readers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(users as usize);
            for expected in 1..=i64::from(users) {
                let n = stream.next().await.context("stream ended")??;
                anyhow::ensure!(
                    n.user_id == expected,
                    "got user {} where {expected} was next",
                    n.user_id
                );
                latencies.push(latency_ms(&n)? as f32);
            }
            anyhow::Ok(latencies)
        }));
    }

    let cpu_before: Vec<Duration> = cluster
        .instances
        .iter()
        .map(Instance::cpu_time)
        .collect::<anyhow::Result<_>>()?;
    let own_before = cpu_time(std::process::id())?;
    let began = Instant::now();
    runner
        .client
        .clone()
        .trigger_restock(proto::TriggerRestockRequest {
            product_id: 1,
            attributes,
            ..Default::default()
        })
        .await
        .context("TriggerRestock")?;
    let mut all = Vec::with_capacity(streams as usize * users as usize);
    let mut complete = 0u32;
    let mut failures = Vec::new();
    for reader in readers {
        match reader.await? {
            Ok(latencies) => {
                complete += 1;
                all.extend(latencies);
            }
            Err(e) => failures.push(e),
        }
    }
    let wall = began.elapsed();
    let cpu: Vec<Duration> = cluster
        .instances
        .iter()
        .zip(&cpu_before)
        .map(|(instance, before)| Ok(instance.cpu_time()? - *before))
        .collect::<anyhow::Result<_>>()?;
    let own = cpu_time(std::process::id())? - own_before;

    let deliveries = u64::from(complete) * u64::from(users);
    println!(
        "fanout: {streams} streams over {connections} connections x {users} notifications at \
         {limit}/s, attributes {attribute_bytes} bytes, streams on {}; wall {wall:.2?}",
        if cluster.instances.len() > 1 {
            "another instance than the run"
        } else {
            "the instance of the run"
        }
    );
    println!("  {complete} of {streams} streams got every notification, in order");
    if let Some(e) = failures.first() {
        println!("  {} streams failed, the first with: {e:#}", failures.len());
    }
    anyhow::ensure!(!all.is_empty(), "no stream completed");
    all.sort_by(f32::total_cmp);
    let p = |q: usize| all[(all.len() * q / 100).min(all.len() - 1)];
    println!(
        "  send-to-receive p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        p(50),
        p(99),
        all[all.len() - 1]
    );
    for (i, cpu) in cpu.iter().enumerate() {
        let role = match (i, cluster.instances.len()) {
            (_, 1) => "runs and streams",
            (0, _) => "runs",
            _ => "streams",
        };
        println!(
            "  server process {} ({role}): CPU {:.2} s = {:.0}% of one core, {:.2} µs per \
             delivered notification",
            i + 1,
            cpu.as_secs_f64(),
            100.0 * cpu.as_secs_f64() / wall.as_secs_f64(),
            cpu.as_secs_f64() * 1e6 / deliveries.max(1) as f64
        );
    }
    println!(
        "  subscriber process (this one): CPU {:.2} s = {:.0}% of one core",
        own.as_secs_f64(),
        100.0 * own.as_secs_f64() / wall.as_secs_f64()
    );
    Ok(())
}

/// User plus system CPU time a process has used so far (`/proc/<pid>/stat`).
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; the fields after it do not.
    let after_name = &stat[stat.rfind(')').context("malformed /proc stat")? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15, in clock ticks (100 per second on Linux).
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(Duration::from_millis(ticks * 10))
}

/// The service binary next to this example: examples are built in
/// `target/<profile>/examples/`, the binary in `target/<profile>/`.
fn server_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the bench executable")?;
    let binary = exe
        .parent()
        .and_then(Path::parent)
        .with_context(|| format!("{} has no target directory above it", exe.display()))?
        .join("restock-notifier");
    anyhow::ensure!(
        binary.is_file(),
        "{} not found: run `cargo build --release` first (running an example does not build \
         the service binary)",
        binary.display()
    );
    Ok(binary)
}

/// One process of the real binary, killed if still running when dropped.
struct Instance {
    process: Child,
    port: u16,
    metrics_port: u16,
    client: RestockServiceClient<Channel>,
}

impl Instance {
    /// Starts the binary on `database_url` and `prefix` and waits until it accepts
    /// connections (it listens only once the database is migrated).
    async fn start(
        binary: &Path,
        database_url: &str,
        redis_url: &str,
        prefix: &str,
        rate: u32,
        metrics: bool,
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let free_port = || -> anyhow::Result<u16> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        };
        let (port, metrics_port) = (free_port()?, free_port()?);
        let log = std::env::var_os("BENCH_LOG").is_some();
        let mut process = Command::new(binary)
            .env_clear()
            // Several processes at once: never the default metrics port.
            .env(
                "RESTOCK_METRICS_LISTEN",
                if metrics {
                    format!("127.0.0.1:{metrics_port}")
                } else {
                    "off".to_owned()
                },
            )
            .env("RESTOCK_LISTEN", format!("127.0.0.1:{port}"))
            .env("DATABASE_URL", database_url)
            .env("REDIS_URL", redis_url)
            .env("RESTOCK_REDIS_PREFIX", prefix)
            .env("RESTOCK_SEND_RATE", rate.to_string())
            // Opening a thousand streams at once is not what the API limit is for.
            .env("RESTOCK_API_RATE", "100000")
            .env("RESTOCK_RUN_LEASE", CLUSTER_LEASE)
            .env("RESTOCK_ADMIN_TOKEN", "bench")
            .env("RUST_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(if log { Stdio::inherit() } else { Stdio::null() })
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        match wait_listening(&mut process, port).await {
            Ok(channel) => Ok(Self {
                process,
                port,
                metrics_port,
                client: RestockServiceClient::new(channel),
            }),
            Err(e) => {
                let _ = process.kill();
                let _ = process.wait();
                Err(e)
            }
        }
    }

    /// A new connection (HTTP/2 multiplexes a limited number of streams on each).
    async fn connect(&self) -> anyhow::Result<Channel> {
        Ok(
            Channel::from_shared(format!("http://127.0.0.1:{}", self.port))?
                .connect()
                .await?,
        )
    }

    fn cpu_time(&self) -> anyhow::Result<Duration> {
        cpu_time(self.process.id())
    }

    /// The value of a metric without labels on `/metrics` (plain HTTP/1.0).
    async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await?;
        let value = body
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or("0");
        value
            .trim()
            .parse()
            .with_context(|| format!("{name} is {value:?}"))
    }

    /// Still running (not exited, or exited but not yet reaped)?
    fn running(&mut self) -> anyhow::Result<bool> {
        Ok(self.process.try_wait()?.is_none())
    }

    /// SIGTERM, as an orchestrator stops it.
    fn terminate(&self) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.process.id().to_string())
            .status()
            .context("cannot run kill")?;
        anyhow::ensure!(
            status.success(),
            "kill -TERM {}: {status}",
            self.process.id()
        );
        Ok(())
    }

    /// Waits for the process to exit, for at most `limit`.
    async fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.process.try_wait()? {
                return Ok(status);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "instance {} still running {limit:?} after SIGTERM",
                self.process.id()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Polls until `process` accepts connections on `port`, for at most 30 s.
async fn wait_listening(process: &mut Child, port: u16) -> anyhow::Result<Channel> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let endpoint = Channel::from_shared(format!("http://127.0.0.1:{port}"))?;
        if let Ok(channel) = endpoint.connect().await {
            return Ok(channel);
        }
        if let Some(status) = process.try_wait()? {
            anyhow::bail!(
                "the instance on port {port} exited ({status}) before listening; \
                 BENCH_LOG=1 shows its log"
            );
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the instance on port {port} did not listen within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

const CLUSTER_LEASE: &str = "10s";

/// Polls `check` every 50 ms until it returns `Some`, for at most `limit`.
async fn poll<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn recorded(db: &MySqlPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT COUNT(*) FROM product_user_notification_history")
            .fetch_one(db)
            .await?,
    )
}

async fn claim_token(db: &MySqlPool, product: i64) -> anyhow::Result<Option<i64>> {
    Ok(sqlx::query_scalar(
        "SELECT claim_token FROM product_notification_history \
         WHERE product_id = ? AND restock_round = 1",
    )
    .bind(product)
    .fetch_one(db)
    .await?)
}

/// `(product, status, sent_count)` of every run.
async fn runs(db: &MySqlPool) -> anyhow::Result<Vec<(i64, String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT product_id, status, sent_count FROM product_notification_history \
         ORDER BY product_id",
    )
    .fetch_all(db)
    .await?)
}

/// `sent_at` of every recorded notification, by product, sorted.
async fn sent_times_by_product(db: &MySqlPool) -> anyhow::Result<Vec<(i64, Vec<DateTime<Utc>>)>> {
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT product_id, CAST(UNIX_TIMESTAMP(sent_at) * 1000000 AS SIGNED) \
         FROM product_user_notification_history ORDER BY product_id, sent_at",
    )
    .fetch_all(db)
    .await?;
    let mut by_product: Vec<(i64, Vec<DateTime<Utc>>)> = Vec::new();
    for (product, micros) in rows {
        let at = DateTime::from_timestamp_micros(micros).context("sent_at out of range")?;
        match by_product.last_mut() {
            Some((p, times)) if *p == product => times.push(at),
            _ => by_product.push((product, vec![at])),
        }
    }
    Ok(by_product)
}

/// Events per second in `times` (sorted) between `from` and `to`, as a percentage of
/// `limit`, with the count.
fn utilisation(
    times: &[DateTime<Utc>],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    limit: u32,
) -> (usize, f64) {
    let count = times.iter().filter(|&&t| from <= t && t <= to).count();
    let span = (to - from).as_seconds_f64();
    (count, 100.0 * count as f64 / span / f64::from(limit))
}

/// The fresh database of a `cluster` run, with the instances on it.
struct Cluster {
    instances: Vec<Instance>,
    db: MySqlPool,
    server: String,
    database: String,
}

impl Cluster {
    /// Stops the instances left (SIGTERM, then waits for each) and drops the database.
    async fn tear_down(mut self) -> anyhow::Result<()> {
        let mut stopping = Vec::new();
        for instance in &mut self.instances {
            if instance.running()? {
                instance.terminate()?;
                stopping.push(instance);
            }
        }
        for instance in stopping {
            let status = instance.wait_exit(Duration::from_secs(30)).await?;
            anyhow::ensure!(status.success(), "an instance exited {status} on SIGTERM");
        }
        self.db.close().await;
        drop_database(&self.server, &self.database).await
    }
}

impl Cluster {
    /// Starts `instances` processes of the binary on a fresh database and Redis prefix.
    async fn start(instances: u32, limit: u32) -> anyhow::Result<Self> {
        Self::start_on(instances, limit, &redis_url()).await
    }

    /// As `start`, with the instances on Redis at `redis` (a proxy, say).
    async fn start_on(instances: u32, limit: u32, redis: &str) -> anyhow::Result<Self> {
        Self::launch(instances, limit, redis, true, &[]).await
    }

    /// As `start`, with metrics off (`RESTOCK_METRICS_LISTEN=off`).
    async fn start_unmetered(instances: u32, limit: u32) -> anyhow::Result<Self> {
        Self::launch(instances, limit, &redis_url(), false, &[]).await
    }

    async fn launch(
        instances: u32,
        limit: u32,
        redis: &str,
        metrics: bool,
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(limit > 0, "--rate must be positive");
        let binary = server_binary()?;
        let server = std::env::var("BENCH_MYSQL_URL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into());
        let redis = redis.to_owned();
        let database = format!("restock_bench_{:08x}", rand::random::<u32>());
        let database_url = format!("{server}/{database}");
        let prefix = format!("{database}:");

        // The first creates and migrates the database; the others start on it after.
        let first = Instance::start(&binary, &database_url, &redis, &prefix, limit, metrics, env)
            .await
            .context("first instance")?;
        let db = MySqlPool::connect(&database_url).await?;
        let mut cluster = Cluster {
            instances: vec![first],
            db,
            server,
            database,
        };
        for i in 1..instances {
            match Instance::start(&binary, &database_url, &redis, &prefix, limit, metrics, env)
                .await
            {
                Ok(instance) => cluster.instances.push(instance),
                Err(e) => {
                    cluster.tear_down().await?;
                    return Err(e.context(format!("instance {}", i + 1)));
                }
            }
        }
        Ok(cluster)
    }
}

fn redis_url() -> String {
    std::env::var("BENCH_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Added round trips to Redis the `limiter` mode measures, in milliseconds.
const ADDED_ROUND_TRIPS: [u64; 5] = [0, 1, 2, 6, 100];

async fn limiter(
    limit: u32,
    seconds: u32,
    runs: Option<u32>,
    instances: Option<u32>,
) -> anyhow::Result<()> {
    let runs = runs.map_or(vec![1, 100], |runs| vec![runs]);
    let instances = instances.map_or(vec![1, 2], |instances| vec![instances]);
    anyhow::ensure!(
        !runs.contains(&0) && !instances.contains(&0),
        "--runs and --instances must be positive"
    );
    for &instances in &instances {
        for &runs in &runs {
            let per = (limit * seconds / runs).max(1);
            println!(
                "limiter: {instances} instance(s), {runs} run(s) of {per} users, limit \
                 {limit}/s, Redis through a proxy adding the round trip (half each way)"
            );
            for added in ADDED_ROUND_TRIPS {
                let proxy = FaultProxy::for_url(&redis_url()).await;
                proxy.set_delay(Duration::from_micros(added * 500));
                let cluster = Cluster::start_on(instances, limit, &proxy.url(&redis_url())).await?;
                let outcome = limiter_run(&cluster, runs, per, limit, added).await;
                let torn_down = cluster.tear_down().await;
                outcome?;
                torn_down?;
            }
        }
    }
    println!("limiter: the schedule deleted from Redis mid-run, one run alone, limit {limit}/s");
    for added in ADDED_ROUND_TRIPS.into_iter().filter(|&ms| ms <= 6) {
        let proxy = FaultProxy::for_url(&redis_url()).await;
        proxy.set_delay(Duration::from_micros(added * 500));
        let cluster = Cluster::start_on(1, limit, &proxy.url(&redis_url())).await?;
        let outcome = lost_schedule_run(&cluster, limit, seconds.max(4), added).await;
        let torn_down = cluster.tear_down().await;
        outcome?;
        torn_down?;
    }
    Ok(())
}

/// One run alone; halfway through, its limiter's schedule is deleted from Redis.
async fn lost_schedule_run(
    cluster: &Cluster,
    limit: u32,
    seconds: u32,
    added: u64,
) -> anyhow::Result<()> {
    let db = &cluster.db;
    let users: Vec<i64> = (1..=i64::from(limit * seconds)).collect();
    seed_product(&cluster.instances[0].client, db, 1, 1_000_000, &users).await?;
    trigger(&cluster.instances[0].client, 1).await?;
    let half = i64::from(limit * seconds / 2);
    poll(
        "half the run recorded",
        Duration::from_secs(120),
        || async { Ok((recorded(db).await? >= half).then_some(())) },
    )
    .await?;
    let redis = restock_notifier::redis::connect(&redis_url()).await?;
    let key = restock_notifier::redis::Keys::new(format!("{}:", cluster.database)).limiter();
    let deleted: i64 = fred::prelude::KeysInterface::del(&redis, &key).await?;
    let lost_at = Utc::now();
    anyhow::ensure!(deleted == 1, "no schedule at {key}");
    poll("the run completed", Duration::from_secs(120), || async {
        let runs_now = runs_status(db).await?;
        Ok(runs_now.iter().all(|(_, s)| s == "COMPLETED").then_some(()))
    })
    .await?;
    let all = sent_times_by_product(db).await?.remove(0).1;
    let pause = all
        .windows(2)
        .filter(|w| w[1] > lost_at)
        .map(|w| (w[1] - w[0]).as_seconds_f64() * 1e3)
        .fold(0.0, f64::max);
    let busiest = busiest_second(&all);
    println!(
        "  +{added:>3} ms round trip: longest pause after the loss {pause:.1} ms, busiest 1 s \
         window {busiest} (limit {limit}): {}",
        if busiest <= limit as usize {
            "PASS"
        } else {
            "FAIL"
        },
    );
    Ok(())
}

async fn limiter_run(
    cluster: &Cluster,
    runs: u32,
    per: u32,
    limit: u32,
    added: u64,
) -> anyhow::Result<()> {
    let db = &cluster.db;
    let order: Vec<i64> = (1..=i64::from(per)).collect();
    let products: Vec<i64> = (1..=i64::from(runs)).collect();
    for &product in &products {
        seed_product(&cluster.instances[0].client, db, product, 1_000_000, &order).await?;
    }
    // Every run at once, spread over the instances; when each call returned.
    let triggered = Instant::now();
    let returned: Vec<DateTime<Utc>> =
        futures::future::try_join_all(products.iter().map(|&product| {
            let instance = &cluster.instances[(product as usize - 1) % cluster.instances.len()];
            async move {
                trigger(&instance.client, product).await?;
                anyhow::Ok(Utc::now())
            }
        }))
        .await?;
    let expected = Duration::from_secs_f64(f64::from(runs * per) / f64::from(limit));
    poll(
        "every run completed",
        expected * 4 + Duration::from_secs(60),
        || async {
            let runs_now = runs_status(db).await?;
            if let Some((product, status)) = runs_now
                .iter()
                .find(|(_, s)| s != "IN_PROGRESS" && s != "COMPLETED")
            {
                anyhow::bail!("product {product}'s run ended {status}");
            }
            let done =
                runs_now.len() == products.len() && runs_now.iter().all(|(_, s)| s == "COMPLETED");
            Ok(done.then_some(()))
        },
    )
    .await?;
    let wall = triggered.elapsed();

    let by_product = sent_times_by_product(db).await?;
    let mut all: Vec<DateTime<Utc>> = by_product
        .iter()
        .flat_map(|(_, times)| times.iter().copied())
        .collect();
    all.sort();
    anyhow::ensure!(!all.is_empty(), "nothing recorded");
    // While every run still had work: from the first send to the first run's last.
    let first = all[0];
    let end = by_product
        .iter()
        .filter_map(|(_, times)| times.last().copied())
        .min()
        .context("no run sent")?;
    let (rows, used) = utilisation(&all, first, end, limit);
    let busiest = busiest_second(&all);
    // The longest wait from a TriggerRestock returning to its run's first send.
    let first_wait = by_product
        .iter()
        .filter_map(|(product, times)| {
            let returned = returned[usize::try_from(*product).ok()? - 1];
            Some((*times.first()? - returned).as_seconds_f64())
        })
        .fold(f64::MIN, f64::max);
    let mut dropped = 0.0;
    for instance in &cluster.instances {
        dropped += instance
            .metric("restock_send_limiter_dropped_total")
            .await?;
    }
    println!(
        "  +{added:>3} ms round trip: utilisation {used:.2}% ({rows} sends in {:.2} s), \
         busiest 1 s window {busiest} (limit {limit}): {}, slots dropped {dropped}, \
         every run's first send within {:.1} ms of its trigger; wall {wall:.1?}",
        (end - first).as_seconds_f64(),
        if busiest <= limit as usize {
            "PASS"
        } else {
            "FAIL"
        },
        first_wait * 1e3,
    );
    Ok(())
}

/// `(product, status)` of every run.
async fn runs_status(db: &MySqlPool) -> anyhow::Result<Vec<(i64, String)>> {
    Ok(sqlx::query_as(
        "SELECT product_id, status FROM product_notification_history ORDER BY product_id",
    )
    .fetch_all(db)
    .await?)
}

async fn cluster(users: u32, limit: u32, instances: u32) -> anyhow::Result<()> {
    anyhow::ensure!(instances >= 2, "--instances must be at least 2");
    let per = users / instances;
    anyhow::ensure!(per > 0, "--users must be at least --instances");
    let mut cluster = Cluster::start(instances, limit).await?;
    let outcome = cluster_run(&mut cluster, per, limit).await;
    let torn_down = cluster.tear_down().await;
    outcome?;
    torn_down
}

async fn cluster_run(cluster: &mut Cluster, per: u32, limit: u32) -> anyhow::Result<()> {
    let db = &cluster.db.clone();
    let n = cluster.instances.len() as i64;
    let total = i64::from(per) * n;
    // Registration order differs from user id order: the history must follow the former.
    let order: Vec<i64> = (1..=i64::from(per)).rev().collect();
    for product in 1..=n {
        seed_product(&cluster.instances[0].client, db, product, 1_000_000, &order).await?;
    }

    // Product i on instance i, all at once.
    let began = Instant::now();
    futures::future::try_join_all(
        cluster
            .instances
            .iter()
            .zip(1..)
            .map(|(instance, product)| trigger(&instance.client, product)),
    )
    .await?;
    let expected = Duration::from_secs_f64(total as f64 / f64::from(limit));
    let generous = expected * 3 + Duration::from_secs(60);

    // SIGKILL the owner of product N once 40% of all sends are recorded.
    let kill_at = total * 2 / 5;
    let before_kill = poll("40% recorded", generous, || async {
        let count = recorded(db).await?;
        Ok((count >= kill_at).then_some(count))
    })
    .await?;
    let token = claim_token(db, n).await?;
    let victim = &mut cluster.instances.last_mut().context("no instance")?.process;
    victim.kill().context("kill -9 of the last instance")?;
    let killed = Instant::now();
    let killed_at = Utc::now();
    victim.wait()?;

    let taken_over = poll("takeover of the killed run", generous, || async {
        Ok((claim_token(db, n).await? != token).then(|| killed.elapsed()))
    })
    .await?;
    let finished = poll("the killed run's completion", generous, || async {
        let status: String = sqlx::query_scalar(
            "SELECT status FROM product_notification_history \
             WHERE product_id = ? AND restock_round = 1",
        )
        .bind(n)
        .fetch_one(db)
        .await?;
        anyhow::ensure!(
            status == "IN_PROGRESS" || status == "COMPLETED",
            "product {n}'s run ended {status}"
        );
        Ok((status == "COMPLETED").then(|| killed.elapsed()))
    })
    .await?;
    let runs = poll("every run completed", generous, || async {
        let runs = runs(db).await?;
        if let Some((product, status, _)) = runs
            .iter()
            .find(|(_, s, _)| s != "IN_PROGRESS" && s != "COMPLETED")
        {
            anyhow::bail!("product {product}'s run ended {status}");
        }
        let done = runs.len() as i64 == n && runs.iter().all(|(_, s, _)| s == "COMPLETED");
        Ok(done.then_some(runs))
    })
    .await?;
    let wall = began.elapsed();

    let by_product = sent_times_by_product(db).await?;
    let mut all: Vec<DateTime<Utc>> = by_product
        .iter()
        .flat_map(|(_, times)| times.iter().copied())
        .collect();
    all.sort();
    anyhow::ensure!(!all.is_empty(), "nothing recorded");
    let (first, last) = (all[0], all[all.len() - 1]);
    let busiest = busiest_second(&all);
    let (rows_whole, whole) = utilisation(&all, first, last, limit);
    let (rows_before, before) = utilisation(&all, first, killed_at, limit);
    let longest_gap = all
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    let duplicates: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT 1 FROM product_user_notification_history \
         GROUP BY product_id, restock_round, user_id HAVING COUNT(*) > 1) AS d",
    )
    .fetch_one(db)
    .await?;

    println!(
        "cluster: {n} instances, {total} users ({per} per product), limit {limit}/s shared, \
         lease {CLUSTER_LEASE}; wall {wall:.2?}"
    );
    println!(
        "  kill -9 of instance {n} (owner of product {n}) at {before_kill} recorded: \
         taken over after {taken_over:.2?}, its run completed {finished:.2?} after the kill"
    );
    let mut in_order = true;
    for (product, status, sent_count) in &runs {
        let history: Vec<i64> = sqlx::query_scalar(
            "SELECT user_id FROM product_user_notification_history \
             WHERE product_id = ? AND restock_round = 1 ORDER BY id",
        )
        .bind(product)
        .fetch_all(db)
        .await?;
        let ordered = history == order;
        in_order &= ordered;
        let times = by_product
            .iter()
            .find(|(p, _)| p == product)
            .map(|(_, t)| t.as_slice())
            .unwrap_or_default();
        let last_sent = match times.last() {
            Some(&t) if t >= killed_at => {
                format!("{:.2} s after the kill", (t - killed_at).as_seconds_f64())
            }
            Some(&t) => format!("{:.2} s before the kill", (killed_at - t).as_seconds_f64()),
            None => "none".into(),
        };
        println!(
            "  product {product} (instance {product}): {status}, sent_count {sent_count}, \
             {} rows, last send {last_sent}, history in registration order: {}",
            history.len(),
            if ordered { "yes" } else { "NO" }
        );
    }
    println!(
        "  busiest 1 s window over all instances {busiest} (limit {limit}): {}",
        if busiest <= limit as usize {
            "PASS"
        } else {
            "FAIL"
        }
    );
    println!(
        "  utilisation, whole span (first to last send, {:.2} s, includes the takeover gap): \
         {rows_whole} rows, {whole:.2}% of limit",
        (last - first).as_seconds_f64()
    );
    println!(
        "  utilisation, before the kill (first send to kill, {:.2} s): {rows_before} rows, \
         {before:.2}% of limit; longest pause between sends {:.1} ms",
        (killed_at - first).as_seconds_f64(),
        longest_gap.as_seconds_f64() * 1_000.0
    );
    println!(
        "  duplicates (product, round, user recorded more than once): {duplicates}; \
         every history in registration order: {}",
        if in_order { "yes" } else { "NO" }
    );
    Ok(())
}

/// Endpoint latencies `webhook` measures, in milliseconds.
const WEBHOOK_LATENCIES: [u64; 3] = [0, 50, 200];

/// `webhook`: for each endpoint latency, the release binary (clustered, as its own
/// process) delivers `rate x seconds` notifications to an endpoint in this process that
/// answers 204 after that latency; the rate, the busiest one-second window (retries
/// included) and the request count are measured at the endpoint, the CPU on the server.
async fn webhook(limit: u32, seconds: u32) -> anyhow::Result<()> {
    let users: Vec<i64> = (1..=i64::from(limit * seconds)).collect();
    println!(
        "webhook: {} notifications at {limit}/s to an endpoint in this process",
        users.len()
    );
    for latency in WEBHOOK_LATENCIES {
        let (url, arrivals) = start_endpoint(Duration::from_millis(latency)).await?;
        let secret = format!("whsec_{}", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let env = [
            ("RESTOCK_WEBHOOK_URL".to_string(), url),
            ("RESTOCK_WEBHOOK_SECRET".to_string(), secret),
        ];
        let cluster = Cluster::launch(1, limit, &redis_url(), true, &env).await?;
        let outcome = webhook_run(&cluster, &users, limit, latency, &arrivals).await;
        let torn_down = cluster.tear_down().await;
        outcome?;
        torn_down?;
    }
    Ok(())
}

async fn webhook_run(
    cluster: &Cluster,
    users: &[i64],
    limit: u32,
    latency: u64,
    arrivals: &std::sync::Arc<std::sync::Mutex<Vec<DateTime<Utc>>>>,
) -> anyhow::Result<()> {
    let server = &cluster.instances[0];
    seed_product(&server.client, &cluster.db, 1, 1_000, users).await?;
    let cpu_before = server.cpu_time()?;
    trigger(&server.client, 1).await?;
    let status = wait_final(&server.client, 1, Duration::from_millis(100))
        .await?
        .status();
    let cpu = server.cpu_time()? - cpu_before;
    let mut times = arrivals.lock().unwrap().clone();
    times.sort();
    let delivered = recorded(&cluster.db).await?;
    // As the service stamped them when it started the requests: what the limiter
    // granted, before the HTTP stack and the endpoint's own scheduling.
    let stamped: Vec<DateTime<Utc>> = sent_times_by_product(&cluster.db)
        .await?
        .into_iter()
        .flat_map(|(_, times)| times)
        .collect();
    println!(
        "  endpoint latency {latency:>3} ms: {status:?}, {} requests for {delivered} recorded; \
         {:.1}/s = {:.2}% of the limit; busiest 1 s window {} at the endpoint, {} by sent_at; \
         server CPU {:.1} µs per delivery",
        times.len(),
        rate(&times),
        100.0 * rate(&times) / f64::from(limit),
        busiest_second(&times),
        busiest_second(&stamped),
        cpu.as_secs_f64() * 1e6 / delivered.max(1) as f64,
    );
    Ok(())
}

/// An HTTP/1.1 endpoint on 127.0.0.1:0 that answers every request 204 after `latency`,
/// noting when each arrived.
async fn start_endpoint(
    latency: Duration,
) -> anyhow::Result<(String, std::sync::Arc<std::sync::Mutex<Vec<DateTime<Utc>>>>)> {
    use http_body_util::{BodyExt as _, Full};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let arrivals = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let noted = arrivals.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let noted = noted.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: hyper::Request<hyper::body::Incoming>| {
                        let noted = noted.clone();
                        async move {
                            noted.lock().unwrap().push(Utc::now());
                            let _ = request.into_body().collect().await;
                            if !latency.is_zero() {
                                tokio::time::sleep(latency).await;
                            }
                            let mut answer = hyper::Response::new(Full::new(bytes::Bytes::new()));
                            *answer.status_mut() = hyper::StatusCode::NO_CONTENT;
                            Ok::<_, std::convert::Infallible>(answer)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((url, arrivals))
}

/// What to measure; `--help` lists each mode's options.
#[derive(Parser)]
#[command(name = "bench", about = "Benchmarks of the targets in the README")]
enum Bench {
    /// The sustained send rate, the busiest one-second window and send-to-receive latency.
    Pacing {
        #[arg(long, default_value_t = 10_000)]
        users: u32,
        #[arg(long, default_value_t = 500)]
        rate: u32,
    },
    /// The engine at its highest send rate against a plain batched INSERT.
    Ceiling {
        #[arg(long, default_value_t = 200_000)]
        users: u32,
    },
    /// The process's RSS: idle and at the peak of one run, or with `--waves`, `--runs N`
    /// or `--streams N`.
    Memory {
        #[arg(long, default_value_t = 1_000_000)]
        users: u32,
        /// Sample while a run waits between waves.
        #[arg(long, conflicts_with_all = ["runs", "streams"])]
        waves: bool,
        /// Hold one `Subscribe` stream open while this many runs go by.
        #[arg(long, conflicts_with_all = ["users", "streams"])]
        runs: Option<u32>,
        /// Open this many idle `Subscribe` streams.
        #[arg(long, conflicts_with = "users")]
        streams: Option<u32>,
    },
    /// Streams from this process on the real binary.
    Fanout {
        #[arg(long, default_value_t = 1_000)]
        streams: u32,
        #[arg(long, default_value_t = 5_000)]
        users: u32,
        #[arg(long, default_value_t = 500)]
        rate: u32,
        /// The run on one instance, the streams on another.
        #[arg(long)]
        across: bool,
        /// Trigger with attributes of about this many bytes (at most 4096).
        #[arg(long, default_value_t = 0)]
        attributes: usize,
    },
    /// The send limiter with an added round trip to Redis.
    Limiter {
        #[arg(long, default_value_t = 500)]
        rate: u32,
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// Runs triggered together (default: one alone, then 100).
        #[arg(long)]
        runs: Option<u32>,
        /// Instances (default: one, then two).
        #[arg(long)]
        instances: Option<u32>,
    },
    /// Several processes on one database and Redis prefix, one of them killed.
    Cluster {
        #[arg(long, default_value_t = 30_000)]
        users: u32,
        #[arg(long, default_value_t = 500)]
        rate: u32,
        #[arg(long, default_value_t = 3)]
        instances: u32,
    },
    /// The cost of the authorization layer on a GetRestockRun call.
    Auth {
        #[arg(long, default_value_t = 20_000)]
        calls: u32,
        #[arg(long, default_value_t = 16)]
        concurrency: u32,
    },
    /// The demand report over many products.
    Demand {
        #[arg(long, default_value_t = 100_000)]
        products: u32,
    },
    /// Server CPU per notification with traces off, then exported to a collector hosted
    /// here.
    Traces {
        #[arg(long, default_value_t = 10_000)]
        users: u32,
        #[arg(long, default_value_t = 2_000)]
        rate: u32,
    },
    /// The retention sweep deleting expired history while a run goes on at the rate.
    Retention {
        #[arg(long, default_value_t = 1_000_000)]
        rows: u32,
        #[arg(long, default_value_t = 60)]
        seconds: u32,
        /// The same run beside the same rows, never let go to the sweep: the baseline.
        #[arg(long)]
        no_sweep: bool,
    },
    /// The limiter and the fan-out on one Redis and on a Redis Cluster (three masters,
    /// three replicas, started here), side by side in one run, two instances each.
    RedisCluster {
        #[arg(long, default_value_t = 500)]
        rate: u32,
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        #[arg(long, default_value_t = 1_000)]
        streams: u32,
        #[arg(long, default_value_t = 3_000)]
        users: u32,
    },
    /// Delivery to a webhook endpoint.
    Webhook {
        #[arg(long, default_value_t = 500)]
        rate: u32,
        #[arg(long, default_value_t = 20)]
        seconds: u32,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Bench::parse() {
        Bench::Pacing { users, rate } => pacing(users, rate).await,
        Bench::Ceiling { users } => ceiling(users).await,
        Bench::Memory {
            users, waves: true, ..
        } => memory_waves(users).await,
        Bench::Memory {
            streams: Some(streams),
            ..
        } => memory_streams(streams).await,
        Bench::Memory {
            runs: Some(runs), ..
        } => memory_runs(runs).await,
        Bench::Memory { users, .. } => memory(users).await,
        Bench::Fanout {
            streams,
            users,
            rate,
            across,
            attributes,
        } => fanout(streams, users, rate, across, attributes).await,
        Bench::Limiter {
            rate,
            seconds,
            runs,
            instances,
        } => limiter(rate, seconds, runs, instances).await,
        Bench::Cluster {
            users,
            rate,
            instances,
        } => cluster(users, rate, instances).await,
        Bench::Webhook { rate, seconds } => webhook(rate, seconds).await,
        Bench::Auth { calls, concurrency } => auth(calls, concurrency).await,
        Bench::Demand { products } => demand(products).await,
        Bench::RedisCluster {
            rate,
            seconds,
            streams,
            users,
        } => on_redis_cluster(rate, seconds, streams, users).await,
        Bench::Retention {
            rows,
            seconds,
            no_sweep,
        } => retention(rows, seconds, !no_sweep).await,
        Bench::Traces { users, rate } => traces(users, rate).await,
    }
}

/// Counts the spans exported to it: the OTLP trace service, as a collector serves it.
#[derive(Clone, Default)]
struct SpanCounter(std::sync::Arc<std::sync::atomic::AtomicU64>);

#[tonic::async_trait]
impl TraceService for SpanCounter {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0
            .fetch_add(spans as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// `traces`: one run of `users` at `rate`, on a process with traces off, then on one
/// exporting them to a collector in this process; the server's CPU per notification
/// for each.
async fn traces(users: u32, rate: u32) -> anyhow::Result<()> {
    let counter = SpanCounter::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(counter.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let on = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT".to_string(), endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY".to_string(), "200".to_string()),
    ];
    for (label, env) in [("off", &[][..]), ("exported", &on[..])] {
        let cluster = Cluster::launch(1, rate, &redis_url(), true, env).await?;
        let outcome = async {
            let server = &cluster.instances[0];
            let order: Vec<i64> = (1..=i64::from(users)).collect();
            seed_product(&server.client, &cluster.db, 1, 1_000_000, &order).await?;
            let cpu = server.cpu_time()?;
            trigger(&server.client, 1).await?;
            let run = wait_final(&server.client, 1, Duration::from_millis(200)).await?;
            let cpu = server.cpu_time()? - cpu;
            anyhow::ensure!(run.status() == RunStatus::Completed, "run: {run:?}");
            // The last batch of spans goes out within the export delay.
            tokio::time::sleep(Duration::from_millis(500)).await;
            println!(
                "traces {label}: {users} notifications at {rate}/s, server CPU {cpu:.2?} = \
                 {:.2} µs per notification",
                cpu.as_secs_f64() * 1e6 / f64::from(users)
            );
            anyhow::Ok(())
        }
        .await;
        cluster.tear_down().await.and(outcome)?;
    }
    println!(
        "  spans the collector received: {}",
        counter.0.load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(())
}

/// `retention`: one process with `RESTOCK_HISTORY_RETENTION=1h`, `rows` history rows of a
/// round that ended two days ago, and a run of `seconds` at 500/s started as the sweep
/// starts. Reports the run's utilisation and busiest second, the rows the sweep deleted
/// meanwhile, and how long its statements took (they hold their locks that long).
async fn retention(rows: u32, seconds: u32, sweep: bool) -> anyhow::Result<()> {
    let env = [("RESTOCK_HISTORY_RETENTION".to_string(), "1h".to_string())];
    let cluster = Cluster::launch(1, 500, &redis_url(), true, &env).await?;
    let outcome = retention_run(&cluster, rows, seconds, sweep).await;
    cluster.tear_down().await.and(outcome)
}

/// Writes `rows` history rows of product 1's round 1, a run that ended two days ago,
/// held back from the sweep (`history_swept`) until the caller lets it go.
async fn seed_expired_history(db: &MySqlPool, rows: u32) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO product_notification_history \
         (product_id, restock_round, status, updated_at, history_swept) \
         VALUES (1, 1, 'COMPLETED', NOW(6) - INTERVAL 2 DAY, TRUE)",
    )
    .execute(db)
    .await?;
    let first = rows.min(1_000);
    let mut insert = sqlx::QueryBuilder::<sqlx::MySql>::new(
        "INSERT INTO product_user_notification_history \
         (product_id, user_id, restock_round, sent_at) ",
    );
    insert.push_values(1..=first, |mut row, user| {
        row.push_bind(1i64)
            .push_bind(i64::from(user))
            .push_bind(1i64)
            .push("NOW(6) - INTERVAL 2 DAY");
    });
    insert.build().execute(db).await?;
    let mut have = first;
    while have < rows {
        let add = have.min(rows - have);
        sqlx::query(
            "INSERT INTO product_user_notification_history \
             (product_id, user_id, restock_round, sent_at) \
             SELECT 1, user_id + ?, 1, sent_at FROM product_user_notification_history \
             WHERE product_id = 1 AND restock_round = 1 ORDER BY user_id LIMIT ?",
        )
        .bind(i64::from(have))
        .bind(i64::from(add))
        .execute(db)
        .await?;
        have += add;
    }
    Ok(())
}

async fn retention_run(
    cluster: &Cluster,
    rows: u32,
    seconds: u32,
    sweep: bool,
) -> anyhow::Result<()> {
    let (db, server) = (&cluster.db, &cluster.instances[0]);
    let seeding = Instant::now();
    seed_expired_history(db, rows).await?;
    let users: Vec<i64> = (1..=i64::from(500 * seconds)).collect();
    seed_product(&server.client, db, 2, 1_000_000, &users).await?;
    println!(
        "retention: {rows} expired history rows and {} users seeded in {:.1?}",
        users.len(),
        seeding.elapsed()
    );
    if sweep {
        sqlx::query(
            "UPDATE product_notification_history SET history_swept = FALSE WHERE product_id = 1",
        )
        .execute(db)
        .await?;
    } else {
        println!("  (the old round is never let go to the sweep: the baseline)");
    }
    let began = Instant::now();
    trigger(&server.client, 2).await?;
    let run = wait_final(&server.client, 2, Duration::from_millis(500)).await?;
    let wall = began.elapsed();
    let deleted_during_run = server.metric("restock_history_deleted_total").await?;
    let times: Vec<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT sent_at FROM product_user_notification_history WHERE product_id = 2 ORDER BY id",
    )
    .fetch_all(db)
    .await?;
    anyhow::ensure!(
        run.status() == RunStatus::Completed && times.len() == users.len(),
        "run: {run:?}, {} recorded",
        times.len()
    );
    println!(
        "  run of {} at 500/s beside the sweep: utilisation {:.2}%, busiest 1 s window {} \
         (limit 500); wall {wall:.1?}",
        users.len(),
        rate(&times) / 5.0,
        busiest_second(&times)
    );
    println!(
        "  the sweep deleted {deleted_during_run} rows meanwhile ({:.0} a second)",
        deleted_during_run / wall.as_secs_f64()
    );
    let statements = server
        .metric("restock_history_sweep_statement_seconds_count")
        .await?;
    let sum = server
        .metric("restock_history_sweep_statement_seconds_sum")
        .await?;
    let mut within = Vec::new();
    for le in ["0.01", "0.025", "0.05", "0.1"] {
        let name = format!("restock_history_sweep_statement_seconds_bucket{{le=\"{le}\"}}");
        within.push(format!("{} within {le} s", server.metric(&name).await?));
    }
    println!(
        "  {statements} delete statements, mean {:.1} ms; {}",
        sum / statements.max(1.0) * 1_000.0,
        within.join(", ")
    );
    Ok(())
}

/// `redis-cluster`: the same two instances' limiter (one run alone, then 100 runs) and
/// fan-out (the streams on the other instance than the run) on one Redis, then on a
/// Redis Cluster.
async fn on_redis_cluster(
    limit: u32,
    seconds: u32,
    streams: u32,
    users: u32,
) -> anyhow::Result<()> {
    let redis_cluster = redis_cluster::RedisCluster::start().await;
    for (name, url) in [
        ("one Redis", redis_url()),
        ("Redis Cluster", redis_cluster.url()),
    ] {
        println!("== {name}");
        for runs in [1, 100] {
            let per = (limit * seconds / runs).max(1);
            println!("limiter: 2 instances, {runs} run(s) of {per} users, limit {limit}/s");
            let cluster = Cluster::start_on(2, limit, &url).await?;
            let outcome = limiter_run(&cluster, runs, per, limit, 0).await;
            cluster.tear_down().await.and(outcome)?;
        }
        let cluster = Cluster::start_on(2, limit, &url).await?;
        let outcome = fanout_run(&cluster, streams, users, limit, HashMap::new()).await;
        cluster.tear_down().await.and(outcome)?;
    }
    Ok(())
}

async fn demand(products: u32) -> anyhow::Result<()> {
    let cluster = Cluster::launch(1, 500, &redis_url(), true, &[]).await?;
    let outcome = demand_walk(&cluster, products).await;
    cluster.tear_down().await.and(outcome)
}

async fn demand_walk(cluster: &Cluster, products: u32) -> anyhow::Result<()> {
    let ids: Vec<i64> = (1..=i64::from(products)).collect();
    for chunk in ids.chunks(5_000) {
        let mut q = sqlx::QueryBuilder::new("INSERT INTO product (id, stock, waiting) ");
        // A spread of demand, with many ties (as real catalogues have).
        q.push_values(chunk, |mut row, id| {
            row.push_bind(*id)
                .push_bind(1)
                .push_bind((id * 7_919) % 10_001);
        });
        q.build().execute(&cluster.db).await?;
    }
    let plan: Vec<(Option<String>, Option<String>, Option<String>)> = sqlx::query(
        "EXPLAIN SELECT id FROM product FORCE INDEX (ix_product_waiting) \
         WHERE waiting < 5000 OR (waiting = 5000 AND id < 100) \
         ORDER BY waiting DESC, id DESC LIMIT 51",
    )
    .fetch_all(&cluster.db)
    .await
    .map(|rows: Vec<sqlx::mysql::MySqlRow>| {
        use sqlx::Row as _;
        rows.iter()
            .map(|r| {
                (
                    r.try_get("type").ok(),
                    r.try_get("key").ok(),
                    r.try_get("Extra").ok(),
                )
            })
            .collect()
    })?;
    println!("demand: {products} products; MySQL's plan of a next page: {plan:?}");
    let mut client = cluster.instances[0].client.clone();
    let (mut token, mut latencies, mut seen) = (String::new(), vec![], 0usize);
    loop {
        let at = Instant::now();
        let page = client
            .list_products(proto::ListProductsRequest {
                order_by: proto::ProductOrder::WaitingDesc as i32,
                page_size: 50,
                page_token: token,
            })
            .await?
            .into_inner();
        latencies.push(at.elapsed().as_secs_f64() * 1e3);
        seen += page.products.len();
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let deepest = *latencies.last().unwrap_or(&0.0);
    latencies.sort_by(f64::total_cmp);
    println!(
        "  walked {} pages ({seen} products): p50 {:.2} ms, p99 {:.2} ms, last page {:.2} ms",
        latencies.len(),
        percentile(&latencies, 50),
        percentile(&latencies, 99),
        deepest
    );
    anyhow::ensure!(seen == products as usize, "the walk saw {seen} products");
    alert_lookup(cluster, ALERT_QUEUE).await
}

/// Users waiting for the product of the GetAlert measurement.
const ALERT_QUEUE: i64 = 1_000_000;

/// GetAlert for a user at position 900,000 of a product with a million users waiting:
/// the users ahead are counted from ix_pun_queue on every call.
async fn alert_lookup(cluster: &Cluster, queue: i64) -> anyhow::Result<()> {
    let product = i64::from(u32::MAX);
    let users: Vec<i64> = (1..=queue).collect();
    seed_product(
        &cluster.instances[0].client,
        &cluster.db,
        product,
        1,
        &users,
    )
    .await?;
    let mut client = cluster.instances[0].client.clone();
    let user = queue * 9 / 10;
    let mut latencies = vec![];
    let mut answer = None;
    for _ in 0..50 {
        let at = Instant::now();
        let status = client
            .get_alert(proto::GetAlertRequest {
                product_id: product,
                user_id: user,
            })
            .await?
            .into_inner();
        latencies.push(at.elapsed().as_secs_f64() * 1e3);
        answer = Some((status.position, status.users_ahead));
    }
    latencies.sort_by(f64::total_cmp);
    println!(
        "  GetAlert at position {user} of {queue}: {answer:?} (position, users ahead); \
         p50 {:.1} ms, p99 {:.1} ms over 50 calls",
        percentile(&latencies, 50),
        percentile(&latencies, 99)
    );
    Ok(())
}

/// The bearer token of the reader the `auth` bench's policy knows.
const AUTH_TOKEN: &str = "bench-reader-token";

async fn auth(calls: u32, concurrency: u32) -> anyhow::Result<()> {
    use sha2::Digest as _;
    let digest: String = sha2::Sha256::digest(AUTH_TOKEN.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let file =
        std::env::temp_dir().join(format!("restock-bench-callers-{}.toml", std::process::id()));
    std::fs::write(
        &file,
        format!(
            "[[caller]]\nname = \"bench\"\ntoken_sha256 = [\"{digest}\"]\nroles = [\"read\"]\n"
        ),
    )?;
    let env = [("RESTOCK_CALLERS".to_string(), file.display().to_string())];
    let open = Cluster::launch(1, 500, &redis_url(), true, &[]).await?;
    let known = Cluster::launch(1, 500, &redis_url(), true, &env).await?;
    let outcome = auth_turns(&open, &known, calls, concurrency).await;
    let (a, b) = (open.tear_down().await, known.tear_down().await);
    let _ = std::fs::remove_file(&file);
    outcome.and(a).and(b)
}

async fn auth_turns(
    open: &Cluster,
    known: &Cluster,
    calls: u32,
    concurrency: u32,
) -> anyhow::Result<()> {
    println!(
        "auth: {calls} GetRestockRun calls (of a product with no run: NOT_FOUND, one \
         indexed read), {concurrency} at a time, in turns"
    );
    let mut totals = [(0.0, 0.0, 0.0, 0.0); 2];
    for round in 1..=3 {
        for (i, (cluster, token)) in [(open, None), (known, Some(AUTH_TOKEN))]
            .into_iter()
            .enumerate()
        {
            let server = &cluster.instances[0];
            let cpu_before = server.cpu_time()?;
            let (per_second, p50, p99) = get_calls(server, calls, concurrency, token).await?;
            let cpu = (server.cpu_time()? - cpu_before).as_secs_f64() * 1e6 / f64::from(calls);
            let name = if token.is_some() {
                "with a policy "
            } else {
                "without policy"
            };
            println!(
                "  round {round}, {name}: {per_second:.0} calls/s, p50 {p50:.3} ms, p99 {p99:.3} ms, \
                 server CPU {cpu:.1} µs per call"
            );
            let t = &mut totals[i];
            *t = (t.0 + per_second, t.1 + p50, t.2 + p99, t.3 + cpu);
        }
    }
    let [o, k] = totals;
    println!(
        "  with a policy / without, over the three rounds: throughput {:.3}, p50 {:.3}, \
         p99 {:.3}, server CPU per call {:.3}",
        k.0 / o.0,
        k.1 / o.1,
        k.2 / o.2,
        k.3 / o.3
    );
    Ok(())
}

/// `calls` GetRestockRun calls of product 1, `concurrency` at a time: calls per second,
/// p50 and p99 latency in milliseconds.
async fn get_calls(
    server: &Instance,
    calls: u32,
    concurrency: u32,
    token: Option<&'static str>,
) -> anyhow::Result<(f64, f64, f64)> {
    let started = Instant::now();
    let per_task = calls / concurrency;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let mut client = server.client.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_task as usize);
                for _ in 0..per_task {
                    let mut request = tonic::Request::new(proto::GetRestockRunRequest {
                        product_id: 1,
                        restock_round: None,
                    });
                    if let Some(token) = token {
                        let value = format!("Bearer {token}").parse()?;
                        request.metadata_mut().insert("authorization", value);
                    }
                    let at = Instant::now();
                    match client.get_restock_run(request).await {
                        Ok(_) => {}
                        Err(status) if status.code() == tonic::Code::NotFound => {}
                        Err(status) => anyhow::bail!("GetRestockRun answered {status:?}"),
                    }
                    latencies.push(at.elapsed().as_secs_f64() * 1e3);
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut all = vec![];
    for task in tasks {
        all.extend(task.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    Ok((
        all.len() as f64 / elapsed,
        percentile(&all, 50),
        percentile(&all, 99),
    ))
}

/// Drops a benchmark's database.
async fn drop_database(server: &str, database: &str) -> anyhow::Result<()> {
    let mut conn = MySqlConnection::connect(server).await?;
    sqlx::raw_sql(&format!("DROP DATABASE `{database}`"))
        .execute(&mut conn)
        .await?;
    Ok(())
}
