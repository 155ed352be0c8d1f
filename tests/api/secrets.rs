//! Secrets (passwords in DATABASE_URL and REDIS_URL, the admin token) never appear in
//! `--help`, in the logs of the real binary, or in `Debug` of the settings.

use clap::Parser as _;
use fred::prelude::{ClientLike as _, Config as RedisConfig};
use restock_notifier::config::Config;
use sqlx::{Connection as _, MySqlConnection};

use crate::helpers::*;

const SECRET: &str = "hunter2";

/// A MySQL user and a Redis ACL user, both named `restock_secret_test` with the password
/// SECRET, so that the binary really starts with secrets in its URLs.
async fn users_with_the_secret() {
    let mut conn = MySqlConnection::connect(&mysql_server_url()).await.unwrap();
    for statement in [
        format!("CREATE USER IF NOT EXISTS 'restock_secret_test'@'%' IDENTIFIED BY '{SECRET}'"),
        format!("ALTER USER 'restock_secret_test'@'%' IDENTIFIED BY '{SECRET}'"),
        "GRANT ALL PRIVILEGES ON *.* TO 'restock_secret_test'@'%'".to_string(),
    ] {
        sqlx::raw_sql(&statement).execute(&mut conn).await.unwrap();
    }
    let redis = fred::prelude::Builder::from_config(RedisConfig::from_url(&redis_url()).unwrap())
        .build()
        .unwrap();
    redis.init().await.unwrap();
    let _: String = redis
        .custom(
            fred::cmd!("ACL"),
            vec![
                "SETUSER",
                "restock_secret_test",
                "on",
                &format!(">{SECRET}"),
                "~*",
                "&*",
                "+@all",
            ],
        )
        .await
        .unwrap();
    redis.quit().await.unwrap();
}

/// The users of `users_with_the_secret` are not left behind with their privileges.
async fn remove_the_users() {
    let mut conn = MySqlConnection::connect(&mysql_server_url()).await.unwrap();
    sqlx::raw_sql("DROP USER IF EXISTS 'restock_secret_test'@'%'")
        .execute(&mut conn)
        .await
        .unwrap();
    let redis = fred::prelude::Builder::from_config(RedisConfig::from_url(&redis_url()).unwrap())
        .build()
        .unwrap();
    redis.init().await.unwrap();
    let _: i64 = redis
        .custom(fred::cmd!("ACL"), vec!["DELUSER", "restock_secret_test"])
        .await
        .unwrap();
    redis.quit().await.unwrap();
}

fn with_credentials(url: &str, credentials: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{credentials}@{rest}")
}

fn text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn help_does_not_show_the_secrets_set_in_the_environment() {
    let output = run_binary(
        &[
            ("DATABASE_URL", "mysql://u:hunter2@host/db"),
            ("REDIS_URL", "redis://:hunter2@host"),
            ("RESTOCK_ADMIN_TOKEN", SECRET),
        ],
        &["--help"],
    );
    let help = text(&output);
    assert!(output.status.success(), "{help}");
    assert!(help.contains("DATABASE_URL"), "{help}");
    assert!(!help.contains(SECRET), "a secret is in --help:\n{help}");
}

#[test]
fn debug_of_the_settings_does_not_show_the_secrets() {
    let config = Config::try_parse_from([
        "restock-notifier",
        "--database-url",
        "mysql://u:hunter2@host/db",
        "--redis-url",
        "rediss://default:hunter2@host:6380",
        "--admin-token",
        SECRET,
    ])
    .unwrap();
    let debug = format!("{config:?}");
    assert!(debug.contains("mysql://u:***@host/db"), "{debug}");
    assert!(!debug.contains(SECRET), "a secret is in Debug: {debug}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_does_not_show_the_passwords() {
    let database = format!("restock_test_{:016x}", rand::random::<u64>());
    // A user that does not exist: MySQL refuses the connection.
    let output = run_binary(
        &[
            (
                "DATABASE_URL",
                &with_credentials(
                    &format!("{}/{database}", mysql_server_url()),
                    "restock_nobody:hunter2",
                ),
            ),
            ("RESTOCK_ADMIN_TOKEN", SECRET),
            ("RESTOCK_LISTEN", "127.0.0.1:0"),
            ("RUST_LOG", "debug"),
        ],
        &[],
    );
    let log = text(&output);
    assert!(!output.status.success(), "{log}");
    assert!(log.contains("DATABASE_URL"), "{log}");
    assert!(!log.contains(SECRET), "a secret is in the log:\n{log}");

    // Redis refuses a password it does not know.
    let sqlite = temp_sqlite_url();
    let output = run_binary(
        &[
            ("DATABASE_URL", &sqlite),
            (
                "REDIS_URL",
                &with_credentials(&redis_url(), "restock_nobody:hunter2"),
            ),
            ("RESTOCK_ADMIN_TOKEN", SECRET),
            ("RESTOCK_LISTEN", "127.0.0.1:0"),
            ("RUST_LOG", "debug"),
        ],
        &[],
    );
    let log = text(&output);
    let file = sqlite.trim_start_matches("sqlite://");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{file}{suffix}"));
    }
    assert!(!output.status.success(), "{log}");
    assert!(log.contains("REDIS_URL"), "{log}");
    assert!(!log.contains(SECRET), "a secret is in the log:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clustered_start_and_stop_with_passwords_does_not_log_them() {
    users_with_the_secret().await;
    let database = format!("restock_test_{:016x}", rand::random::<u64>());
    let credentials = format!("restock_secret_test:{SECRET}");
    let output = start_and_stop_binary(&[
        (
            "DATABASE_URL",
            &with_credentials(&format!("{}/{database}", mysql_server_url()), &credentials),
        ),
        ("REDIS_URL", &with_credentials(&redis_url(), &credentials)),
        (
            "RESTOCK_REDIS_PREFIX",
            &format!("restock-secret-test:{database}:"),
        ),
        ("RESTOCK_ADMIN_TOKEN", SECRET),
        ("RUST_LOG", "debug"),
    ])
    .await;

    let mut conn = MySqlConnection::connect(&mysql_server_url()).await.unwrap();
    sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS `{database}`"))
        .execute(&mut conn)
        .await
        .unwrap();
    remove_the_users().await;

    let log = text(&output);
    assert!(output.status.success(), "{log}");
    // The log really covers start and stop, with the URL it may show.
    assert!(log.contains("deployment=\"clustered\""), "{log}");
    assert!(log.contains("restock_secret_test:***@"), "{log}");
    assert!(log.contains("stopped"), "{log}");
    assert!(!log.contains(SECRET), "a secret is in the log:\n{log}");
}
