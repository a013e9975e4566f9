//! Backends that join and leave on their own: real etcd, two real lb
//! nodes, echo servers on four backend hosts each running a real
//! `lb agent`, and long-lived TCP connections from a client behind the
//! router. No operator command adds or removes a backend.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use lb_tests::{
    daemon::{Daemon, lb_binary},
    edge::{
        ECHO_PORT, EchoServer, Edge, Etcd, FLEET_PREFIX, Sessions, backend_v4, fleet_node_config,
        fleet_services, node_v4,
    },
    require_root,
};
use serde_json::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const NODES: usize = 2;
const HOSTS: usize = 4;
/// The registrations' TTL (the agents' `fleet.lease`).
const LEASE: Duration = Duration::from_secs(2);
/// What joining may take: the lease's worth of etcd and watch latency, the
/// agent's first check, and the nodes' two probes (`rise`, 200 ms apart).
const JOIN: Duration = Duration::from_secs(5);
/// Connections held open across scale-out and scale-in.
const SESSIONS: usize = 100;

/// `lb agent` on one backend host: killed by PID on drop.
struct Agent {
    child: Option<Child>,
    dir: PathBuf,
}

impl Agent {
    fn start(edge: &Edge, host: usize) -> Agent {
        Agent::start_with(edge, host, "")
    }

    /// An agent with its whole file given.
    fn start_file(edge: &Edge, host: usize, file: &str) -> Agent {
        let dir = agent_dir(host);
        let config = dir.join("agent.toml");
        std::fs::write(&config, file).unwrap();
        let log = std::fs::File::create(dir.join("agent.log")).unwrap();
        let child = lb::netns::spawn_in(
            &edge.backends[host].name,
            Command::new(lb_binary().unwrap())
                .args(["agent", "--config"])
                .arg(&config)
                .stderr(log),
        )
        .unwrap();
        Agent {
            child: Some(child),
            dir,
        }
    }

    /// `lb agent --once ARGS` in host `host`'s namespace: whether it
    /// succeeded, and what it printed.
    fn once(edge: &Edge, host: usize, args: &[&str]) -> (bool, String) {
        let a = Agent::config_only(edge, host);
        let out = edge.backends[host]
            .spawn_process(
                Command::new(lb_binary().unwrap())
                    .args(["agent", "--once", "--config"])
                    .arg(a.dir.join("agent.toml"))
                    .args(args)
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped()),
            )
            .unwrap()
            .wait_with_output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    /// The agent's directory and file, without starting it.
    fn config_only(edge: &Edge, host: usize) -> Agent {
        let etcd = edge.etcd.as_ref().unwrap();
        let dir = agent_dir(host);
        std::fs::write(dir.join("agent.toml"), agent_config(etcd, host)).unwrap();
        Agent { child: None, dir }
    }

    /// With `extra` appended to its file (a `[load]` table).
    fn start_with(edge: &Edge, host: usize, extra: &str) -> Agent {
        let etcd = edge.etcd.as_ref().unwrap();
        Agent::start_file(edge, host, &(agent_config(etcd, host) + extra))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    fn signal(&self, signal: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on the PID of a child this test started and
            // has not reaped.
            unsafe { libc::kill(c.id() as i32, signal) };
        }
    }

