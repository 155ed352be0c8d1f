//! Wiring: `Application::build` connects the stores, builds the engine and the gRPC
//! server, and binds the listener first, so that port 0 works and the address is known
//! before anything is served.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use secrecy::{ExposeSecret as _, SecretString};
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::service::LayerExt as _;
use tonic::service::interceptor::InterceptorLayer;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::config::{Config, CorsOrigins, MetricsListen, Switch};
use crate::console::ConsoleLayer;
use crate::deployment::Deployment;
use crate::engine::delivery::webhook::WebhookSettings;
use crate::engine::{Engine, EngineSettings};
use crate::grpc::admin::{AdminApi, AdminAuth};
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
    listener: TcpListener,
    local_addr: SocketAddr,
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    metrics_server: Option<MetricsServer>,
    admin_token: SecretString,
    api_rate: std::num::NonZeroU32,
    shutdown_drain: Duration,
    console: Switch,
    cors_origins: Option<CorsOrigins>,
    /// The gRPC server builder.
    server: tonic::transport::Server,
    /// TLS in front of every connection, when it is configured.
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let settings = EngineSettings::from_config(&config);
        Self::build_with(config, settings).await
    }

    /// As `build`, with the engine's settings as given: tests shrink some, starting
    /// from `EngineSettings::with_config` so that the configuration's bounds hold.
    pub async fn build_with(config: Config, settings: EngineSettings) -> anyhow::Result<Self> {
        let tls = crate::tls::acceptor(config.tls_cert.as_deref(), config.tls_key.as_deref())?;
        let server = tonic::transport::Server::builder()
            .http2_max_header_list_size(MAX_HEADER_LIST_SIZE)
            // Browsers speak gRPC-web over HTTP/1.1 (or HTTP/2 when offered over TLS).
            .accept_http1(true);
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
        let webhook = WebhookSettings::from_config(&config)?;
        let store = Deployment::store(&config).await?;
        let deployment = Deployment::from_config(&config).await?;
        deployment.log(&config);
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
        let admin_token = match config.admin_token.clone() {
            Some(token) if token.expose_secret().trim().is_empty() => {
                anyhow::bail!("RESTOCK_ADMIN_TOKEN is set but empty; set a secret or unset it")
            }
            Some(token) => token,
            None => {
                let token = generate_token();
                tracing::warn!(
                    admin_token = %token,
                    "RESTOCK_ADMIN_TOKEN is not set: generated this admin token for this run"
                );
                token.into()
            }
        };
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on RESTOCK_LISTEN {}", config.listen))?;
        let local_addr = listener.local_addr()?;
        let metrics_server = match config.metrics_listen {
            MetricsListen::On(addr) => Some(MetricsServer::bind(addr).await?),
            MetricsListen::Off => None,
        };
        Ok(Self {
            listener,
            local_addr,
            engine,
            metrics,
            metrics_server,
            admin_token,
            api_rate: config.api_rate,
            shutdown_drain: config.shutdown_drain,
            console: config.console,
            cors_origins: config.cors_origins,
            server,
            tls,
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
        let stop_metrics = tokio_util::sync::CancellationToken::new();
        let metrics_served = self
            .metrics_server
            .map(|server| tokio::spawn(server.serve(self.metrics.clone(), stop_metrics.clone())));

        let (health, health_service) = tonic_health::server::health_reporter();
        report_health(&health, ServingStatus::Serving).await;

        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;

        let limit = ApiRateLimit::new(self.api_rate);
        let restock = limit.wrap(RestockServiceServer::new(RestockApi::new(engine.clone())));
        // The token is checked before anything else, the rate limit included (the
        // limiter only wraps services that answer with plain bodies).
        let admin = InterceptorLayer::new(AdminAuth::new(self.admin_token.expose_secret()))
            .named_layer(limit.wrap(RestockAdminServiceServer::new(AdminApi::new(
                engine.clone(),
            ))));

        let stopping = engine.clone();
        let drain = self.shutdown_drain;
        let (began, shutdown_began) = tokio::sync::oneshot::channel::<()>();
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down: no new calls, ending streams, stopping runs");
            // Before the listener closes, so that load balancers stop sending calls here
            // first.
            report_health(&health, ServingStatus::NotServing).await;
            if !drain.is_zero() {
                tracing::info!(
                    drain_ms = drain.as_millis() as u64,
                    "health says NOT_SERVING; still serving while load balancers drain"
                );
                tokio::time::sleep(drain).await;
            }
            // Ends every Subscribe stream and stops the runs, so the server's drain
            // below does not wait on streams that would never end by themselves.
            stopping.begin_shutdown();
            let _ = began.send(());
        };

        // No Nagle: a notification is one small frame, and holding it back for the
        // previous one's ACK would add tens of milliseconds to every stream.
        let incoming = TcpIncoming::from(self.listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(TCP_KEEPALIVE));
        let observe = ObserveLayer::new(
            self.metrics.clone(),
            KnownMethods::from_descriptor_sets(&[
                proto::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            ]),
        );
        match self.console {
            Switch::On => tracing::info!(
                path = "/",
                "operator console served on the gRPC address (RESTOCK_CONSOLE=off turns it off)"
            ),
            Switch::Off => tracing::info!("operator console off"),
        }
        let cors = self.cors_origins.as_ref().map(crate::grpc::cors::layer);
        let router = self
            .server
            // Outermost: a preflight is answered here, before the API rate limit could
            // count it, and the listed origins' pages can read every answer.
            .layer(tower::util::option_layer(cors))
            // The page's own requests never reach the router, the limit or the metrics.
            .layer(ConsoleLayer::new(self.console == Switch::On))
            // gRPC-web in, gRPC inside: every service, its rate limit and the admin
            // token check see a gRPC-web call as any other call.
            .layer(tonic_web::GrpcWebLayer::new())
            .layer(observe)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(restock)
            .add_service(admin);
        let server = match self.tls {
            Some(acceptor) => futures::future::Either::Left(
                router
                    .serve_with_incoming_shutdown(crate::tls::incoming(incoming, acceptor), signal),
            ),
            None => futures::future::Either::Right(
                router.serve_with_incoming_shutdown(incoming, signal),
            ),
        };
        let calls_overstay = async {
            match shutdown_began.await {
                Ok(()) => tokio::time::sleep(CLOSE_GRACE).await,
                // The server ended before shutdown began: the other branch has it.
                Err(_) => std::future::pending().await,
            }
        };
        let served = tokio::select! {
            served = server => served.context("the gRPC server failed"),
            () = calls_overstay => {
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
        if let Some(mut served) = metrics_served
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
        tracing::info!("stopped");
        served
    }
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
