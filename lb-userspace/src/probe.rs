//! Health probes: each answers "is this backend serving?" within a timeout,
//! with how long the answer took or why it failed.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::UdpSocket,
    time::timeout,
};

use crate::config::Probe;

/// Largest response read from an HTTP or UDP probe.
const MAX_RESPONSE: usize = 4096;

/// Runs one probe of `kind` against `addr`; `Ok(latency)` or the reason it failed.
pub async fn run(kind: &Probe, addr: SocketAddr, limit: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    let outcome = timeout(limit, attempt(kind, addr)).await;
    match outcome {
        Ok(Ok(())) => Ok(start.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no answer within {limit:?}")),
    }
}

async fn attempt(kind: &Probe, addr: SocketAddr) -> Result<(), String> {
    match kind {
        Probe::None => Ok(()),
        Probe::Tcp => tokio::net::TcpStream::connect(addr)
            .await
            .map(drop)
            .map_err(|e| format!("connect: {e}")),
        Probe::Http { path, status } => {
            let mut s = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let request =
                format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: lb-health\r\n\r\n");
            s.write_all(request.as_bytes())
                .await
                .map_err(|e| format!("send: {e}"))?;
            let mut buf = vec![0u8; MAX_RESPONSE];
            let mut len = 0;
            // Read until the status line is complete.
            while !buf[..len].contains(&b'\n') && len < buf.len() {
                let n = s
                    .read(&mut buf[len..])
                    .await
                    .map_err(|e| format!("read: {e}"))?;
                if n == 0 {
                    break;
                }
                len += n;
            }
            let got = parse_status(&buf[..len]).ok_or("no HTTP status line")?;
            if got == *status {
                Ok(())
            } else {
                Err(format!("status {got}, expected {status}"))
            }
        }
        Probe::Udp { send, expect } => {
            let any: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            }
            .parse()
            .map_err(|_| "bad bind address".to_string())?;
            let s = UdpSocket::bind(any)
                .await
                .map_err(|e| format!("bind: {e}"))?;
            s.connect(addr).await.map_err(|e| format!("connect: {e}"))?;
            s.send(send).await.map_err(|e| format!("send: {e}"))?;
            let mut buf = vec![0u8; MAX_RESPONSE];
            let n = s
                .recv(&mut buf)
                .await
                .map_err(|e| format!("receive: {e}"))?;
            if buf[..n].starts_with(expect) {
                Ok(())
            } else {
                Err("unexpected reply".into())
            }
        }
    }
}

/// The status code of an HTTP/1.x status line.
fn parse_status(response: &[u8]) -> Option<u16> {
    let line = response.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            parse_status(b"HTTP/1.0 503 Service Unavailable\r\nx"),
            Some(503)
        );
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status(b""), None);
    }

    #[tokio::test]
    async fn probes_against_loopback_servers() {
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_addr = http.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = http.accept().await.unwrap();
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.0 204 No Content\r\n\r\n").await;
            }
        });
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let udp_addr = udp.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                let (n, peer) = udp.recv_from(&mut buf).await.unwrap();
                let reply = if &buf[..n] == b"ping" {
                    &b"pong!"[..]
                } else {
                    &b"what"[..]
                };
                udp.send_to(reply, peer).await.unwrap();
            }
        });
        let t = Duration::from_secs(2);
        assert!(run(&Probe::Tcp, http_addr, t).await.is_ok());
        assert!(
            run(
                &Probe::Http {
                    path: "/".into(),
                    status: 204
                },
                http_addr,
                t
            )
            .await
            .is_ok()
        );
        let wrong = run(
            &Probe::Http {
                path: "/".into(),
                status: 200,
            },
            http_addr,
            t,
        )
        .await;
        assert_eq!(wrong.unwrap_err(), "status 204, expected 200");
        let udp_ok = Probe::Udp {
            send: b"ping".to_vec(),
            expect: b"pong".to_vec(),
        };
        assert!(run(&udp_ok, udp_addr, t).await.is_ok());
        let udp_bad = Probe::Udp {
            send: b"hi".to_vec(),
            expect: b"pong".to_vec(),
        };
        assert!(run(&udp_bad, udp_addr, t).await.is_err());
        // Nothing listens on this port.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(
            run(&Probe::Tcp, closed, t)
                .await
                .unwrap_err()
                .starts_with("connect")
        );
    }
}
