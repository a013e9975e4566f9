//! Health probes: each answers "is this backend serving?" within a timeout,
//! with how long the answer took or why it failed.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    sync::{Arc, LazyLock, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpSocket, TcpStream, UdpSocket},
    time::timeout,
};
use tokio_rustls::{
    TlsConnector,
    rustls::{
        self, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
        client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
        pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject as _},
    },
};

use crate::{
    agent,
    config::{Probe, Tls, TlsRoots},
};

/// Largest response read from an HTTP, TCP or UDP probe.
const MAX_RESPONSE: usize = 16 * 1024;

/// A probe sent to the service's VIP rather than the backend's address,
/// routed to the backend by its mark (see [`crate::probe_path`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThroughVip {
    /// The service's VIP.
    pub vip: IpAddr,
    /// The backend's probe mark (SO_MARK).
    pub mark: u32,
    /// For an IPv4 VIP, once the backend's next hop is known: the interface
    /// and MAC to ask whether it answers ARP for the VIP ([`crate::arp`]).
    pub arp: Option<(String, [u8; 6])>,
    /// The backend's next hop is known, so its probe route exists. Without
    /// it a marked probe would follow the host's own route to the VIP
    /// (toward the routers, perhaps to another node and another backend):
    /// it fails unsent instead.
    pub routed: bool,
}

/// How long a backend has to answer ARP for the VIP (it must not): on a
/// segment an answer takes well under a millisecond.
const ARP_WAIT: Duration = Duration::from_millis(50);

/// Why a probe failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What went wrong, for the operator.
    pub detail: String,
    /// Nothing came back from the backend's host: no answer in time, or no
    /// way to reach it. Otherwise the host answered (refused the
    /// connection, answered wrongly): it is alive, whatever its server
    /// does.
    pub silent: bool,
}

impl Failure {
    fn silent(detail: String) -> Failure {
        Failure {
            detail,
            silent: true,
        }
    }
}

impl From<String> for Failure {
    fn from(detail: String) -> Failure {
        Failure {
            detail,
            silent: false,
        }
    }
}

