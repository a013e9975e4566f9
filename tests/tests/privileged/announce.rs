//! VIP announcements over BGP: real BIRD on a router and on every lb node,
//! real `lb daemon`s, and long-lived TCP connections from a client behind
//! the router. A node announces a VIP only while it can serve it; drain,
//! a node without backends in rotation and a restart move no connection.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use lb_tests::{
    daemon::{Daemon, lb_in},
    edge::{ECHO_PORT, EchoServer, Edge, Sessions, backend_v4, node_config, node_v4},
    require_root,
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const BACKENDS: usize = 3;
/// Long-lived connections held through every step.
const CONNECTIONS: usize = 200;
/// BGP sessions start with BIRD's connect delay; withdrawals take
/// milliseconds. Both bounds are generous: they catch hangs, not slowness.
const SESSION_UP: Duration = Duration::from_secs(30);
const CONVERGED: Duration = Duration::from_secs(5);

fn assert_all_alive(sessions: &mut Sessions, step: &str) {
    let (ok, bad) = sessions.check();
    assert!(
        bad.is_empty(),
        "{step}: {} of {CONNECTIONS} connections broke or moved: {bad:?}",
        bad.len()
    );
    assert_eq!(ok, CONNECTIONS, "{step}");
    eprintln!("{step}: all {ok} connections alive on their backends");
}

