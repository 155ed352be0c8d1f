//! restock-notifier: tells users, in registration order and at a bounded rate, that a
//! product they asked about is back in stock.

/// Who calls the service: the callers of `RESTOCK_CALLERS`, their identities and roles,
/// read at start and again on SIGHUP.
pub mod callers;
/// Settings: one `Config`, every field a flag and an environment variable.
pub mod config;
/// The operator console: the web page's files, embedded (with a gzip copy of each),
/// served at `/` on the gRPC address; the page calls the API over gRPC-web.
pub mod console;
/// Embedded or clustered: which implementation of each capability the engine gets.
pub mod deployment;
/// Plain types and rules: ids, run states and their transitions, notifications, what a
/// `TriggerRestock` asks for (waves, idempotency keys), run and product listings and
/// their page tokens, and the errors a caller can act on. No tonic, no sqlx.
pub mod domain;
/// The notification run: the run loop (`engine::run`), the recorder that commits its
/// batches and owns its lease (`engine::recorder`), run ownership and the takeover loop
/// (`engine::lease`), and one folder per outside capability, each a trait with an
/// in-process and a Redis implementation: the stock cache and fence (`engine::stock`),
/// the send limiter (`engine::limiter`) and the notification bus (`engine::bus`).
/// Where notifications go is one trait with one implementation per channel
/// (`engine::delivery`: the stream, and a webhook endpoint with signed requests,
/// acknowledged before recorded). Also `Subscribe` streams (`engine::subscription`),
/// run watches (`engine::watch`), the erasure of a user (`engine::erasure`) and the
/// database's clock (`engine::clock`).
pub mod engine;
/// The gRPC face: the two services (`grpc::restock`, `grpc::admin`), proto <-> domain
/// conversions, the one mapping of errors to status codes (`grpc::status`), who may
/// call what (`grpc::authz`: the method -> role table and its layer; `grpc::audit`),
/// the API rate limit, the observe layer (`grpc::observe`) and notifications encoded
/// once for every stream (`grpc::wire`).
pub mod grpc;
/// Prometheus metrics and their `/metrics` endpoint.
pub mod monitoring;
/// Secrets kept out of messages and logs: passwords in URLs, and the credentials and
/// query string of the webhook URL.
pub mod redact;
/// Redis through fred: the client with the service's timeouts (one Redis or Redis
/// Cluster), and every key and channel under one prefix, a product's under the hash tag
/// of its partition (the capabilities that use it live in `engine`).
pub mod redis;
/// Wiring: `Application::build` connects the stores, builds the engine from
/// `EngineSettings::from_config` and the server, and binds first, so port 0 works.
pub mod startup;
/// Durable state behind the `Store` trait: MySQL, and SQLite for the embedded default.
pub mod store;
/// Structured logging with tracing (text or JSON, filtered by `RUST_LOG`), and the same
/// spans exported as OpenTelemetry traces when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
pub mod telemetry;
/// TLS for the gRPC server, from PEM files: the handshakes, with ALPN offering HTTP/2
/// and HTTP/1.1.
pub mod tls;
