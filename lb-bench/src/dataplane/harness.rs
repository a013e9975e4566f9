//! lb's production object and the benchmark object loaded side by side, and
//! one timed, verified BPF_PROG_TEST_RUN at a time.
//!
//! Every run is checked, not just timed: the verdict of the last iteration,
//! and counters that prove every iteration took the path measured (lb's
//! reason and per-service counters, the wrapper's iteration count, or the
//! output frame for the stateless floors). A run that fails a check is an
//! error: a figure for the wrong path is worse than none.

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, PerCpuValues, ProgramArray},
    programs::{ProgramFd, TestRun as _, TestRunOptions, Xdp},
};
use lb::dataplane::{Capacity, ServiceStats};
use lb_bench_ebpf::{
    FRAME_LEN, LruCounter, MAP_LRU, MAP_LRU_COUNTERS, MAP_RESET_CONFIG, MAP_RESET_STATE,
    MAP_SINK_COUNT, MAP_TARGET, PROG_LRU_INSERT, PROG_LRU_LOOKUP, PROG_PASS, PROG_RESET, PROG_SINK,
    PROG_SWAP, ResetConfig, ResetState, TARGET_SLOT,
};
use std::{collections::BTreeMap, net::IpAddr, path::Path};

use lb_common::{ConntrackSettings, Counter, ServiceKey, limits::DEFAULT_RING_SIZE, maps::PROG_LB};
use lb_tests::lab::{LB_MAC, Lab, lab_settings};

use super::baseline::Baseline;
use crate::machine::thread_cpu_ns;

/// The benchmark object: floors, references and the reset wrapper (never in
/// lb's object).
pub(crate) static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-bench-ebpf"));

/// Headroom BPF_PROG_TEST_RUN leaves before an XDP frame
/// (XDP_PACKET_HEADROOM), which an encapsulation grows into: the output
/// buffer must hold the grown frame.
const OUT_SLACK: usize = 256;

/// A program that can be measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Program {
    /// lb's `lb_xdp`.
    Lb,
    /// lb's `lb_xdp` at the baseline revision (`--baseline`).
    Baseline,
    /// The XDP_PASS floor.
    Pass,
    /// The parse-and-swap floor.
    Swap,
    /// Reference: parse, LRU insert, swap.
    LruInsert,
    /// Reference: parse, LRU lookup, swap.
    LruLookup,
}

impl Program {
    /// Its name, in lb's object or the benchmark object.
    pub(crate) fn name(self) -> &'static str {
        self.bench_name().unwrap_or(PROG_LB)
    }

    /// The benchmark object's name for it (lb's own program is not there).
    fn bench_name(self) -> Option<&'static str> {
        match self {
            Program::Lb | Program::Baseline => None,
            Program::Pass => Some(PROG_PASS),
            Program::Swap => Some(PROG_SWAP),
            Program::LruInsert => Some(PROG_LRU_INSERT),
            Program::LruLookup => Some(PROG_LRU_LOOKUP),
        }
    }
}

/// Which flows the iterations of a run carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flows {
    /// Every iteration the same flow.
    One(u32),
    /// Iteration `i` carries flow `base + (i * stride) % count`.
    Cycle {
        /// First flow index.
        base: u32,
        /// Flows in the cycle.
        count: u32,
        /// Step through the cycle, coprime with `count`: 1 visits the flows
        /// in order.
        stride: u16,
    },
    /// Every iteration a flow never seen before.
    Fresh,
}

/// How a run reaches the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Method {
    /// BPF_PROG_TEST_RUN on the program itself, with the given flow: only
    /// for paths whose output takes the same path again (the MAC rewrite, a
    /// pass, the floors).
    Direct(u32),
    /// Through the reset wrapper, which restores the frame and sets the flow.
    Reset(Flows),
}

