//! gRPC over TLS: with RESTOCK_TLS_CERT and RESTOCK_TLS_KEY the server speaks TLS only,
//! and the container health check still gets its answer.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use restock_notifier::config::Config;
use restock_notifier::grpc::proto;
use restock_notifier::grpc::proto::restock_service_client::RestockServiceClient;
use restock_notifier::startup::Application;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::{Pki, tls_channel};

/// The server, in this process, on an embedded SQLite file, over TLS with `pki`.
struct TlsApp {
    addr: SocketAddr,
    database: PathBuf,
    stop: Option<oneshot::Sender<()>>,
}

impl TlsApp {
    async fn spawn(pki: &Pki) -> Self {
        let database = std::env::temp_dir().join(format!(
            "restock-tls-test-{:016x}.db",
            rand::random::<u64>()
        ));
        let config = Config {
            redis_prefix: "restock-tls-test:".into(),
            send_rate: NonZeroU32::new(1_000).unwrap(),
            api_rate: NonZeroU32::new(1_000).unwrap(),
            admin_token: Some(crate::helpers::ADMIN_TOKEN.into()),
            metrics_listen: restock_notifier::config::MetricsListen::Off,
            tls_cert: Some(pki.cert.clone()),
            tls_key: Some(pki.key.clone()),
            ..crate::helpers::test_config(format!("sqlite://{}", database.display()))
        };
        let app = Application::build(config)
            .await
            .expect("the application starts over TLS");
        let addr = app.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            database,
            stop: Some(stop),
        }
    }
}

impl Drop for TlsApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.database.display()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_a_client_trusting_the_ca_is_served_and_a_plaintext_client_is_not() {
    let pki = Pki::generate();
    let app = TlsApp::spawn(&pki).await;

    for domain in ["localhost", "127.0.0.1"] {
        let channel = tls_channel(app.addr, pki.ca_pem(), domain)
            .await
            .expect("a TLS client trusting the CA connects");
        let product = RestockServiceClient::new(channel.clone())
            .set_stock(proto::SetStockRequest {
                product_id: 7,
                stock: 3,
                ..Default::default()
            })
            .await
            .expect("SetStock over TLS")
            .into_inner();
        assert_eq!(product.stock, 3);
        let health = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health Check over TLS")
            .into_inner();
        assert_eq!(health.status(), ServingStatus::Serving);
    }

    // A client that does not trust the CA is refused by its own TLS check.
    let stranger = Pki::generate();
    let refused = tls_channel(app.addr, stranger.ca_pem(), "localhost").await;
    assert!(refused.is_err(), "a client with another CA connected");

    // Plaintext HTTP/2 to the TLS listener: the connection or the call fails, and the
    // call never reaches the service.
    let plaintext = async {
        let channel = Channel::from_shared(format!("http://{}", app.addr))
            .unwrap()
            .connect()
            .await
            .map_err(|e| format!("{e:?}"))?;
        RestockServiceClient::new(channel)
            .set_stock(proto::SetStockRequest {
                product_id: 8,
                stock: 1,
                ..Default::default()
            })
            .await
            .map_err(|status| format!("{status:?}"))
    };
    let result = tokio::time::timeout(Duration::from_secs(10), plaintext)
        .await
        .expect("the plaintext attempt ends within 10 s");
    assert!(result.is_err(), "a plaintext call was served: {result:?}");
}

/// A TLS client (blocking rustls) that trusts `ca_pem` and offers `alpn` (none when
/// empty): the protocol the server chose, and, unless that is HTTP/2, its answer to
/// `GET /` over HTTP/1.1.
fn https_get(addr: SocketAddr, ca_pem: &[u8], alpn: &[&[u8]]) -> (Option<Vec<u8>>, String) {
    use std::io::{Read as _, Write as _};
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, ServerName};

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut socket = std::net::TcpStream::connect(addr).unwrap();
    // Shorter than the server's handshake timeout: a server that handled handshakes one
    // at a time, behind a silent client, would not answer within it.
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut socket).expect("the handshake");
    }
    let chosen = conn.alpn_protocol().map(<[u8]>::to_vec);
    if chosen.as_deref() == Some(b"h2") {
        return (chosen, String::new());
    }
    let mut tls = rustls::Stream::new(&mut conn, &mut socket);
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = Vec::new();
    match tls.read_to_end(&mut response) {
        Ok(_) => {}
        // A server that closes without close_notify after a complete answer.
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
        Err(err) => panic!("reading the answer: {err}"),
    }
    (chosen, String::from_utf8_lossy(&response).into_owned())
}

