//! The operator console: a web page served at `/` on the gRPC address, from files
//! embedded in the binary when it is built (`console/src/index.html` as written, and
//! `console/dist`, built from `console/src` and committed, so building the service
//! needs no Node.js; `build.rs` adds a gzip copy of each). The page calls the API
//! over gRPC-web from the same origin, through the same rate limit and admin token
//! check as any call.
//!
//! A tower layer in front of the gRPC router: it answers the browser's plain `GET`s
//! (the page, its script and style, 404 for anything else) and hands every other
//! request, gRPC and gRPC-web, to the router unchanged. Page loads are not API calls:
//! they are neither rate limited nor counted in the gRPC metrics. A browser that accepts
//! gzip gets the compressed copy, a third of the bytes.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::{Either, Ready, ready};
use http::header::{
    ACCEPT_ENCODING, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, ETAG,
    HeaderMap, HeaderValue, IF_NONE_MATCH, VARY,
};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use sha2::{Digest as _, Sha256};
use tonic::body::Body;
use tower::{Layer, Service};

/// A file of the page, as written or as the bundler wrote it, and gzip-compressed.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
    gzip: &'static [u8],
}

/// An embedded file of the console (`console/<source>/<name>`) and its compressed copy
/// from `build.rs`, served at `path`.
macro_rules! asset {
    ($path:literal, $content_type:literal, $source:literal, $name:literal) => {
        Asset {
            path: $path,
            content_type: $content_type,
            bytes: include_bytes!(concat!("../console/", $source, "/", $name)),
            gzip: include_bytes!(concat!(env!("OUT_DIR"), "/console/", $name, ".gz")),
        }
    };
}

const ASSETS: [Asset; 3] = [
    asset!("/", "text/html; charset=utf-8", "src", "index.html"),
    asset!(
        "/app.js",
        "text/javascript; charset=utf-8",
        "dist",
        "app.js"
    ),
    asset!("/app.css", "text/css; charset=utf-8", "dist", "app.css"),
];

/// The page loads nothing from elsewhere (no CDN, no web fonts) and talks only to its
/// own origin: a script injected through a rendered value could not phone home.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// One asset with the validators of its two encodings, computed once at start.
struct Served {
    asset: &'static Asset,
    etag: HeaderValue,
    gzip_etag: HeaderValue,
}

/// Serves the console's files, or none (`RESTOCK_CONSOLE=off`): every page request
/// then gets 404.
#[derive(Clone)]
pub struct ConsoleLayer {
    served: Arc<[Served]>,
}

impl ConsoleLayer {
    pub fn new(enabled: bool) -> Self {
        let served = if enabled {
            ASSETS
                .iter()
                .map(|asset| Served {
                    asset,
                    etag: etag(asset.bytes),
                    gzip_etag: etag(asset.gzip),
                })
                .collect()
        } else {
            Vec::new()
        };
        Self {
            served: served.into(),
        }
    }

    /// The bytes served at `path`, if the console serves it: for the tests of the
    /// service and the figures of its README.
    pub fn asset(path: &str) -> Option<&'static [u8]> {
        ASSETS.iter().find(|a| a.path == path).map(|a| a.bytes)
    }

    /// The same, gzip-compressed, as a browser that accepts gzip gets it.
    pub fn compressed_asset(path: &str) -> Option<&'static [u8]> {
        ASSETS.iter().find(|a| a.path == path).map(|a| a.gzip)
    }
}

/// A strong validator: the first 128 bits of the file's SHA-256, so a browser
/// revalidates with `If-None-Match` and gets 304 until the binary changes.
fn etag(bytes: &[u8]) -> HeaderValue {
    let digest = Sha256::digest(bytes);
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    HeaderValue::from_str(&format!("\"{hex}\"")).expect("hex digits make a header value")
}

impl<S> Layer<S> for ConsoleLayer {
    type Service = Console<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Console {
            inner,
            served: self.served.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Console<S> {
    inner: S,
    served: Arc<[Served]>,
}

/// Whether a request's `Accept-Encoding` takes gzip: with a weight above zero, given to
/// `gzip` by name or else to `*` (RFC 9110, 12.5.3). Without the header, no encoding is
/// assumed.
fn accepts_gzip(headers: &HeaderMap) -> bool {
    let mut gzip = None;
    let mut any = None;
    let items = headers
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','));
    for item in items {
        let mut parts = item.split(';').map(str::trim);
        let coding = parts.next().unwrap_or_default();
        let weight = parts
            .find_map(|p| p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")))
            .map_or(Some(1.0), |q| q.parse::<f32>().ok())
            .unwrap_or(0.0);
        // `x-gzip` is the same coding under its old name (RFC 9110, 8.4.1.3).
        if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            gzip = Some(weight);
        } else if coding == "*" {
            any = Some(weight);
        }
    }
    gzip.or(any).is_some_and(|weight| weight > 0.0)
}

/// Whether `If-None-Match` names `etag` (or is `*`): the client's copy is then current.
/// The comparison is weak, as RFC 9110 (13.1.2) has it for this header, since a cache
/// on the way may have marked a tag `W/`; the header may list several tags, as a cache
/// holding both encodings of a file does.
fn names_the_current_copy(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    let ours = etag.to_str().unwrap_or_default();
    headers
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == ours)
}

