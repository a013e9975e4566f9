//! Which VIPs this node announces, and why the others are withheld (pure).
//!
//! A node announces a VIP only while it can serve it: the routers send it
//! traffic for as long as the route stands, so a route that outlives the
//! node's ability to forward black-holes clients. The rule, checked in this
//! order so that the reason shown is the one an operator acts on first:
//!
//! 1. the node is not drained (`lb node drain`);
//! 2. every configured interface has the XDP program attached;
//! 3. in a fleet, the node has converged: it applied the fleet's newest
//!    state, and every service on the VIP has the table most live nodes at
//!    that revision have (a node whose view drifted, or that is back from an
//!    outage and not caught up, would send ECMP-moved flows elsewhere). A
//!    node that has been in step at some time since it started keeps that
//!    standing through [`CONVERGENCE_GRACE`] out of step
//!    ([`ConvergenceGrace`]);
//! 4. at least one service on the VIP has a backend in rotation on its own
//!    probes' word (panic mode, which keeps failing backends in the table,
//!    does not count: a VIP whose every backend fails is withdrawn, so the
//!    routers can send its clients elsewhere);
//! 5. no service on the VIP is *settling*: a backend it wants still awaits
//!    its probes' first verdict (new, or back from maintenance), or a table
//!    change is held back. Unlike the others this rule only holds a VIP
//!    back: a route already announced stays. A node that announces with
//!    part of its table sends the flows the routers move to it (when its
//!    route appears, they rehash) to other backends than its neighbours
//!    would; a moment's wait costs nothing. Each wait is bounded
//!    ([`SettleClock`]): probes that answer too slowly do not keep a VIP
//!    withdrawn.
//!
//! A VIP that several services share (ports, protocols) is announced while
//! any of them can serve: one broken service must not take its siblings down.
//! But every one of them must have the fleet's table.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// What the node as a whole can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeView {
    /// The operator drained the node.
    pub drained: bool,
    /// Every configured interface has the program attached.
    pub attached: bool,
    /// Standalone, or a fleet node that applied the fleet's newest state.
    pub converged: bool,
}

/// One service as the rule sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceView {
    /// Its name.
    pub name: String,
    /// Its VIP.
    pub vip: IpAddr,
    /// Backends that take new flows on their own probes' word.
    pub in_rotation: usize,
    /// Its table is the fleet's (always, standalone).
    pub agreed: bool,
    /// Its table is about to change: rule 5, as [`SettleClock`] counts it.
    pub settling: bool,
}

/// Why a VIP is not announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Withheld {
    /// The operator drained the node.
    Drained,
    /// An interface lacks the program (gone, or not attached yet).
    NotAttached,
    /// Behind the fleet's state, or a table differs from the fleet's.
    NotConverged,
    /// No service on the VIP has a backend in rotation.
    NoBackendInRotation,
}

impl Withheld {
    /// The reason in words, for logs and tables.
    pub fn describe(self) -> &'static str {
        match self {
            Withheld::Drained => "node drained",
            Withheld::NotAttached => "an interface lacks the XDP program",
            Withheld::NotConverged => "not converged with the fleet",
            Withheld::NoBackendInRotation => "no backend in rotation",
        }
    }
}

/// Why a VIP is settling, in words (rule 5).
pub const SETTLING: &str = "table settling: first probe verdicts pending, or a rebuild held back";

/// The decision for one VIP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The VIP.
    pub vip: IpAddr,
    /// Services on it, by name.
    pub services: Vec<String>,
    /// Why it is not announced; `None` when it can be.
    pub withheld: Option<Withheld>,
    /// It can be, but a service on it is settling (rule 5): no route is
    /// added for it yet, and one already there stays.
    #[serde(default)]
    pub settling: bool,
}

/// Decides every VIP of `services`.
pub fn decide(node: NodeView, services: &[ServiceView]) -> Vec<Decision> {
    let mut by_vip: BTreeMap<IpAddr, (Vec<String>, usize, bool, bool)> = BTreeMap::new();
    for s in services {
        let entry = by_vip.entry(s.vip).or_insert((Vec::new(), 0, true, false));
        entry.0.push(s.name.clone());
        entry.1 += s.in_rotation;
        entry.2 &= s.agreed;
        entry.3 |= s.settling;
    }
    by_vip
        .into_iter()
        .map(|(vip, (names, in_rotation, agreed, settling))| {
            let withheld = if node.drained {
                Some(Withheld::Drained)
            } else if !node.attached {
                Some(Withheld::NotAttached)
            } else if !node.converged || !agreed {
                Some(Withheld::NotConverged)
            } else if in_rotation == 0 {
                Some(Withheld::NoBackendInRotation)
            } else {
                None
            };
            Decision {
                vip,
                services: names,
                withheld,
                settling: settling && withheld.is_none(),
            }
        })
        .collect()
}

