//! Data-plane cost per packet: every path of `lb_xdp` timed with
//! BPF_PROG_TEST_RUN and a large repeat count, next to two floors measured
//! in the same run (a trivial XDP_PASS and a parse-and-swap XDP_TX) and to
//! references that add one connection-table operation to the floor.
//!
//! Paths whose output would take another path on the next iteration
//! (encapsulation; a new flow, which the first iteration remembers) run
//! through the reset wrapper. The wrapper's own cost, measured in the same
//! round as "wrapper → XDP_PASS", is taken off: the figure reported for
//! such a path is `wrapper(path) - wrapper(pass) + pass`, per round.
//!
//! Measurements are grouped by data-plane configuration (services,
//! backends, flows in the connection table). Within a group every case is
//! measured once to warm up, then `rounds` times, interleaved, in an order
//! that rotates every round.
//!
//! # Layout
//! - `frames`: the frames, addresses and flow indexes.
//! - `harness`: loading both objects, one timed and verified run.
//! - `baseline`: lb's object at an earlier revision, run beside the current
//!   one (`--baseline`): every lb case of every group runs on both.

pub(crate) mod baseline;
pub(crate) mod frames;
pub(crate) mod harness;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path as FilePath,
    time::Instant,
};

use anyhow::{Context as _, Result};
use lb::dataplane::{Capacity, SourceList};
use lb_bench_ebpf::{FRAME_LEN, ResetConfig};
use lb_common::{
    Counter, FAMILY_V4, FAMILY_V6, SERVICE_F_ALLOW_LIST, SERVICE_F_DENY_LIST, SERVICE_F_IPIP,
    SERVICE_F_SOURCE_LIMIT, ServiceKey, SourceLimit,
    limits::{DEFAULT_CONNTRACK_ENTRIES, DEFAULT_RING_SIZE, MAX_SOURCE_LIMIT},
    wire::{IPPROTO_TCP, IPV4_HLEN, IPV6_HLEN},
};
use lb_tests::lab::{PASS, TX, service_key};
use serde::{Deserialize, Serialize};

use crate::stats::Summary;
use frames::{Family, Mode, SERVICE_PORT, TCP_ACK, TCP_SYN};
use harness::{Expect, Flows, Harness, Method, Program, Sample};
use lb_bench_ebpf::LruCounter;

/// How much to measure.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    /// Iterations per BPF_PROG_TEST_RUN.
    pub repeat: u32,
    /// Timed runs per case (after one warm-up run).
    pub rounds: usize,
    /// The same for the many-flows groups, whose runs are much longer, in
    /// each of their loads.
    pub many_flows_rounds: usize,
    /// Times the many-flows groups are measured, each time on objects
    /// loaded afresh: where the kernel places a large table's pages moves
    /// a cold flow's cost more from one load to the next than from one
    /// round to the next (the same cycle took 161 ns in one run and 341 in
    /// the next, lb's and the baseline's alike), so the medians are over
    /// the rounds of every load.
    pub many_flows_loads: usize,
    /// Backends per measured service, one group each.
    pub backends: Vec<u32>,
    /// Services in the table, one group each (4 is the measured ones alone).
    pub services: Vec<u32>,
    /// Established flows cycled through in the many-flows groups.
    pub many_flows: Vec<u32>,
    /// Backends per service in the many-flows groups.
    pub many_flows_backends: u32,
    /// Only these paths of the matrix groups (and the floors every ratio
    /// needs); all when empty.
    pub paths: Vec<Path>,
    /// Prefixes in each measured service's deny list and in its allow
    /// list in the source-lists groups (0: no such groups).
    pub source_prefixes: u32,
}

impl Plan {
    /// The full plan, or the quick one (fewer iterations and rounds; the
    /// same paths and groups).
    pub fn new(quick: bool) -> Plan {
        Plan {
            repeat: if quick { 100_000 } else { 1_000_000 },
            rounds: if quick { 5 } else { 9 },
            many_flows_rounds: 3,
            many_flows_loads: if quick { 1 } else { 3 },
            backends: vec![1, 100, 1000],
            services: vec![MEASURED.len() as u32, 512],
            many_flows: vec![10_000, 1_000_000],
            many_flows_backends: 100,
            paths: Vec::new(),
            source_prefixes: SOURCE_PREFIXES,
        }
    }
}

/// Prefixes per list and service in the source-lists groups: issue 16's
/// "1,000 prefixes each".
const SOURCE_PREFIXES: u32 = 1000;
/// Backends per measured service in the source-lists groups.
const SOURCE_LISTS_BACKENDS: u32 = 100;

/// The measured services: one per family and mode, ids 0 to 3.
pub(crate) const MEASURED: [(Family, Mode); 4] = [
    (Family::Ipv4, Mode::DsrL2),
    (Family::Ipv4, Mode::Ipip),
    (Family::Ipv6, Mode::DsrL2),
    (Family::Ipv6, Mode::Ipip),
];

/// The VIP of the services that only fill the table (ports from
/// `FILLER_PORT_BASE` on); no packet goes to them.
const FILLER_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 1);
/// First port of the filler services.
const FILLER_PORT_BASE: u16 = 1000;
/// First IPv4 backend address; backend `id` gets this plus `id`.
const BACKEND_V4_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 16, 0);
/// IPv6 backends: 2001:2:b::<id>.
const BACKEND_V6_BASE: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0xb, 0, 0, 0, 0, 0);
/// Backend slots: enough for the measured services' largest group.
const MAX_BACKENDS: u32 = 4096;
/// Headroom over the flows the many-flows groups insert, so that no table
/// evicts one of them: neither a baseline's per-CPU LRU lists nor lb's
/// buckets, which overflow before the table is full (at 1.1 a few flows in a
/// million lost their entries; docs/dataplane.md).
const CONNTRACK_HEADROOM: f64 = 2.0;
/// The turns the many-flows groups' services take to fill the table.
pub(crate) const FILL_TURNS: u32 = 16;
/// The many-flows cycles' step between consecutive flows (in the order they
/// were put in the table): a prime, so coprime with every count measured
/// that it does not divide, and large enough that consecutive entries of a
/// table filled in order are pages apart.
pub(crate) const CYCLE_STRIDE: u16 = 7919;

