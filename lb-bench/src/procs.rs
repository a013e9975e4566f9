//! Processes the benchmarks start (generators, servers, proxies) and the
//! CPU time they and the machine spend.

use std::{
    fmt,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb::netns;

/// How long a stopped group may take to exit before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// A program started in a namespace, as the leader of a process group of
/// its own (nginx and trafgen fork workers); the group is signalled by the
/// leader's PID and killed on drop.
pub(crate) struct Group {
    child: Option<Child>,
    /// What it was, for errors.
    name: String,
    /// Its standard error.
    log: PathBuf,
}

impl Group {
    /// Starts `cmd` in namespace `ns`, its standard error going to `log`.
    pub(crate) fn start(ns: &str, name: &str, cmd: &mut Command, log: &Path) -> Result<Group> {
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(log)?);
        let child = netns::spawn_in(ns, cmd).with_context(|| format!("starting {name}"))?;
        Ok(Group {
            child: Some(child),
            name: name.to_owned(),
            log: log.to_owned(),
        })
    }

    /// The leader's PID.
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Fails, with its log, if the leader has exited.
    pub(crate) fn check_running(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            return Err(ExitedEarly {
                name: self.name.clone(),
                status,
                log: log.trim().to_owned(),
            }
            .into());
        }
        Ok(())
    }

    /// Stops the group with `signal` and waits for the leader (killing the
    /// group if it outlives [`STOP_GRACE`]); fails if it had died before.
    pub(crate) fn stop(&mut self, signal: i32) -> Result<()> {
        self.check_running()?;
        if let Some(child) = self.child.take() {
            end(child, signal)?;
        }
        Ok(())
    }

    /// Waits for the leader to exit by itself and returns its standard
    /// output (the command must have piped it).
    pub(crate) fn output(mut self) -> Result<String> {
        let child = self.child.take().context("already stopped")?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            bail!("{} failed ({}): {}", self.name, out.status, log.trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Signals `child`'s group and waits for `child`, killing the group if it
/// outlives [`STOP_GRACE`]. A leader that exits in its own time reaps its
/// workers (nginx's master does), so none is left for init.
fn end(mut child: Child, signal: i32) -> Result<()> {
    signal_group(&child, signal);
    let deadline = Instant::now() + STOP_GRACE;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            signal_group(&child, libc::SIGKILL);
            child.wait()?;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Sends `signal` to the process group `child` leads.
fn signal_group(child: &Child, signal: i32) {
    // SAFETY: kill has no memory preconditions; the group is our child's,
    // which is not yet reaped, so its ID is not reused.
    unsafe { libc::kill(-(child.id() as i32), signal) };
}

/// A group's leader that exited before it was stopped: a caller may tell
/// it from other failures and start the program again.
#[derive(Debug)]
pub(crate) struct ExitedEarly {
    /// The program, as the group was started.
    pub(crate) name: String,
    status: ExitStatus,
    /// Its standard error.
    log: String,
}

impl fmt::Display for ExitedEarly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} exited early ({}): {}",
            self.name, self.status, self.log
        )
    }
}

impl std::error::Error for ExitedEarly {}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            let _ = end(child, libc::SIGTERM);
        }
    }
}

/// CPU time, ns, of every thread of the processes whose process group is
/// `pgid` (`/proc/PID/task/TID/schedstat`: time on a CPU, kernel included).
pub(crate) fn group_cpu_ns(pgid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| process_group(pid) == Some(pgid))
        .map(process_cpu_ns)
        .sum()
}

/// CPU time, ns, of every thread of process `pid`.
pub(crate) fn process_cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// The process group of `pid` (field 5 of /proc/PID/stat, after the
/// parenthesised command name, which may hold spaces).
fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(2)?.parse().ok()
}

/// CPU time the whole machine spent busy (not idle or waiting for I/O),
/// ns, from /proc/stat.
pub(crate) fn machine_busy_ns() -> u64 {
    busy_ns("cpu ")
}

/// CPU time CPU `cpu` spent busy, ns, from /proc/stat.
pub(crate) fn cpu_busy_ns(cpu: usize) -> u64 {
    busy_ns(&format!("cpu{cpu} "))
}

/// Busy time of /proc/stat's line starting with `prefix`, ns (0 without
/// it).
fn busy_ns(prefix: &str) -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with(prefix)) else {
        return 0;
    };
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is
    // already in user).
    let busy: u64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|&(i, _)| i != 3 && i != 4)
        .map(|(_, t)| t)
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    busy * (1_000_000_000 / hz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_its_own_group_member_and_uses_cpu() {
        let pid = std::process::id();
        assert!(process_group(pid).is_some());
        assert!(process_cpu_ns(pid) > 0);
        assert!(machine_busy_ns() > 0);
        assert!(cpu_busy_ns(0) > 0);
    }
}
