//! `cargo xtask demo`: build `lb`, then run `lb demo` in the foreground.

use std::path::Path;

use anyhow::Result;

use crate::{build, exec};

/// Builds the release binary and runs its demo (`--keep` with `keep`, the
/// fleet demo with `fleet`).
pub(crate) fn run(root: &Path, keep: bool, fleet: bool) -> Result<()> {
    let lb = build::build(root, false)?;
    let mut cmd = exec::command(&lb);
    cmd.arg("demo");
    if keep {
        cmd.arg("--keep");
    }
    if fleet {
        cmd.arg("--fleet");
    }
    exec::run(&mut cmd)
}
