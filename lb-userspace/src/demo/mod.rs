//! `lb demo`: the product end to end on an embedded default, run by the
//! real `lb daemon` and inspected with the real CLI. A client, the load
//! balancer and three backends in network namespaces; `lb doctor` checks the
//! hosts; real HTTP connections to a VIP spread by weight; a backend's server
//! dies, the health checker evicts it, it comes back and is re-admitted.
//! Everything it creates is removed on every exit path, Ctrl-C included;
//! `--keep` leaves it all running until Ctrl-C.
//!
//! - `topology`: the namespaces and addresses.
//! - `edge`: the fleet's topology: router, lb nodes with BIRD, etcd.
//! - `fleet`: `lb demo --fleet`, three nodes behind a BGP router.
//! - `server`: the backends' small HTTP/UDP servers that say who they are.
//! - `chart`: terminal bar charts of the spread.

pub mod chart;
pub mod edge;
mod fleet;
pub mod server;
pub mod topology;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    os::{
        fd::AsRawFd as _,
        unix::{fs::OpenOptionsExt as _, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{
    api::{self, BackendRow, Request},
    config::{Mode, XdpModeSetting},
    doctor,
    netns::PrivateBpffs,
};
pub use fleet::DIR as FLEET_DIR;
use server::NameServer;
use topology::{BACKENDS, Topology, VIP};

/// Where the demo keeps its configuration, socket, state, log and bpffs.
pub const DIR: &str = "/run/lb-demo";
const PORT: u16 = 80;
/// The backend whose server the demo kills.
const VICTIM: usize = 1;
/// Connections per round.
const CONNECTIONS: usize = 300;
/// Longest wait for the daemon to come up or the health checker to act.
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);
/// How often the demo asks the daemon while waiting.
const POLL: Duration = Duration::from_millis(20);
/// Health checks as the demo runs them: faster than the defaults (2 s) so
/// the demo is short, HAProxy's rise and fall.
const HEALTH: &str = r#"check = "http"
interval = "1s"
fast_interval = "250ms"
timeout = "500ms"
rise = 2
fall = 3
slow_start = "0s""#;

/// What `lb demo` was asked.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Leave everything running, print how to explore it, and clean up on Ctrl-C.
    pub keep: bool,
    /// The fleet demo instead: three nodes behind a BGP router, one etcd.
    pub fleet: bool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// The single demo's lock, held for its whole run: a second demo started
/// meanwhile would remove the first one's namespaces and files, whose
/// names are fixed. The kernel lets go of it however the demo exits; the
/// empty file stays in /run (root's alone, emptied at boot).
const LOCK: &str = "/run/lb-demo.lock";

/// Takes [`LOCK`], or says that another demo holds it.
fn lock_demo() -> Result<std::fs::File> {
    let file = std::fs::File::options()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(LOCK)
        .with_context(|| format!("opening {LOCK}"))?;
    // SAFETY: flock(2) on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            bail!("another lb demo is running (it holds {LOCK}): stop it with Ctrl-C first");
        }
        return Err(anyhow::Error::new(e).context(format!("locking {LOCK}")));
    }
    Ok(file)
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted: everything the demo made is being removed");
    }
    Ok(())
}

/// The demo's configuration: the embedded default.
fn config(dir: &Path) -> String {
    let mut text = format!(
        r#"# Written by `lb demo`.
[settings]
interfaces = ["eth0"]
xdp_mode = "generic"            # veth in namespaces
table_size = 65537
max_services = 4
max_backends = 16
conntrack_entries = 16384
socket = "{dir}/lb.sock"
state_file = "{dir}/state.json"

[[service]]
name = "web"
vip = "{VIP}"
port = {PORT}
protocol = "tcp"
mode = "dsr-l2"

[service.health]
{HEALTH}
"#,
        dir = dir.display()
    );
    for b in &BACKENDS {
        text += &format!(
            "\n[[service.backend]]\naddress = \"{}\"\nweight = {}\n",
            b.addr, b.weight
        );
    }
    text
}

