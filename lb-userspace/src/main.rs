//! The `lb` binary.
use clap::Parser;

/// lb: an XDP L4 load balancer.
#[derive(Parser)]
#[command(version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _ = Cli::parse();
    Ok(())
}
