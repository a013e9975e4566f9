//! `cargo xtask test`: the build and the Debian package, formatting, every test, and clippy, then one summary
//! line for machines: `xtask test: N passed, N failed[, N skipped]`.
//!
//! Every step runs even when an earlier one failed, so one CI run reports
//! all problems; the exit status is non-zero if any step failed, any test
//! failed, or no test ran at all.

use std::ops::AddAssign;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

use crate::{build, exec, package};

/// The libtest flag that runs the tests that need root: they are
/// `#[ignore]`d (with that reason) so that a plain `cargo test` lists them
/// as ignored rather than passing them unrun (see `lb_tests::require_root`).
pub(crate) const INCLUDE_PRIVILEGED: &str = "--include-ignored";

/// `test_args` (cargo's arguments, then the harness's after `--`) with
/// [`INCLUDE_PRIVILEGED`] among the harness's.
pub(crate) fn with_privileged(test_args: &[String]) -> Vec<String> {
    let mut args = test_args.to_vec();
    if !args.iter().any(|a| a == "--") {
        args.push("--".into());
    }
    args.push(INCLUDE_PRIVILEGED.into());
    args
}

/// Clippy for the eBPF crates (lb's programs and the benchmark-only ones),
/// on their own target with the nightly toolchain.
const EBPF_CLIPPY: &[&str] = &[
    "run",
    "nightly",
    "cargo",
    "clippy",
    "--package",
    "lb-ebpf",
    "--package",
    "lb-bench-ebpf",
    "--release",
    "--target",
    "bpfel-unknown-none",
    "-Z",
    "build-std=core",
    "--",
    "-D",
    "warnings",
];

/// Runs setup and the build, `cargo fmt --check`, `cargo test` (with `test_args`
/// appended) and `cargo clippy` from `root`, then prints the summary line.
pub(crate) fn run(root: &Path, test_args: &[String]) -> ExitCode {
    let mut totals = Counts::default();
    let mut failed_steps = 0_u32;
    let mut step = |result: Result<()>| {
        if let Err(error) = result {
            eprintln!("error: {error:#}");
            failed_steps += 1;
        }
    };

    // The same build as `cargo xtask build`: the privileged tests run the
    // `lb` binary it leaves in target/release.
    match build::build(root, false) {
        Err(error) => step(Err(
            error.context("setup or the build of lb failed, so nothing was tested")
        )),
        Ok(_) => {
            // The package's test installs what this builds.
            step(package::run(root).map(drop));
            step(check_format(root));
            step(run_tests(root, test_args, &mut totals));
            step(run_clippy(root));
            step(exec::run(
                std::process::Command::new("rustup")
                    .current_dir(root)
                    .args(EBPF_CLIPPY),
            ));
        }
    }

    // Zero tests means a filter matched nothing or the harness output
    // changed: either way nothing was verified.
    let nothing_ran = totals.passed == 0;
    if nothing_ran && failed_steps == 0 {
        eprintln!("error: no test passed (a filter that matches nothing?)");
    }
    // Every test runs here, those that need root included: one left out
    // was not verified.
    if totals.ignored > 0 {
        eprintln!("error: {} test(s) ignored", totals.ignored);
    }
    println!("{}", totals.summary(failed_steps));
    if failed_steps > 0 || totals.failed > 0 || nothing_ran || totals.ignored > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn check_format(root: &Path) -> Result<()> {
    exec::run(
        exec::cargo()
            .current_dir(root)
            .args(["fmt", "--all", "--", "--check"]),
    )
}

/// The workspace's default members: everything but the eBPF crates, which
/// only build for the BPF target (build scripts build them; clippy checks
/// them on their own). `--release` shares the eBPF build (and everything
/// else) with `cargo xtask build`. `--no-fail-fast` keeps going after a failing test
/// binary so the counts cover every test.
fn run_tests(root: &Path, test_args: &[String], totals: &mut Counts) -> Result<()> {
    exec::run_tee_stdout(
        exec::cargo()
            .current_dir(root)
            .arg("test")
            .args(["--release", "--no-fail-fast"])
            .args(with_privileged(test_args)),
        |line| {
            if let Some(counts) = parse_test_result(line) {
                *totals += counts;
            }
        },
    )
}

fn run_clippy(root: &Path) -> Result<()> {
    exec::run(exec::cargo().current_dir(root).arg("clippy").args([
        "--release",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
}

/// Test counts from libtest's result lines.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl AddAssign for Counts {
    fn add_assign(&mut self, other: Self) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
    }
}

impl Counts {
    /// The machine-readable summary; ignored tests and failed steps (a
    /// build, fmt, clippy, a test binary that died without its result
    /// line) show only when there are some.
    fn summary(&self, failed_steps: u32) -> String {
        let mut line = format!("xtask test: {} passed, {} failed", self.passed, self.failed);
        if self.ignored > 0 {
            line.push_str(&format!(", {} skipped", self.ignored));
        }
        if failed_steps > 0 {
            line.push_str(&format!(", {failed_steps} steps failed"));
        }
        line
    }
}

/// Parses libtest's per-binary line,
/// `test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; ...`
/// (`FAILED.` instead of `ok.` when a test failed).
fn parse_test_result(line: &str) -> Option<Counts> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let (_verdict, fields) = rest.split_once(". ")?;
    let mut counts = Counts::default();
    for field in fields.split(';') {
        let Some((number, label)) = field.trim().split_once(' ') else {
            continue;
        };
        let Ok(number) = number.parse() else {
            continue;
        };
        match label {
            "passed" => counts.passed = number,
            "failed" => counts.failed = number,
            "ignored" => counts.ignored = number,
            _ => {}
        }
    }
    Some(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_passing_result_line() {
        let line = "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; \
                    0 filtered out; finished in 0.42s\n";
        assert_eq!(
            parse_test_result(line),
            Some(Counts {
                passed: 12,
                failed: 0,
                ignored: 1
            })
        );
    }

    #[test]
    fn parses_a_failing_result_line() {
        let line = "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; \
                    0 filtered out; finished in 1.00s";
        assert_eq!(
            parse_test_result(line),
            Some(Counts {
                passed: 3,
                failed: 2,
                ignored: 0
            })
        );
    }

    #[test]
    fn ignores_other_lines() {
        assert_eq!(parse_test_result("test flow::hash ... ok"), None);
        assert_eq!(parse_test_result("running 12 tests"), None);
    }

    #[test]
    fn the_tests_that_need_root_are_included_after_any_filter() {
        let args = |v: &[&str]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(with_privileged(&[]), args(&["--", INCLUDE_PRIVILEGED]));
        assert_eq!(
            with_privileged(&args(&["--", "fixtures"])),
            args(&["--", "fixtures", INCLUDE_PRIVILEGED])
        );
        assert_eq!(
            with_privileged(&args(&["-p", "lb-tests"])),
            args(&["-p", "lb-tests", "--", INCLUDE_PRIVILEGED])
        );
    }

    #[test]
    fn summary_mentions_skipped_only_when_some_were() {
        let mut counts = Counts {
            passed: 5,
            failed: 1,
            ignored: 0,
        };
        assert_eq!(counts.summary(0), "xtask test: 5 passed, 1 failed");
        counts += Counts {
            passed: 1,
            failed: 0,
            ignored: 2,
        };
        assert_eq!(
            counts.summary(0),
            "xtask test: 6 passed, 1 failed, 2 skipped"
        );
        assert_eq!(
            counts.summary(2),
            "xtask test: 6 passed, 1 failed, 2 skipped, 2 steps failed"
        );
    }
}
