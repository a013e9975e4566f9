//! The fleet: how fast a dead node leaves the router's route (BFD, and the
//! BGP hold timer alone) and how many long-lived connections survive it; how
//! fast a change made through one node is live on all three; and etcd's
//! write, watch and apply latency at 100 and 1,000 backends.
//!
//! Real BIRD on a router and three lb nodes, real etcd, real `lb daemon`s
//! (`lb::demo::edge`, the fleet tests' topology). "Live" is the moment each
//! node's service entry points at its new table copy, watched through its
//! pinned map, as in `reaction`.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};
use lb::{
    config,
    demo::edge::{
        ECHO_PORT, EchoServer, Edge, Sessions, Timers, backend_name, backend_v4, fleet_node_config,
        fleet_services, node_v4,
    },
    fleet::{
        state::{FleetState, Guard},
        store::Store,
    },
};
use lb_common::wire::IPPROTO_TCP;
use lb_tests::{daemon::Daemon, lab::service_key};
use serde::{Deserialize, Serialize};

use crate::{
    reaction::{Watch, ms},
    stats::Summary,
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const NODES: usize = 3;
const BACKENDS: usize = 3;
/// The node killed in the failure runs.
const VICTIM: usize = 2;
/// Long-lived connections held through each failure.
const CONNECTIONS: usize = 200;
/// The hold time of the runs without BFD (BIRD's default is 240 s; a
/// short one keeps the run short, and the figure scales with it).
const HOLD_TIME: u32 = 9;
/// Longest wait for sessions, announcements and withdrawals.
const TIMEOUT: Duration = Duration::from_secs(60);
/// Backend counts of the etcd runs.
const ETCD_BACKENDS: [usize; 2] = [100, 1_000];
/// The etcd runs' key prefix (apart from the daemons' `/lb`).
const BENCH_PREFIX: &str = "/lb-bench";

/// How much to measure.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Plan {
    /// Node failures with BFD.
    pub bfd_failures: usize,
    /// Node failures with the hold timer alone.
    pub hold_failures: usize,
    /// Changes timed to live on every node.
    pub changes: usize,
    /// etcd writes timed per backend count.
    pub etcd_writes: usize,
}

impl Plan {
    /// The full plan, or the quick one.
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                bfd_failures: 1,
                hold_failures: 1,
                changes: 5,
                etcd_writes: 10,
            }
        } else {
            Plan {
                bfd_failures: 3,
                hold_failures: 2,
                changes: 20,
                etcd_writes: 30,
            }
        }
    }
}

/// Node failures under one kind of timer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Failures {
    /// How the sessions detect a dead peer.
    pub timers: String,
    /// From the node's link going down to the router's route without it, ms.
    pub withdrawal_ms: Summary,
    /// Connections held through each failure.
    pub connections: usize,
    /// Of those, how many answered from their backend afterwards, per run.
    pub survived: Vec<usize>,
}

/// etcd at one backend count.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EtcdRun {
    /// Backends in the service.
    pub backends: usize,
    /// Bytes of the services text.
    pub bytes: usize,
    /// A guarded write (lb's transaction), ms.
    pub write_ms: Summary,
    /// From the write's start to a watcher's event, ms.
    pub watch_ms: Summary,
    /// A node's read of the prefix and validation of the services, ms.
    pub read_validate_ms: Summary,
}

/// The part's results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FleetResults {
    /// How much was measured.
    pub plan: Plan,
    /// With BFD (100 ms x 3).
    pub bfd: Failures,
    /// With the hold timer alone.
    pub hold: Failures,
    /// `lb backend set-weight` through one node: run to returned, ms.
    pub change_return_ms: Summary,
    /// Run to the new table live on every node (the last of three), ms.
    pub change_all_live_ms: Summary,
    /// etcd at 100 and 1,000 backends.
    pub etcd: Vec<EtcdRun>,
}

/// The fleet with its servers and daemons.
struct Fleet3 {
    daemons: Vec<Daemon>,
    _servers: Vec<EchoServer>,
    edge: Edge,
}

