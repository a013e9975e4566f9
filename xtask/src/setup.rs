//! `cargo xtask setup`: makes a fresh machine able to build and test lb.
//!
//! Idempotent and silent when nothing is missing; prints one line per thing
//! it installs. Needs rustup with a `nightly` toolchain, and root for the
//! Debian packages.

use std::fs;
use std::os::unix::fs::{PermissionsExt as _, symlink};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::exec;

/// The toolchain that builds the eBPF crate (aya-build needs `-Z build-std`).
const NIGHTLY: &str = "nightly";

/// The bpf-linker release known to work with aya 0.14 and LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Where the LLVM prefix that bpf-linker is built against lives, under
/// cargo's home. bpf-linker's RUNPATH points at `<prefix>/lib`, so the prefix
/// must outlive the build: under `target/` a `cargo clean` (or removing one
/// of several checkouts sharing `~/.cargo/bin/bpf-linker`) would break it.
const LLVM_PREFIX_DIR: &str = "bpf-linker-llvm";

/// Debian packages the build, the privileged tests and the demo need: `ip`
/// (netns, veth, XDP attach), `ethtool` (offloads on veth), `bpftool`
/// (inspecting maps and programs), BIRD 2 and etcd for the fleet, nftables
/// (a firewall that drops one node's probes in the fleet tests), openssl
/// (their etcd certificates), `protoc` with its well-known types, which
/// etcd-client's build runs, `ping` (an operator's check of a VIP that
/// answers echo), headless Chromium with its WebDriver server (the status
/// page's test opens the page in a real browser), and `systemd-analyze`
/// and `man` (the unit's and the man page's test). Packages are installed
/// with services held back ([`HeldServices`]): bird2, etcd-server, nginx
/// and haproxy would otherwise start on the host as they are installed,
/// where nothing uses them (tests start their own in namespaces).
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "bpftool",
    "nftables",
    "openssl",
    "bird2",
    "etcd-server",
    "protobuf-compiler",
    "libprotobuf-dev",
    "iputils-ping",
    "chromium",
    "chromium-driver",
    "systemd",
    "man-db",
];

/// The cargo-deb `cargo xtask package` builds the package with.
const CARGO_DEB_VERSION: &str = "3.8.0";

/// Debian packages only the benchmarks call: trafgen (netsniff-ng) for live
/// forwarding, and the proxies lb is compared with and their load: HAProxy,
/// nginx with its stream module, wrk. nginx's package would start a server
/// on port 80 where an init system runs; the benchmarks start their own.
const BENCH_PACKAGES: &[&str] = &[
    "netsniff-ng",
    "haproxy",
    "nginx",
    "libnginx-mod-stream",
    "wrk",
];

/// Installs whatever is missing: nightly's rust-src, bpf-linker and the
/// Debian packages.
pub(crate) fn run() -> Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_debian_packages(DEBIAN_PACKAGES)
}

/// Installs what `cargo xtask package` needs beyond [`run`]'s: cargo-deb.
pub(crate) fn package() -> Result<()> {
    let found = exec::probe(exec::cargo().args(["deb", "--version"]))?
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    // `cargo-deb 3.8.0`
    if found.as_deref().and_then(|v| v.split_whitespace().nth(1)) == Some(CARGO_DEB_VERSION) {
        return Ok(());
    }
    eprintln!("setup: installing cargo-deb {CARGO_DEB_VERSION}, a minute or two");
    // Without its default features it compresses with the system's xz
    // (always on Debian) instead of building liblzma.
    exec::run(exec::cargo().args([
        "install",
        "cargo-deb",
        "--version",
        CARGO_DEB_VERSION,
        "--locked",
        "--no-default-features",
    ]))
    .context("installing cargo-deb failed: it needs crates.io access")
}

/// Installs what the benchmarks need beyond [`run`]'s.
pub(crate) fn bench() -> Result<()> {
    ensure_debian_packages(BENCH_PACKAGES)
}