/// How long a node that has been in step with the fleet may be out of step
/// (behind its newest state, or a table unlike most nodes') and still count
/// as converged. A fleet change reaches the nodes some milliseconds apart,
/// and more while a new fleet's backends come up; a withdrawal for that long
/// would move the flows that ECMP hashes onto the node away and back, each
/// time the routers rehash, which costs more than serving them from the
/// previous table for a moment.
pub const CONVERGENCE_GRACE: Duration = Duration::from_secs(1);

/// Rule 3's grace: whether a node counts as in step with the fleet. A node
/// that has not been in step since it started (back from an outage, or
/// refused the fleet's state from the start) never does until it is; one
/// that has, does through a spell out of step shorter than
/// [`CONVERGENCE_GRACE`].
#[derive(Debug, Default)]
pub struct ConvergenceGrace {
    /// In step at some time since the node started.
    was_in_step: bool,
    /// When the current spell out of step began.
    out_since: Option<Instant>,
}

impl ConvergenceGrace {
    /// Whether the node counts as in step at `now`, being in step
    /// (`in_step`) or not.
    pub fn counts_in_step(&mut self, now: Instant, in_step: bool) -> bool {
        if in_step {
            self.was_in_step = true;
            self.out_since = None;
            return true;
        }
        let since = *self.out_since.get_or_insert(now);
        self.was_in_step && now.saturating_duration_since(since) < CONVERGENCE_GRACE
    }
}

/// What a service's table waits on before it settles (rule 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pending {
    /// A backend's first probe verdict (new, or back from maintenance).
    Verdict(IpAddr),
    /// A rebuild held back by the rebuild gap, or retried after a failure.
    Rebuild,
}

/// Rule 5's clock: how long each thing a service's table waits on has been
/// pending, so that a wait for probes that answer too slowly ends. Each is
/// timed from when it was first seen pending, and forgotten once it is not.
#[derive(Debug, Default)]
pub struct SettleClock {
    since: BTreeMap<String, BTreeMap<Pending, Instant>>,
}

impl SettleClock {
    /// Whether `service`, whose table waits on `pending` at `now` (each
    /// with how long it may), counts as settling: while any has waited
    /// less than its limit.
    pub fn counts_settling(
        &mut self,
        service: &str,
        now: Instant,
        pending: &[(Pending, Duration)],
    ) -> bool {
        if pending.is_empty() {
            self.since.remove(service);
            return false;
        }
        let since = self.since.entry(service.to_string()).or_default();
        since.retain(|p, _| pending.iter().any(|(q, _)| q == p));
        let mut settling = false;
        for (p, limit) in pending {
            let t = *since.entry(*p).or_insert(now);
            settling |= now.saturating_duration_since(t) < *limit;
        }
        settling
    }

    /// Forgets services no longer configured.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.since.retain(|s, _| keep(s));
    }
}

/// What the route keeper is to make of the announce table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    /// VIPs to announce.
    pub announce: BTreeSet<IpAddr>,
    /// VIPs whose route stays if it is there, and is not added if not.
    pub keep: BTreeSet<IpAddr>,
}