impl Fleet3 {
    fn start(timers: Timers, tag: &str) -> Result<Fleet3> {
        let mut edge = Edge::build_with(NODES, BACKENDS, &[VIP], timers)?;
        edge.start_etcd(false)?;
        let servers = edge
            .backends
            .iter()
            .enumerate()
            .map(|(i, ns)| EchoServer::start(ns, &backend_name(i)))
            .collect::<Result<_>>()?;
        let etcd = edge.etcd.as_ref().context("no etcd")?;
        let mut daemons = Vec::new();
        for (i, n) in edge.nodes.iter().enumerate() {
            let bird = n.bird.as_ref().context("no BIRD")?;
            daemons.push(Daemon::start(
                &n.ns,
                &format!("bench-{tag}{i}"),
                &fleet_node_config(i, bird, etcd),
            )?);
        }
        let services = daemons[0].dir.join("services.toml");
        std::fs::write(&services, fleet_services(VIP, BACKENDS))?;
        let path = services.to_str().context("path")?;
        daemons[0].cli(&["fleet", "import", path])?;
        let all: Vec<Ipv4Addr> = (0..NODES).map(node_v4).collect();
        edge.wait_paths(VIP, &all, TIMEOUT)?;
        Ok(Fleet3 {
            daemons,
            _servers: servers,
            edge,
        })
    }

    /// Kills node [`VICTIM`] (daemon SIGKILLed, link down) under
    /// [`CONNECTIONS`] connections; returns the withdrawal time and the
    /// connections that survived, then brings the node back.
    fn fail_once(&mut self, wait: Duration) -> Result<(f64, usize)> {
        let all: Vec<Ipv4Addr> = (0..NODES).map(node_v4).collect();
        let survivors: Vec<Ipv4Addr> = all
            .iter()
            .copied()
            .filter(|a| *a != node_v4(VICTIM))
            .collect();
        let mut sessions = Sessions::open(
            &self.edge.client,
            SocketAddr::new(VIP.into(), ECHO_PORT),
            CONNECTIONS,
        )?;
        self.daemons[VICTIM].kill(libc::SIGKILL)?;
        self.edge.nodes[VICTIM].link(false)?;
        let t = self.edge.wait_paths(VIP, &survivors, wait)?;
        let (ok, _) = sessions.check();
        drop(sessions);
        let node = &mut self.edge.nodes[VICTIM];
        node.link(true)?;
        node.stop_bird();
        node.start_bird(VICTIM)?;
        self.daemons[VICTIM].spawn()?;
        self.edge.wait_paths(VIP, &all, TIMEOUT)?;
        Ok((ms(t), ok))
    }
}

fn failures(timers: Timers, runs: usize, what: &str) -> Result<Failures> {
    let mut fleet = Fleet3::start(timers, what)?;
    let wait = match timers {
        Timers::Bfd => Duration::from_secs(10),
        Timers::HoldTime(s) => Duration::from_secs(u64::from(s) * 2),
    };
    let (mut withdrawal, mut survived) = (Vec::new(), Vec::new());
    for i in 0..runs {
        eprintln!("fleet: node failure ({what}) {}/{runs}", i + 1);
        let (t, ok) = fleet.fail_once(wait)?;
        withdrawal.push(t);
        survived.push(ok);
    }
    Ok(Failures {
        timers: match timers {
            Timers::Bfd => "BFD, 100 ms x 3".into(),
            Timers::HoldTime(s) => format!("no BFD, hold time {s} s"),
        },
        withdrawal_ms: Summary::of(&withdrawal).context("no failure measured")?,
        connections: CONNECTIONS,
        survived,
    })
}