/// Runs the demo; every namespace, mount and process it made is gone when
/// it returns.
pub fn run(opts: &Options) -> Result<()> {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        // A closed terminal tears down as Ctrl-C does.
        libc::signal(libc::SIGHUP, on_signal as *const () as libc::sighandler_t);
    }
    let lb = std::env::current_exe().context("finding the lb binary")?;
    if opts.fleet {
        return fleet::run(&lb);
    }
    let _lock = lock_demo()?;
    println!(
        "lb demo: {VIP}:{PORT}/tcp (dsr-l2) over {} backends, run by `lb daemon`\n",
        BACKENDS.len()
    );
    let mut demo = Demo::set_up(&lb)?;
    let result = demo
        .show()
        .and_then(|()| if opts.keep { demo.keep() } else { Ok(()) });
    drop(demo);
    result?;
    // The teardown reports its failures as it goes; done means none was left.
    let left = leftovers();
    if !left.is_empty() || Path::new(DIR).exists() {
        bail!(
            "the demo could not remove everything it made: namespaces {left:?}, {DIR} {}",
            if Path::new(DIR).exists() {
                "still there"
            } else {
                "removed"
            }
        );
    }
    println!("\ndone: every namespace, mount and process the demo made is removed");
    Ok(())
}

fn step(n: usize, what: &str) {
    println!("[{n}/7] {what}");
}

/// Everything the demo made. Dropping it stops the daemon (by PID), then
/// unpins and unmounts, then deletes the namespaces and the directory.
struct Demo {
    lb: PathBuf,
    dir: PathBuf,
    socket: PathBuf,
    rt: tokio::runtime::Runtime,
    daemon: Option<Child>,
    servers: Vec<Option<NameServer>>,
    bpffs: Option<PrivateBpffs>,
    topo: Option<Topology>,
}

