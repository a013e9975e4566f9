//! `lb demo --fleet`: three lb nodes behind a BIRD router (ECMP on the L4
//! hash, BFD), one etcd, three backends and a client holding long-lived
//! connections. Shows the announcements, a weight changed through one node
//! going live on all three with equal digests, then kills a node (daemon
//! SIGKILLed, link down) and times the router's withdrawal and counts the
//! connections that survived. Everything is removed on every exit path.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use super::{
    POLL, as_demo_daemon, check_interrupted,
    edge::{
        CLIENT_V4, ECHO_PORT, EchoServer, Edge, Sessions, backend_name, backend_v4,
        fleet_node_config, fleet_services, node_v4,
    },
    log_tail, stop_daemon,
};
use crate::{
    api,
    netns::{self, PrivateBpffs},
};

/// Where the fleet demo keeps each node's configuration, socket, state,
/// log and bpffs.
pub const DIR: &str = "/run/lb-fleet-demo";
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const NODES: usize = 3;
const BACKENDS: usize = 3;
/// Long-lived connections the client holds through the node failure.
const CONNECTIONS: usize = 240;
/// The node the demo kills.
const VICTIM: usize = 2;
/// Longest wait for BGP sessions and tables.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);
/// One node's daemon and its files.
struct NodeDaemon {
    child: Option<Child>,
    socket: PathBuf,
    /// Its stderr.
    log: PathBuf,
    /// Unmounted (unpinning, so detaching) after the daemon is gone.
    bpffs: Option<PrivateBpffs>,
}

impl NodeDaemon {
    fn call(&self, rt: &tokio::runtime::Runtime, request: &api::Request) -> Result<Value> {
        rt.block_on(api::call(&self.socket, request))
    }

    /// Stops the daemon: SIGKILL (a crash) or SIGTERM with a grace period.
    fn stop(&mut self, kill: bool) {
        if let Some(child) = self.child.take() {
            stop_daemon(child, if kill { libc::SIGKILL } else { libc::SIGTERM });
        }
    }
}

impl Drop for NodeDaemon {
    fn drop(&mut self) {
        self.stop(false);
        drop(self.bpffs.take());
    }
}

/// Everything the demo made, removed in order on drop: daemons, servers,
/// then the topology (BIRD, etcd, namespaces), then the directory.
struct FleetDemo {
    rt: tokio::runtime::Runtime,
    daemons: Vec<NodeDaemon>,
    servers: Vec<EchoServer>,
    edge: Option<Edge>,
    dir: PathBuf,
}

impl Drop for FleetDemo {
    fn drop(&mut self) {
        self.daemons.clear();
        self.servers.clear();
        drop(self.edge.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn step(n: usize, what: &str) {
    println!("[{n}/6] {what}");
}

/// Runs the fleet demo (signal handlers are set by the caller).
pub(super) fn run(lb: &Path) -> Result<()> {
    let dir = PathBuf::from(DIR);
    // Made here or refused, at once: two fleet demos never share it.
    if let Err(e) = std::fs::create_dir(&dir) {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            bail!(
                "{} exists: another fleet demo runs, or one was killed (remove it and its lbt* namespaces)",
                dir.display()
            );
        }
        return Err(anyhow::Error::new(e).context(format!("creating {}", dir.display())));
    }
    let mut demo = FleetDemo {
        rt: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        daemons: Vec::new(),
        servers: Vec::new(),
        edge: None,
        dir,
    };
    let result = demo.show(lb);
    drop(demo);
    result?;
    // The teardown reports its failures as it goes; done means none was left.
    let left = leftovers(Path::new(DIR));
    if !left.is_empty() {
        bail!(
            "the fleet demo could not remove everything it made: {}",
            left.join(", ")
        );
    }
    println!("\ndone: every namespace, process and mount the fleet demo made is removed");
    Ok(())
}

/// What the fleet demo made and is still there: its namespaces (this
/// process's, by name), the temporary directories of its BIRDs and etcd
/// (named after them), mounts under `dir`, and `dir` itself.
fn leftovers(dir: &Path) -> Vec<String> {
    let prefix = netns::name_prefix();
    let names = |under: &Path| -> Vec<String> {
        std::fs::read_dir(under)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with(&prefix))
            .collect()
    };
    let mut left: Vec<String> = names(Path::new(NETNS_DIR))
        .into_iter()
        .map(|n| format!("namespace {n}"))
        .collect();
    let tmp = std::env::temp_dir();
    left.extend(
        names(&tmp)
            .into_iter()
            .map(|n| format!("directory {}", tmp.join(n).display())),
    );
    let mounts = std::fs::read_to_string(MOUNTS).unwrap_or_default();
    left.extend(
        mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| Path::new(m).starts_with(dir))
            .map(|m| format!("mount {m}")),
    );
    if dir.exists() {
        left.push(format!("directory {}", dir.display()));
    }
    left
}

