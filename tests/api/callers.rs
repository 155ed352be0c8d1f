//! Callers and roles: bearer tokens and client certificates name a caller of
//! RESTOCK_CALLERS; each role may call exactly its methods; SIGHUP reads the file
//! again; the API rate limit counts per caller; x-forwarded-for counts only from a
//! trusted proxy; write and admin calls leave audit lines.

use std::path::PathBuf;
use std::time::Duration;

use restock_notifier::callers::TrustedProxies;
use restock_notifier::grpc::proto::restock_admin_service_client::RestockAdminServiceClient;
use restock_notifier::grpc::proto::restock_service_client::RestockServiceClient;
use restock_notifier::grpc::proto::{self};
use sha2::{Digest as _, Sha256};
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::helpers::{
    ADMIN_TOKEN, Backend, Options, TestApp, binary_command, spawn_app_with, start_service,
    temp_sqlite_url,
};

fn sha256_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A callers file of the test's own, removed on drop.
struct CallersFile(PathBuf);

impl CallersFile {
    fn new(text: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "restock-callers-{:016x}.toml",
            rand::random::<u64>()
        ));
        std::fs::write(&path, text).unwrap();
        Self(path)
    }

    fn rewrite(&self, text: &str) {
        std::fs::write(&self.0, text).unwrap();
    }
}

impl Drop for CallersFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const READER: &str = "reader-token-0123456789";
const WRITER: &str = "writer-token-0123456789";

/// A reader and a writer, each by its token.
fn policy() -> String {
    format!(
        "[[caller]]\nname = \"support\"\ntoken_sha256 = [\"{}\"]\nroles = [\"read\"]\n\n\
         [[caller]]\nname = \"inventory\"\ntoken_sha256 = [\"{}\"]\nroles = [\"write\"]\n",
        sha256_hex(READER),
        sha256_hex(WRITER)
    )
}

fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

/// The code each RPC is answered with when called with `token` (`Ok` when it got
/// past authorization and was answered without error).
async fn codes(channel: Channel, token: Option<&str>) -> Vec<(&'static str, Code)> {
    let mut client = RestockServiceClient::new(channel.clone());
    let mut admin = RestockAdminServiceClient::new(channel);
    fn code<T>(answer: Result<T, tonic::Status>) -> Code {
        answer.map_or_else(|status| status.code(), |_| Code::Ok)
    }
    let product = proto::SetStockRequest {
        product_id: 1,
        stock: 5,
        ..Default::default()
    };
    let alert = proto::RegisterAlertRequest {
        product_id: 1,
        user_id: 1,
        once: false,
    };
    let cancel = proto::CancelAlertRequest {
        product_id: 1,
        user_id: 1,
    };
    vec![
        (
            "SetStock",
            code(client.set_stock(with_token(product, token)).await),
        ),
        (
            "RegisterAlert",
            code(client.register_alert(with_token(alert, token)).await),
        ),
        (
            "CancelAlert",
            code(client.cancel_alert(with_token(cancel, token)).await),
        ),
        (
            "TriggerRestock",
            code(
                client
                    .trigger_restock(with_token(
                        proto::TriggerRestockRequest {
                            product_id: 1,
                            ..Default::default()
                        },
                        token,
                    ))
                    .await,
            ),
        ),
        (
            "GetRestockRun",
            code(
                client
                    .get_restock_run(with_token(
                        proto::GetRestockRunRequest {
                            product_id: 1,
                            restock_round: None,
                        },
                        token,
                    ))
                    .await,
            ),
        ),
        (
            "WatchRestockRun",
            code(
                client
                    .watch_restock_run(with_token(
                        proto::WatchRestockRunRequest {
                            product_id: 1,
                            restock_round: None,
                        },
                        token,
                    ))
                    .await,
            ),
        ),
        (
            "ListRestockRuns",
            code(
                client
                    .list_restock_runs(with_token(proto::ListRestockRunsRequest::default(), token))
                    .await,
            ),
        ),
        (
            "Subscribe",
            code(
                client
                    .subscribe(with_token(proto::SubscribeRequest::default(), token))
                    .await,
            ),
        ),
        (
            "GetProduct",
            code(
                client
                    .get_product(with_token(
                        proto::GetProductRequest { product_id: 1 },
                        token,
                    ))
                    .await,
            ),
        ),
        (
            "ListProducts",
            code(
                client
                    .list_products(with_token(proto::ListProductsRequest::default(), token))
                    .await,
            ),
        ),
        (
            "ListAlerts",
            code(
                client
                    .list_alerts(with_token(
                        proto::ListAlertsRequest {
                            product_id: Some(1),
                            ..Default::default()
                        },
                        token,
                    ))
                    .await,
            ),
        ),
        (
            "GetAlert",
            code(
                client
                    .get_alert(with_token(
                        proto::GetAlertRequest {
                            product_id: 1,
                            user_id: 1,
                        },
                        token,
                    ))
                    .await,
            ),
        ),
        (
            "ManualRestock",
            code(
                admin
                    .manual_restock(with_token(
                        proto::ManualRestockRequest { product_id: 1 },
                        token,
                    ))
                    .await,
            ),
        ),
        (
            "ForgetUser",
            code(
                admin
                    .forget_user(with_token(proto::ForgetUserRequest { user_id: 1 }, token))
                    .await,
            ),
        ),
    ]
}

