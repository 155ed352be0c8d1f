//! Settings of the service: every one is a command-line flag and an environment
//! variable (README, "Settings").

use std::convert::Infallible;
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::{Arg, Command, Parser, ValueEnum};
use secrecy::SecretString;

use crate::callers::TrustedProxies;
use crate::redact::SecretUrl;

/// The URLs and the admin token are secret types, so `Debug` never shows a password or
/// the token; `hide_env_values` keeps them out of `--help`.
#[derive(Debug, Clone, Parser)]
#[command(name = "restock-notifier", version, about)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "RESTOCK_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,

    /// The database: `mysql://user:pass@host:port/db` for production, or
    /// `sqlite://path` for an embedded file (the default, `restock.db` in the working
    /// directory). Created if it does not exist, and migrated at start.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite://restock.db",
        hide_env_values = true,
        value_parser = connection_url
    )]
    pub database_url: SecretUrl,

    /// Connections to the database, at most (1 to 1000): MySQL's pool, or SQLite's
    /// read-only connections (its writer is always one). Unset, four per core (16 to
    /// 64) on MySQL and one per core (4 to 16) on SQLite.
    #[arg(
        long,
        env = "RESTOCK_DB_POOL_SIZE",
        value_parser = DB_POOL_SIZE
    )]
    pub db_pool_size: Option<NonZeroU32>,

    /// Redis (`redis://host:port`, or `rediss://` for TLS) for the stock cache. Without
    /// it, the stock cache, send limiter and notification bus live in this process: run a
    /// single instance.
    #[arg(
        long,
        env = "REDIS_URL",
        hide_env_values = true,
        value_parser = connection_url
    )]
    pub redis_url: Option<SecretUrl>,

    /// Prefix of every Redis key and channel, so deployments can share one Redis (no
    /// braces: keys carry a hash tag of their own for Redis Cluster).
    #[arg(
        long,
        env = "RESTOCK_REDIS_PREFIX",
        default_value = "restock:",
        value_parser = redis_prefix
    )]
    pub redis_prefix: String,

    /// Notifications sent per second, at most, in any one-second window (1 to 1000000).
    #[arg(
        long,
        env = "RESTOCK_SEND_RATE",
        default_value = "500",
        value_parser = SEND_RATE
    )]
    pub send_rate: NonZeroU32,

    /// API requests per second per caller (per client address for a call without
    /// credentials), the burst the same (1 to 1000000).
    #[arg(
        long,
        env = "RESTOCK_API_RATE",
        default_value = "500",
        value_parser = API_RATE
    )]
    pub api_rate: NonZeroU32,

    /// Bearer token of the admin service. Without it, one is generated at start and
    /// logged once.
    #[arg(long, env = "RESTOCK_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<SecretString>,

    /// TOML file of the callers: their names, client certificate identities, SHA-256s
    /// of bearer tokens, and roles (read, write, admin). Without it the API is open,
    /// and admin calls need the admin token. Read again on SIGHUP.
    #[arg(long, env = "RESTOCK_CALLERS")]
    pub callers: Option<PathBuf>,

    /// Proxies whose `x-forwarded-for` is believed for the client's address, comma
    /// separated: addresses or networks (`10.0.0.0/8`). Empty: none.
    #[arg(
        long,
        env = "RESTOCK_TRUSTED_PROXIES",
        default_value = "",
        value_parser = trusted_proxies
    )]
    pub trusted_proxies: TrustedProxies,

    /// How long a run's owner may go without renewing its lease before another instance
    /// takes the run over (G8): a number and a unit, `ms`, `s` or `m` (500ms to 10m).
    #[arg(
        long,
        env = "RESTOCK_RUN_LEASE",
        default_value = "10s",
        value_parser = RUN_LEASE
    )]
    pub run_lease: Duration,

    /// OTLP/gRPC endpoint of an OpenTelemetry collector (`http://collector:4317`):
    /// traces are exported there. Unset: no exporter, and nothing paid for tracing.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otel_endpoint: Option<String>,

    /// The service's name in exported traces.
    #[arg(long, env = "OTEL_SERVICE_NAME", default_value = "restock-notifier")]
    pub otel_service_name: String,

    /// Per-user history of rounds that ended longer ago than this is deleted by a
    /// background sweep (runs are kept): a number and a unit, `h`, `d` or `y` (365
    /// days), from 1h to 10y. Unset: history is kept for ever.
    #[arg(long, env = "RESTOCK_HISTORY_RETENTION", value_parser = HISTORY_RETENTION)]
    pub history_retention: Option<Duration>,

    /// On SIGTERM, how long health says NOT_SERVING while calls are still served,
    /// before the listener closes and streams end: time for load balancers that poll
    /// health to stop sending calls here (`0s` to `60s`; adds to the hand-over time).
    #[arg(
        long,
        env = "RESTOCK_SHUTDOWN_DRAIN",
        default_value = "0s",
        value_parser = SHUTDOWN_DRAIN
    )]
    pub shutdown_drain: Duration,

    /// Address of the Prometheus endpoint, `GET /metrics` over plain HTTP; `off`
    /// turns it off.
    #[arg(
        long,
        env = "RESTOCK_METRICS_LISTEN",
        default_value = "0.0.0.0:9464",
        value_parser = parse_metrics_listen
    )]
    pub metrics_listen: MetricsListen,
    /// PEM file of the server's certificate chain. With RESTOCK_TLS_KEY, gRPC is served
    /// over TLS only; set both or neither.
    #[arg(long, env = "RESTOCK_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM file of the private key of RESTOCK_TLS_CERT.
    #[arg(long, env = "RESTOCK_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// PEM file of the CA certificates client certificates must chain to: with it, a
    /// client must present one (mutual TLS), and its identity names its caller in
    /// RESTOCK_CALLERS. Needs RESTOCK_TLS_CERT.
    #[arg(long, env = "RESTOCK_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    /// Delivery to a webhook endpoint: RESTOCK_WEBHOOK_*.
    #[command(flatten)]
    pub webhook: WebhookConfig,

    /// The operator console, a web page at `/` on the gRPC address that talks to the
    /// service over gRPC-web: `on` or `off` (no page; gRPC-web calls are still served).
    #[arg(long, env = "RESTOCK_CONSOLE", default_value = "on")]
    pub console: Switch,

    /// Other origins whose pages may call the API over gRPC-web (CORS), separated by
    /// commas: `https://ops.example.com,http://localhost:5173`. The console itself is
    /// same-origin and needs none.
    #[arg(long, env = "RESTOCK_CORS_ORIGINS", value_parser = parse_cors_origins)]
    pub cors_origins: Option<CorsOrigins>,

    /// Log filter, in `tracing_subscriber::EnvFilter` syntax.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log: String,

    /// Log format: human-readable text, or one JSON object per line.
    #[arg(long, env = "RESTOCK_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

