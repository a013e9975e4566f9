//! The announced VIPs as routes in a kernel routing table, through netlink.
//!
//! Each announced VIP is one `blackhole` host route in the table named by
//! `[announce] table`, tagged with [`ROUTE_PROTOCOL`] so lb touches no route
//! it did not make. BIRD learns the table (`protocol kernel { kernel table N;
//! learn; }`) and exports it over BGP; withdrawing is deleting the route.
//! The routes never carry traffic: no `ip rule` looks the table up, and a
//! blackhole needs no interface, so the host's own forwarding is unchanged.
//!
//! The routes outlive the daemon on purpose: a restarted or killed daemon
//! leaves the data plane forwarding, so its VIPs stay announced, and the
//! next daemon adopts them. A dead host disappears with its BGP session.

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use anyhow::{Context as _, Result, bail};
use futures_util::TryStreamExt as _;
use rtnetlink::{
    Handle,
    packet_route::{
        AddressFamily,
        route::{
            RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
        },
    },
};
use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::announce::Routes;

/// The protocol number of lb's routes (`ip route show proto 108`), one no
/// routing daemon in rtnetlink.h uses.
pub const ROUTE_PROTOCOL: u8 = 108;

/// How often the table is compared with what should be announced even when
/// nothing changed, so a route removed by hand comes back and a failed
/// netlink call is retried.
pub(crate) const RESYNC: Duration = Duration::from_secs(1);

/// A handle on one routing table's VIP routes.
#[derive(Clone)]
pub struct VipRoutes {
    handle: Handle,
    table: u32,
}

/// lb's route for `vip` in `table`.
fn route(vip: IpAddr, table: u32) -> RouteMessage {
    let (family, len) = match vip {
        IpAddr::V4(_) => (AddressFamily::Inet, 32),
        IpAddr::V6(_) => (AddressFamily::Inet6, 128),
    };
    let mut m = filter(family, Some(table));
    m.header.destination_prefix_length = len;
    m.attributes
        .push(RouteAttribute::Destination(RouteAddress::from(vip)));
    m
}

/// A dump request for lb's routes of one family in `table`, or in every
/// table: table, protocol and type are what make a route one of lb's.
fn filter(family: AddressFamily, table: Option<u32>) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = family;
    m.header.protocol = RouteProtocol::Other(ROUTE_PROTOCOL);
    m.header.kind = RouteType::BlackHole;
    if let Some(table) = table {
        // Tables above 255 exist only as the attribute; the header says so.
        m.header.table = u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
        m.attributes.push(RouteAttribute::Table(table));
    }
    m
}

/// lb's VIP routes in `table`, or in every table: (table, VIP).
async fn routes_in(handle: &Handle, table: Option<u32>) -> Result<Vec<(u32, IpAddr)>> {
    let mut found = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        // With strict checking the kernel filters the dump by table,
        // protocol and type; `vip_of` checks again for older kernels.
        let mut dump = handle.route().get(filter(family, table)).execute();
        while let Some(m) = dump.try_next().await.context("listing lb's VIP routes")? {
            let of = table_of(&m);
            if table.is_none_or(|t| t == of) {
                found.extend(vip_of(&m, of).map(|vip| (of, vip)));
            }
        }
    }
    Ok(found)
}

/// A netlink connection, served by a task on the current tokio runtime
/// until its last handle is dropped.
fn connect() -> Result<Handle> {
    let (connection, handle, _) = rtnetlink::new_connection_with_strict_check()
        .context("opening a netlink socket for the VIP routes")?;
    tokio::spawn(connection);
    Ok(handle)
}

/// The table a dumped route is in (above 255 only in its attribute).
pub(crate) fn table_of(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(m.header.table.into())
}