/// Where `ip netns` keeps the namespaces' names.
const NETNS_DIR: &str = "/run/netns";
/// The mount table.
const MOUNTS: &str = "/proc/mounts";

impl FleetDemo {
    fn edge(&self) -> Result<&Edge> {
        self.edge.as_ref().context("the topology is gone")
    }

    fn show(&mut self, lb: &Path) -> Result<()> {
        step(
            1,
            "router, 3 lb nodes (each with BIRD), etcd, 3 backends, a client",
        );
        let mut edge = Edge::build(NODES, BACKENDS, &[VIP])?;
        edge.start_etcd(false)?;
        for (i, ns) in edge.backends.iter().enumerate() {
            self.servers.push(EchoServer::start(ns, &backend_name(i))?);
        }
        self.edge = Some(edge);
        println!(
            "  router 198.18.0.254 (BIRD, merge paths, fib_multipath_hash_policy=1, BFD 100 ms x 3)\n  lb nodes 198.18.0.2-4, etcd 198.18.0.250, backends 198.18.0.11-13 (VIP {VIP} on lo)"
        );
        check_interrupted()?;

        step(
            2,
            "lb daemon on every node, in one fleet; services imported through lb0",
        );
        for i in 0..NODES {
            self.start_daemon(lb, i)?;
        }
        let services = self.dir.join("services.toml");
        std::fs::write(&services, fleet_services(VIP, BACKENDS))?;
        self.daemons[0].call(
            &self.rt,
            &api::Request::FleetImport {
                config: std::fs::read_to_string(&services)?,
                replace: false,
            },
        )?;
        let all: Vec<Ipv4Addr> = (0..NODES).map(node_v4).collect();
        let (t, route) = self.edge()?.wait_route(VIP, &all, EVENT_TIMEOUT)?;
        println!(
            "  every node announced {VIP} {} ms after start; the router's route:",
            t.as_millis()
        );
        for line in route.lines() {
            println!("    {line}");
        }
        check_interrupted()?;

        step(
            3,
            &format!("{CONNECTIONS} long-lived TCP connections from the client"),
        );
        let mut sessions = Sessions::open(
            &self.edge()?.client,
            SocketAddr::new(VIP.into(), ECHO_PORT),
            CONNECTIONS,
        )?;
        println!("  per backend: {:?}", sessions.spread());
        let flows: Vec<String> = (0..NODES)
            .map(|i| {
                let s = self.daemons[i].call(&self.rt, &api::Request::Stats)?;
                Ok(format!("lb{i} {}", s["services"][0]["new_flows"]))
            })
            .collect::<Result<_>>()?;
        println!("  new flows per node (ECMP): {}", flows.join(", "));
        check_interrupted()?;

        step(
            4,
            "set-weight through lb0: live on every node, equal digests",
        );
        let b0 = backend_v4(0);
        let start = Instant::now();
        self.daemons[0].call(
            &self.rt,
            &api::Request::SetWeight {
                service: "echo".into(),
                backend: b0.into(),
                weight: Some(3),
            },
        )?;
        let returned = start.elapsed();
        let live = self.wait("the weight on every node", |d| {
            (0..NODES).try_fold(true, |all, i| {
                let rows = d.daemons[i].call(&d.rt, &api::Request::Backends { service: None })?;
                let w = rows
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|r| r["address"] == b0.to_string())
                    .map(|r| r["weight"].clone());
                Ok(all && w == Some(3.into()))
            })
        })?;
        let digests: Vec<String> = (0..NODES)
            .map(|i| {
                let s = self.daemons[i].call(&self.rt, &api::Request::Services)?;
                Ok(s[0]["digest"].as_str().unwrap_or_default().to_string())
            })
            .collect::<Result<_>>()?;
        // The weight is in force once the table is rebuilt with it, so the
        // tables must be equal by now.
        if digests.iter().any(String::is_empty) || digests.windows(2).any(|w| w[0] != w[1]) {
            bail!(
                "with the new weight in force on every node, their table digests are not all equal: {digests:?} (\"\" is a node that reported none)"
            );
        }
        println!(
            "  the CLI returned in {} ms; live on all {NODES} nodes after {} ms; digests {}",
            returned.as_millis(),
            live.as_millis(),
            digests.join(" ")
        );
        check_interrupted()?;

