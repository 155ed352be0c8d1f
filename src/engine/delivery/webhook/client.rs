//! The HTTP client of the webhook: one signed POST per attempt, on pooled keep-alive
//! connections (HTTP/1.1, or HTTP/2 when the endpoint offers it over TLS), with
//! `https://` on rustls with the Mozilla roots, the same TLS stack as the gRPC server.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::Instrument as _;

use super::{Outcome, Transient, WebhookSettings};
use crate::engine::stock::Admission;
use crate::monitoring::WebhookMetrics;

/// Connections left idle this long are closed: shorter than the 120 s or so after
/// which common servers and load balancers drop idle connections, so the client rarely
/// picks one the other side is closing.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// How much of an answer's body is read (and thrown away) so its connection can be
/// reused; a larger body closes the connection instead.
const MAX_ANSWER_BODY: usize = 64 * 1024;

/// One notification's request, as every attempt sends it.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The `webhook-id`: the notification id, the same for every attempt and redelivery.
    pub id: String,
    pub body: Bytes,
}

/// Sends attempts to the configured endpoint.
pub struct WebhookClient {
    client: Client<HttpsConnector<HttpConnector>, WrittenBody>,
    settings: WebhookSettings,
    metrics: WebhookMetrics,
}

impl WebhookClient {
    pub fn new(settings: WebhookSettings, metrics: WebhookMetrics) -> anyhow::Result<Self> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        // A request is one small write: no Nagle delay waiting for the previous ACK.
        http.set_nodelay(true);
        http.set_connect_timeout(Some(settings.timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        Ok(Self {
            client,
            settings,
            metrics,
        })
    }

    pub fn settings(&self) -> &WebhookSettings {
        &self.settings
    }

    /// Makes one attempt. `pass` (the stock fence's, G3) is dropped as soon as the
    /// request is written to its connection; a request not written by `send_by` is
    /// abandoned unsent, and the attempt counts as unreachable.
    pub async fn send(&self, attempt: &Attempt, pass: Arc<Admission>, send_by: Instant) -> Outcome {
        let started = Instant::now();
        // A guard: an attempt given up mid-way (its run stopped) leaves the gauge too.
        let _in_flight = InFlight::new(&self.metrics.in_flight);
        let span = tracing::info_span!(
            "webhook_request",
            otel.kind = "client",
            webhook_id = %attempt.id,
        );
        let outcome = self.exchange(attempt, pass, send_by).instrument(span).await;
        self.metrics
            .request_seconds
            .record(started.elapsed().as_secs_f64());
        self.metrics.count(&outcome);
        outcome.into()
    }

    async fn exchange(&self, attempt: &Attempt, pass: Arc<Admission>, send_by: Instant) -> Answer {
        let deadline = Instant::now() + self.settings.timeout;
        let (written, on_written) = oneshot::channel();
        let Ok(request) = self.request(attempt, written) else {
            return Answer::Unreachable;
        };
        let exchange = async {
            let response = self.client.request(request).await?;
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| super::parse_retry_after(v, std::time::SystemTime::now()));
            // Read to the end so the connection goes back to the pool.
            let _ = Limited::new(response.into_body(), MAX_ANSWER_BODY)
                .collect()
                .await;
            Ok::<_, hyper_util::client::legacy::Error>((status, retry_after))
        };
        tokio::pin!(exchange);
        let mut on_written = on_written;
        let mut pass = Some(pass);
        loop {
            tokio::select! {
                biased;
                answered = &mut exchange => {
                    return match answered {
                        Ok((status, retry_after)) => Answer::Status(status, retry_after),
                        Err(_) => Answer::Unreachable,
                    };
                }
                // Written (or given up by the connection): the pass is no longer needed.
                _ = &mut on_written, if pass.is_some() => pass = None,
                () = tokio::time::sleep_until(send_by), if pass.is_some() => {
                    // G3: not on the wire before the pass could expire; never send it.
                    return Answer::Unreachable;
                }
                () = tokio::time::sleep_until(deadline) => return Answer::TimedOut,
            }
        }
    }

    /// The signed POST of `attempt`, which says on `written` once its body is on the
    /// wire.
    fn request(
        &self,
        attempt: &Attempt,
        written: oneshot::Sender<()>,
    ) -> http::Result<http::Request<WrittenBody>> {
        // Unix seconds of this attempt: receivers refuse a timestamp far from their
        // clock, so a retry is signed anew.
        let timestamp = chrono::Utc::now().timestamp();
        let signature = self
            .settings
            .keys
            .signature(&attempt.id, timestamp, &attempt.body);
        let mut request = http::Request::post(self.settings.url.clone());
        // The receiver continues the trace of this attempt's span, when traces are
        // exported.
        if let Some(traceparent) = crate::telemetry::traceparent(&tracing::Span::current()) {
            request = request.header("traceparent", traceparent);
        }
        request
            .header(CONTENT_TYPE, "application/json")
            .header(
                USER_AGENT,
                concat!("restock-notifier/", env!("CARGO_PKG_VERSION")),
            )
            .header("webhook-id", &attempt.id)
            .header("webhook-timestamp", timestamp)
            .header("webhook-signature", signature)
            .body(WrittenBody {
                inner: Full::new(attempt.body.clone()),
                written: Some(written),
            })
    }
}

/// How an exchange ended, before it is classified.
enum Answer {
    Status(u16, Option<Duration>),
    TimedOut,
    Unreachable,
}

impl From<Answer> for Outcome {
    fn from(answer: Answer) -> Self {
        match answer {
            Answer::Status(status, retry_after) => Outcome::of_status(status, retry_after),
            Answer::TimedOut => Outcome::Transient {
                why: Transient::TimedOut,
                retry_after: None,
            },
            Answer::Unreachable => Outcome::Transient {
                why: Transient::Unreachable,
                retry_after: None,
            },
        }
    }
}

impl WebhookMetrics {
    fn count(&self, answer: &Answer) {
        let counter = match answer {
            Answer::Status(200..=299, _) => &self.answered_2xx,
            Answer::Status(300..=399, _) => &self.answered_3xx,
            Answer::Status(400..=499, _) => &self.answered_4xx,
            Answer::Status(500..=599, _) => &self.answered_5xx,
            Answer::Status(..) | Answer::Unreachable => &self.error,
            Answer::TimedOut => &self.timeout,
        };
        counter.increment(1);
    }
}

/// The request body, which says when the connection first reads it: the head is
/// written by then, and the body goes out with it.
struct WrittenBody {
    inner: Full<Bytes>,
    written: Option<oneshot::Sender<()>>,
}

impl Body for WrittenBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(written) = self.written.take() {
            let _ = written.send(());
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Counts an attempt in `restock_webhook_in_flight` for as long as it lives.
struct InFlight(metrics::Gauge);

impl InFlight {
    fn new(gauge: &metrics::Gauge) -> Self {
        gauge.increment(1.0);
        Self(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
