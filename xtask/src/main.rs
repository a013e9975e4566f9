//! Developer entry points for lb: `cargo xtask setup|build|demo|test|fuzz|bench|package`.
//!
//! # Layout
//!
//! - `setup`: installs what a fresh machine lacks (nightly's rust-src,
//!   bpf-linker built against the nightly's LLVM, Debian packages).
//! - `build`: builds the `lb` binary with the eBPF object embedded.
//! - `demo`: builds, then runs `lb demo` (the README's first command).
//! - `test`: formatting, every test with privileged tests required, clippy,
//!   and a one-line summary.
//! - `fuzz`: the packet fuzzer of the XDP program, for any number of frames.
//! - `bench`: the benchmarks, into BENCHMARKS.md and bench/results.json.
//! - `package`: the Debian package (cargo-deb), with lb(8) and completions.
//! - `baseline`: lb's eBPF object at an earlier revision, for `bench --baseline`.
//! - `exec`: how every external command is run, echoed and checked.

mod baseline;
mod bench;
mod build;
mod demo;
mod exec;
mod fuzz;
mod package;
mod setup;
mod test;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

/// `cargo xtask`: set up, build and test lb.
#[derive(Debug, Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", about)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

/// The tasks, one module each.
#[derive(Debug, Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent; quiet when done).
    Setup,
    /// Run setup, then build the `lb` binary (release unless --debug).
    Build {
        /// Build the debug profile instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Run setup, build, then `lb demo`: the product end to end in network namespaces.
    Demo {
        /// Leave the demo running until Ctrl-C (`lb demo --keep`).
        #[arg(long)]
        keep: bool,
        /// Three lb nodes behind a BGP router with one etcd (`lb demo --fleet`).
        #[arg(long)]
        fleet: bool,
    },
    /// Run setup, build, then every benchmark (needs root): BENCHMARKS.md and bench/results.json.
    Bench {
        /// The same paths with fewer iterations: under five minutes, less precise.
        #[arg(long)]
        quick: bool,
        /// Also run lb's XDP object as it was at this git revision, side by
        /// side with the current one (data-plane part; a worktree build).
        #[arg(long, value_name = "REV")]
        baseline: Option<String>,
        /// Only these parts (dataplane, live, control, memory, proxies,
        /// reaction, fleet); all by default.
        #[arg(long, value_delimiter = ',', value_name = "PARTS")]
        only: Vec<String>,
        /// Arguments for `lb-bench`, after `--` (e.g. `--backends 100
        /// --services 4 --many-flows 0 --rounds 21` for an A/B of one group).
        #[arg(last = true)]
        driver_args: Vec<String>,
        /// Measure nothing: write BENCHMARKS.md again from
        /// bench/results.json with the current report code and
        /// bench/levers.md, after an edit to either (no root needed).
        #[arg(long, conflicts_with_all = ["quick", "baseline", "only", "driver_args"])]
        render: bool,
    },
    /// Run setup, then cargo fmt --check, cargo test and cargo clippy.
    Test {
        /// Arguments for `cargo test`, after `--` (e.g. a test name filter).
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Run setup, then the packet fuzzer on the XDP program (needs root).
    Fuzz {
        /// Frames to run (default: the CI run's 200,000).
        #[arg(long)]
        frames: Option<u64>,
        /// Seed, decimal or 0x hex (default: CI's fixed seed).
        #[arg(long, value_parser = fuzz::parse_seed)]
        seed: Option<u64>,
    },
    /// Run setup, build, then the Debian package (cargo-deb) in target/debian:
    /// the binary, the systemd unit, lb(8), completions and the examples.
    Package,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let root = match workspace_root() {
        Ok(root) => root,
        Err(error) => return fail(&error),
    };
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Build { debug } => build::run(&root, debug),
        Task::Bench {
            quick,
            baseline,
            only,
            driver_args,
            render,
        } => {
            if render {
                bench::render(&root)
            } else {
                bench::run(&root, quick, baseline.as_deref(), &only, &driver_args)
            }
        }
        Task::Demo { keep, fleet } => demo::run(&root, keep, fleet),
        Task::Fuzz { frames, seed } => fuzz::run(&root, frames, seed),
        Task::Package => package::run(&root).map(drop),
        // Reports its own failures: its summary line must come last.
        Task::Test { cargo_test_args } => return test::run(&root, &cargo_test_args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&error),
    }
}

fn fail(error: &anyhow::Error) -> ExitCode {
    eprintln!("error: {error:#}");
    ExitCode::FAILURE
}

/// The workspace root: xtask lives one level below it, so this holds
/// whichever directory cargo was started from.
fn workspace_root() -> Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .context("xtask's manifest directory has no parent")
}