/// What every iteration of a run must have done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Expect {
    /// XDP action (xdp_action: 1 drop, 2 pass, 3 tx).
    pub verdict: u32,
    /// lb's reason counter every iteration must have bumped (lb runs only;
    /// for every other program, none of lb's counters may move).
    pub counter: Option<Counter>,
    /// The reference programs' counter every iteration must have bumped
    /// (for every other program, none may move).
    pub lru: Option<LruCounter>,
    /// Service id and whether every iteration (true) or none (false) took
    /// a Maglev lookup, by its `new_flows` counter.
    pub new_flows: Option<(u32, bool)>,
    /// Length of the output frame.
    pub out_len: usize,
    /// For the swap floor: the output frame must be the input with its MACs
    /// swapped once per iteration.
    pub macs_swapped: bool,
}

/// One timed run.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sample {
    /// Thread CPU time per iteration, ns (fractional: the figure we use).
    pub ns: f64,
    /// The kernel's own figure, whole ns per iteration (a cross-check).
    pub kernel_ns: u64,
}

/// lb's data plane and the benchmark programs, loaded.
pub(crate) struct Harness {
    /// lb's data plane, with lab helpers to configure it.
    pub lab: Lab,
    /// lb's object at the baseline revision, given the same tables.
    pub baseline: Option<Baseline>,
    bench: Ebpf,
    target: ProgramArray<MapData>,
    config: Array<MapData, ResetConfig>,
    state: PerCpuArray<MapData, ResetState>,
    lru_counters: PerCpuArray<MapData, u64>,
    sink_count: PerCpuArray<MapData, u64>,
    lb_fd: ProgramFd,
    /// The benchmark object's programs, by `Program::bench_name`.
    bench_fds: Vec<(Program, ProgramFd)>,
    nr_cpus: usize,
    /// The next flow index no run has used.
    fresh: u32,
    /// Each service's backends, by service id: the service's forward
    /// counts are theirs.
    members: BTreeMap<u32, Vec<u32>>,
}

/// Map `name` of `object` (which the messages name) as a `T`.
pub(super) fn take<T>(ebpf: &mut Ebpf, object: &str, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from {object}"))?;
    T::try_from(map)
        .with_context(|| format!("map {name} of {object} is not the type or layout this tree has"))
}

/// The benchmark object, as error messages name it.
const BENCH: &str = "the benchmark object";

fn load_xdp(ebpf: &mut Ebpf, name: &str) -> Result<ProgramFd> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing"))?
        .try_into()?;
    prog.load()
        .with_context(|| format!("the kernel refused {name}"))?;
    Ok(prog.fd()?.try_clone()?)
}

impl Harness {
    /// Loads lb's object with `capacity` and lab settings, the benchmark
    /// object next to it, and the baseline's object (revision, file) if
    /// given, configured alike.
    pub(crate) fn load(capacity: Capacity, baseline: Option<(&str, &Path)>) -> Result<Harness> {
        // The packet tests' lab: the same settings, so the same paths.
        let mut lab =
            Lab::with_capacity(capacity, DEFAULT_RING_SIZE).context("loading lb's object")?;
        let baseline = match baseline {
            Some((rev, path)) => {
                let mut b = Baseline::load(rev, path, capacity)?;
                b.set_settings(lab_settings())?;
                Some(b)
            }
            None => None,
        };
        let lb_fd = lab.dp.program(PROG_LB)?.fd()?.try_clone()?;
        // The reference LRU gets lb's connection-table capacity, so both
        // fill, evict and miss in cache alike.
        let mut bench = EbpfLoader::new()
            .map_max_entries(MAP_LRU, capacity.conntrack_entries)
            .load(BENCH_OBJECT)
            .context("loading the benchmark object")?;
        let mut bench_fds = Vec::new();
        for program in [
            Program::Pass,
            Program::Swap,
            Program::LruInsert,
            Program::LruLookup,
        ] {
            if let Some(name) = program.bench_name() {
                bench_fds.push((program, load_xdp(&mut bench, name)?));
            }
        }
        load_xdp(&mut bench, PROG_RESET)?;
        load_xdp(&mut bench, PROG_SINK)?;
        let nr_cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        Ok(Harness {
            target: take(&mut bench, BENCH, MAP_TARGET)?,
            config: take(&mut bench, BENCH, MAP_RESET_CONFIG)?,
            state: take(&mut bench, BENCH, MAP_RESET_STATE)?,
            lru_counters: take(&mut bench, BENCH, MAP_LRU_COUNTERS)?,
            sink_count: take(&mut bench, BENCH, MAP_SINK_COUNT)?,
            lab,
            baseline,
            bench,
            lb_fd,
            bench_fds,
            nr_cpus,
            fresh: 0,
            members: BTreeMap::new(),
        })
    }

