//! The `lb` binary: the daemon and the CLI that manages it (see `lb::cli`).
fn main() -> std::process::ExitCode {
    lb::cli::main()
}
