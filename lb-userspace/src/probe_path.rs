//! Probes through the data path (`[service.health] via = "vip"`): a probe
//! addressed to the service's VIP reaches one chosen backend the way
//! clients' packets do, so a backend that lost the VIP, or whose server
//! listens on its own address only, or (`ipip`, `gue`) whose decapsulator
//! is gone, fails its checks.
//!
//! Each such backend gets a routing table of its own holding one route per
//! VIP, via the backend's next hop (`onlink`, on the interface the data
//! plane sends its frames from), and a policy rule sending packets that
//! carry the backend's mark to that table. Its probe sockets carry the mark
//! (SO_MARK), so only probes take these routes; the host's other traffic
//! never matches the rules. For `dsr-l2` that delivers the probe to the
//! backend's MAC as it is. For `ipip` and `gue` the probe encapsulator
//! ([`ProbeEncapsulator`], TC egress on that interface) adds the tunnel
//! header the data plane would, from the data plane's tunnel source; where
//! it cannot run, those routes are `unreachable`, so the probes fail rather
//! than reach the backend outside the tunnel. Replies come from the VIP to
//! the host's own address, as a client's do.
//!
//! Tables, marks and rules are lb's by number ([`mark`], [`RULE_PRIORITY`])
//! and routes by protocol ([`ROUTE_PROTOCOL`]): lb changes nothing else. A
//! daemon that stops leaves them (only marked packets use them; the
//! encapsulator goes with it); the next one removes those no service asks
//! for.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use futures_util::TryStreamExt as _;
use rtnetlink::{
    Handle, IpVersion, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        route::{RouteAttribute, RouteProtocol, RouteType, RouteVia},
        rule::{RuleAction, RuleAttribute, RuleMessage},
    },
};
use tokio::sync::watch;
use tracing::{info, warn};

use lb_common::{ProbeTunnel, addr_bytes};

use crate::{
    dataplane::ProbeEncapsulator,
    routes::{ROUTE_PROTOCOL, table_of},
};

pub use lb_common::limits::{PROBE_MARK_BASE, PROBE_MARKS};
/// Priority of lb's probe rules: ahead of the `main` table's (32766), where
/// the host's route to the VIP, if any, would win.
pub const RULE_PRIORITY: u32 = 100;
/// Priority of lb's catch-all probe rule, right behind the backends' own:
/// a probe whose table holds no route (the kernel takes a route with its
/// interface, until the next sync makes it `unreachable`) is refused there
/// instead of passing on to the main table, where the VIP's route may
/// reach another node or backend and pass the probe.
const CATCH_ALL_PRIORITY: u32 = RULE_PRIORITY + 1;
/// The bits that make a mark one of lb's probe marks ([`PROBE_MARK_BASE`]
/// under this mask).
const PROBE_MARK_MASK: u32 = !(PROBE_MARKS - 1);
const _: () = assert!(PROBE_MARKS.is_power_of_two() && PROBE_MARK_BASE & !PROBE_MARK_MASK == 0);
/// How often the rules and routes are compared with what should be there
/// even when nothing changed, so one removed by hand comes back.
const RESYNC: Duration = Duration::from_secs(5);

/// The mark of backend `id`'s probes, and the number of its routing table
/// ([`PROBE_MARK_BASE`] + `id`);
/// `None` for an id past [`PROBE_MARKS`].
pub fn mark(id: u32) -> Option<u32> {
    (id < PROBE_MARKS).then_some(PROBE_MARK_BASE + id)
}

/// One backend's path: its probes (`mark`) to `vip` leave by `dev` to
/// `next_hop`'s MAC, in `tunnel` if it has one.
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
    /// The tunnel of an `ipip` or `gue` backend.
    pub tunnel: Option<Tunnel>,
}

/// The tunnel a probe goes in, as the data plane's packets to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tunnel {
    /// Outer source: the data plane's tunnel source of the family.
    pub src: IpAddr,
    /// Outer destination: the backend.
    pub dst: IpAddr,
    /// The UDP port of a `gue` tunnel; `None` for `ipip`.
    pub gue_port: Option<u16>,
}

impl Tunnel {
    /// The probe encapsulator's map value.
    fn value(&self) -> ProbeTunnel {
        let (src, _) = addr_bytes(self.src);
        let (dst, family) = addr_bytes(self.dst);
        ProbeTunnel {
            src,
            dst,
            family,
            _pad: 0,
            gue_port: self.gue_port.unwrap_or(0).to_be(),
        }
    }
}

