//! The gRPC face of the service: generated code, the two services (`restock`,
//! `admin`), proto <-> domain conversion, the one place where errors become status
//! codes (`status`), who may call what (`authz`, with streams ended on revocation in
//! `revoke` and the audit log in `audit`), the API rate limit (`ratelimit`), the layer
//! that measures and traces every call (`observe`), notifications encoded once for
//! every stream (`wire`), and CORS for gRPC-web calls from other origins (`cors`).

pub mod admin;
pub mod audit;
pub mod authz;
pub mod cors;
pub mod observe;
pub mod ratelimit;
pub mod restock;
mod revoke;
mod status;
pub mod wire;

use std::collections::HashMap;

use crate::domain::{self, Error, Invalid, RunStatus};
use chrono::{DateTime, Utc};

/// Generated code of `proto/restock/v1/restock.proto` (see `build.rs`).
pub mod proto {
    // Messages and clients.
    tonic::include_proto!("restock.v1");
    // Servers, whose `Subscribe` streams encoded notifications.
    include!(concat!(env!("OUT_DIR"), "/servers/restock.v1.rs"));

    /// Encoded descriptors of the API, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("restock_descriptor");
}

/// The client's address, over plaintext or TLS (tonic records it differently).
pub(crate) fn peer_addr(extensions: &http::Extensions) -> Option<std::net::SocketAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|tls| tls.get_ref().remote_addr())
        })
}

/// The identities of the client certificate of a mutual TLS connection, in the order
/// they name the caller: its URI SANs, else its DNS SANs, else its subject CN. Empty
/// without a client certificate.
pub(crate) fn peer_identities(extensions: &http::Extensions) -> Vec<String> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};
    let Some(certs) = extensions
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs)
    else {
        return vec![];
    };
    let Some(Ok((_, leaf))) = certs.first().map(|der| X509Certificate::from_der(der)) else {
        return vec![];
    };
    let (mut uris, mut names) = (vec![], vec![]);
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) => uris.push(uri.to_string()),
                GeneralName::DNSName(dns) => names.push(dns.to_string()),
                _ => {}
            }
        }
    }
    if !uris.is_empty() {
        return uris;
    }
    if !names.is_empty() {
        return names;
    }
    leaf.subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .take(1)
        .collect()
}

pub(crate) fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

impl From<RunStatus> for proto::RunStatus {
    fn from(status: RunStatus) -> Self {
        match status {
            RunStatus::InProgress => proto::RunStatus::InProgress,
            RunStatus::CanceledBySoldOut => proto::RunStatus::CanceledBySoldOut,
            RunStatus::CanceledByError => proto::RunStatus::CanceledByError,
            RunStatus::Completed => proto::RunStatus::Completed,
        }
    }
}

/// A run status asked for by a caller. RUN_STATUS_UNSPECIFIED is not one (an unset
/// field means "any status"), nor is a number this build does not know.
pub(crate) fn parse_run_status(raw: i32) -> Result<RunStatus, Error> {
    match proto::RunStatus::try_from(raw) {
        Ok(proto::RunStatus::InProgress) => Ok(RunStatus::InProgress),
        Ok(proto::RunStatus::CanceledBySoldOut) => Ok(RunStatus::CanceledBySoldOut),
        Ok(proto::RunStatus::CanceledByError) => Ok(RunStatus::CanceledByError),
        Ok(proto::RunStatus::Completed) => Ok(RunStatus::Completed),
        Ok(proto::RunStatus::Unspecified) | Err(_) => {
            Err(Error::InvalidArgument(Invalid::NotARunStatus(raw)))
        }
    }
}