/// The webhook's settings (RESTOCK_WEBHOOK_*), checked together at start by the
/// webhook's own settings.
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookConfig {
    /// Webhook endpoint (`http://` or `https://`) that receives every notification as a
    /// signed Standard Webhooks POST; a notification counts as sent only once it
    /// answered 2xx (G12). Without it, notifications go to `Subscribe` streams only.
    /// Credentials and the query string are kept out of logs.
    #[arg(
        long = "webhook-url",
        env = "RESTOCK_WEBHOOK_URL",
        hide_env_values = true,
        value_parser = endpoint_url
    )]
    pub url: Option<SecretUrl>,

    /// Signing secrets of the webhook, required with RESTOCK_WEBHOOK_URL: one or more
    /// `whsec_<base64 of 24 to 64 bytes>`, separated by spaces; every request is signed
    /// with each (so a receiver can rotate its secret). Parsed at start, not here, so
    /// that a malformed one is never echoed in a message.
    #[arg(
        long = "webhook-secret",
        env = "RESTOCK_WEBHOOK_SECRET",
        hide_env_values = true
    )]
    pub secret: Option<SecretString>,

    /// How long one webhook request may take, connection included (100ms to 60s).
    #[arg(
        long = "webhook-timeout",
        env = "RESTOCK_WEBHOOK_TIMEOUT",
        default_value = "10s",
        value_parser = WEBHOOK_TIMEOUT
    )]
    pub timeout: Duration,

    /// Attempts per notification, the first included, before the run ends
    /// CANCELED_BY_ERROR (1 to 20).
    #[arg(
        long = "webhook-attempts",
        env = "RESTOCK_WEBHOOK_ATTEMPTS",
        default_value = "6",
        value_parser = WEBHOOK_ATTEMPTS
    )]
    pub attempts: u32,

    /// Delay before the first retry of a webhook request; it doubles with every retry,
    /// up to 60 s, with jitter (10ms to 60s).
    #[arg(
        long = "webhook-backoff",
        env = "RESTOCK_WEBHOOK_BACKOFF",
        default_value = "1s",
        value_parser = WEBHOOK_BACKOFF
    )]
    pub backoff: Duration,
}

