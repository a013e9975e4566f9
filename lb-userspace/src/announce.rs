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
//!    outage and not caught up, would send ECMP-moved flows elsewhere);
//! 4. at least one service on the VIP has a backend in rotation on its own
//!    probes' word (panic mode, which keeps failing backends in the table,
//!    does not count: a VIP whose every backend fails is withdrawn, so the
//!    routers can send its clients elsewhere).
//!
//! A VIP that several services share (ports, protocols) is announced while
//! any of them can serve: one broken service must not take its siblings down.
//! But every one of them must have the fleet's table.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
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

/// The decision for one VIP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The VIP.
    pub vip: IpAddr,
    /// Services on it, by name.
    pub services: Vec<String>,
    /// Why it is not announced; `None` when it is.
    pub withheld: Option<Withheld>,
}

/// Decides every VIP of `services`.
pub fn decide(node: NodeView, services: &[ServiceView]) -> Vec<Decision> {
    let mut by_vip: BTreeMap<IpAddr, (Vec<String>, usize, bool)> = BTreeMap::new();
    for s in services {
        let entry = by_vip.entry(s.vip).or_insert((Vec::new(), 0, true));
        entry.0.push(s.name.clone());
        entry.1 += s.in_rotation;
        entry.2 &= s.agreed;
    }
    by_vip
        .into_iter()
        .map(|(vip, (names, in_rotation, agreed))| Decision {
            vip,
            services: names,
            withheld: if node.drained {
                Some(Withheld::Drained)
            } else if !node.attached {
                Some(Withheld::NotAttached)
            } else if !node.converged || !agreed {
                Some(Withheld::NotConverged)
            } else if in_rotation == 0 {
                Some(Withheld::NoBackendInRotation)
            } else {
                None
            },
        })
        .collect()
}

/// The VIPs the decisions announce.
pub fn announced(decisions: &[Decision]) -> BTreeSet<IpAddr> {
    decisions
        .iter()
        .filter(|d| d.withheld.is_none())
        .map(|d| d.vip)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
            announced(&d).into_iter().collect::<Vec<_>>(),
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
            assert!(announced(&d).is_empty());
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
    fn no_services_announce_nothing() {
        assert!(decide(SERVING, &[]).is_empty());
    }
}
