//! Health probes through the data path (`via = "vip"`): a `dsr-l2` backend
//! that loses the VIP from its loopback fails its checks although its own
//! address still answers, and comes back once the VIP is back; for IPv4
//! and IPv6 services alike, each probe reaching the one backend it checks
//! by lb's policy rule and route. One that answers ARP for the VIP fails
//! too. An `ipip` or `gue` backend whose decapsulator is removed fails its
//! probes, which lb puts in the tunnel as it does clients' packets. A
//! probe begun before a backend's maintenance does not count after it.

use std::time::Duration;

use lb::demo::edge::fast_health;
use lb::netns::PrivateBpffs;
use lb::probe_path::{PROBE_MARK_BASE, ProbePath};
use lb_tests::{
    Scratch,
    daemon::{Daemon, WEB_PORT, lb_in, web_config},
    lan::Lan,
    require_root,
    responder::Responder,
};
use serde_json::Value;

const VIP4: &str = "198.18.1.1";
const VIP6: &str = "2001:2:1::1";
/// The `gue` service's VIP.
const GUE4: &str = "198.18.1.5";
const WAIT: Duration = Duration::from_secs(10);
/// The port of the health checks a [`Responder`] answers.
const CHECK_PORT: u16 = 8080;
const HTTP_OK: &str = "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n";
const HTTP_UNAVAILABLE: &str = "HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n";

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

/// `web_config(backends)` with HTTP checks of [`CHECK_PORT`] (rise 2, fall
/// 2) every `interval`, their timeout.
fn responder_checks(backends: u8, interval: &str) -> String {
    let checks = format!(
        "\n[service.health]\ncheck = \"http\"\nport = {CHECK_PORT}\ninterval = \"{interval}\"\n\
         fast_interval = \"100ms\"\ntimeout = \"{interval}\"\nrise = 2\nfall = 2\n\
         slow_start = \"0s\"\n"
    );
    let config = web_config(backends).replacen(&fast_health("http"), &checks, 1);
    assert!(config.contains(&checks), "{config}");
    config
}

/// A backend added with `--trust-first-probe` enters the table on its
/// first passing probe, where one added without needs `rise` (2) passes in
/// a row: both answer their checks pass, fail, pass, fail..., so the first
/// is up from its first probe on (one failure is not `fall`) and the
/// second never.
#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_backend_added_trusting_its_first_probe_is_up_on_one_pass() {
    require_root();
    let lan = Lan::build(3, &[&format!("{VIP4}/32")]).unwrap();
    let _servers = lan.serve_names(WEB_PORT).unwrap();
    let checks = Responder::on_backends(&lan, CHECK_PORT, HTTP_OK).unwrap();
    checks[1].say(&[HTTP_OK, HTTP_UNAVAILABLE]);
    checks[2].say(&[HTTP_OK, HTTP_UNAVAILABLE]);
    // An interval and timeout long enough that no probe times out on a
    // loaded machine, which would shift the pass, fail turns.
    let d = Daemon::start(&lan.lb, "trust", &responder_checks(1, "1s")).unwrap();
    let (trusted, checked) = ("198.18.0.12", "198.18.0.13");
    wait_for(&d, "web", "198.18.0.11", "up");
    d.cli(&["backend", "add", "web", trusted, "--trust-first-probe"])
        .unwrap();
    d.cli(&["backend", "add", "web", checked]).unwrap();
    // Three passes and two failures each, recorded before the sixth
    // probe began: settled for good.
    d.wait_until("six probes of each", WAIT, |_| {
        Ok(checks[1].accepted() >= 6 && checks[2].accepted() >= 6)
    })
    .unwrap();
    assert_eq!(health(&d, "web", trusted), "up");
    assert_eq!(health(&d, "web", checked), "down");
    drop(d);
}

