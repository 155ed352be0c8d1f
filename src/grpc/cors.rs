//! CORS for gRPC-web calls from pages of other origins (`RESTOCK_CORS_ORIGINS`). The
//! console needs none: it is served from the service's own origin.

use std::time::Duration;

use http::Method;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::CorsOrigins;

/// How long a browser may keep a preflight's answer: an hour, so a page that polls
/// does not send one before every call.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(3600);

/// Lets the listed origins make gRPC-web calls: `POST`s with the headers a gRPC-web
/// client sends (the admin token's `authorization` among them), and lets their pages
/// read the status of a call answered with headers only.
pub fn layer(origins: &CorsOrigins) -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins.0.iter().cloned()))
        .allow_methods([Method::POST])
        .allow_headers([
            CONTENT_TYPE,
            AUTHORIZATION,
            HeaderName::from_static("x-grpc-web"),
            HeaderName::from_static("x-user-agent"),
            HeaderName::from_static("grpc-timeout"),
        ])
        .expose_headers([
            HeaderName::from_static("grpc-status"),
            HeaderName::from_static("grpc-message"),
            HeaderName::from_static("grpc-status-details-bin"),
        ])
        .max_age(PREFLIGHT_MAX_AGE)
}
