//! Running external commands.
//!
//! Commands that change something are echoed (`==> cargo test ...`) before
//! they run, so a log shows what happened. Read-only probes stay silent so
//! that `setup` prints nothing on a machine that is already set up. Every
//! failure names the command and how it ended.

use std::env;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};

use anyhow::{Context, Result, bail};

/// Cargo's home (`$CARGO_HOME`, else `~/.cargo`), where `cargo install` puts
/// binaries.
pub(crate) fn cargo_home() -> Option<PathBuf> {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
}

/// A command for `program` whose PATH starts with cargo's bin directory.
///
/// bpf-linker lands there; aya-build finds the linker through PATH, so
/// putting that directory first makes the copy `setup` installed the one that
/// is used, even when the caller's PATH lacks it or holds an older copy.
pub(crate) fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    if let Some(path) = path_with_cargo_bin() {
        cmd.env("PATH", path);
    }
    cmd
}

/// A `cargo` command using the toolchain that runs xtask (`cargo run`
/// exports it as `CARGO`), so `cargo +toolchain xtask` is honoured.
pub(crate) fn cargo() -> Command {
    command(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// PATH with cargo's bin directory first, or `None` when it already is.
fn path_with_cargo_bin() -> Option<OsString> {
    let bin = cargo_home()?.join("bin");
    let Some(current) = env::var_os("PATH") else {
        return Some(bin.into_os_string());
    };
    if env::split_paths(&current).next().as_deref() == Some(bin.as_path()) {
        return None;
    }
    env::join_paths(std::iter::once(bin).chain(env::split_paths(&current))).ok()
}

/// Runs `cmd` after echoing it, with stdout and stderr passed through, and
/// fails unless it exits successfully. xtask waits for it whatever the
/// terminal sends (see [`IgnoredSignals`]).
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let shown = echo(cmd);
    // Started before the signals are ignored: an ignored disposition
    // survives exec, and the child must still get Ctrl-C.
    let mut child = cmd.spawn().with_context(|| not_started(&shown))?;
    let status = {
        let _ignored = IgnoredSignals::new();
        child.wait()
    }
    .with_context(|| format!("could not wait for `{shown}`"))?;
    // Killed by the terminal's signal, as xtask would have been: it ends
    // the same way, not with a step failed and the next one started.
    if let Some(signal) = status.signal().filter(|s| IGNORED.contains(s)) {
        // SAFETY: raise(3) with a valid signal number, now at its default.
        unsafe { libc::raise(signal) };
    }
    check(&shown, status)
}

/// Signals xtask ignores while [`run`] waits: the terminal's Ctrl-C and
/// hang-up. They reach the child too (they go to the whole foreground
/// process group), which may take a while to act on them (`lb demo` tears
/// its namespaces down first): xtask stays to wait for it and report how it
/// ended, as system(3) does, rather than hand the prompt back while it
/// still runs.
const IGNORED: [libc::c_int; 2] = [libc::SIGHUP, libc::SIGINT];

/// [`IGNORED`] ignored until dropped, which puts back what they were.
struct IgnoredSignals {
    previous: [libc::sighandler_t; IGNORED.len()],
}

impl IgnoredSignals {
    fn new() -> IgnoredSignals {
        IgnoredSignals {
            // SAFETY: signal(2) with a valid number and SIG_IGN installs no
            // handler and touches no memory of ours.
            previous: IGNORED.map(|sig| unsafe { libc::signal(sig, libc::SIG_IGN) }),
        }
    }
}

impl Drop for IgnoredSignals {
    fn drop(&mut self) {
        for (sig, previous) in IGNORED.into_iter().zip(self.previous) {
            if previous != libc::SIG_ERR {
                // SAFETY: puts back the disposition signal(2) reported for
                // `sig`: the default or SIG_IGN, as xtask installs no
                // handlers.
                unsafe { libc::signal(sig, previous) };
            }
        }
    }
}

/// Runs `cmd` after echoing it, copying its stdout to ours unchanged as it
/// arrives and handing every complete line to `on_line`; stderr is not
/// touched. Fails unless the command exits successfully.
pub(crate) fn run_tee_stdout(cmd: &mut Command, mut on_line: impl FnMut(&str)) -> Result<()> {
    let shown = echo(cmd);
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| not_started(&shown))?;
    let forwarded = match child.stdout.take() {
        Some(stdout) => forward(stdout, &mut io::stdout().lock(), &mut on_line),
        None => Ok(()),
    };
    if forwarded.is_err() {
        // Nobody drains the pipe any more: the child could block on a full
        // pipe forever, and `wait` with it.
        let _ = child.kill();
    }
    let status = child
        .wait()
        .with_context(|| format!("could not wait for `{shown}`"))?;
    forwarded.with_context(|| format!("could not pass on the output of `{shown}`"))?;
    check(&shown, status)
}