/// A rule's or table's key: the mark, and whether it is IPv6's.
type Key = (u32, bool);

impl ProbePath {
    fn key(&self) -> Key {
        (self.mark, self.vip.is_ipv6())
    }
}

/// What a rule matches and where it goes, as lb's rules say it.
#[derive(Default)]
struct RuleFields {
    mark: Option<u32>,
    mask: Option<u32>,
    table: Option<u32>,
    priority: Option<u32>,
}

impl RuleFields {
    fn of(rule: &RuleMessage) -> RuleFields {
        let mut f = RuleFields::default();
        for a in &rule.attributes {
            match a {
                RuleAttribute::FwMark(m) => f.mark = Some(*m),
                RuleAttribute::FwMask(m) => f.mask = Some(*m),
                RuleAttribute::Table(t) => f.table = Some(*t),
                RuleAttribute::Priority(p) => f.priority = Some(*p),
                _ => {}
            }
        }
        f
    }
}

/// Whether `rule` is one of lb's probe rules: its key if so.
fn probe_rule(rule: &RuleMessage) -> Option<Key> {
    let RuleFields {
        mark,
        table,
        priority,
        ..
    } = RuleFields::of(rule);
    let mark = mark?;
    let ours = priority == Some(RULE_PRIORITY)
        && table == Some(mark)
        && (PROBE_MARK_BASE..PROBE_MARK_BASE + PROBE_MARKS).contains(&mark);
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
    /// The probe encapsulator, loaded for the first tunnel path.
    encapsulator: Option<ProbeEncapsulator>,
}

impl Paths {
    fn open() -> Result<Paths> {
        let (connection, handle, _) = rtnetlink::new_connection_with_strict_check()
            .context("opening a netlink socket for the probe routes")?;
        tokio::spawn(connection);
        Ok(Paths {
            handle,
            installed: None,
            encapsulator: None,
        })
    }

    /// lb's rules now, from one listing: the probe rules with their keys,
    /// and the catch-all rules (with whether each is IPv6's).
    async fn rules(&self) -> Result<(Vec<(Key, RuleMessage)>, Vec<(bool, RuleMessage)>)> {
        let (mut probe, mut catch_all) = (Vec::new(), Vec::new());
        for version in [IpVersion::V4, IpVersion::V6] {
            let v6 = version == IpVersion::V6;
            let mut dump = self.handle.rule().get(version).execute();
            while let Some(rule) = dump.try_next().await.context("listing the policy rules")? {
                if let Some(key) = probe_rule(&rule) {
                    probe.push((key, rule));
                } else if is_catch_all(&rule) {
                    catch_all.push((v6, rule));
                }
            }
        }
        Ok((probe, catch_all))
    }

    /// Makes lb's catch-all probe rule ([`CATCH_ALL_PRIORITY`]) of both
    /// families present, or absent; `found` are those there now.
    async fn keep_catch_all(&self, present: bool, found: Vec<(bool, RuleMessage)>) -> Result<()> {
        if !present {
            for (_, rule) in found {
                self.handle
                    .rule()
                    .del(rule)
                    .execute()
                    .await
                    .context("removing the catch-all probe rule")?;
            }
            return Ok(());
        }
        for v6 in [false, true] {
            if found.iter().any(|(f, _)| *f == v6) {
                continue;
            }
            let mut add = self
                .handle
                .rule()
                .add()
                .action(RuleAction::Unreachable)
                .priority(CATCH_ALL_PRIORITY)
                .fw_mark(PROBE_MARK_BASE);
            add.message_mut()
                .attributes
                .push(RuleAttribute::FwMask(PROBE_MARK_MASK));
            // No table: the rule refuses, it looks nothing up.
            add.message_mut().header.table = 0;
            if v6 {
                add.v6().execute().await
            } else {
                add.v4().execute().await
            }
            .context("adding the catch-all probe rule")?;
        }
        Ok(())
    }