/// The routes the decisions call for.
pub fn routes(decisions: &[Decision]) -> Routes {
    let mut routes = Routes::default();
    for d in decisions.iter().filter(|d| d.withheld.is_none()) {
        if d.settling {
            routes.keep.insert(d.vip);
        } else {
            routes.announce.insert(d.vip);
        }
    }
    routes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_never_in_step_is_out_of_step_at_once() {
        let mut grace = ConvergenceGrace::default();
        let t0 = Instant::now();
        assert!(!grace.counts_in_step(t0, false));
        assert!(!grace.counts_in_step(t0 + CONVERGENCE_GRACE / 2, false));
        assert!(grace.counts_in_step(t0 + CONVERGENCE_GRACE, true));
    }

    #[test]
    fn a_short_spell_out_of_step_is_excused_and_a_long_one_is_not() {
        let mut grace = ConvergenceGrace::default();
        let t0 = Instant::now();
        assert!(grace.counts_in_step(t0, true));
        let out = t0 + Duration::from_secs(10);
        assert!(grace.counts_in_step(out, false), "the spell's start");
        let almost = out + CONVERGENCE_GRACE - Duration::from_millis(1);
        assert!(grace.counts_in_step(almost, false), "within the grace");
        assert!(
            !grace.counts_in_step(out + CONVERGENCE_GRACE, false),
            "the grace is over"
        );
        assert!(
            !grace.counts_in_step(out + 2 * CONVERGENCE_GRACE, false),
            "and stays over while the spell lasts"
        );
        // Back in step: the next spell has a grace of its own.
        let back = out + 3 * CONVERGENCE_GRACE;
        assert!(grace.counts_in_step(back, true));
        assert!(grace.counts_in_step(back + CONVERGENCE_GRACE / 2, false));
        assert!(!grace.counts_in_step(back + 2 * CONVERGENCE_GRACE, false));
    }

    const SERVING: NodeView = NodeView {
        drained: false,
        attached: true,
        converged: true,
    };

    fn svc(name: &str, vip: &str, in_rotation: usize) -> ServiceView {
        ServiceView {
            name: name.into(),
            vip: vip.parse().unwrap(),
            in_rotation,
            agreed: true,
            settling: false,
        }
    }

    #[test]
    fn a_vip_is_announced_while_any_of_its_services_can_serve() {
        let services = [
            svc("web", "198.18.1.1", 2),
            svc("web-tls", "198.18.1.1", 0),
            svc("dns", "2001:2:1::53", 0),
        ];
        let d = decide(SERVING, &services);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].services, ["web", "web-tls"]);
        assert_eq!(d[0].withheld, None);
        assert_eq!(d[1].withheld, Some(Withheld::NoBackendInRotation));
        assert_eq!(
            routes(&d).announce.into_iter().collect::<Vec<_>>(),
            ["198.18.1.1".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn node_reasons_withhold_every_vip_and_drain_is_named_first() {
        let services = [svc("web", "198.18.1.1", 3), svc("dns", "198.18.1.2", 0)];
        for (node, reason) in [
            (
                NodeView {
                    drained: true,
                    attached: false,
                    converged: false,
                },
                Withheld::Drained,
            ),
            (
                NodeView {
                    attached: false,
                    converged: false,
                    ..SERVING
                },
                Withheld::NotAttached,
            ),
            (
                NodeView {
                    converged: false,
                    ..SERVING
                },
                Withheld::NotConverged,
            ),
        ] {
            let d = decide(node, &services);
            assert!(d.iter().all(|d| d.withheld == Some(reason)), "{d:?}");
            assert_eq!(routes(&d), Routes::default());
        }
    }

    #[test]
    fn one_service_with_another_table_than_the_fleets_withholds_its_vip() {
        let mut tls = svc("web-tls", "198.18.1.1", 2);
        tls.agreed = false;
        let services = [
            svc("web", "198.18.1.1", 2),
            tls,
            svc("dns", "198.18.1.2", 1),
        ];
        let d = decide(SERVING, &services);
        assert_eq!(d[0].withheld, Some(Withheld::NotConverged));
        assert_eq!(d[1].withheld, None);
    }

    #[test]
    fn a_settling_service_holds_its_vip_back_but_keeps_a_route_already_there() {
        let mut web = svc("web", "198.18.1.1", 1);
        web.settling = true;
        let services = [
            web,
            svc("web-tls", "198.18.1.1", 2),
            svc("dns", "198.18.1.2", 1),
        ];
        let d = decide(SERVING, &services);
        assert_eq!((d[0].withheld, d[0].settling), (None, true));
        assert_eq!((d[1].withheld, d[1].settling), (None, false));
        let vip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            routes(&d),
            Routes {
                announce: [vip("198.18.1.2")].into(),
                keep: [vip("198.18.1.1")].into(),
            }
        );
        // The other rules come first: they withdraw.
        let mut idle = svc("web", "198.18.1.1", 0);
        idle.settling = true;
        let d = decide(SERVING, &[idle]);
        assert_eq!(d[0].withheld, Some(Withheld::NoBackendInRotation));
        assert!(!d[0].settling);
        assert_eq!(routes(&d), Routes::default());
    }

    #[test]
    fn each_pending_verdict_counts_for_at_most_its_own_limit() {
        let mut clock = SettleClock::default();
        let (a, b) = (
            Pending::Verdict("198.18.0.11".parse().unwrap()),
            Pending::Verdict("198.18.0.12".parse().unwrap()),
        );
        let limit = Duration::from_secs(5);
        let t0 = Instant::now();
        assert!(!clock.counts_settling("web", t0, &[]));
        assert!(clock.counts_settling("web", t0, &[(a, limit)]));
        let almost = t0 + limit - Duration::from_millis(1);
        assert!(clock.counts_settling("web", almost, &[(a, limit)]));
        assert!(
            clock.counts_settling("dns", almost, &[(a, limit)]),
            "each service times its own"
        );
        // B, pending from late in A's wait, has its whole limit.
        assert!(clock.counts_settling("web", almost, &[(a, limit), (b, limit)]));
        let later = t0 + limit + Duration::from_secs(1);
        assert!(clock.counts_settling("web", later, &[(a, limit), (b, limit)]));
        let over = almost + limit;
        assert!(!clock.counts_settling("web", over, &[(a, limit), (b, limit)]));
        // A verdict given, then pending again: timed afresh.
        assert!(!clock.counts_settling("web", over, &[(b, limit)]));
        assert!(clock.counts_settling("web", over, &[(a, limit), (b, limit)]));
        let rebuild = [(Pending::Rebuild, Duration::from_millis(100))];
        assert!(!clock.counts_settling("web", over, &[]));
        assert!(clock.counts_settling("web", over, &rebuild));
        assert!(!clock.counts_settling("web", over + limit, &rebuild));
        clock.retain(|s| s != "web");
        assert!(clock.counts_settling("web", over + limit, &rebuild));
    }

    #[test]
    fn no_services_announce_nothing() {
        assert!(decide(SERVING, &[]).is_empty());
    }
}