/// The VIP of one of lb's host routes in `table`, or `None` for any other route.
fn vip_of(m: &RouteMessage, table: u32) -> Option<IpAddr> {
    if table_of(m) != table
        || m.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL)
        || m.header.kind != RouteType::BlackHole
    {
        return None;
    }
    let dst = m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(d) => Some(d),
        _ => None,
    })?;
    match (dst, m.header.destination_prefix_length) {
        (RouteAddress::Inet(a), 32) => Some(IpAddr::V4(*a)),
        (RouteAddress::Inet6(a), 128) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

impl VipRoutes {
    /// Opens a netlink connection for the VIP routes of `table`.
    pub fn open(table: u32) -> Result<VipRoutes> {
        Ok(VipRoutes {
            handle: connect()?,
            table,
        })
    }

    /// The table these routes live in.
    pub fn table(&self) -> u32 {
        self.table
    }

    /// The VIPs with a route in the table now.
    pub async fn list(&self) -> Result<BTreeSet<IpAddr>> {
        let found = routes_in(&self.handle, Some(self.table))
            .await
            .with_context(|| format!("routing table {}", self.table))?;
        Ok(found.into_iter().map(|(_, vip)| vip).collect())
    }

    /// Announces `vip`. A route to it already in the table that lb did not
    /// make (another protocol, type or tool) is left as it is, and said so:
    /// lb touches no route it did not make.
    pub async fn add(&self, vip: IpAddr) -> Result<()> {
        match self
            .handle
            .route()
            .add(route(vip, self.table))
            .execute()
            .await
        {
            Err(e) if errno(&e) == Some(libc::EEXIST) => bail!(
                "adding the route of {vip} to table {}: a route to it that lb did not make is \
                 there, and stays (remove it, or give [announce] a table of lb's own)",
                self.table
            ),
            r => r.with_context(|| format!("adding the route of {vip} to table {}", self.table)),
        }
    }

    /// Withdraws `vip` (idempotent).
    pub async fn del(&self, vip: IpAddr) -> Result<()> {
        match self
            .handle
            .route()
            .del(route(vip, self.table))
            .execute()
            .await
        {
            Err(e) if errno(&e) == Some(libc::ESRCH) => Ok(()),
            r => {
                r.with_context(|| format!("removing the route of {vip} from table {}", self.table))
            }
        }
    }

    /// Makes the table's routes `wanted.announce`, plus those of
    /// `wanted.keep` that are there already: adds first, then removes. Every
    /// one is tried: a route that cannot be added must not keep a VIP
    /// announced that should be withdrawn. Fails with every failure.
    pub async fn sync(&self, wanted: &Routes) -> Result<()> {
        let now = self.list().await?;
        let mut failed = Vec::new();
        for vip in wanted.announce.difference(&now) {
            match self.add(*vip).await {
                Ok(()) => info!(vip = %vip, table = self.table, "announced"),
                Err(e) => failed.push(format!("{e:#}")),
            }
        }
        for vip in now
            .iter()
            .filter(|v| !wanted.announce.contains(v) && !wanted.keep.contains(v))
        {
            match self.del(*vip).await {
                Ok(()) => info!(vip = %vip, table = self.table, "withdrawn"),
                Err(e) => failed.push(format!("{e:#}")),
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            bail!("{}", failed.join("; "))
        }
    }
}

/// A VIP route withdrawn by [`withdraw_all_but`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Withdrawn {
    /// The routing table it was in.
    pub table: u32,
    /// Its VIP.
    pub vip: IpAddr,
}

/// Withdraws lb's VIP routes (protocol 108) from every table but `kept`
/// (all of them when `None`), and says which. The daemon runs it once at
/// start for the routes a previous daemon left in a table `[announce]` no
/// longer names, or all of them without `[announce]`: left there, a BIRD
/// still learning that table would go on announcing VIPs no daemon decides
/// on. `lb node withdraw` runs it with `None` for a daemon that is gone.
/// A route that cannot be withdrawn does not stop the others: the error,
/// after them all, names each that failed (`withdrawn` has the rest).
pub async fn withdraw_all_but(kept: Option<u32>, withdrawn: &mut Vec<Withdrawn>) -> Result<()> {
    let handle = connect()?;
    let mut failed = Vec::new();
    for (table, vip) in routes_in(&handle, None).await? {
        if Some(table) == kept {
            continue;
        }
        let routes = VipRoutes {
            handle: handle.clone(),
            table,
        };
        match routes.del(vip).await {
            Ok(()) => withdrawn.push(Withdrawn { table, vip }),
            Err(e) => failed.push(format!("{vip} in table {table}: {e:#}")),
        }
    }
    if !failed.is_empty() {
        bail!("withdrawing {}", failed.join("; "));
    }
    Ok(())
}

/// What the route keeper last did, for `lb node status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Installed {
    /// VIPs with a route in the table after the last sync.
    pub vips: BTreeSet<IpAddr>,
    /// Why the last sync failed, if it did.
    pub error: Option<String>,
}

/// Keeps the table in line with `wanted` ([`VipRoutes::sync`]) until
/// `wanted`'s sender is dropped: at once on every change, and every
/// [`RESYNC`] regardless. Publishes what the table holds on `installed`.
pub async fn keep(
    routes: VipRoutes,
    mut wanted: watch::Receiver<Option<Routes>>,
    installed: watch::Sender<Installed>,
) {
    loop {
        // `None` until the daemon has decided once: until then the routes
        // a previous daemon left stay as they are.
        let target = wanted.borrow_and_update().clone();
        if let Some(target) = target {
            let result = routes.sync(&target).await;
            // Unlisted, the table is not known to be empty: the last list
            // stands, and the error says why.
            let (listed, list_error) = match routes.list().await {
                Ok(listed) => (Some(listed), None),
                Err(e) => (None, Some(format!("listing the VIP routes: {e:#}"))),
            };
            let error = result.err().map(|e| format!("{e:#}")).or(list_error);
            installed.send_if_modified(|old| {
                if old.error != error
                    && let Some(e) = &error
                {
                    warn!(error = %e, "syncing the VIP routes; retrying every second");
                }
                let new = Installed {
                    vips: listed.unwrap_or_else(|| old.vips.clone()),
                    error,
                };
                let changed = *old != new;
                *old = new;
                changed
            });
        }
        // A change, or the resync period: sync again. A closed channel: done.
        if let Ok(Err(_)) = tokio::time::timeout(RESYNC, wanted.changed()).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lbs_host_routes_in_its_table_are_vips() {
        let vip: IpAddr = "198.18.1.1".parse().unwrap();
        let ours = route(vip, 100);
        assert_eq!(vip_of(&ours, 100), Some(vip));
        assert_eq!(vip_of(&ours, 101), None);
        let v6: IpAddr = "2001:2:1::1".parse().unwrap();
        assert_eq!(vip_of(&route(v6, 1000), 1000), Some(v6));
        let mut other_proto = ours.clone();
        other_proto.header.protocol = RouteProtocol::Static;
        assert_eq!(vip_of(&other_proto, 100), None);
        let mut unicast = ours.clone();
        unicast.header.kind = RouteType::Unicast;
        assert_eq!(vip_of(&unicast, 100), None);
        let mut prefix = ours;
        prefix.header.destination_prefix_length = 24;
        assert_eq!(vip_of(&prefix, 100), None);
    }
}
