//! A standalone daemon's registration port (`[registration]`): `lb agent`s
//! without etcd register their hosts here, signed with a shared secret
//! ([`crate::registration`]).
//!
//! A registration lasts `lease` unless renewed; it is admitted into its
//! service as a fleet node admits one from etcd
//! ([`crate::fleet::registry::admit`]), and kept in the state file, so a
//! restarted daemon keeps its registered backends (with a fresh lease,
//! for their agents to renew) instead of re-hashing their flows. Requests
//! that fail the signature, the clock or the format are refused and
//! counted; nothing they carry is applied.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};
use tracing::{debug, info};

use super::{controller::Controller, flows::SummaryCache};
use crate::{
    config::RegistrationPort,
    fleet::registry::{Registration, Registrations},
    registration::{self, Answer, MAX_LINE, Message, Refusal, Secret},
};

/// How long a connection may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections open at once from one address: an agent sends one request
/// at a time, so a host holding more is not an agent.
const MAX_OPEN_PER_PEER: usize = 4;
/// Connections open at once in all: each holds a task until its request
/// arrives or [`READ_TIMEOUT`] passes.
const MAX_OPEN: usize = 256;

/// A registration as the daemon holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// What the agent said last.
    pub registration: Registration,
    /// When it lapses unless renewed, on the monotonic clock: a step of the
    /// wall clock (NTP, an operator) neither ends every lease at once nor
    /// stretches them. Not saved: a restarted daemon gives each held
    /// registration a fresh lease ([`renew_all`]).
    #[serde(skip, default = "Instant::now")]
    pub lapses: Instant,
}

/// Held registrations: service → address → registration.
pub type HeldRegistrations = BTreeMap<String, BTreeMap<IpAddr, Held>>;

/// One verified request, handed to the control loop.
pub(crate) struct Request {
    pub message: Message,
    /// The address it came from.
    pub peer: IpAddr,
    pub reply: oneshot::Sender<Answer>,
}

/// Requests refused before the control loop sees them, by reason.
#[derive(Debug, Default)]
pub(crate) struct Refused {
    counts: [AtomicU64; 5],
}

impl Refused {
    const REASONS: [Refusal; 5] = [
        Refusal::Malformed,
        Refusal::Signature,
        Refusal::Payload,
        Refusal::Stale,
        Refusal::Busy,
    ];

