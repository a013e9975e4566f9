//! The controller under a probe storm: thousands of backends probed every
//! 2 s while a tenth of them flap, measured on a real `lb daemon`.
//!
//! One backend namespace answers for every backend address: it holds
//! `BACKEND_NET` as a local route (any address in it is its own) and one
//! listener accepts every probe. A flapping backend is one whose address a
//! `prohibit` route in that namespace's local table (where the local
//! route is, and by its longer prefix taking precedence) takes away: its
//! probes are refused until the route goes again. The flappers' routes come and go every
//! `FLAP_PERIOD` for the whole storm, while a thread times `lb status`
//! and the daemon's CPU time and counters are read before and after.

use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::{Ipv4Addr, TcpListener},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use lb::netns::Netns;
use lb_tests::{
    daemon::{Daemon, metrics_in},
    lan::Lan,
};
use serde::{Deserialize, Serialize};

use crate::{procs::process_cpu_ns, reaction::ms, stats::Summary};

/// The backends' addresses: 198.18.16.0/20, 4,096 of them.
const BACKEND_NET: &str = "198.18.16.0/20";
const BACKEND_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 16, 0);
/// The backend namespace's own address, the next hop of them all.
const NEXT_HOP: &str = "198.18.0.11";
/// The flappers: 410 addresses (a tenth of 4,096) at the start of
/// `BACKEND_NET`, as the prefixes that cover exactly them.
const FLAPPERS: [&str; 5] = [
    "198.18.16.0/24",
    "198.18.17.0/25",
    "198.18.17.128/28",
    "198.18.17.144/29",
    "198.18.17.152/31",
];
const FLAPPER_COUNT: usize = 256 + 128 + 16 + 8 + 2;
/// The counters read from the daemon's metrics.
const REBUILDS: &str = "lb_table_rebuilds_total";
const TRANSITIONS: &str = "lb_backend_transitions_total";
/// The probed port.
const PORT: u16 = 80;
/// How long the flappers stay refused, then reachable.
const FLAP_PERIOD: Duration = Duration::from_secs(3);
/// How often `lb status` is timed.
const STATUS_EVERY: Duration = Duration::from_millis(100);
/// Longest wait for every backend to be in its table (damping doubles the
/// successes a flapper needs to return, once per recent flap).
const SETTLE: Duration = Duration::from_secs(120);
/// The goal for `lb status` during the storm, p99.
pub(crate) const STATUS_P99_GOAL_MS: f64 = 50.0;

/// How much to measure.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Plan {
    /// Services.
    pub services: usize,
    /// Backends per service.
    pub backends_per_service: usize,
    /// How long the storm lasts.
    pub storm: Duration,
}

impl Plan {
    /// The full plan, or the quick one.
    pub fn new(quick: bool) -> Plan {
        Plan {
            services: 4,
            backends_per_service: 1_024,
            storm: Duration::from_secs(if quick { 15 } else { 40 }),
        }
    }

    fn backends(&self) -> usize {
        self.services * self.backends_per_service
    }
}

/// The part's results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StormResults {
    /// How much was measured.
    pub plan: Plan,
    /// Backends flapping.
    pub flappers: usize,
    /// The health settings.
    pub health: String,
    /// From the daemon's start to every backend in its table, s.
    pub all_up_s: f64,
    /// Health transitions during the storm.
    pub transitions: u64,
    /// Table rebuilds during the storm, all services.
    pub rebuilds: u64,
    /// The most rebuilds one service had.
    pub most_rebuilds_one_service: u64,
    /// The storm's length, s.
    pub storm_s: f64,
    /// The daemon's CPU time over the storm / its length (1.0: one core).
    pub daemon_cpu: f64,
    /// `lb status`, run to answer, before the storm, ms.
    pub status_quiet_ms: Summary,
    /// The same during the storm, ms.
    pub status_storm_ms: Summary,
    /// Its 99th percentile during the storm, ms.
    pub status_storm_p99_ms: f64,
}

fn health() -> String {
    "check = \"tcp\"\nvia = \"address\"\ninterval = \"2s\"\nfast_interval = \"1s\"\ntimeout = \"500ms\"\n\
     rise = 2\nfall = 2\nslow_start = \"0s\"\n"
        .to_string()
}

fn config(plan: &Plan) -> String {
    let mut text = format!(
        "[settings]\ninterfaces = [\"eth0\"]\nxdp_mode = \"generic\"\nmetrics = \"{}\"\n\
         max_services = {}\nmax_backends = {}\n\n",
        lb::demo::edge::METRICS,
        plan.services.next_power_of_two().max(8),
        (plan.backends() * 2).next_power_of_two(),
    );
    let base = u32::from(BACKEND_BASE);
    for s in 0..plan.services {
        text += &format!(
            "[[service]]\nname = \"s{s}\"\nvip = \"198.18.1.{}\"\nport = {PORT}\nprotocol = \"tcp\"\n\
             [service.health]\n{}",
            s + 1,
            health()
        );
        for b in 0..plan.backends_per_service {
            // Interleaved, so every service has its share of flappers.
            let i = (b * plan.services + s) as u32;
            text += &format!(
                "[[service.backend]]\naddress = \"{}\"\n",
                Ipv4Addr::from(base + i)
            );
        }
        text += "\n";
    }
    text
}