/// What a case measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Path {
    /// Floor: XDP_PASS and nothing else.
    FloorPass,
    /// Floor: parse Ethernet/IP/TCP, swap MACs, XDP_TX.
    FloorSwap,
    /// The reset wrapper in front of the XDP_PASS floor: its own cost.
    WrapperPass,
    /// A packet of a flow in the connection table.
    Established,
    /// A non-SYN packet of a flow not in the connection table (Maglev lookup).
    NewFlow,
    /// A TCP SYN of the same flow every packet (a retransmitted SYN, a
    /// reused port): Maglev lookup, the flow already in the table.
    Syn,
    /// A TCP SYN of a new flow every packet (Maglev lookup, insert).
    SynNewFlow,
    /// A TCP SYN of a new flow every packet while the CPU's insert budget
    /// is spent, as under a SYN flood (Maglev lookup, no insert). lb only:
    /// the baseline has no budget.
    FloodSyn,
    /// The same with packets other than SYNs (an ACK flood): these need the
    /// connection-table lookup.
    FloodNewFlow,
    /// A TCP packet to an address that is no VIP.
    NotService,
    /// Reference: parse, insert the flow into an LRU hash like lb's
    /// connection table, swap: what remembering a flow costs by itself.
    RefInsert,
    /// Reference: parse, look the flow up in that LRU hash, swap: what a
    /// connection-table hit costs by itself.
    RefLookup,
}

impl Path {
    /// Whether the path is a floor, which every other figure is a ratio to.
    pub fn is_floor(self) -> bool {
        matches!(self, Path::FloorPass | Path::FloorSwap | Path::WrapperPass)
    }

    /// Whether the path runs with the insert budget spent.
    pub fn floods(self) -> bool {
        matches!(self, Path::FloodSyn | Path::FloodNewFlow)
    }

    /// As the report names it.
    pub fn label(self) -> &'static str {
        match self {
            Path::FloorPass => "floor: XDP_PASS",
            Path::FloorSwap => "floor: parse + swap MACs",
            Path::WrapperPass => "reset wrapper → XDP_PASS",
            Path::Established => "established flow",
            Path::NewFlow => "new flow",
            Path::Syn => "TCP SYN",
            Path::SynNewFlow => "TCP SYN, new flow",
            Path::FloodSyn => "TCP SYN flood, insert budget spent",
            Path::FloodNewFlow => "new-flow flood (not SYN), insert budget spent",
            Path::NotService => "non-service pass",
            Path::RefInsert => "reference: parse + LRU insert + swap",
            Path::RefLookup => "reference: parse + LRU lookup + swap",
        }
    }
}

/// One thing measured in a group.
#[derive(Clone)]
struct Case {
    path: Path,
    family: Option<Family>,
    mode: Option<Mode>,
    program: Program,
    method: Method,
    template: ResetConfig,
    expect: Expect,
    /// Run once, untimed, before every timed run (with what that run must
    /// do): puts the flow back in the connection table, from which other
    /// cases' new flows may have evicted it.
    prime: Option<(Program, Expect)>,
    /// Distinct flows the iterations carry.
    flows: u64,
}

/// A case's figures.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaseResult {
    /// What it measures.
    pub path: Path,
    /// Address family, where it matters.
    pub family: Option<Family>,
    /// Forwarding mode, for forwarded paths.
    pub mode: Option<Mode>,
    /// Measured on the baseline object.
    pub baseline: bool,
    /// `direct` or `reset wrapper`.
    pub method: String,
    /// Distinct flows the iterations carried.
    pub flows: u64,
    /// Per round, ns per iteration as timed (the wrapper included).
    pub raw_ns: Vec<f64>,
    /// Per round, the kernel's own whole-ns figure for the same runs.
    pub kernel_ns: Vec<u64>,
    /// Per round, ns per packet of the program itself (wrapper taken off).
    pub ns: Vec<f64>,
    /// Summary of `ns`.
    pub summary: Summary,
    /// Median ns over the parse-and-swap floor's median (same family).
    pub vs_swap: f64,
    /// Median ns over the XDP_PASS floor's median.
    pub vs_pass: f64,
}

/// One configuration's cases.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupResult {
    /// Services in the table.
    pub services: u32,
    /// Backends of each measured service.
    pub backends: u32,
    /// Established flows the many-flows cases cycle through (0: not such a group).
    pub many_flows: u32,
    /// Prefixes in each measured service's deny and allow lists (0: none).
    pub source_prefixes: u32,
    /// Capacity of lb's connection table (and of the reference LRU).
    pub conntrack_entries: u32,
    /// Iterations per run.
    pub repeat: u32,
    /// Cases, in report order.
    pub cases: Vec<CaseResult>,
    /// The same lb cases run on the baseline object (with `--baseline`).
    pub baseline: Vec<CaseResult>,
}

impl GroupResult {
    /// The case measuring `path` for `family` and `mode`.
    pub fn case(
        &self,
        path: Path,
        family: Option<Family>,
        mode: Option<Mode>,
    ) -> Option<&CaseResult> {
        self.cases
            .iter()
            .find(|c| c.path == path && c.family == family && c.mode == mode)
    }
}

/// Everything the data-plane benchmark measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DataplaneResults {
    /// What was run.
    pub plan: Plan,
    /// Bytes of every frame.
    pub frame_len: usize,
    /// Groups by services and backends.
    pub matrix: Vec<GroupResult>,
    /// Groups with many established flows.
    pub many_flows: Vec<GroupResult>,
    /// The measured services without, then with, source lists (deny and
    /// allow lists of `plan.source_prefixes` each, the clients allowed).
    pub source_lists: Vec<GroupResult>,
    /// The commit of the baseline object, if one ran beside lb's.
    pub baseline_rev: Option<String>,
}

