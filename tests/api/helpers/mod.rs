//! Test harness: each test gets the real server on 127.0.0.1:0 with its own database
//! and its own Redis prefix, and talks to it through the generated clients. One file
//! per concern; everything is re-exported here, so tests use `crate::helpers::*`.

mod app;
mod binary;
mod database;
mod polling;
mod redis;
#[path = "../../support/redis_cluster.rs"]
mod redis_cluster;
mod tls;
mod windows;

pub use app::*;
pub use binary::*;
pub use database::*;
pub use polling::*;
pub use redis::*;
pub use redis_cluster::*;
pub use tls::*;
pub use windows::*;

/// An implementation of the engine's capabilities (stock cache and fence, limiter,
/// bus): what a contract suite of `capabilities.rs` runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Implementation {
    /// In process: the embedded deployment's.
    InProcess,
    /// On one Redis, two handles on one prefix standing for two instances.
    Redis,
    /// On a Redis Cluster of three masters and three replicas, as `Redis`.
    RedisCluster,
}

/// Generates, for each named `async fn(Implementation)`, one test per implementation:
/// `in_process::name`, `redis::name` and `redis_cluster::name`. A new implementation is
/// one more module here.
#[macro_export]
macro_rules! on_each_implementation {
    ($($name:ident),+ $(,)?) => {
        mod in_process {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Implementation::InProcess).await;
                }
            )+
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Implementation::Redis).await;
                }
            )+
        }
        mod redis_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Implementation::RedisCluster).await;
                }
            )+
        }
    };
}

/// Generates, for each named `async fn(Backend)`, one test per backend: `mysql::name`
/// and `embedded::name`.
#[macro_export]
macro_rules! on_each_backend {
    ($($name:ident),+ $(,)?) => {
        mod mysql {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::MySql).await;
                }
            )+
        }
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Embedded).await;
                }
            )+
        }
    };
}
