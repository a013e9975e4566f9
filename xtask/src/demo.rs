//! `cargo xtask demo`: build `lb`, then run `lb demo` in the foreground.

use std::path::Path;

use anyhow::Result;

use crate::{build, exec};

/// Builds the release binary and runs its demo.
pub fn run(root: &Path) -> Result<()> {
    let lb = build::build(root, false)?;
    exec::run(exec::command(&lb).arg("demo"))
}
