//! Builds the benchmark-only eBPF object (floors and the reset wrapper) with
//! aya-build, so the `lb-bench` binary embeds it; lb's own object comes
//! embedded through the `lb` library.
use anyhow::{Context as _, anyhow};

/// The package whose `lb-bench-ebpf` binary is the benchmark object.
const EBPF_PACKAGE: &str = "lb-bench-ebpf";

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == EBPF_PACKAGE)
        .ok_or_else(|| anyhow!("{EBPF_PACKAGE} package not found"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
