//! Smoke tests of the test infrastructure itself: the API server takes the objects the daemon
//! writes (and rejects what it must), the controller manager runs, and test hosts can be reached,
//! served and killed in each of the three ways.

use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{Endpoints, Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{sleep, timeout};

use crate::support::{Case, ControlPlane, HttpResponse, TestNet, namespace};

/// How long a probe-like connect may take before we call it a timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

pub fn cases() -> Vec<Case> {
    vec![
        Case::tokio(
            "smoke::api_takes_selectorless_service_and_slice",
            api_objects,
        ),
        Case::tokio(
            "smoke::controller_manager_mirrors_and_deletes",
            controller_manager,
        ),
        Case::tokio(
            "smoke::second_cluster_survives_apiserver_restart",
            apiserver_restart,
        ),
        Case::tokio("smoke::hosts_reachable_and_killable", host_failures),
        Case::tokio("smoke::hosts_serve_http_and_udp", host_servers),
    ]
}

async fn api_objects(cp: &'static ControlPlane) -> Result<()> {
    let client = cp.client();
    let ns = namespace::create(&client, "smoke-api").await?;
    let pp = PostParams::default();
    Api::<Service>::namespaced(client.clone(), &ns)
        .create(&pp, &object(selectorless_service("db"))?)
        .await?;

    let slices = Api::<EndpointSlice>::namespaced(client.clone(), &ns);
    let created = slices
        .create(&pp, &object(slice("db-ipv4", "db", "10.240.1.5"))?)
        .await
        .context("creating an EndpointSlice with a test-range address")?;
    let addresses: Vec<_> = created
        .endpoints
        .iter()
        .flatten()
        .map(|e| &e.addresses)
        .collect();
    ensure!(
        addresses == [&["10.240.1.5"]],
        "stored addresses {addresses:?}"
    );

    // The daemon must validate hosts up front because the API server refuses these outright.
    match slices
        .create(&pp, &object(slice("db-lo", "db", "127.0.0.1"))?)
        .await
    {
        Err(kube::Error::Api(status)) if status.code == 422 && status.reason == "Invalid" => {}
        other => bail!("a loopback endpoint should be 422 Invalid, got {other:?}"),
    }
    namespace::delete(&client, &ns).await
}

async fn controller_manager(cp: &'static ControlPlane) -> Result<()> {
    let client = cp.client();
    let ns = namespace::create(&client, "smoke-kcm").await?;
    let pp = PostParams::default();
    Api::<Service>::namespaced(client.clone(), &ns)
        .create(&pp, &object(selectorless_service("web"))?)
        .await?;
    let endpoints = json!({
        "metadata": {"name": "web"},
        "subsets": [{"addresses": [{"ip": "10.240.1.6"}], "ports": [{"name": "pg", "port": 5432}]}],
    });
    Api::<Endpoints>::namespaced(client.clone(), &ns)
        .create(&pp, &object(endpoints)?)
        .await?;

    // Without skip-mirror, the mirroring controller turns Endpoints into a slice of its own.
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), &ns);
    let mirrored = ListParams::default().labels(
        "kubernetes.io/service-name=web,\
         endpointslice.kubernetes.io/managed-by=endpointslicemirroring-controller.k8s.io",
    );
    eventually(
        "the mirrored EndpointSlice",
        Duration::from_secs(30),
        || async { Ok(!slices.list(&mirrored).await?.items.is_empty()) },
    )
    .await?;

    // Only the namespace controller can finish a namespace deletion.
    namespace::delete(&client, &ns).await?;
    let namespaces = Api::<Namespace>::all(client);
    eventually(
        "the namespace to be gone",
        Duration::from_secs(60),
        || async { Ok(namespaces.get_opt(&ns).await?.is_none()) },
    )
    .await
}

/// Outage tests stop API servers, so they bring their own cluster rather than disturb the shared one.
async fn apiserver_restart(_: &'static ControlPlane) -> Result<()> {
    let cp = tokio::task::spawn_blocking(|| ControlPlane::start("outage")).await??;
    ensure!(cp.name() == "outage" && cp.kubeconfig_path().is_file());
    let client = cp.client();
    let namespaces = Api::<Namespace>::all(client.clone());
    namespaces
        .get("default")
        .await
        .context("before the outage")?;

    cp.stop_apiserver();
    ensure!(
        namespaces.get("default").await.is_err(),
        "API answered while stopped"
    );
    let cp = tokio::task::spawn_blocking(move || cp.start_apiserver().map(|()| cp)).await??;
    // The same client reconnects: same port, same CA.
    namespaces
        .get("default")
        .await
        .context("after the restart")?;

    cp.stop_controller_manager();
    cp.start_controller_manager()?;
    tokio::task::spawn_blocking(move || drop(cp)).await?;
    Ok(())
}

