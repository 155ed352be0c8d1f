//! The test's databases: a fresh one per test (a MySQL database, or an SQLite file),
//! dropped afterwards, and the queries tests make on its tables.

use std::time::Duration;

use sqlx::{Connection, MySqlConnection, Row};

use super::{Backend, TestApp};

/// The MySQL server tests create their databases on.
pub fn mysql_server_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

/// A name no other test uses: `prefix` and 16 random hex digits.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{:016x}", rand::random::<u64>())
}

impl Backend {
    pub fn fresh_database(self) -> String {
        match self {
            Backend::MySql => unique("restock_test_"),
            Backend::Embedded => std::env::temp_dir()
                .join(unique("restock-test-") + ".db")
                .to_string_lossy()
                .into_owned(),
        }
    }

    pub fn database_url(self, database: &str) -> String {
        match self {
            Backend::MySql => format!("{}/{}", mysql_server_url(), database),
            Backend::Embedded => format!("sqlite://{database}"),
        }
    }
}

impl TestApp {
    /// Registers many users fast, straight in the table, in the order given (the
    /// position column is the registration order). For tests that need thousands.
    pub async fn register_bulk(&self, product: i64, users: &[i64]) {
        let mut conn = self.db.acquire().await.unwrap();
        for (chunk_no, chunk) in users.chunks(1_000).enumerate() {
            let mut q = sqlx::QueryBuilder::<sqlx::Any>::new(
                "INSERT INTO product_user_notification (product_id, user_id, position) ",
            );
            q.push_values(chunk.iter().enumerate(), |mut row, (i, user)| {
                row.push_bind(product)
                    .push_bind(*user)
                    .push_bind((chunk_no * 1_000 + i + 1) as i64);
            });
            q.build().execute(&mut *conn).await.unwrap();
        }
        // A fresh product's alerts, counted as the service counts them.
        sqlx::query("UPDATE product SET alert_seq = ?, waiting = ? WHERE id = ?")
            .bind(users.len() as i64)
            .bind(users.len() as i64)
            .bind(product)
            .execute(&mut *conn)
            .await
            .unwrap();
    }

    /// Users recorded for a round, in recording order.
    pub async fn history(&self, product: i64, round: i64) -> Vec<i64> {
        sqlx::query_scalar(
            "SELECT user_id FROM product_user_notification_history \
             WHERE product_id = ? AND restock_round = ? ORDER BY id",
        )
        .bind(product)
        .bind(round)
        .fetch_all(&self.db)
        .await
        .unwrap()
    }

    /// Waits (at most 30 s) until `at_least` users are recorded for a round.
    pub async fn wait_for_history(&self, product: i64, round: i64, at_least: usize) {
        let recorded = format!("{at_least} recorded for round {round} of product {product}");
        super::poll_until(Duration::from_secs(30), &recorded, || async move {
            match self.history(product, round).await.len() {
                enough if enough >= at_least => Ok(()),
                fewer => Err(fewer),
            }
        })
        .await;
    }

    /// The run row as stored: (status, last_sent_user_id, sent_count).
    pub async fn run_row(&self, product: i64, round: i64) -> (String, Option<i64>, i64) {
        let row = sqlx::query(
            "SELECT status, last_sent_user_id, sent_count FROM product_notification_history \
             WHERE product_id = ? AND restock_round = ?",
        )
        .bind(product)
        .bind(round)
        .fetch_one(&self.db)
        .await
        .unwrap();
        (row.get(0), row.get(1), row.get(2))
    }

    pub async fn product_round(&self, product: i64) -> i64 {
        sqlx::query_scalar("SELECT restock_round FROM product WHERE id = ?")
            .bind(product)
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    pub async fn run_count(&self, product: i64) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM product_notification_history WHERE product_id = ?")
            .bind(product)
            .fetch_one(&self.db)
            .await
            .unwrap()
    }
}

/// A fresh SQLite file URL in the temp directory, for runs of the binary that should not
/// leave a `restock.db` behind in the working directory.
pub fn temp_sqlite_url() -> String {
    format!(
        "sqlite://{}",
        std::env::temp_dir()
            .join(unique("restock-test-") + ".db")
            .display()
    )
}

/// Drops a test's database: the SQLite file, or the MySQL database.
pub fn drop_database(backend: Backend, database: &str) {
    if backend == Backend::Embedded {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{database}{suffix}"));
        }
        return;
    }
    let database = database.to_owned();
    // Dropped inside the test's runtime: clean up on a thread of its own with a small
    // runtime. The tests run on a multi-threaded runtime, so the server keeps
    // finishing what it had in flight (and releases its locks) meanwhile.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            if let Ok(mut conn) = MySqlConnection::connect(&mysql_server_url()).await {
                // Should a server transaction still hold locks, give up on the drop
                // rather than wait forever (a leftover database is harmless).
                let _ = sqlx::raw_sql(&format!(
                    "SET SESSION lock_wait_timeout = 5; DROP DATABASE IF EXISTS `{database}`"
                ))
                .execute(&mut conn)
                .await;
            }
        });
    })
    .join()
    .ok();
}
