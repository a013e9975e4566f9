//! The host's load as a share of its weight: busier hosts take fewer new
//! flows. Read from the kernel's counters (`/proc/stat` for CPU time,
//! `/proc/net/tcp{,6}` for established connections); the reading and the
//! arithmetic are pure, so they are tested on fixed texts.

use std::time::Duration;

/// The percent of an idle host: all of its weight.
pub const FULL: u32 = 100;

/// The least share a loaded host keeps, by default: a busy host still
/// takes some new flows, so its load is measured again under them.
pub const DEFAULT_MIN_PERCENT: u32 = 10;
/// Default step: smaller changes are not reported (each report rebuilds
/// every node's table).
pub const DEFAULT_STEP: u32 = 10;
/// Default time between two readings.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);

/// What the agent weighs the host by (`[load]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadSettings {
    /// By the host's CPU utilisation.
    pub cpu: bool,
    /// By its established connections to `port`: this many count as full
    /// load.
    pub connections: Option<(u16, u64)>,
    /// The least percent reported.
    pub min_percent: u32,
    /// Changes smaller than this many points are not reported.
    pub step: u32,
    /// Between two readings.
    pub interval: Duration,
    /// Also answer HAProxy's agent-check protocol on this port (for a
    /// standalone lb with `[service.agent]`).
    pub agent_port: Option<u16>,
}

/// CPU time counters from `/proc/stat`'s first line, in ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// Every tick.
    pub total: u64,
    /// Ticks spent idle or waiting for I/O.
    pub idle: u64,
}

/// Reads the `cpu` line of `/proc/stat`.
pub fn cpu_times(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal (guest time is
    // already counted in user and nice).
    let total = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    Some(CpuTimes { total, idle })
}

/// Busy share of the CPU between two readings, 0.0 to 1.0.
pub fn cpu_busy(before: CpuTimes, after: CpuTimes) -> Option<f64> {
    let total = after.total.checked_sub(before.total)?;
    let idle = after.idle.checked_sub(before.idle)?;
    (total > 0).then(|| (total.saturating_sub(idle)) as f64 / total as f64)
}

/// `/proc/net/tcp`'s state code for an established connection.
const TCP_ESTABLISHED: &str = "01";

/// Established connections to local `port` in a `/proc/net/tcp` or
/// `/proc/net/tcp6` text.
pub fn established_to(table: &str, port: u16) -> u64 {
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let mut f = line.split_whitespace();
            let local = f.nth(1);
            let state = f.nth(1);
            let local_port = local
                .and_then(|l| l.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            local_port == Some(port) && state == Some(TCP_ESTABLISHED)
        })
        .count() as u64
}

/// The percent of its weight a host at `load` (0.0 idle to 1.0 or more,
/// fully loaded) reports: `100 - load`, to the nearest multiple of `step`
/// or 100 (which a step that does not divide 100 never reaches), never
/// below `min_percent`.
pub fn percent(load: f64, min_percent: u32, step: u32) -> u32 {
    let free = ((1.0 - load.clamp(0.0, 1.0)) * 100.0).round() as u32;
    let stepped = if step > 1 {
        (free + step / 2) / step * step
    } else {
        free
    };
    let nearest = if FULL - free < stepped.abs_diff(free) {
        FULL
    } else {
        stepped
    };
    nearest.clamp(min_percent.min(FULL), FULL)
}

