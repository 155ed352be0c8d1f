//! Delivery to a webhook endpoint (G12): each notification is one signed Standard
//! Webhooks POST, and counts as sent only once the endpoint answered 2xx.
//!
//! How the pieces keep the guarantees, with an endpoint configured:
//!
//! - **Acknowledged before recorded (G5, G12).** The run starts requests in
//!   registration order, many at a time ([`pipeline`]), and keeps what it started in
//!   order. Only the contiguous prefix whose requests all answered 2xx is published to
//!   the bus and handed to the recorder, so `last_sent_user_id` is always the last user
//!   of that prefix, and a resume starts right after it. What was acknowledged beyond a
//!   failure is delivered again by the resume, under the same `webhook-id`.
//! - **Bounded (G10).** Requests started but not acknowledged count with the recorded
//!   backlog: never more than `RESTOCK_SEND_RATE` of the two together. That is a full
//!   second of requests in flight: an endpoint answering in 200 ms still gets the whole
//!   rate.
//! - **Rate (G2).** Every attempt, first or retry, takes a slot of the global limiter.
//! - **Sold out (G3) and claim (G8).** Before a group of requests starts, it passes the
//!   stock fence, which checks the run's claim and the confirmed stock and registers a
//!   pass for the product ([`crate::engine::stock::Admitted`]), as one step. The pass is
//!   dropped as soon as every request of the group is written to its connection. A
//!   stock write below the threshold caches its figure and then waits until no pass of the
//!   product is held: once it returns, every request admitted before is on the wire
//!   and every later admission sees 0. A pass in Redis expires after
//!   [`WebhookSettings::admission_ttl`] (an instance that died holding it must not
//!   block stock writes for long); a request that could not be written within
//!   [`WebhookSettings::send_deadline`], well inside that, is abandoned unsent and
//!   retried under a new pass, so no request ever starts on an expired pass.
//!   Acknowledged notifications are then published with the claim check only: they were
//!   sent, even if the product sold out meanwhile.
//! - **Failure (G4, G6).** Connection errors, timeouts, 408, 429 and 5xx are retried
//!   with exponential backoff and jitter, up to `RESTOCK_WEBHOOK_ATTEMPTS` attempts;
//!   any other answer is permanent. Either way the run stops starting requests, waits
//!   for those on the wire, records the acknowledged prefix and ends
//!   `CANCELED_BY_ERROR` with `last_error`, in the same write.
//! - **Retry-After.** A 429 or 503 with `Retry-After` pauses every request to the
//!   endpoint, from every instance, until it has passed ([`pause`]).
//!
//! The run's side of it is [`outbox`]: the limiter, the fence and the recorder around
//! the [`pipeline`] of requests.

pub mod client;
mod outbox;
pub mod pause;
pub mod pipeline;
pub mod sign;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng as _;
use secrecy::{ExposeSecret as _, SecretString};

use super::{Channel, Outbox};
use crate::config::WebhookConfig;
use crate::domain::{BackendError, NotificationId, ProductId};
use crate::engine::bus::RunKey;
use crate::engine::stock::AdmissionFence;
use crate::redact::SecretUrl;
pub use client::{Attempt, WebhookClient};
use pause::EndpointPause;
pub use sign::SigningKeys;

/// Delivery to a webhook endpoint: a notification is sent once the endpoint answered
/// 2xx (G12). Cheap to clone: each run's outbox holds one.
#[derive(Clone)]
pub struct WebhookChannel {
    client: Arc<WebhookClient>,
    /// Where a `Retry-After` of the endpoint is shared.
    pause: Arc<dyn EndpointPause>,
    /// Passes for requests about to start, and the publication of acknowledged ones
    /// (G3, G8).
    fence: Arc<dyn AdmissionFence>,
}

impl WebhookChannel {
    pub fn new(
        client: WebhookClient,
        pause: Arc<dyn EndpointPause>,
        fence: Arc<dyn AdmissionFence>,
    ) -> Self {
        let settings = client.settings();
        tracing::info!(
            url = %settings.shown_url(),
            timeout_ms = settings.timeout.as_millis() as u64,
            attempts = settings.attempts,
            backoff_ms = settings.backoff.as_millis() as u64,
            "delivering to a webhook: a notification counts as sent once it answered 2xx"
        );
        Self {
            client: Arc::new(client),
            pause,
            fence,
        }
    }
}

#[async_trait]
impl Channel for WebhookChannel {
    fn outbox(&self, run: RunKey) -> Box<dyn Outbox> {
        Box::new(outbox::WebhookOutbox::new(self.clone(), run))
    }

