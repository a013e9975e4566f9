//! `cargo xtask bench --baseline REV`: lb's eBPF object as it was at git
//! revision REV, built from a temporary worktree exactly as aya-build builds
//! the current one (same toolchain, target, flags), so the benchmark can run
//! both objects side by side.
//!
//! Objects are cached by commit and compiler (the nightly rustc and
//! bpf-linker versions) under the target directory; a worktree lives only
//! while its object builds, and one an interrupted run left is removed by
//! the next.

use std::{
    hash::{DefaultHasher, Hash as _, Hasher as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, ensure};

use crate::{build, exec};

/// The eBPF package and its binary, the object.
const EBPF_PACKAGE: &str = "lb-ebpf";
/// aya-build's toolchain (`aya_build::Toolchain::default()`).
const TOOLCHAIN: &str = "nightly";
/// The BPF target for this (little-endian) host.
const BPF_TARGET: &str = "bpfel-unknown-none";
/// aya-build's rustflags, `\x1f`-separated as CARGO_ENCODED_RUSTFLAGS wants.
const RUSTFLAGS: &str = "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf";

/// The object of lb's XDP programs at `rev`: built once per commit, then
/// taken from the cache.
pub(crate) fn object(root: &Path, rev: &str) -> Result<(String, PathBuf)> {
    let commit = exec::query(
        exec::command("git")
            .current_dir(root)
            .args(["rev-parse", "--verify", "--end-of-options"])
            .arg(format!("{rev}^{{commit}}")),
    )
    .with_context(|| format!("{rev:?} does not name a commit of this repository"))?
    .trim()
    .to_owned();
    let dir = build::target_dir(root).join("baseline");
    let cached = dir.join(format!("{commit}-{}.o", compiler()?));
    if cached.is_file() {
        eprintln!("baseline {commit}: {}", cached.display());
        return Ok((commit, cached));
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    remove_leftover_worktrees(root, &dir)?;
    let worktree = dir.join(format!("worktree-{commit}"));
    exec::run(
        exec::command("git")
            .current_dir(root)
            .args(["worktree", "add", "--detach", "--quiet"])
            .arg(&worktree)
            .arg(&commit),
    )?;
    let built = build_object(&worktree, &dir.join("ebpf-target"));
    let removed = remove_worktree(root, &worktree);
    let built = built?;
    removed?;
    // Copied, then renamed: a copy cut short is never taken for an object.
    let partial = cached.with_extension("partial");
    std::fs::copy(&built, &partial)
        .with_context(|| format!("copying {} to {}", built.display(), partial.display()))?;
    std::fs::rename(&partial, &cached)
        .with_context(|| format!("renaming {} to {}", partial.display(), cached.display()))?;
    eprintln!("baseline {commit}: {}", cached.display());
    Ok((commit, cached))
}

/// Builds the eBPF crate of the tree at `worktree` into `target_dir` (shared
/// between baselines, so `core` is built once).
fn build_object(worktree: &Path, target_dir: &Path) -> Result<PathBuf> {
    let mut cargo = exec::command("rustup");
    cargo
        .current_dir(worktree)
        .args(["run", TOOLCHAIN, "cargo", "build", "--release", "--bins"])
        .args(["--package", EBPF_PACKAGE, "--target", BPF_TARGET])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", RUSTFLAGS)
        // The outer cargo's settings would leak into the inner build.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO");
    exec::run(&mut cargo)?;
    let object = target_dir
        .join(BPF_TARGET)
        .join("release")
        .join(EBPF_PACKAGE);
    ensure!(
        object.is_file(),
        "the baseline build left no object at {}",
        object.display()
    );
    Ok(object)
}

/// A short digest of the compiler that builds the objects (the nightly
/// rustc and its LLVM, and bpf-linker): an object cached under another one
/// is not the same build as the current object's.
fn compiler() -> Result<String> {
    let rustc = exec::query(exec::command("rustup").args(["run", TOOLCHAIN, "rustc", "-vV"]))?;
    let linker = exec::query(exec::command("bpf-linker").arg("--version"))?;
    let mut hasher = DefaultHasher::new();
    (rustc, linker).hash(&mut hasher);
    Ok(format!("{:016x}", hasher.finish()))
}

/// Removes the worktrees of builds an interrupted run left under `dir`.
fn remove_leftover_worktrees(root: &Path, dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        let leftover = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("worktree-"));
        if leftover {
            remove_worktree(root, &path)?;
        }
    }
    Ok(())
}

fn remove_worktree(root: &Path, worktree: &Path) -> Result<()> {
    exec::run(
        exec::command("git")
            .current_dir(root)
            .args(["worktree", "remove", "--force"])
            .arg(worktree),
    )
    .or_else(|_| {
        // Not registered (or the checkout is gone): clear what is left.
        std::fs::remove_dir_all(worktree)
            .with_context(|| format!("removing {}", worktree.display()))?;
        exec::run(
            exec::command("git")
                .current_dir(root)
                .args(["worktree", "prune"]),
        )
    })
}