impl From<domain::Run> for proto::RestockRun {
    fn from(run: domain::Run) -> Self {
        proto::RestockRun {
            product_id: run.product_id.get(),
            restock_round: run.restock_round,
            status: proto::RunStatus::from(run.status).into(),
            last_sent_user_id: run.last_sent_user_id.map(|u| u.get()),
            sent_count: run.sent_count,
            started_at: Some(timestamp(run.started_at)),
            updated_at: Some(timestamp(run.updated_at)),
            next_wave_at: run.wave.and_then(|w| w.next_wave_at).map(timestamp),
            wave: run.wave.map(|w| proto::Wave::from(w.wave)),
            last_error: run.last_error,
            queue_size: run.queue_size,
            attributes: attributes_map(&run.attributes),
        }
    }
}

impl From<domain::Wave> for proto::Wave {
    fn from(wave: domain::Wave) -> Self {
        proto::Wave {
            per_unit: wave.per_unit,
            interval: Some(prost_types::Duration {
                seconds: wave.interval.as_secs() as i64,
                nanos: wave.interval.subsec_nanos() as i32,
            }),
        }
    }
}

impl From<domain::RunPage> for proto::ListRestockRunsResponse {
    fn from(page: domain::RunPage) -> Self {
        proto::ListRestockRunsResponse {
            runs: page.runs.into_iter().map(Into::into).collect(),
            next_page_token: page.next.map(|t| t.encode()).unwrap_or_default(),
        }
    }
}

impl From<domain::Alert> for proto::Alert {
    fn from(alert: domain::Alert) -> Self {
        proto::Alert {
            product_id: alert.product_id.get(),
            user_id: alert.user_id.get(),
            active: alert.active,
            once: alert.once,
            created_at: Some(timestamp(alert.created_at)),
            updated_at: Some(timestamp(alert.updated_at)),
        }
    }
}

impl From<domain::AlertStatus> for proto::AlertStatus {
    fn from(status: domain::AlertStatus) -> Self {
        let outcome = |outcome: domain::AlertOutcome| {
            (match outcome {
                domain::AlertOutcome::Notified => proto::AlertOutcome::Notified,
                domain::AlertOutcome::Pending => proto::AlertOutcome::Pending,
                domain::AlertOutcome::NotReached => proto::AlertOutcome::NotReached,
                domain::AlertOutcome::RegisteredAfter => proto::AlertOutcome::RegisteredAfter,
                domain::AlertOutcome::Inactive => proto::AlertOutcome::Inactive,
            }) as i32
        };
        proto::AlertStatus {
            alert: Some(status.alert.into()),
            position: status.position,
            users_ahead: status.users_ahead,
            last_notified_round: status.last_notified.map(|(round, _)| round),
            last_notified_at: status.last_notified.map(|(_, at)| timestamp(at)),
            latest_round: status
                .latest_round
                .map(|(restock_round, o)| proto::RoundOutcome {
                    restock_round,
                    outcome: outcome(o),
                }),
        }
    }
}

impl From<domain::Product> for proto::Product {
    fn from(product: domain::Product) -> Self {
        proto::Product {
            product_id: product.id.get(),
            restock_round: product.restock_round,
            stock: product.stock,
            min_stock: product.min_stock,
            waiting: product.waiting,
        }
    }
}

impl From<&domain::Notification> for proto::Notification {
    fn from(n: &domain::Notification) -> Self {
        proto::Notification {
            attributes: attributes_map(&n.attributes),
            ..without_attributes(n)
        }
    }
}

/// The notification's own fields, without its run's attributes (which a batch encodes
/// once for all its notifications).
pub(crate) fn without_attributes(n: &domain::Notification) -> proto::Notification {
    proto::Notification {
        notification_id: n.id.to_string(),
        product_id: n.id.product_id.get(),
        user_id: n.id.user_id.get(),
        restock_round: n.id.restock_round,
        sent_at: Some(timestamp(n.sent_at)),
        message: n.message(),
        attributes: HashMap::new(),
    }
}

/// Attributes as the API's `map<string, string>`.
pub(crate) fn attributes_map(attributes: &domain::Attributes) -> HashMap<String, String> {
    attributes
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
