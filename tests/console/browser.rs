//! The operator console in a real browser: headless Chromium (Debian's `chromium`,
//! driven by playwright-core from `console/tests/console.mjs`) against the real binary,
//! on both deployments. The scenarios and what they check are in that file; this side
//! starts the service, prepares its data (users, a failure to resume from) and runs
//! one scenario per service.
//!
//! They need Node.js, `npm ci` in `console/` and `/usr/bin/chromium` (or `CHROMIUM`);
//! `.ci/run` installs them. Missing, the test fails saying what to install.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use restock_notifier::grpc::proto;
use restock_notifier::grpc::proto::restock_service_client::RestockServiceClient;
use sha2::Digest as _;
use sqlx::AnyPool;
use tokio::sync::Mutex;

use crate::helpers::*;

/// One browser at a time: Chromium is heavy, and the rest of the suite runs meanwhile.
static BROWSER: Mutex<()> = Mutex::const_new(());

/// `message` with the admin token: the helpers' calls work with or without a caller
/// policy (the admin token is a caller with every role).
fn as_admin<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {TOKEN}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    request
}

/// How long a scenario may take, browser start included.
const SCENARIO_PATIENCE: Duration = Duration::from_secs(240);

const TOKEN: &str = "console-test-token";

/// Registered in this order; the run notifies them in it (G1).
fn users(from: i64, count: i64) -> Vec<i64> {
    (0..count).map(|i| from + (i * 7919) % 1000).collect()
}

fn console_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("console")
}

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

/// Fails, saying what to install, when a browser test cannot run here.
fn require_browser_tools() {
    let node = Command::new("node")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let modules = console_dir().join("node_modules/playwright-core").is_dir();
    let browser = chromium().is_file();
    assert!(
        node && modules && browser,
        "the console's browser tests need Node.js (found: {node}), `npm ci` in console/ \
         (found: {modules}) and Debian's chromium at {} (found: {browser}; set CHROMIUM \
         for another path): `apt-get install nodejs npm chromium && (cd console && npm ci)`, \
         as .ci/run does",
        chromium().display()
    );
}

/// Where a scenario's screenshots go.
fn screenshots(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("console-screenshots")
        .join(name)
}

/// Runs `scenario` of the browser tests against `service`; fails the test with its
/// output if it fails or outlasts its patience. A scenario that asks for a restart
/// (`HANDOFF restart` on its stdout) gets one, and `done` on its stdin.
async fn run_scenario(scenario: &str, service: &mut Service, params: serde_json::Value) {
    use std::io::{BufRead as _, Write as _};

    let _one_at_a_time = BROWSER.lock().await;
    let mut child = Command::new("node")
        .arg("tests/console.mjs")
        .arg(scenario)
        .arg(service.url())
        .arg(params.to_string())
        .current_dir(console_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node starts");
    let pid = child.id();
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let stdout = child.stdout.take().expect("stdout is piped");
    let (lines, mut said) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let mut printed = String::new();
    let talk = async {
        while let Some(line) = said.recv().await {
            if line == "HANDOFF restart" {
                service.restart().await;
                writeln!(stdin, "done").expect("the scenario reads its stdin");
            }
            printed.push_str(&line);
            printed.push('\n');
        }
    };
    if tokio::time::timeout(SCENARIO_PATIENCE, talk).await.is_err() {
        signal_process(pid, "KILL");
        panic!("browser scenario {scenario} still running after {SCENARIO_PATIENCE:?}:\n{printed}");
    }
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .expect("the scenario's exit");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "browser scenario {scenario} failed:\n{printed}\n{stderr}"
    );
    println!("{printed}");
}

/// The real binary on a fresh database (and Redis prefix, clustered), with a known
/// admin token.
struct Service {
    process: Option<ServiceProcess>,
    env: Vec<(String, String)>,
    backend: Backend,
    database: String,
    /// Its certificate, when it serves over TLS.
    pki: Option<Pki>,
}

impl Service {
    async fn start(backend: Backend, extra: &[(&str, &str)]) -> Self {
        Self::start_with(backend, extra, None).await
    }

    /// The service over TLS, with a certificate for localhost from a CA of the test's.
    async fn start_over_tls(backend: Backend, extra: &[(&str, &str)]) -> Self {
        Self::start_with(backend, extra, Some(Pki::generate())).await
    }

    async fn start_with(backend: Backend, extra: &[(&str, &str)], pki: Option<Pki>) -> Self {
        let database = backend.fresh_database();
        let mut env: Vec<(String, String)> = vec![
            ("DATABASE_URL".into(), backend.database_url(&database)),
            ("RESTOCK_ADMIN_TOKEN".into(), TOKEN.into()),
            ("RESTOCK_API_RATE".into(), "100000".into()),
            // Slow enough that the page sees a run in progress.
            ("RESTOCK_SEND_RATE".into(), "100".into()),
        ];
        if backend == Backend::MySql {
            env.push(("REDIS_URL".into(), redis_url()));
            env.push((
                "RESTOCK_REDIS_PREFIX".into(),
                unique("restock-console:") + ":",
            ));
        }
        if let Some(pki) = &pki {
            env.push(("RESTOCK_TLS_CERT".into(), pki.cert.display().to_string()));
            env.push(("RESTOCK_TLS_KEY".into(), pki.key.display().to_string()));
        }
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut service = Self {
            process: None,
            env,
            backend,
            database,
            pki,
        };
        service.spawn(None).await;
        service
    }

