//! A webhook endpoint for the tests: a real HTTP/1.1 server on 127.0.0.1:0 that checks
//! every request the way a Standard Webhooks receiver does (every signature, against
//! every secret it knows) and answers as a test tells it to, per notification.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use hmac::{Hmac, Mac as _};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::time::Instant;

/// A fresh `whsec_` secret of `len` random bytes.
pub fn secret(len: usize) -> String {
    let key: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
    format!("whsec_{}", BASE64.encode(key))
}

/// How the endpoint answers a notification.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Every attempt is answered with this status.
    Always(u16),
    /// The first `n` attempts are answered with this status, then 200.
    Times(u16, usize),
    /// The first attempt gets no answer for this long (past the client's timeout).
    StallFirst(Duration),
    /// The first `n` attempts are answered 429 with `Retry-After: <secs>`.
    RetryAfter { secs: u64, times: usize },
}

/// One request the endpoint received.
#[derive(Debug, Clone)]
pub struct Received {
    pub id: String,
    pub timestamp: i64,
    pub body: serde_json::Value,
    /// How many `v1,` signatures the request carried.
    pub signatures: usize,
    /// As a Standard Webhooks receiver decides: one of the signatures matched a secret
    /// it knows, the timestamp was within five minutes, and the content type JSON.
    pub valid: bool,
    /// How many of the receiver's secrets had a matching signature.
    pub matched: usize,
    /// The W3C `traceparent` header, when the service sent one.
    pub traceparent: Option<String>,
    pub status: u16,
    pub at: Instant,
}

#[derive(Default)]
struct State {
    received: Vec<Received>,
    faults: HashMap<String, Fault>,
    attempts: HashMap<String, usize>,
}

#[derive(Clone)]
pub struct Receiver {
    pub url: String,
    state: Arc<Mutex<State>>,
    connections: Arc<AtomicUsize>,
}

impl Receiver {
    /// Starts the endpoint; it checks signatures against every one of `secrets` and
    /// answers after `latency`.
    pub async fn start(secrets: &[String], latency: Duration) -> Self {
        let keys: Arc<Vec<Vec<u8>>> = Arc::new(
            secrets
                .iter()
                .map(|s| BASE64.decode(s.strip_prefix("whsec_").unwrap()).unwrap())
                .collect(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks/restock", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let connections = Arc::new(AtomicUsize::new(0));
        let receiver = Self {
            url,
            state: state.clone(),
            connections: connections.clone(),
        };
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                connections.fetch_add(1, Ordering::SeqCst);
                let (state, keys) = (state.clone(), keys.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        handle(request, state.clone(), keys.clone(), latency)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        receiver
    }

    pub fn fail(&self, id: &str, fault: Fault) {
        self.state.lock().unwrap().faults.insert(id.into(), fault);
    }

    pub fn heal(&self, id: &str) {
        self.state.lock().unwrap().faults.remove(id);
    }

    /// Every request received, in the order received.
    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    /// The requests for one notification.
    pub fn received_for(&self, id: &str) -> Vec<Received> {
        self.received().into_iter().filter(|r| r.id == id).collect()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// The notifications answered 2xx, by id, with how many times.
    pub fn acknowledged(&self) -> HashMap<String, usize> {
        let mut acknowledged = HashMap::new();
        for r in self.received() {
            if (200..300).contains(&r.status) {
                *acknowledged.entry(r.id).or_insert(0) += 1;
            }
        }
        acknowledged
    }
}

async fn handle(
    request: Request<Incoming>,
    state: Arc<Mutex<State>>,
    keys: Arc<Vec<Vec<u8>>>,
    latency: Duration,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (id, timestamp, signature) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let traceparent = Some(header("traceparent")).filter(|t| !t.is_empty());
    let json = header("content-type") == "application/json";
    let body = request.into_body().collect().await.unwrap().to_bytes();
    let signatures: Vec<&str> = signature.split(' ').filter(|s| !s.is_empty()).collect();
    let expected: Vec<String> = keys
        .iter()
        .map(|key| {
            let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
            mac.update(format!("{id}.{timestamp}.").as_bytes());
            mac.update(&body);
            format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
        })
        .collect();
    let timestamp: i64 = timestamp.parse().unwrap_or(0);
    let fresh = (chrono::Utc::now().timestamp() - timestamp).abs() <= 300;
    let matched = expected
        .iter()
        .filter(|e| signatures.contains(&e.as_str()))
        .count();
    let valid = json && fresh && matched > 0;
    let (status, retry_after, stall) = {
        let mut state = state.lock().unwrap();
        let attempt = {
            let n = state.attempts.entry(id.clone()).or_insert(0);
            *n += 1;
            *n
        };
        let (status, retry_after, stall) = match state.faults.get(&id) {
            Some(Fault::Always(status)) => (*status, None, None),
            Some(Fault::Times(status, n)) if attempt <= *n => (*status, None, None),
            Some(Fault::StallFirst(stall)) if attempt == 1 => (200, None, Some(*stall)),
            Some(Fault::RetryAfter { secs, times }) if attempt <= *times => {
                (429, Some(*secs), None)
            }
            _ => (200, None, None),
        };
        // A stalled request's answer never reaches the client: not a 2xx it saw.
        let recorded_status = if stall.is_some() { 0 } else { status };
        state.received.push(Received {
            id,
            timestamp,
            body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
            signatures: signatures.len(),
            valid,
            matched,
            traceparent,
            status: recorded_status,
            at: Instant::now(),
        });
        (status, retry_after, stall)
    };
    if let Some(stall) = stall {
        tokio::time::sleep(stall).await;
    } else if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", secs.to_string().parse().unwrap());
    }
    Ok(response)
}
