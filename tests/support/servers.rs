//! In-process servers for test hosts: TCP, a tiny HTTP/1.1, UDP echo and a gRPC health server.
//!
//! They run on one background runtime of their own rather than on the test's, so they work from
//! sync and async tests alike, and so [`Server::stop`] can wait for the shutdown without
//! deadlocking a test that calls it from inside its runtime. When `stop` returns the listener is
//! closed (new connections get RST) and every accepted connection is gone.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, mpsc};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

/// Requests larger than this are not something a health probe sends; such connections are dropped.
const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// A running server; stops when dropped.
pub struct Server {
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
    stopped: mpsc::Receiver<()>,
}

/// What the HTTP server hands to the responder.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

/// What the responder answers; `delay` holds the answer back, to test probe timeouts.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub delay: Duration,
}

impl Server {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Connections accepted (TCP, HTTP) or datagrams received (UDP) so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Closes the listener and all connections and waits until they are closed.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
            // Err means the task is gone already, which is just as stopped.
            let _ = self.stopped.recv();
        }
    }

    /// Runs `serve` on the server runtime until `stop` fires; `serve` must drop its sockets before
    /// it returns.
    fn spawn<F, Fut>(addr: SocketAddr, serve: F) -> Server
    where
        F: FnOnce(Arc<AtomicU64>, oneshot::Receiver<()>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let hits = Arc::new(AtomicU64::new(0));
        let (stop, stop_rx) = oneshot::channel();
        let (stopped_tx, stopped) = mpsc::channel();
        let serving = serve(hits.clone(), stop_rx);
        runtime().spawn(async move {
            serving.await;
            let _ = stopped_tx.send(());
        });
        Server {
            addr,
            hits,
            stop: Some(stop),
            stopped,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl HttpResponse {
    pub fn new(status: u16) -> Self {
        HttpResponse {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            delay: Duration::ZERO,
        }
    }

    /// 200 with `body` (and no content type, which probes ignore anyway).
    pub fn ok(body: impl Into<Vec<u8>>) -> Self {
        Self::new(200).body(body)
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// The response on the wire. Always `Connection: close`: one request per connection, like the
    /// kubelet's probes, keeps the server trivial.
    fn encode(&self) -> Vec<u8> {
        let mut head = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.body.len()
        ));
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

impl HttpRequest {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Serves `listener` (non-blocking, any namespace): accepts and holds connections until the peer
/// closes them, discarding whatever it sends.
pub fn tcp(listener: std::net::TcpListener) -> io::Result<Server> {
    let (addr, listener) = adopt_listener(listener)?;
    Ok(Server::spawn(addr, |hits, stop| {
        accept_loop(listener, hits, stop, |mut stream| async move {
            let mut sink = [0u8; 1024];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
    }))
}

/// Serves HTTP/1.1 on `listener`: one request per connection, answered by `responder`.
pub fn http<F>(listener: std::net::TcpListener, responder: F) -> io::Result<Server>
where
    F: Fn(&HttpRequest) -> HttpResponse + Send + Sync + 'static,
{
    let (addr, listener) = adopt_listener(listener)?;
    let responder = Arc::new(responder);
    Ok(Server::spawn(addr, |hits, stop| {
        accept_loop(listener, hits, stop, move |stream| {
            answer(stream, responder.clone())
        })
    }))
}

/// HTTPS: the same server behind a TLS handshake with `tls`.
pub fn https<F>(
    listener: std::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    responder: F,
) -> io::Result<Server>
where
    F: Fn(&HttpRequest) -> HttpResponse + Send + Sync + 'static,
{
    let (addr, listener) = adopt_listener(listener)?;
    let responder = Arc::new(responder);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    Ok(Server::spawn(addr, |hits, stop| {
        accept_loop(listener, hits, stop, move |stream| {
            let (acceptor, responder) = (acceptor.clone(), responder.clone());
            async move {
                if let Ok(stream) = acceptor.accept(stream).await {
                    answer(stream, responder).await;
                }
            }
        })
    }))
}

/// Answers one request on `stream` and closes it.
async fn answer<S, F>(mut stream: S, responder: Arc<F>)
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn(&HttpRequest) -> HttpResponse,
{
    let Some(request) = read_request(&mut stream).await else {
        return;
    };
    let response = responder(&request);
    tokio::time::sleep(response.delay).await;
    let _ = stream.write_all(&response.encode()).await;
    let _ = stream.shutdown().await;
}

/// Echoes every datagram on `socket` (non-blocking, any namespace) back to its sender.
pub fn udp_echo(socket: std::net::UdpSocket) -> io::Result<Server> {
    let addr = socket.local_addr()?;
    let socket = {
        let _context = runtime().enter();
        UdpSocket::from_std(socket)?
    };
    Ok(Server::spawn(addr, |hits, mut stop| async move {
        let mut buf = vec![0u8; 65536];
        loop {
            tokio::select! {
                _ = &mut stop => break,
                received = socket.recv_from(&mut buf) => {
                    if let Ok((len, peer)) = received {
                        hits.fetch_add(1, Ordering::Relaxed);
                        let _ = socket.send_to(&buf[..len], peer).await;
                    }
                }
            }
        }
    }))
}

/// A `grpc.health.v1` server answering each listed service name ("" = the whole server) with its
/// status; unlisted names get NOT_FOUND, as real servers answer.
pub fn grpc_health(
    listener: std::net::TcpListener,
    statuses: &[(&str, tonic_health::ServingStatus)],
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> io::Result<Server> {
    let (addr, listener) = adopt_listener(listener)?;
    let statuses: Vec<(String, tonic_health::ServingStatus)> =
        statuses.iter().map(|(n, s)| (n.to_string(), *s)).collect();
    Ok(Server::spawn(addr, move |hits, stop| async move {
        let (reporter, service) = tonic_health::server::health_reporter();
        for (name, status) in statuses {
            reporter.set_service_status(name, status).await;
        }
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let counted = tokio_stream::StreamExt::map(incoming, move |conn| {
            hits.fetch_add(1, Ordering::Relaxed);
            conn
        });
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = match builder.tls_config(tls) {
                Ok(b) => b,
                Err(_) => return,
            };
        }
        let _ = builder
            .add_service(service)
            .serve_with_incoming_shutdown(counted, async {
                let _ = stop.await;
            })
            .await;
    }))
}

/// The runtime all servers of this process run on; it lives as long as the process.
fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("test-servers")
            .enable_all()
            .build()
            .expect("starting the test servers' runtime")
    })
}

fn adopt_listener(listener: std::net::TcpListener) -> io::Result<(SocketAddr, TcpListener)> {
    let addr = listener.local_addr()?;
    // Registering with the reactor needs the runtime's context, whichever thread we are on.
    let _context = runtime().enter();
    Ok((addr, TcpListener::from_std(listener)?))
}

/// Accepts until `stop`, handling each connection in its own task; on stop, closes the listener
/// first (so new connections are refused at once) and then waits for every connection to close.
async fn accept_loop<H, Fut>(
    listener: TcpListener,
    hits: Arc<AtomicU64>,
    mut stop: oneshot::Receiver<()>,
    handle: H,
) where
    H: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    hits.fetch_add(1, Ordering::Relaxed);
                    connections.spawn(handle(stream));
                }
            }
            // Reap finished connections so a long-running server does not accumulate them.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

/// Reads one request head; `None` if the peer closed early or sent garbage.
async fn read_request<S: AsyncRead + Unpin>(stream: &mut S) -> Option<HttpRequest> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        let len = stream.read(&mut chunk).await.ok().filter(|n| *n > 0)?;
        buf.extend_from_slice(&chunk[..len]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        if buf.len() > MAX_REQUEST_HEAD {
            return None;
        }
    };
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_owned();
    let path = request_line.next()?.to_owned();
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_owned(), value.trim().to_owned()))
        .collect();
    Some(HttpRequest {
        method,
        path,
        headers,
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        400 => "Bad Request",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}
