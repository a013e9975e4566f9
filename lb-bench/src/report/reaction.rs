//! The section on the daemon's reaction times.

use std::fmt::Write as _;

use crate::{reaction::ReactionResults, stats::Summary};

fn row(out: &mut String, what: &str, s: &Summary) {
    let _ = writeln!(
        out,
        "| {what} | {:.1} ms | {:.1} ms | {:.1} ms | {} |",
        s.median, s.min, s.max, s.n
    );
}

/// The reaction-times section.
pub(super) fn render(out: &mut String, r: &ReactionResults) {
    let _ = writeln!(
        out,
        "## Control plane: how fast changes reach the data plane\n\n\
         A real `lb daemon` with every setting at its default, in front of 3 backends \
         in namespaces. \"Live\" is the moment the service's table in the kernel's \
         rings map changes (a thread reads it through the daemon's pinned maps \
         every 50 µs): the next packet uses the new slots. Health settings: \
         the defaults ({}).\n\n\
         | what | median | min | max | runs |\n| --- | --- | --- | --- | --- |",
        r.health
    );
    row(
        out,
        "`lb backend set-weight`: run to returned",
        &r.set_weight_return_ms,
    );
    row(
        out,
        "`lb backend set-weight`: run to the new table live",
        &r.set_weight_live_ms,
    );
    row(
        out,
        "the table live before the command returned",
        &r.live_before_return_ms,
    );
    row(
        out,
        "a backend's server closed to its eviction live",
        &r.eviction_ms,
    );
    row(
        out,
        "its server back to its readmission live",
        &r.readmission_ms,
    );
    let mut sorted = r.evictions_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let list: Vec<String> = sorted.iter().map(|m| format!("{m:.0}")).collect();
    let _ = writeln!(
        out,
        "\nEvery eviction, ms, sorted (deaths spread over the probe interval): {}.\n\n\
         The eviction time is the health settings at work: a probe must first miss \
         (up to one interval after the death), then `fall` probes fail at the fast \
         interval, so the default settings give 1 to 3 s; a refused connection fails \
         at once, a silent backend takes up to the timeout per probe. Readmission \
         waits for a first success at the normal interval, then the rest of `rise` \
         at the fast one. Every run starts from a backend that had been up and \
         stable ({} successes in a row): one that dies again sooner is damped, and needs \
         twice the successes per recent flap to return.\n\n\
         `set-weight` returns only once the new table is live. Its time is the \
         CLI's process start and round trip, the rebuild, and storing the slots \
         that move, in place (see Build time).\n",
        list.join(", "),
        lb::health::STABLE_SUCCESSES
    );
}