/// The percent to report after `current` at `load`: [`percent`], but only
/// once the free share is a whole `step` away from `current`, so a load
/// hovering at a step's edge does not flip the report (each change
/// rebuilds every node's table). From a report between them toward 100
/// or the floor, half a step (or half the way, if nearer) is enough: an
/// idle host is never quite idle, so the free share rarely gets a whole
/// step above the report below 100. Between 100 and the floor themselves
/// (a floor of 95 with steps of 10), three quarters of the way: a band in
/// the middle holds either.
pub fn next(current: u32, load: f64, min_percent: u32, step: u32) -> u32 {
    let wanted = percent(load, min_percent, step);
    let free = (1.0 - load.clamp(0.0, 1.0)) * 100.0;
    let is_bound = |p: u32| p == FULL || p == min_percent.min(FULL);
    let way = f64::from(wanted.abs_diff(current));
    let needed = match (is_bound(current), is_bound(wanted)) {
        (true, true) => way * 3.0 / 4.0,
        (false, true) => way.min(f64::from(step.max(1))) / 2.0,
        _ => f64::from(step.max(1)),
    };
    if wanted != current && (free - f64::from(current)).abs() >= needed {
        wanted
    } else {
        current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_utilisation_is_the_busy_share_between_readings() {
        let a = cpu_times("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        let b = cpu_times("cpu  250 0 150 850 50 0 0 0 0 0\n").unwrap();
        assert_eq!(
            a,
            CpuTimes {
                total: 1000,
                idle: 800
            }
        );
        // 300 ticks passed, 100 of them idle or waiting.
        let busy = cpu_busy(a, b).unwrap();
        assert!((busy - 2.0 / 3.0).abs() < 1e-9, "{busy}");
        assert_eq!(cpu_busy(b, a), None, "counters never go back");
        assert_eq!(cpu_times("intr 1 2\n"), None);
        assert_eq!(cpu_times("cpu  x y\n"), None);
    }

    #[test]
    fn only_established_connections_to_the_port_count() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue\n\
           0: 0B0012C6:0007 00000000:0000 0A 00000000:00000000\n\
           1: 0B0012C6:0007 020212C6:C350 01 00000000:00000000\n\
           2: 0B0012C6:0007 020212C6:C351 01 00000000:00000000\n\
           3: 0B0012C6:0050 020212C6:C352 01 00000000:00000000\n\
           4: 0B0012C6:0007 020212C6:C353 06 00000000:00000000\n";
        assert_eq!(established_to(table, 7), 2);
        assert_eq!(established_to(table, 80), 1);
        assert_eq!(established_to("header only\n", 7), 0);
    }

    #[test]
    fn the_report_moves_only_a_whole_step_away() {
        // From 50: a free share of 56 or 45 keeps it; 61 or 39 moves it.
        assert_eq!(next(50, 0.44, 10, 10), 50);
        assert_eq!(next(50, 0.55, 10, 10), 50);
        assert_eq!(next(50, 0.39, 10, 10), 60);
        assert_eq!(next(50, 0.61, 10, 10), 40);
        // The bounds are reached.
        assert_eq!(next(20, 0.995, 10, 10), 10);
        assert_eq!(next(90, 0.0, 10, 10), 100);
        assert_eq!(next(100, 0.06, 10, 10), 100);
        // Even when they are less than a step away.
        assert_eq!(next(95, 0.0, 95, 10), 100);
        assert_eq!(next(100, 1.0, 95, 10), 95);
        assert_eq!(next(10, 0.0, 10, 100), 100);
        assert_eq!(next(90, 0.0, 10, 30), 100);
        // Elsewhere a load at a step's edge still holds, and so does one
        // between the floor and 100 when they are the only reports.
        assert_eq!(next(90, 0.06, 10, 10), 90);
        assert_eq!(next(95, 0.04, 95, 10), 95);
        assert_eq!(next(100, 0.02, 95, 10), 100);
        assert_eq!(next(10, 0.49, 10, 100), 10);
        assert_eq!(next(100, 0.51, 10, 100), 100);
        assert_eq!(next(10, 0.45, 10, 100), 10);
        assert_eq!(next(100, 0.03, 95, 10), 100);
        assert_eq!(next(95, 0.02, 95, 10), 95);
        // A host nearly idle gets back to 100.
        assert_eq!(next(90, 0.03, 10, 10), 100);
        assert_eq!(next(100, 0.07, 10, 10), 100);
    }

    #[test]
    fn percent_follows_free_capacity_in_steps_within_bounds() {
        assert_eq!(percent(0.0, 10, 10), 100);
        assert_eq!(percent(0.04, 10, 10), 100, "to the nearest step");
        assert_eq!(percent(0.14, 10, 10), 90);
        assert_eq!(percent(0.5, 10, 10), 50);
        assert_eq!(percent(0.97, 10, 10), 10, "never below the floor");
        assert_eq!(percent(3.0, 10, 10), 10);
        assert_eq!(percent(0.33, 5, 1), 67);
        assert_eq!(percent(f64::NAN, 10, 10), 10);
        // A step that does not divide 100 still reaches it.
        assert_eq!(percent(0.0, 10, 30), 100);
        assert_eq!(percent(0.1, 10, 30), 90);
    }
}