    /// Writes backend `id` at `ip` into both objects. Every backend's next
    /// hop is the load balancer's own MAC: lb takes only frames sent to its
    /// MAC, and a `dsr-l2` frame that leaves addressed to it takes the same
    /// path when it runs again (the rewrite costs the same whatever the
    /// MAC), so such paths run without the reset wrapper.
    pub(crate) fn backend(&mut self, id: u32, ip: IpAddr, up: bool, generation: u32) -> Result<()> {
        self.lab.backend_at(id, ip, LB_MAC, up, generation)?;
        if let Some(b) = &mut self.baseline {
            b.set_backend(id, self.lab.dp.backend(id)?)?;
        }
        Ok(())
    }

    /// Builds and publishes a service (see [`Lab::service`]) in both
    /// objects; returns its table.
    pub(crate) fn service(
        &mut self,
        id: u32,
        key: ServiceKey,
        flags: u32,
        members: &[(u32, u32)],
    ) -> Result<Vec<u32>> {
        let ring = self.lab.service(id, key, flags, members)?;
        self.members
            .insert(id, members.iter().map(|&(b, _)| b).collect());
        self.mirror_service(&key, &ring)?;
        Ok(ring)
    }

    /// Publishes a service with a ready table in both objects.
    pub(crate) fn publish_service(
        &mut self,
        key: &ServiceKey,
        id: u32,
        ring: &[u32],
    ) -> Result<()> {
        self.lab.dp.publish_service(key, id, 0, 0, ring)?;
        self.mirror_service(key, ring)
    }

    fn mirror_service(&mut self, key: &ServiceKey, ring: &[u32]) -> Result<()> {
        if let Some(b) = &mut self.baseline {
            let value = self.lab.dp.service(key)?.context("service not published")?;
            b.set_service(key, value, ring)?;
        }
        Ok(())
    }

    /// Sets lb's connection-table insert budget (per CPU per second; 0: no
    /// limit, as every other case runs).
    pub(crate) fn set_insert_budget(&mut self, inserts_per_cpu: u32) -> Result<()> {
        self.lab.dp.set_conntrack_settings(ConntrackSettings {
            inserts_per_cpu,
            ..ConntrackSettings::default()
        })
    }

    /// lb's program, and the baseline's if there is one.
    pub(crate) fn lb_programs(&self) -> Vec<Program> {
        let mut programs = vec![Program::Lb];
        if self.baseline.is_some() {
            programs.push(Program::Baseline);
        }
        programs
    }

    /// Reserves `count` flow indexes no other run uses.
    pub(crate) fn fresh_flows(&mut self, count: u32) -> Result<u32> {
        let base = self.fresh;
        self.fresh = base.checked_add(count).context("flow indexes exhausted")?;
        Ok(base)
    }

    /// `program`, to attach to an interface or read its run-time stats.
    pub(crate) fn xdp(&mut self, program: Program) -> Result<&mut Xdp> {
        match program {
            Program::Lb => self.lab.dp.program(PROG_LB),
            Program::Baseline => self.baseline_mut()?.program(),
            _ => self.program(program.name()),
        }
    }

    /// The sink program (`PROG_SINK`), to attach to the generator's side.
    pub(crate) fn sink(&mut self) -> Result<&mut Xdp> {
        self.program(PROG_SINK)
    }

