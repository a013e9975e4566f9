//! The backend host's side of each service it serves, in one place: the
//! VIP on `lo`, the ARP settings `dsr-l2` needs, and for `ipip`/`gue` the
//! decapsulator, judged by `lb doctor --backend`'s rules
//! ([`doctor::assess_backend`]) and, when asked, put right.
//!
//! A host whose setup fails takes no traffic: its agent does not register
//! it (lb's packets would be dropped, or its ARP answers would steal the
//! VIP from the load balancers).

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use anyhow::{Context as _, Result, bail};

use crate::{
    config::Mode,
    dataplane::DEFAULT_DECAP_PIN_DIR,
    decap,
    doctor::{self, Finding, Level},
};

/// One service this host serves, as the fleet's services describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// Its VIP.
    pub vip: IpAddr,
    /// Its forwarding mode.
    pub mode: Mode,
}

/// A sysctl a fix may write: its `/proc/sys` path, the value written, and
/// which values already do (some stricter than the one written, which is
/// never written over them).
struct Setting {
    path: &'static str,
    value: u32,
    enough: fn(u32) -> bool,
}

/// The ARP settings a `dsr-l2` backend needs: answer ARP only for
/// addresses on the asking interface, and never announce the VIP as a
/// source.
const ARP_SETTINGS: [Setting; 2] = [
    Setting {
        path: "net/ipv4/conf/all/arp_ignore",
        value: 1,
        enough: doctor::arp_ignore_suppresses,
    },
    Setting {
        path: "net/ipv4/conf/all/arp_announce",
        value: 2,
        enough: doctor::arp_announce_suppresses,
    },
];

/// Loose reverse-path filtering, so decapsulated packets from clients
/// anywhere are taken. The kernel applies the larger of `all`'s and the
/// tunnel's, so a strict one in either is loosened; one that is off is
/// left off.
const RP_FILTER: [Setting; 2] = [
    Setting {
        path: "net/ipv4/conf/all/rp_filter",
        value: 2,
        enough: doctor::rp_filter_lets_in,
    },
    Setting {
        path: "net/ipv4/conf/tunl0/rp_filter",
        value: 2,
        enough: doctor::rp_filter_lets_in,
    },
];

/// What `lb doctor --backend` finds for each served service.
pub fn findings(served: &BTreeMap<String, Served>) -> Vec<Finding> {
    served
        .values()
        .flat_map(|s| doctor::assess_backend(&doctor::backend_facts(s.vip), s.mode))
        .collect()
}

/// Whether the host can take the services' traffic.
pub fn passes(findings: &[Finding]) -> bool {
    findings.iter().all(|f| f.level != Level::Fail)
}

/// One change that puts a finding right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fix {
    /// Add the VIP to `lo`; with `arp`, only once the host no longer
    /// answers ARP for it (a `dsr-l2` VIP).
    VipOnLo {
        /// The VIP.
        vip: IpAddr,
        /// It must not be answered ARP for.
        arp: bool,
    },
    /// Write these sysctls (`/proc/sys` paths and values).
    Sysctls(Vec<(&'static str, u32)>),
    /// Apply the decapsulator's file (`lb decap apply`).
    Decap,
}

impl std::fmt::Display for Fix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fix::VipOnLo { vip, .. } => {
                let len = if vip.is_ipv4() { 32 } else { 128 };
                write!(f, "add {vip}/{len} to lo")
            }
            Fix::Sysctls(list) => {
                let set: Vec<String> = list
                    .iter()
                    .map(|(p, v)| format!("{}={v}", p.replace('/', ".")))
                    .collect();
                write!(f, "sysctl {}", set.join(" "))
            }
            Fix::Decap => write!(f, "lb decap apply {}", decap::DEFAULT_DECAP_FILE),
        }
    }
}