/// A key prefix without braces: a `{` in it would make Redis Cluster hash the prefix
/// instead of the product's partition, and put keys a script needs together in
/// different slots.
fn redis_prefix(raw: &str) -> Result<String, String> {
    if raw.contains(['{', '}']) {
        return Err(
            "RESTOCK_REDIS_PREFIX must not contain { or }: keys carry a hash tag of their own \
             (for Redis Cluster); use letters, digits, `:` or `-`"
                .to_string(),
        );
    }
    Ok(raw.to_string())
}

fn trusted_proxies(raw: &str) -> Result<TrustedProxies, String> {
    TrustedProxies::parse(raw)
}

/// Reads DATABASE_URL and REDIS_URL; whether they are usable is checked where they are
/// used, with a message naming the setting.
fn connection_url(raw: &str) -> Result<SecretUrl, Infallible> {
    Ok(SecretUrl::connection(raw))
}

/// Reads RESTOCK_WEBHOOK_URL; checked by the webhook's settings.
fn endpoint_url(raw: &str) -> Result<SecretUrl, Infallible> {
    Ok(SecretUrl::endpoint(raw))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A feature turned `on` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

/// Origins allowed to call the API from a browser, each `scheme://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorsOrigins(pub Vec<http::HeaderValue>);

/// Parses `RESTOCK_CORS_ORIGINS`. An origin is compared byte for byte with the one a
/// browser sends, so anything but `scheme://host[:port]` (a path, a trailing slash, a
/// wildcard) could never match and is refused here instead.
fn parse_cors_origins(raw: &str) -> Result<CorsOrigins, String> {
    let mut origins = Vec::new();
    for origin in raw.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        let shown: String = origin.chars().take(64).collect();
        let refused = || {
            format!(
                "RESTOCK_CORS_ORIGINS: {shown:?} is not an origin; write each like \
                 https://ops.example.com or http://localhost:5173, separated by commas"
            )
        };
        let url = url::Url::parse(origin).map_err(|_| refused())?;
        let bare = matches!(url.scheme(), "http" | "https")
            && url.host_str().is_some()
            && url.username().is_empty()
            && url.password().is_none()
            && url.query().is_none()
            && url.fragment().is_none()
            && !origin.ends_with('/');
        if !bare || url.origin().ascii_serialization() != origin {
            return Err(refused());
        }
        origins.push(http::HeaderValue::from_str(origin).map_err(|_| refused())?);
    }
    if origins.is_empty() {
        return Err(
            "RESTOCK_CORS_ORIGINS is empty; unset it, or list origins like \
                    https://ops.example.com separated by commas"
                .into(),
        );
    }
    Ok(CorsOrigins(origins))
}

/// Where `/metrics` is served, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsListen {
    Off,
    On(SocketAddr),
}

/// Parses `RESTOCK_METRICS_LISTEN`: an address, or `off`.
fn parse_metrics_listen(raw: &str) -> Result<MetricsListen, String> {
    if raw.trim().eq_ignore_ascii_case("off") {
        return Ok(MetricsListen::Off);
    }
    raw.trim()
        .parse()
        .map(MetricsListen::On)
        .map_err(|_| "expected an address like 0.0.0.0:9464, or off".to_string())
}

/// RESTOCK_SEND_RATE: up to a million a second, which no database records (so the
/// engine can be run at its ceiling, the database's speed); the limiters space slots a
/// microsecond apart there, within what they count.
const SEND_RATE: Within<NonZeroU32> = Within::whole(1, 1_000_000);

/// RESTOCK_API_RATE: the limiter spaces requests `1s / rate` apart; a million a second
/// keeps that a whole microsecond, well within what the limiter can count.
const API_RATE: Within<NonZeroU32> = Within::whole(1, 1_000_000);

