//! The daemon's memory: a real `lb daemon` with 1, 64 and 512 services, in
//! a network namespace of its own with a private bpffs, measured once it
//! answers: its resident set (/proc/PID/status) and the memory the kernel
//! charges for its maps (`memlock` in /proc/PID/fdinfo). The reference is
//! the Maglev tables themselves (`services x 2 copies x slots x 4 bytes`),
//! the least any design with per-service tables of this size must hold.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb::dataplane::Capacity;
use lb::netns::{Netns, PrivateBpffs};
use lb_common::limits::DEFAULT_RING_SIZE;
use serde::{Deserialize, Serialize};

/// Service counts measured.
const SERVICE_COUNTS: [u32; 3] = [1, 64, 512];
/// Backends per service (health check `none`: always up).
const BACKENDS_PER_SERVICE: u32 = 8;
/// How long a daemon may take to load and write every table.
const START_TIMEOUT: Duration = Duration::from_secs(300);
/// The rings map's name as the kernel reports it.
const RINGS_NAME: &str = lb_common::maps::RINGS;
/// Poll interval while waiting for the daemon to answer.
const POLL: Duration = Duration::from_millis(100);

/// One daemon's memory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Footprint {
    /// Services configured (and `max_services`).
    pub services: u32,
    /// Backends in all.
    pub backends: u32,
    /// Resident set once it answered, KiB (VmRSS).
    pub rss_kib: u64,
    /// Peak resident set, KiB (VmHWM).
    pub rss_peak_kib: u64,
    /// Memory charged for its maps, KiB (sum of `memlock`).
    pub maps_kib: u64,
    /// `memlock` by map name, KiB.
    pub maps_by_name_kib: BTreeMap<String, u64>,
    /// Of `maps_kib`, the rings map (every service's Maglev tables), KiB.
    pub rings_kib: u64,
    /// The rings map's slots at 4 bytes each, KiB: its capacity, tables
    /// and room for tables of new sizes.
    pub slots_kib: u64,
    /// `rings_kib / slots_kib`: what the kernel charges for a slot over its
    /// 4 bytes.
    pub rings_over_slots: f64,
    /// The live Maglev tables' own size, KiB (one per service, 65,537 slots
    /// for 8 backends).
    pub tables_kib: u64,
    /// `rings_kib / tables_kib`.
    pub rings_over_tables: f64,
    /// From spawn until it answered `lb status`, ms.
    pub start_ms: f64,
    /// The daemon's own account of its start (`lb status`'s `startup`):
    /// each phase, ms.
    pub startup_ms: BTreeMap<String, f64>,
}

/// The memory part's results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemoryResults {
    /// One per service count.
    pub daemons: Vec<Footprint>,
}