    fn count(&self, r: Refusal) {
        if let Some(i) = Self::REASONS.iter().position(|x| *x == r) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Each reason's label and count.
    pub(crate) fn counts(&self) -> Vec<(&'static str, u64)> {
        Self::REASONS
            .iter()
            .zip(&self.counts)
            .map(|(r, c)| (r.label(), c.load(Ordering::Relaxed)))
            .collect()
    }
}

/// The port's figures for the metrics.
#[derive(Debug, Clone, Default)]
pub(crate) struct Gauges {
    /// Registrations held.
    pub held: usize,
    /// Requests refused, by reason (`admission` for registrations a
    /// service could not take, `sender` for a host registering another's
    /// address or a replayed request).
    pub refused: Vec<(&'static str, u64)>,
}

/// Reads the secret and binds the port; requests go to `tx`.
pub(crate) async fn start(
    port: &RegistrationPort,
    tx: mpsc::Sender<Request>,
) -> Result<Arc<Refused>> {
    let secret = Secret::read(&port.secret_file).context("[registration] secret_file")?;
    let listener = TcpListener::bind(port.listen)
        .await
        .with_context(|| format!("binding [registration] listen {}", port.listen))?;
    info!(listen = %port.listen, lease = ?port.lease, "taking registrations from lb agents");
    let refused = Arc::new(Refused::default());
    let counts = refused.clone();
    let open = OpenConnections::default();
    tokio::spawn(async move {
        // Refusals are counted by reason (the metrics, `lb node status`),
        // and logged at debug level only: anyone who reaches the port can
        // cause them, and at warn they would flood the log and push the
        // status page's events out.
        loop {
            let (stream, peer) = crate::listen::accept("registration", || listener.accept()).await;
            let Some(held) = open.take(peer.ip()) else {
                counts.count(Refusal::Busy);
                debug!(%peer, "registration connection closed: too many open");
                continue;
            };
            let (secret, tx, counts) = (secret.clone(), tx.clone(), counts.clone());
            tokio::spawn(async move {
                let _held = held;
                if let Err(why) = serve(stream, peer.ip(), &secret, &tx, &counts).await {
                    debug!(%peer, reason = %why, "registration request refused");
                }
            });
        }
    });
    Ok(refused)
}

/// The registration port's open connections, by peer.
#[derive(Clone, Default)]
struct OpenConnections(Arc<std::sync::Mutex<BTreeMap<IpAddr, usize>>>);

impl OpenConnections {
    /// Counts a connection from `peer` open until the guard drops, unless
    /// that would pass [`MAX_OPEN_PER_PEER`] or [`MAX_OPEN`].
    fn take(&self, peer: IpAddr) -> Option<OpenConnection> {
        let mut open = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let total: usize = open.values().sum();
        let mine = open.get(&peer).copied().unwrap_or(0);
        if mine >= MAX_OPEN_PER_PEER || total >= MAX_OPEN {
            return None;
        }
        *open.entry(peer).or_default() += 1;
        Some(OpenConnection {
            open: self.clone(),
            peer,
        })
    }
}

/// One open connection, counted until dropped.
struct OpenConnection {
    open: OpenConnections,
    peer: IpAddr,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let mut open = self
            .open
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

/// Answers one connection.
async fn serve(
    stream: TcpStream,
    peer: IpAddr,
    secret: &Secret,
    tx: &mpsc::Sender<Request>,
    refused: &Refused,
) -> Result<(), String> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read).take(MAX_LINE as u64);
    let read = tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await;
    // What the answer is bound to: the request's MAC, as sent.
    let mut bound = line.split_once(' ').map_or("", |(m, _)| m).to_string();
    let answer = match read {
        Ok(Ok(_)) if line.ends_with('\n') => {
            match registration::verify(secret, line.trim_end(), SystemTime::now()) {
                Ok((message, mac)) => {
                    bound = mac;
                    let (reply, answer) = oneshot::channel();
                    tx.send(Request {
                        message,
                        peer,
                        reply,
                    })
                    .await
                    .map_err(|_| "the daemon is stopping".to_string())?;
                    answer
                        .await
                        .map_err(|_| "the daemon is stopping".to_string())?
                }
                Err(r) => {
                    refused.count(r);
                    Answer {
                        rejected: Some(r.to_string()),
                        ..Answer::default()
                    }
                }
            }
        }
        _ => {
            refused.count(Refusal::Malformed);
            Answer {
                rejected: Some(Refusal::Malformed.to_string()),
                ..Answer::default()
            }
        }
    };
    let text = registration::sign_answer(secret, &bound, &answer).map_err(|e| e.to_string())?;
    let _ = write.write_all(text.as_bytes()).await;
    match answer.rejected {
        Some(why) => Err(why),
        None => Ok(()),
    }
}

/// The registrations a daemon holds, and what became of them.
#[derive(Debug, Default)]
pub(crate) struct Port {
    lease: Duration,
    /// Registrations a service could not take, so far.
    pub admission_refused: u64,
    /// Requests from an address other than the one they register, or not
    /// newer than the last for the same registration, so far.
    refused_senders: u64,
    /// When the last request for each registration was sent: an older or
    /// equal one is a replay, or out of order.
    last_sent: BTreeMap<(String, IpAddr), u64>,
}

impl Port {
    /// The port of a daemon with `lease`.
    pub(crate) fn new(lease: Duration) -> Port {
        Port {
            lease,
            ..Port::default()
        }
    }

    /// Why `message` from `peer` is refused whole, if it is: a host
    /// registers its own address only (the one it connects from), and each
    /// request must be newer than the last for the same registration.
    fn sender_refusal(&mut self, message: &Message, peer: IpAddr) -> Option<String> {
        let peer = canonical(peer);
        if let Some(r) = message.registrations.values().find(|r| r.address != peer) {
            return Some(format!(
                "{} registers {}: a host registers its own address only",
                peer, r.address
            ));
        }
        let replayed = message.registrations.iter().any(|(s, r)| {
            self.last_sent
                .get(&(s.clone(), r.address))
                .is_some_and(|&last| message.time_ms <= last)
        });
        if replayed {
            return Some("not newer than the last request: replayed or out of order".into());
        }
        if !message.query {
            for (s, r) in &message.registrations {
                self.last_sent
                    .insert((s.clone(), r.address), message.time_ms);
            }
        }
        None
    }