/// Over TLS, ALPN offers HTTP/2 and HTTP/1.1, HTTP/2 first: a client offering both gets
/// HTTP/2, and one offering HTTP/1.1 only, or asking for no protocol (as many proxies
/// do towards their upstream), is served the console's page over HTTP/1.1. All of them
/// while another client sits on a connection without ever starting its handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_alpn_offers_http2_first_and_http1_to_clients_that_want_it() {
    let pki = Pki::generate();
    let app = TlsApp::spawn(&pki).await;
    let (addr, ca) = (app.addr, pki.ca_pem());
    // A client that connects and never starts its handshake holds up no other.
    let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let [both, only_http1, none] = tokio::task::spawn_blocking(move || {
        [
            https_get(addr, &ca, &[b"http/1.1", b"h2"]),
            https_get(addr, &ca, &[b"http/1.1"]),
            https_get(addr, &ca, &[]),
        ]
    })
    .await
    .unwrap();
    assert_eq!(both.0.as_deref(), Some(b"h2".as_slice()), "HTTP/2 first");
    assert_eq!(only_http1.0.as_deref(), Some(b"http/1.1".as_slice()));
    assert_eq!(none.0, None);
    for (chosen, page) in [only_http1, none] {
        assert!(page.starts_with("HTTP/1.1 200 "), "{chosen:?}: {page}");
        assert!(page.contains("data-testid=\"product-id\""), "{page}");
    }
}

/// Runs `restock-healthcheck ADDR` with only the given environment.
fn healthcheck(addr: SocketAddr, env: &[(&str, &std::ffi::OsStr)]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_restock-healthcheck"))
        .env_clear()
        .envs(env.iter().copied())
        .arg(addr.to_string())
        .output()
        .expect("the health check runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_healthcheck_binary_speaks_tls_when_told_which_ca_to_trust() {
    let pki = Pki::generate();
    let app = TlsApp::spawn(&pki).await;
    let addr = app.addr;

    let trusted = tokio::task::spawn_blocking({
        let ca = pki.ca.clone();
        move || healthcheck(addr, &[("RESTOCK_HEALTHCHECK_CA", ca.as_os_str())])
    })
    .await
    .unwrap();
    assert!(
        trusted.status.success(),
        "{}",
        String::from_utf8_lossy(&trusted.stderr)
    );

    // In plaintext (no CA, no RESTOCK_TLS_CERT) it cannot reach a TLS server.
    let plaintext = tokio::task::spawn_blocking(move || healthcheck(addr, &[]))
        .await
        .unwrap();
    assert!(!plaintext.status.success());

    // Given no CA, it trusts the service's own RESTOCK_TLS_CERT: that fits a
    // self-signed certificate (the README's recipe), not one a CA signed.
    let signed_by_ca = tokio::task::spawn_blocking({
        let cert = pki.cert.clone();
        move || healthcheck(addr, &[("RESTOCK_TLS_CERT", cert.as_os_str())])
    })
    .await
    .unwrap();
    assert!(!signed_by_ca.status.success());

    let self_signed = Pki::self_signed();
    let app = TlsApp::spawn(&self_signed).await;
    let addr = app.addr;
    let own_cert = tokio::task::spawn_blocking({
        let cert = self_signed.cert.clone();
        move || healthcheck(addr, &[("RESTOCK_TLS_CERT", cert.as_os_str())])
    })
    .await
    .unwrap();
    assert!(
        own_cert.status.success(),
        "{}",
        String::from_utf8_lossy(&own_cert.stderr)
    );
}

/// A Redis server of its own that accepts only TLS, with `pki`'s certificate; killed on
/// drop.
struct TlsRedis {
    process: std::process::Child,
    port: u16,
}

impl TlsRedis {
    async fn start(pki: &Pki) -> Self {
        // redis-server only takes a port number (`--port 0` turns TCP off rather than
        // choosing one), so a free one is probed for it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let process = std::process::Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .arg("--tls-cert-file")
            .arg(&pki.cert)
            .arg("--tls-key-file")
            .arg(&pki.key)
            .arg("--tls-ca-cert-file")
            .arg(&pki.ca)
            .args([
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (with TLS support) is installed");
        crate::helpers::wait_until_listening(port, "the TLS redis-server").await;
        Self { process, port }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rediss_url_connects_over_tls_and_verifies_the_server() {
    let pki = Pki::generate();
    let redis = TlsRedis::start(&pki).await;
    let redis_url = format!("rediss://localhost:{}", redis.port);
    let database_url = crate::helpers::temp_sqlite_url();
    let ca = pki.ca.to_string_lossy();
    let settings = [
        ("DATABASE_URL", database_url.as_str()),
        ("REDIS_URL", redis_url.as_str()),
        ("RESTOCK_ADMIN_TOKEN", "tls-test-token"),
    ];

    // Trusting the test CA (rustls reads SSL_CERT_FILE as the system's roots), the
    // service starts clustered on the TLS-only Redis.
    let mut trusting = settings.to_vec();
    trusting.push(("SSL_CERT_FILE", &ca));
    let output = crate::helpers::start_and_stop_binary(&trusting).await;
    let log = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{log}");
    assert!(log.contains("deployment=\"clustered\""), "{log}");

    // Without it, the server's certificate is not trusted and the start is refused.
    let mut refusing = settings.to_vec();
    let empty = pki.ca.with_file_name("no-roots.pem");
    std::fs::write(&empty, "").unwrap();
    let empty = empty.to_string_lossy();
    refusing.push(("SSL_CERT_FILE", &empty));
    let output = crate::helpers::run_binary(&refusing, &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("REDIS_URL"), "{stderr}");
    assert!(stderr.contains("InvalidCertificate"), "{stderr}");

    let file = database_url.trim_start_matches("sqlite://");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{file}{suffix}"));
    }
}
