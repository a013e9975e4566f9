//! A load balancer attached to two segments (its `eth0` and `eth1`), run as
//! the real daemon: backends on both serve real TCP, frames to the second
//! segment's backend leave by `eth1` (redirected) from its MAC, and a
//! backend behind an interface lb is not attached to is refused.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::Result;
use lb::{
    demo::server::{NameServer, http_get},
    netns::{self, Netns},
};
use lb_tests::{
    daemon::{Daemon, WEB_PORT, WEB_VIP, web_config},
    lan::Lan,
    require_root,
};

const WAIT: Duration = Duration::from_secs(10);
/// The second segment: the load balancer's `eth1` and a backend.
const LB_FAR: &str = "198.18.4.2";
const LB_FAR_MAC: &str = "02:00:00:00:04:02";
const FAR: &str = "198.18.4.11";
const FAR_MAC: &str = "02:00:00:00:04:11";
/// Behind `eth2`, which lb is not attached to.
const UNATTACHED: &str = "198.18.5.11";

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_load_balancer_on_two_segments_serves_backends_on_both() {
    require_root();
    run().unwrap();
}

fn run() -> Result<()> {
    // eth0: the client and the near backend (198.18.0.11).
    let lan = Lan::build(1, &[&format!("{WEB_VIP}/32")])?;
    // eth1: the far backend, whose replies go back through the load
    // balancer's kernel (DSR: from the VIP, straight to the client).
    let switch = netns::switch()?;
    let far = Netns::new("far")?;
    netns::plug_as(
        &switch,
        "plb1",
        &lan.lb,
        "eth1",
        LB_FAR_MAC,
        &[&format!("{LB_FAR}/24")],
    )?;
    netns::plug(&switch, "pfar", &far, FAR_MAC, &[&format!("{FAR}/24")])?;
    far.ip(&["addr", "add", &format!("{WEB_VIP}/32"), "dev", "lo"])?;
    // A DSR backend answers no ARP for the VIP (probes through it check).
    far.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
    far.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
    far.ip(&["route", "add", "default", "via", LB_FAR])?;
    lan.lb.sysctl("net.ipv4.ip_forward", "1")?;
    // eth2: a segment lb is not attached to, its one neighbour known.
    lan.lb.ip(&[
        "link", "add", "eth2", "type", "veth", "peer", "name", "eth2p",
    ])?;
    lan.lb
        .ip(&["addr", "add", "198.18.5.2/24", "dev", "eth2"])?;
    lan.lb.ip(&["link", "set", "eth2", "up"])?;
    lan.lb.ip(&["link", "set", "eth2p", "up"])?;
    lan.lb.ip(&[
        "neigh",
        "add",
        UNATTACHED,
        "lladdr",
        "02:00:00:00:05:11",
        "dev",
        "eth2",
        "nud",
        "permanent",
    ])?;

    let _near = NameServer::start(&lan.backends[0].ns, "near", WEB_PORT)?;
    let _far = NameServer::start(&far, "far", WEB_PORT)?;
    let config = web_config(1).replace(
        "interfaces = [\"eth0\"]",
        "interfaces = [\"eth0\", \"eth1\"]",
    ) + &format!("\n[[service.backend]]\naddress = \"{FAR}\"\n");
    let d = Daemon::start(&lan.lb, "interfaces", &config)?;
    d.wait_in_table(2, WAIT)?;

    let vip = SocketAddr::new(IpAddr::V4(WEB_VIP), WEB_PORT);
    let served = lan.client.run(|| {
        let mut t = BTreeMap::<String, usize>::new();
        for _ in 0..60 {
            *t.entry(http_get(vip)?).or_default() += 1;
        }
        Ok(t)
    })?;
    assert_eq!(served.len(), 2, "both segments' backends serve: {served:?}");
    let stats = d.cli(&["stats"])?;
    let reason = |name: &str| stats["reasons"][name].as_u64().unwrap_or(0);
    assert!(
        reason("redirect_backend") > 0 && reason("forward_dsr") > 0,
        "frames left by both interfaces: {stats}"
    );
    assert_eq!(reason("drop_no_egress"), 0, "{stats}");
    let backends = d.cli(&["backend", "list"])?;
    let far_row = backends
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["address"] == FAR))
        .cloned()
        .unwrap_or_default();
    assert_eq!(far_row["mac"], FAR_MAC, "{backends}");

    // A backend reachable only through eth2: refused, nothing changed.
    let before = std::fs::read_to_string(&d.config)?;
    let (code, err) = d.cli_fails(&["backend", "add", "web", UNATTACHED])?;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "backend {UNATTACHED}: its route leaves by eth2, which lb is not attached to"
        )),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&d.config)?, before);
    assert_eq!(
        d.cli(&["service", "list"])?[0]["in_table"],
        2,
        "{}",
        d.cli(&["backend", "list"])?
    );

    // Configured all the same (a reload takes the file as it is): out of
    // the table, and no hold on changes that do not add it.
    let unattached = format!("[[service.backend]]\naddress = \"{UNATTACHED}\"\n");
    std::fs::write(&d.config, before + &unattached)?;
    d.cli(&["reload"])?;
    d.cli(&["acl", "add", "web", "198.18.200.0/24", "--deny"])?;
    assert_eq!(d.cli(&["service", "list"])?[0]["in_table"], 2);
    Ok(())
}