    /// Its exit status, once it has exited.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().unwrap())
    }

    /// Waits for it to exit successfully within `limit`; fails the test
    /// with `why_not` and its log otherwise. How long it took.
    fn exits_within(&mut self, limit: Duration, why_not: &str) -> Duration {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.exited() {
                break s;
            }
            assert!(start.elapsed() < limit, "{why_not}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "{status}: {}", self.log());
        start.elapsed()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: as in `signal`.
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fresh directory for an agent's file and log (tests run in parallel).
fn agent_dir(host: usize) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("lbt-{}-{n}-hostagent{host}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn agent_config(etcd: &Etcd, host: usize) -> String {
    format!(
        r#"address = "{}"
services = ["echo"]
drain_timeout = "60s"

[check]
port = {ECHO_PORT}
interval = "200ms"
timeout = "150ms"

[fleet]
endpoints = ["{}"]
prefix = "{FLEET_PREFIX}"
node = "host{host}"
lease = "{}s"
"#,
        backend_v4(host),
        etcd.endpoint(),
        LEASE.as_secs()
    )
}

/// Starts `n` lb nodes on `hosts` backend hosts with echo servers, one
/// etcd, and the fleet's service `echo` with no backend typed in.
fn fleet(nodes: usize, hosts: usize) -> (Edge, Vec<EchoServer>, Vec<Daemon>) {
    let mut edge = Edge::build(nodes, hosts, &[VIP]).unwrap();
    edge.start_etcd(false).unwrap();
    let servers = edge
        .backends
        .iter()
        .enumerate()
        .map(|(i, ns)| EchoServer::start(ns, &format!("backend-{}", i + 1)).unwrap())
        .collect();
    let daemons: Vec<Daemon> = edge
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let etcd = edge.etcd.as_ref().unwrap();
            // Closed connections lapse quickly, so a drain ends soon after
            // its last connection does.
            let config = fleet_node_config(i, n.bird.as_ref().unwrap(), etcd).replacen(
                "[settings]\n",
                "[settings]\ntcp_closed_timeout = \"1s\"\n",
                1,
            );
            Daemon::start(&n.ns, &format!("agent{i}"), &config).unwrap()
        })
        .collect();
    let services = daemons[0].dir.join("services.toml");
    std::fs::write(&services, fleet_services(VIP, 0)).unwrap();
    daemons[0]
        .cli(&["fleet", "import", services.to_str().unwrap()])
        .unwrap();
    (edge, servers, daemons)
}

/// Waits until the router has a path to the VIP through every node (a
/// node announces it once it has a backend to serve it with).
fn wait_announced(edge: &Edge) {
    let all: Vec<Ipv4Addr> = (0..edge.nodes.len()).map(node_v4).collect();
    edge.wait_paths(VIP, &all, Duration::from_secs(30)).unwrap();
}