impl From<&str> for Failure {
    fn from(detail: &str) -> Failure {
        detail.to_string().into()
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

/// Runs one probe of `kind` against the backend at `addr` (at its address,
/// or `through` its service's VIP); `Ok(latency)` or why it failed.
/// HTTP's `Host` and TLS's server name stay the backend's either way.
pub async fn run(
    kind: &Probe,
    addr: SocketAddr,
    through: Option<&ThroughVip>,
    limit: Duration,
) -> Result<Duration, Failure> {
    let start = Instant::now();
    let outcome = timeout(limit, attempt(kind, addr, through)).await;
    match outcome {
        Ok(Ok(())) => {
            let latency = start.elapsed();
            if let Some(ThroughVip {
                vip: IpAddr::V4(vip),
                arp: Some((dev, mac)),
                ..
            }) = through
                && crate::arp::answers_for_vip(dev, *mac, *vip, ARP_WAIT.min(limit)).await?
            {
                return Err(format!(
                    "answers ARP for the VIP {vip}: set net.ipv4.conf.all.arp_ignore = 1 \
                     and arp_announce = 2 on the backend (lb doctor --backend)"
                )
                .into());
            }
            Ok(latency)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Failure::silent(format!("no answer within {limit:?}"))),
    }
}

async fn attempt(
    kind: &Probe,
    addr: SocketAddr,
    through: Option<&ThroughVip>,
) -> Result<(), Failure> {
    // Where packets go, and the mark that routes them there.
    let (to, mark) = match through {
        Some(t) if !t.routed => {
            return Err(Failure::silent(
                "no route through the VIP: the backend's next hop is not resolved".into(),
            ));
        }
        Some(t) => (SocketAddr::new(t.vip, addr.port()), Some(t.mark)),
        None => (addr, None),
    };
    match kind {
        Probe::None => Ok(()),
        Probe::Tcp { send, expect } => {
            let mut s = connect(to, mark).await?;
            if let Some(send) = send {
                s.write_all(send).await.map_err(|e| format!("send: {e}"))?;
            }
            // Without `expect`, the reset on close may cut what was sent
            // short: the server may see the reset first.
            let Some(expect) = expect else {
                return Ok(());
            };
            let reply = read_until(&mut s, |got| got.len() >= expect.len()).await?;
            if reply.starts_with(expect) {
                Ok(())
            } else {
                Err("unexpected reply".into())
            }
        }
        Probe::Http {
            path,
            status,
            body,
            tls,
        } => {
            let s = connect(to, mark).await?;
            match tls {
                None => Ok(http(s, addr, path, *status, body.as_deref()).await?),
                Some(tls) => {
                    let config = client_config(&tls.roots)?;
                    let name = server_name(tls, addr)?;
                    let s = TlsConnector::from(config)
                        .connect(name, s)
                        .await
                        .map_err(|e| format!("TLS: {e}"))?;
                    Ok(http(s, addr, path, *status, body.as_deref()).await?)
                }
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
            if let Some(mark) = mark {
                set_mark(&s, mark)?;
            }
            s.connect(to).await.map_err(|e| io_failure("connect", &e))?;
            s.send(send).await.map_err(|e| io_failure("send", &e))?;
            let mut buf = vec![0u8; MAX_RESPONSE];
            let n = s
                .recv(&mut buf)
                .await
                .map_err(|e| io_failure("receive", &e))?;
            if buf[..n].starts_with(expect) {
                Ok(())
            } else {
                Err("unexpected reply".into())
            }
        }
    }
}

/// Asks the agent at `addr` (sending `send` first, if given) for its line,
/// within `limit`: the line and what it says, or why there is none.
pub async fn ask_agent(
    addr: SocketAddr,
    send: Option<&[u8]>,
    limit: Duration,
) -> Result<(String, agent::Reply), String> {
    let exchange = async {
        let mut s = connect(addr, None).await.map_err(|f| f.detail)?;
        if let Some(send) = send {
            s.write_all(send).await.map_err(|e| format!("send: {e}"))?;
        }
        let got = read_until(&mut s, |got| {
            got.contains(&b'\n') || got.len() >= agent::MAX_REPLY
        })
        .await?;
        let end = got.iter().position(|&b| b == b'\n').unwrap_or(got.len());
        let line = std::str::from_utf8(&got[..end.min(agent::MAX_REPLY)])
            .map_err(|_| "the answer is not text".to_string())?
            .trim_end_matches('\r')
            .to_string();
        if got.is_empty() {
            return Err("the agent closed without answering".into());
        }
        let reply = agent::parse(&line)?;
        Ok((line, reply))
    };
    timeout(limit, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {limit:?}")))
}

/// A connection to `addr`. A refusal is the host's answer; any other
/// failure to connect is silence.
async fn connect(addr: SocketAddr, mark: Option<u32>) -> Result<TcpStream, Failure> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("socket: {e}"))?;
    if let Some(mark) = mark {
        set_mark(&socket, mark)?;
    }
    // Closed with a reset, as HAProxy closes its checks: a probe that
    // closed first would leave its port in TIME_WAIT for a minute, and a
    // service's probes through the VIP share one address pair, so some
    // hundred probes a second would take every local port.
    socket
        .set_zero_linger()
        .map_err(|e| format!("socket: {e}"))?;
    socket
        .connect(addr)
        .await
        .map_err(|e| io_failure("connect", &e))
}

/// A failed exchange with the backend: its host's answer when it refused
/// or reset (a TCP reset, an ICMP port unreachable), else silence (no
/// route, no neighbour, a host unreachable from a router).
fn io_failure(what: &str, e: &std::io::Error) -> Failure {
    use std::io::ErrorKind::{ConnectionRefused, ConnectionReset};
    Failure {
        detail: format!("{what}: {e}"),
        silent: !matches!(e.kind(), ConnectionRefused | ConnectionReset),
    }
}

/// Marks every packet `socket` sends with `mark`, which the policy rules of
/// [`crate::probe_path`] route by (needs CAP_NET_ADMIN).
fn set_mark(socket: &impl AsRawFd, mark: u32) -> Result<(), String> {
    set_option(socket, libc::SOL_SOCKET, libc::SO_MARK, &mark)
        .map_err(|e| format!("marking the probe socket: {e}"))
}

/// Sets a socket option the socket types lb uses do not offer.
pub(crate) fn set_option<T>(
    socket: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> std::io::Result<()> {
    // SAFETY: a valid socket descriptor, and a value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(value).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Reads until `enough` says so, the peer closes, or [`MAX_RESPONSE`].
async fn read_until(
    s: &mut (impl AsyncRead + Unpin),
    enough: impl Fn(&[u8]) -> bool,
) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; MAX_RESPONSE];
    let mut len = 0;
    while !enough(&buf[..len]) && len < buf.len() {
        let n = match s.read(&mut buf[len..]).await {
            Ok(n) => n,
            // TLS closed without close_notify, which many servers do
            // after an HTTP/1.0 response: the end, as for plain TCP. A
            // check cut short fails on what it lacks.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(format!("read: {e}")),
        };
        if n == 0 {
            break;
        }
        len += n;
    }
    buf.truncate(len);
    Ok(buf)
}

/// GET `path` over `s`: the status must be `status` and, given one, the
/// body must contain `body` (HTTP/1.0: the server closes after it).
async fn http(
    mut s: impl AsyncRead + AsyncWrite + Unpin,
    addr: SocketAddr,
    path: &str,
    status: u16,
    body: Option<&str>,
) -> Result<(), String> {
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: lb-health\r\n\r\n");
    s.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    // The status line, or with a body to find, up to it (a server that
    // keeps the connection open anyway does not hold the check).
    let response = read_until(&mut s, |got| match body {
        None => got.contains(&b'\n'),
        Some(want) => contains(response_body(got), want.as_bytes()),
    })
    .await?;
    let got = parse_status(&response).ok_or("no HTTP status line")?;
    if got != status {
        return Err(format!("status {got}, expected {status}"));
    }
    match body {
        Some(want) if !contains(response_body(&response), want.as_bytes()) => {
            Err(format!("the body does not contain {want:?}"))
        }
        _ => Ok(()),
    }
}

/// What follows the headers of an HTTP response.
fn response_body(response: &[u8]) -> &[u8] {
    response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(&[], |i| &response[i + 4..])
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The name a TLS check sends and verifies: the configured one, or the
/// backend's address.
fn server_name(tls: &Tls, addr: SocketAddr) -> Result<ServerName<'static>, String> {
    match &tls.server_name {
        Some(name) => ServerName::try_from(name.clone()).map_err(|e| format!("sni: {e}")),
        None => Ok(ServerName::from(addr.ip())),
    }
}

/// The client configurations built so far, by the roots they trust.
static BUILT: LazyLock<Mutex<HashMap<TlsRoots, Arc<ClientConfig>>>> = LazyLock::new(Mutex::default);

/// Reads every CA file the https checks of `desired` name, afresh: a file
/// that cannot be read or holds no certificate refuses the configuration
/// (at start, at a reload, in `check-config`) instead of failing every
/// probe, and a rotated file is in use from the reload that reads it.
/// With `running`, only the checks that differ from its are read: a
/// change to other services (a registration, a fleet revision, `lb
/// backend del`) is not refused for a file it does not touch.
pub fn load_ca_files(
    desired: &crate::config::Desired,
    running: Option<&crate::config::Desired>,
) -> anyhow::Result<()> {
    for (name, service) in &desired.services {
        let unchanged = running
            .and_then(|r| r.services.get(name))
            .is_some_and(|r| r.health == service.health);
        if unchanged {
            continue;
        }
        if let Probe::Http {
            tls:
                Some(Tls {
                    roots: roots @ TlsRoots::File(_),
                    ..
                }),
            ..
        } = &service.health.kind
        {
            let config =
                build_client_config(roots).map_err(|e| anyhow::anyhow!("service {name}: {e}"))?;
            BUILT
                .lock()
                .map_err(|_| anyhow::anyhow!("TLS configuration lock poisoned"))?
                .insert(roots.clone(), config);
        }
    }
    Ok(())
}

/// The client configuration for `roots`, built once (a CA file is read
/// again by [`load_ca_files`]).
fn client_config(roots: &TlsRoots) -> Result<Arc<ClientConfig>, String> {
    let mut built = BUILT
        .lock()
        .map_err(|_| "TLS configuration lock poisoned")?;
    if let Some(c) = built.get(roots) {
        return Ok(c.clone());
    }
    let config = build_client_config(roots)?;
    built.insert(roots.clone(), config.clone());
    Ok(config)
}

fn build_client_config(roots: &TlsRoots) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let config = match roots {
        TlsRoots::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth(),
        TlsRoots::System => {
            let mut store = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                return Err("the host's trust store has no certificates: set ca_file".into());
            }
            builder.with_root_certificates(store).with_no_client_auth()
        }
        TlsRoots::File(path) => {
            let mut store = RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(std::iter::Iterator::collect::<Result<Vec<_>, _>>)
                .map_err(|e| format!("reading CA file {}: {e}", path.display()))?;
            store.add_parsable_certificates(certs);
            if store.is_empty() {
                return Err(format!("CA file {} holds no certificate", path.display()));
            }
            builder.with_root_certificates(store).with_no_client_auth()
        }
    };
    Ok(Arc::new(config))
}

