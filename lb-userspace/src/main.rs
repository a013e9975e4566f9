//! The `lb` binary: a thin front over the `lb` library.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// lb: an XDP L4 load balancer.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole product on an embedded default topology (network
    /// namespaces, three backends, live traffic, a backend failure).
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo => lb::demo::run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
