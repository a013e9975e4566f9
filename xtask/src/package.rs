//! `cargo xtask package`: lb as a Debian package, built by cargo-deb from
//! `[package.metadata.deb]` in lb-userspace's manifest: the binary, the
//! systemd unit, the example configuration and Grafana dashboard, lb(8)
//! and shell completions. The man page and completions are generated here
//! by the binary itself (`lb man`, `lb completions`), so they always match
//! the CLI that ships.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use crate::{build, exec, setup};

/// Where the generated assets go: under `target/release/`, which cargo-deb
/// resolves to the build's own target directory.
const ASSETS_DIR: &str = "deb-assets";
/// The shells with completions, and the file each one's package dir wants.
const COMPLETIONS: [(&str, &str); 3] = [("bash", "lb.bash"), ("zsh", "_lb"), ("fish", "lb.fish")];

/// Runs setup, builds lb, generates its man page and completions, and
/// builds the package; returns its path.
pub(crate) fn run(root: &Path) -> Result<PathBuf> {
    let binary = build::build(root, false)?;
    setup::package()?;
    let release = build::target_dir(root).join("release");
    let assets = release.join(ASSETS_DIR);
    if assets.exists() {
        fs::remove_dir_all(&assets)?;
    }
    fs::create_dir_all(&assets)?;
    let page = exec::query(exec::command(&binary).arg("man"))?;
    fs::write(assets.join("lb.8"), page)?;
    // -n: no name or time stamp inside, so equal pages give equal packages.
    exec::run(
        exec::command("gzip")
            .args(["-9", "-n", "-f"])
            .arg(assets.join("lb.8")),
    )?;
    for (shell, file) in COMPLETIONS {
        let script = exec::query(exec::command(&binary).args(["completions", shell]))?;
        fs::write(assets.join(file), script)?;
    }
    let out = build::target_dir(root).join("debian");
    exec::run(
        exec::cargo()
            .current_dir(root)
            .args([
                "deb",
                "-p",
                build::PACKAGE,
                "--no-build",
                "--no-strip",
                "--output",
            ])
            .arg(&out),
    )?;
    let deb = fs::read_dir(&out)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .max_by_key(|p| fs::metadata(p).and_then(|m| m.modified()).ok())
        .context("cargo deb made no .deb")?;
    println!("package: {}", deb.display());
    Ok(deb)
}
