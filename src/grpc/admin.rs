//! `restock.v1.RestockAdminService`: operator calls, for callers with the admin role
//! (the admin token's among them; see `authz`).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::audit;
use super::proto::{self, restock_admin_service_server::RestockAdminService};
use crate::callers::CallerOf;
use crate::domain::{ProductId, UserId};
use crate::engine::Engine;

/// The admin service; every call passes the authorization layer first.
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
        let caller = request.extensions().get::<CallerOf>().cloned();
        let raw = request.into_inner().product_id;
        let answer = async {
            let product = ProductId::parse(raw)?;
            let run = self.engine.manual_restock(product).await?;
            Ok(Response::new(run.into()))
        }
        .await;
        audit::call(caller.as_ref(), "ManualRestock", Some(raw), None, &answer);
        answer
    }

    async fn forget_user(
        &self,
        request: Request<proto::ForgetUserRequest>,
    ) -> Result<Response<proto::ForgetUserResponse>, Status> {
        let caller = request.extensions().get::<CallerOf>().cloned();
        let raw = request.into_inner().user_id;
        let answer = async {
            let user = UserId::parse(raw)?;
            let forgotten = self.engine.forget_user(user).await?;
            Ok(Response::new(proto::ForgetUserResponse {
                alerts_deleted: forgotten.alerts as i64,
                notifications_deleted: forgotten.notifications as i64,
            }))
        }
        .await;
        audit::call(caller.as_ref(), "ForgetUser", None, Some(raw), &answer);
        answer
    }
}