    /// Adds (or replaces) `p`'s route; an `unreachable` one unless
    /// `reachable`.
    async fn add_route(&self, p: &ProbePath, reachable: bool) -> Result<()> {
        // An unreachable route names no interface: one that is gone still
        // gets it.
        let index = || ifindex(&p.dev);
        let route = match (p.vip, p.next_hop) {
            (IpAddr::V4(vip), hop) => {
                let to = in_table(RouteMessageBuilder::<Ipv4Addr>::new(), p.mark)
                    .destination_prefix(vip, 32);
                match hop {
                    _ if !reachable => to.kind(RouteType::Unreachable).build(),
                    IpAddr::V4(hop) => to.gateway(hop).output_interface(index()?).onlink().build(),
                    // Through an IPv6 router (RFC 5549), as the backend's
                    // own route goes.
                    IpAddr::V6(hop) => {
                        let mut route = to.output_interface(index()?).onlink().build();
                        route
                            .attributes
                            .push(RouteAttribute::Via(RouteVia::Inet6(hop)));
                        route
                    }
                }
            }
            (IpAddr::V6(vip), IpAddr::V6(hop)) => {
                let to = in_table(RouteMessageBuilder::<Ipv6Addr>::new(), p.mark)
                    .destination_prefix(vip, 128);
                if reachable {
                    to.gateway(hop).output_interface(index()?).onlink().build()
                } else {
                    to.kind(RouteType::Unreachable).build()
                }
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

    /// Removes lb's routes from the table of `key`, `unreachable` ones
    /// included (a dump under strict checking lists only the type asked
    /// for; unspecified asks for every type).
    async fn flush_table(&self, (mark, v6): Key) -> Result<()> {
        let filter = if v6 {
            in_table(RouteMessageBuilder::<Ipv6Addr>::new(), mark)
                .kind(RouteType::Unspec)
                .build()
        } else {
            in_table(RouteMessageBuilder::<Ipv4Addr>::new(), mark)
                .kind(RouteType::Unspec)
                .build()
        };
        let mut dump = self.handle.route().get(filter).execute();
        let mut found = Vec::new();
        loop {
            let m = match dump.try_next().await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                // A table that does not exist yet (strict checking says so
                // of a filtered dump): nothing to remove.
                Err(rtnetlink::Error::NetlinkError(e))
                    if e.code.is_some_and(|c| -c.get() == libc::ENOENT) =>
                {
                    break;
                }
                Err(e) => return Err(e).context("listing a probe table"),
            };
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

    /// Makes the probe encapsulator hold the tunnels of `wanted` and sit
    /// at the egress of the interfaces they leave by; loads it for the
    /// first tunnel.
    fn encapsulate(&mut self, wanted: &BTreeSet<ProbePath>) -> Result<()> {
        let tunnels: BTreeMap<u32, ProbeTunnel> = wanted
            .iter()
            .filter_map(|p| Some((p.mark, p.tunnel?.value())))
            .collect();
        let encapsulator = match &mut self.encapsulator {
            Some(e) => e,
            None if tunnels.is_empty() => return Ok(()),
            None => self
                .encapsulator
                .insert(ProbeEncapsulator::load().context("loading the probe encapsulator")?),
        };
        let devs: BTreeSet<&str> = wanted
            .iter()
            .filter(|p| p.tunnel.is_some())
            .map(|p| p.dev.as_str())
            .collect();
        encapsulator.set_tunnels(&tunnels)?;
        encapsulator.attach(&devs)
    }

    /// Makes lb's probe rules and routes equal `wanted`: the catch-all rule
    /// first when anything is wanted (a marked probe whose own rule is not
    /// there yet fails rather than leave by the main table), the
    /// encapsulator (so no tunnel path's route precedes it), the tables of changed
    /// paths emptied, every wanted route added (or replaced), the missing
    /// rules added, and the rules (and tables) of paths no longer wanted
    /// removed. Tunnel paths get `unreachable` routes while the
    /// encapsulator fails, and so does a path whose route is refused: its
    /// probes fail rather than leave by the main table, where they may
    /// reach another node or backend and pass for this one. One path's
    /// failure does not hold the others back; the first error is returned
    /// once every path was tried.
    async fn sync(&mut self, wanted: &BTreeSet<ProbePath>) -> Result<()> {
        let (rules, catch_all) = self.rules().await?;
        if !wanted.is_empty() {
            self.keep_catch_all(true, catch_all.clone()).await?;
        }
        let mut failed = self.encapsulate(wanted).err();
        let encapsulated = failed.is_none();
        let mut fail = |e: anyhow::Error| {
            failed.get_or_insert(e);
        };
        let stale: BTreeSet<Key> = match &self.installed {
            Some(installed) => installed.difference(wanted).map(ProbePath::key).collect(),
            None => wanted.iter().map(ProbePath::key).collect(),
        };
        for key in stale {
            if let Err(e) = self.flush_table(key).await {
                fail(e);
            }
        }
        // The paths whose table has their route, reachable or not: only
        // those get a rule.
        let mut routed = BTreeSet::new();
        for p in wanted {
            let reachable = p.tunnel.is_none() || encapsulated;
            let mut added = self.add_route(p, reachable).await;
            if let Err(e) = added {
                fail(e);
                added = self.add_route(p, false).await;
            }
            match added {
                Ok(()) => {
                    routed.insert(p.key());
                }
                Err(e) => fail(e),
            }
        }
        let have: BTreeSet<Key> = rules.iter().map(|(k, _)| *k).collect();
        for p in wanted
            .iter()
            .filter(|p| !have.contains(&p.key()) && routed.contains(&p.key()))
        {
            let add = self
                .handle
                .rule()
                .add()
                .action(RuleAction::ToTable)
                .priority(RULE_PRIORITY)
                .fw_mark(p.mark)
                .table_id(p.mark);
            let added = if p.vip.is_ipv6() {
                add.v6().execute().await
            } else {
                add.v4().execute().await
            };
            match added.with_context(|| format!("adding the probe rule of mark {:#x}", p.mark)) {
                Ok(()) => {
                    info!(vip = %p.vip, via = %p.next_hop, dev = %p.dev, mark = %format!("{:#x}", p.mark), "probe path added");
                }
                Err(e) => fail(e),
            }
        }
        let keys: BTreeSet<Key> = wanted.iter().map(ProbePath::key).collect();
        for (key, rule) in rules.into_iter().filter(|(k, _)| !keys.contains(k)) {
            let removed = self
                .handle
                .rule()
                .del(rule)
                .execute()
                .await
                .with_context(|| format!("removing the probe rule of mark {:#x}", key.0));
            match removed {
                Ok(()) => match self.flush_table(key).await {
                    Ok(()) => info!(mark = %format!("{:#x}", key.0), "probe path removed"),
                    Err(e) => fail(e),
                },
                Err(e) => fail(e),
            }
        }
        if wanted.is_empty()
            && let Err(e) = self.keep_catch_all(false, catch_all).await
        {
            fail(e);
        }
        self.installed = Some(wanted.clone());
        failed.map_or(Ok(()), Err)
    }
}

/// Whether `rule` is lb's catch-all probe rule.
fn is_catch_all(rule: &RuleMessage) -> bool {
    let f = RuleFields::of(rule);
    rule.header.action == RuleAction::Unreachable
        && f.priority == Some(CATCH_ALL_PRIORITY)
        && f.mark == Some(PROBE_MARK_BASE)
        && f.mask == Some(PROBE_MARK_MASK)
}

/// `route` in lb's table `mark`, as lb's.
fn in_table<T>(route: RouteMessageBuilder<T>, mark: u32) -> RouteMessageBuilder<T> {
    route
        .table_id(mark)
        .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
}

/// The index of interface `dev`.
pub(crate) fn ifindex(dev: &str) -> Result<u32> {
    match crate::dataplane::ifindex(dev) {
        0 => bail!("no interface named {dev}"),
        index => Ok(index),
    }
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
        assert_eq!(mark(0), Some(PROBE_MARK_BASE));
        assert_eq!(mark(7), Some(0x4c42_0007));
        assert_eq!(mark(PROBE_MARKS - 1), Some(0x4c42_ffff));
        assert_eq!(mark(PROBE_MARKS), None);
    }

    #[test]
    fn only_lbs_rules_are_probe_rules() {
        let mut rule = RuleMessage::default();
        rule.header.family = AddressFamily::Inet;
        rule.attributes = vec![
            RuleAttribute::Priority(RULE_PRIORITY),
            RuleAttribute::FwMark(PROBE_MARK_BASE + 3),
            RuleAttribute::Table(PROBE_MARK_BASE + 3),
        ];
        assert_eq!(probe_rule(&rule), Some((PROBE_MARK_BASE + 3, false)));
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
