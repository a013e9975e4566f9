//! The fleet's state in etcd: reads of the prefix, writes guarded by the
//! revisions they read, and the background session that watches the prefix,
//! keeps this node's status alive under a lease, and does the leader's work.
//!
//! Nothing here touches the data plane: the daemon applies what the session
//! sends it. When etcd is unreachable the session says so and retries every
//! second; the daemon keeps forwarding with what it applied last.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::{
    agree::{self, Ramps},
    registry,
    state::{self, Entry, Guard, Keys, NodeReport, Snapshot},
};
use crate::{bird, config};

/// How long one etcd call may take before the fleet counts as unreachable.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Between attempts to reach etcd again.
const RETRY: Duration = Duration::from_secs(1);
/// How often the leader steps slow-start ramps.
const RAMP_TICK: Duration = Duration::from_millis(250);
/// How often the session asks BIRD for the BGP sessions it reports.
const BGP_POLL: Duration = Duration::from_secs(2);
/// The longest the session goes without reading the prefix, whatever its
/// watch says: a watch on a member cut off from the others can stay open
/// and silent, where a (linearizable) read fails.
const RESYNC: Duration = Duration::from_secs(5);

/// What the session tells the daemon.
#[derive(Debug)]
pub enum Event {
    /// A fresh read of the prefix.
    Snapshot(Box<Snapshot>),
    /// etcd cannot be reached, with why.
    Unreachable(String),
}

/// One connection to etcd, for reads and guarded writes.
#[derive(Clone)]
pub struct Store {
    client: Client,
    keys: Keys,
}

/// Why a guarded write did not land.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Another write landed between the read and this write.
    #[error("conflict: {0}")]
    Conflict(String),
    /// etcd could not be reached.
    #[error("etcd: {0:#}")]
    Unreachable(anyhow::Error),
    /// Sent, but no answer came in time: etcd may yet have applied it.
    #[error("etcd: no answer within {CALL_TIMEOUT:?}")]
    Unanswered,
}

fn compare(key: String, revision: i64) -> Compare {
    if revision == 0 {
        Compare::version(key, CompareOp::Equal, 0)
    } else {
        Compare::mod_revision(key, CompareOp::Equal, revision)
    }
}

/// rustls settings from the node's PEM files.
fn tls_options(tls: &config::FleetTls) -> Result<TlsOptions> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).with_context(|| format!("reading {} ([fleet] TLS)", p.display()))
    };
    let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca_file)?));
    if let Some((cert, key)) = &tls.identity {
        options = options.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(options)
}