/// The baseline to run beside lb's object: its commit and object file.
pub(crate) type BaselineObject<'a> = (&'a str, &'a FilePath);

/// Runs the whole data-plane benchmark, with `baseline` beside lb if given.
pub(crate) fn run(plan: &Plan, baseline: Option<BaselineObject<'_>>) -> Result<DataplaneResults> {
    let matrix = run_matrix(plan, baseline)?;
    let many_flows = run_many_flows(plan, baseline)?;
    let source_lists = run_source_lists(plan)?;
    Ok(DataplaneResults {
        plan: plan.clone(),
        frame_len: FRAME_LEN,
        matrix,
        many_flows,
        source_lists,
        baseline_rev: baseline.map(|(rev, _)| rev.to_owned()),
    })
}

fn backend_ip(family: Family, id: u32) -> IpAddr {
    match family {
        Family::Ipv4 => Ipv4Addr::from(u32::from(BACKEND_V4_BASE) + id).into(),
        Family::Ipv6 => Ipv6Addr::from(u128::from(BACKEND_V6_BASE) + u128::from(id)).into(),
    }
}

fn service_flags(mode: Mode) -> u32 {
    match mode {
        Mode::DsrL2 => 0,
        Mode::Ipip => SERVICE_F_IPIP,
    }
}

/// A set of the four measured services (`MEASURED`, in its order): the
/// id of the first and the port they all serve. The source-lists groups
/// measure two sets side by side, one with lists and one without.
#[derive(Clone, Copy)]
struct ServiceSet {
    first: u32,
    port: u16,
}

impl ServiceSet {
    /// The measured services of every group: ids 0 to 3, port 80.
    const PLAIN: ServiceSet = ServiceSet {
        first: 0,
        port: SERVICE_PORT,
    };
    /// The same services with source lists and limits, in the
    /// source-lists groups: the next four ids, the next port.
    const LISTED: ServiceSet = ServiceSet {
        first: MEASURED.len() as u32,
        port: SERVICE_PORT + 1,
    };

    /// Each service's id, family and mode.
    fn each(self) -> impl Iterator<Item = (u32, Family, Mode)> {
        (self.first..)
            .zip(MEASURED)
            .map(|(sid, (f, m))| (sid, f, m))
    }

    /// The key of the service of `family` and `mode` in the set.
    fn key(self, family: Family, mode: Mode) -> ServiceKey {
        service_key(frames::vip(family, mode), self.port, IPPROTO_TCP)
    }
}

/// Gives each measured service `backends` fresh backends (generation
/// `generation`, so entries from an earlier group become misses) and
/// publishes its table. Returns the first service's table.
pub(crate) fn configure(h: &mut Harness, backends: u32, generation: u32) -> Result<Vec<u32>> {
    configure_set(h, ServiceSet::PLAIN, backends, generation, 0)
}

/// [`configure`] for the services of `set`, published with `extra_flags`
/// besides their mode's.
fn configure_set(
    h: &mut Harness,
    set: ServiceSet,
    backends: u32,
    generation: u32,
    extra_flags: u32,
) -> Result<Vec<u32>> {
    let mut first = Vec::new();
    for (sid, family, mode) in set.each() {
        let members: Vec<(u32, u32)> = (0..backends).map(|j| (sid * backends + j, 1)).collect();
        for &(id, _) in &members {
            h.backend(id, backend_ip(family, id), true, generation)?;
        }
        let flags = service_flags(mode) | extra_flags;
        let ring = h.service(sid, set.key(family, mode), flags, &members)?;
        if first.is_empty() {
            first = ring;
        }
    }
    Ok(first)
}

/// Publishes services `MEASURED.len()..total`, all with `ring`: they make
/// the tables their real size; no packet goes to them.
fn publish_fillers(h: &mut Harness, total: u32, ring: &[u32]) -> Result<()> {
    for id in MEASURED.len() as u32..total {
        let port = FILLER_PORT_BASE + id as u16;
        let key = service_key(FILLER_VIP.into(), port, IPPROTO_TCP);
        h.publish_service(&key, id, ring)
            .with_context(|| format!("publishing filler service {id}"))?;
    }
    Ok(())
}

fn expect_floor(verdict: u32, macs_swapped: bool) -> Expect {
    Expect {
        verdict,
        counter: None,
        lru: None,
        new_flows: None,
        out_len: FRAME_LEN,
        macs_swapped,
    }
}

/// The frame length after `mode` forwarded a frame of `family`.
fn forwarded_len(family: Family, mode: Mode) -> usize {
    match (family, mode) {
        (_, Mode::DsrL2) => FRAME_LEN,
        (Family::Ipv4, Mode::Ipip) => FRAME_LEN + IPV4_HLEN,
        (Family::Ipv6, Mode::Ipip) => FRAME_LEN + IPV6_HLEN,
    }
}

fn expect_forward(sid: u32, family: Family, mode: Mode, new_flow_every: bool) -> Expect {
    Expect {
        verdict: TX,
        counter: Some(match mode {
            Mode::DsrL2 => Counter::ForwardDsr,
            Mode::Ipip => Counter::ForwardIpip,
        }),
        lru: None,
        new_flows: Some((sid, new_flow_every)),
        out_len: forwarded_len(family, mode),
        macs_swapped: false,
    }
}

/// What a reference program's run must do: count `c` every iteration.
fn expect_reference(c: LruCounter) -> Expect {
    Expect {
        verdict: TX,
        counter: None,
        lru: Some(c),
        new_flows: None,
        out_len: FRAME_LEN,
        macs_swapped: false,
    }
}

