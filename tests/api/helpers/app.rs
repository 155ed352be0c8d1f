//! A test's own server: the real `Application` on 127.0.0.1:0 on a fresh database and
//! Redis prefix, the generated clients, and the calls tests make through them.

use std::num::NonZeroU32;
use std::sync::Once;
use std::time::Duration;

use futures::StreamExt as _;
use restock_notifier::callers::TrustedProxies;
use restock_notifier::config::{
    Config, CorsOrigins, LogFormat, MetricsListen, Switch, WebhookConfig,
};
use restock_notifier::engine::EngineSettings;
use restock_notifier::grpc::proto::restock_admin_service_client::RestockAdminServiceClient;
use restock_notifier::grpc::proto::restock_service_client::RestockServiceClient;
use restock_notifier::grpc::proto::{self, RunStatus};
use restock_notifier::redact::SecretUrl;
use restock_notifier::startup::Application;
use sqlx::AnyPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};

use super::database::{drop_database, unique};
use super::{poll_until, redis_url};

pub const ADMIN_TOKEN: &str = "test-admin-token";

/// Tracing once per test binary, silent unless TEST_LOG is set.
fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            tracing_subscriber::fmt()
                .with_env_filter(std::env::var("TEST_LOG").unwrap_or_default())
                .with_test_writer()
                .init();
        }
    });
}

/// The two ways the service is deployed; every behaviour test runs on both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// MySQL (MariaDB here) with the stock cache in Redis: production.
    MySql,
    /// An SQLite file with everything else in process: the embedded default.
    Embedded,
}

/// How a test wants its server.
#[derive(Clone)]
pub struct Options {
    pub backend: Backend,
    pub send_rate: u32,
    pub api_rate: u32,
    pub settings: EngineSettings,
    /// Reuse this database (a MySQL database name or an SQLite file path) instead of
    /// creating a fresh one: restart tests.
    pub database: Option<String>,
    pub redis_prefix: Option<String>,
    /// Use this Redis instead of the shared one (MySQL backend only).
    pub redis_url: Option<String>,
    /// Reach the MySQL server at this URL (no database) instead of directly: through a
    /// fault proxy, say. The test's own pool still connects directly.
    pub mysql_url: Option<String>,
    pub run_lease: Duration,
    /// RESTOCK_SHUTDOWN_DRAIN.
    pub shutdown_drain: Duration,
    /// RESTOCK_HISTORY_RETENTION.
    pub history_retention: Option<Duration>,
    /// RESTOCK_WEBHOOK_*: deliver to this endpoint.
    pub webhook: Option<WebhookOptions>,
    /// RESTOCK_CONSOLE.
    pub console: Switch,
    /// RESTOCK_CORS_ORIGINS.
    pub cors_origins: Option<CorsOrigins>,
    /// RESTOCK_CALLERS.
    pub callers: Option<std::path::PathBuf>,
    /// RESTOCK_TRUSTED_PROXIES.
    pub trusted_proxies: TrustedProxies,
}

/// The webhook settings of a test's server: RESTOCK_WEBHOOK_* as a test sets them.
#[derive(Clone)]
pub struct WebhookOptions {
    pub url: String,
    pub secret: String,
    pub timeout: Duration,
    pub attempts: u32,
    pub backoff: Duration,
}

impl WebhookOptions {
    /// Delivery to `url` signed with `secret`: 5 s a request, 3 attempts, retries
    /// 10 ms apart, so that a test of retries takes milliseconds.
    pub fn to(url: &str, secret: &str) -> Self {
        Self {
            url: url.into(),
            secret: secret.into(),
            timeout: Duration::from_secs(5),
            attempts: 3,
            backoff: Duration::from_millis(10),
        }
    }

    fn config(&self) -> WebhookConfig {
        WebhookConfig {
            url: Some(SecretUrl::endpoint(self.url.clone())),
            secret: Some(self.secret.clone().into()),
            timeout: self.timeout,
            attempts: self.attempts,
            backoff: self.backoff,
        }
    }
}

impl Options {
    pub fn new(backend: Backend) -> Self {
        Self {
            backend,
            send_rate: 1_000_000,
            api_rate: 100_000,
            settings: EngineSettings::default(),
            database: None,
            redis_prefix: None,
            redis_url: None,
            mysql_url: None,
            run_lease: Duration::from_secs(10),
            shutdown_drain: Duration::ZERO,
            history_retention: None,
            webhook: None,
            console: Switch::On,
            cors_origins: None,
            callers: None,
            trusted_proxies: TrustedProxies::default(),
        }
    }
}