/// aya-build compiles `core` for the BPF target, which needs the sources.
fn ensure_rust_src() -> Result<()> {
    let installed = exec::query(exec::command("rustup").args([
        "component",
        "list",
        "--toolchain",
        NIGHTLY,
        "--installed",
    ]))
    .context(
        "cannot list the nightly toolchain's components: \
         install it with `rustup toolchain install nightly`",
    )?;
    if installed
        .lines()
        .any(|line| line.split_whitespace().next() == Some("rust-src"))
    {
        return Ok(());
    }
    eprintln!("setup: installing rust-src for the {NIGHTLY} toolchain");
    exec::run(exec::command("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        NIGHTLY,
    ]))
    .context(
        "installing rust-src failed: check network access to static.rust-lang.org, \
         or run `rustup component add rust-src --toolchain nightly` yourself",
    )
}

fn ensure_bpf_linker() -> Result<()> {
    let found = bpf_linker_version()?;
    if found.as_deref() == Some(BPF_LINKER_VERSION) {
        return Ok(());
    }
    let why = match &found {
        Some(version) => format!("found {version}"),
        None => "none that runs".to_owned(),
    };
    eprintln!("setup: installing bpf-linker {BPF_LINKER_VERSION} ({why}), about a minute");
    install_bpf_linker().context(
        "building bpf-linker failed: it needs the nightly toolchain's libLLVM \
         (`rustup toolchain install nightly`) and crates.io access",
    )?;
    match bpf_linker_version()? {
        Some(version) if version == BPF_LINKER_VERSION => Ok(()),
        other => bail!(
            "installed bpf-linker {BPF_LINKER_VERSION}, but `bpf-linker --version` reports \
             {other:?}: remove the other bpf-linker from PATH"
        ),
    }
}

/// The version of the bpf-linker that builds would use (cargo's bin
/// directory first, then PATH), or `None` if there is none or it does not
/// run: a copy whose libLLVM went away (a nightly update removes the old
/// one) fails in the dynamic loader and must be rebuilt.
fn bpf_linker_version() -> Result<Option<String>> {
    let Some(output) = exec::probe(exec::command("bpf-linker").arg("--version"))? else {
        return Ok(None);
    };
    if !output.status.success() {
        return Ok(None);
    }
    // `bpf-linker 0.13.0`
    Ok(String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .nth(1)
        .map(str::to_owned))
}