/// Accepts and closes every connection until stopped.
struct Acceptor {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Acceptor {
    fn start(ns: &Netns) -> Result<Acceptor> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = ns.spawn(move || {
            let listener = TcpListener::bind(("0.0.0.0", PORT))?;
            listener.set_nonblocking(true)?;
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        });
        Ok(Acceptor {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A counter's value by service on the daemon's metrics page.
fn by_service(ns: &Netns, name: &str) -> Result<BTreeMap<String, f64>> {
    let page = metrics_in(ns)?;
    let scrape = prometheus_parse::Scrape::parse(page.lines().map(|l| Ok(l.to_owned())))?;
    let mut out = BTreeMap::new();
    for s in scrape.samples.iter().filter(|s| s.metric == name) {
        if let prometheus_parse::Value::Counter(v) = s.value {
            let service = s.labels.get("service").unwrap_or_default().to_owned();
            *out.entry(service).or_insert(0.0) += v;
        }
    }
    Ok(out)
}

fn all_in_table(d: &Daemon, plan: &Plan) -> Result<bool> {
    let list = d.cli(&["service", "list"])?;
    Ok(list.as_array().is_some_and(|rows| {
        rows.iter()
            .all(|r| r["in_table"] == plan.backends_per_service)
    }))
}

fn time_status(d: &Daemon) -> Result<f64> {
    let t = Instant::now();
    d.cli(&["status"])?;
    Ok(ms(t.elapsed()))
}

fn p99(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() as f64 * 0.99).ceil() as usize).clamp(1, s.len()) - 1]
}

/// Runs the part.
pub(crate) fn run(plan: Plan) -> Result<StormResults> {
    let lan = Lan::build(1, &[])?;
    let backend = &lan.backends[0].ns;
    backend.ip(&["route", "add", "local", BACKEND_NET, "dev", "lo"])?;
    lan.lb.ip(&["route", "add", BACKEND_NET, "via", NEXT_HOP])?;
    let _acceptor = Acceptor::start(backend)?;
    let started = Instant::now();
    let d = Daemon::start(&lan.lb, "bench-storm", &config(&plan))?;
    d.wait_until("every backend in its table", SETTLE, |d| {
        all_in_table(d, &plan)
    })?;
    let all_up = started.elapsed();
    eprintln!("storm: {} backends up in {all_up:.1?}", plan.backends());
    let quiet: Vec<f64> = (0..50)
        .map(|_| {
            std::thread::sleep(STATUS_EVERY);
            time_status(&d)
        })
        .collect::<Result<_>>()?;

    let pid = d.pid().context("the daemon is not running")?;
    let rebuilds_before = by_service(&lan.lb, REBUILDS)?;
    let transitions_before = by_service(&lan.lb, TRANSITIONS)?;
    let cpu_before = process_cpu_ns(pid);
    let storm_start = Instant::now();
    let flapping = Arc::new(AtomicBool::new(true));
    let flapper = {
        let flag = flapping.clone();
        let ns_name = backend.name.clone();
        std::thread::spawn(move || -> Result<()> {
            let route = |verb: &str| -> Result<()> {
                for p in FLAPPERS {
                    lb::netns::ip(&[
                        "-n", &ns_name, "route", verb, "prohibit", p, "table", "local",
                    ])?;
                }
                Ok(())
            };
            let mut down = false;
            while flag.load(Ordering::Relaxed) {
                route(if down { "del" } else { "add" })?;
                down = !down;
                std::thread::sleep(FLAP_PERIOD);
            }
            if down {
                route("del")?;
            }
            Ok(())
        })
    };
    let mut storm = Vec::new();
    while storm_start.elapsed() < plan.storm {
        std::thread::sleep(STATUS_EVERY);
        storm.push(time_status(&d)?);
    }
    let storm_len = storm_start.elapsed();
    let cpu_ns = process_cpu_ns(pid) - cpu_before;
    let rebuilds_after = by_service(&lan.lb, REBUILDS)?;
    let transitions_after = by_service(&lan.lb, TRANSITIONS)?;
    flapping.store(false, Ordering::Relaxed);
    flapper
        .join()
        .map_err(|_| anyhow::anyhow!("the flapping thread panicked"))??;
    // Nothing held back is lost: with the flappers reachable again, every
    // backend returns to its table.
    d.wait_until("every backend back in its table", SETTLE, |d| {
        all_in_table(d, &plan)
    })?;

    // Each service's count during the storm.
    let during = |after: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>| {
        after
            .iter()
            .map(|(s, v)| (v - before.get(s).copied().unwrap_or(0.0)) as u64)
            .collect::<Vec<u64>>()
    };
    let rebuilds = during(&rebuilds_after, &rebuilds_before);
    let transitions: u64 = during(&transitions_after, &transitions_before).iter().sum();
    ensure!(
        transitions > 0,
        "no backend changed state during the storm; log: {}",
        d.log()
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let of = |v: &[f64]| Summary::of(v).context("nothing measured");
    Ok(StormResults {
        plan,
        flappers: FLAPPER_COUNT,
        health: health()
            .replace('\n', ", ")
            .trim_end_matches(", ")
            .to_string(),
        all_up_s: all_up.as_secs_f64(),
        transitions,
        rebuilds: rebuilds.iter().sum(),
        most_rebuilds_one_service: rebuilds.iter().copied().max().unwrap_or(0),
        storm_s: storm_len.as_secs_f64(),
        daemon_cpu: cpu_ns as f64 / 1e9 / storm_len.as_secs_f64(),
        status_quiet_ms: of(&quiet)?,
        status_storm_p99_ms: p99(&storm),
        status_storm_ms: of(&storm)?,
    })
}
