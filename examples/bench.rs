//! Benchmarks of the targets in the README, against a real MySQL and Redis (a fresh database per run).
//!
//! ```text
//! cargo run --release --example bench -- pacing  [--users 10000] [--rate 500]
//! cargo run --release --example bench -- ceiling [--users 200000]
//! cargo run --release --example bench -- memory  [--users 1000000]
//! cargo run --release --example bench -- fanout  [--streams 1000] [--users 5000] [--rate 500]
//! ```
//!
//! `pacing` measures the sustained send rate and the busiest one-second window, both
//! from the recorded `sent_at` and from the arrival times at a live subscriber, plus
//! the send-to-receive latency. `ceiling` runs the engine with no send limit and
//! compares it with a plain batched INSERT of the same rows into the same MySQL.
//! `memory` reports the peak RSS of the process during one unlimited run (the peak is
//! reset after seeding). `fanout` opens many streams and checks that every stream gets
//! every notification, with the send-to-receive p99 over all of them.
//! `BENCH_MYSQL_URL` (server, no database) and `BENCH_REDIS_URL` override the local
//! defaults.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use restock_notifier::config::{Config, LogFormat};
use restock_notifier::engine::EngineSettings;
use restock_notifier::grpc::proto::restock_service_client::RestockServiceClient;
use restock_notifier::grpc::proto::{self, RunStatus};
use restock_notifier::startup::Application;
use sqlx::{Connection, MySqlConnection, MySqlPool};
use tonic::transport::Channel;

struct Bench {
    client: RestockServiceClient<Channel>,
    db: MySqlPool,
    server: String,
    database: String,
}

