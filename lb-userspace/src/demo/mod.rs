//! `lb demo`: the whole product on an embedded default. A client, the load
//! balancer and three backends in network namespaces; real HTTP connections
//! to a VIP spread by weight; a backend's server dies, the health checker
//! evicts it, it comes back and is re-admitted. Everything it creates is
//! removed on every exit path, Ctrl-C included.

pub mod chart;
pub mod server;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::XdpMode;
use lb_common::{
    BACKEND_F_UP, BackendValue, Counter, ServiceKey, Settings, addr_bytes,
    limits::{DEFAULT_RING_SIZE, NO_BACKEND},
    maps::PROG_LB,
    wire::IPPROTO_TCP,
};

use crate::{
    dataplane::{Capacity, Dataplane},
    health::{Health, Thresholds, Tracker},
    maglev::{self, Candidate},
    netns::{self, Netns},
    probe,
};
use server::NameServer;

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const PORT: u16 = 80;
const CLIENT: &str = "198.18.0.1/24";
const LB: &str = "198.18.0.2/24";
/// Name, address, MAC and weight of each backend.
const BACKENDS: [(&str, Ipv4Addr, [u8; 6], u32); 3] = [
    (
        "backend-1",
        Ipv4Addr::new(198, 18, 0, 11),
        [2, 0, 0, 0, 0, 0x11],
        1,
    ),
    (
        "backend-2",
        Ipv4Addr::new(198, 18, 0, 12),
        [2, 0, 0, 0, 0, 0x12],
        1,
    ),
    (
        "backend-3",
        Ipv4Addr::new(198, 18, 0, 13),
        [2, 0, 0, 0, 0, 0x13],
        2,
    ),
];
/// The backend whose server the demo kills.
const VICTIM: usize = 1;
/// Connections per round.
const CONNECTIONS: usize = 300;
/// Health checking as the demo runs it: HAProxy's rise/fall, a faster interval.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);
const THRESHOLDS: Thresholds = Thresholds { rise: 2, fall: 3 };
/// Longest wait for the health checker to notice a change.
const EVENT_TIMEOUT: Duration = Duration::from_secs(15);
/// Small maps: one service.
const CAPACITY: Capacity = Capacity {
    max_services: 1,
    max_backends: 16,
    conntrack_entries: 16_384,
    ring_size: DEFAULT_RING_SIZE,
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// Runs the demo; every namespace and thread it made is gone when it returns.
pub fn run() -> Result<()> {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    println!(
        "lb demo: {VIP}:{PORT}/tcp (dsr-l2) over {} backends\n",
        BACKENDS.len()
    );

    step(
        1,
        "building the topology (network namespaces on one bridge)",
    );
    let topo = Topology::build()?;
    let mut servers = BACKENDS
        .iter()
        .zip(&topo.backends)
        .map(|((name, ..), ns)| NameServer::start(ns, name, PORT).map(Some))
        .collect::<Result<Vec<_>>>()?;
    println!("  client {CLIENT}, load balancer {LB}, backends 198.18.0.11-13 running HTTP servers");

    step(
        2,
        "loading the XDP program and attaching it to the load balancer's eth0",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (events, changes) = mpsc::channel();
    let controller = Controller::new()?;
    let flag = stop.clone();
    let handle = topo.lb.spawn(move || controller.run(&flag, &events));
    let mut report = || -> Result<()> {
        match changes.recv_timeout(EVENT_TIMEOUT) {
            Ok(Event::Attached) => {}
            _ => bail!("the data plane did not come up"),
        }
        println!(
            "  attached (generic XDP); health checks every {PROBE_INTERVAL:?}, rise {} fall {}",
            THRESHOLDS.rise, THRESHOLDS.fall
        );

        step(
            3,
            &format!("{CONNECTIONS} HTTP connections from the client to the VIP"),
        );
        round(&topo.client, &[])?;

        let (victim, ..) = BACKENDS[VICTIM];
        step(4, &format!("killing {victim}'s server"));
        servers[VICTIM] = None;
        let killed = Instant::now();
        wait_for(&changes, victim, Health::Down)?;
        println!(
            "  health checker evicted {victim} {} ms after its server died",
            killed.elapsed().as_millis()
        );
        round(&topo.client, &[VICTIM])?;

        step(5, &format!("restarting {victim}'s server"));
        servers[VICTIM] = Some(NameServer::start(&topo.backends[VICTIM], victim, PORT)?);
        let restarted = Instant::now();
        wait_for(&changes, victim, Health::Up)?;
        println!(
            "  re-admitted {} ms after its server came back",
            restarted.elapsed().as_millis()
        );
        round(&topo.client, &[])?;
        Ok(())
    };
    let outcome = report();
    stop.store(true, Ordering::Relaxed);
    let stats = handle
        .join()
        .map_err(|_| anyhow::anyhow!("controller thread panicked"))?;
    outcome?;
    step(6, "data-plane counters");
    print!("{}", stats?);
    println!("\ndone: every namespace, link and program is removed on exit");
    Ok(())
}

fn step(n: usize, what: &str) {
    println!("[{n}/6] {what}");
}

/// Sends a round of connections and prints the spread; `out` are the
/// backends expected to get none.
fn round(client: &Netns, out: &[usize]) -> Result<()> {
    let to = SocketAddr::new(IpAddr::V4(VIP), PORT);
    let (tally, failed) = client.run(|| {
        let mut tally = BTreeMap::new();
        let mut failed = 0;
        for _ in 0..CONNECTIONS {
            check_interrupted()?;
            match server::http_get(to) {
                Ok(name) => *tally.entry(name).or_insert(0usize) += 1,
                Err(_) => failed += 1,
            }
        }
        Ok((tally, failed))
    })?;
    let rows: Vec<chart::Row<'_>> = BACKENDS
        .iter()
        .enumerate()
        .map(|(i, (name, _, _, weight))| chart::Row {
            name,
            weight: if out.contains(&i) { 0 } else { *weight },
            count: tally.get(*name).copied().unwrap_or(0),
        })
        .collect();
    print!("{}", chart::render(&rows));
    println!("  {} answered, {failed} failed", CONNECTIONS - failed);
    if failed > 0 {
        bail!("{failed} of {CONNECTIONS} connections failed");
    }
    for &i in out {
        if tally.contains_key(BACKENDS[i].0) {
            bail!("{} answered while out of rotation", BACKENDS[i].0);
        }
    }
    Ok(())
}

fn wait_for(changes: &mpsc::Receiver<Event>, name: &str, want: Health) -> Result<()> {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        check_interrupted()?;
        let left = deadline.saturating_duration_since(Instant::now());
        match changes.recv_timeout(left.min(Duration::from_millis(100))) {
            Ok(Event::Changed(n, h)) if n == name && h == want => return Ok(()),
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            _ => bail!("{name} did not go {want:?} within {EVENT_TIMEOUT:?}"),
        }
    }
}

/// The demo's namespaces; dropping it removes them all.
struct Topology {
    client: Netns,
    lb: Netns,
    backends: Vec<Netns>,
    _switch: Netns,
}

impl Topology {
    fn build() -> Result<Topology> {
        let switch = netns::switch()?;
        let client = Netns::new("cl")?;
        let lb = Netns::new("lb")?;
        netns::plug(&switch, "pcl", &client, "02:00:00:00:00:01", &[CLIENT])?;
        netns::plug(&switch, "plb", &lb, "02:00:00:00:00:02", &[LB])?;
        client.ip(&["route", "add", &format!("{VIP}/32"), "via", "198.18.0.2"])?;
        let mut backends = Vec::new();
        for (i, (_, addr, mac, _)) in BACKENDS.iter().enumerate() {
            let ns = Netns::new(&format!("b{}", i + 1))?;
            netns::plug(
                &switch,
                &format!("pb{}", i + 1),
                &ns,
                &netns::mac_string(mac),
                &[&format!("{addr}/24")],
            )?;
            // The VIP is local on every backend: it accepts and answers from it.
            ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            backends.push(ns);
        }
        Ok(Topology {
            client,
            lb,
            backends,
            _switch: switch,
        })
    }
}

/// What the health checker tells the demo.
enum Event {
    Attached,
    Changed(&'static str, Health),
}

/// A minimal controller for one service: probes the backends from the load
/// balancer's namespace and republishes the Maglev table on every change.
struct Controller {
    dp: Dataplane,
    key: ServiceKey,
    trackers: Vec<Tracker>,
}

impl Controller {
    fn new() -> Result<Controller> {
        let mut dp = Dataplane::load(CAPACITY)?;
        dp.set_settings(Settings {
            mtu: 1500,
            ..Settings::default()
        })?;
        let (addr, family) = addr_bytes(IpAddr::V4(VIP));
        let key = ServiceKey {
            addr,
            port: PORT.to_be(),
            proto: IPPROTO_TCP,
            family,
        };
        let mut c = Controller {
            dp,
            key,
            trackers: vec![Tracker::new(Health::Up); BACKENDS.len()],
        };
        for id in 0..BACKENDS.len() {
            c.write_backend(id)?;
        }
        c.publish()?;
        Ok(c)
    }

    fn write_backend(&mut self, id: usize) -> Result<()> {
        let (_, ip, mac, _) = BACKENDS[id];
        let (addr, family) = addr_bytes(IpAddr::V4(ip));
        let up = self.trackers[id].state() == Health::Up;
        self.dp.set_backend(
            id as u32,
            &BackendValue {
                addr,
                mac,
                family,
                flags: if up { BACKEND_F_UP } else { 0 },
                generation: 1,
            },
        )
    }

    /// Rebuilds the table from the backends that are up and flips to it.
    fn publish(&mut self) -> Result<()> {
        let keys: Vec<[u8; 4]> = BACKENDS.iter().map(|(_, ip, ..)| ip.octets()).collect();
        let candidates: Vec<Candidate<'_>> = BACKENDS
            .iter()
            .zip(&keys)
            .zip(&self.trackers)
            .map(|(((_, _, _, weight), key), t)| Candidate {
                key,
                weight: if t.state() == Health::Up { *weight } else { 0 },
            })
            .collect();
        let ring: Vec<u32> = maglev::build(&candidates, CAPACITY.ring_size)?
            .into_iter()
            .map(|s| s.unwrap_or(NO_BACKEND))
            .collect();
        self.dp.publish_service(&self.key, 0, 0, &ring)
    }

    /// Attaches, then probes until `stop`; returns the final counters.
    fn run(mut self, stop: &AtomicBool, events: &mpsc::Sender<Event>) -> Result<String> {
        self.dp
            .program(PROG_LB)?
            .attach("eth0", XdpMode::Skb)
            .context("attaching to eth0")?;
        let _ = events.send(Event::Attached);
        while !stop.load(Ordering::Relaxed) {
            for (id, &(name, ip, ..)) in BACKENDS.iter().enumerate() {
                let ok = probe::tcp_connect(SocketAddr::new(IpAddr::V4(ip), PORT), PROBE_TIMEOUT)
                    .is_ok();
                if let Some(state) = self.trackers[id].record(ok, THRESHOLDS) {
                    // Out of the table before its flows are let go; back in
                    // the table only once it may take flows again.
                    if state == Health::Down {
                        self.publish()?;
                        self.write_backend(id)?;
                    } else {
                        self.write_backend(id)?;
                        self.publish()?;
                    }
                    let _ = events.send(Event::Changed(name, state));
                }
            }
            std::thread::sleep(PROBE_INTERVAL);
        }
        self.stats()
    }

    fn stats(&self) -> Result<String> {
        let mut out = String::new();
        let svc = self.dp.service_stats(0)?;
        out += &format!(
            "  service {VIP}:{PORT}/tcp  packets {}  bytes {}  new flows {}\n",
            svc.packets, svc.bytes, svc.new_flows
        );
        for (id, (name, ..)) in BACKENDS.iter().enumerate() {
            let b = self.dp.backend_stats(id as u32)?;
            out += &format!(
                "  {name:<10} {:<5} packets {:>6}  bytes {:>8}\n",
                format!("{:?}", self.trackers[id].state()).to_lowercase(),
                b.packets,
                b.bytes
            );
        }
        for (c, v) in self.dp.counters()? {
            if v > 0 || c == Counter::DropNoBackend {
                out += &format!("  {:<24} {v}\n", c.name());
            }
        }
        Ok(out)
    }
}