    /// Takes a verified request: renews, changes or removes its
    /// registrations and applies the result; answers with what was refused,
    /// the flows left on draining ones, and the services' VIPs and modes.
    pub(super) fn receive(
        &mut self,
        ctl: &mut Controller,
        message: Message,
        peer: IpAddr,
        summary: &mut SummaryCache,
    ) -> Answer {
        let mut answer = Answer {
            lease_ms: Some(u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX)),
            ..Answer::default()
        };
        if let Some(why) = self.sender_refusal(&message, peer) {
            self.refused_senders += 1;
            answer.rejected = Some(why);
            return answer;
        }
        for service in message.registrations.keys() {
            if let Some(s) = ctl.desired().services.get(service) {
                answer.services.insert(service.clone(), (s.vip, s.mode));
            }
        }
        if message.query {
            return answer;
        }
        let lapses = Instant::now() + self.lease;
        let mut held = ctl.runtime().registered.clone();
        for (service, r) in &message.registrations {
            let entry = held.entry(service.clone()).or_default();
            if message.leave {
                entry.remove(&r.address);
            } else {
                entry.insert(
                    r.address,
                    Held {
                        registration: r.clone(),
                        lapses,
                    },
                );
            }
        }
        held.retain(|_, m| !m.is_empty());
        // A renewal changes only when it lapses: kept in memory (a
        // restarted daemon renews every registration anyway), no rebuild.
        if registrations_of(&held) == registrations_of(&ctl.runtime().registered) {
            ctl.set_registered(held);
        } else {
            // A read from before a drain applied could miss flows pinned
            // since: the answer reads afresh.
            summary.forget();
            match super::apply_registrations(ctl, held) {
                Ok(refused) => self.admission_refused += mine(&refused, &message).len() as u64,
                Err(e) => answer.rejected = Some(format!("{e:#}")),
            }
        }
        answer.refused = mine(ctl.registrations_refused(), &message);
        with_flows(ctl, &message, answer, summary)
    }

    /// Forgets the send times a replay check no longer needs: a request
    /// sent before `now` less [`registration::MAX_SKEW`] is refused for its
    /// skew anyway. Without this the table keeps one entry for every
    /// (service, address) ever named.
    fn forget_old_senders(&mut self, now_ms: u64) {
        let oldest = now_ms.saturating_sub(registration::MAX_SKEW.as_millis() as u64);
        self.last_sent.retain(|_, sent| *sent >= oldest);
    }

    /// Drops the registrations whose lease lapsed, and applies that;
    /// returns whether any did.
    pub(crate) fn expire(&mut self, ctl: &mut Controller) -> Result<bool> {
        self.forget_old_senders(registration::millis(SystemTime::now()));
        let now = Instant::now();
        let mut held = ctl.runtime().registered.clone();
        let before: usize = held.values().map(BTreeMap::len).sum();
        for m in held.values_mut() {
            m.retain(|ip, h| {
                let live = h.lapses > now;
                if !live {
                    info!(backend = %ip, host = %h.registration.host, "registration lapsed");
                }
                live
            });
        }
        held.retain(|_, m| !m.is_empty());
        if held.values().map(BTreeMap::len).sum::<usize>() == before {
            return Ok(false);
        }
        super::apply_registrations(ctl, held)?;
        Ok(true)
    }

    /// The figures for the metrics.
    pub(crate) fn gauges(&self, ctl: &Controller, refused: &Refused) -> Gauges {
        let mut counts = refused.counts();
        counts.push(("admission", self.admission_refused));
        counts.push(("sender", self.refused_senders));
        Gauges {
            held: ctl.runtime().registered.values().map(BTreeMap::len).sum(),
            refused: counts,
        }
    }
}

/// The refusals of `message`'s own registrations among `refused`.
fn mine(refused: &[crate::fleet::registry::Refused], message: &Message) -> Vec<String> {
    refused
        .iter()
        .filter(|x| {
            message
                .registrations
                .get(&x.service)
                .is_some_and(|r| r.address == x.address)
        })
        .map(ToString::to_string)
        .collect()
}

