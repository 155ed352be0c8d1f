//! Settings of the service: every one is a command-line flag and an environment
//! variable (README, "Settings").

use std::convert::Infallible;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use secrecy::SecretString;

use crate::redact::SecretUrl;

/// The URLs and the admin token are secret types, so `Debug` never shows a password or
/// the token; `hide_env_values` keeps them out of `--help`.
#[derive(Debug, Clone, Parser)]
#[command(name = "restock-notifier", version, about)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(
        long = "listen",
        env = "RESTOCK_LISTEN",
        default_value = "0.0.0.0:50051"
    )]
    pub listen: SocketAddr,

    /// The database: `mysql://user:pass@host:port/db` for production, or
    /// `sqlite://path` for an embedded file (the default, `restock.db` in the working
    /// directory). Created if it does not exist, and migrated at start.
    #[arg(
        long = "database-url",
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
        long = "db-pool-size",
        env = "RESTOCK_DB_POOL_SIZE",
        value_parser = parse_db_pool_size
    )]
    pub db_pool_size: Option<NonZeroU32>,

    /// Redis (`redis://host:port`, or `rediss://` for TLS) for the stock cache. Without
    /// it, the stock cache, send limiter and notification bus live in this process: run a
    /// single instance.
    #[arg(
        long = "redis-url",
        env = "REDIS_URL",
        hide_env_values = true,
        value_parser = connection_url
    )]
    pub redis_url: Option<SecretUrl>,

    /// Prefix of every Redis key and channel, so deployments can share one Redis.
    #[arg(
        long = "redis-prefix",
        env = "RESTOCK_REDIS_PREFIX",
        default_value = "restock:"
    )]
    pub redis_prefix: String,

    /// Notifications sent per second, at most, in any one-second window (1 to 100000).
    #[arg(
        long = "send-rate",
        env = "RESTOCK_SEND_RATE",
        default_value = "500",
        value_parser = parse_send_rate
    )]
    pub send_rate: NonZeroU32,

    /// API requests per second per client IP, the burst the same (1 to 1000000).
    #[arg(
        long = "api-rate",
        env = "RESTOCK_API_RATE",
        default_value = "500",
        value_parser = parse_api_rate
    )]
    pub api_rate: NonZeroU32,

    /// Bearer token of the admin service. Without it, one is generated at start and
    /// logged once.
    #[arg(
        long = "admin-token",
        env = "RESTOCK_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<SecretString>,

    /// How long a run's owner may go without renewing its lease before another instance
    /// takes the run over (G8): a number and a unit, `ms`, `s` or `m` (500ms to 10m).
    #[arg(
        long = "run-lease",
        env = "RESTOCK_RUN_LEASE",
        default_value = "10s",
        value_parser = parse_lease
    )]
    pub run_lease: Duration,

    /// On SIGTERM, how long health says NOT_SERVING while calls are still served,
    /// before the listener closes and streams end: time for load balancers that poll
    /// health to stop sending calls here (`0s` to `60s`; adds to the hand-over time).
    #[arg(
        long = "shutdown-drain",
        env = "RESTOCK_SHUTDOWN_DRAIN",
        default_value = "0s",
        value_parser = parse_drain
    )]
    pub shutdown_drain: Duration,

    /// Address of the Prometheus endpoint, `GET /metrics` over plain HTTP; `off`
    /// turns it off.
    #[arg(
        long = "metrics-listen",
        env = "RESTOCK_METRICS_LISTEN",
        default_value = "0.0.0.0:9464",
        value_parser = parse_metrics_listen
    )]
    pub metrics_listen: MetricsListen,
    /// PEM file of the server's certificate chain. With RESTOCK_TLS_KEY, gRPC is served
    /// over TLS only; set both or neither.
    #[arg(long = "tls-cert", env = "RESTOCK_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM file of the private key of RESTOCK_TLS_CERT.
    #[arg(long = "tls-key", env = "RESTOCK_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

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
    pub webhook_url: Option<SecretUrl>,

    /// Signing secrets of the webhook, required with RESTOCK_WEBHOOK_URL: one or more
    /// `whsec_<base64 of 24 to 64 bytes>`, separated by spaces; every request is signed
    /// with each (so a receiver can rotate its secret). Parsed at start, not here, so
    /// that a malformed one is never echoed in a message.
    #[arg(
        long = "webhook-secret",
        env = "RESTOCK_WEBHOOK_SECRET",
        hide_env_values = true
    )]
    pub webhook_secret: Option<SecretString>,

    /// How long one webhook request may take, connection included (100ms to 60s).
    #[arg(
        long = "webhook-timeout",
        env = "RESTOCK_WEBHOOK_TIMEOUT",
        default_value = "10s",
        value_parser = parse_webhook_timeout
    )]
    pub webhook_timeout: Duration,

    /// Attempts per notification, the first included, before the run ends
    /// CANCELED_BY_ERROR (1 to 20).
    #[arg(
        long = "webhook-attempts",
        env = "RESTOCK_WEBHOOK_ATTEMPTS",
        default_value = "6",
        value_parser = parse_webhook_attempts
    )]
    pub webhook_attempts: u32,

    /// Delay before the first retry of a webhook request; it doubles with every retry,
    /// up to 60 s, with jitter (10ms to 60s).
    #[arg(
        long = "webhook-backoff",
        env = "RESTOCK_WEBHOOK_BACKOFF",
        default_value = "1s",
        value_parser = parse_webhook_backoff
    )]
    pub webhook_backoff: Duration,

    /// Log filter, in `tracing_subscriber::EnvFilter` syntax.
    #[arg(long = "log", env = "RUST_LOG", default_value = "info")]
    pub log: String,

    /// Log format: human-readable text, or one JSON object per line.
    #[arg(
        long = "log-format",
        env = "RESTOCK_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
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

