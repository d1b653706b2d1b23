//! gRPC: `grpc.health.v1.Health/Check`; only SERVING succeeds. Dial and call share the timeout.

use std::net::SocketAddr;
use std::time::Duration;

use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::Failure;

pub async fn probe(service: &str, addr: SocketAddr, timeout: Duration) -> Result<(), Failure> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Failure::Error(e.to_string()))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| Failure::from_error(&e))?;
    let request = HealthCheckRequest {
        service: service.to_string(),
    };
    let response = HealthClient::new(channel)
        .check(request)
        .await
        .map_err(|status| {
            Failure::Error(format!(
                "health check call failed: {} {}",
                status.code(),
                status.message()
            ))
        })?;
    match response.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => Err(Failure::NotServing(other.as_str_name().to_string())),
    }
}
