//! `restock-healthcheck [ADDR]`: asks a running service for its gRPC health and exits 0
//! if it is SERVING, 1 otherwise. For container health checks, where no grpcurl is
//! installed. ADDR defaults to 127.0.0.1:50051.
//!
//! It speaks TLS when the service does, that is when it runs with the service's
//! environment and RESTOCK_TLS_CERT is set, or when RESTOCK_HEALTHCHECK_CA is set:
//! - RESTOCK_HEALTHCHECK_CA: PEM file of the CA to trust; without it, the certificates
//!   in RESTOCK_TLS_CERT are trusted (enough for a self-signed certificate).
//! - RESTOCK_HEALTHCHECK_DOMAIN: the name the certificate must be for, `localhost`
//!   unless set.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:50051".into());
    let check = async {
        let channel = endpoint(&addr)?.connect().await?;
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

/// Plaintext, or TLS trusting the CA the environment names (see the module docs).
fn endpoint(addr: &str) -> anyhow::Result<Endpoint> {
    let ca = ["RESTOCK_HEALTHCHECK_CA", "RESTOCK_TLS_CERT"]
        .into_iter()
        .find_map(|setting| Some((setting, std::env::var_os(setting)?)));
    let Some((setting, ca)) = ca else {
        return Ok(Endpoint::from_shared(format!("http://{addr}"))?);
    };
    let pem = std::fs::read(&ca)
        .with_context(|| format!("cannot read {setting} {}", ca.to_string_lossy()))?;
    let domain = std::env::var("RESTOCK_HEALTHCHECK_DOMAIN").unwrap_or_else(|_| "localhost".into());
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem))
        .domain_name(domain);
    Ok(Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls)?)
}
