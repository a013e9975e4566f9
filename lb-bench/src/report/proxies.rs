//! The section comparing lb with HAProxy and nginx.

use std::fmt::Write as _;

use crate::proxies::{ProxyResults, SystemResult};

use super::{pct, thousands};

/// The comparison section.
pub(super) fn render(out: &mut String, p: &ProxyResults) {
    let _ = writeln!(
        out,
        "## Against HAProxy and nginx\n\n\
         The same segment for every system: a client, the load balancer and 3 backends \
         (nginx answering each request with its name) on a bridge of veths. \
         {} in the client's namespace opens a new TCP connection per HTTP request \
         (`Connection: close`, {} connections at a time, {} s per run, {} runs \
         interleaved). lb is the real daemon with its default settings (dsr-l2, \
         so backends answer the client directly); HAProxy (`mode tcp`) and nginx \
         (`stream`) are the reverse proxies an operator would pick instead, round \
         robin over the same backends, with as many threads or workers as CPUs, in \
         the same namespace. Medians, spread in brackets.\n\n\
         CPU per request in the load balancer is, for lb, the XDP program's run time \
         (the kernel's BPF statistics) plus the daemon's CPU; for a proxy, its \
         processes' CPU. CPU per request on the machine is everything busy (client, \
         backends, kernel; /proc/stat): the rest is the same in every run.\n\n\
         | system | requests/s | vs lb | CPU per request in the load balancer | vs lb | CPU per request, machine | latency p50 | latency p99 | failed |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        p.client, p.plan.connections, p.plan.seconds, p.plan.rounds
    );
    let reference = p.systems.iter().find(|s| s.system.is_lb());
    for s in &p.systems {
        let vs = |f: fn(&SystemResult) -> f64| {
            reference.map_or("—".to_owned(), |lb| format!("{:.2}×", f(s) / f(lb)))
        };
        let _ = writeln!(
            out,
            "| {} | {} (±{}) | {} | {:.1} µs (±{}) | {} | {:.0} µs | {:.2} ms | {:.2} ms | {} |",
            s.label,
            thousands(s.requests_per_s.median as u64),
            pct(s.requests_per_s.spread / 2.0),
            vs(|x| x.requests_per_s.median),
            s.lb_cpu_us.median,
            pct(s.lb_cpu_us.spread / 2.0),
            vs(|x| x.lb_cpu_us.median),
            s.machine_cpu_us.median,
            s.p50_ms.median,
            s.p99_ms.median,
            s.errors
        );
    }
    out.push('\n');
    for why in &p.skipped {
        let _ = writeln!(out, "Not measured: {why}\n");
    }
    let versions: Vec<String> = p
        .systems
        .iter()
        .filter(|s| !s.system.is_lb())
        .map(|s| format!("{}: {}", s.label, s.version))
        .collect();
    if !versions.is_empty() {
        let _ = writeln!(out, "Versions: {}.\n", versions.join("; "));
    }
    let _ = writeln!(
        out,
        "Why the gap: a proxy terminates both TCP connections, so each request \
         costs two handshakes, two teardowns and copies through its process. lb \
         only rewrites the client's packets to a backend and never sees the replies \
         (direct server return). The machine-wide column is the honest total: the \
         client and backends cost the same under every system, and the client and \
         proxy share two cores here, so requests per second say less than CPU per \
         request.\n\n\
         Where lb gives something up: a proxy can balance on request contents, \
         terminate TLS, and needs nothing on the backends. lb needs the VIP on each \
         backend's loopback with ARP for it suppressed (dsr-l2), or a tunnel \
         endpoint (ipip), and cannot see replies (no latency-aware balancing).\n\n\
         On this rig, native XDP on a veth needs two things a NIC does not: an XDP \
         program on the veth's peer (frames sent with XDP_TX are dropped otherwise), \
         and full TCP checksums from the sender (a veth passes checksums left to \
         offload, which native XDP loses), so the client computes its own. Both \
         hold for every system measured.\n"
    );
}
