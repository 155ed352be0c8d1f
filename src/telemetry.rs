//! Structured logging with tracing, and, with `OTEL_EXPORTER_OTLP_ENDPOINT`, the same
//! spans exported as OpenTelemetry traces over OTLP/gRPC: a server span per call that
//! continues the caller's W3C `traceparent`, a span per run claim linked to the span of
//! the call that triggered it, and child spans per recorded batch and webhook request.
//! Without the endpoint there is no exporter and no OpenTelemetry layer at all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::config::{Config, LogFormat};

/// Set once traces are exported: what the code that only serves tracing asks before it
/// does anything, so that a service without an endpoint pays nothing for it.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Flushes the spans not exported yet and stops the exporter when dropped (at the end
/// of `main`).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("could not flush the last traces: {e}");
        }
    }
}

/// Installs the global subscriber, and the trace exporter if an endpoint is set. Fails
/// on a filter that does not parse, or an endpoint that is not a URL, naming the
/// setting.
pub fn init(config: &Config) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_new(&config.log)
        .map_err(|e| anyhow::anyhow!("RUST_LOG {:?} is not a valid log filter: {e}", config.log))?;
    // Colours only on a terminal, so that files and log collectors get plain text.
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    let fmt = match config.log_format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).with_filter(filter).boxed(),
    };
    let provider = config
        .otel_endpoint
        .as_deref()
        .map(|endpoint| provider(endpoint, &config.otel_service_name))
        .transpose()?;
    // The service's own spans, whatever RUST_LOG keeps of the logs: a quiet log must
    // not empty the traces.
    let traces = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("restock-notifier"))
            .with_filter(Targets::new().with_target("restock_notifier", Level::INFO))
    });
    tracing_subscriber::registry().with(fmt).with(traces).init();
    EXPORTING.store(provider.is_some(), Ordering::Relaxed);
    Ok(Telemetry { provider })
}

/// The tracer provider exporting to `endpoint` in batches, from a thread of its own.
fn provider(endpoint: &str, service: &str) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| {
            anyhow::anyhow!("OTEL_EXPORTER_OTLP_ENDPOINT {endpoint:?}: no OTLP exporter: {e}")
        })?;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service.to_string())
                .build(),
        )
        .build())
}

/// The headers of a call, as the propagator reads them.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|key| key.as_str()).collect()
    }
}

/// Makes `span` continue the caller's trace, if its headers carry a `traceparent`.
pub fn continue_caller(span: &tracing::Span, headers: &http::HeaderMap) {
    if !exporting() {
        return;
    }
    let caller = TraceContextPropagator::new().extract(&Headers(headers));
    if caller.span().span_context().is_valid() {
        let _ = span.set_parent(caller);
    }
}

/// The W3C `traceparent` of `span`, when spans are exported: stored with a run, it
/// links the run to the call that triggered it, and sent with a webhook request, it
/// lets the receiver continue the trace.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    if !exporting() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent")
}

/// Links `span` to the span a `traceparent` names (a run's claim to the call that
/// triggered the run: a run outlives its call, and another instance may continue it).
pub fn link(span: &tracing::Span, traceparent: &str) {
    if !exporting() {
        return;
    }
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let trigger = TraceContextPropagator::new().extract(&carrier);
    let context = trigger.span().span_context().clone();
    if context.is_valid() {
        span.add_link(context);
    }
}
