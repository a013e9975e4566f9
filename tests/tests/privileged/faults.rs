//! Faults under traffic, each with its figures printed (connections
//! attempted, completed, failed): hostile control-socket clients, a backend
//! that hangs, one that flaps, every backend down, the load balancer's
//! interface removed and re-created, and the bpffs pins removed under the
//! daemon. The daemon must keep serving and recover without a restart.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    os::unix::{net::UnixStream, process::CommandExt as _},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Result;
use lb::demo::server::{NameServer, http_get};
use lb_tests::{
    daemon::{Daemon, lb_binary, web_config},
    lan::Lan,
    require_root,
};
use serde_json::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const WAIT: Duration = Duration::from_secs(15);
/// Unprivileged uid for the socket-permission check (nobody).
const NOBODY: u32 = 65534;
/// Requests past the daemon's limit (`api::MAX_REQUEST`).
const OVERSIZED: usize = 2 << 20;
/// Simultaneous control clients in the flood.
const FLOOD: usize = 200;

fn vip() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(VIP), 80)
}

/// What the client saw: per answering backend, and failures.
#[derive(Debug, Default, Clone)]
struct Tally {
    answered: std::collections::BTreeMap<String, usize>,
    failed: usize,
}

impl Tally {
    fn completed(&self) -> usize {
        self.answered.values().sum()
    }
}