/// Copies `from` to `out` chunk by chunk (so partial lines such as
/// libtest's `test x ... ` show up at once) and reports whole lines.
fn forward(
    mut from: impl Read,
    out: &mut impl Write,
    on_line: &mut impl FnMut(&str),
) -> io::Result<()> {
    let mut chunk = [0_u8; 8192];
    let mut pending = Vec::new();
    loop {
        let len = match from.read(&mut chunk) {
            Ok(0) => break,
            Ok(len) => len,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.write_all(&chunk[..len])?;
        out.flush()?;
        pending.extend_from_slice(&chunk[..len]);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            on_line(&String::from_utf8_lossy(&line));
        }
    }
    if !pending.is_empty() {
        // End the unterminated last line so whatever we print next (the
        // summary) starts on a line of its own.
        out.write_all(b"\n")?;
        on_line(&String::from_utf8_lossy(&pending));
    }
    out.flush()
}

/// Runs a read-only probe silently and returns its output whatever its exit
/// status, or `None` when the program does not exist, so that callers can
/// treat a missing or broken tool as "not installed".
pub(crate) fn probe(cmd: &mut Command) -> Result<Option<Output>> {
    match cmd.stdin(Stdio::null()).output() {
        Ok(output) => Ok(Some(output)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| not_started(&display(cmd))),
    }
}

/// Runs a read-only query silently and returns its stdout; the program must
/// exist and succeed.
pub(crate) fn query(cmd: &mut Command) -> Result<String> {
    let shown = display(cmd);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| not_started(&shown))?;
    if !output.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout).with_context(|| format!("`{shown}` printed non-UTF-8 output"))
}

fn echo(cmd: &Command) -> String {
    let shown = display(cmd);
    eprintln!("==> {shown}");
    shown
}

fn check(shown: &str, status: ExitStatus) -> Result<()> {
    if status.success() {
        Ok(())
    } else {
        bail!("`{shown}` failed ({status})")
    }
}

fn not_started(shown: &str) -> String {
    format!("could not start `{shown}`: is the program installed and on PATH?")
}

/// `cmd` as a shell line: the variables it sets (but PATH, which every
/// command gets), the program's file name and the quoted arguments.
pub(crate) fn display(cmd: &Command) -> String {
    let mut words = Vec::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value
            && key != "PATH"
        {
            words.push(format!(
                "{}={}",
                key.to_string_lossy(),
                quote(&value.to_string_lossy())
            ));
        }
    }
    // `CARGO` is a full toolchain path; the file name reads better in logs.
    let program = Path::new(cmd.get_program());
    let name = program.file_name().unwrap_or(program.as_os_str());
    words.push(name.to_string_lossy().into_owned());
    words.extend(cmd.get_args().map(|arg| quote(&arg.to_string_lossy())));
    words.join(" ")
}

/// Single-quotes `word` for a POSIX shell unless it is plainly safe, so an
/// echoed command can be pasted into a terminal.
fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=+:,@%".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_shows_env_program_name_and_quoted_args() {
        let mut cmd = Command::new("/opt/toolchain/bin/cargo");
        cmd.env("LB_LOG", "debug")
            .args(["test", "--workspace", "-f=${Status}", "it's"]);
        assert_eq!(
            display(&cmd),
            r"LB_LOG=debug cargo test --workspace '-f=${Status}' 'it'\''s'"
        );
    }

    #[test]
    fn forward_reports_every_line_including_an_unterminated_last_one() {
        let mut lines = Vec::new();
        let mut out = Vec::new();
        let input: &[u8] = b"one\ntwo\nthree";
        let result = forward(input, &mut out, &mut |line: &str| {
            lines.push(line.to_owned());
        });
        assert!(result.is_ok());
        assert_eq!(out, b"one\ntwo\nthree\n");
        assert_eq!(lines, ["one\n", "two\n", "three"]);
    }
}
