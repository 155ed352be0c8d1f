//! The API rate limit: tower_governor keyed on the caller when the authorization layer
//! knows it, else on the client's address (behind a trusted proxy, the one it forwarded
//! for), answering over-limit calls with gRPC `RESOURCE_EXHAUSTED` (never an HTTP 429).
//! It wraps the restock services only; health checks are never limited.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use tonic::body::Body;

use crate::callers::{CallerOf, ClientAddr};
use tonic::server::NamedService;
use tonic::service::{LayerExt as _, Layered};

use tower_governor::GovernorError;
use tower_governor::governor::{GovernorConfig, GovernorConfigBuilder};
use tower_governor::key_extractor::KeyExtractor;

/// Whose budget a call spends.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Client {
    /// A caller the authorization layer knows: its budget, wherever it calls from
    /// (two callers behind one sidecar have one each).
    Caller(Arc<str>),
    /// A call without credentials: its client's address.
    Address(IpAddr),
}

/// Keys requests on what the authorization layer recorded, else on the peer address
/// that tonic records. (tower_governor's own `PeerIpKeyExtractor` looks for axum's
/// connect info, which tonic does not set.)
#[derive(Debug, Clone, Copy)]
pub struct ClientIp;

impl KeyExtractor for ClientIp {
    type Key = Client;

    fn extract<T>(&self, req: &http::Request<T>) -> Result<Self::Key, GovernorError> {
        let extensions = req.extensions();
        if let Some(CallerOf(Some(caller))) = extensions.get::<CallerOf>() {
            return Ok(Client::Caller(caller.name.as_str().into()));
        }
        if let Some(ClientAddr(addr)) = extensions.get::<ClientAddr>() {
            return Ok(Client::Address(*addr));
        }
        super::peer_addr(extensions)
            .map(|addr| Client::Address(addr.ip()))
            .ok_or(GovernorError::UnableToExtractKey)
    }
}

type Governed<S> = tower_governor::governor::Governor<
    ClientIp,
    governor::middleware::NoOpMiddleware<governor::clock::QuantaInstant>,
    S,
    Body,
>;

/// Builds the limit: `rate` requests per second per client IP, with a burst of `rate`.
pub struct ApiRateLimit {
    config: Arc<GovernorConfig<ClientIp, governor::middleware::NoOpMiddleware>>,
    rate: u32,
}

impl ApiRateLimit {
    pub fn new(rate: NonZeroU32) -> Self {
        // The governor refuses a zero period, and `1s / rate` rounds down to zero above
        // a billion a second: never let it go below a nanosecond.
        let period = Duration::from_nanos((1_000_000_000 / u64::from(rate.get())).max(1));
        let config = GovernorConfigBuilder::default()
            .key_extractor(ClientIp)
            .period(period)
            .burst_size(rate.get())
            .finish()
            .expect("a non-zero period and burst give a valid governor config");
        Self {
            config: Arc::new(config),
            rate: rate.get(),
        }
    }

    /// Wraps a generated service, keeping its gRPC name so the router can mount it.
    pub fn wrap<S>(&self, service: S) -> Layered<Governed<S>, S>
    where
        S: NamedService,
    {
        let rate = self.rate;
        let layer = tower_governor::GovernorLayer::new(self.config.clone()).error_handler(
            move |err: GovernorError| {
                let status = match err {
                    GovernorError::TooManyRequests { wait_time, .. } => {
                        tonic::Status::resource_exhausted(format!(
                            "API rate limit of {rate} requests per second per caller exceeded; \
                             retry in {}s",
                            wait_time.max(1)
                        ))
                    }
                    GovernorError::UnableToExtractKey => tonic::Status::internal(
                        "cannot tell the client's address to apply the API rate limit",
                    ),
                    GovernorError::Other { msg, .. } => {
                        tonic::Status::internal(msg.unwrap_or_default())
                    }
                };
                status.into_http()
            },
        );
        layer.named_layer(service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_non_zero_rate_builds_a_limit() {
        for rate in [1, 3, 500, 1_000_000, 1_000_000_001, 2_000_000_000, u32::MAX] {
            let limit = ApiRateLimit::new(NonZeroU32::new(rate).unwrap());
            assert_eq!(limit.rate, rate);
        }
    }
}
