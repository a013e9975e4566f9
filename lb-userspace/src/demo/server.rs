//! A server that answers with its name — over HTTP/1.0 on TCP, and as a bare
//! datagram on UDP — and the matching clients. The demo's backends run it,
//! and so do the namespace tests.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::netns::Netns;

/// Bound on every network wait of the server and the clients.
pub const TIMEOUT: Duration = Duration::from_secs(3);
/// How often an idle server checks whether to stop.
const POLL: Duration = Duration::from_millis(5);
/// Largest request read.
const MAX_REQUEST: usize = 1024;

/// A running name server; stops and closes its sockets when dropped.
pub struct NameServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl NameServer {
    /// Serves TCP and UDP on `port` of every address of `ns` (IPv4 and IPv6)
    /// and returns once the sockets are bound.
    pub fn start(ns: &Netns, name: &str, port: u16) -> Result<NameServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready, bound) = mpsc::channel();
        let (flag, name) = (stop.clone(), name.to_string());
        let thread = ns.spawn(move || {
            let tcp = TcpListener::bind(("::", port))?;
            let udp = UdpSocket::bind(("::", port))?;
            tcp.set_nonblocking(true)?;
            udp.set_nonblocking(true)?;
            let _ = ready.send(());
            serve(&tcp, &udp, &name, &flag)
        });
        match bound.recv_timeout(TIMEOUT) {
            Ok(()) => Ok(NameServer {
                stop,
                thread: Some(thread),
            }),
            Err(_) => {
                // A thread that binds late would serve on: stop it, or the
                // join never returns.
                stop.store(true, Ordering::Relaxed);
                match thread.join() {
                    Ok(Err(e)) => Err(e).context(format!("name server in {}", ns.name)),
                    _ => bail!("name server in {} did not start", ns.name),
                }
            }
        }
    }
}

fn serve(tcp: &TcpListener, udp: &UdpSocket, name: &str, stop: &AtomicBool) -> Result<()> {
    let body = format!("{name}\n");
    let response = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut buf = [0u8; MAX_REQUEST];
    while !stop.load(Ordering::Relaxed) {
        let mut idle = true;
        match tcp.accept() {
            Ok((mut s, _)) => {
                idle = false;
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(TIMEOUT))?;
                // One read holds any request our clients send; a client that
                // sends nothing still gets an answer after the timeout.
                let _ = s.read(&mut buf);
                let _ = s.write_all(response.as_bytes());
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
        match udp.recv_from(&mut buf) {
            Ok((_, peer)) => {
                idle = false;
                udp.send_to(body.as_bytes(), peer)?;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
        if idle {
            std::thread::sleep(POLL);
        }
    }
    Ok(())
}

impl Drop for NameServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Err(e)) => eprintln!("name server: {e:#}"),
                Err(_) => eprintln!("name server thread panicked"),
                Ok(Ok(())) => {}
            }
        }
    }
}

/// One HTTP GET to `to`: the answering server's name.
pub fn http_get(to: SocketAddr) -> Result<String> {
    let mut s =
        TcpStream::connect_timeout(&to, TIMEOUT).with_context(|| format!("connect {to}"))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .with_context(|| format!("read from {to}"))?;
    let (_, body) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("{to} sent no HTTP response"))?;
    Ok(body.trim().to_string())
}

/// One UDP request to `to`: the answering server's name.
pub fn udp_request(to: SocketAddr) -> Result<String> {
    let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
    let s = UdpSocket::bind(any)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.send_to(b"who?", to)?;
    let mut buf = [0u8; 64];
    let (n, _) = s
        .recv_from(&mut buf)
        .with_context(|| format!("no UDP answer from {to}"))?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}
