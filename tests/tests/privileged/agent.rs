//! The agent check, with real agents on the backends and real
//! connections: a percent scales the backend's share of new flows, `drain`,
//! `maint` and `down` act as the CLI's commands and a failed probe do, an
//! operator's command wins over the agent, and a flapping agent rebuilds the
//! table at most once per agent interval.

use std::{
    collections::BTreeMap,
    io::{ErrorKind, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use lb::{demo::server::http_get, netns::Netns};
use lb_tests::{
    daemon::{Daemon, WEB_PORT, WEB_VIP, web_config},
    lan::Lan,
    require_root,
};
use serde_json::Value;

const AGENT_PORT: u16 = 10_000;
/// The agents' interval: also the least time between two rebuilds they cause.
const INTERVAL: Duration = Duration::from_secs(1);
const WAIT: Duration = Duration::from_secs(10);
/// Backend 1, whose agent the test drives.
const ONE: &str = "198.18.0.11";

/// An agent on a backend: answers each connection with the next of its
/// lines (round robin) and closes.
struct Agent {
    lines: Arc<Mutex<(Vec<String>, usize)>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Agent {
    fn start(ns: &Netns, line: &str) -> Result<Agent> {
        let lines = Arc::new(Mutex::new((vec![line.to_string()], 0)));
        let stop = Arc::new(AtomicBool::new(false));
        let (said, flag) = (lines.clone(), stop.clone());
        let (ready, bound) = std::sync::mpsc::channel();
        let thread = ns.spawn(move || {
            let listener = TcpListener::bind(("0.0.0.0", AGENT_PORT))?;
            listener.set_nonblocking(true)?;
            let _ = ready.send(());
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let line = {
                            let mut l = said.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                            let (lines, next) = &mut *l;
                            let line = lines[*next % lines.len()].clone();
                            *next += 1;
                            line
                        };
                        let _ = s.write_all(format!("{line}\n").as_bytes());
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        });
        bound
            .recv_timeout(WAIT)
            .with_context(|| format!("the agent in {} did not start", ns.name))?;
        Ok(Agent {
            lines,
            stop,
            thread: Some(thread),
        })
    }

    /// Answers `lines` from now on, in turn.
    fn say(&self, lines: &[&str]) {
        let mut l = self.lines.lock().unwrap();
        *l = (lines.iter().map(ToString::to_string).collect(), 0);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Backend `addr`'s row of `lb backend list`.
fn row(d: &Daemon, addr: &str) -> Result<Value> {
    let rows = d.cli(&["backend", "list"])?;
    rows.as_array()
        .and_then(|a| a.iter().find(|r| r["address"] == addr))
        .cloned()
        .with_context(|| format!("no row for {addr}: {rows}"))
}

/// Waits until backend 1 is in `admin` with table weight `weight`, set by
/// `set_by`.
fn wait_for(d: &Daemon, admin: &str, weight: f64, set_by: &str) {
    d.wait_until(
        &format!("backend 1 {admin} at {weight} by {set_by}"),
        WAIT,
        |d| {
            let r = row(d, ONE)?;
            Ok(r["admin"] == admin
                && r["table_weight"].as_f64() == Some(weight)
                && r["weight_set_by"] == set_by)
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}: {}", row(d, ONE).unwrap_or_default()));
}

/// Names of the backends `n` new connections reach.
fn tally(lan: &Lan, n: usize) -> BTreeMap<String, usize> {
    let vip = SocketAddr::new(IpAddr::V4(WEB_VIP), WEB_PORT);
    lan.client
        .run(|| {
            let mut t = BTreeMap::new();
            for _ in 0..n {
                *t.entry(http_get(vip)?).or_insert(0) += 1;
            }
            Ok(t)
        })
        .unwrap()
}

fn rebuilds(d: &Daemon) -> u64 {
    d.cli(&["service", "list"]).unwrap()[0]["rebuilds"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn agents_set_weights_and_states_and_rebuild_at_most_once_an_interval() {
    require_root();
    let lan = Lan::build(2, &["198.18.1.1/32"]).unwrap();
    let _servers = lan.serve_names(WEB_PORT).unwrap();
    let agents: Vec<Agent> = lan
        .backends
        .iter()
        .map(|h| Agent::start(&h.ns, "up 100%"))
        .collect::<Result<_>>()
        .unwrap();
    let config = web_config(2)
        + &format!(
            "\n[service.agent]\nport = {AGENT_PORT}\ninterval = \"{}s\"\ntimeout = \"500ms\"\n",
            INTERVAL.as_secs()
        );
    let d = Daemon::start(&lan.lb, "agent", &config).unwrap();
    wait_for(&d, "ready", 1.0, "config");

    // 50 %: half the weight, a third of the table and of new flows.
    agents[0].say(&["up 50%"]);
    wait_for(&d, "ready", 0.5, "agent");
    let r = row(&d, ONE).unwrap();
    let ring = 4099.0;
    let share = r["slots"].as_f64().unwrap() / ring;
    assert!((share - 1.0 / 3.0).abs() < 0.01, "table share {share}: {r}");
    assert_eq!(r["agent"]["applied"], "ready up 50%", "{r}");
    assert_eq!(r["agent"]["last_answer"], "up 50%", "{r}");
    let explain = d
        .cli(&["explain", "198.18.2.2:40000", "web"])
        .unwrap()
        .to_string();
    assert!(
        explain.contains(r#"{"backend":"198.18.0.11","set_by":"agent","weight":0.5}"#),
        "{explain}"
    );
    // New connections follow the table: 2,000 of them, each a third of
    // a chance, land within 3.5 points of a third (over 3 standard
    // deviations).
    let t = tally(&lan, 2000);
    let got = *t.get("backend-1").unwrap_or(&0) as f64 / 2000.0;
    assert!((got - 1.0 / 3.0).abs() < 0.035, "{t:?}");
    // A change within the step (5 points) is ignored.
    agents[0].say(&["up 53%"]);
    std::thread::sleep(3 * INTERVAL);
    assert_eq!(row(&d, ONE).unwrap()["table_weight"], 0.5);

    // drain, maint, down: as the CLI's commands and a failed probe.
    agents[0].say(&["drain"]);
    wait_for(&d, "drain", 0.0, "agent");
    let t = tally(&lan, 50);
    assert_eq!(t.get("backend-1"), None, "drained: no new flows {t:?}");
    agents[0].say(&["maint"]);
    wait_for(&d, "maintenance", 0.0, "agent");
    agents[0].say(&["ready down 100%"]);
    wait_for(&d, "ready", 0.0, "agent");
    assert_eq!(row(&d, ONE).unwrap()["slots"], 0);
    agents[0].say(&["up"]);
    wait_for(&d, "ready", 1.0, "config");

    // The operator wins over the agent, and hands back when done.
    agents[0].say(&["up 50%"]);
    wait_for(&d, "ready", 0.5, "agent");
    d.cli(&["backend", "drain", "web", ONE]).unwrap();
    wait_for(&d, "drain", 0.0, "operator");
    d.cli(&["backend", "enable", "web", ONE]).unwrap();
    wait_for(&d, "ready", 0.5, "agent");
    d.cli(&["backend", "set-weight", "web", ONE, "3"]).unwrap();
    wait_for(&d, "ready", 3.0, "operator");
    d.cli(&["backend", "set-weight", "web", ONE, "--reset"])
        .unwrap();
    wait_for(&d, "ready", 0.5, "agent");

    // Two agents flapping on every answer (two changes a second between
    // them) rebuild the table at most once a second.
    agents[0].say(&["up 100%", "up 50%"]);
    agents[1].say(&["up 50%", "up 100%"]);
    let (start, before) = (Instant::now(), rebuilds(&d));
    std::thread::sleep(6 * INTERVAL);
    let (seconds, rebuilt) = (start.elapsed().as_secs_f64(), rebuilds(&d) - before);
    assert!(
        rebuilt >= 2 && rebuilt as f64 <= seconds / INTERVAL.as_secs_f64() + 1.0,
        "{rebuilt} rebuilds in {seconds:.1} s"
    );

    // Every change applied is counted, by cause.
    let metrics = lan
        .lb
        .run(|| {
            let mut s = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, 9108))?;
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
            let mut text = String::new();
            std::io::Read::read_to_string(&mut s, &mut text)?;
            Ok(text)
        })
        .unwrap();
    let changes = metrics
        .lines()
        .find(|l| {
            l.starts_with("lb_weight_changes_total{")
                && l.contains(r#"backend="198.18.0.11""#)
                && l.contains(r#"cause="agent""#)
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no agent changes counted:\n{metrics}"));
    assert!(changes >= 8, "{changes}");
    assert!(
        metrics.contains("lb_backend_effective_weight{"),
        "{metrics}"
    );
    drop(d);
    drop(agents);
}
