//! The section on the fleet: node failures, propagation, etcd.

use std::fmt::Write as _;

use crate::{
    fleet::{Failures, FleetResults},
    stats::Summary,
};

fn row(out: &mut String, what: &str, s: &Summary) {
    let _ = writeln!(
        out,
        "| {what} | {:.1} ms | {:.1} ms | {:.1} ms | {} |",
        s.median, s.min, s.max, s.n
    );
}

fn survived(f: &Failures) -> String {
    let runs: Vec<String> = f
        .survived
        .iter()
        .map(|n| format!("{n}/{}", f.connections))
        .collect();
    runs.join(", ")
}

/// The fleet section.
pub(super) fn render(out: &mut String, r: &FleetResults) {
    let _ = writeln!(
        out,
        "## The fleet\n\n\
         Three lb nodes, each with BIRD and a real `lb daemon`, behind a BIRD router \
         (ECMP, `fib_multipath_hash_policy=1`) with one etcd, in namespaces \
         (`lb::demo::edge`, the fleet tests' topology, with the shipped \
         `examples/bird-*.conf`). A node fails by its daemon being SIGKILLed and its \
         link going down, under {} long-lived TCP connections from a client behind \
         the router; the withdrawal is timed from the link going down to the \
         router's kernel route without the node.\n\n\
         | what | median | min | max | runs |\n| --- | --- | --- | --- | --- |",
        r.bfd.connections
    );
    row(
        out,
        &format!("node failure to withdrawal, {}", r.bfd.timers),
        &r.bfd.withdrawal_ms,
    );
    row(
        out,
        &format!("node failure to withdrawal, {}", r.hold.timers),
        &r.hold.withdrawal_ms,
    );
    row(
        out,
        "`lb backend set-weight` through one node: run to returned",
        &r.change_return_ms,
    );
    row(
        out,
        "the same: run to the new table live on all three nodes",
        &r.change_all_live_ms,
    );
    let _ = writeln!(
        out,
        "\nConnections that kept answering from their backend after each failure: \
         {} with BFD; {} with the hold timer alone. BFD takes three missed 100 ms \
         intervals; without it the router waits for the hold time (BIRD's default is \
         240 s; the run uses a short one, and the figure scales with it). \"Live\" is \
         each node's service entry pointing at its new table copy (its pinned map, \
         watched every 50 µs); the change reaches the other nodes through etcd's \
         watch and their own read of the prefix.\n\n\
         etcd (3.4, one member, in a namespace), lb's own client calls, the services \
         of one service with N backends:\n\n\
         | backends | services text | guarded write | write to a watcher's event | a node's read and validation |\n\
         | --- | --- | --- | --- | --- |",
        survived(&r.bfd),
        survived(&r.hold)
    );
    for e in &r.etcd {
        let _ = writeln!(
            out,
            "| {} | {:.1} KiB | {:.1} ms (max {:.1}) | {:.1} ms (max {:.1}) | {:.1} ms (max {:.1}) |",
            e.backends,
            e.bytes as f64 / 1024.0,
            e.write_ms.median,
            e.write_ms.max,
            e.watch_ms.median,
            e.watch_ms.max,
            e.read_validate_ms.median,
            e.read_validate_ms.max
        );
    }
    let _ = writeln!(
        out,
        "\nMedians of {} writes each. The read and validation is what every node \
         does on each change before its controller rebuilds tables (which the \
         control-plane sections measure).\n",
        r.plan.etcd_writes
    );
}