    async fn spawn(&mut self, addr: Option<std::net::SocketAddr>) {
        let mut env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let listen = addr.map(|a| a.to_string());
        if let Some(listen) = &listen {
            env.push(("RESTOCK_LISTEN", listen));
        }
        self.process = Some(start_service(binary_command(&env)).await);
    }

    /// Stops the service gracefully (SIGTERM: streams end with their resume_after, runs
    /// are released) and starts it again on the same address and database.
    async fn restart(&mut self) {
        let process = self.process.take().expect("running");
        let addr = process.addr;
        process.signal("TERM");
        let stopped = process.finish().await;
        assert!(stopped.status.success(), "{stopped:?}");
        self.spawn(Some(addr)).await;
    }

    fn url(&self) -> String {
        match self.pki {
            Some(_) => format!("https://localhost:{}/", self.addr().port()),
            None => format!("http://{}/", self.addr()),
        }
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.process.as_ref().expect("running").addr
    }

    async fn client(&self) -> RestockServiceClient<tonic::transport::Channel> {
        match &self.pki {
            Some(pki) => RestockServiceClient::new(
                tls_channel(self.addr(), pki.ca_pem(), "localhost")
                    .await
                    .expect("connects to the service over TLS"),
            ),
            None => RestockServiceClient::connect(format!("http://{}", self.addr()))
                .await
                .expect("connects to the service"),
        }
    }

    async fn db(&self) -> AnyPool {
        sqlx::any::install_default_drivers();
        AnyPool::connect(&self.backend.database_url(&self.database))
            .await
            .expect("connects to the service's database")
    }

    /// Creates `product` (stock as given) with `users` registered in that order.
    async fn product(&self, product: i64, stock: i64, users: &[i64]) {
        let mut client = self.client().await;
        let request = proto::SetStockRequest {
            product_id: product,
            stock,
            ..Default::default()
        };
        client.set_stock(as_admin(request)).await.expect("SetStock");
        for &user in users {
            let request = proto::RegisterAlertRequest {
                product_id: product,
                user_id: user,
                once: false,
            };
            client
                .register_alert(as_admin(request))
                .await
                .expect("RegisterAlert");
        }
    }

