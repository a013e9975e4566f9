//! Next hops through netlink: a backend whose next hop stops resolving
//! leaves the table (counted, with the reason in `lb backend list`) even
//! when nothing else finds it wrong, and comes back once it resolves.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::Result;
use lb::demo::server::{NameServer, http_get};
use lb_tests::{
    daemon::{Daemon, WEB_PORT, WEB_VIP, metrics_in, web_config},
    lan::Lan,
    require_root,
};
use serde_json::Value;

/// Neighbour resolution gives up after 500 ms; the periodic refresh is
/// every 10 s.
const WAIT: Duration = Duration::from_secs(15);
/// The backend whose host goes away.
const LOST: &str = "198.18.0.12";

fn tally(lan: &Lan, n: usize) -> Result<BTreeMap<String, usize>> {
    let vip = SocketAddr::new(IpAddr::V4(WEB_VIP), WEB_PORT);
    lan.client.run(move || {
        let mut t = BTreeMap::new();
        for _ in 0..n {
            *t.entry(http_get(vip)?).or_insert(0) += 1;
        }
        Ok(t)
    })
}

fn lost_row(d: &Daemon) -> Result<Value> {
    let rows = d.cli(&["backend", "list"])?;
    Ok(rows
        .as_array()
        .and_then(|a| a.iter().find(|r| r["address"] == LOST))
        .cloned()
        .unwrap_or(Value::Null))
}

fn in_table(d: &Daemon) -> Result<u64> {
    Ok(d.cli(&["service", "list"])?[0]["in_table"]
        .as_u64()
        .unwrap_or(0))
}

