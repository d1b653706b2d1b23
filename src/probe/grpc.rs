//! gRPC: `grpc.health.v1.Health/Check`; only SERVING succeeds. Dial and call share the timeout.
//! TLS goes through our own connector so it can skip verification like the other probers.

use std::net::SocketAddr;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::{Failure, tls};
use crate::model::GrpcCheck;

pub async fn probe(check: &GrpcCheck, addr: SocketAddr, timeout: Duration) -> Result<(), Failure> {
    // Always `http`: with TLS, our connector does the handshake, and tonic refuses an https URI
    // unless it does TLS itself.
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Failure::Error(e.to_string()))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let channel = match &check.tls {
        None => endpoint.connect().await,
        Some(verify) => connect_tls(endpoint, addr, verify.as_ref()).await?,
    }
    .map_err(|e| Failure::from_error(&e))?;
    let request = HealthCheckRequest {
        service: check.service.clone(),
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

async fn connect_tls(
    endpoint: Endpoint,
    addr: SocketAddr,
    verify: Option<&crate::model::TlsVerify>,
) -> Result<Result<Channel, tonic::transport::Error>, Failure> {
    let config = tls::client_config(verify, addr.ip(), &[b"h2"])?;
    let name = tls::server_name(verify, addr.ip());
    let connector = tower::service_fn(move |_: Uri| {
        let (config, name) = (config.clone(), name.clone());
        async move {
            let tcp = TcpStream::connect(addr).await?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    Ok(endpoint.connect_with_connector(connector).await)
}
