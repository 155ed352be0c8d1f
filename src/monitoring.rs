//! Prometheus metrics: the names the README's Operations section lists, recorded
//! through the `metrics` facade into a Prometheus recorder of this service's own (not
//! the process-global one, so that several services in one process, as in the tests,
//! count apart), and served as text on `GET /metrics` over plain HTTP at
//! `RESTOCK_METRICS_LISTEN`.
//!
//! No metric has a per-product or per-user label: their number stays fixed however many
//! products and users there are.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder as _, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::store::FinalStatus;

const SENT: &str = "restock_notifications_sent_total";
const RATE_LIMIT: &str = "restock_send_rate_limit";
const IN_PROGRESS: &str = "restock_runs_in_progress";
const FINISHED: &str = "restock_runs_finished_total";
const TAKEN_OVER: &str = "restock_runs_taken_over_total";
const HISTORY_DELETED: &str = "restock_history_deleted_total";
const SWEEP_STATEMENT: &str = "restock_history_sweep_statement_seconds";
const SUBSCRIBERS: &str = "restock_subscribers";
const LAGGED: &str = "restock_subscribers_lagged_total";
const RECORD_BATCH: &str = "restock_record_batch_seconds";
const UNRECORDED: &str = "restock_unrecorded_sends";
const LIMITER_DROPPED: &str = "restock_send_limiter_dropped_total";
const LIMITER_ROUND_TRIP: &str = "restock_send_limiter_round_trip_seconds";
const WEBHOOK_REQUESTS: &str = "restock_webhook_requests_total";
const WEBHOOK_SECONDS: &str = "restock_webhook_request_seconds";
const WEBHOOK_IN_FLIGHT: &str = "restock_webhook_in_flight";
const GRPC_HANDLED: &str = "grpc_server_handled_total";
const AUTH_DENIED: &str = "restock_auth_denied_total";
const GRPC_SECONDS: &str = "grpc_server_handling_seconds";

/// Buckets of the latency histograms, in seconds: from a fast unary call (a
/// millisecond) to a commit stalled for seconds.
const RECORD_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// The round trip of a limiter reservation: from loopback (a tenth of a millisecond) to
/// past the limiter's cap of 250 ms.
const ROUND_TRIP_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
/// A webhook request: from a loopback answer (a millisecond) to the longest timeout.
const WEBHOOK_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// As go-grpc-prometheus's defaults, plus longer ones: a stream is handled until it ends.
const GRPC_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 600.0,
];

static META: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, None);

/// The service's metrics, as handles that are cheap to update (an atomic each).
pub struct Metrics {
    /// `None` when metrics are off: every handle is then a no-op.
    recorder: Option<PrometheusRecorder>,
    pub notifications_sent: Counter,
    pub runs_in_progress: Gauge,
    finished_completed: Counter,
    finished_sold_out: Counter,
    finished_error: Counter,
    pub runs_taken_over: Counter,
    /// Per-user history rows deleted by the retention sweep.
    pub history_deleted: Counter,
    /// How long each delete statement of the sweep took (and held its locks).
    pub history_sweep_statement_seconds: Histogram,
    pub subscribers: Gauge,
    pub subscribers_lagged: Counter,
    pub record_batch_seconds: Histogram,
    pub unrecorded_sends: Gauge,
    limiter: LimiterMetrics,
    webhook: WebhookMetrics,
}

/// The webhook's figures (G12): attempts by how they ended, their latency, and how
/// many are under way.
#[derive(Clone)]
pub struct WebhookMetrics {
    pub answered_2xx: Counter,
    pub answered_3xx: Counter,
    pub answered_4xx: Counter,
    pub answered_5xx: Counter,
    pub timeout: Counter,
    /// Connection errors, and requests abandoned unsent.
    pub error: Counter,
    pub request_seconds: Histogram,
    pub in_flight: Gauge,
}

