//! Which VIPs this node announces, and why the others are withheld (pure).
//!
//! A node announces a VIP only while it can serve it: the routers send it
//! traffic for as long as the route stands, so a route that outlives the
//! node's ability to forward black-holes clients. The rule, checked in this
//! order so that the reason shown is the one an operator acts on first:
//!
//! 1. the node is not drained (`lb node drain`);
//! 2. every configured interface has the XDP program attached;
//! 3. at least one service on the VIP has a backend in rotation on its own
//!    probes' word (panic mode, which keeps failing backends in the table,
//!    does not count: a VIP whose every backend fails is withdrawn, so the
//!    routers can send its clients elsewhere).
//!
//! A VIP that several services share (ports, protocols) is announced while
//! any of them can serve: one broken service must not take its siblings down.

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
}

/// Why a VIP is not announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Withheld {
    /// The operator drained the node.
    Drained,
    /// An interface lacks the program (gone, or not attached yet).
    NotAttached,
    /// No service on the VIP has a backend in rotation.
    NoBackendInRotation,
}

impl Withheld {
    /// The reason in words, for logs and tables.
    pub fn describe(self) -> &'static str {
        match self {
            Withheld::Drained => "node drained",
            Withheld::NotAttached => "an interface lacks the XDP program",
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
    let mut by_vip: BTreeMap<IpAddr, (Vec<String>, usize)> = BTreeMap::new();
    for s in services {
        let entry = by_vip.entry(s.vip).or_default();
        entry.0.push(s.name.clone());
        entry.1 += s.in_rotation;
    }
    by_vip
        .into_iter()
        .map(|(vip, (names, in_rotation))| Decision {
            vip,
            services: names,
            withheld: if node.drained {
                Some(Withheld::Drained)
            } else if !node.attached {
                Some(Withheld::NotAttached)
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
    };

    fn svc(name: &str, vip: &str, in_rotation: usize) -> ServiceView {
        ServiceView {
            name: name.into(),
            vip: vip.parse().unwrap(),
            in_rotation,
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
                },
                Withheld::Drained,
            ),
            (
                NodeView {
                    drained: false,
                    attached: false,
                },
                Withheld::NotAttached,
            ),
        ] {
            let d = decide(node, &services);
            assert!(d.iter().all(|d| d.withheld == Some(reason)), "{d:?}");
            assert!(announced(&d).is_empty());
        }
    }

    #[test]
    fn no_services_announce_nothing() {
        assert!(decide(SERVING, &[]).is_empty());
    }
}
