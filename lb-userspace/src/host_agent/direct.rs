//! Registration straight with a standalone lb daemon's registration port
//! (`[lb]` in the agent's file), signed with the shared secret
//! ([`crate::registration`]). The daemon's lease lapses unless each check
//! renews it; the answers carry the flows left while draining and the
//! services' VIPs and modes.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::SystemTime,
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
    /// When the last request was sent: each is sent later than the one
    /// before (the daemon refuses one that is not, as a replay).
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
        if !self.registered {
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
        self.last_ms = registration::millis(SystemTime::now()).max(self.last_ms + 1);
        let message = Message {
            time_ms: self.last_ms,
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
        let reply = timeout(CALL_TIMEOUT, exchange)
            .await
            .map_err(|_| anyhow!("no answer within {CALL_TIMEOUT:?}"))?
            .with_context(|| format!("registering with {}", self.daemon.address))?;
        registration::verify_answer(&self.daemon.secret, &mac, reply.trim_end())
            .map_err(|e| anyhow!("the answer of {}: {e}", self.daemon.address))
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
