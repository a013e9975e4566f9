//! The Debian package `cargo xtask package` builds (cargo xtask test builds
//! it before the tests): `dpkg -i` installs it into a scratch root (its own
//! dpkg database, nothing on the host touched), where the binary runs, the
//! man page renders with `man -l`, the unit and completions are where
//! systemd and the shells look, and `dpkg -r` removes it all again.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context as _, Result, ensure};
use lb_tests::{Scratch, daemon::lb_binary, require_root};

#[test]
#[ignore = "needs root and the package cargo xtask package builds: cargo xtask test runs it"]
fn the_package_installs_the_binary_unit_man_page_and_completions() {
    require_root();
    run().unwrap();
}

/// The newest `lb_*.deb` in `target/debian`.
fn package() -> Result<PathBuf> {
    let release = lb_binary()?
        .parent()
        .context("the binary has no directory")?
        .to_path_buf();
    let debian = release
        .parent()
        .context("no target directory")?
        .join("debian");
    std::fs::read_dir(&debian)
        .with_context(|| format!("{}: run cargo xtask package", debian.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("lb_") && n.ends_with(".deb"))
        })
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .with_context(|| {
            format!(
                "no lb_*.deb in {}: run cargo xtask package",
                debian.display()
            )
        })
}

fn run() -> Result<()> {
    let deb = package()?;
    let root = Scratch::new("dpkg")?;
    install_and_remove(&deb, &root.dir)
}

fn dpkg(root: &Path, args: &[&str]) -> Result<Output> {
    let out = Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(args)
        .output()
        .context("running dpkg")?;
    ensure!(
        out.status.success(),
        "dpkg {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

fn install_and_remove(deb: &Path, root: &Path) -> Result<()> {
    // An empty dpkg database of the scratch root's own.
    let admin = root.join("var/lib/dpkg");
    for dir in ["info", "updates", "triggers"] {
        std::fs::create_dir_all(admin.join(dir))?;
    }
    for file in ["status", "available"] {
        std::fs::write(admin.join(file), "")?;
    }
    // The root holds no libc6 or iproute2 for `Depends` to find: the
    // host's are what the binary runs with here.
    dpkg(
        root,
        &["--force-depends", "--install", &deb.display().to_string()],
    )?;

    let lb = root.join("usr/bin/lb");
    let version = Command::new(&lb).arg("--version").output()?;
    let version = String::from_utf8_lossy(&version.stdout);
    ensure!(
        version.trim() == format!("lb {}", env!("CARGO_PKG_VERSION")),
        "lb --version: {version}"
    );
    let man = Command::new("man")
        .arg("-l")
        .arg(root.join("usr/share/man/man8/lb.8.gz"))
        .env("MANWIDTH", "80")
        .output()?;
    let page = String::from_utf8_lossy(&man.stdout);
    ensure!(
        man.status.success() && page.contains("lb(8)") && page.contains("reload"),
        "man -l lb.8.gz:\n{page}"
    );
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/lb.service"))?;
    ensure!(
        unit == include_str!("../../../examples/lb.service"),
        "the packaged unit is not examples/lb.service"
    );
    for path in [
        "usr/share/bash-completion/completions/lb",
        "usr/share/zsh/vendor-completions/_lb",
        "usr/share/fish/vendor_completions.d/lb.fish",
        "usr/share/doc/lb/examples/lb.toml",
        "usr/share/doc/lb/examples/grafana-dashboard.json",
    ] {
        let text = std::fs::read_to_string(root.join(path)).with_context(|| path.to_string())?;
        ensure!(!text.is_empty(), "{path} is empty");
    }
    let listed = String::from_utf8_lossy(&dpkg(root, &["--listfiles", "lb"])?.stdout).into_owned();
    ensure!(listed.contains("/usr/bin/lb"), "{listed}");

    dpkg(root, &["--remove", "lb"])?;
    ensure!(!lb.exists(), "dpkg --remove left /usr/bin/lb");
    Ok(())
}