const READ_METHODS: [&str; 8] = [
    "GetRestockRun",
    "WatchRestockRun",
    "ListRestockRuns",
    "Subscribe",
    "GetProduct",
    "ListProducts",
    "ListAlerts",
    "GetAlert",
];
const WRITE_METHODS: [&str; 4] = ["SetStock", "RegisterAlert", "CancelAlert", "TriggerRestock"];
const ADMIN_METHODS: [&str; 2] = ["ManualRestock", "ForgetUser"];

async fn app_with(text: &str, configure: impl FnOnce(&mut Options)) -> (TestApp, CallersFile) {
    let file = CallersFile::new(text);
    let mut options = Options::new(Backend::Embedded);
    options.callers = Some(file.0.clone());
    configure(&mut options);
    (spawn_app_with(options).await, file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_may_call_exactly_its_methods() {
    let (app, _file) = app_with(&policy(), |_| {}).await;
    let allowed = |code: Code| !matches!(code, Code::Unauthenticated | Code::PermissionDenied);
    for (method, code) in codes(app.channel.clone(), Some(READER)).await {
        if READ_METHODS.contains(&method) {
            assert!(allowed(code), "read may call {method}: {code:?}");
        } else {
            assert_eq!(code, Code::PermissionDenied, "read may not call {method}");
        }
    }
    for (method, code) in codes(app.channel.clone(), Some(WRITER)).await {
        if ADMIN_METHODS.contains(&method) {
            assert_eq!(code, Code::PermissionDenied, "write may not call {method}");
        } else {
            assert!(allowed(code), "write may call {method}: {code:?}");
        }
    }
    for (method, code) in codes(app.channel.clone(), Some(ADMIN_TOKEN)).await {
        assert!(allowed(code), "admin may call {method}: {code:?}");
    }
    // A token nobody holds, then every RPC without credentials: each UNAUTHENTICATED
    // until ten failures from this address shut it out for a while, the right token
    // too.
    let mut client = RestockServiceClient::new(app.channel.clone());
    let list = || proto::ListRestockRunsRequest::default();
    let unknown = client.list_restock_runs(with_token(list(), Some("not-a-known-token")));
    assert_eq!(unknown.await.unwrap_err().code(), Code::Unauthenticated);
    for (i, (method, code)) in codes(app.channel.clone(), None)
        .await
        .into_iter()
        .enumerate()
    {
        let failure = i + 2;
        let expected = if failure <= 10 {
            Code::Unauthenticated
        } else {
            Code::ResourceExhausted
        };
        assert_eq!(
            code, expected,
            "{method} without credentials, failure {failure}"
        );
    }
    let shut_out = client.list_restock_runs(with_token(list(), Some(READER)));
    assert_eq!(shut_out.await.unwrap_err().code(), Code::ResourceExhausted);
    let samples = app.scrape().await;
    let denied = |reason: &str| {
        samples
            .get(&format!("restock_auth_denied_total{{reason=\"{reason}\"}}"))
            .copied()
    };
    // Read may not call 6 methods, write 2; 1 + 14 + 1 calls went without credentials
    // a caller has (the shut-out ones included).
    assert_eq!(denied("permission_denied"), Some(8.0));
    assert_eq!(denied("unauthenticated"), Some(16.0));
    assert_eq!(
        READ_METHODS.len() + WRITE_METHODS.len() + ADMIN_METHODS.len(),
        restock_notifier::grpc::authz::METHODS.len(),
        "every RPC is called above"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_call_names_the_role_it_needs_and_health_stays_open() {
    let (app, _file) = app_with(&policy(), |_| {}).await;
    let mut client = RestockServiceClient::new(app.channel.clone());
    let denied = client
        .set_stock(with_token(
            proto::SetStockRequest {
                product_id: 1,
                stock: 1,
                ..Default::default()
            },
            Some(READER),
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("write"), "{}", denied.message());
    let mut health = tonic_health::pb::health_client::HealthClient::new(app.channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    assert_eq!(
        status.into_inner().status,
        1,
        "SERVING, without credentials"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_callers_file_stops_the_service_naming_the_caller_and_field() {
    let file = CallersFile::new(
        "[[caller]]\nname = \"inventory\"\ncertificate = [\"spiffe://x\"]\nroles = [\"wrte\"]\n",
    );
    let config = restock_notifier::config::Config {
        callers: Some(file.0.clone()),
        ..crate::helpers::test_config(temp_sqlite_url())
    };
    let refused = restock_notifier::startup::Application::build(config)
        .await
        .err()
        .expect("the service refuses the file");
    let message = format!("{refused:#}");
    for part in ["RESTOCK_CALLERS", "inventory", "roles", "wrte"] {
        assert!(message.contains(part), "{part} in {message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_callers_from_one_address_have_budgets_of_their_own() {
    let (app, _file) = app_with(&policy(), |options| options.api_rate = 5).await;
    let mut client = RestockServiceClient::new(app.channel.clone());
    let list = |token| with_token(proto::ListRestockRunsRequest::default(), Some(token));
    for _ in 0..5 {
        client.list_restock_runs(list(READER)).await.unwrap();
    }
    let over = client.list_restock_runs(list(READER)).await.unwrap_err();
    assert_eq!(over.code(), Code::ResourceExhausted);
    // The other caller, from the same address, still has its whole budget.
    for _ in 0..5 {
        client.list_restock_runs(list(WRITER)).await.unwrap();
    }
}

/// Calls without credentials (no policy: the API is open) from "clients" that a proxy
/// names in x-forwarded-for.
async fn forwarded_calls(app: &TestApp, forwarded_for: &str, calls: usize) -> Vec<Code> {
    let mut client = RestockServiceClient::new(app.channel.clone());
    let mut codes = vec![];
    for _ in 0..calls {
        let mut request = Request::new(proto::ListRestockRunsRequest::default());
        request
            .metadata_mut()
            .insert("x-forwarded-for", forwarded_for.parse().unwrap());
        let answer = client.list_restock_runs(request).await;
        codes.push(answer.map_or_else(|s| s.code(), |_| Code::Ok));
    }
    codes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_counts_only_from_a_trusted_proxy() {
    let mut options = Options::new(Backend::Embedded);
    options.api_rate = 3;
    options.trusted_proxies = TrustedProxies::parse("127.0.0.1").unwrap();
    let app = spawn_app_with(options).await;
    let first = forwarded_calls(&app, "198.51.100.1", 4).await;
    assert_eq!(&first[..3], &[Code::Ok; 3]);
    assert_eq!(first[3], Code::ResourceExhausted);
    let second = forwarded_calls(&app, "198.51.100.2", 3).await;
    assert_eq!(second, vec![Code::Ok; 3], "another client behind the proxy");

    // Not trusted: the header is the client's own word, and every call counts under
    // its address.
    let mut options = Options::new(Backend::Embedded);
    options.api_rate = 3;
    let app = spawn_app_with(options).await;
    let mut codes = forwarded_calls(&app, "198.51.100.1", 2).await;
    codes.extend(forwarded_calls(&app, "198.51.100.2", 2).await);
    assert_eq!(codes[3], Code::ResourceExhausted, "{codes:?}");
}

/// The real binary with a callers file, on a database of its own: SIGHUP reads the
/// file again, and its log carries the audit lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_revokes_a_token_and_ends_its_stream_and_keeps_a_bad_file_out() {
    let file = CallersFile::new(&policy());
    let url = temp_sqlite_url();
    let callers = file.0.display().to_string();
    let mut command = binary_command(&[
        ("DATABASE_URL", url.as_str()),
        ("RESTOCK_CALLERS", callers.as_str()),
        ("RESTOCK_ADMIN_TOKEN", ADMIN_TOKEN),
    ]);
    command.stderr(std::process::Stdio::null());
    let service = start_service(command).await;
    let channel = Channel::from_shared(format!("http://{}", service.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = RestockServiceClient::new(channel);
    client
        .set_stock(with_token(
            proto::SetStockRequest {
                product_id: 7,
                stock: 3,
                ..Default::default()
            },
            Some(WRITER),
        ))
        .await
        .unwrap();
    let mut stream = client
        .subscribe(with_token(proto::SubscribeRequest::default(), Some(READER)))
        .await
        .unwrap()
        .into_inner();

    // A bad file is refused: the reader keeps its access.
    file.rewrite("[[caller]]\nname = \"support\"\n");
    service.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let list = |token| with_token(proto::ListRestockRunsRequest::default(), Some(token));
    client.list_restock_runs(list(READER)).await.unwrap();

    // The reader's caller is gone: its stream ends within a second, and so does its
    // access.
    file.rewrite(&format!(
        "[[caller]]\nname = \"inventory\"\ntoken_sha256 = [\"{}\"]\nroles = [\"write\"]\n",
        sha256_hex(WRITER)
    ));
    service.signal("HUP");
    let ended = tokio::time::timeout(Duration::from_secs(1), stream.message())
        .await
        .expect("the stream ends within a second");
    assert_eq!(ended.unwrap_err().code(), Code::PermissionDenied);
    let refused = client.list_restock_runs(list(READER)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    client.list_restock_runs(list(WRITER)).await.unwrap();

    service.signal("TERM");
    let output = service.finish().await;
    let log = String::from_utf8_lossy(&output.stdout);
    assert!(log.contains("callers file refused"), "{log}");
    let audit: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("restock::audit"))
        .collect();
    assert!(
        audit.iter().any(|l| l.contains("inventory")
            && l.contains("SetStock")
            && l.contains("product_id=7")),
        "{audit:?}"
    );
}

/// The service in this process over mutual TLS with `pki`, knowing `callers`; stopped
/// when the returned sender is dropped.
async fn spawn_mutual_tls(
    pki: &crate::helpers::Pki,
    callers: &CallersFile,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let config = restock_notifier::config::Config {
        admin_token: Some(ADMIN_TOKEN.into()),
        metrics_listen: restock_notifier::config::MetricsListen::Off,
        tls_cert: Some(pki.cert.clone()),
        tls_key: Some(pki.key.clone()),
        tls_client_ca: Some(pki.ca.clone()),
        callers: Some(callers.0.clone()),
        ..crate::helpers::test_config(temp_sqlite_url())
    };
    let app = restock_notifier::startup::Application::build(config)
        .await
        .expect("the service starts over mutual TLS");
    let addr = app.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    (addr, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_names_its_caller_and_others_are_refused() {
    let pki = crate::helpers::Pki::generate();
    let callers = CallersFile::new(&format!(
        "[[caller]]\nname = \"warehouse\"\n\
         certificate = [\"spiffe://shop.internal/inventory\"]\nroles = [\"write\"]\n\n\
         [[caller]]\nname = \"catalog\"\ncertificate = [\"catalog.shop.internal\"]\n\
         roles = [\"read\"]\n\n{}",
        policy()
    ));
    let (addr, _stop) = spawn_mutual_tls(&pki, &callers).await;
    let connect = |identity: Option<(String, String)>, ca: Vec<u8>| async move {
        crate::helpers::tls_channel_as(addr, ca, "localhost", identity.as_ref()).await
    };
    let set_stock = |channel: Channel, token: Option<&'static str>| async move {
        let request = proto::SetStockRequest {
            product_id: 3,
            stock: 2,
            ..Default::default()
        };
        RestockServiceClient::new(channel)
            .set_stock(with_token(request, token))
            .await
            .map_or_else(|s| s.code(), |_| Code::Ok)
    };

    // By URI SAN: the writer may write.
    let inventory = pki.client(Some("spiffe://shop.internal/inventory"), "ignored");
    let channel = connect(Some(inventory), pki.ca_pem()).await.unwrap();
    assert_eq!(set_stock(channel, None).await, Code::Ok);
    // By subject CN, without SANs: the reader may not.
    let catalog = pki.client(None, "catalog.shop.internal");
    let channel = connect(Some(catalog), pki.ca_pem()).await.unwrap();
    assert_eq!(set_stock(channel, None).await, Code::PermissionDenied);
    // A certificate of the CA whose identity no caller has: a token still names one.
    let stranger = pki.client(Some("spiffe://shop.internal/nobody"), "nobody");
    let channel = connect(Some(stranger), pki.ca_pem()).await.unwrap();
    assert_eq!(
        set_stock(channel.clone(), None).await,
        Code::Unauthenticated
    );
    assert_eq!(set_stock(channel, Some(WRITER)).await, Code::Ok);

    // No certificate, or one from another CA: refused at the handshake (or on the
    // first call, as TLS 1.3 reports a client certificate refused after the
    // handshake).
    let other = crate::helpers::Pki::generate();
    let foreign = other.client(Some("spiffe://shop.internal/inventory"), "inventory");
    for identity in [None, Some(foreign)] {
        let Ok(channel) = connect(identity, pki.ca_pem()).await else {
            continue; // refused at the handshake
        };
        let request = proto::SetStockRequest {
            product_id: 3,
            stock: 2,
            ..Default::default()
        };
        let mut client = RestockServiceClient::new(channel);
        let status = client
            .set_stock(with_token(request, Some(WRITER)))
            .await
            .expect_err("a client without a certificate of the CA is not served");
        // The connection was closed under the call: no answer of the service (which
        // has no transport error as its source).
        assert!(
            std::error::Error::source(&status).is_some(),
            "refused by the transport, not answered: {status:?}"
        );
    }
}
