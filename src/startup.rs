//! Wiring: `Application::build` connects the stores, builds the engine, assembles the
//! gRPC server and binds the listener first, so that port 0 works and the address is known
//! before anything is served.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::future::BoxFuture;
use secrecy::{ExposeSecret as _, SecretString};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::callers::Callers;
use crate::config::{Config, MetricsListen, Switch};
use crate::console::ConsoleLayer;
use crate::deployment::Deployment;
use crate::engine::delivery::webhook::WebhookSettings;
use crate::engine::{Engine, EngineSettings};
use crate::grpc::admin::AdminApi;
use crate::grpc::authz::AuthzLayer;
use crate::grpc::observe::{KnownMethods, ObserveLayer};
use crate::grpc::proto;
use crate::grpc::proto::restock_admin_service_server::RestockAdminServiceServer;
use crate::grpc::proto::restock_service_server::RestockServiceServer;
use crate::grpc::ratelimit::ApiRateLimit;
use crate::grpc::restock::RestockApi;
use crate::monitoring::{Metrics, MetricsServer};

/// How long shutdown waits for runs to record what they sent.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How long calls may stay open once shutdown has begun. The service's own streams end
/// at once; what remains is a caller's stream that never ends by itself (a load
/// balancer's health `Watch`, say), which must not keep the process from stopping.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// TCP keepalive on accepted connections: a client that vanished without closing (a
/// dead host, a dropped NAT entry) is noticed within minutes instead of holding its
/// streams open forever.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Random bytes of a generated admin token: 192 bits, beyond guessing at any rate the
/// admin service lets a caller try.
const ADMIN_TOKEN_BYTES: usize = 24;

/// On shutdown, how long `/metrics` may take to close its connections: an idle one
/// closes at once and a scrape is answered in milliseconds, so one still open after a
/// second is a client stuck mid-request, not a reason to hold the exit.
const METRICS_CLOSE_GRACE: Duration = Duration::from_secs(1);

pub struct Application {
    local_addr: SocketAddr,
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    metrics_server: Option<MetricsServer>,
    health: HealthReporter,
    shutdown_drain: Duration,
    /// The gRPC server, assembled and bound: it serves once polled, until
    /// `stop_serving` is cancelled, and then waits for the calls still open.
    server: Server,
    stop_serving: CancellationToken,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let settings = EngineSettings::from_config(&config);
        Self::build_with(config, settings).await
    }

    /// As `build`, with the engine's settings as given: tests shrink some, starting
    /// from `EngineSettings::with_config` so that the configuration's bounds hold.
    pub async fn build_with(config: Config, settings: EngineSettings) -> anyhow::Result<Self> {
        let tls = crate::tls::acceptor(
            config.tls_cert.as_deref(),
            config.tls_key.as_deref(),
            config.tls_client_ca.as_deref(),
        )?;
        log_transport(&config);
        let (engine, metrics) = start_engine(&config, settings).await?;
        let callers = load_callers(&config)?;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on RESTOCK_LISTEN {}", config.listen))?;
        let local_addr = listener.local_addr()?;
        let metrics_server = match config.metrics_listen {
            MetricsListen::On(addr) => Some(MetricsServer::bind(addr).await?),
            MetricsListen::Off => None,
        };
        let services = Services {
            engine: engine.clone(),
            metrics: metrics.clone(),
            callers,
        };
        let stop_serving = CancellationToken::new();
        let (server, health) = serve(&config, services, listener, tls, stop_serving.clone())?;
        report_health(&health, ServingStatus::Serving).await;
        Ok(Self {
            local_addr,
            engine,
            metrics,
            metrics_server,
            health,
            shutdown_drain: config.shutdown_drain,
            server,
            stop_serving,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where `/metrics` is served, unless `RESTOCK_METRICS_LISTEN` is `off`.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_server.as_ref().map(MetricsServer::local_addr)
    }

    /// Serves until `shutdown` resolves, then stops accepting, ends the streams, and
    /// waits for every run to record what it sent and release itself to another
    /// instance (G8).
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let engine = self.engine.clone();
        engine
            .start_clock()
            .await
            .context("cannot read the database's clock")?;
        engine.spawn_takeover();
        let stop_metrics = CancellationToken::new();
        let metrics_served = self
            .metrics_server
            .map(|server| tokio::spawn(server.serve(self.metrics.clone(), stop_metrics.clone())));
        let stopping = Stopping {
            engine: engine.clone(),
            health: self.health,
            drain: self.shutdown_drain,
            stop_serving: self.stop_serving.clone(),
        };
        let served = tokio::select! {
            served = self.server => served.context("the gRPC server failed"),
            () = stopping.run(shutdown) => {
                tracing::warn!(
                    grace_ms = CLOSE_GRACE.as_millis() as u64,
                    "calls still open after shutdown began (a health Watch, say); closing \
                     their connections"
                );
                Ok(())
            }
        };
        engine.shutdown(SHUTDOWN_GRACE).await;
        stop_metrics.cancel();
        close_metrics(metrics_served).await;
        tracing::info!("stopped");
        served
    }
}