/// A browser's request for a page: a `GET` or `HEAD` that is not a gRPC call (gRPC and
/// gRPC-web calls are `POST`s with an `application/grpc...` content type).
fn is_page_request<B>(request: &Request<B>) -> bool {
    let grpc = request
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"application/grpc"));
    (request.method() == Method::GET || request.method() == Method::HEAD) && !grpc
}

impl<S, B> Service<Request<B>> for Console<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response<Body>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if is_page_request(&request) {
            Either::Left(ready(Ok(self.page(&request))))
        } else {
            Either::Right(self.inner.call(request))
        }
    }
}

impl<S> Console<S> {
    fn page<B>(&self, request: &Request<B>) -> Response<Body> {
        let path = request.uri().path();
        let path = if path == "/index.html" { "/" } else { path };
        let Some(served) = self.served.iter().find(|s| s.asset.path == path) else {
            let text = if self.served.is_empty() {
                "not found: the console is off (RESTOCK_CONSOLE=off)\n"
            } else {
                "not found: the console is at /\n"
            };
            return plain(StatusCode::NOT_FOUND, text);
        };
        let gzip = accepts_gzip(request.headers());
        let (bytes, etag) = if gzip {
            (served.asset.gzip, &served.gzip_etag)
        } else {
            (served.asset.bytes, &served.etag)
        };
        let builder = Response::builder()
            .header(ETAG, etag.clone())
            .header(VARY, "accept-encoding")
            // Revalidated on every load: the files change with the binary, not with
            // time, and a 304 costs one round trip.
            .header(CACHE_CONTROL, "no-cache")
            .header("x-content-type-options", "nosniff")
            .header("content-security-policy", CONTENT_SECURITY_POLICY)
            .header("referrer-policy", "no-referrer");
        let fresh = names_the_current_copy(request.headers(), etag);
        let response = if fresh {
            builder
                .status(StatusCode::NOT_MODIFIED)
                .body(Body::default())
        } else {
            let body = if request.method() == Method::HEAD {
                Body::default()
            } else {
                Body::new(Full::new(Bytes::from_static(bytes)))
            };
            let builder = builder
                .header(CONTENT_TYPE, served.asset.content_type)
                .header(CONTENT_LENGTH, bytes.len());
            match gzip {
                true => builder.header(CONTENT_ENCODING, "gzip").body(body),
                false => builder.body(body),
            }
        };
        response.expect("static parts make a response")
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "text/plain; charset=utf-8")
        .header("x-content-type-options", "nosniff")
        .body(Body::new(Full::new(Bytes::from_static(text.as_bytes()))))
        .expect("static parts make a response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_requests_are_gets_that_are_not_grpc_calls() {
        let get = Request::get("/").body(()).unwrap();
        assert!(is_page_request(&get));
        let grpc_web = Request::post("/restock.v1.RestockService/GetRestockRun")
            .header(CONTENT_TYPE, "application/grpc-web+proto")
            .body(())
            .unwrap();
        assert!(!is_page_request(&grpc_web));
        let odd = Request::get("/x")
            .header(CONTENT_TYPE, "application/grpc")
            .body(())
            .unwrap();
        assert!(!is_page_request(&odd));
    }

    #[test]
    fn gzip_is_taken_by_name_or_else_by_star_with_a_weight_above_zero() {
        let accepts = |value: Option<&str>| {
            let mut headers = HeaderMap::new();
            if let Some(value) = value {
                headers.insert(ACCEPT_ENCODING, HeaderValue::from_str(value).unwrap());
            }
            accepts_gzip(&headers)
        };
        assert!(accepts(Some("gzip, deflate, br, zstd")));
        assert!(accepts(Some("br;q=1.0, GZIP;q=0.5")));
        assert!(accepts(Some("*")));
        assert!(!accepts(None));
        assert!(!accepts(Some("identity")));
        assert!(!accepts(Some("br, gzip;q=0")));
        assert!(!accepts(Some("gzip;q=nonsense")));
        assert!(!accepts(Some("*;q=0.5, gzip;q=0")));
        assert!(accepts(Some("x-gzip")));
    }

    #[test]
    fn if_none_match_takes_a_list_weak_tags_and_a_star() {
        let etag = HeaderValue::from_static("\"abc\"");
        let matches = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(IF_NONE_MATCH, HeaderValue::from_str(value).unwrap());
            names_the_current_copy(&headers, &etag)
        };
        assert!(matches("\"abc\""));
        assert!(matches("\"xyz\", \"abc\""));
        assert!(matches("W/\"abc\""));
        assert!(matches("*"));
        assert!(!matches("\"abcd\""));
        assert!(!matches("\"xyz\""));
        assert!(!names_the_current_copy(&HeaderMap::new(), &etag));
    }

    #[test]
    fn every_asset_and_encoding_has_a_distinct_validator() {
        let layer = ConsoleLayer::new(true);
        let tags: std::collections::HashSet<_> = layer
            .served
            .iter()
            .flat_map(|s| [s.etag.clone(), s.gzip_etag.clone()])
            .collect();
        assert_eq!(tags.len(), 2 * ASSETS.len());
        assert!(ConsoleLayer::new(false).served.is_empty());
    }
}
