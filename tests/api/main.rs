//! Integration tests: the real server, a real MySQL database and a real Redis per test.

#[macro_use]
mod helpers;

mod alerts;
mod attributes;
mod callers;
mod capabilities;
mod cluster;
mod console;
mod embedded;
mod erasure;
mod errors;
mod idempotency;
mod manual_restock;
mod metrics;
mod min_stock;
mod network;
mod products;
#[path = "../support/proxy.rs"]
mod proxy;
mod rate_limit;
mod receiver;
mod redis_cluster;
mod redis_failure;
mod retention;
mod runs;
mod secrets;
mod shutdown;
mod startup;
mod store_contract;
mod subscribe;
mod tls;
mod traces;
mod watch_list;
mod waves;
mod webhook;
