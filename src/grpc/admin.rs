//! `restock.v1.RestockAdminService`: operator calls, behind a bearer token.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq as _;
use tonic::service::Interceptor;
use tonic::{Request, Response, Status};

use super::proto::{self, restock_admin_service_server::RestockAdminService};
use crate::domain::ProductId;
use crate::engine::Engine;

/// The admin service; every call passes [`AdminAuth`] first (see `startup`).
pub struct AdminApi {
    engine: Arc<Engine>,
}

impl AdminApi {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

#[tonic::async_trait]
impl RestockAdminService for AdminApi {
    async fn manual_restock(
        &self,
        request: Request<proto::ManualRestockRequest>,
    ) -> Result<Response<proto::RestockRun>, Status> {
        let product = ProductId::parse(request.into_inner().product_id)?;
        let run = self.engine.manual_restock(product).await?;
        Ok(Response::new(run.into()))
    }
}

/// Checks `authorization: Bearer <token>` on every admin call, as an interceptor: before
/// the request is even decoded, so that nothing about the service is revealed without
/// the token. A client that keeps sending wrong tokens is shut out for a while, so a
/// weak token cannot be guessed at the API rate.
#[derive(Clone)]
pub struct AdminAuth {
    expected: Arc<str>,
    failures: Arc<FailedAttempts>,
}

impl AdminAuth {
    pub fn new(token: &str) -> Self {
        Self {
            expected: format!("Bearer {token}").into(),
            failures: Arc::new(FailedAttempts::default()),
        }
    }
}

/// Wrong or missing tokens a client IP may send within [`FAILURE_WINDOW`]; past that,
/// every admin call from it is refused until the window is over, a right token too, so
/// the answers tell a guesser nothing. Ten: an operator who mistypes is not locked out.
const MAX_FAILURES: u32 = 10;

/// How long a client's failures count, from its first one.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Clients remembered at most; beyond it, those whose window is over are forgotten
/// first (and, under a flood from many addresses, all of them).
const MAX_CLIENTS: usize = 10_000;

/// Failed admin authentications per client IP.
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

impl Interceptor for AdminAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let client = super::peer_addr(request.extensions()).map(|a| a.ip());
        let now = Instant::now();
        if let Some(left) = client.and_then(|c| self.failures.shut_out(c, now)) {
            return Err(Status::resource_exhausted(format!(
                "too many admin calls with a wrong or missing token from this address; \
                 retry in {}s with `authorization: Bearer <RESTOCK_ADMIN_TOKEN>`",
                left.as_secs().max(1)
            )));
        }
        let refused = match request.metadata().get("authorization") {
            None => "admin calls need metadata `authorization: Bearer <RESTOCK_ADMIN_TOKEN>`",
            // In constant time: where the first difference is does not show in the
            // response time, so the token cannot be guessed byte by byte.
            Some(value) if bool::from(value.as_bytes().ct_eq(self.expected.as_bytes())) => {
                return Ok(request);
            }
            Some(_) => {
                "the admin token is wrong; send `authorization: Bearer <RESTOCK_ADMIN_TOKEN>`"
            }
        };
        if let Some(client) = client {
            self.failures.record(client, now);
        }
        Err(Status::unauthenticated(refused))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
