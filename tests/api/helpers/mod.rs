//! Test harness: each test gets the real server on 127.0.0.1:0 with its own database
//! and its own Redis prefix, and talks to it through the generated clients. One file
//! per concern; everything is re-exported here, so tests use `crate::helpers::*`.

mod app;
mod binary;
mod database;
mod polling;
mod redis;
mod tls;
mod windows;

pub use app::*;
pub use binary::*;
pub use database::*;
pub use polling::*;
pub use redis::*;
pub use tls::*;
pub use windows::*;

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