/// RESTOCK_DB_POOL_SIZE: above 1000, a pool would hold more connections than a database
/// server accepts by default from all its clients together.
const DB_POOL_SIZE: Within<NonZeroU32> = Within::whole(1, 1_000);

/// RESTOCK_WEBHOOK_ATTEMPTS: 1 (no retry) to 20 (with the 60 s cap, about a quarter of
/// an hour of retrying).
const WEBHOOK_ATTEMPTS: Within<u32> = Within { min: 1, max: 20 };

/// RESTOCK_RUN_LEASE: `10s`, `1500ms`, `2m`, from 500ms to 10m (G8).
const RUN_LEASE: Within<Duration> = Within {
    min: Duration::from_millis(500),
    max: Duration::from_secs(600),
};

/// RESTOCK_HISTORY_RETENTION: `90d`, `12h`, `2y`, from 1h to 10y.
const HISTORY_RETENTION: Within<Duration> = Within {
    min: Duration::from_secs(3_600),
    max: Duration::from_secs(10 * 365 * 86_400),
};

/// RESTOCK_SHUTDOWN_DRAIN: `0s` to `60s`.
const SHUTDOWN_DRAIN: Within<Duration> = Within {
    min: Duration::ZERO,
    max: Duration::from_secs(60),
};

/// RESTOCK_WEBHOOK_TIMEOUT: below 100 ms a TLS handshake alone may not fit; above a
/// minute, a stalled endpoint would hold a run longer than any lease.
const WEBHOOK_TIMEOUT: Within<Duration> = Within {
    min: Duration::from_millis(100),
    max: Duration::from_secs(60),
};

/// RESTOCK_WEBHOOK_BACKOFF: the first retry's delay, 10ms to 60s.
const WEBHOOK_BACKOFF: Within<Duration> = Within {
    min: Duration::from_millis(10),
    max: Duration::from_secs(60),
};

/// The range of a number or duration setting, and its value parser: a bad value stops
/// the service at start with a message that names the setting by its environment
/// variable, read from the argument itself (clap names only the flag).
#[derive(Debug, Clone, Copy)]
struct Within<T> {
    min: T,
    max: T,
}

impl Within<NonZeroU32> {
    /// A whole number from `min` (at least 1) to `max`.
    const fn whole(min: u32, max: u32) -> Self {
        match (NonZeroU32::new(min), NonZeroU32::new(max)) {
            (Some(min), Some(max)) => Self { min, max },
            _ => panic!("a count's range starts at 1"),
        }
    }
}

/// What a setting's value is: how it is read, and what a message says of it.
trait Ranged: Copy + PartialOrd + Send + Sync + 'static {
    /// Reads `raw` within `range`; the message names `setting`.
    fn read(setting: &str, raw: &str, range: Within<Self>) -> Result<Self, String>;
}

impl Ranged for u32 {
    fn read(setting: &str, raw: &str, range: Within<Self>) -> Result<Self, String> {
        read_whole(setting, raw, range)
    }
}

impl Ranged for NonZeroU32 {
    fn read(setting: &str, raw: &str, range: Within<Self>) -> Result<Self, String> {
        read_whole(setting, raw, range)
    }
}

/// A whole number within `range`; anything else, not a number included, gets the one
/// message that says the range.
fn read_whole<T>(setting: &str, raw: &str, Within { min, max }: Within<T>) -> Result<T, String>
where
    T: Ranged + std::str::FromStr + std::fmt::Display,
{
    raw.trim()
        .parse::<T>()
        .ok()
        .filter(|value| (min..=max).contains(value))
        .ok_or_else(|| format!("{setting} must be a whole number from {min} to {max}"))
}