/// Two backends serving their names behind a daemon with health checks
/// off (only the next hop can take a backend out), both in the table.
fn two_backends(tag: &str) -> (Lan, Vec<NameServer>, Daemon) {
    let lan = Lan::build(2, &["198.18.1.1/32"]).unwrap();
    let servers = lan.serve_names(WEB_PORT).unwrap();
    let config = web_config(2).replace("check = \"http\"", "check = \"none\"");
    let d = Daemon::start(&lan.lb, tag, &config).unwrap();
    d.wait_until(
        "both backends in the table",
        WAIT,
        |d| Ok(in_table(d)? == 2),
    )
    .unwrap();
    (lan, servers, d)
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_backend_whose_next_hop_fails_leaves_the_table_until_it_resolves() {
    require_root();
    let (lan, _servers, d) = two_backends("hops");

    // Backend 2's host goes away, and the load balancer's neighbour entry
    // for it with it (as when it ages out): resolving it again fails.
    let host = &lan.backends[1].ns;
    host.ip(&["link", "set", "eth0", "down"]).unwrap();
    lan.lb.ip(&["neigh", "del", LOST, "dev", "eth0"]).unwrap();
    d.wait_until(
        "backend 2 out of the table",
        WAIT,
        |d| Ok(in_table(d)? == 1),
    )
    .unwrap();
    let row = lost_row(&d).unwrap();
    let why = row["next_hop_error"].as_str().unwrap_or_default();
    assert!(
        why.contains("neighbour resolution of 198.18.0.12 on eth0"),
        "{row}"
    );
    assert_eq!(row["health"], "up", "its health is not the cause: {row}");
    let metrics = metrics_in(&lan.lb).unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("lb_next_hops_lost_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    let t = tally(&lan, 60).unwrap();
    assert_eq!(t.get("backend-1"), Some(&60), "all to backend 1: {t:?}");

    // Back: resolved by the next refresh, and in the table again.
    host.ip(&["link", "set", "eth0", "up"]).unwrap();
    d.wait_until("backend 2 back in the table", WAIT, |d| {
        Ok(in_table(d)? == 2)
    })
    .unwrap();
    assert_eq!(lost_row(&d).unwrap()["next_hop_error"], Value::Null);
    let t = tally(&lan, 60).unwrap();
    assert_eq!(t.len(), 2, "both backends serve again: {t:?}");
}

/// A backend behind a gateway reached onlink by the backends' interface,
/// while the gateway's own address is routed out of another: its next hop
/// resolves on the backends' interface (before, the kernel was asked to
/// resolve the gateway by a datagram to it, which took the other
/// interface, and the backend waited for good).
#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_gateway_whose_own_route_leaves_elsewhere_resolves_where_the_backend_is() {
    require_root();
    let lan = Lan::build(2, &["198.18.1.1/32"]).unwrap();
    let _servers = lan.serve_names(WEB_PORT).unwrap();
    const GATEWAY: &str = "198.18.0.77";
    // Backend 2's host is also the gateway to it.
    lan.backends[1]
        .ns
        .ip(&["addr", "add", &format!("{GATEWAY}/32"), "dev", "eth0"])
        .unwrap();
    // On the load balancer, the gateway's own address leads out of a link
    // of its own, where nobody answers.
    for args in [
        &[
            "link", "add", "aside0", "type", "veth", "peer", "name", "aside1",
        ][..],
        &["link", "set", "aside0", "up"],
        &["link", "set", "aside1", "up"],
        &["route", "add", &format!("{GATEWAY}/32"), "dev", "aside0"],
        &[
            "route", "replace", LOST, "via", GATEWAY, "dev", "eth0", "onlink",
        ],
    ] {
        lan.lb.ip(args).unwrap();
    }
    let config = web_config(2).replace("check = \"http\"", "check = \"none\"");
    let d = Daemon::start(&lan.lb, "onlink", &config).unwrap();
    d.wait_until(
        "both backends in the table",
        WAIT,
        |d| Ok(in_table(d)? == 2),
    )
    .unwrap_or_else(|e| panic!("{e:#}: {}", lost_row(&d).unwrap()));
    let t = tally(&lan, 60).unwrap();
    assert_eq!(t.len(), 2, "both backends serve: {t:?}");
}

/// An address on the backends' segment that no host holds: resolving its
/// next hop waits the whole half second, then fails.
const SILENT: &str = "198.18.0.99";

/// Adding a backend waits for its next hop, but the control loop does not:
/// `lb status` keeps answering meanwhile (before, every call queued behind
/// the resolution).
#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn the_daemon_answers_while_a_new_backends_next_hop_resolves() {
    require_root();
    let (_lan, _servers, d) = two_backends("silent");

    std::thread::scope(|scope| {
        let add = scope.spawn(|| d.cli(&["backend", "add", "web", SILENT]));
        // The add reaches the daemon first.
        std::thread::sleep(Duration::from_millis(50));
        let mut answered_meanwhile = 0;
        while !add.is_finished() {
            d.cli(&["status"]).unwrap();
            answered_meanwhile += u32::from(!add.is_finished());
        }
        add.join().unwrap().unwrap();
        // A status call queued behind the resolution would return only
        // after it, and count nothing.
        assert!(
            answered_meanwhile >= 2,
            "`lb status` answered {answered_meanwhile} times while the add resolved its next hop"
        );
    });
    // Added, out of the table until its next hop resolves.
    let rows = d.cli(&["backend", "list"]).unwrap();
    let row = rows
        .as_array()
        .and_then(|a| a.iter().find(|r| r["address"] == SILENT))
        .cloned()
        .unwrap_or(Value::Null);
    assert!(
        row["next_hop_error"]
            .as_str()
            .is_some_and(|e| e.contains(SILENT)),
        "{row}"
    );
    assert_eq!(in_table(&d).unwrap(), 2);
}