/// An IPv4 peer as an IPv4 address, whichever socket family took it.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The registrations `held` as the admission takes them.
pub(crate) fn registrations_of(held: &HeldRegistrations) -> Registrations {
    held.iter()
        .map(|(s, m)| {
            let regs = m
                .iter()
                .map(|(ip, h)| (*ip, h.registration.clone()))
                .collect();
            (s.clone(), regs)
        })
        .collect()
}

/// `answer` with the flows left on each draining registration of
/// `message`, from the table's summary (at most a second old).
fn with_flows(
    ctl: &Controller,
    message: &Message,
    mut answer: Answer,
    summary: &mut SummaryCache,
) -> Answer {
    if message.leave || !message.registrations.values().any(|r| r.draining) {
        return answer;
    }
    let active = summary.get(ctl).ok().map(|s| &s.active);
    for (service, r) in message.registrations.iter().filter(|(_, r)| r.draining) {
        let backend = ctl
            .services()
            .get(service)
            .and_then(|s| s.backends.get(&r.address));
        let flows = match (backend, active) {
            (None, _) => 0,
            (Some(b), Some(active)) => active.of(b),
            // Unreadable: never zero, so a drain does not end on a failed read.
            (Some(_), None) => u64::MAX,
        };
        answer.flows.insert(service.clone(), flows);
    }
    answer
}

/// Gives registrations held in a state file a fresh lease: their agents
/// renew them within it if they still run.
pub(crate) fn renew_all(held: &mut HeldRegistrations, lease: Duration) {
    let lapses = Instant::now() + lease;
    for h in held.values_mut().flat_map(BTreeMap::values_mut) {
        h.lapses = lapses;
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn peer(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 18, 0, n))
    }

    #[test]
    fn connections_are_bounded_per_peer_and_in_all_and_freed_when_they_end() {
        let open = OpenConnections::default();
        let mine: Vec<_> = (0..MAX_OPEN_PER_PEER)
            .map(|_| open.take(peer(1)).unwrap())
            .collect();
        assert!(open.take(peer(1)).is_none(), "one more from the same host");
        assert!(open.take(peer(2)).is_some(), "another host is not held up");
        drop(mine);
        assert!(
            open.0.lock().unwrap().is_empty(),
            "ended connections are forgotten"
        );

        let all: Vec<_> = (0..MAX_OPEN)
            .map(|i| open.take(peer((i / MAX_OPEN_PER_PEER) as u8)).unwrap())
            .collect();
        assert!(open.take(peer(255)).is_none(), "one more in all");
        assert_eq!(open.0.lock().unwrap().len(), MAX_OPEN / MAX_OPEN_PER_PEER);
        drop(all);
        assert!(open.take(peer(255)).is_some());
    }

    #[test]
    fn a_state_file_from_before_monotonic_leases_still_loads() {
        let text = r#"{"registration": {"address": "198.18.0.1", "weight": 1,
            "host": "h", "version": "0"}, "expires_ms": 1700000000000}"#;
        let held: Held = serde_json::from_str(text).unwrap();
        assert_eq!(held.registration.address, peer(1));
        let saved = serde_json::to_value(&held).unwrap();
        assert!(saved.get("lapses").is_none() && saved.get("expires_ms").is_none());
    }

    #[test]
    fn send_times_are_kept_only_while_a_replay_could_pass_the_skew_check() {
        let mut port = Port::new(Duration::from_secs(3));
        let skew = registration::MAX_SKEW.as_millis() as u64;
        let sent = |port: &mut Port, service: &str, time_ms| {
            let r = Registration {
                address: peer(1),
                weight: 1,
                percent: 100,
                draining: false,
                host: "h".into(),
                version: "0".into(),
            };
            let message = Message {
                time_ms,
                leave: false,
                query: false,
                registrations: BTreeMap::from([(service.to_string(), r)]),
            };
            port.sender_refusal(&message, peer(1))
        };
        let start = 1_000_000;
        for i in 0..1000 {
            assert_eq!(sent(&mut port, &format!("s{i}"), start), None);
        }
        assert_eq!(sent(&mut port, "fresh", start + skew), None);
        assert!(sent(&mut port, "fresh", start + skew).is_some(), "a replay");
        port.forget_old_senders(start + skew + 1);
        assert_eq!(port.last_sent.len(), 1, "only the fresh one is kept");
        assert!(
            sent(&mut port, "fresh", start + skew).is_some(),
            "still a replay"
        );
    }
}
