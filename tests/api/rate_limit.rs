//! The API rate limit answers RESOURCE_EXHAUSTED; health checks are never limited.

use restock_notifier::grpc::proto;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::*;

async fn over_the_api_limit_calls_get_resource_exhausted_while_health_answers(backend: Backend) {
    let app = spawn_app_with(Options {
        api_rate: 5,
        ..Options::new(backend)
    })
    .await;
    let mut limited = 0;
    let mut passed = 0;
    for _ in 0..30 {
        match app
            .client
            .clone()
            .set_stock(proto::SetStockRequest {
                product_id: 1,
                stock: 1,
                ..Default::default()
            })
            .await
        {
            Ok(_) => passed += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                limited += 1;
            }
        }
    }
    assert!(passed >= 5, "the burst passes: {passed}");
    assert!(limited >= 20, "the rest is limited: {limited}");

    let mut health = HealthClient::new(app.channel.clone());
    for _ in 0..30 {
        let reply = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health is never rate limited");
        assert_eq!(reply.into_inner().status, 1, "SERVING");
    }
    // The admin token is a caller of its own, with its own budget: the anonymous
    // calls from this address did not spend it. The admin service is limited too.
    let mut answers = vec![];
    for _ in 0..10 {
        answers.push(
            app.manual_restock(1, Some(ADMIN_TOKEN))
                .await
                .unwrap_err()
                .code(),
        );
    }
    assert_eq!(answers[0], Code::FailedPrecondition, "{answers:?}");
    assert!(answers.contains(&Code::ResourceExhausted), "{answers:?}");
}

on_each_backend!(over_the_api_limit_calls_get_resource_exhausted_while_health_answers,);