impl WebhookMetrics {
    /// The webhook's handles, registered with `recorder`.
    fn registered(recorder: &PrometheusRecorder) -> Self {
        let requests = |code: &'static str| {
            recorder.register_counter(
                &Key::from_parts(WEBHOOK_REQUESTS, vec![Label::new("code", code)]),
                &META,
            )
        };
        WebhookMetrics {
            answered_2xx: requests("2xx"),
            answered_3xx: requests("3xx"),
            answered_4xx: requests("4xx"),
            answered_5xx: requests("5xx"),
            timeout: requests("timeout"),
            error: requests("error"),
            request_seconds: recorder.register_histogram(&Key::from_name(WEBHOOK_SECONDS), &META),
            in_flight: recorder.register_gauge(&Key::from_name(WEBHOOK_IN_FLIGHT), &META),
        }
    }

    /// Handles that record nothing.
    pub fn off() -> Self {
        Self {
            answered_2xx: Counter::noop(),
            answered_3xx: Counter::noop(),
            answered_4xx: Counter::noop(),
            answered_5xx: Counter::noop(),
            timeout: Counter::noop(),
            error: Counter::noop(),
            request_seconds: Histogram::noop(),
            in_flight: Gauge::noop(),
        }
    }
}

/// The send limiter's own figures (G2: a limiter that cannot grant says why).
#[derive(Clone)]
pub struct LimiterMetrics {
    /// Slots given up because they could not be handed out in time.
    pub dropped: Counter,
    /// Round trips of the limiter's reservations in Redis.
    pub round_trip_seconds: Histogram,
}

impl LimiterMetrics {
    /// Handles that record nothing.
    pub fn off() -> Self {
        Self {
            dropped: Counter::noop(),
            round_trip_seconds: Histogram::noop(),
        }
    }
}

impl Metrics {
    /// Handles that record nothing, for `RESTOCK_METRICS_LISTEN=off`.
    pub fn off() -> Arc<Self> {
        Arc::new(Self {
            recorder: None,
            notifications_sent: Counter::noop(),
            runs_in_progress: Gauge::noop(),
            finished_completed: Counter::noop(),
            finished_sold_out: Counter::noop(),
            finished_error: Counter::noop(),
            runs_taken_over: Counter::noop(),
            history_deleted: Counter::noop(),
            history_sweep_statement_seconds: Histogram::noop(),
            subscribers: Gauge::noop(),
            subscribers_lagged: Counter::noop(),
            record_batch_seconds: Histogram::noop(),
            unrecorded_sends: Gauge::noop(),
            limiter: LimiterMetrics::off(),
            webhook: WebhookMetrics::off(),
        })
    }

