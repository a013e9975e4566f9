//! The machine a run measured: every figure is only meaningful next to it.

use std::{process::Command, time::Instant};

use serde::{Deserialize, Serialize};

use crate::procs;

/// CPU, cores, kernel and how busy the machine was.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    /// `model name` from /proc/cpuinfo.
    pub cpu: String,
    /// Online CPUs.
    pub cores: usize,
    /// The CPU the benchmark pinned itself to.
    pub pinned_cpu: usize,
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// Physical memory, MiB.
    pub memory_mib: u64,
    /// Whether the BPF JIT is on (/proc/sys/net/core/bpf_jit_enable).
    pub bpf_jit: String,
    /// The eBPF toolchain (`rustc +nightly -V`), when rustup answers.
    pub ebpf_rustc: String,
    /// /proc/loadavg when the run started.
    pub loadavg_start: String,
    /// /proc/loadavg when the run ended (filled in at the end).
    pub loadavg_end: String,
    /// The share of the pinned CPU's time that other work took while the
    /// data plane was measured on it ([`OthersOnCpu`]), when that part ran.
    pub others_on_pinned_cpu: Option<f64>,
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// The machine as it is now; `pinned_cpu` is where the run measures.
pub(crate) fn describe(pinned_cpu: usize) -> Machine {
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map_or_else(|| "unknown".to_owned(), |(_, v)| v.trim().to_owned());
    let memory_mib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024);
    let ebpf_rustc = Command::new("rustup")
        .args(["run", "nightly", "rustc", "-V"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown".to_owned(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        );
    Machine {
        cpu,
        cores: online_cpus(),
        pinned_cpu,
        kernel: read("/proc/sys/kernel/osrelease"),
        memory_mib,
        bpf_jit: read("/proc/sys/net/core/bpf_jit_enable"),
        ebpf_rustc,
        loadavg_start: loadavg(),
        loadavg_end: String::new(),
        others_on_pinned_cpu: None,
    }
}

/// What else ran on the CPU this process measures on: that CPU's busy
/// time less this process's, over the wall time. Unlike the load average,
/// it leaves out the benchmark's own thread and the build before it.
pub(crate) struct OthersOnCpu {
    cpu: usize,
    busy_ns: u64,
    own_ns: u64,
    at: Instant,
}

impl OthersOnCpu {
    /// Starts counting on CPU `cpu`.
    pub(crate) fn start(cpu: usize) -> Self {
        OthersOnCpu {
            cpu,
            busy_ns: procs::cpu_busy_ns(cpu),
            own_ns: procs::process_cpu_ns(std::process::id()),
            at: Instant::now(),
        }
    }

    /// Their share of the CPU since [`OthersOnCpu::start`], 0 to 1.
    pub(crate) fn share(&self) -> f64 {
        let busy = procs::cpu_busy_ns(self.cpu).saturating_sub(self.busy_ns);
        let own = procs::process_cpu_ns(std::process::id()).saturating_sub(self.own_ns);
        let wall = self.at.elapsed().as_nanos().max(1) as f64;
        (busy.saturating_sub(own) as f64 / wall).clamp(0.0, 1.0)
    }
}

/// CPUs online (not those this thread may run on: it is pinned).
pub(crate) fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// /proc/loadavg's three averages.
pub(crate) fn loadavg() -> String {
    read("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Pins the calling thread to `cpu`, so every BPF_PROG_TEST_RUN runs there:
/// per-CPU maps and the per-CPU LRU lists of the connection table then see
/// one CPU, and the scheduler cannot move a run halfway.
pub(crate) fn pin_to(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it; the call
    // only reads the set we pass.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    Ok(())
}

/// Lets the calling thread (and what it starts from now on) run on every
/// online CPU again.
pub(crate) fn unpin() -> anyhow::Result<()> {
    // SAFETY: as in pin_to.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in 0..online_cpus() {
            libc::CPU_SET(cpu, &mut set);
        }
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    Ok(())
}

/// CPU time this thread has used, in nanoseconds (CLOCK_THREAD_CPUTIME_ID).
/// Time in the kernel on the thread's behalf counts, time spent preempted
/// does not: the right clock around BPF_PROG_TEST_RUN.
pub(crate) fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Now, UTC, as RFC 3339 (seconds).
pub(crate) fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Year, month, day of a count of days since 1970-01-01 (the proleptic
/// Gregorian calendar; H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
    }
}
