//! Live forwarding: packets per second an attached program forwards, driven
//! by trafgen (Debian's netsniff-ng) through a veth pair between two
//! namespaces. lb's `lb_xdp` runs against the parse-and-swap floor, in
//! native and generic XDP, interleaved.
//!
//! trafgen in the generator's namespace sends TCP ACKs of [`FLOWS`] flows to
//! the IPv4 dsr-l2 service's VIP out of `gen0`. The program under test on
//! the load balancer's `fwd0` rewrites them and sends them back (XDP_TX).
//! `bench_sink` on `gen0` counts and drops them. The figure is the sink's
//! count over a window while trafgen runs flat out.
//!
//! trafgen runs one process on the first CPU, and veth runs the receive
//! side (the program under test and the sink) on the CPU that sent. So one
//! core carries the whole path: trafgen, both veth hops, the program and the
//! sink. The program's own share comes from the kernel's BPF run-time stats
//! over the same window.
//!
//! xdp-trafficgen (xdp-tools) was the other candidate. Debian's 1.3.1 does
//! not load on this kernel: its stats programs attach to the
//! `xdp_redirect_map_err` tracepoint, which newer kernels removed.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use aya::{
    programs::XdpMode,
    sys::{Stats, enable_stats},
};
use lb::{
    dataplane::Capacity,
    netns::{self, Netns},
};
use lb_common::{
    Counter,
    limits::{DEFAULT_CONNTRACK_ENTRIES, DEFAULT_RING_SIZE},
};
use serde::{Deserialize, Serialize};

use crate::{
    dataplane::{
        self, configure,
        frames::{self, Family, Mode, SERVICE_PORT},
        harness::{Harness, Program},
    },
    procs::{ExitedEarly, Group},
    stats::Summary,
};

/// Distinct flows trafgen cycles through (source ports from
/// [`frames::PORT_BASE`]): all established after their first packet.
pub(crate) const FLOWS: u16 = 1000;
/// Backends of the measured service.
const BACKENDS: u32 = 100;
/// The generator's interface, and its MAC.
const GEN_IF: &str = "gen0";
const GEN_MAC: &str = "02:00:00:00:01:01";
/// The load balancer's interface, and its MAC.
const FWD_IF: &str = "fwd0";
const FWD_MAC: &str = "02:00:00:00:01:02";
/// The source address of the generated flows.
const CLIENT: &str = "198.19.0.1";
/// Time trafgen runs before the window opens (ramp-up, first packets of
/// every flow).
const WARMUP: Duration = Duration::from_millis(500);
/// Time for queues to drain after trafgen stops, before the final counters.
const DRAIN: Duration = Duration::from_millis(100);
/// The generator.
const TRAFGEN: &str = "trafgen";
/// trafgen's TX ring: 64 frames of 2 KiB.
const TX_RING: &str = "128KiB";

/// How much to measure.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Plan {
    /// Runs of each (program, mode), interleaved.
    pub rounds: usize,
    /// The measured window of each run, seconds.
    pub window_s: f64,
}

impl Plan {
    /// The full plan, or the quick one.
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                rounds: 2,
                window_s: 1.0,
            }
        } else {
            Plan {
                rounds: 5,
                window_s: 3.0,
            }
        }
    }
}

/// What one (program, mode) forwarded over its runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LiveResult {
    /// `lb` or `swap floor`.
    pub program: String,
    /// `native` or `generic`.
    pub mode: String,
    /// Frames back at the generator per second.
    pub forwarded_pps: Summary,
    /// Frames trafgen sent per second.
    pub offered_pps: Summary,
    /// ns per packet inside the program (the kernel's BPF run-time stats).
    pub program_ns: Summary,
}

/// The live part's results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LiveResults {
    /// How it was measured.
    pub plan: Plan,
    /// trafgen's version line.
    pub generator: String,
    /// Flows cycled through.
    pub flows: u16,
    /// Bytes per frame sent.
    pub frame_len: usize,
    /// One per (program, mode).
    pub results: Vec<LiveResult>,
}