impl Demo {
    fn set_up(lb: &Path) -> Result<Demo> {
        step(
            1,
            "building the topology: client, load balancer, 3 backends in namespaces",
        );
        // No other demo runs (the caller holds the lock): what one left is
        // a killed demo's.
        let removed = topology::remove_leftovers()?;
        if removed > 0 {
            println!("  removed {removed} namespaces an interrupted demo left behind");
        }
        let dir = PathBuf::from(DIR);
        if dir.exists() {
            let _ = crate::netns::run("umount", &[&dir.join("bpffs").to_string_lossy()]);
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("removing a stale {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut demo = Demo {
            lb: lb.to_path_buf(),
            socket: dir.join("lb.sock"),
            dir,
            rt,
            daemon: None,
            servers: Vec::new(),
            bpffs: None,
            topo: None,
        };
        let topo = demo.topo.insert(Topology::build()?);
        demo.servers = BACKENDS
            .iter()
            .zip(&topo.backends)
            .map(|(b, ns)| NameServer::start(ns, b.name, PORT).map(Some))
            .collect::<Result<_>>()?;
        println!(
            "  client {}, load balancer {}, backends 198.18.0.11-13 serving HTTP, VIP {VIP} on their lo",
            topology::CLIENT,
            topology::LB
        );
        demo.bpffs = Some(PrivateBpffs::mount(&demo.dir.join("bpffs"))?);
        Ok(demo)
    }

    fn topo(&self) -> Result<&Topology> {
        self.topo.as_ref().context("the topology is gone")
    }

    fn pin_dir(&self) -> PathBuf {
        self.dir.join("bpffs").join("lb")
    }

    fn show(&mut self) -> Result<()> {
        step(2, "lb doctor on the load balancer and the backends");
        self.doctor()?;
        check_interrupted()?;

        step(3, "starting lb daemon in the load balancer's namespace");
        self.start_daemon()?;
        check_interrupted()?;

        step(
            4,
            &format!("{CONNECTIONS} HTTP connections from the client to the VIP"),
        );
        self.round(&[])?;

        let victim = &BACKENDS[VICTIM];
        step(5, &format!("killing {}'s server", victim.name));
        self.servers[VICTIM] = None;
        let killed = Instant::now();
        self.wait_for_slots(IpAddr::V4(victim.addr), false)?;
        println!(
            "  the health checker evicted {} {} ms after its server died",
            victim.name,
            killed.elapsed().as_millis()
        );
        self.round(&[VICTIM])?;

        step(6, &format!("restarting {}'s server", victim.name));
        let ns = &self.topo()?.backends[VICTIM];
        self.servers[VICTIM] = Some(NameServer::start(ns, victim.name, PORT)?);
        let restarted = Instant::now();
        self.wait_for_slots(IpAddr::V4(victim.addr), true)?;
        println!(
            "  re-admitted {} ms after its server came back (rise 2)",
            restarted.elapsed().as_millis()
        );
        self.round(&[])?;

        step(7, "lb stats and lb health, as an operator sees them");
        for args in [&["stats"][..], &["health"][..]] {
            println!("$ lb {}", args.join(" "));
            print!("{}", self.cli(args)?);
        }
        Ok(())
    }

    fn doctor(&self) -> Result<()> {
        let topo = self.topo()?;
        let lb = doctor::Request {
            interfaces: vec!["eth0".into()],
            xdp_mode: XdpModeSetting::Generic,
            pin_dir: Some(self.pin_dir()),
            ..Default::default()
        };
        let mut findings = vec![("load balancer", topo.lb.run(|| Ok(doctor::check(&lb)))?)];
        for (b, ns) in BACKENDS.iter().zip(&topo.backends) {
            let req = doctor::Request {
                backend_vips: vec![IpAddr::V4(VIP)],
                backend_mode: Mode::DsrL2,
                ..Default::default()
            };
            findings.push((b.name, ns.run(|| Ok(doctor::check(&req)))?));
        }
        let mut failed = 0;
        for (host, f) in &findings {
            println!("  {host}:");
            for line in doctor::render(f).lines() {
                println!("    {line}");
            }
            failed += f.iter().filter(|f| f.level == doctor::Level::Fail).count();
        }
        if failed > 0 {
            bail!("lb doctor found {failed} problem(s) on the demo's hosts");
        }
        Ok(())
    }

    fn start_daemon(&mut self) -> Result<()> {
        let config = self.dir.join("lb.toml");
        std::fs::write(&config, self::config(&self.dir))?;
        let log = std::fs::File::create(self.dir.join("daemon.log"))?;
        let topo = self.topo()?;
        let child = topo.lb.spawn_process(
            as_demo_daemon(&mut Command::new(&self.lb))
                .args(["daemon", "--config"])
                .arg(&config)
                .arg("--pin-dir")
                .arg(self.pin_dir())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log),
        )?;
        let pid = child.id();
        self.daemon = Some(child);
        let start = Instant::now();
        self.wait("the daemon to put all 3 backends in the table", |d| {
            let v = d.call(&Request::Services)?;
            Ok(v[0]["in_table"] == BACKENDS.len())
        })?;
        println!(
            "  lb daemon (pid {pid}) attached to eth0 (generic XDP) and probing in {} ms",
            start.elapsed().as_millis()
        );
        println!(
            "  configuration {}; health: {}",
            config.display(),
            HEALTH.lines().collect::<Vec<_>>().join(", ")
        );
        Ok(())
    }

    fn call(&self, request: &Request) -> Result<Value> {
        self.rt.block_on(api::call(&self.socket, request))
    }

