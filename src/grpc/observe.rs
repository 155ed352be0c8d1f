//! One tower layer around every gRPC call: the `grpc_server_handled_total` and
//! `grpc_server_handling_seconds` metrics, and a `request` span (method, peer, code,
//! latency) that every log line of the call carries.
//!
//! A call ends when its response body does: for a stream, that is when the stream
//! ends, with the `grpc-status` of its trailers. A body dropped before its status was
//! sent is a call the client cancelled.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use prost::Message as _;
use tonic::Code;
use tonic::body::Body;
use tower::{Layer, Service};
use tracing::Instrument as _;

use crate::callers::TrustedProxies;
use crate::monitoring::Metrics;

/// Every (service, method) this server serves, read from the descriptors it is built
/// from, so that a call to anything else counts under `unknown` and a caller cannot
/// invent label values.
#[derive(Debug, Default)]
pub struct KnownMethods(HashSet<String>);

impl KnownMethods {
    /// From encoded `FileDescriptorSet`s.
    pub fn from_descriptor_sets(sets: &[&[u8]]) -> Self {
        let mut known = HashSet::new();
        for set in sets {
            let Ok(set) = prost_types::FileDescriptorSet::decode(*set) else {
                continue;
            };
            for file in set.file {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    let name = format!("{package}.{}", service.name.unwrap_or_default());
                    for method in service.method {
                        known.insert(format!("/{name}/{}", method.name.unwrap_or_default()));
                    }
                }
            }
        }
        Self(known)
    }

    /// `(service, method)` of a request path, or `("unknown", "unknown")`.
    fn labels<'a>(&self, path: &'a str) -> (&'a str, &'a str) {
        match path.strip_prefix('/').and_then(|p| p.split_once('/')) {
            Some(parts) if self.0.contains(path) => parts,
            _ => ("unknown", "unknown"),
        }
    }
}

/// The call's `request` span, in the request's extensions: the authorization layer
/// records the caller in it.
#[derive(Clone)]
pub struct RequestSpan(pub tracing::Span);

#[derive(Clone)]
pub struct ObserveLayer {
    metrics: Arc<Metrics>,
    known: Arc<KnownMethods>,
    proxies: Arc<TrustedProxies>,
}

impl ObserveLayer {
    pub fn new(metrics: Arc<Metrics>, known: KnownMethods, proxies: TrustedProxies) -> Self {
        Self {
            metrics,
            known: Arc::new(known),
            proxies: Arc::new(proxies),
        }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    layer: ObserveLayer,
}

impl<S> Service<http::Request<Body>> for Observe<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let started = Instant::now();
        let path = request.uri().path();
        let (service, method) = self.layer.known.labels(path);
        let peer = peer(&request);
        // Behind a trusted proxy, the client it forwarded for.
        let client = peer.map(|p| self.layer.proxies.client_of(p.ip(), request.headers()));
        let span = tracing::info_span!(
            "request",
            otel.name = %path,
            otel.kind = "server",
            method = %path,
            peer = %peer.map_or_else(|| "-".to_string(), |p| p.to_string()),
            client = %client.map_or_else(|| "-".to_string(), |c| c.to_string()),
            caller = tracing::field::Empty,
            code = tracing::field::Empty,
            latency_ms = tracing::field::Empty,
        );
        let call = CallEnd {
            metrics: self.layer.metrics.clone(),
            service: service.to_owned(),
            method: method.to_owned(),
            started,
            span: span.clone(),
            code: None,
            ended: false,
        };
        crate::telemetry::continue_caller(&span, request.headers());
        request.extensions_mut().insert(RequestSpan(span.clone()));
        let response = self.inner.call(request).instrument(span);
        Box::pin(async move {
            let response = response.await?;
            let (parts, body) = response.into_parts();
            let mut call = call;
            // An error answered at once carries its status in the headers.
            call.code = grpc_status(&parts.headers);
            Ok(http::Response::from_parts(
                parts,
                Body::new(ObservedBody { inner: body, call }),
            ))
        })
    }
}

fn peer<B>(request: &http::Request<B>) -> Option<SocketAddr> {
    super::peer_addr(request.extensions())
}

fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .map(|v| Code::from_bytes(v.as_bytes()))
}

/// Records the end of a call once, when its body ends or is dropped.
struct CallEnd {
    metrics: Arc<Metrics>,
    service: String,
    method: String,
    started: Instant,
    span: tracing::Span,
    code: Option<Code>,
    ended: bool,
}

impl CallEnd {
    fn end(&mut self) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        // A body that went away before any status was sent: the client cancelled.
        let code = self.code.unwrap_or(Code::Cancelled);
        let elapsed = self.started.elapsed();
        self.metrics
            .grpc_handled(&self.service, &self.method, code_label(code), elapsed);
        // Milliseconds, to the microsecond.
        let latency_ms = (elapsed.as_secs_f64() * 1e6).round() / 1e3;
        self.span.record("code", code_label(code));
        self.span.record("latency_ms", latency_ms);
        let _entered = self.span.enter();
        tracing::debug!("request finished");
    }
}

impl Drop for CallEnd {
    fn drop(&mut self) {
        self.end();
    }
}

pin_project_lite::pin_project! {
    struct ObservedBody {
        #[pin]
        inner: Body,
        call: CallEnd,
    }
}

impl http_body::Body for ObservedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    this.call.code = Some(code);
                    this.call.end();
                }
            }
            Some(Err(status)) => {
                this.call.code = Some(status.code());
                this.call.end();
            }
            None => {
                // Ended without trailers: the status, if any, came in the headers.
                this.call.code.get_or_insert(Code::Ok);
                this.call.end();
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The code as go-grpc-prometheus writes it in `grpc_code`.
pub fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_served_methods_become_labels() {
        let known = KnownMethods::from_descriptor_sets(&[
            crate::grpc::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ]);
        assert_eq!(
            known.labels("/restock.v1.RestockService/TriggerRestock"),
            ("restock.v1.RestockService", "TriggerRestock")
        );
        assert_eq!(
            known.labels("/grpc.health.v1.Health/Check"),
            ("grpc.health.v1.Health", "Check")
        );
        for invented in [
            "/restock.v1.RestockService/Nope",
            "/made.up.Service/TriggerRestock",
            "/",
            "",
        ] {
            assert_eq!(known.labels(invented), ("unknown", "unknown"), "{invented}");
        }
    }
}