/// Priming an lb flow: forwarded, whether or not it was in the table.
fn prime_lb(sid: u32, family: Family, mode: Mode) -> Option<(Program, Expect)> {
    let expect = Expect {
        new_flows: None,
        ..expect_forward(sid, family, mode, false)
    };
    Some((Program::Lb, expect))
}

/// Priming a reference lookup: the flow inserted.
fn prime_reference() -> Option<(Program, Expect)> {
    Some((Program::LruInsert, expect_reference(LruCounter::Inserted)))
}

/// Fresh flows with the insert budget spent, SYNs and other packets, to
/// the measured service `sid` on `port`.
fn flood_cases(sid: u32, family: Family, mode: Mode, port: u16) -> [Case; 2] {
    let vip = frames::vip(family, mode);
    [(Path::FloodSyn, TCP_SYN), (Path::FloodNewFlow, TCP_ACK)].map(|(path, flags)| Case {
        path,
        family: Some(family),
        mode: Some(mode),
        program: Program::Lb,
        method: Method::Reset(Flows::Fresh),
        template: frames::template(vip, port, flags),
        expect: expect_forward(sid, family, mode, true),
        prime: None,
        flows: 0,
    })
}

/// The references for lb's connection-table work, on IPv4: an insert of
/// the same flow every iteration (as a SYN does), of a new flow every
/// iteration (as a new flow does), and a lookup that hits.
fn reference_cases(h: &mut Harness) -> Result<Vec<Case>> {
    let template = frames::template(frames::not_a_vip(Family::Ipv4), SERVICE_PORT, TCP_ACK);
    let reference = |path, program, method, expect, prime, flows| Case {
        path,
        family: Some(Family::Ipv4),
        mode: None,
        program,
        method,
        template,
        expect,
        prime,
        flows,
    };
    let same = h.fresh_flows(1)?;
    let hit = h.fresh_flows(1)?;
    Ok(vec![
        reference(
            Path::RefInsert,
            Program::LruInsert,
            Method::Direct(same),
            expect_reference(LruCounter::Inserted),
            None,
            1,
        ),
        reference(
            Path::RefInsert,
            Program::LruInsert,
            Method::Reset(Flows::Fresh),
            expect_reference(LruCounter::Inserted),
            None,
            0,
        ),
        reference(
            Path::RefLookup,
            Program::LruLookup,
            Method::Direct(hit),
            expect_reference(LruCounter::Hit),
            prime_reference(),
            1,
        ),
    ])
}

/// The floors and the wrapper's own cost: in every group.
fn floor_cases() -> Vec<Case> {
    let mut cases = vec![Case {
        path: Path::FloorPass,
        family: None,
        mode: None,
        program: Program::Pass,
        method: Method::Direct(0),
        template: frames::template(frames::not_a_vip(Family::Ipv4), SERVICE_PORT, TCP_ACK),
        expect: expect_floor(PASS, false),
        prime: None,
        flows: 1,
    }];
    for family in Family::ALL {
        let template = frames::template(frames::not_a_vip(family), SERVICE_PORT, TCP_ACK);
        cases.push(Case {
            path: Path::FloorSwap,
            family: Some(family),
            mode: None,
            program: Program::Swap,
            method: Method::Direct(0),
            template,
            expect: expect_floor(TX, true),
            prime: None,
            flows: 1,
        });
        cases.push(Case {
            path: Path::WrapperPass,
            family: Some(family),
            mode: None,
            program: Program::Pass,
            method: Method::Reset(Flows::One(0)),
            template,
            expect: expect_floor(PASS, false),
            prime: None,
            flows: 1,
        });
    }
    cases
}

/// Every path of lb for one group of the matrix.
fn matrix_cases(h: &mut Harness) -> Result<Vec<Case>> {
    let mut cases = floor_cases();
    cases.extend(service_cases(h, ServiceSet::PLAIN)?);
    for family in Family::ALL {
        cases.push(Case {
            path: Path::NotService,
            family: Some(family),
            mode: None,
            program: Program::Lb,
            method: Method::Direct(0),
            template: frames::template(frames::not_a_vip(family), SERVICE_PORT, TCP_ACK),
            expect: Expect {
                verdict: PASS,
                counter: Some(Counter::PassNotService),
                lru: None,
                new_flows: None,
                out_len: FRAME_LEN,
                macs_swapped: false,
            },
            prime: None,
            flows: 1,
        });
    }
    // A check of the wrapper method itself: the same path measured both
    // ways must agree.
    let established = h.fresh_flows(1)?;
    cases.push(Case {
        path: Path::Established,
        family: Some(Family::Ipv4),
        mode: Some(Mode::DsrL2),
        program: Program::Lb,
        method: Method::Reset(Flows::One(established)),
        template: frames::template(
            frames::vip(Family::Ipv4, Mode::DsrL2),
            SERVICE_PORT,
            TCP_ACK,
        ),
        expect: expect_forward(0, Family::Ipv4, Mode::DsrL2, false),
        prime: prime_lb(0, Family::Ipv4, Mode::DsrL2),
        flows: 1,
    });
    cases.extend(reference_cases(h)?);
    Ok(cases)
}