        step(
            5,
            &format!("lb{VICTIM} dies: its daemon SIGKILLed, its link down"),
        );
        let survivors: Vec<Ipv4Addr> = all
            .iter()
            .copied()
            .filter(|a| *a != node_v4(VICTIM))
            .collect();
        self.daemons[VICTIM].stop(true);
        self.edge()?.nodes[VICTIM].link(false)?;
        let t = self
            .edge()?
            .wait_paths(VIP, &survivors, Duration::from_secs(10))?;
        println!(
            "  the router withdrew lb{VICTIM} {} ms after its link went down (BFD)",
            t.as_millis()
        );
        let broken = sessions.broken();
        println!(
            "  {} of {CONNECTIONS} connections still answer from their backend",
            CONNECTIONS - broken.len()
        );
        // A connection that reaches a node with no connection-table entry
        // for it (lb{VICTIM}'s, and any the ECMP rehash on fewer next hops
        // moved between the others) goes where the table says. The weight
        // change of step 4 moved some table slots, so connections opened
        // before it on those slots now meet another backend, which resets
        // them. Each broken one must be on such a slot: that is what is
        // checked, not which node carried it.
        let mut unexplained = Vec::new();
        for b in &broken {
            let why = self.daemons[0].call(
                &self.rt,
                &api::Request::Explain {
                    service: "echo".into(),
                    client: CLIENT_V4.into(),
                    port: b.port,
                },
            )?;
            let table = why["table_backend"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let now = (0..BACKENDS).find(|i| backend_v4(*i).to_string() == table);
            if now.map(backend_name).as_ref() == Some(&b.first) {
                unexplained.push(format!("port {} on {}: {}", b.port, b.first, b.what));
            }
        }
        println!(
            "  {} broke, each opened before step 4's weight change on a table slot it moved to another backend: a node without its connection-table entry (lb{VICTIM}'s flows, or ones ECMP rehashed) follows the table",
            broken.len() - unexplained.len()
        );
        check_interrupted()?;

        step(6, "lb fleet status, from lb0");
        let gone = self.wait(&format!("lb{VICTIM}'s status to expire"), |d| {
            let s = d.daemons[0].call(&d.rt, &api::Request::FleetStatus)?;
            Ok(s["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|n| n["name"] == format!("lb{VICTIM}") && n["alive"] == false))
        })?;
        println!(
            "  lb{VICTIM}'s status left etcd with its lease, {} ms later",
            gone.as_millis()
        );
        let status = self.daemons[0].call(&self.rt, &api::Request::FleetStatus)?;
        for n in status["nodes"].as_array().into_iter().flatten() {
            println!(
                "  {}: alive {}, revision {}, digests {}, VIPs announced {}",
                n["name"].as_str().unwrap_or_default(),
                n["alive"],
                n["report"]["revision"],
                n["report"]["digests"],
                n["report"]["vips"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|v| v["announced"] == true)
                    .count()
            );
        }
        if !unexplained.is_empty() {
            bail!(
                "{} connections whose table slot did not move broke when a node failed: {unexplained:?}",
                unexplained.len()
            );
        }
        Ok(())
    }

    fn start_daemon(&mut self, lb: &Path, i: usize) -> Result<()> {
        let dir = self.dir.join(format!("lb{i}"));
        std::fs::create_dir_all(&dir)?;
        let edge = self.edge()?;
        let node = &edge.nodes[i];
        let bird = node.bird.as_ref().context("the node's BIRD is gone")?;
        let etcd = edge.etcd.as_ref().context("etcd is gone")?;
        let socket = dir.join("lb.sock");
        let config = fleet_node_config(i, bird, etcd).replacen(
            "[settings]\n",
            &format!(
                "[settings]\nsocket = \"{}\"\nstate_file = \"{}\"\n",
                socket.display(),
                dir.join("state.json").display()
            ),
            1,
        );
        std::fs::write(dir.join("lb.toml"), config)?;
        let bpffs = PrivateBpffs::mount(&dir.join("bpffs"))?;
        let log = dir.join("daemon.log");
        let child = node.ns.spawn_process(
            as_demo_daemon(&mut Command::new(lb))
                .args(["daemon", "--config"])
                .arg(dir.join("lb.toml"))
                .arg("--pin-dir")
                .arg(bpffs.path().join("lb"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?),
        )?;
        self.daemons.push(NodeDaemon {
            child: Some(child),
            socket,
            log,
            bpffs: Some(bpffs),
        });
        self.wait(&format!("lb{i}'s daemon to answer"), |d| {
            Ok(d.daemons[i].call(&d.rt, &api::Request::Status).is_ok())
        })?;
        Ok(())
    }

    /// Polls `done` until it holds; fails after [`EVENT_TIMEOUT`], on
    /// Ctrl-C, or with its log's last lines once a daemon has exited.
    fn wait(
        &mut self,
        what: &str,
        mut done: impl FnMut(&FleetDemo) -> Result<bool>,
    ) -> Result<Duration> {
        let start = Instant::now();
        loop {
            for (i, d) in self.daemons.iter_mut().enumerate() {
                if let Some(c) = d.child.as_mut()
                    && let Some(status) = c.try_wait()?
                {
                    bail!("lb{i}'s daemon exited ({status}):\n{}", log_tail(&d.log));
                }
            }
            if done(self)? {
                return Ok(start.elapsed());
            }
            check_interrupted()?;
            if start.elapsed() > EVENT_TIMEOUT {
                bail!("waited {EVENT_TIMEOUT:?} for {what}");
            }
            std::thread::sleep(POLL);
        }
    }
}