/// Leaving maintenance sets a backend's verdict aside until a probe passes
/// (its server was likely stopped or changed meanwhile), and only a probe
/// begun since counts: one still under way from before maintenance was
/// answered by the server as it was. Here that answer passes and every
/// later one fails, and the backend must go from checking to down without
/// having been up.
#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_probe_begun_before_maintenance_does_not_count_after_it() {
    require_root();
    let lan = Lan::build(2, &[&format!("{VIP4}/32")]).unwrap();
    let _servers = lan.serve_names(WEB_PORT).unwrap();
    let checks = Responder::on_backends(&lan, CHECK_PORT, HTTP_OK).unwrap();
    // A timeout well above the delay below.
    let config = responder_checks(2, "3s");
    let d = Daemon::start(&lan.lb, "stale-probe", &config).unwrap();
    let two = "198.18.0.12";
    wait_for(&d, "web", two, "up");
    let transitions = |d: &Daemon| {
        let rows = d.cli(&["health"]).unwrap();
        rows.as_array()
            .and_then(|a| a.iter().find(|r| r["address"] == two))
            .and_then(|r| r["transitions"].as_u64())
            .unwrap_or_default()
    };
    let before = transitions(&d);

    // A probe of backend 2 under way, its answer (a pass) 2 s away: time
    // for three CLI calls, each a process start and, for two, a state-file
    // sync.
    checks[1].delay(Duration::from_secs(2));
    let accepted = checks[1].accepted();
    d.wait_until("a slow probe under way", WAIT, |_| {
        Ok(checks[1].accepted() > accepted)
    })
    .unwrap();
    // Within those 2 s, maintenance; the server's checks fail from now
    // on, and answer at once; back from maintenance.
    d.cli(&["backend", "maintenance", "web", two]).unwrap();
    checks[1].say(&[HTTP_UNAVAILABLE]);
    checks[1].delay(Duration::ZERO);
    d.cli(&["backend", "enable", "web", two]).unwrap();
    assert_eq!(health(&d, "web", two), "checking");
    // The late pass arrives, then the first probe begun since fails.
    wait_for(&d, "web", two, "down");
    assert_eq!(
        transitions(&d),
        before + 1,
        "backend 2 was up after maintenance on a probe from before it"
    );
    drop(d);
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
        .map(|family| lan.lb.ip_output(&[family, "rule", "show"]).unwrap())
        .collect::<String>();
    let ours = format!("fwmark {:#x}", PROBE_MARK_BASE >> 16);
    assert_eq!(
        rules
            .lines()
            .filter(|l| l.contains(&ours) && l.contains("lookup"))
            .count(),
        4,
        "{rules}"
    );
    // Behind them, one per family refusing any other probe mark.
    let catch_all = format!("fwmark {PROBE_MARK_BASE:#x}/0xffff0000 unreachable");
    assert_eq!(
        rules.lines().filter(|l| l.contains(&catch_all)).count(),
        2,
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

/// A backend whose next hop does not resolve (no host answers ARP for
/// it) has no probe route: its probe fails unsent. Sent anyway, the marked
/// probe would follow the host's own route to the VIP, here to another
/// backend that holds it, and pass for a backend nobody reaches.
#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_backend_without_a_next_hop_fails_probes_through_the_vip_unsent() {
    require_root();
    let lan = Lan::build(2, &[&format!("{VIP4}/32")]).unwrap();
    let _servers = lan.serve_names(WEB_PORT).unwrap();
    let absent = "198.18.0.19";
    let config = web_config(2).replacen("check = \"http\"", "check = \"http\"\nvia = \"vip\"", 1)
        + &format!("\n[[service.backend]]\naddress = \"{absent}\"\n");
    lan.lb
        .ip(&["route", "add", &format!("{VIP4}/32"), "via", "198.18.0.12"])
        .unwrap();
    let d = Daemon::start(&lan.lb, "via-vip-unresolved", &config).unwrap();
    wait_for(&d, "web", "198.18.0.11", "up");
    wait_for(&d, "web", "198.18.0.12", "up");
    wait_for(&d, "web", absent, "down");
    // Many probe intervals (200 ms) later, still down, and for that reason.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(health(&d, "web", absent), "down");
    let detail = d.cli(&["backend", "list"]).unwrap().to_string();
    assert!(detail.contains("next hop is not resolved"), "{detail}");
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_tunnel_backend_without_its_decapsulator_fails_probes_through_the_vip() {
    require_root();
    let lan = Lan::build(
        2,
        &[
            &format!("{VIP4}/32"),
            &format!("{VIP6}/128"),
            &format!("{GUE4}/32"),
        ],
    )
    .unwrap();
    let _servers = lan.serve_names(WEB_PORT).unwrap();
    let scratch = Scratch::new("probe-tunnel").unwrap();
    // Dropped (unmounted) before the scratch directory, on every exit path.
    let bpffs = PrivateBpffs::mount(&scratch.dir.join("bpffs")).unwrap();
    // Each backend's `lb decap`: its file and its pins.
    let decaps: Vec<_> = lan
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let file = scratch.dir.join(format!("decap{i}.toml"));
            std::fs::write(
                &file,
                format!(
                    "interfaces = [\"eth0\"]\nxdp_mode = \"generic\"\n\
                     endpoints = [\"{}\", \"{}\"]\n\
                     accept_from = [\"198.18.255.0/24\", \"2001:2:ff::/112\"]\n\
                     vips = [\"{VIP4}\", \"{VIP6}\", \"{GUE4}\"]\n",
                    b.v4, b.v6
                ),
            )
            .unwrap();
            let pins = bpffs.path().join(format!("decap{i}"));
            (
                file.to_string_lossy().into_owned(),
                pins.to_string_lossy().into_owned(),
            )
        })
        .collect();
    let decap = |i: usize, verb: &str| {
        let (file, pins) = &decaps[i];
        let args = match verb {
            "apply" => vec!["decap", "apply", "-f", file, "--pin-dir", pins],
            _ => vec!["decap", verb, "--pin-dir", pins],
        };
        lb_in(&lan.backends[i].ns, &args).unwrap()
    };
    decap(0, "apply");
    decap(1, "apply");

    // Three tunnel services probed through their VIPs (the default).
    let service = |name: &str, vip: &str, mode: &str, backends: [&str; 2]| {
        let mut text = format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {WEB_PORT}\n\
             protocol = \"tcp\"\nmode = \"{mode}\"\n{}",
            lb::demo::edge::fast_health("http")
        );
        for b in backends {
            text += &format!("[[service.backend]]\naddress = \"{b}\"\n");
        }
        text
    };
    let v4 = ["198.18.0.11", "198.18.0.12"];
    let v6 = ["2001:2::11", "2001:2::12"];
    // web_config's settings, with the lab's tunnel sources.
    let settings = web_config(0);
    let settings = &settings[..settings.find("[[service]]").unwrap()];
    let config = settings.replace(
        "[settings]\n",
        "[settings]\ntunnel_source_v4 = \"198.18.255.0/24\"\n\
         tunnel_source_v6 = \"2001:2:ff::/112\"\n",
    ) + &service("ipip4", VIP4, "ipip", v4)
        + &service("ipip6", VIP6, "ipip", v6)
        + &service("gue4", GUE4, "gue", v4);
    let d = Daemon::start(&lan.lb, "via-tunnel", &config).unwrap();
    let services = [("ipip4", v4), ("ipip6", v6), ("gue4", v4)];
    for (name, [one, two]) in services {
        wait_for(&d, name, one, "up");
        wait_for(&d, name, two, "up");
    }
    // An interface MTU that leaves the IPv6 tunnel less than IPv6's
    // minimum MTU (clients are told 1260 and never go below 1280): said.
    lan.lb.ip(&["link", "set", "eth0", "mtu", "1300"]).unwrap();
    let said = "eth0: an MTU of 1300 leaves service ipip6's IPv6 tunnel";
    d.wait_until("the short MTU said", Duration::from_secs(3), |d| {
        Ok(d.log().contains(said))
    })
    .unwrap();
    // Once, not at each second's check.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(d.log().matches(said).count(), 1, "{}", d.log());
    lan.lb.ip(&["link", "set", "eth0", "mtu", "1500"]).unwrap();
    d.wait_until("the MTU said to be enough", Duration::from_secs(3), |d| {
        Ok(d.log().contains("no longer leaves an IPv6 tunnel short"))
    })
    .unwrap();

    // The probes reached the backends in their tunnels.
    let decapsulated = decap(1, "status")["counters"]["decapsulated"]
        .as_u64()
        .unwrap_or(0);
    assert!(decapsulated > 0, "backend 2 decapsulated no probe");

    // Backend 1 without its decapsulator still holds the VIPs and
    // answers at its address, but no tunnel packet reaches its stack.
    decap(0, "remove");
    for (name, [one, two]) in services {
        wait_for(&d, name, one, "down");
        assert_eq!(health(&d, name, two), "up", "{name} {two}");
    }
    decap(0, "apply");
    for (name, [one, _]) in services {
        wait_for(&d, name, one, "up");
    }
    drop(d);
}