    /// Runs the CLI against the demo's daemon and returns what it printed.
    fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.lb)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .context("running lb")?;
        if !out.status.success() {
            bail!(
                "lb {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Polls `done` until it holds; fails after [`EVENT_TIMEOUT`] with the
    /// daemon's last log lines.
    fn wait(&mut self, what: &str, mut done: impl FnMut(&Demo) -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            check_interrupted()?;
            if let Some(c) = self.daemon.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!("lb daemon exited ({status}):\n{}", self.log_tail());
            }
            if done(self).unwrap_or(false) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "waited {EVENT_TIMEOUT:?} for {what}; the daemon's log ends:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until `backend` owns table slots (`in_table`) or none. The
    /// table, not the health the probes report, since its rebuild may
    /// follow a health change by up to [`HEALTH_REBUILD_GAP`]: what the next
    /// round sees is the table.
    ///
    /// [`HEALTH_REBUILD_GAP`]: crate::daemon::controller::HEALTH_REBUILD_GAP
    fn wait_for_slots(&mut self, backend: IpAddr, in_table: bool) -> Result<()> {
        let what = if in_table {
            "back in the table"
        } else {
            "out of the table"
        };
        self.wait(&format!("{backend} to be {what}"), |d| {
            let rows: Vec<BackendRow> =
                serde_json::from_value(d.call(&Request::Backends { service: None })?)?;
            Ok(rows
                .iter()
                .any(|r| r.address == backend && (r.slots > 0) == in_table))
        })
    }

    fn log_tail(&self) -> String {
        log_tail(&self.dir.join("daemon.log"))
    }

    /// Sends a round of connections and prints the spread; `out` are the
    /// backends expected to get none.
    fn round(&self, out: &[usize]) -> Result<()> {
        let to = SocketAddr::new(IpAddr::V4(VIP), PORT);
        let (tally, failed) = self.topo()?.client.run(|| {
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
            .map(|(i, b)| chart::Row {
                name: b.name,
                weight: if out.contains(&i) { 0 } else { b.weight },
                count: tally.get(b.name).copied().unwrap_or(0),
            })
            .collect();
        print!("{}", chart::render(&rows));
        println!("  {} answered, {failed} failed", CONNECTIONS - failed);
        if failed > 0 {
            bail!("{failed} of {CONNECTIONS} connections failed");
        }
        for &i in out {
            if tally.contains_key(BACKENDS[i].name) {
                bail!("{} answered while out of rotation", BACKENDS[i].name);
            }
        }
        Ok(())
    }

    /// Leaves everything running until Ctrl-C, saying how to explore it.
    fn keep(&mut self) -> Result<()> {
        let lb = self.lb.display();
        println!(
            "\nThe demo stays up until Ctrl-C here. In another terminal (as root):\n\
             \n  export LB_SOCKET={socket}\
             \n  {lb} stats --watch                      # per-second rates\
             \n  {lb} backend drain web 198.18.0.12      # new flows avoid it, established ones finish\
             \n  {lb} backend enable web 198.18.0.12\
             \n  {lb} backend set-weight web 198.18.0.11 4\
             \n  {lb} explain 198.18.0.1:40000 web       # which backend a flow goes to, and why\
             \n  ip netns exec {client} curl -s http://{VIP}/\
             \n  cat {log}\
             \n\nCtrl-C here stops the daemon and removes every namespace, mount and file.",
            socket = self.socket.display(),
            client = self.topo()?.client.name,
            log = self.dir.join("daemon.log").display(),
        );
        while !INTERRUPTED.load(Ordering::Relaxed) {
            if let Some(c) = self.daemon.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!("lb daemon exited ({status}):\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        println!("\nCtrl-C: tearing down");
        Ok(())
    }
}

/// Lines of a daemon's log shown when it fails.
const LOG_TAIL_LINES: usize = 15;

/// The last [`LOG_TAIL_LINES`] lines of the log at `path`.
fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// How long a daemon gets to exit on SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Makes `cmd` one of the demo's daemons (lb, BIRD, etcd): in its own
/// process group (Ctrl-C reaches the demo, which stops it in order), and
/// sent SIGTERM should the demo die first (killed, or its terminal gone),
/// so none outlives it. The thread that spawns it must live as long as the
/// daemon should (the demo's main one, a test's own).
fn as_demo_daemon(cmd: &mut Command) -> &mut Command {
    cmd.process_group(0);
    // SAFETY: prctl(2) is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    cmd
}

/// Stops a daemon the demo started with `signal`, then SIGKILL after
/// [`STOP_GRACE`]. One that has exited already (and been reaped by a
/// `try_wait`) gets no signal: its PID may be another process's by now.
fn stop_daemon(mut child: Child, signal: libc::c_int) {
    if matches!(child.try_wait(), Ok(None)) {
        // SAFETY: kill(2) on the PID of a child we started and have not
        // reaped (only this process reaps it, and it was running just now).
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        let deadline = Instant::now() + STOP_GRACE;
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        let _ = child.kill();
    }
    let _ = child.wait();
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(child) = self.daemon.take() {
            stop_daemon(child, libc::SIGTERM);
        }
        self.servers.clear();
        // Unpinning the link detaches the program; then the mount goes.
        drop(self.bpffs.take());
        drop(self.topo.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Hosts the demo made that are still there (for tests of its cleanup).
pub fn leftovers() -> Vec<String> {
    topology::leftovers()
}
