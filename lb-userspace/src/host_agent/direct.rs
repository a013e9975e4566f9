//! Registration straight with a standalone lb daemon's registration port
//! (`[lb]` in the agent's file), signed with the shared secret
//! ([`crate::registration`]). The daemon's lease lapses unless the agent
//! renews it (each check, and every third of the lease between); the
//! answers carry the flows left while draining and the
//! services' VIPs and modes.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, anyhow, bail};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpSocket, TcpStream},
    time::timeout,
};
use tracing::{debug, warn};

use super::setup::Served;
use crate::{
    fleet::{registry::Registration, store::CALL_TIMEOUT},
    registration::{self, Answer, MAX_LINE, Message, Secret},
};

/// The daemon to register with.
#[derive(Debug, Clone)]
pub struct Daemon {
    /// Its registration port.
    pub address: SocketAddr,
    /// The shared secret.
    pub secret: Secret,
}

/// The registration with one daemon.
pub struct Direct {
    daemon: Daemon,
    registrations: BTreeMap<String, Registration>,
    registered: bool,
    /// The last answer's flows, while draining.
    flows: Option<u64>,
    /// The last refusals, to log each once.
    refused: Vec<String>,
    /// The daemon's lease, as its last answer gave it.
    lease: Option<Duration>,
    /// When the last request the daemon did not reject was sent: each is
    /// sent later than that one (the daemon refuses one that is not, as a
    /// replay).
    last_ms: u64,
}

impl Direct {
    /// Nothing registered yet.
    pub fn new(daemon: Daemon, registrations: BTreeMap<String, Registration>) -> Direct {
        Direct {
            daemon,
            registrations,
            registered: false,
            flows: None,
            refused: Vec::new(),
            lease: None,
            last_ms: 0,
        }
    }

    /// Whether the last registration was taken.
    pub fn registered(&self) -> bool {
        self.registered
    }

    /// Registers or renews.
    pub async fn hold(&mut self, draining: bool, percent: u32) -> Result<()> {
        for r in self.registrations.values_mut() {
            r.draining = draining;
            r.percent = percent;
        }
        let answer = self.send(false, false).await?;
        if let Some(why) = answer.rejected {
            self.registered = false;
            bail!("the daemon rejects the request: {why}");
        }
        if answer.refused != self.refused {
            for why in &answer.refused {
                warn!(reason = %why, "the daemon refuses the registration");
            }
            self.refused = answer.refused.clone();
        }
        self.registered = answer.refused.len() < self.registrations.len();
        self.flows = (draining && answer.flows.len() == self.registrations.len()).then(|| {
            answer
                .flows
                .values()
                .fold(0u64, |a, &n| a.saturating_add(n))
        });
        // Draining, a registration the daemon refuses pins no flow (its
        // answer counts none): the drain is over, not failing.
        if !self.registered && !draining {
            bail!("every registration refused");
        }
        Ok(())
    }

    /// Deregisters.
    pub async fn leave(&mut self) -> Result<()> {
        if !self.registered {
            return Ok(());
        }
        let answer = self.send(true, false).await?;
        self.registered = false;
        match answer.rejected {
            Some(why) => bail!("the daemon rejects the request: {why}"),
            None => Ok(()),
        }
    }

    /// The daemon's lease, once an answer gave it.
    pub fn lease(&self) -> Option<Duration> {
        self.lease
    }

    /// Flows left, as the last renewal while draining answered.
    pub fn flows_left(&self) -> Option<u64> {
        self.flows
    }

    /// The services' VIPs and modes, as the daemon has them.
    pub async fn served(&mut self) -> Result<BTreeMap<String, Served>> {
        let answer = self.send(false, true).await?;
        if let Some(why) = answer.rejected {
            bail!("the daemon rejects the request: {why}");
        }
        Ok(answer
            .services
            .into_iter()
            .map(|(name, (vip, mode))| (name, Served { vip, mode }))
            .collect())
    }