    /// A fresh set, every metric at zero, with `restock_send_rate_limit` at `send_rate`.
    pub fn new(send_rate: u32) -> Arc<Self> {
        let recorder = prometheus_recorder();
        describe(&recorder);
        let counter = |name: &'static str| recorder.register_counter(&Key::from_name(name), &META);
        let gauge = |name: &'static str| recorder.register_gauge(&Key::from_name(name), &META);
        let histogram =
            |name: &'static str| recorder.register_histogram(&Key::from_name(name), &META);
        let finished = |status: &'static str| {
            recorder.register_counter(
                &Key::from_parts(FINISHED, vec![Label::new("status", status)]),
                &META,
            )
        };
        gauge(RATE_LIMIT).set(f64::from(send_rate));
        let metrics = Self {
            notifications_sent: counter(SENT),
            runs_in_progress: gauge(IN_PROGRESS),
            finished_completed: finished("completed"),
            finished_sold_out: finished("canceled_by_sold_out"),
            finished_error: finished("canceled_by_error"),
            runs_taken_over: counter(TAKEN_OVER),
            history_deleted: counter(HISTORY_DELETED),
            history_sweep_statement_seconds: histogram(SWEEP_STATEMENT),
            subscribers: gauge(SUBSCRIBERS),
            subscribers_lagged: counter(LAGGED),
            record_batch_seconds: histogram(RECORD_BATCH),
            unrecorded_sends: gauge(UNRECORDED),
            limiter: LimiterMetrics {
                dropped: counter(LIMITER_DROPPED),
                round_trip_seconds: histogram(LIMITER_ROUND_TRIP),
            },
            webhook: WebhookMetrics::registered(&recorder),
            recorder: Some(recorder),
        };
        Arc::new(metrics)
    }

    /// The send limiter's handles.
    pub fn limiter(&self) -> LimiterMetrics {
        self.limiter.clone()
    }

    /// The webhook client's handles.
    pub fn webhook(&self) -> WebhookMetrics {
        self.webhook.clone()
    }

    /// Counts a call the authorization layer refused: for want of credentials it could
    /// tell (`unauthenticated`), or of a role.
    pub fn auth_denied(&self, unauthenticated: bool) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        let reason = if unauthenticated {
            "unauthenticated"
        } else {
            "permission_denied"
        };
        recorder
            .register_counter(
                &Key::from_parts(AUTH_DENIED, vec![Label::new("reason", reason)]),
                &META,
            )
            .increment(1);
    }

    /// Counts a run this instance brought to a final state.
    pub fn run_finished(&self, status: FinalStatus) {
        match status {
            FinalStatus::Completed => &self.finished_completed,
            FinalStatus::SoldOut => &self.finished_sold_out,
            FinalStatus::Error => &self.finished_error,
        }
        .increment(1);
    }

    /// Counts a gRPC call that ended with `code` after `elapsed`. `service` and
    /// `method` come from a fixed list (see `grpc::observe`), so the label sets are few.
    pub fn grpc_handled(&self, service: &str, method: &str, code: &'static str, elapsed: Duration) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        let (service, method) = (service.to_owned(), method.to_owned());
        let labels = vec![
            Label::new("grpc_service", service.clone()),
            Label::new("grpc_method", method.clone()),
            Label::new("grpc_code", code),
        ];
        recorder
            .register_counter(&Key::from_parts(GRPC_HANDLED, labels), &META)
            .increment(1);
        let labels = vec![
            Label::new("grpc_service", service),
            Label::new("grpc_method", method),
        ];
        recorder
            .register_histogram(&Key::from_parts(GRPC_SECONDS, labels), &META)
            .record(elapsed.as_secs_f64());
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.recorder
            .as_ref()
            .map(|r| r.handle().render())
            .unwrap_or_default()
    }
}

/// The Prometheus recorder, with the buckets of each histogram.
fn prometheus_recorder() -> PrometheusRecorder {
    [
        (RECORD_BATCH, RECORD_BUCKETS),
        (SWEEP_STATEMENT, RECORD_BUCKETS),
        (GRPC_SECONDS, GRPC_BUCKETS),
        (LIMITER_ROUND_TRIP, ROUND_TRIP_BUCKETS),
        (WEBHOOK_SECONDS, WEBHOOK_BUCKETS),
    ]
    .into_iter()
    .try_fold(PrometheusBuilder::new(), |builder, (name, buckets)| {
        builder.set_buckets_for_metric(Matcher::Full(name.into()), buckets)
    })
    .expect("the bucket lists are not empty")
    .build_recorder()
}

/// What kind of metric a description is for.
enum Kind {
    Counter,
    Gauge,
    /// In seconds, as every histogram here.
    Histogram,
}

