//! `restock.v1.RestockService`: validation, then a call into the engine.

use std::sync::Arc;

use futures::StreamExt as _;
use tonic::{Request, Response, Status};

use super::audit;
use super::parse_run_status;
use super::proto::{self, restock_service_server::RestockService};
use super::wire::EncodedNotification;
use crate::callers::CallerOf;
use crate::domain::{
    AlertFilter, AlertPageToken, Attributes, Error, IdempotencyKey, Invalid, NotificationFilter,
    NotificationId, PageToken, ProductId, ProductOrder, ProductPageToken, RunFilter,
    TriggerRequest, UserId, Wave, parse_min_stock, parse_page_size, parse_round, parse_stock,
};
use crate::engine::Engine;

pub struct RestockApi {
    engine: Arc<Engine>,
}

impl RestockApi {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

type RunStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<proto::RestockRun, Status>> + Send>>;

type NotificationStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<EncodedNotification, Status>> + Send>>;

#[tonic::async_trait]
impl RestockService for RestockApi {
    async fn trigger_restock(
        &self,
        request: Request<proto::TriggerRestockRequest>,
    ) -> Result<Response<proto::RestockRun>, Status> {
        let caller = request.extensions().get::<CallerOf>().cloned();
        let req = request.into_inner();
        let raw = req.product_id;
        let answer = self.trigger(req).await;
        audit::call(caller.as_ref(), "TriggerRestock", Some(raw), None, &answer);
        answer
    }

    type SubscribeStream = NotificationStream;

