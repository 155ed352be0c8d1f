//! `restock.v1.RestockAdminService`: operator calls, behind a bearer token.

use std::sync::Arc;

use tonic::service::Interceptor;
use tonic::{Request, Response, Status};

use super::proto::{self, restock_admin_service_server::RestockAdminService};
use crate::domain::ProductId;
use crate::engine::Engine;

/// The admin service; every call passes [`AdminAuth`] first (see `startup`).
pub struct AdminApi {
    engine: Arc<Engine>,
}

impl AdminApi {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

#[tonic::async_trait]
impl RestockAdminService for AdminApi {
    async fn manual_restock(
        &self,
        request: Request<proto::ManualRestockRequest>,
    ) -> Result<Response<proto::RestockRun>, Status> {
        let product = ProductId::parse(request.into_inner().product_id)?;
        let run = self.engine.manual_restock(product).await?;
        Ok(Response::new(run.into()))
    }
}

/// Checks `authorization: Bearer <token>` on every admin call, as an interceptor: before
/// the request is even decoded, so that nothing about the service is revealed without
/// the token.
#[derive(Clone)]
pub struct AdminAuth {
    expected: Arc<str>,
}

impl AdminAuth {
    pub fn new(token: &str) -> Self {
        Self {
            expected: format!("Bearer {token}").into(),
        }
    }
}

/// Compares in time independent of where the first difference is, so the token cannot
/// be guessed byte by byte from response times.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Interceptor for AdminAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(value) = request.metadata().get("authorization") else {
            return Err(Status::unauthenticated(
                "admin calls need metadata `authorization: Bearer <RESTOCK_ADMIN_TOKEN>`",
            ));
        };
        if constant_time_eq(value.as_bytes(), self.expected.as_bytes()) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "the admin token is wrong; send `authorization: Bearer <RESTOCK_ADMIN_TOKEN>`",
            ))
        }
    }
}