/// Every metric with its help text, as `/metrics` shows it.
const DESCRIPTIONS: &[(Kind, &str, &str)] = &[
    (
        Kind::Counter,
        HISTORY_DELETED,
        "Per-user history rows deleted by the retention sweep (RESTOCK_HISTORY_RETENTION).",
    ),
    (
        Kind::Histogram,
        SWEEP_STATEMENT,
        "Time each delete statement of the retention sweep took, and held its locks.",
    ),
    (
        Kind::Counter,
        SENT,
        "Notifications delivered by runs on this instance.",
    ),
    (
        Kind::Gauge,
        RATE_LIMIT,
        "The configured RESTOCK_SEND_RATE: notifications per second, shared by all instances.",
    ),
    (
        Kind::Gauge,
        IN_PROGRESS,
        "Runs this instance is driving now.",
    ),
    (
        Kind::Counter,
        FINISHED,
        "Runs this instance brought to a final state, by status.",
    ),
    (
        Kind::Counter,
        TAKEN_OVER,
        "Runs this instance took over from an instance whose lease ran out.",
    ),
    (
        Kind::Gauge,
        SUBSCRIBERS,
        "Subscribe streams open on this instance.",
    ),
    (
        Kind::Counter,
        LAGGED,
        "Subscribe streams ended because they fell behind.",
    ),
    (
        Kind::Histogram,
        RECORD_BATCH,
        "Time to commit one batch of history rows with the run's cursor.",
    ),
    (
        Kind::Gauge,
        UNRECORDED,
        "Notifications delivered by this instance's runs but not yet committed (G10).",
    ),
    (
        Kind::Counter,
        LIMITER_DROPPED,
        "Send slots this instance's limiter gave up: it could not hand them out in time.",
    ),
    (
        Kind::Counter,
        WEBHOOK_REQUESTS,
        "Webhook requests, retries included, by how they ended: 2xx, 3xx, 4xx, 5xx, \
         timeout or error (connection).",
    ),
    (
        Kind::Histogram,
        WEBHOOK_SECONDS,
        "Time from the start of one webhook request to its answer.",
    ),
    (
        Kind::Gauge,
        WEBHOOK_IN_FLIGHT,
        "Webhook requests this instance has started and not yet seen answered.",
    ),
    (
        Kind::Histogram,
        LIMITER_ROUND_TRIP,
        "Round trip of one send limiter reservation in Redis.",
    ),
    (
        Kind::Counter,
        GRPC_HANDLED,
        "gRPC calls completed on the server, by service, method and status code.",
    ),
    (
        Kind::Histogram,
        GRPC_SECONDS,
        "Time from the start of a gRPC call to its end, streams included.",
    ),
    (
        Kind::Counter,
        AUTH_DENIED,
        "Calls refused by authorization: unauthenticated (no or unknown credentials) or \
         permission_denied (a caller without the role).",
    ),
];

fn describe(recorder: &PrometheusRecorder) {
    for (kind, name, text) in DESCRIPTIONS {
        let (name, text) = ((*name).into(), (*text).into());
        match kind {
            Kind::Counter => recorder.describe_counter(name, None, text),
            Kind::Gauge => recorder.describe_gauge(name, None, text),
            Kind::Histogram => recorder.describe_histogram(name, Some(Unit::Seconds), text),
        }
    }
}

/// The `/metrics` endpoint, bound and ready to serve.
pub struct MetricsServer {
    listener: TcpListener,
}

impl MetricsServer {
    /// Binds `addr` (port 0 picks one).
    pub async fn bind(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on RESTOCK_METRICS_LISTEN {addr}"))?;
        Ok(Self { listener })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves `GET /metrics` until `stop` is cancelled; also runs the recorder's upkeep.
    /// Once `stop` is cancelled, no connection is accepted, open ones are closed (at
    /// once when idle, after their answer when a scrape is under way), and this returns
    /// when the last one is closed.
    pub async fn serve(self, metrics: Arc<Metrics>, stop: CancellationToken) {
        let upkeep = metrics.clone();
        let upkeep = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                every.tick().await;
                if let Some(recorder) = &upkeep.recorder {
                    recorder.handle().run_upkeep();
                }
            }
        });
        let app = Router::new()
            .route(
                "/metrics",
                get(scrape)
                    .fallback(|| async { (StatusCode::METHOD_NOT_ALLOWED, "use GET /metrics\n") }),
            )
            .fallback(|| async { (StatusCode::NOT_FOUND, "metrics are at GET /metrics\n") })
            .with_state(metrics);
        let served = axum::serve(self.listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::warn!(%error, "the /metrics server stopped");
        }
        upkeep.abort();
    }
}

/// `GET /metrics` (and `HEAD`, which axum answers from the same handler without the
/// body): the Prometheus text exposition.
async fn scrape(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        metrics.render(),
    )
}