impl Ranged for Duration {
    /// A whole number and a unit (`ms`, `s`, `m`).
    fn read(setting: &str, raw: &str, Within { min, max }: Within<Self>) -> Result<Self, String> {
        let raw = raw.trim();
        let refuse = |problem: String| format!("{setting}: {problem}");
        let split = raw.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| {
            refuse(format!(
                "{raw:?} has no unit; write it like 10s, 1500ms or 2m"
            ))
        })?;
        let (number, unit) = raw.split_at(split);
        let number: u64 = number
            .parse()
            .map_err(|_| refuse(format!("{raw:?} does not start with a whole number")))?;
        let duration = match unit {
            "ms" => Duration::from_millis(number),
            "s" => Duration::from_secs(number),
            "m" => Duration::from_secs(number.saturating_mul(60)),
            "h" => Duration::from_secs(number.saturating_mul(3_600)),
            "d" => Duration::from_secs(number.saturating_mul(86_400)),
            "y" => Duration::from_secs(number.saturating_mul(365 * 86_400)),
            _ => {
                return Err(refuse(format!(
                    "unknown unit {unit:?}; use ms, s, m, h, d or y"
                )));
            }
        };
        if !(min..=max).contains(&duration) {
            let (min, max) = (written(min), written(max));
            return Err(refuse(format!("{raw} is out of range: {min} to {max}")));
        }
        Ok(duration)
    }
}

/// A range's end as the settings are written: milliseconds below a whole second,
/// minutes above a whole minute, seconds otherwise.
fn written(duration: Duration) -> String {
    let millis = duration.as_millis();
    let secs = duration.as_secs();
    if millis >= 86_400_000 && millis.is_multiple_of(86_400_000) {
        return match secs / 86_400 {
            days if days.is_multiple_of(365) => format!("{}y", days / 365),
            days => format!("{days}d"),
        };
    }
    if millis >= 3_600_000 && millis.is_multiple_of(3_600_000) {
        return format!("{}h", secs / 3_600);
    }
    if !millis.is_multiple_of(1_000) {
        format!("{millis}ms")
    } else if millis > 60_000 && millis.is_multiple_of(60_000) {
        format!("{}m", millis / 60_000)
    } else {
        format!("{}s", millis / 1_000)
    }
}

impl<T: Ranged> TypedValueParser for Within<T> {
    type Value = T;

