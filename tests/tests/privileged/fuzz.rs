//! The packet fuzzer of `lb_xdp` (see `lb_tests::fuzz` for the generator,
//! the reference and the properties). CI runs a bounded, fixed-seed run;
//! `cargo xtask fuzz --frames N --seed S` runs any, through these
//! variables:
//!
//! - `LB_FUZZ_FRAMES`: frames to run (the sweep first, then random cases).
//! - `LB_FUZZ_SEED`: the seed, decimal or `0x` hex.
//! - `LB_FUZZ_CASE`: replay only this case of the seed's run.
//! - `LB_FUZZ_FRAME`: run only this frame, given as hex.
//!
//! A failure names the property, the seed, the case and the frame in hex
//! (as generated and shrunk), and the command that replays it.

use std::collections::BTreeMap;
use std::time::Instant;

use lb_common::Counter;
use lb_tests::{
    fuzz::{
        generate::{self, Case, Mutation},
        hex, shrink, unhex,
        world::{Failure, World, action_name},
    },
    lab::{DROP, PASS, REDIRECT, TX},
    require_root,
};

/// Frames a run has by default: what CI runs.
const DEFAULT_FRAMES: u64 = 200_000;
/// The default seed ("lb-fuzz1"), fixed so CI is deterministic.
const DEFAULT_SEED: u64 = 0x6c62_2d66_757a_7a31;
/// Variables that steer a run.
const FRAMES_VAR: &str = "LB_FUZZ_FRAMES";
const SEED_VAR: &str = "LB_FUZZ_SEED";
const CASE_VAR: &str = "LB_FUZZ_CASE";
const FRAME_VAR: &str = "LB_FUZZ_FRAME";
/// Failures reported in full (the first of each property and counter,
/// up to this many).
const MAX_REPORTED: usize = 8;
/// Bytes of the program's output a report shows (the frame is shown whole).
const OUT_SHOWN: usize = 128;
/// Program runs the shrinker may spend on one failure.
const SHRINK_BUDGET: usize = 20_000;
/// From this many frames on, a run must have produced every outcome the
/// lab can produce (else the generator has gone blind somewhere).
const COVERAGE_MIN_FRAMES: u64 = 100_000;
/// The one counter the lab cannot produce: BPF_PROG_TEST_RUN always has
/// headroom for the outer header, and services and backends share a family.
const UNREACHABLE_IN_LAB: Counter = Counter::DropEncapFailed;

/// Frames that broke a property, (what, hex): each runs on every CI run.
/// Frames are to the LB's MAC (02:00:00:00:00:01) from the router's unless
/// said otherwise; see `lb_tests::fuzz::world` for the addresses.
const REGRESSIONS: &[(&str, &str)] = &[
    (
        "a TCP SYN to the tcp4-dsr service (198.18.1.1:80) sent to the broadcast MAC \
         was forwarded with source MAC ff:ff:ff:ff:ff:ff (the source is copied from \
         the destination)",
        "ffffffffffff0200000000fe080045000028123400004006d975c6120201c61201019c40\
         005000000001000000005002ffff00000000",
    ),
    (
        "an ICMP fragmentation-needed addressed to the host's own 198.18.0.2, quoting a \
         reply of the tcp4-dsr service (198.18.1.1:80 to 198.18.2.1:40000), was relayed \
         to the service's backend instead of passing to the host",
        "0200000000010200000000fe080045000038123400004001d969c6120301c61200020304\
         5af20000057845000028123400004006d975c6120101c612020100509c4000000001",
    ),
    (
        "an ICMPv6 packet-too-big to 2001:2:1::1 quoting only 20 bytes of an IPv6 \
         header, then 24 bytes of Ethernet padding: the quoted header was read from \
         the padding (its next header, ICMPv6, made the frame pass as another \
         protocol) instead of found truncated (drop_malformed_icmp)",
        "0200000000010200000000fe86dd60000000001c3a402001000200030000000000000000\
         00012001000200010000000000000000000102000000000005006000000000003a402001\
         00020001000000000000000000000000000000000000000000000000000000000000",
    ),
];

fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    let text = text.trim().replace('_', "");
    let value = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    Some(value.unwrap_or_else(|_| panic!("{name}={text} is not a number")))
}

/// Counts for the summary.
#[derive(Default)]
struct Tally {
    frames: u64,
    actions: BTreeMap<&'static str, u64>,
    counters: BTreeMap<Counter, u64>,
    mutations: BTreeMap<Mutation, u64>,
    /// Failures by property and the counter that moved.
    failures: BTreeMap<String, u64>,
}

impl Tally {
    fn summary(&self, seed: u64, sweep: usize, secs: f64) -> String {
        let join = |parts: Vec<String>| parts.join(", ");
        let actions = join(
            [PASS, DROP, TX, REDIRECT]
                .iter()
                .map(|&a| {
                    let name = action_name(a);
                    format!("{name} {}", self.actions.get(name).copied().unwrap_or(0))
                })
                .collect(),
        );
        let counters = join(
            Counter::ALL
                .iter()
                .map(|c| {
                    format!(
                        "{}={}",
                        c.name(),
                        self.counters.get(c).copied().unwrap_or(0)
                    )
                })
                .collect(),
        );
        let mutations = join(
            self.mutations
                .iter()
                .map(|(m, n)| format!("{}={n}", m.name()))
                .collect(),
        );
        let failed: u64 = self.failures.values().sum();
        format!(
            "fuzz: {} frames (sweep of {sweep}, seed {seed:#x}) in {secs:.1}s ({:.0} frames/s), \
             {failed} failed; actions: {actions}; counters: {counters}; cases: {mutations}",
            self.frames,
            self.frames as f64 / secs.max(f64::EPSILON),
        )
    }
}

