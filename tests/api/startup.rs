//! Bad settings stop the service at start with a message naming the setting.

use restock_notifier::config::Config;
use restock_notifier::redact::SecretUrl;
use restock_notifier::startup::Application;

use crate::helpers::test_config;

fn config(database_url: &str, redis_url: Option<&str>) -> Config {
    Config {
        redis_url: redis_url.map(SecretUrl::connection),
        redis_prefix: "restock-startup-test:".into(),
        ..test_config(database_url)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_url_requiring_tls_is_honoured() {
    // The test MariaDB offers no TLS: `required` must refuse to go on in plaintext.
    let server = crate::helpers::mysql_server_url();
    let url = format!("{server}/restock_tls_required?ssl-mode=required");
    let message = start_error(config(&url, None)).await;
    assert!(message.contains("DATABASE_URL"), "{message}");
    assert!(message.contains("TLS"), "{message}");
    let message = start_error(config(&format!("{server}/x?ssl-mode=sometimes"), None)).await;
    assert!(message.contains("DATABASE_URL"), "{message}");
}

/// Runs the binary with `settings` (on a throwaway SQLite file) and returns its stderr,
/// checking it stopped with an error and did not panic.
fn refused_start(settings: &[(&str, &str)]) -> String {
    let database_url = crate::helpers::temp_sqlite_url();
    let mut env = vec![
        ("DATABASE_URL", database_url.as_str()),
        ("RESTOCK_LISTEN", "127.0.0.1:0"),
        ("RESTOCK_ADMIN_TOKEN", "startup-test-token"),
    ];
    env.extend_from_slice(settings);
    let output = crate::helpers::run_binary(&env, &[]);
    let file = database_url.trim_start_matches("sqlite://");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{file}{suffix}"));
    }
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success(),
        "the service started with {settings:?}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn out_of_range_rates_are_refused_naming_the_setting() {
    for (setting, value) in [
        ("RESTOCK_API_RATE", "2000000000"),
        ("RESTOCK_API_RATE", "0"),
        ("RESTOCK_SEND_RATE", "0"),
        ("RESTOCK_SEND_RATE", "1000001"),
        ("RESTOCK_SEND_RATE", "fast"),
    ] {
        let stderr = refused_start(&[(setting, value)]);
        assert!(stderr.contains(setting), "{setting}={value}: {stderr}");
    }
}

#[test]
fn half_a_tls_setting_is_refused_naming_the_missing_one() {
    let pki = crate::helpers::Pki::generate();
    let cert = pki.cert.to_string_lossy();
    let key = pki.key.to_string_lossy();
    let stderr = refused_start(&[("RESTOCK_TLS_CERT", &cert)]);
    assert!(stderr.contains("RESTOCK_TLS_KEY"), "{stderr}");
    let stderr = refused_start(&[("RESTOCK_TLS_KEY", &key)]);
    assert!(stderr.contains("RESTOCK_TLS_CERT"), "{stderr}");
}

#[test]
fn unreadable_or_invalid_tls_files_are_refused_naming_the_setting() {
    let pki = crate::helpers::Pki::generate();
    let cert = pki.cert.to_string_lossy();
    let key = pki.key.to_string_lossy();
    let missing = pki.ca.with_file_name("missing.pem");
    let missing = missing.to_string_lossy();

    let stderr = refused_start(&[("RESTOCK_TLS_CERT", &missing), ("RESTOCK_TLS_KEY", &key)]);
    assert!(stderr.contains("RESTOCK_TLS_CERT"), "{stderr}");
    let stderr = refused_start(&[("RESTOCK_TLS_CERT", &cert), ("RESTOCK_TLS_KEY", &missing)]);
    assert!(stderr.contains("RESTOCK_TLS_KEY"), "{stderr}");
    // The two files swapped: neither holds what its setting names.
    let stderr = refused_start(&[("RESTOCK_TLS_CERT", &key), ("RESTOCK_TLS_KEY", &cert)]);
    assert!(stderr.contains("RESTOCK_TLS_CERT"), "{stderr}");
    // Both are PEM, but the key is not the certificate's: the CA's certificate with the
    // server's key.
    let ca = pki.ca.to_string_lossy();
    let stderr = refused_start(&[("RESTOCK_TLS_CERT", &ca), ("RESTOCK_TLS_KEY", &key)]);
    assert!(stderr.contains("RESTOCK_TLS_CERT"), "{stderr}");
}
