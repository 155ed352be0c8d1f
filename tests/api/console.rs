//! The console's page and gRPC-web on the gRPC address, over plain HTTP/1.1 as a
//! browser speaks it: the page's files, `RESTOCK_CONSOLE=off`, gRPC-web calls under the
//! same admin token check and API rate limit as any call, and CORS for other origins.
//! (The page itself, in a browser, is tested in `tests/console/browser.rs`.)

use restock_notifier::config::{CorsOrigins, Switch};
use restock_notifier::console::ConsoleLayer;
use restock_notifier::grpc::proto;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::helpers::*;

/// An HTTP/1.1 exchange on a connection of its own: the whole response as received,
/// as text.
async fn http1(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> String {
    String::from_utf8_lossy(&http1_bytes(addr, head, body).await).into_owned()
}

/// The same, byte for byte.
async fn http1_bytes(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> Vec<u8> {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!(
        "{head}\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    conn.write_all(&request).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        conn.read_to_end(&mut response),
    )
    .await
    .expect("the service answers within 10 s")
    .unwrap();
    response
}

/// `GET path` with `headers` (lines `Name: value`), as text.
async fn get(addr: std::net::SocketAddr, path: &str, headers: &[&str]) -> String {
    let mut head = format!("GET {path} HTTP/1.1");
    for line in headers {
        head.push_str("\r\n");
        head.push_str(line);
    }
    http1(addr, &head, b"").await
}

fn status_line(response: &str) -> &str {
    response.lines().next().unwrap_or_default()
}

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    let (head, _) = response.split_once("\r\n\r\n")?;
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

/// A gRPC-web call (binary) as connect-web sends it, with `extra` header lines.
async fn grpc_web(
    addr: std::net::SocketAddr,
    method: &str,
    message: impl prost::Message,
    extra: &[&str],
) -> String {
    let encoded = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
    frame.extend_from_slice(&encoded);
    let mut head = format!(
        "POST /restock.v1.{method} HTTP/1.1\r\ncontent-type: application/grpc-web+proto\r\n\
         x-grpc-web: 1\r\naccept: application/grpc-web+proto"
    );
    for line in extra {
        head.push_str("\r\n");
        head.push_str(line);
    }
    http1(addr, &head, &frame).await
}

/// `GetRestockRun` of a product that has no run, over gRPC-web: a cheap call whose
/// answer (NOT_FOUND) shows it reached the service.
async fn get_missing_run(addr: std::net::SocketAddr, extra: &[&str]) -> String {
    let request = proto::GetRestockRunRequest {
        product_id: 77,
        restock_round: None,
    };
    grpc_web(addr, "RestockService/GetRestockRun", request, extra).await
}

/// The call's `grpc-status`: in the headers (an answer without messages) or in the
/// trailer frame at the end of the body.
fn grpc_status(response: &str) -> i32 {
    let lower = response.to_ascii_lowercase();
    let at = lower
        .find("grpc-status:")
        .unwrap_or_else(|| panic!("no grpc-status in {response:?}"));
    lower[at + "grpc-status:".len()..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

async fn the_page_is_served_at_the_root_of_the_grpc_address(backend: Backend) {
    let app = spawn_app(backend).await;
    let page = http1(app.addr, "GET / HTTP/1.1", b"").await;
    assert!(status_line(&page).contains(" 200 "), "{page}");
    assert_eq!(
        header(&page, "content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(page.contains("data-testid=\"product-id\""), "{page}");
    let script = http1(app.addr, "GET /app.js HTTP/1.1", b"").await;
    assert!(status_line(&script).contains(" 200 "), "{script}");
    assert!(
        header(&script, "content-type").is_some_and(|t| t.starts_with("text/javascript")),
        "{script}"
    );
    // Revalidated by its tag: unchanged, nothing is sent again.
    let tag = header(&script, "etag").expect("an ETag").to_string();
    let again = get(app.addr, "/app.js", &[&format!("If-None-Match: {tag}")]).await;
    assert!(status_line(&again).contains(" 304 "), "{again}");
    let missing = http1(app.addr, "GET /nothing-here HTTP/1.1", b"").await;
    assert!(status_line(&missing).contains(" 404 "), "{missing}");
    // Native gRPC on the same address is untouched.
    assert_code(app.get_run(77, None).await, tonic::Code::NotFound);
}

async fn with_the_console_off_the_root_is_not_found(backend: Backend) {
    let mut options = Options::new(backend);
    options.console = Switch::Off;
    let app = spawn_app_with(options).await;
    let page = http1(app.addr, "GET / HTTP/1.1", b"").await;
    assert!(status_line(&page).contains(" 404 "), "{page}");
    assert!(!page.contains("data-testid"), "{page}");
    // gRPC-web calls are still served.
    let call = get_missing_run(app.addr, &[]).await;
    assert_eq!(grpc_status(&call), tonic::Code::NotFound as i32, "{call}");
}

async fn a_grpc_web_call_over_http1_is_served_like_any_call(backend: Backend) {
    let app = spawn_app(backend).await;
    app.set_stock(5, 3).await;
    let call = grpc_web(
        app.addr,
        "RestockService/SetStock",
        proto::SetStockRequest {
            product_id: 5,
            stock: 9,
            ..Default::default()
        },
        &[],
    )
    .await;
    assert!(status_line(&call).contains(" 200 "), "{call}");
    assert_eq!(grpc_status(&call), 0, "{call}");
    assert!(
        header(&call, "content-type").is_some_and(|t| t.starts_with("application/grpc-web")),
        "{call}"
    );
    let refused = grpc_web(
        app.addr,
        "RestockService/SetStock",
        proto::SetStockRequest {
            product_id: 0,
            stock: 1,
            ..Default::default()
        },
        &[],
    )
    .await;
    assert_eq!(
        grpc_status(&refused),
        tonic::Code::InvalidArgument as i32,
        "{refused}"
    );
    // The call took effect, as a native one would have.
    let run = app.trigger(5, None).await.expect("TriggerRestock");
    assert_eq!(run.product_id, 5);
}

async fn grpc_web_admin_calls_need_the_admin_token(backend: Backend) {
    let app = spawn_app(backend).await;
    // `ManualRestock` of product 8 over gRPC-web, with `extra` header lines.
    let manual_restock = async |extra: &[&str]| {
        let request = proto::ManualRestockRequest { product_id: 8 };
        grpc_web(
            app.addr,
            "RestockAdminService/ManualRestock",
            request,
            extra,
        )
        .await
    };
    for refused in [
        manual_restock(&[]).await,
        manual_restock(&["authorization: Bearer wrong"]).await,
    ] {
        assert_eq!(
            grpc_status(&refused),
            tonic::Code::Unauthenticated as i32,
            "{refused}"
        );
    }
    // Past the check: product 8 has no run to resume.
    let right = manual_restock(&[&format!("authorization: Bearer {ADMIN_TOKEN}")]).await;
    let code = grpc_status(&right);
    assert!(
        code == tonic::Code::NotFound as i32 || code == tonic::Code::FailedPrecondition as i32,
        "{right}"
    );
}

async fn grpc_web_calls_count_against_the_api_rate_limit(backend: Backend) {
    let mut options = Options::new(backend);
    options.api_rate = 3;
    let app = spawn_app_with(options).await;
    let mut codes = Vec::new();
    for _ in 0..8 {
        let call = get_missing_run(app.addr, &[]).await;
        codes.push(grpc_status(&call));
    }
    // A burst of 3, then one every third of a second: most of 8 quick calls are refused.
    assert!(
        codes.contains(&(tonic::Code::ResourceExhausted as i32)),
        "{codes:?}"
    );
    assert_eq!(codes[0], tonic::Code::NotFound as i32, "{codes:?}");
}

async fn listed_origins_get_cors_answers_and_preflights_are_not_rate_limited(backend: Backend) {
    let mut options = Options::new(backend);
    options.api_rate = 1;
    options.cors_origins = Some(CorsOrigins(vec![http::HeaderValue::from_static(
        "http://ops.example",
    )]));
    let app = spawn_app_with(options).await;
    let preflight = "OPTIONS /restock.v1.RestockService/GetRestockRun HTTP/1.1\r\n\
                     Origin: http://ops.example\r\n\
                     Access-Control-Request-Method: POST\r\n\
                     Access-Control-Request-Headers: content-type,x-grpc-web,authorization";
    for _ in 0..5 {
        let answer = http1(app.addr, preflight, b"").await;
        assert!(status_line(&answer).contains(" 200 "), "{answer}");
        assert_eq!(
            header(&answer, "access-control-allow-origin"),
            Some("http://ops.example"),
            "{answer}"
        );
    }
    let call = get_missing_run(app.addr, &["Origin: http://ops.example"]).await;
    // The preflights did not use up the limit of 1 a second.
    assert_eq!(grpc_status(&call), tonic::Code::NotFound as i32, "{call}");
    assert_eq!(
        header(&call, "access-control-allow-origin"),
        Some("http://ops.example")
    );
    assert!(
        header(&call, "access-control-expose-headers").is_some_and(|h| h.contains("grpc-status")),
        "{call}"
    );
    let stranger = preflight.replace("http://ops.example", "http://elsewhere.example");
    let refused = http1(app.addr, &stranger, b"").await;
    assert_eq!(
        header(&refused, "access-control-allow-origin"),
        None,
        "{refused}"
    );
}

#[tokio::test]
async fn a_browser_that_accepts_gzip_gets_each_file_compressed_and_others_get_it_as_is() {
    let app = spawn_app(Backend::Embedded).await;
    for path in ["/", "/app.js", "/app.css"] {
        let original = ConsoleLayer::asset(path).unwrap();
        let response = http1_bytes(
            app.addr,
            &format!("GET {path} HTTP/1.1\r\nAccept-Encoding: gzip, deflate, br, zstd"),
            b"",
        )
        .await;
        let at = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a head");
        let head = String::from_utf8_lossy(&response[..at + 4]).into_owned();
        assert!(status_line(&head).contains(" 200 "), "{head}");
        assert_eq!(header(&head, "content-encoding"), Some("gzip"), "{head}");
        assert_eq!(header(&head, "vary"), Some("accept-encoding"), "{head}");
        assert_eq!(
            &response[at + 4..],
            ConsoleLayer::compressed_asset(path).unwrap(),
            "{path}: the copy compressed at build time"
        );
        let mut unpacked = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(&response[at + 4..]),
            &mut unpacked,
        )
        .unwrap();
        assert_eq!(unpacked, original, "{path} unpacks to the file");
        eprintln!(
            "{path}: {} bytes as is, {} gzipped",
            original.len(),
            response.len() - at - 4
        );
        // The compressed copy has a tag of its own, and revalidates by it.
        let gzip_tag = header(&head, "etag").expect("an ETag").to_string();
        let plain = get(app.addr, path, &[]).await;
        assert_eq!(header(&plain, "content-encoding"), None, "{plain}");
        assert_eq!(
            header(&plain, "content-length"),
            Some(original.len().to_string().as_str())
        );
        assert_ne!(header(&plain, "etag"), Some(gzip_tag.as_str()));
        let revalidation = format!("If-None-Match: {gzip_tag}");
        let again = get(app.addr, path, &["Accept-Encoding: gzip", &revalidation]).await;
        assert!(status_line(&again).contains(" 304 "), "{again}");
        let refused = get(app.addr, path, &["Accept-Encoding: gzip;q=0"]).await;
        assert_eq!(header(&refused, "content-encoding"), None, "{refused}");
    }
}

on_each_backend!(
    the_page_is_served_at_the_root_of_the_grpc_address,
    with_the_console_off_the_root_is_not_found,
    a_grpc_web_call_over_http1_is_served_like_any_call,
    grpc_web_admin_calls_need_the_admin_token,
    grpc_web_calls_count_against_the_api_rate_limit,
    listed_origins_get_cors_answers_and_preflights_are_not_rate_limited,
);
