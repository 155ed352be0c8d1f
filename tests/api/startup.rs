//! Bad settings stop the service at start with a message naming the setting.

use std::num::NonZeroU32;

use restock_notifier::config::{Config, LogFormat};
use restock_notifier::startup::Application;

fn config(database_url: &str, redis_url: Option<&str>) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        database_url: database_url.into(),
        redis_url: redis_url.map(Into::into),
        redis_prefix: "restock-startup-test:".into(),
        send_rate: NonZeroU32::new(500).unwrap(),
        api_rate: NonZeroU32::new(500).unwrap(),
        admin_token: None,
        log: "info".into(),
        log_format: LogFormat::Text,
        run_lease: std::time::Duration::from_secs(10),
        tls_cert: None,
        tls_key: None,
    }
}

async fn start_error(config: Config) -> String {
    let described = format!("{:?} {:?}", config.database_url, config.redis_url);
    match Application::build(config).await {
        Ok(_) => panic!("the service started with {described}"),
        Err(err) => format!("{err:#}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsupported_database_scheme_is_refused_naming_the_setting() {
    let message = start_error(config("postgres://user:secret@db/restock", None)).await;
    assert!(message.contains("DATABASE_URL"), "{message}");
    assert!(
        !message.contains("secret"),
        "the password leaked: {message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_refused_naming_the_setting() {
    let message = start_error(config("mysql://root@127.0.0.1:1/restock", None)).await;
    assert!(message.contains("DATABASE_URL"), "{message}");
    let message = start_error(config("sqlite:///nonexistent-dir/x/restock.db", None)).await;
    assert!(message.contains("DATABASE_URL"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_or_malformed_redis_is_refused_naming_the_setting() {
    let db =
        std::env::temp_dir().join(format!("restock-startup-{:016x}.db", rand::random::<u64>()));
    let url = format!("sqlite://{}", db.display());
    let message = start_error(config(&url, Some("redis://127.0.0.1:1"))).await;
    assert!(message.contains("REDIS_URL"), "{message}");
    let message = start_error(config(&url, Some("http://127.0.0.1:6379"))).await;
    assert!(message.contains("REDIS_URL"), "{message}");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
}