impl Store {
    /// Connects to the fleet's etcd (the first endpoint that answers).
    pub async fn connect(fleet: &config::Fleet) -> Result<Store> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(1), CALL_TIMEOUT)
            .with_keep_alive_while_idle(true)
            // Streams (the watch, lease renewals) on a member without a
            // leader are refused rather than left open and silent.
            .with_require_leader(true);
        if let Some(tls) = &fleet.tls {
            options = options.with_tls(tls_options(tls)?);
        }
        let client = tokio::time::timeout(
            CALL_TIMEOUT,
            Client::connect(&fleet.endpoints, Some(options)),
        )
        .await
        .map_err(|_| anyhow!("no answer within {CALL_TIMEOUT:?}"))?
        .with_context(|| format!("connecting to etcd at {}", fleet.endpoints.join(", ")))?;
        Ok(Store {
            client,
            keys: Keys::new(&fleet.prefix),
        })
    }

    /// The etcd client itself (tests write keys by hand through it).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The fleet's keys.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Reads the whole prefix at one revision.
    pub async fn read(&self) -> Result<Snapshot> {
        let mut kv = self.client.kv_client();
        let response = tokio::time::timeout(
            CALL_TIMEOUT,
            kv.get(self.keys.all(), Some(GetOptions::new().with_prefix())),
        )
        .await
        .map_err(|_| anyhow!("etcd did not answer a read within {CALL_TIMEOUT:?}"))?
        .context("reading the fleet's state from etcd")?;
        let revision = response
            .header()
            .map_or(0, etcd_client::ResponseHeader::revision);
        let entries: Vec<Entry> = response
            .kvs()
            .iter()
            .map(|kv| Entry {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                value: kv.value().to_vec(),
                mod_revision: kv.mod_revision(),
            })
            .collect();
        Ok(state::decode(&self.keys, revision, &entries))
    }

    /// Writes the desired keys in one transaction that lands only if both
    /// are as `guard` read them. `None` leaves a key as it is. Returns the
    /// revision the write created.
    pub async fn write(
        &self,
        guard: Guard,
        services: Option<&str>,
        overrides: Option<&state::Overrides>,
    ) -> Result<i64, WriteError> {
        let mut ops = Vec::new();
        if let Some(text) = services {
            ops.push(TxnOp::put(self.keys.services(), text, None));
        }
        if let Some(o) = overrides {
            let json = serde_json::to_string(o).map_err(|e| WriteError::Unreachable(e.into()))?;
            ops.push(TxnOp::put(self.keys.overrides(), json, None));
        }
        let txn = Txn::new()
            .when(vec![
                compare(self.keys.services(), guard.services),
                compare(self.keys.overrides(), guard.overrides),
            ])
            .and_then(ops);
        let mut kv = self.client.kv_client();
        let response = tokio::time::timeout(CALL_TIMEOUT, kv.txn(txn))
            .await
            .map_err(|_| WriteError::Unanswered)?
            .map_err(|e| WriteError::Unreachable(e.into()))?;
        if !response.succeeded() {
            return Err(WriteError::Conflict(
                "the fleet's state changed since it was read".into(),
            ));
        }
        Ok(response
            .header()
            .map_or(0, etcd_client::ResponseHeader::revision))
    }

    /// The leader's write of the agreed view, guarded by its leadership.
    async fn write_health(&self, node: &str, health: &state::AgreedHealth) -> Result<bool> {
        let text = serde_json::to_string(health)?;
        // Every node would refuse it: keep the view there is.
        ensure!(
            text.len() <= state::MAX_VALUE,
            "the agreed view would take {} bytes, over the {}-byte limit of a key",
            text.len(),
            state::MAX_VALUE
        );
        let txn = Txn::new()
            .when(vec![Compare::value(
                self.keys.leader(),
                CompareOp::Equal,
                node,
            )])
            .and_then(vec![TxnOp::put(self.keys.health(), text, None)]);
        let mut kv = self.client.kv_client();
        let r = tokio::time::timeout(CALL_TIMEOUT, kv.txn(txn))
            .await
            .map_err(|_| anyhow!("etcd did not answer within {CALL_TIMEOUT:?}"))??;
        Ok(r.succeeded())
    }

    /// Becomes the leader if there is none: the leader key, under `lease`.
    async fn campaign(&self, node: &str, lease: i64) -> Result<bool> {
        let txn = Txn::new()
            .when(vec![Compare::version(
                self.keys.leader(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(
                self.keys.leader(),
                node,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let mut kv = self.client.kv_client();
        let r = tokio::time::timeout(CALL_TIMEOUT, kv.txn(txn))
            .await
            .map_err(|_| anyhow!("etcd did not answer within {CALL_TIMEOUT:?}"))??;
        Ok(r.succeeded())
    }
}

/// What the daemon hands the session.
pub struct Session {
    /// The fleet settings.
    pub fleet: config::Fleet,
    /// BIRD's control socket, when the node announces.
    pub bird_socket: Option<PathBuf>,
    /// This node's report (without BGP, which the session adds).
    pub report: watch::Receiver<Option<NodeReport>>,
    /// Where snapshots go.
    pub events: mpsc::Sender<Event>,
}

/// Runs the session until the daemon drops its receiver: connects, and on
/// any failure reports etcd unreachable and starts over after [`RETRY`].
pub async fn run(mut s: Session) {
    let mut bgp = Bgp::default();
    loop {
        let error = match connected(&mut s, &mut bgp).await {
            Ok(()) => return,
            Err(e) => format!("{e:#}"),
        };
        if s.events.send(Event::Unreachable(error)).await.is_err() {
            return;
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// The BGP sessions last read from BIRD.
#[derive(Default)]
struct Bgp {
    read: Option<Instant>,
    sessions: Vec<bird::Protocol>,
    error: Option<String>,
}

impl Bgp {
    async fn refresh(&mut self, socket: Option<&PathBuf>) {
        let Some(socket) = socket else { return };
        if self.read.is_some_and(|t| t.elapsed() < BGP_POLL) {
            return;
        }
        self.read = Some(Instant::now());
        match bird::bgp_sessions(socket).await {
            Ok(s) => (self.sessions, self.error) = (s, None),
            Err(e) => (self.sessions, self.error) = (Vec::new(), Some(format!("{e:#}"))),
        }
    }
}

/// Keeps this node's lease alive, renewed every third of it, in a task of
/// its own: the session's loop makes etcd calls of up to [`CALL_TIMEOUT`]
/// each between its waits, and a lapsed lease would make the node leave
/// the fleet. Returns why it stopped.
async fn keep_alive(
    mut keeper: LeaseKeeper,
    mut kept: LeaseKeepAliveStream,
    lease: Duration,
) -> anyhow::Error {
    let mut renew = tokio::time::interval(lease / 3);
    let mut last_kept = Instant::now();
    loop {
        tokio::select! {
            _ = renew.tick() => {
                if last_kept.elapsed() > lease {
                    return anyhow!("this node's lease lapsed: etcd did not answer keep-alives for {lease:?}");
                }
                if let Err(e) = keeper.keep_alive().await {
                    return anyhow::Error::new(e).context("renewing this node's lease");
                }
            }
            answer = kept.message() => match answer {
                Ok(Some(a)) if a.ttl() > 0 => last_kept = Instant::now(),
                Ok(_) => return anyhow!("this node's lease expired"),
                Err(e) => return anyhow::Error::new(e).context("renewing this node's lease"),
            },
        }
    }
}

/// A task aborted when its session ends, however it ends.
struct Aborting<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Aborting<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One connected session; returns `Ok` only when the daemon is gone.
async fn connected(s: &mut Session, bgp: &mut Bgp) -> Result<()> {
    let store = Store::connect(&s.fleet).await?;
    let node = s.fleet.node.clone();
    let ttl = s.fleet.lease.as_secs().max(1) as i64;
    let mut leases = store.client.lease_client();
    let lease = tokio::time::timeout(CALL_TIMEOUT, leases.grant(ttl, None))
        .await
        .map_err(|_| anyhow!("etcd did not grant a lease within {CALL_TIMEOUT:?}"))?
        .context("granting this node's lease")?
        .id();
    let (keeper, kept) = tokio::time::timeout(CALL_TIMEOUT, leases.keep_alive(lease))
        .await
        .map_err(|_| anyhow!("etcd did not renew the lease within {CALL_TIMEOUT:?}"))??;
    let mut keeping = Aborting(tokio::spawn(keep_alive(keeper, kept, s.fleet.lease)));
    let snapshot = store.read().await?;
    let mut watch_client = store.client.watch_client();
    let mut watch = tokio::time::timeout(
        CALL_TIMEOUT,
        watch_client.watch(
            store.keys.all(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(snapshot.revision + 1),
            ),
        ),
    )
    .await
    .map_err(|_| anyhow!("etcd did not start the watch within {CALL_TIMEOUT:?}"))?
    .context("watching the fleet's prefix")?;
    info!(
        node,
        lease,
        revision = snapshot.revision,
        "joined the fleet"
    );
    let mut leader = Leader::default();
    // The leader's step's last error, said once until it changes.
    let mut leader_failing: Option<String> = None;
    let mut published: Option<NodeReport> = None;
    let mut snapshot = snapshot;
    let mut tick = tokio::time::interval(RAMP_TICK);
    let mut read_at = Instant::now();
    loop {
        // A failed campaign or agreed-view write (a slow etcd, a view too
        // large) is tried again at the next read, at the latest after
        // `RESYNC`: ending the session would have this node evict on its
        // own probes meanwhile. Reads, the watch, this node's report and
        // its lease still end it when they fail.
        match leader.act(&store, &node, lease, &snapshot).await {
            Ok(()) => {
                if leader_failing.take().is_some() {
                    info!(node, "the leader's step works again");
                }
            }
            Err(e) => {
                let why = format!("{e:#}");
                if leader_failing.as_ref() != Some(&why) {
                    warn!(node, error = %why, "the fleet leader's step failed: retrying at the next read");
                }
                leader_failing = Some(why);
            }
        }
        if s.events
            .send(Event::Snapshot(Box::new(snapshot.clone())))
            .await
            .is_err()
        {
            return Ok(());
        }
        // Publish this node's report when it (or BIRD's view) changed.
        bgp.refresh(s.bird_socket.as_ref()).await;
        let report = s.report.borrow_and_update().clone().map(|mut r| {
            r.bgp = bgp.sessions.clone();
            r.bgp_error = bgp.error.clone();
            r
        });
        if let Some(r) = report
            && published.as_ref() != Some(&r)
        {
            let mut kv = store.client.kv_client();
            tokio::time::timeout(
                CALL_TIMEOUT,
                kv.put(
                    store.keys.node(&node),
                    serde_json::to_string(&r)?,
                    Some(PutOptions::new().with_lease(lease)),
                ),
            )
            .await
            .map_err(|_| anyhow!("etcd did not take this node's status in time"))?
            .context("publishing this node's status")?;
            published = Some(r);
        }
        // Wait for something to happen; anything but a lease renewal or an
        // idle tick means the prefix may have changed: read it again.
        loop {
            tokio::select! {
                message = watch.message() => {
                    match message.context("watching the fleet's prefix")? {
                        Some(m) if m.canceled() => bail!("etcd cancelled the watch: {}", m.cancel_reason()),
                        Some(_) => break,
                        None => bail!("etcd closed the watch"),
                    }
                }
                changed = s.report.changed() => {
                    if changed.is_err() { return Ok(()); }
                    break;
                }
                stopped = &mut keeping.0 => {
                    return Err(stopped.unwrap_or_else(|e| anyhow!("the lease's keep-alive task: {e}")));
                }
                _ = tick.tick() => {
                    let bgp_due = s.bird_socket.is_some() && bgp.read.is_none_or(|t| t.elapsed() >= BGP_POLL);
                    if leader.ramps.ramping() || bgp_due || read_at.elapsed() >= RESYNC { break; }
                }
            }
        }
        snapshot = store.read().await?;
        read_at = Instant::now();
    }
}

/// The leader's part: hold the leader key, and keep `P/health` equal to
/// the live nodes' majority verdict with slow-start steps.
#[derive(Default)]
struct Leader {
    ramps: Ramps,
    leading: bool,
    /// The last agreed view read while leading that the nodes took: the
    /// ramps a fresh view written over a refused one go on from.
    last_view: state::AgreedHealth,
}

impl Leader {
    async fn act(&mut self, store: &Store, node: &str, lease: i64, snap: &Snapshot) -> Result<()> {
        let mine = snap.leader.as_deref() == Some(node);
        if snap.leader.is_none()
            && store
                .campaign(node, lease)
                .await
                .context("campaigning for the fleet's leadership")?
        {
            info!(node, "became the fleet's leader");
            // The next snapshot (the watch sees the key) does the work.
            return Ok(());
        }
        if mine != self.leading {
            self.leading = mine;
            self.ramps = Ramps::default();
            self.last_view = state::AgreedHealth::new();
        }
        // A bad agreed view alone refuses the state on every node, and only
        // the leader writes that key: it writes a fresh view over it.
        let Some(state) = snap.state.as_ref().ok().or(snap.health_refused.as_ref()) else {
            return Ok(());
        };
        if !mine {
            return Ok(());
        }
        // Kept by the leader alone: other nodes never repair.
        if let Ok(taken) = &snap.state {
            self.last_view.clone_from(&taken.health);
        }
        let Ok(services) = config::service_backends(&state.services) else {
            return Ok(());
        };
        // Registered backends are voted on as configured ones are (a
        // registration for no service has no verdict).
        let registered = registry::addresses(&state.registered);
        let backends: BTreeMap<String, Vec<std::net::IpAddr>> = services
            .iter()
            .map(|(n, (ips, _))| {
                let mut ips = ips.clone();
                let extra = registered.get(n).into_iter().flatten();
                ips.extend(extra.filter(|ip| !ips.contains(ip)).collect::<Vec<_>>());
                (n.clone(), ips)
            })
            .collect();
        let slow_start: BTreeMap<String, Duration> = services
            .iter()
            .map(|(n, (_, slow))| (n.clone(), *slow))
            .collect();
        let reports: Vec<&state::NodeReport> = snap.nodes.values().collect();
        let verdicts = agree::majority(&backends, &reports);
        let repair = snap.health_refused.is_some();
        let previous = if repair {
            &self.last_view
        } else {
            &state.health
        };
        let health = self
            .ramps
            .step(previous, &verdicts, &slow_start, Instant::now());
        if !repair && health == state.health {
            return Ok(());
        }
        if !store
            .write_health(node, &health)
            .await
            .context("writing the agreed view")?
        {
            warn!(
                node,
                "lost the fleet's leadership while writing the agreed view"
            );
        } else if repair {
            warn!(node, "wrote a fresh agreed view over the refused one");
        }
        Ok(())
    }
}