pub struct TestApp {
    pub client: RestockServiceClient<Channel>,
    pub admin: RestockAdminServiceClient<Channel>,
    pub channel: Channel,
    pub addr: std::net::SocketAddr,
    /// The `/metrics` endpoint (on port 0).
    pub metrics_addr: std::net::SocketAddr,
    /// A pool on the test's own database, for assertions on the tables. Queries through
    /// it are written to run on both MySQL and SQLite.
    pub db: AnyPool,
    pub backend: Backend,
    pub database: String,
    pub redis_prefix: String,
    /// The Redis (or Redis Cluster) the app shares, when it has one.
    pub redis_url: Option<String>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    /// Drop the database when the app is dropped (not for the first half of a restart).
    keep_database: bool,
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(Options::new(backend)).await
}

/// No webhook, and its documented defaults.
fn no_webhook() -> WebhookConfig {
    WebhookConfig {
        url: None,
        secret: None,
        timeout: Duration::from_secs(10),
        attempts: 6,
        backoff: Duration::from_secs(1),
    }
}

/// The service's settings as the tests start it, in one place: the documented defaults,
/// on `database_url`, listening on port 0 (metrics too), without Redis, TLS, a webhook
/// or an admin token. A test sets what it is about with `..test_config(url)`.
pub fn test_config(database_url: impl Into<String>) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        database_url: SecretUrl::connection(database_url),
        db_pool_size: None,
        redis_url: None,
        redis_prefix: "restock:".into(),
        send_rate: NonZeroU32::new(500).unwrap(),
        api_rate: NonZeroU32::new(500).unwrap(),
        admin_token: None,
        callers: None,
        trusted_proxies: Default::default(),
        log: "info".into(),
        log_format: LogFormat::Text,
        console: Switch::On,
        cors_origins: None,
        metrics_listen: MetricsListen::On("127.0.0.1:0".parse().unwrap()),
        run_lease: Duration::from_secs(10),
        shutdown_drain: Duration::ZERO,
        history_retention: None,
        otel_endpoint: None,
        otel_service_name: "restock-notifier".into(),
        tls_cert: None,
        tls_key: None,
        tls_client_ca: None,
        webhook: no_webhook(),
    }
}

pub async fn spawn_app_with(options: Options) -> TestApp {
    init_tracing();
    let backend = options.backend;
    let database = options
        .database
        .clone()
        .unwrap_or_else(|| backend.fresh_database());
    let redis_prefix = options
        .redis_prefix
        .clone()
        .unwrap_or_else(|| unique("restock-test:") + ":");
    let shared_redis = match backend {
        Backend::MySql => Some(options.redis_url.clone().unwrap_or_else(redis_url)),
        Backend::Embedded => None,
    };
    let config = Config {
        redis_url: shared_redis.clone().map(SecretUrl::connection),
        redis_prefix: redis_prefix.clone(),
        send_rate: NonZeroU32::new(options.send_rate).unwrap(),
        api_rate: NonZeroU32::new(options.api_rate).unwrap(),
        admin_token: Some(ADMIN_TOKEN.into()),
        console: options.console,
        cors_origins: options.cors_origins.clone(),
        callers: options.callers.clone(),
        trusted_proxies: options.trusted_proxies.clone(),
        run_lease: options.run_lease,
        shutdown_drain: options.shutdown_drain,
        history_retention: options.history_retention,
        webhook: options
            .webhook
            .as_ref()
            .map_or_else(no_webhook, WebhookOptions::config),
        ..test_config(match &options.mysql_url {
            Some(server) if backend == Backend::MySql => format!("{server}/{database}"),
            _ => backend.database_url(&database),
        })
    };
    // A test's own engine settings, under the configuration's bounds as in production.
    let settings = options.settings.clone().with_config(&config);
    let app = Application::build_with(config, settings)
        .await
        .expect("the application starts");
    let addr = app.local_addr();
    let metrics_addr = app.metrics_addr().expect("tests serve /metrics");
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    // The listener is bound already, so connecting cannot race the server's start.
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connects to the test server");
    sqlx::any::install_default_drivers();
    let db = AnyPool::connect(&backend.database_url(&database))
        .await
        .expect("connects to the test database");
    TestApp {
        client: RestockServiceClient::new(channel.clone()),
        admin: RestockAdminServiceClient::new(channel.clone()),
        channel,
        addr,
        metrics_addr,
        db,
        backend,
        database,
        redis_prefix,
        redis_url: shared_redis,
        stop: Some(stop),
        server: Some(server),
        keep_database: false,
    }
}

impl TestApp {
    /// Shuts the server down gracefully (as SIGTERM would) and waits until it stopped.
    /// The database is kept for a restarted app to use.
    pub async fn shut_down(mut self) -> (String, String) {
        self.stop.take().unwrap().send(()).ok();
        self.server
            .take()
            .unwrap()
            .await
            .unwrap()
            .expect("server stops cleanly");
        self.keep_database = true;
        (self.database.clone(), self.redis_prefix.clone())
    }