/// The paths of the services of `set`: established, new flow, the floods,
/// SYN and SYN of a new flow, for each.
fn service_cases(h: &mut Harness, set: ServiceSet) -> Result<Vec<Case>> {
    let mut cases = Vec::new();
    for (sid, family, mode) in set.each() {
        let vip = frames::vip(family, mode);
        let ack = frames::template(vip, set.port, TCP_ACK);
        let syn = frames::template(vip, set.port, TCP_SYN);
        // The MAC rewrite leaves a frame that takes the same path again (to
        // backends at lb's own MAC: `Harness::backend`), so dsr-l2 runs
        // directly; an encapsulated frame must be reset.
        let stable = |index: u32| match mode {
            Mode::DsrL2 => Method::Direct(index),
            Mode::Ipip => Method::Reset(Flows::One(index)),
        };
        let established = h.fresh_flows(1)?;
        cases.push(Case {
            path: Path::Established,
            family: Some(family),
            mode: Some(mode),
            program: Program::Lb,
            method: stable(established),
            template: ack,
            expect: expect_forward(sid, family, mode, false),
            prime: prime_lb(sid, family, mode),
            flows: 1,
        });
        cases.push(Case {
            path: Path::NewFlow,
            family: Some(family),
            mode: Some(mode),
            program: Program::Lb,
            method: Method::Reset(Flows::Fresh),
            template: ack,
            expect: expect_forward(sid, family, mode, true),
            prime: None,
            flows: 0,
        });
        cases.extend(flood_cases(sid, family, mode, set.port));
        let syn_flow = h.fresh_flows(1)?;
        cases.push(Case {
            path: Path::Syn,
            family: Some(family),
            mode: Some(mode),
            program: Program::Lb,
            method: stable(syn_flow),
            template: syn,
            expect: expect_forward(sid, family, mode, true),
            prime: None,
            flows: 1,
        });
        cases.push(Case {
            path: Path::SynNewFlow,
            family: Some(family),
            mode: Some(mode),
            program: Program::Lb,
            method: Method::Reset(Flows::Fresh),
            template: syn,
            expect: expect_forward(sid, family, mode, true),
            prime: None,
            flows: 0,
        });
    }
    Ok(cases)
}

/// With a baseline, every case of lb's program again on the baseline's.
fn with_baseline(h: &Harness, mut cases: Vec<Case>) -> Vec<Case> {
    if h.baseline.is_none() {
        return cases;
    }
    let on_baseline: Vec<Case> = cases
        .iter()
        .filter(|c| c.program == Program::Lb && !c.path.floods())
        .map(|c| Case {
            program: Program::Baseline,
            prime: c.prime.map(|(p, e)| {
                let p = if p == Program::Lb {
                    Program::Baseline
                } else {
                    p
                };
                (p, e)
            }),
            ..c.clone()
        })
        .collect();
    cases.extend(on_baseline);
    cases
}

/// The group's results: lb's and the baseline's cases apart.
fn group_result(
    cases: &[Case],
    samples: &[Vec<Sample>],
    shape: (u32, u32, u32, u32, u32),
) -> GroupResult {
    let (services, backends, many_flows, conntrack_entries, repeat) = shape;
    let (baseline, cases): (Vec<CaseResult>, Vec<CaseResult>) = summarise(cases, samples)
        .into_iter()
        .partition(|c| c.baseline);
    GroupResult {
        services,
        backends,
        many_flows,
        source_prefixes: 0,
        conntrack_entries,
        repeat,
        cases,
        baseline,
    }
}

fn run_matrix(plan: &Plan, baseline: Option<BaselineObject<'_>>) -> Result<Vec<GroupResult>> {
    let max_services = plan.services.iter().copied().max().unwrap_or(1);
    let mut h = Harness::load(
        Capacity {
            max_services,
            max_backends: MAX_BACKENDS,
            conntrack_entries: DEFAULT_CONNTRACK_ENTRIES,
            ring_slots: Capacity::ring_slots_for(
                max_services,
                MAX_BACKENDS,
                Some(DEFAULT_RING_SIZE),
            )?,
        },
        baseline,
    )?;
    let mut groups = Vec::new();
    let mut generation = 0;
    let mut published = MEASURED.len() as u32;
    let mut services = plan.services.clone();
    services.sort_unstable();
    for &total in &services {
        for &backends in &plan.backends {
            generation += 1;
            let started = Instant::now();
            let ring = configure(&mut h, backends, generation)?;
            if total > published {
                let start = Instant::now();
                publish_fillers(&mut h, total, &ring)?;
                eprintln!(
                    "data plane: published {} more services in {:.1?}",
                    total - published,
                    start.elapsed()
                );
                published = total;
            }
            let mut cases = matrix_cases(&mut h)?;
            cases.retain(|c| {
                plan.paths.is_empty() || c.path.is_floor() || plan.paths.contains(&c.path)
            });
            let mut cases = with_baseline(&h, cases);
            let samples = measure(&mut h, &mut cases, plan.repeat, plan.rounds)?;
            eprintln!(
                "data plane: {total} services, {backends} backends per service: {:.1?}",
                started.elapsed()
            );
            groups.push(group_result(
                &cases,
                &samples,
                (total, backends, 0, DEFAULT_CONNTRACK_ENTRIES, plan.repeat),
            ));
        }
    }
    Ok(groups)
}