fn vip_state(d: &Daemon) -> (bool, serde_json::Value) {
    let s = d.cli(&["node", "status"]).unwrap();
    let vip = &s["vips"][0];
    assert_eq!(vip["vip"], VIP.to_string());
    (vip["announced"].as_bool().unwrap(), vip["withheld"].clone())
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn nodes_announce_what_they_serve_and_withdrawals_reset_nothing() {
    require_root();
    let edge = Edge::build(2, BACKENDS, &[VIP]).unwrap();
    let _servers: Vec<EchoServer> = edge
        .backends
        .iter()
        .enumerate()
        .map(|(i, ns)| EchoServer::start(ns, &format!("backend-{}", i + 1)).unwrap())
        .collect();
    let mut daemons: Vec<Daemon> = edge
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let config = node_config(VIP, BACKENDS, n.bird.as_ref().unwrap());
            Daemon::start(&n.ns, &format!("lb{i}"), &config).unwrap()
        })
        .collect();
    let both = [node_v4(0), node_v4(1)];
    let t = edge.wait_paths(VIP, &both, SESSION_UP).unwrap();
    eprintln!("both nodes announced within {t:?} of start");
    for (i, n) in edge.nodes.iter().enumerate() {
        assert!(n.bird.as_ref().unwrap().sessions_up().unwrap(), "node {i}");
        assert_eq!(edge.announced(i).unwrap(), [VIP.to_string()]);
        assert_eq!(vip_state(&daemons[i]), (true, serde_json::Value::Null));
    }
    // `lb doctor` finds every link of the chain in place: BIRD answers, its
    // session is up, it learns the table and exports the VIP.
    let doctor = edge.nodes[0]
        .ns
        .run(|| {
            let out = std::process::Command::new(lb_tests::daemon::lb_binary()?)
                .args(["--json", "doctor", "--config"])
                .arg(&daemons[0].config)
                .output()?;
            Ok(serde_json::from_slice::<serde_json::Value>(&out.stdout)?)
        })
        .unwrap();
    let announce_checks: Vec<&serde_json::Value> = doctor
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| {
            let c = f["check"].as_str().unwrap();
            c == "bird" || c.starts_with("bgp") || c.starts_with("table") || c.starts_with("export")
        })
        .collect();
    assert_eq!(announce_checks.len(), 4, "{doctor}");
    assert!(
        announce_checks.iter().all(|f| f["level"] == "ok"),
        "{doctor}"
    );
    // A node announces once it can serve; health changes that follow
    // within a rebuild gap land together at its end.
    for d in &daemons {
        d.wait_in_table(BACKENDS, Duration::from_secs(2)).unwrap();
    }
    let digests: Vec<_> = daemons
        .iter()
        .map(|d| d.cli(&["service", "list"]).unwrap()[0]["digest"].clone())
        .collect();
    assert_eq!(digests[0], digests[1], "same configuration, same table");

    let mut sessions = Sessions::open(
        &edge.client,
        SocketAddr::new(VIP.into(), ECHO_PORT),
        CONNECTIONS,
    )
    .unwrap();
    let spread = sessions.spread();
    eprintln!("connections per backend: {spread:?}");
    assert_eq!(spread.len(), BACKENDS, "every backend serves some");
    let through: Vec<u64> = daemons
        .iter()
        .map(|d| {
            d.cli(&["stats"]).unwrap()["services"][0]["new_flows"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(
        through.iter().all(|&n| n > 0),
        "ECMP spreads the connections over both nodes: {through:?}"
    );
    assert_all_alive(&mut sessions, "both nodes");

    // Drain node 0: the router withdraws it, its connections move to node
    // 1, which sends them to the same backends.
    let drained = daemons[0].cli(&["node", "drain"]).unwrap();
    assert_eq!(drained["drained"], true);
    let t = edge.wait_paths(VIP, &[node_v4(1)], CONVERGED).unwrap();
    eprintln!("drain: withdrawn from the router within {t:?}");
    assert!(edge.announced(0).unwrap().is_empty());
    assert_eq!(vip_state(&daemons[0]), (false, "drained".into()));
    assert_all_alive(&mut sessions, "node 0 drained");
    // Nothing reaches node 0 any more: `drain --wait` says so.
    daemons[0]
        .cli(&[
            "node",
            "drain",
            "--wait",
            "--quiet",
            "1s",
            "--timeout",
            "20s",
        ])
        .unwrap();

    // The drain persists across a restart of the daemon.
    daemons[0].kill(libc::SIGTERM).unwrap();
    daemons[0].spawn().unwrap();
    assert_eq!(vip_state(&daemons[0]), (false, "drained".into()));
    assert_eq!(edge.paths(VIP).unwrap(), [node_v4(1)]);

    // Undrain: announced again, and the connections ECMP moves back to
    // node 0 (which may still hold their old entries) stay where they were.
    daemons[0].cli(&["node", "undrain"]).unwrap();
    edge.wait_paths(VIP, &both, CONVERGED).unwrap();
    assert_all_alive(&mut sessions, "node 0 undrained");

    // Node 1 loses every backend (maintenance): it has nothing in rotation
    // and withdraws; node 0 serves all, to the same backends.
    for i in 0..BACKENDS {
        let b = backend_v4(i).to_string();
        daemons[1]
            .cli(&["backend", "maintenance", "echo", &b])
            .unwrap();
    }
    edge.wait_paths(VIP, &[node_v4(0)], CONVERGED).unwrap();
    assert_eq!(
        vip_state(&daemons[1]),
        (false, "no-backend-in-rotation".into())
    );
    assert_all_alive(&mut sessions, "node 1 without backends");
    // Node 1's probes of the last backend go unanswered as the backends
    // leave maintenance: that one awaits its first verdict until its probe
    // times out. Node 1 is drained meanwhile, so that nothing else holds
    // its route back once it is undrained: it announces only once every
    // backend has its verdict. With a table about to change, the flows the
    // router moves back to it could go to other backends than node 0 sends
    // them to.
    daemons[1].cli(&["node", "drain"]).unwrap();
    edge.nodes[1]
        .block(backend_v4(BACKENDS - 1), Some(ECHO_PORT))
        .unwrap();
    for i in 0..BACKENDS {
        let b = backend_v4(i).to_string();
        daemons[1].cli(&["backend", "enable", "echo", &b]).unwrap();
    }
    daemons[1].cli(&["node", "undrain"]).unwrap();
    daemons[1]
        .wait_until("node 1's route", CONVERGED, |d| Ok(vip_state(d).0))
        .unwrap();
    let health = daemons[1].cli(&["health"]).unwrap();
    assert!(
        health
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["health"] != "checking"),
        "announced while a backend awaited its first verdict: {health}"
    );
    // Its probes answered again, the last backend rises; no connection
    // has sent anything in between. The table whole before its daemon
    // dies below.
    edge.nodes[1].unblock().unwrap();
    daemons[1]
        .wait_in_table(BACKENDS, Duration::from_secs(5))
        .unwrap();
    edge.wait_paths(VIP, &both, CONVERGED).unwrap();

    // A killed daemon leaves its route, and the data plane forwarding: the
    // router keeps both paths and no connection notices.
    daemons[1].kill(libc::SIGKILL).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(edge.announced(1).unwrap(), [VIP.to_string()]);
    assert_eq!(edge.paths(VIP).unwrap(), both);
    assert_all_alive(&mut sessions, "node 1's daemon killed");
    // Its successor adopts the route without withdrawing it.
    daemons[1].spawn().unwrap();
    assert_eq!(vip_state(&daemons[1]), (true, serde_json::Value::Null));
    assert_eq!(edge.paths(VIP).unwrap(), both);
    assert_all_alive(&mut sessions, "node 1's daemon restarted");

    // `lb node withdraw` is for a node whose daemon is gone: refused while
    // one listens, it then removes the route the dead daemon left, and the
    // router sends everything to node 0, to the same backends.
    let socket = daemons[1].socket.to_str().unwrap().to_owned();
    let withdraw = ["--socket", socket.as_str(), "node", "withdraw"];
    let refused = lb_in(&edge.nodes[1].ns, &withdraw).unwrap_err();
    assert!(refused.to_string().contains("lb node drain"), "{refused:#}");
    assert_eq!(edge.paths(VIP).unwrap(), both);
    daemons[1].kill(libc::SIGKILL).unwrap();
    let withdrawn = lb_in(&edge.nodes[1].ns, &withdraw).unwrap();
    assert_eq!(withdrawn.as_array().unwrap().len(), 1, "{withdrawn}");
    assert_eq!(withdrawn[0]["vip"], VIP.to_string(), "{withdrawn}");
    let t = edge.wait_paths(VIP, &[node_v4(0)], CONVERGED).unwrap();
    eprintln!("lb node withdraw: withdrawn from the router within {t:?}");
    assert!(edge.announced(1).unwrap().is_empty());
    assert_all_alive(&mut sessions, "node 1 withdrawn by hand");
    // A daemon started again announces as its rules decide.
    daemons[1].spawn().unwrap();
    edge.wait_paths(VIP, &both, CONVERGED).unwrap();
    assert_all_alive(&mut sessions, "node 1 back");

    // Restarted without `[announce]`, a daemon withdraws the route its
    // predecessor left: BIRD still learns that table, and nothing would
    // decide on the VIP any more.
    daemons[1].kill(libc::SIGTERM).unwrap();
    let text = std::fs::read_to_string(&daemons[1].config).unwrap();
    let start = text.find("[announce]").unwrap();
    let end = start + text[start..].find("\n\n").unwrap();
    std::fs::write(
        &daemons[1].config,
        format!("{}{}", &text[..start], &text[end..]),
    )
    .unwrap();
    daemons[1].spawn().unwrap();
    let t = edge.wait_paths(VIP, &[node_v4(0)], CONVERGED).unwrap();
    eprintln!("a restart without [announce]: withdrawn within {t:?}");
    assert!(edge.announced(1).unwrap().is_empty());
    assert!(daemons[1].log().contains("no longer names this table"));
    assert_all_alive(&mut sessions, "node 1 no longer announcing");
}

/// A route to a VIP in the announce table that lb did not make stays as it
/// is: lb's route of that VIP is refused, said so, and the table's other
/// VIPs are announced and withdrawn as ever.
#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_route_lb_did_not_make_stays() {
    require_root();
    let ns = lb::netns::Netns::new("routes").unwrap();
    const TABLE: &str = "100";
    let (theirs, ours) = ("198.18.1.1", "198.18.1.2");
    ns.ip(&[
        "route", "add", theirs, "dev", "lo", "table", TABLE, "proto", "static",
    ])
    .unwrap();
    let table = || ns.ip_output(&["route", "show", "table", TABLE]).unwrap();
    ns.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let routes = lb::routes::VipRoutes::open(TABLE.parse()?)?;
            let both = lb::announce::Routes {
                announce: [theirs.parse()?, ours.parse()?].into(),
                keep: Default::default(),
            };
            let err = routes.sync(&both).await.unwrap_err().to_string();
            assert!(err.contains("lb did not make"), "{err}");
            let t = table();
            assert!(t.contains(&format!("{theirs} dev lo proto static")), "{t}");
            assert!(t.contains(&format!("blackhole {ours} proto 108")), "{t}");
            routes.sync(&lb::announce::Routes::default()).await?;
            let t = table();
            assert!(t.contains(&format!("{theirs} dev lo proto static")), "{t}");
            assert!(!t.contains(ours), "{t}");
            anyhow::Ok(())
        })
    })
    .unwrap();
}
