//! TCP: a completed connect is success; the connection is closed at once.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::Failure;

pub async fn probe(addr: SocketAddr) -> Result<(), Failure> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| Failure::from_io(&e))?;
    // Linger 0 would RST; a normal close keeps the peer's logs clean.
    drop(stream);
    Ok(())
}