    /// Frames the sink has received, over all CPUs.
    pub(crate) fn sink_count(&self) -> Result<u64> {
        Ok(self.sink_count.get(&0, 0)?.iter().sum())
    }

    fn baseline_mut(&mut self) -> Result<&mut Baseline> {
        self.baseline
            .as_mut()
            .context("no baseline object was given")
    }

    fn program(&mut self, name: &str) -> Result<&mut Xdp> {
        Ok(self
            .bench
            .program_mut(name)
            .with_context(|| format!("program {name} missing"))?
            .try_into()?)
    }

    /// Runs `template` through `program` by `method`, `repeat` times, and
    /// checks that every iteration met `expect`.
    pub(crate) fn run(
        &mut self,
        program: Program,
        method: Method,
        template: &ResetConfig,
        repeat: u32,
        expect: &Expect,
    ) -> Result<Sample> {
        let before = self.snapshot(program, expect)?;
        let (first_flow, config) = match method {
            Method::Direct(index) => (index, None),
            Method::Reset(flows) => {
                let (base, count, stride) = match flows {
                    Flows::One(index) => (index, 1, 1),
                    Flows::Cycle {
                        base,
                        count,
                        stride,
                    } => {
                        ensure!(
                            gcd(u32::from(stride), count) == 1,
                            "a stride of {stride} through {count} flows would skip some"
                        );
                        (base, count, stride)
                    }
                    Flows::Fresh => (self.fresh_flows(repeat)?, 0, 1),
                };
                let mut config = *template;
                config.flow_base = base;
                config.flows = count;
                config.stride = stride;
                (base, Some(config))
            }
        };
        let input = template.frame_of(first_flow);
        let mut out = vec![0u8; FRAME_LEN + OUT_SLACK];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&input);
        opts.data_out = Some(&mut out);
        opts.repeat = repeat;
        let (start, result) = match (config, program) {
            (None, Program::Lb | Program::Baseline) => {
                let prog = self.xdp(program)?;
                let start = thread_cpu_ns();
                (start, prog.test_run(opts))
            }
            (None, _) => {
                let name = program.bench_name().context("no such benchmark program")?;
                let prog = self.program(name)?;
                let start = thread_cpu_ns();
                (start, prog.test_run(opts))
            }
            (Some(config), _) => {
                let fd = match program {
                    Program::Lb => self.lb_fd.try_clone()?,
                    Program::Baseline => self.baseline_mut()?.fd()?,
                    _ => self
                        .bench_fds
                        .iter()
                        .find(|(p, _)| *p == program)
                        .context("benchmark program not loaded")?
                        .1
                        .try_clone()?,
                };
                self.target.set(TARGET_SLOT, &fd, 0)?;
                self.config.set(0, config, 0)?;
                self.state.set(
                    0,
                    PerCpuValues::try_from(vec![ResetState::default(); self.nr_cpus])?,
                    0,
                )?;
                let prog = self.program(PROG_RESET)?;
                let start = thread_cpu_ns();
                (start, prog.test_run(opts))
            }
        };
        let elapsed = thread_cpu_ns() - start;
        let result = result.context("BPF_PROG_TEST_RUN")?;
        ensure!(
            result.return_value == expect.verdict,
            "verdict {} where {} was expected",
            result.return_value,
            expect.verdict
        );
        let out_len = result.data_size_out as usize;
        ensure!(
            out_len == expect.out_len,
            "output frame of {out_len} bytes where {} were expected",
            expect.out_len
        );
        if expect.macs_swapped {
            let mut want = input;
            if repeat % 2 == 1 {
                want[..6].copy_from_slice(&input[6..12]);
                want[6..12].copy_from_slice(&input[..6]);
            }
            ensure!(
                out[..FRAME_LEN] == want[..],
                "the swap floor's output frame is wrong"
            );
        }
        let after = self.snapshot(program, expect)?;
        before.check(&after, expect, u64::from(repeat))?;
        if config.is_some() {
            let iterations: u64 = self.state.get(&0, 0)?.iter().map(|s| s.iterations).sum();
            ensure!(
                iterations == u64::from(repeat),
                "the wrapper reset {iterations} frames in {repeat} iterations"
            );
        }
        if expect.macs_swapped && repeat.is_multiple_of(2) {
            // An even number of swaps leaves the frame as it came, as a
            // floor that never swapped would: one untimed odd run tells
            // them apart.
            self.run(program, method, template, 1, expect)?;
        }
        Ok(Sample {
            ns: elapsed as f64 / f64::from(repeat),
            kernel_ns: result.duration.as_nanos() as u64,
        })
    }
}

