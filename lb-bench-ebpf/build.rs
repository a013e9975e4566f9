//! Rebuild when bpf-linker changes: cargo cannot express a dependency on a
//! linker binary, so its path's mtime stands in for it.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