/// `bytes` in hex, cut after [`OUT_SHOWN`] bytes.
fn shown(bytes: &[u8]) -> String {
    if bytes.len() > OUT_SHOWN {
        format!("{}...", hex(&bytes[..OUT_SHOWN]))
    } else {
        hex(bytes)
    }
}

/// The full report of one failure, with the frame shrunk.
fn report(world: &mut World, seed: u64, index: Option<u64>, case: &Case, f: &Failure) -> String {
    let small = shrink(world, &case.frame, f.property, SHRINK_BUDGET);
    let replay = match index {
        Some(i) => format!(
            "LB_FUZZ_SEED={seed:#x} LB_FUZZ_CASE={i} cargo test --release -p lb-tests \
             --test privileged -- fuzz --include-ignored --nocapture"
        ),
        None => format!(
            "LB_FUZZ_FRAME={} cargo test --release -p lb-tests --test privileged -- fuzz --include-ignored --nocapture",
            hex(&case.frame)
        ),
    };
    format!(
        "property \"{}\" failed: {}\n  {}: {}\n  frame ({} bytes): {}\n  out ({}, {} bytes): {}\n  \
         shrunk ({} bytes): {}\n  replay: {replay}",
        f.property,
        f.detail,
        index.map_or("frame".into(), |i| format!("case {i} of seed {seed:#x}")),
        case.description,
        case.frame.len(),
        hex(&case.frame),
        action_name(f.action),
        f.out.len(),
        shown(&f.out),
        small.len(),
        hex(&small),
    )
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn fuzz_lb_xdp() {
    require_root();
    let frames = env_u64(FRAMES_VAR).unwrap_or(DEFAULT_FRAMES);
    let seed = env_u64(SEED_VAR).unwrap_or(DEFAULT_SEED);
    let only_case = env_u64(CASE_VAR);
    // Every frame on one CPU, so it meets one CPU's per-CPU state. The
    // lab's clock stands still, so a CPU answers its first 1,000 echo
    // requests and drops the rest: a full run's requests spend that budget
    // on one CPU, but split between CPUs they might not, and the coverage
    // check would miss drop_echo_limit.
    lb_tests::pin_to_this_cpu().expect("pinning the fuzzer to one CPU");
    let mut world = World::new().expect("setting up the fuzz lab");
    let targets = world.targets();

    // The cases: a given frame, one replayed case, or the sweep then random ones.
    let sweep = generate::sweep(seed, &targets);
    let case_at = |i: u64| match sweep.get(i as usize) {
        Some(case) => case.clone(),
        None => generate::random_case(&mut generate::case_rng(seed, i), &targets),
    };
    let cases: Box<dyn Iterator<Item = (Option<u64>, Case)>> =
        match (std::env::var(FRAME_VAR).ok(), only_case) {
            (Some(text), _) => {
                let frame = unhex(&text).unwrap_or_else(|| panic!("{FRAME_VAR} is not hex"));
                let case = Case {
                    frame,
                    mutation: Mutation::None,
                    description: format!("from {FRAME_VAR}"),
                };
                Box::new(std::iter::once((None, case)))
            }
            (None, Some(i)) => Box::new(std::iter::once((Some(i), case_at(i)))),
            (None, None) => Box::new((0..frames).map(|i| (Some(i), case_at(i)))),
        };

    let started = Instant::now();
    let mut tally = Tally::default();
    let mut reports = Vec::new();
    for (index, case) in cases {
        tally.frames += 1;
        *tally.mutations.entry(case.mutation).or_default() += 1;
        match world.check(&case.frame) {
            Ok(v) => {
                *tally.actions.entry(action_name(v.action)).or_default() += 1;
                *tally.counters.entry(v.counter).or_default() += 1;
            }
            Err(f) => {
                *tally.actions.entry(action_name(f.action)).or_default() += 1;
                if let Some(c) = f.counter {
                    *tally.counters.entry(c).or_default() += 1;
                }
                let kind = format!(
                    "{} [{}]",
                    f.property,
                    f.counter.map_or("several counters", |c| c.name())
                );
                let seen = tally.failures.entry(kind).or_default();
                *seen += 1;
                if *seen == 1 && reports.len() < MAX_REPORTED {
                    reports.push(report(&mut world, seed, index, &case, &f));
                }
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!("{}", tally.summary(seed, sweep.len(), secs));

    if let Err(e) = world.check_totals() {
        reports.push(format!("totals: {e:#}"));
    }
    let full_run = only_case.is_none() && std::env::var_os(FRAME_VAR).is_none();
    if full_run && frames >= COVERAGE_MIN_FRAMES {
        let missing: Vec<&str> = Counter::ALL
            .iter()
            .filter(|&&c| c != UNREACHABLE_IN_LAB && !tally.counters.contains_key(&c))
            .map(|c| c.name())
            .collect();
        if !missing.is_empty() {
            reports.push(format!(
                "coverage: no frame ended as {}",
                missing.join(", ")
            ));
        }
    }
    assert!(
        reports.is_empty(),
        "fuzz: {} failure(s) by property {:?}\n\n{}",
        tally.failures.values().sum::<u64>(),
        tally.failures,
        reports.join("\n\n")
    );
}

/// Frames that once broke a property keep passing.
#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn fuzz_regressions() {
    require_root();
    let mut world = World::new().expect("setting up the fuzz lab");
    let mut failures = Vec::new();
    for (what, text) in REGRESSIONS {
        let frame = unhex(text).expect("regression frames are hex");
        if let Err(f) = world.check(&frame) {
            failures.push(format!(
                "{what}: property \"{}\" failed: {}\n  frame: {text}\n  out: {}",
                f.property,
                f.detail,
                hex(&f.out)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
