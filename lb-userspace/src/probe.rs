//! Health probes: each answers "is this backend serving?" within a timeout
//! and reports how long the answer took.

use std::{
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

/// TCP connect: succeeds when the handshake completes within `timeout`.
pub fn tcp_connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<Duration> {
    let start = Instant::now();
    TcpStream::connect_timeout(&addr, timeout)?;
    Ok(start.elapsed())
}