    fn parse_ref(&self, cmd: &Command, arg: Option<&Arg>, value: &OsStr) -> Result<T, clap::Error> {
        let setting = arg
            .and_then(Arg::get_env)
            .map(|env| env.to_string_lossy().into_owned())
            .unwrap_or_default();
        let range = *self;
        // A plain function parser, so that clap words its error as for every other
        // setting ("invalid value ... for '--flag'", then this message).
        (move |raw: &str| T::read(&setting, raw, range)).parse_ref(cmd, arg, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_listen_is_an_address_or_off() {
        assert_eq!(parse_metrics_listen("off"), Ok(MetricsListen::Off));
        assert_eq!(
            parse_metrics_listen("127.0.0.1:9464"),
            Ok(MetricsListen::On("127.0.0.1:9464".parse().unwrap()))
        );
        assert!(parse_metrics_listen("9464").is_err());
    }

    /// The settings with `--flag=raw` and every other one left to its default, or
    /// clap's message.
    fn with(flag: &str, raw: &str) -> Result<Config, String> {
        Config::try_parse_from(["restock-notifier", &format!("--{flag}={raw}")])
            .map_err(|e| e.to_string())
    }

    fn accepted(flag: &str, raw: &str) -> Config {
        with(flag, raw).unwrap_or_else(|e| panic!("--{flag}={raw}: {e}"))
    }

    /// Checks that every value of `bad` stops the start with a message naming `setting`.
    fn refused(flag: &str, setting: &str, bad: &[&str]) {
        for raw in bad {
            match with(flag, raw) {
                Ok(_) => panic!("--{flag}={raw} was accepted"),
                Err(e) => assert!(e.contains(setting), "--{flag}={raw}: {e}"),
            }
        }
    }

    #[test]
    fn counts_parse_within_their_range_and_name_the_setting_otherwise() {
        assert_eq!(accepted("send-rate", "500").send_rate.get(), 500);
        assert_eq!(accepted("send-rate", "1000000").send_rate.get(), 1_000_000);
        assert_eq!(accepted("api-rate", "1000000").api_rate.get(), 1_000_000);
        let pool = |raw| {
            accepted("db-pool-size", raw)
                .db_pool_size
                .map(NonZeroU32::get)
        };
        assert_eq!((pool("1"), pool("1000")), (Some(1), Some(1_000)));
        assert_eq!(accepted("webhook-attempts", "20").webhook.attempts, 20);
        let bad_rates = ["0", "-1", "1000001", "2000000000", "1.5", "", "many"];
        refused("send-rate", "RESTOCK_SEND_RATE", &bad_rates);
        let bad_api_rates = ["0", "1000001", "2000000000", "99999999999"];
        refused("api-rate", "RESTOCK_API_RATE", &bad_api_rates);
        let bad_pools = ["0", "-1", "1001", "ten", ""];
        refused("db-pool-size", "RESTOCK_DB_POOL_SIZE", &bad_pools);
        let bad_attempts = ["0", "21", "-1", "six"];
        refused(
            "webhook-attempts",
            "RESTOCK_WEBHOOK_ATTEMPTS",
            &bad_attempts,
        );
        let err = with("send-rate", "0").unwrap_err();
        assert!(
            err.contains("RESTOCK_SEND_RATE must be a whole number from 1 to 1000000"),
            "{err}"
        );
    }

    #[test]
    fn cors_origins_are_bare_origins_separated_by_commas() {
        let parsed = parse_cors_origins("https://ops.example.com, http://localhost:5173").unwrap();
        assert_eq!(
            parsed.0,
            ["https://ops.example.com", "http://localhost:5173"]
                .map(http::HeaderValue::from_static)
        );
        for bad in [
            "",
            " , ",
            "*",
            "ops.example.com",
            "https://ops.example.com/",
            "https://ops.example.com/console",
            "ftp://ops.example.com",
            "https://user@ops.example.com",
            "https://OPS.example.com",
        ] {
            let err = parse_cors_origins(bad).unwrap_err();
            assert!(err.contains("RESTOCK_CORS_ORIGINS"), "{bad}: {err}");
        }
    }

    #[test]
    fn durations_parse_with_units_within_their_range_and_name_the_setting_otherwise() {
        let lease = |raw| accepted("run-lease", raw).run_lease;
        assert_eq!(lease("10s"), Duration::from_secs(10));
        assert_eq!(lease("1500ms"), Duration::from_millis(1_500));
        assert_eq!(lease("2m"), Duration::from_secs(120));
        let drain = |raw| accepted("shutdown-drain", raw).shutdown_drain;
        assert_eq!(drain("0s"), Duration::ZERO);
        assert_eq!(drain("1500ms"), Duration::from_millis(1_500));
        let timeout = accepted("webhook-timeout", "100ms").webhook.timeout;
        assert_eq!(timeout, Duration::from_millis(100));
        let backoff = accepted("webhook-backoff", "10ms").webhook.backoff;
        assert_eq!(backoff, Duration::from_millis(10));
        let bad_leases = [
            "10",
            "s",
            "-1s",
            "10h",
            "100ms",
            "11m",
            "99999999999999999999s",
        ];
        refused("run-lease", "RESTOCK_RUN_LEASE", &bad_leases);
        let bad_retentions = ["59m", "3599s", "11y", "3651d", "90", "-1d", "1w"];
        refused(
            "history-retention",
            "RESTOCK_HISTORY_RETENTION",
            &bad_retentions,
        );
        for (raw, secs) in [("1h", 3_600), ("90d", 90 * 86_400), ("10y", 3_650 * 86_400)] {
            assert_eq!(
                accepted("history-retention", raw).history_retention,
                Some(Duration::from_secs(secs))
            );
        }
        refused(
            "shutdown-drain",
            "RESTOCK_SHUTDOWN_DRAIN",
            &["61s", "2m", "5", "-1s"],
        );
        let bad_timeouts = ["99ms", "61s", "2m", "10"];
        refused("webhook-timeout", "RESTOCK_WEBHOOK_TIMEOUT", &bad_timeouts);
        refused(
            "webhook-backoff",
            "RESTOCK_WEBHOOK_BACKOFF",
            &["9ms", "61s"],
        );
        // Each range is said as the settings are written.
        for (flag, raw, said) in [
            ("run-lease", "11m", "11m is out of range: 500ms to 10m"),
            ("shutdown-drain", "61s", "61s is out of range: 0s to 60s"),
            (
                "webhook-timeout",
                "99ms",
                "99ms is out of range: 100ms to 60s",
            ),
            ("webhook-backoff", "9ms", "9ms is out of range: 10ms to 60s"),
        ] {
            let err = with(flag, raw).unwrap_err();
            assert!(err.contains(said), "--{flag}={raw}: {err}");
        }
    }
}