    /// Triggers a restock of `product` and waits until its run completed.
    async fn trigger(&self, product: i64) {
        let mut client = self.client().await;
        let request = proto::TriggerRestockRequest {
            product_id: product,
            ..Default::default()
        };
        client
            .trigger_restock(as_admin(request))
            .await
            .expect("TriggerRestock");
        for _ in 0..600 {
            let request = proto::GetRestockRunRequest {
                product_id: product,
                restock_round: None,
            };
            let run = client.get_restock_run(as_admin(request)).await.unwrap();
            if run.into_inner().status == proto::RunStatus::Completed as i32 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the run of product {product} did not complete");
    }

    /// Makes the database refuse to record `user` once: the run that reaches it ends
    /// CANCELED_BY_ERROR (G4), and the failure is over by the time it is resumed (G6).
    async fn fail_recording_once(&self, user: i64) {
        let db = self.db().await;
        let statements = match self.backend {
            Backend::MySql => vec![
                "CREATE TABLE console_fault (armed INT NOT NULL)".to_string(),
                "INSERT INTO console_fault VALUES (1)".to_string(),
                format!(
                    "CREATE TRIGGER console_fail BEFORE INSERT ON product_user_notification_history \
                     FOR EACH ROW BEGIN \
                       IF NEW.user_id = {user} AND (SELECT armed FROM console_fault) = 1 THEN \
                         SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'injected failure'; \
                       END IF; \
                     END"
                ),
                "CREATE TRIGGER console_heal AFTER UPDATE ON product_notification_history \
                 FOR EACH ROW BEGIN \
                   IF NEW.status = 'CANCELED_BY_ERROR' THEN UPDATE console_fault SET armed = 0; END IF; \
                 END"
                    .to_string(),
            ],
            Backend::Embedded => vec![
                "CREATE TABLE console_fault (armed INTEGER NOT NULL)".to_string(),
                "INSERT INTO console_fault VALUES (1)".to_string(),
                format!(
                    "CREATE TRIGGER console_fail BEFORE INSERT ON product_user_notification_history \
                     FOR EACH ROW WHEN NEW.user_id = {user} AND (SELECT armed FROM console_fault) = 1 \
                     BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
                ),
                "CREATE TRIGGER console_heal AFTER UPDATE ON product_notification_history \
                 FOR EACH ROW WHEN NEW.status = 'CANCELED_BY_ERROR' \
                 BEGIN UPDATE console_fault SET armed = 0; END"
                    .to_string(),
            ],
        };
        for statement in statements {
            sqlx::raw_sql(&statement).execute(&db).await.unwrap();
        }
        db.close().await;
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(process) = &self.process {
            process.signal("KILL");
        }
        drop_database(self.backend, &self.database);
    }
}

/// Watch a run to COMPLETED (bar at queue_size, every notification in the feed), set
/// stock and trigger from the page, a failed run resumed with the token after a wrong
/// one, a wave run's next wave, the runs listed and filtered, a phone's screen.
async fn the_console_drives_and_follows_runs_in_a_browser(backend: Backend) {
    require_browser_tools();
    let mut service = Service::start(backend, &[]).await;
    let (product, failing, waves) = (1, 2, 3);
    let watched = users(1_000, 300);
    let failing_users = users(5_000, 40);
    let wave_users = users(9_000, 5);
    service.product(product, 0, &watched).await;
    service.product(failing, 5, &failing_users).await;
    service.product(waves, 0, &wave_users).await;
    service.fail_recording_once(failing_users[21]).await;

    let name = match backend {
        Backend::MySql => "clustered",
        Backend::Embedded => "embedded",
    };
    let params = serde_json::json!({
        "product": product,
        "users": watched,
        "failing": failing,
        "failingUsers": failing_users.len(),
        "waves": waves,
        "waveUsers": wave_users.len(),
        "token": TOKEN,
        "screenshots": screenshots(name),
    });
    run_scenario("operate", &mut service, params).await;
}

/// The service restarted under the page: the feed subscribes again with resume_after
/// and says so, shows every notification once, and the run is followed to its end.
async fn the_console_resumes_its_feed_and_watch_across_a_restart(backend: Backend) {
    require_browser_tools();
    let mut service = Service::start(backend, &[("RESTOCK_SEND_RATE", "20")]).await;
    let watched = users(2_000, 80);
    service.product(1, 5, &watched).await;
    let name = match backend {
        Backend::MySql => "clustered-restart",
        Backend::Embedded => "embedded-restart",
    };
    let params = serde_json::json!({
        "product": 1,
        "users": watched,
        "screenshots": screenshots(name),
    });
    run_scenario("resume", &mut service, params).await;
}

on_each_backend!(
    the_console_drives_and_follows_runs_in_a_browser,
    the_console_resumes_its_feed_and_watch_across_a_restart,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_console_off_no_page_is_served_to_a_browser() {
    require_browser_tools();
    let mut service = Service::start(Backend::Embedded, &[("RESTOCK_CONSOLE", "off")]).await;
    run_scenario("off", &mut service, serde_json::json!({})).await;
}

/// The demand report and the alert lookup: products with the most users waiting
/// first, and what the latest round did with a user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_demand_and_looks_up_an_alert() {
    require_browser_tools();
    let mut service = Service::start(Backend::Embedded, &[("RESTOCK_SEND_RATE", "1000")]).await;
    service.product(1, 5, &users(101, 3)).await;
    service.product(2, 5, &users(201, 1)).await;
    service.product(3, 5, &users(301, 2)).await;
    service.trigger(1).await;
    // Registered after round 1 started: behind its queue.
    service.product(1, 5, &[104]).await;
    let params = serde_json::json!({
        "product": 1,
        "expected": [[1, 4], [3, 2], [2, 1]],
        "notified": 101,
        "after": { "user": 104, "position": 4 },
        "screenshots": screenshots("embedded-demand"),
    });
    run_scenario("demand", &mut service, params).await;
}

/// With a caller policy, the page asks for a token when a call answers
/// UNAUTHENTICATED, sends it on every call, and shows PERMISSION_DENIED like any error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_asks_for_a_token_when_the_service_knows_its_callers() {
    require_browser_tools();
    let reader = "console-reader-token";
    let digest: String = sha2::Sha256::digest(reader.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let callers = std::env::temp_dir().join(unique("restock-console-callers-") + ".toml");
    std::fs::write(
        &callers,
        format!(
            "[[caller]]\nname = \"support\"\ntoken_sha256 = [\"{digest}\"]\nroles = [\"read\"]\n"
        ),
    )
    .unwrap();
    let path = callers.display().to_string();
    let mut service =
        Service::start(Backend::Embedded, &[("RESTOCK_CALLERS", path.as_str())]).await;
    service.product(1, 5, &users(1, 3)).await;
    service.trigger(1).await;
    let params = serde_json::json!({
        "product": 1,
        "reader": reader,
        "screenshots": screenshots("embedded-token"),
    });
    run_scenario("token", &mut service, params).await;
    let _ = std::fs::remove_file(callers);
}

/// Over TLS (RESTOCK_TLS_CERT and RESTOCK_TLS_KEY), the browser loads the page and
/// speaks gRPC-web over HTTP/2, the protocol the server offers: the same scenario as
/// above, restart included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_over_tls() {
    require_browser_tools();
    let mut service =
        Service::start_over_tls(Backend::Embedded, &[("RESTOCK_SEND_RATE", "20")]).await;
    let watched = users(3_000, 60);
    service.product(1, 5, &watched).await;
    let params = serde_json::json!({
        "product": 1,
        "users": watched,
        "screenshots": screenshots("embedded-tls"),
    });
    run_scenario("resume", &mut service, params).await;
}
