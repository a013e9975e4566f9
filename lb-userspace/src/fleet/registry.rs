//! Backends that register themselves (pure): what an `lb agent` writes
//! under `P/registered/SERVICE/ADDRESS` with its lease, and how a node
//! admits those registrations into its desired state.
//!
//! Registrations are part of the desired state: every node reads the same
//! keys at the same revision and admits them by the same rules, in the same
//! order, so every node builds the same tables. A registered backend still
//! takes no flow before this node's probes pass (it starts as any new
//! backend does, checking). A registration that cannot be admitted (its
//! service does not exist, its address does not fit the service, the
//! capacity is full) is refused on its own and reported; it never refuses
//! the rest of the state.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use serde::{Deserialize, Serialize};

use crate::config::{self, Desired, MAX_WEIGHT, Registered};

/// What an agent writes for one service it serves. Fields it does not
/// know are ignored: an agent newer than the nodes still registers during a
/// rolling upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// The backend's address, as the key names it.
    pub address: IpAddr,
    /// Its weight (0 to [`MAX_WEIGHT`]).
    pub weight: u32,
    /// The percent of that weight its host's load leaves it (1 to 100).
    #[serde(default = "full")]
    pub percent: u32,
    /// Leaving: no new flows, its flows stay until they end (SIGTERM).
    #[serde(default)]
    pub draining: bool,
    /// The host's name, for operators.
    pub host: String,
    /// The agent's lb version.
    pub version: String,
}

fn full() -> u32 {
    FULL_PERCENT
}

/// The percent of an unloaded backend.
pub const FULL_PERCENT: u32 = 100;

/// Registrations: service → backend address → registration.
pub type Registrations = BTreeMap<String, BTreeMap<IpAddr, Registration>>;

/// A registration a node does not admit, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Its service.
    pub service: String,
    /// Its address.
    pub address: IpAddr,
    /// Why.
    pub why: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "registration of {} for service {:?}: {}",
            self.address, self.service, self.why
        )
    }
}

/// Admits `registered` into `desired`, in key order, so that every node
/// admits the same ones. A backend the services already list stays as the
/// operator configured it (its weight wins) and is marked registered.
/// Admitted backends are marked in their service's
/// [`config::Service::registered`]. Returns why each other registration was
/// refused.
pub fn admit(desired: &mut Desired, registered: &Registrations) -> Vec<Refused> {
    let mut refused = Vec::new();
    let s = &desired.settings;
    let mut memberships: usize = desired.services.values().map(|v| v.backends.len()).sum();
    for (service, backends) in registered {
        for (ip, r) in backends {
            let why = |what: &str| Refused {
                service: service.clone(),
                address: *ip,
                why: what.to_string(),
            };
            let Some(svc) = desired.services.get_mut(service) else {
                refused.push(why("no such service"));
                continue;
            };
            // Checked for a backend the operator lists too: it scales the
            // weight there as well.
            if !(1..=FULL_PERCENT).contains(&r.percent) {
                refused.push(why(&format!("load percent {}: from 1 to 100", r.percent)));
                continue;
            }
            if !svc.backends.contains_key(ip) {
                let problem = if !config::usable(*ip) {
                    Some("not a unicast address".to_string())
                } else if svc.vip.is_ipv4() != ip.is_ipv4() {
                    Some(format!("not of the VIP's family ({})", svc.vip))
                } else if r.weight > MAX_WEIGHT {
                    Some(config::weight_range_error(r.weight))
                } else if memberships >= s.capacity.max_backends as usize {
                    Some(format!(
                        "settings.capacity.max_backends ({}) are all taken",
                        s.capacity.max_backends
                    ))
                } else if s
                    .table_size
                    .is_some_and(|size| svc.backends.len() >= size as usize)
                {
                    Some("the service's table has no slot left".to_string())
                } else {
                    None
                };
                if let Some(p) = problem {
                    refused.push(why(&p));
                    continue;
                }
                svc.backends.insert(*ip, r.weight);
                memberships += 1;
            }
            svc.registered.insert(
                *ip,
                Registered {
                    draining: r.draining,
                    percent: r.percent,
                },
            );
        }
    }
    refused
}

