//! `lb-bench`: lb's benchmarks, run by `cargo xtask bench` (as root: it
//! loads XDP programs). Writes the report (BENCHMARKS.md) and the raw
//! results (JSON).
//!
//! Every figure is measured in this run next to its reference on this
//! machine and reported as a ratio to it.
//!
//! # Layout
//! - `dataplane`: ns per packet of every XDP path against two floors,
//!   with BPF_PROG_TEST_RUN (`frames`, `harness`).
//! - `live`: packets per second forwarded from a real generator (trafgen)
//!   through an attached program, lb against the swap floor.
//! - `proxies`: lb against HAProxy and nginx as L4 proxies, under wrk.
//! - `reaction`: set-weight to a live table, eviction after a backend dies.
//! - `fleet`: node failure to the router's withdrawal, a change live on
//!   every node, etcd latency.
//! - `control`: Maglev table quality and build time.
//! - `memory`: the daemon's resident memory and its maps' memory.
//! - `machine`: what the machine is; CPU pinning and the CPU-time clock.
//! - `stats`: min, median, spread.
//! - `report`: BENCHMARKS.md from the results.

mod control;
mod dataplane;
mod fleet;
mod live;
mod machine;
mod memory;
mod procs;
mod proxies;
mod reaction;
mod report;
mod stats;
mod storm;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, Result, ensure};
use clap::Parser;
use serde::{Deserialize, Serialize};

/// lb's benchmarks: data-plane cost per packet, Maglev quality, memory.
#[derive(Debug, Parser)]
#[command(name = "lb-bench", about)]
struct Cli {
    /// Fewer iterations and rounds (the same paths): under five minutes.
    #[arg(long)]
    quick: bool,
    /// Where to write the report.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Where to write the raw results.
    #[arg(long, default_value = "bench/results.json")]
    json: PathBuf,
    /// Measure nothing: render the report at `--out` from these raw results
    /// of an earlier run, with this build's report code and levers (after
    /// an edit to bench/levers.md or to the report, say). Needs no root.
    #[arg(long, value_name = "RESULTS", conflicts_with_all = [
        "quick", "lb", "criterion", "baseline_object", "only", "backends", "services",
        "many_flows", "paths", "rounds", "many_flows_loads", "source_prefixes",
    ])]
    render: Option<PathBuf>,
    /// The `lb` binary, for the daemon's memory (skipped without it).
    #[arg(long)]
    lb: Option<PathBuf>,
    /// Criterion's output directory, for the Maglev build times.
    #[arg(long)]
    criterion: Option<PathBuf>,
    /// lb's XDP object built at an earlier revision, run beside the current
    /// one in the data-plane part (`cargo xtask bench --baseline REV`).
    #[arg(long, requires = "baseline_rev")]
    baseline_object: Option<PathBuf>,
    /// The commit the baseline object was built from.
    #[arg(long, requires = "baseline_object")]
    baseline_rev: Option<String>,
    /// Only these parts (dataplane, live, control, memory, proxies,
    /// reaction, fleet, storm); all by default.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Data plane: only the groups with these backends per service (an
    /// A/B of one change needs fewer groups and more rounds).
    #[arg(long, value_delimiter = ',')]
    backends: Vec<u32>,
    /// Data plane: only the groups with these services in the table.
    #[arg(long, value_delimiter = ',')]
    services: Vec<u32>,
    /// Data plane: only these many-flows groups (0: none).
    #[arg(long, value_delimiter = ',')]
    many_flows: Vec<u32>,
    /// Data plane: only these paths in the matrix groups (the floors always).
    #[arg(long, value_delimiter = ',', value_enum)]
    paths: Vec<dataplane::Path>,
    /// Data plane: timed rounds per case, in place of the plan's (in each
    /// load of the many-flows groups). At least one: without a round
    /// every median is undefined.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    rounds: Option<u16>,
    /// Data plane: loads of the many-flows groups (objects loaded afresh
    /// each time), in place of the plan's.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    many_flows_loads: Option<u16>,
    /// Data plane: prefixes per source list in the source-lists groups
    /// (0: none).
    #[arg(long)]
    source_prefixes: Option<u32>,
}

/// Everything one run measured.
#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    /// `lb-bench`'s version.
    pub version: String,
    /// When the run started, UTC (RFC 3339).
    pub started: String,
    /// Whether this was a `--quick` run.
    pub quick: bool,
    /// The machine.
    pub machine: machine::Machine,
    /// Data-plane cost per packet.
    pub dataplane: Option<dataplane::DataplaneResults>,
    /// Live forwarding rates.
    pub live: Option<live::LiveResults>,
    /// Maglev quality and build time.
    pub control: Option<control::ControlResults>,
    /// Resident and map memory.
    pub memory: Option<memory::MemoryResults>,
    /// lb against HAProxy and nginx.
    pub proxies: Option<proxies::ProxyResults>,
    /// The daemon's reaction times.
    pub reaction: Option<reaction::ReactionResults>,
    /// The fleet: failures, propagation, etcd.
    pub fleet: Option<fleet::FleetResults>,
    /// The controller under a probe storm.
    pub storm: Option<storm::StormResults>,
}

