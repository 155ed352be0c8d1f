//! `restock-healthcheck [ADDR]`: asks a running service for its gRPC health and exits 0
//! if it is SERVING, 1 otherwise. For container health checks, where no grpcurl is
//! installed. ADDR defaults to 127.0.0.1:50051.

use std::process::ExitCode;
use std::time::Duration;

use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:50051".into());
    let check = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?;
        anyhow::Ok(reply.into_inner().status() == ServingStatus::Serving)
    };
    match tokio::time::timeout(Duration::from_secs(3), check).await {
        Ok(Ok(true)) => ExitCode::SUCCESS,
        Ok(Ok(false)) => {
            eprintln!("{addr}: not serving");
            ExitCode::FAILURE
        }
        Ok(Err(err)) => {
            eprintln!("{addr}: {err:#}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("{addr}: no answer within 3 s");
            ExitCode::FAILURE
        }
    }
}
