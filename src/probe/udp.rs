//! UDP (the kubelet has none): send the payload on a connected socket; any reply is success, an
//! ICMP port unreachable (surfacing as ECONNREFUSED on a connected socket) fails at once, and
//! silence fails at the caller's timeout.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::net::UdpSocket;

use super::Failure;

pub async fn probe(data: &[u8], addr: SocketAddr) -> Result<(), Failure> {
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)
        .await
        .map_err(|e| Failure::from_io(&e))?;
    socket
        .connect(addr)
        .await
        .map_err(|e| Failure::from_io(&e))?;
    socket.send(data).await.map_err(|e| Failure::from_io(&e))?;
    let mut reply = [0u8; 1];
    // A reply larger than the buffer is truncated, which is fine: only its arrival matters.
    socket
        .recv(&mut reply)
        .await
        .map_err(|e| Failure::from_io(&e))?;
    Ok(())
}