/// Builds bpf-linker against the nightly's own libLLVM, so that the linker
/// and rustc agree on the LLVM bitcode version without a system LLVM.
fn install_bpf_linker() -> Result<()> {
    let sysroot =
        exec::query(exec::command("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))?;
    let libllvm = find_libllvm(&Path::new(sysroot.trim()).join("lib"))?;
    let version = exec::query(exec::command("rustc").args([&format!("+{NIGHTLY}"), "-vV"]))?;
    let major = llvm_major(&version)
        .with_context(|| format!("no `LLVM version: N.M` line in `rustc +{NIGHTLY} -vV`"))?;
    let prefix = make_llvm_prefix(&libllvm)?;
    exec::run(
        exec::cargo()
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            .env("LLVM_PREFIX", &prefix),
    )
}

/// The versioned shared library in the nightly's `lib/`, e.g.
/// `libLLVM.so.22.1-rust-1.97.0-nightly`. The sibling
/// `libLLVM-22-rust-*.so` is not the one: llvm-sys looks for `libLLVM.so`,
/// and the soname it records must be the versioned name.
fn find_libllvm(lib_dir: &Path) -> Result<PathBuf> {
    let entries = fs::read_dir(lib_dir)
        .with_context(|| format!("cannot read the nightly's {}", lib_dir.display()))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot read {}", lib_dir.display()))?;
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with("libLLVM.so.")
        {
            found.push(entry.path());
        }
    }
    found.sort();
    found.into_iter().next().with_context(|| {
        format!(
            "no libLLVM.so.* in {}: reinstall the toolchain with \
             `rustup toolchain install nightly --force`",
            lib_dir.display()
        )
    })
}

/// The LLVM major version from `rustc -vV` output (`LLVM version: 22.1.4`),
/// which picks bpf-linker's `llvm-<major>` feature.
fn llvm_major(rustc_version: &str) -> Option<u32> {
    rustc_version.lines().find_map(|line| {
        let version = line.strip_prefix("LLVM version:")?.trim();
        version.split('.').next()?.parse().ok()
    })
}

/// Makes `<cargo home>/bpf-linker-llvm/lib` hold two symlinks to `libllvm`:
/// `libLLVM.so`, which llvm-sys links with, and one under the library's own
/// file name, its soname, which the built linker loads at run time.
fn make_llvm_prefix(libllvm: &Path) -> Result<PathBuf> {
    let prefix = exec::cargo_home()
        .context("cannot find cargo's home: set CARGO_HOME or HOME")?
        .join(LLVM_PREFIX_DIR);
    let lib = prefix.join("lib");
    // Start afresh: links to an older nightly's library would dangle.
    if lib.exists() {
        fs::remove_dir_all(&lib).with_context(|| format!("cannot remove {}", lib.display()))?;
    }
    fs::create_dir_all(&lib).with_context(|| format!("cannot create {}", lib.display()))?;
    let own_name = libllvm
        .file_name()
        .with_context(|| format!("{} has no file name", libllvm.display()))?;
    for name in [Path::new("libLLVM.so"), Path::new(own_name)] {
        let link = lib.join(name);
        symlink(libllvm, &link)
            .with_context(|| format!("cannot link {} to {}", link.display(), libllvm.display()))?;
    }
    Ok(prefix)
}

fn ensure_debian_packages(packages: &[&'static str]) -> Result<()> {
    let missing = missing_debian_packages(packages)?;
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    eprintln!("setup: installing Debian packages: {list}");
    let fix = || {
        format!(
            "installing Debian packages failed: run `cargo xtask setup` as root, \
             or `apt-get install {list}` yourself"
        )
    };
    exec::run(
        exec::command("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(fix)?;
    let _held = HeldServices::hold()?;
    exec::run(
        exec::command("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(fix)
}

/// Debian's hook that packages ask before starting a service
/// (invoke-rc.d): exit status 101 means "not now".
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// Marks the `policy-rc.d` [`HeldServices`] writes, so that one an
/// interrupted setup left is known for its own.
const HELD_MARKER: &str = "# cargo xtask setup: no service starts while it installs";

/// Holds back the services packages start as they are installed, for as
/// long as it lives: a `policy-rc.d` that refuses every start, removed on
/// drop (the units stay enabled, for a boot to start). A hook the host
/// already has is left as it is; one an interrupted setup left is taken
/// over, and removed.
struct HeldServices(bool);

impl HeldServices {
    fn hold() -> Result<HeldServices> {
        let path = Path::new(POLICY_RC_D);
        if path.exists() {
            let ours = fs::read_to_string(path).is_ok_and(|t| t.contains(HELD_MARKER));
            return Ok(HeldServices(ours));
        }
        fs::write(path, format!("#!/bin/sh\n{HELD_MARKER}\nexit 101\n"))
            .with_context(|| format!("writing {POLICY_RC_D}"))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {POLICY_RC_D} executable"))?;
        Ok(HeldServices(true))
    }
}

impl Drop for HeldServices {
    fn drop(&mut self) {
        if self.0
            && let Err(e) = fs::remove_file(POLICY_RC_D)
        {
            eprintln!("setup: removing {POLICY_RC_D}: {e}");
        }
    }
}

fn missing_debian_packages(packages: &[&'static str]) -> Result<Vec<&'static str>> {
    let mut missing = Vec::new();
    for &package in packages {
        // dpkg-query fails for a package it has never heard of: that is
        // "missing" too, so only its output counts.
        let output =
            exec::probe(exec::command("dpkg-query").args(["-W", "-f", "${Status}", package]))?
                .with_context(|| {
                    format!(
                        "dpkg-query not found: setup installs system packages on Debian only; \
                 install {} with your package manager",
                        packages.join(", ")
                    )
                })?;
        if !String::from_utf8_lossy(&output.stdout).contains("install ok installed") {
            missing.push(package);
        }
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_comes_from_rustc_verbose_version() {
        let version = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\n\
                       host: x86_64-unknown-linux-gnu\n\
                       release: 1.97.0-nightly\n\
                       LLVM version: 22.1.4\n";
        assert_eq!(llvm_major(version), Some(22));
        assert_eq!(llvm_major("rustc 1.97.0\n"), None);
    }
}