/// Changes through node 0, each watched on every node's pinned map.
fn changes(runs: usize) -> Result<(Summary, Summary)> {
    let fleet = Fleet3::start(Timers::Bfd, "change")?;
    let key = service_key(IpAddr::V4(VIP), ECHO_PORT, IPPROTO_TCP);
    let subject = backend_v4(0).to_string();
    let (mut returned, mut live) = (Vec::new(), Vec::new());
    for i in 0..runs {
        eprintln!("fleet: change {}/{runs}", i + 1);
        let watches = fleet
            .daemons
            .iter()
            .map(|d| Watch::start(&d.pins, key))
            .collect::<Result<Vec<_>>>()?;
        let weight = (2 + i % 2).to_string();
        let issued = Instant::now();
        fleet.daemons[0].cli(&["backend", "set-weight", "echo", &subject, &weight])?;
        returned.push(ms(issued.elapsed()));
        let mut last = issued;
        for w in watches {
            last = last.max(w.changed()?);
        }
        live.push(ms(last - issued));
    }
    let of = |v: &[f64]| Summary::of(v).context("nothing measured");
    Ok((of(&returned)?, of(&live)?))
}

/// A fleet services text: service `echo` with `n` backends; `round`
/// changes one weight so every write is a change.
fn services(n: usize, round: usize) -> String {
    let mut text =
        "[[service]]\nname = \"echo\"\nvip = \"198.18.1.1\"\nport = 7\nprotocol = \"tcp\"\n"
            .to_string();
    for i in 0..n {
        let weight = if i == 0 { 1 + round % 2 } else { 1 };
        text += &format!(
            "\n[[service.backend]]\naddress = \"198.18.{}.{}\"\nweight = {weight}\n",
            10 + i / 250,
            1 + i % 250
        );
    }
    text
}

/// A node's own file able to hold 1,000 backends.
const BENCH_NODE: &str = "[settings]\ninterfaces = [\"eth0\"]\nmax_backends = 4096\n";

fn etcd(writes: usize) -> Result<Vec<EtcdRun>> {
    let mut edge = Edge::build(0, 0, &[])?;
    edge.start_etcd(false)?;
    let etcd = edge.etcd.as_ref().context("no etcd")?;
    let fleet = etcd.fleet(BENCH_PREFIX, "bench");
    let mut out = Vec::new();
    for n in ETCD_BACKENDS {
        eprintln!("fleet: etcd with {n} backends");
        let fleet = fleet.clone();
        let bytes = services(n, 0).len();
        let (write, watch, read) = etcd.client(move |client| async move {
            let store = Store::connect(&fleet).await?;
            let mut watcher = client
                .watch_client()
                .watch(format!("{BENCH_PREFIX}/services"), None)
                .await?;
            let (mut write, mut watch, mut read) = (Vec::new(), Vec::new(), Vec::new());
            for round in 0..writes {
                let base: FleetState = store.read().await?.state.map_err(|e| anyhow!(e))?;
                let text = services(n, round);
                let start = Instant::now();
                store
                    .write(Guard::of(&base), Some(&text), None)
                    .await
                    .map_err(|e| anyhow!("{e}"))?;
                write.push(ms(start.elapsed()));
                watcher.message().await?.context("the watch ended")?;
                watch.push(ms(start.elapsed()));
                let start = Instant::now();
                let state = store.read().await?.state.map_err(|e| anyhow!(e))?;
                config::parse_fleet(BENCH_NODE, &state.services)
                    .map_err(|e| anyhow!("the bench's services are invalid: {e}"))?;
                read.push(ms(start.elapsed()));
            }
            Ok((write, watch, read))
        })?;
        let of = |v: &[f64]| Summary::of(v).context("nothing measured");
        out.push(EtcdRun {
            backends: n,
            bytes,
            write_ms: of(&write)?,
            watch_ms: of(&watch)?,
            read_validate_ms: of(&read)?,
        });
    }
    Ok(out)
}

/// Runs the part.
pub(crate) fn run(plan: Plan) -> Result<FleetResults> {
    let bfd = failures(Timers::Bfd, plan.bfd_failures, "bfd")?;
    let hold = failures(Timers::HoldTime(HOLD_TIME), plan.hold_failures, "hold")?;
    let (change_return_ms, change_all_live_ms) = changes(plan.changes)?;
    Ok(FleetResults {
        plan,
        bfd,
        hold,
        change_return_ms,
        change_all_live_ms,
        etcd: etcd(plan.etcd_writes)?,
    })
}