/// What is served on the gRPC address.
struct Services {
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    callers: Arc<Callers>,
}

/// The gRPC server, as [`serve`] assembled it.
type Server = BoxFuture<'static, Result<(), tonic::transport::Error>>;

/// Assembles the router (every service, its layers) on `listener`, behind TLS when it
/// is configured: a server that serves once polled, until `stop` is cancelled, and the
/// health it reports.
fn serve(
    config: &Config,
    services: Services,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: CancellationToken,
) -> anyhow::Result<(Server, HealthReporter)> {
    let Services {
        engine,
        metrics,
        callers,
    } = services;
    let (reporter, health) = tonic_health::server::health_reporter();
    let limit = ApiRateLimit::new(config.api_rate);
    let restock = limit.wrap(RestockServiceServer::new(RestockApi::new(engine.clone())));
    let admin = limit.wrap(RestockAdminServiceServer::new(AdminApi::new(engine)));
    let authz = AuthzLayer::new(callers, config.trusted_proxies.clone(), metrics.clone());
    log_console(config.console);
    let cors = config.cors_origins.as_ref().map(crate::grpc::cors::layer);
    let router = tonic::transport::Server::builder()
        .http2_max_header_list_size(MAX_HEADER_LIST_SIZE)
        // Browsers speak gRPC-web over HTTP/1.1 (or HTTP/2 when offered over TLS).
        .accept_http1(true)
        // Outermost: a preflight is answered here, before the API rate limit could count
        // it, and the listed origins' pages can read every answer.
        .layer(tower::util::option_layer(cors))
        // The page's own requests never reach the router, the limit or the metrics.
        .layer(ConsoleLayer::new(config.console == Switch::On))
        // gRPC-web in, gRPC inside: every service, its rate limit and the admin token
        // check see a gRPC-web call as any other call.
        .layer(tonic_web::GrpcWebLayer::new())
        .layer(ObserveLayer::new(
            metrics,
            known_methods(),
            config.trusted_proxies.clone(),
        ))
        // Who the caller is and whether it may call the method, before any handler
        // and before the API rate limit, which counts per caller.
        .layer(authz)
        .add_service(health)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(restock)
        .add_service(admin);
    // No Nagle: a notification is one small frame, and holding it back for the previous
    // one's ACK would add tens of milliseconds to every stream.
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(TCP_KEEPALIVE));
    let stopped = stop.cancelled_owned();
    let server: Server = match tls {
        Some(acceptor) => Box::pin(
            router.serve_with_incoming_shutdown(crate::tls::incoming(incoming, acceptor), stopped),
        ),
        None => Box::pin(router.serve_with_incoming_shutdown(incoming, stopped)),
    };
    Ok((server, reporter))
}

/// The service's shutdown, once its signal came: health first, the drain, then the
/// streams and runs, then the server.
struct Stopping {
    engine: Arc<Engine>,
    health: HealthReporter,
    drain: Duration,
    stop_serving: CancellationToken,
}

impl Stopping {
    /// Waits for `shutdown`, stops serving, and resolves [`CLOSE_GRACE`] later: calls
    /// still open then (a caller's stream that never ends by itself, such as a load
    /// balancer's health `Watch`) must not keep the process from stopping.
    async fn run(self, shutdown: impl Future<Output = ()>) {
        shutdown.await;
        tracing::info!("shutting down: no new calls, ending streams, stopping runs");
        // Before the listener closes, so that load balancers stop sending calls here
        // first.
        report_health(&self.health, ServingStatus::NotServing).await;
        if !self.drain.is_zero() {
            tracing::info!(
                drain_ms = self.drain.as_millis() as u64,
                "health says NOT_SERVING; still serving while load balancers drain"
            );
            tokio::time::sleep(self.drain).await;
        }
        // Ends every Subscribe stream and stops the runs, so the server's drain does not
        // wait on streams that would never end by themselves.
        self.engine.begin_shutdown();
        self.stop_serving.cancel();
        tokio::time::sleep(CLOSE_GRACE).await;
    }
}

/// Waits up to [`METRICS_CLOSE_GRACE`] for `/metrics` to close its connections.
async fn close_metrics(served: Option<tokio::task::JoinHandle<()>>) {
    if let Some(mut served) = served
        && tokio::time::timeout(METRICS_CLOSE_GRACE, &mut served)
            .await
            .is_err()
    {
        tracing::warn!(
            grace_ms = METRICS_CLOSE_GRACE.as_millis() as u64,
            "a /metrics connection is still open after the grace; leaving it"
        );
        served.abort();
    }
}