    /// Every request admitted before the figure was cached is on the wire before this
    /// returns (G3, G12).
    async fn drain_passes(&self, product: ProductId) -> Result<(), BackendError> {
        self.fence.wait_for_admissions(product).await
    }
}

/// The settings of webhook delivery, from `RESTOCK_WEBHOOK_*`.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub url: http::Uri,
    pub keys: SigningKeys,
    /// Per attempt, connection included (`RESTOCK_WEBHOOK_TIMEOUT`).
    pub timeout: Duration,
    /// Attempts per notification, the first included (`RESTOCK_WEBHOOK_ATTEMPTS`).
    pub attempts: u32,
    /// Delay before the first retry, doubled for every later one
    /// (`RESTOCK_WEBHOOK_BACKOFF`).
    pub backoff: Duration,
    /// The longest delay between two attempts of one notification: 60 s, as the
    /// Standard Webhooks senders cap theirs in their first minutes.
    pub max_backoff: Duration,
    /// The longest pause a `Retry-After` may ask for: 5 minutes. A run waits that long
    /// with its lease renewed; an endpoint that wants longer is better served by the
    /// run failing and an operator resuming it.
    pub max_retry_after: Duration,
    /// How long a pass through the stock fence lives in Redis if never dropped (G3):
    /// 2 s, so a stock write below the threshold waits at most that long for an instance that died
    /// holding one.
    pub admission_ttl: Duration,
    /// A request not written to its connection this long after its pass was asked for
    /// is abandoned unsent (and retried): 1 s, half the pass's life, so a request never
    /// starts on an expired pass whatever the round trip to Redis.
    pub send_deadline: Duration,
    /// A grant of the limiter is taken up within this long of arriving, its pass
    /// through the fence included, or not at all: `limiter::STAMP_ALLOWANCE`, what the
    /// limiter's window (`limiter::ENFORCED_WINDOW`) leaves for a send to start after
    /// a grant that may itself come `limiter::LATE_GRANT` late. A grant that
    /// waited while the run took answers in, or for a pass, would use that margin up and
    /// crowd a later second at the endpoint (G2, as the endpoint counts). The pass is
    /// asked for ahead of the grant, so it is usually there already.
    pub grant_tolerance: Duration,
    /// On shutdown, how long a run waits for the answers to requests already sent
    /// before it records what was acknowledged and hands itself over: 1 s, inside the
    /// 2 s hand-over (G8). The next owner sends the rest again under the same ids.
    pub shutdown_wait: Duration,
}

/// Why the webhook settings were refused; each names its setting.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("RESTOCK_WEBHOOK_URL {0} is not an http:// or https:// URL with a host")]
    Url(String),
    #[error("RESTOCK_WEBHOOK_SECRET is required with RESTOCK_WEBHOOK_URL")]
    NoSecret,
    #[error("RESTOCK_WEBHOOK_SECRET is set without RESTOCK_WEBHOOK_URL")]
    NoUrl,
    #[error("RESTOCK_WEBHOOK_SECRET {0}")]
    Secret(#[from] sign::SecretError),
}

impl WebhookSettings {
    /// The settings, if an endpoint is configured. A URL without a secret, a secret
    /// without a URL, a scheme other than http(s) or a malformed secret is refused.
    pub fn from_config(config: &WebhookConfig) -> Result<Option<Self>, SettingsError> {
        let (url, secret) = match (&config.url, &config.secret) {
            (None, None) => return Ok(None),
            (None, Some(_)) => return Err(SettingsError::NoUrl),
            (Some(_), None) => return Err(SettingsError::NoSecret),
            (Some(url), Some(secret)) => (url, secret),
        };
        Ok(Some(Self::new(url, secret, config)?))
    }