/// The measured services' paths with `SOURCE_LISTS_BACKENDS` backends
/// each, without source lists and with them, interleaved in the same
/// rounds: two sets of the four services side by side in one program, the
/// second with a deny list and an allow list of `plan.source_prefixes`
/// prefixes each (the benchmark's clients in the allow list, in none of
/// the deny list's) and a new-flow limit per client address that no run
/// reaches. Reported as two groups, without then with, sharing the
/// floors. lb's object only: the baseline has neither.
fn run_source_lists(plan: &Plan) -> Result<Vec<GroupResult>> {
    if plan.source_prefixes == 0 {
        return Ok(Vec::new());
    }
    let services = 2 * MEASURED.len() as u32;
    let mut h = Harness::load(
        Capacity {
            max_services: services,
            max_backends: MAX_BACKENDS,
            conntrack_entries: DEFAULT_CONNTRACK_ENTRIES,
            ring_slots: Capacity::ring_slots_for(services, MAX_BACKENDS, Some(DEFAULT_RING_SIZE))?,
        },
        None,
    )?;
    let started = Instant::now();
    configure_set(&mut h, ServiceSet::PLAIN, SOURCE_LISTS_BACKENDS, 1, 0)?;
    // The lists and limits first: the flags make the program read them.
    add_source_lists(&mut h, ServiceSet::LISTED, plan.source_prefixes)?;
    let guarded = SERVICE_F_DENY_LIST | SERVICE_F_ALLOW_LIST | SERVICE_F_SOURCE_LIMIT;
    configure_set(
        &mut h,
        ServiceSet::LISTED,
        SOURCE_LISTS_BACKENDS,
        1,
        guarded,
    )?;
    let wanted = |c: &Case| plan.paths.is_empty() || plan.paths.contains(&c.path);
    let floors = floor_cases();
    let mut cases = floors.clone();
    cases.extend(
        service_cases(&mut h, ServiceSet::PLAIN)?
            .into_iter()
            .filter(wanted),
    );
    let plain = cases.len();
    cases.extend(
        service_cases(&mut h, ServiceSet::LISTED)?
            .into_iter()
            .filter(wanted),
    );
    let samples = measure(&mut h, &mut cases, plan.repeat, plan.rounds)?;
    eprintln!(
        "data plane: without and with {} source prefixes per list: {:.1?}",
        plan.source_prefixes,
        started.elapsed()
    );
    let shape = (
        MEASURED.len() as u32,
        SOURCE_LISTS_BACKENDS,
        0,
        DEFAULT_CONNTRACK_ENTRIES,
        plan.repeat,
    );
    let without = group_result(&cases[..plain], &samples[..plain], shape);
    // The listed services' cases with the floors they are measured against.
    let listed = (0..floors.len()).chain(plain..cases.len());
    let (listed_cases, listed_samples): (Vec<Case>, Vec<Vec<Sample>>) = listed
        .map(|i| (cases[i].clone(), samples[i].clone()))
        .unzip();
    let mut with = group_result(&listed_cases, &listed_samples, shape);
    with.source_prefixes = plan.source_prefixes;
    Ok(vec![without, with])
}

/// Gives every service of `set` a new-flow limit per client address and a
/// deny list and an allow list of `prefixes` prefixes each, the
/// benchmark's clients (`frames::client_net`) the allow list's first: the
/// deny list's are single addresses in a range no client is in, the allow
/// list's others likewise elsewhere. The services' flags, published after,
/// make the program read them.
fn add_source_lists(h: &mut Harness, set: ServiceSet, prefixes: u32) -> Result<()> {
    for (sid, family, _) in set.each() {
        for i in 0..prefixes {
            let (deny, allow) = match family {
                Family::Ipv4 => (
                    (Ipv4Addr::from(u32::from(DENIED_V4) + i).into(), 32),
                    (Ipv4Addr::from(u32::from(OTHER_ALLOWED_V4) + i).into(), 32),
                ),
                Family::Ipv6 => (
                    (
                        Ipv6Addr::from(u128::from(DENIED_V6) + u128::from(i)).into(),
                        128,
                    ),
                    (
                        Ipv6Addr::from(u128::from(OTHER_ALLOWED_V6) + u128::from(i)).into(),
                        128,
                    ),
                ),
            };
            let allow = if i == 0 {
                frames::client_net(family)
            } else {
                allow
            };
            h.lab.dp.set_source_entry(sid, deny, SourceList::Deny)?;
            h.lab.dp.set_source_entry(sid, allow, SourceList::Allow)?;
        }
        // A limit per client address no run reaches (a fresh flow's index
        // is written into its source address's last two bytes, so each of
        // 65,536 addresses opens one flow in 65,536), so every path is the
        // one without it plus the limit's work, a cold bucket a new flow.
        let (family_tag, host_bits) = match family {
            Family::Ipv4 => (FAMILY_V4, 32),
            Family::Ipv6 => (FAMILY_V6, 128),
        };
        let limit = SourceLimit::new(MAX_SOURCE_LIMIT, MAX_SOURCE_LIMIT, family_tag, host_bits);
        h.lab.dp.set_source_limit(sid, Some(&limit))?;
    }
    // As the daemon does after a change to the lists.
    h.lab.dp.settle_source_blocks()
}

/// Where the source-lists groups' denied addresses start: no client's.
const DENIED_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 0);
const DENIED_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0xd, 0, 0, 0, 0, 0);
/// Where their other allowed addresses start: no client's either.
const OTHER_ALLOWED_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 204, 0);
const OTHER_ALLOWED_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0xe, 0, 0, 0, 0, 0);

/// The many-flows groups' fill of `count` flows from `base`: it visits them
/// in the order of their indexes.
fn fill(base: u32, count: u32) -> Method {
    Method::Reset(Flows::Cycle {
        base,
        count,
        stride: 1,
    })
}

/// The many-flows groups' timed cycle through `count` flows from `base`: it
/// strides through them. Visited in the fill's order, consecutive flows of a
/// table that places entries as they come (an LRU hash hands out its
/// preallocated elements in order) would sit next to each other in memory,
/// unlike those of real traffic.
fn cycle(base: u32, count: u32) -> Method {
    Method::Reset(Flows::Cycle {
        base,
        count,
        stride: CYCLE_STRIDE,
    })
}

