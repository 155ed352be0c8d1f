//! `restock.v1.RestockService`: validation, then a call into the engine.

use std::sync::Arc;

use std::collections::HashMap;

use futures::StreamExt as _;
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use super::parse_run_status;
use super::proto::{self, restock_service_server::RestockService};
use super::wire::EncodedNotification;
use crate::domain::{
    NotificationFilter, NotificationId, PageToken, ProductId, RunFilter, UserId, parse_page_size,
    parse_round, parse_stock,
};
use crate::engine::Engine;
use crate::engine::subscription::StreamEnd;

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

/// `google.rpc.ErrorInfo` domain of the stream ends below.
pub const ERROR_DOMAIN: &str = "restock.v1";

/// The status a stream ends with, in words and, for a client that resumes by itself,
/// as `google.rpc.ErrorInfo { reason, domain: "restock.v1", metadata: { resume_after } }`
/// in the status details (`resume_after` absent when nothing was delivered yet).
fn end_status(end: StreamEnd) -> Status {
    let resume = |last: Option<NotificationId>| match last {
        Some(id) => format!("subscribe again with resume_after = \"{id}\""),
        None => "subscribe again".to_string(),
    };
    let details = |reason: &str, last: Option<NotificationId>| {
        let metadata: HashMap<String, String> = last
            .map(|id| ("resume_after".to_string(), id.to_string()))
            .into_iter()
            .collect();
        ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata)
    };
    match end {
        StreamEnd::Lagged {
            missed,
            last_delivered,
        } => Status::with_error_details(
            Code::ResourceExhausted,
            format!(
                "this stream fell {missed} notifications behind and its buffer overflowed; \
                 read faster and {} to continue without a gap",
                resume(last_delivered)
            ),
            details("STREAM_LAGGED", last_delivered),
        ),
        StreamEnd::ShuttingDown { last_delivered } => Status::with_error_details(
            Code::Unavailable,
            format!(
                "the service is shutting down; {} once it is back",
                resume(last_delivered)
            ),
            details("SHUTTING_DOWN", last_delivered),
        ),
        StreamEnd::Failed(err) => err.into(),
    }
}

#[tonic::async_trait]
impl RestockService for RestockApi {
    async fn trigger_restock(
        &self,
        request: Request<proto::TriggerRestockRequest>,
    ) -> Result<Response<proto::RestockRun>, Status> {
        let req = request.into_inner();
        let product = ProductId::parse(req.product_id)?;
        let stock = req.stock.map(parse_stock).transpose()?;
        let run = self.engine.trigger_restock(product, stock).await?;
        Ok(Response::new(run.into()))
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
            Err(end) => Err(end_status(end)),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn register_alert(
        &self,
        request: Request<proto::RegisterAlertRequest>,
    ) -> Result<Response<proto::Alert>, Status> {
        let req = request.into_inner();
        let product = ProductId::parse(req.product_id)?;
        let user = UserId::parse(req.user_id)?;
        let alert = self.engine.register_alert(product, user).await?;
        Ok(Response::new(alert.into()))
    }

    async fn cancel_alert(
        &self,
        request: Request<proto::CancelAlertRequest>,
    ) -> Result<Response<proto::Alert>, Status> {
        let req = request.into_inner();
        let product = ProductId::parse(req.product_id)?;
        let user = UserId::parse(req.user_id)?;
        let alert = self.engine.cancel_alert(product, user).await?;
        Ok(Response::new(alert.into()))
    }

    async fn set_stock(
        &self,
        request: Request<proto::SetStockRequest>,
    ) -> Result<Response<proto::Product>, Status> {
        let req = request.into_inner();
        let product = ProductId::parse(req.product_id)?;
        let stock = parse_stock(req.stock)?;
        let product = self.engine.set_stock(product, stock).await?;
        Ok(Response::new(product.into()))
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