/// Counters read before and after a run.
struct Snapshot {
    counters: Vec<(Counter, u64)>,
    lru: [u64; LruCounter::COUNT as usize],
    new_flows: u64,
    packets: u64,
}

impl Harness {
    /// The counters a run of `program` is checked by: the baseline's own
    /// for a baseline run, lb's otherwise.
    fn snapshot(&self, program: Program, expect: &Expect) -> Result<Snapshot> {
        let mut lru = [0; LruCounter::COUNT as usize];
        for (i, v) in lru.iter_mut().enumerate() {
            *v = self.lru_counters.get(&(i as u32), 0)?.iter().sum();
        }
        let baseline = match program {
            Program::Baseline => Some(
                self.baseline
                    .as_ref()
                    .context("no baseline object was given")?,
            ),
            _ => None,
        };
        let stats = |id| -> Result<ServiceStats> {
            let members = self.members.get(&id).map_or(&[][..], Vec::as_slice);
            match baseline {
                Some(b) => b.service_stats(id, members),
                None => self.lab.dp.service_stats(id, members),
            }
        };
        let (new_flows, packets) = match expect.new_flows {
            Some((id, _)) => {
                let s = stats(id)?;
                (s.new_flows, s.packets)
            }
            None => (0, 0),
        };
        Ok(Snapshot {
            counters: match baseline {
                Some(b) => {
                    let all: Vec<u32> = self.members.values().flatten().copied().collect();
                    b.counters(&all)?
                }
                None => self.lab.dp.counters()?,
            },
            lru,
            new_flows,
            packets,
        })
    }
}

impl Snapshot {
    /// Checks the deltas of a run of `repeat` iterations of lb.
    fn check(&self, after: &Snapshot, expect: &Expect, repeat: u64) -> Result<()> {
        let delta = |c: Counter| -> u64 {
            let get = |s: &Snapshot| s.counters.iter().find(|(k, _)| *k == c).map_or(0, |x| x.1);
            get(after) - get(self)
        };
        let total: u64 = Counter::ALL.iter().map(|&c| delta(c)).sum();
        match expect.counter {
            Some(c) => {
                ensure!(
                    delta(c) == repeat && total == repeat,
                    "{} of {repeat} iterations counted as {c:?} ({total} counted in all)",
                    delta(c)
                );
            }
            None if total != 0 => bail!("a run of another program moved lb's counters"),
            None => {}
        }
        let lru_total: u64 = (0..self.lru.len())
            .map(|i| after.lru[i] - self.lru[i])
            .sum();
        match expect.lru {
            Some(c) => {
                let moved = after.lru[c as usize] - self.lru[c as usize];
                ensure!(
                    moved == repeat && lru_total == repeat,
                    "{moved} of {repeat} iterations counted as {c:?} ({lru_total} in all)"
                );
            }
            None if lru_total != 0 => {
                bail!("a run of another program moved the reference counters")
            }
            None => {}
        }
        if let Some((id, every)) = expect.new_flows {
            let packets = after.packets - self.packets;
            let new_flows = after.new_flows - self.new_flows;
            let want = if every { repeat } else { 0 };
            ensure!(
                packets == repeat && new_flows == want,
                "service {id}: {packets} packets, {new_flows} Maglev lookups in {repeat} \
                 iterations (wanted {want} lookups)"
            );
        }
        Ok(())
    }
}

/// Greatest common divisor.
fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}