fn run_many_flows(plan: &Plan, baseline: Option<BaselineObject<'_>>) -> Result<Vec<GroupResult>> {
    let Some(&most) = plan.many_flows.iter().max() else {
        return Ok(Vec::new());
    };
    let nr_cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    // A connection table with per-CPU LRU lists (the reference's and lb's
    // before, a baseline's) gives each CPU an equal share of the entries;
    // every run happens on one CPU, so that CPU's share must hold every
    // flow of every case at once. Both objects get the same size.
    let per_cpu = f64::from(most) * MEASURED.len() as f64 * CONNTRACK_HEADROOM;
    let conntrack_entries = (per_cpu * nr_cpus as f64) as u32;
    let capacity = Capacity {
        max_services: MEASURED.len() as u32,
        max_backends: MAX_BACKENDS,
        conntrack_entries,
        ring_slots: Capacity::ring_slots_for(
            MEASURED.len() as u32,
            MAX_BACKENDS,
            Some(DEFAULT_RING_SIZE),
        )?,
    };
    // Each group's cases (as the first load built them; every load builds
    // the same), its samples from every load, and its repeat count.
    let mut measured: Vec<(Vec<Case>, Vec<Vec<Sample>>, u32)> = Vec::new();
    for load in 0..plan.many_flows_loads {
        eprintln!(
            "data plane: load {} of {}, with a {conntrack_entries}-entry connection table",
            load + 1,
            plan.many_flows_loads
        );
        let mut h = Harness::load(capacity, baseline)?;
        configure(&mut h, plan.many_flows_backends, 1)?;
        for (group, &count) in plan.many_flows.iter().enumerate() {
            let started = Instant::now();
            let (cases, samples, repeat) = measure_many_flows(&mut h, plan, group, count)?;
            eprintln!(
                "data plane: {count} established flows per service: {:.1?}",
                started.elapsed()
            );
            match measured.get_mut(group) {
                Some((_, all, _)) => {
                    for (all, more) in all.iter_mut().zip(samples) {
                        all.extend(more);
                    }
                }
                None => measured.push((cases, samples, repeat)),
            }
        }
    }
    Ok(measured
        .into_iter()
        .zip(&plan.many_flows)
        .map(|((cases, samples, repeat), &count)| {
            group_result(
                &cases,
                &samples,
                (
                    MEASURED.len() as u32,
                    plan.many_flows_backends,
                    count,
                    conntrack_entries,
                    repeat,
                ),
            )
        })
        .collect())
}

/// One many-flows group on `h`: every service's `count` flows put in the
/// table, then its cases measured over the plan's rounds. Returns the
/// cases, their samples and the repeat count.
fn measure_many_flows(
    h: &mut Harness,
    plan: &Plan,
    group: usize,
    count: u32,
) -> Result<(Vec<Case>, Vec<Vec<Sample>>, u32)> {
    // The one-flow baselines, through the wrapper like the cycles, once.
    let baselines = group == 0;
    let mut cases = floor_cases();
    // Each measured service's cases, and where its flows start.
    let mut measured = Vec::new();
    for (sid, &(family, mode)) in MEASURED.iter().enumerate() {
        let sid = sid as u32;
        let template = frames::template(frames::vip(family, mode), SERVICE_PORT, TCP_ACK);
        let one = h.fresh_flows(1)?;
        let base = h.fresh_flows(count)?;
        let mut own = Vec::new();
        if baselines {
            own.push(Case {
                path: Path::Established,
                family: Some(family),
                mode: Some(mode),
                program: Program::Lb,
                method: Method::Reset(Flows::One(one)),
                template,
                expect: expect_forward(sid, family, mode, false),
                prime: prime_lb(sid, family, mode),
                flows: 1,
            });
        }
        own.push(Case {
            path: Path::Established,
            family: Some(family),
            mode: Some(mode),
            program: Program::Lb,
            method: cycle(base, count),
            template,
            expect: expect_forward(sid, family, mode, false),
            prime: None,
            flows: u64::from(count),
        });
        measured.push((sid, family, mode, template, base, own));
    }
    // Every flow goes into the table first, each a Maglev lookup, which
    // the counters prove: the services by turns, each turn the next
    // part of every service's flows, in order. Filled one service after
    // another, the later services' flows would meet fuller buckets, more
    // of them past the first line a lookup reads, and the services would
    // not be measured alike.
    // Where turn `t`'s part of a service's flows starts.
    let part_start = |t: u32| (u64::from(count) * u64::from(t) / u64::from(FILL_TURNS)) as u32;
    for turn in 0..FILL_TURNS {
        let (start, end) = (part_start(turn), part_start(turn + 1));
        if start == end {
            continue;
        }
        for &(sid, family, mode, template, base, _) in &measured {
            for program in h.lb_programs() {
                h.run(
                    program,
                    fill(base + start, end - start),
                    &template,
                    end - start,
                    &expect_forward(sid, family, mode, true),
                )
                .with_context(|| format!("filling the table with {count} flows"))?;
            }
        }
    }
    cases.extend(measured.into_iter().flat_map(|(.., own)| own));
    // The reference lookup, over as many flows, put in the same way.
    let template = frames::template(frames::not_a_vip(Family::Ipv4), SERVICE_PORT, TCP_ACK);
    let one = h.fresh_flows(1)?;
    if baselines {
        cases.push(Case {
            path: Path::RefLookup,
            family: Some(Family::Ipv4),
            mode: None,
            program: Program::LruLookup,
            method: Method::Reset(Flows::One(one)),
            template,
            expect: expect_reference(LruCounter::Hit),
            prime: prime_reference(),
            flows: 1,
        });
    }
    let base = h.fresh_flows(count)?;
    h.run(
        Program::LruInsert,
        fill(base, count),
        &template,
        count,
        &expect_reference(LruCounter::Inserted),
    )
    .with_context(|| format!("filling the reference table with {count} flows"))?;
    cases.push(Case {
        path: Path::RefLookup,
        family: Some(Family::Ipv4),
        mode: None,
        program: Program::LruLookup,
        method: cycle(base, count),
        template,
        expect: expect_reference(LruCounter::Hit),
        prime: None,
        flows: u64::from(count),
    });
    // At least one pass over every flow per run.
    let repeat = plan.repeat.max(count);
    // The flood against as many established flows, like for like.
    if group + 1 == plan.many_flows.len() {
        for (sid, family, mode) in ServiceSet::PLAIN.each() {
            cases.extend(flood_cases(sid, family, mode, ServiceSet::PLAIN.port));
        }
    }
    let mut cases = with_baseline(h, cases);
    let samples = measure(h, &mut cases, repeat, plan.many_flows_rounds)?;
    Ok((cases, samples, repeat))
}