/// Runs a daemon per service count and measures it.
pub(crate) fn run(lb: &Path) -> Result<MemoryResults> {
    let daemons = SERVICE_COUNTS
        .iter()
        .map(|&n| {
            eprintln!("memory: daemon with {n} services");
            measure(lb, n).with_context(|| format!("daemon with {n} services"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(MemoryResults { daemons })
}

/// The configuration: `services` TCP services on distinct VIPs, each with
/// `BACKENDS_PER_SERVICE` backends, sized to exactly what it holds.
fn config(services: u32, dir: &Path) -> String {
    let mut c = String::new();
    let _ = write!(
        c,
        "[settings]\ninterfaces = [\"eth0\"]\nxdp_mode = \"generic\"\n\
         max_services = {services}\nmax_backends = {}\n\
         socket = \"{}\"\nstate_file = \"{}\"\n",
        (services * BACKENDS_PER_SERVICE).max(1),
        dir.join("lb.sock").display(),
        dir.join("state.json").display(),
    );
    for s in 0..services {
        // VIPs 198.18.128.0 on, backends 198.18.0.1 on (benchmarking range).
        let _ = write!(
            c,
            "\n[[service]]\nname = \"s{s}\"\nvip = \"198.18.{}.{}\"\nport = 80\nprotocol = \"tcp\"\n\
             [service.health]\ncheck = \"none\"\n",
            128 + s / 250,
            s % 250 + 1
        );
        for b in 0..BACKENDS_PER_SERVICE {
            let i = s * BACKENDS_PER_SERVICE + b;
            let _ = write!(
                c,
                "[[service.backend]]\naddress = \"198.18.{}.{}\"\n",
                i / 250,
                i % 250 + 1
            );
        }
    }
    c
}

/// A daemon we started: killed and reaped on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the PID of a child we started and have not reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// Removes the working directory on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn measure(lb: &Path, services: u32) -> Result<Footprint> {
    let dir =
        TempDir(std::env::temp_dir().join(format!("lb-bench-{}-{services}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;
    let ns = Netns::new("mem")?;
    // The daemon attaches to eth0: one end of a veth pair, the other end
    // idle. Nothing is sent.
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ns.ip(&["link", "set", "eth1", "up"])?;
    ns.ip(&["addr", "add", "198.18.0.254/16", "dev", "eth0"])?;
    let bpffs = PrivateBpffs::mount(&dir.0.join("bpffs"))?;
    let config_path = dir.0.join("lb.toml");
    std::fs::write(&config_path, config(services, &dir.0))?;
    let log = std::fs::File::create(dir.0.join("daemon.log"))?;
    let start = Instant::now();
    let mut cmd = Command::new(lb);
    cmd.args(["daemon", "--config"])
        .arg(&config_path)
        .arg("--pin-dir")
        .arg(bpffs.path().join("lb"))
        .stdout(Stdio::null())
        .stderr(log);
    let mut daemon = Running(ns.spawn_process(&mut cmd)?);
    let socket = dir.0.join("lb.sock");
    loop {
        if let Some(status) = daemon.0.try_wait()? {
            let log = std::fs::read_to_string(dir.0.join("daemon.log")).unwrap_or_default();
            bail!("the daemon exited ({status}): {log}");
        }
        let answered = Command::new(lb)
            .arg("--socket")
            .arg(&socket)
            .arg("status")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if answered {
            break;
        }
        if start.elapsed() > START_TIMEOUT {
            bail!("the daemon did not answer within {START_TIMEOUT:?}");
        }
        std::thread::sleep(POLL);
    }
    let start_ms = start.elapsed().as_secs_f64() * 1e3;
    let answer = Command::new(lb)
        .arg("--socket")
        .arg(&socket)
        .args(["--json", "status"])
        .output()?;
    let answer: serde_json::Value =
        serde_json::from_slice(&answer.stdout).context("reading `lb --json status`")?;
    let startup_ms = serde_json::from_value(answer["startup"].clone())
        .context("reading the daemon's startup phases")?;
    let pid = daemon.0.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let maps = map_memory(pid)?;
    let maps_kib = maps.values().sum::<u64>();
    let rings_kib = maps.get(RINGS_NAME).copied().unwrap_or(0);
    let tables_kib = u64::from(services) * u64::from(DEFAULT_RING_SIZE) * 4 / 1024;
    let slots = Capacity::ring_slots_for(services, services * BACKENDS_PER_SERVICE, None)?;
    let slots_kib = u64::from(slots) * 4 / 1024;
    drop(daemon);
    Ok(Footprint {
        services,
        backends: services * BACKENDS_PER_SERVICE,
        rss_kib: field("VmRSS:"),
        rss_peak_kib: field("VmHWM:"),
        maps_kib,
        maps_by_name_kib: maps,
        rings_kib,
        slots_kib,
        rings_over_slots: rings_kib as f64 / slots_kib as f64,
        tables_kib,
        rings_over_tables: rings_kib as f64 / tables_kib as f64,
        start_ms,
        startup_ms,
    })
}

/// `memlock` of every map the process holds, by name, KiB (each map once).
fn map_memory(pid: u32) -> Result<BTreeMap<String, u64>> {
    let mut seen = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        let get = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_owned())
        };
        let (Some(id), Some(memlock)) = (get("map_id:"), get("memlock:")) else {
            continue;
        };
        let id: u32 = id.parse().unwrap_or(0);
        let memlock: u64 = memlock.parse().unwrap_or(0);
        seen.insert(id, memlock);
    }
    let mut by_name = BTreeMap::new();
    for (id, memlock) in seen {
        *by_name.entry(map_name(id)).or_insert(0) += memlock / 1024;
    }
    Ok(by_name)
}

/// A map's name from its id (bpftool would do; a syscall is lighter).
fn map_name(id: u32) -> String {
    aya::maps::MapInfo::from_id(id)
        .ok()
        .and_then(|info| info.name_as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("map {id}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_every_service_and_backend() {
        let c = config(3, Path::new("/tmp/x"));
        assert_eq!(c.matches("[[service]]").count(), 3);
        assert_eq!(c.matches("[[service.backend]]").count(), 24);
        assert!(c.contains("max_services = 3"));
    }
}
