//! The fleet's agreed health view (pure).
//!
//! Every node probes every backend and publishes what it sees. The leader
//! folds the live nodes' views into one verdict per backend and writes it to
//! `P/health`; every node builds its tables from that verdict, not from its
//! own probes, so nodes that applied the same revision hold the same tables
//! even when their probes disagree.
//!
//! The rule: a backend is out when a strict majority of the live nodes that
//! report on it see it down. One node that alone cannot reach a backend
//! (a firewall, a bad link) does not evict it; a backend that really died
//! is evicted once most nodes' probes agree. A node that sees no other live
//! node is its own majority. Slow start steps are taken by the leader's
//! clock and written with the verdict, so every node ramps in lockstep.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use super::state::{Agreed, AgreedHealth, Awaiting, NodeReport};
use crate::health::{SLOW_START_STEPS, slow_start_percent};

/// Up (`true`) or down per service and backend.
pub type Verdicts = BTreeMap<String, BTreeMap<IpAddr, bool>>;

/// The majority verdict on every backend of `backends` (service → its
/// backends) from the live nodes' `reports`. Only verdicts count: a node
/// still awaiting its probes' first verdict on a backend does not vote, so
/// nodes that just started cannot outvote those that see it work. A backend
/// no node has a verdict on is out while any node awaits one (nobody has
/// seen it work yet, as a new backend on a single node), and in when no
/// node reports on it at all.
pub fn majority(backends: &BTreeMap<String, Vec<IpAddr>>, reports: &[&NodeReport]) -> Verdicts {
    backends
        .iter()
        .map(|(service, ips)| {
            let verdicts = ips
                .iter()
                .map(|ip| {
                    let (mut total, mut down) = (0usize, 0usize);
                    for up in reports
                        .iter()
                        .filter_map(|r| r.health.get(service).and_then(|m| m.get(ip)))
                    {
                        total += 1;
                        down += usize::from(!up);
                    }
                    let awaited = || {
                        reports
                            .iter()
                            .any(|r| r.awaiting.get(service).is_some_and(|s| s.contains(ip)))
                    };
                    let up = if total == 0 {
                        !awaited()
                    } else {
                        down * 2 <= total
                    };
                    (*ip, up)
                })
                .collect();
            (service.clone(), verdicts)
        })
        .collect()
}

/// The leader's slow-start clock: when each recovered backend's ramp began.
#[derive(Debug, Default)]
pub struct Ramps {
    started: BTreeMap<(String, IpAddr), Instant>,
}

impl Ramps {
    /// The agreed view for `verdicts` at `now`. A backend that `previous`
    /// (the view last written) had down and that is up now starts its ramp;
    /// one that `previous` had part-way up (another leader's ramp) continues
    /// from that step; a backend new to the fleet is not ramped.
    pub fn step(
        &mut self,
        previous: &AgreedHealth,
        verdicts: &Verdicts,
        slow_start: &BTreeMap<String, Duration>,
        now: Instant,
    ) -> AgreedHealth {
        let mut out = AgreedHealth::new();
        let mut live = BTreeMap::new();
        for (service, backends) in verdicts {
            let period = slow_start.get(service).copied().unwrap_or_default();
            let mut view = BTreeMap::new();
            for (ip, up) in backends {
                let key = (service.clone(), *ip);
                let before = previous.get(service).and_then(|m| m.get(ip));
                let percent = if !up {
                    100
                } else {
                    let start = match (self.started.get(&key), before) {
                        (Some(s), _) => Some(*s),
                        (None, Some(b)) if !b.up => Some(now),
                        (None, Some(b)) if b.percent < 100 => {
                            // Resume another leader's ramp at its step.
                            let step = (b.percent * SLOW_START_STEPS / 100).saturating_sub(1);
                            now.checked_sub(period * step / SLOW_START_STEPS)
                        }
                        _ => None,
                    };
                    match start {
                        Some(s) => {
                            let p = slow_start_percent(now.saturating_duration_since(s), period);
                            if p < 100 {
                                live.insert(key, s);
                            }
                            p
                        }
                        None => 100,
                    }
                };
                view.insert(*ip, Agreed { up: *up, percent });
            }
            out.insert(service.clone(), view);
        }
        self.started = live;
        out
    }

    /// Whether a ramp is in progress (the leader steps it on a timer).
    pub fn ramping(&self) -> bool {
        !self.started.is_empty()
    }
}

/// A node's tables as it reports them: its name, the revision they are
/// built from, a digest per service, and the backends its probes await a
/// first verdict on.
pub type Tables<'a> = (&'a str, i64, &'a BTreeMap<String, String>, &'a Awaiting);

/// Which nodes hold which table (digest) of `service` among `nodes` at
/// `revision`, leaving out nodes that await a verdict on its backends.
fn holders<'a>(
    nodes: &[Tables<'a>],
    revision: i64,
    service: &str,
) -> BTreeMap<&'a str, Vec<&'a str>> {
    let mut out: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, _, digests, _) in nodes
        .iter()
        .filter(|n| n.1 == revision && !n.3.contains_key(service))
    {
        if let Some(d) = digests.get(service) {
            out.entry(d.as_str()).or_default().push(name);
        }
    }
    out
}