/// The backends node `d` has for `echo`, as `lb backend list` gives them.
fn backends(d: &Daemon) -> Vec<Value> {
    d.cli(&["backend", "list", "echo"])
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn row(d: &Daemon, host: usize) -> Option<Value> {
    let addr = backend_v4(host).to_string();
    backends(d).into_iter().find(|r| r["address"] == addr)
}

/// Waits until every node's table holds `n` backends; returns how long.
fn wait_in_tables(daemons: &[Daemon], n: usize, timeout: Duration) -> Duration {
    let start = Instant::now();
    for d in daemons {
        let left = timeout.saturating_sub(start.elapsed());
        d.wait_in_table(n, left).unwrap();
    }
    start.elapsed()
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn backends_register_with_agents_and_leave_without_breaking_a_connection() {
    require_root();
    let (edge, servers, daemons) = fleet(NODES, HOSTS);
    let mut servers: Vec<Option<EchoServer>> = servers.into_iter().map(Some).collect();

    // Three hosts start their agents: all three join every node's table.
    let mut agents: Vec<Agent> = (0..3).map(|h| Agent::start(&edge, h)).collect();
    let t = wait_in_tables(&daemons, 3, Duration::from_secs(10));
    eprintln!("three agents registered and admitted on both nodes within {t:?}");
    for d in &daemons {
        for h in 0..3 {
            let r = row(d, h).unwrap();
            assert_eq!(r["registered"], false, "{r}");
        }
    }
    let status = daemons[1].cli(&["fleet", "status"]).unwrap();
    assert_eq!(
        status["registered"].as_array().unwrap().len(),
        3,
        "{status}"
    );
    // A node announces the VIP once it has a backend; the router may take
    // a moment longer to install the route than the tables took to fill.
    wait_announced(&edge);
    let to = SocketAddr::new(VIP.into(), ECHO_PORT);
    let mut sessions = Sessions::open(&edge.client, to, SESSIONS).unwrap();
    let spread = sessions.spread();
    assert_eq!(
        spread.len(),
        3,
        "traffic spreads over the three: {spread:?}"
    );

    // A fourth host joins within the lease plus the rise time, and no
    // connection fails while it does.
    let start = Instant::now();
    agents.push(Agent::start(&edge, 3));
    let t = wait_in_tables(&daemons, 4, JOIN);
    eprintln!("a fourth host joined within {t:?} of its agent starting");
    let (ok, bad) = sessions.check();
    assert!(bad.is_empty(), "{ok} fine, broken: {bad:#?}");
    let newer = Sessions::open(&edge.client, to, 40).unwrap();
    assert!(
        newer.spread().contains_key("backend-4"),
        "new connections reach the new host: {:?}",
        newer.spread()
    );
    drop(newer);
    assert!(start.elapsed() < JOIN + Duration::from_secs(5));

    // SIGTERM to host 0's agent under long-lived connections: it drains
    // (no new flow, every old one kept) and waits.
    let draining = spread.get("backend-1").copied().unwrap_or(0);
    assert!(draining > 0, "{spread:?}");
    agents[0].signal(libc::SIGTERM);
    for d in &daemons {
        d.wait_until("host 0 draining", Duration::from_secs(5), |d| {
            Ok(row(d, 0).is_some_and(|r| r["registered"] == true && r["admin"] == "drain"))
        })
        .unwrap();
        assert_eq!(table_weight(d, 0), (0.0, "leaving".into()));
    }
    let newer = Sessions::open(&edge.client, to, 40).unwrap();
    assert!(
        !newer.spread().contains_key("backend-1"),
        "a leaving host takes no new connection: {:?}",
        newer.spread()
    );
    drop(newer);
    for _ in 0..5 {
        let (ok, bad) = sessions.check();
        assert!(bad.is_empty(), "{ok} fine, broken while draining: {bad:#?}");
        assert!(
            agents[0].exited().is_none(),
            "the agent left with {draining} connections open: {}",
            agents[0].log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // The connections end (their clients close them): then it leaves.
    drop(sessions);
    let left = agents[0].exits_within(
        Duration::from_secs(15),
        "the agent did not leave after its connections ended",
    );
    eprintln!(
        "host 0 drained {draining} connections, none broken, and left {left:?} after they closed"
    );
    // Its deregistration reaches every node through etcd's watch.
    for d in &daemons {
        d.wait_until("host 0 deregistered", Duration::from_secs(3), |d| {
            Ok(row(d, 0).is_none())
        })
        .unwrap();
    }

    // SIGKILL host 1's agent and stop its server: it leaves every node
    // within the lease.
    let mut sessions = Sessions::open(&edge.client, to, 30).unwrap();
    let killed = Instant::now();
    agents[1].signal(libc::SIGKILL);
    servers[1] = None;
    for d in &daemons {
        let left = (LEASE + Duration::from_secs(2)).saturating_sub(killed.elapsed());
        d.wait_until("host 1 gone", left, |d| Ok(row(d, 1).is_none()))
            .unwrap();
    }
    eprintln!(
        "a killed host left both nodes within {:?}",
        killed.elapsed()
    );
    let broken = sessions.broken();
    assert!(
        broken.iter().all(|b| b.first == "backend-2"),
        "only the dead host's connections break: {broken:#?}"
    );

    // Registrations lb cannot take are refused and counted, and change
    // nothing else: for a service that does not exist, of the wrong
    // family, and one that is not JSON.
    let etcd = edge.etcd.as_ref().unwrap();
    etcd.client(|mut c| async move {
        for (key, value) in [
            (
                "registered/nope/198.18.0.30",
                r#"{"address":"198.18.0.30","weight":1,"host":"x","version":"0"}"#,
            ),
            (
                "registered/echo/2001:2::30",
                r#"{"address":"2001:2::30","weight":1,"host":"x","version":"0"}"#,
            ),
            ("registered/echo/198.18.0.31", "{not json"),
        ] {
            c.put(format!("{FLEET_PREFIX}/{key}"), value, None).await?;
        }
        anyhow::Ok(())
    })
    .unwrap();
    for (d, node) in daemons.iter().zip(&edge.nodes) {
        // The node may apply a snapshot taken between the writes: wait for
        // all three.
        d.wait_until("bad registrations counted", Duration::from_secs(3), |d| {
            let m = lb_tests::daemon::metrics_in(&node.ns)?;
            let problems = d.cli(&["fleet", "status"])?["problems"].to_string();
            Ok(m.contains("lb_fleet_registrations_refused 2")
                && ["no such service", "family", "198.18.0.31"]
                    .iter()
                    .all(|needle| problems.contains(needle)))
        })
        .unwrap();
        assert_eq!(d.cli(&["service", "list"]).unwrap()[0]["in_table"], 2);
    }
    for a in &agents[2..] {
        assert!(a.child.is_some(), "{}", a.log());
    }

    // Every node cut off from etcd (stopped, their reports gone as when
    // their leases lapse): nobody counts a leaving host's flows, which is
    // not "none left" (the nodes may still forward them), so it waits.
    for d in &daemons {
        d.signal(libc::SIGSTOP);
    }
    let cut_off = etcd.client(|mut c| async move {
        for i in 0..NODES {
            c.delete(format!("{FLEET_PREFIX}/nodes/lb{i}"), None)
                .await?;
        }
        anyhow::Ok(())
    });
    let waited = cut_off.map(|()| {
        agents[2].signal(libc::SIGTERM);
        std::thread::sleep(Duration::from_secs(3));
        agents[2].exited().is_none()
    });
    for d in &daemons {
        d.signal(libc::SIGCONT);
    }
    assert!(
        waited.unwrap(),
        "a host left while no node reported its flows: {}",
        agents[2].log()
    );
    assert!(
        agents[2].log().contains("no lb node reports"),
        "{}",
        agents[2].log()
    );
}

/// A busy process that runs until dropped (killed by PID).
struct Burner(Child);

impl Drop for Burner {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the PID of a child this test started.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// The table weight node `d` gives host `host`, and what sets it.
fn table_weight(d: &Daemon, host: usize) -> (f64, String) {
    let r = row(d, host).unwrap();
    (
        r["table_weight"].as_f64().unwrap(),
        r["weight_set_by"].as_str().unwrap().to_string(),
    )
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn busy_hosts_report_less_of_their_weight_and_take_fewer_new_flows() {
    require_root();
    let (edge, _servers, daemons) = fleet(1, 3);
    let d = &daemons[0];
    // Host 0 reports no load; host 1 counts its connections (20 are full
    // load); host 2 its CPU.
    let _agents = [
        Agent::start(&edge, 0),
        Agent::start_with(
            &edge,
            1,
            "\n[load]\nconnections = 20\nstep = 10\ninterval = \"200ms\"\n",
        ),
        Agent::start_with(&edge, 2, "\n[load]\ncpu = true\ninterval = \"500ms\"\n"),
    ];
    d.wait_in_table(3, Duration::from_secs(10)).unwrap();
    wait_announced(&edge);

    // Ten connections held to host 1 directly: half its capacity.
    let direct = SocketAddr::new(backend_v4(1).into(), ECHO_PORT);
    let held = Sessions::open(&edge.client, direct, 10).unwrap();
    d.wait_until("host 1 at half weight", Duration::from_secs(5), |d| {
        let (w, by) = table_weight(d, 1);
        Ok((w - 0.5).abs() < 1e-9 && by == "load")
    })
    .unwrap();
    assert_eq!(table_weight(d, 0), (1.0, "config".into()));

    // Every CPU busy in host 2's namespace: it reports the floor.
    let cpus = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    // At the lowest priority, so that the tests running beside this one
    // keep their CPUs: niced time is busy time all the same.
    let _burners: Vec<Burner> = (0..cpus)
        .map(|_| {
            Burner(
                lb::netns::spawn_in(
                    &edge.backends[2].name,
                    Command::new("nice").args(["-n", "19", "sh", "-c", "while :; do :; done"]),
                )
                .unwrap(),
            )
        })
        .collect();
    d.wait_until("host 2 reports its load", Duration::from_secs(10), |d| {
        Ok(table_weight(d, 2).0 <= 0.3)
    })
    .unwrap();
    let slots: Vec<u64> = (0..3)
        .map(|h| row(d, h).unwrap()["slots"].as_u64().unwrap())
        .collect();
    assert!(
        slots[2] < slots[1] && slots[1] < slots[0],
        "slots follow the reported load: {slots:?}"
    );
    let to = SocketAddr::new(VIP.into(), ECHO_PORT);
    // Shares of about 0.56, 0.28 and 0.17: with 240 sessions backend 2
    // reaches backend 1's count about once in a million runs (90 gave
    // one in a thousand).
    let spread = Sessions::open(&edge.client, to, 240).unwrap().spread();
    let on = |name: &str| spread.get(name).copied().unwrap_or(0);
    assert!(
        on("backend-3") < on("backend-1") && on("backend-2") < on("backend-1"),
        "busier hosts take fewer new flows: {spread:?}"
    );
    eprintln!("new flows by host with host 1 at 50 % and host 2's CPU busy: {spread:?}");
    drop(held);
}

/// Whether host `host` holds the VIP on `lo`, and its ARP settings.
fn host_setup(edge: &Edge, host: usize) -> (bool, String) {
    edge.backends[host]
        .run(|| {
            let out = Command::new("ip")
                .args(["-4", "addr", "show", "dev", "lo"])
                .output()?;
            let on_lo = String::from_utf8_lossy(&out.stdout).contains(&format!("{VIP}/32"));
            let read =
                |k: &str| std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/all/{k}"));
            Ok((
                on_lo,
                format!(
                    "{}/{}",
                    read("arp_ignore")?.trim(),
                    read("arp_announce")?.trim()
                ),
            ))
        })
        .unwrap()
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_host_not_set_up_for_its_service_is_not_registered_until_fixed() {
    require_root();
    let (edge, _servers, daemons) = fleet(1, 1);
    let d = &daemons[0];
    // Host 0 as a fresh machine: no VIP on lo, default ARP settings.
    let ns = &edge.backends[0];
    ns.ip(&["addr", "del", &format!("{VIP}/32"), "dev", "lo"])
        .unwrap();
    ns.sysctl("net.ipv4.conf.all.arp_ignore", "0").unwrap();
    ns.sysctl("net.ipv4.conf.all.arp_announce", "0").unwrap();

    // A dry run says what it would do, and does nothing.
    let (ok, text) = Agent::once(&edge, 0, &["--dry-run"]);
    assert!(ok, "{text}");
    let add = format!("would: add {VIP}/32 to lo");
    for needle in [
        add.as_str(),
        "would: sysctl net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2",
        "would not register",
    ] {
        assert!(text.contains(needle), "{needle}: {text}");
    }
    assert_eq!(host_setup(&edge, 0), (false, "0/0".into()));
    // Set on the interface alone, the ARP settings are as good: the kernel
    // takes the larger of `all`'s and the interface's.
    ns.sysctl("net.ipv4.conf.eth0.arp_ignore", "1").unwrap();
    ns.sysctl("net.ipv4.conf.eth0.arp_announce", "2").unwrap();
    let (ok, text) = Agent::once(&edge, 0, &["--dry-run"]);
    assert!(ok && !text.contains("sysctl"), "{text}");
    assert!(text.contains(&add), "{text}");
    ns.sysctl("net.ipv4.conf.eth0.arp_ignore", "0").unwrap();
    ns.sysctl("net.ipv4.conf.eth0.arp_announce", "0").unwrap();
    let (ok, text) = Agent::once(&edge, 0, &[]);
    assert!(!ok, "not ready, so --once fails: {text}");

    // The agent does not register a host that would drop lb's packets.
    let agent = Agent::start(&edge, 0);
    std::thread::sleep(Duration::from_secs(3));
    assert!(row(d, 0).is_none(), "registered while not set up");
    assert!(agent.log().contains("not set up"), "{}", agent.log());
    drop(agent);

    // --fix puts it right; then the agent registers it.
    let (ok, text) = Agent::once(&edge, 0, &["--fix"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("did: add") && text.contains("would register"),
        "{text}"
    );
    assert_eq!(host_setup(&edge, 0), (true, "1/2".into()));
    let _agent = Agent::start(&edge, 0);
    d.wait_in_table(1, Duration::from_secs(10)).unwrap();
    wait_announced(&edge);
    let spread = Sessions::open(&edge.client, SocketAddr::new(VIP.into(), ECHO_PORT), 5)
        .unwrap()
        .spread();
    assert_eq!(spread.get("backend-1"), Some(&5), "{spread:?}");
}

/// The standalone node's registration port.
const REGISTRATION_PORT: u16 = 9190;

/// An agent's file registering host `host` for `service` straight with the
/// standalone node, signed with the secret in `secret_file`.
fn direct_agent(host: usize, service: &str, secret_file: &std::path::Path) -> String {
    format!(
        r#"address = "{}"
services = ["{service}"]
drain_timeout = "60s"

[check]
port = {ECHO_PORT}
interval = "200ms"
timeout = "150ms"

[lb]
address = "{}:{REGISTRATION_PORT}"
secret_file = "{}"
host = "host{host}"
"#,
        backend_v4(host),
        node_v4(0),
        secret_file.display()
    )
}

/// A refusal count from the node's metrics.
fn refused(edge: &Edge, reason: &str) -> u64 {
    let m = lb_tests::daemon::metrics_in(&edge.nodes[0].ns).unwrap();
    let line = format!("lb_registration_requests_refused_total{{reason=\"{reason}\"}} ");
    m.lines()
        .find_map(|l| l.strip_prefix(line.as_str()))
        .map_or(0, |n| n.trim().parse().unwrap())
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_standalone_lb_takes_signed_registrations_and_refuses_the_rest() {
    require_root();
    let edge = Edge::build(1, 3, &[VIP]).unwrap();
    let _servers: Vec<EchoServer> = edge
        .backends
        .iter()
        .enumerate()
        .map(|(i, ns)| EchoServer::start(ns, &format!("backend-{}", i + 1)).unwrap())
        .collect();
    // The secrets' directory, removed on every exit path (as an agent's).
    let keys = Agent {
        child: None,
        dir: agent_dir(99),
    };
    let (secret, wrong) = (keys.dir.join("secret"), keys.dir.join("wrong"));
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::write(&wrong, "fedcba9876543210fedcba9876543210\n").unwrap();
    let config = lb_tests::edge::node_config(VIP, 0, edge.nodes[0].bird.as_ref().unwrap())
        .replacen(
            "[settings]\n",
            "[settings]\ntcp_closed_timeout = \"1s\"\n",
            1,
        )
        + &format!(
            "\n[registration]\nlisten = \"{}:{REGISTRATION_PORT}\"\nsecret_file = \"{}\"\nlease = \"2s\"\n",
            node_v4(0),
            secret.display()
        );
    let mut d = Daemon::start(&edge.nodes[0].ns, "standalone", &config).unwrap();

    // Two hosts register with the right secret: both take traffic.
    let mut agents = vec![
        Agent::start_file(&edge, 0, &direct_agent(0, "echo", &secret)),
        Agent::start_file(&edge, 1, &direct_agent(1, "echo", &secret)),
    ];
    let t = d.wait_in_table(2, Duration::from_secs(10)).unwrap();
    eprintln!("two hosts registered with the standalone node within {t:?}");
    wait_announced(&edge);
    let to = SocketAddr::new(VIP.into(), ECHO_PORT);
    let mut sessions = Sessions::open(&edge.client, to, 40).unwrap();
    assert_eq!(sessions.spread().len(), 2, "{:?}", sessions.spread());

    // A wrong secret, a service that does not exist, a host registering
    // another's address, and bytes that are not a request: refused,
    // counted, and nothing applied.
    let _wrong = Agent::start_file(&edge, 2, &direct_agent(2, "echo", &wrong));
    let mut nope = Agent::start_file(&edge, 2, &direct_agent(2, "nope", &secret));
    // Host 2 registering host 0's address, with the right secret.
    let _other = Agent::start_file(&edge, 2, &direct_agent(0, "echo", &secret));
    edge.backends[2]
        .run(move || {
            use std::io::Write as _;
            let mut s = std::net::TcpStream::connect((node_v4(0), REGISTRATION_PORT))?;
            s.write_all(b"not a request\n")?;
            Ok(())
        })
        .unwrap();
    d.wait_until("refusals counted", Duration::from_secs(5), |_| {
        Ok(refused(&edge, "signature") > 0
            && refused(&edge, "admission") > 0
            && refused(&edge, "malformed") > 0
            && refused(&edge, "sender") > 0)
    })
    .unwrap();
    assert!(row(&d, 2).is_none(), "a refused host joined");
    assert_eq!(d.cli(&["service", "list"]).unwrap()[0]["in_table"], 2);
    // Stopped, the refused host has nothing to drain: it leaves at once,
    // not after its 60 s drain_timeout.
    nope.signal(libc::SIGTERM);
    nope.exits_within(
        Duration::from_secs(5),
        "a host the daemon refuses waited to drain",
    );

    // A host holding connections open without a request: past four at once
    // (its agents' among them), the next is closed unread, and counted.
    let closed_unread = edge.backends[2]
        .run(move || {
            use std::io::Read as _;
            let mut held = Vec::new();
            for _ in 0..8 {
                let mut s = std::net::TcpStream::connect((node_v4(0), REGISTRATION_PORT))?;
                // A held connection stays silent for the port's 2 s.
                s.set_read_timeout(Some(Duration::from_millis(200)))?;
                match s.read(&mut [0u8; 64]) {
                    Ok(0) => return Ok(held.len()),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                        return Ok(held.len());
                    }
                    _ => held.push(s),
                }
            }
            anyhow::bail!("eight connections held open at once")
        })
        .unwrap();
    assert!(closed_unread <= 4, "{closed_unread} held before one closed");
    assert!(refused(&edge, "busy") > 0);

    // The daemon restarts while the agents are stopped: the registered
    // backends stay (kept in its state file) and no connection breaks.
    for a in &agents {
        a.signal(libc::SIGSTOP);
    }
    d.kill(libc::SIGKILL).unwrap();
    d.spawn().unwrap();
    assert_eq!(
        d.cli(&["service", "list"]).unwrap()[0]["in_table"],
        2,
        "registrations kept across a restart"
    );
    let (ok, bad) = sessions.check();
    assert!(
        bad.is_empty(),
        "{ok} fine, broken across the restart: {bad:#?}"
    );
    for a in &agents {
        a.signal(libc::SIGCONT);
    }

    // SIGTERM: host 0 drains under its connections, then leaves.
    agents[0].signal(libc::SIGTERM);
    d.wait_until("host 0 draining", Duration::from_secs(5), |d| {
        Ok(row(d, 0).is_some_and(|r| r["admin"] == "drain" && r["registered"] == true))
    })
    .unwrap();
    let (ok, bad) = sessions.check();
    assert!(bad.is_empty(), "{ok} fine, broken while draining: {bad:#?}");
    assert!(agents[0].exited().is_none(), "left with connections open");
    drop(sessions);
    agents[0].exits_within(Duration::from_secs(15), "the agent did not leave");
    d.wait_until("host 0 gone", Duration::from_secs(2), |d| {
        Ok(row(d, 0).is_none())
    })
    .unwrap();

    // SIGKILL: host 1 leaves when its registration lapses. The operator
    // had drained it: registering again, it is still drained.
    let host1 = backend_v4(1).to_string();
    d.cli(&["backend", "drain", "echo", &host1]).unwrap();
    let killed = Instant::now();
    agents[1].signal(libc::SIGKILL);
    d.wait_until("host 1 gone", Duration::from_secs(5), |d| {
        Ok(row(d, 1).is_none())
    })
    .unwrap();
    eprintln!(
        "a killed host left the standalone node within {:?}",
        killed.elapsed()
    );
    let mut again = Agent::start_file(&edge, 1, &direct_agent(1, "echo", &secret));
    d.wait_until("host 1 back", Duration::from_secs(10), |d| {
        Ok(row(d, 1).is_some())
    })
    .unwrap();
    let back = row(&d, 1).unwrap();
    assert_eq!(back["admin"], "drain", "the operator's drain held: {back}");

    // A second signal ends a drain that waits for connections: the agent
    // deregisters at once.
    d.cli(&["backend", "enable", "echo", &host1]).unwrap();
    // With no backend in rotation the VIP was withdrawn.
    d.wait_in_table(1, Duration::from_secs(5)).unwrap();
    wait_announced(&edge);
    let sessions = Sessions::open(&edge.client, to, 10).unwrap();
    assert_eq!(sessions.spread().get("backend-2"), Some(&10));
    again.signal(libc::SIGTERM);
    d.wait_until("host 1 draining", Duration::from_secs(5), |d| {
        Ok(row(d, 1).is_some_and(|r| r["admin"] == "drain"))
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(again.exited().is_none(), "left with connections open");
    again.signal(libc::SIGINT);
    again.exits_within(
        Duration::from_secs(5),
        "a second signal did not end the drain",
    );
    d.wait_until("host 1 gone", Duration::from_secs(2), |d| {
        Ok(row(d, 1).is_none())
    })
    .unwrap();
}
