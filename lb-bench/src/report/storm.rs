//! The section on the controller under a probe storm.

use std::fmt::Write as _;

use crate::storm::{STATUS_P99_GOAL_MS, StormResults};

/// The probe-storm section.
pub(super) fn render(out: &mut String, s: &StormResults) {
    let p = &s.plan;
    let backends = p.services * p.backends_per_service;
    let rebuild_rate = s.most_rebuilds_one_service as f64 / s.storm_s;
    let met = if s.status_storm_p99_ms <= STATUS_P99_GOAL_MS {
        "met"
    } else {
        "not met"
    };
    let _ = writeln!(
        out,
        "## Control plane: a probe storm\n\n\
         A real `lb daemon` with {} services of {} backends each ({backends} backends, \
         TCP checks: {}), all answered by one namespace that holds their addresses as a \
         local route. For {:.0} s, {} of them (a tenth) flap: a `prohibit` route refuses \
         their probes for 3 s, then goes for 3 s. `lb status` is run every 100 ms \
         meanwhile (the CLI's process start and round trip included).\n\n\
         | what | figure |\n| --- | --- |\n\
         | start to every backend in its table | {:.1} s |\n\
         | health transitions during the storm | {} |\n\
         | table rebuilds during the storm, all services | {} |\n\
         | most rebuilds of one service | {} ({:.1} a second; at most 10 by the 100 ms gap) |\n\
         | daemon CPU during the storm | {:.0} % of one core |\n\
         | `lb status` before the storm, median (max) | {:.1} ms ({:.1} ms) |\n\
         | `lb status` during the storm, median (max) | {:.1} ms ({:.1} ms) |\n\
         | `lb status` during the storm, p99 | {:.1} ms (goal ≤ {STATUS_P99_GOAL_MS} ms: {met}) |\n\n\
         A probe result that changes no state costs the controller O(1) (its backend's \
         health and its prober's state); a change rebuilds its service's table at once \
         after a quiet spell, or else at the end of a 100 ms gap together with every \
         other change of that service in it.\n",
        p.services,
        p.backends_per_service,
        s.health,
        s.storm_s,
        s.flappers,
        s.all_up_s,
        s.transitions,
        s.rebuilds,
        s.most_rebuilds_one_service,
        rebuild_rate,
        s.daemon_cpu * 100.0,
        s.status_quiet_ms.median,
        s.status_quiet_ms.max,
        s.status_storm_ms.median,
        s.status_storm_ms.max,
        s.status_storm_p99_ms,
    );
}