/// The table a strict majority of `holders` hold, if any.
fn majority_table<'a>(holders: &BTreeMap<&'a str, Vec<&str>>) -> Option<&'a str> {
    let total: usize = holders.values().map(Vec::len).sum();
    holders
        .iter()
        .find(|(_, n)| n.len() * 2 > total)
        .map(|(d, _)| *d)
}

/// The services each node holds a different table for than a strict
/// majority of the nodes at the same revision do. Nodes at different
/// revisions are not compared (one of them is catching up), nor a node's
/// table of a service it awaits a verdict on (it will change once the
/// verdict comes; the node holds its VIP back meanwhile); with no strict
/// majority (two nodes that differ) nobody is singled out: that is a
/// [`digest_splits`].
pub fn digest_outliers(nodes: &[Tables<'_>]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, revision, digests, awaiting) in nodes {
        for (service, mine) in *digests {
            if awaiting.contains_key(service) {
                continue;
            }
            if majority_table(&holders(nodes, *revision, service)).is_some_and(|d| d != mine) {
                out.entry(name.to_string())
                    .or_default()
                    .push(service.clone());
            }
        }
    }
    out
}

/// Services whose nodes at one revision hold different tables with none
/// held by a strict majority (two nodes that differ, an even split), each
/// said in a line naming the nodes by table. No node is withheld for it
/// (which one would be wrong?), so it is shown instead.
pub fn digest_splits(nodes: &[Tables<'_>]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (_, revision, digests, _) in nodes {
        for service in digests.keys() {
            if !seen.insert((*revision, service.as_str())) {
                continue;
            }
            let holders = holders(nodes, *revision, service);
            if holders.len() < 2 || majority_table(&holders).is_some() {
                continue;
            }
            let groups: Vec<String> = holders.values().map(|n| n.join(", ")).collect();
            out.push(format!(
                "service {service} at revision {revision}: no table is held by a strict \
                 majority of the nodes ({} hold different ones)",
                groups.join(" / ")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([198, 18, 0, last])
    }

    /// A node's report: its verdicts, and the backends it awaits one on.
    fn view(entries: &[(u8, bool)]) -> NodeReport {
        NodeReport {
            health: BTreeMap::from([(
                "web".to_string(),
                entries.iter().map(|(l, up)| (ip(*l), *up)).collect(),
            )]),
            ..NodeReport::default()
        }
    }

    fn awaiting(entries: &[(u8, bool)], awaited: &[u8]) -> NodeReport {
        NodeReport {
            awaiting: BTreeMap::from([(
                "web".to_string(),
                awaited.iter().map(|l| ip(*l)).collect(),
            )]),
            ..view(entries)
        }
    }

    fn backends(lasts: &[u8]) -> BTreeMap<String, Vec<IpAddr>> {
        BTreeMap::from([("web".to_string(), lasts.iter().map(|l| ip(*l)).collect())])
    }

    #[test]
    fn a_backend_is_out_only_when_most_live_nodes_see_it_down() {
        let b = backends(&[11, 12, 13]);
        // Three nodes: one alone cannot reach .11; two agree .12 is down.
        let views = [
            view(&[(11, false), (12, false), (13, true)]),
            view(&[(11, true), (12, false), (13, true)]),
            view(&[(11, true), (12, true), (13, true)]),
        ];
        let refs: Vec<&NodeReport> = views.iter().collect();
        let v = &majority(&b, &refs)["web"];
        assert_eq!((v[&ip(11)], v[&ip(12)], v[&ip(13)]), (true, false, true));
        // Two nodes that disagree keep the backend (no strict majority).
        let v = &majority(&b, &refs[..2])["web"];
        assert!(v[&ip(11)]);
        // A lone node is its own majority.
        assert!(!majority(&b, &refs[..1])["web"][&ip(11)]);
        // Nobody reports on a new backend yet: up.
        assert!(majority(&backends(&[14]), &refs)["web"][&ip(14)]);
    }

    #[test]
    fn majority_ignores_order_and_counts_only_reporting_nodes() {
        let b = backends(&[11]);
        let silent = NodeReport::default();
        let down = view(&[(11, false)]);
        for views in [vec![&silent, &down], vec![&down, &silent]] {
            assert!(!majority(&b, &views)["web"][&ip(11)]);
        }
    }

    #[test]
    fn nodes_awaiting_a_first_verdict_do_not_vote() {
        let b = backends(&[11, 12]);
        // Two nodes just started (no verdict yet) and one that sees both
        // work: its word stands, where two "down" votes would empty every
        // node's table.
        let started = awaiting(&[], &[11, 12]);
        let serving = view(&[(11, true), (12, true)]);
        let v = &majority(&b, &[&started, &started, &serving])["web"];
        assert!(v[&ip(11)] && v[&ip(12)]);
        // A verdict of down among them still evicts.
        let dead = view(&[(11, false), (12, true)]);
        assert!(!majority(&b, &[&started, &started, &dead])["web"][&ip(11)]);
        // Nobody has a verdict but some node awaits one: out, as a new
        // backend on a single node, until a node sees it work.
        let v = &majority(&b, &[&started, &NodeReport::default()])["web"];
        assert!(!v[&ip(11)] && !v[&ip(12)]);
        // A verdict on one backend decides nothing for another.
        let v = &majority(&b, &[&started, &awaiting(&[(11, true)], &[12])])["web"];
        assert!(v[&ip(11)] && !v[&ip(12)]);
    }

    #[test]
    fn the_odd_table_out_is_named_and_other_revisions_are_not_compared() {
        let d = |x: &str| BTreeMap::from([("web".to_string(), x.to_string())]);
        let (a, b, c, old) = (d("aa"), d("aa"), d("bb"), d("cc"));
        let none = Awaiting::new();
        let nodes = [
            ("lb1", 5, &a, &none),
            ("lb2", 5, &b, &none),
            ("lb3", 5, &c, &none),
            ("lb4", 4, &old, &none),
        ];
        let out = digest_outliers(&nodes);
        assert_eq!(out.keys().collect::<Vec<_>>(), ["lb3"]);
        assert_eq!(out["lb3"], ["web"]);
        // Two nodes that differ: no majority, nobody singled out, and the
        // split said.
        assert!(digest_splits(&nodes).is_empty());
        assert!(digest_outliers(&nodes[1..3]).is_empty());
        assert_eq!(
            digest_splits(&nodes[1..3]),
            [
                "service web at revision 5: no table is held by a strict majority of the \
              nodes (lb2 / lb3 hold different ones)"
            ]
        );
        // An even split of four.
        let nodes = [
            ("lb1", 5, &a, &none),
            ("lb2", 5, &b, &none),
            ("lb3", 5, &c, &none),
            ("lb4", 5, &c, &none),
        ];
        assert!(digest_outliers(&nodes).is_empty());
        assert_eq!(
            digest_splits(&nodes).len(),
            1,
            "{:?}",
            digest_splits(&nodes)
        );
        assert!(digest_splits(&nodes)[0].contains("(lb1, lb2 / lb3, lb4 hold"));
    }

    #[test]
    fn tables_awaiting_a_verdict_are_not_compared() {
        let d = |x: &str| BTreeMap::from([("web".to_string(), x.to_string())]);
        let (serving, fresh) = (d("aa"), d("bb"));
        let (none, checking) = (Awaiting::new(), awaiting(&[], &[11]).awaiting);
        // Two nodes just started, their tables still without the backends
        // they check: the one serving node is no outlier, nor are they.
        let nodes = [
            ("lb1", 5, &serving, &none),
            ("lb2", 5, &fresh, &checking),
            ("lb3", 5, &fresh, &checking),
        ];
        assert!(digest_outliers(&nodes).is_empty());
        // Once they have their verdicts, tables are compared again.
        let nodes = [
            ("lb1", 5, &serving, &none),
            ("lb2", 5, &fresh, &none),
            ("lb3", 5, &fresh, &none),
        ];
        assert_eq!(digest_outliers(&nodes)["lb1"], ["web"]);
    }

    #[test]
    fn ramps_step_by_the_leaders_clock_and_resume_after_a_new_leader() {
        let period = Duration::from_secs(8);
        let slow = BTreeMap::from([("web".to_string(), period)]);
        let t0 = Instant::now();
        let mut ramps = Ramps::default();
        let down = AgreedHealth::from([(
            "web".to_string(),
            BTreeMap::from([(
                ip(11),
                Agreed {
                    up: false,
                    percent: 100,
                },
            )]),
        )]);
        let up = BTreeMap::from([("web".to_string(), BTreeMap::from([(ip(11), true)]))]);
        let p = |h: &AgreedHealth| h["web"][&ip(11)].percent;
        let first = ramps.step(&down, &up, &slow, t0);
        assert_eq!(p(&first), 25);
        assert!(ramps.ramping());
        let later = ramps.step(&first, &up, &slow, t0 + Duration::from_secs(5));
        assert_eq!(p(&later), 75);
        // A new leader reads 75 % and carries on from that step.
        let mut other = Ramps::default();
        let resumed = other.step(&later, &up, &slow, t0 + Duration::from_secs(5));
        assert_eq!(p(&resumed), 75);
        let done = other.step(&resumed, &up, &slow, t0 + Duration::from_secs(8));
        assert_eq!(p(&done), 100);
        assert!(!other.ramping());
        // A backend new to the fleet starts at full weight.
        let fresh = Ramps::default().step(&AgreedHealth::new(), &up, &slow, t0);
        assert_eq!(p(&fresh), 100);
    }
}