/// The changes that put the failing findings of `served` right, each once.
pub fn fixes(served: &BTreeMap<String, Served>) -> Vec<Fix> {
    plan(
        served.values().map(|s| {
            let facts = doctor::backend_facts(s.vip);
            (*s, doctor::assess_backend(&facts, s.mode))
        }),
        doctor::sysctl,
    )
}

/// The changes that put each service's failing findings right, each once,
/// with sysctls read by `read`: only those not already enough are written,
/// and before any VIP goes on `lo`, where a `dsr-l2` VIP would have the
/// host answer ARP for it until they are.
fn plan(
    found: impl IntoIterator<Item = (Served, Vec<Finding>)>,
    read: impl Fn(&str) -> u32,
) -> Vec<Fix> {
    let sysctls = |settings: &[Setting]| {
        let write: Vec<_> = settings
            .iter()
            .filter(|s| !(s.enough)(read(s.path)))
            .map(|s| (s.path, s.value))
            .collect();
        // All enough, yet failing (an interface's own setting): nothing
        // here puts it right.
        (!write.is_empty()).then_some(Fix::Sysctls(write))
    };
    let mut out = Vec::new();
    for (s, findings) in found {
        for f in findings.iter().filter(|f| f.level == Level::Fail) {
            let fix = if f.check.ends_with(": on lo") {
                let arp = s.mode == Mode::DsrL2 && s.vip.is_ipv4();
                // One VIP in services of two modes: added once, with the
                // stricter condition.
                if let Some(Fix::VipOnLo { arp: a, .. }) = out
                    .iter_mut()
                    .find(|x| matches!(x, Fix::VipOnLo { vip, .. } if *vip == s.vip))
                {
                    *a |= arp;
                    continue;
                }
                Some(Fix::VipOnLo { vip: s.vip, arp })
            } else if f.check.ends_with(": arp") {
                sysctls(&ARP_SETTINGS)
            } else if f.check.ends_with(": rp_filter") {
                sysctls(&RP_FILTER)
            } else {
                Some(Fix::Decap)
            };
            if let Some(fix) = fix
                && !out.contains(&fix)
            {
                out.push(fix);
            }
        }
    }
    // Stable: the rest keep the findings' order.
    out.sort_by_key(|f| matches!(f, Fix::VipOnLo { .. }));
    out
}

/// Applies `fix`.
pub async fn apply(fix: &Fix) -> Result<()> {
    match fix {
        Fix::VipOnLo { vip, arp } => {
            // Checked here, not trusted to the sysctl fix before: it may
            // have failed (a read-only /proc/sys), or an interface's own
            // setting may still answer.
            if *arp
                && let Some(f) = doctor::assess_backend(&doctor::backend_facts(*vip), Mode::DsrL2)
                    .into_iter()
                    .find(|f| f.check.ends_with(": arp") && f.level == Level::Fail)
            {
                bail!(
                    "not adding {vip} to lo while the host would answer ARP for it: {}",
                    f.detail
                );
            }
            add_to_lo(*vip).await
        }
        Fix::Sysctls(list) => {
            for (path, value) in list {
                let path = Path::new("/proc/sys").join(path);
                std::fs::write(&path, value.to_string())
                    .with_context(|| format!("writing {value} to {}", path.display()))?;
            }
            Ok(())
        }
        Fix::Decap => {
            let file = Path::new(decap::DEFAULT_DECAP_FILE);
            if !file.exists() {
                bail!(
                    "{} does not exist: write it (examples/decap.toml, docs/decap.md) with this \
                     host's VIPs and the load balancers' tunnel sources",
                    file.display()
                );
            }
            let config = decap::read(file)?;
            decap::apply(&config, Path::new(DEFAULT_DECAP_PIN_DIR))?;
            Ok(())
        }
    }
}

