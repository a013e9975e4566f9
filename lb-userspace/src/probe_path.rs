//! Probes through the data path (`[service.health] via = "vip"`): a probe
//! addressed to the service's VIP reaches one chosen backend the way
//! clients' packets do, so a backend that lost the VIP, or whose server
//! listens on its own address only, fails its checks.
//!
//! For `dsr-l2` that means the backend's MAC. Each such backend gets a
//! routing table of its own holding one route, the VIP via the backend's
//! next hop (`onlink`, on the interface the data plane sends its frames
//! from), and a policy rule sending packets that carry the backend's mark to
//! that table. Its probe sockets carry the mark (SO_MARK), so only probes
//! take these routes; the host's other traffic never matches the rules.
//! Replies come from the VIP to the host's own address, as a client's do.
//!
//! Tables, marks and rules are lb's by number ([`mark`], [`RULE_PRIORITY`])
//! and routes by protocol ([`ROUTE_PROTOCOL`]): lb changes nothing else. A
//! daemon that stops leaves them (only marked packets use them); the next
//! one removes those no service asks for.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use futures_util::TryStreamExt as _;
use rtnetlink::{
    Handle, IpVersion, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        route::RouteProtocol,
        rule::{RuleAction, RuleAttribute, RuleMessage},
    },
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::routes::{ROUTE_PROTOCOL, table_of};

/// The first of lb's probe marks and routing tables: backend `id`'s are
/// this plus `id` ("LB" in the upper half, so `ip rule` shows them apart).
pub const PROBE_BASE: u32 = 0x4c42_0000;
/// Backend ids that have a mark and a table of their own.
pub const PROBE_IDS: u32 = 0x1_0000;
/// Priority of lb's probe rules: ahead of the `main` table's (32766), where
/// the host's route to the VIP, if any, would win.
pub const RULE_PRIORITY: u32 = 100;
/// How often the rules and routes are compared with what should be there
/// even when nothing changed, so one removed by hand comes back.
const RESYNC: Duration = Duration::from_secs(5);

/// The mark of backend `id`'s probes, and the number of its routing table;
/// `None` for an id past [`PROBE_IDS`].
pub fn mark(id: u32) -> Option<u32> {
    (id < PROBE_IDS).then_some(PROBE_BASE + id)
}

/// One backend's path: its probes (`mark`) to `vip` leave by `dev` to
/// `next_hop`'s MAC.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProbePath {
    /// The backend's mark, also its table.
    pub mark: u32,
    /// The service's VIP.
    pub vip: IpAddr,
    /// The backend (or the gateway its frames go to).
    pub next_hop: IpAddr,
    /// The interface the data plane sends its frames from.
    pub dev: String,
}

/// A rule's or table's key: the mark, and whether it is IPv6's.
type Key = (u32, bool);

impl ProbePath {
    fn key(&self) -> Key {
        (self.mark, self.vip.is_ipv6())
    }
}

/// Whether `rule` is one of lb's probe rules: its key if so.
fn probe_rule(rule: &RuleMessage) -> Option<Key> {
    let (mut mark, mut table, mut priority) = (None, None, None);
    for a in &rule.attributes {
        match a {
            RuleAttribute::FwMark(m) => mark = Some(*m),
            RuleAttribute::Table(t) => table = Some(*t),
            RuleAttribute::Priority(p) => priority = Some(*p),
            _ => {}
        }
    }
    let mark = mark?;
    let ours = priority == Some(RULE_PRIORITY)
        && table == Some(mark)
        && (PROBE_BASE..PROBE_BASE + PROBE_IDS).contains(&mark);
    let v6 = match rule.header.family {
        AddressFamily::Inet => false,
        AddressFamily::Inet6 => true,
        _ => return None,
    };
    ours.then_some((mark, v6))
}

/// A netlink handle on lb's probe rules and routes.
struct Paths {
    handle: Handle,
    /// The paths last installed, so a changed one's old route can be
    /// deleted; `None` before the first sync, which empties every wanted
    /// table first (of what a previous daemon left).
    installed: Option<BTreeSet<ProbePath>>,
}

impl Paths {
    fn open() -> Result<Paths> {
        let (connection, handle, _) = rtnetlink::new_connection_with_strict_check()
            .context("opening a netlink socket for the probe routes")?;
        tokio::spawn(connection);
        Ok(Paths {
            handle,
            installed: None,
        })
    }

    /// lb's probe rules now, with their keys.
    async fn rules(&self) -> Result<Vec<(Key, RuleMessage)>> {
        let mut found = Vec::new();
        for version in [IpVersion::V4, IpVersion::V6] {
            let mut dump = self.handle.rule().get(version).execute();
            while let Some(rule) = dump.try_next().await.context("listing the policy rules")? {
                if let Some(key) = probe_rule(&rule) {
                    found.push((key, rule));
                }
            }
        }
        Ok(found)
    }

    async fn add_route(&self, p: &ProbePath) -> Result<()> {
        let index = ifindex(&p.dev)?;
        let route = match (p.vip, p.next_hop) {
            (IpAddr::V4(vip), IpAddr::V4(hop)) => {
                in_table(RouteMessageBuilder::<Ipv4Addr>::new(), p.mark)
                    .destination_prefix(vip, 32)
                    .gateway(hop)
                    .output_interface(index)
                    .onlink()
                    .build()
            }
            (IpAddr::V6(vip), IpAddr::V6(hop)) => {
                in_table(RouteMessageBuilder::<Ipv6Addr>::new(), p.mark)
                    .destination_prefix(vip, 128)
                    .gateway(hop)
                    .output_interface(index)
                    .onlink()
                    .build()
            }
            (vip, hop) => bail!("{vip} and its next hop {hop} differ in family"),
        };
        self.handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .with_context(|| format!("adding the probe route of {} via {}", p.vip, p.next_hop))
    }

