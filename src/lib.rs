//! restock-notifier: tells users, in registration order and at a bounded rate, that a
//! product they asked about is back in stock.

/// Settings, as flags and environment variables.
pub mod config;
/// Embedded or clustered: which implementation of each capability the engine gets.
pub mod deployment;
/// Ids, run states, notifications and the errors a caller can act on.
pub mod domain;
/// Runs: pacing, the stock check, recording, resuming, ownership and the shared clock;
/// delivery to a webhook endpoint (`engine::webhook`: signed requests, acknowledged
/// before recorded); and `Subscribe` streams.
pub mod engine;
/// The gRPC services, conversions, status codes and the API rate limit.
pub mod grpc;
/// Prometheus metrics and their `/metrics` endpoint.
pub mod monitoring;
/// Secrets kept out of messages and logs: passwords in URLs, and the credentials and
/// query string of the webhook URL.
pub mod redact;
/// Redis through fred: the client with the service's timeouts, and every key under one
/// prefix (the capabilities that use it live in `engine`).
pub mod redis;
/// Wiring of the stores, the engine and the server.
pub mod startup;
/// Durable state behind the `Store` trait (MySQL, and SQLite for the embedded default).
pub mod store;
/// Structured logging.
pub mod telemetry;
/// TLS for the gRPC server, from PEM files.
pub mod tls;
