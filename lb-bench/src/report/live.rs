//! The live-forwarding section.

use std::fmt::Write as _;

use crate::live::{LiveResult, LiveResults};

use super::{pct, thousands};

/// The floor's result in the same mode as `r`.
fn floor_of<'a>(l: &'a LiveResults, r: &LiveResult) -> Option<&'a LiveResult> {
    l.results
        .iter()
        .find(|f| f.mode == r.mode && f.program == crate::live::FLOOR_LABEL)
}

/// The live-forwarding section.
pub(super) fn render(out: &mut String, l: &LiveResults) {
    let _ = writeln!(
        out,
        "## Live forwarding\n\n\
         {} sends TCP ACKs of {} flows ({}-byte frames) to the IPv4 dsr-l2 \
         service's VIP through a veth pair between two namespaces, as fast as one \
         process can. The program under test, attached to the far end, rewrites \
         them and sends them back (XDP_TX), and a counting XDP_DROP program on the \
         generator's end counts what returns. Each cell is the median of {} \
         interleaved {:.0}-second windows (spread in brackets). Program time is the \
         kernel's BPF run-time statistics over the same windows: ns per packet \
         inside the program, on live traffic.\n\n\
         | program | XDP mode | forwarded | offered | forwarded / floor's | program time | program time / floor's | core share in the program |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |",
        l.generator,
        thousands(u64::from(l.flows)),
        l.frame_len,
        l.plan.rounds,
        l.plan.window_s
    );
    for r in &l.results {
        let floor = floor_of(l, r);
        let vs = |x: f64, f: Option<f64>| f.map_or("—".to_owned(), |f| format!("{:.2}", x / f));
        let _ = writeln!(
            out,
            "| {} | {} | {} pps (±{}) | {} pps | {} | {:.0} ns | {} | {:.1} % |",
            r.program,
            r.mode,
            thousands(r.forwarded_pps.median as u64),
            pct(r.forwarded_pps.spread / 2.0),
            thousands(r.offered_pps.median as u64),
            vs(
                r.forwarded_pps.median,
                floor.map(|f| f.forwarded_pps.median)
            ),
            r.program_ns.median,
            vs(r.program_ns.median, floor.map(|f| f.program_ns.median)),
            r.program_ns.median * r.forwarded_pps.median / 1e7
        );
    }
    out.push('\n');
    let generator_bound = l
        .results
        .iter()
        .all(|r| r.forwarded_pps.median >= 0.95 * r.offered_pps.median);
    if generator_bound {
        let _ = writeln!(
            out,
            "The generator is the limit here, not the programs: every program forwarded \
             what trafgen offered. trafgen, both veth hops, the program and the sink \
             share one core, and the programs take only the core share in the last \
             column. Forwarded rates therefore differ less than the programs' costs. \
             The program-time column, and the per-packet table above, give the \
             programs' own ratio. A hardware NIC and a generator on another host would \
             show how many packets per second lb forwards before it saturates a core; \
             this 2-core VM has neither.\n"
        );
    } else {
        let _ = writeln!(
            out,
            "Where a program forwarded less than was offered, it (with the veth hops on \
             its core) was the limit.\n"
        );
    }
    if let Some(lb) = l
        .results
        .iter()
        .find(|r| r.program != crate::live::FLOOR_LABEL)
    {
        let _ = writeln!(
            out,
            "On live traffic, lb's program time per packet ({:.0} ns, {}) is higher than \
             BPF_PROG_TEST_RUN's figure for the same path: caches are shared with the \
             generator and the kernel's veth path, and the run-time statistics add two \
             clock reads per packet (to every program alike).\n",
            lb.program_ns.median, lb.mode
        );
    }
}
