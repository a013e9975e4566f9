//! `cargo xtask build`: the `lb` binary with the eBPF object embedded.

use std::env;
use std::path::{Path, PathBuf};

use anyhow::{Result, ensure};

use crate::{exec, setup};

/// The package that holds the `lb` binary; its build script builds the eBPF
/// crate (aya-build) and embeds the object.
pub(crate) const PACKAGE: &str = "lb-userspace";

/// The binary operators run.
const BINARY: &str = "lb";

/// Runs setup, builds `lb` (release unless `debug`) and prints where it is.
pub(crate) fn run(root: &Path, debug: bool) -> Result<()> {
    let binary = build(root, debug)?;
    println!("{BINARY}: {}", binary.display());
    Ok(())
}

/// Runs setup and builds `lb`; returns the binary's path.
pub(crate) fn build(root: &Path, debug: bool) -> Result<PathBuf> {
    setup::run()?;
    let mut cargo = exec::cargo();
    cargo.current_dir(root).arg("build");
    if !debug {
        cargo.arg("--release");
    }
    cargo.args(["-p", PACKAGE]);
    exec::run(&mut cargo)?;

    let binary = target_dir(root)
        .join(if debug { "debug" } else { "release" })
        .join(BINARY);
    ensure!(
        binary.is_file(),
        "cargo built {PACKAGE} but {} does not exist: is a target dir set in a cargo config?",
        binary.display()
    );
    Ok(binary)
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (relative to the workspace,
/// where cargo runs; an absolute one replaces it in `join`) or
/// `<workspace>/target`.
pub(crate) fn target_dir(root: &Path) -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(|dir| root.join(dir))
        .unwrap_or_else(|| root.join("target"))
}