/// The addresses of `registered` per service, for the leader's health
/// agreement (which reads the services without a node's settings).
pub fn addresses(registered: &Registrations) -> BTreeMap<String, BTreeSet<IpAddr>> {
    registered
        .iter()
        .map(|(s, m)| (s.clone(), m.keys().copied().collect()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[settings]
interfaces = ["eth0"]
max_backends = 4

[[service]]
name = "web"
vip = "198.18.1.1"
port = 80
protocol = "tcp"
[[service.backend]]
address = "198.18.0.11"
weight = 3
"#;

    fn reg(ip: &str, weight: u32) -> Registration {
        Registration {
            address: ip.parse().unwrap(),
            weight,
            percent: FULL_PERCENT,
            draining: false,
            host: "h".into(),
            version: "0".into(),
        }
    }

    fn registrations(list: &[(&str, Registration)]) -> Registrations {
        let mut m = Registrations::new();
        for (svc, r) in list {
            m.entry(svc.to_string())
                .or_default()
                .insert(r.address, r.clone());
        }
        m
    }

    #[test]
    fn registrations_join_their_service_and_the_operators_entry_wins() {
        let mut d = config::parse(FILE).unwrap();
        let regs = registrations(&[
            ("web", reg("198.18.0.12", 2)),
            ("web", reg("198.18.0.11", 9)),
        ]);
        let refused = admit(&mut d, &regs);
        assert!(refused.is_empty(), "{refused:?}");
        let b = &d.services["web"].backends;
        assert_eq!(b[&"198.18.0.12".parse().unwrap()], 2);
        assert_eq!(
            b[&"198.18.0.11".parse().unwrap()],
            3,
            "configured weight kept"
        );
        assert_eq!(d.services["web"].registered.len(), 2);
    }

    #[test]
    fn bad_registrations_are_refused_alone() {
        let mut d = config::parse(FILE).unwrap();
        let regs = registrations(&[
            ("nope", reg("198.18.0.13", 1)),
            ("web", reg("2001:2::1", 1)),
            ("web", reg("224.0.0.1", 1)),
            ("web", reg("198.18.0.14", MAX_WEIGHT + 1)),
            ("web", reg("198.18.0.15", 1)),
            ("web", reg("198.18.0.16", 1)),
            ("web", reg("198.18.0.17", 1)),
            ("web", reg("198.18.0.18", 1)),
        ]);
        let refused = admit(&mut d, &regs);
        // Four backends fit: the configured one and three registered, in
        // address order.
        let joined: Vec<_> = d.services["web"]
            .registered
            .keys()
            .map(ToString::to_string)
            .collect();
        assert_eq!(joined, ["198.18.0.15", "198.18.0.16", "198.18.0.17"]);
        assert_eq!(refused.len(), 5, "{refused:#?}");
        let text: Vec<String> = refused.iter().map(ToString::to_string).collect();
        for needle in [
            "no such service",
            "family",
            "unicast",
            "weight",
            "max_backends",
        ] {
            assert!(
                text.iter().any(|r| r.contains(needle)),
                "{needle}: {text:#?}"
            );
        }
    }

    #[test]
    fn a_load_percent_out_of_range_is_refused_for_a_configured_backend_too() {
        let mut d = config::parse(FILE).unwrap();
        let mut r = reg("198.18.0.11", 1);
        r.percent = 1_000;
        let refused = admit(&mut d, &registrations(&[("web", r)]));
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(d.services["web"].registered.is_empty());
    }

    #[test]
    fn admission_is_the_same_whatever_order_registrations_arrive_in() {
        let list = [
            ("web", reg("198.18.0.19", 1)),
            ("web", reg("198.18.0.12", 1)),
            ("web", reg("198.18.0.15", 1)),
            ("web", reg("198.18.0.13", 1)),
        ];
        let mut reversed = list.clone();
        reversed.reverse();
        let (mut a, mut b) = (config::parse(FILE).unwrap(), config::parse(FILE).unwrap());
        assert_eq!(
            admit(&mut a, &registrations(&list)),
            admit(&mut b, &registrations(&reversed))
        );
        assert_eq!(a.services, b.services);
    }
}
