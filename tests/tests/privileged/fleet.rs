//! A fleet of three lb nodes: real etcd, real BIRD on the router and every
//! node, real `lb daemon`s, echo servers on the backends and long-lived
//! TCP connections from a client behind the router.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use lb_tests::{
    daemon::Daemon,
    edge::{
        ECHO_PORT, EchoServer, Edge, FLEET_PREFIX, Sessions, backend_v4, fleet_node_config,
        fleet_services, node_v4,
    },
    privileged,
};
use serde_json::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const NODES: usize = 3;
const BACKENDS: usize = 3;
/// BGP sessions start with BIRD's connect delay (seconds); a generous bound.
const SESSION_UP: Duration = Duration::from_secs(30);
/// What the issue asks of a change's propagation.
const PROPAGATION: Duration = Duration::from_secs(1);

/// The edge, its servers and a daemon per node.
struct Fleet {
    daemons: Vec<Daemon>,
    _servers: Vec<EchoServer>,
    edge: Edge,
}

impl Fleet {
    /// Three nodes in one fleet, the services imported through node 0, every
    /// node announcing.
    fn start() -> Fleet {
        let mut edge = Edge::build(NODES, BACKENDS, &[VIP]).unwrap();
        edge.start_etcd().unwrap();
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
                let config = fleet_node_config(i, n.bird.as_ref().unwrap());
                Daemon::start(&n.ns, &format!("fleet{i}"), &config).unwrap()
            })
            .collect();
        let services = daemons[0].dir.join("services.toml");
        std::fs::write(&services, fleet_services(VIP, BACKENDS)).unwrap();
        daemons[0]
            .cli(&["fleet", "import", services.to_str().unwrap()])
            .unwrap();
        let fleet = Fleet {
            daemons,
            _servers: servers,
            edge,
        };
        for d in &fleet.daemons {
            d.wait_in_table(BACKENDS, Duration::from_secs(10)).unwrap();
        }
        let all: Vec<Ipv4Addr> = (0..NODES).map(node_v4).collect();
        let t = fleet.edge.wait_paths(VIP, &all, SESSION_UP).unwrap();
        eprintln!("fleet up: all {NODES} nodes announced within {t:?}");
        fleet
    }

    fn digests(&self) -> Vec<Value> {
        self.daemons
            .iter()
            .map(|d| d.cli(&["service", "list"]).unwrap()[0]["digest"].clone())
            .collect()
    }

    /// Waits until every node has applied the same revision with the same
    /// table; returns how long that took.
    fn wait_agreed(&self, timeout: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let revisions: Vec<Value> = self
                .daemons
                .iter()
                .map(|d| d.cli(&["fleet", "status"]).unwrap()["applied"].clone())
                .collect();
            let digests = self.digests();
            if revisions.windows(2).all(|w| w[0] == w[1])
                && digests.windows(2).all(|w| w[0] == w[1])
            {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "nodes did not agree within {timeout:?}: revisions {revisions:?}, digests {digests:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn weight(&self, node: usize, backend: usize) -> u64 {
        let rows = self.daemons[node]
            .cli(&["backend", "list", "echo"])
            .unwrap();
        let addr = backend_v4(backend).to_string();
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["address"] == addr)
            .unwrap()["weight"]
            .as_u64()
            .unwrap()
    }
}

