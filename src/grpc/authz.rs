//! Who may call what: one table, method -> role ([`METHODS`]), checked by one layer
//! before any handler. The layer tells who the caller is (a client certificate's
//! identity, else a bearer token), answers UNAUTHENTICATED when it cannot and
//! PERMISSION_DENIED, naming the role, when the caller lacks it, and puts the caller
//! and the client's address in the request for the handlers, the API rate limit and
//! the audit log. Health and reflection are open to anyone.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};

use crate::callers::{Caller, CallerOf, Callers, ClientAddr, Role, TrustedProxies};
use crate::monitoring::Metrics;

/// What a method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without credentials.
    Open,
    /// A caller holding this role (or one that includes it).
    Role(Role),
}

/// Every RPC the service serves and the role it needs; a test checks that every
/// method of the proto has its line.
pub const METHODS: &[(&str, Role)] = &[
    ("/restock.v1.RestockService/SetStock", Role::Write),
    ("/restock.v1.RestockService/RegisterAlert", Role::Write),
    ("/restock.v1.RestockService/CancelAlert", Role::Write),
    ("/restock.v1.RestockService/TriggerRestock", Role::Write),
    ("/restock.v1.RestockService/GetRestockRun", Role::Read),
    ("/restock.v1.RestockService/WatchRestockRun", Role::Read),
    ("/restock.v1.RestockService/ListRestockRuns", Role::Read),
    ("/restock.v1.RestockService/Subscribe", Role::Read),
    ("/restock.v1.RestockService/GetProduct", Role::Read),
    ("/restock.v1.RestockService/ListProducts", Role::Read),
    ("/restock.v1.RestockService/ListAlerts", Role::Read),
    ("/restock.v1.RestockService/GetAlert", Role::Read),
    ("/restock.v1.RestockAdminService/ManualRestock", Role::Admin),
    ("/restock.v1.RestockAdminService/ForgetUser", Role::Admin),
];

/// Services anyone may call: health checks and reflection.
const OPEN_SERVICES: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// What `path` needs; `None` for a path the server does not serve (the router answers
/// it UNIMPLEMENTED, and it reaches no handler).
pub fn access(path: &str) -> Option<Access> {
    if OPEN_SERVICES.iter().any(|open| path.starts_with(open)) {
        return Some(Access::Open);
    }
    METHODS
        .iter()
        .find(|(method, _)| *method == path)
        .map(|(_, role)| Access::Role(*role))
}

/// The layer, with the policy it checks against.
#[derive(Clone)]
pub struct AuthzLayer {
    callers: Arc<Callers>,
    proxies: Arc<TrustedProxies>,
    failures: Arc<FailedAttempts>,
    metrics: Arc<Metrics>,
}

impl AuthzLayer {
    pub fn new(callers: Arc<Callers>, proxies: TrustedProxies, metrics: Arc<Metrics>) -> Self {
        Self {
            callers,
            proxies: Arc::new(proxies),
            failures: Arc::new(FailedAttempts::default()),
            metrics,
        }
    }
}