    fn new(
        url: &SecretUrl,
        secret: &SecretString,
        config: &WebhookConfig,
    ) -> Result<Self, SettingsError> {
        let refused = || SettingsError::Url(url.to_string());
        let uri: http::Uri = url.expose_secret().trim().parse().map_err(|_| refused())?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(refused());
        }
        Ok(Self {
            url: uri,
            keys: SigningKeys::parse(secret)?,
            timeout: config.timeout,
            attempts: config.attempts,
            backoff: config.backoff,
            max_backoff: Duration::from_secs(60),
            max_retry_after: Duration::from_secs(300),
            admission_ttl: Duration::from_secs(2),
            send_deadline: Duration::from_secs(1),
            grant_tolerance: crate::engine::limiter::STAMP_ALLOWANCE,
            shutdown_wait: Duration::from_secs(1),
        })
    }

    /// The endpoint, for logs: without credentials or query.
    pub fn shown_url(&self) -> String {
        crate::redact::webhook_url(&self.url.to_string())
    }

    /// The delay before attempt `next` (2 for the first retry): the backoff doubled for
    /// every retry before, capped, then spread by +-20% so that retries of many
    /// notifications failed together do not all come back in the same instant.
    pub fn retry_delay(&self, next: u32) -> Duration {
        let doublings = next.saturating_sub(2).min(MAX_DOUBLINGS);
        let base = self
            .backoff
            .saturating_mul(1 << doublings)
            .min(self.max_backoff);
        let jitter = rand::rng().random_range(JITTER);
        base.mul_f64(jitter).min(self.max_backoff)
    }
}

/// Doublings of the backoff counted at most: far past any cap, and `1 << 30` still fits
/// the multiplier.
const MAX_DOUBLINGS: u32 = 30;

/// The spread of a retry's delay, +-20%: retries of notifications that failed together
/// come back spread over a good part of the delay, and none much sooner than asked.
const JITTER: std::ops::Range<f64> = 0.8..1.2;

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: delivered.
    Delivered,
    /// Worth another attempt: a connection error, a timeout, 408, 429 or 5xx.
    Transient {
        why: Transient,
        /// A `Retry-After` that came with a 429 or 503.
        retry_after: Option<Duration>,
    },
    /// Any other answer: 3xx (not followed) and the other 4xx.
    Permanent { status: u16 },
}

/// What went wrong with an attempt worth repeating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transient {
    Status(u16),
    TimedOut,
    /// The connection could not be made or broke, or the request could not be written
    /// in time (see [`WebhookSettings::send_deadline`]).
    Unreachable,
}

impl Outcome {
    /// Classifies an answer's status (G12).
    pub fn of_status(status: u16, retry_after: Option<Duration>) -> Self {
        match status {
            200..=299 => Outcome::Delivered,
            408 | 429 | 500..=599 => Outcome::Transient {
                why: Transient::Status(status),
                retry_after: retry_after.filter(|_| matches!(status, 429 | 503)),
            },
            _ => Outcome::Permanent { status },
        }
    }
}

/// Why a run stopped delivering: what its `last_error` says (G12). Made of fixed words,
/// a status and a notification id: never a secret, never a response body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// An answer that is not retried.
    #[error("webhook answered {status} to {id}, which is not retried")]
    Refused { status: u16, id: NotificationId },
    /// Every attempt failed.
    #[error("webhook {last} {id} after {attempts} attempts")]
    Exhausted {
        last: LastTransient,
        id: NotificationId,
        attempts: u32,
    },
}

/// The last transient failure of an exhausted notification, worded for `last_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastTransient(pub Transient);

impl fmt::Display for LastTransient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Transient::Status(status) => write!(f, "answered {status} to"),
            Transient::TimedOut => f.write_str("timed out on"),
            Transient::Unreachable => f.write_str("could not be reached for"),
        }
    }
}

/// Parses `Retry-After`: a number of seconds, or an HTTP date.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ProductId, UserId};

    #[test]
    fn answers_are_classified_as_the_readme_says() {
        assert_eq!(Outcome::of_status(204, None), Outcome::Delivered);
        for status in [408, 429, 500, 502, 503, 599] {
            assert!(matches!(
                Outcome::of_status(status, None),
                Outcome::Transient { .. }
            ));
        }
        for status in [301, 302, 304, 400, 401, 404, 410, 422] {
            assert_eq!(
                Outcome::of_status(status, None),
                Outcome::Permanent { status }
            );
        }
        let after = Some(Duration::from_secs(3));
        let Outcome::Transient { retry_after, .. } = Outcome::of_status(500, after) else {
            panic!("500 is transient");
        };
        assert_eq!(retry_after, None, "only 429 and 503 carry a pause");
    }

    #[test]
    fn retry_after_is_seconds_or_a_date() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn last_errors_read_as_the_readme_says() {
        let id = NotificationId {
            product_id: ProductId::from_stored(42),
            restock_round: 1,
            user_id: UserId::from_stored(7),
        };
        let failure = Failure::Exhausted {
            last: LastTransient(Transient::Status(500)),
            id,
            attempts: 6,
        };
        assert_eq!(
            failure.to_string(),
            "webhook answered 500 to 42-1-7 after 6 attempts"
        );
    }
}