/// The engine for `config`: its store, deployment and delivery channel.
async fn start_engine(
    config: &Config,
    settings: EngineSettings,
) -> anyhow::Result<(Arc<Engine>, Arc<Metrics>)> {
    let webhook = WebhookSettings::from_config(&config.webhook)?;
    let store = Deployment::store(config).await?;
    let deployment = Deployment::from_config(config).await?;
    deployment.log(config);
    let metrics = match config.metrics_listen {
        MetricsListen::On(_) => Metrics::new(config.send_rate.get()),
        MetricsListen::Off => Metrics::off(),
    };
    let capabilities = deployment
        .capabilities(
            webhook,
            config.send_rate,
            settings.subscriber_buffer,
            &metrics,
        )
        .await?;
    let engine = Engine::new(store, capabilities, settings, metrics.clone());
    Ok((engine, metrics))
}

/// The callers of RESTOCK_CALLERS, read again on SIGHUP; without it, the open API,
/// with a warning.
fn load_callers(config: &Config) -> anyhow::Result<Arc<Callers>> {
    let callers = Arc::new(Callers::load(
        config.callers.as_deref(),
        admin_token(config)?,
    )?);
    match &config.callers {
        Some(file) => {
            tracing::info!(callers = %file.display(), "callers known: every call is authorized by role");
            callers
                .reload_on_hangup()
                .context("cannot install the SIGHUP handler")?;
        }
        None => tracing::warn!(
            "RESTOCK_CALLERS is not set: the API is open to anyone who can reach it (admin \
             calls need the admin token); set it to name callers and their roles"
        ),
    }
    Ok(callers)
}

/// The admin token of `config`, or one generated for this run (and logged).
fn admin_token(config: &Config) -> anyhow::Result<SecretString> {
    match config.admin_token.clone() {
        Some(token) if token.expose_secret().trim().is_empty() => {
            anyhow::bail!("RESTOCK_ADMIN_TOKEN is set but empty; set a secret or unset it")
        }
        Some(token) => Ok(token),
        None => {
            let token = generate_token();
            tracing::warn!(
                admin_token = %token,
                "RESTOCK_ADMIN_TOKEN is not set: generated this admin token for this run"
            );
            Ok(token.into())
        }
    }
}

fn log_transport(config: &Config) {
    match &config.tls_cert {
        Some(cert) => tracing::info!(
            tls = true,
            cert = %cert.display(),
            "gRPC over TLS only: plaintext connections are refused"
        ),
        None => tracing::info!(
            tls = false,
            "gRPC in plaintext: set RESTOCK_TLS_CERT and RESTOCK_TLS_KEY to serve over TLS"
        ),
    }
}

fn log_console(console: Switch) {
    match console {
        Switch::On => tracing::info!(
            path = "/",
            "operator console served on the gRPC address (RESTOCK_CONSOLE=off turns it off)"
        ),
        Switch::Off => tracing::info!("operator console off"),
    }
}

/// Every method the server knows, for the metrics' `method` label.
fn known_methods() -> KnownMethods {
    KnownMethods::from_descriptor_sets(&[
        proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ])
}

/// The largest header block a call may send. HTTP/2 (h2) refuses a larger one for that
/// call alone only while it fits in one frame; a larger block that goes on in
/// CONTINUATION frames closes the whole connection (`COMPRESSION_ERROR`), every call on
/// it with it. The library default, 16 KiB, is about one frame: a single 16 kB header
/// dropped the connection. 64 KiB takes any header a client has reason to send.
const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;

fn generate_token() -> String {
    use rand::Rng as _;
    let bytes: [u8; ADMIN_TOKEN_BYTES] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Installs the SIGTERM and SIGINT handlers now, and resolves when either arrives.
/// Called before the service binds: a signal that comes as soon as it listens (an
/// orchestrator rolling it at once) is then a graceful stop, never the default kill.
pub fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate =
            signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
        let mut interrupt =
            signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
        Ok(async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

/// Says `status` for the whole server and for each service alike: "" is the whole
/// server's health, the one a load balancer usually checks; some check a service by
/// its name.
async fn report_health(health: &tonic_health::server::HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    for service in [
        <RestockServiceServer<RestockApi> as NamedService>::NAME,
        <RestockAdminServiceServer<AdminApi> as NamedService>::NAME,
    ] {
        health.set_service_status(service, status).await;
    }
}

/// The reflection service's descriptors, for both of its versions (v1 and v1alpha, as
/// tools ask for either).
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        // google.rpc.ErrorInfo, so that grpcurl shows the details of a stream's end.
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
}