/// `insecure = true`: any certificate is accepted; the handshake's
/// signatures are still checked, so the session is TLS all the same.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
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

    const T: Duration = Duration::from_secs(2);

    fn http(path: &str, status: u16, body: Option<&str>, tls: Option<Tls>) -> Probe {
        Probe::Http {
            path: path.into(),
            status,
            body: body.map(Into::into),
            tls,
        }
    }

    fn tcp(send: Option<&str>, expect: Option<&str>) -> Probe {
        Probe::Tcp {
            send: send.map(|s| s.as_bytes().to_vec()),
            expect: expect.map(|s| s.as_bytes().to_vec()),
        }
    }

    /// How a test server ends its answer.
    #[derive(Clone, Copy)]
    enum Ending {
        /// Shuts the stream down (TLS: close_notify first).
        Shutdown,
        /// Drops it: TLS ends without close_notify.
        Abrupt,
        /// Keeps it open, HTTP/1.0 or not.
        Held,
    }

    /// A loopback HTTP/1.0 server answering every request with 204 and
    /// `body`, over TLS with `tls`, ended as `ending` says.
    async fn http_server(tls: Option<tokio_rustls::TlsAcceptor>, ending: Ending) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let answer = async |mut s: Box<dyn Stream>| {
                        let mut buf = [0u8; 256];
                        let _ = s.read(&mut buf).await;
                        let _ = s
                            .write_all(b"HTTP/1.0 204 No Content\r\n\r\nbackend-1 ready")
                            .await;
                        let _ = s.flush().await;
                        match ending {
                            Ending::Shutdown => drop(s.shutdown().await),
                            Ending::Abrupt => {}
                            Ending::Held => tokio::time::sleep(10 * T).await,
                        }
                    };
                    match tls {
                        None => answer(Box::new(s)).await,
                        Some(a) => {
                            if let Ok(s) = a.accept(s).await {
                                answer(Box::new(s)).await;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
    impl<S: AsyncRead + AsyncWrite + Unpin + Send> Stream for S {}

    #[tokio::test]
    async fn http_checks_the_status_and_the_body() {
        let addr = http_server(None, Ending::Shutdown).await;
        assert!(
            run(&http("/", 204, None, None), addr, None, T)
                .await
                .is_ok()
        );
        assert!(
            run(&http("/", 204, Some("ready"), None), addr, None, T)
                .await
                .is_ok()
        );
        assert_eq!(
            run(&http("/", 200, None, None), addr, None, T)
                .await
                .unwrap_err()
                .detail,
            "status 204, expected 200"
        );
        assert_eq!(
            run(&http("/", 204, Some("starting"), None), addr, None, T)
                .await
                .unwrap_err()
                .detail,
            "the body does not contain \"starting\""
        );
    }

    #[tokio::test]
    async fn https_verifies_the_certificate_against_the_ca_file_or_not_at_all() {
        let ca =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "backend.test".into()])
                .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::try_from(ca.key_pair.serialize_der()).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![ca.cert.der().clone()], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let addr = http_server(Some(acceptor.clone()), Ending::Shutdown).await;
        let dir = std::env::temp_dir().join(format!("lb-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca.cert.pem()).unwrap();
        let tls = |server_name: Option<&str>, roots: TlsRoots| {
            Some(Tls {
                server_name: server_name.map(Into::into),
                roots,
            })
        };
        let trusted = TlsRoots::File(ca_file.clone());
        let ok = |p: Probe| async move { run(&p, addr, None, T).await };
        assert!(
            ok(http("/", 204, Some("ready"), tls(None, trusted.clone())))
                .await
                .is_ok()
        );
        assert!(
            ok(http(
                "/",
                204,
                None,
                tls(Some("backend.test"), trusted.clone())
            ))
            .await
            .is_ok()
        );
        let wrong_name = ok(http("/", 204, None, tls(Some("other.test"), trusted))).await;
        assert!(wrong_name.unwrap_err().detail.starts_with("TLS: "));
        let untrusted = ok(http("/", 204, None, tls(None, TlsRoots::System))).await;
        assert!(
            untrusted.unwrap_err().detail.starts_with("TLS: "),
            "self-signed"
        );
        assert!(
            ok(http("/", 204, None, tls(None, TlsRoots::Insecure)))
                .await
                .is_ok()
        );
        let missing = TlsRoots::File(dir.join("none.pem"));
        let e = ok(http("/", 204, None, tls(None, missing)))
            .await
            .unwrap_err()
            .detail;
        assert!(e.starts_with("reading CA file"), "{e}");
        // CA files are read by the configuration that names them: a
        // missing one refuses it, a good one serves the probes after.
        let config = |ca: &std::path::Path| {
            crate::config::parse(&format!(
                "[settings]\ninterfaces = [\"eth0\"]\n[[service]]\nname = \"web\"\n\
                 vip = \"198.18.1.1\"\nport = 443\nprotocol = \"tcp\"\n\
                 [service.health]\ncheck = \"https\"\nca_file = {:?}\n",
                ca.display().to_string()
            ))
            .unwrap()
        };
        let e = load_ca_files(&config(&dir.join("none.pem")), None).unwrap_err();
        assert!(
            format!("{e:#}").starts_with("service web: reading CA file"),
            "{e:#}"
        );
        load_ca_files(&config(&ca_file), None).unwrap();
        // Against a running configuration, only changed checks are read.
        let missing = config(&dir.join("none.pem"));
        load_ca_files(&missing, Some(&missing)).unwrap();
        // Plain HTTP to a TLS server fails too.
        assert!(ok(http("/", 204, None, None)).await.is_err());
        // The body is found whether the server ends without close_notify
        // or keeps the connection open.
        for ending in [Ending::Abrupt, Ending::Held] {
            let addr = http_server(Some(acceptor.clone()), ending).await;
            let p = http("/", 204, Some("ready"), tls(None, TlsRoots::Insecure));
            assert_eq!(run(&p, addr, None, T).await.map(|_| ()), Ok(()));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn an_agent_is_asked_for_one_line() {
        // Answers each connection with the next line (after reading what
        // lb sends, if anything), then closes; the last one never answers.
        let agent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = agent.local_addr().unwrap();
        tokio::spawn(async move {
            let lines: [&[u8]; 4] = [b"up 75%\r\n", b"drain # full", b"sleepy\n", b""];
            let mut held = Vec::new();
            for line in lines {
                let Ok((mut s, _)) = agent.accept().await else {
                    return;
                };
                let mut buf = [0u8; 16];
                let _ = s.read(&mut buf).await;
                s.write_all(line).await.unwrap();
                drop(s);
            }
            while let Ok((s, _)) = agent.accept().await {
                held.push(s);
            }
        });
        let t = Duration::from_millis(300);
        let (line, reply) = ask_agent(addr, Some(b"hi\n"), t).await.unwrap();
        assert_eq!((line.as_str(), reply.percent), ("up 75%", Some(75)));
        // No line end: the line is what came before the close.
        let (line, reply) = ask_agent(addr, Some(b"hi\n"), t).await.unwrap();
        assert_eq!(line, "drain # full");
        assert_eq!(reply.admin, Some(crate::daemon::runtime::Admin::Drain));
        let bad = ask_agent(addr, Some(b"hi\n"), t).await.unwrap_err();
        assert!(bad.contains("unknown word"), "{bad}");
        let empty = ask_agent(addr, Some(b"hi\n"), t).await.unwrap_err();
        assert!(empty.contains("without answering"), "{empty}");
        let hung = ask_agent(addr, None, t).await.unwrap_err();
        assert_eq!(hung, "no answer within 300ms");
    }

    #[tokio::test]
    async fn tcp_send_and_expect_see_a_server_that_accepts_but_hangs() {
        // Accepts (the kernel completes the handshake), never answers: as
        // a stopped server.
        let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hung_addr = hung.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = hung.accept().await {
                held.push(s);
            }
        });
        let t = Duration::from_millis(300);
        assert!(
            run(&tcp(None, None), hung_addr, None, t).await.is_ok(),
            "connect alone passes"
        );
        assert_eq!(
            run(&tcp(Some("PING\r\n"), Some("+PONG")), hung_addr, None, t)
                .await
                .unwrap_err()
                .detail,
            "no answer within 300ms"
        );
        let http_hung = run(&http("/", 200, None, None), hung_addr, None, t).await;
        assert_eq!(
            http_hung.unwrap_err(),
            Failure::silent("no answer within 300ms".into())
        );

        let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                let mut buf = [0u8; 64];
                if let Ok(n) = s.read(&mut buf).await {
                    let reply: &[u8] = if &buf[..n] == b"PING\r\n" {
                        b"+PONG\r\n"
                    } else {
                        b"-ERR\r\n"
                    };
                    let _ = s.write_all(reply).await;
                }
            }
        });
        assert!(
            run(&tcp(Some("PING\r\n"), Some("+PONG")), echo_addr, None, T)
                .await
                .is_ok()
        );
        assert_eq!(
            run(&tcp(Some("HELLO\r\n"), Some("+PONG")), echo_addr, None, T)
                .await
                .unwrap_err()
                .detail,
            "unexpected reply"
        );
    }

    #[tokio::test]
    async fn udp_and_refused_probes() {
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
        let udp_ok = Probe::Udp {
            send: b"ping".to_vec(),
            expect: b"pong".to_vec(),
        };
        assert!(run(&udp_ok, udp_addr, None, T).await.is_ok());
        let udp_bad = Probe::Udp {
            send: b"hi".to_vec(),
            expect: b"pong".to_vec(),
        };
        assert!(run(&udp_bad, udp_addr, None, T).await.is_err());
        // Nothing listens on this port.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        // Refused: the host answered, as a server that stopped listening
        // has it; a timeout is silence.
        let refused = run(&tcp(None, None), closed, None, T).await.unwrap_err();
        assert!(refused.detail.starts_with("connect"), "{refused}");
        assert!(!refused.silent);
        let unbound = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let unreachable = run(&udp_bad, unbound, None, T).await.unwrap_err();
        assert!(!unreachable.silent, "an ICMP port unreachable answers");
    }
}