    async fn subscribe(
        &self,
        request: Request<proto::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let req = request.into_inner();
        let filter = NotificationFilter {
            user_id: req.user_id.map(UserId::parse).transpose()?,
            product_id: req.product_id.map(ProductId::parse).transpose()?,
        };
        let resume_after = req
            .resume_after
            .as_deref()
            .map(str::parse::<NotificationId>)
            .transpose()?;
        let stream = self.engine.subscribe(filter, resume_after).await?;
        let stream = stream.map(|item| match item {
            Ok(n) => Ok(EncodedNotification::of(n)),
            Err(end) => Err(end.into()),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn register_alert(
        &self,
        request: Request<proto::RegisterAlertRequest>,
    ) -> Result<Response<proto::Alert>, Status> {
        let caller = request.extensions().get::<CallerOf>().cloned();
        let req = request.into_inner();
        let ids = (req.product_id, req.user_id);
        change_alert(caller, "RegisterAlert", ids, |product, user| {
            self.engine.register_alert(product, user, req.once)
        })
        .await
    }

    async fn cancel_alert(
        &self,
        request: Request<proto::CancelAlertRequest>,
    ) -> Result<Response<proto::Alert>, Status> {
        let caller = request.extensions().get::<CallerOf>().cloned();
        let req = request.into_inner();
        let ids = (req.product_id, req.user_id);
        change_alert(caller, "CancelAlert", ids, |product, user| {
            self.engine.cancel_alert(product, user)
        })
        .await
    }

    async fn set_stock(
        &self,
        request: Request<proto::SetStockRequest>,
    ) -> Result<Response<proto::Product>, Status> {
        let caller = request.extensions().get::<CallerOf>().cloned();
        let req = request.into_inner();
        let answer = async {
            let product = ProductId::parse(req.product_id)?;
            let stock = parse_stock(req.stock)?;
            let min_stock = req.min_stock.map(parse_min_stock).transpose()?;
            let product = self.engine.set_stock(product, stock, min_stock).await?;
            Ok(Response::new(product.into()))
        }
        .await;
        audit::call(
            caller.as_ref(),
            "SetStock",
            Some(req.product_id),
            None,
            &answer,
        );
        answer
    }

    async fn get_restock_run(
        &self,
        request: Request<proto::GetRestockRunRequest>,
    ) -> Result<Response<proto::RestockRun>, Status> {
        let req = request.into_inner();
        let product = ProductId::parse(req.product_id)?;
        let round = req.restock_round.map(parse_round).transpose()?;
        let run = self.engine.restock_run(product, round).await?;
        Ok(Response::new(run.into()))
    }

    type WatchRestockRunStream = RunStream;

    async fn watch_restock_run(
        &self,
        request: Request<proto::WatchRestockRunRequest>,
    ) -> Result<Response<Self::WatchRestockRunStream>, Status> {
        let req = request.into_inner();
        let product = ProductId::parse(req.product_id)?;
        let round = req.restock_round.map(parse_round).transpose()?;
        let stream = self.engine.watch_run(product, round).await?;
        let stream = stream.map(|item| item.map(Into::into).map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_alert(
        &self,
        request: Request<proto::GetAlertRequest>,
    ) -> Result<Response<proto::AlertStatus>, Status> {
        let req = request.into_inner();
        let product = ProductId::parse(req.product_id)?;
        let user = UserId::parse(req.user_id)?;
        let status = self.engine.alert_status(product, user).await?;
        Ok(Response::new(status.into()))
    }

    async fn list_alerts(
        &self,
        request: Request<proto::ListAlertsRequest>,
    ) -> Result<Response<proto::ListAlertsResponse>, Status> {
        let req = request.into_inner();
        let filter = AlertFilter::new(
            req.product_id.map(ProductId::parse).transpose()?,
            req.user_id.map(UserId::parse).transpose()?,
            req.active_only,
        )?;
        let page_size = parse_page_size(req.page_size)?;
        let from = AlertPageToken::decode(&req.page_token, &filter)?;
        let page = self.engine.list_alerts(filter, page_size, from).await?;
        Ok(Response::new(proto::ListAlertsResponse {
            alerts: page.alerts.into_iter().map(Into::into).collect(),
            next_page_token: page.next.map(|t| t.encode()).unwrap_or_default(),
        }))
    }

    async fn get_product(
        &self,
        request: Request<proto::GetProductRequest>,
    ) -> Result<Response<proto::Product>, Status> {
        let product = ProductId::parse(request.into_inner().product_id)?;
        let product = self.engine.product(product).await?;
        Ok(Response::new(product.into()))
    }

    async fn list_products(
        &self,
        request: Request<proto::ListProductsRequest>,
    ) -> Result<Response<proto::ListProductsResponse>, Status> {
        let req = request.into_inner();
        let order = match proto::ProductOrder::try_from(req.order_by) {
            Ok(proto::ProductOrder::Unspecified | proto::ProductOrder::WaitingDesc) => {
                ProductOrder::WaitingDesc
            }
            Ok(proto::ProductOrder::Id) => ProductOrder::Id,
            Err(_) => {
                return Err(
                    Error::InvalidArgument(Invalid::UnknownProductOrder(req.order_by)).into(),
                );
            }
        };
        let page_size = parse_page_size(req.page_size)?;
        let from = ProductPageToken::decode(&req.page_token, order)?;
        let page = self.engine.list_products(order, page_size, from).await?;
        Ok(Response::new(proto::ListProductsResponse {
            products: page.products.into_iter().map(Into::into).collect(),
            next_page_token: page.next.map(|t| t.encode()).unwrap_or_default(),
        }))
    }

    async fn list_restock_runs(
        &self,
        request: Request<proto::ListRestockRunsRequest>,
    ) -> Result<Response<proto::ListRestockRunsResponse>, Status> {
        let req = request.into_inner();
        let filter = RunFilter {
            status: req.status.map(parse_run_status).transpose()?,
            product_id: req.product_id.map(ProductId::parse).transpose()?,
        };
        let page_size = parse_page_size(req.page_size)?;
        let from = PageToken::decode(&req.page_token, &filter)?;
        let page = self.engine.list_runs(filter, page_size, from).await?;
        Ok(Response::new(page.into()))
    }
}

impl RestockApi {
    /// `TriggerRestock`, once its caller is known.
    async fn trigger(
        &self,
        req: proto::TriggerRestockRequest,
    ) -> Result<Response<proto::RestockRun>, Status> {
        let product = ProductId::parse(req.product_id)?;
        let request = TriggerRequest {
            stock: req.stock.map(parse_stock).transpose()?,
            wave: req
                .wave
                .map(|w| Wave::parse(w.per_unit, w.interval.map(|d| (d.seconds, d.nanos))))
                .transpose()?,
            idempotency_key: req.idempotency_key.map(IdempotencyKey::parse).transpose()?,
            attributes: Attributes::parse(req.attributes)?,
            trace_parent: crate::telemetry::traceparent(&tracing::Span::current()),
        };
        let run = self.engine.trigger_restock(product, request).await?;
        Ok(Response::new(run.into()))
    }
}

/// RegisterAlert and CancelAlert: the ids parsed, `change` made, and the call audited
/// with the ids as the caller sent them.
async fn change_alert<Fut>(
    caller: Option<CallerOf>,
    method: &str,
    (product, user): (i64, i64),
    change: impl FnOnce(ProductId, UserId) -> Fut,
) -> Result<Response<proto::Alert>, Status>
where
    Fut: std::future::Future<Output = Result<crate::domain::Alert, Error>>,
{
    let answer = async {
        let alert = change(ProductId::parse(product)?, UserId::parse(user)?).await?;
        Ok(Response::new(alert.into()))
    }
    .await;
    audit::call(caller.as_ref(), method, Some(product), Some(user), &answer);
    answer
}