/// The floor's label in the results.
pub(crate) const FLOOR_LABEL: &str = "swap floor";
/// The programs and modes measured, in report order.
const PROGRAMS: [(Program, &str); 2] = [(Program::Swap, FLOOR_LABEL), (Program::Lb, "lb")];
const MODES: [(XdpMode, &str); 2] = [(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")];

/// One run's figures.
struct RunSample {
    forwarded_pps: f64,
    offered_pps: f64,
    program_ns: f64,
}

/// Runs the live benchmark.
pub(crate) fn run(plan: Plan) -> Result<LiveResults> {
    let generator = trafgen_version()?;
    let mut h = Harness::load(
        Capacity {
            max_services: dataplane::MEASURED.len() as u32,
            max_backends: BACKENDS * dataplane::MEASURED.len() as u32,
            conntrack_entries: DEFAULT_CONNTRACK_ENTRIES,
            ring_slots: Capacity::ring_slots_for(
                dataplane::MEASURED.len() as u32,
                BACKENDS * dataplane::MEASURED.len() as u32,
                Some(DEFAULT_RING_SIZE),
            )?,
        },
        None,
    )?;
    configure(&mut h, BACKENDS, 0)?;
    let dir = std::env::temp_dir().join(format!("lb-bench-live-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = (|| {
        let config = dir.join("flows.cfg");
        write_config(&config)?;
        let gen_ns = Netns::new("gen")?;
        let fwd_ns = Netns::new("fwd")?;
        netns::ip(&[
            "link",
            "add",
            GEN_IF,
            "netns",
            &gen_ns.name,
            "address",
            GEN_MAC,
            "type",
            "veth",
            "peer",
            "name",
            FWD_IF,
            "netns",
            &fwd_ns.name,
            "address",
            FWD_MAC,
        ])?;
        gen_ns.ip(&["link", "set", GEN_IF, "up"])?;
        fwd_ns.ip(&["link", "set", FWD_IF, "up"])?;
        // Held while measuring: the kernel keeps run-time stats only then.
        let _stats = enable_stats(Stats::RunTime).context("enabling BPF run-time stats")?;
        let samples = std::thread::scope(|s| {
            s.spawn(|| measure(&mut h, &gen_ns, &fwd_ns, &config, plan))
                .join()
                .map_err(|_| anyhow::anyhow!("the live benchmark's thread panicked"))?
        })?;
        let results = PROGRAMS
            .iter()
            .flat_map(|&(_, program)| MODES.iter().map(move |&(_, mode)| (program, mode)))
            .zip(samples)
            .map(|((program, mode), runs)| summarise(program, mode, &runs))
            .collect::<Result<_>>()?;
        Ok(LiveResults {
            plan,
            generator,
            flows: FLOWS,
            frame_len: LIVE_FRAME_LEN,
            results,
        })
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn summarise(program: &'static str, mode: &'static str, runs: &[RunSample]) -> Result<LiveResult> {
    let of = |f: fn(&RunSample) -> f64| {
        Summary::of(&runs.iter().map(f).collect::<Vec<_>>())
            .with_context(|| format!("{program} ({mode}): no runs"))
    };
    Ok(LiveResult {
        program: program.to_owned(),
        mode: mode.to_owned(),
        forwarded_pps: of(|r| r.forwarded_pps)?,
        offered_pps: of(|r| r.offered_pps)?,
        program_ns: of(|r| r.program_ns)?,
    })
}

/// The runs, on a thread of its own: attaching needs the interface's
/// namespace, which the thread enters (the sink's, then the load
/// balancer's for good). Returns the samples per (program, mode), in
/// [`PROGRAMS`] × [`MODES`] order.
fn measure(
    h: &mut Harness,
    gen_ns: &Netns,
    fwd_ns: &Netns,
    config: &Path,
    plan: Plan,
) -> Result<Vec<Vec<RunSample>>> {
    gen_ns.enter()?;
    h.sink()?
        .attach(GEN_IF, XdpMode::Driver)
        .context("attaching the sink to the generator's veth")?;
    fwd_ns.enter()?;
    let fwd = lb::dataplane::read_interface(FWD_IF)?;
    h.lab.dp.set_interface(&fwd)?;
    let mut samples: Vec<Vec<RunSample>> = (0..PROGRAMS.len() * MODES.len())
        .map(|_| Vec::new())
        .collect();
    for round in 0..plan.rounds {
        for (p, &(program, label)) in PROGRAMS.iter().enumerate() {
            for (m, &(mode, mode_label)) in MODES.iter().enumerate() {
                eprintln!(
                    "live: round {}/{}: {label}, {mode_label}",
                    round + 1,
                    plan.rounds
                );
                let link = h
                    .xdp(program)?
                    .attach(FWD_IF, mode)
                    .with_context(|| format!("attaching {label} ({mode_label})"))?;
                let sample = retried(|| one_run(h, program, &gen_ns.name, config, plan));
                h.xdp(program)?.detach(link)?;
                samples[p * MODES.len() + m].push(
                    sample.with_context(|| format!("{label} ({mode_label}), round {round}"))?,
                );
            }
        }
    }
    Ok(samples)
}

/// Attempts at a run whose generator dies: flat out, trafgen can still die
/// of EAGAIN on its TX ring (see [`start_trafgen`]) now and then.
const RUN_ATTEMPTS: u32 = 3;

/// `run` again, up to [`RUN_ATTEMPTS`] times, while trafgen is what failed:
/// a failed attempt yields no sample, so the retry biases none.
fn retried(mut run: impl FnMut() -> Result<RunSample>) -> Result<RunSample> {
    let mut attempt = 1;
    loop {
        match run() {
            Err(e)
                if attempt < RUN_ATTEMPTS
                    && e.downcast_ref::<ExitedEarly>()
                        .is_some_and(|x| x.name == TRAFGEN) =>
            {
                eprintln!("live: {e:#}; again (attempt {attempt} of {RUN_ATTEMPTS} failed)");
                attempt += 1;
            }
            done => return done,
        }
    }
}

/// Counters at one moment.
struct Reading {
    at: Instant,
    sink: u64,
    sent: u64,
    run_time_ns: u64,
    run_count: u64,
}

fn read(h: &mut Harness, program: Program, gen_ns: &str) -> Result<Reading> {
    let info = h.xdp(program)?.info()?;
    Ok(Reading {
        at: Instant::now(),
        sink: h.sink_count()?,
        sent: tx_packets(gen_ns)?,
        run_time_ns: info.run_time().as_nanos() as u64,
        run_count: info.run_count(),
    })
}

/// One run: trafgen flat out, a measured window, and for lb a check that
/// every packet it saw took the forwarding path.
fn one_run(
    h: &mut Harness,
    program: Program,
    gen_ns: &str,
    config: &Path,
    plan: Plan,
) -> Result<RunSample> {
    let counters_before = h.lab.dp.counters()?;
    // trafgen forks its worker: SIGINT to the group stops both.
    let mut trafgen = start_trafgen(gen_ns, config)?;
    std::thread::sleep(WARMUP);
    let a = read(h, program, gen_ns)?;
    std::thread::sleep(Duration::from_secs_f64(plan.window_s));
    let b = read(h, program, gen_ns)?;
    trafgen.stop(libc::SIGINT)?;
    std::thread::sleep(DRAIN);
    let counters_after = h.lab.dp.counters()?;
    let delta = |c: Counter| -> u64 {
        let get = |v: &[(Counter, u64)]| v.iter().find(|(k, _)| *k == c).map_or(0, |x| x.1);
        get(&counters_after) - get(&counters_before)
    };
    // The host's own traffic (IPv6 neighbour discovery when the interface
    // comes up) passes; every generated packet must have been forwarded.
    let moved = |pass: bool| -> u64 {
        Counter::ALL
            .iter()
            .filter(|c| c.name().starts_with("pass_") == pass && **c != Counter::ForwardDsr)
            .map(|&c| delta(c))
            .sum()
    };
    let forwarded = delta(Counter::ForwardDsr);
    if program == Program::Lb {
        ensure!(
            forwarded > 0 && moved(false) == 0,
            "lb forwarded {forwarded} packets and dropped or forwarded otherwise {}",
            moved(false)
        );
    } else {
        ensure!(
            forwarded + moved(true) + moved(false) == 0,
            "lb's counters moved in a run of the floor"
        );
    }
    let seconds = (b.at - a.at).as_secs_f64();
    let received = b.sink - a.sink;
    let runs = b.run_count - a.run_count;
    ensure!(
        received > 0 && runs > 0,
        "nothing came back to the generator"
    );
    Ok(RunSample {
        forwarded_pps: received as f64 / seconds,
        offered_pps: (b.sent - a.sent) as f64 / seconds,
        program_ns: (b.run_time_ns - a.run_time_ns) as f64 / runs as f64,
    })
}

/// Writes trafgen's packet configuration: TCP ACKs from [`CLIENT`] to the
/// IPv4 dsr-l2 VIP, source ports cycling over [`FLOWS`], [`LIVE_FRAME_LEN`]
/// bytes.
fn write_config(path: &Path) -> Result<()> {
    let vip = frames::vip(Family::Ipv4, Mode::DsrL2);
    let (first, last) = (frames::PORT_BASE, frames::PORT_BASE + FLOWS - 1);
    let text = format!(
        "{{\n  eth(da={FWD_MAC}, sa={GEN_MAC}, type=0x0800),\n  \
         ipv4(saddr={CLIENT}, daddr={vip}, ttl=64, df),\n  \
         tcp(sport=dinc({first}, {last}), dport={SERVICE_PORT}, ack, seq=1, ackseq=1, \
         window=512),\n  fill(0x00, {PAD})\n}}\n"
    );
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Ethernet (14) + IPv4 (20) + TCP (20) + padding to the 60-byte minimum.
const PAD: usize = 6;
const LIVE_FRAME_LEN: usize = 14 + 20 + 20 + PAD;

/// Packets `gen0` has sent, from `ip -s -j link`.
fn tx_packets(gen_ns: &str) -> Result<u64> {
    let out = Command::new("ip")
        .args(["-n", gen_ns, "-s", "-j", "link", "show", GEN_IF])
        .output()
        .context("running ip")?;
    ensure!(out.status.success(), "ip -s link show {GEN_IF} failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v[0]["stats64"]["tx"]["packets"]
        .as_u64()
        .context("ip -s -j link: no tx packets")
}

/// trafgen's version line; fails with the fix when it is missing.
fn trafgen_version() -> Result<String> {
    let out = Command::new(TRAFGEN)
        .arg("--version")
        .output()
        .with_context(
            || "trafgen not found: install Debian's netsniff-ng (cargo xtask bench does)",
        )?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().next().unwrap_or("trafgen").trim().to_string())
}

/// Starts trafgen flat out on `gen0` with the packet configuration at
/// `config`.
fn start_trafgen(gen_ns: &str, config: &Path) -> Result<Group> {
    let mut cmd = Command::new(TRAFGEN);
    cmd.args(["--dev", GEN_IF, "--conf"])
        .arg(config)
        // One process (on the first CPU); no socket-memory tuning, which
        // would change the host's sysctls.
        .args(["--cpus", "1", "--no-sock-mem", "--no-cpu-stats"])
        // A small TX ring: the frames it holds in flight must fit the
        // socket's send buffer (net.core.wmem_default, which a namespace
        // cannot raise), or trafgen dies of EAGAIN when veth's queue to
        // the receiver fills.
        .args(["--ring-size", TX_RING])
        .stdout(Stdio::null());
    Group::start(gen_ns, TRAFGEN, &mut cmd, &config.with_extension("log"))
}