async fn start(rate: u32) -> anyhow::Result<Bench> {
    let server =
        std::env::var("BENCH_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into());
    let redis =
        std::env::var("BENCH_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let database = format!("restock_bench_{:08x}", rand::random::<u32>());
    let config = Config {
        listen: "127.0.0.1:0".parse()?,
        database_url: format!("{server}/{database}"),
        redis_url: Some(redis),
        redis_prefix: format!("{database}:"),
        send_rate: NonZeroU32::new(rate).context("rate must be positive")?,
        api_rate: NonZeroU32::new(100_000).unwrap(),
        admin_token: Some("bench".into()),
        log: "warn".into(),
        log_format: LogFormat::Text,
        run_lease: std::time::Duration::from_secs(10),
    };
    let settings = EngineSettings {
        subscriber_buffer: 1 << 16,
        ..EngineSettings::default()
    };
    let app = Application::build_with(config, settings).await?;
    let addr = app.local_addr();
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let db = MySqlPool::connect(&format!("{server}/{database}")).await?;
    Ok(Bench {
        client: RestockServiceClient::new(channel),
        db,
        server,
        database,
    })
}

impl Bench {
    /// Product 1 with `users` registrations, written straight into the table.
    async fn seed(&self, users: u32) -> anyhow::Result<()> {
        self.client
            .clone()
            .set_stock(proto::SetStockRequest {
                product_id: 1,
                stock: 1_000,
            })
            .await?;
        let ids: Vec<i64> = (1..=i64::from(users)).collect();
        for chunk in ids.chunks(5_000) {
            let mut q = sqlx::QueryBuilder::new(
                "INSERT INTO product_user_notification (product_id, user_id, position) ",
            );
            q.push_values(chunk, |mut row, id| {
                row.push_bind(1).push_bind(*id).push_bind(*id);
            });
            q.build().execute(&self.db).await?;
        }
        sqlx::query("UPDATE product SET alert_seq = ? WHERE id = 1")
            .bind(i64::from(users))
            .execute(&self.db)
            .await?;
        Ok(())
    }

    async fn subscribe_all(&self) -> anyhow::Result<tonic::Streaming<proto::Notification>> {
        Ok(self
            .client
            .clone()
            .subscribe(proto::SubscribeRequest::default())
            .await?
            .into_inner())
    }

    async fn trigger(&self) -> anyhow::Result<()> {
        self.client
            .clone()
            .trigger_restock(proto::TriggerRestockRequest {
                product_id: 1,
                stock: None,
            })
            .await?;
        Ok(())
    }

    async fn wait_final(&self) -> anyhow::Result<proto::RestockRun> {
        loop {
            let run = self
                .client
                .clone()
                .get_restock_run(proto::GetRestockRunRequest {
                    product_id: 1,
                    restock_round: None,
                })
                .await?
                .into_inner();
            if run.status() != RunStatus::InProgress {
                return Ok(run);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn drop_database(self) -> anyhow::Result<()> {
        self.db.close().await;
        let mut conn = MySqlConnection::connect(&self.server).await?;
        sqlx::raw_sql(&format!("DROP DATABASE `{}`", self.database))
            .execute(&mut conn)
            .await?;
        Ok(())
    }
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
    let bench = start(limit).await?;
    bench.seed(users).await?;
    let mut stream = bench.subscribe_all().await?;
    let receiving = tokio::spawn(async move {
        let mut arrivals = Vec::with_capacity(users as usize);
        while arrivals.len() < users as usize {
            let n = stream.next().await.context("stream ended")??;
            arrivals.push((Utc::now(), latency_ms(&n)?));
        }
        anyhow::Ok(arrivals)
    });
    let began = Instant::now();
    bench.trigger().await?;
    let arrivals = receiving.await??;
    let run = bench.wait_final().await?;
    let elapsed = began.elapsed();

    let mut sent: Vec<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT sent_at FROM product_user_notification_history ORDER BY sent_at",
    )
    .fetch_all(&bench.db)
    .await?;
    sent.sort();
    let received: Vec<DateTime<Utc>> = arrivals.iter().map(|(at, _)| *at).collect();
    let mut latencies: Vec<f64> = arrivals.iter().map(|(_, ms)| *ms).collect();
    latencies.sort_by(f64::total_cmp);
    let p99 = percentile(&latencies, 99);

    println!(
        "pacing: {users} users, limit {limit}/s, run {:?}, wall {elapsed:.2?}",
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
    bench.drop_database().await
}

async fn ceiling(users: u32) -> anyhow::Result<()> {
    let bench = start(u32::MAX).await?;
    bench.seed(users).await?;

    // Baseline: the same rows, batched the same way, into a copy of the history table.
    sqlx::query("CREATE TABLE baseline LIKE product_user_notification_history")
        .execute(&bench.db)
        .await?;
    let ids: Vec<i64> = (1..=i64::from(users)).collect();
    let now = Utc::now();
    let began = Instant::now();
    for chunk in ids.chunks(EngineSettings::default().recorder.batch_size) {
        let mut q = sqlx::QueryBuilder::new(
            "INSERT INTO baseline (product_id, user_id, restock_round, sent_at) ",
        );
        q.push_values(chunk, |mut row, id| {
            row.push_bind(1).push_bind(*id).push_bind(1).push_bind(now);
        });
        q.build().execute(&bench.db).await?;
    }
    let baseline = began.elapsed();

    let began = Instant::now();
    bench.trigger().await?;
    let run = bench.wait_final().await?;
    let engine = began.elapsed();
    anyhow::ensure!(run.sent_count == i64::from(users), "run: {run:?}");

    let per_s = |d: Duration| f64::from(users) / d.as_secs_f64();
    println!("ceiling: {users} users, run {:?}", run.status());
    println!(
        "  plain batched INSERT: {baseline:.2?} ({:.0} rows/s)",
        per_s(baseline)
    );
    println!(
        "  engine, unlimited:    {engine:.2?} ({:.0} notifications/s)",
        per_s(engine)
    );
    println!(
        "  engine / INSERT = {:.1}%",
        100.0 * per_s(engine) / per_s(baseline)
    );
    bench.drop_database().await
}

/// A field of /proc/self/status, in kB.
fn proc_status_kb(field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} in /proc/self/status"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("malformed status line")?
        .parse()?)
}

async fn memory(users: u32) -> anyhow::Result<()> {
    let bench = start(u32::MAX).await?;
    bench.seed(users).await?;
    // Reset the peak, so it measures the run and not the seeding.
    std::fs::write("/proc/self/clear_refs", "5").context("cannot reset the peak RSS")?;
    let before = proc_status_kb("VmRSS:")?;
    let began = Instant::now();
    bench.trigger().await?;
    let run = bench.wait_final().await?;
    anyhow::ensure!(run.sent_count == i64::from(users), "run: {run:?}");
    let peak = proc_status_kb("VmHWM:")?;
    println!(
        "memory: {users} users in {:.2?}; RSS before the run {:.1} MB, peak during it {:.1} MB",
        began.elapsed(),
        before as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    bench.drop_database().await
}

async fn fanout(streams: u32, users: u32, limit: u32) -> anyhow::Result<()> {
    let bench = start(limit).await?;
    bench.seed(users).await?;
    let mut readers = Vec::new();
    for _ in 0..streams {
        let mut stream = bench.subscribe_all().await?;
        readers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(users as usize);
            while latencies.len() < users as usize {
                let n = stream.next().await.context("stream ended")??;
                latencies.push(latency_ms(&n)?);
            }
            anyhow::Ok(latencies)
        }));
    }
    bench.trigger().await?;
    let mut all = Vec::with_capacity((streams * users) as usize);
    let mut complete = 0;
    for reader in readers {
        if let Ok(latencies) = reader.await? {
            complete += 1;
            all.extend(latencies);
        }
    }
    all.sort_by(f64::total_cmp);
    let p = |q: usize| percentile(&all, q);
    println!(
        "fanout: {streams} streams x {users} notifications at {limit}/s: {complete} streams \
         got every notification; send-to-receive p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        p(50),
        p(99),
        all[all.len() - 1]
    );
    bench.drop_database().await
}

fn arg(args: &[String], name: &str, default: u32) -> anyhow::Result<u32> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()
            .with_context(|| format!("{name} takes a positive integer")),
        None => Ok(default),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("pacing") => pacing(arg(&args, "--users", 10_000)?, arg(&args, "--rate", 500)?).await,
        Some("ceiling") => ceiling(arg(&args, "--users", 200_000)?).await,
        Some("memory") => memory(arg(&args, "--users", 1_000_000)?).await,
        Some("fanout") => {
            let streams = arg(&args, "--streams", 1_000)?;
            fanout(
                streams,
                arg(&args, "--users", 5_000)?,
                arg(&args, "--rate", 500)?,
            )
            .await
        }
        _ => anyhow::bail!(
            "usage: bench pacing [--users N] [--rate R] | ceiling [--users N] | \
             memory [--users N] | fanout [--streams S] [--users N] [--rate R]"
        ),
    }
}
