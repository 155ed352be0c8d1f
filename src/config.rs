//! Settings of the service: every one is a command-line flag and an environment
//! variable (README, "Settings").

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use clap::{Parser, ValueEnum};

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
        default_value = "sqlite://restock.db"
    )]
    pub database_url: String,

    /// Redis (`redis://host:port`) for the stock cache. Without it, the stock cache,
    /// send limiter and notification bus live in this process: run a single instance.
    #[arg(long = "redis-url", env = "REDIS_URL")]
    pub redis_url: Option<String>,

    /// Prefix of every Redis key and channel, so deployments can share one Redis.
    #[arg(
        long = "redis-prefix",
        env = "RESTOCK_REDIS_PREFIX",
        default_value = "restock:"
    )]
    pub redis_prefix: String,

    /// Notifications sent per second, at most, in any one-second window.
    #[arg(long = "send-rate", env = "RESTOCK_SEND_RATE", default_value = "500")]
    pub send_rate: NonZeroU32,

    /// API requests per second per client IP (the burst is the same).
    #[arg(long = "api-rate", env = "RESTOCK_API_RATE", default_value = "500")]
    pub api_rate: NonZeroU32,

    /// Bearer token of the admin service. Without it, one is generated at start and
    /// logged once.
    #[arg(
        long = "admin-token",
        env = "RESTOCK_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,

    /// How long a run's owner may go without renewing its lease before another instance
    /// takes the run over (G8): a number and a unit, `ms`, `s` or `m` (500ms to 10m).
    #[arg(
        long = "run-lease",
        env = "RESTOCK_RUN_LEASE",
        default_value = "10s",
        value_parser = parse_lease
    )]
    pub run_lease: Duration,

    /// Address of the Prometheus endpoint, `GET /metrics` over plain HTTP; `off`
    /// turns it off.
    #[arg(
        long = "metrics-listen",
        env = "RESTOCK_METRICS_LISTEN",
        default_value = "0.0.0.0:9464",
        value_parser = parse_metrics_listen
    )]
    pub metrics_listen: MetricsListen,

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

/// Parses `RESTOCK_RUN_LEASE`: `10s`, `1500ms`, `2m`.
fn parse_lease(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{raw:?} has no unit; write it like 10s, 1500ms or 2m"))?;
    let (number, unit) = raw.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{raw:?} does not start with a whole number"))?;
    let lease = match unit {
        "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number.saturating_mul(60)),
        _ => return Err(format!("unknown unit {unit:?}; use ms, s or m")),
    };
    if !(Duration::from_millis(500)..=Duration::from_secs(600)).contains(&lease) {
        return Err(format!("{raw} is out of range: 500ms to 10m"));
    }
    Ok(lease)
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