impl<S> Layer<S> for AuthzLayer {
    type Service = Authz<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authz {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Authz<S> {
    inner: S,
    layer: AuthzLayer,
}

type Answer<E> = Pin<Box<dyn Future<Output = Result<http::Response<Body>, E>> + Send>>;

impl<S> Service<http::Request<Body>> for Authz<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Answer<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let Some(Access::Role(role)) = access(request.uri().path()) else {
            return Box::pin(self.inner.call(request));
        };
        let client = super::peer_addr(request.extensions())
            .map(|peer| self.layer.proxies.client_of(peer.ip(), request.headers()));
        if let Some(client) = client {
            request.extensions_mut().insert(ClientAddr(client));
        }
        match self.layer.decide(&request, role, client) {
            Ok(caller) => {
                if let Some(span) = request.extensions().get::<super::observe::RequestSpan>() {
                    span.0.record("caller", caller.name());
                }
                let revocable = caller.0.clone().filter(|_| is_stream(request.uri().path()));
                request.extensions_mut().insert(caller);
                let answer = self.inner.call(request);
                match revocable {
                    None => Box::pin(answer),
                    Some(caller) => {
                        let watch =
                            super::revoke::Revocation::new(&self.layer.callers, caller, role);
                        Box::pin(async move { Ok(watch.wrap(answer.await?)) })
                    }
                }
            }
            Err((status, caller)) => {
                if let Some(span) = request.extensions().get::<super::observe::RequestSpan>() {
                    span.0.record("caller", caller.name());
                }
                if role >= Role::Write {
                    super::audit::denied(&caller, request.uri().path(), &status);
                }
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// The server-streaming methods: their streams end when their caller loses access.
fn is_stream(path: &str) -> bool {
    path.ends_with("/Subscribe") || path.ends_with("/WatchRestockRun")
}

impl AuthzLayer {
    /// Who `request` is from and whether it may call a method needing `role`.
    fn decide<B>(
        &self,
        request: &http::Request<B>,
        role: Role,
        client: Option<IpAddr>,
    ) -> Result<CallerOf, (Status, CallerOf)> {
        let now = Instant::now();
        let policy = self.callers.policy();
        let needs_credentials = policy.enforced || role == Role::Admin;
        // Shut out, the right credentials are refused too: the answer tells a guesser
        // nothing.
        if let Some(left) = client
            .filter(|_| needs_credentials)
            .and_then(|c| self.failures.shut_out(c, now))
        {
            self.metrics.auth_denied(true);
            let status = Status::resource_exhausted(format!(
                "too many calls with wrong or missing credentials from this address; retry \
                 in {}s with a known client certificate or `authorization: Bearer <token>`",
                left.as_secs().max(1)
            ));
            return Err((status, CallerOf(None)));
        }
        let caller = identify(request, &policy);
        match caller {
            Ok(Some(caller)) if caller.may(role) => return Ok(CallerOf(Some(caller))),
            Ok(Some(caller)) => {
                self.metrics.auth_denied(false);
                let status = Status::permission_denied(format!(
                    "caller {:?} may not call {}: it needs the {} role",
                    caller.name,
                    request.uri().path(),
                    role.as_str()
                ));
                return Err((status, CallerOf(Some(caller))));
            }
            _ if !needs_credentials => return Ok(CallerOf(None)),
            Ok(None) | Err(_) => {}
        }
        if let Some(client) = client {
            self.failures.record(client, now);
        }
        self.metrics.auth_denied(true);
        let status = Status::unauthenticated(match caller {
            Err(why) => why,
            _ if policy.enforced => {
                "no credentials: present a client certificate or `authorization: Bearer \
                 <token>` of a caller in RESTOCK_CALLERS"
                    .to_string()
            }
            _ => "admin calls need metadata `authorization: Bearer <RESTOCK_ADMIN_TOKEN>`"
                .to_string(),
        });
        Err((status, CallerOf(None)))
    }
}

/// The caller a request proves to be: by its client certificate first, else by its
/// bearer token. `Err` says why credentials that were presented are not a caller's.
fn identify<B>(
    request: &http::Request<B>,
    policy: &crate::callers::Policy,
) -> Result<Option<Arc<Caller>>, String> {
    let identities = super::peer_identities(request.extensions());
    if let Some(caller) = policy.by_certificate(&identities) {
        return Ok(Some(caller));
    }
    let Some(value) = request.headers().get(http::header::AUTHORIZATION) else {
        return match identities.first() {
            Some(identity) if policy.enforced => Err(format!(
                "the client certificate's identity {identity:?} is not a caller in \
                 RESTOCK_CALLERS"
            )),
            _ => Ok(None),
        };
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or("send the token as `authorization: Bearer <token>`")?;
    policy
        .by_token(token.trim())
        .map(Some)
        .ok_or_else(|| "the bearer token is not a known caller's".to_string())
}

/// Failed authentications a client address may make within [`FAILURE_WINDOW`]; past
/// that, every call needing credentials from it is refused until the window is over,
/// a right token too, so the answers tell a guesser nothing. Ten: an operator who
/// mistypes is not locked out.
const MAX_FAILURES: u32 = 10;

/// How long a client's failures count, from its first one.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Clients remembered at most; beyond it, those whose window is over are forgotten
/// first (and, under a flood from many addresses, all of them).
const MAX_CLIENTS: usize = 10_000;

/// Failed authentications per client address.
#[derive(Default)]
struct FailedAttempts {
    /// A std mutex: held for one map operation, never across an await.
    by_client: Mutex<HashMap<IpAddr, Strikes>>,
}

#[derive(Debug, Clone, Copy)]
struct Strikes {
    first: Instant,
    count: u32,
}

impl FailedAttempts {
    /// How long `client` is still shut out, if it is.
    fn shut_out(&self, client: IpAddr, now: Instant) -> Option<Duration> {
        let by_client = self.by_client.lock().expect("auth lock poisoned");
        let strikes = by_client.get(&client)?;
        let over = strikes.first + FAILURE_WINDOW;
        (strikes.count >= MAX_FAILURES && now < over).then(|| over - now)
    }

    fn record(&self, client: IpAddr, now: Instant) {
        let mut by_client = self.by_client.lock().expect("auth lock poisoned");
        if by_client.len() >= MAX_CLIENTS {
            by_client.retain(|_, s| now < s.first + FAILURE_WINDOW);
            if by_client.len() >= MAX_CLIENTS {
                by_client.clear();
            }
        }
        let strikes = by_client.entry(client).or_insert(Strikes {
            first: now,
            count: 0,
        });
        if now >= strikes.first + FAILURE_WINDOW {
            *strikes = Strikes {
                first: now,
                count: 0,
            };
        }
        strikes.count += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn every_rpc_of_the_proto_has_its_role() {
        let set = prost_types::FileDescriptorSet::decode(super::super::proto::FILE_DESCRIPTOR_SET)
            .unwrap();
        let mut served = vec![];
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                for method in service.method {
                    served.push(format!(
                        "/{package}.{}/{}",
                        service.name.clone().unwrap_or_default(),
                        method.name.unwrap_or_default()
                    ));
                }
            }
        }
        assert!(!served.is_empty());
        for method in &served {
            assert!(
                matches!(access(method), Some(Access::Role(_))),
                "{method} has no line in METHODS"
            );
        }
        assert_eq!(
            served.len(),
            METHODS.len(),
            "METHODS lists what the proto has not"
        );
    }

    #[test]
    fn health_and_reflection_are_open() {
        assert_eq!(access("/grpc.health.v1.Health/Check"), Some(Access::Open));
        assert_eq!(
            access("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Some(Access::Open)
        );
        assert_eq!(access("/restock.v1.RestockService/Nothing"), None);
    }

    #[test]
    fn a_client_is_shut_out_after_its_failures_until_the_window_is_over() {
        let attempts = FailedAttempts::default();
        let client: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        let start = Instant::now();
        for _ in 0..MAX_FAILURES {
            assert_eq!(attempts.shut_out(client, start), None);
            attempts.record(client, start);
        }
        assert_eq!(attempts.shut_out(client, start), Some(FAILURE_WINDOW));
        assert_eq!(attempts.shut_out(other, start), None, "per client");
        let later = start + FAILURE_WINDOW;
        assert_eq!(attempts.shut_out(client, later), None, "the window is over");
        attempts.record(client, later);
        assert_eq!(attempts.shut_out(client, later), None, "a fresh window");
    }
}