fn main() -> ExitCode {
    match run(&Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn wanted(cli: &Cli, part: &str) -> bool {
    cli.only.is_empty() || cli.only.iter().any(|p| p == part)
}

/// The data-plane plan, narrowed by the command line.
fn plan(cli: &Cli) -> dataplane::Plan {
    let mut plan = dataplane::Plan::new(cli.quick);
    if !cli.backends.is_empty() {
        plan.backends.clone_from(&cli.backends);
    }
    if !cli.services.is_empty() {
        plan.services.clone_from(&cli.services);
    }
    if !cli.many_flows.is_empty() {
        plan.many_flows = cli.many_flows.iter().copied().filter(|&n| n > 0).collect();
    }
    plan.paths.clone_from(&cli.paths);
    if let Some(rounds) = cli.rounds {
        plan.rounds = rounds.into();
        plan.many_flows_rounds = rounds.into();
    }
    if let Some(loads) = cli.many_flows_loads {
        plan.many_flows_loads = usize::from(loads);
    }
    if let Some(prefixes) = cli.source_prefixes {
        plan.source_prefixes = prefixes;
    }
    plan
}

fn run(cli: &Cli) -> Result<()> {
    if let Some(from) = &cli.render {
        return rerender(from, &cli.out);
    }
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "lb-bench loads XDP programs: run it as root"
    );
    // The last CPU: the first tends to take more interrupts.
    let cpu = machine::online_cpus() - 1;
    machine::pin_to(cpu).context("pinning to one CPU")?;
    let mut results = Results {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started: machine::now_utc(),
        quick: cli.quick,
        machine: machine::describe(cpu),
        dataplane: None,
        live: None,
        control: None,
        memory: None,
        proxies: None,
        reaction: None,
        fleet: None,
        storm: None,
    };
    if wanted(cli, "dataplane") {
        let baseline = cli
            .baseline_rev
            .as_deref()
            .zip(cli.baseline_object.as_deref());
        let others = machine::OthersOnCpu::start(cpu);
        results.dataplane = Some(dataplane::run(&plan(cli), baseline)?);
        results.machine.others_on_pinned_cpu = Some(others.share());
    }
    if wanted(cli, "live") {
        results.live = Some(live::run(live::Plan::new(cli.quick))?);
    }
    if wanted(cli, "control") {
        results.control = Some(control::run(cli.quick, cli.criterion.as_deref())?);
    }
    if wanted(cli, "memory") {
        results.memory = match &cli.lb {
            Some(lb) => Some(memory::run(lb)?),
            None => {
                eprintln!("memory: skipped (no --lb binary given)");
                None
            }
        };
    }
    // The parts below run real processes (client, servers, proxies, the
    // daemon), which must be free to use every CPU, as in production.
    if ["proxies", "reaction", "fleet", "storm"]
        .iter()
        .any(|p| wanted(cli, p))
    {
        machine::unpin().context("unpinning")?;
    }
    if wanted(cli, "proxies") {
        results.proxies = Some(proxies::run(proxies::Plan::new(cli.quick))?);
    }
    if wanted(cli, "reaction") {
        results.reaction = Some(reaction::run(reaction::Plan::new(cli.quick))?);
    }
    if wanted(cli, "fleet") {
        results.fleet = Some(fleet::run(fleet::Plan::new(cli.quick))?);
    }
    if wanted(cli, "storm") {
        results.storm = Some(storm::run(storm::Plan::new(cli.quick))?);
    }
    results.machine.loadavg_end = machine::loadavg();
    write(&cli.json, &serde_json::to_string_pretty(&results)?)?;
    write(&cli.out, &report::render(&results))?;
    eprintln!("wrote {} and {}", cli.out.display(), cli.json.display());
    Ok(())
}

/// Writes the report at `out` from the raw results at `from`.
fn rerender(from: &Path, out: &Path) -> Result<()> {
    let results = read_results(from)?;
    write(out, &report::render(&results))?;
    eprintln!("wrote {} from {}", out.display(), from.display());
    Ok(())
}

/// The raw results at `path`, as a run of this version wrote them.
fn read_results(path: &Path) -> Result<Results> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not the raw results of a run of this lb-bench",
            path.display()
        )
    })
}

fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The report of record is what its raw results render to with this
    /// build's report code and levers: a change to either that was not
    /// followed by `cargo xtask bench --render` (or a whole run) fails here,
    /// at the first line that differs.
    #[test]
    fn the_report_of_record_renders_from_its_results() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let results = read_results(&root.join("bench/results.json")).unwrap();
        let rendered = report::render(&results);
        let committed = std::fs::read_to_string(root.join("BENCHMARKS.md")).unwrap();
        let mut committed_lines = committed.lines();
        for (i, line) in rendered.lines().enumerate() {
            assert_eq!(
                committed_lines.next(),
                Some(line),
                "BENCHMARKS.md line {} is not what bench/results.json renders to: \
                 run `cargo xtask bench --render`",
                i + 1
            );
        }
        assert_eq!(
            committed_lines.next(),
            None,
            "BENCHMARKS.md runs on past its rendering: run `cargo xtask bench --render`"
        );
    }
}
