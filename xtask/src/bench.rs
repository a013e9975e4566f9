//! `cargo xtask bench`: lb's benchmarks, written to `BENCHMARKS.md` (tables)
//! and `bench/results.json` (every sample).
//!
//! Steps: setup, with the benchmarks' own packages; build `lb` (the memory part runs the real daemon); the
//! criterion bench of the Maglev builder; then `lb-bench` (needs root: it
//! loads XDP programs), which measures the rest and writes both files,
//! taking the build times from criterion's estimates. With `--render`,
//! only the last step's report, from the results already there.

use std::path::Path;

use anyhow::Result;

use crate::{baseline, build, exec, setup};

/// The report, at the workspace root.
const REPORT: &str = "BENCHMARKS.md";
/// The raw results, beside the report.
const RESULTS: &str = "bench/results.json";
/// The package and bench target of the Maglev builder's criterion bench.
const MAGLEV_BENCH: [&str; 4] = ["--package", "lb-userspace", "--bench", "maglev"];
/// The package of the benchmark driver.
const DRIVER: &str = "lb-bench";

/// Runs every benchmark (or the parts in `only`); `quick` trades precision
/// for a run under five minutes (the same paths and configurations, fewer
/// iterations); `baseline` adds lb's object at that revision to the
/// data-plane part; `driver_args` go to `lb-bench` as they are.
pub(crate) fn run(
    root: &Path,
    quick: bool,
    baseline: Option<&str>,
    only: &[String],
    driver_args: &[String],
) -> Result<()> {
    // Built first: it runs setup, which the baseline's build needs too.
    let lb = build::build(root, false)?;
    let baseline = baseline
        .map(|rev| baseline::object(root, rev))
        .transpose()?;
    setup::bench()?;
    let criterion = build::target_dir(root).join("criterion");

    // The Maglev build times feed the control part only.
    if only.is_empty() || only.iter().any(|p| p == "control") {
        let mut maglev = exec::cargo();
        maglev
            .current_dir(root)
            .arg("bench")
            .args(MAGLEV_BENCH)
            // Where criterion writes its estimates, so the driver finds them
            // whatever the target directory.
            .env("CRITERION_HOME", &criterion)
            .arg("--");
        if quick {
            maglev.arg("--quick");
        }
        exec::run(&mut maglev)?;
    }

    // A partial or narrowed run is not the report of record: it goes
    // beside the build.
    let (report, results) = if only.is_empty() && driver_args.is_empty() {
        (root.join(REPORT), root.join(RESULTS))
    } else {
        let dir = build::target_dir(root).join("bench");
        (
            dir.join(REPORT),
            dir.join(Path::new(RESULTS).file_name().unwrap_or_default()),
        )
    };
    let mut driver = driver(root);
    driver
        .arg("--out")
        .arg(&report)
        .arg("--json")
        .arg(&results)
        .arg("--lb")
        .arg(&lb)
        .arg("--criterion")
        .arg(&criterion);
    if quick {
        driver.arg("--quick");
    }
    if let Some((commit, object)) = &baseline {
        driver
            .args(["--baseline-rev", commit])
            .arg("--baseline-object")
            .arg(object);
    }
    if !only.is_empty() {
        driver.arg("--only").arg(only.join(","));
    }
    driver.args(driver_args);
    exec::run(&mut driver)
}

/// Writes `BENCHMARKS.md` again from `bench/results.json`, measuring
/// nothing: the report of record after an edit to the report's code or to
/// `bench/levers.md`, which the driver builds in.
pub(crate) fn render(root: &Path) -> Result<()> {
    // The driver's build script builds the eBPF objects.
    setup::run()?;
    exec::run(
        driver(root)
            .arg("--render")
            .arg(root.join(RESULTS))
            .arg("--out")
            .arg(root.join(REPORT)),
    )
}

/// `cargo run` of the benchmark driver, its own arguments to follow.
fn driver(root: &Path) -> std::process::Command {
    let mut driver = exec::cargo();
    driver
        .current_dir(root)
        .args(["run", "--release", "--package", DRIVER, "--"]);
    driver
}