/// One path whose route the kernel refuses (its interface is gone) holds
/// no other back: the others get their rule and route, and it gets an
/// `unreachable` route with its rule, so its probes fail rather than leave
/// by the main table. Paths no longer wanted leave nothing behind,
/// `unreachable` routes included.
#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_probe_path_that_cannot_be_routed_holds_no_other_back() {
    require_root();
    let ns = lb::netns::Netns::new("paths").unwrap();
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ])
    .unwrap();
    ns.ip(&["link", "set", "eth0", "up"]).unwrap();
    let path = |mark: u32, dev: &str| ProbePath {
        mark,
        vip: VIP4.parse().unwrap(),
        next_hop: "198.18.0.11".parse().unwrap(),
        dev: dev.into(),
        tunnel: None,
    };
    let (gone, good) = (PROBE_MARK_BASE + 1, PROBE_MARK_BASE + 2);
    let table = |mark: u32| {
        ns.ip_output(&["route", "show", "table", &mark.to_string()])
            .unwrap()
    };
    let rules = || ns.ip_output(&["rule", "show"]).unwrap();
    let wait = |what: &str, done: &dyn Fn() -> bool| {
        let start = std::time::Instant::now();
        while !done() {
            assert!(start.elapsed() < WAIT, "{what}:\n{}", rules());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let good_rule = format!("fwmark {good:#x} lookup {good}");
    let gone_rule = format!("fwmark {gone:#x} lookup {gone}");
    ns.run(|| {
        // Its worker thread is made here, so it is in the namespace too.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let (tx, rx) =
            tokio::sync::watch::channel([path(gone, "nosuch0"), path(good, "eth0")].into());
        let keeper = rt.spawn(lb::probe_path::keep(rx));
        wait("the good path's rule", &|| rules().contains(&good_rule));
        assert!(
            table(good).contains("via 198.18.0.11 dev eth0"),
            "{}",
            table(good)
        );
        assert!(rules().contains(&gone_rule), "{}", rules());
        assert!(table(gone).contains("unreachable"), "{}", table(gone));
        // A table that lost its route (its interface went down, before the
        // next sync): the catch-all behind refuses the probe.
        let catch_all = format!("fwmark {PROBE_MARK_BASE:#x}/0xffff0000 unreachable");
        assert!(rules().contains(&catch_all), "{}", rules());
        // Neither wanted any more: no rule, no route.
        tx.send(Default::default())?;
        wait("the rules gone", &|| {
            let r = rules();
            !r.contains(&good_rule) && !r.contains(&gone_rule) && !r.contains(&catch_all)
        });
        wait("the routes gone", &|| {
            table(good).is_empty() && table(gone).is_empty()
        });
        drop(tx);
        rt.block_on(keeper)?;
        Ok(())
    })
    .unwrap();
}