/// An IPv6 backend routed through a router's link-local address (how IPv6
/// routers are usually known) resolves: the datagram that makes the kernel
/// resolve a next hop goes out on the route's interface, which a
/// link-local address needs.
#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_next_hop_at_a_link_local_address_resolves() {
    require_root();
    let lan = Lan::build(1, &[]).unwrap();
    let (router, backend) = ("fe80::99", "2001:2:9::1");
    let b1 = &lan.backends[0].ns;
    b1.ip(&["addr", "add", "fe80::99/64", "dev", "eth0", "nodad"])
        .unwrap();
    b1.ip(&[
        "addr",
        "add",
        &format!("{backend}/128"),
        "dev",
        "lo",
        "nodad",
    ])
    .unwrap();
    lan.lb
        .ip(&[
            "-6",
            "route",
            "add",
            &format!("{backend}/128"),
            "via",
            router,
            "dev",
            "eth0",
        ])
        .unwrap();
    // Another interface the host's routes name for that address: a
    // link-local address means nothing without its interface, and sent
    // without it, a datagram to the router follows them.
    for args in [
        &[
            "link",
            "add",
            "lbt-other",
            "type",
            "veth",
            "peer",
            "name",
            "lbt-peer",
        ][..],
        &["link", "set", "lbt-other", "up"],
        &["link", "set", "lbt-peer", "up"],
        &["-6", "route", "add", "fe80::99/128", "dev", "lbt-other"],
    ] {
        lan.lb.ip(args).unwrap();
    }
    let config = web_config(1).replace("check = \"http\"", "check = \"none\"")
        + &format!(
            "\n[[service]]\nname = \"web6\"\nvip = \"2001:2:1::1\"\nport = {WEB_PORT}\n\
             protocol = \"tcp\"\n[service.health]\ncheck = \"none\"\n\
             [[service.backend]]\naddress = \"{backend}\"\n"
        );
    let d = Daemon::start(&lan.lb, "link-local", &config).unwrap();
    d.wait_until("the backend's next hop resolved", WAIT, |d| {
        let rows = d.cli(&["backend", "list"])?;
        let row = rows
            .as_array()
            .and_then(|a| a.iter().find(|r| r["address"] == backend))
            .cloned()
            .unwrap_or(Value::Null);
        Ok(row["mac"] == lb::netns::mac_string(&lan.backends[0].mac))
    })
    .unwrap();
}

/// An IPv4 backend behind an IPv6 router (RFC 5549: `via inet6`, the
/// routes of BGP unnumbered fabrics): its next hop is that router, resolved
/// by neighbour discovery; its probes through the VIP go the same way, and
/// clients reach it.
#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn an_ipv4_backend_behind_an_ipv6_router_serves() {
    require_root();
    let lan = Lan::build(1, &["198.18.1.1/32"]).unwrap();
    let _servers = lan.serve_names(WEB_PORT).unwrap();
    let (router, backend) = ("fe80::99", "198.18.9.1");
    let host = &lan.backends[0];
    host.ns
        .ip(&["addr", "add", "fe80::99/64", "dev", "eth0", "nodad"])
        .unwrap();
    host.ns
        .ip(&["addr", "add", &format!("{backend}/32"), "dev", "lo"])
        .unwrap();
    lan.lb
        .ip(&[
            "route",
            "add",
            &format!("{backend}/32"),
            "via",
            "inet6",
            router,
            "dev",
            "eth0",
        ])
        .unwrap();
    // Probed through the VIP (the default), over HTTP.
    let config = web_config(1).replace("198.18.0.11", backend);
    let d = Daemon::start(&lan.lb, "rfc5549", &config).unwrap();
    d.wait_until("the backend in the table", WAIT, |d| Ok(in_table(d)? == 1))
        .unwrap();
    let rows = d.cli(&["backend", "list"]).unwrap();
    assert_eq!(rows[0]["address"], backend, "{rows}");
    assert_eq!(rows[0]["mac"], lb::netns::mac_string(&host.mac), "{rows}");
    assert_eq!(rows[0]["health"], "up", "{rows}");
    let t = tally(&lan, 20).unwrap();
    assert_eq!(t.get("backend-1"), Some(&20), "{t:?}");
}