/// Parses `RESTOCK_SEND_RATE`. Above 100000 a second, the pacing and the recorder's
/// batches (G10) are no longer what the service is built and measured for.
fn parse_send_rate(raw: &str) -> Result<NonZeroU32, String> {
    parse_rate("RESTOCK_SEND_RATE", raw, 100_000)
}

/// Parses `RESTOCK_API_RATE`. The limiter spaces requests `1s / rate` apart; a million a
/// second keeps that a whole microsecond, well within what the limiter can count.
fn parse_api_rate(raw: &str) -> Result<NonZeroU32, String> {
    parse_rate("RESTOCK_API_RATE", raw, 1_000_000)
}

/// A whole number from 1 to `max`; the message names the setting, as clap names only
/// the flag.
fn parse_rate(setting: &str, raw: &str, max: u32) -> Result<NonZeroU32, String> {
    raw.trim()
        .parse::<u32>()
        .ok()
        .filter(|rate| (1..=max).contains(rate))
        .and_then(NonZeroU32::new)
        .ok_or_else(|| format!("{setting} must be a whole number from 1 to {max}"))
}

/// Parses `RESTOCK_DB_POOL_SIZE`. Above 1000, a pool would hold more connections than
/// a database server accepts by default from all its clients together.
fn parse_db_pool_size(raw: &str) -> Result<NonZeroU32, String> {
    parse_rate("RESTOCK_DB_POOL_SIZE", raw, 1_000)
}

/// Parses `RESTOCK_RUN_LEASE`: `10s`, `1500ms`, `2m`.
fn parse_lease(raw: &str) -> Result<Duration, String> {
    parse_duration(
        raw,
        Duration::from_millis(500),
        Duration::from_secs(600),
        "500ms to 10m",
    )
}

/// Parses `RESTOCK_SHUTDOWN_DRAIN`: `0s` to `60s`.
fn parse_drain(raw: &str) -> Result<Duration, String> {
    parse_duration(raw, Duration::ZERO, Duration::from_secs(60), "0s to 60s")
}

/// Parses `RESTOCK_WEBHOOK_TIMEOUT`: below 100 ms a TLS handshake alone may not fit;
/// above a minute, a stalled endpoint would hold a run longer than any lease.
fn parse_webhook_timeout(raw: &str) -> Result<Duration, String> {
    parse_duration(
        raw,
        Duration::from_millis(100),
        Duration::from_secs(60),
        "100ms to 60s",
    )
    .map_err(|e| format!("RESTOCK_WEBHOOK_TIMEOUT: {e}"))
}

/// Parses `RESTOCK_WEBHOOK_BACKOFF`: the first retry's delay, 10ms to 60s.
fn parse_webhook_backoff(raw: &str) -> Result<Duration, String> {
    parse_duration(
        raw,
        Duration::from_millis(10),
        Duration::from_secs(60),
        "10ms to 60s",
    )
    .map_err(|e| format!("RESTOCK_WEBHOOK_BACKOFF: {e}"))
}

