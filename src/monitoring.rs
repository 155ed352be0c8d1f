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
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(RECORD_BATCH.into()), RECORD_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(GRPC_SECONDS.into()), GRPC_BUCKETS)
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(LIMITER_ROUND_TRIP.into()),
                    ROUND_TRIP_BUCKETS,
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(WEBHOOK_SECONDS.into()), WEBHOOK_BUCKETS)
            })
            .expect("the bucket lists are not empty")
            .build_recorder();
        describe(&recorder);
        let counter = |name: &'static str| recorder.register_counter(&Key::from_name(name), &META);
        let gauge = |name: &'static str| recorder.register_gauge(&Key::from_name(name), &META);
        let finished = |status: &'static str| {
            recorder.register_counter(
                &Key::from_parts(FINISHED, vec![Label::new("status", status)]),
                &META,
            )
        };
        gauge(RATE_LIMIT).set(f64::from(send_rate));
        let notifications_sent = counter(SENT);
        let runs_in_progress = gauge(IN_PROGRESS);
        let finished_completed = finished("completed");
        let finished_sold_out = finished("canceled_by_sold_out");
        let finished_error = finished("canceled_by_error");
        let runs_taken_over = counter(TAKEN_OVER);
        let subscribers = gauge(SUBSCRIBERS);
        let subscribers_lagged = counter(LAGGED);
        let record_batch_seconds =
            recorder.register_histogram(&Key::from_name(RECORD_BATCH), &META);
        let unrecorded_sends = gauge(UNRECORDED);
        let limiter = LimiterMetrics {
            dropped: counter(LIMITER_DROPPED),
            round_trip_seconds: recorder
                .register_histogram(&Key::from_name(LIMITER_ROUND_TRIP), &META),
        };
        let requests = |code: &'static str| {
            recorder.register_counter(
                &Key::from_parts(WEBHOOK_REQUESTS, vec![Label::new("code", code)]),
                &META,
            )
        };
        let webhook = WebhookMetrics {
            answered_2xx: requests("2xx"),
            answered_3xx: requests("3xx"),
            answered_4xx: requests("4xx"),
            answered_5xx: requests("5xx"),
            timeout: requests("timeout"),
            error: requests("error"),
            request_seconds: recorder.register_histogram(&Key::from_name(WEBHOOK_SECONDS), &META),
            in_flight: gauge(WEBHOOK_IN_FLIGHT),
        };
        let metrics = Self {
            recorder: Some(recorder),
            notifications_sent,
            runs_in_progress,
            finished_completed,
            finished_sold_out,
            finished_error,
            runs_taken_over,
            subscribers,
            subscribers_lagged,
            record_batch_seconds,
            unrecorded_sends,
            limiter,
            webhook,
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

fn describe(recorder: &PrometheusRecorder) {
    let counter = |name: &'static str, text: &'static str| {
        recorder.describe_counter(name.into(), None, text.into());
    };
    let gauge = |name: &'static str, text: &'static str| {
        recorder.describe_gauge(name.into(), None, text.into());
    };
    let histogram = |name: &'static str, text: &'static str| {
        recorder.describe_histogram(name.into(), Some(Unit::Seconds), text.into());
    };
    counter(SENT, "Notifications delivered by runs on this instance.");
    gauge(
        RATE_LIMIT,
        "The configured RESTOCK_SEND_RATE: notifications per second, shared by all instances.",
    );
    gauge(IN_PROGRESS, "Runs this instance is driving now.");
    counter(
        FINISHED,
        "Runs this instance brought to a final state, by status.",
    );
    counter(
        TAKEN_OVER,
        "Runs this instance took over from an instance whose lease ran out.",
    );
    gauge(SUBSCRIBERS, "Subscribe streams open on this instance.");
    counter(LAGGED, "Subscribe streams ended because they fell behind.");
    histogram(
        RECORD_BATCH,
        "Time to commit one batch of history rows with the run's cursor.",
    );
    gauge(
        UNRECORDED,
        "Notifications delivered by this instance's runs but not yet committed (G10).",
    );
    counter(
        LIMITER_DROPPED,
        "Send slots this instance's limiter gave up: it could not hand them out in time.",
    );
    counter(
        WEBHOOK_REQUESTS,
        "Webhook requests, retries included, by how they ended: 2xx, 3xx, 4xx, 5xx, \
         timeout or error (connection).",
    );
    histogram(
        WEBHOOK_SECONDS,
        "Time from the start of one webhook request to its answer.",
    );
    gauge(
        WEBHOOK_IN_FLIGHT,
        "Webhook requests this instance has started and not yet seen answered.",
    );
    histogram(
        LIMITER_ROUND_TRIP,
        "Round trip of one send limiter reservation in Redis.",
    );
    counter(
        GRPC_HANDLED,
        "gRPC calls completed on the server, by service, method and status code.",
    );
    histogram(
        GRPC_SECONDS,
        "Time from the start of a gRPC call to its end, streams included.",
    );
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