    /// `GET /metrics`: status line, headers and body.
    pub async fn get_metrics_page(&self, path: &str) -> (String, String) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut conn = tokio::net::TcpStream::connect(self.metrics_addr)
            .await
            .expect("connects to /metrics");
        conn.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        (head.to_string(), body.to_string())
    }

    /// Every sample of `/metrics`, by name with labels as exported
    /// (`restock_runs_finished_total{status="completed"}`).
    pub async fn scrape(&self) -> std::collections::HashMap<String, f64> {
        let (head, body) = self.get_metrics_page("/metrics").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let (name, value) = l.rsplit_once(' ').expect("name value");
                (name.to_string(), value.parse().expect("a number"))
            })
            .collect()
    }

    pub async fn set_stock(&self, product: i64, stock: i64) -> proto::Product {
        self.set_stock_with(product, stock, None)
            .await
            .expect("SetStock")
    }

    /// SetStock, with the product's threshold if `min_stock` is given.
    pub async fn set_stock_with(
        &self,
        product: i64,
        stock: i64,
        min_stock: Option<i64>,
    ) -> Result<proto::Product, Status> {
        self.client
            .clone()
            .set_stock(proto::SetStockRequest {
                product_id: product,
                stock,
                min_stock,
            })
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn register(&self, product: i64, user: i64) -> proto::Alert {
        self.register_with(product, user, false).await
    }

    /// RegisterAlert, one-shot if `once`.
    pub async fn register_with(&self, product: i64, user: i64, once: bool) -> proto::Alert {
        self.client
            .clone()
            .register_alert(proto::RegisterAlertRequest {
                product_id: product,
                user_id: user,
                once,
            })
            .await
            .expect("RegisterAlert")
            .into_inner()
    }

    pub async fn cancel(&self, product: i64, user: i64) -> proto::Alert {
        self.client
            .clone()
            .cancel_alert(proto::CancelAlertRequest {
                product_id: product,
                user_id: user,
            })
            .await
            .expect("CancelAlert")
            .into_inner()
    }

    pub async fn trigger(
        &self,
        product: i64,
        stock: Option<i64>,
    ) -> Result<proto::RestockRun, Status> {
        self.client
            .clone()
            .trigger_restock(proto::TriggerRestockRequest {
                product_id: product,
                stock,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn get_run(
        &self,
        product: i64,
        round: Option<i64>,
    ) -> Result<proto::RestockRun, Status> {
        self.client
            .clone()
            .get_restock_run(proto::GetRestockRunRequest {
                product_id: product,
                restock_round: round,
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn manual_restock(
        &self,
        product: i64,
        token: Option<&str>,
    ) -> Result<proto::RestockRun, Status> {
        let mut request = Request::new(proto::ManualRestockRequest {
            product_id: product,
        });
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        self.admin
            .clone()
            .manual_restock(request)
            .await
            .map(|r| r.into_inner())
    }

    pub async fn subscribe(
        &self,
        filter: proto::SubscribeRequest,
    ) -> Streaming<proto::Notification> {
        self.client
            .clone()
            .subscribe(filter)
            .await
            .expect("Subscribe")
            .into_inner()
    }

    /// The live notifications of one product.
    pub async fn subscribe_to_product(&self, product: i64) -> Streaming<proto::Notification> {
        self.subscribe(proto::SubscribeRequest {
            product_id: Some(product),
            ..Default::default()
        })
        .await
    }

    /// Waits until the latest run of `product` has left IN_PROGRESS.
    pub async fn wait_until_final(&self, product: i64) -> proto::RestockRun {
        poll_until(
            Duration::from_secs(60),
            &format!("the run of product {product} leaves IN_PROGRESS"),
            || async move {
                let run = self.get_run(product, None).await.expect("GetRestockRun");
                if run.status() != RunStatus::InProgress {
                    Ok(run)
                } else {
                    Err(run)
                }
            },
        )
        .await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if self.keep_database {
            return;
        }
        drop_database(self.backend, &self.database);
    }
}

/// Reads `n` notifications from a stream, failing the test if it ends first.
pub async fn take(
    stream: &mut Streaming<proto::Notification>,
    n: usize,
) -> Vec<proto::Notification> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
            Ok(Some(Ok(item))) => got.push(item),
            other => panic!("stream ended after {} of {n}: {other:?}", got.len()),
        }
    }
    got
}

/// The `ErrorInfo` of a stream the server ended with `code` for `reason`, in the
/// service's domain: what a client reads to resume.
pub fn stream_end_info(status: &Status, code: Code, reason: &str) -> tonic_types::ErrorInfo {
    use tonic_types::StatusExt as _;
    assert_eq!(status.code(), code, "{status:?}");
    let info = status
        .get_details_error_info()
        .expect("ErrorInfo in the details");
    assert_eq!(info.reason, reason, "{status:?}");
    assert_eq!(info.domain, "restock.v1");
    info
}

pub fn assert_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code) {
    match result {
        Err(status) => assert_eq!(status.code(), code, "{status:?}"),
        Ok(value) => panic!("expected {code:?}, got {value:?}"),
    }
}
