//! The section comparing lb's object with the baseline revision's
//! (`cargo xtask bench --baseline REV`): every lb case of every group, run
//! on both objects in the same rounds, as current / baseline.

use std::fmt::Write as _;

use super::{MEASURED_ORDER, group_label, ns, thousands};
use crate::dataplane::{
    CaseResult, DataplaneResults, GroupResult, Path,
    frames::{Family, Mode},
};

/// Established flows in the group whose cycle has its own goal.
const MANY_FLOWS_GOAL_GROUP: u32 = 1_000_000;

/// The goal for a case, as current / baseline, and what the goal is called.
fn goal(g: &GroupResult, c: &CaseResult) -> (f64, &'static str) {
    if g.many_flows > 0 {
        return if g.many_flows == MANY_FLOWS_GOAL_GROUP && c.flows > 1 {
            (0.6, "1,000,000 established flows cycled")
        } else {
            (1.0, "every other path and configuration")
        };
    }
    match (c.path, c.mode) {
        (Path::NotService, _) => (0.55, "non-service pass"),
        (Path::Established, Some(Mode::DsrL2)) => (0.5, "established flow, dsr-l2"),
        (Path::Established, Some(Mode::Ipip)) => (0.45, "established flow, ipip"),
        (Path::Syn | Path::SynNewFlow, _) => (0.3, "TCP SYN"),
        (Path::NewFlow, _) => (0.5, "new flow every packet, inserted"),
        _ => (1.0, "every other path and configuration"),
    }
}

/// The same case measured on the baseline.
fn on_baseline<'a>(g: &'a GroupResult, c: &CaseResult) -> Option<&'a CaseResult> {
    g.baseline.iter().find(|b| {
        b.path == c.path
            && b.family == c.family
            && b.mode == c.mode
            && b.method == c.method
            && b.flows == c.flows
    })
}

/// Every (group, case, baseline case, ratio) of the run.
fn pairs(d: &DataplaneResults) -> Vec<(&GroupResult, &CaseResult, &CaseResult, f64)> {
    d.matrix
        .iter()
        .chain(&d.many_flows)
        .flat_map(|g| {
            g.cases.iter().filter_map(move |c| {
                let b = on_baseline(g, c)?;
                Some((g, c, b, c.summary.median / b.summary.median))
            })
        })
        .collect()
}

fn x(r: f64) -> String {
    if r.is_finite() {
        format!("{r:.2}")
    } else {
        "—".to_owned()
    }
}

/// The section, if the run had a baseline.
pub(super) fn render(out: &mut String, d: &DataplaneResults) {
    let Some(rev) = &d.baseline_rev else {
        return;
    };
    let short = &rev[..rev.len().min(7)];
    let all = pairs(d);
    let _ = writeln!(
        out,
        "### Against the baseline ({short})\n\n\
         lb's XDP object as it was at `{rev}` (built from a worktree by `cargo xtask \
         bench --baseline {short}`, with the same toolchain and flags), loaded beside \
         the current one with the same capacities and tables. Every lb case of every \
         group below ran on both, interleaved in the same rounds, on the same frames; \
         each figure is current / baseline of the medians (lower is faster). \
         \"Goal met\" looks at every configuration, not only the headline's.\n"
    );
    // Goals: the worst ratio over every case each goal covers.
    let mut goals: Vec<(&'static str, f64, f64, usize)> = Vec::new();
    for (g, c, _, r) in &all {
        let (limit, name) = goal(g, c);
        match goals.iter_mut().find(|(n, ..)| *n == name) {
            Some(e) => {
                e.2 = e.2.max(*r);
                e.3 += 1;
            }
            None => goals.push((name, limit, *r, 1)),
        }
    }
    goals.sort_by(|a, b| a.1.total_cmp(&b.1));
    let _ = writeln!(
        out,
        "| goal | current / baseline | worst measured | cases | met |\n\
         | --- | --- | --- | --- | --- |"
    );
    for (name, limit, worst, n) in &goals {
        let met = if worst <= limit { "yes" } else { "no" };
        let _ = writeln!(out, "| {name} | ≤ {limit} | {} | {n} | {met} |", x(*worst));
    }
    out.push('\n');

    if let Some(g) = d
        .matrix
        .iter()
        .find(|g| g.backends == super::HEADLINE_BACKENDS && g.services == 4)
    {
        let _ = writeln!(
            out,
            "{} services, {} backends each (current ns / baseline ns in brackets):\n\n\
             | path | IPv4 dsr-l2 | IPv4 ipip | IPv6 dsr-l2 | IPv6 ipip |\n\
             | --- | --- | --- | --- | --- |",
            g.services, g.backends
        );
        for path in [
            Path::NotService,
            Path::Established,
            Path::Syn,
            Path::SynNewFlow,
            Path::NewFlow,
        ] {
            let cell = |family: Family, mode: Option<Mode>| {
                let c = g.cases.iter().find(|c| {
                    c.path == path
                        && c.family == Some(family)
                        && c.mode == mode
                        && (path != Path::Established
                            || c.method == "direct"
                            || mode == Some(Mode::Ipip))
                });
                match c.and_then(|c| Some((c, on_baseline(g, c)?))) {
                    Some((c, b)) => format!(
                        "{} ({} / {})",
                        x(c.summary.median / b.summary.median),
                        ns(c.summary.median),
                        ns(b.summary.median)
                    ),
                    None => "—".to_owned(),
                }
            };
            let cells: Vec<String> = MEASURED_ORDER
                .iter()
                .map(|&(f, m)| {
                    if path == Path::NotService {
                        if m == Mode::DsrL2 {
                            cell(f, None)
                        } else {
                            "(no mode)".to_owned()
                        }
                    } else {
                        cell(f, Some(m))
                    }
                })
                .collect();
            let _ = writeln!(out, "| {} | {} |", path.label(), cells.join(" | "));
        }
        out.push('\n');
    }

    let _ = writeln!(
        out,
        "Every case (ns per packet, medians):\n\n\
         | group | path | family | mode | method | flows | current | baseline | current / baseline | goal |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for (g, c, b, r) in &all {
        let (limit, _) = goal(g, c);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | ≤ {limit} |",
            group_label(g),
            c.path.label(),
            c.family.map_or("—", Family::label),
            c.mode.map_or("—", Mode::label),
            c.method,
            thousands(c.flows),
            ns(c.summary.median),
            ns(b.summary.median),
            x(*r)
        );
    }
    out.push('\n');
}