    /// Removes lb's routes from the table of `key`.
    async fn flush_table(&self, (mark, v6): Key) -> Result<()> {
        let filter = if v6 {
            in_table(RouteMessageBuilder::<Ipv6Addr>::new(), mark).build()
        } else {
            in_table(RouteMessageBuilder::<Ipv4Addr>::new(), mark).build()
        };
        let mut dump = self.handle.route().get(filter).execute();
        let mut found = Vec::new();
        while let Some(m) = dump.try_next().await.context("listing a probe table")? {
            // Strict checking filters the dump; older kernels do not.
            if m.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL) && table_of(&m) == mark {
                found.push(m);
            }
        }
        for m in found {
            self.handle
                .route()
                .del(m)
                .execute()
                .await
                .with_context(|| format!("removing a probe route from table {mark:#x}"))?;
        }
        Ok(())
    }

    /// Makes lb's probe rules and routes equal `wanted`: the tables of
    /// changed paths emptied, every wanted route added (or replaced), the
    /// missing rules added, and the rules (and tables) of paths no longer
    /// wanted removed.
    async fn sync(&mut self, wanted: &BTreeSet<ProbePath>) -> Result<()> {
        let stale: BTreeSet<Key> = match &self.installed {
            Some(installed) => installed.difference(wanted).map(ProbePath::key).collect(),
            None => wanted.iter().map(ProbePath::key).collect(),
        };
        for key in stale {
            self.flush_table(key).await?;
        }
        for p in wanted {
            self.add_route(p).await?;
        }
        let rules = self.rules().await?;
        let have: BTreeSet<Key> = rules.iter().map(|(k, _)| *k).collect();
        for p in wanted.iter().filter(|p| !have.contains(&p.key())) {
            let add = self
                .handle
                .rule()
                .add()
                .action(RuleAction::ToTable)
                .priority(RULE_PRIORITY)
                .fw_mark(p.mark)
                .table_id(p.mark);
            if p.vip.is_ipv6() {
                add.v6().execute().await
            } else {
                add.v4().execute().await
            }
            .with_context(|| format!("adding the probe rule of mark {:#x}", p.mark))?;
            info!(vip = %p.vip, via = %p.next_hop, dev = %p.dev, mark = %format!("{:#x}", p.mark), "probe path added");
        }
        let keys: BTreeSet<Key> = wanted.iter().map(ProbePath::key).collect();
        for (key, rule) in rules.into_iter().filter(|(k, _)| !keys.contains(k)) {
            self.handle
                .rule()
                .del(rule)
                .execute()
                .await
                .with_context(|| format!("removing the probe rule of mark {:#x}", key.0))?;
            self.flush_table(key).await?;
            info!(mark = %format!("{:#x}", key.0), "probe path removed");
        }
        self.installed = Some(wanted.clone());
        Ok(())
    }
}

/// `route` in lb's table `mark`, as lb's.
fn in_table<T>(route: RouteMessageBuilder<T>, mark: u32) -> RouteMessageBuilder<T> {
    route
        .table_id(mark)
        .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
}

/// The index of interface `dev`.
pub(crate) fn ifindex(dev: &str) -> Result<u32> {
    let name = std::ffi::CString::new(dev).context("an interface name with a NUL byte")?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    anyhow::ensure!(index != 0, "no interface named {dev}");
    Ok(index)
}

/// Keeps lb's probe rules and routes equal to `wanted` until its sender is
/// dropped: at once on every change, and every [`RESYNC`] regardless.
pub async fn keep(mut wanted: watch::Receiver<BTreeSet<ProbePath>>) {
    let mut paths = match Paths::open() {
        Ok(p) => p,
        Err(e) => {
            warn!(error = %format!("{e:#}"), "probes through the VIP cannot be routed");
            return;
        }
    };
    let mut failing = false;
    loop {
        let target = wanted.borrow_and_update().clone();
        match paths.sync(&target).await {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                warn!(error = %format!("{e:#}"), "syncing the probe routes; retrying");
            }
            Err(_) => {}
        }
        if let Ok(Err(_)) = tokio::time::timeout(RESYNC, wanted.changed()).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_lbs_and_bounded() {
        assert_eq!(mark(0), Some(PROBE_BASE));
        assert_eq!(mark(7), Some(0x4c42_0007));
        assert_eq!(mark(PROBE_IDS - 1), Some(0x4c42_ffff));
        assert_eq!(mark(PROBE_IDS), None);
    }

    #[test]
    fn only_lbs_rules_are_probe_rules() {
        let mut rule = RuleMessage::default();
        rule.header.family = AddressFamily::Inet;
        rule.attributes = vec![
            RuleAttribute::Priority(RULE_PRIORITY),
            RuleAttribute::FwMark(PROBE_BASE + 3),
            RuleAttribute::Table(PROBE_BASE + 3),
        ];
        assert_eq!(probe_rule(&rule), Some((PROBE_BASE + 3, false)));
        let mut other_table = rule.clone();
        other_table.attributes[2] = RuleAttribute::Table(100);
        assert_eq!(probe_rule(&other_table), None);
        let mut other_priority = rule.clone();
        other_priority.attributes[0] = RuleAttribute::Priority(1000);
        assert_eq!(probe_rule(&other_priority), None);
        let mut other_mark = rule;
        other_mark.attributes[1] = RuleAttribute::FwMark(7);
        other_mark.attributes[2] = RuleAttribute::Table(7);
        assert_eq!(probe_rule(&other_mark), None);
    }
}