async fn add_to_lo(vip: IpAddr) -> Result<()> {
    // SAFETY: the name is a NUL-terminated literal.
    let index = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    if index == 0 {
        bail!("this host has no lo: {}", std::io::Error::last_os_error());
    }
    let (connection, handle, _) =
        rtnetlink::new_connection().context("opening a netlink socket")?;
    let task = tokio::spawn(connection);
    let len = if vip.is_ipv4() { 32 } else { 128 };
    let added = handle
        .address()
        .add(index, vip, len)
        .replace()
        .execute()
        .await
        .with_context(|| format!("adding {vip}/{len} to lo"));
    task.abort();
    added
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failing(check: &str) -> Finding {
        Finding {
            check: check.into(),
            level: Level::Fail,
            detail: String::new(),
            fix: None,
        }
    }

    fn served(vip: &str, mode: Mode) -> Served {
        Served {
            vip: vip.parse().unwrap(),
            mode,
        }
    }

    /// Sysctls as `values` has them, 0 for the rest.
    fn read(values: &[(&str, u32)]) -> impl Fn(&str) -> u32 {
        let values: Vec<(String, u32)> = values.iter().map(|(p, v)| (p.to_string(), *v)).collect();
        move |path| {
            values
                .iter()
                .find(|(p, _)| p == path)
                .map_or(0, |(_, v)| *v)
        }
    }

    #[test]
    fn the_arp_settings_go_before_the_vip_on_lo() {
        let l2 = served("198.18.1.1", Mode::DsrL2);
        let fixes = plan(
            [(
                l2,
                vec![failing("198.18.1.1: on lo"), failing("198.18.1.1: arp")],
            )],
            read(&[]),
        );
        assert_eq!(
            fixes,
            [
                Fix::Sysctls(vec![
                    ("net/ipv4/conf/all/arp_ignore", 1),
                    ("net/ipv4/conf/all/arp_announce", 2),
                ]),
                Fix::VipOnLo {
                    vip: l2.vip,
                    arp: true
                },
            ]
        );
        // A VIP served in two modes is added once, held back for ARP.
        let tunnel = served("198.18.1.1", Mode::Ipip);
        let fixes = plan(
            [
                (tunnel, vec![failing("198.18.1.1: on lo")]),
                (l2, vec![failing("198.18.1.1: on lo")]),
            ],
            read(&[]),
        );
        assert_eq!(
            fixes,
            [Fix::VipOnLo {
                vip: l2.vip,
                arp: true
            }]
        );
    }

    #[test]
    fn settings_already_enough_are_not_written_over() {
        let l2 = served("198.18.1.1", Mode::DsrL2);
        // arp_ignore 8 and 2 are stricter than 1: kept; 3 is not enough.
        for (ignore, expected) in [
            (8, vec![("net/ipv4/conf/all/arp_announce", 2)]),
            (2, vec![("net/ipv4/conf/all/arp_announce", 2)]),
            (
                3,
                vec![
                    ("net/ipv4/conf/all/arp_ignore", 1),
                    ("net/ipv4/conf/all/arp_announce", 2),
                ],
            ),
        ] {
            let fixes = plan(
                [(l2, vec![failing("198.18.1.1: arp")])],
                read(&[("net/ipv4/conf/all/arp_ignore", ignore)]),
            );
            assert_eq!(fixes, [Fix::Sysctls(expected)], "arp_ignore {ignore}");
        }
        // Both already enough (an interface's own setting fails): nothing
        // to write.
        let fixes = plan(
            [(l2, vec![failing("198.18.1.1: arp")])],
            read(&[
                ("net/ipv4/conf/all/arp_ignore", 2),
                ("net/ipv4/conf/all/arp_announce", 2),
            ]),
        );
        assert_eq!(fixes, []);
        // rp_filter: only a strict one is loosened; one off stays off.
        let tunnel = served("198.18.1.1", Mode::Ipip);
        let fixes = plan(
            [(tunnel, vec![failing("198.18.1.1: rp_filter")])],
            read(&[("net/ipv4/conf/tunl0/rp_filter", 1)]),
        );
        assert_eq!(
            fixes,
            [Fix::Sysctls(vec![("net/ipv4/conf/tunl0/rp_filter", 2)])]
        );
    }
}