/// Parses `RESTOCK_WEBHOOK_ATTEMPTS`: 1 (no retry) to 20 (with the 60 s cap, about a
/// quarter of an hour of retrying).
fn parse_webhook_attempts(raw: &str) -> Result<u32, String> {
    parse_rate("RESTOCK_WEBHOOK_ATTEMPTS", raw, 20).map(NonZeroU32::get)
}

/// A whole number and a unit (`ms`, `s`, `m`) within `min..=max`.
fn parse_duration(
    raw: &str,
    min: Duration,
    max: Duration,
    range: &str,
) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{raw:?} has no unit; write it like 10s, 1500ms or 2m"))?;
    let (number, unit) = raw.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{raw:?} does not start with a whole number"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number.saturating_mul(60)),
        _ => return Err(format!("unknown unit {unit:?}; use ms, s or m")),
    };
    if !(min..=max).contains(&duration) {
        return Err(format!("{raw} is out of range: {range}"));
    }
    Ok(duration)
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

    #[test]
    fn rates_parse_within_their_range_and_name_the_setting_otherwise() {
        assert_eq!(parse_send_rate("500").map(NonZeroU32::get), Ok(500));
        assert_eq!(parse_send_rate("100000").map(NonZeroU32::get), Ok(100_000));
        assert_eq!(
            parse_api_rate("1000000").map(NonZeroU32::get),
            Ok(1_000_000)
        );
        for bad in ["0", "-1", "100001", "2000000000", "1.5", "", "many"] {
            let err = parse_send_rate(bad).unwrap_err();
            assert!(err.contains("RESTOCK_SEND_RATE"), "{bad}: {err}");
        }
        for bad in ["0", "1000001", "2000000000", "99999999999"] {
            let err = parse_api_rate(bad).unwrap_err();
            assert!(err.contains("RESTOCK_API_RATE"), "{bad}: {err}");
        }
    }

    #[test]
    fn webhook_numbers_parse_within_their_range_and_name_the_setting_otherwise() {
        assert_eq!(
            parse_webhook_timeout("100ms"),
            Ok(Duration::from_millis(100))
        );
        assert_eq!(parse_webhook_backoff("10ms"), Ok(Duration::from_millis(10)));
        assert_eq!(parse_webhook_attempts("20"), Ok(20));
        for bad in ["99ms", "61s", "2m", "10"] {
            let err = parse_webhook_timeout(bad).unwrap_err();
            assert!(err.contains("RESTOCK_WEBHOOK_TIMEOUT"), "{bad}: {err}");
        }
        for bad in ["9ms", "61s"] {
            let err = parse_webhook_backoff(bad).unwrap_err();
            assert!(err.contains("RESTOCK_WEBHOOK_BACKOFF"), "{bad}: {err}");
        }
        for bad in ["0", "21", "-1", "six"] {
            let err = parse_webhook_attempts(bad).unwrap_err();
            assert!(err.contains("RESTOCK_WEBHOOK_ATTEMPTS"), "{bad}: {err}");
        }
    }

    #[test]
    fn pool_sizes_parse_from_1_to_1000_and_name_the_setting_otherwise() {
        assert_eq!(parse_db_pool_size("1").map(NonZeroU32::get), Ok(1));
        assert_eq!(parse_db_pool_size("1000").map(NonZeroU32::get), Ok(1_000));
        for bad in ["0", "-1", "1001", "ten", ""] {
            let err = parse_db_pool_size(bad).unwrap_err();
            assert!(err.contains("RESTOCK_DB_POOL_SIZE"), "{bad}: {err}");
        }
    }

    #[test]
    fn drains_parse_from_0s_to_60s() {
        assert_eq!(parse_drain("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_drain("1500ms"), Ok(Duration::from_millis(1_500)));
        for bad in ["61s", "2m", "5", "-1s"] {
            assert!(parse_drain(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn leases_parse_with_units_and_refuse_the_rest() {
        assert_eq!(parse_lease("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_lease("1500ms"), Ok(Duration::from_millis(1_500)));
        assert_eq!(parse_lease("2m"), Ok(Duration::from_secs(120)));
        for bad in [
            "10",
            "s",
            "-1s",
            "10h",
            "100ms",
            "11m",
            "99999999999999999999s",
        ] {
            assert!(parse_lease(bad).is_err(), "{bad}");
        }
    }
}