/// Connections from the client to the VIP, one after another, until stopped.
struct Traffic {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Traffic {
    fn start(lan: &Lan) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let (s, t) = (stop.clone(), tally.clone());
        let thread = lan.client.spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let r = http_get(vip());
                let mut t = t.lock().unwrap();
                match r {
                    Ok(name) => *t.answered.entry(name).or_insert(0) += 1,
                    Err(_) => t.failed += 1,
                }
            }
            Ok(())
        });
        Traffic {
            stop,
            tally,
            thread: Some(thread),
        }
    }

    fn now(&self) -> Tally {
        self.tally.lock().unwrap().clone()
    }

    /// The tally once the connection in flight at the call has ended:
    /// connections run one after another, so every later one started after
    /// the call.
    fn settled(&self) -> Tally {
        let attempts = |t: &Tally| t.completed() + t.failed;
        let start = attempts(&self.now());
        let deadline = Instant::now() + WAIT;
        loop {
            let t = self.now();
            if attempts(&t) > start {
                return t;
            }
            assert!(Instant::now() < deadline, "traffic stalled: {t:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `n` more connections completed.
    fn wait_for(&self, n: usize) {
        let start = self.now().completed();
        let deadline = Instant::now() + WAIT;
        while self.now().completed() < start + n {
            assert!(
                Instant::now() < deadline,
                "traffic stalled: {:?}",
                self.now()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(mut self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap().unwrap();
        }
        self.now()
    }
}

fn figures(fault: &str, before: &Tally, after: &Tally, extra: &str) {
    let completed = after.completed() - before.completed();
    let failed = after.failed - before.failed;
    println!(
        "fault: {fault}: {} connections attempted, {completed} completed, {failed} failed{extra}",
        completed + failed
    );
}

fn health(d: &Daemon, addr: &str) -> Value {
    d.cli(&["health"])
        .unwrap()
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["address"] == addr).cloned())
        .unwrap_or(Value::Null)
}

/// Accepts connections and never answers: a hung backend.
fn hang(lan: &Lan, backend: usize, stop: Arc<AtomicBool>) -> JoinHandle<Result<()>> {
    lan.backends[backend].ns.spawn(move || {
        let l = TcpListener::bind(("0.0.0.0", 80))?;
        l.set_nonblocking(true)?;
        let mut held = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            if let Ok((s, _)) = l.accept() {
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    })
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn the_daemon_keeps_serving_through_faults() {
    require_root();
    let lan = Lan::build(3, &["198.18.1.1/32"]).unwrap();
    let mut servers: Vec<Option<NameServer>> =
        lan.serve_names(80).unwrap().into_iter().map(Some).collect();
    let mut d = Daemon::start(&lan.lb, "faults", &web_config(3)).unwrap();
    d.wait_until("all three in the table", WAIT, |d| {
        Ok(d.cli(&["service", "list"])?[0]["in_table"] == 3)
    })
    .unwrap();
    let traffic = Traffic::start(&lan);
    traffic.wait_for(50);

    control_socket_abuse(&d, &traffic);

    // A backend that hangs (accepts, never answers) is evicted; the others
    // lose nothing.
    let before = traffic.now();
    servers[0] = None;
    let stop_hang = Arc::new(AtomicBool::new(false));
    let hung = hang(&lan, 0, stop_hang.clone());
    let evicted = d
        .wait_until("the hung backend evicted", WAIT, |d| {
            Ok(health(d, "198.18.0.11")["health"] == "down")
        })
        .unwrap();
    // A connection the hung backend held at eviction fails on its own
    // timeout: it was to the hung backend. Count from the next one.
    traffic.wait_for(1);
    let at_eviction = traffic.now();
    traffic.wait_for(100);
    let after = traffic.now();
    figures(
        "backend hangs",
        &before,
        &after,
        &format!(
            " ({} while it hung before eviction at {} ms, {} after)",
            at_eviction.failed - before.failed,
            evicted.as_millis(),
            after.failed - at_eviction.failed
        ),
    );
    assert_eq!(after.failed, at_eviction.failed, "failures after eviction");
    stop_hang.store(true, Ordering::Relaxed);
    hung.join().unwrap().unwrap();
    servers[0] = Some(NameServer::start(&lan.backends[0].ns, "backend-1", 80).unwrap());
    d.wait_until("backend-1 back", WAIT, |d| {
        Ok(health(d, "198.18.0.11")["health"] == "up")
    })
    .unwrap();

    // A flapping backend: its server toggles every 300 ms for 6 s. Damping
    // keeps it out more and more; traffic to the others is not disturbed.
    let before = traffic.now();
    let transitions_before = health(&d, "198.18.0.12")["transitions"].as_u64().unwrap();
    let flap_start = Instant::now();
    let mut toggles = 0;
    while flap_start.elapsed() < Duration::from_secs(6) {
        servers[1] = match servers[1].take() {
            Some(_) => None,
            None => Some(NameServer::start(&lan.backends[1].ns, "backend-2", 80).unwrap()),
        };
        toggles += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    if servers[1].is_none() {
        servers[1] = Some(NameServer::start(&lan.backends[1].ns, "backend-2", 80).unwrap());
    }
    let transitions =
        health(&d, "198.18.0.12")["transitions"].as_u64().unwrap() - transitions_before;
    let after = traffic.now();
    figures(
        "backend flaps",
        &before,
        &after,
        &format!(" ({toggles} server toggles, {transitions} health transitions)"),
    );
    assert!(
        transitions < toggles / 2,
        "flapping was not damped: {transitions} transitions for {toggles} toggles"
    );
    d.wait_until("backend-2 stable again", WAIT, |d| {
        Ok(health(d, "198.18.0.12")["health"] == "up")
    })
    .unwrap();

    // Every backend down: the service panics (keeps them all, documented)
    // and the clients' connections are refused by the backends: failures,
    // not a silent black hole. They come back and traffic recovers.
    let before = traffic.now();
    let saved: Vec<_> = servers.iter_mut().map(Option::take).collect();
    drop(saved);
    d.wait_until("panic", WAIT, |d| {
        Ok(d.cli(&["service", "list"])?[0]["panic"] == true)
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let during = traffic.now();
    servers = lan.serve_names(80).unwrap().into_iter().map(Some).collect();
    d.wait_until("panic over", WAIT, |d| {
        Ok(d.cli(&["service", "list"])?[0]["panic"] == false)
    })
    .unwrap();
    traffic.wait_for(50);
    figures(
        "all backends down",
        &before,
        &traffic.now(),
        &format!(
            " ({} refused while all were down; panic kept all 3 in the table)",
            during.failed - before.failed
        ),
    );
    assert!(during.failed > before.failed, "refusals are visible");

    // The bpffs pins removed under the daemon: forwarding never stops, the
    // daemon pins everything again, and a restart still adopts the state.
    let before = traffic.now();
    for e in std::fs::read_dir(&d.pins).unwrap() {
        let p = e.unwrap().path();
        std::fs::remove_file(&p).unwrap();
    }
    d.wait_until("pins restored", WAIT, |d| {
        Ok(d.log().contains("map pins were removed under the daemon")
            && d.pins.join("link-eth0").exists()
            && d.pins.join("LB_CONNTRACK").exists())
    })
    .unwrap();
    traffic.wait_for(50);
    let after = traffic.now();
    figures("bpffs pins removed", &before, &after, "");
    assert_eq!(after.failed, before.failed, "connections lost");
    d.kill(libc::SIGKILL).unwrap();
    d.spawn().unwrap();
    assert!(d.log().contains("adopted live service"), "{}", d.log());

    // The interface removed and re-created: the daemon attaches again by
    // itself. Connections fail only while there is no interface.
    let before = traffic.now();
    lan.unplug_lb().unwrap();
    d.wait_until("interface gone noticed", WAIT, |d| {
        Ok(d.log().contains("interface gone"))
    })
    .unwrap();
    let gone = Instant::now();
    lan.replug_lb().unwrap();
    let back = d
        .wait_until("attached again", WAIT, |d| {
            Ok(d.log().contains("interface re-created: attached again"))
        })
        .unwrap();
    // A connection begun during the outage may still fail after it.
    let at_reattach = traffic.settled();
    traffic.wait_for(100);
    let after = traffic.now();
    figures(
        "interface removed and re-created",
        &before,
        &after,
        &format!(
            " (attached again {} ms after the interface returned; outage {} ms)",
            back.as_millis(),
            gone.elapsed().as_millis()
        ),
    );
    assert_eq!(after.failed, at_reattach.failed, "failures after re-attach");

    let total = traffic.stop();
    drop(servers);
    println!(
        "faults: {} connections completed, {} failed in all",
        total.completed(),
        total.failed
    );
}

/// Only root may use the socket; oversized, truncated and garbage requests
/// and a flood of clients leave the daemon serving, and traffic untouched.
fn control_socket_abuse(d: &Daemon, traffic: &Traffic) {
    let before = traffic.now();
    // A copy nobody may run wherever the checkout lives.
    let lb = d.dir.join("lb-for-nobody");
    std::fs::copy(lb_binary().unwrap(), &lb).unwrap();
    let out = Command::new(&lb)
        .arg("--socket")
        .arg(&d.socket)
        .arg("status")
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("are you root?"), "{err}");

    let answer = |bytes: &[u8]| -> String {
        let mut s = UnixStream::connect(&d.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut a = String::new();
        let _ = s.read_to_string(&mut a);
        a
    };
    assert!(answer(&vec![b'x'; OVERSIZED]).contains("larger than"));
    assert!(answer(b"{\"command\": \"sta").contains("malformed request"));
    assert!(answer(&[0xff, 0xfe, 0, 1, 2, b'\n']).contains("error"));
    assert!(answer(b"{\"command\":\"set-weight\",\"service\":\"web\"}\n").contains("error"));

    // A flood: half the clients connect and say nothing, half ask at once.
    let start = Instant::now();
    let idle: Vec<UnixStream> = (0..FLOOD / 2)
        .map(|_| UnixStream::connect(&d.socket).unwrap())
        .collect();
    let askers: Vec<_> = (0..FLOOD / 2)
        .map(|_| {
            let socket = d.socket.clone();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(socket).unwrap();
                s.write_all(b"{\"command\":\"status\"}\n").unwrap();
                let mut a = String::new();
                s.read_to_string(&mut a).unwrap();
                a.contains("uptime_seconds")
            })
        })
        .collect();
    let answered = askers
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|ok| *ok)
        .count();
    drop(idle);
    assert_eq!(answered, FLOOD / 2);
    assert!(d.cli(&["status"]).is_ok(), "the daemon still serves");
    figures(
        "control socket abuse",
        &before,
        &traffic.now(),
        &format!(
            " (non-root refused; oversized, truncated, garbage refused; {FLOOD} clients, {answered} answered in {} ms)",
            start.elapsed().as_millis()
        ),
    );
    assert_eq!(traffic.now().failed, before.failed);
}