#[test]
fn one_desired_state_changes_everywhere_and_refuses_conflicts_and_bad_data() {
    if !privileged() {
        return;
    }
    let mut fleet = Fleet::start();
    let t = fleet.wait_agreed(Duration::from_secs(5));
    eprintln!("equal revisions and digests on every node after {t:?}");

    // A change through node 0 is live on every node within a second.
    let start = Instant::now();
    fleet.daemons[0]
        .cli(&[
            "backend",
            "set-weight",
            "echo",
            &backend_v4(0).to_string(),
            "3",
        ])
        .unwrap();
    let returned = start.elapsed();
    loop {
        if (0..NODES).all(|n| fleet.weight(n, 0) == 3) {
            break;
        }
        assert!(
            start.elapsed() < PROPAGATION,
            "not live everywhere within {PROPAGATION:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let live = start.elapsed();
    fleet.wait_agreed(PROPAGATION);
    eprintln!(
        "set-weight: CLI returned after {returned:?}, live on all {NODES} nodes after {live:?}"
    );

    // Two edits at once through two nodes: each lands or is refused with a
    // conflict, and none is lost.
    let (mut landed, mut refused) = (0, 0);
    for round in 0..5u64 {
        let (a, b) = (10 + round, 20 + round);
        let (ra, rb) = std::thread::scope(|s| {
            let one = s.spawn(|| {
                fleet.daemons[1].cli_fails(&[
                    "backend",
                    "set-weight",
                    "echo",
                    &backend_v4(1).to_string(),
                    &a.to_string(),
                ])
            });
            let two = s.spawn(|| {
                fleet.daemons[2].cli_fails(&[
                    "backend",
                    "set-weight",
                    "echo",
                    &backend_v4(2).to_string(),
                    &b.to_string(),
                ])
            });
            (one.join().unwrap(), two.join().unwrap())
        });
        fleet.wait_agreed(PROPAGATION);
        for (result, backend, weight) in [(ra, 1, a), (rb, 2, b)] {
            match result {
                // cli_fails "fails" when the command succeeded: it landed.
                Err(_) => {
                    landed += 1;
                    assert_eq!(
                        fleet.weight(0, backend),
                        weight,
                        "round {round}: a landed write was lost"
                    );
                }
                Ok((_, message)) => {
                    refused += 1;
                    assert!(message.contains("conflict"), "round {round}: {message}");
                    assert_ne!(
                        fleet.weight(0, backend),
                        weight,
                        "round {round}: a refused write landed"
                    );
                }
            }
        }
    }
    eprintln!("concurrent edits: {landed} landed, {refused} refused with a conflict, none lost");
    assert!(landed >= 5, "at least one of each pair lands");

    // Bad data written by hand: refused and reported, last good state kept.
    let before = fleet.digests();
    let etcd = fleet.edge.etcd.as_ref().unwrap();
    etcd.client(|mut c| async move {
        c.put(
            format!("{FLEET_PREFIX}/services"),
            "[[service]]\nname = 'echo'\nvip = 'not-an-ip'\n",
            None,
        )
        .await?;
        c.put(format!("{FLEET_PREFIX}/stray"), "hello", None)
            .await?;
        Ok(())
    })
    .unwrap();
    let start = Instant::now();
    let problems = loop {
        let s = fleet.daemons[1].cli(&["fleet", "status"]).unwrap();
        let p = s["problems"].to_string();
        if p.contains("refused") && p.contains("stray") {
            break p;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "bad data not reported: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("bad keys reported: {problems}");
    assert_eq!(fleet.digests(), before, "the last good state is kept");
    let mut sessions = Sessions::open(
        &fleet.edge.client,
        SocketAddr::new(VIP.into(), ECHO_PORT),
        50,
    )
    .unwrap();
    assert!(
        sessions.check().1.is_empty(),
        "forwarding with the last good state"
    );
    // An operator's write replaces the bad data.
    let services = fleet.daemons[0].dir.join("services.toml");
    fleet.daemons[0]
        .cli(&["fleet", "import", "--replace", services.to_str().unwrap()])
        .unwrap();
    fleet.wait_agreed(PROPAGATION);
    let s = fleet.daemons[2].cli(&["fleet", "status"]).unwrap();
    assert!(!s["problems"].to_string().contains("refused"), "{s}");

    // etcd stopped under traffic: forwarding unaffected, writes refused
    // clearly, and every node converges again once it is back.
    fleet.edge.etcd.as_mut().unwrap().stop();
    let start = Instant::now();
    let message = loop {
        let (code, message) = fleet.daemons[0]
            .cli_fails(&[
                "backend",
                "set-weight",
                "echo",
                &backend_v4(0).to_string(),
                "5",
            ])
            .unwrap();
        assert_eq!(code, 1);
        if message.contains("etcd is unreachable") {
            break message;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{message}");
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("write with etcd down: {}", message.trim());
    let (ok, bad) = sessions.check();
    assert!(bad.is_empty(), "etcd down touched forwarding: {bad:?}");
    assert_eq!(
        fleet.edge.paths(VIP).unwrap().len(),
        NODES,
        "etcd down withdrew a node"
    );
    fleet.edge.etcd.as_mut().unwrap().spawn().unwrap();
    let start = Instant::now();
    loop {
        let s = fleet.daemons[0].cli(&["fleet", "status"]).unwrap();
        if s["etcd_error"].is_null()
            && fleet.daemons[0]
                .cli_fails(&[
                    "backend",
                    "set-weight",
                    "echo",
                    &backend_v4(0).to_string(),
                    "5",
                ])
                .is_err()
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no recovery: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let t = fleet.wait_agreed(Duration::from_secs(5));
    assert!((0..NODES).all(|n| fleet.weight(n, 0) == 5));
    eprintln!(
        "etcd back: a write landed and every node agreed {t:?} later; {ok} connections never noticed"
    );
    assert!(sessions.check().1.is_empty());
}