    async fn send(&mut self, leave: bool, query: bool) -> Result<Answer> {
        let time_ms = registration::millis(SystemTime::now()).max(self.last_ms + 1);
        let message = Message {
            time_ms,
            leave,
            query,
            registrations: self.registrations.clone(),
        };
        let (line, mac) = registration::sign(&self.daemon.secret, &message)?;
        let source = self.registrations.values().next().map(|r| r.address);
        let exchange = async {
            let mut stream = connect_from(source, self.daemon.address).await?;
            stream.write_all(line.as_bytes()).await?;
            let mut reply = String::new();
            BufReader::new(stream)
                .take(MAX_LINE as u64)
                .read_line(&mut reply)
                .await?;
            anyhow::Ok(reply)
        };
        // Sent: unless the daemon says it rejected it, it may have taken it.
        self.last_ms = time_ms;
        let reply = timeout(CALL_TIMEOUT, exchange)
            .await
            .map_err(|_| anyhow!("no answer within {CALL_TIMEOUT:?}"))?
            .with_context(|| format!("registering with {}", self.daemon.address))?;
        if reply.is_empty() {
            bail!(
                "{} closed the connection without answering (busy, or stopping)",
                self.daemon.address
            );
        }
        let answer = registration::verify_answer(&self.daemon.secret, &mac, reply.trim_end())
            .map_err(|e| anyhow!("the answer of {}: {e}", self.daemon.address))?;
        if let Some(ms) = answer.lease_ms {
            self.lease = Some(Duration::from_millis(ms));
        }
        if answer.rejected.is_some() {
            // Not taken, so not to be outdone: a request sent while this
            // host's clock ran ahead must not hold the next ones there
            // once it is set right.
            self.last_ms = 0;
        }
        Ok(answer)
    }
}

/// A connection to `daemon` from `source`, the address the host registers,
/// where the host has it: the daemon takes a registration only from the
/// address it names, and on a host with several addresses the route to the
/// daemon may leave from another. Where `source` is not the host's own (a
/// bind fails), the kernel picks, and the daemon says if it minds.
async fn connect_from(source: Option<IpAddr>, daemon: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if daemon.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(source) = source.filter(|s| s.is_ipv4() == daemon.is_ipv4())
        && let Err(e) = socket.bind(SocketAddr::new(source, 0))
    {
        debug!(address = %source, error = %e, "registering from the kernel's choice of address");
    }
    socket.connect(daemon).await
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };

    use crate::fleet::registry::FULL_PERCENT;
    use tokio::net::TcpListener;

    /// A registration port that checks requests as the daemon does
    /// (signature and clock, [`registration::verify`]), takes every one
    /// that passes, counting them in `taken`, and answers with `lease_ms`.
    pub(in crate::host_agent) async fn daemon_port(
        secret: Secret,
        lease_ms: Option<u64>,
        taken: Arc<AtomicU32>,
    ) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (read, mut write) = stream.into_split();
                let mut line = String::new();
                BufReader::new(read).read_line(&mut line).await.unwrap();
                let mac = line.split_once(' ').map_or("", |(m, _)| m).to_string();
                let answer = match registration::verify(&secret, line.trim_end(), SystemTime::now())
                {
                    Ok(_) => {
                        taken.fetch_add(1, Ordering::Relaxed);
                        Answer {
                            lease_ms,
                            ..Answer::default()
                        }
                    }
                    Err(r) => Answer {
                        rejected: Some(r.to_string()),
                        ..Answer::default()
                    },
                };
                let text = registration::sign_answer(&secret, &mac, &answer).unwrap();
                write.write_all(text.as_bytes()).await.unwrap();
            }
        });
        address
    }

    /// A direct registrar of `127.0.0.1` for service `web`, to `address`.
    pub(in crate::host_agent) fn registrar(address: SocketAddr, secret: Secret) -> Direct {
        let registration = Registration {
            address: "127.0.0.1".parse().unwrap(),
            weight: 1,
            percent: FULL_PERCENT,
            draining: false,
            host: "h".into(),
            version: "0".into(),
        };
        Direct::new(
            Daemon { address, secret },
            [("web".to_string(), registration)].into(),
        )
    }

    #[tokio::test]
    async fn a_clock_set_back_from_ahead_is_taken_at_once() {
        let secret = || Secret::new(b"0123456789abcdef0123").unwrap();
        let address = daemon_port(secret(), None, Arc::default()).await;
        let mut direct = registrar(address, secret());
        // The last request went out an hour ahead, as from a host whose
        // clock ran ahead until NTP stepped it back.
        direct.last_ms = registration::millis(SystemTime::now()) + 3_600_000;
        let err = direct.hold(false, FULL_PERCENT).await.unwrap_err();
        assert!(err.to_string().contains("clock skew"), "{err:#}");
        direct.hold(false, FULL_PERCENT).await.unwrap();
        assert!(direct.registered());
    }
}
