//! Traces over OTLP (`OTEL_EXPORTER_OTLP_ENDPOINT`): the real binary exports to an
//! OTLP collector the test hosts (a tonic server of the OTLP trace service). The call
//! continues the caller's `traceparent`, the run's span is linked to the call's, the
//! recorded batches and webhook requests are children of the run's span, and every
//! webhook request carries the `traceparent` of its own span.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use restock_notifier::grpc::proto::{self, RunStatus};
use tonic::{Request, Response, Status};

use crate::cluster::Instance;
use crate::helpers::*;
use crate::receiver::{Receiver, secret};

/// Every span exported to it.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans);
        self.0.lock().unwrap().extend(spans);
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Serves on a free loopback port; returns its URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    fn named(&self, name: &str) -> Vec<Span> {
        let spans = self.0.lock().unwrap();
        spans.iter().filter(|s| s.name == name).cloned().collect()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const CALLER_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN: &str = "b7ad6b7169203331";

/// A run of the real binary delivering to a webhook endpoint, triggered by a caller
/// that sends its own `traceparent`; kept alive until the test has looked at it.
struct Traced {
    receiver: Receiver,
    _app: TestApp,
    _instance: Instance,
}

impl Traced {
    /// Runs `users` through the binary, started with `env` beside the webhook settings,
    /// and returns once the run completed.
    async fn run(users: &[i64], env: &[(&str, &str)]) -> Self {
        let secrets = [secret(32)];
        let receiver = Receiver::start(&secrets, Duration::ZERO).await;
        let app = spawn_app(Backend::MySql).await;
        app.set_stock(1, 10).await;
        app.register_bulk(1, users).await;
        let mut env = env.to_vec();
        env.extend([
            ("RESTOCK_WEBHOOK_URL", receiver.url.as_str()),
            ("RESTOCK_WEBHOOK_SECRET", secrets[0].as_str()),
        ]);
        let instance = Instance::start_with_env(&app, 500, "10s", &env).await;
        let mut trigger = Request::new(proto::TriggerRestockRequest {
            product_id: 1,
            ..Default::default()
        });
        let caller = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
        trigger
            .metadata_mut()
            .insert("traceparent", caller.parse().unwrap());
        instance
            .client
            .clone()
            .trigger_restock(trigger)
            .await
            .unwrap();
        assert_eq!(app.wait_until_final(1).await.status(), RunStatus::Completed);
        Self {
            receiver,
            _app: app,
            _instance: instance,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_s_trace_reaches_the_run_its_batches_and_its_webhook_requests() {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let users: Vec<i64> = (1..=40).collect();
    let traced = Traced::run(
        &users,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;

    let collector = &collector;
    let notified = users.len();
    let (call, run) = poll_until(
        Duration::from_secs(20),
        "the spans exported",
        || async move {
            let calls = collector.named("/restock.v1.RestockService/TriggerRestock");
            let runs = collector.named("run");
            let batches = collector.named("record_batch");
            let requests = collector.named("webhook_request");
            match (calls.first(), runs.first()) {
                (Some(call), Some(run)) if !batches.is_empty() && requests.len() >= notified => {
                    Ok((call.clone(), run.clone()))
                }
                _ => Err((calls.len(), runs.len(), batches.len(), requests.len())),
            }
        },
    )
    .await;
    // The call continues the caller's trace.
    assert_eq!(hex(&call.trace_id), CALLER_TRACE);
    assert_eq!(hex(&call.parent_span_id), CALLER_SPAN);
    // The run is a trace of its own, linked to the call.
    assert!(run.parent_span_id.is_empty(), "{run:?}");
    assert!(
        run.links
            .iter()
            .any(|l| l.trace_id == call.trace_id && l.span_id == call.span_id),
        "the run links to the call: {:?}",
        run.links
    );
    for child in collector
        .named("record_batch")
        .iter()
        .chain(&collector.named("webhook_request"))
    {
        assert_eq!(child.trace_id, run.trace_id, "{}", child.name);
        assert_eq!(child.parent_span_id, run.span_id, "{}", child.name);
    }
    // Each request carried its own span's traceparent.
    let request_spans: Vec<String> = collector
        .named("webhook_request")
        .iter()
        .map(|s| hex(&s.span_id))
        .collect();
    let received = traced.receiver.received();
    assert_eq!(received.len(), users.len());
    for request in received {
        let traceparent = request.traceparent.expect("a traceparent header");
        let parts: Vec<&str> = traceparent.split('-').collect();
        assert_eq!(parts[1], hex(&run.trace_id), "{traceparent}");
        assert!(
            request_spans.contains(&parts[2].to_string()),
            "{traceparent}"
        );
    }
}

/// Without an endpoint, webhook requests carry no `traceparent`: nothing is traced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_nothing_is_traced() {
    let traced = Traced::run(&[1, 2, 3], &[]).await;
    let received = traced.receiver.received();
    assert_eq!(received.len(), 3);
    assert!(received.iter().all(|r| r.traceparent.is_none()));
}