async fn host_failures(_: &'static ControlPlane) -> Result<()> {
    let net = TestNet::new()?;
    let (host1, host2) = (net.add_host()?, net.add_host()?);
    let server1 = host1.serve_tcp(8080)?;
    let server2 = host2.serve_tcp(8080)?;
    let (addr1, addr2) = (server1.addr(), server2.addr());

    connect(addr1).await.context("host1 up")?;
    connect(addr2).await.context("host2 up")?;
    expect_error(
        SocketAddr::from((host1.ip(), 8081)),
        ErrorKind::ConnectionRefused,
    )
    .await?;
    // The guard route answers for the rest of 10.240.0.0/16 (K = 251 is never claimed) at once.
    expect_error(
        SocketAddr::from(([10, 240, 251, 1], 80)),
        ErrorKind::HostUnreachable,
    )
    .await?;

    host1.drop_packets()?;
    expect_error(addr1, ErrorKind::TimedOut).await?;
    connect(addr2)
        .await
        .context("host2 while host1 drops packets")?;
    host1.restore_packets()?;
    connect(addr1)
        .await
        .context("host1 after restore_packets")?;

    host1.link_down()?;
    ensure!(
        connect(addr1).await.is_err(),
        "host1 reachable with its link down"
    );
    connect(addr2)
        .await
        .context("host2 while host1's link is down")?;
    host1.link_up()?;
    connect(addr1).await.context("host1 after link_up")?;

    // The kernel completes a connect before the server task accepts it: give it a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while server1.hits() < 3 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    ensure!(
        server1.hits() >= 3,
        "server1 counted {} connections",
        server1.hits()
    );
    server1.stop();
    expect_error(addr1, ErrorKind::ConnectionRefused).await?;
    let _server1 = host1.serve_tcp(8080)?;
    connect(addr1).await.context("host1 with a new server")?;
    Ok(())
}

async fn host_servers(_: &'static ControlPlane) -> Result<()> {
    let net = TestNet::new()?;
    let host = net.add_host()?;
    let http = host.serve_http(80, |request| match request.path.as_str() {
        "/healthz" => {
            HttpResponse::ok("ok").header("X-Probe", request.header("user-agent").unwrap_or(""))
        }
        _ => HttpResponse::new(404),
    })?;
    let response = http_get(http.addr(), "/healthz").await?;
    ensure!(
        response.starts_with("HTTP/1.1 200 OK\r\n"),
        "got {response:?}"
    );
    ensure!(
        response.contains("X-Probe: smoke\r\n") && response.ends_with("\r\n\r\nok"),
        "got {response:?}"
    );
    let response = http_get(http.addr(), "/missing").await?;
    ensure!(response.starts_with("HTTP/1.1 404 "), "got {response:?}");
    ensure!(http.hits() == 2);

    let echo = host.serve_udp_echo(5353)?;
    let socket = UdpSocket::bind("0.0.0.0:0").await?;
    socket.connect(echo.addr()).await?;
    ensure!(udp_round_trip(&socket).await? == b"ping");
    host.drop_packets()?;
    ensure!(
        udp_round_trip(&socket).await.is_err(),
        "an echo came back while dropping packets"
    );
    host.restore_packets()?;
    ensure!(udp_round_trip(&socket).await? == b"ping");
    // A closed UDP port answers ICMP port unreachable, which a connected socket reports as refused.
    echo.stop();
    match udp_round_trip(&socket).await {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Ok(()),
        other => bail!("UDP to a stopped echo server: expected refused, got {other:?}"),
    }
}

/// A TCP connect bounded like a probe's; a timeout is reported as `ErrorKind::TimedOut`.
async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .unwrap_or_else(|_| Err(ErrorKind::TimedOut.into()))
}

async fn expect_error(addr: SocketAddr, kind: ErrorKind) -> Result<()> {
    let began = Instant::now();
    match connect(addr).await {
        Err(e) if e.kind() == kind => Ok(()),
        other => bail!(
            "connect to {addr}: expected {kind:?}, got {other:?} after {:?}",
            began.elapsed()
        ),
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut stream = connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: smoke\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    timeout(CONNECT_TIMEOUT, stream.read_to_string(&mut response)).await??;
    Ok(response)
}

async fn udp_round_trip(socket: &UdpSocket) -> io::Result<Vec<u8>> {
    socket.send(b"ping").await?;
    let mut buf = [0u8; 64];
    let len = timeout(CONNECT_TIMEOUT, socket.recv(&mut buf))
        .await
        .unwrap_or_else(|_| Err(ErrorKind::TimedOut.into()))?;
    Ok(buf[..len].to_vec())
}

/// Polls `check` every 250 ms until it returns true or `limit` passes.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("gave up waiting {limit:?} for {what}");
        }
        sleep(Duration::from_millis(250)).await;
    }
}

fn selectorless_service(name: &str) -> Value {
    json!({
        "metadata": {"name": name},
        "spec": {"ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}]},
    })
}

fn slice(name: &str, service: &str, address: &str) -> Value {
    json!({
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "smoke.endpoints-operator.test",
            },
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [address], "conditions": {"ready": true}}],
        "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}],
    })
}

fn object<T: DeserializeOwned>(value: Value) -> Result<T> {
    Ok(serde_json::from_value(value)?)
}
