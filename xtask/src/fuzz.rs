//! `cargo xtask fuzz [--frames N] [--seed S]`: the packet fuzzer of the
//! privileged tests (tests/tests/privileged/fuzz.rs) for as many frames as
//! asked, with any seed. CI runs the same test, bounded, with a fixed seed.
//!
//! The test prints one summary line (frames, verdicts, counters, time);
//! on a failure it prints the seed, the case and the frame in hex, and the
//! command that replays it.

use std::path::Path;

use anyhow::{Context as _, Result};

use crate::{exec, setup, test::INCLUDE_PRIVILEGED};

/// How many frames the test runs (it defaults to the CI run's count).
const FRAMES_VAR: &str = "LB_FUZZ_FRAMES";
/// The seed the test uses (it defaults to CI's fixed seed).
const SEED_VAR: &str = "LB_FUZZ_SEED";
/// The fuzz tests of the privileged test binary: its `fuzz` module.
const FILTER: &str = "fuzz::";

/// Runs setup, then the fuzz tests in release (the speed is the point),
/// with their output shown as it comes.
pub(crate) fn run(root: &Path, frames: Option<u64>, seed: Option<u64>) -> Result<()> {
    setup::run()?;
    let mut cmd = exec::cargo();
    cmd.current_dir(root)
        .args(["test", "--release", "--package", "lb-tests"])
        .args(["--test", "privileged", "--", FILTER, INCLUDE_PRIVILEGED])
        .arg("--nocapture");
    if let Some(frames) = frames {
        cmd.env(FRAMES_VAR, frames.to_string());
    }
    if let Some(seed) = seed {
        cmd.env(SEED_VAR, format!("{seed:#x}"));
    }
    exec::run(&mut cmd)
}

/// Parses a seed given as decimal or as `0x` hex (as the test prints it).
pub(crate) fn parse_seed(text: &str) -> Result<u64> {
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.with_context(|| format!("{text:?} is not a seed (a number, decimal or 0x hex)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_parse_in_decimal_and_hex() {
        assert_eq!(parse_seed("42").unwrap(), 42);
        assert_eq!(
            parse_seed("0x6c622d66757a7a31").unwrap(),
            0x6c62_2d66_757a_7a31
        );
        assert!(parse_seed("seed").is_err());
        assert!(parse_seed("0xg").is_err());
    }
}
