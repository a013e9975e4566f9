//! Health probes through the data path (`via = "vip"`): a `dsr-l2` backend
//! that loses the VIP from its loopback fails its checks although its own
//! address still answers, and comes back once the VIP is back; for IPv4
//! and IPv6 services alike, each probe reaching the one backend it checks
//! by lb's policy rule and route. One that answers ARP for the VIP fails
//! too.

use std::time::Duration;

use lb::probe_path::PROBE_BASE;
use lb_tests::{
    daemon::{Daemon, WEB_PORT, web_config},
    lan::Lan,
    require_root,
};
use serde_json::Value;

const VIP4: &str = "198.18.1.1";
const VIP6: &str = "2001:2:1::1";
const WAIT: Duration = Duration::from_secs(10);

/// Backend `addr`'s health in service `service`.
fn health(d: &Daemon, service: &str, addr: &str) -> String {
    d.cli(&["health"])
        .unwrap()
        .as_array()
        .and_then(|rows| {
            rows.iter()
                .find(|r| r["service"] == service && r["address"] == addr)
                .cloned()
        })
        .unwrap_or(Value::Null)["health"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn wait_for(d: &Daemon, service: &str, addr: &str, want: &str) {
    d.wait_until(&format!("{service} {addr} {want}"), WAIT, |d| {
        Ok(health(d, service, addr) == want)
    })
    .unwrap();
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_backend_without_the_vip_fails_probes_through_the_vip() {
    require_root();
    let lan = Lan::build(2, &[&format!("{VIP4}/32"), &format!("{VIP6}/128")]).unwrap();
    let _servers = lan.serve_names(WEB_PORT).unwrap();
    // web_config's service probed through its VIP, and its IPv6 twin.
    let via = "check = \"http\"\nvia = \"vip\"";
    let mut config = web_config(2).replacen("check = \"http\"", via, 1);
    config += &format!(
        "\n[[service]]\nname = \"web6\"\nvip = \"{VIP6}\"\nport = {WEB_PORT}\nprotocol = \"tcp\"\n\
         [service.health]\n{via}\ninterval = \"200ms\"\nfast_interval = \"100ms\"\n\
         timeout = \"150ms\"\nrise = 2\nfall = 2\nslow_start = \"0s\"\n\
         [[service.backend]]\naddress = \"2001:2::11\"\n[[service.backend]]\naddress = \"2001:2::12\"\n"
    );
    let d = Daemon::start(&lan.lb, "via-vip", &config).unwrap();
    for (service, one, two) in [
        ("web", "198.18.0.11", "198.18.0.12"),
        ("web6", "2001:2::11", "2001:2::12"),
    ] {
        wait_for(&d, service, one, "up");
        wait_for(&d, service, two, "up");
    }
    // One rule per backend, to its own table.
    let rules = ["-4", "-6"]
        .iter()
        .map(|family| {
            let out = std::process::Command::new("ip")
                .args(["-n", lan.lb.name.as_str(), family, "rule", "show"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .collect::<String>();
    let ours = format!("fwmark {:#x}", PROBE_BASE >> 16);
    assert_eq!(
        rules.lines().filter(|l| l.contains(&ours)).count(),
        4,
        "{rules}"
    );

    // Backend 1 loses the VIPs: its own address still answers HTTP, but
    // probes to the VIPs, sent to its MAC as clients' packets are, do not.
    let b1 = &lan.backends[0].ns;
    b1.ip(&["addr", "del", &format!("{VIP4}/32"), "dev", "lo"])
        .unwrap();
    wait_for(&d, "web", "198.18.0.11", "down");
    assert_eq!(health(&d, "web", "198.18.0.12"), "up");
    assert_eq!(health(&d, "web6", "2001:2::11"), "up");
    b1.ip(&["addr", "del", &format!("{VIP6}/128"), "dev", "lo"])
        .unwrap();
    wait_for(&d, "web6", "2001:2::11", "down");
    assert_eq!(health(&d, "web6", "2001:2::12"), "up");

    // The VIPs back: up again.
    b1.ip(&["addr", "add", &format!("{VIP4}/32"), "dev", "lo"])
        .unwrap();
    b1.ip(&["addr", "add", &format!("{VIP6}/128"), "dev", "lo", "nodad"])
        .unwrap();
    wait_for(&d, "web", "198.18.0.11", "up");
    wait_for(&d, "web6", "2001:2::11", "up");

    // Backend 2 answers ARP for the VIPs it holds on `lo` (its ARP
    // suppression undone): it would draw the segment's traffic for the VIP
    // past lb, so it fails; IPv6 has no such answer (neighbour discovery
    // answers for the receiving interface's addresses only).
    let b2 = &lan.backends[1].ns;
    b2.sysctl("net.ipv4.conf.all.arp_ignore", "0").unwrap();
    wait_for(&d, "web", "198.18.0.12", "down");
    let detail = d.cli(&["backend", "list"]).unwrap().to_string();
    assert!(
        detail.contains("answers ARP for the VIP 198.18.1.1"),
        "{detail}"
    );
    assert_eq!(health(&d, "web6", "2001:2::12"), "up");
    b2.sysctl("net.ipv4.conf.all.arp_ignore", "1").unwrap();
    wait_for(&d, "web", "198.18.0.12", "up");
    drop(d);
}