/// One warm-up run of every case, then `rounds` timed runs of every case,
/// interleaved; returns the samples per case.
fn measure(
    h: &mut Harness,
    cases: &mut [Case],
    repeat: u32,
    rounds: usize,
) -> Result<Vec<Vec<Sample>>> {
    let mut samples = vec![Vec::with_capacity(rounds); cases.len()];
    for round in 0..=rounds {
        for k in 0..cases.len() {
            // Rotate the order each round, so that no case always follows
            // the same neighbour (whose cache footprint it would inherit).
            let i = (k + round) % cases.len();
            let case = &cases[i];
            if let Some((program, expect)) = &case.prime {
                h.run(*program, case.method, &case.template, 1, expect)
                    .with_context(|| format!("priming {}", describe(case)))?;
            }
            // A budget of one insert a second: spent by the first packet.
            let budget = case.path.floods().then_some(1);
            h.set_insert_budget(budget.unwrap_or(0))?;
            let sample = h
                .run(
                    case.program,
                    case.method,
                    &case.template,
                    repeat,
                    &case.expect,
                )
                .with_context(|| format!("measuring {}", describe(case)));
            if budget.is_some() {
                h.set_insert_budget(0)?;
            }
            let sample = sample?;
            // Round 0 warms caches and fills the connection table; not kept.
            if round > 0 {
                samples[i].push(sample);
            }
        }
    }
    for case in cases.iter_mut() {
        if case.flows == 0 {
            case.flows = u64::from(repeat);
        }
    }
    Ok(samples)
}

fn describe(case: &Case) -> String {
    let mut s = case.path.label().to_owned();
    if let Some(f) = case.family {
        s = format!("{s} {}", f.label());
    }
    if let Some(m) = case.mode {
        s = format!("{s} {}", m.label());
    }
    if let Method::Reset(_) = case.method {
        s.push_str(" (reset wrapper)");
    }
    s
}

/// Per-round figures with the wrapper taken off, summaries and ratios.
fn summarise(cases: &[Case], samples: &[Vec<Sample>]) -> Vec<CaseResult> {
    let raw = |i: usize| -> Vec<f64> { samples[i].iter().map(|s| s.ns).collect() };
    let find = |path: Path, family: Option<Family>| {
        cases
            .iter()
            .position(|c| c.path == path && c.family == family)
    };
    let pass = find(Path::FloorPass, None).map(raw).unwrap_or_default();
    let mut results: Vec<CaseResult> = cases
        .iter()
        .enumerate()
        .map(|(i, case)| {
            let raw_ns = raw(i);
            let ns = match (case.method, case.path) {
                (Method::Reset(_), p) if p != Path::WrapperPass => {
                    let wrapper = find(Path::WrapperPass, case.family)
                        .map(raw)
                        .unwrap_or_default();
                    raw_ns
                        .iter()
                        .zip(&wrapper)
                        .zip(&pass)
                        .map(|((r, w), p)| r - w + p)
                        .collect()
                }
                _ => raw_ns.clone(),
            };
            let summary = Summary::of(&ns).unwrap_or(Summary {
                min: f64::NAN,
                median: f64::NAN,
                max: f64::NAN,
                spread: f64::NAN,
                n: 0,
            });
            CaseResult {
                path: case.path,
                family: case.family,
                mode: case.mode,
                baseline: case.program == Program::Baseline,
                method: match case.method {
                    Method::Direct(_) => "direct",
                    Method::Reset(_) => "reset wrapper",
                }
                .to_owned(),
                flows: case.flows,
                raw_ns,
                kernel_ns: samples[i].iter().map(|s| s.kernel_ns).collect(),
                ns,
                summary,
                vs_swap: f64::NAN,
                vs_pass: f64::NAN,
            }
        })
        .collect();
    let median_of = |results: &[CaseResult], path: Path, family: Option<Family>| {
        results
            .iter()
            .find(|c| c.path == path && c.family == family)
            .map_or(f64::NAN, |c| c.summary.median)
    };
    let pass_median = median_of(&results, Path::FloorPass, None);
    let swap: Vec<(Option<Family>, f64)> = Family::ALL
        .iter()
        .map(|&f| (Some(f), median_of(&results, Path::FloorSwap, Some(f))))
        .collect();
    for r in &mut results {
        let swap_median = swap
            .iter()
            .find(|(f, _)| *f == r.family.or(Some(Family::Ipv4)))
            .map_or(f64::NAN, |x| x.1);
        r.vs_swap = r.summary.median / swap_median;
        r.vs_pass = r.summary.median / pass_median;
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[ignore = "needs root: loads XDP programs"]
    fn this_trees_object_as_its_own_baseline_keeps_its_flows_in_its_connection_table() {
        lb_tests::require_root();
        // A revision that reads its bucket count from its global variable
        // gets it there: without it, the baseline had no table, every
        // established flow took a Maglev lookup, and the harness refused
        // the run.
        let scratch = lb_tests::Scratch::new("bench-baseline").unwrap();
        let object = scratch.dir.join("lb-ebpf.o");
        std::fs::write(&object, lb::dataplane::EBPF_OBJECT).unwrap();
        let plan = Plan {
            repeat: 1000,
            rounds: 1,
            backends: vec![1],
            services: vec![MEASURED.len() as u32],
            many_flows: Vec::new(),
            paths: vec![Path::Established, Path::Syn],
            source_prefixes: 0,
            ..Plan::new(true)
        };
        let groups = run_matrix(&plan, Some(("HEAD", &object))).unwrap();
        let baseline = &groups[0].baseline;
        for path in [Path::Established, Path::Syn] {
            for (family, mode) in MEASURED {
                assert!(
                    baseline.iter().any(|c| c.path == path
                        && c.family == Some(family)
                        && c.mode == Some(mode)),
                    "{path:?} {family:?} {mode:?} on the baseline"
                );
            }
        }
    }
}
